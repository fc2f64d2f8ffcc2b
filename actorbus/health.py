"""Health and readiness of a bus, as an orchestrator's probes ask for them.

Liveness (``/healthz``): the bus is processing, or draining. It fails only
when it has given up (actors died faster than its supervision allows) or
cannot answer: a restarting actor or a NATS connection being re-established
is what the bus recovers from by itself, and a restart of the process would
not help.

Readiness (``/readyz``): the bus takes traffic now: it has subscribed, every
supervised actor runs, every Bridge is connected to NATS, and it is not
draining (so a rollout moves on to the next instance while it drains).

Each answer is a status code and a JSON body that says what is wrong.
"""
from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from actorbus.actors.messages import ActorState

#: How a Bridge reports a NATS connection that is not up (``stats()``): how many are not.
NATS_DISCONNECTED = "nats_disconnected"


class Probe(enum.StrEnum):
    """The two questions, by the path that asks them."""

    LIVE = "/healthz"
    READY = "/readyz"


@dataclass(frozen=True)
class ProbeAnswer:
    """A probe's answer: ``ok`` (HTTP 200, else 503) and what was seen."""

    ok: bool
    status: str
    reasons: tuple[str, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def http_status(self) -> int:
        """200 when ``ok``, else 503."""
        return 200 if self.ok else 503

    def body(self) -> dict[str, Any]:
        """The JSON body: status, reasons (what is wrong) and details."""
        return {"status": self.status, "reasons": list(self.reasons), **self.details}


def answer(probe: Probe, stats: Callable[[], dict[str, Any]], draining: bool) -> ProbeAnswer:
    """Answer ``probe`` from the bus's ``stats`` (not read while ``draining``)."""
    if draining:
        return ProbeAnswer(ok=probe is Probe.LIVE, status="draining", reasons=("draining",))
    try:
        seen = stats()
    except Exception as exc:   # the bus gave up, or cannot answer: not alive
        return ProbeAnswer(ok=False, status="failed", reasons=(str(exc),))
    actors: dict[str, str] = dict(seen.get("actors", {}))
    details = {"actors": actors, "subscriptions": sorted(seen.get("subscriptions", {})),
               NATS_DISCONNECTED: seen.get(NATS_DISCONNECTED, 0)}
    if probe is Probe.LIVE:
        return ProbeAnswer(ok=True, status="ok", details=details)
    reasons = _not_ready(seen, actors)
    return ProbeAnswer(ok=not reasons, status="unavailable" if reasons else "ok",
                       reasons=reasons, details=details)


def _not_ready(seen: Mapping[str, Any], actors: Mapping[str, str]) -> tuple[str, ...]:
    reasons = []
    if not seen.get("subscriptions"):
        reasons.append("no subscription yet")
    down = sorted(name for name, state in actors.items() if state != ActorState.RUNNING)
    if down:
        reasons.append("not running: " + ", ".join(f"{name} ({actors[name]})" for name in down))
    disconnected = seen.get(NATS_DISCONNECTED, 0)
    if disconnected:
        reasons.append(f"{disconnected} Bridge(s) not connected to NATS (reconnecting)")
    return tuple(reasons)
