"""Prometheus metrics for a bus, and its health and readiness probes, served over HTTP.

The numbers come from the actors themselves (the Bridge counts every
outcome, whichever pool process produced it; the Supervisor counts
restarts), read through ``bus.stats()`` at each scrape, so they cover
every actor process, not only the one serving the endpoint. The same
server answers ``/healthz`` and ``/readyz`` (:mod:`actorbus.health`).
"""
from __future__ import annotations

import errno
import json
import logging
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (CollectorRegistry, CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)

from actorbus.bridge.tally import DURATION_BUCKETS
from actorbus.health import Probe, ProbeAnswer, answer

#: Reads a bus's counters: ``EventBus.stats``.
StatsReader = Callable[[], dict[str, Any]]

log = logging.getLogger("actorbus.metrics")

_BY_SUBSCRIPTION = (("received", "Messages fetched from JetStream."),
                    ("processed", "Messages whose handler succeeded."),
                    ("failed", "Messages whose handler failed on every attempt."),
                    ("undelivered", "Messages that never reached a handler."),
                    ("redelivered", "Deliveries with a delivery count above 1."))
_SETTLEMENTS = (("acked", "Messages acknowledged to JetStream."),
                ("naked", "Messages negatively acknowledged (redelivered later)."),
                ("dead_lettered", "Messages published to a dead-letter subject and termed."),
                ("retried", "In-place handler retries."))

_GROUP_GAUGES = (
    ("pinned", "actorbus_consumers_pinned",
     "Durables of a priority group this bus got a message for under its pin (active)."),
    ("standby", "actorbus_consumers_standby",
     "Durables of a priority group this bus is not pinned on (another bus is, or nothing came)."),
    ("partitions_owned", "actorbus_group_partitions_owned",
     "Partitions of the consumer group this bus owns."),
    ("group_members", "actorbus_group_members", "Members of the consumer group, as this bus sees them."))

#: Each durable's lag (``stats()["lag"]``), read from JetStream every few seconds.
_LAG_GAUGES = (
    ("pending", "actorbus_consumer_pending_messages",
     "Messages of the durable's stream not yet delivered to it."),
    ("ack_pending", "actorbus_consumer_ack_pending_messages",
     "Messages delivered to the durable and not yet acked."),
    ("redelivered", "actorbus_consumer_redelivered_messages",
     "Messages delivered to the durable more than once and not yet acked."),
    ("oldest_unacked_seconds", "actorbus_consumer_oldest_unacked_seconds",
     "Age of the durable's oldest un-acked message (0 with none)."))


class BusCollector:
    """A prometheus-client collector that reads a bus's stats at each scrape."""

    def __init__(self, stats: StatsReader, draining: Callable[[], bool] = lambda: False) -> None:
        self._stats = stats
        self._draining = draining

    def collect(self) -> Iterator[Metric]:
        """The bus's metrics, all named ``actorbus_...`` (none while it drains)."""
        if self._draining():
            return
        try:
            stats = self._stats()
        except Exception as exc:  # a scrape must not take the endpoint down
            log.warning("metrics scrape could not read stats: %s", exc)
            return
        subscriptions = stats["subscriptions"]
        for name, help_text in _BY_SUBSCRIPTION:
            family = CounterMetricFamily(f"actorbus_messages_{name}", help_text,
                                         labels=("subscription", "kind"))
            for sub, tally in subscriptions.items():
                family.add_metric((sub, tally["kind"]), tally["counts"].get(name, 0))
            yield family
        for name, help_text in _SETTLEMENTS:
            yield CounterMetricFamily(f"actorbus_messages_{name}", help_text, value=stats[name])
        restarts = CounterMetricFamily("actorbus_restarts", "Actor restarts by supervision level.",
                                       labels=("level",))
        for level in ("bridge", "router", "pool"):
            restarts.add_metric((level,), stats[f"restarts_{level}"])
        yield restarts
        yield GaugeMetricFamily("actorbus_in_flight_messages",
                                "Messages delivered and not yet settled.", value=stats["in_flight"])
        for key, name, help_text in _GROUP_GAUGES:
            if key in stats:   # only where the bus has a priority group or a consumer group
                yield GaugeMetricFamily(name, help_text, value=stats[key])
        if "rebalances" in stats:
            yield CounterMetricFamily("actorbus_group_rebalances",
                                      "Changes of the partitions this bus owns after the first.",
                                      value=stats["rebalances"])
        depth = GaugeMetricFamily("actorbus_actor_queue_depth",
                                  "Messages held by each pool member (running or waiting).",
                                  labels=("member",))
        for index, held in enumerate(stats["queue_depths"]):
            depth.add_metric((str(index),), held)
        yield depth
        for key, name, help_text in _LAG_GAUGES:
            lag = GaugeMetricFamily(name, help_text, labels=("durable",))
            for durable, reading in stats.get("lag", {}).items():
                lag.add_metric((durable,), reading[key])
            yield lag
        durations = HistogramMetricFamily("actorbus_handler_duration_seconds",
                                          "Time in the handler per message, all attempts.",
                                          labels=("subscription",))
        for sub, tally in subscriptions.items():
            cumulative, buckets = 0, []
            for bound, count in zip((*DURATION_BUCKETS, float("inf")), tally["buckets"], strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            durations.add_metric((sub,), buckets, tally["duration_sum"])
        yield durations


class MetricsServer:
    """The HTTP endpoint: ``http://<addr>:<port>/metrics``, ``/healthz`` and ``/readyz``."""

    def __init__(self, stats: StatsReader, port: int, addr: str = "127.0.0.1",
                 draining: Callable[[], bool] = lambda: False) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(BusCollector(stats, draining))
        self.port = port
        self._stats = stats
        self._draining = draining
        try:
            self._server = _Server((addr, port), _Handler, self)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise MetricsPortInUse(
                    f"the metrics port {addr}:{port} is in use by another program; choose another "
                    "with metrics_port= (actorbus run/demo: --metrics-port)") from None
            raise
        self._thread = threading.Thread(target=self._server.serve_forever, name="actorbus-metrics",
                                        daemon=True)
        self._thread.start()
        log.info("metrics at http://%s:%d/metrics (probes: /healthz, /readyz)", addr, port)

    def probe(self, probe: Probe) -> ProbeAnswer:
        """Answer ``probe`` now."""
        return answer(probe, self._stats, self._draining())

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 metrics: MetricsServer) -> None:
        self.metrics = metrics
        super().__init__(address, handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path in (Probe.LIVE, Probe.READY):
            reply = self.server.metrics.probe(Probe(path))
            self._send(reply.http_status, "application/json", json.dumps(reply.body()).encode())
        elif path in ("/metrics", "/"):
            self._send(200, CONTENT_TYPE_LATEST, generate_latest(self.server.metrics.registry))
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found: /metrics, /healthz, /readyz\n")

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)


class MetricsPortInUse(OSError):
    """The metrics endpoint's port is taken; the message names it and the option that sets it."""
