"""The 3-node cluster of ``tests/cluster.py``: loopback only, and an R3 durable that
keeps every message when its leader's server is SIGKILLed mid-stream."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from tests.cluster import NatsCluster
from tests.support import consumer_info, stream_info
from tests.test_listening_sockets import listening_sockets

pytestmark = [pytest.mark.cluster, pytest.mark.integration]

STREAM, SUBJECTS, DURABLE, TOTAL = "ORDERS", ["orders.>"], "workers", 1000


def test_every_node_listens_on_its_two_loopback_ports_only(nats_cluster: NatsCluster):
    for i in (1, 2, 3):
        found = listening_sockets(nats_cluster.pid(i))
        assert {str(address) for address, _ in found} == {"127.0.0.1"}, found
        # Client and route ports, nothing else (no HTTP monitoring).
        assert sorted(port for _, port in found) == sorted(
            [nats_cluster.client_ports[i - 1], nats_cluster.cluster_ports[i - 1]])


def test_an_r3_durable_loses_nothing_when_its_leaders_server_is_killed(nats_cluster: NatsCluster):
    cluster = nats_cluster
    asyncio.run(_create(cluster.urls))
    asyncio.run(_publish(cluster.urls, range(TOTAL)))
    leader = cluster.consumer_leader(STREAM, DURABLE)
    assert leader is not None
    also_led = [what for what, name in (("stream", cluster.stream_leader(STREAM)),
                                        ("meta", cluster.meta_leader())) if name == leader]
    killed = cluster.index_of(leader)
    survivors = [i for i in (1, 2, 3) if i != killed]
    run = asyncio.run(_consume_across_the_kill(cluster, killed))

    assert sorted(set(run.received)) == list(range(TOTAL)), run.last_error  # none lost
    assert len(run.received) >= TOTAL  # at least once: redeliveries may repeat some
    assert cluster.index_of(run.elected) in survivors
    assert run.reconnected_to, "the client never reconnected"
    assert set(run.reconnected_to) <= {cluster.url(i).removeprefix("nats://") for i in survivors}
    state = consumer_info(cluster.url(cluster.index_of(run.elected)), STREAM, DURABLE)
    assert (state.num_pending, state.num_ack_pending, state.ack_floor.stream_seq) == (0, 0, TOTAL)
    print(f"\nkilled {leader} (consumer leader, also {also_led or 'nothing else'}); new consumer "
          f"leader {run.elected} after {run.elected_after:.2f}s; all consumed "
          f"{run.consumed_after:.2f}s after the kill; {len(run.received) - TOTAL} redelivered")


def test_a_killed_node_restarts_on_its_ports_and_store_and_catches_up(nats_cluster: NatsCluster):
    cluster = nats_cluster
    asyncio.run(_create(cluster.urls, consumer=False))  # a consumer would be a third leader
    asyncio.run(_publish(cluster.urls, range(100)))
    # A node leading neither the stream nor the meta group: no election to wait for.
    leaders = {cluster.stream_leader(STREAM), cluster.meta_leader()}
    assert None not in leaders
    node = next(i for i, name in enumerate(cluster.names, 1) if name not in leaders)
    name, old_pid = cluster.names[node - 1], cluster.pid(node)
    cluster.kill(node)
    asyncio.run(_publish(cluster.urls, range(100, 150)))  # while it is down

    cluster.start(node)
    cluster.wait_ready()
    assert cluster.pid(node) not in (None, old_pid)
    info = stream_info(cluster.url(node), STREAM)  # through the restarted node
    peers = {peer.name: peer for peer in info.cluster.replicas}
    assert info.state.messages == 150
    assert peers[name].current and not peers[name].offline and not peers[name].lag, peers[name]


async def _create(urls: str, consumer: bool = True) -> None:
    """Create the R3 stream and, unless told not to, the R3 durable pull consumer."""
    nc = await nats.connect(servers=urls.split(","))
    try:
        js = nc.jetstream()
        await js.add_stream(name=STREAM, subjects=SUBJECTS, num_replicas=3)
        if consumer:
            await js.add_consumer(STREAM, ConsumerConfig(
                durable_name=DURABLE, ack_policy=AckPolicy.EXPLICIT, ack_wait=5, num_replicas=3))
    finally:
        await nc.close()


async def _publish(urls: str, numbers: range) -> None:
    """Publish each number as a message's data; every one must be stored, once."""
    nc = await nats.connect(servers=urls.split(","))
    try:
        js = nc.jetstream()
        acks = await asyncio.gather(*(js.publish(f"orders.{n % 10}", str(n).encode())
                                      for n in numbers))
        assert sorted(ack.seq for ack in acks) == [n + 1 for n in numbers]
    finally:
        await nc.close()


@dataclass
class Failover:
    """What ``_consume_across_the_kill`` saw."""
    received: list[int] = field(default_factory=list)  # message numbers, as delivered
    reconnected_to: list[str] = field(default_factory=list)  # host:port, each reconnect
    elected: str = ""  # the new consumer leader
    elected_after: float = 0.0  # seconds from the kill
    consumed_after: float = 0.0
    last_error: Exception | None = None


async def _consume_across_the_kill(cluster: NatsCluster, killed: int) -> Failover:
    """Consume half (acked), kill node ``killed``, wait for a new consumer leader and consume
    the rest on the same connection, which lists the killed node's URL first."""
    run = Failover()

    async def reconnected() -> None:
        run.reconnected_to.append(nc.connected_url.netloc if nc.connected_url else "?")

    urls = [cluster.url(killed)] + [cluster.url(i) for i in (1, 2, 3) if i != killed]
    nc = await nats.connect(servers=urls, dont_randomize=True, reconnect_time_wait=0.1,
                            max_reconnect_attempts=-1, reconnected_cb=reconnected)
    try:
        psub = await nc.jetstream().pull_subscribe_bind(durable=DURABLE, stream=STREAM)
        error = await _consume(psub, run.received, TOTAL // 2, deadline=time.monotonic() + 30)
        assert len(run.received) == TOTAL // 2, error

        started = time.monotonic()
        await asyncio.to_thread(cluster.kill, killed)
        run.elected = await asyncio.to_thread(cluster.wait_leader, STREAM, DURABLE,
                                              not_on=cluster.names[killed - 1])
        run.elected_after = time.monotonic() - started
        run.last_error = await _consume(psub, run.received, TOTAL, deadline=time.monotonic() + 60)
        run.consumed_after = time.monotonic() - started
        return run
    finally:
        await nc.close()


async def _consume(psub, received: list[int], until_distinct: int, deadline: float):
    """Fetch and ack (acknowledged by the server) until ``until_distinct`` different
    messages were received or the deadline passes; return the last error met, if any."""
    last_error = None
    while len(set(received)) < until_distinct and time.monotonic() < deadline:
        try:
            for message in await psub.fetch(min(100, until_distinct - len(set(received))),
                                            timeout=1):
                received.append(int(message.data))
                await message.ack_sync()
        except nats.errors.Error as error:  # no leader yet, or moving to another server
            last_error = error
    return last_error
