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
3. Latency, per variant: one consumer process on a stream of its own, and a
   paced publisher (core NATS publish, captured by the stream) at each rate
   of ``rates`` in turn (``half``: half that variant's own peak from step 2),
   ``keys`` = 50 aggregates, publish time in the payload; the handler records
   when it starts its work. Each phase starts once the previous one has been
   handled; a short warm-up phase is not counted.
"""
from __future__ import annotations

import asyncio
import importlib.util
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
from nats.js.api import StorageType, SubjectTransform
from rich.console import Console
from rich.markup import escape

from actorbus.groups import partition_transform
from actorbus.server import NatsServer
from actorbus.benchmarks import faststream_peer, report
from actorbus.benchmarks.procfs import process_cpu_seconds
from actorbus.benchmarks.common import (
    BENCH_PARTITIONS,
    PARTITIONED_STREAM,
    PARTITIONED_SUBJECT,
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
#: Length of each paced latency phase, in seconds (``--quick``: QUICK_LATENCY_SECONDS).
LATENCY_SECONDS = 5.0
QUICK_LATENCY_SECONDS = 1.0
#: Aggregates the paced publisher spreads its envelopes over.
LATENCY_KEYS = 50
#: The rate that stands for half of a variant's own peak throughput.
HALF = "half"
DEFAULT_RATES = ("200", "2000", HALF)
#: Fewest messages in a latency phase (a p99 needs a hundred at least).
MIN_PHASE_MESSAGES = 200
#: A first phase that is not counted: connections, imports and first calls warm up.
WARMUP_RATE = 200.0
WARMUP_MESSAGES = 100
QUICK_MESSAGES = 3000
QUICK_POOLS = (2,)
#: The variant kinds, for ``kinds``.
KINDS = ("plain", "faststream", "actorbus")
#: Handler tasks of the second FastStream row (its concurrent pull subscriber).
FASTSTREAM_WORKERS = 8
#: What labels the rows that run with OpenTelemetry installed and sampling off.
TRACED = "tracing="
UNSAMPLED = " (sampling off)"


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


async def _prepublish_partitioned(url: str, messages: int, keys: int) -> float:
    """The same envelopes on the partitioned stream, each key the subject's last token."""
    nc = await nats.connect(url, name="bench-publisher")
    try:
        js = nc.jetstream()
        transform = SubjectTransform(src=PARTITIONED_SUBJECT,
                                     dest=partition_transform(PARTITIONED_SUBJECT, BENCH_PARTITIONS))
        await js.add_stream(name=PARTITIONED_STREAM, subjects=[PARTITIONED_SUBJECT],
                            storage=StorageType.FILE, subject_transform=transform)
        prefix = PARTITIONED_SUBJECT[:-1]
        started = time.perf_counter()
        for start in range(0, messages, PUBLISH_CHUNK):
            indices = range(start, min(start + PUBLISH_CHUNK, messages))
            await asyncio.gather(*(js.publish(f"{prefix}k{i % keys}", make_envelope(f"k{i % keys}", i // keys))
                                   for i in indices))
        return time.perf_counter() - started
    finally:
        await nc.close()


async def _add_stream(url: str, name: str, subject: str) -> None:
    nc = await nats.connect(url, name="bench-admin")
    try:
        await nc.jetstream().add_stream(name=name, subjects=[subject], storage=StorageType.FILE)
    finally:
        await nc.close()


async def _paced_phase(nc: Any, subject: str, rate: float, count: int, keys: int,
                      next_seq: list[int]) -> tuple[int, int]:
    """Publish ``count`` envelopes at ``rate``/s over ``keys`` aggregates, each with its
    publish time (``time.monotonic_ns()``, system-wide) in the payload; return the first and
    last publish times."""
    first_ns = time.monotonic_ns()
    started = time.perf_counter()
    sent = 0
    while sent < count:
        due = min(count, int((time.perf_counter() - started) * rate) + 1)
        while sent < due:
            index = next_seq[-1] % keys   # the last slot counts messages: keys round-robin
            await nc.publish(subject, make_envelope(f"k{index}", next_seq[index], time.monotonic_ns()))
            next_seq[index] += 1
            next_seq[-1] += 1
            sent += 1
        await nc.flush()
        await asyncio.sleep(0.001)
    return first_ns, time.monotonic_ns()


def _records_written(record_dir: Path) -> int:
    """Lines the handlers have written to ``record_dir`` so far."""
    total = 0
    for path in record_dir.glob("records-*.txt"):
        with open(path, "rb") as handle:
            total += handle.read().count(b"\n")
    return total


async def _paced_publish(url: str, subject: str, keys: int, phases: list[dict[str, Any]],
                         record_dir: Path, timeout: float) -> None:
    """Run each phase (``rate``, ``count``) in turn: publish paced (core NATS publish, captured
    by the stream), then wait until the handlers have recorded all of it, so that no phase's
    backlog spills into the next. Fills in each phase's ``first_ns``, ``last_ns``, ``achieved``."""
    nc = await nats.connect(url, name="bench-pacer")
    try:
        next_seq = [0] * (keys + 1)
        expected = 0
        for phase in phases:
            started = time.perf_counter()
            phase["first_ns"], phase["last_ns"] = await _paced_phase(
                nc, subject, phase["rate"], phase["count"], keys, next_seq)
            phase["achieved"] = phase["count"] / max(time.perf_counter() - started, 1e-9)
            expected += phase["count"]
            deadline = time.monotonic() + timeout
            while _records_written(record_dir) < expected and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
    finally:
        await nc.close()


# ====================================================================== one consume run
class WorkerFailed(RuntimeError):
    pass


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _run_worker(params: dict[str, Any], work_dir: Path, *, pace: dict[str, Any] | None = None) -> dict[str, Any]:
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
    result: dict[str, Any] = json.loads(result_path.read_text(encoding="utf-8"))
    if "error" in result:
        raise WorkerFailed(f"{name}: {result['error']}\n{result.get('traceback', '')}")
    return result


# ====================================================================== the whole run
def _variants(pools: list[int], bridges: list[int]) -> list[tuple[str, str, dict[str, Any]]]:
    found: list[tuple[str, str, dict[str, Any]]] = [
        ("plain", "plain", {}), ("FastStream", "faststream", {}),
             (f"FastStream max_workers={FASTSTREAM_WORKERS}", "faststream",
              {"max_workers": FASTSTREAM_WORKERS})]
    found += [(f"actorbus pool={p}", "actorbus", {"pool": p}) for p in pools]
    if tracing_sdk_available():
        # What tracing costs when it is installed but samples nothing: its price for everyone
        # (these messages carry no trace context: "continue" makes no span for them).
        found += [(f"actorbus pool={min(pools)} {TRACED}{mode}{UNSAMPLED}", "actorbus",
                   {"pool": min(pools), "tracing": mode}) for mode in ("continue", "always")]
    # The largest pool: several Bridges are for a pool that one Bridge cannot keep busy.
    found += [(f"actorbus pool={max(pools)} bridges={k}", "actorbus",
               {"pool": max(pools), "bridges": k, "partitions": BENCH_PARTITIONS}) for k in bridges]
    return found


def tracing_sdk_available() -> bool:
    """Whether OpenTelemetry's SDK is installed (the ``bench`` extra has it)."""
    return importlib.util.find_spec("opentelemetry.sdk") is not None


def _note_tracing_overhead(rows: list[dict[str, Any]]) -> None:
    """Say, on the traced row, what share of its untraced twin's throughput it reached."""
    for row in rows:
        if TRACED in row["variant"] and row["msgs_per_s"]:
            twin = row["variant"].split(TRACED)[0].rstrip()
            base = next((r["msgs_per_s"] for r in rows if r["variant"] == twin), None)
            if base:
                row["notes"] = (f"OpenTelemetry SDK installed, sampler ALWAYS_OFF: "
                                f"{row['msgs_per_s'] / base:.3f}× the {twin} row; ") + row["notes"]


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")


def _throughput(label: str, kind: str, extra: dict[str, Any], url: str, messages: int,
                keys: int, cpu_us: float, timeout: float, work_dir: Path,
                console: Console, server_pid: int | None = None) -> dict[str, Any]:
    slug = _slug(label)
    record_dir = work_dir / slug
    record_dir.mkdir()
    stream, subject = (PARTITIONED_STREAM, PARTITIONED_SUBJECT) if extra.get("bridges") else \
        (STREAM, SUBJECT)
    params = {"kind": kind, "url": url, "stream": stream, "subject": subject, "durable": slug,
              "count": messages, "cpu_us": cpu_us, "record_dir": str(record_dir),
              "timeout": timeout, "log_path": str(work_dir / f"{slug}.log"), **extra}
    server_cpu = process_cpu_seconds(server_pid) if server_pid else 0.0
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
    if server_pid:
        # From the worker's start to its end: start-up and the consume phase, not only the latter.
        server_cpu = process_cpu_seconds(server_pid) - server_cpu
        notes += f"; nats-server CPU {server_cpu:.2f} s ({server_cpu / messages * 1e6:.1f} µs per message)"
    if distinct != messages:
        notes += f"; {messages - distinct} MISSING"
    if duplicates:
        notes += f"; {duplicates} duplicates"
    console.print(f"{label}: {rate:,.0f} msg/s ({result['elapsed']:.2f} s), peak RSS "
                  f"{result['peak_rss_mb']:.0f} MB, order violations {violations}")
    shutil.rmtree(record_dir, ignore_errors=True)
    return report.row(label, msgs_per_s=round(rate, 1), peak_rss_mb=round(result["peak_rss_mb"], 1),
                      order_violations=violations, notes=notes)


def parse_rates(text: str) -> list[str]:
    """``"200,2000,half"`` → ``["200", "2000", "half"]``; raise ValueError on anything else."""
    rates = [part.strip().lower() for part in text.split(",") if part.strip()]
    for rate in rates:
        if rate != HALF and not (rate.replace(".", "", 1).isdigit() and float(rate) > 0):
            raise ValueError(f"a rate is a positive number of msg/s or {HALF!r}, got {rate!r}")
    return rates


def _latency(label: str, number: int, kind: str, extra: dict[str, Any], peak: float | None,
             rates: list[str], url: str, keys: int, cpu_us: float, seconds: float, work_dir: Path,
             console: Console) -> list[dict[str, Any]]:
    """One latency row per rate of ``rates`` for a variant: one consumer process, a paced phase
    per rate on a stream of its own (after a short warm-up that is not counted)."""
    rows: list[dict[str, Any]] = []
    phases: list[dict[str, Any]] = [{"spec": "warm-up", "rate": WARMUP_RATE,
                                     "count": WARMUP_MESSAGES}]
    for spec in rates:
        rate = peak / 2 if spec == HALF and peak else (None if spec == HALF else float(spec))
        if rate is None:
            rows.append(report.latency_row(label, spec, notes="no peak rate measured"))
        else:
            phases.append({"spec": spec, "rate": rate, "count": max(MIN_PHASE_MESSAGES,
                                                                   int(rate * seconds))})
    if len(phases) == 1:
        return rows
    stream, subject = f"LAT{number}", f"lat{number}.events"
    slug = f"lat-{_slug(label)}"
    record_dir = work_dir / slug
    record_dir.mkdir()
    asyncio.run(_add_stream(url, stream, subject))
    total = sum(phase["count"] for phase in phases)
    drain = 30.0 + total / 1000
    params = {"kind": kind, "url": url, "stream": stream, "subject": subject, "durable": slug,
              "count": total, "cpu_us": cpu_us, "record_dir": str(record_dir),
              "timeout": 60 + sum(phase["count"] / phase["rate"] for phase in phases) + drain,
              "ready_path": str(work_dir / f"{slug}.ready"),
              "log_path": str(work_dir / f"{slug}.log"), **extra}
    pace = {"url": url, "subject": subject, "keys": keys, "phases": phases,
            "record_dir": record_dir, "timeout": drain}
    with console.status(f"{label}: latency at " + ", ".join(
            f"{phase['rate']:,.0f}" for phase in phases[1:]) + " msg/s"):
        try:
            result = _run_worker(params, work_dir, pace=pace)
        except WorkerFailed as exc:
            console.print(f"[red]{label} latency run failed[/]: {exc}")
            shutil.rmtree(record_dir, ignore_errors=True)
            return rows + [report.latency_row(label, phase["spec"], rate=round(phase["rate"]),
                                              notes=f"FAILED: {str(exc).splitlines()[0]}")
                           for phase in phases[1:]]
    records = read_records(record_dir)
    shutil.rmtree(record_dir, ignore_errors=True)
    _distinct, duplicates, violations = check_order(records)
    cpu = result.get("cpu_seconds")
    if cpu:
        console.print(f"{label}: CPU s by process over its latency run: " +
                      ", ".join(f"{name} {seconds:g}" for name, seconds in cpu.items()))
    for phase in phases[1:]:
        if "first_ns" not in phase:
            continue
        low, high = phase["first_ns"], phase["last_ns"]
        values = latencies_ms(r for r in records if r[3] is not None and low <= r[3] <= high)
        notes = "" if len(values) == phase["count"] else \
            f"{len(values)} of {phase['count']} recorded"
        if peak and phase["rate"] > peak:
            notes += ("; " if notes else "") + f"above this variant's peak ({peak:,.0f} msg/s)"
        if duplicates:
            notes += ("; " if notes else "") + f"{duplicates} duplicates in the run"

        def at(q: float, values: list[float] = values) -> float | None:
            value = percentile(values, q)
            return None if value is None else round(value, 2)

        row = report.latency_row(label, phase["spec"], rate=round(phase["rate"]),
                                 achieved_rate=round(phase["achieved"]), messages=len(values),
                                 p50_ms=at(0.50), p90_ms=at(0.90), p99_ms=at(0.99),
                                 max_ms=at(1.0), order_violations=violations, notes=notes)
        rows.append(row)
        console.print(f"{label}: latency at {phase['rate']:,.0f} msg/s ({phase['spec']}) over "
                      f"{len(values):,} msgs: p50 {row['p50_ms']} ms, p90 {row['p90_ms']} ms, "
                      f"p99 {row['p99_ms']} ms")
    order = {spec: i for i, spec in enumerate(rates)}
    rows.sort(key=lambda r: order.get(r["rate_spec"], len(order)))
    return rows


def _check_arguments(messages: int, keys: int, latency_keys: int, cpu_us: float,
                     latency_seconds: float, pools: list[int], bridges: list[int],
                     kinds: list[str] | tuple[str, ...] | None) -> None:
    if messages < 1 or keys < 1 or latency_keys < 1:
        raise ValueError("messages, keys and latency keys must be >= 1")
    if cpu_us < 0:
        raise ValueError("cpu-us must be >= 0")
    if latency_seconds <= 0:
        raise ValueError("latency seconds must be > 0")
    if not pools or any(p < 1 for p in pools):
        raise ValueError(f"pools must be sizes >= 1, got {pools}")
    if any(k < 1 or k > BENCH_PARTITIONS for k in bridges):
        raise ValueError(f"bridges must be counts from 1 to {BENCH_PARTITIONS}, got {bridges}")
    unknown = set(kinds or ()) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown variant kind(s) {sorted(unknown)}; known: {', '.join(KINDS)}")


def run_bench(messages: int = 100_000, keys: int = 1000, cpu_us: float = 0.0,
              pools: list[int] | tuple[int, ...] = (2, 4, 8), json_path: str | None = None,
              quick: bool = False, console: Console | None = None,
              rates: list[str] | tuple[str, ...] = DEFAULT_RATES,
              latency_seconds: float | None = None, latency_keys: int = LATENCY_KEYS,
              kinds: list[str] | tuple[str, ...] | None = None,
              bridges: list[int] | tuple[int, ...] = ()) -> int:
    """Run every variant (of ``kinds``: plain, faststream, actorbus; all when None), print the
    throughput table, then the latency table at each of ``rates`` (and write ``json_path``);
    0 if all ran in order. Each of ``bridges`` adds an actorbus row (the largest pool) on
    a stream partitioned :data:`BENCH_PARTITIONS` ways, read by that many Bridges; those
    rows have no latency phases."""
    console = console or Console()
    if quick:
        messages, pools = min(messages, QUICK_MESSAGES), list(QUICK_POOLS)
    if latency_seconds is None:
        latency_seconds = QUICK_LATENCY_SECONDS if quick else LATENCY_SECONDS
    rates = parse_rates(",".join(rates))
    pools, bridges = list(pools), list(bridges)
    _check_arguments(messages, keys, latency_keys, cpu_us, latency_seconds, pools, bridges, kinds)
    timeout = 60 + messages / 1000 * (1 + cpu_us / 100)
    work_dir = Path(tempfile.mkdtemp(prefix="actorbus-bench-"))
    rows: list[dict[str, Any]] = []
    latency_rows: list[dict[str, Any]] = []
    started = time.monotonic()
    console.print(f"[bold]actorbus bench[/]: {messages:,} envelopes over {keys:,} keys, "
                  f"handler busy loop {cpu_us:g} µs, pools {pools}, {os.cpu_count()} CPUs; latency "
                  f"at {', '.join(rates) or 'no rate'} msg/s, {latency_seconds:g} s each, "
                  f"{latency_keys} keys")
    try:
        with NatsServer(store_dir=work_dir / "nats") as server:
            publish_s = asyncio.run(_prepublish(server.url, messages, keys))
            console.print(f"nats-server pid {server.pid}: published {messages:,} in {publish_s:.1f} s "
                          f"({messages / publish_s:,.0f}/s), FILE storage")
            if bridges and (not kinds or "actorbus" in kinds):
                publish_s = asyncio.run(_prepublish_partitioned(server.url, messages, keys))
                console.print(f"published {messages:,} again on {PARTITIONED_STREAM} "
                              f"({BENCH_PARTITIONS} partitions) in {publish_s:.1f} s")
            specs: dict[str, tuple[str, dict[str, Any]]] = {}
            for label, kind, extra in _variants(pools, bridges):
                if kinds and kind not in kinds:
                    continue
                specs[label] = (kind, extra)
                if kind == "faststream" and not faststream_peer.available():
                    rows.append(report.row(label, notes=faststream_peer.MISSING_NOTE))
                    console.print(escape(f"{label}: skipped, {faststream_peer.MISSING_NOTE}"))
                    continue
                rows.append(_throughput(label, kind, extra, server.url, messages, keys, cpu_us,
                                        timeout, work_dir, console, server.pid))
            report.add_ratios(rows)
            _note_tracing_overhead(rows)
            if rates:
                for number, r in enumerate(rows):
                    extra = specs[r["variant"]][1]
                    if r["msgs_per_s"] and not extra.get("bridges") and not extra.get("tracing"):
                        kind, extra = specs[r["variant"]]
                        latency_rows += _latency(r["variant"], number, kind, extra,
                                                 r["msgs_per_s"], rates, server.url, latency_keys,
                                                 cpu_us, latency_seconds, work_dir, console)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    elapsed = time.monotonic() - started
    report.print_table(rows, f"actorbus bench: {messages:,} msgs, {keys:,} keys, cpu {cpu_us:g} µs, "
                             f"{os.cpu_count()} CPUs, {elapsed:.0f} s", console)
    console.print("msgs_per_s: consume phase only (publish done first).")
    if latency_rows:
        report.print_latency_table(
            latency_rows, f"latency, publish → handler: paced publish, {latency_keys} keys, "
                          f"{latency_seconds:g} s per rate", console)
        console.print(f"{HALF}: half of the variant's own peak msgs_per_s above. Each variant's "
                      "rates in one consumer process, one after another, each once the previous "
                      "one is handled; publish time taken just before the publish, handler time "
                      "when the handler starts its work.")
    if json_path:
        report.write_json(rows + latency_rows, json_path)
        console.print(f"JSON: {json_path}")
    bad = [r for r in rows + latency_rows if r["order_violations"]]
    return 1 if bad else 0
