"""Fixtures: a real nats-server per test, and buses that are always stopped."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from actorbus import EventBus
from actorbus.server import NatsServer
from tests.cluster import NatsCluster
from tests.support import GROUP_PARTITIONS, GroupHost, bus_factory


@pytest.fixture
def nats_server(tmp_path: Path):
    """A nats-server with JetStream on a free port and a temp store; stopped by pid."""
    server = NatsServer(store_dir=tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_cluster():
    """Three clustered nats-servers with JetStream on loopback, ready for R3 streams;
    stopped by pid and their temp dir removed in teardown."""
    with NatsCluster() as cluster:
        yield cluster


@pytest.fixture
def records(tmp_path: Path, monkeypatch) -> Path:
    """Where the test handlers write what they saw (set before actors fork)."""
    directory = tmp_path / "records"
    directory.mkdir()
    monkeypatch.setenv("ACTORBUS_TEST_RECORDS", str(directory))
    return directory


@pytest.fixture
def log_file(tmp_path: Path) -> Path:
    """The file actor logs go to for buses made by ``make_bus``."""
    return tmp_path / "actorbus.log"


@pytest.fixture
def make_bus(nats_server: NatsServer, records: Path, log_file: Path) -> Callable[..., EventBus]:
    """Build EventBus instances on the test's server; every one is stopped in teardown."""
    with bus_factory(log_file, servers=nats_server.url) as make:
        yield make


@pytest.fixture
def group_hosts(nats_server: NatsServer, tmp_path: Path, records: Path):
    """Start members of a partitioned group, each a bus in a process of its own, with
    ``start(member, members=None, group="billing", heartbeat=None, bridges=1)`` (``members``: a
    static group's list; without it the group is elastic); every one is gone after the test,
    by pid."""
    started: list[GroupHost] = []

    def start(member: str, members: list[str] | None = None, group: str = "billing",
              heartbeat: float | None = None, bridges: int = 1) -> GroupHost:
        host = GroupHost(nats_server.url, tmp_path / f"{member}-{len(started)}.pids", group,
                         GROUP_PARTITIONS, member, members, heartbeat=heartbeat,
                         bridges=bridges)
        started.append(host)
        host.wait_started()
        return host

    yield start
    for host in started:
        host.ensure_gone()
