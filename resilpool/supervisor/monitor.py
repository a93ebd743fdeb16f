"""The supervisor loop: the limit decisions shared by every backend, and the local monitor.

:class:`Limiter` turns what a probe measured of each worker (:mod:`.probes`) into the
one action the limits call for, with the per-worker memory of what was already asked
(retire once; kill once).  It is the same for local workers and Dask workers: the local
:class:`Monitor` feeds it from a :class:`~.probes.PsutilProbe` on its own thread, the
Dask core's poller from a :class:`~.probes.DaskMetricsProbe` on the core thread.

The :class:`Monitor` owns no task state.  Each tick it reads the core's published
worker views and slots (shared memory: which task runs since when), measures each
worker's whole process tree, asks its :class:`Limiter`, and sends the answer through
the core's seams (``retire_worker``, ``kill_worker``, ``pause_dispatch``).  Owned by
the monitor thread: ``_limiter``, ``_probe``, ``_spawned``, ``_paused``; published for
other threads (replaced whole, never mutated): ``samples``.  The thread waits on
``stop_event.wait(interval)``: it never sleeps blindly.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..events import ExitReason
from .limits import Limits
from .policy import Kill, Retire, WorkerSample, decide, lifetime_with_jitter
from .probes import CpuHistory, PsutilProbe, Reading, Sample

__all__ = ["Limiter", "Monitor", "Running", "Sample", "describe_kill"]

log = logging.getLogger("resilpool")


@dataclass(frozen=True, slots=True, kw_only=True)
class Running:
    """A task running on a worker, as the backend knows it."""

    task_id: int
    started: float  #: monotonic start of the attempt
    timeout: float | None  #: the task's own timeout override, else None


@dataclass(slots=True, eq=False)
class _Watched:
    spawned_at: float  # to tell a new worker from an old one under the same key (a reused pid)
    lifetime_s: float | None  # this worker's jittered max_lifetime
    cpu: CpuHistory
    retired: bool = False  # asked to retire: not again, but its last task is still watched
    killed: bool = False  # killed as a whole (memory): nothing more to decide
    killed_tasks: set[int] = field(default_factory=set)  # asked to kill while running these


class Limiter:
    """The limit decisions for a set of workers, the same for every backend.

    Keeps per worker (keyed as the backend names it: a pid locally, an address on Dask)
    its CPU history, its jittered lifetime and what was already asked.  Owned by the one
    thread that samples.

    Invariants: a worker is asked to retire at most once; a worker killed as a whole
    (``Kill.task_id is None``) gets no further action; while a task it was asked to
    kill still runs there, the worker gets no further action (it is dying).
    """

    def __init__(self, limits: Limits, interval_s: float, rng: random.Random | None = None) -> None:
        self.limits = limits
        self._keep_s = (limits.stall_timeout or 0.0) + 2 * interval_s
        self._rng = rng or random.Random()
        self._workers: dict[Hashable, _Watched] = {}

    def judge(
        self,
        key: Hashable,
        now: float,
        reading: Reading,
        *,
        pid: int,
        spawned_at: float,
        running: Sequence[Running],
        retiring: bool,
        recheck: Callable[[], Reading | None] | None = None,
    ) -> tuple[float | None, Kill | Retire | None]:
        """Record ``reading`` and decide; returns ``(CPU % since the last reading, action)``.

        ``recheck`` measures the worker again: calling a task stalled is a strong claim,
        so before that the worker is looked at once more (a task waiting on a busy
        subprocess started since the last scan is not stalled).
        """
        w = self._workers.get(key)
        if w is None or w.spawned_at != spawned_at:
            w = self._workers[key] = _Watched(spawned_at, lifetime_with_jitter(self.limits.max_lifetime, self._rng), CpuHistory(self._keep_s))
        cpu_percent = w.cpu.record(now, reading.cpu_s)
        if w.killed:
            return cpu_percent, None
        ids = {r.task_id for r in running}
        w.killed_tasks &= ids
        if w.killed_tasks:
            return cpu_percent, None
        action = self._decide(w, now, reading.rss, pid, spawned_at, running, retiring)
        if isinstance(action, Kill) and action.reason is ExitReason.STALL and recheck is not None:
            fresh = recheck()
            if fresh is None:
                return cpu_percent, None  # gone meanwhile
            w.cpu.amend(fresh.cpu_s)
            action = self._decide(w, now, fresh.rss, pid, spawned_at, running, retiring)
        if isinstance(action, Kill):
            if action.task_id is None:
                w.killed = True
            else:
                w.killed_tasks.add(action.task_id)
        elif action is not None:
            w.retired = True
        return cpu_percent, action

    def keep_only(self, keys: Iterable[Hashable]) -> None:
        """Forget every worker not in ``keys`` (gone)."""
        keep = set(keys)
        for key in [k for k in self._workers if k not in keep]:
            del self._workers[key]

    def _decide(
        self, w: _Watched, now: float, rss: int, pid: int, spawned_at: float, running: Sequence[Running], retiring: bool
    ) -> Kill | Retire | None:
        stall = self.limits.stall_timeout
        cpu_window = w.cpu.window(now, stall) if stall is not None else None
        for r in running or (None,):
            sample = WorkerSample(
                pid=pid,
                rss=rss,
                age_s=now - spawned_at,
                lifetime_s=w.lifetime_s,
                task_id=r.task_id if r is not None else 0,
                task_started=r.started if r is not None else None,
                task_timeout=r.timeout if r is not None else None,
                cpu_window_s=cpu_window,
                # Retired but not yet shown so: never retire twice, but keep watching its last task.
                retiring=retiring or w.retired,
            )
            action = decide(sample, self.limits, now)
            if action is not None:
                return action
        return None


def describe_kill(a: Kill, worker: str) -> str:
    """The log line of a kill the limits call for; ``worker`` names the worker."""
    if a.reason is ExitReason.MEMORY:
        return f"{worker} uses {a.rss} bytes, over max_rss {a.limit}: killing it"
    if a.reason is ExitReason.TIMEOUT:
        return f"task {a.task_id} on {worker} ran {a.elapsed:.1f}s, over its timeout {a.timeout:.1f}s: killing the worker"
    return f"task {a.task_id} on {worker} stalled ({a.cpu_s:.3f}s CPU in {a.timeout:.1f}s): killing the worker"


class Monitor:
    """Samples all local workers at a fixed interval; acts on :class:`Limits`."""

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
        self._limiter = Limiter(limits, interval_s, rng)
        self._probe = PsutilProbe()
        self._spawned: dict[int, float] = {}  # pid -> spawned_at of the worker the probe follows
        self.samples: dict[int, Sample] = {}
        self.peak_rss = 0
        self._paused = False
        self._paused_core: Any = None
        self._stop = threading.Event()
        self._total_ram = self._probe.total_memory()
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
        probe = self._probe
        samples: dict[int, Sample] = {}
        seen: set[int] = set()
        for view in core.worker_views():
            pid = view.pid
            seen.add(pid)
            if self._spawned.get(pid) != view.spawned_at:
                probe.forget(pid)  # a new worker under a reused pid
                self._spawned[pid] = view.spawned_at
            reading = probe.measure(pid, now)
            if reading is None:
                continue
            task_id, started, _ = core.read_slot(view.slot)
            running = [] if not task_id or started is None else [Running(task_id=task_id, started=started, timeout=core.task_timeouts.get(task_id))]

            def recheck(pid: int = pid) -> Reading | None:
                return probe.measure(pid, now, rescan=True)

            cpu_percent, action = self._limiter.judge(
                pid,
                now,
                reading,
                pid=pid,
                spawned_at=view.spawned_at,
                running=running,
                retiring=view.retiring,
                recheck=None if probe.rescanned_since(pid, now) else recheck,
            )
            samples[pid] = Sample(rss=reading.rss, cpu_percent=cpu_percent)
            if reading.rss > self.peak_rss:
                self.peak_rss = reading.rss
            if action is not None:
                self._apply(core, action)
        for pid in [p for p in self._spawned if p not in seen]:
            del self._spawned[pid]
            probe.forget(pid)
        self._limiter.keep_only(seen)
        self.samples = samples
        self._check_available(core)

    def _apply(self, core: Any, action: Kill | Retire) -> None:
        if isinstance(action, Retire):
            log.info("retiring worker %d after its current task (%s)", action.pid, action.reason.value)
            core.retire_worker(action.pid, action.reason)
            return
        a = action
        log.warning("%s", describe_kill(a, f"worker {a.pid}"))
        core.kill_worker(a)  # the core maps it to its task's error: Kill.to_error

    def _check_available(self, core: Any) -> None:
        floor = self.limits.min_available_bytes(self._total_ram)
        if floor is None:
            return
        if self._paused and self._paused_core is not core:
            self._paused = False  # a rebuilt core starts unpaused: judge it afresh
        avail = self._probe.available_memory()
        if not self._paused and avail < floor:
            self._paused = True
            self._paused_core = core
            core.pause_dispatch(f"available memory {avail / 2**20:.0f} MiB is below min_available {floor / 2**20:.0f} MiB")
        elif self._paused and avail > floor * 1.1:  # hysteresis: do not flap around the floor
            self._paused = False
            self._paused_core = None
            core.resume_dispatch()
