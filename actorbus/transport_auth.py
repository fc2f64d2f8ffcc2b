"""Who may drive the actor transport: only the processes of this program's actor systems.

Loopback keeps the network out, not the other users of the host: Thespian's
TCP transport frames a message as ``b"<length>>" + pickle`` and unpickles
each frame before it looks at it, so any local process that connects to an
actor's port runs code as the bus's user. :func:`sign_transport` closes that
the way an Erlang node's cookie does: every frame Thespian sends carries a
MAC of its pickle under a key of 32 random bytes (keyed BLAKE2b for a frame
under :data:`SMALL_FRAME` bytes, HMAC-SHA256 above: each the faster at its
sizes, both keyed MACs by design), and a frame whose MAC does not verify is
refused before a byte of it is unpickled; the connection is closed and the
refusal logged.

The key is made in the program that starts the actor system, before the
system forks; Thespian's admin, its logger and every actor are forked from
that program (or from each other) and inherit it in memory. It is never
written to a file, the environment or a command line, so a process started
any other way, by this user or another, does not have it.

Thespian reads its serializer from the module global ``serializer`` of
``thespian.system.transport.TCPTransport`` each time it frames or reads a
message, and its acknowledgements are the ready-made frames ``ackMsg`` and
``ackDataErrMsg`` there; those three names are replaced, once per process.
The shape of Thespian this relies on is checked first, and a Thespian
without it makes start-up fail with :class:`TransportAuthError` rather
than run unauthenticated.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import pickle
import secrets
import threading
import time
from typing import Any

log = logging.getLogger("actorbus.transport")

#: Bytes of the MAC that opens every frame.
MAC_SIZE = 32
#: Pickles shorter than this are signed with keyed BLAKE2b (0.5 µs for 200 bytes, where
#: HMAC-SHA256 takes 1.3), longer ones with HMAC-SHA256 (16 µs for 30 KB, BLAKE2b 28).
SMALL_FRAME = 2048
#: Bytes of the key.
KEY_SIZE = 32
#: Seconds between two warnings about refused frames in one process (each refusal is counted).
REFUSAL_WARNING_INTERVAL = 60.0
#: Seconds the warning waits for Thespian's receive loop to be done with the refused frame.
WARNING_DELAY = 0.05


class TransportAuthError(RuntimeError):
    """The actor transport cannot be signed as needed; the message says why."""


class RefusedFrame(ValueError):
    """A frame on the actor transport without this program's MAC: it was not unpickled."""


class SignedPickle:
    """Thespian's serializer with a MAC: ``dumps`` signs each frame, ``loads`` verifies
    before it unpickles. Shaped like the ``pickle`` module Thespian calls."""

    def __init__(self, key: bytes) -> None:
        if len(key) < KEY_SIZE:
            raise ValueError(f"the transport key must be at least {KEY_SIZE} bytes")
        self._key = key
        # Frames this process signed once and sends again and again (Thespian's
        # acknowledgements, one per message received): matched whole, not verified again.
        self._constants: dict[int, tuple[bytes, Any]] = {}
        self._lock = threading.Lock()
        self._refused = 0
        self._refused_since_warning = 0
        self._last_warning: float | None = None

    def __repr__(self) -> str:
        return f"SignedPickle(refused={self._refused})"   # never the key

    def dumps(self, obj: Any) -> bytes:
        """The MAC of ``obj``'s pickle, then the pickle."""
        body = pickle.dumps(obj)
        return self._mac(body) + body

    def _mac(self, body: bytes | memoryview) -> bytes:
        if len(body) < SMALL_FRAME:
            return hashlib.blake2b(body, key=self._key, digest_size=MAC_SIZE).digest()
        return hmac.digest(self._key, body, "sha256")

    def constant(self, obj: Any) -> bytes:
        """Sign ``obj`` once for a frame sent many times; :meth:`loads` knows it at sight.

        For values that carry nothing of the sender's (an acknowledgement): its bytes
        are the same in every frame, and a copy is as good as the original."""
        signed = self.dumps(obj)
        self._constants[len(signed)] = (signed, obj)
        return signed

    def loads(self, frame: bytes) -> Any:
        """Unpickle ``frame`` if its MAC verifies; raise :class:`RefusedFrame` if not."""
        known = self._constants.get(len(frame))
        if known is not None and frame == known[0]:
            return known[1]
        view = memoryview(frame)
        body = view[MAC_SIZE:]
        if len(view) <= MAC_SIZE or not hmac.compare_digest(view[:MAC_SIZE], self._mac(body)):
            self._note_refusal(len(view))
            raise RefusedFrame("a frame without this bus's transport MAC; not unpickled")
        return pickle.loads(body)

    @property
    def refused(self) -> int:
        """Frames refused by this process so far."""
        return self._refused

    def _note_refusal(self, size: int) -> None:
        # A peer that sends one forged frame usually sends more: warn once, then count.
        with self._lock:
            self._refused += 1
            self._refused_since_warning += 1
            now = time.monotonic()
            if self._last_warning is not None and now - self._last_warning < REFUSAL_WARNING_INTERVAL:
                return
            self._last_warning, count = now, self._refused_since_warning
            self._refused_since_warning = 0
        # Not from here: this runs inside Thespian's receive loop, where a send (an
        # actor's log record is a send to Thespian's logger) waits in a queue that
        # only the loop's next transmit empties, and a quiet actor may have none for
        # minutes. A thread's send goes out at once once the loop is back in select.
        threading.Thread(target=_warn_refused, args=(count, size), daemon=True,
                         name="actorbus-transport-refusal").start()


def _warn_refused(count: int, size: int) -> None:
    time.sleep(WARNING_DELAY)   # let the receive loop finish with the refused frame
    log.warning("refused %d message(s) on the actor transport of pid %d (the last of %d bytes): "
                "not signed with this bus's key, so another local process connected to an "
                "actor port; nothing of it was unpickled and its connection was closed "
                "(warned at most once a minute per process)", count, os.getpid(), size)
    _flush_actor_sends()


def _flush_actor_sends() -> None:
    """In an actor process, have Thespian send what its queue holds (the record above).

    What Thespian's actor loop itself does when it has queued sends to tickle: a
    send of ``Thespian__UpdateWork`` to itself, which runs the queue and wakes the loop."""
    from thespian.system import logdirector
    from thespian.system.transport import Thespian__UpdateWork, TransmitIntent
    transport = getattr(logdirector, "logTransport", None)
    if transport is None:
        return   # not an actor process: the record was written directly
    try:
        transport.scheduleTransmit(None, TransmitIntent(transport.myAddress, Thespian__UpdateWork()))
    except Exception as exc:   # the record still goes out with the loop's next send
        log.debug("could not flush the actor transport's queue: %s", exc)


_lock = threading.Lock()
_signed: SignedPickle | None = None


def sign_transport() -> SignedPickle:
    """Sign and verify every frame of the actor systems this process starts (and of
    every process forked from it); idempotent. Call it before the actor system starts.

    Raises :class:`TransportAuthError` when the installed Thespian does not have the
    shape this relies on.
    """
    global _signed
    with _lock:
        if _signed is not None:
            return _signed
        from thespian.system.transport import TCPTransport, streamBuffer

        problems = []
        if getattr(TCPTransport, "serializer", None) is not pickle:
            problems.append("TCPTransport.serializer, the pickle module")
        for name in ("ackMsg", "ackDataErrMsg"):
            if not isinstance(getattr(TCPTransport, name, None), bytes):
                problems.append(f"TCPTransport.{name}, a ready-made frame")
        reads = TCPTransport.TCPIncoming_Common.__init__.__code__.co_names
        if "serializer" not in reads:
            problems.append("TCPIncoming_Common reading the module's serializer")
        if not callable(getattr(streamBuffer, "toSendBuffer", None)):
            problems.append("streamBuffer.toSendBuffer")
        if problems:
            raise TransportAuthError(
                f"cannot authenticate Thespian's actor transport: actorbus expected "
                f"{'; '.join(problems)}")
        signed = SignedPickle(secrets.token_bytes(KEY_SIZE))
        TCPTransport.ackMsg = streamBuffer.toSendBuffer(streamBuffer.ackPacket, signed.constant)
        TCPTransport.ackDataErrMsg = streamBuffer.toSendBuffer(streamBuffer.ackDataErrPacket,
                                                               signed.constant)
        TCPTransport.serializer = signed
        _signed = signed
        log.debug("actor transport frames are signed (HMAC-SHA256)")
        return signed
