"""Envelope codecs: how an envelope's fields become bytes on the wire and back.

A codec knows one wire encoding and nothing about validation: it turns a
map of envelope fields into bytes and bytes into such a map, and says
whether some bytes look like its encoding. :mod:`actorbus.envelope`
builds and validates :class:`~actorbus.envelope.Envelope` values on top.
A new encoding is a new :class:`EnvelopeCodec` and a new
:class:`EnvelopeFormat` member; nothing else changes.
"""
from __future__ import annotations

import enum
import json
from typing import Any, Protocol
from collections.abc import Iterable, Mapping

import msgpack


class EnvelopeFormat(enum.StrEnum):
    """Which encoding an envelope subscription reads (``AUTO``: recognised per message)."""

    AUTO = "auto"
    MSGPACK = "msgpack"
    JSON = "json"


class CodecError(ValueError):
    """Bytes that are not an envelope map in the codec's encoding; the message says what they were."""


class EnvelopeCodec(Protocol):
    """One wire encoding of envelopes."""

    #: The format this codec reads and writes.
    format: EnvelopeFormat
    #: The ``Content-Type`` header value of what it writes.
    content_type: str
    #: What an envelope in this encoding is, in words: "a msgpack map".
    shape: str

    def recognises(self, data: bytes) -> bool:
        """True when ``data`` may be in this encoding (a cheap look at its first bytes)."""

    def encode(self, fields: Mapping[str, Any]) -> bytes:
        """The wire form of an envelope's fields (unset optional fields already left out)."""

    def decode(self, data: bytes) -> dict[str, Any]:
        """The fields encoded in ``data``; raise :class:`CodecError` when it is no envelope map."""


def describe_bytes(data: bytes, shown: int = 16) -> str:
    """``data`` in words for an error: its length and first bytes in hex."""
    head = bytes(data[:shown]).hex(" ")
    more = " ..." if len(data) > shown else ""
    return f"{len(data)} bytes starting {head}{more}" if data else "0 bytes"


def wire_type(value: object) -> str:
    """The wire type of a decoded value in words, for an error naming what was received.

    Neutral between encodings ("string", "integer", "map", ...) except for
    msgpack extension values, which have no counterpart elsewhere.
    """
    if isinstance(value, msgpack.Timestamp):
        # What msgpack encoders in JavaScript write for a Date object.
        return "msgpack timestamp (extension type -1, e.g. a JavaScript Date)"
    if isinstance(value, msgpack.ExtType):
        return f"msgpack extension type {value.code}"
    for kind, name in _WIRE_TYPES:
        if isinstance(value, kind):
            return name
    return type(value).__name__


_WIRE_TYPES: tuple[tuple[type | tuple[type, ...], str], ...] = (
    (bool, "boolean"),  # before int: bool is an int in Python
    (int, "integer"), (float, "float"), (str, "string"), ((bytes, bytearray), "binary"),
    (type(None), "null"), (Mapping, "map"), ((list, tuple), "array"))


class MsgpackCodec:
    """A msgpack map with str keys; ``payload`` as binary."""

    format = EnvelopeFormat.MSGPACK
    content_type = "application/msgpack"
    shape = "a msgpack map"
    # First byte of a msgpack map (fixmap, map16, map32).
    _MAP_PREFIX = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}

    def recognises(self, data: bytes) -> bool:
        """True when ``data`` starts like a msgpack map."""
        return bool(data) and data[0] in self._MAP_PREFIX

    def encode(self, fields: Mapping[str, Any]) -> bytes:
        """A msgpack map of ``fields``."""
        packed: bytes = msgpack.packb(dict(fields), use_bin_type=True)
        return packed

    def decode(self, data: bytes) -> dict[str, Any]:
        """The map in ``data``; :class:`CodecError` for anything else.

        Extension values (``msgpack.ExtType``, ``msgpack.Timestamp``) are
        returned as they are: the envelope rejects them naming their field.
        """
        try:
            wire = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises several unrelated types
            detail = f" ({exc})" if str(exc) else ""
            raise CodecError(f"not valid msgpack{detail}: {describe_bytes(data)}; "
                             "expected a msgpack map of envelope fields") from None
        if not isinstance(wire, dict):
            raise CodecError(f"expected a msgpack map, got a msgpack {type(wire).__name__}: "
                             f"{describe_bytes(data)}")
        return wire


#: JSON's insignificant whitespace (RFC 8259): what may precede the ``{`` of an object.
JSON_WHITESPACE = b" \t\n\r"


def _reject_constant(name: str) -> Any:
    # json accepts NaN and Infinity by default; they are not JSON and Go refuses them.
    raise ValueError(f"{name} is not a JSON value")


class JsonCodec:
    """A JSON object as the Go EventBus writes it (``encoding/json``).

    The fields named in ``raw_fields`` (the envelope's ``payload``) are
    inline JSON values on the wire and their JSON text, as UTF-8 bytes, in
    the map: :meth:`decode` returns the exact text the producer wrote
    (whitespace around the value left out), :meth:`encode` writes the given
    text as it is. So a value goes through decode and encode unchanged,
    byte for byte, whatever its numbers, escapes or key order.

    :meth:`encode` writes what Go's ``json.Marshal`` writes for the Go
    struct: its fields in ``field_order`` (then any others), compact, with
    ``<``, ``>``, ``&``, U+2028 and U+2029 escaped as Go escapes them.
    """

    format = EnvelopeFormat.JSON
    content_type = "application/json"
    shape = "a JSON object"

    def __init__(self, raw_fields: Iterable[str] = (), field_order: Iterable[str] = ()) -> None:
        self.raw_fields = frozenset(raw_fields)
        self.field_order = tuple(field_order)
        self._decoder = json.JSONDecoder(parse_constant=_reject_constant)

    def recognises(self, data: bytes) -> bool:
        """True when ``data`` starts with ``{`` after optional JSON whitespace."""
        # A msgpack map never does: see MsgpackCodec._MAP_PREFIX.
        first = bytes(data[:1])
        if first == b"{":
            return True
        # Look further only past leading whitespace: plain bodies are not copied in vain.
        return first != b"" and first in JSON_WHITESPACE and \
            bytes(data).lstrip(JSON_WHITESPACE)[:1] == b"{"

    def encode(self, fields: Mapping[str, Any]) -> bytes:
        """A compact JSON object of ``fields``; raw fields are written as the JSON text they hold."""
        names = [n for n in self.field_order if n in fields] + [
            n for n in fields if n not in self.field_order]
        parts = []
        for name in names:
            value = fields[name]
            if name in self.raw_fields:
                text = bytes(value).decode("utf-8")
            else:
                # Maps in sorted key order, as Go writes a map.
                text = _go_escape(json.dumps(value, ensure_ascii=False, separators=(",", ":"),
                                             sort_keys=True, allow_nan=False))
            parts.append(f"{_go_escape(json.dumps(name, ensure_ascii=False))}:{text}")
        return ("{" + ",".join(parts) + "}").encode("utf-8")

    def decode(self, data: bytes) -> dict[str, Any]:
        """The object in ``data``; :class:`CodecError` for anything else."""
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CodecError(f"not valid JSON (not UTF-8: {exc.reason} at byte {exc.start}): "
                             f"{describe_bytes(data)}") from None
        try:
            return self._object(text)
        except CodecError:
            raise
        except ValueError as exc:  # json.JSONDecodeError and the constants refused
            raise CodecError(f"not valid JSON ({exc}): {describe_bytes(data)}; "
                             "expected a JSON object of envelope fields") from None

    def _object(self, text: str) -> dict[str, Any]:
        # One level by hand so that raw fields keep the text they were written as;
        # json.JSONDecoder.raw_decode parses each value and says where it ended.
        i = _skip_ws(text, 0)
        if text[i:i + 1] != "{":
            try:
                value = self._decoder.decode(text)
            except ValueError:
                raise CodecError(f"expected a JSON object, got {_describe_text(text)}") from None
            raise CodecError(f"expected a JSON object, got a JSON {_json_type(value)}: "
                             f"{_describe_text(text)}")
        fields: dict[str, Any] = {}
        i = _skip_ws(text, i + 1)
        if text[i:i + 1] == "}":
            i += 1
        else:
            while True:
                if text[i:i + 1] != '"':
                    raise json.JSONDecodeError("Expecting property name enclosed in double quotes",
                                               text, i)
                name, i = self._decoder.raw_decode(text, i)  # a string: it starts with '"'
                i = _skip_ws(text, i)
                if text[i:i + 1] != ":":
                    raise json.JSONDecodeError("Expecting ':' delimiter", text, i)
                start = _skip_ws(text, i + 1)
                value, i = self._decoder.raw_decode(text, start)
                # Later duplicates win, as in Go and in json.loads.
                fields[name] = text[start:i].encode("utf-8") if name in self.raw_fields else value
                i = _skip_ws(text, i)
                if text[i:i + 1] == ",":
                    i = _skip_ws(text, i + 1)
                elif text[i:i + 1] == "}":
                    i += 1
                    break
                else:
                    raise json.JSONDecodeError("Expecting ',' delimiter", text, i)
        if _skip_ws(text, i) != len(text):
            raise json.JSONDecodeError("Extra data", text, i)
        return fields


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\n\r":
        i += 1
    return i


def _go_escape(text: str) -> str:
    # Go's encoding/json escapes these inside strings (HTML safety, JavaScript line
    # terminators); outside strings they cannot occur in json.dumps's output.
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _json_type(value: object) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _describe_text(text: str) -> str:
    return describe_bytes(text.encode("utf-8"))


MSGPACK = MsgpackCodec()
#: The Go EventBus's field order (its struct, as ``encoding/json`` writes it), payload inline.
JSON = JsonCodec(raw_fields=("payload",),
                 field_order=("event_id", "aggregate_id", "event_type", "event_version",
                              "timestamp", "trace_id", "correlation_id", "tenant_id", "payload"))

#: The codec of each concrete format, in the order ``AUTO`` tries them.
CODECS: Mapping[EnvelopeFormat, EnvelopeCodec] = {EnvelopeFormat.MSGPACK: MSGPACK,
                                                   EnvelopeFormat.JSON: JSON}


def codec_for(data: bytes, format: EnvelopeFormat = EnvelopeFormat.AUTO) -> EnvelopeCodec:
    """The codec that reads ``data``: the one ``format`` names, or (``AUTO``) the one that
    recognises its first bytes; raise :class:`CodecError` when none does."""
    if format is not EnvelopeFormat.AUTO:
        return CODECS[EnvelopeFormat(format)]
    if data and data[0] in MsgpackCodec._MAP_PREFIX:   # the common case, without a loop
        return MSGPACK
    for codec in CODECS.values():
        if codec.recognises(data):
            return codec
    shapes = " or ".join(codec.shape for codec in CODECS.values())
    raise CodecError(f"not an envelope in any known encoding: expected {shapes}, "
                     f"got {describe_bytes(data)}")
