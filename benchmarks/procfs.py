"""Per-process readings from Linux ``/proc`` for the benchmark, the soak and the memory test."""
from __future__ import annotations

import os

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_rss(pid: int) -> int:
    """Resident memory of ``pid`` in bytes (Linux ``/proc``); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


def process_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) ``pid`` has used, in seconds (Linux ``/proc``); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    except (OSError, IndexError, ValueError):
        return 0.0


def open_fds(pid: int) -> int:
    """Open file descriptors of ``pid`` (Linux ``/proc``); 0 once it is gone."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def mapped_rss(pid: int, path: str | os.PathLike[str]) -> int:
    """Resident bytes of ``pid``'s mappings of the file ``path`` (``/proc/<pid>/smaps``);
    0 when it maps none of it or is gone."""
    target = os.fsdecode(path)
    total = 0
    inside = False
    try:
        with open(f"/proc/{pid}/smaps", encoding="utf-8", errors="replace") as smaps:
            for line in smaps:
                head = line.split(None, 1)[0] if line.strip() else ""
                if not head.endswith(":"):          # a mapping's first line: address range ...
                    inside = line.rstrip("\n").endswith(" " + target)
                elif inside and head == "Rss:":
                    total += int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return 0
    return total


def process_start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat``): with the pid,
    it names one process even if the pid is used again later; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return int(stat.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None
