"""The Bridge's pull requests against a real nats-server: answered, ended, forgotten."""
from __future__ import annotations

import asyncio
import contextlib
import json
import time

from actorbus.bridge.inbox import InboxClient
from actorbus.bridge.jetstream import ensure_consumer, ensure_stream
from actorbus.bridge.layout import SingleDurable
from actorbus.bridge.pull import PullConsumer
from actorbus.config import SubscriptionConfig


@contextlib.asynccontextmanager
async def _consumer(url: str, sub: SubscriptionConfig, on_messages, on_request_ended, **hooks):
    """A started PullConsumer on ``sub``'s stream and durable (``hooks``: its other
    callbacks), stopped and disconnected after."""
    nc = InboxClient()
    await nc.connect(url)
    try:
        js = nc.jetstream()
        await ensure_stream(js, sub)
        (spec,) = SingleDurable().consumers(sub)
        await ensure_consumer(js, sub, spec)
        consumer = PullConsumer(nc, sub, spec, on_messages, on_request_ended, **hooks)
        await consumer.start()
        yield js, consumer
        await consumer.stop()
    finally:
        await nc.close()


async def _until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def test_requests_are_answered_in_order_and_ended_by_the_server(nats_server):
    sub = SubscriptionConfig("pull.>", "tests.handlers:record", envelope=False, durable="pull",
                             pull_expires=0.5)

    async def scenario():
        arrived, ended = [], []
        async with _consumer(nats_server.url, sub, lambda s, msgs: arrived.extend(msgs),
                             lambda: ended.append(True)) as (js, consumer):
            for n in range(10):
                await js.publish(f"pull.k{n}", str(n).encode())

            await consumer.request(4)
            assert consumer.requested == 4
            await _until(lambda: len(arrived) == 4, what="4 messages")
            assert consumer.requested == 0   # filled: nothing left asked for

            await consumer.request(10)        # only 6 are there
            await _until(lambda: len(arrived) == 10, what="10 messages")
            assert consumer.requested == 4
            # The server ends the request when it expires (408): nothing stays counted.
            await _until(lambda: ended, what="the request's end")
            assert consumer.requested == 0
            assert [m.data for m in arrived] == [str(n).encode() for n in range(10)]

    asyncio.run(scenario())


def test_requests_lost_past_their_expiry_are_forgotten(nats_server):
    sub = SubscriptionConfig("lost.>", "tests.handlers:record", envelope=False, durable="lost",
                             pull_expires=30.0)

    async def scenario():
        async with _consumer(nats_server.url, sub, lambda s, msgs: None,
                             lambda: None) as (_, consumer):
            await consumer.request(5)
            await consumer.request(3)
            assert consumer.forget(time.monotonic()) == 0   # still within their expiry
            assert consumer.requested == 8
            # As after a server restart: never answered, long past expiry.
            assert consumer.forget(time.monotonic() + 60) == 2
            assert consumer.requested == 0

    asyncio.run(scenario())


async def _pinned_client(js, consumer) -> str | None:
    """The pin id the server holds for the consumer's priority group, if any."""
    spec = consumer.spec
    reply = await js._nc.request(f"$JS.API.CONSUMER.INFO.{spec.stream}.{spec.durable}", b"",
                                 timeout=2)
    groups = json.loads(reply.data).get("priority_groups") or [{}]
    return groups[0].get("pinned_client_id")


def test_a_pinned_consumer_that_asks_for_nothing_keeps_its_pin_by_renewing_it(nats_server):
    # As a bus whose window stays full: it makes no request, only renewals.
    sub = SubscriptionConfig("keep.>", "tests.handlers:record", envelope=False, durable="keep",
                             pull_expires=0.25, pin_timeout=0.5)

    async def scenario():
        arrived = []
        async with _consumer(nats_server.url, sub, lambda s, msgs: arrived.extend(msgs),
                             lambda: None) as (js, consumer):
            for n in range(3):
                await js.publish(f"keep.k{n}", str(n).encode())
            await consumer.request(1)
            await _until(lambda: arrived, what="the first message")
            pin = consumer.pin_id
            assert pin is not None and await _pinned_client(js, consumer) == pin

            renew_until = time.monotonic() + 4 * sub.pin_timeout
            while time.monotonic() < renew_until:
                await consumer.keep_pin(time.monotonic())
                await asyncio.sleep(0.05)   # the link's tick
            assert await _pinned_client(js, consumer) == pin
            assert len(arrived) == 1   # two more were there; the renewals took none
            assert consumer.pin_id == pin and consumer.unpins == 0

            # Without renewals the server lets the pin go.
            lapsed = time.monotonic()
            while await _pinned_client(js, consumer) == pin:
                assert time.monotonic() - lapsed < 5, "the pin never lapsed"
                await asyncio.sleep(0.05)

    asyncio.run(scenario())


def test_a_consumer_whose_pin_moved_to_another_client_says_so_and_pulls_as_a_standby(nats_server):
    sub = SubscriptionConfig("moved.>", "tests.handlers:record", envelope=False, durable="moved",
                             pull_expires=0.5)

    async def scenario():
        arrived, unpinned = [], []
        async with _consumer(nats_server.url, sub, lambda s, msgs: arrived.extend(msgs),
                             lambda: None, on_unpinned=unpinned.append) as (js, first):
            await js.publish("moved.a", b"1")
            await first.request(1)
            await _until(lambda: arrived, what="the first message")
            assert first.pin_id is not None

            # As after a stall longer than pin_timeout: the pin goes to another client.
            spec = first.spec
            await js._nc.request(f"$JS.API.CONSUMER.UNPIN.{spec.stream}.{spec.durable}",
                                 json.dumps({"group": spec.priority_group}).encode(), timeout=2)
            other = PullConsumer(js._nc, sub, spec, lambda s, msgs: arrived.extend(msgs),
                                 lambda: None)
            await other.start()
            try:
                await js.publish("moved.b", b"2")
                await other.request(1)
                await _until(lambda: other.pin_id is not None, what="the other client pinned")

                await first.request(1)   # still under the old pin id: 423
                await _until(lambda: unpinned, what="the moved pin noticed")
                assert unpinned == [first] and first.pin_id is None and first.unpins == 1
            finally:
                await other.stop()

    asyncio.run(scenario())
