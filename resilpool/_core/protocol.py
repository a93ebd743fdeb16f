"""Parent <-> worker messages and their wire format.

Each worker has two one-way pipes and one shared-memory slot::

    parent (manager thread)                          worker process
    ---------------------------------------------------------------------------
    task pipe    RunTask*, Retire          ------->  main loop reads frames in order
    result pipe  WorkerReady, TaskSucceeded,
                 TaskFailed, InitializerFailed <---  one frame per message
    slot         (read at any time)        <-------  [task id, start ns, tasks started, pid]
                 stop flag                 ------->  checked before each task
    lifeline     EOF when the parent dies  ------->  watchdog thread kills the worker's group

Messages are small frozen dataclasses, one per meaning.  On the wire each is a
frame: a fixed header ``<QBqd`` (body length, kind, task id, elapsed seconds)
followed by the body bytes.  The task body is the pickled ``(fn, args,
kwargs)``, pickled once by the submitting thread and resent unchanged on a
retry; the result body is the pickled value or an :class:`ErrorPayload`.

The *start acknowledgement* costs no message: before it unpickles a task (the
first moment user code can run) the worker bumps its slot's "tasks started"
counter.  A worker runs its frames strictly in order, so when it dies the
parent knows exactly which task it was running: the first unanswered one, if
the counter is ahead of the answers received; the tasks behind it never
started and go to other workers.
"""

from __future__ import annotations

import enum
import pickle
import struct
import traceback
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "HEADER",
    "ErrorPayload",
    "FrameReader",
    "InitializerFailed",
    "Kind",
    "RemoteTraceback",
    "Retire",
    "RunTask",
    "SLOT_FIELDS",
    "TaskFailed",
    "TaskSucceeded",
    "WorkerReady",
    "encode",
    "error_payload",
    "rebuild_error",
]

HEADER: Final = struct.Struct("<QBqd")  # 64-bit length: a call may pickle to 4 GiB and more

#: Per-worker slot in shared memory: these many int64 fields.
SLOT_FIELDS: Final = 5
#: Slot field indexes.
SLOT_TASK: Final = 0  # id of the task running now; 0 when idle
SLOT_START_NS: Final = 1  # time.monotonic_ns() when it started
SLOT_STARTED: Final = 2  # how many tasks this worker has started (the acknowledgement)
SLOT_PID: Final = 3  # the worker's pid, written once at start
SLOT_STOP: Final = 4  # leave before starting another task: STOP_RETIRE (set by the parent) or
# STOP_SOFT_MEMORY (set by the worker itself, over soft_max_rss, as it leaves)
STOP_RETIRE: Final = 1
STOP_SOFT_MEMORY: Final = 2


class Kind(enum.IntEnum):
    """Frame kinds; parent->worker below 16, worker->parent from 16."""

    RUN = 1
    RETIRE = 2
    READY = 16
    SUCCEEDED = 17
    FAILED = 18
    INIT_FAILED = 19


@dataclass(frozen=True, slots=True, kw_only=True)
class RunTask:
    """Command: run this task after the ones already sent."""

    task_id: int
    body: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Retire:
    """Command: finish the tasks already sent, then exit with code 0."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerReady:
    """Event: the initializer returned; the worker is taking tasks."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskSucceeded:
    """Event: the task returned; ``body`` is its pickled result."""

    task_id: int
    elapsed_s: float
    body: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskFailed:
    """Event: the task raised (or its result would not pickle); ``body`` is an ErrorPayload."""

    task_id: int
    elapsed_s: float
    body: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class InitializerFailed:
    """Event: the initializer raised; the worker exits right after sending this."""

    body: bytes


Message = RunTask | Retire | WorkerReady | TaskSucceeded | TaskFailed | InitializerFailed


def encode(msg: Message) -> bytes:
    """Frame a message for the wire."""
    match msg:
        case RunTask(task_id=tid, body=body):
            return HEADER.pack(len(body), Kind.RUN, tid, 0.0) + body
        case TaskSucceeded(task_id=tid, elapsed_s=el, body=body):
            return HEADER.pack(len(body), Kind.SUCCEEDED, tid, el) + body
        case TaskFailed(task_id=tid, elapsed_s=el, body=body):
            return HEADER.pack(len(body), Kind.FAILED, tid, el) + body
        case InitializerFailed(body=body):
            return HEADER.pack(len(body), Kind.INIT_FAILED, 0, 0.0) + body
        case Retire():
            return HEADER.pack(0, Kind.RETIRE, 0, 0.0)
        case WorkerReady():
            return HEADER.pack(0, Kind.READY, 0, 0.0)
    raise TypeError(f"not a protocol message: {msg!r}")


class ProtocolError(Exception):
    """A frame that cannot be decoded: the channel is corrupt."""


_DECODERS: Final[dict[int, Any]] = {
    Kind.RUN: lambda tid, el, body: RunTask(task_id=tid, body=body),
    Kind.RETIRE: lambda tid, el, body: Retire(),
    Kind.READY: lambda tid, el, body: WorkerReady(),
    Kind.SUCCEEDED: lambda tid, el, body: TaskSucceeded(task_id=tid, elapsed_s=el, body=body),
    Kind.FAILED: lambda tid, el, body: TaskFailed(task_id=tid, elapsed_s=el, body=body),
    Kind.INIT_FAILED: lambda tid, el, body: InitializerFailed(body=body),
}


class FrameReader:
    """Reassembles frames from the chunks a pipe delivers (one read may hold many frames)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def pending_bytes(self) -> int:
        """Bytes of a frame received only in part."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Message]:
        """Add bytes just read; return the messages completed by them, in order."""
        return [_DECODERS[kind](tid, el, body) for kind, tid, el, body in self.feed_frames(data)]

    def feed_frames(self, data: bytes) -> list[tuple[int, int, float, bytes]]:
        """Like :meth:`feed`, as raw ``(kind, task id, elapsed, body)`` tuples: the hot path.

        The manager and the worker use this for the per-task frames, where building a
        message object per task measurably costs throughput; the fields and meanings
        are exactly those of the message classes above.
        """
        buf = self._buf
        buf += data
        out: list[tuple[int, int, float, bytes]] = []
        pos = 0
        end = len(buf)
        size = HEADER.size
        unpack = HEADER.unpack_from
        while end - pos >= size:
            length, kind, tid, elapsed = unpack(buf, pos)
            stop = pos + size + length
            if stop > end:
                break
            if kind not in _DECODERS:
                raise ProtocolError(f"unknown frame kind {kind} at offset {pos}")
            out.append((kind, tid, elapsed, bytes(buf[pos + size : stop])))
            pos = stop
        if pos:
            del buf[:pos]
        return out


# --- errors crossing the process boundary ------------------------------------


class RemoteTraceback(Exception):
    """Carries the worker-side traceback text; set as ``__cause__`` as the stdlib does."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorPayload:
    """An exception as sent by a worker: the object if it pickles, else its type name and text."""

    exc: BaseException | None
    type_name: str
    message: str
    traceback: str


def error_payload(exc: BaseException, context: str = "") -> bytes:
    """Pickle ``exc`` with its traceback text; never raises (falls back to the text only)."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if context:
        tb = f"{context}\n{tb}"
    name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    try:
        text = str(exc)
    except Exception:  # a broken __str__ must not lose the error
        text = f"<unprintable {name}>"
    try:
        return pickle.dumps(ErrorPayload(exc=exc, type_name=name, message=text, traceback=tb), pickle.HIGHEST_PROTOCOL)
    except Exception:
        return pickle.dumps(ErrorPayload(exc=None, type_name=name, message=text, traceback=tb), pickle.HIGHEST_PROTOCOL)


def rebuild_error(body: bytes) -> BaseException:
    """Turn an :func:`error_payload` back into an exception whose ``__cause__`` is the remote traceback."""
    from ..errors import ResilpoolError  # local: errors imports nothing from _core

    try:
        payload: ErrorPayload = pickle.loads(body)
    except Exception as exc:
        return ResilpoolError(f"a worker sent an error that could not be unpickled in the parent: {exc!r}")
    err = payload.exc
    if err is None:
        err = ResilpoolError(
            f"{payload.type_name}: {payload.message} (the exception could not be pickled; see the remote traceback)"
        )
    err.__cause__ = RemoteTraceback(f'\n"""\n{payload.traceback}"""')
    return err
