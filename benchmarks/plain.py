"""The plain loop: one nats-py pull consumer, ``fetch(500)``, handle, ack; one task, no actors."""
from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import nats
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from actorbus.benchmarks.common import FETCH_BATCH, RssSampler, handle_raw

NOTES = f"nats-py pull consumer, fetch({FETCH_BATCH}) + ack per message, one task"


async def _consume(params: dict[str, Any]) -> dict[str, Any]:
    nc = await nats.connect(params["url"], name="bench-plain")
    try:
        js = nc.jetstream()
        await js.add_consumer(params["stream"], ConsumerConfig(
            durable_name=params["durable"], ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL, filter_subject=params["subject"],
            max_ack_pending=params.get("max_ack_pending", 1000)))
        sub = await js.pull_subscribe_bind(params["durable"], params["stream"])
        count = params["count"]
        deadline = time.monotonic() + params["timeout"]
        if params.get("ready_path"):
            Path(params["ready_path"]).touch()
        done = 0
        started = time.perf_counter()
        with RssSampler(lambda: (os.getpid(),)) as rss:
            while done < count:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"plain: {done} of {count} acked within {params['timeout']}s")
                try:
                    msgs = await sub.fetch(FETCH_BATCH, timeout=1.0)
                except NatsTimeout:
                    continue
                for msg in msgs:
                    handle_raw(msg.data)
                    await msg.ack()
                    done += 1
            elapsed = time.perf_counter() - started
        await sub.unsubscribe()
        return {"elapsed": elapsed, "count": done, "peak_rss_mb": rss.peak_mb, "notes": NOTES}
    finally:
        await nc.close()


def consume(params: dict[str, Any]) -> dict[str, Any]:
    return asyncio.run(_consume(params))
