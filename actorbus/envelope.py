"""The envelope: a domain event, validated on both ends.

Encoding and decoding are strict on purpose: an envelope that does not
validate can never be processed successfully, so it is rejected with an
:class:`InvalidEnvelope` naming the field instead of reaching a handler.
The wire encodings are codecs (:mod:`actorbus.codecs`); this module
knows the fields.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import uuid
from typing import Any, Mapping

from actorbus.codecs import CodecError, EnvelopeFormat, codec_for, CODECS
from actorbus.ids import is_valid_id

#: Largest encoded envelope accepted by :func:`decode_envelope` by default.
DEFAULT_MAX_ENVELOPE_BYTES = 1024 * 1024

_REQUIRED_STR = ("event_id", "event_type")
_OPTIONAL_STR = ("trace_id", "correlation_id", "tenant_id")


class InvalidEnvelope(ValueError):
    """Raised when bytes or values do not form a valid envelope.

    ``field`` names the offending field (or ``"<envelope>"`` for the whole).
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"invalid envelope: {field}: {problem}")
        self.field = field
        self.problem = problem


@dataclasses.dataclass(frozen=True, slots=True)
class Envelope:
    """A domain event: who it is about, what happened, and its payload.

    Construct with all fields, or with :meth:`create`, which fills a fresh
    ``event_id`` and the current time. Construction validates.
    """

    event_id: str
    aggregate_id: str
    event_type: str
    event_version: int
    timestamp: str | int
    payload: bytes
    trace_id: str | None = None
    correlation_id: str | None = None
    tenant_id: str | None = None
    metadata: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def create(
        cls,
        aggregate_id: str,
        event_type: str,
        payload: bytes,
        *,
        event_version: int = 1,
        **optional: Any,
    ) -> "Envelope":
        """Build an envelope with a new UUID ``event_id`` and a UTC RFC 3339 timestamp."""
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")
        return cls(
            event_id=str(uuid.uuid4()),
            aggregate_id=aggregate_id,
            event_type=event_type,
            event_version=event_version,
            timestamp=now.replace("+00:00", "Z"),
            payload=payload,
            **optional,
        )

    def encode(self, format: EnvelopeFormat = EnvelopeFormat.MSGPACK) -> bytes:
        """The wire form in ``format`` (msgpack by default), optional fields left out when unset."""
        return encode_envelope(self, format)

    @classmethod
    def decode(cls, data: bytes, format: EnvelopeFormat = EnvelopeFormat.AUTO, *,
               max_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES) -> "Envelope":
        """Decode and validate ``data``; raise :class:`InvalidEnvelope` naming what is wrong."""
        return decode_envelope(data, format, max_bytes=max_bytes)


def encode_envelope(envelope: Envelope, format: EnvelopeFormat = EnvelopeFormat.MSGPACK) -> bytes:
    """Encode ``envelope`` in ``format`` (a concrete one: ``AUTO`` has nothing to write)."""
    if format is EnvelopeFormat.AUTO:
        raise ValueError("encode needs a concrete envelope format, not 'auto'")
    wire = {name: getattr(envelope, name) for name in _FIELDS}
    wire = {k: (dict(v) if k == "metadata" else v) for k, v in wire.items() if v is not None}
    return CODECS[EnvelopeFormat(format)].encode(wire)


def decode_envelope(data: bytes, format: EnvelopeFormat = EnvelopeFormat.AUTO, *,
                    max_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES, validated: bool = False) -> Envelope:
    """Decode and validate an envelope; raise :class:`InvalidEnvelope` on anything wrong.

    ``format`` fixes the encoding (``AUTO``: recognised by the first bytes).
    ``validated=True`` skips the field checks for bytes that already passed
    them (the Bridge validates before dispatching; the pool decodes again).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidEnvelope("<envelope>", f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise InvalidEnvelope("<envelope>", f"{len(data)} bytes is over the {max_bytes}-byte limit")
    try:
        codec = codec_for(data, format)
        wire = codec.decode(data)
    except CodecError as exc:
        raise InvalidEnvelope("<envelope>", str(exc)) from None
    for name in _REQUIRED_FIELDS:
        if name not in wire:
            raise InvalidEnvelope(name, "missing")
    # Unknown keys are ignored so that newer producers can add fields.
    if not validated:
        return Envelope(**{name: wire[name] for name in _FIELDS if name in wire})
    envelope = _new_envelope(Envelope)
    get = wire.get
    for name in _FIELDS:
        _set_field(envelope, name, get(name))
    return envelope


_FIELDS = tuple(f.name for f in dataclasses.fields(Envelope))
_REQUIRED_FIELDS = ("event_id", "aggregate_id", "event_type", "event_version", "timestamp",
                    "payload")
_new_envelope = object.__new__
_set_field = object.__setattr__


def _validate(env: Envelope) -> None:
    for name in _REQUIRED_STR:
        value = getattr(env, name)
        if not isinstance(value, str):
            raise InvalidEnvelope(name, f"expected str, got {type(value).__name__}")
        if not value.strip():
            raise InvalidEnvelope(name, "blank")
    if not isinstance(env.aggregate_id, str):
        raise InvalidEnvelope("aggregate_id", f"expected str, got {type(env.aggregate_id).__name__}")
    if not is_valid_id(env.aggregate_id):
        raise InvalidEnvelope(
            "aggregate_id", f"{env.aggregate_id!r} is not 1-256 bytes of [A-Za-z0-9:_-./]")
    if isinstance(env.event_version, bool) or not isinstance(env.event_version, int):
        raise InvalidEnvelope("event_version", f"expected int, got {type(env.event_version).__name__}")
    if env.event_version < 1:
        raise InvalidEnvelope("event_version", f"{env.event_version} is below 1")
    _validate_timestamp(env.timestamp)
    if not isinstance(env.payload, (bytes, bytearray)):
        raise InvalidEnvelope("payload", f"expected bytes, got {type(env.payload).__name__}")
    if not env.payload:
        raise InvalidEnvelope("payload", "empty")
    for name in _OPTIONAL_STR:
        value = getattr(env, name)
        if value is not None and not isinstance(value, str):
            raise InvalidEnvelope(name, f"expected str, got {type(value).__name__}")
    if env.metadata is not None:
        if not isinstance(env.metadata, Mapping):
            raise InvalidEnvelope("metadata", f"expected a map, got {type(env.metadata).__name__}")
        if not all(isinstance(k, str) for k in env.metadata):
            raise InvalidEnvelope("metadata", "keys must be str")


def _validate_timestamp(value: object) -> None:
    if isinstance(value, bool):
        raise InvalidEnvelope("timestamp", "expected RFC 3339 str or epoch milliseconds, got bool")
    if isinstance(value, int):
        if value < 0:
            raise InvalidEnvelope("timestamp", f"epoch milliseconds {value} is negative")
        return
    if isinstance(value, str):
        try:
            parsed = _dt.datetime.fromisoformat(value)
        except ValueError:
            raise InvalidEnvelope("timestamp", f"{value!r} is not RFC 3339") from None
        if parsed.tzinfo is None:
            raise InvalidEnvelope("timestamp", f"{value!r} has no UTC offset")
        return
    raise InvalidEnvelope(
        "timestamp", f"expected RFC 3339 str or epoch milliseconds, got {type(value).__name__}")
