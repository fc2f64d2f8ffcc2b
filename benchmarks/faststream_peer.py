"""The FastStream peer: a NATS pull subscriber (``PullSub(batch_size=500)``), ack after the handler."""
from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

from actorbus.benchmarks.common import FETCH_BATCH, RssSampler, handle_raw

NOTES = (f"FastStream PullSub(batch_size={FETCH_BATCH}), AckPolicy.ACK (after handler), "
         "logger=None (no per-message logging)")
MISSING_NOTE = "faststream not installed (pip install 'actorbus[bench]')"


def available() -> bool:
    try:
        import faststream.nats  # noqa: F401
    except ImportError:
        return False
    return True


async def _consume(params: dict[str, Any]) -> dict[str, Any]:
    from faststream import AckPolicy
    from faststream.nats import JStream, NatsBroker, PullSub
    from faststream.nats.annotations import NatsMessage

    count = params["count"]
    workers = params.get("max_workers", 1)
    # FastStream's concurrent pull subscriber: handlers run as up to this many tasks.
    concurrency = {"max_workers": workers} if workers > 1 else {}
    done = 0
    finished = asyncio.Event()
    broker = NatsBroker(params["url"], logger=None, log_level=logging.CRITICAL)

    subscriber = broker.subscriber(
        params["subject"], stream=JStream(params["stream"], declare=False), durable=params["durable"],
        pull_sub=PullSub(batch_size=FETCH_BATCH, timeout=1.0), ack_policy=AckPolicy.ACK, **concurrency)

    async def handle(body: bytes, msg: NatsMessage) -> None:
        nonlocal done
        handle_raw(msg.raw_message.data)
        done += 1
        if done >= count:
            finished.set()

    # Registered by calling the subscriber, as its decorator would: without faststream
    # installed (lint runs without the bench extra) mypy sees it as an untyped decorator.
    subscriber(handle)

    started = 0.0
    async with broker:
        started = time.perf_counter()
        with RssSampler(lambda: (os.getpid(),)) as rss:
            await broker.start()
            if params.get("ready_path"):
                Path(params["ready_path"]).touch()
            try:
                await asyncio.wait_for(finished.wait(), params["timeout"])
            except TimeoutError:
                raise TimeoutError(f"faststream: {done} of {count} handled within {params['timeout']}s") from None
            elapsed = time.perf_counter() - started
            # The last ack follows the handler's return: let it go out before closing.
            await asyncio.sleep(0.05)
    notes = NOTES + (f", max_workers={workers}" if workers > 1 else "")
    return {"elapsed": elapsed, "count": done, "peak_rss_mb": rss.peak_mb, "notes": notes}


def consume(params: dict[str, Any]) -> dict[str, Any]:
    return asyncio.run(_consume(params))
