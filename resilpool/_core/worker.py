"""The worker process loop (child side only).

A worker leads its own process group, runs the initializer, says
:class:`~resilpool._core.protocol.WorkerReady`, then runs the task frames its
task pipe delivers, strictly in order, answering each with one result frame.

Threads in the worker:

- main thread: reads frames, runs tasks, writes results; owns the slot.
- watchdog: blocks on the lifeline pipe; when the parent dies the pipe reaches
  EOF and the watchdog (1) stops the intake (sets the slot's stop flag and puts
  /dev/null where the task pipe was, so no further task starts), (2) waits
  (bounded) for the pool's reaper process to stop and kill the whole tree, this
  worker included, or if that reaper is gone starts a reaper of its own for
  this tree: a reaper freezes the worker first, so a task that forks while the
  tree is being killed cannot slip out, which a watchdog running beside that
  task cannot promise; (3) as a last resort (no reaper could run) it stops and
  SIGKILLs every descendant of the worker (its process group, and what
  ``setsid`` moved out of it) itself, then exits. So neither the worker nor
  anything its task started outlives the parent.

Nothing outlives the parent (see also ``reaper.py``): the worker is a child
subreaper, so orphans of its tasks stay in its tree (and are reaped after each
task that ran 1 ms or more, and before the worker waits for more frames); its
parent-death signal is SIGCONT, which wakes a stopped worker so that its
watchdog runs; it closes the forkserver's alive fd it inherits, so the
forkserver exits with the pool; and the pool's reaper process kills the tree of
a worker whose watchdog cannot run.

Slot protocol (see ``protocol``): before a task's body is unpickled the worker
claims its frame (``started`` = the frame's number), skips it if the parent
revoked it, else writes the start time, then the task id; after the result is
sent it writes task id 0.  Readers take ``started`` as the acknowledgement.
"""

from __future__ import annotations

# ctypes (for prctl) at the top, not where it is used: the forkserver preloads this
# module, so it is imported once there, not by every worker the server forks.
import ctypes
import os
import pickle
import resource
import select
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection

from . import protocol as P
from .reaper import Reaper, kill_tree, start_time

TYPE_CHECKING = False  # the forkserver preloads this module: no typing at run time
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any, NoReturn

__all__ = ["call_chunk", "main", "result_fd"]

# A pipe holds 64 KiB: a read never returns more. A larger buffer only costs an mmap,
# mremap and munmap per read (glibc serves blocks of 128 KiB and up with mmap).
_READ_SIZE = 1 << 16
# Orphans are reaped after a task that ran this long, and before each wait for more frames.
# A task that leaves an exited orphan behind forks, which takes longer than this; a tiny task
# is spared the system call (and its ECHILD exception): 2 us, a third of a tiny task's cost.
_REAP_AFTER_S = 0.001

# The result pipe's write end, for resilpool.testing's junk-frame faults only (set by main).
_result_fd: int | None = None


def result_fd() -> int | None:
    """The fd of this worker's result pipe (None outside a worker): a seam for fault injection."""
    return _result_fd


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


def _prctl(*calls: tuple[int, int]) -> None:
    """``prctl(option, arg)`` for each call, through one handle on libc."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        for option, arg in calls:
            libc.prctl(option, arg, 0, 0, 0)
    except Exception:  # no libc prctl: not Linux, or a restricted sandbox
        pass


_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _adopt_orphans_and_wake_on_parent_death() -> None:
    """Linux: keep every descendant in our tree, and be woken up when our parent dies.

    - Child subreaper: a subprocess that double-forks or calls ``setsid`` is re-parented
      to us rather than to init, so it stays in our tree, where ``max_rss`` counts it and
      the watchdog and the reaper (``reaper.py``) find and kill it.
    - Parent-death signal SIGCONT, not SIGKILL: SIGKILL would kill us before the
      watchdog could kill our tree, leaving our tasks' subprocesses behind. SIGCONT wakes
      a stopped worker so that its watchdog runs (the reaper process is the other line,
      for a worker whose watchdog cannot run). Our parent is the pool's process (fork,
      spawn) or the forkserver, which exits with it once no worker holds its alive fd
      (:func:`_release_forkserver`).
    """
    # Survive the hangup of an orphaned group: when our parent dies while a process of our
    # group is stopped (frozen by a kill in progress, ours or the pool's; a debugger), the
    # kernel sends the whole group SIGHUP, then SIGCONT (POSIX). Dying of it would hand our
    # tasks' setsid'd daemons to init before the reaper reaches our tree. A handler, not
    # SIG_IGN: exec resets a handler, so the tasks' subprocesses keep the default.
    signal.signal(signal.SIGHUP, _hangup_ignored)
    if not sys.platform.startswith("linux"):
        return
    _prctl((_PR_SET_CHILD_SUBREAPER, 1), (_PR_SET_PDEATHSIG, signal.SIGCONT))


def _hangup_ignored(signum: int, frame: object) -> None:
    """SIGHUP in a worker: nothing to do (see :func:`_adopt_orphans_and_wake_on_parent_death`)."""


def _release_forkserver() -> None:
    """Close our copy of the forkserver's alive fd, inherited from the forkserver or a forked parent.

    The forkserver exits when the write ends of its alive pipe are all closed; each
    forkserver child inherits one (CPython ``forkserver._serve_one``), so a worker that
    keeps it (stopped, say) keeps the forkserver, and with it the resource tracker,
    alive after the pool's process is gone. A task that uses the forkserver start
    method itself gets a forkserver of its own.
    """
    # Only a process that imported the module can hold its fd: a spawn worker, or one forked
    # from a parent that never used a forkserver, need not import it just to find none.
    forkserver = sys.modules.get("multiprocessing.forkserver")
    server: Any = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is None:
        return
    try:
        os.close(fd)
    except OSError:
        pass
    server._forkserver_alive_fd = None
    server._forkserver_pid = None
    server._forkserver_address = None


def _reap_orphans() -> None:
    """Reap exited children: as a subreaper we inherit orphans nobody else waits for.

    Costs one system call when no child has exited. Children of ``multiprocessing``
    (a pool the task keeps) are left to it: ``active_children()`` reaps its own. A
    ``subprocess.Popen`` that a task keeps for a later task and that exited meanwhile
    is reaped here, and then reports exit code 0 (as when SIGCHLD is ignored).
    """
    try:
        if os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            return
    except OSError:  # ChildProcessError: no children at all
        return
    import multiprocessing

    keep = {p.pid for p in multiprocessing.active_children()}
    for pid in _children() - keep:
        try:
            os.waitpid(pid, os.WNOHANG)  # only a zombie is reaped; a live child is left alone
        except OSError:
            pass


def _children() -> set[int]:
    """Our children, from /proc/self/task/*/children (every thread's: orphans are adopted by one)."""
    out: set[int] = set()
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/children", "rb") as f:
                out.update(int(pid) for pid in f.read().split())
        except OSError:  # the thread ended, or no CONFIG_PROC_CHILDREN
            continue
    return out


_orphaned = threading.Event()  # set by the watchdog once the parent is gone
_REAPER_GRACE_S = 5.0  # how long an orphaned worker waits for the reaper before killing its tree itself


def _watch_parent(lifeline_fd: int, task_fd: int, slots: Any, base: int, reaper_cell: int | None) -> None:
    # The parent never writes to the lifeline; readable means EOF: the parent is gone.
    while True:
        try:
            ready, _, _ = select.select([lifeline_fd], [], [])
        except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for clarity
            continue
        if ready:
            break
    _orphaned.set()  # the main thread, if it leaves _serve now, waits for us (see main)
    try:
        # No new task: one already read from the pipe sees the stop flag; the pipe reads EOF.
        slots[base + P.SLOT_STOP] = P.STOP_RETIRE
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, task_fd)
        os.close(null)
    except OSError:
        pass
    # A reaper stops us before it kills our tree, so it wins any race with a task that is
    # forking right now; a watchdog running beside that task cannot. The pool's reaper is
    # on its way; if it is gone, we start one of our own for our tree.
    # Its pid is in the slot table once it runs (the core starts it after its first workers).
    reaper_pid = slots[reaper_cell] if reaper_cell is not None else 0
    if not reaper_pid or not _wait_while_alive(reaper_pid, _REAPER_GRACE_S):
        try:
            own = Reaper()
            if own.pid is not None:
                own.watch(os.getpid())
                own.close()  # EOF: it stops us and kills our tree; close() waits, bounded
        except Exception:
            pass
    try:
        kill_tree(os.getpid(), include_root=False)  # no reaper came: our group, and what setsid moved out of it
    finally:
        os._exit(70)  # the main thread may be stuck: do not wait for it


def _wait_while_alive(pid: int, timeout_s: float) -> bool:
    """Sleep until ``pid`` is gone or ``timeout_s`` has passed; True if it outlived the wait."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if start_time(pid) is None:  # gone, or a zombie nobody reaped yet
            return False
        time.sleep(0.02)
    return True


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


def _run(body: bytes, task_id: int) -> Any:
    """Unpickle and run a task; return its value.

    The function and its arguments live only in this frame, so they are freed when the
    task ends (the stdlib's worker drops its call item likewise): an object passed to a
    finished task does not stay alive in the worker, nor count for its RSS, until the
    next task comes.
    """
    try:
        fn, args, kwargs = pickle.loads(body)
    except BaseException as exc:
        raise _unpickling_error(exc, task_id) from exc
    return fn(*args, **kwargs)


def _result_pickling_error(exc: BaseException, task_id: int) -> BaseException:
    """What the caller gets for a result that would not pickle.

    An ``Exception`` becomes a :class:`~resilpool.SerializationError` naming the result;
    ``SystemExit``, ``KeyboardInterrupt`` and other ``BaseException`` s pass as they are, as
    with the stdlib (``concurrent.futures.process._sendback_result`` sends the pickling
    error itself); either way only this task fails and the worker goes on.
    """
    from ..errors import SerializationError

    if not isinstance(exc, Exception):
        return exc
    err = SerializationError(
        f"the result of task {task_id} could not be pickled: {type(exc).__name__}: {exc}", part="result", task_id=task_id
    )
    err.__cause__ = exc
    return err


def main(
    task_conn: Connection,
    result_conn: Connection,
    lifeline_conn: Connection,
    slot_table: P.SlotTable,
    slot_index: int,
    initializer: Callable[..., object] | None,
    initargs: tuple[Any, ...],
    close_fds: tuple[int, ...] = (),
    soft_rss: int | None = None,
    reaper_cell: int | None = None,
) -> None:
    """Entry point of a worker process.

    ``soft_rss`` (bytes): after a task, a worker whose own RSS is above it leaves by
    itself (slot stop flag ``STOP_SOFT_MEMORY``), so a fast leak is caught between two
    tasks rather than at the parent's next sample. ``reaper_cell``: the field of the slot
    table that holds the pid of the pool's reaper process once it runs (0 before), which
    the watchdog leaves the killing to when the parent dies.
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
    _release_forkserver()
    _adopt_orphans_and_wake_on_parent_death()
    slots = slot_table.view  # int64 fields shared with the parent
    base = slot_index * P.SLOT_FIELDS
    slots[base + P.SLOT_TASK] = 0
    slots[base + P.SLOT_PID] = os.getpid()
    threading.Thread(
        target=_watch_parent,
        args=(lifeline_conn.fileno(), task_conn.fileno(), slots, base, reaper_cell),
        name="resilpool-watchdog",
        daemon=True,
    ).start()

    global _result_fd
    out_fd = _result_fd = result_conn.fileno()
    code = 0
    try:
        if initializer is not None:
            try:
                initializer(*initargs)
            except BaseException as exc:
                code = 3
                _write_all(out_fd, P.encode(P.InitializerFailed(body=P.error_payload(exc, "initializer failed:"))))
                return
        _write_all(out_fd, P.encode(P.WorkerReady()))
        _serve(task_conn.fileno(), out_fd, slots, base, soft_rss)
    except BaseException:
        # Typically a result pipe the dead parent closed (BrokenPipeError); a traceback then
        # says nothing anyone reads, otherwise it goes to stderr as multiprocessing would.
        code = code or 1
        if not _parent_gone(lifeline_conn.fileno()):
            import traceback

            traceback.print_exc()
    finally:
        _leave(lifeline_conn.fileno(), code)


def _parent_gone(lifeline_fd: int) -> bool:
    """Whether the lifeline reads EOF (the parent never writes to it; readable means gone)."""
    try:
        return bool(select.select([lifeline_fd], [], [], 0)[0])
    except (OSError, ValueError):
        return True


def _leave(lifeline_fd: int, code: int) -> NoReturn:
    """End the worker, whichever way it leaves, without leaving its tasks' processes behind.

    Every exit goes through here: a retirement, a failed initializer, an error such as the
    BrokenPipeError of a result written after the parent died. A worker that exits re-parents
    what its tasks left (``setsid`` daemons included) to init, out of every reaper's reach.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    if _orphaned.is_set() or _parent_gone(lifeline_fd):
        # The parent is gone and the watchdog is seeing to our tree (with the reaper, which
        # stops us first): exiting now would re-parent what it has not reached yet to init.
        # The watchdog ends the process (os._exit) in every case.
        while True:
            time.sleep(3600)
    try:
        kill_tree(os.getpid(), include_root=False)  # what our tasks left running
    finally:
        # os._exit: skip atexit handlers and finalizers of user modules that could hang a retiring worker.
        os._exit(code)


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
    run = _run
    dumps = pickle.dumps
    HIGHEST = pickle.HIGHEST_PROTOCOL
    i_task = base + P.SLOT_TASK
    i_start = base + P.SLOT_START_NS
    i_started = base + P.SLOT_STARTED
    i_stop = base + P.SLOT_STOP
    i_revoke = base + P.SLOT_REVOKE
    is_revoked = P.is_revoked
    getrusage, RUSAGE_SELF = resource.getrusage, resource.RUSAGE_SELF
    reap_orphans = _reap_orphans
    while True:
        # Before waiting for more work: what the tasks since the last look left behind.
        reap_orphans()
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
            # The acknowledgement: claim the frame, then honour a take-back (see protocol).
            started += 1
            slots[i_started] = started
            revoked = slots[i_revoke]
            if revoked and is_revoked(revoked, started):
                continue  # the parent took this task back before we claimed it: another worker runs it
            slots[i_start] = monotonic_ns()
            slots[i_task] = task_id
            t0 = perf()
            try:
                value = run(body, task_id)
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
            del body, out
            _write_all(out_fd, frame)
            slots[i_task] = 0
            if perf() - t0 >= _REAP_AFTER_S:
                reap_orphans()
            # Cheap test first (the peak, one syscall); read the current RSS only past it.
            if soft_rss is not None and getrusage(RUSAGE_SELF).ru_maxrss * 1024 > soft_rss and _own_rss() > soft_rss:
                slots[i_stop] = P.STOP_SOFT_MEMORY
                return
