"""``actorbus soak``: a bus under a steady publisher for a long time, with faults, and a report.

1. Start a :class:`~actorbus.server.NatsServer` (free port, a store directory of
   the run's own) and the bus, each in a process of its own
   (:mod:`actorbus.benchmarks.soak_host`): one bus, or with ``group`` an
   elastic consumer group of ``instances`` buses sharing ``partitions``.
2. Publish at ``rate`` envelopes a second round-robin over ``keys`` keys (JetStream
   publishes with ``Nats-Msg-Id``; each run of at most one envelope per key is
   retried until every one is stored before the next run starts, so a key's
   envelopes are stored in order and "published" means stored, across
   nats-server restarts) for ``duration`` seconds or ``messages`` envelopes.
3. Meanwhile, at their intervals: SIGKILL a running pool member, SIGKILL a Bridge,
   SIGKILL nats-server and start it again on the same port and store, and in a
   group SIGKILL every process of one instance and start a new one.
4. Stop publishing and faulting, wait until everything published was handled
   (or ``drain_timeout``), and report: published, handled, lost, order violations
   among first handlings per key, duplicates, each process's RSS and open file
   descriptors after the warm-up and at the end, the longest stall (the longest
   time with no new envelope handled while some were outstanding) and the longest
   wait (the most time an envelope spent stored but not handled: a stall of some
   keys only, which the stall misses while others are handled), as tables and
   as JSON.

The handlers write to a shared ledger (:mod:`actorbus.benchmarks.soak_ledger`),
a byte per envelope. Every process the run starts is stopped by its pid (and
those of its process groups) at the end, also on Ctrl-C or an error.
"""
from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable

import nats
from rich.console import Console
from rich.table import Table

from actorbus.benchmarks.procfs import mapped_rss, open_fds, process_rss, process_start_ticks
from actorbus.benchmarks.soak_host import STREAM
from actorbus.benchmarks.soak_ledger import LedgerReader, Tally, create_ledger, key_of
from actorbus.codecs import EnvelopeFormat
from actorbus.envelope import Envelope, decode_envelope
from actorbus.publisher import envelope_headers
from actorbus.processes import process_alive
from actorbus.server import NatsServer

log = logging.getLogger("actorbus.soak")

ROOT = Path(__file__).resolve().parent.parent
#: Envelopes per publish run (at most one per key, and never more than ``keys``).
PUBLISH_RUN = 50
#: Seconds a publish may wait for its acknowledgement before it is tried again.
PUBLISH_TIMEOUT = 2.0
#: Pause before the failed publishes of a run are tried again.
RETRY_PAUSE = 0.1
#: Seconds between looks at handling progress (the resolution of the stall measure).
PROGRESS_INTERVAL = 0.1
#: Seconds between looks at the buses' status files in the main loop.
LOOP_INTERVAL = 0.2
#: Stalls at least this long are listed in the report.
NOTABLE_STALL = 1.0
#: Seconds between points of the progress timeline in the JSON.
TIMELINE_INTERVAL = 10.0
#: How long a bus (or a group) may take to start and, in a group, to share the partitions.
START_TIMEOUT = 120.0
#: Labels of processes shown but not judged by the RSS check: nats-server's memory follows
#: the stream it stores, and the soak's own process holds the publisher and this report.
NOT_JUDGED = ("nats-server", "soak (publisher)")
#: Fault kinds, in the order the report lists them.
FAULTS = ("member_kill", "bridge_kill", "server_restart", "instance_restart")


@dataclass
class SoakConfig:
    """What a soak run does; intervals in seconds, 0 turns a fault off."""

    #: Seconds of publishing; None: until ``messages`` are published.
    duration: float | None = 600.0
    #: Envelopes to publish; None: as many as ``rate`` gives in ``duration``.
    messages: int | None = None
    keys: int = 1000
    rate: float = 1500.0
    pool: int = 4
    #: Milliseconds each handling takes (a sleep): messages are in the members when they die.
    work_ms: float = 1.0
    group: bool = False
    instances: int = 3
    partitions: int = 12
    member_kill_every: float = 30.0
    bridge_kill_every: float = 120.0
    server_restart_every: float = 300.0
    instance_restart_every: float = 180.0
    #: Seconds nats-server stays down at each restart.
    server_downtime: float = 1.0
    #: Seconds of publishing before the first RSS and file-descriptor reading.
    warmup: float = 60.0
    drain_timeout: float = 120.0
    #: The RSS of every bus process at the end may exceed the warm-up reading by this much.
    rss_limit_pct: float = 10.0
    seed: int = 1

    def check(self) -> None:
        """Raise ValueError on settings that cannot run."""
        if self.duration is None and self.messages is None:
            raise ValueError("give a duration or a number of messages")
        if self.duration is not None and self.duration <= 0:
            raise ValueError("duration must be > 0")
        if self.messages is not None and self.messages < 1:
            raise ValueError("messages must be >= 1")
        if self.keys < 1 or self.rate <= 0 or self.pool < 1 or self.work_ms < 0:
            raise ValueError("keys, rate and pool must be positive, work-ms not negative")
        if self.group and (self.instances < 1 or self.partitions < 1):
            raise ValueError("a group needs instances and partitions >= 1")
        for name in ("member_kill_every", "bridge_kill_every", "server_restart_every",
                     "instance_restart_every", "server_downtime", "warmup", "drain_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name.replace('_', '-')} must be >= 0")

    @property
    def capacity(self) -> int:
        """Most envelopes the run publishes (the ledger's size)."""
        if self.messages is not None:
            return self.messages
        assert self.duration is not None
        return int(self.rate * self.duration * 1.05) + PUBLISH_RUN

    def intervals(self) -> dict[str, float]:
        """Each fault kind's interval (0: off)."""
        return {"member_kill": self.member_kill_every, "bridge_kill": self.bridge_kill_every,
                "server_restart": self.server_restart_every,
                "instance_restart": self.instance_restart_every if self.group else 0.0}


# ====================================================================== processes
class Processes:
    """Every process the run started or learnt of, by pid and start time (a pid used again
    by another process is not ended), and the process groups they lead."""

    def __init__(self) -> None:
        self._known: dict[int, int] = {}
        self._groups: set[int] = set()

    def add(self, pids: Any) -> None:
        for pid in pids:
            if pid not in self._known and pid != os.getpid():
                ticks = process_start_ticks(pid)
                if ticks is not None:
                    self._known[pid] = ticks
                    with contextlib.suppress(OSError):
                        self._groups.add(os.getpgid(pid))
        self._groups.discard(os.getpgrp())

    def alive(self, pids: Any = None, groups: bool = True) -> list[int]:
        """Of ``pids`` (all known ones when None), and with ``groups`` the members of their
        process groups, those still running (as the processes that were registered)."""
        chosen = set(self._known) if pids is None else set(pids)
        found = {pid for pid in chosen if self._same(pid)}
        if groups:
            leaders = self._groups if pids is None else {g for g in map(_pgid, chosen) if g}
            leaders = leaders - {os.getpgrp()}
            for entry in os.listdir("/proc"):
                if entry.isdigit() and int(entry) != os.getpid() and _pgid(int(entry)) in leaders:
                    found.add(int(entry))
        return sorted(pid for pid in found if process_alive(pid))

    def _same(self, pid: int) -> bool:
        ticks = self._known.get(pid)
        return ticks is None or process_start_ticks(pid) == ticks

    def kill(self, pids: Any = None, timeout: float = 10.0) -> list[int]:
        """SIGKILL ``pids`` (all known when None) and their groups' members, each by its pid;
        wait until they are gone; return those that were still alive."""
        targets = self.alive(pids)
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while any(process_alive(pid) for pid in targets) and time.monotonic() < deadline:
            time.sleep(0.02)
        return targets


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


class Host:
    """One bus process of the run (a slot: the bus, or group member ``m<i>``, whose
    restarts are new generations)."""

    def __init__(self, slot: str, work: Path, params: dict[str, Any], grouped: bool) -> None:
        self.slot = slot
        self.work = work
        self.params = params
        self.grouped = grouped
        self.generation = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.status_path = work / f"{slot}.status.json"
        self._status: dict[str, Any] = {}
        #: The last counters of each earlier generation (a killed instance's are gone with it).
        self.earlier: list[dict[str, Any]] = []
        #: Its exit was noted as a problem (it was not stopped by the soak).
        self.exit_reported = False

    @property
    def member(self) -> str | None:
        return f"{self.slot}-g{self.generation}" if self.grouped else None

    @property
    def log_path(self) -> Path:
        return self.work / f"{self.slot}-g{self.generation}.log"

    def start(self) -> None:
        """Start a new generation of this slot's bus (the previous one must be gone)."""
        self.generation += 1
        self._status = {}
        with contextlib.suppress(FileNotFoundError):
            self.status_path.unlink()
        params = {**self.params, "status": str(self.status_path), "log": str(self.log_path),
                  "member": self.member}
        params_path = self.work / f"{self.slot}-g{self.generation}.params.json"
        params_path.write_text(json.dumps(params))
        with open(self.work / f"{self.slot}-g{self.generation}.out", "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "actorbus.benchmarks.soak_host", str(params_path)],
                cwd=str(ROOT), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(
                    p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)},
                # Its own group: a Ctrl-C at the terminal reaches the soak, which stops it.
                start_new_session=True)

    def status(self) -> dict[str, Any]:
        """Its last status file ({} before the first); read afresh at each call."""
        with contextlib.suppress(FileNotFoundError, ValueError):   # not written yet, or half
            self._status = json.loads(self.status_path.read_text())
        return self._status

    def pids(self) -> set[int]:
        """Its host process, every actor's and the actor system's, as last reported."""
        status = self._status
        found = set(status.get("pids", {}).values()) | set(status.get("runtime", []))
        if self.process is not None:
            found.add(self.process.pid)
        return found

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ready(self) -> bool:
        return self.running() and bool(self._status.get("pids"))

    def labelled_pids(self) -> dict[str, int]:
        """Each process of this bus by role: ``host``, the actors by name, Thespian's
        ``admin`` and ``logger``."""
        status = self._status
        prefix = f"{self.slot}/" if self.grouped else ""
        named: dict[str, int] = {}
        if self.process is not None and self.running():
            named[f"{prefix}host"] = self.process.pid
        actors = status.get("pids", {})
        named.update({f"{prefix}{name}": pid for name, pid in sorted(actors.items())})
        others = sorted(set(status.get("runtime", [])) - set(actors.values()))
        for pid in others:
            # Thespian's admin forks its logger: the logger's parent is the admin.
            role = "logger" if _parent(pid) in others else "admin"
            named.setdefault(f"{prefix}thespian-{role}", pid)
        return named

    def stop(self, timeout: float) -> None:
        """SIGTERM: its bus drains and stops; waits up to ``timeout``."""
        if self.running():
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return int(stat.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


# ====================================================================== publishing
class SteadyPublisher:
    """Publishes envelope 0, 1, 2, ... at ``rate`` a second from a thread of its own.

    ``stored`` counts the envelopes JetStream has acknowledged: every one below
    it is stored. Each run of envelopes (at most one per key) is retried until
    every one is stored; the same bytes, so the same ``Nats-Msg-Id``, and
    JetStream drops a copy it already has.
    """

    def __init__(self, url: str, keys: int, rate: float, limit: int) -> None:
        self.url, self.keys, self.rate, self.limit = url, keys, rate, limit
        self.run_size = max(1, min(PUBLISH_RUN, keys))
        self.stored = 0
        #: When each run was stored (``time.monotonic()``): envelope n's is ``[n // run_size]``.
        self.stored_at = array.array("d")
        self.retries = 0
        self.reconnects = 0
        self.last_error: str | None = None
        self.failure: str | None = None
        self._finish = threading.Event()
        self._abort = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-publisher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def finish(self, timeout: float = 60.0) -> None:
        """Stop after the run in hand is stored; wait up to ``timeout``."""
        self._finish.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.abort()

    def abort(self) -> None:
        """Stop now, stored or not."""
        self._abort.set()
        self._finish.set()
        self._thread.join(PUBLISH_TIMEOUT + 5)

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as exc:   # reported by the orchestrator
            self.failure = f"{type(exc).__name__}: {exc}"

    async def _main(self) -> None:
        async def on_error(exc: Exception) -> None:
            self.last_error = f"{type(exc).__name__}: {exc}"   # nats-py would log each one

        async def on_reconnect() -> None:
            self.reconnects += 1

        nc = await nats.connect(self.url, name="actorbus-soak-publisher", allow_reconnect=True,
                                max_reconnect_attempts=-1, reconnect_time_wait=0.2,
                                connect_timeout=2.0, error_cb=on_error,
                                reconnected_cb=on_reconnect)
        try:
            js = nc.jetstream()
            n, base_t, base_n = 0, time.monotonic(), 0
            while n < self.limit and not self._finish.is_set():
                now = time.monotonic()
                due = base_n + (now - base_t) * self.rate
                if due - n > self.rate:
                    # Over a second behind (nats-server was down): go on at the rate, no burst.
                    base_t, base_n, due = now, n, n
                if due < n:
                    await asyncio.sleep(min((n - due) / self.rate, 0.05))
                    continue
                size = min(self.run_size, self.limit - n)
                if not await self._store(js, n, size):
                    return
                n += size
                self.stored_at.append(time.monotonic())
                self.stored = n
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 5.0)

    def _message(self, n: int) -> tuple[str, bytes, dict[str, str]]:
        key = key_of(n, self.keys)
        envelope = Envelope.create(key, "SoakEvent", str(n).encode("ascii"))
        return (f"soak.{key}", envelope.encode(EnvelopeFormat.MSGPACK),
                envelope_headers(envelope, EnvelopeFormat.MSGPACK))

    async def _store(self, js: Any, first: int, size: int) -> bool:
        """Publish envelopes ``first .. first + size - 1`` until all are stored; False if aborted."""
        pending = [self._message(n) for n in range(first, first + size)]
        while True:
            results = await asyncio.gather(
                *(js.publish(subject, data, headers=headers, timeout=PUBLISH_TIMEOUT)
                  for subject, data, headers in pending), return_exceptions=True)
            failed = [item for item, result in zip(pending, results, strict=True)
                      if isinstance(result, BaseException)]
            if not failed:
                return True
            self.retries += len(failed)
            errors = [r for r in results if isinstance(r, BaseException)]
            self.last_error = f"{type(errors[0]).__name__}: {errors[0]}"
            if self._abort.is_set():
                return False
            pending = failed
            await asyncio.sleep(RETRY_PAUSE)


# ====================================================================== progress and stalls
class Progress:
    """Looks at handling progress every ``PROGRESS_INTERVAL`` seconds from a thread of its own:
    envelopes handled at least once, and stalls (no new one handled while some were
    outstanding)."""

    def __init__(self, ledger: LedgerReader, publisher: SteadyPublisher, started: float) -> None:
        self.ledger, self.publisher, self.started = ledger, publisher, started
        self.handled = 0
        #: The longest an envelope waited, stored but not yet handled; which one, and when.
        self.longest_wait = 0.0
        self.longest_wait_n: int | None = None
        self.longest_wait_at: float | None = None
        self.longest = 0.0
        self.longest_at: float | None = None
        self.stalls: list[dict[str, float]] = []
        self.timeline: list[dict[str, float]] = []
        self._since: float | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="soak-progress", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with self._lock:
            if self._since is not None:   # still stalled at the end: it counts up to now
                self._close(time.monotonic())

    @property
    def outstanding(self) -> int:
        return self.publisher.stored - self.handled

    def _run(self) -> None:
        next_point = self.started
        while not self._stop.wait(PROGRESS_INTERVAL):
            stored = self.publisher.stored
            handled = self.ledger.distinct(stored)
            now = time.monotonic()
            with self._lock:
                if handled > self.handled:
                    if self._since is not None:
                        self._close(now)
                    self._since = now if handled < stored else None
                elif handled < stored and self._since is None:
                    self._since = now
                self.handled = handled
                floor = self.ledger.floor
                if floor < stored:   # the oldest envelope not handled yet: how long it waits
                    waited = now - self.publisher.stored_at[floor // self.publisher.run_size]
                    if waited > self.longest_wait:
                        self.longest_wait, self.longest_wait_n = waited, floor
                        self.longest_wait_at = now - self.started
            if now >= next_point:
                self.timeline.append({"t": round(now - self.started, 1), "published": stored,
                                      "handled": handled})
                next_point += TIMELINE_INTERVAL

    def _close(self, now: float) -> None:
        assert self._since is not None
        length = now - self._since
        at = self._since - self.started
        if length > self.longest:
            self.longest, self.longest_at = length, at
        if length >= NOTABLE_STALL:
            self.stalls.append({"at_s": round(at, 1), "length_s": round(length, 2)})
        self._since = None


# ====================================================================== readings
def _reading(pid: int, ledger: Path) -> dict[str, Any]:
    # The ledger's pages a process touched are file pages it shares, 1 byte per envelope
    # (10 MB for 10 million): not the process's memory, so not counted.
    rss = process_rss(pid) - mapped_rss(pid, ledger)
    return {"pid": pid, "rss_mb": round(rss / 2**20, 1), "fds": open_fds(pid)}


def read_processes(hosts: list[Host], server: NatsServer, ledger: Path) -> dict[str, dict[str, Any]]:
    """RSS (without the ledger) and open file descriptors of every process, by role."""
    found: dict[str, dict[str, Any]] = {"soak (publisher)": _reading(os.getpid(), ledger)}
    if server.pid is not None:
        found["nats-server"] = _reading(server.pid, ledger)
    for host in hosts:
        host.status()
        for label, pid in host.labelled_pids().items():
            if process_alive(pid):
                found[label] = _reading(pid, ledger)
    return found


def compare(start: dict[str, dict[str, Any]], end: dict[str, dict[str, Any]],
            limit_pct: float) -> list[dict[str, Any]]:
    """One row per process role: its readings at start and end, the change, and whether it
    is judged (every bus process) and within ``limit_pct``."""
    rows = []
    for label in list(start) + [label for label in end if label not in start]:
        first, last = start.get(label), end.get(label)
        row: dict[str, Any] = {"process": label, "start": first, "end": last,
                               "replaced": bool(first and last and first["pid"] != last["pid"]),
                               "judged": label not in NOT_JUDGED and bool(first and last)}
        if first and last and first["rss_mb"] > 0:
            row["rss_change_pct"] = round(100 * (last["rss_mb"] / first["rss_mb"] - 1), 1)
            row["fds_change"] = last["fds"] - first["fds"]
        else:
            row["rss_change_pct"] = row["fds_change"] = None
        row["rss_flat"] = None if row["rss_change_pct"] is None else row["rss_change_pct"] <= limit_pct
        rows.append(row)
    return rows


# ====================================================================== the run
class SoakRun:
    """One soak run: :meth:`run` does it and returns the report (a JSON-able dict)."""

    def __init__(self, config: SoakConfig, work: Path, console: Console) -> None:
        config.check()
        self.config = config
        self.work = work
        self.console = console
        self.rng = random.Random(config.seed)
        self.processes = Processes()
        self.events: list[dict[str, Any]] = []
        self.server = NatsServer(store_dir=work / "nats")
        self.ledger_path = work / "ledger.bin"
        self.hosts: list[Host] = []
        self.started = 0.0
        self.problems: list[str] = []

    # ------------------------------------------------------------ faults
    def _event(self, fault: str, target: str, pid: int | None = None, **more: Any) -> None:
        event = {"t": round(time.monotonic() - self.started, 1), "fault": fault,
                 "target": target, "pid": pid, **more}
        self.events.append(event)
        log.info("fault %s", event)

    def _pick(self) -> Host | None:
        ready = [h for h in self.hosts if h.ready()]
        return self.rng.choice(ready) if ready else None

    def kill_member(self) -> None:
        host = self._pick()
        if host is None:
            return
        status = host.status()
        running = sorted(name for name, state in status.get("actors", {}).items()
                         if name.startswith("member-") and state == "running")
        if not running:
            self._event("member_kill", f"{host.slot}: no running member", None)
            return
        name = self.rng.choice(running)
        pid = status["pids"][name]
        self._kill(pid, "member_kill", f"{host.slot}/{name}" if host.grouped else name)

    def kill_bridge(self) -> None:
        host = self._pick()
        if host is None:
            return
        status = host.status()
        if status.get("actors", {}).get("bridge") != "running":
            self._event("bridge_kill", f"{host.slot}: Bridge not running", None)
            return
        self._kill(status["pids"]["bridge"], "bridge_kill",
                   f"{host.slot}/bridge" if host.grouped else "bridge")

    def _kill(self, pid: int, fault: str, target: str) -> None:
        self.processes.add([pid])
        if self.processes.alive([pid], groups=False) != [pid]:   # not the process it was: leave it be
            self._event(fault, f"{target}: gone already", pid)
            return
        os.kill(pid, signal.SIGKILL)
        self._event(fault, target, pid)

    def restart_server(self) -> None:
        pid = self.server.pid
        self.server.kill()
        self._event("server_restart", "nats-server", pid)
        time.sleep(self.config.server_downtime)   # the outage itself, not a wait for anything
        self.server.start()

    def restart_instance(self) -> None:
        ready = [h for h in self.hosts if h.ready()]
        if not ready:
            return
        host = min(ready, key=lambda h: (h.generation, h.slot))   # the longest-lived one
        host.status()
        self.processes.add(host.pids())
        host.earlier.append(dict(host.status().get("stats", {})))
        killed = self.processes.kill(host.pids())
        if host.process is not None:
            host.process.wait(10)
        self._event("instance_restart", f"{host.member}", host.process.pid if host.process else None,
                    processes=len(killed))
        host.start()
        if host.process is not None:
            self.processes.add([host.process.pid])

    # ------------------------------------------------------------ phases
    def _host_params(self) -> dict[str, Any]:
        c = self.config
        return {"url": self.server.url, "pool": c.pool, "keys": c.keys, "work_ms": c.work_ms,
                "ledger": str(self.ledger_path), "partitions": c.partitions,
                "drain_timeout": 10.0}

    def _look(self) -> None:
        """Read every status file; learn their processes; note a bus that stopped by itself."""
        for host in self.hosts:
            status = host.status()
            self.processes.add(host.pids())
            if status.get("failure") and status["failure"] not in self.problems:
                self.problems.append(f"{host.slot}: {status['failure']}")
            if host.process is not None and host.process.poll() is not None and \
                    not host.exit_reported:
                host.exit_reported = True
                self.problems.append(f"{host.member or host.slot}'s bus process exited with "
                                     f"code {host.process.returncode} (log {host.log_path})")
                self._event("unexpected_exit", host.member or host.slot, host.process.pid)

    def _wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            self._look()
            if self.problems:
                raise RuntimeError(f"while waiting for {what}: {'; '.join(self.problems)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
            time.sleep(LOOP_INTERVAL)

    def _all_running(self) -> bool:
        return all(h.ready() and set(h.status().get("actors", {}).values()) == {"running"}
                   for h in self.hosts)

    def _shared(self) -> bool:
        stats = [h.status().get("stats", {}) for h in self.hosts]
        return (all(s.get("group_members") == len(self.hosts) for s in stats)
                and sum(s.get("partitions_owned", 0) for s in stats) == self.config.partitions)

    def run(self) -> dict[str, Any]:
        c = self.config
        create_ledger(self.ledger_path, c.capacity)
        self.server.start()
        params = self._host_params()
        slots = [f"m{i}" for i in range(c.instances)] if c.group else ["bus"]
        self.hosts = [Host(slot, self.work, params, c.group) for slot in slots]
        for host in self.hosts:
            host.start()
            self.processes.add([host.process.pid] if host.process else [])
        with self.console.status("starting the bus" + ("es" if c.group else "")):
            self._wait(lambda: all(h.ready() for h in self.hosts), START_TIMEOUT, "the buses to start")
            if c.group:
                self._wait(self._shared, START_TIMEOUT, "the members to share the partitions")
        launch = read_processes(self.hosts, self.server, self.ledger_path)
        ledger = LedgerReader(self.ledger_path, c.keys)
        publisher = SteadyPublisher(self.server.url, c.keys, c.rate, c.capacity)
        self.started = time.monotonic()
        progress = Progress(ledger, publisher, self.started)
        publisher.start()
        progress.start()
        try:
            warm, warm_at, publish_s = self._publish_phase(publisher, progress)
            drain_s = self._drain(publisher, progress)
            # A member killed last may still wait out its restart backoff: the end reading
            # is of a whole bus.
            with contextlib.suppress(TimeoutError, RuntimeError):
                self._wait(self._all_running, 30.0, "every actor running")
            end = read_processes(self.hosts, self.server, self.ledger_path)
            for host in self.hosts:
                self.processes.add(host.pids())
        finally:
            publisher.abort()
            progress.stop()
        tally = ledger.tally(publisher.stored)
        ledger.close()
        # While nats-server still runs: where the lost envelopes are, what the consumers say.
        diagnosis = asyncio.run(diagnose(self.server.url, tally)) if tally.lost else None
        self.console.print("stopping")
        self._stop_all()
        report = self._report(tally, publisher, progress, launch, warm, warm_at, end, publish_s,
                              drain_s)
        report["diagnosis"] = diagnosis
        return report

    def _publish_phase(self, publisher: SteadyPublisher, progress: Progress
                       ) -> tuple[dict[str, dict[str, Any]], float | None, float]:
        c = self.config
        warmup = c.warmup if c.duration is None else min(c.warmup, c.duration / 4)
        due = {kind: every for kind, every in c.intervals().items() if every > 0}
        actions = {"member_kill": self.kill_member, "bridge_kill": self.kill_bridge,
                   "server_restart": self.restart_server, "instance_restart": self.restart_instance}
        warm: dict[str, dict[str, Any]] = {}
        warm_at = None
        with self.console.status("publishing") as status:
            while True:
                now = time.monotonic() - self.started
                if publisher.done or (c.duration is not None and now >= c.duration):
                    break
                self._look()
                if self.problems and not c.group:
                    break   # the one bus is gone: nothing left to soak
                if warm_at is None and now >= warmup:
                    warm, warm_at = read_processes(self.hosts, self.server, self.ledger_path), now
                for kind in sorted(due, key=lambda k: due[k]):
                    if now >= due[kind]:
                        actions[kind]()
                        due[kind] += c.intervals()[kind]
                status.update(self._line(publisher, progress))
                time.sleep(LOOP_INTERVAL)
        publish_s = time.monotonic() - self.started
        publisher.finish()
        if publisher.failure:
            self.problems.append(f"the publisher failed: {publisher.failure}")
        return warm, warm_at, publish_s

    def _line(self, publisher: SteadyPublisher, progress: Progress) -> str:
        counts = {kind: sum(1 for e in self.events if e["fault"] == kind) for kind in FAULTS}
        return (f"t {time.monotonic() - self.started:,.0f} s  published {publisher.stored:,}  "
                f"handled {progress.handled:,}  outstanding {progress.outstanding:,}  faults "
                + " ".join(f"{k.split('_')[0]} {v}" for k, v in counts.items() if v)
                + f"  longest stall {progress.longest:.1f} s")

    def _drain(self, publisher: SteadyPublisher, progress: Progress) -> float:
        started = time.monotonic()
        deadline = started + self.config.drain_timeout
        with self.console.status("draining") as status:
            while progress.handled < publisher.stored and time.monotonic() < deadline:
                self._look()
                if self.problems and not self.config.group:
                    break
                status.update(self._line(publisher, progress))
                time.sleep(LOOP_INTERVAL)
        return time.monotonic() - started

    def _stop_all(self) -> None:
        for host in self.hosts:
            if host.running() and host.process is not None:
                host.process.send_signal(signal.SIGTERM)
        for host in self.hosts:
            host.stop(timeout=30.0)
        self.stop()

    def stop(self) -> None:
        """End every process the run started, by pid, and nats-server (also after an error)."""
        for host in self.hosts:
            self.processes.add(host.pids())
            if host.running() and host.process is not None:
                host.process.kill()
                host.process.wait(10)
        left = self.processes.kill([pid for pid in self.processes.alive()
                                    if pid != self.server.pid])
        if left:
            log.warning("soak: processes %s outlived their bus; killed", left)
        self.server.stop()

    # ------------------------------------------------------------ the report
    def _counters(self) -> dict[str, Any]:
        """Each bus's own counters as it last wrote them, and those of its earlier generations
        (the Bridge's counts start afresh with each Bridge; the restarts are the Supervisor's)."""
        return {host.slot: [*host.earlier, host.status().get("stats", {})] for host in self.hosts}

    def _report(self, tally: Tally, publisher: SteadyPublisher, progress: Progress,
                launch: dict[str, dict[str, Any]], warm: dict[str, dict[str, Any]],
                warm_at: float | None, end: dict[str, dict[str, Any]], publish_s: float,
                drain_s: float) -> dict[str, Any]:
        c = self.config
        rows = compare(warm, end, c.rss_limit_pct)
        judged = [r for r in rows if r["judged"]]
        rss_pass = bool(judged) and all(r["rss_flat"] for r in judged)
        totals = {f"{what}_{when}": round(sum(r[when][what] for r in judged), 1)
                  for what in ("rss_mb", "fds") for when in ("start", "end")}

        def example(item: tuple[int, int, int]) -> dict[str, Any]:
            n, at_ns, pid = item
            return {"n": n, "key": key_of(n, c.keys), "seq": n // c.keys, "pid": pid,
                    "at_s": round(at_ns / 1e9 - self.started, 2)}

        faults = {kind: sum(1 for e in self.events if e["fault"] == kind and e.get("pid"))
                  for kind in FAULTS if c.intervals()[kind]}
        longest = round(progress.longest, 2)
        before = [e for e in self.events if progress.longest_at is not None
                  and e["t"] <= progress.longest_at + PROGRESS_INTERVAL * 2]
        drained = tally.lost == 0
        passed = (drained and not tally.violations and rss_pass and not self.problems)
        return {
            "pass": passed,
            "mode": f"group of {c.instances}" if c.group else "single bus",
            "config": asdict(c),
            "publish_s": round(publish_s, 1), "drain_s": round(drain_s, 1),
            "published": tally.published, "handled": tally.distinct, "handlings": tally.handlings,
            "lost": tally.lost, "lost_examples": [{"n": n, "key": key_of(n, c.keys),
                                                   "seq": n // c.keys} for n in tally.lost_examples],
            "order_violations": len(tally.violations),
            "violation_examples": [example(v) for v in tally.violations[:20]],
            "gaps_before_lost": len(tally.gaps),
            "duplicates": tally.duplicates,
            "handled_beyond_published": tally.beyond,
            "publish_retries": publisher.retries, "publisher_reconnects": publisher.reconnects,
            "publish_rate": round(tally.published / publish_s, 1) if publish_s else None,
            "faults": faults,
            "longest_stall_s": longest,
            "longest_stall_at_s": None if progress.longest_at is None else round(progress.longest_at, 1),
            "longest_stall_after": before[-1] if before else None,
            "stalls": sorted(progress.stalls, key=lambda s: -s["length_s"])[:20],
            "longest_wait_s": round(progress.longest_wait, 2),
            "longest_wait_envelope": None if progress.longest_wait_n is None else {
                "n": progress.longest_wait_n, "key": key_of(progress.longest_wait_n, c.keys),
                "seq": progress.longest_wait_n // c.keys,
                "until_s": round(progress.longest_wait_at or 0, 1)},
            "rss": {"limit_pct": c.rss_limit_pct, "pass": rss_pass, **totals,
                    "start_at_s": None if warm_at is None else round(warm_at, 1),
                    "judged": "every bus process (host, actors, Thespian's admin and logger); "
                              "not nats-server, nor the soak's own process"},
            "processes": rows,
            "launch": launch,
            "bus_stats": self._counters(),
            "problems": self.problems,
            "events": self.events,
            "timeline": progress.timeline,
        }


# ====================================================================== diagnosis
async def diagnose(url: str, tally: Tally) -> dict[str, Any]:
    """For lost envelopes: whether the stream holds each (at the sequence it was stored
    under, ``n + 1``, as no retried publish stores a second copy), and every consumer's
    state; the dead-letter stream's size."""
    nc = await nats.connect(url, name="actorbus-soak-diagnosis", connect_timeout=5.0)
    found: dict[str, Any] = {"lost_in_stream": [], "consumers": {}, "dead_letters": None}
    try:
        js = nc.jetstream()
        for n in tally.lost_examples:
            try:
                stored = await js.get_msg(STREAM, n + 1)
                data = decode_envelope(stored.data or b"").payload.decode("ascii", "replace")
                found["lost_in_stream"].append({"n": n, "seq": n + 1, "subject": stored.subject,
                                                "holds_it": data == str(n)})
            except Exception as exc:   # reported, not raised: this is a report
                found["lost_in_stream"].append({"n": n, "seq": n + 1, "error": f"{type(exc).__name__}: {exc}"})
        for info in await js.consumers_info(STREAM):
            found["consumers"][info.name] = {
                "ack_floor": info.ack_floor.stream_seq if info.ack_floor else None,
                "delivered": info.delivered.stream_seq if info.delivered else None,
                "num_pending": info.num_pending, "num_ack_pending": info.num_ack_pending,
                "num_redelivered": info.num_redelivered}
        with contextlib.suppress(Exception):
            found["dead_letters"] = (await js.stream_info(f"{STREAM}_DLQ")).state.messages
    finally:
        await nc.close()
    return found


# ====================================================================== output
def print_report(report: dict[str, Any], console: Console) -> None:
    """The report as two tables: the envelopes and faults, then the processes."""
    c = report["config"]
    summary = Table(title=f"actorbus soak: {report['mode']}, {report['publish_s']:,.0f} s publishing, "
                          f"{c['keys']:,} keys", show_header=False)
    summary.add_column("what")
    summary.add_column("value", justify="right")
    summary.add_row("published (stored)", f"{report['published']:,} at {report['publish_rate']:,} msg/s "
                    f"({report['publish_retries']:,} publishes retried)")
    summary.add_row("handled (distinct)", f"{report['handled']:,}")
    summary.add_row("lost (never handled)", f"{report['lost']:,}")
    summary.add_row("order violations (first handlings, per key)", f"{report['order_violations']:,}")
    summary.add_row("duplicate handlings", f"{report['duplicates']:,}")
    summary.add_row("faults", ", ".join(f"{kind.replace('_', ' ')} {count}"
                                        for kind, count in report["faults"].items()) or "none")
    after = report["longest_stall_after"]
    summary.add_row("longest stall", f"{report['longest_stall_s']:.1f} s" + (
        f" at {report['longest_stall_at_s']:,.0f} s (after {after['fault'].replace('_', ' ')} at "
        f"{after['t']:,.0f} s)" if after else ""))
    waited = report["longest_wait_envelope"]
    summary.add_row("longest wait of an envelope (stored → first handled)",
                    f"{report['longest_wait_s']:.1f} s" + (
                        f" ({waited['key']}#{waited['seq']}, until {waited['until_s']:,.0f} s)"
                        if waited else ""))
    summary.add_row("drain after publishing", f"{report['drain_s']:.1f} s")
    rss = report["rss"]
    summary.add_row(f"RSS flat within {rss['limit_pct']:g} % (each bus process)",
                    ("pass" if rss["pass"] else "FAIL") + f"; all bus processes {rss['rss_mb_start']:,.1f} "
                    f"→ {rss['rss_mb_end']:,.1f} MB (start: {rss['start_at_s']} s in)")
    summary.add_row("open FDs, all bus processes", f"{rss['fds_start']:,.0f} → {rss['fds_end']:,.0f}")
    for problem in report["problems"]:
        summary.add_row("problem", problem)
    console.print(summary)
    processes = Table(title="processes: RSS (MB, without the shared ledger) and open FDs, "
                            "after the warm-up and at the end")
    for column in ("process", "pid start → end", "RSS start", "RSS end", "change", "FDs start → end"):
        processes.add_column(column, justify="left" if column == "process" else "right")
    for row in report["processes"]:
        first, last = row["start"] or {}, row["end"] or {}
        change = "-" if row["rss_change_pct"] is None else f"{row['rss_change_pct']:+.1f} %"
        if row["judged"] and row["rss_flat"] is False:
            change += " FAIL"
        elif not row["judged"]:
            change += " (not judged)"
        pids = f"{first.get('pid', '-')} → {last.get('pid', '-')}" if row["replaced"] else \
            str(first.get("pid") or last.get("pid") or "-")
        processes.add_row(row["process"], pids, str(first.get("rss_mb", "-")), str(last.get("rss_mb", "-")),
                          change, f"{first.get('fds', '-')} → {last.get('fds', '-')}")
    console.print(processes)
    if report["lost_examples"]:
        console.print("lost, e.g.: " + ", ".join(f"{e['key']}#{e['seq']}" for e in report["lost_examples"]))
    if report["violation_examples"]:
        console.print("out of order, e.g.: " + ", ".join(
            f"{e['key']}#{e['seq']} at {e['at_s']} s" for e in report["violation_examples"]))
    diagnosis = report.get("diagnosis")
    if diagnosis:
        console.print("lost envelopes in the stream: " + ", ".join(
            f"#{e['n']} seq {e['seq']} " + ("held" if e.get("holds_it") else
                                           e.get("error", "not there"))
            for e in diagnosis["lost_in_stream"]))
        for name, info in diagnosis["consumers"].items():
            console.print(f"consumer {name}: " + ", ".join(f"{k} {v}" for k, v in info.items()))
        console.print(f"dead letters: {diagnosis['dead_letters']}")
    console.print("soak: PASS" if report["pass"] else "soak: FAIL")


def run_soak(config: SoakConfig, json_path: str | None = None, keep_files: bool = False,
             console: Console | None = None) -> int:
    """Run the soak, print its report (and write it as JSON); 0 when nothing was lost, every
    key's first handlings kept their order and the bus's RSS stayed flat."""
    console = console or Console()
    config.check()
    work = Path(tempfile.mkdtemp(prefix="actorbus-soak-"))
    run = SoakRun(config, work, console)
    c = config
    faults = ", ".join(f"{kind.replace('_', ' ')} every {every:g} s"
                       for kind, every in c.intervals().items() if every) or "no faults"
    length = f"{c.duration:g} s" if c.duration is not None else "until published"
    console.print(f"[bold]actorbus soak[/]: {'group of ' + str(c.instances) if c.group else 'one bus'}, "
                  f"pool {c.pool}, handler {c.work_ms:g} ms, {c.rate:g} msg/s over {c.keys:,} keys "
                  f"for {length}"
                  + (f" (at most {c.messages:,} envelopes)" if c.messages else "")
                  + f"; {faults}; work folder {work}")
    report: dict[str, Any] | None = None
    try:
        report = run.run()
    finally:
        run.stop()
        keep = keep_files or report is None or not report["pass"]
        if keep:
            console.print(f"logs and ledger kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report["work_dir"] = str(work) if keep else None
    print_report(report, console)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2))
        console.print(f"JSON: {json_path}")
    return 0 if report["pass"] else 1

