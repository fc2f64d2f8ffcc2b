"""The soak's record of what was handled: a byte per published envelope, shared by every process.

Envelope ``n`` (the publisher's running number) belongs to key ``k<n % keys>``
and is that key's envelope number ``n // keys``. The handler adds one to byte
``n`` (up to 255) of a file that every handler process maps shared: the write
is in the page cache at once, so it survives the SIGKILL of its process and
every process sees it, whichever pool member, Bridge incarnation or group
member handles the key next. A first handling of ``n`` while byte ``n - keys``
(the key's previous envelope) is still 0 is appended to the process's anomaly
file: an order violation if that predecessor is handled later, the gap before
a lost envelope if never.

Ten million envelopes take 10 MB of file and no memory that grows in the
handlers; the counts come from the file at the end. Two processes handling
the same envelope at the same instant (a contract breach in itself) can lose
one of their increments, so a duplicate could go uncounted, never a handling.
"""
from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

#: The ledger file and the number of keys, for the handlers (set before the bus forks).
LEDGER_ENV = "ACTORBUS_SOAK_LEDGER"
KEYS_ENV = "ACTORBUS_SOAK_KEYS"
#: Anomaly files sit beside the ledger: ``anomalies-<pid>.txt``, a line ``n at_ns pid`` each.
ANOMALIES_GLOB = "anomalies-*.txt"
#: Examples of lost envelopes and of violations the tally keeps.
EXAMPLES = 20


def key_of(n: int, keys: int) -> str:
    """The aggregate id of envelope ``n``."""
    return f"k{n % keys}"


def create_ledger(path: Path, capacity: int) -> None:
    """A ledger of ``capacity`` zero bytes (sparse: pages exist once written)."""
    with open(path, "wb") as out:
        out.truncate(max(capacity, 1))


class Ledger:
    """The handler's side: :meth:`record` one handling of envelope ``n``."""

    def __init__(self) -> None:
        self._pid = 0
        self._map: mmap.mmap | None = None
        self._anomalies = -1
        self._keys = 1

    def _open(self) -> mmap.mmap:
        pid = os.getpid()
        if self._map is None or self._pid != pid:   # a forked process maps it afresh
            path = os.environ.get(LEDGER_ENV)
            if not path:
                raise RuntimeError(f"{LEDGER_ENV} is not set: soak handlers run under `actorbus soak`")
            fd = os.open(path, os.O_RDWR)
            try:
                self._map = mmap.mmap(fd, 0)   # MAP_SHARED
            finally:
                os.close(fd)
            self._anomalies = os.open(Path(path).with_name(f"anomalies-{pid}.txt"),
                                      os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._keys = int(os.environ.get(KEYS_ENV, "1"))
            self._pid = pid
        return self._map

    def record(self, n: int) -> None:
        """One handling of envelope ``n``."""
        ledger = self._open()
        count = ledger[n]
        if count < 255:
            ledger[n] = count + 1
        if count == 0 and n >= self._keys and ledger[n - self._keys] == 0:
            os.write(self._anomalies, f"{n} {time.monotonic_ns()} {self._pid}\n".encode("ascii"))


LEDGER = Ledger()


@dataclass
class Tally:
    """What the ledger says about envelopes ``0 .. published - 1``."""

    published: int
    distinct: int = 0
    handlings: int = 0
    #: Handled envelopes past ``published`` (stored, but not yet confirmed to the publisher).
    beyond: int = 0
    lost_examples: list[int] = field(default_factory=list)
    #: ``(n, at_ns, pid)`` of each first handling before its key's previous envelope.
    violations: list[tuple[int, int, int]] = field(default_factory=list)
    #: The same where the previous envelope was never handled (it is counted as lost).
    gaps: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return self.published - self.distinct

    @property
    def duplicates(self) -> int:
        return self.handlings - self.distinct


class LedgerReader:
    """The orchestrator's side: progress while it runs, the tally at the end."""

    def __init__(self, path: Path, keys: int) -> None:
        self.path = Path(path)
        self.keys = keys
        with open(self.path, "rb") as source:
            self._map = mmap.mmap(source.fileno(), 0, access=mmap.ACCESS_READ)
        #: Every envelope below it has been handled.
        self._floor = 0

    @property
    def floor(self) -> int:
        """The first envelope not yet handled, as of the last :meth:`distinct`."""
        return self._floor

    def distinct(self, published: int) -> int:
        """Envelopes of ``0 .. published - 1`` handled at least once."""
        published = min(published, len(self._map))
        first_zero = self._map.find(b"\0", self._floor, published)
        self._floor = published if first_zero < 0 else first_zero
        return published - self._map[self._floor:published].count(0)

    def tally(self, published: int) -> Tally:
        """Counts, lost examples and order violations, from the ledger and the anomaly files."""
        published = min(published, len(self._map))
        region = self._map[:published]
        found = Tally(published, distinct=published - region.count(0), handlings=sum(region))
        found.beyond = len(self._map) - published - self._map[published:].count(0)
        at = region.find(b"\0")
        while at >= 0 and len(found.lost_examples) < EXAMPLES:
            found.lost_examples.append(at)
            at = region.find(b"\0", at + 1)
        for anomaly in sorted(self.anomalies(), key=lambda a: a[1]):
            n = anomaly[0]
            handled_before = n - self.keys < len(self._map) and self._map[n - self.keys] != 0
            (found.violations if handled_before else found.gaps).append(anomaly)
        return found

    def anomalies(self) -> list[tuple[int, int, int]]:
        """Every ``(n, at_ns, pid)`` the handlers wrote."""
        rows = []
        for path in self.path.parent.glob(ANOMALIES_GLOB):
            for line in path.read_text(encoding="ascii", errors="replace").splitlines():
                parts = line.split()
                if len(parts) == 3 and all(p.isdigit() for p in parts):   # not a line cut short
                    rows.append((int(parts[0]), int(parts[1]), int(parts[2])))
        return rows

    def close(self) -> None:
        self._map.close()
