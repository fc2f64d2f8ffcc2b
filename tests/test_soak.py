"""`actorbus soak`, short: a bus under a steady publisher with a pool member, the Bridge and
nats-server killed every few seconds; its report, and its ledger's arithmetic."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from actorbus.benchmarks.soak_ledger import KEYS_ENV, LEDGER_ENV, Ledger, LedgerReader, create_ledger
from actorbus.processes import process_alive

ACTORBUS = str(Path(sys.executable).parent / "actorbus")
REPORT_KEYS = {"pass", "mode", "config", "publish_s", "drain_s", "published", "handled", "handlings",
               "lost", "lost_examples", "order_violations", "violation_examples", "gaps_before_lost",
               "duplicates", "handled_beyond_published", "publish_retries", "publisher_reconnects",
               "publish_rate", "faults", "longest_stall_s", "longest_stall_at_s",
               "longest_stall_after", "stalls", "longest_wait_s", "longest_wait_envelope", "rss", "processes", "launch", "bus_stats",
               "problems", "events", "timeline", "diagnosis", "work_dir"}


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_a_short_soak_with_faults_loses_nothing_and_keeps_order(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    done = subprocess.run([ACTORBUS, "soak", "--duration", "20", "--rate", "300", "--keys", "50",
                           "--pool", "2", "--member-kill-every", "3", "--bridge-kill-every", "7",
                           "--server-restart-every", "11", "--warmup", "5", "--drain-timeout", "40",
                           "--json", str(out)],
                          check=False, capture_output=True, text=True, timeout=80,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    report = json.loads(out.read_text())
    assert set(report) == REPORT_KEYS, set(report) ^ REPORT_KEYS
    assert report["pass"] and not report["problems"], report["problems"]
    assert report["lost"] == 0 and report["order_violations"] == 0, report
    assert report["published"] == report["handled"] >= 300 * 20 * 0.7, report
    assert report["handlings"] == report["handled"] + report["duplicates"]
    assert report["faults"]["member_kill"] >= 5 and report["faults"]["bridge_kill"] == 2 \
        and report["faults"]["server_restart"] == 1, report["faults"]
    assert report["longest_stall_s"] >= 0 and report["rss"]["pass"] is True
    assert report["longest_wait_s"] >= report["longest_stall_s"] - 0.2, report

    rows = {row["process"]: row for row in report["processes"]}
    for name in ("host", "supervisor", "bridge", "router", "member-0", "member-1",
                 "thespian-admin", "thespian-logger"):
        row = rows[name]
        assert row["judged"] and row["rss_flat"], row
        for reading in (row["start"], row["end"]):
            assert reading["pid"] > 0 and reading["rss_mb"] > 0 and reading["fds"] > 0, row
    # The Bridge was killed twice: the one at the end is not the one at the start.
    assert rows["bridge"]["replaced"] and not rows["nats-server"]["judged"]
    assert "soak: PASS" in done.stdout and "longest stall" in done.stdout

    # Every process it started is gone (by pid).
    pids = {reading["pid"] for row in report["processes"] for reading in (row["start"], row["end"])
            if reading} | {event["pid"] for event in report["events"] if event["pid"]}
    assert not [pid for pid in pids if process_alive(pid)]
    assert report["work_dir"] is None    # passed: its folder removed


def test_the_ledger_counts_handlings_duplicates_violations_and_losses(tmp_path: Path,
                                                                     monkeypatch) -> None:
    path = tmp_path / "ledger.bin"
    keys = 2
    create_ledger(path, 10)
    monkeypatch.setenv(LEDGER_ENV, str(path))
    monkeypatch.setenv(KEYS_ENV, str(keys))
    ledger = Ledger()
    # Key k0 holds 0, 2, 4, 6; key k1 holds 1, 3, 5, 7. 4 comes before 2 (a violation),
    # 3 twice (a duplicate), 5 never (lost), so 7 comes after a gap.
    for n in (0, 1, 4, 3, 2, 3, 6, 7):
        ledger.record(n)
    reader = LedgerReader(path, keys)
    assert reader.distinct(8) == 7
    tally = reader.tally(8)
    reader.close()
    assert (tally.distinct, tally.handlings, tally.duplicates, tally.lost) == (7, 8, 1, 1)
    assert tally.lost_examples == [5]
    assert [n for n, _at, _pid in tally.violations] == [4]
    assert [n for n, _at, pid in tally.gaps] == [7] and tally.gaps[0][2] == os.getpid()
