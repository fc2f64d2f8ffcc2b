"""``actorbus bench --instances 1,2,3``: k actorbus instances on one host, one elastic group.

For each k: a fresh partitioned stream, k instances (each a process tree of
its own: :func:`consume` run by :mod:`actorbus.benchmarks.worker`) that join
one elastic consumer group and wait until they share the partitions; then
``messages`` envelopes over ``keys`` aggregates are published (pipelined) and
the run ends when the instances have acked them all. The instances share the
host's CPUs with each other, the publisher and nats-server, so the table
reports the ratio to one instance and where the CPU went, not a promise of
linear scaling.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
from nats.js.api import StorageType, SubjectTransform
from rich.console import Console
from rich.table import Table

from actorbus.benchmarks.common import RECORD_DIR_ENV, RECORDER, check_order, make_envelope, read_records
from actorbus.benchmarks.procfs import process_cpu_seconds
from actorbus.groups import partition_transform
from actorbus.message import Message
from actorbus.server import NatsServer

#: Partitions of every run's stream: enough for three instances to share evenly.
PARTITIONS = 12
#: How often instances write their progress, and the orchestrator reads it.
PROGRESS_INTERVAL = 0.05
PUBLISH_CHUNK = 1000
ROOT = Path(__file__).resolve().parent.parent


def handle(msg: Message) -> None:
    """Runs in the aggregate actors; the Bridge decoded the envelope."""
    RECORDER.handle(msg.aggregate_id, msg.data)


# ====================================================================== one instance
def consume(params: dict[str, Any]) -> dict[str, Any]:
    """One instance: join the group and report its progress and pids until told to stop."""
    from actorbus.bus import EventBus

    if os.environ.get(RECORD_DIR_ENV) != params["record_dir"]:
        raise RuntimeError(f"{RECORD_DIR_ENV} must be set before the bus is built")
    progress, stop = Path(params["progress_path"]), Path(params["stop_path"])
    from actorbus.benchmarks.actorbus_variant import _log_config
    log_path = Path(params["progress_path"]).with_suffix(".log")   # warnings and errors
    with EventBus(servers=params["url"], pool_size=params["pool"], group=params["group"],
                  partitions=PARTITIONS, member=params["member"], heartbeat=0.5,
                  log_config=_log_config(log_path)) as bus:
        bus.subscribe(params["subject"], handle, stream=params["stream"], storage="file")
        deadline = time.monotonic() + params["timeout"]
        while not stop.exists() and time.monotonic() < deadline:
            stats = bus.stats()
            tmp = progress.with_suffix(".tmp")
            tmp.write_text(json.dumps({**{key: stats.get(key, 0) for key in
                                          ("acked", "group_members", "partitions_owned")},
                                       "pids": bus.pids}))
            tmp.replace(progress)
            time.sleep(PROGRESS_INTERVAL)
    return {}


# ====================================================================== orchestration
async def _create_stream(url: str, stream: str, subject: str) -> None:
    nc = await nats.connect(url, name="bench-admin")
    try:
        await nc.jetstream().add_stream(
            name=stream, subjects=[subject], storage=StorageType.FILE,
            subject_transform=SubjectTransform(src=subject, dest=partition_transform(subject, PARTITIONS)))
    finally:
        await nc.close()


async def _publish(url: str, prefix: str, messages: int, keys: int) -> float:
    """Core NATS publishes, captured by the stream: a JetStream publish awaits each ack, and
    one Python publisher would then set the pace instead of the instances."""
    nc = await nats.connect(url, name="bench-publisher")
    try:
        started = time.perf_counter()
        for start in range(0, messages, PUBLISH_CHUNK):
            for i in range(start, min(start + PUBLISH_CHUNK, messages)):
                await nc.publish(f"{prefix}.k{i % keys}", make_envelope(f"k{i % keys}", i // keys))
            await nc.flush()
        return time.perf_counter() - started
    finally:
        await nc.close()


def _cpu(pids: list[dict[str, int]]) -> list[dict[str, float]]:
    """CPU seconds so far of each instance's actor processes, by actor name."""
    return [{name: process_cpu_seconds(pid) for name, pid in instance.items()} for instance in pids]


def _progress(paths: list[Path]) -> list[dict[str, Any]]:
    found = []
    for path in paths:
        try:
            found.append(json.loads(path.read_text()))
        except (FileNotFoundError, ValueError):
            found.append({})
    return found


def _wait(predicate: Any, timeout: float, what: str, processes: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        if any(p.poll() is not None for p in processes):
            raise RuntimeError(f"an instance exited while waiting for {what}")
        time.sleep(PROGRESS_INTERVAL)


def run_one(url: str, server_pid: int, work: Path, count: int, messages: int, keys: int,
            pool: int) -> dict[str, Any]:
    """``count`` instances consume ``messages`` envelopes; their row."""
    name = f"GROUPBENCH{count}"
    subject = f"gb{count}.*"
    records = work / f"records-{count}"
    records.mkdir()
    asyncio.run(_create_stream(url, name, subject))
    timeout = 120 + messages / 500
    env = {**os.environ, RECORD_DIR_ENV: str(records),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    stop = work / f"stop-{count}"
    progress = [work / f"progress-{count}-{i}.json" for i in range(count)]
    results = [work / f"result-{count}-{i}.json" for i in range(count)]
    processes = []
    for i in range(count):
        params = {"kind": "group", "url": url, "pool": pool, "group": f"bench{count}",
                  "member": f"m{i}", "subject": subject, "stream": name, "record_dir": str(records),
                  "progress_path": str(progress[i]), "stop_path": str(stop), "timeout": timeout}
        params_path = work / f"params-{count}-{i}.json"
        params_path.write_text(json.dumps(params))
        processes.append(subprocess.Popen([sys.executable, "-m", "actorbus.benchmarks.worker",
                                           str(params_path), str(results[i])],
                                          env=env, cwd=str(ROOT), stdin=subprocess.DEVNULL))
    try:
        _wait(lambda: all(p.get("group_members") == count for p in _progress(progress)) and
              sum(p.get("partitions_owned", 0) for p in _progress(progress)) == PARTITIONS,
              60, f"{count} instance(s) sharing the partitions", processes)
        pids = [p["pids"] for p in _progress(progress)]
        cpu_before = _cpu(pids)
        server_cpu = process_cpu_seconds(server_pid)
        started = time.perf_counter()
        publish_s = asyncio.run(_publish(url, subject[:-2], messages, keys))
        _wait(lambda: sum(p.get("acked", 0) for p in _progress(progress)) >= messages, timeout,
              f"{messages} acks", processes)
        elapsed = time.perf_counter() - started
        server_cpu = process_cpu_seconds(server_pid) - server_cpu
        cpu = [{name: after[name] - before.get(name, 0.0) for name in after}
               for before, after in zip(cpu_before, _cpu(pids), strict=True)]
        acked = [p.get("acked", 0) for p in _progress(progress)]
    finally:
        stop.touch()
        for process in processes:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    distinct, duplicates, violations = check_order(read_records(records))
    return {"instances": count, "pool": pool, "messages": messages, "elapsed_s": round(elapsed, 3),
            "msgs_per_s": round(messages / elapsed), "publish_s": round(publish_s, 3),
            "acked_per_instance": acked, "distinct": distinct, "duplicates": duplicates,
            "order_violations": violations, "nats_server_cpu_s": round(server_cpu, 2),
            "cpu_s_per_instance": [round(sum(c.values()), 2) for c in cpu],
            "bridge_cpu_s_per_instance": [round(c.get("bridge", 0), 2) for c in cpu]}


def run_instances(counts: list[int], messages: int = 60_000, keys: int = 1000, pool: int = 2,
                  json_path: str | None = None, console: Console | None = None) -> int:
    """Run each count of instances in turn; print the table; 0 when every run kept order."""
    console = console or Console()
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"instances must be counts >= 1, got {counts}")
    console.print(f"[bold]actorbus bench --instances[/]: {messages:,} envelopes over {keys:,} keys, "
                  f"pool {pool} per instance, {PARTITIONS} partitions, {os.cpu_count()} CPUs shared "
                  "by every instance, the publisher and nats-server")
    rows = []
    with tempfile.TemporaryDirectory(prefix="actorbus-bench-instances-") as directory:
        work = Path(directory)
        with NatsServer(store_dir=work / "nats") as server:
            assert server.pid is not None
            for count in counts:
                rows.append(run_one(server.url, server.pid, work, count, messages, keys, pool))
    base = next((r["msgs_per_s"] for r in rows if r["instances"] == 1), rows[0]["msgs_per_s"])
    table = Table(title="instances on one host (one elastic group)")
    for column in ("instances", "msg/s", "ratio", "lost", "order", "CPU s per instance "
                   "(Bridge)", "nats-server CPU s"):
        table.add_column(column, justify="right")
    for row in rows:
        row["ratio_to_one"] = round(row["msgs_per_s"] / base, 2)
        lost = row["messages"] - row["distinct"]
        table.add_row(str(row["instances"]), f"{row['msgs_per_s']:,}", f"{row['ratio_to_one']:.2f}×",
                      str(lost), "ok" if row["order_violations"] == 0 else
                      f"{row['order_violations']} violations",
                      ", ".join(f"{c:g} ({b:g})" for c, b in zip(row["cpu_s_per_instance"],
                                                                  row["bridge_cpu_s_per_instance"],
                                                                  strict=True)),
                      f"{row['nats_server_cpu_s']:g}")
    console.print(table)
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=2))
    return 0 if all(r["order_violations"] == 0 and r["distinct"] == r["messages"] for r in rows) else 1
