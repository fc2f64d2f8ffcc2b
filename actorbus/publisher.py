"""Publishing from the facade: a JetStream client on a background loop."""
from __future__ import annotations

from typing import Mapping

import nats

from actorbus.bridge.envelope import Envelope
from actorbus.bridge.loop_thread import LoopThread


class PublishError(RuntimeError):
    """A publish that JetStream did not acknowledge; the message names subject and cause."""


class Publisher:
    """Publishes to JetStream and waits for each acknowledgement."""

    def __init__(self, servers: tuple[str, ...], *, name: str, timeout: float) -> None:
        self._timeout = timeout
        self._thread = LoopThread(f"{name}-publisher")
        try:
            self._nc = self._thread.run(nats.connect(servers=list(servers), name=f"{name}-publisher",
                                                     connect_timeout=timeout,
                                                     max_reconnect_attempts=3), timeout + 1.0)
        except Exception as exc:
            self._thread.stop()
            raise ConnectionError(f"could not connect to NATS at {', '.join(servers)}: "
                                  f"{type(exc).__name__}: {exc}") from exc
        self._js = self._nc.jetstream()

    def publish(self, subject: str, data: bytes, headers: Mapping[str, str] | None = None) -> int:
        """Publish ``data``; return its stream sequence. Raises :class:`PublishError`."""
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"data must be bytes, got {type(data).__name__}")
        try:
            ack = self._thread.run(
                self._js.publish(subject, bytes(data), headers=dict(headers) if headers else None,
                                 timeout=self._timeout), self._timeout + 1.0)
        except Exception as exc:
            raise PublishError(f"publishing to {subject!r} failed: {type(exc).__name__}: {exc}") from exc
        return ack.seq

    def publish_envelope(self, subject: str, envelope: Envelope) -> int:
        """Publish an envelope with ``Nats-Msg-Id: <event_id>`` so JetStream drops retried copies."""
        if not isinstance(envelope, Envelope):
            raise TypeError(f"envelope must be an Envelope, got {type(envelope).__name__}")
        return self.publish(subject, envelope.encode(), {"Nats-Msg-Id": envelope.event_id})

    def close(self) -> None:
        """Flush and disconnect."""
        try:
            self._thread.run(self._nc.drain(), self._timeout)
        except Exception:
            pass
        self._thread.stop()
