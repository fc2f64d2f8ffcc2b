"""What counts as an aggregate id: 1-256 bytes of ``[A-Za-z0-9:_\\-./]``."""
from __future__ import annotations

import re

# Every character it admits is ASCII, so 256 characters are 256 bytes: matched on the
# str itself, with no encoding on the way (every message's key passes through here).
_VALID_ID = re.compile(r"[A-Za-z0-9:_\-./]{1,256}")

#: Header names that carry an aggregate id, in priority order.
AGGREGATE_ID_HEADERS = ("X-Aggregate-ID", "x-aggregate-id", "Aggregate-ID", "aggregate-id")


def is_valid_id(value: object) -> bool:
    """True when ``value`` is a str of 1-256 bytes of ``[A-Za-z0-9:_-./]``."""
    return isinstance(value, str) and _VALID_ID.fullmatch(value) is not None
