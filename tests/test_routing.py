"""Aggregate id extraction, the stable hash and round-robin (no server, no actors)."""
from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest

from actorbus import Envelope, extract_aggregate_id
from actorbus.actors.routing import (keyless_routing_key, next_keyless_slot, pool_index,
                                     stable_hash)
from actorbus.bridge.extraction import is_valid_id

ENV = Envelope.create("from-envelope", "T", b"x")


def test_envelope_id_wins_over_headers_key_and_subject():
    headers = {"X-Aggregate-ID": "from-header"}
    assert extract_aggregate_id(ENV.encode(), headers, "from-key", "a.b.c") == "from-envelope"
    assert extract_aggregate_id(ENV, headers) == "from-envelope"


@pytest.mark.parametrize("headers, expected", [
    ({"aggregate-id": "d", "Aggregate-ID": "c", "x-aggregate-id": "b", "X-Aggregate-ID": "a"}, "a"),
    ({"aggregate-id": "d", "Aggregate-ID": "c", "x-aggregate-id": "b"}, "b"),
    ({"aggregate-id": "d", "Aggregate-ID": "c"}, "c"),
    ({"aggregate-id": "d"}, "d"),
    ({"X-AGGREGATE-ID": "odd-case"}, "odd-case"),
    ({"X-Aggregate-ID": "bad id!", "aggregate-id": "good"}, "good"),
])
def test_header_priority(headers, expected):
    assert extract_aggregate_id(b"raw", headers) == expected


def test_key_then_subject_only_when_asked():
    assert extract_aggregate_id(b"raw", {}, "key-1", "orders.created.o-9") == "key-1"
    assert extract_aggregate_id(b"raw", {}, None, "orders.created.o-9") is None
    assert extract_aggregate_id(b"raw", {}, None, "orders.created.o-9",
                                key_from_subject=True) == "o-9"
    assert extract_aggregate_id(b"raw", {}, "bad key", None) is None


def test_invalid_envelope_bytes_fall_through_to_headers():
    assert extract_aggregate_id(b"\x81\xa1a\x01", {"X-Aggregate-ID": "h"}) == "h"


@pytest.mark.parametrize("value, valid", [
    ("a", True), ("order:1_2-3.4/5", True), ("x" * 256, True), ("x" * 257, False),
    ("", False), ("has space", False), ("é", False), ("a*b", False), (7, False), (None, False),
])
def test_valid_ids(value, valid):
    assert is_valid_id(value) is valid


def test_stable_hash_is_fnv1a_32():
    assert stable_hash("") == 0x811C9DC5
    assert stable_hash("a") == 0xE40C292C
    assert stable_hash("foobar") == 0xBF9CF968


def test_stable_hash_is_the_same_in_another_interpreter():
    # Python's own hash() is salted per process; ours must not be.
    code = "from actorbus.actors.routing import stable_hash; print(stable_hash('order-42'))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(other.stdout) == stable_hash("order-42")


def test_keyless_slots_spread_strictly_round_robin():
    pool, messages = 7, 7 * 50 + 3
    counts = Counter(pool_index(keyless_routing_key(s), s, pool)
                     for s in (next_keyless_slot() for _ in range(messages)))
    assert len(counts) == pool
    assert all(abs(c - messages / pool) <= 1 for c in counts.values())


def test_keyed_routing_is_stable_and_ignores_the_slot_rule():
    assert pool_index("order-1", None, 8) == stable_hash("order-1") % 8
    assert keyless_routing_key(12) == "rr-12"


def test_use_subject_is_a_deprecated_alias_of_key_from_subject():
    with pytest.warns(DeprecationWarning, match="key_from_subject"):
        assert extract_aggregate_id(b"raw", {}, None, "orders.created.o-9",
                                    use_subject=True) == "o-9"


def test_headers_alone_are_enough_data_is_keyword_optional():
    assert extract_aggregate_id(headers={"X-Aggregate-ID": "host-1"}) == "host-1"
    assert extract_aggregate_id(headers={"x-aggregate-id": "bad key"}) is None
