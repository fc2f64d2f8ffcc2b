"""OpenTelemetry traces: the publisher's context continues through the handler, in another
process, to the ack (``actorbus.tracing``)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

from actorbus import ConfigurationError, Envelope, EventBus
from actorbus.actors.messages import (FAILED, INVALID, SUCCEEDED, Completion, Delivery)
from actorbus.actors.processing import HandlerTable
from actorbus.config import SubscriptionConfig
from actorbus.tracing import NoProcessSpans, OtelProcessSpans, inject_trace_context
from tests.support import stream_messages
from tests.tracing_host import PUBLISHER_SPAN_ID, TRACE_IDS

ROOT = Path(__file__).resolve().parent.parent
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"


#: The span current in each call of :func:`remember_current_span` (same process).
SEEN_BY_HANDLER: list = []


def remember_current_span(msg) -> None:
    """A handler that notes which span is current while it runs."""
    SEEN_BY_HANDLER.append(trace.get_current_span().get_span_context())


def _table(exporter: InMemorySpanExporter, sampler=ALWAYS_ON, handler="tests.handlers:traced",
           **options) -> HandlerTable:
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return HandlerTable([SubscriptionConfig("orders.*", handler, durable="orders", **options)],
                        sleep=lambda _: None, spans=OtelProcessSpans(provider))


def _delivery(data: bytes, headers=None, token: int = 1) -> Delivery:
    return Delivery(token, "orders", "orders.a", data, headers, "a", "a", None, 1, 42)


def _envelope(payload: bytes = b"ok", **fields) -> bytes:
    return Envelope.create("a", "Happened", payload, **fields).encode()


def _process_span(exporter: InMemorySpanExporter):
    [span] = [s for s in exporter.get_finished_spans() if s.name.startswith("process ")]
    return span


def test_the_handler_runs_in_a_consumer_span_whose_parent_is_the_publishers_traceparent():
    exporter = InMemorySpanExporter()
    table = _table(exporter, handler="tests.test_tracing:remember_current_span")
    SEEN_BY_HANDLER.clear()
    outcome = table.process_one(_delivery(_envelope(), {"traceparent": PARENT,
                                                        "Nats-Msg-Id": "event-1"}))
    assert outcome.kind == SUCCEEDED
    span = _process_span(exporter)
    context = span.get_span_context()
    assert f"{context.trace_id:032x}" == TRACE_ID
    assert f"{span.parent.span_id:016x}" == "b7ad6b7169203331" and span.parent.is_remote
    assert span.kind is trace.SpanKind.CONSUMER and span.name == "process orders.*"
    attributes = dict(span.attributes)
    assert attributes["messaging.system"] == "nats"
    assert attributes["messaging.destination.name"] == "orders.a"
    assert attributes["messaging.consumer.group.name"] == "orders"
    assert attributes["messaging.message.id"] == "event-1"
    assert attributes["actorbus.delivery_count"] == 1
    assert attributes["actorbus.aggregate_id"] == "a"
    assert attributes["actorbus.outcome"] == "succeeded"
    # The consumer span is current in the handler: the handler's own spans are its children.
    assert SEEN_BY_HANDLER == [context]
    # The Bridge learns the span it was handled in, so it adds its spans to the trace.
    traceparent, started = outcome.trace
    assert traceparent == f"00-{TRACE_ID}-{context.span_id:016x}-01"
    assert started == span.start_time   # where the Bridge's wait span ends


def test_retries_are_events_of_the_span_and_a_failure_is_its_status(records):
    exporter = InMemorySpanExporter()
    table = _table(exporter, retries=1)
    assert table.process_one(_delivery(_envelope(b"retry"), {"traceparent": PARENT})).kind == \
        SUCCEEDED
    span = _process_span(exporter)
    assert [event.name for event in span.events] == ["retry"]
    assert span.events[0].attributes["exception.type"] == "RuntimeError"
    assert dict(span.attributes)["actorbus.attempts"] == 2

    exporter.clear()
    table = _table(exporter, handler="tests.handlers:always_fail", retries=0)
    assert table.process_one(_delivery(_envelope(), {"traceparent": PARENT})).kind == FAILED
    span = _process_span(exporter)
    assert span.status.status_code is trace.StatusCode.ERROR
    assert "deliberate failure" in span.status.description


def test_an_invalid_envelope_gets_a_span_that_says_so():
    exporter = InMemorySpanExporter()
    outcome = _table(exporter).process_one(_delivery(b"not an envelope", {"traceparent": PARENT}))
    assert outcome.kind == INVALID
    span = _process_span(exporter)
    assert span.status.status_code is trace.StatusCode.ERROR
    assert f"{span.get_span_context().trace_id:032x}" == TRACE_ID


@pytest.mark.parametrize("trace_id", [TRACE_ID, "0af76519-16cd-43dd-8448-eb211c80319c"])
def test_the_envelopes_trace_id_is_the_trace_where_no_header_is_present(trace_id):
    exporter = InMemorySpanExporter()
    _table(exporter).process_one(_delivery(_envelope(trace_id=trace_id)))
    assert f"{_process_span(exporter).get_span_context().trace_id:032x}" == TRACE_ID


def test_the_header_wins_over_the_envelopes_trace_id():
    exporter = InMemorySpanExporter()
    _table(exporter).process_one(_delivery(_envelope(trace_id="1" * 32), {"traceparent": PARENT}))
    assert f"{_process_span(exporter).get_span_context().trace_id:032x}" == TRACE_ID


@pytest.mark.parametrize("trace_id", [None, "order-42", "0" * 32])
def test_a_message_with_no_trace_context_is_traced_only_when_asked(trace_id):
    exporter = InMemorySpanExporter()
    outcome = _table(exporter).process_one(_delivery(_envelope(trace_id=trace_id)))
    assert outcome.kind == SUCCEEDED and outcome.trace is None
    assert not exporter.get_finished_spans()   # "continue", the default: nothing to continue

    _table(exporter, tracing="always").process_one(_delivery(_envelope(trace_id=trace_id)))
    assert _process_span(exporter).parent is None   # a trace of its own


def test_tracing_off_traces_nothing_even_with_a_traceparent():
    exporter = InMemorySpanExporter()
    outcome = _table(exporter, tracing="off").process_one(
        _delivery(_envelope(), {"traceparent": PARENT}))
    assert outcome.kind == SUCCEEDED and not exporter.get_finished_spans()


def test_an_unknown_tracing_mode_is_refused_with_the_choices():
    with pytest.raises(ConfigurationError, match=r"tracing must be one of \['continue', "
                                                 r"'always', 'off'\], got 'sometimes'"):
        SubscriptionConfig("orders.*", "tests.handlers:noop", tracing="sometimes")


def test_an_unsampled_span_costs_the_bridge_nothing():
    exporter = InMemorySpanExporter()
    table = _table(exporter, sampler=ALWAYS_OFF)
    outcome = table.process_one(_delivery(_envelope(), {"traceparent": PARENT}))
    assert outcome.kind == SUCCEEDED and outcome.trace is None and not exporter.get_finished_spans()
    # A first-try success travels as its bare token: the Bridge makes no span for it.
    assert Completion.of([outcome]).succeeded == (1,)
    traced = table.process_one(_delivery(_envelope(), token=2))._replace(trace=(PARENT, 1))
    assert Completion.of([traced]).others == (traced,)


def test_without_opentelemetry_the_handler_runs_as_before():
    table = HandlerTable([SubscriptionConfig("orders.*", "tests.handlers:noop", durable="orders")],
                         spans=NoProcessSpans())
    outcome = table.process_one(_delivery(_envelope(), {"traceparent": PARENT}))
    assert outcome.kind == SUCCEEDED and outcome.trace is None


def test_publish_sends_the_current_trace_context_and_keeps_one_given(nats_server, make_bus):
    bus: EventBus = make_bus(pool_size=1, runtime="simple")
    sub = bus.subscribe("traced.*", "tests.handlers:noop", durable="traced")
    provider = TracerProvider(sampler=ALWAYS_ON)
    with provider.get_tracer("test").start_as_current_span("publishing") as span:
        bus.publish_envelope("traced.x", Envelope.create("x", "Happened", b"x"))
        context = span.get_span_context()
        expected = f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
        bus.publish("traced.y", b"y", headers={"traceparent": PARENT})
    bus.publish("traced.z", b"z")   # no span current: no header
    headers = [msg.headers for msg in stream_messages(nats_server.url, sub.stream)]
    assert headers[0]["traceparent"] == expected
    assert headers[1]["traceparent"] == PARENT
    assert "traceparent" not in (headers[2] or {})
    assert inject_trace_context(None) is None


@pytest.mark.parametrize("runtime", ["processes", "simple"])
def test_one_trace_from_a_raw_nats_publish_through_the_handler_in_a_pool_process_to_the_ack(
        nats_server, tmp_path, runtime):
    spans_file = tmp_path / "spans.jsonl"
    subprocess.run([sys.executable, "-m", "tests.tracing_host", nats_server.url, str(spans_file),
                    runtime], cwd=ROOT, check=True, timeout=120)
    spans = [json.loads(line) for line in spans_file.read_text().splitlines()]
    pids = json.loads(Path(f"{spans_file}.pids").read_text())
    members = {pids[f"member-{i}"] for i in range(2)}
    for name, trace_id in TRACE_IDS.items():
        mine = sorted((s for s in spans if s["trace_id"] == trace_id), key=lambda s: s["start"])
        processes = [s for s in mine if s["name"] == "process traced.*"]
        waits = [s for s in mine if s["name"] == "wait traced.*"]
        settles = [s for s in mine if s["attributes"].get("messaging.operation.type") == "settle"]
        # One of each per delivery: the nak'ed message is delivered twice.
        assert len(processes) == len(waits) == len(settles) == (2 if name == "nak" else 1), name
        for process, wait, settle in zip(processes, waits, settles, strict=True):
            assert process["kind"] == "CONSUMER" and process["parent_id"] == PUBLISHER_SPAN_ID
            assert process["attributes"]["messaging.destination.name"] == f"traced.{name}"
            assert wait["parent_id"] == process["span_id"] == settle["parent_id"]
            assert wait["start"] <= wait["end"] == process["start"] <= process["end"] <= \
                settle["start"] <= settle["end"]
            assert settle["status"] == "UNSET"   # confirmed by the server
            if runtime == "processes":
                # The handler ran in a pool member; the Bridge waited and settled.
                assert process["pid"] in members
                assert wait["pid"] == settle["pid"] == pids["bridge"]
        operations = [s["attributes"]["messaging.operation.name"] for s in settles]
        assert operations == {"invalid": ["dead_letter"], "nak": ["nak", "ack"]}.get(name, ["ack"])
        assert [w["attributes"]["actorbus.held_for_order"] for w in waits] == \
            [name == "behind"] * len(waits)   # behind an older message of its key
        if name == "behind":   # it waited in the Bridge until "nak" had come back, then went
            # right behind it to the same member
            nak_processes = sorted((s for s in spans if s["trace_id"] == TRACE_IDS["nak"]
                                    and s["name"] == "process traced.*"), key=lambda s: s["start"])
            assert waits[0]["end"] >= nak_processes[1]["end"]
            assert processes[0]["pid"] == nak_processes[1]["pid"]
        if name == "ok":
            [own] = [s for s in mine if s["name"] == "handler's own work"]
            assert own["parent_id"] == processes[0]["span_id"]
        if name == "retry":
            assert processes[0]["events"] == ["retry"]
        if name == "nak":
            assert processes[0]["status"] == "ERROR" and processes[1]["status"] == "UNSET"
            assert processes[1]["attributes"]["actorbus.delivery_count"] == 2
            assert settles[0]["attributes"]["actorbus.nak_delay"] == pytest.approx(0.2)
        if name == "invalid":
            assert processes[0]["status"] == "ERROR"
    # publish_envelope inside a span of the host: the same trace goes on in the handler.
    [publisher] = [s for s in spans if s["name"] == "publish via the bus"]
    [process] = [s for s in spans if s["name"] == "process traced.*"
                 and s["attributes"]["messaging.destination.name"] == "traced.bus"]
    assert process["trace_id"] == publisher["trace_id"]
    assert process["parent_id"] == publisher["span_id"]
