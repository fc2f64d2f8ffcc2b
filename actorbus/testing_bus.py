"""The testing kit's bus: an EventBus for one test, with fresh names, probed handlers, waits and faults.

:class:`BusUnderTest` is an :class:`~actorbus.EventBus` on the kit's
nats-server. Its ``subscribe`` gives each test stream and durable names of
its own and subscribes the handler through the probe
(:mod:`actorbus.testing_probe`), so ``bus.records`` shows what the handler
did, from any process. Its waits poll with a deadline and, on a timeout,
say what they saw. The pytest fixtures that make it are in
:mod:`actorbus.testing`.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, TypeVar
from collections.abc import Awaitable, Callable, Iterable, Sequence

import nats
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from actorbus.actors.handlers import HandlerError, handler_reference
from actorbus.bus import BusError, EventBus
from actorbus.codecs import EnvelopeFormat
from actorbus.config import SubscriptionConfig
from actorbus.envelope import Envelope
from actorbus.groups import subject_for_key
from actorbus.processes import sigkill, wait_for_exit
from actorbus.publisher import OutgoingMessage
from actorbus.runtime import SimpleRuntime
from actorbus.testing_probe import ProbeSpec, Record, Recorder, count_kinds, hold_file
from actorbus.topology import Topology

log = logging.getLogger("actorbus.testing")

_T = TypeVar("_T")

#: Seconds a wait gives its condition unless told.
DEFAULT_TIMEOUT = 10.0
#: The pool a test bus runs unless told: two members show per-key routing and start fast.
DEFAULT_POOL_SIZE = 2
#: Seconds a bus left to the kit gets to drain at the end of its test.
STOP_TIMEOUT = 5.0


class KitError(RuntimeError):
    """The testing kit was used in a way it cannot work; the message says how to fix it."""


class WaitTimeout(AssertionError):
    """A ``wait_until_...`` ran out of time; the message says what was seen meanwhile."""


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """A message the bus dead-lettered, as stored in the subscription's dead-letter stream."""

    #: The subject it was published on.
    subject: str
    #: Its body as published (an encoded envelope).
    data: bytes
    #: Why: ``Actorbus-Error``.
    error: str
    #: The delivery it was dead-lettered on (1 for an invalid envelope).
    delivery_count: int
    headers: dict[str, str]

    @property
    def envelope(self) -> Envelope:
        """The body decoded as an envelope (``InvalidEnvelope`` for one dead-lettered as invalid)."""
        return Envelope.decode(self.data)


@dataclasses.dataclass
class TestScope:
    """What the buses of one test share: the server, the records folder, the name tag."""

    __test__ = False   # not a test class, though its name starts with Test

    url: str
    directory: Path
    #: Appended to the stream names the test's subscriptions derive, e.g. ``T7``.
    tag: str
    recorder: Recorder

    @classmethod
    def create(cls, url: str, directory: Path, tag: str) -> TestScope:
        """A scope with an empty records folder."""
        directory.mkdir(parents=True, exist_ok=True)
        return cls(url, directory, tag, Recorder(directory))

    def release_holds(self) -> None:
        """Remove every hold file, so held handlers go on."""
        for path in self.directory.glob("hold*"):
            path.unlink(missing_ok=True)

    def log_lines(self, level: tuple[str, ...] = ("WARNING", "ERROR", "CRITICAL")) -> list[str]:
        """The lines of the actor logs (processes runtime) at these levels, oldest first."""
        lines: list[str] = []
        for path in sorted(self.directory.glob("actorbus-*.log")):
            lines.extend(line for line in path.read_text(errors="replace").splitlines()
                         if line.split(" ", 1)[0] in level)
        return lines


class BusFactory:
    """``make_actorbus``: call it for a :class:`BusUnderTest` on the kit's server.

    Keyword arguments are :class:`~actorbus.EventBus`'s (``pool_size``
    defaults to 2, ``runtime`` to the test's: see :func:`actorbus.testing.actorbus_runtime`);
    ``topology`` takes a :class:`~actorbus.Topology`'s bus settings and
    subscribes each of its subscriptions. Every bus made is stopped at the
    end of the test.
    """

    def __init__(self, scope: TestScope, runtime: str) -> None:
        self.scope = scope
        self.runtime = runtime
        self._numbers = itertools.count(1)

    @property
    def records(self) -> Recorder:
        """What the probed handlers of this test did (every bus of the test shares it)."""
        return self.scope.recorder

    def __call__(self, *, runtime: str | None = None, topology: Topology | None = None,
                 **options: Any) -> BusUnderTest:
        settings: dict[str, Any] = {"pool_size": DEFAULT_POOL_SIZE,
                                    **(topology.bus if topology is not None else {}), **options}
        settings["runtime"] = runtime or self.runtime
        settings.setdefault("servers", self.scope.url)
        if settings["runtime"] == "processes":
            # The actor processes log to a file the waits quote when they time out.
            log_path = self.scope.directory / f"actorbus-{next(self._numbers)}.log"
            settings.setdefault("log_config", file_log_config(log_path))
        bus = BusUnderTest(self.scope, **settings)
        if topology is not None:
            for sub in topology.subscriptions:
                bus.subscribe(sub.subject, sub.handler, envelope=sub.envelope, durable=sub.durable,
                              stream=sub.stream, **sub.options)
        return bus


class BusUnderTest(EventBus):
    """An :class:`~actorbus.EventBus` for one test: made by ``make_actorbus``, stopped by the kit.

    ``subscribe`` wraps the handler in the kit's probe and, unless the test
    names them, gives the stream and durable this test's tag; ``records``
    is what the handlers did; the ``wait_until_...`` methods poll with a
    deadline; ``fail_times``, :meth:`hold`, :meth:`kill_member` and
    :meth:`publish_events` drive the delivery contract.
    """

    __test__ = False

    def __init__(self, scope: TestScope, **options: Any) -> None:
        self.scope = scope
        #: The subscriptions made through this bus, for its waits and dead letters.
        self.subscribed: list[SubscriptionConfig] = []
        super().__init__(**options)

    @property
    def records(self) -> Recorder:
        """What the probed handlers of this test did, across processes and buses."""
        return self.scope.recorder

    @property
    def in_process(self) -> bool:
        """True on the ``simple`` runtime: every actor on one thread of the test's process."""
        return isinstance(self.runtime, SimpleRuntime)

    # ------------------------------------------------------------ subscribing
    def subscribe(self, subject: str, handler: Callable[..., Any] | str, *, envelope: bool = True,
                  durable: str | None = None, stream: str | None = None, fail_times: int = 0,
                  fail_keys: Iterable[str] | None = None, **options: Any) -> SubscriptionConfig:
        """Subscribe ``handler`` through the probe; arguments as :meth:`EventBus.subscribe`.

        Without ``stream``, the stream is the one the subject derives plus the
        test's tag (``orders.>`` → ``ORDERS_T7``) and the durable is its lower
        case, so no two tests share messages. ``fail_times``: each message's
        first ``fail_times`` calls (in-place retries and redeliveries count)
        raise :class:`~actorbus.testing_probe.InjectedFailure` instead of
        running the handler; ``fail_keys`` limits that to these aggregate ids.
        Raises :class:`KitError` for a handler the kit cannot import.
        """
        __tracebackhide__ = True
        target = self._reference(handler)
        keys = (fail_keys,) if isinstance(fail_keys, str) else fail_keys   # one key, not its letters
        if stream is None:
            stream = f"{SubscriptionConfig(subject, target).stream}_{self.scope.tag}"
            durable = stream.lower() if durable is None else durable
        named = SubscriptionConfig(subject, target, envelope=envelope, durable=durable, stream=stream)
        probe = ProbeSpec(target, str(self.scope.directory), named.durable, fail_times,
                          None if keys is None else tuple(keys)).reference()
        try:
            made = super().subscribe(subject, probe, envelope=envelope, durable=durable, stream=stream,
                                     **options)
        except (BusError, HandlerError) as exc:
            raise KitError(f"subscribing handler {target} (through the testing kit's probe) failed: "
                           f"{str(exc).replace(probe, target)}") from None
        self.subscribed.append(made)
        return made

    @staticmethod
    def _reference(handler: Callable[..., Any] | str) -> str:
        __tracebackhide__ = True
        try:
            return handler_reference(handler)
        except HandlerError as exc:
            raise KitError(f"the testing kit cannot use this handler: {exc} (a module-level "
                           "function or Aggregate of the test file itself works)") from None

    # ------------------------------------------------------------ publishing
    def publish_events(self, subject: str, key: str, payloads: Iterable[Any], *,
                       event_type: str = "Happened", format: EnvelopeFormat | str = EnvelopeFormat.MSGPACK,
                       headers: bool = True) -> list[Envelope]:
        """Publish one envelope of aggregate ``key`` per payload, in order; return them.

        A payload of bytes is sent as it is, anything else as its JSON text.
        ``format``: ``"msgpack"``, or ``"json"`` (the Go EventBus's JSON
        envelope); ``headers=False`` sends the bare body with no headers, as
        the Go EventBus publishes. ``{aggregate_id}`` in ``subject`` is
        replaced by ``key``. Raises :class:`KitError` if JetStream did not
        store one.
        """
        __tracebackhide__ = True
        format = EnvelopeFormat(format)
        envelopes = [Envelope.create(key, event_type, _payload_bytes(p)) for p in payloads]
        items: list[OutgoingMessage] = [
            (subject, e) if headers else (subject_for_key(subject, key), e.encode(format))
            for e in envelopes]
        results = self.publish_many(items, format=format)
        failed = [r for r in results if not r.ok]
        if failed:
            raise KitError(f"publishing to {subject!r} failed: {failed[0].error} (subscribe before "
                           "publishing: the stream is made by subscribe)")
        return envelopes

    # ------------------------------------------------------------ waiting
    def wait_until_handled(self, n: int, *, key: str | None = None,
                           timeout: float = DEFAULT_TIMEOUT) -> list[Record]:
        """Wait until at least ``n`` messages (of aggregate ``key``) were handled; return
        the handled records. Raises :class:`WaitTimeout` saying what was seen."""
        __tracebackhide__ = True
        what = f"wait_until_handled({n}{'' if key is None else f', key={key!r}'})"
        return poll(lambda: _at_least(self.records.handled(key), n), timeout,
                    lambda: f"{what}: handled {len(self.records.handled(key))} of {n}",
                    self.describe)

    def wait_until_started(self, n: int, *, key: str | None = None,
                           timeout: float = DEFAULT_TIMEOUT) -> list[Record]:
        """Wait until handlers were called at least ``n`` times (of aggregate ``key``), as a
        held one is; return those records."""
        __tracebackhide__ = True
        what = f"wait_until_started({n}{'' if key is None else f', key={key!r}'})"
        return poll(lambda: _at_least(self.records.started(key), n), timeout,
                    lambda: f"{what}: started {len(self.records.started(key))} of {n}",
                    self.describe)

    def wait_until_acked(self, n: int, *, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """Wait until this bus acked at least ``n`` messages; return its ``stats()``."""
        __tracebackhide__ = True

        def acked() -> dict[str, Any] | None:
            stats = self.stats()
            return stats if stats["acked"] >= n else None
        return poll(acked, timeout, lambda: f"wait_until_acked({n}): acked {self._stat('acked')} of {n}",
                    self.describe)

    def wait_until_dead_lettered(self, n: int, *, timeout: float = DEFAULT_TIMEOUT) -> list[DeadLetter]:
        """Wait until this bus dead-lettered at least ``n`` messages (its ``stats()`` count them
        once they are stored); return the dead letters of its subscriptions' dead-letter streams."""
        __tracebackhide__ = True

        def stored() -> list[DeadLetter] | None:
            return _at_least(self.dead_letters(), n) if self.stats()["dead_lettered"] >= n else None
        return poll(stored, timeout, lambda: f"wait_until_dead_lettered({n}): dead-lettered "
                                             f"{self._stat('dead_lettered')} of {n}", self.describe)

    def dead_letters(self) -> list[DeadLetter]:
        """The messages in the dead-letter streams of this bus's subscriptions, oldest first."""
        streams = list(dict.fromkeys(sub.dead_letter_stream for sub in self.subscribed))
        return jetstream(self.scope.url, lambda js: _read_dead_letters(js, streams))

    def describe(self) -> str:
        """What the records, the bus's counters, the server and the actor log say now."""
        kinds = count_kinds(self.records.records())
        lines = [f"records: started {kinds['started']}, handled {kinds['handled']}, "
                 f"failed {kinds['failed']}"
                 + (f" (last error: {self.records.last_error()})" if kinds["failed"] else "")]
        try:
            stats = self.stats()
            lines.append("bus: " + ", ".join(f"{k} {stats[k]}" for k in (
                "received", "processed", "failed", "acked", "naked", "redelivered", "dead_lettered",
                "in_flight", "restarts")))
        except BusError as exc:
            lines.append(f"bus: {exc}")
        lines.append("server: " + self._pending())
        logged = self.scope.log_lines()
        if logged:
            lines.append("actor log: " + " | ".join(logged[-3:]))
        return "\n  ".join(lines)

    def _pending(self) -> str:
        pairs = [(sub.stream, sub.durable) for sub in self.subscribed]
        if not pairs:
            return "no subscription"
        try:
            infos = jetstream(self.scope.url, lambda js: _consumer_infos(js, pairs))
        except Exception as exc:
            return f"unreadable ({type(exc).__name__}: {exc})"
        described = (f"{stream}/{durable}: {info}"
                     for (stream, durable), info in zip(pairs, infos, strict=True))
        return "; ".join(described)

    def _stat(self, key: str) -> Any:
        try:
            return self.stats()[key]
        except BusError:
            return "?"

    # ------------------------------------------------------------ faults
    def hold(self, *keys: str) -> None:
        """Hold handlers before they run (those of these aggregate ids, or all) until
        :meth:`release`: a held call is ``started`` and waits (at most a minute).
        Needs the processes runtime."""
        __tracebackhide__ = True
        self._need_processes("hold")
        for key in keys or (None,):
            hold_file(self.scope.directory, key).touch()

    def release(self, *keys: str) -> None:
        """End the holds of these aggregate ids, or every hold."""
        if not keys:
            self.scope.release_holds()
        for key in keys:
            hold_file(self.scope.directory, key).unlink(missing_ok=True)

    def kill_member(self, index: int | None = None, *, key: str | None = None,
                    timeout: float = DEFAULT_TIMEOUT) -> int:
        """SIGKILL a pool member by pid: ``member-<index>``, or the one that last started
        a message of aggregate ``key``; wait until it is gone and return its pid.
        The Router restarts it and the Bridge sends it what the dead one held.
        Needs the processes runtime."""
        __tracebackhide__ = True
        self._need_processes("kill_member")
        if (index is None) == (key is None):
            raise KitError("kill_member takes a member index or key=, one of them")
        members = {name: pid for name, pid in self._fresh_pids().items() if name.startswith("member-")}
        if key is not None:
            started = self.records.started(key)
            if not started:
                raise KitError(f"kill_member(key={key!r}): no handler has started a message of "
                               f"{key!r} yet (wait_until_started first)")
            pid = started[-1].pid
            if pid not in members.values():
                raise KitError(f"kill_member(key={key!r}): pid {pid}, which started it last, is no "
                               f"member of this pool now ({members})")
        else:
            name = f"member-{index}"
            if name not in members:
                raise KitError(f"kill_member({index}): no {name} in this pool ({sorted(members)})")
            pid = members[name]
        sigkill([pid])
        if wait_for_exit([pid], timeout):
            raise KitError(f"pool member pid {pid} survived SIGKILL for {timeout} s")
        log.info("the testing kit killed pool member pid %d", pid)
        return pid

    def _fresh_pids(self) -> dict[str, int]:
        self.stats()   # pids are as of the last stats()
        return self.pids

    def _need_processes(self, what: str) -> None:
        __tracebackhide__ = True
        if self.in_process:
            raise KitError(f"{what} needs runtime='processes': on the simple runtime every actor "
                           "shares one thread of the test's process (mark the test "
                           "@pytest.mark.actorbus_runtime('processes'))")


def poll(check: Callable[[], _T | None], timeout: float, progress: Callable[[], str],
         describe: Callable[[], str]) -> _T:
    """Call ``check`` until it returns something other than None, and return that; past
    ``timeout`` seconds raise :class:`WaitTimeout` with ``progress()`` and ``describe()``."""
    __tracebackhide__ = True   # a timeout shows the test's line, not the kit's
    deadline = time.monotonic() + timeout
    interval = 0.005
    while True:
        found = check()
        if found is not None:
            return found
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"{progress()} after {timeout} s\n  {describe()}")
        time.sleep(interval)
        interval = min(interval * 2, 0.05)   # quick for what is quick, then gentle on the CPU


def _at_least(found: Sequence[_T], n: int) -> list[_T] | None:
    return list(found) if len(found) >= n else None


def _payload_bytes(payload: Any) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    return json.dumps(payload).encode()


def jetstream(url: str, action: Callable[[JetStreamContext], Awaitable[_T]]) -> _T:
    """Run ``action`` on a JetStream context of a connection of its own, on a thread of its
    own (the test may be inside an event loop already); return what it returns."""
    async def run() -> _T:
        nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
        try:
            return await action(nc.jetstream())
        finally:
            await nc.close()

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="actorbus-testing") as pool:
        return pool.submit(asyncio.run, run()).result()


async def stream_names(js: JetStreamContext) -> set[str]:
    """The names of every stream on the server."""
    return {info.config.name for info in await js.streams_info() if info.config.name}


async def delete_streams(js: JetStreamContext, names: Iterable[str]) -> None:
    """Delete these streams (their consumers with them)."""
    for name in names:
        await js.delete_stream(name)


async def _consumer_infos(js: JetStreamContext, pairs: list[tuple[str, str]]) -> list[str]:
    found = []
    for stream, durable in pairs:
        try:
            info = await js.consumer_info(stream, durable)
        except Exception as exc:
            found.append(f"no consumer ({type(exc).__name__})")
            continue
        found.append(f"{info.num_pending} pending, {info.num_ack_pending} awaiting ack, "
                     f"{info.num_redelivered} redelivered")
    return found


async def _read_dead_letters(js: JetStreamContext, streams: list[str]) -> list[DeadLetter]:
    letters = []
    for stream in streams:
        try:
            state = (await js.stream_info(stream)).state
        except NotFoundError:
            continue
        if not state.messages:
            continue
        for seq in range(state.first_seq, state.last_seq + 1):
            msg = await js.get_msg(stream, seq)
            headers = dict(msg.headers or {})
            letters.append(DeadLetter(headers.get("Actorbus-Original-Subject", msg.subject or ""),
                                      msg.data or b"", headers.get("Actorbus-Error", ""),
                                      int(headers.get("Actorbus-Delivery-Count", "0")), headers))
    return letters


def file_log_config(path: Path) -> dict[str, Any]:
    """A Thespian logDefs dict writing actorbus's logs (INFO and up) to ``path``."""
    return {
        "version": 1,
        "formatters": {"plain": {"format": "%(levelname)s %(name)s %(message)s"}},
        "handlers": {"file": {"class": "logging.FileHandler", "filename": str(path),
                              "formatter": "plain", "level": "INFO"}},
        "loggers": {"actorbus": {"handlers": ["file"], "level": "INFO", "propagate": False}},
        "root": {"level": "WARNING", "handlers": []},
    }


def processes_left(bus: EventBus, timeout: float = 5.0) -> list[int]:
    """The processes of a stopped ``bus`` still alive after up to ``timeout`` seconds
    (none on the simple runtime)."""
    return wait_for_exit([pid for pid in bus.runtime.pids() if pid != os.getpid()], timeout)
