"""Parent <-> worker messages and their wire format.

Each worker has two one-way pipes and one shared-memory slot::

    parent (manager thread)                          worker process
    ---------------------------------------------------------------------------
    task pipe    RunTask*, Retire          ------->  main loop reads frames in order
    result pipe  WorkerReady, TaskSucceeded,
                 TaskFailed, InitializerFailed <---  one frame per message
    slot         (read at any time)        <-------  [task id, start ns, frame claimed, pid]
                 stop flag, revoked frames ------->  checked before each task
    lifeline     EOF when the parent dies  ------->  watchdog thread kills the worker's group

Messages are small frozen records (record.py), one per meaning.  On the wire each is a
frame: a fixed header ``<QBqd`` (body length, kind, task id, elapsed seconds)
followed by the body bytes.  The task body is the pickled ``(fn, args,
kwargs)``, pickled once by the submitting thread and resent unchanged on a
retry; the result body is the pickled value or an :class:`ErrorPayload`.

The *start acknowledgement* costs no message: before it unpickles a task (the
first moment user code can run) the worker writes the task's frame number (its
RUN frames counted from 1) to its slot's ``started`` field: it *claims* the
frame. A worker runs its frames strictly in order, so when it dies the parent
knows exactly which task it was running: the first unanswered one, if its frame
number is at most ``started``; the tasks behind it never started and go to
other workers.

*Take-back.* The parent may take unstarted tasks back from a live worker (to run
them on an idle one, or to abort them). With the worker stopped (SIGSTOP, and
seen stopped in /proc, so every store of the worker is visible and none is in
flight) it reads ``started`` = x and writes ``revoke`` = (x, last frame sent];
then SIGCONT. The worker checks ``revoke`` *after* claiming a frame and skips a
revoked one without answering. Either the claim happened before the stop (the
parent saw it: that task is running, not taken back) or the check happens after
the continue (the worker sees the revoke): a task is started by exactly one
worker. The range is one int64 field, so no read of it is torn.
"""

from __future__ import annotations

import enum
import os
import struct

from .record import record

# Errors crossing the boundary (the bodies of TaskFailed and InitializerFailed) live there.
from .serialization import ErrorPayload, error_payload, rebuild_error

TYPE_CHECKING = False  # the forkserver preloads this module: no typing, no dataclasses (record.py)
if TYPE_CHECKING:
    from typing import Any, Final

    from .serialization import RemoteTraceback

__all__ = [
    "HEADER",
    "ErrorPayload",
    "FROM_PARENT",
    "FROM_WORKER",
    "FrameReader",
    "InitializerFailed",
    "Kind",
    "RemoteTraceback",
    "Retire",
    "RunTask",
    "SLOT_FIELDS",
    "SlotTable",
    "TaskFailed",
    "TaskSucceeded",
    "WorkerReady",
    "encode",
    "error_payload",
    "is_revoked",
    "rebuild_error",
    "revoke_range",
]

HEADER: Final = struct.Struct("<QBqd")  # 64-bit length: a call may pickle to 4 GiB and more

#: Per-worker slot in shared memory: these many int64 fields.
SLOT_FIELDS: Final = 6
#: Slot field indexes.
SLOT_TASK: Final = 0  # id of the task running now; 0 when idle
SLOT_START_NS: Final = 1  # time.monotonic_ns() when it started
SLOT_STARTED: Final = 2  # frame number (1, 2, ...) of the RUN frame claimed last: the acknowledgement
SLOT_PID: Final = 3  # the worker's pid, written once at start
SLOT_STOP: Final = 4  # leave before starting another task: STOP_RETIRE (set by the parent) or
# STOP_SOFT_MEMORY (set by the worker itself, over soft_max_rss, as it leaves)
SLOT_REVOKE: Final = 5  # frames taken back by the parent: revoke_range() packs (lo, hi] in one int64
STOP_RETIRE: Final = 1
STOP_SOFT_MEMORY: Final = 2
REVOKE_SPAN_BITS: Final = 20  # a revoked range spans fewer than 2**20 frames (at most MAX_DEPTH are queued)


class SlotTable:
    """The slots of every worker of a core: ``n`` int64 fields in shared memory.

    A memfd mapped shared (``MAP_SHARED``) by the parent and each worker; ``view`` is the
    int64 memoryview both index (one field read or written is one aligned 8-byte load or
    store, as with a ctypes array). Not a ``multiprocessing.RawArray``: that imports
    ctypes and ``multiprocessing.heap`` (with tempfile) in the parent and in every
    spawned worker, milliseconds of every first start.

    A worker receives the table in its ``Process`` arguments: a forked one inherits the
    mapping; for spawn and forkserver the table pickles as its file descriptor (passed by
    the start method itself, ``reduction.DupFd``) and the worker maps it again.
    Owner: the core that made it; :meth:`close` once no worker will start any more.
    """

    def __init__(self, n: int, fd: int | None = None) -> None:
        import mmap

        size = max(1, n) * 8
        if fd is None:
            fd = os.memfd_create("resilpool-slots", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
            except BaseException:
                os.close(fd)
                raise
        self.n = n
        self._fd = fd
        self._map = mmap.mmap(fd, size)
        self._bytes = memoryview(self._map)
        self.view = self._bytes.cast("q")

    def __reduce__(self) -> tuple[Any, ...]:
        from multiprocessing import reduction

        if self._fd < 0:
            raise ValueError("this SlotTable is closed")
        return _attach_slots, (reduction.DupFd(self._fd), self.n)

    def close(self) -> None:
        """Unmap the table and close its descriptor (the parent's, after its last worker)."""
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        self.view.release()
        self._bytes.release()
        self._map.close()
        os.close(fd)


def _attach_slots(dupfd: Any, n: int) -> SlotTable:
    """A worker's end of the table (spawn, forkserver): map the descriptor it was sent."""
    return SlotTable(n, dupfd.detach())


def revoke_range(lo: int, hi: int) -> int:
    """Pack the revoked frame numbers ``lo < n <= hi`` into one slot field (one atomic store)."""
    if not 0 <= hi - lo < 1 << REVOKE_SPAN_BITS:
        raise ValueError(f"revoked range ({lo}, {hi}] is empty-negative or too wide")
    return (lo << REVOKE_SPAN_BITS) | (hi - lo)


def is_revoked(field: int, n: int) -> bool:
    """Does the slot's revoke field cover frame number ``n``? (The worker asks, after claiming ``n``.)"""
    lo = field >> REVOKE_SPAN_BITS
    return lo < n <= lo + (field & ((1 << REVOKE_SPAN_BITS) - 1))


class Kind(enum.IntEnum):
    """Frame kinds; parent->worker below 16, worker->parent from 16."""

    RUN = 1
    RETIRE = 2
    READY = 16
    SUCCEEDED = 17
    FAILED = 18
    INIT_FAILED = 19


@record(frozen=True, slots=True, kw_only=True)
class RunTask:
    """Command: run this task after the ones already sent."""

    task_id: int
    body: bytes


@record(frozen=True, slots=True, kw_only=True)
class Retire:
    """Command: finish the tasks already sent, then exit with code 0."""


@record(frozen=True, slots=True, kw_only=True)
class WorkerReady:
    """Event: the initializer returned; the worker is taking tasks."""


@record(frozen=True, slots=True, kw_only=True)
class TaskSucceeded:
    """Event: the task returned; ``body`` is its pickled result."""

    task_id: int
    elapsed_s: float
    body: bytes


@record(frozen=True, slots=True, kw_only=True)
class TaskFailed:
    """Event: the task raised (or its result would not pickle); ``body`` is an ErrorPayload."""

    task_id: int
    elapsed_s: float
    body: bytes


@record(frozen=True, slots=True, kw_only=True)
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


#: Kinds a worker may send; the parent's reader refuses any other.
FROM_WORKER: Final = frozenset({Kind.READY, Kind.SUCCEEDED, Kind.FAILED, Kind.INIT_FAILED})
#: Kinds the parent may send.
FROM_PARENT: Final = frozenset({Kind.RUN, Kind.RETIRE})


class FrameReader:
    """Reassembles frames from the chunks a pipe delivers (one read may hold many frames).

    Every header is validated as soon as its bytes are in, *before* waiting for (or
    buffering) the body it announces: the kind must be one of ``kinds``, the body
    length at most ``max_body`` bytes; with ``ids`` (an object whose ``max_task_id`` is
    the highest task id submitted so far), a result's task id must be one of those and
    its elapsed time in [0, 1e9) s, and any other frame's task id 0. A violation raises
    :class:`ProtocolError`: junk on a pipe is found at once, never waited on. (Checked
    inline, not by a callback: this runs once per task on the manager thread.)
    """

    __slots__ = ("_buf", "_ids", "_kinds", "_max_body")

    def __init__(
        self,
        kinds: frozenset[int] = frozenset(Kind),
        max_body: int = 1 << 62,
        ids: Any = None,
    ) -> None:
        self._buf = bytearray()
        self._kinds = kinds
        self._max_body = max_body
        self._ids = ids

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
        kinds, max_body, ids = self._kinds, self._max_body, self._ids
        SUCCEEDED, FAILED = Kind.SUCCEEDED, Kind.FAILED
        while end - pos >= size:
            length, kind, tid, elapsed = unpack(buf, pos)
            if kind not in kinds:
                raise ProtocolError(f"unexpected frame kind {kind} at offset {pos}")
            if length > max_body:
                raise ProtocolError(f"a frame of kind {kind} announces {length} bytes, over the maximum {max_body}")
            if ids is not None:
                if kind == SUCCEEDED or kind == FAILED:
                    if not 0 < tid <= ids.max_task_id:
                        raise ProtocolError(f"a result for task {tid}, which was never submitted")
                    if not 0.0 <= elapsed < 1e9:  # NaN fails too
                        raise ProtocolError(f"a result whose elapsed time is {elapsed!r}")
                elif tid != 0:
                    raise ProtocolError(f"a frame of kind {kind} for task {tid}")
            stop = pos + size + length
            if stop > end:
                break
            out.append((kind, tid, elapsed, bytes(buf[pos + size : stop])))
            pos = stop
        if pos:
            del buf[:pos]
        return out



def __getattr__(name: str) -> Any:
    # RemoteTraceback on first use only: resilpool.errors is the parent's (serialization.py).
    if name == "RemoteTraceback":
        from .serialization import RemoteTraceback

        return RemoteTraceback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
