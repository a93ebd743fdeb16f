"""Opt-in cgroup v2 per worker (``Limits(cgroup=True)``): a kill that takes every descendant.

A worker's process group, and the child-subreaper tree the worker keeps, hold every
process its tasks start, except one that calls ``setsid`` and whose worker is then
killed from outside the pool (the OOM killer, ``kill -9``): it is re-parented to init.
A cgroup holds them all: ``cgroup.kill`` (Linux 5.14+) SIGKILLs every process in it,
wherever it was re-parented, and ``memory.current`` counts all their memory.

Requirements (checked by :func:`probe`, which says what is missing):

- a cgroup v2 hierarchy (``cgroup2`` in /proc/self/mountinfo);
- the pool's process may create cgroups below its own (the directory is writable:
  root, or a delegated subtree such as ``systemd-run --user --scope -p Delegate=yes``);
- ``cgroup.kill`` exists (Linux 5.14 or later).

Layout: ``<our cgroup>/resilpool-<our pid>-w<worker pid>``, one per worker, created
when the worker starts (the parent writes the pid to its ``cgroup.procs`` right after
the start, before the worker is sent any task). When the worker has exited (killed
from outside included), whatever is left in its cgroup is killed with ``cgroup.kill``
and the cgroup removed, once those processes are gone.
``memory.current`` is read only if the memory controller is enabled for our
children (``cgroup.subtree_control``); resilpool does not move the pool's own
process to enable it.

Where a requirement is missing, :class:`WorkerCgroups` raises
:class:`CgroupUnavailable` with the reason, and the pool logs it once at WARNING
and runs without cgroups (process group and subreaper tree only).

Owner: a :class:`WorkerCgroups` belongs to one pool core; ``add``/``kill``/``gone``/``discard``
are called on its manager thread; the table of placed workers is also read by
:func:`kill_placed` (from the same thread, through ``reaper.kill_tree``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Final

__all__ = ["CgroupUnavailable", "WorkerCgroups", "kill_placed", "probe"]

log = logging.getLogger("resilpool")

_MOUNTINFO: Final = Path("/proc/self/mountinfo")
_SELF_CGROUP: Final = Path("/proc/self/cgroup")

_EMPTY_WAIT_S: Final = 0.1  # how long gone() waits for a killed cgroup to empty

_placed: dict[int, Path] = {}  # worker pid -> its cgroup directory, across every WorkerCgroups
_placed_lock = threading.Lock()


class CgroupUnavailable(RuntimeError):
    """``Limits(cgroup=True)`` cannot be honoured here; ``str()`` says which requirement is missing."""


def _cgroup2_mount(mountinfo: Path) -> Path | None:
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            return Path(left.split()[4])
    return None


def _own_cgroup(self_cgroup: Path) -> str | None:
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            return line[3:]
    return None


def probe(mountinfo: Path = _MOUNTINFO, self_cgroup: Path = _SELF_CGROUP) -> Path:
    """Our cgroup v2 directory, if per-worker cgroups can be made below it.

    Raises:
        CgroupUnavailable: naming the missing requirement and what to do about it.
    """
    mount = _cgroup2_mount(mountinfo)
    if mount is None:
        raise CgroupUnavailable("no cgroup v2 hierarchy is mounted (cgroup2 is not in /proc/self/mountinfo)")
    own = _own_cgroup(self_cgroup)
    if own is None:
        raise CgroupUnavailable("this process has no cgroup v2 membership (no '0::' line in /proc/self/cgroup)")
    base = mount / own.lstrip("/")
    if not (base / "cgroup.procs").exists():
        raise CgroupUnavailable(f"{base} is not this process's cgroup v2 directory (no cgroup.procs there)")
    if not os.access(base, os.W_OK):
        raise CgroupUnavailable(
            f"{base} is not writable: run as root, or in a delegated cgroup"
            " (for example systemd-run --user --scope -p Delegate=yes ...)"
        )
    if not (base / "cgroup.kill").exists() and not _child_has_kill(base):
        raise CgroupUnavailable(f"{base} has no cgroup.kill: it needs Linux 5.14 or later")
    return base


def _child_has_kill(base: Path) -> bool:
    """Does a cgroup made below ``base`` have ``cgroup.kill``? The root cgroup never has
    the file (a container's process often sits there), its children do on Linux 5.14+."""
    child = base / f"resilpool-probe-{os.getpid()}-{threading.get_ident()}"
    try:
        child.mkdir()
    except OSError:
        return False
    try:
        return (child / "cgroup.kill").exists()
    finally:
        _rmdir(child)


class WorkerCgroups:
    """One cgroup per worker below ``base`` (default: :func:`probe`'s answer)."""

    def __init__(self, base: Path | None = None) -> None:
        self.base = probe() if base is None else base
        self._prefix = f"resilpool-{os.getpid()}-w"
        self._mine: set[int] = set()
        self._stale: set[Path] = set()  # cgroups of exited workers not empty yet when removed

    def add(self, pid: int) -> Path | None:
        """Create the worker's cgroup and move it there; None (logged) if that failed."""
        self._remove_stale()
        path = self.base / f"{self._prefix}{pid}"
        try:
            path.mkdir(exist_ok=True)
            (path / "cgroup.procs").write_text(f"{pid}\n")
        except OSError:
            log.warning("resilpool could not put worker %d in cgroup %s", pid, path, exc_info=True)
            _rmdir(path)
            return None
        self._mine.add(pid)
        with _placed_lock:
            _placed[pid] = path
        return path

    def memory_current(self, pid: int) -> int | None:
        """Bytes charged to the worker's cgroup (all its descendants), or None if unknown."""
        path = self._mine_path(pid)
        if path is None:
            return None
        try:
            return int((path / "memory.current").read_text())
        except (OSError, ValueError):  # the memory controller is not enabled for our children
            return None

    def kill(self, pid: int) -> bool:
        """SIGKILL everything in the worker's cgroup; False if it has none."""
        path = self._mine_path(pid)
        return path is not None and _write_kill(path)

    def gone(self, pid: int) -> None:
        """The worker has exited: kill what is left in its cgroup (a ``setsid`` daemon that
        escaped its process group) and remove the cgroup, now or, while the killed
        processes are still exiting, at a later call or at :meth:`close`."""
        path = self._mine_path(pid)
        if path is not None and _write_kill(path):
            # The killed processes exit within milliseconds; a cgroup is removable once
            # they have. Waited for briefly here (this is the manager thread), else later.
            deadline = time.monotonic() + _EMPTY_WAIT_S
            while _populated(path) and time.monotonic() < deadline:
                time.sleep(0.001)
        self.discard(pid)
        self._remove_stale()

    def discard(self, pid: int) -> None:
        """Forget a worker; remove its cgroup if empty (else later: see :meth:`gone`)."""
        self._mine.discard(pid)
        with _placed_lock:
            path = _placed.pop(pid, None)
        if path is not None and not _rmdir(path):
            self._stale.add(path)

    def close(self) -> None:
        """Kill what is left in our workers' cgroups and remove them."""
        for pid in list(self._mine):
            self.kill(pid)
            self.discard(pid)
        self._remove_stale(kill=True)

    def _remove_stale(self, *, kill: bool = False) -> None:
        for path in list(self._stale):
            if kill:
                _write_kill(path)
            if _rmdir(path) or not path.exists():
                self._stale.discard(path)

    def _mine_path(self, pid: int) -> Path | None:
        if pid not in self._mine:
            return None
        with _placed_lock:
            return _placed.get(pid)


def kill_placed(pid: int) -> bool:
    """SIGKILL every process in ``pid``'s cgroup if it was placed in one (``reaper.kill_tree`` calls this)."""
    with _placed_lock:
        path = _placed.get(pid)
    return path is not None and _write_kill(path)


def _write_kill(path: Path) -> bool:
    try:
        (path / "cgroup.kill").write_text("1\n")
    except OSError:
        return False
    return True


def _populated(path: Path) -> bool:
    """Is a process left in the cgroup (``populated 1`` in ``cgroup.events``)?"""
    try:
        return "populated 1" in (path / "cgroup.events").read_text()
    except OSError:
        return False


def _rmdir(path: Path) -> bool:
    try:
        path.rmdir()  # a cgroup directory is removed with rmdir, once no process is left in it
    except OSError:
        return False
    return True
