"""`actorbus bench --quick` end to end: a real nats-server, every variant, the JSON rows
of both tables (throughput, and latency at paced rates)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from actorbus.benchmarks import report
from actorbus.benchmarks.run import parse_rates

ACTORBUS = Path(sys.executable).parent / "actorbus"


@pytest.mark.integration
@pytest.mark.timeout(150)
def test_bench_quick_writes_rows_in_order(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run([str(ACTORBUS), "bench", "--quick", "--rates", "200,half",
                           "--json", str(out)],
                          check=False, capture_output=True, text=True, timeout=140,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    rows = json.loads(out.read_text())
    throughput = {row["variant"]: row for row in rows if row["table"] == "throughput"}
    latency = {(row["variant"], row["rate_spec"]): row for row in rows if row["table"] == "latency"}
    assert len(throughput) + len(latency) == len(rows), rows
    for variant in ("plain", "actorbus pool=2"):
        assert variant in throughput, f"no {variant!r} row in {sorted(throughput)}"
        assert throughput[variant]["msgs_per_s"] > 0, throughput[variant]
        assert throughput[variant]["order_violations"] == 0, throughput[variant]
        for spec in ("200", "half"):
            row = latency.get((variant, spec))
            assert row is not None, f"no latency row for {variant!r} at {spec}: {sorted(latency)}"
            assert row["messages"] > 0 and row["order_violations"] == 0, row
            assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"] <= row["max_ms"], row
        assert latency[(variant, "200")]["rate"] == 200
        # half: half of the variant's own peak
        assert abs(latency[(variant, "half")]["rate"] - throughput[variant]["msgs_per_s"] / 2) <= 1
    # --bridges 1,2,4 (the default): a partitioned stream read by one Bridge, then two, then four.
    for bridges in (1, 2, 4):
        row = throughput.get(f"actorbus pool=2 bridges={bridges}")
        assert row is not None, sorted(throughput)
        assert row["msgs_per_s"] > 0 and row["order_violations"] == 0, row
        assert "MISSING" not in row["notes"], row
    assert "bridge-1" in throughput["actorbus pool=2 bridges=2"]["notes"]
    assert "bridge-1" not in throughput["actorbus pool=2 bridges=1"]["notes"]
    assert not [key for key in latency if "bridges=" in key[0]]
    for row in throughput.values():
        assert tuple(row) == report.KEYS
    for row in latency.values():
        assert tuple(row) == report.LATENCY_KEYS
    assert "latency, publish → handler" in done.stdout


def test_rates_are_numbers_or_half() -> None:
    assert parse_rates("200, 2000,HALF") == ["200", "2000", "half"]
    assert parse_rates("") == []
    for bad in ("fast", "-5", "0", "2k"):
        with pytest.raises(ValueError):
            parse_rates(bad)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_bench_instances_runs_each_count_in_one_group_without_loss(tmp_path: Path) -> None:
    out = tmp_path / "instances.json"
    done = subprocess.run([str(ACTORBUS), "bench", "--instances", "1,2", "--quick", "--json", str(out)],
                          check=False, capture_output=True, text=True, timeout=110,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    rows = json.loads(out.read_text())
    assert [row["instances"] for row in rows] == [1, 2]
    for row in rows:
        assert row["distinct"] == row["messages"] == 3000 and row["order_violations"] == 0, row
        assert sum(row["acked_per_instance"]) >= row["messages"], row
        assert len(row["cpu_s_per_instance"]) == row["instances"], row
    # Two instances share the work: each acked some of it.
    assert all(acked > 0 for acked in rows[1]["acked_per_instance"]), rows[1]
    assert rows[0]["ratio_to_one"] == 1.0
