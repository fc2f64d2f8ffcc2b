"""The testing kit's probe: a handler wrapped by reference, recording what it did for the test.

On the ``processes`` runtime a handler runs in forked pool members while the
test asserts in its own process, and a handler travels to the members by
name only. So the kit subscribes a probe in the handler's place, named
``actorbus.testing_probe:probe_<hex>``, the hex being the JSON of a
:class:`ProbeSpec` (the user's handler, the test's records folder, the
faults to inject): importing that name builds the same wrapper in any
process, and no state has to be shared beforehand.

The probe appends one JSON line per event (``started``, then ``handled`` or
``failed``) to a file of its own process in the records folder, each line
in one ``os.write``; :class:`Recorder` reads them back in the order they
happened (CLOCK_MONOTONIC is one clock for every process of the machine).
It also drives faults for the test: it fails a message's first
``fail_times`` calls, and holds handlers while a hold file exists.
"""
from __future__ import annotations

import base64
import dataclasses
import inspect
import json
import logging
import os
import time
from pathlib import Path
from typing import Any
from collections.abc import Awaitable, Callable, Iterable

from actorbus.actors.handlers import resolve_handler
from actorbus.aggregate import Aggregate
from actorbus.message import Message

log = logging.getLogger("actorbus.testing")

#: Attribute names of this module that build a probe when imported.
PROBE_PREFIX = "probe_"
#: Longest a held handler waits for the test to release it, so a forgotten hold ends.
HOLD_LIMIT = 60.0
#: How often a held handler looks for its release.
_HOLD_POLL = 0.005

#: The kinds of record, in the order a call writes them.
STARTED, HANDLED, FAILED = "started", "handled", "failed"


class InjectedFailure(RuntimeError):
    """Raised by the probe in place of the handler, as ``fail_times`` asked."""


class HeldTooLong(RuntimeError):
    """A handler was held for :data:`HOLD_LIMIT` seconds and never released by the test."""


@dataclasses.dataclass(frozen=True)
class ProbeSpec:
    """What a probe wraps and does: everything it needs, carried in its name."""

    #: The user's handler, ``"module:qualname"``.
    handler: str
    #: The test's records folder.
    records: str
    #: The subscription's durable name, written into each record.
    subscription: str
    #: Each message's first ``fail_times`` calls raise :class:`InjectedFailure`.
    fail_times: int = 0
    #: Only messages of these aggregate ids fail (None: every message).
    fail_keys: tuple[str, ...] | None = None

    def reference(self) -> str:
        """The handler reference that imports this probe in any process."""
        fields = dataclasses.asdict(self)
        return f"{__name__}:{PROBE_PREFIX}{json.dumps(fields, sort_keys=True).encode().hex()}"

    @classmethod
    def from_attribute(cls, name: str) -> ProbeSpec:
        """The spec a ``probe_<hex>`` attribute name carries; ``ValueError`` if it carries none."""
        fields = json.loads(bytes.fromhex(name.removeprefix(PROBE_PREFIX)))
        if fields.get("fail_keys") is not None:
            fields["fail_keys"] = tuple(fields["fail_keys"])
        return cls(**fields)


def __getattr__(name: str) -> Any:
    """Build the probe a ``probe_<hex>`` name describes (module attribute look-up, PEP 562)."""
    if not name.startswith(PROBE_PREFIX):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        spec = ProbeSpec.from_attribute(name)
    except (ValueError, TypeError):
        raise AttributeError(f"{name!r} is not a probe the testing kit made") from None
    probe = make_probe(spec, name)
    globals()[name] = probe   # the next look-up finds it without decoding
    return probe


def make_probe(spec: ProbeSpec, name: str) -> Callable[..., Any]:
    """The wrapper of ``spec.handler``: a function, or a subclass of the user's Aggregate.

    Raises :class:`~actorbus.actors.handlers.HandlerError` naming the user's
    handler when it does not import here.
    """
    target = resolve_handler(spec.handler)
    function: Callable[..., Any] = target   # what the probe calls, unless it is an Aggregate
    recording = _Recording(spec)
    if isinstance(target, type) and issubclass(target, Aggregate):
        aggregate: type[Aggregate] = target

        def handle(self: Aggregate, msg: Message) -> Any:
            return recording.call(msg, lambda: aggregate.handle(self, msg), lambda: aggregate_state(self))

        probed: type[Aggregate] = type(name, (aggregate,), {
            "handle": handle, "__module__": __name__, "__qualname__": name,
            "__doc__": f"{spec.handler}, recorded by the testing kit."})
        return probed

    def probe(msg: Message) -> Any:
        return recording.call(msg, lambda: function(msg), lambda: None)

    probe.__name__ = probe.__qualname__ = name
    probe.__doc__ = f"{spec.handler}, recorded by the testing kit."
    return probe


def aggregate_state(instance: Aggregate) -> dict[str, Any]:
    """An aggregate's public attributes as JSON values (``repr`` for what JSON cannot hold)."""
    return {name: _json_value(value) for name, value in vars(instance).items()
            if name != "aggregate_id" and not name.startswith("_")}


def _json_value(value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value


def hold_file(directory: Path, key: str | None = None) -> Path:
    """The file whose presence holds every handler (``key`` None) or those of one aggregate id."""
    return directory / ("hold" if key is None else f"hold-{key.encode().hex()}")


class _Recording:
    """One probe's behaviour around each call of the user's handler."""

    def __init__(self, spec: ProbeSpec) -> None:
        self.spec = spec
        self.directory = Path(spec.records)

    def call(self, msg: Message, run: Callable[[], Any], state: Callable[[], Any]) -> Any:
        self._write(STARTED, msg)
        try:
            self._wait_while_held(msg)
            self._inject_failure(msg)
            result = run()
        except Exception as exc:
            self._write(FAILED, msg, error=f"{type(exc).__name__}: {exc}")
            raise
        if inspect.isawaitable(result):   # an async handler: recorded once it has run
            return self._finish(msg, result, state)
        self._write(HANDLED, msg, state=state())
        return result

    async def _finish(self, msg: Message, pending: Awaitable[Any], state: Callable[[], Any]) -> Any:
        try:
            result = await pending
        except Exception as exc:
            self._write(FAILED, msg, error=f"{type(exc).__name__}: {exc}")
            raise
        self._write(HANDLED, msg, state=state())
        return result

    def _wait_while_held(self, msg: Message) -> None:
        files = (hold_file(self.directory), hold_file(self.directory, msg.aggregate_id or msg.routing_key))
        deadline = time.monotonic() + HOLD_LIMIT
        while any(path.exists() for path in files):
            if time.monotonic() > deadline:
                raise HeldTooLong(f"held by the testing kit for {HOLD_LIMIT:.0f} s and never released")
            time.sleep(_HOLD_POLL)

    def _inject_failure(self, msg: Message) -> None:
        spec = self.spec
        if spec.fail_times <= 0 or (spec.fail_keys is not None and msg.aggregate_id not in spec.fail_keys):
            return
        # One byte per failure so far, in a file per message: a count every process shares
        # (one message is handled by one actor at a time).
        counter = self.directory / "faults" / f"{spec.subscription}-{msg.stream_sequence}"
        counter.parent.mkdir(parents=True, exist_ok=True)
        failed = counter.stat().st_size if counter.exists() else 0
        if failed < spec.fail_times:
            with open(counter, "ab") as out:
                out.write(b"x")
            raise InjectedFailure(f"failure {failed + 1} of {spec.fail_times} injected by the testing kit")

    def _write(self, kind: str, msg: Message, *, error: str | None = None, state: Any = None) -> None:
        envelope = msg.envelope
        record = {"kind": kind, "subscription": self.spec.subscription, "subject": msg.subject,
                  "aggregate_id": msg.aggregate_id, "routing_key": msg.routing_key,
                  "data": base64.b64encode(msg.data).decode(),
                  "event_type": envelope.event_type if envelope else None,
                  "event_id": envelope.event_id if envelope else None,
                  "delivery_count": msg.delivery_count, "attempt": msg.attempt,
                  "stream_sequence": msg.stream_sequence, "pid": os.getpid(),
                  "at_ns": time.monotonic_ns(), "error": error, "state": state}
        line = (json.dumps(record) + "\n").encode()
        try:
            fd = os.open(self.directory / f"records-{os.getpid()}.jsonl",
                         os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)   # one write: a line is whole, or (killed) cut at the end
            finally:
                os.close(fd)
        except OSError as exc:
            # The test has ended and its folder is gone: a late redelivery has nobody to tell.
            log.warning("the testing kit could not record a %s message on %s: %s", kind, msg.subject, exc)


@dataclasses.dataclass(frozen=True)
class Record:
    """One thing a probed handler did: started on a message, handled it, or failed on it."""

    kind: str
    #: The subscription's durable name.
    subscription: str
    subject: str
    aggregate_id: str | None
    routing_key: str
    #: The envelope's payload, or the raw bytes of a plain message.
    data: bytes
    event_type: str | None
    event_id: str | None
    delivery_count: int
    attempt: int
    stream_sequence: int
    #: The process that ran the handler (a pool member's, on the processes runtime).
    pid: int
    at_ns: int
    #: ``"ExceptionType: message"`` of a failure.
    error: str | None
    #: An aggregate's public attributes after it handled the message (None for functions).
    state: dict[str, Any] | None

    @property
    def payload(self) -> Any:
        """``data`` parsed as JSON."""
        return json.loads(self.data)


class Recorder:
    """What the probed handlers of one test did, read from its records folder.

    Every method reads what was written since the last call, so each answer
    is current. Records are in the order they happened; per key that is the
    order the handlers saw.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._offsets: dict[Path, int] = {}
        self._records: list[Record] = []

    def records(self, kind: str | None = None, *, key: str | None = None,
                subscription: str | None = None) -> list[Record]:
        """Every record, or those of one ``kind`` (``"started"``, ``"handled"``, ``"failed"``),
        aggregate id ``key`` and ``subscription`` (durable name)."""
        self._read_new()
        return [r for r in self._records
                if (kind is None or r.kind == kind) and (key is None or r.aggregate_id == key)
                and (subscription is None or r.subscription == subscription)]

    def handled(self, key: str | None = None, *, subscription: str | None = None) -> list[Record]:
        """The messages handled successfully, in the order they were."""
        return self.records(HANDLED, key=key, subscription=subscription)

    def failed(self, key: str | None = None, *, subscription: str | None = None) -> list[Record]:
        """The failed calls (injected failures included), in order."""
        return self.records(FAILED, key=key, subscription=subscription)

    def started(self, key: str | None = None, *, subscription: str | None = None) -> list[Record]:
        """Every call of a handler (one per attempt), in order."""
        return self.records(STARTED, key=key, subscription=subscription)

    def data(self, key: str | None = None, *, subscription: str | None = None) -> list[bytes]:
        """The payloads (raw bytes) of the messages handled, in order."""
        return [r.data for r in self.handled(key, subscription=subscription)]

    def payloads(self, key: str | None = None, *, subscription: str | None = None) -> list[Any]:
        """The payloads of the messages handled, parsed as JSON, in order."""
        return [r.payload for r in self.handled(key, subscription=subscription)]

    def by_key(self, *, subscription: str | None = None) -> dict[str | None, list[bytes]]:
        """Handled payloads per aggregate id, each list in the order that key was handled
        (None holds the keyless messages)."""
        keyed: dict[str | None, list[bytes]] = {}
        for record in self.handled(subscription=subscription):
            keyed.setdefault(record.aggregate_id, []).append(record.data)
        return keyed

    def attempts(self, key: str | None = None, *, subscription: str | None = None) -> list[int]:
        """How many times each message was called (in-place retries and redeliveries
        included), in stream order."""
        calls: dict[tuple[str, int], int] = {}
        for record in self.started(key, subscription=subscription):
            message = (record.subscription, record.stream_sequence)
            calls[message] = calls.get(message, 0) + 1
        return [calls[message] for message in sorted(calls, key=lambda m: (m[1], m[0]))]

    def state(self, key: str, *, subscription: str | None = None) -> dict[str, Any] | None:
        """The state aggregate ``key`` ended in: its public attributes after the last
        message it handled (None if it handled none)."""
        handled = self.handled(key, subscription=subscription)
        return handled[-1].state if handled else None

    def states(self, *, subscription: str | None = None) -> dict[str, dict[str, Any]]:
        """The last state of every aggregate that handled a message."""
        return {r.aggregate_id: r.state for r in self.handled(subscription=subscription)
                if r.aggregate_id is not None and r.state is not None}

    def last_error(self) -> str | None:
        """The error of the latest failed call, naming its key and delivery; None if none failed."""
        failed = self.failed()
        if not failed:
            return None
        last = failed[-1]
        return (f"{last.error} (on {last.aggregate_id or last.subject}, delivery "
                f"{last.delivery_count}, attempt {last.attempt})")

    def _read_new(self) -> None:
        added = False
        for path in sorted(self.directory.glob("records-*.jsonl")):
            offset = self._offsets.get(path, 0)
            with open(path, "rb") as source:
                source.seek(offset)
                chunk = source.read()
            complete = chunk.rfind(b"\n") + 1   # a line still being written waits for next time
            for line in chunk[:complete].splitlines():
                try:
                    self._records.append(_parse(line))
                except (ValueError, TypeError) as exc:
                    # A line a killed process left cut short, joined by the next process
                    # given its pid: not a record.
                    log.warning("the testing kit skipped an unreadable record in %s: %s", path, exc)
                    continue
                added = True
            self._offsets[path] = offset + complete
        if added:
            self._records.sort(key=lambda r: (r.at_ns, r.pid))


def _parse(line: bytes) -> Record:
    fields = json.loads(line)
    fields["data"] = base64.b64decode(fields["data"])
    return Record(**fields)


def count_kinds(records: Iterable[Record]) -> dict[str, int]:
    """How many records of each kind."""
    counts = {STARTED: 0, HANDLED: 0, FAILED: 0}
    for record in records:
        counts[record.kind] = counts.get(record.kind, 0) + 1
    return counts
