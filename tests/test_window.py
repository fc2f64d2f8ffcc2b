"""The fetch window: what it lets the consumers ask for, and what it counts."""
from collections import Counter
from dataclasses import dataclass

from actorbus.bridge.window import FetchWindow


@dataclass
class Consumer:
    pending: int = 0
    batch_size: int = 100
    recovering: bool = False


def test_an_empty_window_asks_each_consumer_for_its_share_up_to_its_batch():
    a, b = Consumer(batch_size=500), Consumer(batch_size=100)
    asks = FetchWindow(600).requests([a, b])
    assert asks == [(a, 300), (b, 100)]


def test_unsettled_and_requested_messages_use_up_the_room():
    window = FetchWindow(100)
    window.arrived(70)
    consumer = Consumer(pending=10)
    assert window.requests([consumer]) == []          # room 20: below half a batch
    window.settled(40)
    assert window.requests([consumer]) == [(consumer, 60)]   # room 60, batch room 90


def test_held_messages_do_not_use_up_the_window_up_to_one_window_of_them():
    window = FetchWindow(100)
    window.arrived(100)
    consumer = Consumer()
    assert window.requests([consumer]) == []
    window.held = 100
    assert window.requests([consumer]) == [(consumer, 100)]
    window.held = 250   # beyond one window: the rest counts again
    assert window.requests([consumer]) == [(consumer, 100)]


def test_a_recovering_consumer_asks_for_nothing():
    recovering, reading = Consumer(recovering=True), Consumer()
    assert FetchWindow(200).requests([recovering, reading]) == [(reading, 100)]


def test_unsettled_messages_are_counted_by_durable_where_partitions_move():
    window = FetchWindow(100, by_durable=True)
    window.arrived(3, "d-p0")
    window.arrived(2, "d-p1")
    window.settled(2, Counter({"d-p0": 2}))
    assert (window.unsettled, window.unsettled_of("d-p0"), window.unsettled_of("d-p1")) == (3, 1, 2)
    plain = FetchWindow(100)
    plain.arrived(3, "d-p0")
    assert plain.unsettled_of("d-p0") == 0 and plain.by_durable is None
