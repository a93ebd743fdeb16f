"""The worker process loop (child side only).

A worker leads its own process group, runs the initializer, says
:class:`~resilpool._core.protocol.WorkerReady`, then runs the task frames its
task pipe delivers, strictly in order, answering each with one result frame.

Threads in the worker:

- main thread: reads frames, runs tasks, writes results; owns the slot.
- watchdog: blocks on the lifeline pipe; when the parent dies the pipe reaches
  EOF and the watchdog SIGKILLs the worker's whole process group, so neither
  the worker nor anything its task started outlives the parent.

Slot protocol (see ``protocol``): before a task's body is unpickled the worker
writes ``started += 1``, then the start time, then the task id; after the result
is sent it writes task id 0.  Readers take ``started`` as the acknowledgement.
"""

from __future__ import annotations

import os
import pickle
import resource
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

from . import protocol as P

__all__ = ["call_chunk", "main"]

_READ_SIZE = 1 << 18


def call_chunk(fn: Callable[..., Any], chunk: Sequence[Any], star: bool = False) -> list[Any]:
    """Run ``fn`` over a chunk (``map`` with ``chunksize > 1``): items, or argument tuples with ``star``."""
    if star:
        return [fn(*args) for args in chunk]
    return list(map(fn, chunk))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL us when our parent process dies.

    A second line behind the watchdog thread, which cannot run while the worker is
    stopped (SIGSTOP, a debugger): SIGKILL reaches a stopped process. Our parent is
    the pool's process (fork, spawn) or the forkserver, which exits with it.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _watch_parent(lifeline_fd: int) -> None:
    # The parent never writes to the lifeline; readable means EOF: the parent is gone.
    while True:
        try:
            ready, _, _ = select.select([lifeline_fd], [], [])
        except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for clarity
            continue
        if ready:
            break
    try:
        os.killpg(os.getpgid(0), signal.SIGKILL)
    finally:
        os._exit(70)


def _unpickling_error(exc: BaseException, task_id: int) -> BaseException:
    from ..errors import SerializationError

    hint = ""
    if isinstance(exc, AttributeError) and "__main__" in str(exc):
        hint = (
            "; a function defined in __main__ or a notebook cannot be found by a worker that was not"
            " forked: define it in an importable module, or use mp_context='fork'"
        )
    return SerializationError(
        f"task {task_id} could not be unpickled in the worker: {type(exc).__name__}: {exc}{hint}",
        part="call",
        task_id=task_id,
    )


def _result_pickling_error(exc: BaseException, task_id: int) -> BaseException:
    from ..errors import SerializationError

    err = SerializationError(
        f"the result of task {task_id} could not be pickled: {type(exc).__name__}: {exc}", part="result", task_id=task_id
    )
    err.__cause__ = exc
    return err


def main(
    task_conn: Connection,
    result_conn: Connection,
    lifeline_conn: Connection,
    slots: Any,
    slot_index: int,
    initializer: Callable[..., object] | None,
    initargs: tuple[Any, ...],
    close_fds: tuple[int, ...] = (),
    soft_rss: int | None = None,
) -> None:
    """Entry point of a worker process.

    ``soft_rss`` (bytes): after a task, a worker whose own RSS is above it leaves by
    itself (slot stop flag ``STOP_SOFT_MEMORY``), so a fast leak is caught between two
    tasks rather than at the parent's next sample.
    """
    for fd in close_fds:  # fork start method: the parent's ends we must not hold
        try:
            os.close(fd)
        except OSError:
            pass
    try:
        os.setpgid(0, 0)  # lead our own group: a kill takes the task's subprocesses too
    except OSError:
        pass
    _die_with_parent()
    base = slot_index * P.SLOT_FIELDS
    slots[base + P.SLOT_TASK] = 0
    slots[base + P.SLOT_PID] = os.getpid()
    threading.Thread(
        target=_watch_parent, args=(lifeline_conn.fileno(),), name="resilpool-watchdog", daemon=True
    ).start()

    out_fd = result_conn.fileno()
    if initializer is not None:
        try:
            initializer(*initargs)
        except BaseException as exc:
            _write_all(out_fd, P.encode(P.InitializerFailed(body=P.error_payload(exc, "initializer failed:"))))
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(3)
    _write_all(out_fd, P.encode(P.WorkerReady()))
    _serve(task_conn.fileno(), out_fd, slots, base, soft_rss)
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit: skip atexit handlers and finalizers of user modules that could hang a retiring worker.
    os._exit(0)


def _dumps_by_value(value: Any) -> bytes:
    """Second try for a result the stdlib pickler refused: cloudpickle, if installed."""
    try:
        import cloudpickle
    except ImportError:
        raise pickle.PicklingError("the stdlib pickler refused it and cloudpickle is not installed") from None
    return bytes(cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))


def _own_rss() -> int:
    """Resident memory of this process now, in bytes (Linux: /proc/self/statm)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the peak: an upper bound


def _serve(in_fd: int, out_fd: int, slots: Any, base: int, soft_rss: int | None = None) -> None:
    reader = P.FrameReader()
    pack = P.HEADER.pack
    RUN, RETIRE, SUCCEEDED, FAILED = P.Kind.RUN, P.Kind.RETIRE, P.Kind.SUCCEEDED, P.Kind.FAILED
    started = 0
    monotonic_ns = time.monotonic_ns
    perf = time.perf_counter
    loads = pickle.loads
    dumps = pickle.dumps
    HIGHEST = pickle.HIGHEST_PROTOCOL
    i_task = base + P.SLOT_TASK
    i_start = base + P.SLOT_START_NS
    i_started = base + P.SLOT_STARTED
    i_stop = base + P.SLOT_STOP
    getrusage, RUSAGE_SELF = resource.getrusage, resource.RUSAGE_SELF
    while True:
        data = os.read(in_fd, _READ_SIZE)
        if not data:
            return  # parent closed the pipe
        for kind, task_id, _, body in reader.feed_frames(data):
            if kind != RUN:
                if kind == RETIRE:
                    return
                continue
            if slots[i_stop]:
                return  # retired "after the current task": the queued ones were never started
            # The acknowledgement: from here on the parent counts this task as started.
            started += 1
            slots[i_started] = started
            slots[i_start] = monotonic_ns()
            slots[i_task] = task_id
            t0 = perf()
            try:
                try:
                    fn, args, kwargs = loads(body)
                except BaseException as exc:
                    raise _unpickling_error(exc, task_id) from exc
                value = fn(*args, **kwargs)
            except BaseException as exc:
                out = P.error_payload(exc)
                frame = pack(len(out), FAILED, task_id, perf() - t0) + out
            else:
                elapsed = perf() - t0
                try:
                    try:
                        out = dumps(value, HIGHEST)
                    except Exception:
                        out = _dumps_by_value(value)  # e.g. an instance of a notebook class
                    frame = pack(len(out), SUCCEEDED, task_id, elapsed) + out
                except BaseException as exc:
                    out = P.error_payload(_result_pickling_error(exc, task_id))
                    frame = pack(len(out), FAILED, task_id, elapsed) + out
                del value
            _write_all(out_fd, frame)
            slots[i_task] = 0
            # Cheap test first (the peak, one syscall); read the current RSS only past it.
            if soft_rss is not None and getrusage(RUSAGE_SELF).ru_maxrss * 1024 > soft_rss and _own_rss() > soft_rss:
                slots[i_stop] = P.STOP_SOFT_MEMORY
                return
