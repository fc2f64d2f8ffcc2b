"""Which aggregate a message belongs to: the rules of SPEC §2."""
from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from actorbus.bridge.envelope import Envelope

log = logging.getLogger("actorbus.bridge")

_VALID_ID = re.compile(rb"[A-Za-z0-9:_\-./]{1,256}")

#: Header names that carry an aggregate id, in priority order.
AGGREGATE_ID_HEADERS = ("X-Aggregate-ID", "x-aggregate-id", "Aggregate-ID", "aggregate-id")
_HEADER_NAMES_FOLDED = {name.lower() for name in AGGREGATE_ID_HEADERS}

# First byte of a msgpack map (fixmap, map16, map32): anything else cannot
# be an envelope, so plain payloads are not decoded in vain.
_MSGPACK_MAP_PREFIX = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}


def is_valid_id(value: object) -> bool:
    """True when ``value`` is a str of 1-256 bytes of ``[A-Za-z0-9:_-./]``."""
    if not isinstance(value, str):
        return False
    try:
        raw = value.encode("ascii")
    except UnicodeEncodeError:
        return False
    return _VALID_ID.fullmatch(raw) is not None


def extract_aggregate_id(
    data: "bytes | Envelope | None",
    headers: Mapping[str, str] | None = None,
    key: str | None = None,
    subject: str | None = None,
    *,
    use_subject: bool = False,
) -> str | None:
    """Return the aggregate id of a message, or None when it has none.

    First match wins: a valid envelope's ``aggregate_id`` (``data`` may be
    an :class:`Envelope` or its encoded bytes); then the headers
    ``X-Aggregate-ID``, ``x-aggregate-id``, ``Aggregate-ID``,
    ``aggregate-id`` (then those names in any letter case); then ``key``;
    then, only with ``use_subject``, the last subject token. A candidate
    that is not a valid id is skipped, never used.
    """
    from actorbus.bridge.envelope import Envelope, InvalidEnvelope, decode_envelope

    if isinstance(data, Envelope):
        return data.aggregate_id
    if isinstance(data, (bytes, bytearray)) and data and data[0] in _MSGPACK_MAP_PREFIX:
        try:
            return decode_envelope(bytes(data)).aggregate_id
        except InvalidEnvelope:
            pass
    if headers:
        found = _from_headers(headers)
        if found is not None:
            return found
    if key is not None:
        if is_valid_id(key):
            return key
        log.debug("explicit key %r is not a valid aggregate id; ignored", key)
    if use_subject and subject:
        token = subject.rsplit(".", 1)[-1]
        if is_valid_id(token):
            return token
    return None


def _from_headers(headers: Mapping[str, str]) -> str | None:
    for name in AGGREGATE_ID_HEADERS:
        value = headers.get(name)
        if value is not None:
            if is_valid_id(value):
                return value
            log.debug("header %s=%r is not a valid aggregate id; ignored", name, value)
    for name, value in headers.items():
        if name not in AGGREGATE_ID_HEADERS and name.lower() in _HEADER_NAMES_FOLDED:
            if is_valid_id(value):
                return value
            log.debug("header %s=%r is not a valid aggregate id; ignored", name, value)
    return None
