"""Three actorbus instances in one elastic consumer group; one is killed mid-stream.

Each instance is ``actorbus run examples.scale_out:topology --member <name>``, a
process tree of its own (its own actor system), as it would be on its own host.
The stream ``LEDGER`` is split into 12 partitions by account id; the three
instances share them. main() publishes 6,000 envelopes over 150 accounts,
SIGKILLs one instance a third of the way through, lets the other two take its
partitions over, and prints who handled what, how long the failover took, and
whether any envelope was lost or handled out of order.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import nats

from actorbus import Envelope, EventBus, Message, Subscription, Topology

#: Where each handler process writes what it handled (set before the instances start).
RECORDS_ENV = "ACTORBUS_EXAMPLE_SCALE_OUT_DIR"
#: Each instance's member name, for its handlers to write down.
MEMBER_ENV = "ACTORBUS_EXAMPLE_MEMBER"
MEMBERS = ("north", "east", "west")
ENVELOPES, ACCOUNTS = 6000, 150
#: Envelopes a second: the whole run takes a few seconds, so the kill comes mid-stream.
RATE = 1500


def post(msg: Message) -> None:
    """Handle one ledger entry: here, note which instance saw which entry of which account."""
    with open(Path(os.environ[RECORDS_ENV]) / f"{os.getpid()}.txt", "a") as out:
        out.write(f"{msg.aggregate_id} {int(msg.data)} {os.environ[MEMBER_ENV]} {time.time():.3f}\n")


topology = Topology(
    subscriptions=(Subscription("ledger.*", post, durable="ledger", stream="LEDGER",
                                # A dead instance's partitions move within a few seconds.
                                options={"ack_wait": 5.0, "pin_timeout": 2.0, "pull_expires": 0.5}),),
    bus={"pool_size": 2, "group": "ledger", "partitions": 12, "heartbeat": 0.5},
)


def start_instance(member: str, url: str, pid_file: Path) -> subprocess.Popen:
    """``actorbus run`` as member ``member``; it writes its processes' pids to ``pid_file``."""
    return subprocess.Popen([sys.executable, "-m", "actorbus", "run", "examples.scale_out:topology",
                             "--servers", url, "--member", member, "--pid-file", str(pid_file)],
                            env={**os.environ, MEMBER_ENV: member},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_instance(process: subprocess.Popen, pid_file: Path) -> None:
    """SIGKILL every process of the instance at once (the CLI, the actor system's, each
    actor's), as when its host dies."""
    for pid in (int(p) for p in pid_file.read_text().split()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()


def handled(records: Path) -> list[tuple[str, int, str, float]]:
    """Every handling so far: (account, its entry number, the instance, when)."""
    rows = []
    for path in records.glob("*.txt"):
        for line in path.read_text().splitlines():
            account, number, member, at = line.split()
            rows.append((account, int(number), member, float(at)))
    return rows


def main(argv: list[str] | None = None) -> int:
    from examples._support import nats_url, parse_args, wait_until

    args = parse_args(__doc__.splitlines()[0], argv)
    with tempfile.TemporaryDirectory(prefix="actorbus-scale-out-") as records_dir, \
            nats_url(args.servers) as url:
        records = Path(records_dir)
        os.environ[RECORDS_ENV] = records_dir      # inherited by the instances
        pid_files = {member: records / f"{member}.pids" for member in MEMBERS}
        instances = {member: start_instance(member, url, pid_files[member]) for member in MEMBERS}
        try:
            wait_until(lambda: all(f.exists() for f in pid_files.values()), 60.0,
                       "the three instances to start")
            return run(url, records, instances, pid_files, wait_until)
        finally:
            for process in instances.values():    # the survivors drain on SIGTERM
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for member, process in instances.items():
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    kill_instance(process, pid_files[member])


def run(url: str, records: Path, instances: dict[str, subprocess.Popen],
        pid_files: dict[str, Path], wait_until) -> int:
    publisher = EventBus(servers=url, pool_size=0)
    try:
        # The instances create the stream; publishing starts once it is there.
        wait_until(lambda: _members(url) == len(MEMBERS), 60.0, "the three instances to join")
        # Each member rebalances once the others' heartbeats reach its watch: give it a heartbeat.
        time.sleep(topology.bus["heartbeat"])
        entries = [("ledger.{aggregate_id}", Envelope.create(f"acct-{n % ACCOUNTS}", "Posted",
                                                             str(n // ACCOUNTS).encode()))
                   for n in range(ENVELOPES)]
        done = threading.Event()
        threading.Thread(target=publish_paced, args=(publisher, entries, done), daemon=True).start()
        wait_until(lambda: len(handled(records)) >= ENVELOPES // 3, 60.0, "a third handled",
                   interval=0.01)
        victim = MEMBERS[0]
        killed_at = time.time()
        kill_instance(instances[victim], pid_files[victim])
        wait_until(done.is_set, 60.0, "publishing")
        wait_until(lambda: len({(a, n) for a, n, _, _ in handled(records)}) >= ENVELOPES, 90.0,
                   "every envelope handled")
    finally:
        publisher.stop()
    return report(handled(records), killed_at, victim)


def publish_paced(bus: EventBus, entries: list, done: threading.Event) -> None:
    """Publish at about RATE envelopes a second, as a steady flow of events would come."""
    started = time.monotonic()
    for start in range(0, len(entries), 100):
        bus.publish_many(entries[start:start + 100])
        time.sleep(max(0.0, started + (start + 100) / RATE - time.monotonic()))
    done.set()


def _members(url: str) -> int:
    """How many members the group's KV bucket lists now."""
    async def look() -> int:
        nc = await nats.connect(url)
        try:
            kv = await nc.jetstream().key_value("actorbus-group-ledger")
            return len([key for key in await kv.keys() if key.startswith("LEDGER.")])
        except (nats.js.errors.BucketNotFoundError, nats.js.errors.NoKeysError):
            return 0
        finally:
            await nc.close()
    return asyncio.run(look())


def report(rows: list[tuple[str, int, str, float]], killed_at: float, victim: str) -> int:
    rows.sort(key=lambda r: r[3])
    by_member: dict[str, int] = defaultdict(int)
    firsts: dict[str, list[int]] = defaultdict(list)
    seen: set[tuple[str, int]] = set()
    victims_accounts = {account for account, _, member, _ in rows if member == victim}
    taken_over = [at for account, _, member, at in rows
                  if account in victims_accounts and member != victim]
    for account, number, member, _ in rows:
        by_member[member] += 1
        if (account, number) not in seen:
            seen.add((account, number))
            firsts[account].append(number)
    lost = ENVELOPES - len(seen)
    out_of_order = sum(1 for numbers in firsts.values() if numbers != sorted(numbers))
    print(f"published {ENVELOPES} envelopes over {ACCOUNTS} accounts to 3 instances "
          f"({', '.join(MEMBERS)}); SIGKILLed {victim} after {ENVELOPES // 3} were handled")
    print("  handled per instance: " + ", ".join(f"{member} {by_member[member]}" for member in MEMBERS))
    print(f"  {victim}'s {len(victims_accounts)} accounts went on on the others "
          f"{min(taken_over) - killed_at:.1f}s after the kill" if taken_over else
          f"  {victim} had finished its accounts before the kill")
    print(f"  lost {lost}, accounts out of order {out_of_order}, handled twice "
          f"{len(rows) - len(seen)}")
    ok = lost == 0 and out_of_order == 0
    print("scale_out: OK" if ok else "scale_out: MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    # Through the package, so that post is examples.scale_out.post in the instances.
    from examples.scale_out import main as _main
    sys.exit(_main())
