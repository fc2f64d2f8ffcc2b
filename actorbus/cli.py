"""The ``actorbus`` command line."""
from __future__ import annotations

import contextlib
import datetime
import os
import signal
import sys
import time
from types import FrameType
from typing import Any, NoReturn, TypeVar
from collections.abc import Callable, Iterator

import click
from click.core import ParameterSource
from rich.console import Console

#: The CLI's NATS settings, by EventBus keyword; the identity ones replace each other.
_IDENTITY = ("user", "password", "token", "nkey_seed", "creds")
_TLS = ("tls_ca", "tls_cert", "tls_key")
#: Options whose values are secrets (``--servers`` only when a URL has user info): given
#: on the command line, they move to these variables and the CLI runs itself again
#: without them, before anything is started. Not for users: set NATS_* instead.
_ARGV_SECRETS = {"password": ("--password", "_ACTORBUS_ARGV_PASSWORD"),
                 "token": ("--token", "_ACTORBUS_ARGV_TOKEN"),
                 "servers": ("--servers", "_ACTORBUS_ARGV_SERVERS")}

_Command = TypeVar("_Command", bound=Callable[..., Any])


def nats_options(command: _Command) -> _Command:
    """The NATS connection options shared by ``run`` and ``demo``."""
    options = [
        click.option("--servers", default=None, envvar=_ARGV_SECRETS["servers"][1],
                     show_envvar=False,
                     help="NATS URL(s), comma-separated (run: overrides the topology's, which "
                          "overrides $NATS_URL; demo: instead of an embedded server)."),
        click.option("--user", default=None, help="NATS user name (with --password) [env NATS_USER]."),
        click.option("--password", default=None, envvar=_ARGV_SECRETS["password"][1],
                     show_envvar=False, help="NATS password [env NATS_PASSWORD]."),
        click.option("--token", default=None, envvar=_ARGV_SECRETS["token"][1], show_envvar=False,
                     help="NATS token [env NATS_USER without NATS_PASSWORD]."),
        click.option("--nkey-seed", default=None, metavar="FILE",
                     help="NKey seed file [env NATS_NKEY]."),
        click.option("--creds", default=None, metavar="FILE",
                     help="JWT user credentials file [env NATS_CREDS]."),
        click.option("--tls-ca", default=None, metavar="FILE",
                     help="CA certificate(s) that verify the server [env NATS_CA]."),
        click.option("--tls-cert", default=None, metavar="FILE",
                     help="Client certificate, for mutual TLS (with --tls-key) [env NATS_CERT]."),
        click.option("--tls-key", default=None, metavar="FILE",
                     help="Client certificate's key [env NATS_KEY]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def hide_argv_secrets(ctx: click.Context, values: dict[str, str | None]) -> None:
    """If a secret came on the command line, run this command again with it in the
    environment instead; otherwise drop the hand-over variables and return.

    Every process of the bus is forked from this one and shows its command
    line in ``/proc/<pid>/cmdline``, readable by any local user; the
    environment (``/proc/<pid>/environ``) is readable by this user only.
    """
    from actorbus.redaction import url_secrets

    moved: dict[str, str] = {}      # flag -> its value
    for name, (flag, _) in _ARGV_SECRETS.items():
        value = values.get(name)
        if value is None or ctx.get_parameter_source(name) is not ParameterSource.COMMANDLINE:
            continue
        if name == "servers" and not url_secrets(value.split(",")):
            continue
        moved[flag] = value
    # Read already (or never set): not handed on to child processes.
    for _, variable in _ARGV_SECRETS.values():
        os.environ.pop(variable, None)
    # Only a real command line is rewritten: a programmatic call (click's test
    # runner, say) put nothing in this process's argv.
    if not moved or not any(arg.split("=", 1)[0] in moved for arg in sys.orig_argv[1:]):
        return
    for flag, value in moved.items():
        os.environ[next(var for f, var in _ARGV_SECRETS.values() if f == flag)] = value
    argv = _without_options(list(sys.orig_argv[1:]), set(moved))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.orig_argv[0], *argv])


def _without_options(argv: list[str], flags: set[str]) -> list[str]:
    """``argv`` without ``--flag value`` and ``--flag=value`` for each of ``flags``."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--":
            kept.append(arg)
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in flags:
            skip = "=" not in arg
            continue
        kept.append(arg)
    return kept


def nats_settings(ctx: click.Context, values: dict[str, str | None]) -> dict[str, str | None]:
    """EventBus keyword arguments for the NATS options given (the environment fills the
    rest): an identity given replaces the topology's, so its other fields go as None."""
    given = {name: values[name] for name in _IDENTITY + _TLS if values.get(name) is not None}
    if any(name in given for name in _IDENTITY):
        given = {**dict.fromkeys(_IDENTITY), **given}
    return given


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C, so the bus drains and stops on either.

    SIGINT is set to raise ``KeyboardInterrupt`` too, whatever was inherited:
    a program started in the background by a non-interactive shell inherits
    SIGINT ignored, and Python then leaves it ignored (Ctrl-C sent to its
    process group would do nothing).
    """
    def interrupt(signum: int, frame: FrameType | None) -> NoReturn:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, interrupt),
                signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run(work: Callable[[], int], debug: bool) -> None:
    """Run a command's work: SIGTERM and Ctrl-C abort cleanly, errors are one line."""
    try:
        with sigterm_as_interrupt():
            code = work()
    except KeyboardInterrupt:
        raise click.Abort() from None
    except click.ClickException:
        raise
    except Exception as exc:
        if debug:
            raise
        raise click.ClickException(f"{type(exc).__name__}: {exc} (run with --debug for details)") from exc
    sys.exit(code)


@click.group()
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="actorbus")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """actorbus: NATS JetStream events processed on a supervised pool of Thespian actors.

    Every message goes through one actor pool; the events of one aggregate
    are handled in order by one actor while different aggregates run in
    parallel; a message is acked only after its handler finished; failed
    envelopes are redelivered, failed plain messages are not.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


@main.command()
@click.option("--pool-size", type=click.IntRange(min=0), default=8, show_default=True,
              help="Aggregate actors (processes) in the pool.")
@click.option("--envelopes", type=click.IntRange(min=0), default=20000, show_default=True,
              help="Envelopes (domain events) to publish.")
@click.option("--aggregates", type=click.IntRange(min=1), default=500, show_default=True,
              help="Aggregates the envelopes are spread over, round-robin.")
@click.option("--keyless", type=click.IntRange(min=0), default=5000, show_default=True,
              help="Plain messages without an aggregate id to publish.")
@click.option("--metrics-port", type=click.IntRange(min=1, max=65535), default=None,
              help="Serve Prometheus metrics on this port while the demo runs.")
@click.option("--metrics-host", default="127.0.0.1", show_default=True,
              help="Address the metrics endpoint listens on.")
@click.option("--keep-files", is_flag=True,
              help="Keep the demo's temporary folder (records and log) instead of removing it.")
@nats_options
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def demo(ctx: click.Context, /, pool_size: int, envelopes: int, aggregates: int, keyless: int,
         metrics_port: int | None, metrics_host: str, keep_files: bool, debug: bool,
         servers: str | None, **nats: str | None) -> None:
    """Run an embedded nats-server and a process pool, inject failures, check the results.

    With --servers the demo uses that NATS instead of its own, with the
    credentials and TLS options given (or the nats CLI's environment variables).
    Exits 0 when every envelope was handled in order per aggregate and
    every plain message was handled once, 1 otherwise.
    """
    hide_argv_secrets(ctx, {"servers": servers, **nats})
    settings = nats_settings(ctx, nats)
    if settings and not servers:
        raise click.UsageError("credentials and TLS options are for a NATS given with --servers; "
                               "the embedded nats-server has neither")

    def work() -> int:
        from actorbus.demo import run_demo
        return run_demo(pool_size=pool_size, envelopes=envelopes, aggregates=aggregates,
                        keyless=keyless, console=Console(), metrics_port=metrics_port,
                        metrics_host=metrics_host, keep_files=keep_files, servers=servers,
                        nats=settings)

    _run(work, debug or bool(ctx.obj and ctx.obj.get("debug")))


@main.command()
@click.argument("topology")
@nats_options
@click.option("--metrics-port", type=click.IntRange(min=1, max=65535), default=None,
              help="Serve Prometheus metrics on this port.")
@click.option("--metrics-host", default=None,
              help="Address the metrics endpoint listens on [default: the topology's, else 127.0.0.1].")
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Seconds to let in-flight messages finish on SIGTERM or Ctrl-C.")
@click.option("--member", default=None, metavar="NAME",
              help="This instance's member name in the topology's consumer group (static: one "
                   "of its members; elastic: default <host>-<pid>).")
@click.option("--pid-file", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write the pids of every process of this instance (this one, the actor "
                   "system's, each actor's) to this file, space-separated; removed on exit.")
@click.option("--bridges", type=click.IntRange(min=1, max=64), default=None,
              help="Bridge processes sharing the partitioned subscriptions [default: the "
                   "topology's, else one per four cores when it has partitions].")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def run(ctx: click.Context, /, topology: str, servers: str | None, metrics_port: int | None,
        metrics_host: str | None, drain_timeout: float, member: str | None,
        pid_file: str | None, bridges: int | None, debug: bool, **nats: str | None) -> None:
    """Run TOPOLOGY (package.module:name, an actorbus Topology) until SIGTERM or
    Ctrl-C, then drain: stop fetching, let in-flight messages finish, stop.

    The NATS options override the topology's settings; those not given come
    from the nats CLI's environment variables.

    Example: actorbus run examples.orders:topology --servers nats://127.0.0.1:4222
    """
    hide_argv_secrets(ctx, {"servers": servers, **nats})

    def work() -> int:
        from actorbus.draining import drain_then_stop
        from actorbus.topology import load_topology

        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # like python -m: modules beside you import
        console = Console()
        loaded = load_topology(topology)
        overrides: dict[str, Any] = {name: value for name, value in (("metrics_port", metrics_port),
                                                      ("metrics_host", metrics_host),
                                                      ("member", member),
                                                      ("bridges", bridges))
                     if value is not None}
        overrides.update(nats_settings(ctx, nats))
        bus = loaded.start(servers, **overrides)
        if pid_file:
            pids = sorted({os.getpid(), *bus.pids.values(), *bus.runtime.pids()})
            with open(pid_file + ".tmp", "w") as out:
                out.write(" ".join(map(str, pids)) + "\n")
            os.replace(pid_file + ".tmp", pid_file)   # whole or not at all, for whoever polls it
        console.print(f"running {topology}: {len(loaded.subscriptions)} subscription(s), "
                      f"{len(bus.pids)} actor processes; SIGTERM or Ctrl-C drains and stops")
        try:
            with console.status("starting") as status:
                while True:
                    stats = bus.stats()
                    group = (f"  partitions {stats['partitions_owned']}  members "
                             f"{stats['group_members']}" if bus.config.group else "")
                    status.update(f"processed {stats['processed']}  failed {stats['failed']}  "
                                  f"in flight {stats['in_flight']}  restarts {stats['restarts']}"
                                  f"{group}")
                    time.sleep(1.0)
        except KeyboardInterrupt:
            console.print(f"draining (up to {drain_timeout:g} s); a second SIGTERM or Ctrl-C "
                          "stops at once")
        finally:
            try:
                drained = drain_then_stop(bus, console, drain_timeout)
            finally:
                if pid_file:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(pid_file)
        console.print("stopped" if drained else "stopped without finishing the drain")
        return 0 if drained else 1

    _run(work, debug or bool(ctx.obj and ctx.obj.get("debug")))


@main.command()
@click.option("--messages", type=click.IntRange(min=1), default=100000, show_default=True,
              help="Envelopes pre-published and consumed by each variant.")
@click.option("--keys", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Aggregate ids the envelopes are spread over, round-robin.")
@click.option("--cpu-us", type=click.FloatRange(min=0), default=0, show_default=True,
              help="Busy loop per message in the handler, in microseconds.")
@click.option("--pools", default="2,4,8", show_default=True,
              help="Comma-separated actorbus pool sizes, one row each.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True),
              help="Also write the rows as a JSON list to this file.")
@click.option("--rates", default="200,2000,half", show_default=True,
              help="Comma-separated publish rates (msg/s) of the latency runs; 'half' is half "
                   "of each variant's own peak throughput; '' for none.")
@click.option("--latency-seconds", type=click.FloatRange(min=0, min_open=True),
              help="Length of each latency phase  [default: 5, 1 with --quick]")
@click.option("--latency-keys", type=click.IntRange(min=1), default=50, show_default=True,
              help="Aggregate ids the paced publisher spreads its envelopes over.")
@click.option("--variants", "kinds", default="plain,faststream,actorbus", show_default=True,
              help="Comma-separated kinds of variant to run (plain, faststream, actorbus).")
@click.option("--quick", is_flag=True,
              help="A quick check: 3000 messages, pool 2 only, 1 s latency phases.")
@click.option("--instances", default=None, metavar="COUNTS",
              help="Instead: comma-separated counts of actorbus instances on this host, in one "
                   "elastic consumer group (pool: the first of --pools), one row each.")
@click.option("--bridges", "bridge_counts", default="1,2,4", show_default=True, metavar="COUNTS",
              help="Comma-separated Bridge counts, one actorbus row each (the largest pool) "
                   "on a stream partitioned 8 ways; '' for none.")
@click.option("--snapshots", "snapshot_rounds", type=click.IntRange(min=1), default=None,
              metavar="ROUNDS", help="Instead: durable aggregates' cost, throughput with a snapshot "
                                     "every 100 events against none, ROUNDS runs of each "
                                     "interleaved (the first of --pools).")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def bench(ctx: click.Context, messages: int, keys: int, cpu_us: float, pools: str,
          json_path: str | None, rates: str, latency_seconds: float | None, latency_keys: int,
          kinds: str, quick: bool, instances: str | None, bridge_counts: str,
          snapshot_rounds: int | None, debug: bool) -> None:
    """Throughput, latency, memory and per-key order: actorbus against a plain nats-py
    pull loop and a FastStream subscriber, on an embedded nats-server.

    Exits 0 when every variant that ran kept per-key order, 1 otherwise.
    """
    from actorbus.benchmarks import run

    try:
        sizes = [int(p) for p in pools.split(",") if p.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {pools!r}",
                                 param_hint="--pools") from None
    try:
        rate_specs = run.parse_rates(rates)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--rates") from None
    variant_kinds = [k.strip() for k in kinds.split(",") if k.strip()]
    unknown = sorted(set(variant_kinds) - set(run.KINDS))
    if unknown or not variant_kinds:
        raise click.BadParameter(f"expected some of {', '.join(run.KINDS)}, got {kinds!r}",
                                 param_hint="--variants")

    try:
        bridges = [int(k) for k in bridge_counts.split(",") if k.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {bridge_counts!r}",
                                 param_hint="--bridges") from None
    counts = None
    if instances is not None:
        try:
            counts = [int(c) for c in instances.split(",") if c.strip()]
        except ValueError:
            raise click.BadParameter(f"expected comma-separated integers, got {instances!r}",
                                     param_hint="--instances") from None

    def work() -> int:
        # Both tables are wider than 80 columns: not wrapped when the output is not a terminal.
        console = Console() if sys.stdout.isatty() else Console(width=140)
        if snapshot_rounds is not None:
            from actorbus.benchmarks.snapshots import run_snapshots
            return run_snapshots(messages=3000 if quick else messages, keys=keys, pool=sizes[0],
                                 rounds=snapshot_rounds, json_path=json_path, console=console)
        if counts is not None:
            from actorbus.benchmarks.instances import run_instances
            return run_instances(counts, messages=3000 if quick else messages, keys=keys,
                                 pool=sizes[0], json_path=json_path, console=console)
        return run.run_bench(messages=messages, keys=keys, cpu_us=cpu_us, pools=sizes,
                             json_path=json_path, quick=quick, console=console,
                             rates=rate_specs, latency_seconds=latency_seconds,
                             latency_keys=latency_keys, kinds=variant_kinds, bridges=bridges)

    _run(work, debug or bool(ctx.obj and ctx.obj.get("debug")))


def _seconds(help_text: str) -> dict[str, Any]:
    return {"type": click.FloatRange(min=0), "show_default": True, "metavar": "SECONDS",
            "help": help_text}


@main.command()
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="SECONDS",
              help="Seconds of publishing  [default: 600; with --messages: until they are published]")
@click.option("--messages", type=click.IntRange(min=1), default=None,
              help="Envelopes to publish (the run ends at this many, or at --duration).")
@click.option("--keys", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Aggregate ids the envelopes are spread over, round-robin.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=1500, show_default=True,
              help="Envelopes published a second.")
@click.option("--pool", type=click.IntRange(min=1), default=4, show_default=True,
              help="Pool members of each bus.")
@click.option("--work-ms", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Milliseconds each handling sleeps (work in flight when a member dies).")
@click.option("--group", is_flag=True,
              help="An elastic consumer group of --instances buses instead of one bus.")
@click.option("--instances", type=click.IntRange(min=1), default=3, show_default=True,
              help="Buses in the group (with --group).")
@click.option("--partitions", type=click.IntRange(min=1), default=12, show_default=True,
              help="Partitions of the group's stream (with --group).")
@click.option("--member-kill-every", default=30.0, **_seconds("SIGKILL a pool member this often; 0: never."))
@click.option("--bridge-kill-every", default=120.0, **_seconds("SIGKILL a Bridge this often; 0: never."))
@click.option("--server-restart-every", default=300.0,
              **_seconds("SIGKILL nats-server and start it again (same port, same store) this "
                         "often; 0: never."))
@click.option("--instance-restart-every", default=180.0,
              **_seconds("With --group: SIGKILL every process of a member and start a new "
                         "one this often; 0: never."))
@click.option("--server-downtime", default=1.0, **_seconds("Seconds nats-server stays down at a restart."))
@click.option("--warmup", default=60.0,
              **_seconds("Seconds of publishing before the start reading of RSS and FDs (at most a "
                       "quarter of --duration)."))
@click.option("--drain-timeout", default=120.0,
              **_seconds("Seconds to wait, once publishing stops, for everything to be handled."))
@click.option("--seed", type=int, default=1, show_default=True, help="Seeds the choice of victims.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True),
              help="Also write the report as JSON to this file.")
@click.option("--keep-files", is_flag=True,
              help="Keep the run's folder (logs, ledger) even when it passes.")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def soak(ctx: click.Context, duration: float | None, messages: int | None, keys: int, rate: float,
         pool: int, work_ms: float, group: bool, instances: int, partitions: int, member_kill_every: float,
         bridge_kill_every: float, server_restart_every: float, instance_restart_every: float,
         server_downtime: float, warmup: float, drain_timeout: float, seed: int,
         json_path: str | None, keep_files: bool, debug: bool) -> None:
    """A bus under a steady publisher for a long time, with faults: pool members, Bridges
    and nats-server killed at intervals (and, with --group, whole members of a consumer
    group); then a report of what was published, handled, lost, out of order and handled
    twice, each process's RSS and open FDs, the longest stall and the longest wait of
    an envelope.

    Exits 0 when nothing was lost, every key's first handlings were in order and the bus's
    RSS stayed within 10 % of its reading after the warm-up, 1 otherwise.

    Example: actorbus soak --messages 10000000 --keys 10000
    """
    from actorbus.benchmarks.soak import SoakConfig, run_soak

    config = SoakConfig(duration=duration if duration is not None or messages else 600.0,
                        messages=messages, keys=keys, rate=rate, pool=pool, work_ms=work_ms,
                        group=group,
                        instances=instances, partitions=partitions,
                        member_kill_every=member_kill_every, bridge_kill_every=bridge_kill_every,
                        server_restart_every=server_restart_every,
                        instance_restart_every=instance_restart_every,
                        server_downtime=server_downtime, warmup=warmup,
                        drain_timeout=drain_timeout, seed=seed)
    try:
        config.check()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None

    def work() -> int:
        console = Console() if sys.stdout.isatty() else Console(width=140)
        return run_soak(config, json_path=json_path, keep_files=keep_files, console=console)

    _run(work, debug or bool(ctx.obj and ctx.obj.get("debug")))


class BadInput(click.ClickException):
    """Bad input for a command (an unknown stream, a selection of nothing): one line, exit 2."""

    exit_code = 2


def _dlq_options(command: _Command) -> _Command:
    """The options every ``actorbus dlq`` command takes: which stream, the filters, NATS."""
    options = [
        click.option("--stream", default=None, metavar="STREAM_DLQ",
                     help="The dead-letter stream (e.g. ORDERS_DLQ)."),
        click.option("--subscription-stream", default=None, metavar="STREAM",
                     help="Instead: the subscription's stream; its dead-letter stream is STREAM_DLQ."),
        click.option("--subject", default=None,
                     help="Only dead letters whose original subject matches (NATS wildcards)."),
        click.option("--error", "error_text", default=None, metavar="TEXT",
                     help="Only dead letters whose error contains TEXT (case-insensitive)."),
        click.option("--since", default=None, metavar="TIME",
                     help="Only those stored since TIME: ISO 8601, or a duration ago (10m, 2h, 1d)."),
        click.option("--until", default=None, metavar="TIME",
                     help="Only those stored until TIME: ISO 8601, or a duration ago."),
        click.option("--from-seq", type=click.IntRange(min=1), default=None,
                     help="Only dead-letter stream sequences from this one."),
        click.option("--to-seq", type=click.IntRange(min=1), default=None,
                     help="Only dead-letter stream sequences up to this one."),
    ]
    command = nats_options(command)
    for option in reversed(options):
        command = option(command)
    return click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")(command)


def _on_dlq(ctx: click.Context, values: dict[str, Any],
            work: Callable[[Any, Any], Any]) -> Any:
    """Connect, open the dead-letter stream the options name, select what the filters
    pick and run ``work(stream, letters)`` on the stream's connection; bad input is
    a :class:`BadInput`."""
    from actorbus import dlq

    nats = {name: values.pop(name) for name in (*_IDENTITY, *_TLS) if name in values}
    servers = values.pop("servers")
    hide_argv_secrets(ctx, {"servers": servers, **nats})
    try:
        name = dlq.dead_letter_stream_name(values["stream"], values["subscription_stream"])
        since = None if values["since"] is None else dlq.parse_time(values["since"])
        until = None if values["until"] is None else dlq.parse_time(values["until"])
        selection = dlq.Selection(subject=values["subject"], error=values["error_text"], since=since,
                                  until=until, from_seq=values["from_seq"], to_seq=values["to_seq"])
        config = dlq.connection_config(servers, **nats_settings(ctx, nats))

        async def run(stream: dlq.DeadLetterStream) -> Any:
            return await work(stream, await stream.select(selection))

        return dlq.on_dead_letter_stream(config, name, run)
    except dlq.DeadLetterInputError as exc:
        raise BadInput(str(exc)) from None


def _dlq_run(ctx: click.Context, debug: bool, work: Callable[[], int]) -> None:
    _run(work, debug or bool(ctx.obj and ctx.obj.get("debug")))


@contextlib.contextmanager
def _progress(total: int, what: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr for long runs (50 dead letters or more); a no-op otherwise."""
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True, disable=total < 50) as bar:
        task = bar.add_task(what, total=total)
        yield lambda done, _total: bar.update(task, completed=done)


@main.group()
def dlq() -> None:
    """Dead letters: list, show, redrive or purge a subscription's dead-letter stream.

    Every command takes the dead-letter stream (--stream ORDERS_DLQ, or
    --subscription-stream ORDERS) and the same filters; a filter that selects
    nothing, an unknown stream or one that is not a dead-letter stream is one
    line on stderr and exit code 2.
    """


@dlq.command("list")
@_dlq_options
@click.pass_context
def dlq_list(ctx: click.Context, /, debug: bool, **values: Any) -> None:
    """One line per dead letter: its sequence, time, original subject, original stream
    and sequence, delivery count and error (shortened)."""
    def work() -> int:
        async def lines(stream: Any, letters: list[Any]) -> list[str]:
            return [_letter_line(letter) for letter in letters]

        for line in _on_dlq(ctx, values, lines):
            click.echo(line)
        return 0

    _dlq_run(ctx, debug, work)


def _letter_line(letter: Any) -> str:
    error = " ".join(letter.error.split())
    error = error if len(error) <= 60 else error[:59] + "…"
    stored = letter.time.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    count = "?" if letter.delivery_count is None else letter.delivery_count
    origin = "?" if letter.original_sequence is None else letter.original_sequence
    return (f"{letter.sequence:>6}  {stored}  {letter.original_subject}  "
            f"{letter.original_stream}#{origin}  deliveries {count}  {error}")


@dlq.command("show")
@click.argument("sequence", type=click.IntRange(min=1), required=False)
@_dlq_options
@click.pass_context
def dlq_show(ctx: click.Context, /, sequence: int | None, debug: bool, **values: Any) -> None:
    """Each selected dead letter in full (SEQUENCE: just that one): its original subject,
    every header, the error and its body made readable (an envelope's fields)."""
    if sequence is not None:
        values["from_seq"] = values["to_seq"] = sequence

    def work() -> int:
        async def letters(stream: Any, found: list[Any]) -> list[Any]:
            return found

        for number, letter in enumerate(_on_dlq(ctx, values, letters)):
            if number:
                click.echo()
            for line in _letter_details(letter):
                click.echo(line)
        return 0

    _dlq_run(ctx, debug, work)


def _letter_details(letter: Any) -> Iterator[str]:
    from actorbus.dlq import describe_body

    yield f"dead letter #{letter.sequence} ({letter.subject}, stored {letter.time.isoformat()})"
    yield f"original subject: {letter.original_subject}"
    yield f"original stream:  {letter.original_stream} #{letter.original_sequence}"
    yield f"deliveries:       {letter.delivery_count}"
    yield f"error:            {letter.error}"
    yield "headers:"
    for name, value in sorted(letter.headers.items()):
        yield f"  {name}: {value}"
    body = describe_body(letter.data)
    yield f"body: {body.kind}, {len(letter.data)} bytes"
    if body.problem:
        yield f"  ({body.problem})"
    for name, text in body.fields:
        yield f"  {name}: {text}"


@dlq.command("redrive")
@click.option("--dry-run", is_flag=True, help="Say what would be redriven; change nothing.")
@_dlq_options
@click.pass_context
def dlq_redrive(ctx: click.Context, /, dry_run: bool, debug: bool, **values: Any) -> None:
    """Publish the selected dead letters back to their original subjects, in order, with
    their original headers and Nats-Msg-Id actorbus-redrive-<stream>-<sequence>;
    each is deleted from the dead-letter stream once its publish is acknowledged."""
    def work() -> int:
        async def redrive(stream: Any, letters: list[Any]) -> Any:
            if dry_run:
                return await stream.redrive(letters, dry_run=True)
            with _progress(len(letters), "redriving") as progress:
                return await stream.redrive(letters, progress=progress)

        result = _on_dlq(ctx, values, redrive)
        if result.dry_run:
            for letter in result.letters:
                click.echo(f"would redrive #{letter.sequence} to {letter.original_subject} "
                           f"as {letter.redrive_msg_id}")
            click.echo(f"dry run: {len(result.letters)} dead letter(s) would be redriven")
        else:
            click.echo(f"redriven {len(result.letters)} dead letter(s): {result.stored} stored, "
                       f"{result.duplicates} duplicate(s) dropped by their stream")
        return 0

    _dlq_run(ctx, debug, work)


@dlq.command("purge")
@click.option("--dry-run", is_flag=True, help="Say what would be deleted; change nothing.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_dlq_options
@click.pass_context
def dlq_purge(ctx: click.Context, /, dry_run: bool, yes: bool, debug: bool, **values: Any) -> None:
    """Delete the selected dead letters (asks first, unless --yes)."""
    def work() -> int:
        async def purge(stream: Any, letters: list[Any]) -> int | None:
            if dry_run:
                for letter in letters:
                    click.echo(f"would delete #{letter.sequence} ({letter.original_subject})")
                return int(await stream.purge(letters, dry_run=True))
            if not yes and not click.confirm(f"delete {len(letters)} dead letter(s) from "
                                             f"{stream.name}?", err=True):
                return None
            with _progress(len(letters), "deleting") as progress:
                return int(await stream.purge(letters, progress=progress))

        count = _on_dlq(ctx, values, purge)
        if count is None:
            click.echo("nothing deleted", err=True)
            return 1
        click.echo(f"dry run: {count} dead letter(s) would be deleted" if dry_run
                   else f"deleted {count} dead letter(s)")
        return 0

    _dlq_run(ctx, debug, work)


@main.command()
@click.argument("topology")
@click.option("--subscription", "name", default=None, metavar="DURABLE",
              help="The subscription to replay (by its durable); needed when more than one "
                   "has durable aggregates.")
@nats_options
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def replay(ctx: click.Context, /, topology: str, name: str | None, servers: str | None,
           debug: bool, **nats: str | None) -> None:
    """Rebuild the snapshots of a subscription's durable aggregates from its stream: every
    event through the topology's Aggregate class, each aggregate from nothing (after a
    new snapshot_version, or a bug fixed in handle).

    It reads through an ephemeral consumer that acks nothing: a bus running on the
    subscription goes on undisturbed. Exit code 1 when an event failed (skipped, logged).

    Example: actorbus replay myapp:topology --subscription accounts
    """
    hide_argv_secrets(ctx, {"servers": servers, **nats})

    def work() -> int:
        from rich.progress import Progress

        from actorbus import replay as replaying
        from actorbus.topology import load_topology

        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # like python -m: modules beside you import
        loaded = load_topology(topology)
        try:
            subscription = replaying.replay_subscription(replaying.subscriptions_of(loaded), name)
            replaying.durable_class(subscription)
        except replaying.ReplayError as exc:
            raise BadInput(str(exc)) from None
        config = replaying.connection_of(loaded, servers, **nats_settings(ctx, nats))
        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(f"replaying {subscription.name}", total=None)
            report = replaying.rebuild_snapshots(
                config, subscription, lambda done, total: bar.update(task, completed=done, total=total))
        click.echo(replaying.describe(report, subscription))
        return 1 if report.failed else 0

    _run(work, debug or bool(ctx.obj and ctx.obj.get("debug")))


if __name__ == "__main__":  # pragma: no cover
    main()
