"""The actor system under the bus: Thespian's multiprocTCPBase, or one thread.

``processes`` runs every actor in its own process (real parallelism; the
only base with ``ThespianWatch``). ``simple`` runs them all on one
thread of this process: Thespian's simpleSystemBase only runs while
someone calls into it, so a pump thread owns it and every call goes
through that thread.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from typing import Any, TypeAlias
from collections.abc import Callable, Iterable

from thespian.actors import ActorSystem

from actorbus.actor_signals import starting_actor_system
from actorbus.ports import free_port
from actorbus.processes import descendants, process_alive, sigkill, wait_for_exit
from actorbus.transport_auth import sign_transport
from actorbus.transport_binding import hold_transport_host, resolve_transport_host

log = logging.getLogger("actorbus.runtime")



class ProcessRuntime:
    """A multiprocTCPBase actor system on its own admin port, listening on
    ``transport_host`` (loopback unless asked otherwise: see
    :mod:`actorbus.transport_binding`), every frame signed with a key only its
    own processes hold (:mod:`actorbus.transport_auth`)."""

    def __init__(self, admin_port: int | None = None, log_config: dict[str, Any] | None = None,
                 transport_host: str | None = None) -> None:
        self.admin_port = admin_port or free_port()
        self.transport_host = resolve_transport_host(transport_host)
        # Before the system starts: its admin, logger and actors are forked
        # from this process (and from each other) and inherit the binding and the key.
        sign_transport()
        self._release_transport = hold_transport_host(self.transport_host)
        before = set(descendants(os.getpid()))
        try:
            # Fork, Thespian's default, said out loud: the binding reaches the
            # actor processes by inheritance, a spawned process would not have it.
            with starting_actor_system():
                self._system = ActorSystem("multiprocTCPBase",
                                           {"Admin Port": self.admin_port,
                                            "Process Startup Method": "fork"},
                                           logDefs=log_config, transientUnique=True)
        except BaseException:
            self._release_transport()
            raise
        # Thespian starts its admin from a child of this process that begins a
        # session of its own (so the group id is that child's pid) and forks
        # again; the admin, its logger and every actor stay in that process
        # group, which lets shutdown end them all even once they are no
        # longer our descendants.
        self._roots = [pid for pid in descendants(os.getpid()) if pid not in before]
        self._groups = {pid for pid in self._roots if _session_of(pid) == pid}

    def pids(self) -> list[int]:
        """Every live process of this actor system: Thespian's admin and logger and
        every actor (Linux ``/proc``); not this process."""
        found = {pid for root in self._roots for pid in (root, *descendants(root))}
        if self._groups:
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    try:
                        if os.getpgid(int(entry)) in self._groups:
                            found.add(int(entry))
                    except OSError:
                        continue  # gone meanwhile
        found.discard(os.getpid())
        return sorted(pid for pid in found if process_alive(pid))

    @property
    def system(self) -> ActorSystem:
        """The Thespian ActorSystem itself."""
        return self._system

    def create(self, actor_class: type) -> Any:
        """Create a top-level actor."""
        return self._system.createActor(actor_class)

    def ask(self, address: Any, message: Any, timeout: float) -> Any:
        """Send ``message`` and wait up to ``timeout`` for the next reply."""
        return self._system.ask(address, message, timeout)

    def listen(self, timeout: float) -> Any:
        """Wait up to ``timeout`` for a reply to an earlier request."""
        return self._system.listen(timeout)

    def shutdown(self, pids: Iterable[int] = (), timeout: float | None = None) -> None:
        """Shut the actor system down, then SIGKILL any of its processes (and of
        ``pids``) still alive.

        With ``timeout``, return within about that many seconds: an actor
        stuck in user code keeps Thespian's shutdown waiting for it (about
        13 s), so past the timeout every process of the system is ended by
        pid instead.
        """
        # Collected first: once their parents exit, orphans no longer show as descendants.
        processes = set(pids) | set(self._roots) | set(self.pids())
        for root in self._roots:
            processes.update(descendants(root))
        try:
            if timeout is None:
                self._system.shutdown()
            else:
                self._shutdown_within(timeout, processes)
        finally:
            kill_leftovers(sorted(processes), grace=0.5 if timeout is not None else 3.0)
            for group in self._groups:
                with contextlib.suppress(ProcessLookupError):   # empty: everything exited
                    os.killpg(group, signal.SIGKILL)
            multiprocessing.active_children()  # reap the admin
            self._release_transport()


    def _shutdown_within(self, timeout: float, processes: set[int]) -> None:
        started = time.monotonic()
        done = threading.Event()

        def shut_down() -> None:
            try:
                self._system.shutdown()
            except Exception as exc:   # the admin was ended under it: nothing left to do
                log.debug("actor system shutdown ended with %s: %s", type(exc).__name__, exc)
            finally:
                done.set()

        threading.Thread(target=shut_down, name="actorbus-shutdown", daemon=True).start()
        if done.wait(max(timeout - SHUTDOWN_KILL_MARGIN, 0.1)):
            return
        stuck = [pid for pid in sorted(processes) if pid != os.getpid() and process_alive(pid)]
        log.warning("the actor system did not shut down within %.1fs (a handler stuck in user "
                    "code?); ending its processes %s", time.monotonic() - started, stuck)
        sigkill(stuck)
        done.wait(SHUTDOWN_KILL_MARGIN / 2)


#: Of a bounded shutdown's time, what is kept for ending the processes by pid.
SHUTDOWN_KILL_MARGIN = 1.0


#: A call for the pump thread: what to run with the actor system, and where its result goes.
_Call: TypeAlias = tuple[Callable[[ActorSystem], Any], concurrent.futures.Future[Any]]


class SimpleRuntime:
    """A simpleSystemBase actor system, pumped by a thread of its own."""

    _PUMP_INTERVAL = 0.002

    def __init__(self) -> None:
        self._calls: queue.Queue[_Call] = queue.Queue()
        self._running = True
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._pump, args=(ready,),
                                        name="actorbus-simple-runtime", daemon=True)
        self._thread.start()
        ready.result(30)

    def pids(self) -> list[int]:
        """None: the actors run on a thread of this process."""
        return []

    def create(self, actor_class: type) -> Any:
        """Create a top-level actor."""
        return self._call(lambda system: system.createActor(actor_class))

    def ask(self, address: Any, message: Any, timeout: float) -> Any:
        """Send ``message`` and wait up to ``timeout`` for the next reply."""
        return self._call(lambda system: system.ask(address, message, timeout))

    def listen(self, timeout: float) -> Any:
        """Wait up to ``timeout`` for a reply to an earlier request."""
        return self._call(lambda system: system.listen(timeout))

    def shutdown(self, pids: Iterable[int] = (), timeout: float | None = None) -> None:
        """Shut the actor system down and stop the pump thread (``timeout`` is not used:
        the actors run on that thread)."""
        if not self._thread.is_alive():
            return

        def _shutdown(system: ActorSystem) -> None:
            self._running = False  # the pump stops after this call
            system.shutdown()

        try:
            self._call(_shutdown)
        finally:
            self._running = False
            self._thread.join(10)

    def _call(self, fn: Callable[[ActorSystem], Any]) -> Any:
        if not self._running:
            raise RuntimeError("the actor system is shut down")
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._calls.put((fn, future))
        return future.result()

    def _pump(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            # The actors log in this process, through the program's own logging
            # configuration: logDefs=False keeps Thespian from replacing it.
            system = ActorSystem("simpleSystemBase", logDefs=False, transientUnique=True)
        except Exception as exc:
            ready.set_exception(exc)
            return
        ready.set_result(None)
        while self._running:
            try:
                fn, future = self._calls.get(timeout=self._PUMP_INTERVAL)
            except queue.Empty:
                system.listen(self._PUMP_INTERVAL)  # run what is due: wakeups and their sends
                continue
            try:
                future.set_result(fn(system))
            except BaseException as exc:
                future.set_exception(exc)


def make_runtime(name: str, admin_port: int | None = None, log_config: dict[str, Any] | None = None,
                 transport_host: str | None = None) -> ProcessRuntime | SimpleRuntime:
    """The runtime called ``name``: ``"processes"`` or ``"simple"``."""
    if name == "processes":
        return ProcessRuntime(admin_port, log_config, transport_host)
    if name == "simple":
        if log_config is not None:
            log.warning("log_config is for the processes runtime; with runtime='simple' the "
                        "actors log through this program's own logging configuration")
        if transport_host is not None:
            log.warning("transport_host is for the processes runtime; with runtime='simple' "
                        "nothing listens")
        return SimpleRuntime()
    raise ValueError(f"unknown runtime {name!r}: use 'processes' or 'simple'")


def kill_leftovers(pids: Iterable[int], grace: float = 3.0) -> list[int]:
    """Give each of ``pids`` ``grace`` seconds to exit, then SIGKILL the rest and wait
    for them to die; return those killed."""
    others = [pid for pid in pids if pid != os.getpid()]
    # Thespian's shutdown can return while actor processes are still exiting.
    alive = wait_for_exit(others, grace)
    killed = sigkill(alive)
    if killed:
        log.warning("actor processes %s outlived the actor system; killed", killed)
        still = wait_for_exit(killed, 5.0)
        if still:
            log.error("actor processes %s survived SIGKILL", still)
    return killed


def _session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None
