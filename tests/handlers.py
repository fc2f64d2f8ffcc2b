"""Handlers the integration tests subscribe; they run in actor processes.

Each writes what it saw to a file of its own process under
$ACTORBUS_TEST_RECORDS, which the test reads back.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from actorbus import Aggregate, Message, Subscription, Topology

RELEASE_MARKER = "release"


def _records_dir() -> Path:
    return Path(os.environ["ACTORBUS_TEST_RECORDS"])


def _write(kind: str, msg: Message) -> None:
    line = " ".join(str(v) for v in (
        kind, msg.subject, msg.aggregate_id or "-", msg.data.decode(errors="replace"), os.getpid(),
        msg.delivery_count, msg.attempt, msg.routing_key, time.monotonic_ns()))
    with open(_records_dir() / f"records-{os.getpid()}.txt", "a") as out:
        out.write(line + "\n")


def record(msg: Message) -> None:
    """Succeed, recording the message."""
    _write("ok", msg)


def fail_first_two_deliveries(msg: Message) -> None:
    """Fail while JetStream's delivery count is below 3."""
    if msg.delivery_count < 3:
        _write("fail", msg)
        raise RuntimeError(f"deliberate failure on delivery {msg.delivery_count}")
    _write("ok", msg)


def always_fail(msg: Message) -> None:
    """Fail every time."""
    _write("fail", msg)
    raise RuntimeError("deliberate failure")


def fail_first_attempt(msg: Message) -> None:
    """Fail the first in-place attempt of each delivery, then succeed."""
    if msg.attempt == 1:
        _write("fail", msg)
        raise RuntimeError("deliberate transient failure")
    _write("ok", msg)


def hold_until_released(msg: Message) -> None:
    """Record the start, then wait (bounded) for the test's release marker."""
    _write("started", msg)
    deadline = time.monotonic() + 60
    while not (_records_dir() / RELEASE_MARKER).exists():
        if time.monotonic() > deadline:
            raise TimeoutError("never released")
        time.sleep(0.01)
    _write("ok", msg)


async def record_async(msg: Message) -> None:
    """An async handler that succeeds, recording the message."""
    _write("ok", msg)


def fail_poison(msg: Message) -> None:
    """Fail the message whose data is ``poison``; record the rest."""
    if msg.data == b"poison":
        _write("fail", msg)
        raise RuntimeError("poison message")
    _write("ok", msg)


def slow_record(msg: Message) -> None:
    """Take a couple of milliseconds, then record."""
    time.sleep(0.002)
    _write("ok", msg)


def slow_tenths(msg: Message) -> None:
    """Take 0.3 s, then record: a slow handler."""
    time.sleep(0.3)
    _write("ok", msg)


def slow_count(msg: Message) -> None:
    """Take a fraction of a millisecond, record nothing: the bus's counters are the record."""
    time.sleep(0.0002)


def hang_first_delivery(msg: Message) -> None:
    """Hang (far past any sane timeout) the first time a message is seen; then succeed."""
    marker = _records_dir() / f"seen-{msg.stream_sequence}"
    if not marker.exists():
        marker.touch()
        _write("hung", msg)
        time.sleep(120)
    _write("ok", msg)


class Counter(Aggregate):
    """Counts its own messages; passivated instances save their count in ``SAVED``."""

    SAVED: dict = {}
    max_instances = 2

    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.count = self.SAVED.pop(aggregate_id, 0)   # rebuilt from what passivate saved

    def handle(self, msg: Message) -> None:
        self.count += 1
        _write(f"count={self.count}", msg)

    def passivate(self) -> None:
        self.SAVED[self.aggregate_id] = self.count


#: What `actorbus run tests.handlers:topology` runs in the CLI test.
topology = Topology(subscriptions=(Subscription("orders.>", record, durable="orders"),),
                    bus={"pool_size": 2})


#: The same with a handler of a couple of milliseconds: a drain has work in flight.
slow_topology = Topology(subscriptions=(Subscription("orders.>", slow_record, durable="orders"),),
                         bus={"pool_size": 2})


def crash_on_crash(msg: Message) -> None:
    """End this actor's process on the message ``crash`` (as a segfault would); record the rest."""
    if msg.data == b"crash":
        os._exit(1)
    _write("ok", msg)


#: The same, giving up on an unreachable or refusing NATS after one second.
quick_topology = Topology(subscriptions=(Subscription("orders.>", record, durable="orders"),),
                          bus={"pool_size": 1, "connect_timeout": 1.0})


def fail_marked_once(msg: Message) -> None:
    """Fail the first delivery of an envelope whose JSON payload has ``"fail": true``."""
    if msg.delivery_count == 1 and msg.envelope.payload_json().get("fail"):
        _write("fail", msg)
        raise RuntimeError("deliberate failure of a marked envelope")
    _write("ok", msg)


def record_envelope_as_json(msg: Message) -> None:
    """Record the envelope as this process would publish it in JSON (hex, a line each)."""
    from actorbus.codecs import EnvelopeFormat
    with open(_records_dir() / f"json-{os.getpid()}.txt", "a") as out:
        out.write(msg.envelope.encode(EnvelopeFormat.JSON).hex() + "\n")


def fail_first_delivery_of_first(msg: Message) -> None:
    """Fail the first delivery of each aggregate's envelope number 0 (``per_key_sequence``)."""
    if msg.data == b"0" and msg.delivery_count == 1:
        _write("fail", msg)
        raise RuntimeError("deliberate failure of the first envelope of its key")
    _write("ok", msg)


def noop(msg: Message) -> None:
    """Do nothing (for throughput checks)."""


def traced(msg: Message) -> None:
    """Make a span of its own (a child of the one it runs in); fail the first attempt of
    an envelope whose payload is ``retry``, and the whole first delivery of one whose
    payload is ``nak``."""
    from opentelemetry import trace
    with trace.get_tracer("tests.handlers").start_as_current_span("handler's own work"):
        if msg.data == b"retry" and msg.attempt == 1:
            raise RuntimeError("deliberate failure on the first attempt")
        if msg.data == b"nak" and msg.delivery_count == 1:
            raise RuntimeError("deliberate failure on the first delivery")


class Ledger(Aggregate):
    """A durable aggregate: the running sum of its events' numbers and the numbers in the
    order applied (so a number applied twice, or out of order, shows)."""

    snapshot_every = 10
    idle_timeout = None

    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.total = 0
        self.numbers: list[int] = []

    def handle(self, msg: Message) -> None:
        number = int(msg.data)
        self.total += number
        self.numbers.append(number)


class SlowLedger(Ledger):
    """A :class:`Ledger` that takes 1 ms an event, so a run lasts long enough to be hit."""

    def handle(self, msg: Message) -> None:
        time.sleep(0.001)
        super().handle(msg)


#: What `actorbus replay tests.handlers:ledger_topology` rebuilds in the replay test.
ledger_topology = Topology(subscriptions=(Subscription("ledger.*", Ledger, durable="ledger",
                                                       options={"key_from_subject": True}),),
                           bus={"pool_size": 2})

#: The same on a stream partitioned 4 ways (its stored subjects start with the partition).
ledger_partitioned_topology = Topology(
    subscriptions=(Subscription("ledgerp.*", Ledger, durable="ledgerp"),),
    bus={"pool_size": 2, "partitions": 4})
