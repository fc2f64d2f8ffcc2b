"""Dead letters: read, filter, redrive and purge a subscription's dead-letter stream.

The Bridge publishes a message it gives up on to the subscription's
dead-letter subject (``deadletter.<STREAM>`` by default), stored in its
dead-letter stream (``<STREAM>_DLQ``), with the original headers plus
``Actorbus-Original-Subject``, ``Actorbus-Stream``,
``Actorbus-Stream-Sequence``, ``Actorbus-Delivery-Count`` and
``Actorbus-Error`` (see ``bridge/settlement.py``); the body is the
original body. This module reads those back as :class:`DeadLetter` values
and acts on them; ``actorbus dlq`` is its command line.

A stream is taken for a dead-letter stream when one of its subjects starts
with ``deadletter.`` or, for a subscription that named its own
``dead_letter_subject``, when its first message carries
``Actorbus-Original-Subject``. Messages in it without that header are not
dead letters and are never selected.

A redrive publishes each selected dead letter back to its original subject,
one at a time in the dead-letter stream's order, with its original headers
(the ``Actorbus-*`` ones left out) and ``Nats-Msg-Id:
actorbus-redrive-<stream>-<sequence>``; the dead letter is deleted only once
JetStream acknowledged the publish. A redrive interrupted between the two
and run again publishes a duplicate that the original stream drops (within
its duplicate window), then deletes the dead letter.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as _dt
import logging
import re
from dataclasses import dataclass, field
from typing import TypeVar
from collections.abc import Awaitable, Callable, Mapping

from nats import errors as nats_errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js import errors as js_errors

from actorbus.bridge.jetstream import subject_covers
from actorbus.bridge.connection import open_connection
from actorbus.codecs import EnvelopeFormat, codec_for
from actorbus.config import BusConfig, NatsAuth, servers_from_env
from actorbus.envelope import InvalidEnvelope, decode_envelope
from actorbus.redaction import redact

log = logging.getLogger("actorbus.dlq")

#: The header naming a dead letter's original subject: what makes a message a dead letter.
ORIGINAL_SUBJECT = "Actorbus-Original-Subject"
ORIGINAL_STREAM = "Actorbus-Stream"
ORIGINAL_SEQUENCE = "Actorbus-Stream-Sequence"
DELIVERY_COUNT = "Actorbus-Delivery-Count"
ERROR = "Actorbus-Error"
#: The prefix of the headers the dead-lettering added, left out of a redrive.
ACTORBUS_PREFIX = "actorbus-"
#: The default dead-letter subjects' first token.
DEAD_LETTER_PREFIX = "deadletter."
#: Where nothing says which NATS.
DEFAULT_SERVERS = "nats://127.0.0.1:4222"

_T = TypeVar("_T")


class DeadLetterInputError(ValueError):
    """Bad input for a dead-letter command: an unknown stream, a stream that is not a
    dead-letter stream, a time that does not parse, a selection of nothing."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One message of a dead-letter stream."""

    #: Its sequence in the dead-letter stream.
    sequence: int
    #: When the dead-letter stream stored it (UTC).
    time: _dt.datetime
    #: The dead-letter subject it was published to.
    subject: str
    headers: Mapping[str, str]
    data: bytes

    @property
    def original_subject(self) -> str:
        """The subject it was first published to."""
        return self.headers.get(ORIGINAL_SUBJECT, "")

    @property
    def original_stream(self) -> str:
        """The stream it was consumed from."""
        return self.headers.get(ORIGINAL_STREAM, "")

    @property
    def original_sequence(self) -> int | None:
        """Its sequence in that stream, when the header holds one."""
        return _int_or_none(self.headers.get(ORIGINAL_SEQUENCE))

    @property
    def delivery_count(self) -> int | None:
        """JetStream's delivery count when it was dead-lettered."""
        return _int_or_none(self.headers.get(DELIVERY_COUNT))

    @property
    def error(self) -> str:
        """Why it was dead-lettered, as the Bridge wrote it."""
        return self.headers.get(ERROR, "")

    def original_headers(self) -> dict[str, str]:
        """Its headers without the ``Actorbus-*`` ones the dead-lettering added."""
        return {name: value for name, value in self.headers.items()
                if not name.lower().startswith(ACTORBUS_PREFIX)}

    @property
    def redrive_msg_id(self) -> str:
        """The ``Nats-Msg-Id`` a redrive publishes it with: the same for every redrive of
        it, so the original stream stores it once within its duplicate window."""
        origin = self.original_sequence
        if self.original_stream and origin is not None:
            return f"actorbus-redrive-{self.original_stream}-{origin}"
        return f"actorbus-redrive-dlq-{self.subject}-{self.sequence}"

    def redrive_headers(self) -> dict[str, str]:
        """What a redrive publishes it with: :meth:`original_headers`, no
        ``Nats-Expected-*`` header (meant for the first publish), and
        :attr:`redrive_msg_id` as ``Nats-Msg-Id`` (the original one would be
        dropped as a duplicate of the original message within the window)."""
        headers = {name: value for name, value in self.original_headers().items()
                   if not name.lower().startswith("nats-expected-")
                   and name.lower() != "nats-msg-id"}
        headers["Nats-Msg-Id"] = self.redrive_msg_id
        return headers


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead letters a command acts on; every filter given must hold."""

    #: The original subject, NATS wildcards allowed.
    subject: str | None = None
    #: A substring of the error (case-insensitive).
    error: str | None = None
    #: Stored at or after this time.
    since: _dt.datetime | None = None
    #: Stored at or before this time.
    until: _dt.datetime | None = None
    #: Dead-letter stream sequences, both ends included.
    from_seq: int | None = None
    to_seq: int | None = None

    def matches(self, letter: DeadLetter) -> bool:
        """True when ``letter`` passes every filter."""
        checks = (
            self.subject is None or subject_covers(self.subject, letter.original_subject),
            self.error is None or self.error.lower() in letter.error.lower(),
            self.since is None or letter.time >= self.since,
            self.until is None or letter.time <= self.until,
            self.from_seq is None or letter.sequence >= self.from_seq,
            self.to_seq is None or letter.sequence <= self.to_seq,
        )
        return all(checks)

    def describe(self) -> str:
        """The filters given, in words: ``subject orders.> and sequence 3-9``."""
        parts = []
        if self.subject is not None:
            parts.append(f"subject {self.subject}")
        if self.error is not None:
            parts.append(f"error containing {self.error!r}")
        if self.since is not None:
            parts.append(f"since {self.since.isoformat()}")
        if self.until is not None:
            parts.append(f"until {self.until.isoformat()}")
        if self.from_seq is not None or self.to_seq is not None:
            low = "" if self.from_seq is None else str(self.from_seq)
            high = "" if self.to_seq is None else str(self.to_seq)
            parts.append(f"sequence {low}..{high}")
        return " and ".join(parts) if parts else "no filter"


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d|w)", re.ASCII)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, now: _dt.datetime | None = None) -> _dt.datetime:
    """A point in time from ``text``: ISO 8601 (``2024-05-01T10:00:00Z``; without an
    offset, local time) or a duration before ``now`` (``90s``, ``10m``, ``2h``, ``1d``,
    ``1h30m``). :class:`DeadLetterInputError` when it is neither."""
    text = text.strip()
    now = now if now is not None else _dt.datetime.now(_dt.UTC)
    spans = _DURATION.findall(text)
    if spans and "".join(f"{n}{u}" for n, u in spans) == text.replace(" ", ""):
        seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in spans)
        return now - _dt.timedelta(seconds=seconds)
    try:
        moment = _dt.datetime.fromisoformat(text)
    except ValueError:
        raise DeadLetterInputError(f"{text!r} is neither an ISO 8601 time nor a duration "
                                   "like 10m or 2h") from None
    return moment.astimezone(_dt.UTC) if moment.tzinfo is None else moment


@dataclass(frozen=True, slots=True)
class BodyView:
    """A body in readable form: what it is, and its parts as (name, text) pairs."""

    #: ``msgpack envelope``, ``JSON envelope``, ``text``, ``binary`` or ``empty``.
    kind: str
    fields: tuple[tuple[str, str], ...] = ()
    #: Why it is not an envelope, when it looked like one but did not decode.
    problem: str | None = None


def readable(data: bytes) -> tuple[str, str]:
    """``data`` as (encoding, text): ``("text", ...)`` when it is printable UTF-8, else
    ``("hex", ...)`` up to 256 bytes and ``("base64", ...)`` beyond."""
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\n\r\t" for c in text):
        return "text", text
    if len(data) <= 256:
        return "hex", binascii.hexlify(bytes(data), " ").decode()
    return "base64", base64.b64encode(bytes(data)).decode()


def describe_body(data: bytes) -> BodyView:
    """A dead letter's body made readable: a msgpack or JSON envelope as its fields
    (the payload as text when it is UTF-8, else hex or base64), anything else as text
    or hex."""
    if not data:
        return BodyView("empty")
    try:
        envelope = decode_envelope(data, max_bytes=max(len(data), 1))
    except InvalidEnvelope as exc:
        kind, text = readable(data)
        problem = str(exc) if exc.format is not None else None
        return BodyView("text" if kind == "text" else "binary", (("body" if kind == "text"
                                                                  else f"body ({kind})", text),),
                        problem)
    kind = "JSON envelope" if codec_for(data).format is EnvelopeFormat.JSON else "msgpack envelope"
    parts: list[tuple[str, str]] = []
    for name in ("event_id", "aggregate_id", "event_type", "event_version", "timestamp",
                 "trace_id", "correlation_id", "tenant_id", "metadata"):
        value = getattr(envelope, name)
        if value is not None:
            parts.append((name, str(dict(value)) if name == "metadata" else str(value)))
    encoding, text = readable(envelope.payload)
    parts.append(("payload" if encoding == "text" else f"payload ({encoding})", text))
    return BodyView(kind, tuple(parts))


@dataclass(frozen=True, slots=True)
class RedriveResult:
    """What a redrive did (or, dry, would do)."""

    #: The dead letters redriven (or to redrive), in order.
    letters: tuple[DeadLetter, ...]
    #: Republished and stored anew in their original stream.
    stored: int = 0
    #: Republished, but dropped by the original stream as duplicates (an earlier
    #: redrive of theirs was stored, within its duplicate window).
    duplicates: int = 0
    dry_run: bool = False
    #: The original stream and sequence each was stored at, by dead-letter sequence.
    acks: dict[int, tuple[str, int]] = field(default_factory=dict)


#: Called after each dead letter a redrive or purge handled: (done, total).
Progress = Callable[[int, int], None]


class DeadLetterStream:
    """A dead-letter stream on a JetStream connection; made by :meth:`open`, which
    checks it is one."""

    def __init__(self, js: JetStreamContext, name: str) -> None:
        """Use :meth:`open`: it checks the stream exists and holds dead letters."""
        self.js = js
        self.name = name

    @classmethod
    async def open(cls, js: JetStreamContext, name: str) -> DeadLetterStream:
        """The dead-letter stream ``name``; :class:`DeadLetterInputError` when there is
        no such stream or it is not a dead-letter stream."""
        try:
            info = await js.stream_info(name)
        except js_errors.NotFoundError:
            raise DeadLetterInputError(f"no stream {name!r} on this NATS") from None
        except js_errors.BadRequestError:
            raise DeadLetterInputError(f"{name!r} is not a valid stream name") from None
        stream = cls(js, name)
        subjects = list(info.config.subjects or [])
        if any(s.startswith(DEAD_LETTER_PREFIX) for s in subjects):
            return stream
        if info.state.messages:
            first = await stream._next(info.state.first_seq)
            if first is not None and ORIGINAL_SUBJECT in first.headers:
                return stream
        raise DeadLetterInputError(
            f"stream {name!r} is not a dead-letter stream: its subjects {subjects} do not start "
            f"with {DEAD_LETTER_PREFIX!r} and its first message has no {ORIGINAL_SUBJECT} header")

    async def _next(self, sequence: int) -> DeadLetter | None:
        """The first message at or after ``sequence``, None past the last."""
        try:
            raw = await self.js.get_msg(self.name, sequence, subject=">", next=True)
        except js_errors.NotFoundError:
            return None
        return DeadLetter(sequence=raw.seq or sequence,
                          time=raw.time or _dt.datetime.fromtimestamp(0, _dt.UTC),
                          subject=raw.subject or "", headers=dict(raw.headers or {}),
                          data=raw.data or b"")

    async def select(self, selection: Selection, *, require: bool = True) -> list[DeadLetter]:
        """The dead letters ``selection`` picks, in stream order; with ``require``,
        :class:`DeadLetterInputError` when there is none."""
        info = await self.js.stream_info(self.name)
        sequence = max(info.state.first_seq, selection.from_seq or 0, 1)
        last = info.state.last_seq if selection.to_seq is None else min(info.state.last_seq,
                                                                          selection.to_seq)
        found: list[DeadLetter] = []
        skipped = 0
        while sequence <= last:
            letter = await self._next(sequence)
            if letter is None or letter.sequence > last:
                break
            sequence = letter.sequence + 1
            if ORIGINAL_SUBJECT not in letter.headers:
                skipped += 1
            elif selection.matches(letter):
                found.append(letter)
        if skipped:
            log.warning("%s: skipped %d message(s) without an %s header (not dead letters)",
                        self.name, skipped, ORIGINAL_SUBJECT)
        if require and not found:
            held = info.state.messages
            which = "" if selection == Selection() else f" matches {selection.describe()}"
            raise DeadLetterInputError(f"no dead letter in {self.name}{which} "
                                       f"({held} message(s) held)")
        return found

    async def redrive(self, letters: list[DeadLetter], *, dry_run: bool = False,
                      progress: Progress | None = None) -> RedriveResult:
        """Publish each of ``letters`` back to its original subject, in order, and delete
        it from this stream once JetStream acknowledged the publish; one at a time, so
        a failure stops the redrive with the rest (and the one that failed) still here."""
        if dry_run:
            return RedriveResult(tuple(letters), dry_run=True)
        stored = duplicates = 0
        acks: dict[int, tuple[str, int]] = {}
        for done, letter in enumerate(letters, 1):
            ack = await self.js.publish(letter.original_subject, letter.data,
                                        headers=letter.redrive_headers())
            acks[letter.sequence] = (ack.stream, ack.seq)
            if ack.duplicate:
                duplicates += 1
            else:
                stored += 1
            await self._delete(letter)
            log.info("redrove dead letter %s #%d to %s (%s #%d%s)", self.name, letter.sequence,
                     letter.original_subject, ack.stream, ack.seq,
                     ", a duplicate" if ack.duplicate else "")
            if progress is not None:
                progress(done, len(letters))
        return RedriveResult(tuple(letters), stored, duplicates, False, acks)

    async def purge(self, letters: list[DeadLetter], *, dry_run: bool = False,
                    progress: Progress | None = None) -> int:
        """Delete ``letters`` from this stream; the number deleted (dry: to delete)."""
        if dry_run:
            return len(letters)
        for done, letter in enumerate(letters, 1):
            await self._delete(letter)
            if progress is not None:
                progress(done, len(letters))
        log.info("purged %d dead letter(s) from %s", len(letters), self.name)
        return len(letters)

    async def _delete(self, letter: DeadLetter) -> None:
        try:
            await self.js.delete_msg(self.name, letter.sequence)
        except js_errors.NotFoundError:
            log.info("dead letter %s #%d was already gone", self.name, letter.sequence)


def dead_letter_stream_name(stream: str | None, subscription_stream: str | None) -> str:
    """The dead-letter stream named by ``--stream`` or by ``--subscription-stream``
    (``ORDERS`` → ``ORDERS_DLQ``); exactly one of them."""
    if (stream is None) == (subscription_stream is None):
        raise DeadLetterInputError("give the dead-letter stream: --stream ORDERS_DLQ or "
                                   "--subscription-stream ORDERS (one of them)")
    return stream if stream is not None else f"{subscription_stream}_DLQ"


def connection_config(servers: str | None = None, **nats: str | None) -> BusConfig:
    """How to reach NATS: ``servers`` (else ``$NATS_URL``, else the local default), and
    the credential and TLS settings given (the ``nats`` CLI's variables fill the rest)."""
    return BusConfig(servers=servers or servers_from_env(default=DEFAULT_SERVERS) or DEFAULT_SERVERS,
                     pool_size=1, auth=NatsAuth.from_env(None, **nats))


def on_dead_letter_stream(config: BusConfig, name: str,
                          work: Callable[[DeadLetterStream], Awaitable[_T]]) -> _T:
    """Connect with ``config``, open the dead-letter stream ``name``, return what
    ``work`` returns for it, and close. NATS errors come with the configuration's
    secrets masked."""
    async def main() -> _T:
        client: Client = await open_connection(config, name="actorbus-dlq", reconnect_forever=False)
        try:
            stream = await DeadLetterStream.open(client.jetstream(), name)
            return await work(stream)
        finally:
            await client.close()

    try:
        return asyncio.run(main())
    except nats_errors.Error as exc:
        shown = redact(str(exc), config.secrets())
        raise RuntimeError(f"{type(exc).__name__}: {shown}" if shown else type(exc).__name__) from None

