"""The ``actorbus`` command: a short demo run, and SIGTERM draining it."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest

from actorbus import Envelope
from actorbus.runtime import descendants, process_alive
from tests.support import consumer_info, read_records, wait_for

pytestmark = pytest.mark.integration

ACTORBUS = str(Path(sys.executable).parent / "actorbus")


def test_small_demo_passes_its_own_checks():
    result = subprocess.run([ACTORBUS, "demo", "--envelopes", "600", "--aggregates", "30",
                             "--keyless", "100", "--pool-size", "3"],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo OK" in result.stdout and "order per aggregate" in result.stdout


def test_sigterm_drains_and_leaves_nothing_running(tmp_path):
    out = open(tmp_path / "out.txt", "w")
    process = subprocess.Popen([ACTORBUS, "demo", "--envelopes", "200000", "--aggregates", "100",
                                "--keyless", "0", "--pool-size", "2"],
                               stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "actors up" in (tmp_path / "out.txt").read_text(), timeout=60,
                 what="the demo's actors")
        time.sleep(0.5)  # let it publish for a moment
        tree = with_their_groups(descendants(process.pid))
        assert len(tree) >= 5, tree  # nats-server, Thespian's admin and logger, the actors
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 1  # click's Abort
    finally:
        if process.poll() is None:  # the test failed: end everything it started, by pid
            for pid in with_their_groups(descendants(process.pid)) | {process.pid}:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.wait()
        out.close()
    assert "Aborted" in (tmp_path / "out.txt").read_text()
    wait_for(lambda: not [pid for pid in tree if process_alive(pid)], timeout=20,
             what="every process of the demo to exit")


def with_their_groups(pids: list[int]) -> set[int]:
    """``pids`` plus every process in their process groups (Thespian's actors
    are not descendants of the program that started them, but share its
    admin's group)."""
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))  # a zombie still has its group
        except ProcessLookupError:
            pass
    groups.discard(os.getpgrp())
    members = set(pids)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) in groups:
                    members.add(int(entry))
            except ProcessLookupError:
                pass
    return members


def test_run_serves_a_topology_and_drains_on_sigterm(tmp_path, nats_server, records):
    out_path = tmp_path / "out.txt"
    with open(out_path, "w") as out:
        process = subprocess.Popen([ACTORBUS, "run", "tests.handlers:topology", "--servers",
                                    nats_server.url], stdout=out, stderr=subprocess.STDOUT,
                                   cwd=Path(__file__).parent.parent)
    try:
        wait_for(lambda: "running tests.handlers:topology" in out_path.read_text(), timeout=60,
                 what="the topology to start")
        publish_one(nats_server.url)
        wait_for(lambda: [r for r in read_records(records) if r.kind == "ok"], what="the handler")
        tree = with_their_groups(descendants(process.pid))
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            for pid in with_their_groups(descendants(process.pid)) | {process.pid}:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.wait()
    text = out_path.read_text()
    assert "draining" in text and text.rstrip().endswith("stopped")
    assert consumer_info(nats_server.url, "ORDERS", "orders").num_ack_pending == 0
    wait_for(lambda: not [pid for pid in tree if process_alive(pid)], timeout=20,
             what="every process of the topology to exit")


def test_run_refuses_what_is_not_a_topology():
    result = subprocess.run([ACTORBUS, "run", "tests.handlers:record"], capture_output=True,
                            text=True, timeout=60, cwd=Path(__file__).parent.parent)
    assert result.returncode == 1
    assert "tests.handlers:record is a function, not an actorbus Topology" in result.stderr
    assert "Traceback" not in result.stderr


def publish_one(url: str) -> None:
    async def main() -> None:
        nc = await nats.connect(url)
        await nc.jetstream().publish("orders.a", Envelope.create("a", "T", b"0").encode())
        await nc.close()
    asyncio.run(main())
