"""A subscription's book: what a Bridge keeps of one subscription, with its verbs."""
from __future__ import annotations

import logging
from types import SimpleNamespace

from actorbus.actors.messages import Delivery
from actorbus.bridge.book import INVALID_KEY_WARNING_INTERVAL, RECOVERED_RECORD_GRACE, SubscriptionBook
from actorbus.bridge.inflight import InFlight
from actorbus.bridge.recovery import RecoveredMsg
from actorbus.bridge.settlement import ACK, NAK
from actorbus.config import SubscriptionConfig
from actorbus import Envelope


def _book(**options) -> SubscriptionBook:
    return SubscriptionBook(SubscriptionConfig("orders.>", "m:f", durable="orders", ack_wait=2.0,
                                               **options))


def _recovered(book: SubscriptionBook, sequence: int) -> InFlight:
    entry = InFlight(RecoveredMsg("orders.a", b"", None, sequence), book.config, 0.0,
                     Delivery(1, "orders", "orders.a", b"", None, "a", "a", None, 2, sequence), 0.0)
    book.recovered[sequence] = entry
    return entry


def test_a_redelivery_of_a_recovered_message_is_settled_by_its_handling():
    book = _book()
    entry = _recovered(book, 7)
    # Still being handled: the redelivery waits for its outcome, then is acked with it.
    assert book.redelivered_after_recovery("redelivery", 7) is None
    orders = book.recovered_done(entry, ACK, None)
    assert [(o.msg, o.action) for o in orders] == [("redelivery", ACK)]
    assert book.tally.counts["duplicates_skipped"] == 1 and 7 not in book.recovered


def test_a_redelivery_after_the_handling_is_acked_without_handling_and_a_failure_naks_it():
    book = _book()
    book.recovered_done(_recovered(book, 7), ACK, None)
    assert book.redelivered_after_recovery("late", 7).action == ACK
    failed = _recovered(book, 8)
    assert book.redelivered_after_recovery("again", 8) is None
    (order,) = book.recovered_done(failed, NAK, 0.5)
    assert (order.msg, order.action, order.delay) == ("again", NAK, 0.5)
    assert 8 not in book.recovered   # its next redelivery is handled as any other


def test_a_handled_recovered_record_is_forgotten_once_no_redelivery_can_come():
    book = _book()
    book.recovered_done(_recovered(book, 7), ACK, None)
    handled_at = book.recovered[7]
    book.forget_recovered(handled_at + 2 * 2.0 + RECOVERED_RECORD_GRACE - 0.1)
    assert 7 in book.recovered
    book.forget_recovered(handled_at + 2 * 2.0 + RECOVERED_RECORD_GRACE + 0.1)
    assert 7 not in book.recovered


def test_an_envelope_is_routed_by_partition_header_or_peek_and_a_plain_message_by_its_header():
    partitioned = SubscriptionBook(SubscriptionConfig("orders.*", "m:f", durable="orders",
                                                      partitions=4))
    body = Envelope.create("b", "T", b"x").encode()
    assert partitioned.routing_key("3.orders.a", body, {"X-Aggregate-ID": "c"}) == "a"
    envelopes = _book()
    assert envelopes.routing_key("orders.x", body, {"X-Aggregate-ID": "c"}) == "c"
    assert envelopes.routing_key("orders.x", body, None) == "b"
    assert envelopes.routing_key("orders.x", b"\xc1", None) is None
    plain = _book(envelope=False)
    assert plain.routing_key("orders.x", b"raw", {"X-Aggregate-ID": "h-1"}) == "h-1"


def test_an_invalid_key_header_is_counted_each_time_and_warned_once_a_minute(caplog):
    caplog.set_level(logging.WARNING, logger="actorbus.bridge")
    book = _book(envelope=False)
    msg = SimpleNamespace(subject="metrics.cpu", headers={"X-Aggregate-ID": "host 1"})
    for now in (100.0, 101.0, 100.0 + INVALID_KEY_WARNING_INTERVAL):
        book.note_invalid_key(msg, now)
    assert book.tally.counts["invalid_keys"] == 3
    assert len([r for r in caplog.records if "invalid aggregate id" in r.getMessage()]) == 2
