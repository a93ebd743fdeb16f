"""Turning a call into bytes for a worker (the stdlib pickler first, cloudpickle where it must), and errors back.

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

Errors travel back as an :class:`ErrorPayload` (:func:`error_payload` in the
worker, :func:`rebuild_error` in the parent) and keep their identity however
they pickle: the exception is pickled on its own and checked to unpickle in
the worker; when it does not (a class whose ``__init__`` needs two arguments,
an attribute too deep or unpicklable, a ``__reduce__`` that raises, even
``KeyboardInterrupt``), or does not unpickle in the parent, the parent rebuilds
it from its type (if importable) and message, with a note saying so.  Only an
exception whose type cannot be imported in the parent arrives as a
:class:`~resilpool.ResilpoolError` naming it.  Either way the worker's
traceback text is the ``__cause__`` (a :class:`~resilpool.errors.RemoteTraceback`).
"""

from __future__ import annotations

import pickle
import sys

from .lazy import import_module
from .record import record

# The worker imports this module (the forkserver preloads it): what only the parent or a
# failing task needs (resilpool.errors pulls in concurrent.futures and logging; traceback,
# importlib) is imported where it is used, so that every forkserver boot skips it; nor
# typing and dataclasses (record.py says why).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, Literal

    from .. import errors
    from ..errors import RemoteTraceback

    Serializer = Literal["auto", "pickle", "cloudpickle"]
else:
    Serializer = str  # at run time a name to import; type checkers see the Literal

__all__ = ["ErrorPayload", "RemoteTraceback", "Serializer", "error_payload", "rebuild_error", "serialize_task"]
_HIGHEST = pickle.HIGHEST_PROTOCOL


_CLOUDPICKLE: list[Any] = []  # [module or None] once looked for


def _cloudpickle() -> Any:
    """The cloudpickle module, or None if it is not installed; imported on first need."""
    if not _CLOUDPICKLE:
        try:
            module: Any = import_module("cloudpickle")
        except ImportError:
            module = None
        _CLOUDPICKLE.append(module)
    return _CLOUDPICKLE[0]


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
            from .. import errors  # lazily: see the imports above

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
    from .. import errors

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


# --- errors crossing the process boundary ----------------------------------------------

_TB_TAIL_FRAMES = 100  # a traceback too deep to format whole keeps its last frames


@record(frozen=True, slots=True, kw_only=True)
class ErrorPayload:
    """An exception as a worker sends it: plain fields, so the payload itself always unpickles.

    ``pickled`` is the exception pickled on its own, or None when it did not survive a
    pickle round trip in the worker (``problem`` says why); ``module``/``qualname`` name
    its type, ``message`` is its ``str()``, ``traceback`` the formatted traceback.
    """

    pickled: bytes | None
    module: str
    qualname: str
    message: str
    traceback: str
    problem: str = ""

    @property
    def type_name(self) -> str:
        return f"{self.module}.{self.qualname}"


def _describe(exc: BaseException) -> str:
    try:
        return f"{type(exc).__name__}: {exc}"
    except BaseException:
        return type(exc).__name__


def _format_traceback(exc: BaseException) -> str:
    import traceback

    try:
        return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except BaseException:  # too deep (RecursionError, MemoryError) or a broken __str__
        pass
    try:
        tail = "".join(traceback.format_tb(exc.__traceback__, limit=-_TB_TAIL_FRAMES))
        return f"Traceback (last {_TB_TAIL_FRAMES} frames; the whole could not be formatted):\n{tail}{type(exc).__name__}\n"
    except BaseException:
        return f"{type(exc).__name__} (its traceback could not be formatted)\n"


def error_payload(exc: BaseException, context: str = "") -> bytes:
    """Pickle ``exc`` with its type, message and traceback text; never raises.

    Runs in the worker. The exception is kept only if it unpickles again here: many
    pickle fine and fail only when rebuilt (an ``__init__`` with two required arguments).
    """
    tb = _format_traceback(exc)
    if context:
        tb = f"{context}\n{tb}"
    cls = type(exc)
    try:
        message = str(exc)
    except BaseException:  # a broken __str__ must not lose the error
        message = f"<unprintable {cls.__qualname__}>"
    pickled: bytes | None = None
    problem = ""
    try:
        data = pickle.dumps(exc, _HIGHEST)
        pickle.loads(data)
        pickled = data
    except BaseException as err:  # KeyboardInterrupt or SystemExit from a __reduce__ too: contained
        problem = f"it could not be pickled in the worker ({_describe(err)})"
    payload = ErrorPayload(
        pickled=pickled, module=str(cls.__module__), qualname=cls.__qualname__, message=message, traceback=tb, problem=problem
    )
    return pickle.dumps(payload, _HIGHEST)


def _importable_type(module: str, qualname: str) -> type[BaseException] | None:
    import importlib

    try:
        obj: Any = sys.modules.get(module) or importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except BaseException:  # not importable here; an import that fails any way at all
        return None
    if isinstance(obj, type) and issubclass(obj, BaseException):
        return obj
    return None


def _rebuild_from_type(cls: type[BaseException], message: str) -> BaseException | None:
    """``cls(message)``, or an instance whose ``__init__`` did not run if that raises."""
    try:
        return cls(message)
    except BaseException:
        pass
    try:
        err = cls.__new__(cls, message)
        err.args = (message,)
        str(err)  # a __str__ that needs what __init__ would have set: not usable
    except BaseException:
        return None
    return err


def rebuild_error(body: bytes) -> BaseException:
    """Turn an :func:`error_payload` back into an exception whose ``__cause__`` is the remote traceback.

    Runs in the parent; never raises (every failure is turned into the error returned).
    """
    from .. import errors

    try:
        payload = pickle.loads(body)
        if not isinstance(payload, ErrorPayload):
            raise TypeError(f"expected an ErrorPayload, got {type(payload).__qualname__}")
    except BaseException as exc:  # a corrupt body: the payload has plain fields only
        return errors.ResilpoolError(f"a worker sent an error that could not be unpickled in the parent: {exc!r}")
    err: BaseException | None = None
    problem = payload.problem
    if payload.pickled is not None:
        try:
            err = pickle.loads(payload.pickled)
            if not isinstance(err, BaseException):
                raise TypeError(f"unpickled a {type(err).__qualname__}, not an exception")
        except BaseException as exc:
            err = None
            problem = f"it could not be unpickled in the parent ({_describe(exc)})"
    if err is None:
        cls = _importable_type(payload.module, payload.qualname)
        err = None if cls is None else _rebuild_from_type(cls, payload.message)
        if err is None:
            err = errors.ResilpoolError(
                f"{payload.type_name}: {payload.message} ({problem}, and its type could not be rebuilt in the"
                " parent; see the remote traceback)"
            )
        else:
            err.add_note(f"resilpool: rebuilt in the parent from its type and message: {problem}")
    err.__cause__ = errors.RemoteTraceback(f'\n"""\n{payload.traceback}"""')
    return err


def __getattr__(name: str) -> Any:
    # RemoteTraceback is re-exported on first use only (see the imports above).
    if name == "RemoteTraceback":
        from ..errors import RemoteTraceback

        return RemoteTraceback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
