"""``actorbus bench --snapshots``: what durable aggregates cost in throughput.

One embedded nats-server, one FILE stream of ``messages`` envelopes over
``keys`` aggregates, each on ``snap.k<i>`` (the aggregate id is the
subject's last token, as durable aggregates want it). Then, ``rounds``
times and interleaved, the same actorbus bus consumes it all on a fresh
durable with an :class:`~actorbus.Aggregate` that keeps no snapshots and
with the same class at ``snapshot_every = 100`` (a fresh durable is a fresh
bucket: every aggregate's first message reads a snapshot that is not there
and the stream before it). The ratio of the medians is the cost.
"""
from __future__ import annotations

import asyncio
import shutil
import statistics
import tempfile
from pathlib import Path

import nats
from nats.js.api import StorageType
from rich.console import Console

from actorbus.aggregate import Aggregate
from actorbus.message import Message
from actorbus.server import NatsServer
from actorbus.benchmarks import report
from actorbus.benchmarks.common import RECORDER, check_order, make_envelope, read_records
from actorbus.benchmarks.run import PUBLISH_CHUNK, WorkerFailed, _run_worker

STREAM = "SNAP"
SUBJECT = "snap.*"
#: The durable class's ``snapshot_every``.
SNAPSHOT_EVERY = 100


class Tally(Aggregate):
    """Counts its events and records each (for the order check), keeping no snapshots."""

    idle_timeout = None

    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.count = 0

    def handle(self, msg: Message) -> None:
        """Count it and record it."""
        self.count += 1
        RECORDER.handle(self.aggregate_id, msg.data)


class DurableTally(Tally):
    """The same, durable: a snapshot every :data:`SNAPSHOT_EVERY` events."""

    snapshot_every = SNAPSHOT_EVERY


VARIANTS = (("no snapshots", "actorbus.benchmarks.snapshots:Tally"),
            (f"snapshot_every={SNAPSHOT_EVERY}", "actorbus.benchmarks.snapshots:DurableTally"))


async def _prepublish(url: str, messages: int, keys: int) -> None:
    nc = await nats.connect(url, name="bench-publisher")
    try:
        js = nc.jetstream()
        await js.add_stream(name=STREAM, subjects=[SUBJECT], storage=StorageType.FILE)
        for start in range(0, messages, PUBLISH_CHUNK):
            indices = range(start, min(start + PUBLISH_CHUNK, messages))
            await asyncio.gather(*(js.publish(f"snap.k{i % keys}", make_envelope(f"k{i % keys}", i // keys))
                                   for i in indices))
    finally:
        await nc.close()


def run_snapshots(messages: int = 100_000, keys: int = 1000, pool: int = 2, rounds: int = 3,
                  json_path: str | None = None, console: Console | None = None) -> int:
    """Run the rounds, print each run and the ratio of the medians; 0 when every run kept
    per-key order and lost nothing."""
    console = console or Console()
    work_dir = Path(tempfile.mkdtemp(prefix="actorbus-bench-snapshots-"))
    rates: dict[str, list[float]] = {label: [] for label, _ in VARIANTS}
    broken = 0
    console.print(f"[bold]actorbus bench --snapshots[/]: {messages:,} envelopes over {keys:,} "
                  f"keys, pool {pool}, {rounds} round(s) of each variant, interleaved")
    try:
        with NatsServer(store_dir=work_dir / "nats") as server:
            asyncio.run(_prepublish(server.url, messages, keys))
            for round_number in range(rounds):
                for label, handler in VARIANTS:
                    slug = f"r{round_number}-{'durable' if 'every' in label else 'plain'}"
                    record_dir = work_dir / slug
                    record_dir.mkdir()
                    params = {"kind": "actorbus", "url": server.url, "stream": STREAM,
                              "subject": SUBJECT, "durable": slug, "count": messages,
                              "record_dir": str(record_dir), "pool": pool,
                              "timeout": 60 + messages / 500, "handler": handler,
                              "subscribe": {"key_from_subject": True},
                              "log_path": str(work_dir / f"{slug}.log")}
                    with console.status(f"{label}, round {round_number + 1}: consuming {messages:,}"):
                        try:
                            result = _run_worker(params, work_dir)
                        except WorkerFailed as exc:
                            console.print(f"[red]{label} failed[/]: {exc}")
                            return 1
                    distinct, _duplicates, violations = check_order(read_records(record_dir))
                    shutil.rmtree(record_dir, ignore_errors=True)
                    broken += violations + (messages - distinct)
                    rate = messages / result["elapsed"]
                    rates[label].append(rate)
                    console.print(f"{label}, round {round_number + 1}: {rate:,.0f} msg/s "
                                  f"({result['elapsed']:.2f} s), order violations {violations}, "
                                  f"missing {messages - distinct}")
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    (plain, _), (durable, _) = VARIANTS
    medians = {label: statistics.median(values) for label, values in rates.items()}
    ratio = medians[durable] / medians[plain]
    console.print(f"median: no snapshots {medians[plain]:,.0f} msg/s, snapshot_every="
                  f"{SNAPSHOT_EVERY} {medians[durable]:,.0f} msg/s: ratio {ratio:.2f}")
    if json_path:
        report.write_json([report.row(label, msgs_per_s=round(medians[label], 1),
                                      notes=f"median of {rounds}: "
                                            + ", ".join(f"{r:.0f}" for r in rates[label]))
                           for label in medians], json_path)
    return 1 if broken else 0
