"""Partitioned consumer groups: many buses on one stream, each aggregate with one bus at a time.

A leaf of the import graph: the values and the arithmetic, no I/O.

The stream partitions itself: its ``subject_transform`` rewrites
``orders.<id>`` to ``<p>.orders.<id>`` with ``p = partition(P, <id>)``
(FNV-1a of the token, mod P; nats-server >= 2.10), so the aggregate id
must be a subject token. Each member's consumers filter the partitions it
owns. The layout follows orbit.go's ``pcgroups`` where it can, so that Go
members and actorbus members can share a static group:

* **static**: a fixed member list, stored in the KV bucket
  ``static-consumer-groups`` under ``<stream>.<group>`` as orbit writes it;
  member ``m`` reads durable ``<group>-m``, filtered on its partitions.
  Several buses with the same member name are one active and hot standbys
  (priority group ``PCG``, ``pinned_client``).
* **elastic**: members come and go. Each live bus keeps a key
  ``<stream>.<member>`` fresh in the KV bucket ``actorbus-group-<group>``
  (entries age out after ``member_ttl``); the partitions are spread over
  the live members as orbit spreads them, and each partition has a durable
  of its own, ``<group>-p<i>``, so that a partition moves between buses
  without a consumer being recreated (its acks stay where they are).
"""
from __future__ import annotations

import enum
import os
import re
import socket
from dataclasses import dataclass
from collections.abc import Sequence

from actorbus.checks import check_count, check_name, check_positive
from actorbus.errors import ConfigurationError
from actorbus.hashing import fnv1a_32

#: The priority group of every group consumer (orbit.go's name).
PRIORITY_GROUP = "PCG"
#: orbit.go's bucket of static groups' configurations.
STATIC_BUCKET = "static-consumer-groups"
#: Most partitions a group may have (each elastic partition is a durable consumer).
MAX_PARTITIONS = 1024
#: Seconds between an elastic member's heartbeats, by default.
DEFAULT_HEARTBEAT = 1.0
#: Heartbeats a member may miss before it is taken as gone: a busy bus's heartbeat can be
#: a second late, and a member taken as gone by mistake moves partitions in vain.
MISSED_HEARTBEATS = 5


class GroupKind(enum.StrEnum):
    """How a group's membership is decided."""

    #: A fixed member list, given to every bus of the group.
    STATIC = "static"
    #: The buses alive now, as their heartbeats in a KV bucket say.
    ELASTIC = "elastic"


@dataclass(frozen=True, init=False)
class ConsumerGroup:
    """A bus's place in a partitioned consumer group.

    ``name``: the group (also the prefix of its durables). ``partitions``:
    P, fixed for the life of the stream. ``member``: this bus's member name
    (elastic default: ``<host>-<pid>``). ``members``: the static member list
    (None: an elastic group). ``heartbeat``: seconds between an elastic
    member's heartbeats; it is taken as gone ``member_ttl`` seconds
    (default five heartbeats) after its last one.
    """

    name: str
    partitions: int
    member: str
    members: tuple[str, ...] | None
    heartbeat: float
    member_ttl: float

    def __init__(self, name: str, partitions: int, member: str | None = None,
                 members: Sequence[str] | None = None, heartbeat: float = DEFAULT_HEARTBEAT,
                 member_ttl: float | None = None) -> None:
        check_name("group", name)
        check_count("partitions", partitions, minimum=1, maximum=MAX_PARTITIONS)
        if members is not None:
            members = _check_members(members, member)
        elif member is None:
            member = default_member_name()
        check_name("member", member)
        check_positive("heartbeat", heartbeat)
        if member_ttl is None:
            member_ttl = MISSED_HEARTBEATS * heartbeat
        if isinstance(member_ttl, bool) or not isinstance(member_ttl, (int, float)) or \
                not member_ttl >= 2 * heartbeat:
            raise ConfigurationError(f"member_ttl must be at least twice the heartbeat "
                                     f"({heartbeat}), got {member_ttl!r}")
        for field_name, value in (("name", name), ("partitions", partitions), ("member", member),
                                  ("members", members), ("heartbeat", heartbeat),
                                  ("member_ttl", member_ttl)):
            object.__setattr__(self, field_name, value)   # frozen: only while it is being built

    @property
    def kind(self) -> GroupKind:
        """Static with a member list, elastic without."""
        return GroupKind.ELASTIC if self.members is None else GroupKind.STATIC

    @property
    def bucket(self) -> str:
        """The KV bucket of an elastic group's heartbeats."""
        return f"actorbus-group-{self.name}"

    def durable_for_member(self, member: str) -> str:
        """A static member's durable (orbit.go's name for it)."""
        return f"{self.name}-{member}"

    def durable_for_partition(self, partition: int) -> str:
        """An elastic partition's durable."""
        return f"{self.name}-p{partition}"


def default_member_name() -> str:
    """``<host>-<pid>``, as a member name may spell it."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname().split(".")[0])[:48] or "host"
    return f"{host}-{os.getpid()}"


def assign_partitions(members: Sequence[str], partitions: int) -> dict[str, tuple[int, ...]]:
    """Which partitions each member owns: orbit.go's balanced spread (``GeneratePartitionFilters``).

    Members are sorted and deduplicated; at most ``partitions`` of them get
    any. Contiguous runs of ``partitions // n`` go to the members in order,
    and the remainder one each from the first member on.
    """
    ordered = sorted(set(members))[:partitions]
    owned: dict[str, list[int]] = {member: [] for member in ordered}
    if not ordered:
        return {}
    count = len(ordered)
    per = partitions // count
    for partition in range(partitions):
        if partition < count * per:
            owner = ordered[(partition // per) % count]
        else:
            owner = ordered[(partition - count * per) % count]
        owned[owner].append(partition)
    return {member: tuple(parts) for member, parts in owned.items()}


def partition_of(aggregate_id: str, partitions: int) -> int:
    """The partition nats-server's ``{{partition(P, ...)}}`` gives a one-token key: FNV-1a 32 mod P."""
    return fnv1a_32(aggregate_id) % partitions


def check_partitioned_subject(subject: str) -> None:
    """Refuse a subject whose last token is not ``*``: the aggregate id must be a token there."""
    if not is_partitionable(subject):
        raise ConfigurationError(
            f"a partitioned subscription's subject must end with the aggregate id as a '*' token "
            f"and have no '>' (e.g. 'orders.*'), got {subject!r}")


def is_partitionable(subject: str) -> bool:
    """True when ``subject`` ends with a ``*`` token and has no ``>``: a stream can be
    partitioned on that token (see :func:`check_partitioned_subject`)."""
    tokens = subject.split(".")
    return tokens[-1] == "*" and ">" not in tokens


def partition_transform(subject: str, partitions: int) -> str:
    """The stream's transform destination: the partition of the last ``*`` token, then the subject.

    ``orders.*`` with 8 partitions → ``{{partition(8,1)}}.orders.{{wildcard(1)}}``.
    """
    check_partitioned_subject(subject)
    tokens = subject.split(".")
    wildcards = 0
    out = []
    for token in tokens:
        if token == "*":
            wildcards += 1
            out.append(f"{{{{wildcard({wildcards})}}}}")
        else:
            out.append(token)
    return f"{{{{partition({partitions},{wildcards})}}}}." + ".".join(out)


def partition_filter(subject: str, partition: int) -> str:
    """The filter of one partition of ``subject``: ``3.orders.*``."""
    return f"{partition}.{subject}"


def without_partition(subject: str) -> str:
    """A stored subject as it was published: ``3.orders.a1`` → ``orders.a1``."""
    return subject.split(".", 1)[1] if "." in subject else subject


def subject_for_key(subject: str, aggregate_id: str) -> str:
    """``subject`` with its ``{aggregate_id}`` placeholder filled in, refusing an id that
    is no subject token."""
    if "{aggregate_id}" not in subject:
        return subject
    if not aggregate_id or any(c in aggregate_id for c in ".*> \t\r\n"):
        raise ValueError(f"aggregate id {aggregate_id!r} cannot be a subject token (no '.', '*', "
                         "'>' or whitespace): a partitioned stream needs it in the subject")
    return subject.replace("{aggregate_id}", aggregate_id)


def _check_members(members: Sequence[str], member: str | None) -> tuple[str, ...]:
    """A static group's member list as a tuple, with ``member`` (this bus) in it."""
    if isinstance(members, str):
        raise ConfigurationError(f"members must be a list of names, got {members!r}")
    names = tuple(members)
    for name in names:
        check_name("member", name)
    if not names or len(set(names)) != len(names):
        raise ConfigurationError(f"members must be distinct names, at least one, got {list(names)}")
    if member is None:
        raise ConfigurationError(f"a static group needs member=: which of {list(names)} this bus is")
    if member not in names:
        raise ConfigurationError(f"member {member!r} is not one of the group's members {list(names)}")
    return names
