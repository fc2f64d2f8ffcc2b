"""Streams and durable consumers: created when missing, checked when present."""
from __future__ import annotations

import json
import logging

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, SubjectTransform
from nats.js.errors import APIError, NotFoundError

from actorbus.bridge.layout import ConsumerSpec
from actorbus.config import SubscriptionConfig
from actorbus.errors import ConfigurationError
from actorbus.groups import partition_transform

log = logging.getLogger("actorbus.bridge")

_STORAGE = {"file": StorageType.FILE, "memory": StorageType.MEMORY}
#: Seconds to wait for a JetStream API answer (nats-py's default).
API_TIMEOUT = 5.0


def subject_covers(pattern: str, subject: str) -> bool:
    """True when every subject matching ``subject`` also matches ``pattern``."""
    wanted = subject.split(".")
    for i, token in enumerate(pattern.split(".")):
        if token == ">":
            return len(wanted) > i
        if i >= len(wanted):
            return False
        if token == "*":
            if wanted[i] == ">":
                return False
            continue
        if token != wanted[i]:
            return False
    return len(pattern.split(".")) == len(wanted)


async def ensure_stream(js: JetStreamContext, sub: SubscriptionConfig) -> None:
    """Create ``sub.stream`` for ``sub.subject`` if missing; refuse one that cannot serve it."""
    transform = (None if sub.partitions is None else
                 SubjectTransform(src=sub.subject, dest=partition_transform(sub.subject, sub.partitions)))
    try:
        info = await js.stream_info(sub.stream)
    except NotFoundError:
        await js.add_stream(name=sub.stream, subjects=[sub.subject],
                            storage=_STORAGE[sub.storage_type], num_replicas=sub.replicas,
                            subject_transform=transform)
        log.info("created stream %s for %s on %s storage%s", sub.stream, sub.subject,
                 sub.storage_type, "" if transform is None else
                 f", {sub.partitions} partitions ({transform.dest})")
        return
    subjects = info.config.subjects or []
    if not any(subject_covers(s, sub.subject) for s in subjects):
        raise ConfigurationError(
            f"stream {sub.stream} exists with subjects {subjects}, which do not cover {sub.subject!r}")
    if transform is not None:
        actual_transform = info.config.subject_transform
        if actual_transform is None or actual_transform.dest != transform.dest:
            shown = actual_transform.dest if actual_transform is not None else "no subject transform"
            raise ConfigurationError(
                f"stream {sub.stream} exists with {shown}, not the {sub.partitions} partitions the "
                f"group needs ({transform.src} -> {transform.dest}); partitions are fixed for a "
                "stream's life: use that count, or another stream")
    # nats-py gives the enum or, for some servers' answers, its plain value.
    actual = getattr(info.config.storage, "value", info.config.storage) or "file"
    if actual != sub.storage_type:
        if sub.storage is not None:
            raise ConfigurationError(
                f"stream {sub.stream} exists with {actual} storage, but storage={sub.storage!r} was asked for")
        log.warning("stream %s exists with %s storage; using it for %s", sub.stream, actual, sub.subject)


async def ensure_dead_letter_stream(js: JetStreamContext, sub: SubscriptionConfig) -> None:
    """Create the file-storage stream that keeps ``sub``'s dead letters, if missing."""
    if subject_covers(sub.subject, sub.dead_letter_subject):
        raise ConfigurationError(
            f"dead_letter_subject {sub.dead_letter_subject!r} falls under the subscription's "
            f"own subject {sub.subject!r}: dead letters would be consumed again")
    try:
        info = await js.stream_info(sub.dead_letter_stream)
    except NotFoundError:
        await js.add_stream(name=sub.dead_letter_stream, subjects=[sub.dead_letter_subject],
                            storage=StorageType.FILE)
        log.info("created dead-letter stream %s for %s", sub.dead_letter_stream,
                 sub.dead_letter_subject)
        return
    subjects = info.config.subjects or []
    if not any(subject_covers(s, sub.dead_letter_subject) for s in subjects):
        raise ConfigurationError(
            f"dead-letter stream {sub.dead_letter_stream} exists with subjects {subjects}, "
            f"which do not cover {sub.dead_letter_subject!r}")


async def ensure_consumer(js: JetStreamContext, sub: SubscriptionConfig,
                          spec: ConsumerSpec) -> None:
    """Create the durable pull consumer, or bring an existing one to these settings.

    An existing consumer whose filter differs is refused, never rewritten:
    the durable's position belongs to the subjects it filtered.
    """
    filters = list(spec.filter_subjects)
    try:
        existing = await js.consumer_info(spec.stream, spec.durable)
    except NotFoundError:
        existing = None
    if existing is not None:
        current = _filters_of(existing.config)
        if sorted(current) != sorted(filters):
            raise ConfigurationError(
                f"durable consumer {spec.durable!r} on stream {spec.stream} filters "
                f"{_show(current)}, not {_show(filters)}; to change it on purpose, delete the "
                f"consumer first (nats consumer rm {spec.stream} {spec.durable}) or subscribe "
                "with another durable name")
    config = ConsumerConfig(
        durable_name=spec.durable,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=sub.ack_wait,
        max_deliver=sub.max_deliver,
        max_ack_pending=sub.max_ack_pending,
        num_replicas=sub.replicas,
        **({"filter_subject": filters[0]} if len(filters) == 1 else {"filter_subjects": filters}),
    )
    try:
        if spec.priority_group is None:
            await js.add_consumer(spec.stream, config)
        else:
            await _add_pinned_consumer(js, spec, config)
    except Exception as exc:
        raise ConfigurationError(
            f"consumer {spec.durable} on stream {spec.stream} could not be created or updated: {exc}"
        ) from exc


async def _add_pinned_consumer(js: JetStreamContext, spec: ConsumerSpec,
                               config: ConsumerConfig) -> None:
    """Create or update the durable with a ``pinned_client`` priority group.

    nats-py's ``ConsumerConfig`` has no priority fields yet: the request is
    the one ``add_consumer`` sends (same API subject, same permission) with
    them added, on the context's own connection (nats-py keeps it as ``_nc``).
    """
    wire = {**config.as_dict(), "priority_groups": [spec.priority_group],
            "priority_policy": "pinned_client", "priority_timeout": int(spec.pin_timeout * 1e9)}
    request = json.dumps({"stream_name": spec.stream, "config": wire}).encode()
    reply = await js._nc.request(f"$JS.API.CONSUMER.DURABLE.CREATE.{spec.stream}.{spec.durable}",
                                 request, timeout=API_TIMEOUT)
    answer = json.loads(reply.data)
    if "error" in answer:
        raise APIError.from_error(answer["error"])
    if answer.get("config", {}).get("priority_policy") != "pinned_client":
        raise ConfigurationError(
            f"the server ignored the priority group of durable {spec.durable!r}: pinned clients "
            "need nats-server 2.11 or newer (or subscribe with priority_group=None)")


def _filters_of(config: ConsumerConfig) -> list[str]:
    if config.filter_subjects:
        return list(config.filter_subjects)
    return [config.filter_subject] if config.filter_subject else []


def _show(filters: list[str]) -> str:
    return ", ".join(repr(f) for f in filters) if filters else "every subject of the stream"
