"""The envelope: a domain event, validated on both ends.

Encoding and decoding are strict on purpose: an envelope that does not
validate can never be processed successfully, so it is rejected with an
:class:`InvalidEnvelope` naming the field instead of reaching a handler.
The wire encodings are codecs (:mod:`actorbus.codecs`); this module
knows the fields.

``payload`` is bytes in both encodings. A JSON envelope carries it as an
inline JSON value; :attr:`Envelope.payload` then holds that value's JSON
text exactly as the producer wrote it (UTF-8), and writing the envelope as
JSON puts the same text back, so decode → encode in JSON gives identical
fields. :meth:`Envelope.payload_json` parses it.

``timestamp`` is kept as it was received (an RFC 3339 string, nanoseconds
and offset included, or epoch milliseconds): it is validated, never
re-formatted, except that JSON has no epoch form (Go reads ``time.Time``
from RFC 3339 only), so epoch milliseconds are written to JSON as RFC 3339
UTC.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import re
import uuid
from typing import Any
from collections.abc import Mapping

import msgpack

from actorbus.codecs import CODECS, CodecError, EnvelopeFormat, codec_for, wire_type
from actorbus.ids import is_valid_id

#: Largest encoded envelope accepted by :func:`decode_envelope` by default.
DEFAULT_MAX_ENVELOPE_BYTES = 1024 * 1024

_REQUIRED_STR = ("event_id", "event_type")
_OPTIONAL_STR = ("trace_id", "correlation_id", "tenant_id")


#: How errors name each encoding.
_FORMAT_NAMES = {EnvelopeFormat.MSGPACK: "msgpack", EnvelopeFormat.JSON: "JSON"}


class InvalidEnvelope(ValueError):
    """Raised when bytes or values do not form a valid envelope.

    ``field`` names the offending field (or ``"<envelope>"`` for the whole);
    ``format`` is the encoding the bytes were read as, when one was.
    """

    def __init__(self, field: str, problem: str, format: EnvelopeFormat | None = None) -> None:
        kind = f"{_FORMAT_NAMES[format]} " if format in _FORMAT_NAMES else ""
        super().__init__(f"invalid {kind}envelope: {field}: {problem}")
        self.field = field
        self.problem = problem
        self.format = format


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
    ) -> Envelope:
        """Build an envelope with a new UUID ``event_id`` and a UTC RFC 3339 timestamp."""
        now = _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")
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

    def payload_json(self) -> Any:
        """The payload parsed as JSON (a JSON envelope's inline value); ``ValueError`` if it is not."""
        return json.loads(self.payload)

    @classmethod
    def decode(cls, data: bytes, format: EnvelopeFormat = EnvelopeFormat.AUTO, *,
               max_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES) -> Envelope:
        """Decode and validate ``data``; raise :class:`InvalidEnvelope` naming what is wrong."""
        return decode_envelope(data, format, max_bytes=max_bytes)


def encode_envelope(envelope: Envelope, format: EnvelopeFormat = EnvelopeFormat.MSGPACK) -> bytes:
    """Encode ``envelope`` in ``format`` (a concrete one: ``AUTO`` has nothing to write).

    As JSON it is what the Go EventBus writes: empty optional fields left
    out, ``payload`` inline (so it must be JSON text: :class:`InvalidEnvelope`
    otherwise), an epoch-millisecond ``timestamp`` as RFC 3339 UTC.
    """
    format = EnvelopeFormat(format)
    if format is EnvelopeFormat.AUTO:
        raise ValueError("encode needs a concrete envelope format, not 'auto'")
    wire = {name: getattr(envelope, name) for name in _FIELDS}
    wire = {k: (dict(v) if k == "metadata" else v) for k, v in wire.items() if v is not None}
    if format is EnvelopeFormat.JSON:
        _to_json_fields(wire)
    return CODECS[format].encode(wire)


def _to_json_fields(wire: dict[str, Any]) -> None:
    for name in _OPTIONAL_STR:
        if wire.get(name) == "":  # omitempty
            del wire[name]
    if isinstance(wire["timestamp"], int):
        wire["timestamp"] = _rfc3339_from_epoch_ms(wire["timestamp"])
    try:
        json.loads(wire["payload"])
    except ValueError as exc:
        raise InvalidEnvelope("payload", f"is not JSON text ({exc}), and a JSON envelope carries "
                              "its payload as an inline JSON value", EnvelopeFormat.JSON) from None
    if "metadata" in wire:
        try:
            json.dumps(wire["metadata"], allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidEnvelope("metadata", f"cannot be written as JSON: {exc}",
                                  EnvelopeFormat.JSON) from None


def _rfc3339_from_epoch_ms(ms: int) -> str:
    # As Go's RFC3339Nano writes UTC: trailing zeros of the fraction trimmed, "Z".
    moment = _EPOCH + _dt.timedelta(milliseconds=ms)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{ms % 1000:03d}".rstrip("0")
    return f"{text}.{fraction}Z" if fraction else f"{text}Z"


_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)


def decode_envelope(data: bytes, format: EnvelopeFormat = EnvelopeFormat.AUTO, *,
                    max_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES, validated: bool = False) -> Envelope:
    """Decode and validate an envelope; raise :class:`InvalidEnvelope` on anything wrong.

    ``format`` fixes the encoding (``AUTO``: recognised by the first bytes).
    ``validated=True`` skips the field checks for bytes that already passed
    them (decoded once more where they were checked before).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidEnvelope("<envelope>", f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise InvalidEnvelope("<envelope>", f"{len(data)} bytes is over the {max_bytes}-byte limit")
    try:
        codec = codec_for(data, format)
    except CodecError as exc:
        raise InvalidEnvelope("<envelope>", str(exc)) from None
    try:
        wire = codec.decode(data)
    except CodecError as exc:
        raise InvalidEnvelope("<envelope>", str(exc), codec.format) from None
    if codec.format is EnvelopeFormat.JSON:
        for name in _OPTIONAL_STR:
            # Go's zero value: an empty or null optional string is an absent one.
            if name in wire and wire[name] in ("", None):
                del wire[name]
        if wire.get("payload") == b"null":
            raise InvalidEnvelope("payload", "null", codec.format)
    for name in _REQUIRED_FIELDS:
        if name not in wire:
            raise InvalidEnvelope(name, "missing", codec.format)
    # Unknown keys are ignored so that newer producers can add fields.
    if not validated:
        try:
            return Envelope(**{name: wire[name] for name in _FIELDS if name in wire})
        except InvalidEnvelope as exc:
            raise InvalidEnvelope(exc.field, exc.problem, codec.format) from None
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
            raise InvalidEnvelope(name, f"expected a string, got {_a(value)}")
        if not value.strip():
            raise InvalidEnvelope(name, "blank")
    if not isinstance(env.aggregate_id, str):
        raise InvalidEnvelope("aggregate_id", f"expected a string, got {_a(env.aggregate_id)}")
    if not is_valid_id(env.aggregate_id):
        raise InvalidEnvelope(
            "aggregate_id", f"{env.aggregate_id!r} is not 1-256 bytes of [A-Za-z0-9:_-./]")
    if isinstance(env.event_version, bool) or not isinstance(env.event_version, int):
        raise InvalidEnvelope("event_version", f"expected an integer, got {_a(env.event_version)}")
    if env.event_version < 1:
        raise InvalidEnvelope("event_version", f"{env.event_version} is below 1")
    _validate_timestamp(env.timestamp)
    if not isinstance(env.payload, (bytes, bytearray)):
        raise InvalidEnvelope("payload", f"expected binary (bytes), got {_a(env.payload)}")
    if not env.payload:
        raise InvalidEnvelope("payload", "empty")
    _validate_optional(env)


def _validate_optional(env: Envelope) -> None:
    for name in _OPTIONAL_STR:
        value = getattr(env, name)
        if value is not None and not isinstance(value, str):
            raise InvalidEnvelope(name, f"expected a string, got {_a(value)}")
    if env.metadata is not None:
        if not isinstance(env.metadata, Mapping):
            raise InvalidEnvelope("metadata", f"expected a map, got {_a(env.metadata)}")
        if not all(isinstance(k, str) for k in env.metadata):
            raise InvalidEnvelope("metadata", "keys must be str")
        extension = _find_extension(env.metadata)
        if extension is not None:
            raise InvalidEnvelope("metadata", f"holds {_a(extension)}, which has no meaning here")


def _a(value: object) -> str:
    """The wire type of ``value`` with an article, for "expected X, got <this>"."""
    kind = wire_type(value)
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _find_extension(value: object) -> object | None:
    # msgpack extension values anywhere in metadata are rejected, as at the top level.
    if isinstance(value, (msgpack.ExtType, msgpack.Timestamp)):
        extension: object = value  # msgpack is untyped: narrowed to its classes, value is Any
        return extension
    children = value.values() if isinstance(value, Mapping) else (
        value if isinstance(value, (list, tuple)) else ())
    for child in children:
        found = _find_extension(child)
        if found is not None:
            return found
    return None


# RFC 3339 date-time (section 5.6): any number of fractional digits (Go writes up to
# nine), "T", "t" or a space between date and time, "Z", "z" or a numeric offset.
_RFC3339 = re.compile(r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(?:\.(\d+))?"
                      r"([Zz]|[+-]\d{2}:\d{2})", re.ASCII)


def _validate_timestamp(value: object) -> None:
    if isinstance(value, bool):
        raise InvalidEnvelope("timestamp", "expected an RFC 3339 string or epoch milliseconds, "
                              "got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise InvalidEnvelope("timestamp", f"epoch milliseconds {value} is negative")
        return
    if isinstance(value, str):
        match = _RFC3339.fullmatch(value)
        if match is None:
            if _dt_without_offset(value):
                raise InvalidEnvelope("timestamp", f"{value!r} has no UTC offset")
            raise InvalidEnvelope("timestamp", f"{value!r} is not RFC 3339") from None
        # The shape is RFC 3339's; what is left is whether the date and time exist
        # (fromisoformat on the first 19 characters, any separator) and whether the
        # offset is one. The string itself is kept as it was received.
        offset = match.group(4)
        try:
            _dt.datetime.fromisoformat(value[:19])
            if len(offset) > 1 and (int(offset[1:3]) > 23 or int(offset[4:6]) > 59):
                raise ValueError(f"offset {offset} out of range")
        except ValueError as exc:
            raise InvalidEnvelope("timestamp", f"{value!r} is not a valid time ({exc})") from None
        return
    raise InvalidEnvelope(
        "timestamp", f"expected an RFC 3339 string or epoch milliseconds, got {_a(value)}")


def _dt_without_offset(value: str) -> bool:
    try:
        return _dt.datetime.fromisoformat(value).tzinfo is None
    except ValueError:
        return False
