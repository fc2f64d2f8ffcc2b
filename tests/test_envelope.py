"""Envelope encoding and validation (no server, no actors)."""
from __future__ import annotations

import msgpack
import pytest

from actorbus import Envelope, InvalidEnvelope
from actorbus.codecs import EnvelopeFormat
from actorbus.envelope import decode_envelope

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
    (b"\xc1garbage", r"not valid msgpack: 8 bytes starting c1 67 61 72 62 61 67 65; expected a "
                     r"msgpack map"),
    (b"\x81\xc1", r"not valid msgpack.*: 2 bytes starting 81 c1"),
    (msgpack.packb([1, 2]), r"expected a msgpack map, got a msgpack list: 3 bytes starting 92 01 02"),
    (wire(event_id=msgpack.ExtType(5, b"x")),
     "invalid msgpack envelope: event_id: expected a string, got a msgpack extension type 5"),
])
def test_bytes_that_are_no_envelope_are_rejected_saying_what_they_were(data, problem):
    with pytest.raises(InvalidEnvelope, match=problem):
        decode_envelope(data, EnvelopeFormat.MSGPACK)


def test_bytes_in_no_known_encoding_name_the_encodings_and_show_the_bytes():
    with pytest.raises(InvalidEnvelope, match=r"not an envelope in any known encoding: expected a "
                                              r"msgpack map or a JSON object, got 4 bytes starting c0 ad be ef"):
        decode_envelope(b"\xc0\xad\xbe\xef")


def test_envelope_decode_is_the_inverse_of_encode():
    envelope = Envelope.create("order-1", "OrderPlaced", b"{}", trace_id="t-1")
    assert Envelope.decode(envelope.encode()) == envelope
    assert Envelope.decode(envelope.encode(EnvelopeFormat.MSGPACK), EnvelopeFormat.MSGPACK) == envelope


def test_oversize_input_is_rejected_before_decoding():
    with pytest.raises(InvalidEnvelope, match="over the 100-byte limit"):
        decode_envelope(wire(payload=b"x" * 200), max_bytes=100)


def test_constructing_an_invalid_envelope_raises():
    with pytest.raises(InvalidEnvelope, match="event_version"):
        Envelope(**{**VALID, "event_version": -1})


def test_already_validated_bytes_decode_to_the_same_envelope():
    env = Envelope(**VALID, trace_id="t")
    assert decode_envelope(env.encode(), validated=True) == env
