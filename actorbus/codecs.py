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
from typing import Any, Mapping, Protocol

import msgpack


class EnvelopeFormat(enum.StrEnum):
    """Which encoding an envelope subscription reads (``AUTO``: recognised per message)."""

    AUTO = "auto"
    MSGPACK = "msgpack"


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


def _reject_ext(code: int, data: bytes) -> Any:
    raise CodecError(f"msgpack extension type {code} is not allowed")


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
        return msgpack.packb(dict(fields), use_bin_type=True)

    def decode(self, data: bytes) -> dict[str, Any]:
        """The map in ``data``; :class:`CodecError` for anything else."""
        try:
            wire = msgpack.unpackb(data, raw=False, ext_hook=_reject_ext, strict_map_key=True)
        except CodecError:
            raise
        except Exception as exc:  # msgpack raises several unrelated types
            detail = f" ({exc})" if str(exc) else ""
            raise CodecError(f"not valid msgpack{detail}: {describe_bytes(data)}; "
                             "expected a msgpack map of envelope fields") from None
        if not isinstance(wire, dict):
            raise CodecError(f"expected a msgpack map, got a msgpack {type(wire).__name__}: "
                             f"{describe_bytes(data)}")
        return wire


MSGPACK = MsgpackCodec()

#: The codec of each concrete format.
CODECS: Mapping[EnvelopeFormat, EnvelopeCodec] = {EnvelopeFormat.MSGPACK: MSGPACK}


def codec_for(data: bytes, format: EnvelopeFormat = EnvelopeFormat.AUTO) -> EnvelopeCodec:
    """The codec that reads ``data``: the one ``format`` names, or (``AUTO``) the one that
    recognises its first bytes; raise :class:`CodecError` when none does."""
    if format is not EnvelopeFormat.AUTO:
        return CODECS[EnvelopeFormat(format)]
    for codec in CODECS.values():
        if codec.recognises(data):
            return codec
    shapes = " or ".join(codec.shape for codec in CODECS.values())
    raise CodecError(f"not an envelope in any known encoding: expected {shapes}, "
                     f"got {describe_bytes(data)}")
