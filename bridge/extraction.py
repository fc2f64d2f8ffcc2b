"""Which aggregate a message belongs to: the rules of SPEC §2."""
from __future__ import annotations

import logging
from typing import Mapping

from actorbus.codecs import CODECS
from actorbus.envelope import Envelope, InvalidEnvelope, decode_envelope
from actorbus.ids import AGGREGATE_ID_HEADERS, is_valid_id

log = logging.getLogger("actorbus.bridge")

_HEADER_NAMES_FOLDED = {name.lower() for name in AGGREGATE_ID_HEADERS}


def extract_aggregate_id(
    data: bytes | Envelope | None = None,
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
    if isinstance(data, Envelope):
        return data.aggregate_id
    # Only bytes that look like an envelope are decoded: plain payloads are not decoded in vain
    # (a JSON body is common on plain subjects; one without the key is no envelope).
    if (isinstance(data, (bytes, bytearray)) and any(c.recognises(data) for c in CODECS.values())
            and b"aggregate_id" in data):
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
