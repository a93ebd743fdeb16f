"""Probes: how the supervisor measures a worker, one per backend.

A probe turns whatever a backend can see of a worker into a :class:`Reading` (bytes
of memory, cumulative CPU seconds); :class:`~resilpool.supervisor.monitor.Limiter`
turns readings into decisions the same way for every backend.

- :class:`PsutilProbe`: a local worker's whole process tree, read with psutil
  (``/proc`` on Linux for the tree's members).
- :class:`DaskMetricsProbe`: a Dask worker as its heartbeats report it to the
  scheduler (``memory`` in bytes, ``cpu`` in percent), with the percentages integrated
  into CPU seconds so both probes feed the same CPU history.

Each probe is owned by the one thread that samples with it (the monitor thread, the
Dask core thread); nothing here is shared.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import psutil

__all__ = ["CpuHistory", "DaskMetricsProbe", "PsutilProbe", "Reading", "Sample"]

_CHILDREN_EVERY_S = 1.0  # how often a worker's descendants are looked up (a /proc scan)


@dataclass(frozen=True, slots=True)
class Sample:
    """Last measurement of one worker, for ``ResilientPool.workers()``."""

    rss: int
    cpu_percent: float | None


@dataclass(frozen=True, slots=True)
class Reading:
    """What a probe measured of one worker: resident bytes and cumulative CPU seconds."""

    rss: int
    cpu_s: float


class CpuHistory:
    """A worker's cumulative CPU seconds over time, to tell a stalled task from a busy one.

    ``record`` adds a reading; ``window`` is the CPU the worker used over the last
    ``span_s`` seconds.  When a reading is lower than the one before (the tree lost CPU
    time it had counted: a subprocess reaped outside it, a member that vanished mid-read,
    a restarted metrics source) the history starts over, so no stall is ever called on
    a negative difference.
    """

    __slots__ = ("_hist", "_keep_s")

    def __init__(self, keep_s: float) -> None:
        self._keep_s = keep_s  # how much history to hold: the longest window asked + a margin
        self._hist: deque[tuple[float, float]] = deque()  # (now, cumulative CPU seconds)

    def record(self, now: float, cpu_s: float) -> float | None:
        """Add a reading; return the CPU % since the previous one (None: none to compare)."""
        hist = self._hist
        prev = hist[-1] if hist else None
        if prev is not None and cpu_s < prev[1]:
            hist.clear()
            prev = None
        hist.append((now, cpu_s))
        while len(hist) > 2 and hist[1][0] <= now - self._keep_s:
            hist.popleft()
        if prev is None or now <= prev[0]:
            return None
        return 100.0 * (cpu_s - prev[1]) / (now - prev[0])

    def amend(self, cpu_s: float) -> None:
        """Raise the newest reading to ``cpu_s`` (a second look at the same moment found more)."""
        if self._hist:
            now, old = self._hist[-1]
            self._hist[-1] = (now, max(old, cpu_s))

    def window(self, now: float, span_s: float) -> float | None:
        """CPU seconds used since the newest reading at least ``span_s`` old (None: too little history)."""
        hist = self._hist
        if not hist or hist[0][0] > now - span_s:
            return None
        base = hist[0]
        for t, c in hist:
            if t <= now - span_s:
                base = (t, c)
            else:
                break
        return hist[-1][1] - base[1]


@dataclass(slots=True, eq=False)
class _Tree:
    proc: psutil.Process
    members: list[psutil.Process] = field(default_factory=list)
    members_at: float = -1e9


class PsutilProbe:
    """Measures local workers' process trees with psutil. Owned by the monitor thread."""

    def __init__(self) -> None:
        self._trees: dict[int, _Tree] = {}

    def measure(self, pid: int, now: float, *, rescan: bool = False) -> Reading | None:
        """RSS (bytes) and CPU seconds of the worker's process tree, or None if it is gone.

        CPU counts each process's own time and the time of the children it has reaped
        (``children_user``/``children_system``), so the total does not drop when a
        task's subprocess exits: work done by a subprocess is not mistaken for a stall.
        ``rescan`` looks up the tree's members now rather than at most once a second.
        """
        tree = self._trees.get(pid)
        if tree is None:
            try:
                tree = self._trees[pid] = _Tree(psutil.Process(pid))
            except psutil.Error:
                return None
        try:
            with tree.proc.oneshot():
                rss = tree.proc.memory_info().rss
                cpu = _cpu_seconds(tree.proc.cpu_times())
        except psutil.Error:
            return None
        if rescan or now - tree.members_at >= _CHILDREN_EVERY_S:
            tree.members_at = now
            tree.members = _descendants(tree.proc)
        for child in tree.members:
            try:
                with child.oneshot():
                    rss += child.memory_info().rss
                    cpu += _cpu_seconds(child.cpu_times())
            except psutil.Error:
                continue
        return Reading(rss=int(rss), cpu_s=cpu)

    def rescanned_since(self, pid: int, now: float) -> bool:
        """Were the tree's members looked up at ``now`` or later?"""
        tree = self._trees.get(pid)
        return tree is not None and tree.members_at >= now

    def forget(self, pid: int) -> None:
        """Drop a worker (gone, or its pid now names a new worker)."""
        self._trees.pop(pid, None)

    def available_memory(self) -> int:
        return int(psutil.virtual_memory().available)

    def total_memory(self) -> int:
        return int(psutil.virtual_memory().total)


class DaskMetricsProbe:
    """Reads Dask workers from the scheduler's view of them. Owned by the Dask core thread.

    The scheduler reports each worker's ``memory`` (bytes) and ``cpu`` (percent of one
    CPU, averaged since its last heartbeat); the probe integrates the percentages into
    CPU seconds between two polls.
    """

    def __init__(self) -> None:
        self._cpu: dict[str, tuple[float, float]] = {}  # address -> (last poll, CPU seconds so far)

    def measure(self, address: str, now: float, metrics: dict[str, Any]) -> Reading:
        rss = int(metrics.get("memory") or 0)
        pct = metrics.get("cpu")
        last, cpu_s = self._cpu.get(address, (now, 0.0))
        if isinstance(pct, (int, float)) and now > last:
            cpu_s += max(0.0, float(pct)) / 100.0 * (now - last)
        self._cpu[address] = (now, cpu_s)
        return Reading(rss=rss, cpu_s=cpu_s)

    def forget(self, address: str) -> None:
        self._cpu.pop(address, None)


def _cpu_seconds(t: Any) -> float:
    """User + system time of a process and of the children it has reaped."""
    return float(t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0))


def _descendants(proc: psutil.Process) -> list[psutil.Process]:
    """Every process below ``proc``.

    On Linux this reads ``/proc/<pid>/task/<tid>/children`` for each thread: a few small
    files per worker, where psutil's ``children()`` scans every process on the machine
    (measured: most of the monitor's CPU). Elsewhere, psutil.
    """
    if not _PROC_CHILDREN or not os.path.isdir(f"/proc/{proc.pid}/task"):
        try:  # no /proc view of it (not Linux, or it is gone): let psutil decide
            return list(proc.children(recursive=True))
        except psutil.Error:
            return []
    out: list[psutil.Process] = []
    stack = [proc.pid]
    while stack:
        pid = stack.pop()
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue  # gone meanwhile
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    kids = f.read().split()
            except OSError:
                continue
            for kid in kids:
                try:
                    out.append(psutil.Process(int(kid)))
                except psutil.Error:
                    continue
                stack.append(int(kid))
    return out


_PROC_CHILDREN = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
