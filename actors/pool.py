"""What each pool member holds and what waits for it: the Bridge's view of the pool.

The Bridge routes deliveries (routing key → ``pool_index``) and sends each
member its dispatches itself: a delivery crosses one actor hop to its
handler, and its completion one hop back. The Router is the pool's parent
and supervisor: it says where each member is (:class:`PoolMembers`), and
the Bridge re-sends, in order, what was assigned to a member that died.

Numbering keeps per-key order whatever order the transport delivers in:
each member's dispatches are numbered for its incarnation and handled
there in that order. A member has at most ``MAX_MEMBER_DISPATCHES``
outstanding; what is routed to it meanwhile waits here and goes as its
next batch. That is the only batching on the way in: a delivery goes at
once to a member with nothing outstanding; to a busy one, a second
dispatch goes only once ``MIN_SECOND_BATCH`` deliveries have gathered,
and otherwise they wait for its completion and go together.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

from actorbus.actors.messages import (UNDELIVERED, Address, Completion, Delivery, Dispatch,
                                      Outcome, index_of_address)
from actorbus.actors.routing import pool_index

#: Most deliveries in one dispatch to a member.
MAX_MEMBER_BATCH = 512
#: Most dispatches outstanding per member: the next is queued there while
#: it works on one, so it does not sit idle for a round trip.
MAX_MEMBER_DISPATCHES = 2
#: Fewest deliveries a second outstanding dispatch carries. A member with nothing
#: outstanding gets a delivery at once; one that is busy gets a second dispatch only
#: when that many have gathered, else what gathers waits for its completion (it is
#: working, so that is soon) and goes as one dispatch: under moderate load this
#: halves the actor messages per delivery, under heavy load the second slot is full.
MIN_SECOND_BATCH = 128

#: Most times a delivery is re-sent to a restarted member before it fails by its kind:
#: one that kills its member again and again must not hold its key up for ever.
MAX_RESENDS = 3

#: Most routing keys whose pool index is remembered before starting afresh.
_MAX_REMEMBERED_KEYS = 100_000


class _Member:
    """One pool member as the Bridge sees it."""

    __slots__ = ("address", "outstanding", "sent", "waiting", "assigned", "suspects")

    def __init__(self) -> None:
        self.address: Address | None = None      # None: not up (yet, or again)
        self.outstanding = 0                     # dispatches sent, not completed
        self.sent = 0                            # dispatches sent to this incarnation
        self.waiting: list[Delivery] = []        # routed here, not yet sent
        self.assigned: dict[int, Delivery] = {}  # sent or waiting, not completed, in order
        # Tokens that reached an incarnation that died: re-sent one at a time
        # until each completes, so a delivery that kills its member is found
        # exactly and the others are not failed with it.
        self.suspects: set[int] = set()


class PoolTable:
    """Routes deliveries to pool members, numbers their dispatches, and keeps what each holds."""

    def __init__(self, epoch: int = 0, bridge: int = 0, max_resends: int = MAX_RESENDS) -> None:
        self._members: list[_Member] = []
        self._resends: dict[int, int] = {}       # token → times re-sent to a restarted member
        self._member_of_key: dict[str, int] = {}  # routing key → pool index, remembered
        self._unrouted: list[Delivery] = []       # came before the Router said where members are
        #: The Bridge's incarnation and index, carried by every dispatch (see :class:`Dispatch`).
        self.epoch = epoch
        self.bridge = bridge
        #: Times what the Bridge reads changed hands, carried by every dispatch.
        self.ownership = 0
        self._max_resends = max_resends

    def __len__(self) -> int:
        return len(self._members)

    # ------------------------------------------------------------ where the members are
    def update(self, addresses: tuple[Address | None, ...]) -> tuple[list[int], list[Outcome]]:
        """The Router's word on where each member is (None: dead, a restart may follow).

        Returns the indices of members that came up holding something (re-sent to them in
        their original order) and the outcomes of deliveries re-sent too often already.
        """
        if len(self._members) != len(addresses):
            if any(m.assigned for m in self._members):
                raise ValueError("the pool size cannot change while members hold deliveries")
            self._members = [_Member() for _ in addresses]
            self._member_of_key.clear()
            early, self._unrouted = self._unrouted, []
            self.route(early)
        resumed: list[int] = []
        exhausted: list[Outcome] = []
        for index, (member, address) in enumerate(zip(self._members, addresses, strict=True)):
            if address is None:
                if member.address is not None:
                    self._down(member)
                continue
            if member.address is None:
                exhausted += self._up(index, member, address, counted=True)
            elif member.address != address:
                # Replaced without a word of its death (the Router and its pool were
                # restarted): what was assigned to it is sent again, not counted as an attempt.
                self._down(member)
                exhausted += self._up(index, member, address, counted=False)
            else:
                continue
            if member.waiting:
                resumed.append(index)
        return resumed, exhausted

    def _down(self, member: _Member) -> None:
        member.address = None
        member.outstanding = 0
        member.sent = 0   # a new incarnation expects dispatch 1 first

    def _up(self, index: int, member: _Member, address: Address, counted: bool) -> list[Outcome]:
        """A member is (back) up: what was assigned to its predecessor goes first, in the original order."""
        member.address = address
        exhausted: list[Outcome] = []
        resend: list[Delivery] = []
        # Only what reached the dead member counts as re-sent; what waited here did not.
        never_sent = {delivery.token for delivery in member.waiting}
        for token, delivery in list(member.assigned.items()):
            if token in never_sent or not counted:
                resend.append(delivery)
                continue
            count = self._resends.get(token, 0) + 1
            if count > self._max_resends:
                del member.assigned[token]
                self._resends.pop(token, None)
                member.suspects.discard(token)
                exhausted.append(Outcome(token, UNDELIVERED,
                                         f"pool member {index} died {count} times holding it", 0))
            else:
                self._resends[token] = count
                member.suspects.add(token)
                resend.append(delivery)
        member.waiting = resend
        return exhausted

    def index_of(self, address: Address) -> int | None:
        """The pool index of the member at ``address``."""
        return index_of_address((member.address for member in self._members), address)

    # ------------------------------------------------------------ hot path
    def route(self, deliveries: Iterable[Delivery]) -> None:
        """Queue each delivery for its member (``stable_hash(key) % N``, keyless round-robin)."""
        size = len(self._members)
        if not size:
            self._unrouted.extend(deliveries)
            return
        members = self._member_of_key
        if len(members) > _MAX_REMEMBERED_KEYS:
            members.clear()
        pool = self._members
        for delivery in deliveries:
            if delivery.keyless_slot is not None:
                index = pool_index(delivery.routing_key, delivery.keyless_slot, size)
            else:
                # Hashing in Python costs about a microsecond a key; ids recur.
                remembered = members.get(delivery.routing_key)
                if remembered is not None:
                    index = remembered
                else:
                    index = members[delivery.routing_key] = pool_index(delivery.routing_key, None,
                                                                       size)
            member = pool[index]
            member.waiting.append(delivery)
            member.assigned[delivery.token] = delivery

    def dispatches(self) -> Iterator[tuple[Address, Dispatch]]:
        """The dispatches due now: what waits for each member that is up and has room."""
        epoch, bridge = self.epoch, self.bridge
        for member in self._members:
            while member.waiting and member.address is not None and \
                    member.outstanding < MAX_MEMBER_DISPATCHES and \
                    (not member.outstanding or len(member.waiting) >= MIN_SECOND_BATCH):
                size = MAX_MEMBER_BATCH
                if member.suspects:
                    if member.outstanding:
                        break
                    size = 1
                batch = member.waiting[:size]
                del member.waiting[:size]
                member.outstanding += 1
                member.sent += 1
                yield member.address, Dispatch(tuple(batch), member.sent, epoch, bridge,
                                               self.ownership)

    def completed(self, completion: Completion, sender: Address) -> None:
        """A member reports outcomes: they are no longer assigned; a final part ends a dispatch."""
        index = completion.member
        member = self._members[index] if 0 <= index < len(self._members) else None
        tokens = tuple(completion.tokens())
        if member is None:   # not from a member (a test, or a failed hand-over): look them up
            for candidate in self._members:
                self._forget(candidate, tokens)
            return
        self._forget(member, tokens)
        if completion.final and member.address is not None and member.address == sender:
            # Not from a dead incarnation: a partial report settles messages, not the dispatch.
            member.outstanding = max(0, member.outstanding - 1)

    def _forget(self, member: _Member, tokens: tuple[int, ...]) -> None:
        assigned, resends = member.assigned, self._resends
        for token in tokens:
            assigned.pop(token, None)
            if resends:
                resends.pop(token, None)
        if member.suspects:
            member.suspects.difference_update(tokens)

    def returned(self, dispatch: Dispatch, sender: Address) -> None:
        """A member gave a dispatch back (it raised twice on it): none of it is assigned any more."""
        index = self.index_of(sender)
        if index is None:
            return
        member = self._members[index]
        self._forget(member, tuple(delivery.token for delivery in dispatch.deliveries))
        member.outstanding = max(0, member.outstanding - 1)

    def depths(self) -> tuple[int, ...]:
        """Deliveries assigned to each member (sent or waiting, not completed)."""
        return tuple(len(m.assigned) for m in self._members)

    def assigned(self) -> int:
        """Deliveries assigned to a member (sent or waiting, not completed), or waiting to be
        routed."""
        return sum(len(m.assigned) for m in self._members) + len(self._unrouted)
