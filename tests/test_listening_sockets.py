"""What a running bus listens on: loopback only, unless the user opts out.

Thespian's transport unpickles whatever reaches an actor's socket, so every
socket of every process of the bus is checked, from ``/proc``: the program
itself, each actor, Thespian's admin and logger.
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket

import pytest
from thespian.system.transport import IPBase

from actorbus import transport_binding
from actorbus.ports import free_port
from actorbus.transport_binding import (TransportBindingError, hold_transport_host,
                                        resolve_transport_host)
from tests.support import wait_for

pytestmark = pytest.mark.integration

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's "st" column


def _decode(field: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """``0100007F:1F90`` (the kernel's byte order, 32-bit words) -> (127.0.0.1, 8080)."""
    host, port = field.split(":")
    raw = bytes.fromhex(host)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words), int(port, 16)


def listening_sockets(pid: int) -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """The (address, port) of each listening TCP socket ``pid`` holds open."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:["):-1]))
    found = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as rows:
            for row in rows.readlines()[1:]:
                fields = row.split()
                if fields[3] == _LISTEN and int(fields[9]) in inodes:
                    found.append(_decode(fields[1]))
    return found


def non_loopback_ipv4() -> str | None:
    """An IPv4 address of this host outside 127/8, or None."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
    except OSError:
        infos = []
    for info in infos:
        if not ipaddress.IPv4Address(info[4][0]).is_loopback:
            return info[4][0]
    # A UDP "connect" only picks the route's source address: nothing is sent.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if ipaddress.IPv4Address(address).is_loopback or address == "0.0.0.0" else address


def bus_sockets(make_bus) -> tuple[object, int, dict[int, list]]:
    """Start a bus of two members with metrics; return it, its metrics port and the
    listening sockets of each of its processes (this one included)."""
    metrics_port = free_port()
    bus = make_bus(pool_size=2, metrics_port=metrics_port)
    system = wait_for(lambda: (lambda pids: pids if len(pids) >= len(bus.pids) + 2 else None)(
        bus.runtime.pids()), timeout=10, what="Thespian's admin, logger and actor processes")
    pids = {os.getpid(), *bus.pids.values(), *system}
    return bus, metrics_port, {pid: listening_sockets(pid) for pid in sorted(pids)}


def test_every_socket_of_a_bus_listens_on_loopback(make_bus):
    bus, metrics_port, sockets = bus_sockets(make_bus)

    for pid, found in sockets.items():
        for address, port in found:
            assert address.is_loopback, f"pid {pid} listens on {address}:{port}"
    ports = {port for found in sockets.values() for _, port in found}
    assert bus.runtime.admin_port in ports
    assert metrics_port in ports
    # Each actor has a socket of its own (besides those it inherited when forked).
    for name, pid in bus.pids.items():
        others = {port for other, found in sockets.items() if other != pid for _, port in found}
        assert {port for _, port in sockets[pid]} - others, f"{name} has no socket of its own"
    assert bus.stats()["actors"]  # the actors and the admin still talk over loopback


def test_the_bus_ports_refuse_connections_on_the_network_address(make_bus):
    address = non_loopback_ipv4()
    if address is None:
        pytest.skip("this host has no non-loopback IPv4 address to try")
    _, metrics_port, sockets = bus_sockets(make_bus)
    ports = sorted({port for found in sockets.values() for _, port in found})
    # This program's endpoint and metrics, Thespian's admin and logger, five actors.
    assert metrics_port in ports and len(ports) >= 9

    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
            client.settimeout(5)
            result = client.connect_ex((address, port))
        assert result == errno.ECONNREFUSED, f"{address}:{port}: {os.strerror(result)}"


def test_opting_out_to_every_interface_warns(caplog):
    caplog.set_level(logging.WARNING, logger="actorbus.transport")
    release = hold_transport_host("0.0.0.0")
    try:
        address = IPBase.TCPv4ActorAddress(None, 0, external=True)
        assert address.bindArgs == (("", 0),)  # Thespian's own behaviour: every interface
    finally:
        release()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "0.0.0.0" in warnings[0].getMessage()
    assert "not encrypted" in warnings[0].getMessage()


def test_loopback_is_the_default_and_binds_and_advertises_it(caplog, monkeypatch):
    monkeypatch.delenv(transport_binding.TRANSPORT_HOST_ENV, raising=False)
    caplog.set_level(logging.WARNING, logger="actorbus.transport")
    host = resolve_transport_host()
    release = hold_transport_host(host)
    try:
        address = IPBase.TCPv4ActorAddress(None, 0, external=True)
        assert address.bindArgs == (("127.0.0.1", 0),)
        assert address.sockname[0] == "127.0.0.1"
        again = hold_transport_host(host)  # a second system on the same host: fine
        again()
        with pytest.raises(TransportBindingError, match="already runs an actor system"):
            hold_transport_host("0.0.0.0")
    finally:
        release()
    assert host == "127.0.0.1"
    assert not [r for r in caplog.records if r.name == "actorbus.transport"]


def test_the_transport_host_comes_from_the_argument_or_the_environment(monkeypatch):
    monkeypatch.setenv(transport_binding.TRANSPORT_HOST_ENV, "0.0.0.0")
    assert resolve_transport_host() == "0.0.0.0"
    assert resolve_transport_host("127.0.0.1") == "127.0.0.1"
    with pytest.raises(ValueError, match="IPv4 address"):
        resolve_transport_host("localhost")


def test_a_thespian_of_another_shape_fails_start_up(monkeypatch):
    def other_init(self, family, kind, proto, host, port, external=False):
        pass

    monkeypatch.setattr(IPBase.IPActorAddress, "__init__", other_init)
    with pytest.raises(TransportBindingError, match=r"Thespian \d+\.\d+") as failure:
        hold_transport_host("127.0.0.1")
    assert "IPActorAddress.__init__" in str(failure.value)
    assert transport_binding._holders == 0
