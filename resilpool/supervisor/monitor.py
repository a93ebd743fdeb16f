"""The monitor: one thread samples every worker with psutil and tells the core what to do.

It owns no task state.  Each tick it reads the core's published worker views and
slots (shared memory: which task runs since when), measures each worker's whole
process tree (RSS, CPU time), asks :func:`~resilpool.supervisor.policy.decide`
and sends the answer through the core's seams (``retire_worker``,
``kill_worker``, ``pause_dispatch``).  Owned by the monitor thread: ``_state``, ``_paused``;
published for other threads (replaced whole, never mutated): ``samples``.
The thread waits on ``stop_event.wait(interval)``: it never sleeps blindly.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from .. import errors
from ..events import ExitReason
from .limits import Limits
from .policy import Kill, Retire, WorkerSample, decide, lifetime_with_jitter

__all__ = ["Monitor", "Sample"]

log = logging.getLogger("resilpool")

_CHILDREN_EVERY_S = 1.0  # how often a worker's descendants are looked up (a /proc scan)


@dataclass(frozen=True, slots=True)
class Sample:
    """Last measurement of one worker, for ``ResilientPool.workers()``."""

    rss: int
    cpu_percent: float | None


@dataclass(slots=True, eq=False)
class _WorkerState:
    proc: psutil.Process
    spawned_at: float  # the view's, to tell a new worker from an old one with a reused pid
    lifetime_s: float | None
    members: list[psutil.Process] = field(default_factory=list)
    members_at: float = -1e9
    history: deque[tuple[float, float]] = field(default_factory=deque)  # (now, tree CPU seconds)
    retired: bool = False  # asked to retire: not again, but its last task is still watched
    killed: bool = False  # killed for memory: nothing more to decide
    killed_task: int = 0  # asked to kill while running this task (the kill may find it finished)


class Monitor:
    """Samples all workers at a fixed interval; acts on :class:`Limits`."""

    def __init__(
        self,
        get_core: Callable[[], Any],
        limits: Limits,
        interval_s: float,
        *,
        rng: random.Random | None = None,
        name: str = "resilpool",
    ) -> None:
        self._get_core = get_core
        self.limits = limits
        self.interval_s = interval_s
        self._rng = rng or random.Random()
        self._state: dict[int, _WorkerState] = {}
        self.samples: dict[int, Sample] = {}
        self.peak_rss = 0
        self._paused = False
        self._paused_core: Any = None
        self._stop = threading.Event()
        self._total_ram = psutil.virtual_memory().total
        self._thread = threading.Thread(target=self._run, name=f"{name}-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick(time.monotonic())
            except Exception:
                log.error("resilpool monitor tick failed", exc_info=True)

    # --- one pass ---------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Sample every worker once and act on the limits."""
        core = self._get_core()
        limits = self.limits
        samples: dict[int, Sample] = {}
        seen: set[int] = set()
        for view in core.worker_views():
            pid = view.pid
            seen.add(pid)
            st = self._state.get(pid)
            if st is None or st.spawned_at != view.spawned_at:
                try:
                    st = _WorkerState(psutil.Process(pid), view.spawned_at, lifetime_with_jitter(limits.max_lifetime, self._rng))
                except psutil.Error:
                    continue
                self._state[pid] = st
            measured = self._measure(st, now)
            if measured is None:
                continue
            rss, cpu = measured
            cpu_pct = self._record_cpu(st, now, cpu)
            samples[pid] = Sample(rss=rss, cpu_percent=cpu_pct)
            if rss > self.peak_rss:
                self.peak_rss = rss
            if st.killed:
                continue
            task_id, started, _ = core.read_slot(view.slot)
            if task_id and task_id == st.killed_task:
                continue
            action = self._decide(st, view, core, now, rss, task_id, started)
            if isinstance(action, Kill) and action.reason is ExitReason.STALL and st.members_at < now:
                # Calling a task hung is a strong claim: first look for subprocesses started
                # since the last scan (a task waiting on a busy child is not stalled).
                st.members_at = -1e9
                measured = self._measure(st, now)
                if measured is None:
                    continue
                rss, cpu = measured
                st.history[-1] = (now, max(cpu, st.history[-1][1]))
                action = self._decide(st, view, core, now, rss, task_id, started)
            if action is None:
                continue
            if isinstance(action, Kill):
                if action.task_id is not None:
                    st.killed_task = action.task_id
                else:
                    st.killed = True
            else:
                st.retired = True
            self._apply(core, action)
        for pid in list(self._state):
            if pid not in seen:
                del self._state[pid]
        self.samples = samples
        self._check_available(core)

    def _record_cpu(self, st: _WorkerState, now: float, cpu: float) -> float | None:
        """Add a CPU sample to the worker's history; return the tree's CPU % since the last one."""
        hist = st.history
        prev = hist[-1] if hist else None
        if prev is not None and cpu < prev[1]:
            # The tree lost CPU time it had counted (a subprocess reaped outside the tree,
            # a member that vanished mid-read): older samples no longer compare. Start over,
            # so no stall is called on a negative difference.
            hist.clear()
            prev = None
        hist.append((now, cpu))
        keep = (self.limits.stall_timeout or 0.0) + 2 * self.interval_s
        while len(hist) > 2 and hist[1][0] <= now - keep:
            hist.popleft()
        if prev is None or now <= prev[0]:
            return None
        return 100.0 * (cpu - prev[1]) / (now - prev[0])

    def _cpu_window(self, st: _WorkerState, now: float) -> float | None:
        """CPU seconds the tree used since the newest sample at least stall_timeout old (None: too little history)."""
        stall = self.limits.stall_timeout
        hist = st.history
        if stall is None or not hist or hist[0][0] > now - stall:
            return None
        base = hist[0]
        for t, c in hist:
            if t <= now - stall:
                base = (t, c)
            else:
                break
        return hist[-1][1] - base[1]

    def _decide(self, st: _WorkerState, view: Any, core: Any, now: float, rss: int, task_id: int, started: float | None) -> Kill | Retire | None:
        sample = WorkerSample(
            pid=view.pid,
            rss=rss,
            age_s=now - view.spawned_at,
            lifetime_s=st.lifetime_s,
            task_id=task_id,
            task_started=started,
            task_timeout=core.task_timeouts.get(task_id) if task_id else None,
            cpu_window_s=self._cpu_window(st, now),
            # Retired but not yet shown so: never retire twice, but keep watching its last task.
            retiring=view.retiring or st.retired,
        )
        return decide(sample, self.limits, now)

    def _measure(self, st: _WorkerState, now: float) -> tuple[int, float] | None:
        """RSS (bytes) and CPU seconds of the worker's process tree, or None if it is gone.

        CPU counts each process's own time and the time of the children it has reaped
        (``children_user``/``children_system``), so the total does not drop when a
        task's subprocess exits: work done by a subprocess is not mistaken for a stall.
        """
        try:
            with st.proc.oneshot():
                rss = st.proc.memory_info().rss
                cpu = _cpu_seconds(st.proc.cpu_times())
        except psutil.Error:
            return None
        if now - st.members_at >= _CHILDREN_EVERY_S:
            st.members_at = now
            st.members = _descendants(st.proc)
        for child in st.members:
            try:
                with child.oneshot():
                    rss += child.memory_info().rss
                    cpu += _cpu_seconds(child.cpu_times())
            except psutil.Error:
                continue
        return rss, cpu

    def _apply(self, core: Any, action: Kill | Retire) -> None:
        if isinstance(action, Retire):
            log.info("retiring worker %d after its current task (%s)", action.pid, action.reason.value)
            core.retire_worker(action.pid, action.reason)
            return
        a = action
        if a.reason is ExitReason.MEMORY:
            log.warning("worker %d uses %d bytes, over max_rss %d: killing it", a.pid, a.rss, a.limit)

            def make(task: Any, elapsed: float) -> BaseException:
                return errors.MemoryLimitError(pid=a.pid, rss=a.rss, limit=a.limit, task_id=task.id)

        elif a.reason is ExitReason.TIMEOUT:
            log.warning("task %s on worker %d ran %.1fs, over its timeout %.1fs: killing the worker", a.task_id, a.pid, a.elapsed, a.timeout)

            def make(task: Any, elapsed: float) -> BaseException:
                return errors.TaskTimeoutError(pid=a.pid, timeout=a.timeout, elapsed=max(elapsed, a.elapsed), task_id=task.id)

        else:
            log.warning("task %s on worker %d stalled (%.3fs CPU in %.1fs): killing the worker", a.task_id, a.pid, a.cpu_s, a.timeout)

            def make(task: Any, elapsed: float) -> BaseException:
                return errors.TaskStalledError(pid=a.pid, timeout=a.timeout, elapsed=max(elapsed, a.elapsed), task_id=task.id, cpu_seconds=a.cpu_s)

        core.kill_worker(a.pid, a.reason, make, task_id=a.task_id)

    def _check_available(self, core: Any) -> None:
        floor = self.limits.min_available_bytes(self._total_ram)
        if floor is None:
            return
        if self._paused and self._paused_core is not core:
            self._paused = False  # a rebuilt core starts unpaused: judge it afresh
        avail = psutil.virtual_memory().available
        if not self._paused and avail < floor:
            self._paused = True
            self._paused_core = core
            core.pause_dispatch(f"available memory {avail / 2**20:.0f} MiB is below min_available {floor / 2**20:.0f} MiB")
        elif self._paused and avail > floor * 1.1:  # hysteresis: do not flap around the floor
            self._paused = False
            self._paused_core = None
            core.resume_dispatch()


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
            return proc.children(recursive=True)
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
