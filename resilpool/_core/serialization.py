"""Turning a call into bytes for a worker: the stdlib pickler first, cloudpickle where it must.

The fast path is one ``pickle.dumps((fn, args, kwargs))`` in the submitting
thread.  cloudpickle (optional, ``pip install 'resilpool[cloudpickle]'``) is
used only when the call needs it, as loky does:

- ``"auto"`` (default): the stdlib pickler, unless the function is a lambda, a
  local function, or lives in an interactive ``__main__`` (a notebook, ``-c``,
  the REPL) that a worker started by forkserver or spawn cannot import; then
  cloudpickle, which sends such functions by value.  If the stdlib pickler fails
  and cloudpickle is installed, cloudpickle gets a try.
- ``"pickle"``: the stdlib pickler only.
- ``"cloudpickle"``: always cloudpickle (slower; for closures over local state).

Workers unpickle with plain ``pickle.loads`` (cloudpickle's output needs only
cloudpickle importable in the worker).  A failure names the part of the call
that could not be pickled and what to do about it.
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Callable
from typing import Any, Literal

from .. import errors

__all__ = ["Serializer", "serialize_task"]

Serializer = Literal["auto", "pickle", "cloudpickle"]
_HIGHEST = pickle.HIGHEST_PROTOCOL


def _cloudpickle() -> Any:
    try:
        import cloudpickle
    except ImportError:
        return None
    return cloudpickle


def _needs_by_value(fn: Any, fork: bool) -> bool:
    """True for functions a worker cannot import by name."""
    name = getattr(fn, "__qualname__", "")
    if "<lambda>" in name or "<locals>" in name:
        return True
    if fork:  # a forked worker has the parent's __main__ in memory
        return False
    if getattr(fn, "__module__", None) == "__main__":
        return _interactive_main()
    return False


def serialize_task(
    task_id: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    mode: Serializer = "auto",
    *,
    fork: bool = False,
    target: Any = None,
) -> bytes:
    """Pickle ``(fn, args, kwargs)``; on failure raise SerializationError naming the part.

    ``target`` is the user's function when ``fn`` is an internal wrapper (a map chunk):
    it decides whether cloudpickle is needed.
    """
    call = (fn, args, kwargs)
    if mode == "cloudpickle" or (mode == "auto" and _needs_by_value(target or fn, fork)):
        cp = _cloudpickle()
        if cp is not None:
            try:
                return bytes(cp.dumps(call, protocol=_HIGHEST))
            except Exception as exc:
                raise _error(task_id, target or fn, args, kwargs, exc, cp) from exc
        if mode == "cloudpickle":
            raise errors.SerializationError(
                "serializer='cloudpickle' needs cloudpickle: pip install 'resilpool[cloudpickle]'",
                part="function",
                task_id=task_id,
            )
    try:
        body = pickle.dumps(call, _HIGHEST)
    except Exception as exc:
        cp = _cloudpickle() if mode == "auto" else None
        if cp is not None:
            try:
                return bytes(cp.dumps(call, protocol=_HIGHEST))
            except Exception:
                pass
        raise _error(task_id, target or fn, args, kwargs, exc, cp) from exc
    if mode == "auto" and not fork and _MAIN_REF in body and _interactive_main():
        # Something in the call (an argument's class, say) lives in a __main__ that the
        # worker cannot import: send the call by value if we can.
        cp = _cloudpickle()
        if cp is not None:
            try:
                return bytes(cp.dumps(call, protocol=_HIGHEST))
            except Exception:
                pass
    return body


#: How pickle names the module of a class or function from ``__main__`` (SHORT_BINUNICODE).
_MAIN_REF = b"\x8c\x08__main__"


def _interactive_main() -> bool:
    return getattr(sys.modules.get("__main__"), "__file__", None) is None


def _error(task_id: int, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], exc: BaseException, cp: Any) -> errors.SerializationError:
    dumps = cp.dumps if cp is not None else pickle.dumps
    part = _unpicklable_part(dumps, fn, args, kwargs)
    name = getattr(fn, "__qualname__", None) or repr(fn)
    hint = ""
    if part == "function" and _needs_by_value(fn, False):
        hint = (
            "; define it at the top level of an importable module"
            + ("" if cp is not None else ", or install cloudpickle (pip install 'resilpool[cloudpickle]') to send it by value")
        )
    return errors.SerializationError(
        f"cannot pickle the {part} of task {task_id} (fn={name}): {type(exc).__name__}: {exc}{hint}",
        part=part,
        task_id=task_id,
    )


def _unpicklable_part(dumps: Callable[..., Any], fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    def fails(obj: Any) -> bool:
        try:
            dumps(obj, protocol=_HIGHEST)
        except Exception:
            return True
        return False

    if fails(fn):
        return "function"
    for i, a in enumerate(args):
        if fails(a):
            return f"argument {i}"
    for k, v in kwargs.items():
        if fails(v):
            return f"keyword argument {k!r}"
    return "call"
