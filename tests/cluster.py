"""A 3-node nats-server cluster on loopback, with JetStream, for R3 streams and consumers.

Each node is an ``actorbus.server.NatsServer`` (stopped by its pid, never by a name
pattern) with a configuration file of its own: server name ``n1``..``n3``, client and
route ports on 127.0.0.1 only, no HTTP monitoring, routes to the other two.
Nodes are numbered 1..3, as their names are.

Measured with nats-server 2.15.1 on loopback: start and ``wait_ready`` take about 0.7 s
(4.5-7 s now and then on a busy machine: the first meta election can split, and the next
round waits for the Raft election timeout). After a node is SIGKILLed, what it led gets a
new leader only once a follower's election timeout (4-9 s, fixed in the server) runs out,
so poll with ``wait_leader``.
"""
from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable

import nats
from nats.js.api import ClusterInfo, StorageType

from actorbus.ports import free_port
from actorbus.processes import process_alive
from actorbus.server import NatsServer

SIZE = 3
CLUSTER_NAME = "actorbus-test"

# What a node logs when the JetStream meta leader changes (nats-server 2.10 to 2.15).
_META_LEADER = re.compile(r"(Self is new JetStream cluster metadata leader)"
                          r"|JetStream cluster (?:new metadata leader: ([^/\s]+)/|no metadata leader)")

# No http/https: monitoring stays off. NatsServer adds -a 127.0.0.1 -p <port> (the same as
# listen) and -js -sd <store> (a store_dir here too would be refused as a duplicate).
_CONFIG = """\
server_name: {name}
listen: 127.0.0.1:{port}
cluster {{
  name: {cluster}
  listen: 127.0.0.1:{cluster_port}
  routes: [{routes}]
}}
"""


class NatsCluster:
    """Three nats-servers with JetStream, clustered over loopback routes, in a temp dir."""

    def __init__(self, root: str | Path | None = None) -> None:
        self._own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="actorbus-cluster-"))
        self.names = [f"n{i}" for i in range(1, SIZE + 1)]
        ports = _distinct_free_ports(2 * SIZE)
        self.client_ports, self.cluster_ports = ports[:SIZE], ports[SIZE:]
        self.servers: list[NatsServer] = []
        routes = ", ".join(f"nats-route://127.0.0.1:{port}" for port in self.cluster_ports)
        try:
            for name, port, cluster_port in zip(self.names, self.client_ports,
                                                self.cluster_ports, strict=True):
                directory = self.root / name
                directory.mkdir(parents=True, exist_ok=True)
                config = directory / "nats-server.conf"
                config.write_text(_CONFIG.format(name=name, port=port, cluster=CLUSTER_NAME,
                                                 cluster_port=cluster_port, routes=routes))
                self.servers.append(NatsServer(store_dir=directory, port=port, config=config))
        except BaseException:
            self.close()
            raise

    @property
    def urls(self) -> str:
        """The client URLs of all three nodes, comma-separated (as ``servers=`` takes them)."""
        return ",".join(self.url(i) for i in range(1, SIZE + 1))

    def url(self, i: int) -> str:
        """The client URL of node ``i`` (1..3)."""
        return self._server(i).url

    def pid(self, i: int) -> int | None:
        """The pid of node ``i`` while it runs, else None."""
        return self._server(i).pid

    def index_of(self, server_name: str) -> int:
        """The node number of ``server_name`` (``"n2"`` -> 2)."""
        return self.names.index(server_name) + 1

    def start(self, i: int | None = None, timeout: float = 15.0) -> "NatsCluster":
        """Start node ``i`` (again: same ports and store), or every node that is not running.
        Returns once each reports ready; ``wait_ready`` waits for the cluster."""
        for n in [i] if i is not None else range(1, SIZE + 1):
            if self.pid(n) is None:
                self._server(n).start(timeout)
        return self

    def kill(self, i: int) -> None:
        """SIGKILL node ``i`` by its pid (a crash) and wait until it is gone."""
        pid = self.pid(i)
        self._server(i).kill()
        deadline = time.monotonic() + 10
        while pid is not None and process_alive(pid):
            if time.monotonic() > deadline:
                raise AssertionError(f"nats-server {self.names[i - 1]} (pid {pid}) outlived SIGKILL")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop every node by its pid (SIGTERM, then SIGKILL); every one, even if one fails."""
        errors = []
        for server in self.servers:
            try:
                server.stop()
            except Exception as error:
                errors.append(error)
        if errors:
            raise errors[0]

    def close(self) -> None:
        """Stop every node and remove the temp dir (configs, stores, logs) this object made."""
        try:
            self.stop()
        finally:
            if self._own_root:
                shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "NatsCluster":
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll until JetStream answers through every running node and every stream and
        consumer (a probe stream on all running nodes among them, deleted again) has a
        leader and min(replicas, running nodes) members current: a meta leader is elected,
        every running node is a current peer, a restarted one has caught up. Fails after
        ``timeout``."""
        running = {self.names[i - 1] for i in range(1, SIZE + 1) if self.pid(i) is not None}
        probe = f"READY_{uuid.uuid4().hex[:8]}"

        async def caught_up(js: Any) -> bool:
            for stream in await js.streams_info():
                replicas = stream.config.num_replicas or 1
                if not _current(stream.cluster, running, replicas):
                    return False
                for consumer in await js.consumers_info(stream.config.name):
                    if not _current(consumer.cluster, running,
                                    consumer.config.num_replicas or replicas):
                        return False
            return True

        async def ready() -> None:
            deadline = time.monotonic() + timeout
            for name in sorted(running):  # JetStream's API answers through each node
                await _poll(lambda name=name: _account_info(self.url(self.index_of(name))),
                            deadline)
            async with _connected(self._running_urls()) as js:
                await _poll(lambda: js.add_stream(name=probe, subjects=[f"{probe}.>"],
                                                  num_replicas=len(running),
                                                  storage=StorageType.MEMORY), deadline)
                await _poll(lambda: caught_up(js), deadline)
                await js.delete_stream(probe)

        try:
            asyncio.run(ready())
        except TimeoutError as timeout_error:
            raise AssertionError(f"cluster not ready within {timeout}s: {timeout_error}") from None

    def stream_leader(self, stream: str) -> str | None:
        """The server name of ``stream``'s leader, None while it has none (the request
        raises while JetStream cannot answer it; ``wait_leader`` polls)."""
        info = self._request(lambda js: js.stream_info(stream))
        return info.cluster.leader if info.cluster else None

    def consumer_leader(self, stream: str, durable: str) -> str | None:
        """The server name of the durable consumer's leader, None while it has none (the
        request raises while JetStream cannot answer it; ``wait_leader`` polls)."""
        info = self._request(lambda js: js.consumer_info(stream, durable))
        return info.cluster.leader if info.cluster else None

    def meta_leader(self) -> str | None:
        """The server name of the JetStream meta leader (which serves stream and consumer
        create/info/delete), as each running node's log last reported it; None until they
        agree. Read from the logs: without a system account the server will not say."""
        seen: set[str | None] = set()
        for i, name in enumerate(self.names, 1):
            if self.pid(i) is not None:
                changes = _META_LEADER.findall(self._server(i).log_path.read_text(errors="replace"))
                itself, other = changes[-1] if changes else ("", "")
                seen.add(name if itself else other or None)
        return seen.pop() if len(seen) == 1 else None

    def wait_leader(self, stream: str, durable: str | None = None, not_on: str | None = None,
                    timeout: float = 30.0) -> str:
        """Poll until the stream (or, given ``durable``, that consumer) has a leader other
        than ``not_on``; return its server name. Fails after ``timeout``."""
        async def elected() -> str | None:
            # A short timeout: requests go unanswered while there is no leader.
            async with _connected(self._running_urls(), timeout=0.5) as js:
                if durable is None:
                    info = await js.stream_info(stream)
                else:
                    info = await js.consumer_info(stream, durable)
            leader = info.cluster.leader if info.cluster else None
            return leader if leader != not_on else None

        what = f"a leader of {stream}{'/' + durable if durable else ''} other than {not_on}"
        try:
            return asyncio.run(_poll(elected, time.monotonic() + timeout))
        except TimeoutError as timeout_error:
            raise AssertionError(f"no {what} within {timeout}s: {timeout_error}") from None

    def _request(self, call: Callable[[Any], Awaitable[Any]]) -> Any:
        async def main() -> Any:
            async with _connected(self._running_urls()) as js:
                return await call(js)
        return asyncio.run(main())

    def _running_urls(self) -> str:
        return ",".join(self.url(i) for i in range(1, SIZE + 1) if self.pid(i) is not None)

    def _server(self, i: int) -> NatsServer:
        if not 1 <= i <= SIZE:
            raise IndexError(f"node {i}: nodes are numbered 1..{SIZE}")
        return self.servers[i - 1]


class _connected:
    """``async with _connected(urls) as js``: a JetStream context on one of ``urls``."""

    def __init__(self, urls: str, timeout: float = 2.0) -> None:
        self.urls, self.timeout = urls.split(","), timeout

    async def __aenter__(self) -> Any:
        self.nc = await nats.connect(servers=self.urls, connect_timeout=2,
                                     allow_reconnect=False, max_reconnect_attempts=0)
        return self.nc.jetstream(timeout=self.timeout)

    async def __aexit__(self, *exc_info: object) -> None:
        await self.nc.close()


def _current(cluster: ClusterInfo | None, running: set[str], replicas: int) -> bool:
    """Whether an asset's leader runs and, with it, min(replicas, running) members are current."""
    if cluster is None or cluster.leader not in running:
        return False
    current = [p for p in cluster.replicas or [] if p.name in running and p.current and not p.offline]
    return 1 + len(current) >= min(replicas, len(running))


async def _account_info(url: str) -> Any:
    async with _connected(url, timeout=0.5) as js:  # unanswered until there is a meta leader
        return await js.account_info()


async def _poll(attempt: Callable[[], Awaitable[Any]], deadline: float) -> Any:
    """Await ``attempt()`` until it returns something truthy without raising; raise
    TimeoutError past ``deadline`` with the last error or result."""
    last: Any = None
    while True:
        try:
            result = await attempt()
            if result:
                return result
            last = result
        except Exception as error:  # not elected yet, no responders, timeouts...
            last = error
        if time.monotonic() > deadline:
            raise TimeoutError(f"last: {last!r}")
        await asyncio.sleep(0.05)


def _distinct_free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)
