"""The actorbus variant: an EventBus on the processes runtime, pool of ``pool`` aggregate actors."""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from actorbus.config import DEFAULT_BATCH_SIZE, DEFAULT_WINDOW
from actorbus.message import Message
from actorbus.benchmarks.procfs import process_cpu_seconds
from actorbus.benchmarks.common import RECORD_DIR_ENV, RECORDER, RssSampler

#: How often completion is polled through ``bus.stats()``, in seconds.
POLL_INTERVAL = 0.05


def handle(msg: Message) -> None:
    """Runs in the aggregate actor processes, on the envelope the member decoded and validated."""
    RECORDER.handle(msg.aggregate_id, msg.data)


def _log_config(path: Path) -> dict[str, Any]:
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"}},
        "handlers": {"file": {"class": "logging.FileHandler", "filename": str(path),
                              "formatter": "plain", "level": "WARNING"}},
        "root": {"level": "WARNING", "handlers": ["file"]},
    }


def _trace_nothing() -> None:
    """OpenTelemetry's SDK as the tracer provider, sampling nothing: set before the bus
    forks its actor processes, which inherit it."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
    trace.set_tracer_provider(TracerProvider(sampler=ALWAYS_OFF))


def consume(params: dict[str, Any]) -> dict[str, Any]:
    from actorbus.bus import EventBus

    # The handlers find their record directory through the environment: it must
    # be set before the EventBus forks the actor processes.
    if os.environ.get(RECORD_DIR_ENV) != params["record_dir"]:
        raise RuntimeError(f"{RECORD_DIR_ENV} must be set before the bus is built")
    count = params["count"]
    tracing = params.get("tracing")
    if tracing:
        _trace_nothing()
    log_path = Path(params.get("log_path") or tempfile.mktemp(prefix="actorbus-bench-", suffix=".log"))
    with EventBus(servers=params["url"], pool_size=params["pool"], runtime="processes",
                  log_config=_log_config(log_path), partitions=params.get("partitions"),
                  bridges=params.get("bridges")) as bus:
        def pids() -> list[int]:
            return [os.getpid(), *bus.pids.values()]

        with RssSampler(pids) as rss:
            started = time.perf_counter()
            options = {**params.get("subscribe", {}), **({"tracing": tracing} if tracing else {})}
            # ``handler``: another handler by name (``actorbus bench --snapshots``'s aggregates).
            bus.subscribe(params["subject"], params.get("handler") or handle, envelope=True,
                          durable=params["durable"], stream=params["stream"], storage="file",
                          **options)
            if params.get("ready_path"):
                Path(params["ready_path"]).touch()
            deadline = time.monotonic() + params["timeout"]
            while True:
                stats = bus.stats()
                if stats["acked"] >= count:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"actorbus pool={params['pool']}: {stats['acked']} of {count} "
                                       f"acked within {params['timeout']}s")
                time.sleep(POLL_INTERVAL)
            elapsed = time.perf_counter() - started
        final = bus.stats()
        cpu = {name: round(process_cpu_seconds(pid), 2) for name, pid in bus.pids.items()}
    notes = (f"processes runtime, default settings (window {DEFAULT_WINDOW}, batch_size "
             f"{DEFAULT_BATCH_SIZE}), completion by stats()['acked'] polled every "
             f"{POLL_INTERVAL * 1000:.0f} ms")
    if final.get("naked") or final.get("redelivered") or final.get("restarts"):
        notes += (f"; naked {final.get('naked')}, redelivered {final.get('redelivered')}, "
                  f"restarts {final.get('restarts')}")
    notes += "; CPU s by process: " + ", ".join(f"{name} {seconds:g}" for name, seconds in cpu.items())
    notes += "; CPU µs per message: " + ", ".join(
        f"{name} {seconds / max(count, 1) * 1e6:.1f}" for name, seconds in cpu.items()
        if name.startswith("bridge") or name.startswith("member"))
    return {"elapsed": elapsed, "count": final["acked"], "peak_rss_mb": rss.peak_mb, "notes": notes,
            "cpu_seconds": cpu}
