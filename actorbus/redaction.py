"""Secrets kept out of logs, errors and reprs: URLs shown masked, known secrets redacted.

A NATS URL may carry a password or token in its user info
(``nats://alice:s3cret@host``); wherever the bus shows a URL it shows
:func:`mask_url`'s form, and free text that may quote one (a server's or a
library's error) goes through :func:`redact` first.
"""
from __future__ import annotations

from urllib.parse import SplitResult, urlsplit

#: What a secret is shown as.
MASK = "***"


def split_server_url(url: str) -> SplitResult:
    """``url`` split as a URL, ``nats://`` assumed when it names no scheme (``host:4222``)."""
    return urlsplit(url if "://" in url else f"nats://{url}")


def mask_url(url: str) -> str:
    """``url`` with the secret of its user info masked: ``nats://alice:***@host:4222``;
    a lone user name in a URL is a token to nats-py, so it is masked too."""
    try:
        parts = split_server_url(url)
    except ValueError:
        return MASK
    if "@" not in parts.netloc:
        return url
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, colon, _ = userinfo.partition(":")
    shown = f"{user}:{MASK}" if colon else MASK
    return parts._replace(netloc=f"{shown}@{host}").geturl()


def show_servers(servers: tuple[str, ...] | list[str] | str) -> str:
    """Server URLs as shown in logs and errors: comma-separated, secrets masked."""
    if isinstance(servers, str):
        servers = servers.split(",")
    return ", ".join(mask_url(s.strip()) for s in servers)


def url_secrets(servers: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The passwords (or tokens) in the user info of these URLs."""
    found = []
    for url in servers:
        try:
            parts = split_server_url(url)
        except ValueError:
            continue
        if parts.password:
            found.append(parts.password)
        elif "@" in parts.netloc and parts.username:
            found.append(parts.username)  # a token
    return tuple(found)


#: Shorter secrets are not redacted from free text: masking every "b" of a message
#: would hide the message, not a secret that short.
MIN_REDACTED = 4


def redact(text: str, secrets: tuple[str, ...] | list[str]) -> str:
    """``text`` with every occurrence of each of ``secrets`` (of at least
    :data:`MIN_REDACTED` characters) replaced by ``***``."""
    for secret in sorted(secrets, key=len, reverse=True):
        if secret and len(secret) >= MIN_REDACTED:
            text = text.replace(secret, MASK)
    return text
