"""``actorbus dlq``: dead letters listed, shown, redriven and purged on a real nats-server."""
from __future__ import annotations

import asyncio
import datetime as dt
import json

import nats
import nats.js.errors
import pytest
from click.testing import CliRunner

from actorbus import Envelope
from actorbus.cli import main
from actorbus.dlq import DeadLetterInputError, describe_body, parse_time
from tests import handlers
from tests.support import read_records, stream_info, stream_messages, wait_for, wait_for_stats

pytestmark = pytest.mark.integration


def dlq(url: str, *args: str, input: str | None = None):
    """Run ``actorbus dlq ARGS`` against ``url``; the click result (stdout, stderr apart)."""
    return CliRunner().invoke(main, ["dlq", *args, "--servers", url], input=input,
                              catch_exceptions=False)


def js_run(url: str, work):
    async def go():
        nc = await nats.connect(url)
        try:
            return await work(nc.jetstream())
        finally:
            await nc.close()
    return asyncio.run(go())


def held(url: str, stream: str) -> list:
    """The messages ``stream`` holds, oldest first, skipping deleted sequences."""
    async def read(js):
        found, seq = [], 1
        while True:
            try:
                msg = await js.get_msg(stream, seq, subject=">", next=True)
            except nats.js.errors.NotFoundError:
                return found
            found.append(msg)
            seq = msg.seq + 1
    return js_run(url, read)


def letter_headers(subject: str, seq: int, error: str = "RuntimeError: boom",
                   **extra: str) -> dict[str, str]:
    """Headers as the Bridge writes them on a dead letter (bridge/settlement.py)."""
    return {**extra, "Actorbus-Original-Subject": subject, "Actorbus-Stream": "ORDERS",
            "Actorbus-Stream-Sequence": str(seq), "Actorbus-Delivery-Count": "5",
            "Actorbus-Error": error}


def seed(url: str, letters: list[tuple[str, bytes, dict[str, str]]]) -> None:
    """ORDERS (orders.>) and ORDERS_DLQ (deadletter.ORDERS) holding ``letters``."""
    async def work(js):
        await js.add_stream(name="ORDERS", subjects=["orders.>"])
        await js.add_stream(name="ORDERS_DLQ", subjects=["deadletter.ORDERS"])
        for _, body, headers in letters:
            await js.publish("deadletter.ORDERS", body, headers=headers)
    js_run(url, work)


def one_line_exit_2(result, *words: str) -> None:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_a_poison_message_is_listed_shown_redriven_once_fixed_and_handled_once(make_bus, records,
                                                                              nats_server):
    url = nats_server.url
    broken = make_bus(pool_size=1)
    broken.subscribe("orders.>", handlers.fail_poison, durable="orders", max_deliver=2, retries=0,
                     nak_delay=0.01)
    broken.publish_envelope("orders.a", Envelope.create("good-1", "Happened", b"fine"))
    poison = Envelope.create("bad-1", "Happened", b"poison", trace_id="trace-7")
    poison_seq = broken.publish_envelope("orders.bad", poison).sequence
    wait_for_stats(broken, "dead_lettered", 1)
    wait_for_stats(broken, "acked", 1)
    broken.stop()

    listed = dlq(url, "list", "--subscription-stream", "ORDERS")
    assert listed.exit_code == 0, listed.stderr
    [line] = listed.stdout.splitlines()
    assert line.split()[0] == "1" and "orders.bad" in line and f"ORDERS#{poison_seq}" in line
    assert "deliveries 2" in line and "RuntimeError: poison message" in line

    shown = dlq(url, "show", "1", "--stream", "ORDERS_DLQ")
    assert shown.exit_code == 0, shown.stderr
    text = shown.stdout
    assert "original subject: orders.bad" in text and "error:            RuntimeError: poison" in text
    assert f"Actorbus-Original-Msg-Id: {poison.event_id}" in text and "X-Aggregate-ID: bad-1" in text
    assert "body: msgpack envelope" in text and "aggregate_id: bad-1" in text
    assert "payload: poison" in text and "trace_id: trace-7" in text

    # Dry: nothing moves.
    dry = dlq(url, "redrive", "--stream", "ORDERS_DLQ", "--dry-run")
    assert dry.exit_code == 0 and f"actorbus-redrive-ORDERS-{poison_seq}" in dry.stdout
    assert stream_info(url, "ORDERS_DLQ").state.messages == 1
    orders_last = stream_info(url, "ORDERS").state.last_seq

    # "Fixed": a bus whose handler takes it, on the same durable.
    fixed = make_bus(pool_size=1)
    fixed.subscribe("orders.>", handlers.record, durable="orders", max_deliver=2, retries=0)
    redriven = dlq(url, "redrive", "--stream", "ORDERS_DLQ", "--subject", "orders.*")
    assert redriven.exit_code == 0, redriven.stderr
    assert "1 stored, 0 duplicate(s)" in redriven.stdout
    wait_for(lambda: [r for r in read_records(records) if r.kind == "ok" and r.data == "poison"],
             what="the redriven message handled")
    assert stream_info(url, "ORDERS_DLQ").state.messages == 0
    [stored] = [m for m in stream_messages(url, "ORDERS") if m.seq > orders_last]
    assert stored.subject == "orders.bad" and stored.data == poison.encode()
    assert stored.headers["Nats-Msg-Id"] == f"actorbus-redrive-ORDERS-{poison_seq}"
    assert stored.headers["X-Aggregate-ID"] == "bad-1"
    assert not any(name.startswith("Actorbus-") for name in stored.headers)

    # The first redrive removed it: the same selection again selects nothing.
    again = dlq(url, "redrive", "--stream", "ORDERS_DLQ", "--subject", "orders.*")
    one_line_exit_2(again, "no dead letter in ORDERS_DLQ", "orders.*")
    wait_for_stats(fixed, "acked", 1)
    handled = [r for r in read_records(records) if r.data == "poison"]
    assert [r.kind for r in handled] == ["fail", "fail", "ok"]


def test_a_redrive_interrupted_before_its_delete_stores_once_when_run_again(nats_server):
    """The republish was acknowledged but the dead letter not yet deleted: the next
    redrive publishes the same Nats-Msg-Id, the stream drops it, the letter goes."""
    url = nats_server.url
    headers = letter_headers("orders.x", 41, **{"X-Tenant": "t1"})
    seed(url, [("orders.x", b"body", headers)])
    assert dlq(url, "redrive", "--stream", "ORDERS_DLQ").exit_code == 0
    js_run(url, lambda js: js.publish("deadletter.ORDERS", b"body", headers=headers))  # as if left

    result = dlq(url, "redrive", "--stream", "ORDERS_DLQ")
    assert result.exit_code == 0, result.stderr
    assert "0 stored, 1 duplicate(s)" in result.stdout
    [stored] = stream_messages(url, "ORDERS")
    assert stored.headers == {"X-Tenant": "t1", "Nats-Msg-Id": "actorbus-redrive-ORDERS-41"}
    assert stream_info(url, "ORDERS_DLQ").state.messages == 0


def test_redrive_keeps_the_dead_letter_stream_s_order(nats_server):
    url = nats_server.url
    seed(url, [("orders.k", f"m{n}".encode(), letter_headers("orders.k", 10 + n)) for n in range(5)])
    result = dlq(url, "redrive", "--stream", "ORDERS_DLQ", "--from-seq", "2", "--to-seq", "4")
    assert result.exit_code == 0, result.stderr
    assert [m.data for m in stream_messages(url, "ORDERS")] == [b"m1", b"m2", b"m3"]
    left = held(url, "ORDERS_DLQ")
    assert [m.data for m in left] == [b"m0", b"m4"]


def test_filters_pick_by_subject_error_time_and_sequence(nats_server):
    url = nats_server.url
    seed(url, [("orders.a.1", b"1", letter_headers("orders.a.1", 1, "KeyError: x")),
               ("orders.b", b"2", letter_headers("orders.b", 2, "invalid msgpack envelope: payload")),
               ("orders.a.2", b"3", letter_headers("orders.a.2", 3, "RuntimeError: poison"))])

    def sequences(*args: str) -> list[str]:
        result = dlq(url, "list", "--stream", "ORDERS_DLQ", *args)
        assert result.exit_code == 0, result.stderr
        return [line.split()[0] for line in result.stdout.splitlines()]

    assert sequences() == ["1", "2", "3"]
    assert sequences("--subject", "orders.a.>") == ["1", "3"]
    assert sequences("--subject", "orders.*") == ["2"]
    assert sequences("--error", "ENVELOPE") == ["2"]
    assert sequences("--from-seq", "2") == ["2", "3"]
    assert sequences("--to-seq", "2", "--subject", "orders.a.*") == ["1"]
    assert sequences("--since", "10m") == ["1", "2", "3"]
    one_line_exit_2(dlq(url, "list", "--stream", "ORDERS_DLQ", "--until", "2000-01-01T00:00:00Z"),
                    "no dead letter", "until 2000-01-01")
    future = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()
    one_line_exit_2(dlq(url, "list", "--stream", "ORDERS_DLQ", "--since", future),
                    "no dead letter", "since")
    assert sequences("--until", future) == ["1", "2", "3"]


def test_show_makes_json_envelopes_and_plain_bodies_readable(nats_server):
    url = nats_server.url
    go_json = json.dumps({"event_id": "e-1", "aggregate_id": "agg-9", "event_type": "Shipped",
                          "event_version": 2, "timestamp": "2024-05-01T10:00:00.5Z",
                          "payload": {"qty": 3}}).encode()
    seed(url, [("orders.j", go_json, letter_headers("orders.j", 1)),
               ("orders.t", b"hello there", letter_headers("orders.t", 2)),
               ("orders.b", b"\xc1\x00\xff", letter_headers("orders.b", 3))])
    text = dlq(url, "show", "--stream", "ORDERS_DLQ").stdout
    json_part, text_part, binary_part = text.split("\n\n")
    assert "body: JSON envelope" in json_part and "aggregate_id: agg-9" in json_part
    assert 'payload: {"qty": 3}' in json_part and "event_version: 2" in json_part
    assert "body: text" in text_part and "body: hello there" in text_part
    assert "body: binary" in binary_part and "body (hex): c1 00 ff" in binary_part


def test_dry_run_purge_changes_nothing_and_purge_yes_removes(nats_server):
    url = nats_server.url
    seed(url, [("orders.a", b"1", letter_headers("orders.a", 1)),
               ("orders.b", b"2", letter_headers("orders.b", 2))])
    dry = dlq(url, "purge", "--stream", "ORDERS_DLQ", "--dry-run")
    assert dry.exit_code == 0 and "2 dead letter(s) would be deleted" in dry.stdout
    assert stream_info(url, "ORDERS_DLQ").state.messages == 2

    declined = dlq(url, "purge", "--stream", "ORDERS_DLQ", input="n\n")
    assert declined.exit_code == 1 and declined.stderr.endswith("nothing deleted\n")
    assert stream_info(url, "ORDERS_DLQ").state.messages == 2

    done = dlq(url, "purge", "--stream", "ORDERS_DLQ", "--subject", "orders.b", "--yes")
    assert done.exit_code == 0 and "deleted 1 dead letter(s)" in done.stdout
    assert [m.data for m in held(url, "ORDERS_DLQ")] == [b"1"]
    assert dlq(url, "purge", "--subscription-stream", "ORDERS", input="y\n").exit_code == 0
    assert stream_info(url, "ORDERS_DLQ").state.messages == 0
    assert stream_info(url, "ORDERS").state.messages == 0   # purge redrives nothing


def test_bad_input_is_one_line_and_exit_code_2(nats_server):
    url = nats_server.url
    seed(url, [("orders.a", b"1", letter_headers("orders.a", 1))])
    js_run(url, lambda js: js.publish("orders.z", b"not a dead letter"))

    one_line_exit_2(dlq(url, "list", "--stream", "NOPE_DLQ"), "no stream 'NOPE_DLQ'")
    one_line_exit_2(dlq(url, "list", "--subscription-stream", "NOPE"), "no stream 'NOPE_DLQ'")
    one_line_exit_2(dlq(url, "show", "--stream", "ORDERS"), "not a dead-letter stream")
    one_line_exit_2(dlq(url, "redrive", "--stream", "ORDERS"), "not a dead-letter stream")
    one_line_exit_2(dlq(url, "list", "--stream", "ORDERS_DLQ", "--from-seq", "5"), "no dead letter")
    one_line_exit_2(dlq(url, "redrive", "--stream", "ORDERS_DLQ", "--subject", "payments.>"),
                    "no dead letter", "payments.>")
    one_line_exit_2(dlq(url, "purge", "--stream", "ORDERS_DLQ", "--error", "nothing like it", "--yes"),
                    "no dead letter")
    one_line_exit_2(dlq(url, "list", "--stream", "ORDERS_DLQ", "--since", "yesterday"),
                    "'yesterday' is neither")
    one_line_exit_2(dlq(url, "list"), "--stream")
    one_line_exit_2(dlq(url, "list", "--stream", "A_DLQ", "--subscription-stream", "A"), "one of them")
    assert stream_info(url, "ORDERS_DLQ").state.messages == 1


def test_a_dead_letter_stream_on_a_subject_of_its_own_is_recognised_by_its_headers(nats_server):
    url = nats_server.url

    async def work(js):
        await js.add_stream(name="POISON", subjects=["poison.orders"])
        await js.publish("poison.orders", b"x", headers=letter_headers("orders.q", 3))
    js_run(url, work)
    result = dlq(url, "list", "--stream", "POISON")
    assert result.exit_code == 0 and "orders.q" in result.stdout


def test_the_value_helpers():
    now = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
    assert parse_time("10m", now) == now - dt.timedelta(minutes=10)
    assert parse_time("1h30m", now) == now - dt.timedelta(minutes=90)
    assert parse_time("2024-05-01T10:00:00Z", now) == dt.datetime(2024, 5, 1, 10, tzinfo=dt.UTC)
    with pytest.raises(DeadLetterInputError):
        parse_time("10 parsecs", now)
    assert describe_body(b"").kind == "empty"
    view = describe_body(Envelope.create("a", "T", b"\x00\x01").encode())
    assert view.kind == "msgpack envelope" and ("payload (hex)", "00 01") in view.fields
