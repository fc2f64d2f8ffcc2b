"""Supervision: the root Supervisor actor and the restart policies it applies."""
from actorbus.supervision.policies import (ESCALATE, STOP, AllForOne, Backoff, OneForOne,
                                           SupervisionTree)

__all__ = ["OneForOne", "AllForOne", "Backoff", "SupervisionTree", "ESCALATE", "STOP"]
