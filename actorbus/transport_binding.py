"""Where Thespian's TCP actor transport listens: loopback unless the user opts out.

Under ``multiprocTCPBase`` every actor, Thespian's admin, its logger and the
program that starts the system each listen on a TCP socket, and Thespian
unpickles whatever arrives there (:mod:`actorbus.transport_auth` makes it
refuse frames not signed with the bus's key; this module keeps the sockets
off the network in the first place). Thespian (the same code from 3.10.7 to 4.0.1, the
latest release) binds every one of them to ``('', port)``, all interfaces:
``IPBase.IPActorAddress`` sets ``bindname = ('', port)`` for every
"external" address, and every address the TCP transport listens on is made
external. It advertises the address of
the interface that routes towards 8.8.8.8, or ``$THESPIAN_BASE_IPADDR``.
No capability changes the bind address: ``Admin Routing``, ``Outbound
Only`` and ``Convention Address.IPv4`` choose who talks to whom, and
``THESPIAN_BASE_IPADDR`` only what is advertised.

So :func:`hold_transport_host` wraps ``IPActorAddress.__init__`` so that an
external IPv4 address with no explicit host gets the chosen host, both as
the address it advertises and as the one it binds. It must run in the
program before the actor system starts: the admin, its logger and the actors
are forked from it (and from each other) and inherit the adjusted class.
With ``0.0.0.0`` the wrapper changes nothing: Thespian's own behaviour.

The shape of Thespian this relies on is checked before anything changes; a
Thespian that no longer has it makes start-up fail with
:class:`TransportBindingError` rather than silently listen everywhere.
"""
from __future__ import annotations

import inspect
import ipaddress
import logging
import os
import socket
import threading
from importlib import metadata
from typing import Any
from collections.abc import Callable

log = logging.getLogger("actorbus.transport")

#: The default: nothing outside this host can reach the actors.
LOOPBACK = "127.0.0.1"
#: The explicit opt-out: Thespian's own behaviour, every interface.
ALL_INTERFACES = "0.0.0.0"
#: Overrides the default when ``EventBus(transport_host=...)`` is not given.
TRANSPORT_HOST_ENV = "ACTORBUS_TRANSPORT_HOST"

# The Thespian releases whose IPBase and TCPTransport were read for this
# (setup.cfg's floor to 4.0.1); a new major version must be read again.
_SUPPORTED_VERSIONS = ((3, 10, 7), (5,))
_EXPECTED_INIT = ["self", "af", "socktype", "proto", "baseaddr", "port", "external"]


class TransportBindingError(RuntimeError):
    """The actor transport cannot be bound as asked; the message says why."""


def resolve_transport_host(host: str | None = None) -> str:
    """The host the actor transport binds: ``host``, else ``$ACTORBUS_TRANSPORT_HOST``,
    else ``127.0.0.1``. It must be an IPv4 address (Thespian's TCP transport is IPv4)."""
    chosen = host if host is not None else (os.environ.get(TRANSPORT_HOST_ENV) or LOOPBACK)
    try:
        ipaddress.IPv4Address(chosen)
    except ValueError:
        source = "transport_host" if host is not None else f"${TRANSPORT_HOST_ENV}"
        raise ValueError(f"{source} must be an IPv4 address such as {LOOPBACK} (the default) "
                         f"or {ALL_INTERFACES} (every interface), got {chosen!r}") from None
    return chosen


def is_loopback(host: str) -> bool:
    """True when ``host`` is reachable from this machine only."""
    return ipaddress.IPv4Address(host).is_loopback


# Process-wide on purpose: Thespian makes its addresses deep inside its own
# code (in this process and in every process forked from it), so the only
# place to change them is its address class, and the host that class reads
# must be as global as the class. Holders are counted so that two actor
# systems in one process cannot ask for different hosts at the same time.
_lock = threading.Lock()
_host: str | None = None  # None: Thespian's own behaviour
_holders = 0
_original_init: Callable[..., None] | None = None


def hold_transport_host(host: str) -> Callable[[], None]:
    """Make the actor systems this process starts (and their forked processes)
    listen on ``host``; return the function that gives the hold back.

    Call it before the actor system starts and release once it has shut down.
    Idempotent: the adjustment is installed once, later holds for the same
    host only count. Raises :class:`TransportBindingError` when the installed
    Thespian does not have the shape the adjustment expects, or when another
    actor system of this process holds a different host.
    """
    global _host, _holders
    loopback = is_loopback(host)  # a ValueError here, before anything changes
    target = None if host == ALL_INTERFACES else host
    # Before 4.0.1 Thespian lets this variable override any host it is given,
    # so it would advertise an address that nothing listens on.
    advertised = os.environ.get("THESPIAN_BASE_IPADDR")
    if target is not None and advertised and advertised != host:
        raise TransportBindingError(
            f"THESPIAN_BASE_IPADDR={advertised} contradicts the actor transport host {host}: "
            f"unset it, or set transport_host (or ${TRANSPORT_HOST_ENV}) to it")
    with _lock:
        if _holders and target != _host:
            raise TransportBindingError(
                f"this process already runs an actor system whose transport listens on "
                f"{_host or ALL_INTERFACES}; one cannot listen on {host} beside it")
        _install()
        if target is not None:
            # What Thespian does for an address it found itself: its own
            # address comparisons then know this host is this machine.
            _this_system().add_local_addr(target)
        _host = target
        _holders += 1
        if target is not None:
            _check_adjusted(target)
    if not loopback:
        log.warning("Thespian's actor transport listens on %s (transport_host): its frames "
                    "are signed but not encrypted, so anyone on the network path reads every "
                    "message between the actors and can replay them; use it only on a trusted "
                    "network", host)
    released = False

    def release() -> None:
        global _host, _holders
        nonlocal released
        with _lock:
            if released:
                return
            released = True
            _holders -= 1
            if not _holders:
                _host = None
    return release


def _adjusted_init(self: Any, af: int, socktype: int, proto: int, baseaddr: Any, port: Any,
                   external: Any = False) -> None:
    assert _original_init is not None  # installed before this replaces it
    host = _host
    if host is None or not external or af != socket.AF_INET:
        _original_init(self, af, socktype, proto, baseaddr, port, external)
        return
    if baseaddr in (None, "", ALL_INTERFACES):
        baseaddr = host  # advertise it: an address on another interface would not answer
    _original_init(self, af, socktype, proto, baseaddr, port, external)
    if self.bindname[0] == "":
        self.bindname = (host, self.bindname[1])


def _install() -> None:
    """Wrap ``IPActorAddress.__init__`` once, after checking Thespian's shape (under ``_lock``)."""
    global _original_init
    from thespian.system.transport import IPBase, TCPTransport

    if IPBase.IPActorAddress.__init__ is _adjusted_init:
        return  # already installed: never wrap the wrapper

    version = _thespian_version()
    cls = IPBase.IPActorAddress
    problems = []
    if not _SUPPORTED_VERSIONS[0] <= _version_tuple(version) < _SUPPORTED_VERSIONS[1]:
        problems.append(f"a version from {'.'.join(map(str, _SUPPORTED_VERSIONS[0]))} "
                        f"to before {_SUPPORTED_VERSIONS[1][0]}.0")
    try:
        params = list(inspect.signature(cls.__init__).parameters)
    except (TypeError, ValueError):
        params = None
    if params != _EXPECTED_INIT:
        problems.append(f"IPBase.IPActorAddress.__init__{tuple(_EXPECTED_INIT)}, found {params}")
    if not isinstance(inspect.getattr_static(cls, "bindArgs", None), property):
        problems.append("IPBase.IPActorAddress.bindArgs, a property")
    if "bindArgs" not in TCPTransport.TCPTransport.__init__.__code__.co_names:
        problems.append("TCPTransport.__init__ binding its socket to addressDetails.bindArgs")
    if not hasattr(getattr(IPBase, "thisSystem", None), "add_local_addr"):
        problems.append("IPBase.thisSystem.add_local_addr")
    if not problems:
        probe = IPBase.TCPv4ActorAddress(LOOPBACK, 0, external=True)
        if getattr(probe, "bindname", None) != ("", 0) or probe.bindArgs != (("", 0),):
            problems.append("external addresses bound to ('', port)")
    if problems:
        raise TransportBindingError(
            f"cannot keep Thespian's actor transport off the network: Thespian {version} is "
            f"installed and actorbus expected {'; '.join(problems)}")
    _original_init = cls.__init__
    cls.__init__ = _adjusted_init
    log.debug("Thespian %s: actor transport addresses bind the chosen transport host", version)


def _check_adjusted(host: str) -> None:
    """An address made as Thespian makes its listening ones must now bind and
    advertise ``host`` (under ``_lock``; gives the hold back if not)."""
    global _host, _holders
    from thespian.system.transport import IPBase
    probe = IPBase.TCPv4ActorAddress(None, 0, external=True)
    if probe.bindArgs != ((host, 0),) or probe.sockname[0] != host:
        _holders -= 1
        if not _holders:
            _host = None
        raise TransportBindingError(
            f"Thespian {_thespian_version()}: an actor address still binds {probe.bindArgs[0]} "
            f"and advertises {probe.sockname}, expected {host} for both")


def _this_system() -> Any:
    from thespian.system.transport import IPBase
    return IPBase.thisSystem


def _thespian_version() -> str:
    try:
        return metadata.version("thespian")
    except metadata.PackageNotFoundError:
        return "(version unknown)"


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)
