"""Checks of configuration values, shared by the bus's and a consumer group's settings.

Each raises :class:`~actorbus.errors.ConfigurationError` naming the option
and the value it got. ``bool`` is refused where a number is asked for,
although Python counts it as an ``int``: ``retries=True`` is a mistake.
"""
from __future__ import annotations

import re

from actorbus.errors import ConfigurationError

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SUBJECT_TOKEN = re.compile(r"[^\s.*>]+|\*|>")


def check_name(what: str, value: object) -> None:
    """A stream, durable, group or member name: 1-64 characters of ``[A-Za-z0-9_-]``."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ConfigurationError(f"{what} must be 1-64 characters of [A-Za-z0-9_-], got {value!r}")


def check_subject(value: object, what: str = "subject") -> None:
    """A NATS subject: dot-separated tokens, ``*`` tokens, ``>`` only last."""
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{what} must be a non-empty str, got {value!r}")
    tokens = value.split(".")
    if not all(_SUBJECT_TOKEN.fullmatch(t) for t in tokens) or ">" in tokens[:-1]:
        raise ConfigurationError(f"{what} {value!r} is not a valid NATS subject")


def check_positive(what: str, value: object) -> None:
    """A number of seconds (or any quantity) above zero."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigurationError(f"{what} must be a number > 0, got {value!r}")


def check_count(what: str, value: object, *, minimum: int, maximum: int | None = None) -> None:
    """An ``int`` of at least ``minimum`` (and at most ``maximum``, when given)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or \
            (maximum is not None and value > maximum):
        wanted = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise ConfigurationError(f"{what} must be an int {wanted}, got {value!r}")
