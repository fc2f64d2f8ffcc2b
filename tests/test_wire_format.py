"""The two envelope encodings on the wire: the Go EventBus's JSON and msgpack (no server).

The golden fixtures are JSON envelopes written by hand, byte for byte, as
the Go EventBus writes them with ``encoding/json`` from its struct
(jxt-core ``sdk/pkg/eventbus/envelope.go``): fields in struct order
``event_id, aggregate_id, event_type, event_version, timestamp, trace_id,
correlation_id, tenant_id, payload`` (the three optional ones
``omitempty``), compact, no trailing newline, ``time.Time`` as RFC 3339
with nanoseconds (trailing zeros trimmed) and the local offset, the
payload a ``json.RawMessage`` inline (compacted), ``<``, ``>``, ``&``
escaped as ``\\u003c``, ``\\u003e``, ``\\u0026``, other non-ASCII text as
UTF-8. Decoding does not depend on that order; only the byte-for-byte
round trip does.
"""
from __future__ import annotations

import json

import msgpack
import pytest

from actorbus import Envelope, InvalidEnvelope, extract_aggregate_id
from actorbus.codecs import CODECS, JSON, MSGPACK, EnvelopeFormat, codec_for
from actorbus.envelope import decode_envelope
from actorbus.publisher import envelope_headers

GO_ENVELOPES = {
    "minimal": (
        b'{"event_id":"0193a5f2-7c4e-7d2a-9b1e-3f6a8c2d4e51","aggregate_id":"order-1001",'
        b'"event_type":"OrderCreated","event_version":1,'
        b'"timestamp":"2026-12-01T11:00:40.965292879+08:00",'
        b'"payload":{"order_id":"order-1001","amount":99.5}}'),
    "every optional field, nested payload": (
        b'{"event_id":"evt-2","aggregate_id":"tenant-7:customer/42","event_type":"CustomerMoved",'
        b'"event_version":3,"timestamp":"2026-12-01T03:00:40.5Z","trace_id":"4bf92f3577b34da6",'
        b'"correlation_id":"req-981","tenant_id":"tenant-7","payload":{"address":{"lines":'
        b'["1 Main St",null],"geo":{"lat":-33.8688,"lon":151.2093}},"tags":[],"vip":true,'
        b'"visits":12345678901234567890,"ratio":1e-7}}'),
    "unicode and Go's escapes": (
        '{"event_id":"evt-3","aggregate_id":"order-3","event_type":"Note\\u003cImported\\u003e",'
        '"event_version":1,"timestamp":"2026-12-01T11:00:40.1+08:00","tenant_id":"caf\u00e9",'
        '"payload":{"客户":"张三","note":"line\\nbreak \\"quoted\\" \\u003cb\\u003e \\u0026 '
        '\U0001F600","sep":"\\u2028"}}').encode(),
    "string payload, negative offset, no fraction": (
        b'{"event_id":"evt-4","aggregate_id":"acct-9","event_type":"Renamed","event_version":12,'
        b'"timestamp":"2026-12-01T11:00:40-05:00","correlation_id":"c-1","payload":"plain text"}'),
    "array payload": (
        b'{"event_id":"evt-5","aggregate_id":"cart.5","event_type":"ItemsAdded","event_version":2,'
        b'"timestamp":"2026-02-28T23:59:59.999999999+14:00","payload":[{"sku":"A-1","qty":2},'
        b'{"sku":"B-2","qty":1}]}'),
}


@pytest.mark.parametrize("name", GO_ENVELOPES)
def test_go_envelopes_round_trip_byte_for_byte(name):
    wire = GO_ENVELOPES[name]
    envelope = decode_envelope(wire)                       # detected as JSON
    again = envelope.encode(EnvelopeFormat.JSON)
    assert again == wire
    assert decode_envelope(again) == envelope              # identical fields
    assert decode_envelope(wire, EnvelopeFormat.JSON) == envelope
    as_msgpack = envelope.encode(EnvelopeFormat.MSGPACK)   # and across encodings
    assert decode_envelope(as_msgpack) == envelope
    assert decode_envelope(as_msgpack).encode(EnvelopeFormat.JSON) == wire


def test_a_go_envelope_decodes_to_these_fields():
    envelope = decode_envelope(GO_ENVELOPES["every optional field, nested payload"])
    assert envelope.event_id == "evt-2" and envelope.aggregate_id == "tenant-7:customer/42"
    assert envelope.event_type == "CustomerMoved" and envelope.event_version == 3
    assert envelope.timestamp == "2026-12-01T03:00:40.5Z"
    assert (envelope.trace_id, envelope.correlation_id, envelope.tenant_id) == (
        "4bf92f3577b34da6", "req-981", "tenant-7")
    assert envelope.metadata is None
    # The payload is its JSON text exactly as written; payload_json() parses it.
    assert envelope.payload.startswith(b'{"address":{"lines":["1 Main St",null]')
    assert envelope.payload_json()["visits"] == 12345678901234567890
    assert envelope.payload_json()["address"]["geo"] == {"lat": -33.8688, "lon": 151.2093}


def test_unicode_and_go_escapes_decode_to_text():
    envelope = decode_envelope(GO_ENVELOPES["unicode and Go's escapes"])
    assert envelope.event_type == "Note<Imported>" and envelope.tenant_id == "café"
    assert envelope.payload_json() == {"客户": "张三", "note": 'line\nbreak "quoted" <b> & 😀',
                                       "sep": "\u2028"}


def test_nanosecond_timestamps_are_kept_as_received():
    for wire in GO_ENVELOPES.values():
        stamp = json.loads(wire)["timestamp"]
        assert decode_envelope(wire).timestamp == stamp


def test_whitespace_and_field_order_do_not_matter_when_reading():
    text = ('\n\t {  "payload" : { "a" : [ 1 , 2 ] } ,\r\n "timestamp":"2026-12-01T11:00:40Z",'
            '"event_version":1,"event_type":"T","aggregate_id":"a","event_id":"e",'
            '"trace_id":"","correlation_id":null,"added_later":{"x":1}}  \n')
    envelope = decode_envelope(text.encode())
    assert envelope.payload == b'{ "a" : [ 1 , 2 ] }'     # the value's text, as written
    assert envelope.trace_id is None and envelope.correlation_id is None   # empty: absent
    assert envelope.encode(EnvelopeFormat.JSON) == (
        b'{"event_id":"e","aggregate_id":"a","event_type":"T","event_version":1,'
        b'"timestamp":"2026-12-01T11:00:40Z","payload":{ "a" : [ 1 , 2 ] }}')


def test_python_envelopes_written_as_json_are_what_go_writes():
    envelope = Envelope(event_id="e-1", aggregate_id="order-1", event_type="A&B",
                        event_version=2, timestamp=1_764_064_800_500, payload=b'{"n":1}',
                        trace_id="", tenant_id="t", metadata={"z": 1, "a": [True]})
    assert envelope.encode(EnvelopeFormat.JSON) == (
        b'{"event_id":"e-1","aggregate_id":"order-1","event_type":"A\\u0026B","event_version":2,'
        b'"timestamp":"2025-11-25T10:00:00.5Z","tenant_id":"t","payload":{"n":1},'
        b'"metadata":{"a":[true],"z":1}}')


def test_a_payload_that_is_not_json_cannot_be_written_as_json():
    envelope = Envelope.create("order-1", "T", b"\x00binary")
    with pytest.raises(InvalidEnvelope, match="invalid JSON envelope: payload: is not JSON text"):
        envelope.encode(EnvelopeFormat.JSON)
    assert decode_envelope(envelope.encode()) == envelope   # msgpack carries any bytes


def test_envelope_headers_name_the_encoding():
    envelope = Envelope.create("order-1", "T", b"{}")
    assert envelope_headers(envelope, EnvelopeFormat.JSON) == {
        "Nats-Msg-Id": envelope.event_id, "Content-Type": "application/json",
        "X-Aggregate-ID": "order-1"}
    assert envelope_headers(envelope, EnvelopeFormat.MSGPACK)["Content-Type"] == "application/msgpack"


# ------------------------------------------------------------------ recognition
MSGPACK_MAP_PREFIXES = {n: msgpack.packb({f"k{i}": i for i in range(n)})[:1] for n in
                        (*range(16), 16, 65535, 65536)}


def test_no_msgpack_map_starts_like_json():
    # fixmap 0x80-0x8f (0-15 entries), map16 0xde (up to 65535), map32 0xdf.
    assert set(MSGPACK_MAP_PREFIXES.values()) == {bytes([b]) for b in range(0x80, 0x90)} | {
        b"\xde", b"\xdf"}
    json_starts = {ord("{")} | set(b" \t\n\r")
    for first in MSGPACK_MAP_PREFIXES.values():
        assert first[0] not in json_starts
    for first in sorted({bytes([b]) for b in MSGPACK._MAP_PREFIX}):
        data = first + b"\x00" * 8
        assert first[0] not in json_starts and not JSON.recognises(data) and MSGPACK.recognises(data)


@pytest.mark.parametrize("data, format", [
    (b'{"a":1}', EnvelopeFormat.JSON), (b' \t\r\n{', EnvelopeFormat.JSON),
    (msgpack.packb({}), EnvelopeFormat.MSGPACK), (msgpack.packb({"k": 1}), EnvelopeFormat.MSGPACK),
])
def test_auto_picks_the_codec_by_the_first_bytes(data, format):
    assert codec_for(data).format is format
    assert CODECS[format].content_type == f"application/{format}"


@pytest.mark.parametrize("data", [b"", b"  ", b"[1]", b'"x"', b"\x93\x01\x02\x03", b" \x80"])
def test_json_does_not_recognise_what_is_no_object(data):
    assert not JSON.recognises(data)


# ------------------------------------------------------------------ errors
JSON_VALID = json.loads(GO_ENVELOPES["minimal"])


def json_wire(**changes) -> bytes:
    fields = {**JSON_VALID, **changes}
    return json.dumps({k: v for k, v in fields.items() if v is not ...}).encode()


@pytest.mark.parametrize("changes, message", [
    ({"payload": ...}, "invalid JSON envelope: payload: missing"),
    ({"event_type": ...}, "invalid JSON envelope: event_type: missing"),
    ({"payload": None}, "invalid JSON envelope: payload: null"),
    ({"event_version": "1"}, "invalid JSON envelope: event_version: expected an integer, got a string"),
    ({"event_version": 1.5}, "event_version: expected an integer, got a float"),
    ({"event_version": 0}, "event_version: 0 is below 1"),
    ({"timestamp": {"$date": 1}}, "timestamp: expected an RFC 3339 string or epoch milliseconds, "
                                  "got a map"),
    ({"timestamp": "2026-12-01 11:00:40"}, "timestamp: '2026-12-01 11:00:40' has no UTC offset"),
    ({"timestamp": "2026-02-30T11:00:40Z"}, "timestamp: '2026-02-30T11:00:40Z' is not a valid time"),
    ({"timestamp": "2026-12-01T11:00:40+0800"}, "is not RFC 3339"),
    ({"aggregate_id": 42}, "aggregate_id: expected a string, got an integer"),
    ({"trace_id": ["t"]}, "trace_id: expected a string, got an array"),
    ({"metadata": "m"}, "metadata: expected a map, got a string"),
])
def test_json_errors_name_the_format_the_field_and_the_type_received(changes, message):
    with pytest.raises(InvalidEnvelope) as caught:
        decode_envelope(json_wire(**changes))
    assert message in str(caught.value)
    assert caught.value.format is EnvelopeFormat.JSON


@pytest.mark.parametrize("data, message", [
    (b'{"event_id": "e",}', r"invalid JSON envelope: <envelope>: not valid JSON \(Expecting property "
                            r"name enclosed in double quotes: line 1 column 18 \(char 17\)\): 18 bytes"),
    (b'{"a":1} x', r"not valid JSON \(Extra data"),
    (b'{"a":NaN}', r"not valid JSON \(NaN is not a JSON value\)"),
    (b'{"a":"\xff"}', r"not valid JSON \(not UTF-8: invalid start byte at byte 6\)"),
])
def test_bytes_that_are_no_json_object_say_so(data, message):
    with pytest.raises(InvalidEnvelope, match=message):
        decode_envelope(data)


def test_a_fixed_format_names_what_it_got_instead():
    with pytest.raises(InvalidEnvelope, match="invalid JSON envelope: <envelope>: expected a JSON "
                                              "object, got a JSON array: 5 bytes starting 5b"):
        decode_envelope(b"[1,2]", EnvelopeFormat.JSON)
    with pytest.raises(InvalidEnvelope, match="invalid msgpack envelope: <envelope>: not valid msgpack"):
        decode_envelope(GO_ENVELOPES["minimal"], EnvelopeFormat.MSGPACK)
    with pytest.raises(InvalidEnvelope, match=r"invalid JSON envelope: <envelope>: not valid JSON "
                                              r"\(not UTF-8: invalid start byte at byte 0\): "
                                              r"\d+ bytes starting 8"):
        decode_envelope(Envelope.create("a", "T", b"x").encode(), EnvelopeFormat.JSON)


MSGPACK_VALID = dict(event_id="e-1", aggregate_id="order-1", event_type="T", event_version=1,
                     timestamp="2026-12-01T11:00:40.965292879+08:00", payload=b"x")


@pytest.mark.parametrize("changes, message", [
    ({"payload": "text"}, "invalid msgpack envelope: payload: expected binary (bytes), got a string"),
    ({"timestamp": msgpack.Timestamp(1_764_558_040, 0)},
     "timestamp: expected an RFC 3339 string or epoch milliseconds, got a msgpack timestamp "
     "(extension type -1, e.g. a JavaScript Date)"),
    ({"metadata": {"at": msgpack.Timestamp(1, 0)}}, "metadata: holds a msgpack timestamp"),
    ({"metadata": {"x": [msgpack.ExtType(7, b"")]}}, "metadata: holds a msgpack extension type 7"),
])
def test_msgpack_mixed_types_name_the_field_and_the_type_received(changes, message):
    data = msgpack.packb({**MSGPACK_VALID, **changes}, use_bin_type=True, datetime=False)
    with pytest.raises(InvalidEnvelope) as caught:
        decode_envelope(data)
    assert message in str(caught.value) and caught.value.format is EnvelopeFormat.MSGPACK


def test_msgpack_accepts_nanosecond_timestamps_too():
    data = msgpack.packb(MSGPACK_VALID, use_bin_type=True)
    assert decode_envelope(data).timestamp == "2026-12-01T11:00:40.965292879+08:00"


# ------------------------------------------------------------------ routing
def test_a_plain_message_gets_the_aggregate_id_of_a_json_envelope_body():
    # The newest Go publisher sets no header: the key comes from the body.
    assert extract_aggregate_id(GO_ENVELOPES["minimal"], headers=None) == "order-1001"
    assert extract_aggregate_id(GO_ENVELOPES["minimal"], {"X-Aggregate-ID": "other"}) == "order-1001"
    # Not a valid envelope: the header rules apply.
    assert extract_aggregate_id(b'{"aggregate_id":"x"}', {"X-Aggregate-ID": "h-1"}) == "h-1"
    assert extract_aggregate_id(b'{"not": "an envelope"}') is None
