"""Durable aggregates without a server: snapshots every N events, restore then apply once,
versions and bad snapshots, the KV key encoding (the store in memory)."""
from __future__ import annotations

import logging

import pytest

from actorbus import Aggregate, Message
from actorbus.actors.messages import SUCCEEDED, Delivery
from actorbus.actors.processing import HandlerTable
from actorbus.config import SubscriptionConfig
from actorbus.errors import ConfigurationError
from actorbus.snapshots import (MemorySnapshots, Snapshot, SnapshotError, aggregate_of_key,
                                decode_snapshot, encode_snapshot, snapshot_key)
from tests.handlers import Ledger

SUBJECT = "ledger.*"


def subscription(handler: str = "tests.handlers:Ledger") -> SubscriptionConfig:
    return SubscriptionConfig(SUBJECT, handler, envelope=False, durable="ledger")


class Stream:
    """Events of several aggregates, numbered per aggregate, in a MemorySnapshots stream."""

    def __init__(self, store: MemorySnapshots) -> None:
        self.store = store
        self.deliveries: list[Delivery] = []
        self._next: dict[str, int] = {}

    def publish(self, aggregate_id: str) -> Delivery:
        number = self._next.get(aggregate_id, 0)
        self._next[aggregate_id] = number + 1
        subject = f"ledger.{aggregate_id}"
        data = str(number).encode()
        sequence = self.store.append(aggregate_id, data, subject)
        delivery = Delivery(sequence, "ledger", subject, data, None, aggregate_id, aggregate_id,
                            None, 1, sequence)
        self.deliveries.append(delivery)
        return delivery


def table(store: MemorySnapshots, handler: str = "tests.handlers:Ledger") -> HandlerTable:
    """A member's table: its handler resolved when registered, as a pool member does."""
    made = HandlerTable([subscription(handler)], sleep=lambda _: None, snapshots=store)
    made.resolve("ledger")
    return made


def state_of(store: MemorySnapshots, aggregate_id: str) -> Snapshot:
    return decode_snapshot(store.saved[aggregate_id])



def published(aggregate_id: str, events: int) -> tuple[MemorySnapshots, Stream]:
    """An empty snapshot store and a stream with ``events`` events of ``aggregate_id``."""
    store = MemorySnapshots()
    stream = Stream(store)
    for _ in range(events):
        stream.publish(aggregate_id)
    return store, stream

def test_a_snapshot_is_written_every_snapshot_every_events_with_the_last_sequence():
    store = MemorySnapshots()
    stream = Stream(store)
    for _ in range(25):
        stream.publish("a")
        stream.publish("b")
    outcomes = table(store).process(stream.deliveries)
    assert {o.kind for o in outcomes} == {SUCCEEDED}
    snapshot = state_of(store, "a")
    assert snapshot.state == {"total": sum(range(20)), "numbers": list(range(20))}
    assert snapshot.sequence == stream.deliveries[38].stream_sequence   # a's 20th event
    assert snapshot.version == Ledger.snapshot_version
    assert store.saves == 4   # a and b, at 10 and 20 events each


def test_a_new_member_restores_and_applies_each_event_once():
    store, stream = published("a", 25)
    first = table(store)
    first.process(stream.deliveries)   # snapshot at a's 20th event; then the member "dies"

    # The next member gets a redelivery of events the dead one applied (and one it snapshotted).
    second = table(store)
    redelivered = [stream.deliveries[i]._replace(delivery_count=2) for i in (22, 23, 24, 5)]
    outcomes = second.process(redelivered + [stream.publish("a")])
    assert {o.kind for o in outcomes} == {SUCCEEDED}
    second.close()   # a clean stop snapshots what is not saved
    snapshot = state_of(store, "a")
    assert snapshot.state["numbers"] == list(range(26))
    assert snapshot.state["total"] == sum(range(26))
    assert snapshot.sequence == stream.deliveries[-1].stream_sequence


def test_events_acked_after_the_snapshot_are_read_back_from_the_stream():
    store, stream = published("a", 15)
    table(store).process(stream.deliveries)   # snapshot at 10; 11-15 acked but only in memory
    later = [stream.publish("a") for _ in range(3)]
    second = table(store)
    second.process(later)
    second.close()
    assert state_of(store, "a").state["numbers"] == list(range(18))


def test_passivation_snapshots_what_is_unsaved():
    store, stream = published("a", 3)
    stream.publish("b")   # only one instance is kept: a is passivated
    table(store, "tests.test_durable:OneAtATime").process(stream.deliveries)
    assert decode_snapshot(store.saved["a"]).state["numbers"] == [0, 1, 2]


class OneAtATime(Ledger):
    max_instances = 1


class LedgerV2(Ledger):
    """Version 2 keeps the numbers as ``history``; it migrates version 1's snapshots."""

    snapshot_version = 2

    def restore(self, state: object) -> None:
        assert isinstance(state, dict)
        self.total = state["total"]
        self.numbers = state["history"]

    def snapshot(self) -> object:
        return {"total": self.total, "history": self.numbers}

    @classmethod
    def migrate(cls, state: object, version: int) -> object | None:
        assert isinstance(state, dict) and version == 1
        return {"total": state["total"], "history": state["numbers"]}


class LedgerV3(Ledger):
    """Version 3 declines older snapshots: the aggregate is rebuilt from the stream."""

    snapshot_version = 3


def _versioned(handler: str) -> tuple[MemorySnapshots, Stream, HandlerTable]:
    store, stream = published("a", 12)
    table(store).process(stream.deliveries)   # version 1's snapshot at 10
    return store, stream, table(store, handler)


def test_a_snapshot_of_another_version_is_migrated_by_the_class_hook():
    store, stream, newer = _versioned("tests.test_durable:LedgerV2")
    newer.process([stream.publish("a")])
    newer.close()
    snapshot = state_of(store, "a")
    assert snapshot.version == 2 and snapshot.state["history"] == list(range(13))


def test_a_declined_version_is_rebuilt_from_the_stream_with_a_warning_naming_the_key(caplog):
    store, stream, newer = _versioned("tests.test_durable:LedgerV3")
    with caplog.at_level(logging.WARNING, "actorbus.actors"):
        newer.process([stream.publish("a")])
    newer.close()
    assert state_of(store, "a").state["numbers"] == list(range(13))
    assert any("aggregate a " in r.message and "snapshot_version 1" in r.message
               and "rebuilt from the stream" in r.message for r in caplog.records)


def test_an_undecodable_snapshot_is_rebuilt_from_the_stream_and_others_are_untouched(caplog):
    store = MemorySnapshots()
    stream = Stream(store)
    for _ in range(10):
        stream.publish("a")
        stream.publish("b")
    table(store).process(stream.deliveries)
    store.saved["a"] = b"\xc1 not msgpack"
    second = table(store)
    with caplog.at_level(logging.WARNING, "actorbus.actors"):
        second.process([stream.publish("a"), stream.publish("b")])
    second.close()
    assert state_of(store, "a").state["numbers"] == list(range(11))
    assert state_of(store, "b").state["numbers"] == list(range(11))
    warnings = [r.message for r in caplog.records if "cannot be decoded" in r.message]
    assert len(warnings) == 1 and "aggregate a " in warnings[0], warnings


class AsyncLedger(Ledger):
    async def handle(self, msg: Message) -> None:
        super().handle(msg)


def test_an_async_handle_is_applied_once_and_snapshotted():
    store, stream = published("a", 12)
    table(store, "tests.test_durable:AsyncLedger").process(stream.deliveries)
    second = table(store, "tests.test_durable:AsyncLedger")
    second.process([stream.deliveries[11], stream.publish("a")])   # a redelivery, a new one
    second.close()
    assert state_of(store, "a").state["numbers"] == list(range(13))


class Flaky(Ledger):
    failures = 1

    def handle(self, msg: Message) -> None:
        if msg.data == b"3" and Flaky.failures:
            Flaky.failures -= 1
            raise RuntimeError("transient")
        super().handle(msg)


def test_a_retried_event_is_applied_once():
    store, stream = published("a", 6)
    spec = SubscriptionConfig(SUBJECT, "tests.test_durable:Flaky", envelope=False,
                              durable="ledger", retries=2)
    flaky = HandlerTable([spec], sleep=lambda _: None, snapshots=store)
    outcomes = flaky.process(stream.deliveries)
    assert [(o.kind, o.attempts) for o in outcomes] == [(SUCCEEDED, 1)] * 3 + [(SUCCEEDED, 2)] + \
        [(SUCCEEDED, 1)] * 2
    flaky.close()
    assert state_of(store, "a").state["numbers"] == list(range(6))


@pytest.mark.parametrize("every", [0, -1, 2.5, True, "10"])
def test_a_bad_snapshot_every_is_refused_naming_it(every):
    with pytest.raises(ConfigurationError, match=r"Bad\.snapshot_every must be an int >= 1"):
        type("Bad", (Aggregate,), {"snapshot_every": every})


def test_a_state_msgpack_cannot_encode_is_an_error_naming_it():
    with pytest.raises(SnapshotError, match="not msgpack-encodable"):
        encode_snapshot(Snapshot({"when": object()}, 1, 5))


@pytest.mark.parametrize("data, says", [(b"\xc1", "not msgpack"), (b"\x93\x01\x02\x03", "not a snapshot map"),
                                        (encode_snapshot(Snapshot({}, 1, 5)).replace(b"\x05", b"\xff"),
                                         "sequence must be an int >= 0")])
def test_bad_snapshot_bytes_are_refused_saying_why(data, says):
    with pytest.raises(SnapshotError, match=says):
        decode_snapshot(data)


@pytest.mark.parametrize("aggregate_id, plain", [
    ("order-17", True), ("a/b_c.d", True), ("tenant:42", False), (".lead", False),
    ("trail.", False), ("a..b", False), ("x" * 256, True)])
def test_kv_keys_are_the_id_or_its_marked_base64(aggregate_id, plain):
    key = snapshot_key(aggregate_id)
    assert (key == aggregate_id) is plain
    assert aggregate_of_key(key) == aggregate_id
    tokens = key.split(".")
    assert all(tokens) and all(c.isalnum() or c in "-/_=" for t in tokens for c in t)


def test_the_aggregates_first_seen_in_a_batch_are_restored_with_one_read_of_the_store():
    store = MemorySnapshots()
    stream = Stream(store)
    for _ in range(12):
        for key in "abc":
            stream.publish(key)
    table(store).process(stream.deliveries)
    later = [stream.publish(key) for key in "abcabc"]
    second = table(store)
    loads = store.loads
    second.process(later)
    assert store.loads == loads + 1
    second.close()
    assert {key: state_of(store, key).state["numbers"] for key in "abc"} == \
        {key: list(range(14)) for key in "abc"}


def test_after_ownership_changed_hands_the_next_message_restores_from_the_store():
    store, stream = published("a", 12)
    here = table(store)
    here.process(stream.deliveries)          # live here, at event 11
    elsewhere = table(store)                 # the partition moved: another bus goes on
    elsewhere.process([stream.publish("a") for _ in range(4)])
    elsewhere.close()
    here.forget_durable()                    # it moved back: a dispatch said so
    here.process([stream.publish("a")])
    here.close()
    assert state_of(store, "a").state["numbers"] == list(range(17))


def test_a_dispatch_carries_its_ownership_count_through_pickling():
    import pickle

    from actorbus.actors.messages import Dispatch

    dispatch = Dispatch((Stream(MemorySnapshots()).publish("a"),), 4, epoch=2, bridge=1, ownership=3)
    assert pickle.loads(pickle.dumps(dispatch)) == dispatch


class LedgerV4(Ledger):
    """Version 4's migrate() raises on what it gets."""

    snapshot_version = 4

    @classmethod
    def migrate(cls, state: object, version: int) -> object | None:
        raise KeyError("history")


def test_a_migrate_that_raises_rebuilds_and_later_rebuilds_are_named_at_info(caplog):
    store = MemorySnapshots()
    stream = Stream(store)
    for _ in range(10):
        stream.publish("a")
        stream.publish("b")
    table(store).process(stream.deliveries)
    newer = table(store, "tests.test_durable:LedgerV4")
    with caplog.at_level(logging.INFO, "actorbus.actors"):
        newer.process([stream.publish("a"), stream.publish("b")])
    newer.close()
    assert {key: state_of(store, key).state["numbers"] for key in "ab"} == \
        {key: list(range(11)) for key in "ab"}
    rebuilt = [(r.levelno, r.message) for r in caplog.records if "rebuilt from the stream" in r.message]
    assert [level for level, _ in rebuilt] == [logging.WARNING, logging.INFO]
    assert "aggregate a " in rebuilt[0][1] and "migrate() raised" in rebuilt[0][1]
    assert "aggregate b " in rebuilt[1][1]
