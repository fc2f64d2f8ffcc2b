"""No other local user can drive the actor transport: every frame must carry the bus's MAC.

Loopback keeps the network out; these tests are about the host itself. A
process running as another user connects to every port a running bus
listens on and sends the frame Thespian expects, a pickle whose
``__reduce__`` creates a directory: nothing is created, the bus goes on, and
each process that was sent one says so once.
"""
from __future__ import annotations

import logging
import os
import pickle
import socket
import time

import pytest

from actorbus import Envelope
from actorbus.transport_auth import (MAC_SIZE, SMALL_FRAME, RefusedFrame, SignedPickle,
                                     TransportAuthError, sign_transport)
from tests import handlers
from tests.support import read_records, wait_for
from tests.test_listening_sockets import listening_sockets

pytestmark = pytest.mark.integration

NOBODY = 65534


class _MakeDirectory:
    """Unpickling this creates ``path``: the proof that a frame was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _frame(payload: bytes) -> bytes:
    return b"%d>" % len(payload) + payload   # Thespian's TCP framing


def _send_as(uid: int, frames: dict[int, bytes]) -> int:
    """Fork a child that drops to ``uid`` and sends each port its frame; its exit status.

    Forked rather than executed, so the child needs no access to this interpreter's files."""
    child = os.fork()
    if child == 0:   # pragma: no cover - runs in the child
        status = 1
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            for port, frame in frames.items():
                with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
                    conn.sendall(frame)
                    try:
                        conn.recv(64)   # an ack, a refusal or a closed connection
                    except OSError:
                        pass
            status = 0
        finally:
            os._exit(status)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pid, status = os.waitpid(child, os.WNOHANG)
        if pid:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(child, 9)
    os.waitpid(child, 0)
    raise AssertionError("the other user's process did not finish within 30 s")


@pytest.mark.skipif(os.geteuid() != 0, reason="running a process as another user needs root")
def test_another_local_user_cannot_run_code_in_a_running_bus(make_bus, records, log_file,
                                                            tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="actorbus.transport")
    bus = make_bus(pool_size=1)
    bus.subscribe("orders.>", handlers.record, durable="orders")
    assert bus.publish_envelope("orders.{aggregate_id}", Envelope.create("a-1", "T", b"1")).ok
    wait_for(lambda: len(read_records(records)) == 1, what="the first envelope handled")

    system = wait_for(lambda: (lambda pids: pids if len(pids) >= len(bus.pids) + 2 else None)(
        bus.runtime.pids()), timeout=10, what="Thespian's admin, logger and actor processes")
    processes = sorted({os.getpid(), *bus.pids.values(), *system})
    ports = {port: pid for pid in processes for address, port in listening_sockets(pid)}
    assert len(ports) >= 6   # this program's endpoint, the admin and four actors at least
    victims = tmp_path / "made-by-the-bus"
    victims.mkdir(mode=0o755)   # the other user cannot create anything here itself
    frames = {port: _frame(pickle.dumps(_MakeDirectory(str(victims / f"port-{port}"))))
              for port in ports}

    assert _send_as(NOBODY, frames) == 0

    # The bus goes on: a second envelope is handled, after every frame was read.
    assert bus.publish_envelope("orders.{aggregate_id}", Envelope.create("a-1", "T", b"2")).ok
    wait_for(lambda: len(read_records(records)) == 2, what="the second envelope handled")
    assert bus.stats()["processed"] == 2
    assert sorted(os.listdir(victims)) == [], "a forged frame was unpickled"

    # Each actor process that was sent a frame said so, once.
    actor_pids = set(bus.pids.values())

    def refusals() -> dict[int, int]:
        counted: dict[int, int] = {}
        for line in log_file.read_text().splitlines():
            if "refused 1 message(s) on the actor transport of pid" in line:
                pid = int(line.split("transport of pid ")[1].split()[0])
                counted[pid] = counted.get(pid, 0) + 1
        return counted
    wait_for(lambda: actor_pids <= set(refusals()), timeout=10,
             what=f"a refusal logged by each actor process {sorted(actor_pids)}")
    assert all(count == 1 for count in refusals().values()), refusals()
    # This program's own endpoint (where replies to the bus's calls arrive) refused its one too.
    own = f"actor transport of pid {os.getpid()} "
    wait_for(lambda: [r for r in caplog.records if own in r.getMessage()], timeout=10,
             what="this program's refusal")


def test_a_frame_is_unpickled_only_with_the_key_it_was_signed_with(caplog):
    caplog.set_level(logging.WARNING, logger="actorbus.transport")
    ours, theirs = SignedPickle(os.urandom(32)), SignedPickle(os.urandom(32))
    message = ("address", {"batch": [1, 2, 3]})
    large = ("address", {"batch": list(range(5000))})   # signed the other way (HMAC-SHA256)
    assert len(pickle.dumps(large)) > SMALL_FRAME > len(pickle.dumps(message))

    assert ours.loads(ours.dumps(message)) == message
    assert ours.loads(ours.dumps(large)) == large
    for forged in (theirs.dumps(message), pickle.dumps(message), b"", b"x" * MAC_SIZE,
                   ours.dumps(message)[:-1], b"\0" + ours.dumps(message)[1:],
                   theirs.dumps(large), ours.dumps(large)[:-1]):
        with pytest.raises(RefusedFrame):
            ours.loads(forged)
    assert ours.refused == 8

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "actorbus.transport"]
    wait_for(warnings, timeout=5, what="the refusal warning")
    # Eight forged frames, one warning: the rest are counted until the next one.
    assert len(warnings()) == 1 and "refused 1 message(s)" in warnings()[0]


def test_a_constant_frame_is_known_at_sight_and_only_with_its_own_mac():
    ours, theirs = SignedPickle(os.urandom(32)), SignedPickle(os.urandom(32))
    ack = ours.constant("ACK")
    assert ours.loads(ack) == "ACK" and ours.loads(ours.dumps("ACK")) == "ACK"
    for forged in (theirs.constant("ACK"), pickle.dumps("ACK").rjust(len(ack), b"\0")):
        assert len(forged) == len(ack)
        with pytest.raises(RefusedFrame):
            ours.loads(forged)


def test_the_key_is_never_shown():
    key = os.urandom(32)
    signed = SignedPickle(key)
    assert key.hex() not in repr(signed) and str(key) not in repr(signed)
    with pytest.raises(ValueError, match="at least 32 bytes"):
        SignedPickle(b"short")


def test_signing_is_installed_once_per_process_and_checks_thespian_s_shape(monkeypatch):
    from thespian.system.transport import TCPTransport

    first = sign_transport()
    assert sign_transport() is first
    assert TCPTransport.serializer is first
    assert first.loads(TCPTransport.ackMsg.split(b">", 1)[1]) == "ACK"

    import actorbus.transport_auth as transport_auth
    monkeypatch.setattr(transport_auth, "_signed", None)
    monkeypatch.setattr(TCPTransport, "ackMsg", None)
    with pytest.raises(TransportAuthError, match="TCPTransport.ackMsg"):
        sign_transport()
