"""Publishing from the facade: a JetStream client on a background loop."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import TypeAlias
from collections.abc import Iterable, Mapping

from nats.js.api import PubAck

from actorbus.bridge.connection import describe_error, open_connection
from actorbus.bridge.loop_thread import LoopThread
from actorbus.codecs import CODECS, EnvelopeFormat
from actorbus.config import BusConfig
from actorbus.envelope import Envelope
from actorbus.groups import subject_for_key
from actorbus.tracing import inject_trace_context

log = logging.getLogger("actorbus.publisher")


def envelope_headers(envelope: Envelope, format: EnvelopeFormat) -> dict[str, str]:
    """What an envelope is published with: ``Nats-Msg-Id`` (its event id, so JetStream
    drops retried copies), ``Content-Type`` (the encoding's) and ``X-Aggregate-ID``
    (so a consumer routes it without decoding the body)."""
    return {"Nats-Msg-Id": envelope.event_id, "Content-Type": CODECS[format].content_type,
            "X-Aggregate-ID": envelope.aggregate_id}


class PublishError(RuntimeError):
    """A publish that JetStream did not acknowledge; the message names subject and cause."""


@dataclass(frozen=True, slots=True)
class PublishResult:
    """What became of one published message: JetStream's acknowledgement.

    ``publish`` and ``publish_envelope`` return one (or raise
    :class:`PublishError`); ``publish_many`` returns one per message, with
    ``error`` set instead of raising. ``duplicate`` is True when JetStream
    already had a message with the same ``Nats-Msg-Id`` in its duplicate
    window and stored nothing new (``sequence`` is then the stored copy's).
    """

    subject: str
    sequence: int | None
    error: str | None = None
    duplicate: bool = False
    stream: str | None = None

    @property
    def seq(self) -> int | None:
        """``sequence``, under the name of nats-py's ``PubAck``."""
        return self.sequence

    @property
    def ok(self) -> bool:
        """True when JetStream stored (or, for a duplicate id, already had) the message."""
        return self.error is None


#: One message for :meth:`Publisher.publish_many`: ``(subject, data)`` or
#: ``(subject, data, headers)``; ``data`` may be an :class:`Envelope`.
OutgoingMessage: TypeAlias = (tuple[str, bytes | bytearray | Envelope]
                              | tuple[str, bytes | bytearray | Envelope, Mapping[str, str] | None])


class Publisher:
    """Publishes to JetStream and waits for each acknowledgement."""

    def __init__(self, config: BusConfig) -> None:
        self._timeout = timeout = config.connect_timeout
        name = f"{config.name}-publisher"
        self._thread = LoopThread(name)
        self._secrets = config.secrets()
        try:
            self._nc = self._thread.run(open_connection(config, name=name, reconnect_forever=False,
                                                        error_cb=self._on_error), timeout + 2.0)
        except ConnectionError:
            self._thread.stop()
            raise
        except Exception as exc:
            self._thread.stop()
            raise ConnectionError(f"cannot connect to NATS at {config.shown_servers()}: "
                                  f"{describe_error(exc, self._secrets)}") from None
        self._js = self._nc.jetstream()

    async def _on_error(self, exc: Exception) -> None:
        # Instead of nats-py's default, which logs the error with a traceback.
        log.warning("NATS error (publisher): %s: %s", type(exc).__name__,
                    describe_error(exc, self._secrets))

    def publish(self, subject: str, data: bytes,
                headers: Mapping[str, str] | None = None) -> PublishResult:
        """Publish ``data``; return JetStream's acknowledgement. Raises :class:`PublishError`.

        With the ``otel`` extra, the current trace context goes along (``traceparent``,
        ``tracestate``): the handler's span is its child."""
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"data must be bytes, got {type(data).__name__}")
        try:
            ack = self._thread.run(
                self._js.publish(subject, bytes(data), headers=inject_trace_context(headers),
                                 timeout=self._timeout), self._timeout + 1.0)
        except Exception as exc:
            raise PublishError(f"publishing to {subject!r} failed: {type(exc).__name__}: {exc}") from exc
        return _result(subject, ack)

    def publish_envelope(self, subject: str, envelope: Envelope,
                         format: EnvelopeFormat | str = EnvelopeFormat.MSGPACK) -> PublishResult:
        """Publish an envelope encoded in ``format`` (``"msgpack"`` or ``"json"``, as the
        Go EventBus writes it), with the headers of :func:`envelope_headers`, so JetStream
        drops retried copies."""
        if not isinstance(envelope, Envelope):
            raise TypeError(f"envelope must be an Envelope, got {type(envelope).__name__}")
        format = EnvelopeFormat(format)
        return self.publish(subject_for_key(subject, envelope.aggregate_id), envelope.encode(format),
                            envelope_headers(envelope, format))

    def publish_many(self, messages: Iterable[OutgoingMessage], *, in_flight: int = 500,
                     timeout: float | None = None,
                     format: EnvelopeFormat | str = EnvelopeFormat.MSGPACK) -> list[PublishResult]:
        """Publish many messages with up to ``in_flight`` acknowledgements awaited at once.

        Envelope items are encoded in ``format`` with the headers of
        :func:`envelope_headers` (added to their own). Waits for every
        acknowledgement and reports each message's fate, in order, instead
        of raising: a failure of one does not stop the rest.
        """
        format = EnvelopeFormat(format)
        prepared = [self._prepare(item, format) for item in messages]
        budget = timeout if timeout is not None else self._timeout * (1 + len(prepared) / in_flight)
        return self._thread.run(self._publish_all(prepared, in_flight), budget)

    async def _publish_all(self, prepared: list[tuple[str, bytes, dict[str, str] | None]],
                           in_flight: int) -> list[PublishResult]:
        results: list[PublishResult] = []
        for start in range(0, len(prepared), in_flight):
            chunk = prepared[start:start + in_flight]
            acks = await asyncio.gather(
                *(self._js.publish(subject, data, headers=headers, timeout=self._timeout)
                  for subject, data, headers in chunk), return_exceptions=True)
            for (subject, _, _), ack in zip(chunk, acks, strict=True):
                if isinstance(ack, BaseException):
                    results.append(PublishResult(subject, None, f"{type(ack).__name__}: {ack}"))
                else:
                    results.append(_result(subject, ack))
        return results

    @staticmethod
    def _prepare(item: OutgoingMessage,
                 format: EnvelopeFormat) -> tuple[str, bytes, dict[str, str] | None]:
        if len(item) not in (2, 3):
            raise TypeError(f"expected (subject, data[, headers]), got {item!r}")
        subject, data = item[0], item[1]
        headers = dict(item[2]) if len(item) == 3 and item[2] else None
        if isinstance(data, Envelope):
            subject = subject_for_key(subject, data.aggregate_id)
            headers = {**(headers or {}), **envelope_headers(data, format)}
            data = data.encode(format)
        elif not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"data for {subject!r} must be bytes or an Envelope, got {type(data).__name__}")
        return subject, bytes(data), inject_trace_context(headers)

    def close(self) -> None:
        """Flush and disconnect."""
        with contextlib.suppress(Exception):   # closing: a failed drain changes nothing
            self._thread.run(self._nc.drain(), self._timeout)
        self._thread.stop()


def _result(subject: str, ack: PubAck) -> PublishResult:
    """A :class:`PublishResult` from nats-py's ``PubAck``."""
    return PublishResult(subject, ack.seq, None, bool(ack.duplicate), ack.stream)
