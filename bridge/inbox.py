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
- the protocol lines that come by the thousand (``MSG``, ``HMSG``, ``PING``,
  ``PONG``) are split instead of matched by regular expressions;
- :meth:`InboxClient.write_settlements` writes a batch of acks, naks and
  terms as one buffer of protocol commands, and :meth:`InboxClient.confirm`
  writes a PING behind them in the same write: its PONG says the server has
  read them. (nats-py's ``flush`` writes its PING straight to the socket,
  ahead of commands still queued for its flusher task, so its PONG can come
  back before the server has read what it was meant to confirm.)

This is the one module that relies on nats-py's internals
(``Client._process_msg``, ``_send_command``, ``_flush_pending``, the
pending buffer and the PONG futures, the parser's state);
:func:`check_nats_shape` refuses a nats-py without them when the client is
made, instead of running on a guess.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import math
from dataclasses import dataclass
from typing import NamedTuple
from collections.abc import Callable

from nats import errors as nats_errors
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.protocol import parser as nats_parser

#: The header naming the pinned client of a priority group, on every message it gets.
PIN_HEADER = "Nats-Pin-Id"
_PIN_ONLY = b"NATS/1.0\r\n" + PIN_HEADER.encode() + b":"
_STATUS_LINE = b"NATS/1.0 "
_CRLF = b"\r\n"
_PING = b"PING\r\n"
#: What :meth:`InboxClient.confirm` uses of a nats-py client's own state.
_CLIENT_STATE = ("_pending", "_pending_data_size", "_pongs", "_transport")


class NatsShapeError(RuntimeError):
    """The installed nats-py lacks the internals the Bridge's inbox reading relies on."""


@dataclass(slots=True, repr=False)
class Delivered:
    """A message a pull request delivered: what the Bridge reads of it, and nothing more."""

    subject: str
    reply: str                      #: the ack subject
    data: bytes
    headers: dict[str, str] | None  #: as published (None without any)
    pin_id: str | None              #: the server's pin for this client, in a priority group

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


#: ``ACK_COMMAND % reply.encode()``: the ack of one message, as
#: ``settlement_command(reply, ACK_PAYLOAD)`` writes it, without the call.
ACK_COMMAND = b"PUB %s 0\r\n\r\n"


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
        missing = [name for name in _CLIENT_STATE if not hasattr(self, name)]
        if missing:
            raise NatsShapeError(f"this nats-py's Client has no {', '.join(missing)}; actorbus "
                                 "confirms its settlements with them; use nats-py 2.x")
        self._inboxes: dict[int, InboxHandler] = {}
        self._ps = InboxParser(self)

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

    async def write_settlements(self, commands: bytes, *, confirm_follows: bool = False) -> None:
        """Write settlement commands (see :func:`settlement_command`) as one buffer, like a
        publish would: buffered while reconnecting, refused once closed or over the limit.
        With ``confirm_follows`` they wait for the caller's :meth:`confirm` (or any
        earlier flush) to write them, instead of waking nats-py's flusher for a write
        of their own."""
        if self.is_closed:
            raise nats_errors.ConnectionClosedError
        if not self.is_connected and (self._max_pending_size <= 0 or
                                      len(commands) + self._pending_data_size > self._max_pending_size):
            raise nats_errors.OutboundBufferLimitError
        await self._send_command(commands)
        if not confirm_follows and self._flush_queue is not None and self._flush_queue.empty():
            await self._flush_pending()

    async def confirm(self, timeout: float) -> None:
        """Return once the server has read every command written or queued before this
        call: what is queued and a PING go out in one write, and the PING's PONG comes
        back. Raises ``FlushTimeoutError`` after ``timeout`` seconds without it; while
        reconnecting, does what nats-py's ``flush`` does."""
        if self.is_closed:
            raise nats_errors.ConnectionClosedError
        if not self.is_connected or self._transport is None:
            await self.flush(math.ceil(timeout))   # nats-py takes whole seconds
            return
        pong: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append(_PING)
        self._transport.writelines(self._pending)
        self._pending = []
        self._pending_data_size = 0
        self._pongs.append(pong)
        try:
            # Shielded: the PONG still comes, and nats-py resolves the future it pops.
            await asyncio.wait_for(asyncio.shield(pong), timeout)
        except TimeoutError:
            raise nats_errors.FlushTimeoutError from None

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                           headers: bytes) -> None:
        if not self.to_inbox(sid, subject, reply, data, headers):
            await super()._process_msg(sid, subject, reply, data, headers)

    def to_inbox(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                 headers: bytes | None) -> bool:
        """Hand a parsed message to its inbox's handler; False when ``sid`` is no inbox."""
        handler = self._inboxes.get(sid)
        if handler is None:
            return False
        self.stats["in_msgs"] += 1
        self.stats["in_bytes"] += len(data)
        handler(read_message(subject, reply, data, headers))
        return True


class InboxParser(nats_parser.Parser):
    """nats-py's protocol parser, reading ``MSG``, ``HMSG``, ``PING`` and ``PONG`` by splitting
    the line; any other operation, and what follows it in the buffer, goes to nats-py's own."""

    nc: InboxClient

    async def parse(self, data: bytes = b"") -> None:
        """Parse what arrived, and hand each message over as it is complete."""
        buf = self.buf
        buf.extend(data)
        # Read from one copy by position and cut the buffer once: cheaper than cutting it
        # after every operation.
        wire, pos = bytes(buf), 0
        try:
            while pos < len(wire):
                if self.state == nats_parser.AWAITING_MSG_PAYLOAD:
                    arg = self.msg_arg
                    at = await self._message(wire, pos, arg["subject"], arg["sid"], arg["reply"],
                                             self.header_needed, self.needed)
                    if at < 0:
                        return
                    pos = at
                    continue
                op = wire[pos:pos + 4]
                if op in {b"HMSG", b"MSG "}:
                    end = wire.find(_CRLF, pos)
                    if end < 0:
                        if len(wire) - pos > nats_parser.MAX_CONTROL_LINE_SIZE:
                            raise nats_errors.ProtocolError("nats: unknown protocol")
                        return
                    subject, sid, reply, header_size, size = _message_line(wire[pos:end].split(),
                                                                           op == b"HMSG")
                    at = await self._message(wire, end + 2, subject, sid, reply, header_size, size)
                    if at < 0:
                        # The rest has not arrived yet: nats-py's own fields say what is awaited.
                        self.msg_arg = {"subject": subject, "sid": sid, "reply": reply}
                        self.header_needed, self.needed = header_size, size
                        self.state = nats_parser.AWAITING_MSG_PAYLOAD
                        pos = end + 2
                        return
                    pos = at
                elif op in {b"PING", b"PONG"} and wire[pos + 4:pos + 6] == _CRLF:
                    pos += 6
                    await (self.nc._process_ping() if op == b"PING" else self.nc._process_pong())
                else:
                    del buf[:pos]
                    pos = 0
                    await super().parse()
                    return
        finally:
            del buf[:pos]

    async def _message(self, wire: bytes, pos: int, subject: bytes, sid: int, reply: bytes,
                       header_size: int, size: int) -> int:
        """Hand over the message whose payload starts at ``pos``; return where the next
        operation starts, or -1 when the payload has not all arrived."""
        end = pos + size
        if len(wire) < end + 2:
            return -1
        header = wire[pos:pos + header_size] if header_size else None
        payload = wire[pos + header_size:end]
        self.state = nats_parser.AWAITING_CONTROL_LINE
        self.header_needed = 0
        if not self.nc.to_inbox(sid, subject, reply, payload, header):
            await self.nc._process_msg(sid, subject, reply, payload, header or b"")
        return end + 2


def _message_line(args: list[bytes], with_headers: bool) -> tuple[bytes, int, bytes, int, int]:
    """``(subject, sid, reply, header size, size)`` of ``MSG <subject> <sid> [reply] <size>`` or
    ``HMSG <subject> <sid> [reply] <header size> <size>``, split at blanks."""
    count = len(args) - (1 if with_headers else 0)
    if count not in (4, 5):
        raise nats_errors.ProtocolError("nats: malformed MSG")
    try:
        return (args[1], int(args[2]), args[3] if count == 5 else b"",
                int(args[-2]) if with_headers else 0, int(args[-1]))
    except ValueError:
        raise nats_errors.ProtocolError("nats: malformed MSG") from None


async def _never_called(msg: object) -> None:
    """The callback nats-py holds for an inbox whose messages go to its handler instead."""
