"""A secured NATS: every way of authenticating and of verifying TLS, against real
nats-servers configured for it; wrong credentials as one clear error; least
privilege; and no secret in any output or process command line."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import nats
import nkeys
import pytest
import trustme

from actorbus import BusError, ConfigurationError, Envelope, EventBus, NatsAuth
from actorbus.bridge.connection import _tls_alert, connect_options, describe_error
from actorbus.config import BusConfig
from actorbus.redaction import mask_url
from actorbus.groups import STATIC_BUCKET
from actorbus.ports import free_port
from actorbus.processes import process_alive
from actorbus.server import NatsServer
import actorbus.bus
from tests.support import bus_factory, stream_info, wait_for, wait_for_stats

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
ACTORBUS = str(Path(sys.executable).parent / "actorbus")
SECRET = "s3cr3t-Pa55word-9f1c"      # alice's password: must never show
TOKEN = "t0ken-7d2e-never-shown"
LEAST_PASSWORD = "least-pw-4b7a"


def least_privilege(stream: str, durable: str, subject: str) -> tuple[list[str], list[str]]:
    """What README lists: (publish, subscribe) permissions for one subscription."""
    publish = [f"$JS.API.STREAM.INFO.{stream}", f"$JS.API.STREAM.CREATE.{stream}",
               f"$JS.API.STREAM.INFO.{stream}_DLQ", f"$JS.API.STREAM.CREATE.{stream}_DLQ",
               f"$JS.API.CONSUMER.INFO.{stream}.{durable}",
               f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{durable}",
               f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}", f"$JS.API.STREAM.MSG.GET.{stream}",
               f"$JS.API.CONSUMER.UNPIN.{stream}.{durable}",
               f"$JS.ACK.{stream}.{durable}.>", f"deadletter.{stream}", subject]
    return publish, ["_INBOX.>"]


def group_member_privilege(stream: str, group: str, consumers: list[str], subject: str,
                           static: bool) -> tuple[list[str], list[str]]:
    """What README lists for a member of a consumer group reading ``consumers`` (its group's
    durables: ``<group>-<member>`` or ``<group>-p<i>``)."""
    publish, subscribe = least_privilege(stream, consumers[0], subject)
    per_consumer = [p for p in publish if p.endswith(f".{consumers[0]}") or f".{consumers[0]}." in p]
    publish = [p for p in publish if p not in per_consumer]
    for consumer in consumers:
        publish += [p.replace(f".{consumers[0]}", f".{consumer}") for p in per_consumer]
    if static:
        bucket = f"KV_{STATIC_BUCKET}"
        publish += [f"$JS.API.STREAM.INFO.{bucket}", f"$JS.API.STREAM.CREATE.{bucket}",
                    f"$JS.API.STREAM.MSG.GET.{bucket}", f"$KV.{STATIC_BUCKET}.{stream}.{group}"]
    else:
        bucket = f"KV_actorbus-group-{group}"
        publish += [f"$JS.API.STREAM.INFO.{bucket}", f"$JS.API.STREAM.CREATE.{bucket}",
                    f"$JS.API.CONSUMER.CREATE.{bucket}", f"$JS.API.CONSUMER.INFO.{bucket}.*",
                    f"$JS.FC.{bucket}.>", f"$KV.actorbus-group-{group}.{stream}.*"]
    return publish, subscribe


def _quoted(items: list[str]) -> str:
    return ", ".join(f'"{item}"' for item in items)


# ---------------------------------------------------------------- servers and keys
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, the server's certificate for 127.0.0.1, a client certificate, and a CA that
    signed neither; as files."""
    directory = tmp_path_factory.mktemp("pki")
    ca, other_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    client = ca.issue_cert("actorbus-client@example.com")
    files = {"ca": directory / "ca.pem", "other_ca": directory / "other-ca.pem",
             "server": directory / "server.pem", "server_key": directory / "server.key",
             "client": directory / "client.pem", "client_key": directory / "client.key"}
    ca.cert_pem.write_to_path(files["ca"])
    other_ca.cert_pem.write_to_path(files["other_ca"])
    server.cert_chain_pems[0].write_to_path(files["server"])
    server.private_key_pem.write_to_path(files["server_key"])
    client.cert_chain_pems[0].write_to_path(files["client"])
    client.private_key_pem.write_to_path(files["client_key"])
    return {name: str(path) for name, path in files.items()}


@pytest.fixture(scope="module")
def nkey_seed(tmp_path_factory):
    """A throw-away NKey user: (seed file, public key)."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    path = tmp_path_factory.mktemp("nkey") / "user.nk"
    path.write_bytes(seed + b"\n")
    path.chmod(0o600)
    return str(path), nkeys.from_seed(seed).public_key.decode()


def _server(tmp_path_factory, name: str, config: str) -> NatsServer:
    directory = tmp_path_factory.mktemp(name)
    (directory / "server.conf").write_text(config)
    return NatsServer(store_dir=directory / "store", config=directory / "server.conf").start()


@pytest.fixture(scope="module")
def users_server(tmp_path_factory, nkey_seed):
    """Users with passwords (alice: everything; least: exactly the bus's permissions;
    lacking: those less consumer creation) and an NKey user."""
    publish, subscribe = least_privilege("LEAST", "least", "least.>")
    lacking = [p for p in publish if ".CONSUMER.DURABLE.CREATE." not in p]
    server = _server(tmp_path_factory, "users", f"""
authorization {{
  users = [
    {{ user: alice, password: "{SECRET}" }}
    {{ user: least, password: "{LEAST_PASSWORD}",
       permissions: {{ publish: {{ allow: [{_quoted(publish)}] }},
                       subscribe: {{ allow: [{_quoted(subscribe)}] }} }} }}
    {{ user: lacking, password: "{LEAST_PASSWORD}",
       permissions: {{ publish: {{ allow: [{_quoted(lacking)}] }},
                       subscribe: {{ allow: [{_quoted(subscribe)}] }} }} }}
    {{ nkey: {nkey_seed[1]} }}
  ]
}}
""")
    yield server
    server.close()


#: The consumer groups of the group tests: 4 partitions over members a and b.
GROUP_PARTITIONS = 4


@pytest.fixture(scope="module")
def group_server(tmp_path_factory):
    """Users with exactly a group member's permissions: ``elastic`` for group ``billing``,
    ``static`` for group ``invoices`` (members a and b), both on stream ``GROUPS``."""
    elastic, subscribe = group_member_privilege(
        "GROUPS", "billing", [f"billing-p{p}" for p in range(GROUP_PARTITIONS)], "billing.*",
        static=False)
    static, _ = group_member_privilege("INVOICES", "invoices", ["invoices-a", "invoices-b"],
                                       "invoices.*", static=True)
    server = _server(tmp_path_factory, "groups", f"""
authorization {{
  users = [
    {{ user: elastic, password: "{LEAST_PASSWORD}",
       permissions: {{ publish: {{ allow: [{_quoted(elastic)}] }},
                       subscribe: {{ allow: [{_quoted(subscribe)}] }} }} }}
    {{ user: static, password: "{LEAST_PASSWORD}",
       permissions: {{ publish: {{ allow: [{_quoted(static)}] }},
                       subscribe: {{ allow: [{_quoted(subscribe)}] }} }} }}
  ]
}}
""")
    yield server
    server.close()


@pytest.fixture(scope="module")
def token_server(tmp_path_factory):
    server = _server(tmp_path_factory, "token", f'authorization {{ token: "{TOKEN}" }}\n')
    yield server
    server.close()


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, pki):
    """TLS only, and a client certificate signed by the CA required (verify: true)."""
    server = _server(tmp_path_factory, "tls", f"""
tls {{
  cert_file: "{pki['server']}"
  key_file: "{pki['server_key']}"
  ca_file: "{pki['ca']}"
  verify: true
  timeout: 2
}}
""")
    yield server
    server.close()


def admin_url(server: NatsServer) -> str:
    return f"nats://alice:{SECRET}@127.0.0.1:{server.port}"


@pytest.fixture
def built(records, log_file):
    """Buses built by the test, each stopped in teardown with its processes gone."""
    with bus_factory(log_file, pool_size=1) as build:
        yield build


def consume_hundred(bus: EventBus, name: str) -> None:
    bus.subscribe(f"{name}.>", "tests.handlers:record", durable=name, stream=name.upper())
    results = bus.publish_many([(f"{name}.{n % 7}", Envelope.create(f"k{n % 7}", "T", b"%d" % n))
                                for n in range(100)])
    assert all(r.ok for r in results)
    stats = wait_for_stats(bus, "acked", 100, timeout=60)
    assert stats["processed"] == 100 and stats["failed"] == 0


# ---------------------------------------------------------------- each mode works
@pytest.mark.parametrize("mode", ["user_password", "password_in_url", "token", "nkey", "mtls"])
def test_each_way_of_authenticating_consumes_and_acks(mode, built, users_server, token_server,
                                                      tls_server, pki, nkey_seed):
    url = {"token": token_server.url, "mtls": tls_server.url}.get(mode, users_server.url)
    settings = {
        "user_password": {"user": "alice", "password": SECRET},
        "password_in_url": {},
        "token": {"token": TOKEN},
        "nkey": {"nkey_seed": nkey_seed[0]},
        "mtls": {"tls_ca": pki["ca"], "tls_cert": pki["client"], "tls_key": pki["client_key"]},
    }[mode]
    if mode == "password_in_url":
        url = admin_url(users_server)
    bus = built(servers=url, **settings)
    consume_hundred(bus, f"auth_{mode}".replace("_", ""))


# ---------------------------------------------------------------- wrong credentials
@pytest.fixture
def runtimes(monkeypatch):
    """Every actor runtime an EventBus makes, even one whose constructor raises."""
    made = []
    real = actorbus.bus.make_runtime

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]
    monkeypatch.setattr(actorbus.bus, "make_runtime", spy)
    return made


WRONG = {
    "bad_password": ("users", {"user": "alice", "password": "wrong-Pa55-Xq"}, "authorization violation"),
    "bad_token": ("token", {"token": "wrong-t0ken-Xq"}, "authorization violation"),
    "wrong_ca": ("tls", {"tls_ca": "other_ca", "tls_cert": "client", "tls_key": "client_key"},
                 "certificate verify failed"),
    "no_client_cert": ("tls", {"tls_ca": "ca"}, "certificate required"),
}


@pytest.mark.parametrize("case", sorted(WRONG))
def test_wrong_credentials_fail_fast_with_one_clear_error(case, runtimes, records, users_server,
                                                          token_server, tls_server, pki):
    which, settings, reason = WRONG[case]
    server = {"users": users_server, "token": token_server, "tls": tls_server}[which]
    settings = {k: pki.get(v, v) if k.startswith("tls") else v for k, v in settings.items()}
    started = time.monotonic()
    with pytest.raises(BusError) as caught:
        EventBus(servers=server.url, pool_size=1, connect_timeout=1.0, **settings)
    took = time.monotonic() - started
    message = str(caught.value)
    assert f"cannot connect to NATS at {server.url}: " in message, message
    if reason:
        assert reason in message, message
    assert "tried for" in message and "\n" not in message
    for value in settings.values():
        if "wrong" in value:
            assert value not in message
    assert took < 1.0 + 4.0, took      # connect_timeout, plus starting and stopping the actors
    assert runtimes
    wait_for(lambda: not [pid for runtime in runtimes for pid in runtime.pids()], timeout=10,
             what="no actor process left")


def test_a_missing_client_certificate_is_named_even_when_the_connect_saw_only_a_reset(tls_server, pki):
    # TLS 1.3 checks the client's certificate after the handshake, so nats-py's first
    # write may meet a broken pipe instead of the alert; the probe reads the alert itself.
    def config(**tls):
        return BusConfig(servers=tls_server.url, auth=NatsAuth(tls_ca=pki["ca"], **tls))
    alert = _tls_alert(config())
    assert alert is not None and "certificate required" in describe_error(alert)
    assert _tls_alert(config(tls_cert=pki["client"], tls_key=pki["client_key"])) is None


def test_cli_with_a_wrong_password_prints_one_line_and_leaves_nothing(users_server, records):
    marker = uuid.uuid4().hex
    wrong = "wr0ng-cli-Pa55"
    result = subprocess.run(
        [ACTORBUS, "run", "tests.handlers:quick_topology", "--servers", users_server.url,
         "--user", "alice", "--password", wrong],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={**os.environ, "ACTORBUS_TEST_MARKER": marker})
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "authorization violation" in lines[0], result.stderr
    assert f"cannot connect to NATS at {users_server.url}" in lines[0]
    assert wrong not in result.stdout + result.stderr
    assert wait_for(lambda: not marked(marker), timeout=10, what="no process of the CLI left")


# ---------------------------------------------------------------- least privilege
def test_a_user_with_only_the_listed_permissions_consumes_naks_and_dead_letters(built, users_server):
    bus = built(servers=users_server.url, user="least", password=LEAST_PASSWORD)
    bus.subscribe("least.>", "tests.handlers:fail_first_two_deliveries", durable="least",
                  stream="LEAST", retries=0, nak_delay=0.05, nak_delay_max=0.1)
    results = bus.publish_many([(f"least.{n}", Envelope.create(f"k{n}", "T", b"x")) for n in range(5)]
                               + [("least.bad", b"not an envelope")])
    assert all(r.ok for r in results)
    stats = wait_for(lambda: (lambda s: s if s["acked"] >= 5 and s["dead_lettered"] >= 1 else None)(
        bus.stats()), timeout=60, what="acks and a dead letter")
    assert stats["naked"] >= 10 and stats["settle_errors"] == 0
    assert stream_info(admin_url(users_server), "LEAST_DLQ").state.messages == 1


def test_the_listed_permissions_cover_recovering_an_unacked_gap(built, users_server):
    bus = built(servers=users_server.url, user="least", password=LEAST_PASSWORD)
    bus.subscribe("least.>", "tests.handlers:record", durable="least", stream="LEAST")
    bus.stop()

    async def leave_a_gap() -> None:
        # Another client takes three messages from the durable and never acks them.
        nc = await nats.connect(admin_url(users_server))
        try:
            js = nc.jetstream()
            for n in range(3):
                await js.publish(f"least.gap{n}", Envelope.create(f"gap-{n}", "T", b"x").encode())
            # The durable has a priority group: take its pin from whichever bus had it last,
            # and pull as a member of the group (nats-py cannot yet).
            await nc.request("$JS.API.CONSUMER.UNPIN.LEAST.least",
                             json.dumps({"group": "actorbus"}).encode(), timeout=5)
            got: asyncio.Queue = asyncio.Queue()
            inbox = nc.new_inbox()
            await nc.subscribe(inbox, cb=got.put)
            await nc.publish("$JS.API.CONSUMER.MSG.NEXT.LEAST.least", json.dumps(
                {"batch": 3, "expires": 5_000_000_000, "group": "actorbus"}).encode(), reply=inbox)
            for _ in range(3):
                assert (await asyncio.wait_for(got.get(), 5)).subject.startswith("least.gap")
            # Gone without acking, as a crashed bus would be; its pin released at once.
            await nc.request("$JS.API.CONSUMER.UNPIN.LEAST.least",
                             json.dumps({"group": "actorbus"}).encode(), timeout=5)
        finally:
            await nc.close()

    asyncio.run(leave_a_gap())
    bus = built(servers=users_server.url, user="least", password=LEAST_PASSWORD)
    bus.subscribe("least.>", "tests.handlers:record", durable="least", stream="LEAST")
    bus.publish("least.after", Envelope.create("after", "T", b"x").encode())  # pins this bus
    assert wait_for_stats(bus, "processed", 4)["recovered"] == 3


@pytest.mark.parametrize("kind", ["elastic", "static"])
def test_group_members_with_only_the_listed_permissions_share_the_work_and_hand_it_over(
        kind, built, group_server, log_file):
    name = "billing" if kind == "elastic" else "invoices"
    members = None if kind == "elastic" else ["a", "b"]
    buses = {member: built(servers=group_server.url, user=kind, password=LEAST_PASSWORD,
                           group=name, partitions=GROUP_PARTITIONS, member=member,
                           members=members, heartbeat=0.5)
             for member in ("a", "b")}
    for bus in buses.values():
        bus.subscribe(f"{name}.*", "tests.handlers:record", durable=name,
                      stream="GROUPS" if kind == "elastic" else "INVOICES")
    wait_for(lambda: all(b.stats()["partitions_owned"] == GROUP_PARTITIONS // 2
                         for b in buses.values()), what="the partitions shared")
    results = buses["a"].publish_many([(f"{name}.{{aggregate_id}}",
                                        Envelope.create(f"k{n}", "T", b"%d" % n))
                                       for n in range(40)])
    assert all(r.ok for r in results)
    wait_for(lambda: sum(b.stats()["acked"] for b in buses.values()) == 40, what="all 40 acked")
    assert all(b.stats()["acked"] for b in buses.values())   # both took part
    if kind == "elastic":
        # 10,000 updates of a's key (a's heartbeats, as its user may write them): a watch's
        # server asks it for flow control after some 8,000 updates, and it replies.
        asyncio.run(_write_heartbeats(group_server.url, f"$KV.actorbus-group-{name}.GROUPS.a",
                                      10_000))
        wait_for(lambda: all(b.stats()["group_members"] == 2 for b in buses.values()),
                 what="both members still seeing both")

    buses["b"].stop()   # deletes its heartbeat (elastic), drains, unpins
    if kind == "elastic":
        wait_for(lambda: buses["a"].stats()["partitions_owned"] == GROUP_PARTITIONS,
                 what="a taking b's partitions")
    assert "permissions violation" not in log_file.read_text().lower()


async def _write_heartbeats(url: str, subject: str, count: int) -> None:
    """``count`` heartbeats, one stored before the next: each reaches the watches (a burst
    would replace most before they are read: the bucket keeps one update per key)."""
    nc = await nats.connect(url, user="elastic", password=LEAST_PASSWORD)
    try:
        js = nc.jetstream()
        for _ in range(count):
            await js.publish(subject, b"{}")
    finally:
        await nc.close()


def test_a_user_missing_a_permission_gets_a_clear_error(built, users_server):
    bus = built(servers=users_server.url, user="lacking", password=LEAST_PASSWORD)
    with pytest.raises(BusError, match=r"(?i)permissions violation for publish to "
                                       r"\"?\$JS\.API\.CONSUMER\.DURABLE\.CREATE\.LEAST\.least"):
        bus.subscribe("least.>", "tests.handlers:record", durable="least", stream="LEAST")


# ---------------------------------------------------------------- no secrets anywhere
def test_no_secret_in_logs_repr_stats_metrics_or_command_lines(tmp_path_factory, built, log_file):
    server = _server(tmp_path_factory, "restart",
                     f'authorization {{ user: alice, password: "{SECRET}" }}\n')
    try:
        metrics_port = free_port()
        bus = built(servers=admin_url(server), metrics_port=metrics_port)
        bus.subscribe("quiet.>", "tests.handlers:record", durable="quiet")
        bus.publish("quiet.a", Envelope.create("a", "T", b"1").encode())
        wait_for_stats(bus, "acked", 1)
        server.kill()                     # disconnect and reconnect lines in the log
        server.start()
        wait_for(lambda: "reconnected to NATS" in log_file.read_text(), timeout=30,
                 what="the reconnect to be logged")
        bus.publish("quiet.a", Envelope.create("a", "T", b"2").encode())
        stats = wait_for_stats(bus, "acked", 2)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
        shown = [repr(bus.config), str(bus.config), repr(stats), log_file.read_text(),
                 metrics.decode()]
        shown += [command_line(pid) for pid in bus.runtime.pids() + [os.getpid()]]
        assert len(bus.runtime.pids()) >= 4
        assert "alice:***@" in repr(bus.config)
        assert not [text for text in shown if SECRET in text]
    finally:
        server.close()


def test_cli_moves_secrets_out_of_every_command_line(users_server, records, tmp_path):
    marker = uuid.uuid4().hex
    out_path = tmp_path / "out.txt"
    with open(out_path, "w") as out:
        process = subprocess.Popen(
            [ACTORBUS, "run", "tests.handlers:topology", "--servers", admin_url(users_server),
             "--drain-timeout", "1"], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "ACTORBUS_TEST_MARKER": marker})
    try:
        wait_for(lambda: "running tests.handlers:topology" in out_path.read_text(), timeout=60,
                 what="the topology to start")
        pids = marked(marker)
        assert process.pid in pids and len(pids) >= 5, pids   # the CLI, admin, logger, actors
        lines = {pid: command_line(pid) for pid in pids}
        assert not [line for line in lines.values() if SECRET in line], lines
        assert "tests.handlers:topology" in lines[process.pid]
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            for pid in marked(marker):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.wait()
    assert SECRET not in out_path.read_text()
    assert wait_for(lambda: not marked(marker), timeout=20, what="every process to exit")


# ---------------------------------------------------------------- values and wiring
def test_settings_are_checked_and_masked(tmp_path, pki):
    with pytest.raises(ConfigurationError, match="user/password and token"):
        NatsAuth(user="a", password="b", token="c")
    with pytest.raises(ConfigurationError, match="password is missing"):
        NatsAuth(user="a")
    with pytest.raises(ConfigurationError, match="tls_key is missing"):
        NatsAuth(tls_cert=pki["client"])
    with pytest.raises(ConfigurationError, match="creds .* is not a readable file"):
        NatsAuth(creds=str(tmp_path / "missing.creds"))
    with pytest.raises(ConfigurationError, match="servers must name at least one"):
        BusConfig(servers="")
    with pytest.raises(ConfigurationError, match="scheme 'foo'"):
        BusConfig(servers="foo://127.0.0.1:4222")
    with pytest.raises(ConfigurationError, match=r"nats://alice:\*\*\*@h:1:x"):
        BusConfig(servers=f"nats://alice:{SECRET}@h:1:x")
    assert repr(NatsAuth(user="alice", password=SECRET)) == "NatsAuth(user='alice', password='***')"
    assert SECRET not in repr(BusConfig(servers=f"nats://alice:{SECRET}@h:1"))
    assert mask_url(f"nats://alice:{SECRET}@h:1") == "nats://alice:***@h:1"
    assert mask_url(f"nats://{TOKEN}@h:1") == "nats://***@h:1"
    assert mask_url("nats://h:1") == "nats://h:1"


def test_environment_variables_of_the_nats_cli(pki):
    env = {"NATS_USER": "alice", "NATS_PASSWORD": SECRET, "NATS_CA": pki["ca"]}
    assert NatsAuth.from_env(env) == NatsAuth(user="alice", password=SECRET, tls_ca=pki["ca"])
    assert NatsAuth.from_env({"NATS_USER": TOKEN}) == NatsAuth(token=TOKEN)
    # An identity given replaces the environment's; TLS files override one by one.
    assert NatsAuth.from_env(env, token=TOKEN) == NatsAuth(token=TOKEN, tls_ca=pki["ca"])


def test_creds_file_is_passed_to_nats_py_as_it_is(tmp_path, pki):
    # A JWT creds file needs an operator-mode server (operator, account and user JWTs):
    # this checks the wiring only.
    creds = tmp_path / "user.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\nx\n------END NATS USER JWT------\n")
    config = BusConfig(servers="nats://127.0.0.1:4222",
                       auth=NatsAuth(creds=str(creds), tls_ca=pki["ca"]))
    options = connect_options(config, name="t", reconnect_forever=False)
    assert options["user_credentials"] == str(creds)
    assert options["tls"].verify_mode.name == "CERT_REQUIRED"
    assert "user" not in options and "token" not in options


# ---------------------------------------------------------------- helpers
def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def marked(marker: str) -> list[int]:
    """Live processes whose environment carries ``marker`` (forked ones inherit it)."""
    needle = f"ACTORBUS_TEST_MARKER={marker}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if needle in Path(f"/proc/{entry}/environ").read_bytes() and process_alive(int(entry)):
                    found.append(int(entry))
            except OSError:
                continue
    return found
