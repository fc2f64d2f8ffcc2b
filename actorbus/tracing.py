"""OpenTelemetry traces across the bus's processes (the ``otel`` extra; without it, nothing).

A message's trace follows it through three processes:

- the publisher: :func:`inject_trace_context` adds the current W3C trace context
  (``traceparent``, ``tracestate``) to the headers of what ``publish`` and
  ``publish_envelope`` send; any other publisher's (Go, nats.js) works the same;
- the pool member: the handler runs inside a ``process`` span (kind
  ``CONSUMER``) whose parent is that context, or, with no header, the
  envelope's ``trace_id``; retries are events on it, a failure its status;
- the Bridge: a ``wait`` span (from its receipt of the message to the handler's
  start: held for its key's order, queued for its member) and a ``settle``
  span (ack, nak with its delay, term or dead letter, until the server
  confirmed it), both children of the ``process`` span.

Which messages get spans is each subscription's :class:`~actorbus.config.TraceMode`.
The member tells the Bridge its ``process`` span only when that span is sampled
(:meth:`ProcessSpan.end` returns its handle, which the outcome carries): the
Bridge, which every message passes through, makes no span for a message that is
not traced.

Spans go to the global tracer provider. Actor processes are forked from the
process that starts the bus and inherit its provider: set it up before the bus
starts.
"""
from __future__ import annotations

import importlib.metadata
import logging
import time
from collections.abc import Mapping
from typing import Any, Protocol

from actorbus.config import SubscriptionConfig, TraceMode

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.trace import (NonRecordingSpan, Span, SpanContext, SpanKind, Status,
                                     StatusCode, TraceFlags)
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    #: The W3C ``traceparent`` codec: how a span's handle travels from member to Bridge.
    _W3C = TraceContextTextMapPropagator()
    #: Whether the OpenTelemetry API is installed (the ``otel`` extra).
    AVAILABLE = True
except ImportError:   # the otel extra is not installed: every part below is a no-op
    AVAILABLE = False

log = logging.getLogger("actorbus.tracing")

#: The instrumentation scope of every span the bus makes.
SCOPE = "actorbus"

#: How a member's sampled ``process`` span reaches the Bridge: its ``traceparent`` and the
#: handler's start (nanoseconds since the epoch).
SpanHandle = tuple[str, int]

_TRACEPARENT = "traceparent"
# Module constants: an enum member looked up on its class costs more than a global.
_ALWAYS, _OFF = TraceMode.ALWAYS, TraceMode.OFF
try:
    _VERSION: str | None = importlib.metadata.version("actorbus")
except importlib.metadata.PackageNotFoundError:
    _VERSION = None
_MSG_ID = "Nats-Msg-Id"


def inject_trace_context(headers: Mapping[str, str] | None) -> dict[str, str] | None:
    """``headers`` plus the current trace context (``traceparent``, ``tracestate``), when a
    span is current; a header the caller set is kept."""
    carrier = dict(headers) if headers else {}
    if AVAILABLE:
        context: dict[str, str] = {}
        propagate.inject(context)
        for name, value in context.items():
            carrier.setdefault(name, value)
    return carrier or None


def flush_traces(timeout: float = 2.0) -> None:
    """Export what this process's tracer provider buffered: an actor process may end
    without the interpreter's exit hooks."""
    if not AVAILABLE:
        return
    provider = trace.get_tracer_provider()
    force_flush = getattr(provider, "force_flush", None)   # the API's own provider has none
    if force_flush is not None:
        try:
            force_flush(int(timeout * 1000))
        except Exception as exc:   # an exporter's failure must not fail a stop
            log.warning("could not flush traces: %s: %s", type(exc).__name__, exc)


def parent_of_trace_id(trace_id: str | None) -> Any:
    """The remote parent an envelope's ``trace_id`` stands for (32 hex digits, or a UUID),
    or None for anything else: the spans join that trace, as if its publisher had
    sampled it."""
    if not AVAILABLE or not trace_id:
        return None
    digits = trace_id.replace("-", "")
    if len(digits) != 32:
        return None
    try:
        number = int(digits, 16)
    except ValueError:
        return None
    if not number:
        return None
    # A parent needs a span id; the publisher made no span, so one is made from the trace id.
    span_id = (number & 0xFFFF_FFFF_FFFF_FFFF) or 1
    context = SpanContext(number, span_id, is_remote=True,
                          trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return trace.set_span_in_context(NonRecordingSpan(context))


# ---------------------------------------------------------------- the pool member's spans
class ProcessSpan(Protocol):
    """The span a handler runs in (a context manager: current inside ``with``)."""

    def __enter__(self) -> ProcessSpan: ...

    def __exit__(self, *exc_info: object) -> None: ...

    @property
    def recording(self) -> bool:
        """Whether the span is sampled: only then are its attributes worth making."""

    def describe(self, attributes: Mapping[str, Any]) -> None:
        """Add ``attributes`` (of a recording span)."""

    def retried(self, attempt: int, error: BaseException) -> None:
        """Attempt ``attempt`` raised ``error``; it is tried again."""

    def end(self, kind: str, error: str | None, attempts: int) -> SpanHandle | None:
        """End the span with its outcome; its handle if the Bridge should add its spans."""


class ProcessSpans(Protocol):
    """Makes the ``process`` span of each message a member handles."""

    def start(self, subscription: SubscriptionConfig, subject: str,
              headers: Mapping[str, str] | None, trace_id: str | None) -> ProcessSpan | None:
        """The span of one message of ``subscription``, its parent from ``headers`` or else
        ``trace_id`` (an envelope's); None where the subscription's
        :class:`~actorbus.config.TraceMode` traces no such message."""


class NoProcessSpans:
    """:class:`ProcessSpans` without OpenTelemetry: no span."""

    def start(self, subscription: SubscriptionConfig, subject: str,
              headers: Mapping[str, str] | None, trace_id: str | None) -> ProcessSpan | None:
        """None: nothing is traced."""
        return None


class _UnsampledSpan:
    """A ``process`` span the sampler dropped: only current while its handler runs, so that
    the handler's own spans follow the same decision."""

    __slots__ = ("_span", "_token")

    recording = False

    def __init__(self, span: Span) -> None:
        self._span = span
        self._token: object | None = None

    def __enter__(self) -> _UnsampledSpan:
        # Current while the handler runs: the user's own spans are its children.
        self._token = otel_context.attach(trace.set_span_in_context(self._span))
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None:
            otel_context.detach(self._token)   # type: ignore[arg-type]
            self._token = None

    def describe(self, attributes: Mapping[str, Any]) -> None:
        return None

    def retried(self, attempt: int, error: BaseException) -> None:
        return None

    def end(self, kind: str, error: str | None, attempts: int) -> SpanHandle | None:
        return None   # a dropped span records nothing, and the Bridge adds nothing to it


class _SampledSpan(_UnsampledSpan):
    """A sampled ``process`` span: records the handler's retries and outcome, and tells the
    Bridge where its own spans go."""

    __slots__ = ("_started",)

    recording = True

    def __init__(self, span: Span, started: int) -> None:
        super().__init__(span)
        self._started = started   # the span's start, where the Bridge's wait span ends

    def describe(self, attributes: Mapping[str, Any]) -> None:
        self._span.set_attributes(attributes)

    def retried(self, attempt: int, error: BaseException) -> None:
        self._span.add_event("retry", {"actorbus.attempt": attempt,
                                       "exception.type": type(error).__name__,
                                       "exception.message": str(error)})

    def end(self, kind: str, error: str | None, attempts: int) -> SpanHandle | None:
        span = self._span
        span.set_attribute("actorbus.outcome", kind)
        span.set_attribute("actorbus.attempts", attempts)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end()
        carrier: dict[str, str] = {}
        _W3C.inject(carrier, context=trace.set_span_in_context(span))   # the header's own writer
        return carrier[_TRACEPARENT], self._started


class OtelProcessSpans:
    """:class:`ProcessSpans` through OpenTelemetry's tracer provider (the global one unless
    given)."""

    def __init__(self, provider: Any = None) -> None:
        self._tracer = trace.get_tracer(SCOPE, _VERSION, tracer_provider=provider)

    def start(self, subscription: SubscriptionConfig, subject: str,
              headers: Mapping[str, str] | None, trace_id: str | None) -> ProcessSpan | None:
        """A ``process <subject filter>`` span of kind ``CONSUMER``, or None."""
        mode = subscription.tracing
        if headers and _TRACEPARENT in headers:
            parent = propagate.extract(headers)
        elif trace_id:
            parent = parent_of_trace_id(trace_id)
        else:
            parent = None
        if (parent is None and mode is not _ALWAYS) or mode is _OFF:
            return None   # nothing to continue: a message nobody traces costs a lookup or two
        started = time.time_ns()
        span = self._tracer.start_span(
            f"process {subscription.subject}", context=parent, kind=SpanKind.CONSUMER,
            attributes=_messaging("process", subject, subscription.subject, subscription.durable),
            start_time=started)
        if not span.is_recording():
            return _UnsampledSpan(span)
        message_id = headers.get(_MSG_ID) if headers else None
        if message_id:
            span.set_attribute("messaging.message.id", message_id)
        return _SampledSpan(span, started)


def process_spans() -> ProcessSpans:
    """The spans of this process's handlers: OpenTelemetry's when it is installed."""
    return OtelProcessSpans() if AVAILABLE else NoProcessSpans()


# ---------------------------------------------------------------- the Bridge's spans
class BridgeSpans:
    """The Bridge's spans of a traced message: made only for a member's sampled span."""

    def __init__(self, provider: Any = None) -> None:
        self._tracer = trace.get_tracer(SCOPE, _VERSION,
                                        tracer_provider=provider) if AVAILABLE else None

    def waited(self, handle: SpanHandle, received_at: float, subject_filter: str,
               held_for_order: bool) -> None:
        """The ``wait`` span: from the Bridge's receipt (``time.monotonic()``) to the
        handler's start."""
        if self._tracer is None:
            return
        traceparent, started_ns = handle
        received_ns = _epoch_ns(received_at)
        span = self._tracer.start_span(
            f"wait {subject_filter}", context=_context_of(traceparent),
            start_time=min(received_ns, started_ns),
            attributes={"actorbus.held_for_order": held_for_order})
        span.end(end_time=started_ns)

    def settling(self, handle: SpanHandle, subject: str, subject_filter: str, durable: str,
                 action: str, delay: float | None) -> Any:
        """The ``settle`` span, started now; its settler ends it (see :func:`end_settle_span`)."""
        if self._tracer is None:
            return None
        attributes = _messaging(action, subject, subject_filter, durable, "settle")
        if delay:
            attributes["actorbus.nak_delay"] = delay
        return self._tracer.start_span(f"{action} {subject_filter}",
                                       context=_context_of(handle[0]), attributes=attributes)


def end_settle_span(span: Any, error: str | None = None) -> None:
    """End a ``settle`` span: confirmed by the server, or not (``error``)."""
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end()


def _messaging(operation: str, subject: str, subject_filter: str, durable: str,
               operation_type: str = "process") -> dict[str, Any]:
    """The messaging semantic conventions' attributes of one operation on one message."""
    return {"messaging.system": "nats", "messaging.operation.type": operation_type,
            "messaging.operation.name": operation, "messaging.destination.name": subject,
            "messaging.destination.template": subject_filter,
            "messaging.consumer.group.name": durable}


def _context_of(traceparent: str) -> Any:
    return _W3C.extract({_TRACEPARENT: traceparent})


def _epoch_ns(monotonic: float) -> int:
    """A ``time.monotonic()`` reading as nanoseconds since the epoch."""
    return time.time_ns() - int((time.monotonic() - monotonic) * 1e9)
