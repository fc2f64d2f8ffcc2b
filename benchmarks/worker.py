"""One variant's consume run in a fresh process: ``python -m actorbus.benchmarks.worker PARAMS.json RESULT.json``.

A fresh process per variant keeps each one's peak RSS its own and leaves
nothing behind in the orchestrator. The record directory and the busy-loop
time reach the handlers through the environment, set here before any bus
(and so any actor process) exists.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import traceback
from types import FrameType
from typing import NoReturn

from actorbus.benchmarks.common import CPU_US_ENV, RECORD_DIR_ENV

MODULES = {"plain": "actorbus.benchmarks.plain", "faststream": "actorbus.benchmarks.faststream_peer",
           "actorbus": "actorbus.benchmarks.actorbus_variant",
           "group": "actorbus.benchmarks.instances"}


def _interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    params_path, result_path = argv
    with open(params_path, encoding="utf-8") as handle:
        params = json.load(handle)
    os.environ[RECORD_DIR_ENV] = params["record_dir"]
    os.environ[CPU_US_ENV] = str(params.get("cpu_us", 0))
    signal.signal(signal.SIGTERM, _interrupt)  # so that with-blocks stop what they started
    try:
        module = importlib.import_module(MODULES[params["kind"]])
        result = module.consume(params)
    except BaseException as exc:
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    with open(result_path, "w", encoding="utf-8") as handle:
        json.dump(result, handle)
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
