"""One bus of the soak in a process of its own: ``python -m actorbus.benchmarks.soak_host PARAMS.json``.

It subscribes the soak's stream with :func:`handle` (alone, or as a member of
the elastic consumer group when the parameters name one), and every
``STATUS_INTERVAL`` seconds writes its status file: the bus's counters, each
actor's state and process id, and every process of its actor system, which
the orchestrator reads to pick what to kill and to stop everything by pid.
SIGTERM drains and stops the bus.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from actorbus.benchmarks.soak_ledger import KEYS_ENV, LEDGER, LEDGER_ENV
from actorbus.message import Message

#: What the soak publishes to and consumes from.
STREAM, SUBJECT, DURABLE, GROUP = "SOAK", "soak.*", "soak", "soak"
#: Seconds between status files.
STATUS_INTERVAL = 0.25
#: Seconds between looks for the actor system's processes (they change only on restarts,
#: which the actors' own pids in every status file already show).
RUNTIME_PIDS_INTERVAL = 2.0
#: The counters each status file carries.
STATS = ("received", "processed", "in_flight", "acked", "naked", "redelivered", "restarts", "restarts_bridge",
         "restarts_router", "restarts_pool", "recovered", "recoveries", "duplicates_skipped",
         "held", "undelivered", "dead_lettered", "settle_errors", "partitions_owned",
         "group_members", "rebalances")
#: A group member's settings: a dead member's partitions move within seconds (as in
#: examples/scale_out.py).
GROUP_HEARTBEAT = 0.5
GROUP_OPTIONS = {"ack_wait": 5.0, "pin_timeout": 2.0, "pull_expires": 0.5}
#: The soak tests recovery, not the restart budget: faults come faster than a production
#: policy would allow (one per member per minute at the default intervals, far more in
#: the test), and a bus halted past its budget would end the run.
MAX_RESTARTS = 1000


#: Milliseconds each handling takes (a sleep, as I/O would), for the handlers.
WORK_MS_ENV = "ACTORBUS_SOAK_WORK_MS"
_work_s: list[float] = []


def handle(msg: Message) -> None:
    """Runs in the pool members: the work, then one handling of envelope ``int(msg.data)``
    (recorded last, as a handler's effect comes at its end)."""
    if not _work_s:
        _work_s.append(float(os.environ.get(WORK_MS_ENV, "0") or 0) / 1000)
    if _work_s[0]:
        time.sleep(_work_s[0])
    LEDGER.record(int(msg.data))


def log_config(path: str) -> dict[str, Any]:
    """The actors' log: actorbus INFO and up, everything WARNING and up, to ``path``."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(asctime)s %(process)d %(name)s %(levelname)s "
                                           "%(message)s"}},
        "handlers": {"file": {"class": "logging.FileHandler", "filename": path,
                              "formatter": "plain", "level": "INFO"}},
        "loggers": {"actorbus": {"handlers": ["file"], "level": "INFO", "propagate": False}},
        "root": {"level": "WARNING", "handlers": ["file"]},
    }


def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)   # whole or not at all, for the orchestrator that polls it


def main(params_path: str) -> int:
    """Run the bus the parameters describe until SIGTERM; 1 if it stopped processing."""
    from actorbus.bus import BusError, EventBus
    from actorbus.supervision import OneForOne

    params = json.loads(Path(params_path).read_text())
    # Before the bus forks its actors: the handlers find the ledger through these.
    os.environ[LEDGER_ENV] = params["ledger"]
    os.environ[KEYS_ENV] = str(params["keys"])
    os.environ[WORK_MS_ENV] = str(params.get("work_ms", 0))
    status_path = Path(params["status"])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    group: dict[str, Any] = {}
    options: dict[str, Any] = {}
    if params.get("member"):
        group = {"group": GROUP, "partitions": params["partitions"], "member": params["member"],
                 "heartbeat": GROUP_HEARTBEAT}
        options = dict(GROUP_OPTIONS)
    bus = EventBus(servers=params["url"], pool_size=params["pool"],
                   supervision=OneForOne(max_restarts=MAX_RESTARTS, within=60.0),
                   log_config=log_config(params["log"]), **group)
    code = 0
    try:
        bus.subscribe(SUBJECT, handle, durable=DURABLE, stream=STREAM, storage="file", **options)
        runtime_pids: list[int] = []
        looked = 0.0
        while True:
            try:
                stats = bus.stats()
                failure = None
            except BusError as exc:
                stats, failure = {}, str(exc)
            if time.monotonic() - looked > RUNTIME_PIDS_INTERVAL:
                runtime_pids, looked = bus.runtime.pids(), time.monotonic()
            _write_json(status_path, {
                "host": os.getpid(), "member": params.get("member"), "at": time.monotonic(),
                "pids": bus.pids, "runtime": runtime_pids, "actors": stats.get("actors", {}),
                "stats": {key: stats.get(key, 0) for key in STATS}, "failure": failure})
            if failure is not None:
                code = 1
                break
            if stop.wait(STATUS_INTERVAL):
                break
    finally:
        bus.stop(timeout=params.get("drain_timeout", 10.0))
    return code


if __name__ == "__main__":
    # Through the package, so that the handler is actorbus.benchmarks.soak_host.handle in
    # the actors, not __main__.handle.
    from actorbus.benchmarks.soak_host import main as _main
    sys.exit(_main(*sys.argv[1:]))
