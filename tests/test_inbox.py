"""The Bridge's inbox reading: the same messages, headers and statuses nats-py would read."""
from __future__ import annotations

import asyncio

import pytest
from nats.aio.client import Client
from nats.errors import ConnectionClosedError, FlushTimeoutError, ProtocolError

from actorbus.bridge.inbox import (ACK_COMMAND, ACK_PAYLOAD, Delivered, InboxClient, InboxStatus,
                                   NatsShapeError, check_nats_shape, nak_payload, read_message,
                                   settlement_command)

ACK = b"$JS.ACK.S.d.1.7.7.1700000000000000000.0"
BLOCKS = [
    b"NATS/1.0\r\nX-Aggregate-ID: k1\r\n\r\n",
    b"NATS/1.0\r\nA: 1\r\nA: 2\r\nB:x\r\nC:\tspaced \r\n\r\n",
    b"NATS/1.0\r\nno colon\r\nBad Name: v\r\n\xff: v\r\nOk: caf\xc3\xa9 \xff\r\n\r\n",
    b"NATS/1.0\r\nNats-Pin-Id: p1\r\nX-Aggregate-ID: k1\r\n\r\n",
]


def nats_py_headers(block: bytes) -> dict[str, str] | None:
    return asyncio.run(Client()._process_headers(block))


@pytest.mark.parametrize("block", BLOCKS)
def test_headers_read_as_nats_py_reads_them_without_the_servers_pin(block):
    read = read_message(b"orders.k1", ACK, b"body", block)
    assert isinstance(read, Delivered)
    expected = nats_py_headers(block)
    pin = expected.pop("Nats-Pin-Id", None)
    assert read.headers == (expected or None) and read.pin_id == pin
    assert (read.subject, read.reply, read.data) == ("orders.k1", ACK.decode(), b"body")


def test_a_pin_alone_leaves_no_headers():
    read = read_message(b"orders.k1", ACK, b"x", b"NATS/1.0\r\nNats-Pin-Id: Xy9\r\n\r\n")
    assert isinstance(read, Delivered) and read.headers is None and read.pin_id == "Xy9"
    plain = read_message(b"orders.k1", ACK, b"x", None)
    assert isinstance(plain, Delivered) and plain.headers is None and plain.pin_id is None


@pytest.mark.parametrize("block, code, description", [
    (b"NATS/1.0 408 Request Timeout\r\n\r\n", "408", "Request Timeout"),
    (b"NATS/1.0 404 No Messages\r\n\r\n", "404", "No Messages"),
    (b"NATS/1.0 409\r\n\r\n", "409", ""),
    (b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 3\r\n\r\n", "100", "Idle Heartbeat"),
])
def test_a_status_without_an_ack_subject_ends_a_request(block, code, description):
    read = read_message(b"_INBOX.a.3", b"", b"", block)
    assert read == InboxStatus("_INBOX.a.3", code, description)
    expected = nats_py_headers(block)
    assert (expected["Status"], expected.get("Description", "")) == (code, description)


def test_a_message_with_an_ack_subject_is_a_message_whatever_its_first_line():
    read = read_message(b"orders.k1", ACK, b"x", b"NATS/1.0 408 Odd\r\nA: 1\r\n\r\n")
    assert isinstance(read, Delivered) and read.headers == {"A": "1"}


def test_settlement_commands_are_what_nats_py_publishes():
    assert settlement_command("$JS.ACK.a", b"") == b"PUB $JS.ACK.a 0\r\n\r\n"
    assert ACK_COMMAND % b"$JS.ACK.a" == settlement_command("$JS.ACK.a", ACK_PAYLOAD)
    assert settlement_command("$JS.ACK.a", b"+TERM") == b"PUB $JS.ACK.a 5\r\n+TERM\r\n"
    assert nak_payload(None) == nak_payload(0) == b"-NAK"
    assert nak_payload(1.5) == b'-NAK {"delay": 1500000000}'


def test_a_nats_py_without_the_internals_relied_on_is_refused():
    check_nats_shape()

    class Reshaped(Client):
        async def _process_msg(self, sid, subject, reply, data, headers, extra=None):
            pass

    class Missing:
        pass

    for shape in (Reshaped, Missing):
        with pytest.raises(NatsShapeError, match="nats-py"):
            check_nats_shape(shape)


class RecordingClient(InboxClient):
    """Records what the parser hands over instead of acting on it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple] = []

    async def _process_ping(self) -> None:
        self.seen.append(("PING",))

    async def _process_pong(self) -> None:
        self.seen.append(("PONG",))

    async def _process_msg(self, sid, subject, reply, data, headers) -> None:
        if not self.to_inbox(sid, subject, reply, data, headers):
            self.seen.append(("msg", sid, subject, reply, data, headers or None))


def hmsg(subject: bytes, sid: int, reply: bytes, header: bytes, body: bytes) -> bytes:
    line = b" ".join([b"HMSG", subject, str(sid).encode(), *([reply] if reply else []),
                      str(len(header)).encode(), str(len(header + body)).encode()])
    return line + b"\r\n" + header + body + b"\r\n"


WIRE = (b"MSG orders.k1 9 5\r\nhello\r\n"
        b"PING\r\n"
        + hmsg(b"_INBOX.x.1", 7, ACK, b"NATS/1.0\r\nNats-Pin-Id: p\r\n\r\n", b"body")
        + b"+OK\r\n"
        b"MSG orders.k2 9 reply.to 0\r\n\r\n"
        b"PONG\r\n"
        + hmsg(b"_INBOX.x.1", 7, b"", b"NATS/1.0 408 Expired\r\n\r\n", b"")
        + b"MSG orders.k3 9 3\r\nend\r\n")


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 16, len(WIRE)])
def test_the_parser_hands_over_every_operation_in_order_however_the_bytes_arrive(chunk):
    client = RecordingClient()
    inbox: list = []
    client._inboxes[7] = inbox.append

    async def feed() -> None:
        for start in range(0, len(WIRE), chunk):
            await client._ps.parse(WIRE[start:start + chunk])
    asyncio.run(feed())
    assert client.seen == [("msg", 9, b"orders.k1", b"", b"hello", None), ("PING",),
                           ("msg", 9, b"orders.k2", b"reply.to", b"", None), ("PONG",),
                           ("msg", 9, b"orders.k3", b"", b"end", None)]
    assert inbox == [Delivered("_INBOX.x.1", ACK.decode(), b"body", None, "p"),
                     InboxStatus("_INBOX.x.1", "408", "Expired")]
    assert not client._ps.buf


def test_a_malformed_message_line_is_a_protocol_error():
    for line in (b"MSG a b c d e f\r\n", b"HMSG a 1 x y\r\n", b"MSG a 1\r\n"):
        with pytest.raises(ProtocolError) as caught:
            asyncio.run(RecordingClient()._ps.parse(line))
        assert caught.value.args == ("nats: malformed MSG",)


class RecordingProxy:
    """A TCP proxy in front of a nats-server that keeps every byte the client sent."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sent = bytearray()
        self.muted = False   # drop what the server sends
        self.server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, client_reader, client_writer) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.port)

        async def pipe(reader, writer, keep: bytearray | None) -> None:
            while data := await reader.read(65536):
                if keep is not None:
                    keep.extend(data)
                elif self.muted:
                    continue
                writer.write(data)
                await writer.drain()
            writer.close()

        for task in (pipe(client_reader, server_writer, self.sent),
                     pipe(server_reader, client_writer, None)):
            self._tasks.add(asyncio.ensure_future(task))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def test_a_confirmation_is_pinged_behind_the_settlements_it_confirms(nats_server):
    """The PONG that confirms settlements must answer a PING the server reads after them:
    nats-py's own flush writes its PING ahead of commands still queued."""
    async def main() -> tuple[bytes, int]:
        proxy = RecordingProxy(nats_server.port)
        port = await proxy.start()
        client = InboxClient()
        try:
            await client.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False)
            await client.flush()
            before = len(proxy.sent)
            for n in range(20):
                await client.write_settlements(settlement_command(f"acks.{n}", ACK_PAYLOAD),
                                               confirm_follows=True)
                await client.confirm(timeout=5)
            return bytes(proxy.sent[before:]), before
        finally:
            await client.close()
            await proxy.stop()

    sent, before = asyncio.run(main())
    assert before > 0
    assert sent == b"".join(settlement_command(f"acks.{n}", ACK_PAYLOAD) + b"PING\r\n"
                            for n in range(20))


def test_a_confirmation_without_its_pong_times_out_and_a_closed_client_refuses_one(nats_server):
    async def main() -> None:
        proxy = RecordingProxy(nats_server.port)
        port = await proxy.start()
        client = InboxClient()
        try:
            await client.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False)
            await client.confirm(timeout=5)
            proxy.muted = True   # the server's answers no longer reach the client
            with pytest.raises(FlushTimeoutError):
                await client.confirm(timeout=0.3)
        finally:
            await client.close()
            await proxy.stop()
        with pytest.raises(ConnectionClosedError):
            await client.confirm(timeout=1)

    asyncio.run(main())
