"""What counts as an aggregate id (SPEC §2): 1–256 bytes of ``[A-Za-z0-9:_\\-./]``."""
from __future__ import annotations

import re

_VALID_ID = re.compile(rb"[A-Za-z0-9:_\-./]{1,256}")

#: Header names that carry an aggregate id, in priority order.
AGGREGATE_ID_HEADERS = ("X-Aggregate-ID", "x-aggregate-id", "Aggregate-ID", "aggregate-id")


def is_valid_id(value: object) -> bool:
    """True when ``value`` is a str of 1-256 bytes of ``[A-Za-z0-9:_-./]``."""
    if not isinstance(value, str):
        return False
    try:
        raw = value.encode("ascii")
    except UnicodeEncodeError:
        return False
    return _VALID_ID.fullmatch(raw) is not None
