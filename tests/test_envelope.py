"""Envelope encoding and validation (no server, no actors)."""
from __future__ import annotations

import msgpack
import pytest

from actorbus import Envelope, InvalidEnvelope
from actorbus.bridge.envelope import decode_envelope

VALID = dict(event_id="e-1", aggregate_id="order-1", event_type="OrderPlaced", event_version=1,
             timestamp="2026-11-25T10:00:00Z", payload=b"x")


def wire(**changes) -> bytes:
    fields = {**VALID, **changes}
    return msgpack.packb({k: v for k, v in fields.items() if v is not ...}, use_bin_type=True)


def test_round_trip_keeps_every_field():
    env = Envelope(**VALID, trace_id="t", correlation_id="c", tenant_id="acme",
                   metadata={"source": "test"})
    assert decode_envelope(env.encode()) == env


def test_create_fills_id_and_utc_timestamp():
    env = Envelope.create("order-1", "OrderPlaced", b"x")
    assert env.event_id and env.timestamp.endswith("Z") and env.event_version == 1


def test_epoch_millisecond_timestamp_is_accepted():
    assert decode_envelope(wire(timestamp=1_764_064_800_000)).timestamp == 1_764_064_800_000


def test_unknown_fields_are_ignored():
    assert decode_envelope(wire(extra_field="x")).event_id == "e-1"


@pytest.mark.parametrize("changes, field", [
    ({"event_id": "  "}, "event_id"),
    ({"event_type": ""}, "event_type"),
    ({"aggregate_id": "has space"}, "aggregate_id"),
    ({"aggregate_id": "x" * 257}, "aggregate_id"),
    ({"event_version": 0}, "event_version"),
    ({"event_version": True}, "event_version"),
    ({"event_version": "1"}, "event_version"),
    ({"payload": b""}, "payload"),
    ({"payload": "text"}, "payload"),
    ({"timestamp": "yesterday"}, "timestamp"),
    ({"timestamp": "2026-11-25T10:00:00"}, "timestamp"),
    ({"timestamp": 1.5}, "timestamp"),
    ({"trace_id": 7}, "trace_id"),
    ({"metadata": [1]}, "metadata"),
    ({"event_id": ...}, "event_id"),
])
def test_invalid_fields_are_named(changes, field):
    with pytest.raises(InvalidEnvelope) as caught:
        decode_envelope(wire(**changes))
    assert caught.value.field == field and field in str(caught.value)


@pytest.mark.parametrize("data, problem", [
    (b"\xc1garbage", "not valid msgpack"),
    (msgpack.packb([1, 2]), "expected a msgpack map"),
    (msgpack.packb({"event_id": msgpack.ExtType(5, b"x")}), "extension type 5"),
])
def test_bytes_that_are_no_envelope_are_rejected(data, problem):
    with pytest.raises(InvalidEnvelope, match=problem):
        decode_envelope(data)


def test_oversize_input_is_rejected_before_decoding():
    with pytest.raises(InvalidEnvelope, match="over the 100-byte limit"):
        decode_envelope(wire(payload=b"x" * 200), max_bytes=100)


def test_constructing_an_invalid_envelope_raises():
    with pytest.raises(InvalidEnvelope, match="event_version"):
        Envelope(**{**VALID, "event_version": -1})


def test_already_validated_bytes_decode_to_the_same_envelope():
    env = Envelope(**VALID, trace_id="t")
    assert decode_envelope(env.encode(), validated=True) == env
