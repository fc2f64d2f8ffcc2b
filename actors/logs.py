"""Logging inside actor processes.

Thespian gives each actor process a new root logger (forwarding records
to its logging process) and a new logger manager. Loggers created before
the process was forked — every module-level ``getLogger`` — still hang
off the old root, so their records would vanish; this re-parents them.
"""
from __future__ import annotations

import logging

# The manager in force when this module was imported: before any fork.
_IMPORT_TIME_MANAGER = logging.getLogger("actorbus").manager


def adopt_actor_process_root() -> None:
    """Point loggers that hang off a stale root at the current one (idempotent)."""
    root = logging.getLogger()
    for manager in {id(m): m for m in (_IMPORT_TIME_MANAGER, logging.Logger.manager)}.values():
        for logger in list(manager.loggerDict.values()):
            if not isinstance(logger, logging.Logger):
                continue
            if isinstance(logger.parent, logging.RootLogger) and logger.parent is not root:
                logger.parent = root
            # Every logger, not only those re-parented: ``isEnabledFor`` answers cached in
            # the parent process (INFO off under its WARNING root, say) came with the fork,
            # and would drop records that this process's root lets through.
            logger._cache.clear()  # type: ignore[attr-defined]
