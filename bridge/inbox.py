"""The Bridge's pull inboxes read straight off nats-py's parser, and settlements written whole.

For every message nats-py builds a ``Msg``, parses its headers into a dict,
queues it and hops to a task that calls the subscription's callback; every
ack is then its own ``publish``. Together that was about a fifth of the
Bridge's CPU per message, and the Bridge, which every message passes
through, needs less:

- :class:`InboxClient` hands a pull inbox's messages to its handler as they
  are parsed, as a :class:`Delivered` (subject, ack subject, body, headers)
  or an :class:`InboxStatus` (the server ending a request);
- headers are parsed only when the message has some of its own: the
  ``Nats-Pin-Id`` the server adds for a priority group's pinned client is
  taken off (it is not part of the message as published);
- :meth:`InboxClient.write_settlements` writes a batch of acks, naks and
  terms as one buffer of protocol commands.

This is the one module that relies on nats-py's internals
(``Client._process_msg``, ``_send_command``, ``_flush_pending``);
:func:`check_nats_shape` refuses a nats-py without them when the client is
made, instead of running on a guess.
"""
from __future__ import annotations

import inspect
import json
from typing import Callable, NamedTuple

from nats import errors as nats_errors
from nats.aio.client import Client
from nats.aio.subscription import Subscription

#: The header naming the pinned client of a priority group, on every message it gets.
PIN_HEADER = "Nats-Pin-Id"
_PIN_ONLY = b"NATS/1.0\r\n" + PIN_HEADER.encode() + b":"
_STATUS_LINE = b"NATS/1.0 "
_CRLF = b"\r\n"


class NatsShapeError(RuntimeError):
    """The installed nats-py lacks the internals the Bridge's inbox reading relies on."""


class Delivered:
    """A message a pull request delivered: what the Bridge reads of it, and nothing more."""

    __slots__ = ("subject", "reply", "data", "headers", "pin_id")

    def __init__(self, subject: str, reply: str, data: bytes,
                 headers: dict[str, str] | None, pin_id: str | None) -> None:
        self.subject = subject
        self.reply = reply          #: the ack subject
        self.data = data
        self.headers = headers      #: as published (None without any)
        self.pin_id = pin_id        #: the server's pin for this client, in a priority group

    def __repr__(self) -> str:
        return f"Delivered({self.subject!r}, {len(self.data)} bytes)"


class InboxStatus(NamedTuple):
    """The server's answer that ends a pull request early: ``408``, ``409``, ``423``...."""

    subject: str
    code: str
    description: str


InboxHandler = Callable[["Delivered | InboxStatus"], None]


def read_message(subject: bytes, reply: bytes, data: bytes,
                 header: bytes | None) -> Delivered | InboxStatus:
    """What arrived on a pull inbox, from the parser's pieces (as nats-py would read it)."""
    if not header:
        return Delivered(subject.decode(), reply.decode(), data, None, None)
    if header.startswith(_PIN_ONLY) and header.count(_CRLF) == 3:
        # The common case in a priority group: no headers of its own, only the pin.
        only = header[len(_PIN_ONLY):header.index(_CRLF, len(_PIN_ONLY))].strip().decode()
        return Delivered(subject.decode(), reply.decode(), data, None, only)
    first, _, rest = header.partition(_CRLF)
    fields = parse_header_lines(rest)
    if first.startswith(_STATUS_LINE):
        code, _, description = first[len(_STATUS_LINE):].strip().partition(b" ")
        if code.isdigit() and not reply:
            return InboxStatus(subject.decode(), code.decode(),
                               description.strip().decode("utf-8", "replace"))
    pin_id = fields.pop(PIN_HEADER, None)
    return Delivered(subject.decode(), reply.decode(), data, fields or None, pin_id)


def parse_header_lines(block: bytes) -> dict[str, str]:
    """``Name: Value`` lines of a NATS header block, by nats-py's rules: the last value of a
    repeated name wins; a line without a colon, or whose name is not one ASCII token, is
    skipped; values are stripped and decoded as UTF-8, malformed bytes replaced."""
    fields: dict[str, str] = {}
    for line in block.split(_CRLF):
        name, colon, value = line.partition(b":")
        if not colon:
            continue
        try:
            key = name.strip().decode("ascii")
        except UnicodeDecodeError:
            continue
        if key and not any(c.isspace() for c in key):
            fields[key] = value.strip().decode("utf-8", "replace")
    return fields


ACK_PAYLOAD = b""
NAK_PAYLOAD = b"-NAK"
TERM_PAYLOAD = b"+TERM"
PROGRESS_PAYLOAD = b"+WPI"


def nak_payload(delay: float | None) -> bytes:
    """The body of a nak, with its redelivery delay when there is one."""
    if not delay:
        return NAK_PAYLOAD
    return NAK_PAYLOAD + b" " + json.dumps({"delay": int(delay * 1e9)}).encode()


def settlement_command(reply: str, payload: bytes) -> bytes:
    """The protocol command that publishes ``payload`` to an ack subject."""
    return b"PUB %s %d\r\n%s\r\n" % (reply.encode(), len(payload), payload)


def check_nats_shape(client_class: type[Client] = Client) -> None:
    """Raise :class:`NatsShapeError` unless ``client_class`` has the internals used here."""
    try:
        process = list(inspect.signature(client_class._process_msg).parameters)
        send = list(inspect.signature(client_class._send_command).parameters)
        flush = inspect.signature(client_class._flush_pending)
    except (AttributeError, TypeError, ValueError) as exc:
        raise NatsShapeError(f"this nats-py has no {exc}; actorbus needs nats-py 2.x") from None
    if process != ["self", "sid", "subject", "reply", "data", "headers"] or \
            send[:2] != ["self", "cmd"] or not inspect.iscoroutinefunction(client_class._process_msg) \
            or "force_flush" not in flush.parameters:
        raise NatsShapeError("this nats-py's Client._process_msg, _send_command or _flush_pending "
                             "is not the shape actorbus reads pull inboxes with; use nats-py 2.x")


class InboxClient(Client):
    """A nats-py client whose pull inboxes skip the per-message machinery (see the module)."""

    def __init__(self) -> None:
        check_nats_shape()
        super().__init__()
        self._inboxes: dict[int, InboxHandler] = {}

    async def subscribe_inbox(self, subject: str, handler: InboxHandler) -> Subscription:
        """Subscribe ``subject``; each message on it goes to ``handler`` as it is parsed,
        on the loop, in order. The subscription is restored on reconnect like any other."""
        subscription = await self.subscribe(subject, cb=_never_called,
                                            pending_msgs_limit=0, pending_bytes_limit=0)
        self._inboxes[subscription._id] = handler
        return subscription

    async def unsubscribe_inbox(self, subscription: Subscription) -> None:
        """End a subscription made by :meth:`subscribe_inbox`."""
        self._inboxes.pop(subscription._id, None)
        await subscription.unsubscribe()

    async def write_settlements(self, commands: bytes) -> None:
        """Write settlement commands (see :func:`settlement_command`) as one buffer, like a
        publish would: buffered while reconnecting, refused once closed or over the limit."""
        if self.is_closed:
            raise nats_errors.ConnectionClosedError
        if not self.is_connected and (self._max_pending_size <= 0 or
                                      len(commands) + self._pending_data_size > self._max_pending_size):
            raise nats_errors.OutboundBufferLimitError
        await self._send_command(commands)
        if self._flush_queue is not None and self._flush_queue.empty():
            await self._flush_pending()

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                           headers: bytes) -> None:
        handler = self._inboxes.get(sid)
        if handler is None:
            await super()._process_msg(sid, subject, reply, data, headers)
            return
        self.stats["in_msgs"] += 1
        self.stats["in_bytes"] += len(data)
        handler(read_message(subject, reply, data, headers))


async def _never_called(msg: object) -> None:
    """The callback nats-py holds for an inbox whose messages go to its handler instead."""
