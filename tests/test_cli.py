"""The ``actorbus`` command: a short demo run, and SIGTERM draining it."""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest

from actorbus import Envelope
from actorbus.processes import process_alive
from tests.support import (consumer_info, ended_afterwards, process_tree, read_records,
                           stop_with_sigterm, wait_for, wait_until_gone)

pytestmark = pytest.mark.integration

ACTORBUS = str(Path(sys.executable).parent / "actorbus")


def test_small_demo_passes_its_own_checks():
    result = subprocess.run([ACTORBUS, "demo", "--envelopes", "600", "--aggregates", "30",
                             "--keyless", "100", "--pool-size", "3"],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo OK" in result.stdout and "order per aggregate" in result.stdout


def test_sigterm_drains_and_leaves_nothing_running(tmp_path):
    out = open(tmp_path / "out.txt", "w")
    process = subprocess.Popen([ACTORBUS, "demo", "--envelopes", "200000", "--aggregates", "100",
                                "--keyless", "0", "--pool-size", "2"],
                               stdout=out, stderr=subprocess.STDOUT)
    with ended_afterwards(process), out:
        wait_for(lambda: "actors up" in (tmp_path / "out.txt").read_text(), timeout=60,
                 what="the demo's actors")
        time.sleep(0.5)  # let it publish for a moment
        code, tree = stop_with_sigterm(process)
        assert len(tree) >= 5, tree  # nats-server, Thespian's admin and logger, the actors
        assert code == 130  # drained, then stopped
    text = (tmp_path / "out.txt").read_text()
    assert "interrupted: draining" in text and text.rstrip().endswith("interrupted: stopped")
    wait_until_gone(tree, "every process of the demo to exit")


def test_ctrl_c_on_the_demo_drains_then_stops_its_server_last(tmp_path):
    out_path = tmp_path / "out.txt"
    with open(out_path, "w") as out:
        # Its own session, like a terminal's foreground job: Ctrl-C goes to its whole group.
        process = subprocess.Popen([ACTORBUS, "demo", "--envelopes", "200000", "--aggregates",
                                    "100", "--keyless", "0", "--pool-size", "2"],
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    with ended_afterwards(process):
        wait_for(lambda: "actors up" in out_path.read_text(), timeout=60, what="the demo's actors")
        server = int(re.search(r"nats-server pid (\d+)", out_path.read_text()).group(1))
        # The server is not in the terminal's group: the Ctrl-C is the demo's to handle.
        assert os.getpgid(server) != os.getpgid(process.pid)
        tree = process_tree(process) | {server}
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(60) == 130
    text = out_path.read_text()
    assert "Traceback" not in text and "stopping now" not in text
    assert "interrupted: draining" in text and text.rstrip().endswith("interrupted: stopped")
    assert not process_alive(server)
    wait_until_gone(tree, "every process of the demo to exit")


def test_a_second_signal_during_the_drain_stops_at_once_and_still_shuts_down():
    from io import StringIO

    from rich.console import Console

    from actorbus.draining import drain_then_stop

    class SlowDrainBus:
        """A bus whose drain takes until it is interrupted; its 'actor' is a real child."""

        def __init__(self) -> None:
            self.actor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            self.pids = {"member-0": self.actor.pid}
            self.runtime = self
            self.shut_down = False

        def stop(self, timeout: float) -> None:
            os.kill(os.getpid(), signal.SIGTERM)   # the second signal, mid-drain
            wait_for(lambda: False, timeout=30, what="an interrupt")

        def shutdown(self, pids) -> None:
            self.shut_down = True
            self.actor.kill()
            self.actor.wait()

    bus = SlowDrainBus()
    output = StringIO()
    previous = signal.getsignal(signal.SIGTERM)
    try:
        drain_then_stop(bus, Console(file=output, width=200), timeout=10.0)
    finally:
        if bus.actor.poll() is None:
            bus.actor.kill()
            bus.actor.wait()
    assert bus.shut_down and not process_alive(bus.actor.pid)
    lines = [line for line in output.getvalue().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("stopping now")
    assert signal.getsignal(signal.SIGTERM) is previous


def test_the_demo_leaves_nothing_in_its_temp_folder(tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from actorbus.demo import run_demo; "
         "sys.exit(run_demo(pool_size=2, envelopes=60, aggregates=6, keyless=10))"],
        capture_output=True, text=True, timeout=240, env={**os.environ, "TMPDIR": str(temp)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo OK" in result.stdout
    assert list(temp.iterdir()) == []


def start_run(topology: str, url: str, out_path: Path, *options: str) -> subprocess.Popen:
    """``actorbus run tests.handlers:<topology>`` against ``url``, its output to ``out_path``."""
    with open(out_path, "w") as out:
        return subprocess.Popen([ACTORBUS, "run", f"tests.handlers:{topology}", "--servers", url,
                                 *options],
                                stdout=out, stderr=subprocess.STDOUT,
                                cwd=Path(__file__).parent.parent)


def test_run_serves_a_topology_and_drains_on_sigterm(tmp_path, nats_server, records):
    out_path = tmp_path / "out.txt"
    process = start_run("topology", nats_server.url, out_path)
    with ended_afterwards(process):
        wait_for(lambda: "running tests.handlers:topology" in out_path.read_text(), timeout=60,
                 what="the topology to start")
        publish_one(nats_server.url)
        wait_for(lambda: [r for r in read_records(records) if r.kind == "ok"], what="the handler")
        code, tree = stop_with_sigterm(process)
        assert code == 0
    text = out_path.read_text()
    assert "draining" in text and text.rstrip().endswith("stopped")
    assert consumer_info(nats_server.url, "ORDERS", "orders").num_ack_pending == 0
    wait_until_gone(tree, "every process of the topology to exit")


@pytest.mark.parametrize("who", ["the main process", "every process at once"])
def test_run_drains_once_whoever_gets_the_sigterm(tmp_path, nats_server, records, who):
    # systemd's default (KillMode=control-group) and pkill signal every process of the
    # service: the actor processes must leave the drain to the main one.
    out_path = tmp_path / "out.txt"
    process = start_run("slow_topology", nats_server.url, out_path)
    with ended_afterwards(process):
        wait_for(lambda: "running tests.handlers:slow_topology" in out_path.read_text(),
                 timeout=60, what="the topology to start")
        publish_many(nats_server.url, 3000)
        wait_for(lambda: len(read_records(records)) >= 200, what="handling under way")
        tree = process_tree(process)
        assert len(tree) >= 4, tree   # Thespian's admin and logger, the actors
        targets = {process.pid} | (tree if who == "every process at once" else set())
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        code = process.wait(60)
    text = out_path.read_text()
    assert code == 0, text
    assert text.count("draining") == 1 and text.rstrip().endswith("stopped"), text
    assert "Traceback" not in text and "Aborted" not in text and "KeyboardInterrupt" not in text
    wait_until_gone(tree, "every process of the topology to exit")
    # Every message acked was handled; what was in flight was settled by the drain.
    handled = {int(r.data) for r in read_records(records) if r.kind == "ok"}
    info = consumer_info(nats_server.url, "ORDERS", "orders")
    assert info.num_ack_pending == 0
    assert info.ack_floor.stream_seq >= 200
    assert set(range(info.ack_floor.stream_seq)) <= handled


def test_a_second_sigterm_cuts_the_drain_short_and_still_leaves_nothing_behind(
        tmp_path, nats_server, records):
    out_path, pid_file = tmp_path / "out.txt", tmp_path / "run.pids"
    process = start_run("slow_topology", nats_server.url, out_path, "--pid-file", str(pid_file),
                        "--drain-timeout", "60")
    with ended_afterwards(process):
        wait_for(pid_file.exists, timeout=60, what="the topology to start")
        publish_many(nats_server.url, 3000)
        wait_for(lambda: len(read_records(records)) >= 200, what="handling under way")
        tree = process_tree(process)
        process.send_signal(signal.SIGTERM)
        wait_for(lambda: "draining" in out_path.read_text(), what="the drain to begin")
        process.send_signal(signal.SIGTERM)   # long before the 60 s drain could end
        code = process.wait(60)
    text = out_path.read_text()
    assert code == 1, text
    assert "stopping now" in text and text.rstrip().endswith("stopped without finishing the drain")
    assert "Traceback" not in text and "Aborted" not in text, text
    assert not pid_file.exists()
    wait_until_gone(tree, "every process of the topology to exit")
    # Nothing acked that was not handled; the rest is JetStream's to redeliver.
    handled = {int(r.data) for r in read_records(records) if r.kind == "ok"}
    info = consumer_info(nats_server.url, "ORDERS", "orders")
    assert set(range(info.ack_floor.stream_seq)) <= handled
    assert len(handled) < 3000   # the drain was cut short indeed


def test_run_refuses_what_is_not_a_topology():
    result = subprocess.run([ACTORBUS, "run", "tests.handlers:record"], capture_output=True,
                            text=True, timeout=60, cwd=Path(__file__).parent.parent)
    assert result.returncode == 1
    assert "tests.handlers:record is a function, not an actorbus Topology" in result.stderr
    assert "Traceback" not in result.stderr


def publish_one(url: str) -> None:
    async def main() -> None:
        nc = await nats.connect(url)
        await nc.jetstream().publish("orders.a", Envelope.create("a", "T", b"0").encode())
        await nc.close()
    asyncio.run(main())


def publish_many(url: str, count: int) -> None:
    """``count`` envelopes over ten keys, their payloads numbered from 0 in stream order."""
    async def main() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        for n in range(count):
            await js.publish(f"orders.k{n % 10}", Envelope.create(f"k{n % 10}", "T",
                                                                  str(n).encode()).encode())
        await nc.close()
    asyncio.run(main())
