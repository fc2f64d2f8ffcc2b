"""``actorbus demo``: an embedded nats-server, a process pool, injected failures, checked results.

The demo starts its own nats-server, builds an :class:`~actorbus.bus.EventBus`
on a pool of actor processes and subscribes two handlers:

* ``demo.orders.>``: envelopes (domain events), round-robin over many
  aggregates. About 2 % fail once and succeed on the in-place retry; the
  last event of every 50th aggregate fails its whole first delivery, is
  naked and succeeds on redelivery. Every successful handling is written
  to a records file of the handling process.
* ``demo.metrics.>``: plain messages without an aggregate id, spread
  round-robin over the pool. About 2 % fail; they are acked, not retried.

When everything has been settled it reads the records back and checks
that every envelope was handled, that each aggregate's events were
handled in publish order, and that each aggregate stayed on one process.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                           TimeElapsedColumn)
from rich.table import Table

from actorbus.bus import EventBus
from actorbus.draining import drain_then_stop
from actorbus.config import NatsAuth
from actorbus.envelope import Envelope
from actorbus.message import Message
from actorbus.publisher import PublishError
from actorbus.redaction import show_servers
from actorbus.server import NatsServer

#: Where the handlers write their records (set before the actor processes are forked).
DIR_ENV = "ACTORBUS_DEMO_DIR"
#: Events every aggregate has at least (``envelopes // aggregates``).
EVENTS_PER_AGGREGATE_ENV = "ACTORBUS_DEMO_EVENTS_PER_AGGREGATE"
#: How many aggregates, the first ones, carry one event more (``envelopes % aggregates``).
LONGER_AGGREGATES_ENV = "ACTORBUS_DEMO_LONGER_AGGREGATES"

ORDERS_SUBJECT = "demo.orders"
METRICS_SUBJECT = "demo.metrics.cpu"
#: How long the demo waits for the pool to settle everything, in seconds.
PROCESSING_DEADLINE = 300.0
#: Messages published per ``publish_many`` call (acknowledgements awaited together).
_PUBLISH_CHUNK = 1000
#: Seconds the demo lets in-flight messages finish when interrupted (and at its end).
DRAIN_TIMEOUT = 10.0
#: How often the processing progress polls ``bus.stats()``, in seconds.
POLL_INTERVAL = 0.2

# ====================================================================== handlers
# They run in the actor processes, which inherit the environment of the demo.

_records: dict[int, IO[str]] = {}
_failed_once: set[str] = set()


def aggregate_id_for(index: int) -> str:
    """The demo's aggregate id number ``index``: ``order-00000``, ``order-00001``, ..."""
    return f"order-{index:05d}"


def aggregate_index(aggregate_id: str) -> int:
    """The number in an aggregate id made by :func:`aggregate_id_for`."""
    return int(aggregate_id.rsplit("-", 1)[1])


def events_for(index: int, envelopes: int, aggregates: int) -> int:
    """How many of ``envelopes`` events, published round-robin, aggregate ``index`` gets."""
    return envelopes // aggregates + (1 if index < envelopes % aggregates else 0)


def fails_transiently(event_id: str) -> bool:
    """The stable ~2 % of envelopes whose first in-process attempt fails."""
    return zlib.crc32(event_id.encode()) % 50 == 0


def fails_whole_delivery(index: int) -> bool:
    """Aggregates whose last event fails every attempt of its first delivery."""
    return index % 50 == 7


def plain_fails(number: int) -> bool:
    """The ~2 % of plain messages whose handling fails (they are acked anyway)."""
    return number % 50 == 3


def _records_file() -> IO[str]:
    pid = os.getpid()
    handle = _records.get(pid)
    if handle is None:
        directory = os.environ.get(DIR_ENV)
        if not directory:
            raise RuntimeError(f"{DIR_ENV} is not set: the demo handlers run only under `actorbus demo`")
        # Kept open for the process's life: a handler appends a line per message.
        handle = _records[pid] = open(Path(directory) / f"records-{pid}.txt", "a",  # noqa: SIM115
                                      buffering=1, encoding="ascii")
    return handle


def _last_seq(index: int) -> int:
    per_aggregate = int(os.environ.get(EVENTS_PER_AGGREGATE_ENV, "0"))
    longer = int(os.environ.get(LONGER_AGGREGATES_ENV, "0"))
    return per_aggregate + (1 if index < longer else 0) - 1


def handle_order(msg: Message) -> None:
    """Envelope handler: inject failures, then record ``<aggregate> <seq> <pid> <delivery> <time>``.

    The time is ``time.monotonic_ns()`` (one clock for all processes), so
    the order of handlings can be compared across processes too.
    """
    envelope = msg.envelope
    if envelope is None:
        raise RuntimeError("handle_order needs an envelope subscription")
    seq = int(msg.data)
    index = aggregate_index(envelope.aggregate_id)
    if fails_whole_delivery(index) and seq == _last_seq(index) and msg.delivery_count == 1:
        raise RuntimeError("injected failure of a whole delivery (last event of its aggregate)")
    if msg.attempt == 1 and fails_transiently(envelope.event_id) \
            and envelope.event_id not in _failed_once:
        _failed_once.add(envelope.event_id)
        raise RuntimeError("injected transient failure")
    _records_file().write(f"{envelope.aggregate_id} {seq} {os.getpid()} {msg.delivery_count} "
                          f"{time.monotonic_ns()}\n")


def handle_metric(msg: Message) -> None:
    """Plain handler: fails on about 2 % of the messages, records nothing."""
    if plain_fails(int(msg.data)):
        raise RuntimeError("injected failure of a plain message")


# ====================================================================== checking
@dataclass
class Check:
    """What the records say about the envelopes."""

    handled: int = 0                   #: successful handlings, duplicates included
    missing: list[tuple[str, int]] = field(default_factory=list)
    order_violations: list[str] = field(default_factory=list)
    multi_process: list[str] = field(default_factory=list)
    duplicates: int = 0                #: successful handlings beyond the first
    processes: int = 0                 #: processes that handled envelopes


def read_records(directory: Path) -> list[tuple[str, int, int, int, int]]:
    """All records as ``(aggregate, seq, pid, delivery_count, time_ns)``, oldest first."""
    rows = []
    for path in sorted(directory.glob("records-*.txt")):
        with open(path, encoding="ascii") as handle:
            for position, line in enumerate(handle):
                parts = line.split()
                if len(parts) < 4:
                    continue  # a line cut short by a killed process
                when = int(parts[4]) if len(parts) > 4 else position
                rows.append((parts[0], int(parts[1]), int(parts[2]), int(parts[3]), when))
    rows.sort(key=lambda row: row[4])
    return rows


def check_records(directory: Path, envelopes: int, aggregates: int) -> Check:
    """Check every envelope was handled, in publish order per aggregate, on one process."""
    result = Check()
    first_order: dict[str, list[int]] = {}
    seen: set[tuple[str, int]] = set()
    pids: dict[str, set[int]] = {}
    for aggregate, seq, pid, _delivery, _when in read_records(directory):
        result.handled += 1
        pids.setdefault(aggregate, set()).add(pid)
        if (aggregate, seq) in seen:
            result.duplicates += 1
            continue
        seen.add((aggregate, seq))
        first_order.setdefault(aggregate, []).append(seq)
    for index in range(aggregates):
        aggregate = aggregate_id_for(index)
        for seq in range(events_for(index, envelopes, aggregates)):
            if (aggregate, seq) not in seen:
                result.missing.append((aggregate, seq))
    for aggregate, seqs in sorted(first_order.items()):
        for before, after in itertools.pairwise(seqs):
            if after <= before:
                result.order_violations.append(f"{aggregate}: {after} handled after {before}")
    result.multi_process = sorted(a for a, p in pids.items() if len(p) > 1)
    result.processes = len(set().union(*pids.values())) if pids else 0
    return result


# ====================================================================== running
def log_config(path: Path) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` dict sending WARNING+ (actorbus.* included) to ``path``."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {
            "format": "%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"}},
        "handlers": {"file": {"class": "logging.FileHandler", "filename": str(path),
                              "formatter": "plain", "level": "WARNING"}},
        "loggers": {"actorbus": {"level": "WARNING", "handlers": ["file"], "propagate": False}},
        "root": {"level": "WARNING", "handlers": ["file"]},
    }


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    old = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """Send this process's actorbus.* warnings to ``path`` instead of the terminal."""
    logger = logging.getLogger("actorbus")
    handler = logging.FileHandler(path)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"))
    old_propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = old_propagate
        handler.close()


def _publish(bus: EventBus, envelopes: int, aggregates: int, keyless: int, console: Console) -> None:
    next_seq = [0] * aggregates
    outgoing = []
    for i in range(envelopes):
        index = i % aggregates
        aggregate = aggregate_id_for(index)
        seq = next_seq[index]
        next_seq[index] += 1
        outgoing.append((f"{ORDERS_SUBJECT}.{aggregate}",
                         Envelope.create(aggregate, "OrderEvent", str(seq).encode("ascii"))))
    plain = [(METRICS_SUBJECT, str(n).encode("ascii")) for n in range(keyless)]
    with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=console) as progress:
        for description, messages in (("publishing envelopes", outgoing),
                                      ("publishing plain messages", plain)):
            task = progress.add_task(description, total=len(messages))
            for start in range(0, len(messages), _PUBLISH_CHUNK):
                chunk = messages[start:start + _PUBLISH_CHUNK]
                failed = [r for r in bus.publish_many(chunk) if not r.ok]
                if failed:
                    raise PublishError(f"{len(failed)} publish(es) failed, first: "
                                       f"{failed[0].subject}: {failed[0].error}")
                progress.update(task, completed=start + len(chunk))


def _settled(stats: dict[str, int], total: int) -> bool:
    # processed + failed alone can reach the total while a naked envelope
    # waits for its redelivery; acked (+ termed) counts each message once.
    return (stats["processed"] + stats["failed"] >= total
            and stats.get("acked", 0) + stats.get("termed", 0) >= total
            and stats["in_flight"] == 0)


def _wait(bus: EventBus, total: int, console: Console) -> tuple[dict[str, int], bool]:
    deadline = time.monotonic() + PROCESSING_DEADLINE
    with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(bar_width=20),
                  MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[detail]}"),
                  console=console) as progress:
        task = progress.add_task("processing", total=total, detail="")
        # completed = settled (acked or termed); the detail shows the raw counters.
        while True:
            stats = bus.stats()
            done = min(stats.get("acked", 0) + stats.get("termed", 0), total)
            progress.update(task, completed=done, detail=(
                f"ok {stats['processed']} failed {stats['failed']} "
                f"in flight {stats['in_flight']}"))
            if _settled(stats, total):
                return stats, True
            if time.monotonic() >= deadline:
                return stats, False
            time.sleep(POLL_INTERVAL)


def run_demo(pool_size: int = 8, envelopes: int = 20000, aggregates: int = 500,
             keyless: int = 5000, console: Console | None = None,
             metrics_port: int | None = None, metrics_host: str = "127.0.0.1",
             keep_files: bool = False, servers: str | None = None,
             nats: dict[str, str | None] | None = None) -> int:
    """Run the demo end to end and print its summary; return 0 if every check passed, else 1
    (130 when interrupted: Ctrl-C or SIGTERM drains, a second one stops at once).

    Its temporary folder (records, log) is removed at exit unless ``keep_files``.

    ``servers`` is an existing NATS to use instead of an embedded server
    (its streams DEMO_ORDERS and DEMO_METRICS should start empty); ``nats``
    holds its credentials and TLS settings (:class:`EventBus` keywords),
    the ``nats`` CLI's environment variables filling in the rest. The
    embedded server has no authentication: neither is used with it.

    Raises ``ValueError`` for impossible arguments and lets errors of the
    server or the bus propagate (the CLI turns them into one line).
    """
    _check_arguments(pool_size, envelopes, aggregates, keyless)
    console = console or Console()
    started = time.monotonic()
    work_dir = Path(tempfile.mkdtemp(prefix="actorbus-demo-"))
    log_path = work_dir / "demo.log"
    log_path.touch()
    total = envelopes + keyless
    env = {DIR_ENV: str(work_dir),
           EVENTS_PER_AGGREGATE_ENV: str(envelopes // aggregates),
           LONGER_AGGREGATES_ENV: str(envelopes % aggregates)}

    console.print(f"[bold]actorbus demo[/]: {envelopes} envelopes over {aggregates} aggregates, "
                  f"{keyless} plain messages, pool of {pool_size} actor processes")
    server = None if servers else NatsServer()
    interrupted = False
    try:
        with _environment(env), _log_to(log_path):
            # Its own session: the terminal's Ctrl-C reaches the demo, which drains,
            # not the server the drain needs; it is stopped last, below.
            if server is not None:
                server.start()
                console.print(f"nats-server pid {server.pid} at {server.url}")
                url = server.url
            else:
                assert servers   # no embedded server is started only when servers are given
                console.print(f"NATS at {show_servers(servers)}")
                url = servers
            bus = EventBus(servers=url, pool_size=pool_size, runtime="processes",
                           log_config=log_config(log_path), metrics_port=metrics_port,
                           metrics_host=metrics_host,
                           **((nats or {}) if servers else {"auth": NatsAuth()}))
            try:
                if metrics_port is not None:
                    console.print(f"metrics at http://{metrics_host}:{metrics_port}/metrics")
                bus.subscribe(f"{ORDERS_SUBJECT}.>", "actorbus.demo:handle_order", envelope=True,
                              durable="demo-orders", stream="DEMO_ORDERS", retries=3,
                              retry_backoff=0.01, nak_delay=0.2)
                bus.subscribe("demo.metrics.>", "actorbus.demo:handle_metric", envelope=False,
                              durable="demo-metrics", stream="DEMO_METRICS")
                console.print(f"actors up: {len(bus.pids)} processes (supervisor, bridge, router, "
                              f"{pool_size} aggregate actors)")
                consume_started = time.monotonic()
                _publish(bus, envelopes, aggregates, keyless, console)
                stats, settled = _wait(bus, total, console)
                consume_time = time.monotonic() - consume_started
            except KeyboardInterrupt:
                interrupted = True
                console.print(f"interrupted: draining (up to {DRAIN_TIMEOUT:g} s); "
                              "Ctrl-C again stops now")
            finally:
                drain_then_stop(bus, console, DRAIN_TIMEOUT)
            if not interrupted:
                check = check_records(work_dir, envelopes, aggregates)
    finally:
        if server is not None:
            server.close()
        if not keep_files:
            shutil.rmtree(work_dir, ignore_errors=True)
    if interrupted:
        console.print("interrupted: stopped")
        return 130
    elapsed = time.monotonic() - started

    # Envelope failures are all naked (so are hand-off failures, counted as undelivered).
    envelope_failed = stats["naked"] - stats.get("undelivered", 0)
    plain_done = stats["processed"] + stats["failed"] - check.handled - envelope_failed
    ok = settled and not check.missing and not check.order_violations and plain_done == keyless

    _summary(console, stats=stats, check=check, envelopes=envelopes, keyless=keyless,
             plain_done=plain_done, envelope_failed=envelope_failed, elapsed=elapsed,
             consume_time=consume_time, log_path=log_path, work_dir=work_dir,
             keep_files=keep_files)
    if not settled:
        waiting = total - min(stats.get("acked", 0) + stats.get("termed", 0), total)
        console.print(f"[bold red]not settled within {PROCESSING_DEADLINE:g}s[/]: {waiting} "
                      f"message(s) not settled, {stats['in_flight']} in flight")
    _print_failures(console, check, plain_done, keyless)
    console.print("[bold green]demo OK[/]" if ok else "[bold red]demo FAILED[/]")
    return 0 if ok else 1


def _check_arguments(pool_size: int, envelopes: int, aggregates: int, keyless: int) -> None:
    if pool_size < 0:
        raise ValueError(f"pool size must be >= 0, got {pool_size}")
    if envelopes < 0 or keyless < 0:
        raise ValueError("the numbers of envelopes and plain messages must be >= 0")
    if aggregates < 1:
        raise ValueError(f"aggregates must be >= 1, got {aggregates}")


def _print_failures(console: Console, check: Check, plain_done: int, keyless: int) -> None:
    """The first ten of each kind of failure the records show."""
    for aggregate, seq in check.missing[:10]:
        console.print(f"[red]missing[/]: {aggregate} event {seq} was never handled successfully")
    if len(check.missing) > 10:
        console.print(f"[red]... and {len(check.missing) - 10} more missing[/]")
    for violation in check.order_violations[:10]:
        console.print(f"[red]order violation[/]: {violation}")
    if plain_done != keyless:
        console.print(f"[red]plain messages[/]: {plain_done} handled, {keyless} published")


def _summary(console: Console, *, stats: dict[str, int], check: Check, envelopes: int,
             keyless: int, plain_done: int, envelope_failed: int, elapsed: float,
             consume_time: float, log_path: Path, work_dir: Path, keep_files: bool) -> None:
    table = Table(title="actorbus demo", show_header=True, header_style="bold")
    table.add_column("figure")
    table.add_column("value", justify="right")
    handled = stats["processed"] + stats["failed"]
    order = "[green]OK[/]" if not check.order_violations else \
        f"[red]{len(check.order_violations)} violations[/]"
    rows = [
        ("published envelopes", envelopes),
        ("published plain messages", keyless),
        ("received", stats["received"]),
        ("processed", stats["processed"]),
        ("failed, envelopes (naked)", envelope_failed),
        ("failed, plain (acked)", stats["failed"] - envelope_failed),
        ("acked", stats["acked"]),
        ("naked", stats["naked"]),
        ("redelivered", stats.get("redelivered", 0)),
        ("retried in place", stats.get("retried", 0)),
        ("dead-lettered / termed", f"{stats.get('dead_lettered', 0)} / {stats.get('termed', 0)}"),
        ("actor restarts", stats.get("restarts", 0)),
        ("envelopes handled (distinct / duplicates)",
         f"{check.handled - check.duplicates} / {check.duplicates}"),
        ("envelopes missing", len(check.missing)),
        ("plain handled (processed + failed)", plain_done),
        ("order per aggregate", order),
        ("aggregates on more than one process", len(check.multi_process)),
        ("processes that handled envelopes", check.processes),
        ("elapsed", f"{elapsed:.1f} s"),
        ("consume time (publish start to settled)", f"{consume_time:.1f} s"),
        ("messages per second", f"{handled / consume_time:,.0f}" if consume_time > 0 else "-"),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)
    if keep_files:
        console.print(f"log (WARNING+): {log_path}")
        console.print(f"records: {work_dir}")
    else:
        console.print("log and records removed (--keep-files keeps them)")
