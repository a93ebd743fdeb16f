"""The reaper: a small process per pool core that kills the workers' process trees when the pool's process dies.

Why a separate process.  A worker's own watchdog thread (``worker.py``) sees
the lifeline pipe reach EOF too, but it cannot run while the worker is stopped
(SIGSTOP, a debugger, the pool's own stop-check-kill) or while the worker's
main thread holds the GIL in C code, and when it runs it runs beside the task,
which may fork after the watchdog's last look.  The reaper runs no user code,
is no worker's descendant, and stops a worker before it looks at its tree, so
neither a stopped worker nor a task can keep it from acting.  The watchdog
therefore leaves the kill to the reaper, and starts a reaper of its own for its
tree (``Reaper().watch(own pid)``, then ``close()``) if the pool's is gone.

Data flow::

    pool process (manager thread)                 reaper process (python -I -S reaper.py FD)
    -------------------------------------------------------------------------------------
    Reaper.start()     -- spawns the process; a core calls it once its first workers are
                          up and idle, and the pids watched before then are sent now
    Reaper.watch(pid)  -- "pid\\n" on the pipe -->  records (pid, start time) of the worker
    pool process dies  -- EOF on the pipe ------->  for each live watched worker: stop its whole
                                                    tree (SIGSTOP, until no new process shows up),
                                                    SIGKILL the tree and its process group; exit
    Reaper.close()     -- EOF on the pipe ------->  same (normally nothing is left); exit

A worker's tree stays complete while the worker lives because the worker is a
child subreaper (``PR_SET_CHILD_SUBREAPER``): a subprocess that double-forks or
calls ``setsid`` is re-parented to the worker, not to init.  The reaper stops
the tree before killing it, so that nothing forks away meanwhile, and kills the
children before the worker (once the worker is gone, its orphans would be
re-parented out of sight).

The start time recorded with each pid guards against pid reuse: a watched
worker that died long ago is never confused with a new process holding its pid.

This file is also the reaper's program: it is run by path with ``python -I -S``
(no site, no user paths: it starts in a few milliseconds and imports only the
standard library), so it must never import anything from resilpool.

Owner: a :class:`Reaper` belongs to the pool core that created it; ``watch`` is
called on the core's manager thread only (writes of one short line are atomic).
"""

from __future__ import annotations

import os
import signal
import sys
import time
import weakref

# logging and subprocess are the parent's alone: imported where used, so that neither the
# reaper process (it must start in a few milliseconds) nor the forkserver, which preloads
# this module for the workers, pays for them; nor typing.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import subprocess
    from collections.abc import Iterable
    from typing import Any

__all__ = ["Reaper", "descendants", "kill_tree"]


def _log() -> Any:
    import logging

    return logging.getLogger("resilpool")

_CLOSE_TIMEOUT_S = 10.0
_MAX_FREEZE_ROUNDS = 50  # a fork bomb could keep adding processes; after this many rounds kill what we have
_MAX_STOP_TRIES = 5  # stop-and-scan passes while something (SIGCONT) resumes the root
_STOP_WAIT_S = 0.2  # how long one pass waits to see the root stopped


# --- /proc helpers (used by the reaper process and by the worker's watchdog) ------------


def _stat_fields(pid: int) -> list[bytes] | None:
    """Fields of /proc/PID/stat after the command name (state is [0], ppid [1], start time [19])."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if it is gone (or a zombie)."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def _parents() -> dict[int, int]:
    """pid -> ppid of every process we can see."""
    out: dict[int, int] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if name.isdigit():
            fields = _stat_fields(int(name))
            if fields is not None:
                out[int(name)] = int(fields[1])
    return out


def _children_of(pid: int) -> list[int] | None:
    """``pid``'s children from /proc/PID/task/*/children; None if the kernel does not have that file."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []  # gone
    out: list[int] = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                out.extend(int(c) for c in f.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{tid}"):
                continue  # that thread ended
            return None  # no CONFIG_PROC_CHILDREN
        except OSError:
            continue
    return out


def descendants(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (not ``pid`` itself).

    Walks /proc/PID/task/*/children down the tree (cost: the tree's size), or, where
    the kernel lacks that file, one scan of every process in /proc.
    """
    out: set[int] = set()
    todo = [pid]
    while todo:
        children = _children_of(todo.pop())
        if children is None:
            return _descendants_by_scan(pid)
        for child in children:
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _descendants_by_scan(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _signal(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def kill_tree(pid: int, *, include_root: bool = True, against_resume: bool = False) -> set[int]:
    """SIGKILL ``pid``'s whole tree and its process group; return the descendants killed.

    The root is stopped first (it can neither fork nor reap while we look, so no link
    of the tree disappears under us), then the descendants, round after round, until
    two scans in a row find no new one (a process exiting as we read may hide its
    children from one scan). A SIGCONT cancels a stop: a worker's parent-death signal
    is SIGCONT (``worker.py``), and it can land in the middle of this when the
    worker's parent (the forkserver) exits a little after the pool's process. So with
    ``against_resume`` (the reaper process, when the pool's process has died) the root
    must then be seen stopped; if it is running again, it is stopped and the tree
    scanned once more (up to 1 s in all). Then all are killed, the root last, so that its orphans are
    never re-parented out of reach while we work. With ``include_root`` False the
    caller is the root (a worker: its watchdog, or the worker as it leaves) and kills
    only its descendants, which as a child subreaper are all the processes its tasks
    left, its process group included.
    """
    me = os.getpid()
    frozen: set[int] = set()
    for _ in range(_MAX_STOP_TRIES):
        if include_root:
            _signal((pid,), signal.SIGSTOP)
        _freeze_descendants(pid, frozen, me)
        if not (include_root and against_resume) or _seen_stopped(pid):
            break
    _signal(frozen, signal.SIGKILL)
    cgroups = sys.modules.get("resilpool.supervisor.cgroup")  # loaded only with Limits(cgroup=True)
    if cgroups is not None:
        cgroups.kill_placed(pid)  # and whatever escaped the tree, if the worker has a cgroup
    if include_root:
        try:
            os.killpg(pid, signal.SIGKILL)  # a worker leads its own group: anything left in it
        except OSError:
            pass
        _signal((pid,), signal.SIGKILL)
    return frozen


def _freeze_descendants(pid: int, frozen: set[int], me: int) -> None:
    """SIGSTOP every descendant of ``pid`` not in ``frozen`` (adding it), until two scans find none."""
    quiet = 0
    for _ in range(_MAX_FREEZE_ROUNDS):
        new = descendants(pid) - frozen - {me}
        if new:
            _signal(new, signal.SIGSTOP)
            frozen |= new
            quiet = 0
        else:
            quiet += 1
            if quiet == 2:
                return


def _seen_stopped(pid: int) -> bool:
    """Whether every thread of ``pid`` is seen stopped (or dead) within ``_STOP_WAIT_S``.

    A stop takes effect when each thread next leaves the kernel: a thread blocked in a
    system call (``vfork`` until its child execs, say) shows as sleeping until then, and
    cannot run our tasks' code meanwhile; one that SIGCONT resumed runs on. Both show
    the same here, so a thread not stopped in time costs one more stop-and-scan round.
    """
    deadline = time.monotonic() + _STOP_WAIT_S
    while True:
        if _all_threads_stopped(pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.001)


def _all_threads_stopped(pid: int) -> bool:
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True  # gone
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue  # that thread ended
        if data[data.rindex(b")") + 2 : data.rindex(b")") + 3] not in (b"T", b"t", b"Z", b"X"):
            return False
    return True


# --- the parent's side ------------------------------------------------------------------

_live: weakref.WeakSet[Reaper] = weakref.WeakSet()


def _close_in_forked_child() -> None:
    # A forked child (a fork-start-method worker, or anything the user forks) must not keep
    # the write end open: the reaper would never see EOF while the child lives.
    for r in list(_live):
        r._forget()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_forked_child)


class Reaper:
    """The parent's handle on one reaper process (see the module docstring).

    If the reaper cannot be started (no /proc, no usable ``sys.executable``), the
    failure is logged once and :meth:`watch` does nothing: the workers' watchdogs
    remain the only line of defence.

    With ``cgroup`` (``Limits(cgroup=True)``) :meth:`watch` also puts each worker in a
    cgroup of its own (``supervisor/cgroup.py``), which :func:`kill_tree` then kills
    too; where cgroups are unavailable that is logged at WARNING with the reason and
    the pool runs without them.
    """

    def __init__(self, *, cgroup: bool = False, start: bool = True) -> None:
        self._fd: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._cgroups: Any = _open_cgroups() if cgroup else None
        # With start=False, the pids watched before start() is called; None once started.
        self._waiting: list[int] | None = []
        if start:
            self.start()

    @property
    def started(self) -> bool:
        """start() has run (whether or not the reaper process could be started)."""
        return self._waiting is None

    def start(self) -> None:
        """Start the reaper process (once), and have it watch the pids watched so far.

        A pool core starts its workers first and its reaper once they are up and idle: the
        reaper's interpreter start (about 10 ms of CPU) would otherwise compete with their
        start and the first task, which on a 2-core machine made a fresh pool's first
        result 1.5x slower with fork. Until then a worker whose parent dies kills its tree
        by itself (``worker._watch_parent``).
        """
        waiting = self._waiting
        if waiting is None:
            return
        self._launch()
        self._waiting = None  # started (and pid set), for any thread that looks
        for pid in waiting:
            self._send(pid)

    def _launch(self) -> None:
        if not sys.platform.startswith("linux") or not os.path.isdir("/proc/self"):
            return
        import subprocess

        r, w = os.pipe()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", os.path.abspath(__file__), str(r)],
                pass_fds=(r,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,  # a signal to the pool's process group must not take it
            )
        except OSError:
            os.close(w)
            _log().warning(
                "resilpool could not start its reaper process (%s -I -S reaper.py): if this process is killed,"
                " a stopped worker and its tasks' subprocesses may outlive it",
                sys.executable,
                exc_info=True,
            )
            return
        finally:
            os.close(r)
        self._fd = w
        _live.add(self)

    @property
    def pid(self) -> int | None:
        """The reaper process's pid (None: not running)."""
        return None if self._proc is None else self._proc.pid

    def watch(self, pid: int) -> None:
        """Have the reaper kill ``pid``'s tree if this process dies (call right after the
        worker starts; before :meth:`start`, it is watched from then)."""
        if self._cgroups is not None:
            self._cgroups.add(pid)
        if self._waiting is not None:
            self._waiting.append(pid)
            return
        self._send(pid)

    def _send(self, pid: int) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, b"%d\n" % pid)
        except OSError:
            _log().warning("resilpool's reaper process is gone; workers started from now on are not watched", exc_info=True)
            self._forget()

    def gone(self, pid: int) -> None:
        """Worker ``pid`` has exited and was reaped: with cgroups, kill what escaped its
        process group (a ``setsid`` daemon, re-parented to init) and remove its cgroup.
        Before :meth:`start`, it is no longer to be watched (its pid may be reused)."""
        if self._waiting is not None and pid in self._waiting:
            self._waiting.remove(pid)
        if self._cgroups is not None:
            self._cgroups.gone(pid)

    def close(self) -> None:
        """Tell the reaper we are done (EOF) and wait for it to exit."""
        self._waiting = None  # never started: nothing to start now
        _live.discard(self)
        self._forget()
        if self._cgroups is not None:
            self._cgroups.close()
        proc, self._proc = self._proc, None
        if proc is None:
            return
        import subprocess

        try:
            proc.wait(_CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _log().error("resilpool's reaper process %d did not exit within %ss; killing it", proc.pid, _CLOSE_TIMEOUT_S)
            proc.kill()
            proc.wait(_CLOSE_TIMEOUT_S)

    def _forget(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


def _open_cgroups() -> Any:
    from ..supervisor.cgroup import CgroupUnavailable, WorkerCgroups

    try:
        return WorkerCgroups()
    except CgroupUnavailable as exc:
        global _cgroup_warned
        if not _cgroup_warned:
            _cgroup_warned = True
            _log().warning("resilpool: Limits(cgroup=True) is not available here, running without cgroups: %s", exc)
        return None


_cgroup_warned = False


# --- the reaper process -------------------------------------------------------------------


def _reaper_main(fd: int) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)  # we exit on EOF, after the cleanup, and only then
    watched: dict[int, int] = {}  # worker pid -> its start time
    prune_at = 64
    buf = b""
    while True:
        try:
            data = os.read(fd, 4096)
        except InterruptedError:  # pragma: no cover - PEP 475 retries
            continue
        if not data:
            break
        buf += data
        *lines, buf = buf.split(b"\n")
        for line in lines:
            pid = int(line)
            st = start_time(pid)
            if st is not None:
                watched[pid] = st
        if len(watched) > prune_at:  # workers come and go: forget the dead ones
            watched = {p: st for p, st in watched.items() if start_time(p) == st}
            prune_at = max(64, 2 * len(watched))
    for pid, st in watched.items():
        if start_time(pid) == st:
            kill_tree(pid, against_resume=True)
        elif start_time(pid) is None:  # gone, or a zombie not yet reaped (its group may hold its tasks' processes)
            # The worker died just before the pool's process did, which had no time to kill
            # its group: what its tasks left in that group is still there (the pid cannot be
            # reused while the group exists, and no other process leads a group of that id).
            _kill_group_members(pid)


def _kill_group_members(pgid: int) -> None:
    members = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat_fields(int(name))
            if fields is not None and int(fields[2]) == pgid:
                members.append(int(name))
    _signal(members, signal.SIGKILL)


if __name__ == "__main__":
    _reaper_main(int(sys.argv[1]))
