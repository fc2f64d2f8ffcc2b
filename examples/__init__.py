"""Runnable actorbus examples: ``python -m examples.<name> [--servers URL]``.

orders            stateful Order aggregates fed with envelope events (also a Topology)
fanout            keyless plain messages spread round-robin over a pool
supervision_tree  two buses with different supervision policies surviving SIGKILLs
embedding         the Supervisor actor inside your own Thespian ActorSystem
"""
