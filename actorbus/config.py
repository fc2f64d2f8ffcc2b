"""The bus's configuration values, validated where they are made.

A leaf of the import graph (it imports only other value modules), so
every layer can take a :class:`BusConfig` or a :class:`SubscriptionConfig`
as a typed value; both travel pickled to the actor processes.
"""
from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass, fields
from collections.abc import Mapping
from typing import TypeVar

from actorbus.checks import check_count, check_name, check_positive, check_subject
from actorbus.codecs import EnvelopeFormat
from actorbus.envelope import DEFAULT_MAX_ENVELOPE_BYTES
from actorbus.errors import ConfigurationError
from actorbus.groups import MAX_PARTITIONS, ConsumerGroup, GroupKind, check_partitioned_subject
from actorbus.policies import RestartPolicy, SupervisionTree, as_tree, exponential_delay
from actorbus.redaction import MASK, mask_url, show_servers, split_server_url, url_secrets

RUNTIMES = ("processes", "simple")
#: Most Bridges a bus may run (each is a process with a NATS connection of its own).
MAX_BRIDGES = 64
#: Cores per Bridge of the default: a Bridge's work per message is about twice a
#: trivial handler's, and the nats-server on the same host needs its share too.
CORES_PER_BRIDGE = 4
#: URL schemes nats-py connects with (a URL without one means ``nats://``).
NATS_SCHEMES = ("nats", "tls", "ws", "wss")
#: ``BusConfig.window`` unless told: messages the Bridge may have in flight.
DEFAULT_WINDOW = 2048
#: ``SubscriptionConfig.batch_size`` unless told: most messages one pull request asks for.
DEFAULT_BATCH_SIZE = 512
#: Largest ``BusConfig.window``.
MAX_WINDOW = 100_000
STORAGE_TYPES = ("file", "memory")



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


class TraceMode(enum.StrEnum):
    """Which messages a subscription's handlers trace, with OpenTelemetry installed (the
    ``otel`` extra): a ``process`` span around the handler, and the Bridge's spans of it."""

    #: Those that carry a trace context (a ``traceparent`` header, else an envelope's
    #: ``trace_id``): the publisher's trace goes on. Others cost nothing.
    CONTINUE = "continue"
    #: Those too, and each other message in a trace of its own (a root span: the sampler
    #: decides, at a few microseconds per message even when it samples nothing).
    ALWAYS = "always"
    #: None.
    OFF = "off"


_Choice = TypeVar("_Choice", bound=enum.StrEnum)

#: Seconds without a pull request from a pinned bus before a standby is pinned, by default.
DEFAULT_PIN_TIMEOUT = 10.0

#: In-place retries by default where failures are redelivered (they keep a transient
#: error from reordering a key); at-most-once runs the handler once.
DEFAULT_RETRIES = 3


def _settlement_of(settlement: SettlementPolicy | str | None, envelope: bool) -> SettlementPolicy:
    """The settlement asked for, else the kind's default (envelopes redelivered, plain
    messages not)."""
    if settlement is None:
        return SettlementPolicy.NACK_ON_ERROR if envelope else SettlementPolicy.ACK
    return _choice("settlement", SettlementPolicy, settlement)


def _choice(name: str, vocabulary: type[_Choice], value: str) -> _Choice:
    """``value`` as a member of ``vocabulary`` (a member, or its string), or a
    :class:`ConfigurationError` naming the option and its choices."""
    try:
        return vocabulary(value)
    except ValueError:
        raise ConfigurationError(f"{name} must be one of {[str(m) for m in vocabulary]}, "
                                 f"got {value!r}") from None


@dataclass(frozen=True, init=False)
class SubscriptionConfig:
    """One durable JetStream consumer and the handler for its messages.

    Built resolved: an option left None in the constructor is derived from the
    others (the stream from the subject, the durable from the stream, ...), so
    every field holds the value the bus uses."""

    subject: str
    handler: str
    #: The body is an envelope: decoded, validated, invalid ones dead-lettered. Also
    #: picks the default ``settlement`` (envelopes redelivered, plain messages not).
    envelope: bool
    settlement: SettlementPolicy
    #: The envelope encoding: ``auto`` recognises msgpack or JSON per message by its first
    #: bytes; ``msgpack`` or ``json`` fixes it.
    envelope_format: EnvelopeFormat
    durable: str
    stream: str
    storage: str | None
    #: Copies of the stream (and its consumers) in a NATS cluster: 1, 3 or 5.
    replicas: int
    ack_wait: float
    max_deliver: int
    max_ack_pending: int
    #: In-place retries before a failure counts (by default 3 when failures are redelivered,
    #: else 0; more than 0 on an at-most-once subscription means the handler must be idempotent).
    retries: int
    retry_backoff: float
    retry_backoff_max: float
    nak_delay: float
    nak_delay_max: float
    batch_size: int
    pull_expires: float
    #: The durable's priority group with the ``pinned_client`` policy (nats-server >= 2.11):
    #: one bus at a time is pinned and gets messages, every other bus on the durable is a
    #: hot standby. None: no group (a second bus would split the keys with the first).
    priority_group: str | None
    #: Seconds without a pull request from the pinned bus before a standby is pinned
    #: (by default 10, or twice ``pull_expires`` if that is more).
    pin_timeout: float
    max_envelope_bytes: int
    key_from_subject: bool
    dead_letter_subject: str
    dead_letter_stream: str
    processing_timeout: float | None
    #: The stream is partitioned this many ways for a consumer group (see
    #: :mod:`actorbus.groups`): the subject ends with the aggregate id as a ``*`` token.
    partitions: int | None
    #: Which messages are traced (see :class:`TraceMode`; ``continue`` by default).
    tracing: TraceMode

    def __init__(self, subject: str, handler: str, envelope: bool = True,
                 settlement: SettlementPolicy | str | None = None,
                 envelope_format: EnvelopeFormat | str = EnvelopeFormat.AUTO,
                 durable: str | None = None, stream: str | None = None,
                 storage: str | None = None, replicas: int = 1, ack_wait: float = 30.0,
                 max_deliver: int = 5, max_ack_pending: int = 4096, retries: int | None = None,
                 retry_backoff: float = 0.05, retry_backoff_max: float = 1.0,
                 nak_delay: float = 0.5, nak_delay_max: float = 30.0,
                 batch_size: int = DEFAULT_BATCH_SIZE,
                 pull_expires: float = 5.0, priority_group: str | None = "actorbus",
                 pin_timeout: float | None = None,
                 max_envelope_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES,
                 key_from_subject: bool = False, dead_letter_subject: str | None = None,
                 dead_letter_stream: str | None = None, processing_timeout: float | None = None,
                 partitions: int | None = None,
                 tracing: TraceMode | str = TraceMode.CONTINUE) -> None:
        check_subject(subject)
        if partitions is not None:
            check_partitioned_subject(subject)
            # The partition is the subject's last token's: it is the key, whatever else says.
            key_from_subject = True
        resolved_settlement = _settlement_of(settlement, envelope)
        if stream is None:
            stream = _default_stream(subject)
        check_name("stream", stream)
        if pin_timeout is None and isinstance(pull_expires, (int, float)):
            pin_timeout = max(DEFAULT_PIN_TIMEOUT, 2 * pull_expires)
        values: dict[str, object] = {
            "subject": subject, "handler": handler, "envelope": envelope,
            "settlement": resolved_settlement, "envelope_format": _choice("envelope_format", EnvelopeFormat, envelope_format),
            "durable": stream.lower() if durable is None else durable, "stream": stream,
            "storage": storage, "replicas": replicas, "ack_wait": ack_wait,
            "max_deliver": max_deliver, "max_ack_pending": max_ack_pending,
            "retries": ((DEFAULT_RETRIES if resolved_settlement.redelivers else 0)
                        if retries is None else retries),
            "retry_backoff": retry_backoff, "retry_backoff_max": retry_backoff_max,
            "nak_delay": nak_delay, "nak_delay_max": nak_delay_max, "batch_size": batch_size,
            "pull_expires": pull_expires, "priority_group": priority_group,
            "pin_timeout": pin_timeout, "max_envelope_bytes": max_envelope_bytes,
            "key_from_subject": key_from_subject,
            "dead_letter_subject": (f"deadletter.{stream}" if dead_letter_subject is None
                                    else dead_letter_subject),
            "dead_letter_stream": f"{stream}_DLQ" if dead_letter_stream is None else dead_letter_stream,
            "processing_timeout": processing_timeout, "partitions": partitions,
            "tracing": _choice("tracing", TraceMode, tracing),
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)   # frozen: only while it is being built
        self._check_names()
        self._check_numbers()

    def _check_names(self) -> None:
        """The stream, durable, group and dead-letter names and subject."""
        if self.priority_group is not None:
            check_name("priority_group", self.priority_group)
        check_name("durable", self.durable)
        check_name("dead_letter_stream", self.dead_letter_stream)
        check_subject(self.dead_letter_subject, what="dead_letter_subject")
        if {"*", ">"} & set(self.dead_letter_subject.split(".")):
            raise ConfigurationError(
                f"dead_letter_subject must not contain wildcards, got {self.dead_letter_subject!r}")
        if self.storage is not None and self.storage not in STORAGE_TYPES:
            raise ConfigurationError(f"storage must be one of {STORAGE_TYPES}, got {self.storage!r}")

    def _check_numbers(self) -> None:
        """Times, counts and limits."""
        if self.replicas not in (1, 3, 5) or isinstance(self.replicas, bool):
            raise ConfigurationError(f"replicas must be 1, 3 or 5, got {self.replicas!r}")
        for name in ("ack_wait", "retry_backoff", "retry_backoff_max", "nak_delay",
                     "nak_delay_max", "pull_expires", "pin_timeout"):
            check_positive(name, getattr(self, name))
        for name in ("max_ack_pending", "batch_size", "max_envelope_bytes"):
            check_count(name, getattr(self, name), minimum=1)
        check_count("retries", self.retries, minimum=0)
        if self.processing_timeout is not None:
            check_positive("processing_timeout", self.processing_timeout)
        if self.priority_group is not None and self.pin_timeout < 2 * self.pull_expires:
            # A pinned bus renews its pull requests as they expire: give it two.
            raise ConfigurationError(f"pin_timeout ({self.pin_timeout}) must be at least twice "
                                     f"pull_expires ({self.pull_expires})")
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

#: The ``nats`` CLI's environment variables, by :class:`NatsAuth` field. ``NATS_USER``
#: is a token when ``NATS_PASSWORD`` is not set.
ENVIRONMENT = {"user": "NATS_USER", "password": "NATS_PASSWORD", "creds": "NATS_CREDS",
               "nkey_seed": "NATS_NKEY", "tls_ca": "NATS_CA", "tls_cert": "NATS_CERT",
               "tls_key": "NATS_KEY"}
#: The ways of saying who connects; at most one of them.
_IDENTITIES = {"user/password": ("user", "password"), "token": ("token",),
               "nkey_seed": ("nkey_seed",), "creds": ("creds",)}
_FILES = ("nkey_seed", "creds", "tls_ca", "tls_cert", "tls_key")
_SECRETS = ("password", "token")


@dataclass(frozen=True, repr=False)
class NatsAuth:
    """How to authenticate to NATS and verify it: plain values, passed to nats-py as they are.

    At most one identity: ``user`` with ``password``, ``token``, ``nkey_seed``
    (the path of an NKey seed file) or ``creds`` (the path of a JWT
    ``.creds`` file). TLS: ``tls_ca`` (a CA file that verifies the server,
    instead of the system's), ``tls_cert`` with ``tls_key`` (a client
    certificate, for mutual TLS). Files are checked when this is made; the
    repr masks the password and the token.
    """

    user: str | None = None
    password: str | None = None
    token: str | None = None
    nkey_seed: str | None = None
    creds: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, field.name, value := os.fspath(value))
            if value == "":
                object.__setattr__(self, field.name, value := None)
            if value is not None and not isinstance(value, str):
                raise ConfigurationError(f"{field.name} must be a str, got {type(value).__name__}")
        given = [mode for mode, names in _IDENTITIES.items()
                 if any(getattr(self, name) is not None for name in names)]
        if len(given) > 1:
            raise ConfigurationError(f"conflicting NATS credentials: {' and '.join(given)} are both "
                                     "set; give one way of authenticating")
        if (self.user is None) != (self.password is None):
            missing = "password" if self.password is None else "user"
            raise ConfigurationError(f"user and password go together: {missing} is missing")
        if (self.tls_cert is None) != (self.tls_key is None):
            missing = "tls_key" if self.tls_key is None else "tls_cert"
            raise ConfigurationError(f"tls_cert and tls_key go together: {missing} is missing")
        for name in _FILES:
            path = getattr(self, name)
            if path is not None and not (os.path.isfile(path) and os.access(path, os.R_OK)):
                raise ConfigurationError(f"{name} {path!r} is not a readable file")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **given: str | None) -> NatsAuth:
        """Settings from the ``nats`` CLI's variables (``NATS_USER``, ``NATS_PASSWORD``,
        ``NATS_CREDS``, ``NATS_NKEY``, ``NATS_CA``, ``NATS_CERT``, ``NATS_KEY``),
        overridden by ``given`` values that are not None.

        An identity given (user/password, token, nkey_seed, creds) replaces the
        environment's identity as a whole; TLS files override one by one.
        """
        env = os.environ if environ is None else environ
        values: dict[str, str | None] = {name: env.get(var) or None for name, var in ENVIRONMENT.items()}
        if values["user"] is not None and values["password"] is None:
            values["token"], values["user"] = values["user"], None
        unknown = set(given) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown NATS settings: {sorted(unknown)}")
        given = {name: value for name, value in given.items() if value is not None}
        identity = {name for names in _IDENTITIES.values() for name in names}
        if identity & set(given):
            values.update(dict.fromkeys(identity))
        values.update(given)
        return cls(**values)

    @property
    def configured(self) -> bool:
        """True when anything is set."""
        return any(getattr(self, f.name) is not None for f in fields(self))

    @property
    def uses_tls(self) -> bool:
        """True when a CA or a client certificate is set."""
        return self.tls_ca is not None or self.tls_cert is not None

    def secrets(self) -> tuple[str, ...]:
        """The secret values themselves (password, token), to redact from text."""
        return tuple(v for v in (self.password, self.token) if v)

    def __repr__(self) -> str:
        shown = [f"{f.name}={MASK if f.name in _SECRETS else getattr(self, f.name)!r}"
                 for f in fields(self) if getattr(self, f.name) is not None]
        return f"NatsAuth({', '.join(shown)})"


def resolve_auth(auth: NatsAuth | None = None, **given: str | None) -> NatsAuth:
    """``auth`` as it is (the environment is not read), else :meth:`NatsAuth.from_env`
    with the ``given`` settings (``user``, ``password``, ``token``, ``nkey_seed``,
    ``creds``, ``tls_ca``, ``tls_cert``, ``tls_key``) overriding it."""
    if auth is not None:
        named = sorted(name for name, value in given.items() if value is not None)
        if named:
            raise ConfigurationError(f"give auth= or {', '.join(named)}, not both")
        if not isinstance(auth, NatsAuth):
            raise ConfigurationError(f"auth must be a NatsAuth, got {type(auth).__name__}")
        return auth
    return NatsAuth.from_env(None, **given)


def servers_from_env(environ: Mapping[str, str] | None = None, default: str | None = None) -> str | None:
    """``$NATS_URL`` (as the ``nats`` CLI reads it), else ``default``."""
    env = os.environ if environ is None else environ
    return env.get("NATS_URL") or default


def _check_server_url(url: str) -> None:
    try:
        parts = split_server_url(url)
        parts.port  # noqa: B018 - raises for a port that is not a number
    except ValueError as exc:
        raise ConfigurationError(f"server URL {mask_url(url)!r} is not valid: {exc}") from None
    if parts.scheme not in NATS_SCHEMES:
        raise ConfigurationError(f"server URL {mask_url(url)!r} has scheme {parts.scheme!r}; "
                                 f"use one of {', '.join(s + '://' for s in NATS_SCHEMES)}")
    if not parts.hostname:
        raise ConfigurationError(f"server URL {mask_url(url)!r} names no host")


@dataclass(frozen=True, repr=False, init=False)
class BusConfig:
    """The bus as a whole: where NATS is, how big the pool is, what runs it.

    Built resolved: the servers as a tuple, the supervision as a tree, the
    Bridges counted (see :func:`default_bridges`)."""

    servers: tuple[str, ...]
    pool_size: int
    runtime: str
    window: int
    connect_timeout: float
    name: str
    #: Restart policies for the root (Bridges, Router) and the pool.
    supervision: SupervisionTree
    #: Credentials and TLS for the NATS connections.
    auth: NatsAuth
    #: This bus's place in a partitioned consumer group; None: it consumes whole durables.
    group: ConsumerGroup | None
    #: Without a group: P for the streams of the subscriptions whose subject ends with the
    #: aggregate id as a ``*`` token (the stream is partitioned on it, and the partitions
    #: are spread over the Bridges); None: no stream is partitioned unless a subscription says.
    partitions: int | None
    #: Bridge actors (processes, NATS connections) that read the bus's partitioned
    #: subscriptions, each a share of the partitions.
    bridges: int

    def __init__(self, servers: tuple[str, ...] | list[str] | str = ("nats://127.0.0.1:4222",),
                 pool_size: int = 8, runtime: str = "processes", window: int = DEFAULT_WINDOW,
                 connect_timeout: float = 5.0, name: str = "actorbus",
                 supervision: RestartPolicy | SupervisionTree | None = None,
                 auth: NatsAuth | None = None, group: ConsumerGroup | None = None,
                 partitions: int | None = None, bridges: int | None = None) -> None:
        """``servers`` as a tuple, a list or a comma-separated str; ``supervision`` one
        policy for both levels, a tree, or None for the defaults; ``bridges`` None for
        :func:`default_bridges`."""
        if isinstance(servers, str):
            servers = tuple(s.strip() for s in servers.split(","))
        try:
            tree = as_tree(supervision)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        values: dict[str, object] = {
            "servers": tuple(servers), "pool_size": pool_size, "runtime": runtime,
            "window": window, "connect_timeout": connect_timeout, "name": name,
            "supervision": tree, "auth": NatsAuth() if auth is None else auth, "group": group,
            "partitions": partitions}
        for field_name, value in values.items():
            object.__setattr__(self, field_name, value)   # frozen: only while it is being built
        self._check()
        object.__setattr__(self, "bridges", default_bridges(self) if bridges is None else bridges)
        self._check_bridges()

    def _check(self) -> None:
        if not self.servers or not all(isinstance(s, str) and s for s in self.servers):
            shown = [mask_url(s) if isinstance(s, str) else s for s in self.servers]
            raise ConfigurationError(f"servers must name at least one NATS URL, got {shown!r}")
        for url in self.servers:
            _check_server_url(url)
        if not isinstance(self.auth, NatsAuth):
            raise ConfigurationError(f"auth must be a NatsAuth, got {type(self.auth).__name__}")
        check_count("pool_size", self.pool_size, minimum=0)   # 0: handlers in the Bridge
        if self.runtime not in RUNTIMES:
            raise ConfigurationError(f"runtime must be one of {RUNTIMES}, got {self.runtime!r}")
        # The window bounds memory, not Thespian's queues: the Bridge holds
        # dispatches back while the Router is behind (see bridge.actor).
        check_count("window", self.window, minimum=1, maximum=MAX_WINDOW)
        check_positive("connect_timeout", self.connect_timeout)
        if self.group is not None and not isinstance(self.group, ConsumerGroup):
            raise ConfigurationError(f"group must be a ConsumerGroup, got {type(self.group).__name__}")
        if self.partitions is not None:
            if self.group is not None:
                raise ConfigurationError("partitions is the group's (ConsumerGroup.partitions) "
                                         "on a bus in a consumer group")
            check_count("partitions", self.partitions, minimum=1, maximum=MAX_PARTITIONS)

    def _check_bridges(self) -> None:
        check_count("bridges", self.bridges, minimum=1, maximum=MAX_BRIDGES)
        if self.bridges > 1 and self.group is not None and self.group.kind is GroupKind.STATIC:
            raise ConfigurationError(
                f"bridges={self.bridges} with static group {self.group.name!r}: a static member "
                "reads one durable consumer, which one Bridge reads (run more members, or an "
                "elastic group, to use more cores)")

    def secrets(self) -> tuple[str, ...]:
        """Every secret this configuration holds (in the auth and the URLs), to redact from text."""
        return self.auth.secrets() + url_secrets(self.servers)

    def shown_servers(self) -> str:
        """The servers as logs and errors show them, secrets masked."""
        return show_servers(self.servers)

    def __repr__(self) -> str:
        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                          if f.name != "servers")
        return f"BusConfig(servers={tuple(mask_url(s) for s in self.servers)!r}, {shown})"


def _default_stream(subject: str) -> str:
    first = subject.split(".", 1)[0]
    if first in ("*", ">"):
        raise ConfigurationError(f"subject {subject!r} starts with a wildcard: name its stream")
    return re.sub(r"[^A-Za-z0-9_-]", "_", first).upper()


def default_bridges(config: BusConfig) -> int:
    """How many Bridges a bus runs unless told: one per :data:`CORES_PER_BRIDGE` cores
    (at most one per partition) when its streams are partitioned, else one.

    A Bridge is the one stage every message of its partitions passes through; one
    per four cores keeps it from capping the pool on a big machine and costs
    nothing on a small one (one Bridge up to seven cores)."""
    group = config.group
    if group is not None:
        if group.kind is GroupKind.STATIC:
            return 1   # one durable per member
        partitions: int | None = group.partitions
    else:
        partitions = config.partitions
    if partitions is None:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(partitions, cores // CORES_PER_BRIDGE))
