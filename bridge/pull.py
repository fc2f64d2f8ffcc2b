"""Pipelined pull requests for one durable consumer, answered on a private inbox.

nats-py's ``fetch`` takes each message with ``next_msg`` under
``asyncio.wait_for`` (about 40 µs of client CPU per message here) and
waits for one batch to finish before asking for the next. This asks the
consumer directly (``$JS.API.CONSUMER.MSG.NEXT``) with requests that
overlap, and takes the messages in one subscription callback, about a
fifth of that cost.

Each request is answered on its own reply subject under the inbox, so the
server's status for a request (408 expired, 409 ended) names which one it
ended. Messages do not name their request (they carry their own subject),
but the server fills waiting requests oldest first, so they are counted
off the oldest. A request that has seen neither its messages nor its
status well past its expiry (a server restart loses them) is forgotten.

A pin lapses ``pin_timeout`` after the last request that carried it, even
while its client is busy with what it was given: the server counts
requests, not deliveries or acks. A bus whose window stays full that long
renews it with a request that cannot take a message (see :meth:`keep_pin`).
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from typing import Any
from collections.abc import Callable

from nats.aio.subscription import Subscription
from nats.js.api import StatusCode

from actorbus.bridge.inbox import Delivered, InboxClient, InboxStatus
from actorbus.bridge.layout import ConsumerSpec
from actorbus.bridge.metadata import delivery_numbers
from actorbus.config import SubscriptionConfig

log = logging.getLogger("actorbus.bridge")

#: The status that ends a request whose pin id is not the group's (nats-py has no name for it).
PIN_MISMATCH = "423"
#: Statuses that end a request in the ordinary way: no messages, expired, pinned elsewhere.
_QUIET = {StatusCode.NO_MESSAGES, StatusCode.REQUEST_TIMEOUT, PIN_MISMATCH}
#: Least time between two warnings about the same status.
_WARN_EVERY = 5.0
#: A request not ended this long after its expiry is taken as lost.
_LOST_AFTER = 2.0
#: The reply token of the requests that only renew a pin (the others are numbered).
_KEEP = "pin"


class _Request:
    __slots__ = ("number", "remaining", "deadline", "with_pin")

    def __init__(self, number: int, remaining: int, deadline: float, with_pin: bool) -> None:
        self.number = number
        self.remaining = remaining
        self.deadline = deadline
        self.with_pin = with_pin   # made with a pin id


class PullConsumer:
    """Pull requests to one durable consumer, which may overlap, and their answers.

    Runs on the NATS loop thread only. The caller decides how much to
    :meth:`request`; ``on_messages`` gets each run of messages that arrived
    together, in order; ``on_request_ended`` is called when the server ends
    a request before it was filled (so there is room to ask again).
    """

    def __init__(self, nc: InboxClient, sub: SubscriptionConfig, spec: ConsumerSpec,
                 on_messages: Callable[[SubscriptionConfig, list[Delivered]], None],
                 on_request_ended: Callable[[], None],
                 on_pinned: Callable[[PullConsumer], None] | None = None,
                 claimed_pin: str | None = None,
                 on_unpinned: Callable[[PullConsumer], None] | None = None) -> None:
        self._nc = nc
        self._sub = sub
        self.spec = spec   #: the durable consumer these requests go to
        self._on_messages = on_messages
        self._on_request_ended = on_request_ended
        self._warned_at: dict[str, float] = {}
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{spec.stream}.{spec.durable}"
        self._inbox = nc.new_inbox()
        self._subscription: Subscription | None = None
        self._requests: collections.deque[_Request] = collections.deque()
        self._numbers = 0
        self._arrived: list[Delivered] = []
        self._deferred: list[Delivered] = []
        self.requested = 0  # asked for, neither arrived nor ended
        self._on_pinned = on_pinned
        self._on_unpinned = on_unpinned
        #: The server's pin for this client (``Nats-Pin-Id``) while it is the one pulling
        #: from a priority group; None while it is a standby.
        self.pin_id: str | None = None
        #: A pin id this client asks with before it is pinned: its predecessor's, if a
        #: Bridge died holding it. The server takes it as the same client (no wait for the
        #: dead one's pin to lapse); the first message under it makes it this client's.
        self.claimed_pin = claimed_pin
        self.pins = 0     # times pinned
        self.unpins = 0   # times the pin moved away (status 423)
        self._pin_renewed_at = 0.0   # when a request last carried the pin id
        #: While True no request is made and arrivals are kept back (from
        #: :meth:`hold_for_recovery` until :meth:`resume`).
        self.recovering = False
        #: Set by :meth:`stop`: nothing more is handed over.
        self.stopped = False

    @property
    def name(self) -> str:
        """The durable consumer's name."""
        return self.spec.durable

    @property
    def subscription(self) -> str:
        """The name of the subscription it serves."""
        return self._sub.name

    @property
    def pending(self) -> int:
        """Messages asked for and not yet handed over: requested, or arrived and about to go."""
        return self.requested + len(self._arrived) + len(self._deferred)

    @property
    def ack_wait(self) -> float:
        """Seconds before JetStream redelivers what it delivered and was not acked."""
        return self._sub.ack_wait

    @property
    def batch_size(self) -> int:
        """The most messages one request asks for."""
        return self._sub.batch_size

    async def start(self) -> None:
        """Subscribe to the inbox; no request is made until :meth:`request`."""
        # No pending limit of nats-py's own: the window bounds what can arrive.
        self._subscription = await self._nc.subscribe_inbox(f"{self._inbox}.*", self._received)

    async def stop(self) -> None:
        """Unsubscribe and hand nothing more over; the server drops waiting requests that
        nobody listens to any more."""
        self.stopped = True
        self._arrived, self._deferred = [], []
        if self._subscription is not None:
            subscription, self._subscription = self._subscription, None
            await self._nc.unsubscribe_inbox(subscription)
        self.forget()

    async def request(self, count: int) -> None:
        """Ask for ``count`` more messages (they may arrive any time before the request expires)."""
        self._numbers += 1
        expires = self._sub.pull_expires
        request: dict[str, Any] = {"batch": count, "expires": int(expires * 1e9)}
        if self.spec.priority_group is not None:
            request["group"] = self.spec.priority_group
            pin = self.pin_id or self.claimed_pin
            if pin is not None:
                request["id"] = pin
        self._requests.append(_Request(self._numbers, count, time.monotonic() + expires + _LOST_AFTER,
                                       "id" in request))
        self.requested += count
        if "id" in request:
            self._pin_renewed_at = time.monotonic()
        body = json.dumps(request).encode()
        await self._nc.publish(self._next_subject, body, reply=f"{self._inbox}.{self._numbers}")

    async def keep_pin(self, now: float) -> None:
        """Renew this client's pin if no request has carried it for ``pull_expires``.

        The renewal is a request of at most one byte, which no message fits: the server
        ends it (409) at the first message instead of delivering it, so the window holds.
        Stopped consumers renew too, until they unpin: a draining bus keeps its pin, and
        its successor is pinned only once what it delivered is settled.
        """
        if self.pin_id is None or now - self._pin_renewed_at < self._sub.pull_expires:
            return
        self._pin_renewed_at = now
        request = {"batch": 1, "max_bytes": 1, "expires": int(self._sub.pull_expires * 1e9),
                   "group": self.spec.priority_group, "id": self.pin_id}
        await self._nc.publish(self._next_subject, json.dumps(request).encode(),
                               reply=f"{self._inbox}.{_KEEP}")

    def forget(self, now: float | None = None) -> int:
        """Forget requests lost past their expiry (all of them without ``now``); return how many."""
        lost = 0
        for request in list(self._requests):
            if now is None or now > request.deadline:
                self._requests.remove(request)
                self.requested -= request.remaining
                lost += 1
        return lost

    # ------------------------------------------------------------ callbacks
    def _received(self, msg: Delivered | InboxStatus) -> None:
        if isinstance(msg, InboxStatus):
            self._status(msg)
            return
        if msg.pin_id is not None and msg.pin_id != self.pin_id and \
                self.spec.priority_group is not None:
            self._pinned(msg.pin_id)
        if self._requests:
            oldest = self._requests[0]
            oldest.remaining -= 1
            self.requested -= 1
            if oldest.remaining <= 0:
                self._requests.popleft()
        # Whatever arrives from one read of the socket goes over in one hand-over.
        if not self._arrived:
            asyncio.get_running_loop().call_soon(self._hand_over)
        self._arrived.append(msg)

    def _pinned(self, pin: str) -> None:
        # This client now owns the consumer: what the previous owner left un-acked
        # is recovered before anything delivered under the new pin is handed over.
        log.info("durable %s: pinned in priority group %s; this bus is the active one",
                 self.name, self.spec.priority_group)
        self.pin_id = pin
        self.claimed_pin = None
        self.pins += 1
        self._pin_renewed_at = time.monotonic()   # a pin's timer starts when it is given
        # Requests made before the pin without an id: the server fills only the one it
        # pinned (the oldest: this message's) and holds the others as a standby's until they
        # expire, which would stall this consumer for up to pull_expires. Forgotten, they
        # are made again with the id.
        for request in list(self._requests)[1:]:
            if not request.with_pin:
                self._requests.remove(request)
                self.requested -= request.remaining
        if self._on_pinned is not None:
            self.hold_for_recovery()
            self._on_pinned(self)

    def _hand_over(self) -> None:
        arrived, self._arrived = self._arrived, []
        if self.stopped:
            return   # given up: JetStream redelivers these to whoever reads the durable next
        if self.recovering:
            # Kept back: what recovery reads must reach the Bridge first.
            self._deferred.extend(arrived)
        elif arrived:
            self._on_messages(self._sub, arrived)

    def first_deliveries_kept_back(self) -> set[int]:
        """Stream sequences of the first deliveries that arrived while recovering.

        They are newer than anything delivered before (a first delivery is
        never in a previous owner's gap), so they are handled as deliveries,
        after what recovery reads. A redelivery that arrived meanwhile is an
        older message: recovery reads it back in its place in stream order,
        and the redelivery is then settled by that handling.
        """
        found = set()
        for msg in self._deferred:
            try:
                delivery_count, sequence = delivery_numbers(msg.reply)
            except ValueError:
                continue
            if delivery_count == 1:
                found.add(sequence)
        return found

    def hold_for_recovery(self) -> None:
        """Recovery is about to read this durable's gap: make no request and keep back what
        arrives until :meth:`resume`, so that what recovery reads reaches the Bridge first."""
        self.recovering = True

    def unpinned(self) -> None:
        """This client let its pin go (it asked the server to unpin it): no more renewals."""
        self.pin_id = None

    def resume(self) -> None:
        """Recovery is over: hand over what arrived meanwhile, and let requests be made."""
        self.recovering = False
        deferred, self._deferred = self._deferred, []
        if deferred and not self.stopped:
            self._on_messages(self._sub, deferred)

    def _status(self, status: InboxStatus) -> None:
        code = status.code
        if code == StatusCode.CONTROL_MESSAGE:  # the server's idle heartbeat
            return
        if code == PIN_MISMATCH:
            if self.claimed_pin is not None:
                log.info("durable %s: the pin of the Bridge before this one has lapsed or moved; "
                         "pulling as a standby", self.name)
                self.claimed_pin = None
            # The pin moved to another bus: pull on as a standby, without an id.
            if self.pin_id is not None:
                log.warning("durable %s: the pin of priority group %s moved to another bus; this "
                            "bus is a standby now", self.name, self.spec.priority_group)
                self.pin_id = None
                self.unpins += 1
                if self._on_unpinned is not None:
                    self._on_unpinned(self)
        number = status.subject.rsplit(".", 1)[-1]
        if number == _KEEP:
            return   # a renewal ends at expiry or at the first message; nothing was asked
        for request in self._requests:
            if str(request.number) == number:
                self._requests.remove(request)
                self.requested -= request.remaining
                break
        if code not in _QUIET:
            # 409 (consumer deleted, leadership change, ...) or 503 (JetStream
            # not ready): worth a line, not one per request while it lasts.
            now = time.monotonic()
            if now - self._warned_at.get(code, -_WARN_EVERY) >= _WARN_EVERY:
                self._warned_at[code] = now
                log.warning("a pull request for %s was ended by the server: %s %s",
                            self._sub.name, code, status.description)
        self._on_request_ended()
