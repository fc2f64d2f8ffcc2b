"""Helpers for the integration tests: polling with a deadline, records, NATS look-ups."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import nats

from actorbus.benchmarks.procfs import process_rss
from actorbus.processes import descendants, process_alive
from actorbus.testing_bus import file_log_config


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition",
             interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


@contextlib.contextmanager
def bus_factory(log_file: Path, **defaults: Any) -> Iterator[Callable[..., Any]]:
    """Yield ``build(**kwargs)``: an EventBus with ``defaults`` under ``kwargs``, on the
    processes runtime (its actors logging to ``log_file``) unless told otherwise. Every bus
    built is stopped on exit, and none of its processes may outlive it."""
    from actorbus import EventBus

    buses: list[Any] = []

    def build(**kwargs: Any) -> Any:
        kwargs = {**defaults, **kwargs}
        kwargs.setdefault("runtime", "processes")
        if kwargs["runtime"] == "processes":  # the simple runtime logs through this process
            kwargs.setdefault("log_config", file_log_config(log_file))
        bus = EventBus(**kwargs)
        buses.append(bus)
        return bus

    try:
        yield build
    finally:
        for bus in buses:
            bus.stop()
            # SIGKILLed stragglers of the process group take a moment to be gone.
            wait_for(lambda runtime=bus.runtime: not runtime.pids(), timeout=10,
                     what="no actor process left")
            for name, pid in bus.pids.items():
                if pid != os.getpid():  # the simple runtime's actors live in this process
                    assert not process_alive(pid), f"{name} (pid {pid}) outlived its bus"


def running_member_pids(bus, stats: dict) -> list[int]:
    """The pids of the pool members ``stats`` (just read, which refreshed ``bus.pids``) says
    are running."""
    return sorted(pid for name, pid in bus.pids.items()
                  if name.startswith("member-") and stats["actors"].get(name) == "running")


def wait_for_stats(bus, key: str, at_least: int, timeout: float = 60.0) -> dict:
    """Poll ``bus.stats()`` until ``stats[key] >= at_least``; return those stats."""
    return wait_for(lambda: (lambda s: s if s[key] >= at_least else None)(bus.stats()),
                    timeout, f"stats[{key!r}] >= {at_least}")


@dataclass(frozen=True)
class Record:
    kind: str
    subject: str
    aggregate_id: str
    data: str
    pid: int
    delivery_count: int
    attempt: int
    routing_key: str
    at_ns: int  # CLOCK_MONOTONIC: comparable across the actor processes


def read_records(directory: Path) -> list[Record]:
    """Every line the test handlers wrote, across processes, in the order they were written."""
    records = []
    for path in sorted(directory.glob("records-*.txt")):
        for line in path.read_text().splitlines():
            fields = line.split(" ")
            if len(fields) != 9:
                continue  # a line cut short by a SIGKILLed process
            kind, subject, agg, data, pid, dc, attempt, key, at_ns = fields
            records.append(Record(kind, subject, agg, data, int(pid), int(dc), int(attempt), key,
                                  int(at_ns)))
    return sorted(records, key=lambda r: r.at_ns)


def _run(url: str, fn: Callable[[Any], Any]) -> Any:
    async def main() -> Any:
        nc = await nats.connect(url)
        try:
            return await fn(nc.jetstream())
        finally:
            await nc.close()
    return asyncio.run(main())


def consumer_info(url: str, stream: str, durable: str):
    """JetStream's view of a durable consumer."""
    return _run(url, lambda js: js.consumer_info(stream, durable))


def stream_info(url: str, stream: str):
    """JetStream's view of a stream."""
    return _run(url, lambda js: js.stream_info(stream))


def stream_messages(url: str, stream: str) -> list:
    """Every message stored in ``stream``, oldest first (with headers)."""
    async def read(js):
        info = await js.stream_info(stream)
        return [await js.get_msg(stream, seq)
                for seq in range(info.state.first_seq, info.state.last_seq + 1)
                if info.state.messages]
    return _run(url, read)


def publish_spread(bus, total: int, keys: int, *, per_key_sequence: bool = False,
                   subject: str | None = None, in_flight: int = 500, start: int = 0) -> None:
    """Publish envelopes ``start`` up to ``total`` round-robin over aggregates ``agg-<k>`` on
    ``orders.<k>`` (or on ``subject``, which may hold ``{aggregate_id}``), each carrying its
    number (or, with ``per_key_sequence``, its number within its key); every one must be
    stored."""
    from actorbus import Envelope
    results = bus.publish_many([
        (f"orders.{n % keys}" if subject is None else subject,
         Envelope.create(f"agg-{n % keys}", "T", str(n // keys if per_key_sequence else n).encode()))
        for n in range(start, total)], in_flight=in_flight)
    assert all(r.ok for r in results), [r for r in results if not r.ok][:3]


def tree_rss_bytes(pids) -> int:
    """Resident memory of these processes, summed."""
    return sum(process_rss(pid) for pid in pids)


def delete_stream(url: str, name: str) -> None:
    """Delete a stream directly, as an operator would."""
    _run(url, lambda js: js.delete_stream(name))


def create_stream(url: str, name: str, subjects: list[str], storage: str = "memory") -> None:
    """Create a stream directly, as another service would."""
    from nats.js.api import StorageType
    kind = StorageType.FILE if storage == "file" else StorageType.MEMORY
    _run(url, lambda js: js.add_stream(name=name, subjects=subjects, storage=kind))


class HostBus:
    """A bus in a process of its own (``tests.bus_host``), to be killed whole like a crashed host."""

    def __init__(self, url: str, pids_file: Path, pin_timeout: float | None = None,
                 handler: str = "record", bridges: int | None = None,
                 subject: str | None = None) -> None:
        root = Path(__file__).resolve().parent.parent
        self.pids_file = pids_file
        self.pids: list[int] = []
        args = [sys.executable, "-m", "tests.bus_host", url, str(pids_file), "--handler", handler]
        if pin_timeout is not None:
            args += ["--pin-timeout", str(pin_timeout)]
        if bridges is not None:
            args += ["--bridges", str(bridges)]
        if subject is not None:
            args += ["--subject", subject]
        self.process = subprocess.Popen(args, cwd=root,
                                        env={**os.environ, "PYTHONPATH": str(root)})

    def wait_started(self, timeout: float = 60.0) -> list[int]:
        """The pids of every process of its bus, once it runs."""
        wait_for(self.pids_file.exists, timeout=timeout, what="the host's bus to start")
        self.pids = [int(pid) for pid in self.pids_file.read_text().split()]
        return self.pids

    def kill(self) -> None:
        """SIGKILL every process of the bus at once, and wait until they are gone: those it
        started with and those in their process groups (an actor restarted since has a pid
        of its own)."""
        targets = with_their_groups(self.pids or [self.process.pid])
        for pid in targets:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.kill()
        self.process.wait(10)
        wait_for(lambda: not [pid for pid in targets if process_alive(pid)],
                 what="the host's processes gone")


#: Partitions of the group that the ``group_hosts`` fixture's members share.
GROUP_PARTITIONS = 12


class GroupHost(HostBus):
    """A member of a partitioned consumer group in a process of its own (``tests.group_host``)."""

    def __init__(self, url: str, pids_file: Path, group: str, partitions: int, member: str,
                 members: list[str] | None = None, replicas: int = 1,
                 heartbeat: float | None = None, handler: str | None = None,
                 bridges: int = 1) -> None:
        root = Path(__file__).resolve().parent.parent
        self.pids_file = pids_file
        self.pids: list[int] = []
        self.member = member
        args = [sys.executable, "-m", "tests.group_host", url, str(pids_file), group,
                str(partitions), member]
        args.append(",".join(members) if members else "-")
        args.append(str(replicas))
        if heartbeat is not None or handler is not None:
            from tests.group_host import HEARTBEAT
            args.append(str(HEARTBEAT if heartbeat is None else heartbeat))
        if handler is not None:
            args.append(handler)
        args += ["--bridges", str(bridges)]
        self.process = subprocess.Popen(args, cwd=root,
                                        env={**os.environ, "PYTHONPATH": str(root)})

    def actor_pids(self) -> dict[str, int]:
        """The pid of each of its bus's actors by name (``bridge``, ``bridge-1``, ...), as at
        its start."""
        import json
        return json.loads(Path(f"{self.pids_file}.actors").read_text())

    def stats(self) -> dict:
        """Its bus's group stats as it last wrote them ({} before the first)."""
        import json
        try:
            return json.loads(Path(f"{self.pids_file}.stats").read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def terminate(self, timeout: float = 30.0) -> None:
        """SIGTERM: the bus stops cleanly (drains, unpins, leaves); wait until its processes are gone."""
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout)
        wait_for(lambda: not [pid for pid in self.pids if process_alive(pid)],
                 what=f"member {self.member}'s processes gone")

    def ensure_gone(self) -> None:
        """Teardown: SIGKILL whatever of it still runs."""
        if self.process.poll() is None or \
                any(process_alive(pid) for pid in with_their_groups(self.pids)):
            self.kill()


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


def process_tree(process) -> set[int]:
    """A CLI process's own processes: its descendants and the actors in their groups."""
    return with_their_groups(descendants(process.pid))


@contextlib.contextmanager
def ended_afterwards(process) -> Iterator[Any]:
    """Yield ``process`` (a ``subprocess.Popen`` of the CLI); if it still runs afterwards
    (the test failed before it stopped it), SIGKILL it and everything it started, by pid."""
    try:
        yield process
    finally:
        if process.poll() is None:
            for pid in process_tree(process) | {process.pid}:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.wait()


def stop_with_sigterm(process, timeout: float = 60.0) -> tuple[int, set[int]]:
    """SIGTERM a CLI process (it drains and stops); return its exit code and the processes
    it had, for :func:`wait_until_gone`."""
    tree = process_tree(process)
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout), tree


def wait_until_gone(pids: set[int], what: str) -> None:
    """Poll until none of ``pids`` runs."""
    wait_for(lambda: not [pid for pid in pids if process_alive(pid)], timeout=20, what=what)
