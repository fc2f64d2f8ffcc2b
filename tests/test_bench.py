"""`actorbus bench --quick` end to end: a real nats-server, every variant, the JSON rows."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ACTORBUS = Path(sys.executable).parent / "actorbus"


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_bench_quick_writes_rows_in_order(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run([str(ACTORBUS), "bench", "--quick", "--json", str(out)],
                          check=False, capture_output=True, text=True, timeout=110,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    rows = {row["variant"]: row for row in json.loads(out.read_text())}
    for variant in ("plain", "actorbus pool=2"):
        assert variant in rows, f"no {variant!r} row in {sorted(rows)}"
        assert rows[variant]["msgs_per_s"] > 0, rows[variant]
        assert rows[variant]["order_violations"] == 0, rows[variant]
    for row in rows.values():
        assert set(row) == {"variant", "msgs_per_s", "ratio_to_plain", "p50_ms", "p99_ms",
                            "peak_rss_mb", "order_violations", "notes"}


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
