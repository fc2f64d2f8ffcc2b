"""The examples run end to end, each as ``python -m examples.<name> --servers URL``."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.integration


def run_example(name: str, url: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", f"examples.{name}", "--servers", url],
                            cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (f"examples.{name} exited {result.returncode}\n"
                                    f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def test_orders(nats_server):
    out = run_example("orders", nats_server.url).stdout
    assert "orders: OK" in out
    assert "acked 73, failed 0" in out
    assert "shipped   14 orders" in out


def test_fanout(nats_server):
    out = run_example("fanout", nats_server.url).stdout
    assert "fanout: OK" in out
    assert out.count("messages") >= 4


def test_supervision_tree(nats_server):
    out = run_example("supervision_tree", nats_server.url).stdout
    assert "supervision_tree: OK" in out
    assert "orders: restarts_pool=1" in out
    assert "metrics: restarts_pool=3" in out


def test_embedding(nats_server):
    out = run_example("embedding", nats_server.url).stdout
    assert "embedding: OK" in out
    assert "processed 25, acked 25" in out
    assert "0 left" in out


def test_scale_out(nats_server):
    out = run_example("scale_out", nats_server.url, timeout=120).stdout
    assert "scale_out: OK" in out, out
    assert "lost 0, accounts out of order 0" in out
    assert "went on on the others" in out, out   # the killed instance had accounts left
