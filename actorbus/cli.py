"""The ``actorbus`` command line."""
from __future__ import annotations

import contextlib
import signal
import sys
from typing import Iterator

import click
from rich.console import Console


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C, so the bus drains and stops on either."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def demo(ctx: click.Context, pool_size: int, envelopes: int, aggregates: int, keyless: int,
         debug: bool) -> None:
    """Run an embedded nats-server and a process pool, inject failures, check the results.

    Exits 0 when every envelope was handled in order per aggregate and
    every plain message was handled once, 1 otherwise.
    """
    debug = debug or bool(ctx.obj and ctx.obj.get("debug"))
    try:
        from actorbus.demo import run_demo

        with sigterm_as_interrupt():
            code = run_demo(pool_size=pool_size, envelopes=envelopes, aggregates=aggregates,
                            keyless=keyless, console=Console())
    except KeyboardInterrupt:
        raise click.Abort() from None
    except click.ClickException:
        raise
    except Exception as exc:
        if debug:
            raise
        raise click.ClickException(f"{type(exc).__name__}: {exc} (run with --debug for details)") from exc
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
