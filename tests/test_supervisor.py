"""The supervisor with real pools: limits recycle or kill workers, and say so.

Each test proves one item of the supervisor issue's acceptance list and then
checks that the pool still runs tasks.  Ordering comes from files written by the
tasks (``started``/``release``) and from events; ``wait_until`` polls state the
test cannot be told about (a worker being retired, an event arriving).  No test
asserts how fast anything happened, only what happened.

The last section drives :class:`~resilpool.supervisor.monitor.Monitor` by hand
with a fake core, fake processes and a fake clock (``min_available`` and the
CPU accounting behind ``stall_timeout``), so no memory has to be exhausted.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import random
import time
import types
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from pathlib import Path
from typing import Any

import psutil
import pytest
import workload
from conftest import RESULT_TIMEOUT, wait_until

from resilpool import (
    ExitReason,
    Limits,
    MemoryLimitError,
    ResilientPool,
    TaskStalledError,
    TaskTimeoutError,
    WorkerCrashedError,
)
from resilpool._core.executor import WorkerView
from resilpool.events import DispatchPaused, DispatchResumed, Event, WorkerExited, WorkerStarted
from resilpool.supervisor import monitor as monitor_mod
from resilpool.supervisor import probes as probes_mod
from resilpool.supervisor.policy import STALL_CPU_FRACTION, Kill

MiB = 2**20
GiB = 2**30

MakePool = Callable[..., ResilientPool]


# --- helpers ----------------------------------------------------------------------


def result(fut: Future[Any], timeout: float = RESULT_TIMEOUT) -> Any:
    """``fut.result()`` with a timeout; if the task never finishes, dump every stack and fail."""
    done, _ = wait_futures([fut], timeout=timeout)
    if not done:
        faulthandler.dump_traceback(all_threads=True)
        pytest.fail(f"no result within {timeout}s")
    return fut.result(timeout=0)


def error(fut: Future[Any], timeout: float = RESULT_TIMEOUT) -> BaseException:
    """The exception a task failed with (fails the test if it succeeded or never finished)."""
    done, _ = wait_futures([fut], timeout=timeout)
    if not done:
        faulthandler.dump_traceback(all_threads=True)
        pytest.fail(f"no outcome within {timeout}s")
    exc = fut.exception(timeout=0)
    assert exc is not None, f"expected the task to fail, it returned {fut.result(timeout=0)!r}"
    return exc


class Events:
    """Every event a pool delivers to its listeners, in order."""

    def __init__(self, pool: ResilientPool) -> None:
        self.items: list[Event] = []
        pool.add_listener(self.items.append)  # list.append is atomic: safe on the event thread

    def started(self) -> list[WorkerStarted]:
        return [e for e in list(self.items) if isinstance(e, WorkerStarted)]

    def exited(self, reason: ExitReason | None = None, pid: int | None = None) -> list[WorkerExited]:
        return [
            e
            for e in list(self.items)
            if isinstance(e, WorkerExited) and (reason is None or e.reason is reason) and (pid is None or e.pid == pid)
        ]

    def wait_exit(self, reason: ExitReason, pid: int | None = None) -> WorkerExited:
        found = wait_until(lambda: self.exited(reason, pid), what=f"a WorkerExited event ({reason.value}, pid {pid})")
        assert len(found) == 1, found
        return found[0]

    def of(self, cls: type[Any]) -> list[Any]:
        return [e for e in list(self.items) if isinstance(e, cls)]


def alive(pid: int) -> bool:
    """Is ``pid`` a running process (a zombie waiting for a reaper does not count)?"""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def assert_usable(pool: ResilientPool) -> None:
    """The pool still runs tasks and returns their results."""
    assert [result(f) for f in [pool.submit(workload.add, i, 10) for i in range(4)]] == [10, 11, 12, 13]


def busy_worker(pool: ResilientPool) -> Any:
    busy = [w for w in pool.workers() if w.task_id is not None]
    return busy[0] if len(busy) == 1 else None


# --- soft_max_rss: retire after the task, keep its result -----------------------------


def test_soft_max_rss_retires_after_the_task_and_keeps_its_result(make_pool: MakePool, tmp_path: Path) -> None:
    pool = make_pool(1, limits=Limits(soft_max_rss="150MiB"))
    events = Events(pool)
    started, release = tmp_path / "started", tmp_path / "release"
    fut = pool.submit(workload.leak_and_wait, 200, str(started), str(release))
    wait_until(started.exists, what="the leaking task to start")
    old = int(started.read_text())

    def retired_and_replaced() -> bool:
        ws = {w.pid: w for w in pool.workers()}
        replacement = [w for w in ws.values() if w.pid != old and w.ready and not w.retiring]
        return old in ws and ws[old].retiring and bool(replacement)

    # Over soft_max_rss mid-task: retired, not killed; its replacement is up before it leaves.
    wait_until(retired_and_replaced, what="the leaky worker retired and its replacement ready")
    snapshot = {w.pid: w for w in pool.workers()}
    assert snapshot[old].task_id is not None  # still running its task
    assert not fut.done()
    assert pool.stats().workers == 1  # capacity stays constant: one ready, non-retiring worker

    release.touch()
    assert result(fut) == old  # the result is kept
    exited = events.wait_exit(ExitReason.SOFT_MEMORY, pid=old)
    assert exited.task_id is None  # it cost no task
    assert exited.exitcode == 0
    assert result(pool.submit(workload.pid_of)) != old
    stats = pool.stats()
    assert stats.recycled.get("soft_memory") == 1
    assert stats.completed == 2 and stats.failed == 0 and stats.worker_crashes == 0
    assert stats.peak_worker_rss > 150 * MiB
    assert_usable(pool)


def test_replacement_of_a_retired_worker_names_it(make_pool: MakePool, tmp_path: Path) -> None:
    pool = make_pool(1, limits=Limits(soft_max_rss="150MiB"))
    events = Events(pool)
    started, release = tmp_path / "started", tmp_path / "release"
    fut = pool.submit(workload.leak_and_wait, 200, str(started), str(release))
    wait_until(started.exists, what="the leaking task to start")
    old = int(started.read_text())
    wait_until(lambda: [e for e in events.started() if e.pid != old], what="the replacement to start")
    release.touch()
    assert result(fut) == old
    (replacement,) = [e for e in events.started() if e.pid != old]
    assert replacement.replaces == old


def test_leaking_tasks_are_recycled_under_soft_max_rss_with_results_intact(make_pool: MakePool) -> None:
    soft = 150 * MiB
    pool = make_pool(1, limits=Limits(soft_max_rss=soft))
    events = Events(pool)
    runs: list[tuple[int, int]] = []
    for i in range(12):
        tag, pid, rss = result(pool.submit(workload.leak_and_report, 40, i))
        assert tag == i  # every result correct
        runs.append((pid, rss))
        if rss > soft:
            # The worker is over the soft limit: the supervisor retires it (the task is done).
            wait_until(
                lambda: all(w.pid != pid or w.retiring for w in pool.workers()),
                what=f"worker {pid} ({rss / MiB:.0f} MiB) to be retired",
            )
    pids = list(dict.fromkeys(pid for pid, _ in runs))
    assert len(pids) >= 2, "the worker pid never changed"
    over = {pid for pid, rss in runs if rss > soft}
    assert over, "no worker ever grew over soft_max_rss"
    for pid in over:
        e = events.wait_exit(ExitReason.SOFT_MEMORY, pid=pid)
        assert e.task_id is None
    wait_until(lambda: pool.stats().recycled.get("soft_memory", 0) >= len(over), what="stats to count the retirements")
    stats = pool.stats()
    assert stats.completed == 12 and stats.failed == 0
    assert stats.recycled.get("soft_memory") == len(events.exited(ExitReason.SOFT_MEMORY))
    assert_usable(pool)


# --- max_rss: kill at once with MemoryLimitError -----------------------------------------


def test_max_rss_kills_a_memory_hog_with_memory_limit_error(make_pool: MakePool) -> None:
    limit = 200 * MiB
    pool = make_pool(1, limits=Limits(max_rss="200MiB"))
    events = Events(pool)
    fut = pool.submit(workload.hog, 400)
    err = error(fut)
    assert type(err) is MemoryLimitError
    assert err.limit == limit
    assert err.rss is not None and err.rss > limit
    assert "max_rss" in str(err)
    exited = events.wait_exit(ExitReason.MEMORY)
    assert (exited.pid, exited.task_id) == (err.pid, err.task_id)
    assert exited.exitcode is not None and exited.exitcode < 0  # killed
    assert not alive(err.pid)
    stats = pool.stats()
    assert stats.recycled.get("memory") == 1 and stats.failed == 1
    assert stats.peak_worker_rss > limit
    assert_usable(pool)


def test_subprocess_memory_counts_and_the_kill_takes_the_subprocess(make_pool: MakePool, start_method: str, tmp_path: Path) -> None:
    # A forked worker's RSS starts at about this process's (the pages it shares), and an
    # xdist process that ran many tests is large (CI on 3.12: a fork worker at 107 MiB):
    # the limit leaves the worker that much room above its start.
    inherited = psutil.Process().memory_info().rss if start_method == "fork" else 0
    limit = 200 * MiB + 2 * inherited
    pool = make_pool(1, mp_context=start_method, limits=Limits(max_rss=limit))
    child_pidfile, worker_rss = tmp_path / "child.pid", tmp_path / "worker.rss"
    fut = pool.submit(workload.subprocess_hog_reporting, 2 * limit // MiB, str(child_pidfile), str(worker_rss))
    err = error(fut)
    assert type(err) is MemoryLimitError
    assert err.limit == limit and err.rss is not None and err.rss > limit
    # The worker alone was far below the limit: only its subprocess's memory can have put it over.
    assert int(worker_rss.read_text()) < limit // 2
    child = int(child_pidfile.read_text())  # written before the child took its memory
    wait_until(lambda: not alive(child), what=f"the task's subprocess {child} to be gone")
    assert not alive(err.pid)
    assert_usable(pool)


def test_timeout_kill_takes_the_subprocess_too(make_pool: MakePool, tmp_path: Path) -> None:
    pool = make_pool(1, limits=Limits(task_timeout=0.5))
    child_pidfile, worker_rss = tmp_path / "child.pid", tmp_path / "worker.rss"
    fut = pool.submit(workload.subprocess_hog_reporting, 1, str(child_pidfile), str(worker_rss))
    wait_until(child_pidfile.exists, what="the task's subprocess to start")
    child = int(child_pidfile.read_text())
    err = error(fut)
    assert type(err) is TaskTimeoutError
    wait_until(lambda: not alive(child), what=f"the task's subprocess {child} to be gone")
    assert_usable(pool)


# --- task_timeout: TaskTimeoutError, counted from the task's start ---------------------------


def test_task_timeout_from_limits_kills_the_worker(make_pool: MakePool, start_method: str) -> None:
    pool = make_pool(1, mp_context=start_method, limits=Limits(task_timeout=0.5))
    events = Events(pool)
    err = error(pool.submit(workload.sleep_for, 30))
    assert type(err) is TaskTimeoutError
    assert isinstance(err, TimeoutError)
    assert err.timeout == 0.5
    assert err.elapsed is not None and err.elapsed >= 0.5
    exited = events.wait_exit(ExitReason.TIMEOUT)
    assert (exited.pid, exited.task_id) == (err.pid, err.task_id)
    assert not alive(err.pid)
    assert pool.stats().recycled.get("timeout") == 1
    assert_usable(pool)


def test_task_timeout_per_task_with_options(make_pool: MakePool) -> None:
    pool = make_pool(1)  # no pool-wide timeout
    events = Events(pool)
    fut = pool.options(task_timeout=0.5).submit(workload.sleep_for, 30)
    plain = pool.submit(workload.inc, 1)  # queued behind it, no timeout of its own
    err = error(fut)
    assert type(err) is TaskTimeoutError and isinstance(err, TimeoutError)
    assert err.timeout == 0.5
    assert result(plain) == 2
    exited = events.wait_exit(ExitReason.TIMEOUT)
    assert exited.task_id == err.task_id
    assert_usable(pool)


def test_timeout_counts_from_the_task_start_not_its_submission(make_pool: MakePool, tmp_path: Path) -> None:
    timeout = 0.5
    pool = make_pool(1, limits=Limits(task_timeout=timeout))
    events = Events(pool)
    started, release = tmp_path / "started", tmp_path / "release"
    # The blocker's own, longer timeout overrides the pool's.
    blocker = pool.options(task_timeout=60).submit(workload.touch_and_wait, str(started), str(release))
    queued = [pool.submit(workload.add, i, 100) for i in range(3)]
    wait_until(started.exists, what="the blocker to start")

    def queued_for_long() -> bool:
        w = busy_worker(pool)
        return w is not None and time.monotonic() - w.running_since > 4 * timeout

    # Hold the queue until the queued tasks have waited several of their timeouts.
    wait_until(queued_for_long, what="the queued tasks to wait past their timeout")
    assert not any(f.done() for f in queued)
    release.touch()
    pid = result(blocker)
    assert [result(f) for f in queued] == [100, 101, 102]
    assert events.exited(ExitReason.TIMEOUT) == []
    stats = pool.stats()
    assert "timeout" not in stats.recycled and stats.failed == 0
    assert [w.pid for w in pool.workers()] == [pid]  # nobody was killed


# --- stall_timeout: TaskStalledError for a hung task, never for a busy one ------------------


@pytest.mark.parametrize("fn", [workload.block_on_lock, workload.stop_self], ids=["lock", "sigstop"])
def test_stalled_task_fails_with_task_stalled_error(make_pool: MakePool, fn: Callable[..., Any]) -> None:
    pool = make_pool(1, limits=Limits(stall_timeout=1.0))
    events = Events(pool)
    err = error(pool.submit(fn))
    assert type(err) is TaskStalledError
    assert isinstance(err, TaskTimeoutError) and isinstance(err, TimeoutError)
    assert err.timeout == 1.0
    assert err.cpu_seconds is not None and 0.0 <= err.cpu_seconds < STALL_CPU_FRACTION * 1.0
    exited = events.wait_exit(ExitReason.STALL)
    assert (exited.pid, exited.task_id) == (err.pid, err.task_id)
    assert not alive(err.pid)
    assert pool.stats().recycled.get("stall") == 1
    assert_usable(pool)


def test_busy_task_working_through_a_subprocess_is_not_stalled(make_pool: MakePool) -> None:
    # CPU spent first in a subprocess (the worker waits on it), then in the worker after the
    # subprocess exited: the tree is busy all along, so nothing is stalled.
    pool = make_pool(1, limits=Limits(stall_timeout=1.0))
    events = Events(pool)
    pid = result(pool.submit(workload.burn_in_subprocess_then_here, 1.5, 1.5))
    assert events.exited() == []
    assert [w.pid for w in pool.workers()] == [pid]
    assert pool.stats().failed == 0


# --- max_tasks and max_lifetime: replaced between tasks ---------------------------------------


def test_max_tasks_no_worker_runs_more_than_its_share(make_pool: MakePool) -> None:
    pool = make_pool(2, limits=Limits(max_tasks=5))
    events = Events(pool)
    out = [result(f) for f in [pool.submit(workload.pid_and_start, i) for i in range(23)]]
    assert [tag for tag, _, _ in out] == list(range(23))
    per_pid = Counter(pid for _, pid, _ in out)
    assert max(per_pid.values()) <= 5, per_pid
    assert len(per_pid) >= 5
    full = {pid for pid, n in per_pid.items() if n == 5}
    wait_until(lambda: {e.pid for e in events.exited(ExitReason.MAX_TASKS)} == full, what="a max_tasks exit per full worker")
    assert pool.stats().recycled.get("max_tasks") == len(full)
    assert not full & {w.pid for w in pool.workers()}
    assert all(e.task_id is None and e.exitcode == 0 for e in events.exited())
    assert_usable(pool)


def test_max_tasks_retirement_is_logged(make_pool: MakePool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="resilpool")
    pool = make_pool(1, limits=Limits(max_tasks=1))
    events = Events(pool)
    pid = result(pool.submit(workload.pid_of))
    events.wait_exit(ExitReason.MAX_TASKS, pid=pid)
    assert any(r.name == "resilpool" and str(pid) in r.getMessage() and "max_tasks" in r.getMessage() for r in caplog.records)


def test_max_lifetime_replaces_workers_between_tasks(make_pool: MakePool, tmp_path: Path) -> None:
    pool = make_pool(1, limits=Limits(max_lifetime=1.0))
    events = Events(pool)
    started, release = tmp_path / "started", tmp_path / "release"
    fut = pool.submit(workload.touch_and_wait, str(started), str(release))
    wait_until(started.exists, what="the task to start")
    old = wait_until(lambda: busy_worker(pool), what="the worker to show its task").pid
    # The worker outlives its (jittered) lifetime while its task runs: retired, not interrupted.
    wait_until(lambda: any(w.pid == old and w.retiring for w in pool.workers()), what="the worker to outlive its lifetime")
    assert not fut.done()
    release.touch()
    assert result(fut) == old
    exited = events.wait_exit(ExitReason.LIFETIME, pid=old)
    assert exited.task_id is None and exited.exitcode == 0
    out = [result(f) for f in [pool.submit(workload.pid_and_start, i) for i in range(6)]]
    assert [tag for tag, _, _ in out] == list(range(6))
    assert old not in {pid for _, pid, _ in out}
    assert pool.stats().recycled.get("lifetime", 0) >= 1
    assert pool.stats().failed == 0


def test_a_worker_retired_for_its_lifetime_still_times_out_its_task(make_pool: MakePool) -> None:
    # Regression: the monitor stopped watching a worker once it had asked to retire it,
    # so a task that hung on a retiring worker was never timed out.
    pool = make_pool(1, limits=Limits(max_lifetime=0.3, task_timeout=1.0))
    events = Events(pool)
    err = error(pool.submit(workload.sleep_for, 30))
    assert type(err) is TaskTimeoutError and err.timeout == 1.0
    assert events.wait_exit(ExitReason.TIMEOUT).pid == err.pid
    assert_usable(pool)


# --- observability: workers(), stats() and events agree --------------------------------------


def test_workers_snapshot_describes_each_worker(make_pool: MakePool, tmp_path: Path) -> None:
    pool = make_pool(2)
    started, release = tmp_path / "started", tmp_path / "release"
    fut = pool.submit(workload.touch_and_wait, str(started), str(release))
    wait_until(started.exists, what="the task to start")

    def sampled() -> Any:
        w = busy_worker(pool)
        return w if w is not None and w.rss is not None and w.cpu_percent is not None else None

    w = wait_until(sampled, what="the monitor to sample the busy worker twice")
    assert w.ready and not w.retiring
    assert w.rss > 0 and w.cpu_percent >= 0.0
    assert w.tasks_done == 1
    assert w.running_since is not None and w.running_since <= time.monotonic()
    assert w.age_s > 0
    workers = pool.workers()
    assert len(workers) == 2 and len({x.pid for x in workers}) == 2
    release.touch()
    assert result(fut) == w.pid
    wait_until(lambda: all(x.task_id is None and x.running_since is None for x in pool.workers()), what="the worker to go idle")
    (after,) = [x for x in pool.workers() if x.pid == w.pid]
    assert after.tasks_done == 1


def test_stats_events_logs_and_workers_agree(make_pool: MakePool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="resilpool")
    pool = make_pool(2, limits=Limits(max_rss="200MiB", max_tasks=3))
    events = Events(pool)
    hog = pool.submit(workload.hog, 400)
    slow = pool.options(task_timeout=0.5).submit(workload.sleep_for, 30)
    crash = pool.submit(workload.kill_self)
    good = [pool.submit(workload.inc, i) for i in range(7)]
    failures = {"memory": error(hog), "timeout": error(slow), "crash": error(crash)}
    assert [result(f) for f in good] == list(range(1, 8))
    assert type(failures["memory"]) is MemoryLimitError
    assert type(failures["timeout"]) is TaskTimeoutError
    assert type(failures["crash"]) is WorkerCrashedError

    def settled() -> bool:
        s = pool.stats()
        ws = pool.workers()
        return (
            s.workers == 2
            and len(ws) == 2
            and all(w.ready and not w.retiring for w in ws)
            and len(events.started()) == s.workers_started
            and len(events.exited()) == sum(s.recycled.values())
        )

    wait_until(settled, what="the pool to settle with every event delivered")
    stats = pool.stats()
    exits = events.exited()
    # Every exit is counted once, under its reason.
    assert Counter(e.reason.value for e in exits) == Counter(stats.recycled)
    for reason, err in failures.items():
        (e,) = [x for x in exits if x.reason.value == reason]
        assert (e.pid, e.task_id) == (err.pid, err.task_id)  # type: ignore[attr-defined]
    assert stats.worker_crashes == 1
    assert (stats.completed, stats.failed, stats.submitted) == (7, 3, 10)
    assert (stats.pending, stats.running) == (0, 0)
    # The live workers are exactly those started and not exited.
    started_pids = {e.pid for e in events.started()}
    exited_pids = {e.pid for e in exits}
    assert exited_pids <= started_pids
    assert {w.pid for w in pool.workers()} == started_pids - exited_pids
    # Every kill and crash is on the resilpool logger with its reason.
    messages = [r.getMessage() for r in caplog.records if r.name == "resilpool"]
    for reason, err in failures.items():
        assert any(str(err.pid) in m and f"({reason})" in m for m in messages), (reason, messages)  # type: ignore[attr-defined]
    assert_usable(pool)


# --- min_available: pause and resume dispatch -------------------------------------------------


class FakeVirtualMemory:
    """Stands in for ``psutil.virtual_memory``; counts its calls (one per monitor tick)."""

    def __init__(self, total: int, available: int) -> None:
        self.total = total
        self.available = available
        self.calls = 0

    def __call__(self) -> Any:
        self.calls += 1
        return types.SimpleNamespace(total=self.total, available=self.available)


def _psutil_with(monkeypatch: pytest.MonkeyPatch, **fakes: Any) -> None:
    """Give the monitor module a psutil whose named attributes are fakes (psutil itself is untouched)."""

    class Proxy(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            return getattr(psutil, name)

    proxy = Proxy("psutil")
    for name, value in fakes.items():
        setattr(proxy, name, value)
    monkeypatch.setattr(probes_mod, "psutil", proxy)


def test_low_available_memory_pauses_dispatch_until_it_recovers(
    make_pool: MakePool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="resilpool")
    vm = FakeVirtualMemory(total=16 * GiB, available=8 * GiB)
    _psutil_with(monkeypatch, virtual_memory=vm)
    pool = make_pool(1, limits=Limits(min_available="1GiB"), monitor_interval=0.05)
    events = Events(pool)
    assert result(pool.submit(workload.inc, 1)) == 2

    vm.available = 512 * MiB
    wait_until(lambda: events.of(DispatchPaused), what="dispatch to pause")
    futs = [pool.submit(workload.pid_and_start, i) for i in range(3)]
    ticks = vm.calls
    wait_until(lambda: vm.calls >= ticks + 3, what="three monitor ticks while paused")
    assert not any(f.running() or f.done() for f in futs)
    assert pool.stats().running == 0

    recovered_at = time.monotonic()
    vm.available = 4 * GiB
    out = [result(f) for f in futs]
    assert [tag for tag, _, _ in out] == [0, 1, 2]
    assert all(start > recovered_at for _, _, start in out)  # none started before memory recovered
    wait_until(lambda: events.of(DispatchResumed), what="a DispatchResumed event")
    (paused,) = events.of(DispatchPaused)
    assert "min_available" in paused.reason and "512 MiB" in paused.reason
    messages = [r.getMessage() for r in caplog.records if r.name == "resilpool"]
    assert any("starts no new task" in m and "min_available" in m for m in messages), messages
    assert_usable(pool)


# --- the monitor by hand: fake core, fake processes, fake clock -----------------------------


class FakeProc:
    """A process as the monitor sees it through psutil."""

    def __init__(self, pid: int, rss: int = 20 * MiB) -> None:
        self.pid = pid
        self.rss = rss
        self.cpu = 0.0  # own user time
        self.reaped_cpu = 0.0  # children_user: time of the children it has reaped
        self.kids: list[FakeProc] = []
        self.gone = False

    def oneshot(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def _check(self) -> None:
        if self.gone:
            raise psutil.NoSuchProcess(self.pid)

    def memory_info(self) -> Any:
        self._check()
        return types.SimpleNamespace(rss=self.rss)

    def cpu_times(self) -> Any:
        self._check()
        return types.SimpleNamespace(user=self.cpu, system=0.0, children_user=self.reaped_cpu, children_system=0.0)

    def children(self, recursive: bool = False) -> list[FakeProc]:
        self._check()
        return [k for k in self.kids if not k.gone]


class FakeCore:
    """The core's supervisor seams, recording what the monitor asks for."""

    def __init__(self) -> None:
        self.views: tuple[WorkerView, ...] = ()
        self.slots: dict[int, tuple[int, float | None, int]] = {}
        self.task_timeouts: dict[int, float] = {}
        self.calls: list[tuple[Any, ...]] = []

    def worker_views(self) -> tuple[WorkerView, ...]:
        return self.views

    def read_slot(self, slot: int) -> tuple[int, float | None, int]:
        return self.slots.get(slot, (0, None, 0))

    def retire_worker(self, pid: int, reason: ExitReason) -> None:
        self.calls.append(("retire", pid, reason))

    def kill_worker(self, kill: Kill) -> None:
        self.calls.append(("kill", kill.pid, kill.reason, kill.task_id, lambda task, elapsed: kill.to_error(task.id, "f", elapsed)))

    def pause_dispatch(self, reason: str) -> None:
        self.calls.append(("pause", reason))

    def resume_dispatch(self) -> None:
        self.calls.append(("resume",))

    def actions(self) -> list[tuple[Any, ...]]:
        return [c[:4] for c in self.calls if c[0] in ("retire", "kill")]


@pytest.fixture
def rig(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.SimpleNamespace]:
    """A monitor (never started) over a fake core with one worker, pid 4242, spawned at t=0."""
    procs: dict[int, FakeProc] = {4242: FakeProc(4242)}
    vm = FakeVirtualMemory(total=16 * GiB, available=8 * GiB)

    def process(pid: int) -> FakeProc:
        if pid not in procs:
            raise psutil.NoSuchProcess(pid)
        return procs[pid]

    _psutil_with(monkeypatch, Process=process, virtual_memory=vm)
    core = FakeCore()
    core.views = (WorkerView(pid=4242, slot=0, spawned_at=0.0, ready=True, retiring=False),)

    def make(limits: Limits) -> monitor_mod.Monitor:
        return monitor_mod.Monitor(lambda: core, limits, 0.2, rng=random.Random(3))

    yield types.SimpleNamespace(core=core, proc=procs[4242], procs=procs, vm=vm, make=make)


def _retiring(core: FakeCore) -> None:
    core.views = tuple(WorkerView(pid=v.pid, slot=v.slot, spawned_at=v.spawned_at, ready=True, retiring=True) for v in core.views)


def _ticks(
    mon: monitor_mod.Monitor, start: float, stop: float, step: float = 0.2, each: Callable[[float], None] | None = None
) -> list[float | None]:
    """Tick the monitor from ``start`` to ``stop``; return the CPU % it reported for pid 4242 each time."""
    cpu: list[float | None] = []
    for i in range(round((stop - start) / step) + 1):
        now = start + i * step
        if each is not None:
            each(now)
        mon.tick(now)
        s = mon.samples.get(4242)
        cpu.append(s.cpu_percent if s else None)
    return cpu


def test_monitor_pauses_below_min_available_and_resumes_with_hysteresis(rig: Any) -> None:
    mon = rig.make(Limits(min_available="1GiB"))
    core, vm = rig.core, rig.vm

    def check(available: int) -> list[tuple[Any, ...]]:
        vm.available = available
        before = len(core.calls)
        mon._check_available(core)
        return core.calls[before:]

    assert check(4 * GiB) == []
    (pause,) = check(900 * MiB)
    assert pause[0] == "pause" and "900 MiB" in pause[1] and "min_available 1024 MiB" in pause[1]
    assert check(800 * MiB) == []  # already paused: said once
    assert check(GiB + 50 * MiB) == []  # above the floor but within 10%: still paused (no flapping)
    assert check(2 * GiB) == [("resume",)]
    assert check(3 * GiB) == []
    assert check(100 * MiB)[0][0] == "pause"


def test_monitor_min_available_as_fraction_or_off(rig: Any) -> None:
    core, vm = rig.core, rig.vm
    vm.available = 3 * GiB  # below a quarter of 16 GiB
    rig.make(Limits(min_available=0.25))._check_available(core)
    assert [c[0] for c in core.calls] == ["pause"]
    core.calls.clear()
    vm.available = 1
    rig.make(Limits(min_available=None))._check_available(core)
    assert core.calls == []


def test_monitor_pauses_a_rebuilt_core_again(rig: Any) -> None:
    mon = rig.make(Limits(min_available="1GiB"))
    rig.vm.available = 100 * MiB
    mon._check_available(rig.core)
    new_core = FakeCore()  # the pool rebuilt its core: the new one is not paused
    mon._check_available(new_core)
    assert [c[0] for c in new_core.calls] == ["pause"]


def test_monitor_still_times_out_the_last_task_of_a_retired_worker(rig: Any) -> None:
    core = rig.core
    mon = rig.make(Limits(max_lifetime=1.0, task_timeout=3.0))
    core.slots[0] = (7, 0.5, 1)  # task 7 runs since t=0.5
    _ticks(mon, 0.0, 2.0)
    assert core.actions() == [("retire", 4242, ExitReason.LIFETIME)]  # asked once, though the view lags
    _retiring(core)
    _ticks(mon, 2.2, 4.0)
    assert core.actions()[1:] == [("kill", 4242, ExitReason.TIMEOUT, 7)]
    err = core.calls[-1][4](types.SimpleNamespace(id=7), 3.5)
    assert type(err) is TaskTimeoutError and err.task_id == 7


def test_monitor_still_kills_a_retired_worker_over_max_rss(rig: Any) -> None:
    core, proc = rig.core, rig.proc
    mon = rig.make(Limits(soft_max_rss="100MiB", max_rss="200MiB"))
    core.slots[0] = (7, 0.0, 1)
    proc.rss = 150 * MiB
    _ticks(mon, 0.0, 0.4)
    assert core.actions() == [("retire", 4242, ExitReason.SOFT_MEMORY)]
    proc.rss = 300 * MiB  # the retiring worker's last task keeps growing
    _ticks(mon, 0.6, 1.0)
    assert core.actions()[1:] == [("kill", 4242, ExitReason.MEMORY, None)]
    err = core.calls[-1][4](types.SimpleNamespace(id=7), 1.0)
    assert type(err) is MemoryLimitError and (err.rss, err.limit, err.task_id) == (300 * MiB, 200 * MiB, 7)


def test_monitor_counts_memory_over_the_process_tree(rig: Any) -> None:
    core, proc = rig.core, rig.proc
    proc.kids = [FakeProc(5000, rss=400 * MiB)]
    mon = rig.make(Limits(max_rss="200MiB"))
    core.slots[0] = (3, 0.0, 1)
    mon.tick(0.0)
    assert core.actions() == [("kill", 4242, ExitReason.MEMORY, None)]
    assert mon.samples[4242].rss == 420 * MiB
    mon.tick(0.2)
    assert len(core.actions()) == 1  # asked once


def test_monitor_kills_a_task_whose_tree_uses_no_cpu(rig: Any) -> None:
    core = rig.core
    mon = rig.make(Limits(stall_timeout=1.0))
    core.slots[0] = (9, 0.1, 1)
    _ticks(mon, 0.0, 2.0)
    assert core.actions() == [("kill", 4242, ExitReason.STALL, 9)]
    err = core.calls[-1][4](types.SimpleNamespace(id=9), 1.2)
    assert type(err) is TaskStalledError and err.timeout == 1.0 and err.cpu_seconds == 0.0


def test_monitor_counts_cpu_of_a_subprocess_after_it_exits(rig: Any) -> None:
    # 0..1s a subprocess burns CPU; it exits and the worker reaps it (its time moves to the
    # worker's children_user); 1..3s the worker burns CPU itself. Busy throughout: no stall.
    core, proc = rig.core, rig.proc
    child = FakeProc(5000)
    proc.kids = [child]
    mon = rig.make(Limits(stall_timeout=1.0))
    core.slots[0] = (9, 0.0, 1)

    def world(now: float) -> None:
        if now < 1.0:
            child.cpu = now
        else:
            child.gone = True
            proc.reaped_cpu = 1.0
            proc.cpu = now - 1.0

    cpu = _ticks(mon, 0.0, 3.0, each=world)
    assert core.actions() == []
    # One CPU busy all along, across the hand-over from the subprocess to the worker.
    assert cpu[0] is None
    assert all(c is not None and c == pytest.approx(100.0) for c in cpu[1:]), cpu


def test_monitor_looks_for_new_subprocesses_before_calling_a_stall(rig: Any) -> None:
    # The task starts a busy subprocess just after the monitor's last scan for children.
    core, proc = rig.core, rig.proc
    child = FakeProc(5000)
    mon = rig.make(Limits(stall_timeout=0.5))

    def world(now: float) -> None:
        if now >= 0.1:
            core.slots[0] = (9, 0.1, 1)
            proc.kids = [child]
            child.cpu = now - 0.1

    _ticks(mon, 0.0, 0.8, each=world)
    assert core.actions() == []


def test_monitor_does_not_call_a_stall_on_cpu_time_lost_from_the_tree(rig: Any) -> None:
    # A busy grandchild is reaped outside the tree: the tree's CPU total drops.
    # That is no proof of a stall; but a tree that then stays idle is stalled.
    core, proc = rig.core, rig.proc
    child = FakeProc(5000)
    proc.kids = [child]
    mon = rig.make(Limits(stall_timeout=1.0))
    core.slots[0] = (9, 0.0, 1)

    def world(now: float) -> None:
        if now < 1.0:
            child.cpu = now
        else:
            child.gone = True  # its CPU time is counted nowhere in the tree any more

    _ticks(mon, 0.0, 1.8, each=world)
    assert core.actions() == []
    _ticks(mon, 2.0, 2.4, each=world)
    assert core.actions() == [("kill", 4242, ExitReason.STALL, 9)]


def test_monitor_treats_a_reused_pid_as_a_new_worker(rig: Any) -> None:
    core = rig.core
    mon = rig.make(Limits(max_lifetime=1.0))
    _ticks(mon, 0.0, 1.4)
    assert core.actions() == [("retire", 4242, ExitReason.LIFETIME)]
    # The old worker left between two ticks and a new one got its pid.
    core.views = (WorkerView(pid=4242, slot=1, spawned_at=1.5, ready=True, retiring=False),)
    _ticks(mon, 1.6, 3.0)
    assert core.actions()[1:] == [("retire", 4242, ExitReason.LIFETIME)]


def test_fast_leak_is_caught_between_two_tasks(make_pool: MakePool) -> None:
    """A worker past soft_max_rss leaves after the task that crossed it, even with tiny tasks queued."""
    import collections

    pool = make_pool(2, limits=Limits(soft_max_rss="120MiB"))
    pids = list(pool.map(workload.leak, [10] * 120, timeout=RESULT_TIMEOUT))
    per_pid = collections.Counter(pids)
    # A fresh worker is ~20 MiB: it crosses 120 MiB within ~11 tasks of 10 MiB, and leaves then.
    assert max(per_pid.values()) <= 12, per_pid
    assert pool.stats().recycled.get("soft_memory", 0) >= 5
    assert pool.stats().failed == 0
    assert_usable(pool)


def test_monitor_can_be_turned_off(make_pool: MakePool) -> None:
    pool = make_pool(1, monitor_interval=None, limits=Limits(max_tasks=2))
    assert [f.result(timeout=RESULT_TIMEOUT) for f in [pool.submit(workload.inc, i) for i in range(4)]] == [1, 2, 3, 4]
    assert pool.workers()[0].rss is None
    with pytest.raises(ValueError, match="max_rss"):
        ResilientPool(1, monitor_interval=None, limits=Limits(max_rss="1GiB"))


# --- the shared limit decisions, fed by either probe (fake clock, no processes) ----------


def _feed_psutil(now: float, busy_cpu_s: float) -> probes_mod.Reading:
    """What a PsutilProbe reads: cumulative CPU seconds of the tree."""
    return probes_mod.Reading(rss=20 * MiB, cpu_s=busy_cpu_s)


class _DaskFeed:
    """What a DaskMetricsProbe reads: the scheduler's memory and CPU percent since the last heartbeat."""

    def __init__(self) -> None:
        self.probe = probes_mod.DaskMetricsProbe()
        self.last: tuple[float, float] | None = None

    def __call__(self, now: float, busy_cpu_s: float) -> probes_mod.Reading:
        pct = 0.0 if self.last is None else 100.0 * (busy_cpu_s - self.last[1]) / (now - self.last[0])
        self.last = (now, busy_cpu_s)
        return self.probe.measure("tcp://127.0.0.1:1", now, {"memory": 20 * MiB, "cpu": pct})


@pytest.fixture(params=["psutil", "dask"])
def feed(request: pytest.FixtureRequest) -> Callable[[float, float], probes_mod.Reading]:
    return _feed_psutil if request.param == "psutil" else _DaskFeed()


def _judge_until(
    limiter: monitor_mod.Limiter, feed: Callable[[float, float], probes_mod.Reading], stop: float, cpu_at: Callable[[float], float], **kw: Any
) -> list[tuple[float, Any]]:
    """Judge worker "w" every 0.2 s from t=0 to ``stop``; return the (time, action) pairs."""
    acts = []
    for i in range(round(stop / 0.2) + 1):
        now = i * 0.2
        _, action = limiter.judge("w", now, feed(now, cpu_at(now)), pid=4242, spawned_at=0.0, **kw)
        if action is not None:
            acts.append((round(now, 1), action))
    return acts


def test_limiter_calls_a_stall_at_the_same_time_from_either_probe(feed: Callable[[float, float], probes_mod.Reading]) -> None:
    # Busy for 1 s, then idle: stall_timeout=1 s is over once a full idle second is in the history.
    limiter = monitor_mod.Limiter(Limits(stall_timeout=1.0), 0.2, random.Random(3))
    running = [monitor_mod.Running(task_id=9, started=0.0, timeout=None)]
    acts = _judge_until(limiter, feed, 3.0, lambda now: min(now, 1.0), running=running, retiring=False)
    assert [(t, a.reason, a.task_id) for t, a in acts] == [(2.0, ExitReason.STALL, 9)]  # asked once, not every tick


def test_limiter_asks_to_retire_once_and_still_times_out_the_last_task(feed: Callable[[float, float], probes_mod.Reading]) -> None:
    limiter = monitor_mod.Limiter(Limits(max_lifetime=1.0, task_timeout=3.0), 0.2, random.Random(3))
    running = [monitor_mod.Running(task_id=7, started=0.5, timeout=None)]
    acts = _judge_until(limiter, feed, 4.0, lambda now: now, running=running, retiring=False)
    assert [type(a).__name__ + ":" + a.reason.value for _, a in acts] == ["Retire:lifetime", "Kill:timeout"]


def test_limiter_leaves_a_worker_alone_once_it_is_killed_as_a_whole(feed: Callable[[float, float], probes_mod.Reading]) -> None:
    limiter = monitor_mod.Limiter(Limits(max_rss="10MiB", max_lifetime=0.5), 0.2, random.Random(3))
    acts = _judge_until(limiter, feed, 2.0, lambda now: now, running=[], retiring=False)
    assert [(t, a.reason) for t, a in acts] == [(0.0, ExitReason.MEMORY)]


def test_limiter_judges_each_running_task_of_a_many_threaded_worker() -> None:
    limiter = monitor_mod.Limiter(Limits(task_timeout=1.0), 0.2, random.Random(3))
    running = [monitor_mod.Running(task_id=1, started=0.0, timeout=5.0), monitor_mod.Running(task_id=2, started=0.0, timeout=None)]
    acts = _judge_until(limiter, _feed_psutil, 2.0, lambda now: now, running=running, retiring=False)
    assert [(t, a.reason, a.task_id) for t, a in acts] == [(1.2, ExitReason.TIMEOUT, 2)]


def test_cpu_history_starts_over_when_cpu_time_goes_backwards() -> None:
    hist = probes_mod.CpuHistory(keep_s=5.0)
    assert hist.record(0.0, 10.0) is None
    assert hist.record(1.0, 11.0) == pytest.approx(100.0)
    assert hist.window(1.0, 1.0) == pytest.approx(1.0)
    assert hist.record(2.0, 3.0) is None  # lost 8 CPU seconds: no difference is trusted
    assert hist.window(2.0, 1.0) is None  # not a second of history since the reset
    assert hist.record(3.0, 3.0) == 0.0
    assert hist.window(3.0, 1.0) == 0.0


def test_dask_metrics_probe_integrates_cpu_percent_into_seconds() -> None:
    probe = probes_mod.DaskMetricsProbe()
    assert probe.measure("a", 0.0, {"memory": 5, "cpu": 100.0}) == probes_mod.Reading(rss=5, cpu_s=0.0)
    assert probe.measure("a", 2.0, {"memory": 7, "cpu": 50.0}).cpu_s == pytest.approx(1.0)
    assert probe.measure("a", 3.0, {"memory": None, "cpu": None}) == probes_mod.Reading(rss=0, cpu_s=pytest.approx(1.0))
    probe.forget("a")
    assert probe.measure("a", 4.0, {"cpu": 100.0}).cpu_s == 0.0
