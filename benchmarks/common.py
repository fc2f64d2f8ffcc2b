"""What every variant shares: the handler work, the records, RSS sampling."""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import msgpack
from actorbus.envelope import Envelope, decode_envelope
from actorbus.benchmarks.procfs import process_rss

#: Where handlers write their records. Set before an EventBus is built, so the
#: forked actor processes inherit it.
RECORD_DIR_ENV = "ACTORBUS_BENCH_DIR"
#: Microseconds of busy loop per message.
CPU_US_ENV = "ACTORBUS_BENCH_CPU_US"

#: Subject prefix and stream of the throughput run.
STREAM = "BENCH"
SUBJECT = "bench.events"
#: The stream of the ``--bridges`` rows: the aggregate id is the subject's last token, and the
#: stream partitions itself on it (as a bus with ``partitions=`` creates its streams).
PARTITIONED_STREAM = "BENCHP"
PARTITIONED_SUBJECT = "benchp.*"
BENCH_PARTITIONS = 8
#: Consumer fetch size of the plain loop and the FastStream pull subscriber.
FETCH_BATCH = 500



# ====================================================================== payloads
def make_envelope(key: str, seq: int, published_ns: int | None = None) -> bytes:
    """An encoded envelope for ``key`` whose payload is msgpack ``{"seq": seq[, "ts": ns]}``."""
    body = {"seq": seq} if published_ns is None else {"seq": seq, "ts": published_ns}
    return Envelope.create(key, "Bench", msgpack.packb(body)).encode()


# ====================================================================== handler work
class Recorder:
    """Appends ``<aggregate> <seq> <done_ns> [<published_ns>]`` lines to a per-process file.

    Written with one ``os.write`` per record (no buffering to lose when a
    process is killed); every variant pays the same.
    """

    def __init__(self) -> None:
        self._fd: int | None = None
        self._pid = 0
        self._cpu_us: float | None = None

    def _open(self) -> int:
        pid = os.getpid()
        if self._fd is None or self._pid != pid:
            directory = os.environ.get(RECORD_DIR_ENV)
            if not directory:
                raise RuntimeError(f"{RECORD_DIR_ENV} is not set: bench handlers run under `actorbus bench`")
            self._fd = os.open(Path(directory) / f"records-{pid}.txt",
                               os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._pid = pid
            self._cpu_us = float(os.environ.get(CPU_US_ENV, "0") or 0)
        return self._fd

    def handle(self, aggregate_id: str | None, payload: bytes) -> None:
        """The handler work once the envelope is decoded: record, then burn ``cpu_us``
        (every bench envelope has an aggregate id; ``Message`` types it optional)."""
        fd = self._open()
        body = msgpack.unpackb(payload)
        published = body.get("ts")
        now = time.monotonic_ns()
        line = f"{aggregate_id} {body['seq']} {now}" + (f" {published}\n" if published else "\n")
        os.write(fd, line.encode("ascii"))
        if self._cpu_us:
            busy_loop(self._cpu_us)


RECORDER = Recorder()


def busy_loop(microseconds: float) -> None:
    """Spin (no sleep) for ``microseconds``."""
    end = time.perf_counter() + microseconds / 1e6
    while time.perf_counter() < end:
        pass


def handle_raw(data: bytes) -> None:
    """The work of the single-process peers: decode the envelope, then :meth:`Recorder.handle`.

    (In actorbus a pool member decodes it; see :mod:`actorbus.benchmarks.actorbus_variant`.)
    """
    envelope = decode_envelope(data)
    RECORDER.handle(envelope.aggregate_id, envelope.payload)


# ====================================================================== records
def read_records(directory: Path) -> list[tuple[str, int, int, int | None]]:
    """``(aggregate, seq, done_ns, published_ns or None)`` of every record, by ``done_ns``."""
    rows = []
    for path in sorted(Path(directory).glob("records-*.txt")):
        with open(path, encoding="ascii") as handle:
            for line in handle:
                parts = line.split()
                if len(parts) < 3:
                    continue
                rows.append((parts[0], int(parts[1]), int(parts[2]),
                             int(parts[3]) if len(parts) > 3 else None))
    rows.sort(key=lambda row: row[2])
    return rows


def check_order(rows: Iterable[tuple[str, int, int, int | None]]) -> tuple[int, int, int]:
    """``(distinct, duplicates, order_violations)``: per key, seqs in first-seen order must increase."""
    last: dict[str, int] = {}
    seen: set[tuple[str, int]] = set()
    duplicates = violations = 0
    for aggregate, seq, _done, _published in rows:
        if (aggregate, seq) in seen:
            duplicates += 1
            continue
        seen.add((aggregate, seq))
        if aggregate in last and seq <= last[aggregate]:
            violations += 1
        last[aggregate] = max(seq, last.get(aggregate, -1))
    return len(seen), duplicates, violations


def latencies_ms(rows: Iterable[tuple[str, int, int, int | None]]) -> list[float]:
    """Publish-to-handler-done latency of each record that carries a publish time, in ms."""
    return sorted((done - published) / 1e6 for _a, _s, done, published in rows if published)


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) of sorted ``values``, nearest rank."""
    if not values:
        return None
    index = min(len(values) - 1, max(0, round(q * len(values) + 0.5) - 1))
    return values[index]


# ====================================================================== memory
class RssSampler:
    """Samples the summed RSS of ``pids()`` every ``interval`` seconds in a thread; keeps the peak."""

    def __init__(self, pids: Callable[[], Iterable[int]], interval: float = 0.1) -> None:
        self._pids = pids
        self._interval = interval
        self._stop = threading.Event()
        self.peak = 0
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def sample(self) -> None:
        try:
            pids = set(self._pids())
        except RuntimeError:  # the pid table changed while it was copied: next time
            return
        self.peak = max(self.peak, sum(process_rss(pid) for pid in pids))

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def __enter__(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    @property
    def peak_mb(self) -> float:
        return self.peak / (1024 * 1024)
