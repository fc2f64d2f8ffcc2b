"""Handler references: how a handler travels to the actor processes that run it.

Actor processes cannot receive a function object safely (it is pickled
by name anyway), so handlers are named ``"package.module:function"`` and
imported where they run. A lambda or a closure has no such name and is
refused when subscribing, not later in an actor.
"""
from __future__ import annotations

import importlib
from typing import Any
from collections.abc import Callable


class HandlerError(TypeError):
    """A handler that cannot be referred to by name, or whose name does not import."""


def handler_reference(handler: Callable[..., Any] | str) -> str:
    """Return ``"module:qualname"`` for ``handler`` after checking it imports back.

    Raises :class:`HandlerError` naming the handler when it is a lambda, a
    closure, a bound method or anything else not importable by name.
    """
    if isinstance(handler, str):
        ref = handler
    else:
        if not callable(handler):
            raise HandlerError(f"handler {handler!r} is not callable")
        module = getattr(handler, "__module__", None)
        qualname = getattr(handler, "__qualname__", None)
        if not module or not qualname:
            raise HandlerError(f"handler {handler!r} has no module and name to import it by")
        if "<lambda>" in qualname or "<locals>" in qualname:
            raise HandlerError(
                f"handler {module}.{qualname} is a lambda or closure; actor processes import "
                "handlers by name, so pass a module-level function or 'module:function'")
        if module == "__main__":
            raise HandlerError(
                f"handler {qualname} lives in __main__; put it in an importable module")
        ref = f"{module}:{qualname}"
    resolved = resolve_handler(ref)
    if not isinstance(handler, str) and resolved is not handler:
        raise HandlerError(f"handler {ref} does not import back to the same object")
    return ref


def resolve_handler(ref: str) -> Callable[..., Any]:
    """Import the callable named by ``"module:qualname"``; raise :class:`HandlerError` if it fails."""
    module_name, sep, qualname = ref.partition(":")
    if not sep or not module_name or not qualname:
        raise HandlerError(f"handler reference {ref!r} is not of the form 'module:function'")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise HandlerError(f"handler {ref}: cannot import module {module_name!r}: {exc}") from exc
    for part in qualname.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise HandlerError(f"handler {ref}: {module_name} has no {qualname!r}") from None
    if not callable(target):
        raise HandlerError(f"handler {ref} is not callable")
    handler: Callable[..., Any] = target
    return handler
