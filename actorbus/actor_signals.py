"""Actor processes leave shutdown to the bus: SIGINT and SIGTERM are ignored in them.

The program that started the bus leads its shutdown: it drains (stop
fetching, let what is in flight finish, settle it), then stops the actors
with messages. A SIGTERM sent to every process of the program at once
(systemd's default ``KillMode=control-group``, ``pkill``) would otherwise
cut that drain short in every other process: Thespian ends an actor on
SIGTERM, and its admin and logger keep whatever handler the program had
when it forked them (``actorbus run`` turns SIGTERM into
``KeyboardInterrupt``, so they died with tracebacks).

So a process forked while an actor system starts (Thespian's admin), and
every process forked from those (its logger, the actors), ignores both
signals; an actor ignores them again once Thespian has set its own
handlers (:func:`ignore_in_actor_process`). SIGKILL still ends them, and
the bus ends what outlives its stop by pid.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

_starting = False           # in the program: an actor system is being started now
_in_actor_process = False   # forked for an actor system (inherited by what it forks)
_hooked = False


def _ignore() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def _after_fork_in_child() -> None:
    global _in_actor_process
    if _starting or _in_actor_process:
        _in_actor_process = True
        if threading.current_thread() is threading.main_thread():
            _ignore()


@contextlib.contextmanager
def starting_actor_system() -> Iterator[None]:
    """Processes forked inside the block (and all they fork) ignore SIGINT and SIGTERM."""
    global _starting, _hooked
    if not _hooked:
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _hooked = True
    _starting = True
    try:
        yield
    finally:
        _starting = False


def ignore_in_actor_process() -> None:
    """In an actor process (see the module), ignore SIGINT and SIGTERM again: Thespian
    sets its own handlers when it starts an actor. Elsewhere (an actor run in the
    program itself, on ``simpleSystemBase``), do nothing."""
    if _in_actor_process and threading.current_thread() is threading.main_thread():
        _ignore()
