"""The bus's configuration values, validated where they are made.

A leaf of the import graph (it imports only other value modules), so
every layer can take a :class:`BusConfig` or a :class:`SubscriptionConfig`
as a typed value; both travel pickled to the actor processes.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from actorbus.codecs import EnvelopeFormat
from actorbus.envelope import DEFAULT_MAX_ENVELOPE_BYTES
from actorbus.policies import SupervisionTree, as_tree, exponential_delay

RUNTIMES = ("processes", "simple")
#: Largest ``BusConfig.window``: messages the Bridge may have in flight.
MAX_WINDOW = 100_000
STORAGE_TYPES = ("file", "memory")

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SUBJECT_TOKEN = re.compile(r"[^\s.*>]+|\*|>")


class ConfigurationError(ValueError):
    """A configuration value that cannot work; the message names it."""


class SettlementPolicy(enum.StrEnum):
    """What a failed handler's message is told (after its in-place retries), as
    FastStream's ``AckPolicy`` names it.

    ``envelope=True`` picks ``NACK_ON_ERROR`` and ``envelope=False`` picks
    ``ACK``; pass ``settlement=`` to choose otherwise.
    """

    #: nak it, with a delay: redelivered (at-least-once); dead-lettered after max_deliver.
    NACK_ON_ERROR = "nack_on_error"
    #: ack it anyway: never redelivered (at-most-once); the failure is logged.
    ACK = "ack"

    @property
    def redelivers(self) -> bool:
        """True when a failure is redelivered."""
        return self is SettlementPolicy.NACK_ON_ERROR

#: In-place retries by default where failures are redelivered (they keep a transient
#: error from reordering a key); at-most-once runs the handler once.
DEFAULT_RETRIES = 3


@dataclass(frozen=True)
class SubscriptionConfig:
    """One durable JetStream consumer and the handler for its messages."""

    subject: str
    handler: str
    #: The body is an envelope: decoded, validated, invalid ones dead-lettered. Also
    #: picks the default ``settlement`` (envelopes redelivered, plain messages not).
    envelope: bool = True
    settlement: SettlementPolicy = None  # type: ignore[assignment]  # None: derived at construction
    #: The envelope encoding: ``auto`` recognises msgpack or JSON per message by its first
    #: bytes; ``msgpack`` or ``json`` fixes it.
    envelope_format: EnvelopeFormat = EnvelopeFormat.AUTO
    durable: str = None  # type: ignore[assignment]  # None: derived at construction
    stream: str = None  # type: ignore[assignment]  # None: derived at construction
    storage: str | None = None
    ack_wait: float = 30.0
    max_deliver: int = 5
    max_ack_pending: int = 4096
    #: In-place retries before a failure counts (None: 3 when failures are redelivered, else 0;
    #: more than 0 on an at-most-once subscription means the handler must be idempotent).
    retries: int = None  # type: ignore[assignment]  # None: derived at construction
    retry_backoff: float = 0.05
    retry_backoff_max: float = 1.0
    nak_delay: float = 0.5
    nak_delay_max: float = 30.0
    batch_size: int = 512
    pull_expires: float = 5.0
    max_envelope_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES
    key_from_subject: bool = False
    dead_letter_subject: str = None  # type: ignore[assignment]  # None: derived at construction
    dead_letter_stream: str = None  # type: ignore[assignment]  # None: derived at construction
    processing_timeout: float | None = None

    def __post_init__(self) -> None:
        _check_subject(self.subject)
        try:
            settlement = SettlementPolicy(self.settlement if self.settlement is not None else
                                          SettlementPolicy.NACK_ON_ERROR if self.envelope else
                                          SettlementPolicy.ACK)
            object.__setattr__(self, "settlement", settlement)
        except ValueError:
            raise ConfigurationError(f"settlement must be one of "
                                     f"{[str(p) for p in SettlementPolicy]}, got {self.settlement!r}") from None
        try:
            object.__setattr__(self, "envelope_format", EnvelopeFormat(self.envelope_format))
        except ValueError:
            raise ConfigurationError(f"envelope_format must be one of "
                                     f"{[str(f) for f in EnvelopeFormat]}, got {self.envelope_format!r}") from None
        if self.retries is None:
            object.__setattr__(self, "retries", DEFAULT_RETRIES if self.settlement.redelivers else 0)
        if self.stream is None:
            object.__setattr__(self, "stream", _default_stream(self.subject))
        if self.durable is None:
            object.__setattr__(self, "durable", self.stream.lower())
        if self.dead_letter_subject is None:
            object.__setattr__(self, "dead_letter_subject", f"deadletter.{self.stream}")
        if self.dead_letter_stream is None:
            object.__setattr__(self, "dead_letter_stream", f"{self.stream}_DLQ")
        _check_name("stream", self.stream)
        _check_name("durable", self.durable)
        _check_name("dead_letter_stream", self.dead_letter_stream)
        _check_subject(self.dead_letter_subject, what="dead_letter_subject")
        if "*" in self.dead_letter_subject.split(".") or ">" in self.dead_letter_subject.split("."):
            raise ConfigurationError(
                f"dead_letter_subject must not contain wildcards, got {self.dead_letter_subject!r}")
        if self.storage is not None and self.storage not in STORAGE_TYPES:
            raise ConfigurationError(f"storage must be one of {STORAGE_TYPES}, got {self.storage!r}")
        for name in ("ack_wait", "retry_backoff", "retry_backoff_max", "nak_delay",
                     "nak_delay_max", "pull_expires"):
            _check_positive(name, getattr(self, name))
        for name in ("max_ack_pending", "batch_size", "max_envelope_bytes"):
            _check_count(name, getattr(self, name), minimum=1)
        _check_count("retries", self.retries, minimum=0)
        if self.processing_timeout is not None:
            _check_positive("processing_timeout", self.processing_timeout)
        if isinstance(self.max_deliver, bool) or not isinstance(self.max_deliver, int) or \
                not (self.max_deliver == -1 or self.max_deliver >= 1):
            raise ConfigurationError(
                f"max_deliver must be -1 (unlimited) or an int >= 1, got {self.max_deliver!r}")

    @property
    def name(self) -> str:
        """The subscription's name within a bus: its durable consumer's name."""
        return self.durable

    @property
    def storage_type(self) -> str:
        """The stream storage to create: file for envelopes, memory for plain, unless set."""
        return self.storage or ("file" if self.envelope else "memory")

    def is_last_delivery(self, delivery_count: int) -> bool:
        """True when JetStream will not deliver this message again (``max_deliver`` reached)."""
        return self.max_deliver != -1 and delivery_count >= self.max_deliver

    def nak_delay_for(self, delivery_count: int) -> float:
        """Redelivery delay after a failed delivery: exponential in the delivery count."""
        return exponential_delay(self.nak_delay, self.nak_delay_max, delivery_count - 1)

    def retry_delay_for(self, attempt: int) -> float:
        """Pause before in-place retry after ``attempt`` (1 for the first) failed."""
        return exponential_delay(self.retry_backoff, self.retry_backoff_max, attempt - 1)


@dataclass(frozen=True)
class BusConfig:
    """The bus as a whole: where NATS is, how big the pool is, what runs it."""

    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    pool_size: int = 8
    runtime: str = "processes"
    window: int = 2048
    connect_timeout: float = 5.0
    name: str = "actorbus"
    #: A policy for both levels, or a :class:`SupervisionTree`; normalised to a tree.
    supervision: SupervisionTree = None  # type: ignore[assignment]  # None: the defaults

    def __post_init__(self) -> None:
        if isinstance(self.servers, str):
            object.__setattr__(self, "servers", tuple(s.strip() for s in self.servers.split(",")))
        if not self.servers or not all(isinstance(s, str) and s for s in self.servers):
            raise ConfigurationError(f"servers must name at least one NATS URL, got {self.servers!r}")
        if isinstance(self.pool_size, bool) or not isinstance(self.pool_size, int) or self.pool_size < 0:
            raise ConfigurationError(
                f"pool_size must be an int >= 0 (0 processes in the Bridge), got {self.pool_size!r}")
        if self.runtime not in RUNTIMES:
            raise ConfigurationError(f"runtime must be one of {RUNTIMES}, got {self.runtime!r}")
        # The window bounds memory, not Thespian's queues: the Bridge holds
        # dispatches back while the Router is behind (see bridge.actor).
        _check_count("window", self.window, minimum=1)
        if self.window > MAX_WINDOW:
            raise ConfigurationError(f"window must be <= {MAX_WINDOW}, got {self.window}")
        _check_positive("connect_timeout", self.connect_timeout)
        try:
            object.__setattr__(self, "supervision", as_tree(self.supervision))
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None


def _check_subject(subject: object, what: str = "subject") -> None:
    if not isinstance(subject, str) or not subject:
        raise ConfigurationError(f"{what} must be a non-empty str, got {subject!r}")
    tokens = subject.split(".")
    if not all(_SUBJECT_TOKEN.fullmatch(t) for t in tokens) or ">" in tokens[:-1]:
        raise ConfigurationError(f"{what} {subject!r} is not a valid NATS subject")


def _default_stream(subject: str) -> str:
    first = subject.split(".", 1)[0]
    if first in ("*", ">"):
        raise ConfigurationError(f"subject {subject!r} starts with a wildcard: name its stream")
    return re.sub(r"[^A-Za-z0-9_-]", "_", first).upper()


def _check_name(what: str, value: object) -> None:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ConfigurationError(f"{what} must be 1-64 characters of [A-Za-z0-9_-], got {value!r}")


def _check_positive(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigurationError(f"{what} must be a number > 0, got {value!r}")


def _check_count(what: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{what} must be an int >= {minimum}, got {value!r}")
