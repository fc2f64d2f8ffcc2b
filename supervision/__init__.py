"""Supervision: the root Supervisor actor and the restart policies it applies.

The policies themselves are configuration values in :mod:`actorbus.policies`
(a leaf of the import graph); they are imported from here by users.
"""
from actorbus.policies import AllForOne, Backoff, OneForOne, RestartPolicy, SupervisionTree

__all__ = ["AllForOne", "Backoff", "OneForOne", "RestartPolicy", "SupervisionTree"]
