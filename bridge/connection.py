"""How the bus connects to NATS: the one place that builds nats-py's ``connect`` options.

The Bridge and the facade's publisher both connect through
:func:`open_connection` (options from :func:`connect_options`), so a
setting (servers, timeouts, and the credentials and TLS of a secured
server) means the same to both. The configuration carries plain values
(paths and strings), never live objects such as an ``ssl.SSLContext``: it
travels pickled to the Bridge's process, and the context is built where
the connection is made.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from typing import Any
from collections.abc import Awaitable, Callable

from nats import errors as nats_errors
from nats.aio.client import Client

from actorbus.config import BusConfig
from actorbus.redaction import redact, split_server_url

log = logging.getLogger("actorbus.bridge")

#: Seconds between reconnect attempts.
RECONNECT_TIME_WAIT = 0.5

Callback = Callable[..., Awaitable[None]]


def tls_context(config: BusConfig) -> ssl.SSLContext | None:
    """The client's TLS context for ``config.auth``, or None to leave TLS to nats-py
    (the system's CAs for a ``tls://`` URL or a server that requires TLS)."""
    auth = config.auth
    if not auth.uses_tls:
        return None
    # Verifies the server's certificate and host name: the CA file instead of
    # the system's store when given.
    context = ssl.create_default_context(cafile=auth.tls_ca)
    if auth.tls_cert is not None:
        context.load_cert_chain(auth.tls_cert, auth.tls_key)
    return context


def connect_options(config: BusConfig, *, name: str, reconnect_forever: bool,
                    error_cb: Callback | None = None, disconnected_cb: Callback | None = None,
                    reconnected_cb: Callback | None = None) -> dict[str, Any]:
    """Keyword arguments for ``nats.connect`` for ``config``.

    ``reconnect_forever`` is for the Bridge, which must outlive a server
    restart; the publisher gives up after a few attempts so that a caller
    gets an error instead of a hang. Credentials go to nats-py as they
    are: ``user``/``password``, ``token``, ``nkeys_seed`` (a seed file),
    ``user_credentials`` (a creds file), ``tls``.
    """
    options: dict[str, Any] = {
        "servers": list(config.servers),
        "name": name,
        "connect_timeout": config.connect_timeout,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1 if reconnect_forever else 3,
        "reconnect_time_wait": RECONNECT_TIME_WAIT,
    }
    auth = config.auth
    given = {"user": auth.user, "password": auth.password, "token": auth.token,
             "nkeys_seed": auth.nkey_seed, "user_credentials": auth.creds}
    options.update({key: value for key, value in given.items() if value is not None})
    context = tls_context(config)
    if context is not None:
        options["tls"] = context
    callbacks = {"error_cb": error_cb, "disconnected_cb": disconnected_cb,
                 "reconnected_cb": reconnected_cb}
    options.update({key: cb for key, cb in callbacks.items() if cb is not None})
    return options


def describe_error(exc: BaseException, secrets: tuple[str, ...] = ()) -> str:
    """A short reason for a NATS connection error, without nats-py's prefixes and
    with ``secrets`` masked: ``authorization violation``, ``certificate verify failed``."""
    if isinstance(exc, ssl.SSLError):
        text = exc.reason or str(exc)
        text = text.replace("_", " ").lower()
    elif isinstance(exc, (asyncio.TimeoutError, TimeoutError)) and not str(exc):
        text = "timed out"
    elif isinstance(exc, ConnectionRefusedError):
        text = "connection refused"
    else:
        text = str(exc) or type(exc).__name__
        if text.startswith("nats: "):
            text = text[len("nats: "):]
        text = text.strip().strip("'").strip()
        if "authorization violation" in text.lower():
            text = "authorization violation"
    return redact(text, secrets)


class NatsConnectError(ConnectionError):
    """NATS could not be reached or refused us; the message names the servers (secrets
    masked) and the last reason: ``cannot connect to NATS at <urls>: <reason> (tried for N s)``."""


async def open_connection(config: BusConfig, *, name: str, reconnect_forever: bool,
                          error_cb: Callback | None = None, disconnected_cb: Callback | None = None,
                          reconnected_cb: Callback | None = None,
                          client: Client | None = None) -> Client:
    """Connect, trying for up to ``config.connect_timeout`` seconds.

    nats-py retries a failing first connect (forever, for the Bridge) and
    reports each failure to the error callback: until connected, failures
    are only remembered, and one :class:`NatsConnectError` with the last
    reason is raised at the deadline. Once connected, errors go to
    ``error_cb``. ``client`` is a client not yet connected to use (a plain one
    by default).
    """
    secrets = config.secrets()
    last: list[BaseException] = []
    connected = False

    async def on_error(exc: Exception) -> None:
        if not connected:
            # What the server said (authorization violation) or what TLS found
            # (certificate verify failed) says more than the reset that follows it.
            if _says_why(exc) or not (last and _says_why(last[-1])):
                last[:] = [exc]
        elif error_cb is not None:
            await error_cb(exc)

    options = connect_options(config, name=name, reconnect_forever=reconnect_forever,
                              error_cb=on_error, disconnected_cb=disconnected_cb,
                              reconnected_cb=reconnected_cb)
    client = client if client is not None else Client()
    started = time.monotonic()
    try:
        await asyncio.wait_for(client.connect(**options), config.connect_timeout)
    except BaseException as exc:
        await _abandon(client)
        reason = last[-1] if last else exc
        if isinstance(exc, (asyncio.TimeoutError, TimeoutError)) and not last:
            reason = TimeoutError()
        elif isinstance(exc, nats_errors.NoServersError) and last:
            reason = last[-1]
        if isinstance(exc, asyncio.CancelledError) and not isinstance(exc, asyncio.TimeoutError):
            raise
        if not _says_why(reason) and config.auth.uses_tls:
            alert = await asyncio.to_thread(_tls_alert, config)
            reason = alert if alert is not None else reason
        tried = time.monotonic() - started
        raise NatsConnectError(
            f"cannot connect to NATS at {config.shown_servers()}: "
            f"{describe_error(reason, secrets)} (tried for {tried:.0f} s)") from None
    connected = True
    return client


def _says_why(exc: BaseException) -> bool:
    """True for an error of the server or of TLS, not a bare network failure or timeout."""
    if isinstance(exc, ssl.SSLError):
        return True
    return isinstance(exc, nats_errors.Error) and not isinstance(
        exc, (nats_errors.TimeoutError, nats_errors.NoServersError))


def _tls_alert(config: BusConfig, timeout: float = 1.0) -> ssl.SSLError | None:
    """The TLS alert the first server sends a client like ours, if any.

    With TLS 1.3 a server checks the client's certificate after the client's
    handshake is done, so its alert (``certificate required``) races the
    client's first write: nats-py often sees only a broken pipe or a reset.
    This handshake writes nothing after it and reads the alert, so the error
    names the cause. It is made only after a connect failed for a bare reason.
    """
    context = tls_context(config)
    if context is None:
        return None
    url = config.servers[0]
    parts = split_server_url(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 4222
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            raw.settimeout(timeout)
            info = b""
            while not info.endswith(b"\r\n"):
                chunk = raw.recv(1)
                if not chunk or not b"INFO".startswith(info[:4]):
                    return None     # not a NATS server that greets first: nats-py's error stands
                info += chunk
            with context.wrap_socket(raw, server_hostname=host) as secured:
                secured.recv(1)
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
        return None     # closed without a reason: no better than nats-py's error
    except ssl.SSLError as exc:
        return exc
    except OSError:
        return None
    return None


async def _abandon(client: Client) -> None:
    # A connect given up on still holds a transport and maybe tasks: close them quietly.
    try:
        await asyncio.wait_for(client.close(), 2.0)
    except BaseException as exc:  # nothing useful to report: the connect error is what counts
        log.debug("closing an abandoned connection: %s", type(exc).__name__)
