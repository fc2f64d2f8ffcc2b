"""Processes by pid: alive or not, the tree below one, and an end to them.

The bus starts every actor process itself and ends only those, by pid;
nothing here matches processes by name. Linux ``/proc`` is read.
"""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, exited but not yet reaped, does not count)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` in the process tree (Linux ``/proc``)."""
    found: list[int] = []
    stack = [pid]
    while stack:
        parent = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as children:
                    kids = [int(c) for c in children.read().split()]
            except OSError:
                continue
            found.extend(kids)
            stack.extend(kids)
    return found


def wait_for_exit(pids: list[int], timeout: float) -> list[int]:
    """Those of ``pids`` still running after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    alive = [pid for pid in pids if process_alive(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [pid for pid in alive if process_alive(pid)]
    return alive


def sigkill(pids: Iterable[int]) -> list[int]:
    """SIGKILL each of ``pids`` (not this process); return those signalled, leaving out
    any already gone or not ours to signal."""
    signalled = []
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue
        signalled.append(pid)
    return signalled
