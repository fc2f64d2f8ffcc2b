"""A traced bus in a process of its own, as its user sets tracing up:
``python -m tests.tracing_host URL SPANS_FILE RUNTIME``.

It sets up OpenTelemetry's SDK (every span sampled) before the bus starts, so
the actor processes forked from it inherit the tracer provider. With the
``processes`` runtime each process appends its finished spans to SPANS_FILE as
JSON lines; with ``simple`` (one process) they are kept by an in-memory
exporter and written there at the end. It then publishes, with a raw nats-py
client as a foreign publisher would, messages whose ``traceparent`` says
their publisher's span (see :data:`TRACE_IDS`: an ``ok``, a ``retry`` that fails
its first attempt, ``behind`` of the same key, a ``nak`` that fails its first
delivery, and an invalid one), before it subscribes, so they come in one fetch;
then one through ``publish_envelope`` inside a span of its own. It waits until
all are settled, stops the bus, and writes its processes' pids to
``SPANS_FILE.pids``.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import Sequence

import nats
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (SimpleSpanProcessor, SpanExporter,
                                            SpanExportResult)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON

from actorbus import Envelope, EventBus

#: The foreign publisher's messages, by name: (trace id, aggregate id). One trace each;
#: ``behind`` shares its key with ``nak``, published right after it: it waits in the
#: Bridge, held for its key's order, until ``nak`` comes back and succeeds.
TRACE_IDS = {"ok": "4bf92f3577b34da6a3ce929d0e0e4736", "retry": "5bf92f3577b34da6a3ce929d0e0e4737",
             "nak": "8bf92f3577b34da6a3ce929d0e0e473a", "behind": "7bf92f3577b34da6a3ce929d0e0e4739",
             "invalid": "6bf92f3577b34da6a3ce929d0e0e4738"}
KEYS = {"behind": "nak"}
#: The stream the host creates, before the bus subscribes: all of it comes in one fetch.
STREAM = "TRACED"
PUBLISHER_SPAN_ID = "00f067aa0ba902b7"


def span_record(span: ReadableSpan) -> dict[str, object]:
    """What the test reads of a span."""
    context = span.get_span_context()
    return {"name": span.name, "kind": span.kind.name, "trace_id": f"{context.trace_id:032x}",
            "span_id": f"{context.span_id:016x}",
            "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
            "attributes": dict(span.attributes or {}), "status": span.status.status_code.name,
            "events": [event.name for event in span.events], "pid": os.getpid(),
            "start": span.start_time, "end": span.end_time}


class JsonLinesExporter(SpanExporter):
    """Appends each span to a file, from whichever process ended it."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock, open(self._path, "a") as out:
            for span in spans:
                out.write(json.dumps(span_record(span)) + "\n")
        return SpanExportResult.SUCCESS


async def publish_raw(url: str) -> None:
    """Publish as a foreign publisher: W3C headers written by hand."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name=STREAM, subjects=["traced.*"])
    for name, trace_id in TRACE_IDS.items():
        key = KEYS.get(name, name)
        body = b"not an envelope" if name == "invalid" else \
            Envelope.create(key, "Happened", name.encode()).encode()
        await js.publish(f"traced.{name}", body, headers={
            "traceparent": f"00-{trace_id}-{PUBLISHER_SPAN_ID}-01", "Nats-Msg-Id": f"msg-{name}",
            "X-Aggregate-ID": key})
    await nc.close()


def main(url: str, spans_file: str, runtime: str) -> None:
    provider = TracerProvider(sampler=ALWAYS_ON)
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(
        memory if runtime == "simple" else JsonLinesExporter(spans_file)))
    trace.set_tracer_provider(provider)
    bus = EventBus(servers=url, pool_size=2, runtime=runtime)
    try:
        asyncio.run(publish_raw(url))
        bus.subscribe("traced.*", "tests.handlers:traced", durable="traced", stream=STREAM,
                      retries=1, retry_backoff=0.01, nak_delay=0.2)
        with trace.get_tracer("tests.tracing_host").start_as_current_span("publish via the bus"):
            bus.publish_envelope("traced.bus", Envelope.create("bus", "Happened", b"bus"))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            stats = bus.stats()
            if stats.get("acked", 0) >= 5 and stats.get("dead_lettered", 0) >= 1:
                break
            time.sleep(0.05)
        else:
            sys.exit(f"not settled in time: {bus.stats()}")
        pids = dict(bus.pids)
    finally:
        bus.stop()
    provider.force_flush()
    if runtime == "simple":
        with open(spans_file, "a") as out:
            for span in memory.get_finished_spans():
                out.write(json.dumps(span_record(span)) + "\n")
    with open(spans_file + ".pids", "w") as out:
        json.dump(pids, out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
