"""``actorbus bench``: one embedded nats-server, one pre-published stream, every variant in turn.

1. Start a :class:`~actorbus.server.NatsServer`, create a FILE-storage stream
   and publish ``messages`` envelopes over ``keys`` aggregates (``k<i % keys>``;
   payload msgpack ``{"seq": <per-key sequence>}``) with nats-py ``js.publish``,
   pipelined in chunks.
2. Consume all of them with each variant, each on a fresh durable consumer of
   that stream, in a fresh process (:mod:`actorbus.benchmarks.worker`): the plain nats-py
   pull loop, the FastStream pull subscriber, actorbus with each pool size.
   ``msgs_per_s`` covers the consume phase only; the records give the per-key
   order check.
3. Unless ``quick``: per row, a paced run at half that row's peak rate on a
   stream of its own, publish time in the payload; the handler records its
   completion time, which stands in for the ack time.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
from nats.js.api import StorageType
from rich.console import Console
from rich.markup import escape

from actorbus.server import NatsServer
from actorbus.benchmarks import faststream_peer, report
from actorbus.benchmarks.common import (
    STREAM,
    SUBJECT,
    check_order,
    latencies_ms,
    make_envelope,
    percentile,
    read_records,
)

ROOT = Path(__file__).resolve().parent.parent
#: Messages per pipelined chunk of the pre-publish.
PUBLISH_CHUNK = 1000
#: Length of each paced latency run, in seconds.
LATENCY_SECONDS = 5.0
QUICK_MESSAGES = 3000
QUICK_POOLS = (2,)
#: Handler tasks of the second FastStream row (its concurrent pull subscriber).
FASTSTREAM_WORKERS = 8


# ====================================================================== publishing
async def _prepublish(url: str, messages: int, keys: int) -> float:
    """Create the stream and publish the envelopes; return the publish time in seconds."""
    nc = await nats.connect(url, name="bench-publisher")
    try:
        js = nc.jetstream()
        await js.add_stream(name=STREAM, subjects=[SUBJECT], storage=StorageType.FILE)
        started = time.perf_counter()
        for start in range(0, messages, PUBLISH_CHUNK):
            chunk = [make_envelope(f"k{i % keys}", i // keys)
                     for i in range(start, min(start + PUBLISH_CHUNK, messages))]
            await asyncio.gather(*(js.publish(SUBJECT, data) for data in chunk))
        elapsed = time.perf_counter() - started
        info = await js.stream_info(STREAM)
        if info.state.messages != messages:
            raise RuntimeError(f"stream {STREAM} holds {info.state.messages} messages, {messages} published")
        return elapsed
    finally:
        await nc.close()


async def _add_stream(url: str, name: str, subject: str) -> None:
    nc = await nats.connect(url, name="bench-admin")
    try:
        await nc.jetstream().add_stream(name=name, subjects=[subject], storage=StorageType.FILE)
    finally:
        await nc.close()


async def _paced_publish(url: str, subject: str, rate: float, count: int, keys: int) -> float:
    """Publish ``count`` envelopes at ``rate``/s (core NATS publish, captured by the stream),
    each with its publish time (``time.monotonic_ns()``) in the payload; return the achieved rate."""
    nc = await nats.connect(url, name="bench-pacer")
    try:
        next_seq = [0] * keys
        started = time.perf_counter()
        sent = 0
        while sent < count:
            due = min(count, int((time.perf_counter() - started) * rate) + 1)
            while sent < due:
                index = sent % keys
                await nc.publish(subject, make_envelope(f"k{index}", next_seq[index], time.monotonic_ns()))
                next_seq[index] += 1
                sent += 1
            await nc.flush()
            await asyncio.sleep(0.001)
        return count / max(time.perf_counter() - started, 1e-9)
    finally:
        await nc.close()


# ====================================================================== one consume run
class WorkerFailed(RuntimeError):
    pass


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _run_worker(params: dict[str, Any], work_dir: Path, *, pace: dict | None = None) -> dict[str, Any]:
    """Run :mod:`actorbus.benchmarks.worker` with ``params``; with ``pace``, publish paced once it is ready."""
    name = params["durable"]
    params_path = work_dir / f"{name}.params.json"
    result_path = work_dir / f"{name}.result.json"
    params_path.write_text(json.dumps(params), encoding="utf-8")
    process = subprocess.Popen([sys.executable, "-m", "actorbus.benchmarks.worker", str(params_path),
                                str(result_path)], env=_worker_env(), cwd=str(ROOT),
                               stdin=subprocess.DEVNULL)
    try:
        if pace is not None:
            ready = Path(params["ready_path"])
            deadline = time.monotonic() + 60
            while not ready.exists():
                if process.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            if ready.exists():
                asyncio.run(_paced_publish(**pace))
        process.wait(params["timeout"] + 60)
    finally:
        if process.poll() is None:
            process.terminate()  # SIGTERM: the worker's with-blocks stop what it started
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
    if not result_path.exists():
        raise WorkerFailed(f"{name}: the worker exited with code {process.returncode} and no result")
    result = json.loads(result_path.read_text(encoding="utf-8"))
    if "error" in result:
        raise WorkerFailed(f"{name}: {result['error']}\n{result.get('traceback', '')}")
    return result


# ====================================================================== the whole run
def _variants(pools: list[int]) -> list[tuple[str, str, dict[str, Any]]]:
    found = [("plain", "plain", {}), ("FastStream", "faststream", {}),
             (f"FastStream max_workers={FASTSTREAM_WORKERS}", "faststream",
              {"max_workers": FASTSTREAM_WORKERS})]
    found += [(f"actorbus pool={p}", "actorbus", {"pool": p}) for p in pools]
    return found


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")


def _throughput(label: str, kind: str, extra: dict[str, Any], url: str, messages: int,
                keys: int, cpu_us: float, timeout: float, work_dir: Path,
                console: Console) -> dict[str, Any]:
    slug = _slug(label)
    record_dir = work_dir / slug
    record_dir.mkdir()
    params = {"kind": kind, "url": url, "stream": STREAM, "subject": SUBJECT, "durable": slug,
              "count": messages, "cpu_us": cpu_us, "record_dir": str(record_dir),
              "timeout": timeout, "log_path": str(work_dir / f"{slug}.log"), **extra}
    with console.status(f"{label}: consuming {messages:,}"):
        try:
            result = _run_worker(params, work_dir)
        except WorkerFailed as exc:
            console.print(f"[red]{label} failed[/]: {exc}")
            return report.row(label, notes=f"FAILED: {str(exc).splitlines()[0]}")
    rows = read_records(record_dir)
    distinct, duplicates, violations = check_order(rows)
    rate = messages / result["elapsed"]
    notes = result["notes"]
    if distinct != messages:
        notes += f"; {messages - distinct} MISSING"
    if duplicates:
        notes += f"; {duplicates} duplicates"
    console.print(f"{label}: {rate:,.0f} msg/s ({result['elapsed']:.2f} s), peak RSS "
                  f"{result['peak_rss_mb']:.0f} MB, order violations {violations}")
    shutil.rmtree(record_dir, ignore_errors=True)
    return report.row(label, msgs_per_s=round(rate, 1), peak_rss_mb=round(result["peak_rss_mb"], 1),
                      order_violations=violations, notes=notes)


def _latency(r: dict[str, Any], number: int, kind: str, extra: dict[str, Any], url: str,
             keys: int, cpu_us: float, work_dir: Path, console: Console) -> None:
    """Fill ``p50_ms``/``p99_ms`` of row ``r`` from a paced run at half its peak rate."""
    rate = r["msgs_per_s"] / 2
    count = max(500, int(rate * LATENCY_SECONDS))
    stream, subject = f"LAT{number}", f"lat{number}.events"
    slug = f"lat-{_slug(r['variant'])}"
    record_dir = work_dir / slug
    record_dir.mkdir()
    asyncio.run(_add_stream(url, stream, subject))
    params = {"kind": kind, "url": url, "stream": stream, "subject": subject, "durable": slug,
              "count": count, "cpu_us": cpu_us, "record_dir": str(record_dir),
              "timeout": 60 + count / rate * 3, "ready_path": str(work_dir / f"{slug}.ready"),
              "log_path": str(work_dir / f"{slug}.log"), **extra}
    pace = {"url": url, "subject": subject, "rate": rate, "count": count, "keys": keys}
    with console.status(f"{r['variant']}: latency at {rate:,.0f} msg/s"):
        try:
            _run_worker(params, work_dir, pace=pace)
        except WorkerFailed as exc:
            console.print(f"[red]{r['variant']} latency run failed[/]: {exc}")
            r["notes"] += f"; latency run FAILED: {str(exc).splitlines()[0]}"
            return
    values = latencies_ms(read_records(record_dir))
    shutil.rmtree(record_dir, ignore_errors=True)
    r["p50_ms"] = round(percentile(values, 0.50), 2) if values else None
    r["p99_ms"] = round(percentile(values, 0.99), 2) if values else None
    console.print(f"{r['variant']}: latency at {rate:,.0f} msg/s over {len(values):,} msgs: "
                  f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms")


def run_bench(messages: int = 100_000, keys: int = 1000, cpu_us: float = 0.0,
              pools: list[int] | tuple[int, ...] = (2, 4, 8), json_path: str | None = None,
              quick: bool = False, console: Console | None = None) -> int:
    """Run every variant and print the table (and write ``json_path``); 0 if all ran in order."""
    console = console or Console()
    if quick:
        messages, pools = min(messages, QUICK_MESSAGES), list(QUICK_POOLS)
    if messages < 1 or keys < 1:
        raise ValueError("messages and keys must be >= 1")
    if cpu_us < 0:
        raise ValueError("cpu-us must be >= 0")
    pools = list(pools)
    if not pools or any(p < 1 for p in pools):
        raise ValueError(f"pools must be sizes >= 1, got {pools}")
    timeout = 60 + messages / 1000 * (1 + cpu_us / 100)
    work_dir = Path(tempfile.mkdtemp(prefix="actorbus-bench-"))
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    console.print(f"[bold]actorbus bench[/]: {messages:,} envelopes over {keys:,} keys, "
                  f"handler busy loop {cpu_us:g} µs, pools {pools}, {os.cpu_count()} CPUs"
                  + (" (quick: no latency runs)" if quick else ""))
    try:
        with NatsServer(store_dir=work_dir / "nats") as server:
            publish_s = asyncio.run(_prepublish(server.url, messages, keys))
            console.print(f"nats-server pid {server.pid}: published {messages:,} in {publish_s:.1f} s "
                          f"({messages / publish_s:,.0f}/s), FILE storage")
            specs: dict[str, tuple[str, dict[str, Any]]] = {}
            for label, kind, extra in _variants(pools):
                specs[label] = (kind, extra)
                if kind == "faststream" and not faststream_peer.available():
                    rows.append(report.row(label, notes=faststream_peer.MISSING_NOTE))
                    console.print(escape(f"{label}: skipped, {faststream_peer.MISSING_NOTE}"))
                    continue
                rows.append(_throughput(label, kind, extra, server.url, messages, keys, cpu_us,
                                        timeout, work_dir, console))
            report.add_ratios(rows)
            if not quick:
                for number, r in enumerate(rows):
                    if r["msgs_per_s"]:
                        kind, extra = specs[r["variant"]]
                        _latency(r, number, kind, extra, server.url, keys, cpu_us, work_dir, console)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    elapsed = time.monotonic() - started
    report.print_table(rows, f"actorbus bench: {messages:,} msgs, {keys:,} keys, cpu {cpu_us:g} µs, "
                             f"{os.cpu_count()} CPUs, {elapsed:.0f} s", console)
    console.print("msgs_per_s: consume phase only (publish done first). p50/p99: publish to handler "
                  "completion (standing in for the ack) in a paced run at half the row's peak rate.")
    if json_path:
        report.write_json(rows, json_path)
        console.print(f"JSON: {json_path}")
    bad = [r for r in rows if r["msgs_per_s"] is not None and r["order_violations"]]
    return 1 if bad else 0
