"""Which aggregate a message belongs to: its envelope, its headers, a given key, its subject."""
from __future__ import annotations

import json
import logging
import warnings
from typing import Any
from collections.abc import Mapping

import msgpack

from actorbus.codecs import CODECS, JSON, MsgpackCodec
from actorbus.config import SubscriptionConfig
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
    key_from_subject: bool = False,
    use_subject: bool | None = None,
) -> str | None:
    """Return the aggregate id of a message, or None when it has none.

    First match wins: a valid envelope's ``aggregate_id`` (``data`` may be
    an :class:`Envelope` or its encoded bytes); then the headers
    ``X-Aggregate-ID``, ``x-aggregate-id``, ``Aggregate-ID``,
    ``aggregate-id`` (then those names in any letter case); then ``key``;
    then, only with ``key_from_subject`` (the name ``subscribe`` uses for
    the same switch), the last subject token. A candidate that is not a
    valid id is skipped, never used.

    ``use_subject`` is the deprecated name of ``key_from_subject``; it is
    accepted, with a :class:`DeprecationWarning`, until the next release.
    """
    if use_subject is not None:
        warnings.warn("extract_aggregate_id(use_subject=...) is deprecated; "
                      "use key_from_subject=...", DeprecationWarning, stacklevel=2)
        key_from_subject = key_from_subject or use_subject
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
    if key_from_subject and subject:
        return subject_key(subject)
    return None


def subscription_key(sub: SubscriptionConfig, subject: str, data: bytes,
                     headers: Mapping[str, str] | None) -> str | None:
    """The aggregate id a message of ``sub`` is routed by, or None (keyless): an envelope's
    as :func:`envelope_key` reads it, a plain message's as :func:`extract_aggregate_id`."""
    if sub.envelope:
        # Not decoded here: the member validates it (an invalid one comes back INVALID).
        return envelope_key(data, headers, subject, partitioned=sub.partitions is not None,
                            key_from_subject=sub.key_from_subject)
    return extract_aggregate_id(data, headers, None, subject, key_from_subject=sub.key_from_subject)


def subject_key(subject: str) -> str | None:
    """The subject's last token if it is a valid aggregate id, else None."""
    token = subject.rsplit(".", 1)[-1]
    return token if is_valid_id(token) else None


def envelope_key(data: bytes, headers: Mapping[str, str] | None, subject: str, *,
                 partitioned: bool = False, key_from_subject: bool = False) -> str | None:
    """The aggregate id the Bridge routes an envelope by, read without validating it.

    On a partitioned stream, the subject's last token (the server partitioned it
    by that); else an aggregate-id header; else the envelope's own
    ``aggregate_id``, peeked at with the C decoders; else, with
    ``key_from_subject``, the last subject token. The pool member that handles
    it validates the whole envelope, and that its ``aggregate_id`` is this key:
    the Bridge, which every message passes through, does not pay for that.
    """
    if partitioned:
        return subject_key(subject)
    if headers:
        found = _from_headers(headers)
        if found is not None:
            return found
    found = peek_aggregate_id(data)
    if found is None and key_from_subject:
        return subject_key(subject)
    return found


def peek_aggregate_id(data: Any) -> str | None:
    """The ``aggregate_id`` of an encoded envelope if it has a valid one, else None; nothing
    else of the envelope is checked, and nothing raises."""
    try:
        if data and data[0] in MsgpackCodec._MAP_PREFIX:
            wire = msgpack.unpackb(data, raw=False)
        elif JSON.recognises(data):
            wire = json.loads(data)
        else:
            return None
    except Exception:   # not an envelope: its member says why, and it is dead-lettered
        return None
    value = wire.get("aggregate_id") if isinstance(wire, dict) else None
    return value if isinstance(value, str) and is_valid_id(value) else None


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


def invalid_id_header(headers: Mapping[str, str] | None) -> tuple[str, str] | None:
    """The first aggregate-id header whose value is not a valid id, as ``(name, value)``.

    The Bridge asks this only when no id was found, to report a header that
    was present but ignored (the message then goes round-robin).
    """
    if not headers:
        return None
    for name, value in headers.items():
        if name.lower() in _HEADER_NAMES_FOLDED and not is_valid_id(value):
            return name, value
    return None
