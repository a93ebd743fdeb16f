"""ResilientPool on Dask: the same API and failure semantics on a real LocalCluster.

One LocalCluster of 2 worker processes (nannies, loopback, no dashboard) serves the
whole module; each test connects its own pool to it.  A test that kills a worker
leaves its nanny to restart it, so this module's leak check tolerates the cluster's
current worker processes (and the threads distributed keeps for them); a LocalCluster
a test starts itself must be gone by the end of that test.  Runs are counted outside
the cluster, in files (``workload.count_*``), and ordering comes from files and
futures, never from sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import concurrent.futures as cf
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import distributed  # in the test extra: missing, these tests fail (they never skip)

import workload  # noqa: E402
from conftest import RESULT_TIMEOUT, _children, wait_until  # noqa: E402
from tenacity import stop_after_attempt, wait_fixed  # noqa: E402

from resilpool import (  # noqa: E402
    Breaker,
    CrashLoopError,
    Limits,
    ResilientPool,
    RetryPolicy,
    SerializationError,
    TaskTimeoutError,
    WorkerCrashedError,
)
from resilpool.dask import DaskBackend  # noqa: E402
from resilpool.events import (  # noqa: E402
    DispatchPaused,
    DispatchResumed,
    Event,
    ExitReason,
    TaskRetried,
    WorkerExited,
    WorkerStarted,
)

T = RESULT_TIMEOUT

# distributed's own threads for the module cluster's (re)started workers.
_CLUSTER_THREADS = ("AsyncProcess Dask Worker process", "QueueFeederThread", "Dask-Offload")


# --- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dask_cluster() -> Iterator[Any]:
    cluster = distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},  # its HTTP routes: loopback, any free port
    )
    try:
        yield cluster
    finally:
        cluster.close(timeout=30)


def _cluster_pids(cluster: Any) -> set[int]:
    return {n.pid for n in list(cluster.workers.values()) if getattr(n, "pid", None)}


def _cluster_settled(cluster: Any) -> bool:
    """Both workers registered and running, none being retired, restarted or killed (read
    from the in-process scheduler: ``cluster.scheduler_info`` is a cache refreshed every 2 s).
    A kill an earlier test's pool asked for would otherwise land in the next test."""
    s = cluster.scheduler
    workers = list(s.workers.values())
    ledger = s.plugins.get("resilpool-ledger")
    return (
        len(workers) == 2
        and all(ws.status.name == "running" for ws in workers)
        and {ws.pid for ws in workers} == _cluster_pids(cluster)
        and (ledger is None or not (ledger.retiring or ledger.restarting or set(ledger.marks) & set(s.workers)))
    )


@pytest.fixture(autouse=True)
def no_leaks(dask_cluster: Any) -> Iterator[None]:
    """Overrides conftest's: the module cluster's workers (restarted by a test) are not leaks."""
    threads_before = set(threading.enumerate())
    children_before = _children()
    yield
    deadline = time.monotonic() + 20.0
    while True:
        extra_children = _children() - children_before - _cluster_pids(dask_cluster)
        extra_threads = [
            t for t in threading.enumerate() if t not in threads_before and t.is_alive() and not t.name.startswith(_CLUSTER_THREADS)
        ]
        if not extra_children and not extra_threads:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"test leaked child processes {sorted(extra_children)} / threads {[t.name for t in extra_threads]}")
        time.sleep(0.05)
    # The next test starts with both workers up (a killed one is being restarted by its nanny).
    wait_until(lambda: _cluster_settled(dask_cluster), timeout=60, what="the cluster's 2 workers, running")


@pytest.fixture
def make_pool(dask_cluster: Any) -> Iterator[Callable[..., ResilientPool]]:
    """Pools on the module cluster, always shut down at the end of the test."""
    pools: list[ResilientPool] = []

    def make(max_workers: int = 2, **kwargs: Any) -> ResilientPool:
        pool = ResilientPool(max_workers, backend=DaskBackend(dask_cluster), **kwargs)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.shutdown(wait=True, cancel_futures=True)


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def of(self, cls: type) -> list[Any]:
        with self._lock:
            return [e for e in self.events if isinstance(e, cls)]


def runs(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_runs(*paths: Path, n: int = 1) -> None:
    wait_until(lambda: all(len(runs(p)) >= n for p in paths), timeout=T, what=f"{n} run(s) in {[p.name for p in paths]}")


# --- the optional extra ----------------------------------------------------------------


def test_resilpool_imports_without_distributed() -> None:
    code = (
        "import sys; sys.modules['distributed'] = None\n"
        "import resilpool, resilpool.dask\n"
        "try:\n"
        "    resilpool.dask.DaskBackend()\n"
        "except ImportError as e:\n"
        "    print('ImportError', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert "ImportError" in out and "resilpool[dask]" in out


def test_backend_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match="address_or_client"):
        DaskBackend(42)
    with pytest.raises(ValueError, match="connect_timeout"):
        DaskBackend("tcp://127.0.0.1:1", connect_timeout=0)


def test_refusal_errors_survive_pickling() -> None:
    from resilpool._core.dask.worker import AttemptRefused, InitializerFailed

    err = pickle.loads(pickle.dumps(AttemptRefused("resilpool-x-1-1", "started", "tcp://127.0.0.1:1", 42, 3, 1.5)))
    assert (err.key, err.why, err.worker, err.pid, err.before) == ("resilpool-x-1-1", "started", "tcp://127.0.0.1:1", 42, 3)
    assert "refused second start" in str(err)
    init = pickle.loads(pickle.dumps(InitializerFailed("tcp://127.0.0.1:1", 7, b"x")))
    assert (init.worker, init.pid, init.body) == ("tcp://127.0.0.1:1", 7, b"x")


def _close_orphaned_event_buses(before: set[threading.Thread]) -> None:
    """Stop the event thread of a pool whose constructor raised (``ResilientPool.__init__``
    starts it before it asks the backend for a core, and does not stop it on failure)."""
    for t in set(threading.enumerate()) - before:
        bus = getattr(getattr(t, "_target", None), "__self__", None)
        if t.name == "resilpool-events" and hasattr(bus, "close"):
            bus.close()


def test_a_backend_serves_one_pool_at_a_time(dask_cluster: Any) -> None:
    backend = DaskBackend(dask_cluster)
    with ResilientPool(1, backend=backend) as pool:
        assert pool.submit(workload.inc, 1).result(timeout=T) == 2
        before = set(threading.enumerate())
        with pytest.raises(RuntimeError, match="one DaskBackend per pool"):
            ResilientPool(1, backend=backend)
        _close_orphaned_event_buses(before)
    with ResilientPool(1, backend=backend) as again:  # free again once the first pool is shut down
        assert again.submit(workload.inc, 2).result(timeout=T) == 3


def test_an_unreachable_scheduler_fails_at_construction() -> None:
    before = set(threading.enumerate())
    with pytest.raises((OSError, TimeoutError)):
        ResilientPool(1, backend=DaskBackend("tcp://127.0.0.1:9", connect_timeout=1))
    _close_orphaned_event_buses(before)


# --- the Executor API ------------------------------------------------------------------


def test_submit_map_stats_and_workers(make_pool: Callable[..., ResilientPool]) -> None:
    pool = make_pool(2)
    assert pool.submit(workload.add, 2, y=3).result(timeout=T) == 5
    assert list(pool.map(workload.inc, range(50), timeout=T)) == list(range(1, 51))
    assert list(pool.map(workload.add, range(10), range(10), chunksize=3, timeout=T)) == [2 * i for i in range(10)]
    assert pool.submit(lambda x: x * 2, 21).result(timeout=T) == 42  # by value (cloudpickle)
    assert pool.options(task_timeout=30, retry=1).submit(workload.inc, 1).result(timeout=T) == 2
    s = pool.stats()
    assert s.completed == 1 + 50 + 4 + 1 + 1 and s.failed == 0 and s.running == 0 and s.pending == 0
    assert s.workers == 2 and s.workers_started >= 2 and not s.broken
    wait_until(lambda: pool.stats().peak_worker_rss > 0, what="a memory sample from the scheduler")
    infos = pool.workers()
    assert len(infos) == 2 and all(i.ready and i.pid > 0 for i in infos)
    # Attempts started per worker, as of the pool's last look at the scheduler.
    wait_until(lambda: sum(i.tasks_done for i in pool.workers()) >= 56, what="the scheduler's start counts")


def test_errors_propagate_with_the_workers_traceback(make_pool: Callable[..., ResilientPool]) -> None:
    pool = make_pool(2)
    with pytest.raises(ValueError, match="kaboom") as info:
        pool.submit(workload.raise_value_error, "kaboom").result(timeout=T)
    assert "raise_value_error" in str(info.value.__cause__)  # RemoteTraceback, as locally
    fut = pool.submit(workload.identity, workload.Unpicklable())
    with pytest.raises(SerializationError) as ser:
        fut.result(timeout=T)
    assert ser.value.part == "argument 0"
    with pytest.raises(SerializationError) as res:
        pool.submit(workload.return_lock).result(timeout=T)
    assert res.value.part == "result"
    assert pool.stats().failed == 3


def test_submit_after_shutdown_raises(make_pool: Callable[..., ResilientPool]) -> None:
    pool = make_pool(1)
    assert pool.submit(workload.inc, 1).result(timeout=T) == 2
    pool.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(workload.inc, 1)


def test_shutdown_cancel_futures_cancels_only_what_never_started(make_pool: Callable[..., ResilientPool], tmp_path: Path) -> None:
    pool = make_pool(2)
    release = tmp_path / "release"
    counts = [tmp_path / f"c{i}" for i in range(2)]
    running = [pool.submit(workload.count_and_wait, str(c), str(release)) for c in counts]
    wait_runs(*counts)
    queued = [pool.submit(workload.inc, i) for i in range(20)]
    threading.Timer(0.5, release.touch).start()
    pool.shutdown(wait=True, cancel_futures=True)
    assert all(f.result(timeout=T) > 0 for f in running)
    assert any(f.cancelled() for f in queued)
    assert all(f.cancelled() or f.result(timeout=0) == i + 1 for i, f in enumerate(queued))


def test_initializer_runs_in_each_worker(make_pool: Callable[..., ResilientPool]) -> None:
    pool = make_pool(2, initializer=workload.set_global, initargs=("ready",))
    assert set(pool.map(workload.get_global, range(20), timeout=T)) == {"ready"}


@pytest.mark.resilpool_core_errors
def test_failing_initializer_trips_the_breaker(make_pool: Callable[..., ResilientPool]) -> None:
    pool = make_pool(2, initializer=workload.fail_init, initargs=("no config",), breaker=Breaker(max_failures=0))
    with pytest.raises(CrashLoopError) as info:
        pool.submit(workload.inc, 1).result(timeout=T)
    assert "no config" in str(info.value.__cause__)
    assert pool.stats().broken


# --- worker deaths ---------------------------------------------------------------------


def test_worker_killed_mid_task(make_pool: Callable[..., ResilientPool], tmp_path: Path) -> None:
    """SIGKILL both Dask workers mid-task: the task without retry ran once and fails, naming
    the worker; the idempotent one runs again and finishes; tasks not started yet finish."""
    pool = make_pool(2)
    rec = Recorder()
    pool.add_listener(rec)
    release = tmp_path / "release"
    once, twice = tmp_path / "once", tmp_path / "twice"
    a = pool.submit(workload.count_and_wait, str(once), str(release))
    b = pool.submit(workload.count_and_wait, str(twice), str(release), retry=2)
    wait_runs(once, twice)
    later = [pool.submit(workload.inc, i) for i in range(10)]  # queued behind them: not started
    victims = set(runs(once) + runs(twice))
    assert len(victims) == 2  # one task per worker
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerCrashedError) as info:
        a.result(timeout=T)
    err = info.value
    assert err.pid == runs(once)[0] and err.task_id is not None and err.fn_name == "count_and_wait"
    assert err.address.startswith("tcp://127.0.0.1:")  # type: ignore[attr-defined]
    assert err.address in str(err)  # type: ignore[attr-defined]
    wait_runs(twice, n=2)
    release.touch()
    assert b.result(timeout=T) not in victims
    assert [f.result(timeout=T) for f in later] == list(range(1, 11))
    assert len(runs(once)) == 1  # at most once, though Dask rescheduled it
    assert len(runs(twice)) == 2
    s = pool.stats()
    assert s.worker_crashes == 2 and s.retried == 1 and s.failed == 1
    exits = rec.of(WorkerExited)
    assert {e.reason for e in exits} == {ExitReason.CRASH} and {e.pid for e in exits} == victims
    replaced = lambda: {e.replaces for e in rec.of(WorkerStarted)} >= victims  # noqa: E731
    wait_until(replaced, timeout=30, what="the nannies' replacements")


def test_idempotent_map_survives_a_worker_killed_mid_run(make_pool: Callable[..., ResilientPool], tmp_path: Path) -> None:
    pool = make_pool(2, retry=3)
    marker = tmp_path / "m"
    futs = [pool.submit(workload.crash_first_time, str(marker), i) for i in range(12)]
    assert [f.result(timeout=T) for f in futs] == list(range(12))
    assert pool.stats().worker_crashes >= 1


def test_a_task_without_retry_that_kills_its_worker_runs_once(make_pool: Callable[..., ResilientPool], tmp_path: Path) -> None:
    pool = make_pool(2)
    count = tmp_path / "c"
    with pytest.raises(WorkerCrashedError):
        pool.submit(workload.count_and_kill, str(count)).result(timeout=T)
    assert len(runs(count)) == 1
    assert pool.submit(workload.inc, 1).result(timeout=T) == 2


# --- retry -----------------------------------------------------------------------------


def test_retry_n_runs_n_plus_one_times_with_notes(make_pool: Callable[..., ResilientPool], tmp_path: Path) -> None:
    pool = make_pool(2)
    rec = Recorder()
    pool.add_listener(rec)
    count = tmp_path / "c"
    with pytest.raises(ValueError, match="run 3 failed") as info:
        pool.submit(workload.count_and_raise, str(count), retry=2).result(timeout=T)
    assert len(runs(count)) == 3
    notes = getattr(info.value, "__notes__", [])
    assert [n.split(" pid ")[0] for n in notes] == ["attempt 1", "attempt 2"]
    assert pool.stats().retried == 2
    wait_until(lambda: len(rec.of(TaskRetried)) == 2, what="2 TaskRetried events")


def test_retry_policy_backoff_is_scheduled_by_the_pool(make_pool: Callable[..., ResilientPool], tmp_path: Path) -> None:
    pool = make_pool(2)
    count = tmp_path / "c"
    policy = RetryPolicy(stop=stop_after_attempt(2), wait=wait_fixed(0.5))
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="run 2 failed"):
        pool.submit(workload.count_and_raise, str(count), retry=policy).result(timeout=T)
    assert time.monotonic() - t0 >= 0.5
    assert len(runs(count)) == 2


# --- limits ----------------------------------------------------------------------------


def test_task_timeout_restarts_the_worker_and_fails_the_task(make_pool: Callable[..., ResilientPool], tmp_path: Path) -> None:
    pool = make_pool(2, limits=Limits(task_timeout=1.0))
    rec = Recorder()
    pool.add_listener(rec)
    slow = pool.submit(workload.sleep_for, 60)
    fine = pool.submit(workload.sleep_for, 0.1)
    with pytest.raises(TaskTimeoutError) as info:
        slow.result(timeout=T)
    assert isinstance(info.value, TimeoutError)
    assert info.value.timeout == 1.0 and info.value.elapsed >= 1.0 and info.value.pid
    assert fine.result(timeout=T) == 0.1
    wait_until(lambda: any(e.reason is ExitReason.TIMEOUT for e in rec.of(WorkerExited)), what="WorkerExited(TIMEOUT)")
    assert pool.stats().recycled.get("timeout") == 1
    assert pool.submit(workload.inc, 1).result(timeout=T) == 2


def test_task_timeout_with_retry_runs_again(make_pool: Callable[..., ResilientPool], tmp_path: Path) -> None:
    pool = make_pool(2)
    marker = tmp_path / "m"
    fut = pool.options(task_timeout=1.0, retry=1).submit(workload.hang_first_time, str(marker), "done")
    assert fut.result(timeout=T) == "done"
    assert Path(str(marker) + ".runs").read_text() == "xx"


def test_max_tasks_recycles_workers(make_pool: Callable[..., ResilientPool]) -> None:
    pool = make_pool(2, limits=Limits(max_tasks=2))
    rec = Recorder()
    pool.add_listener(rec)
    pids = [pool.submit(workload.pid_of).result(timeout=T) for _ in range(5)]
    per_pid = {p: pids.count(p) for p in pids}
    assert max(per_pid.values()) <= 2, per_pid
    wait_until(lambda: sum(1 for e in rec.of(WorkerExited) if e.reason is ExitReason.MAX_TASKS) >= 2, timeout=60, what="2 workers recycled")


def test_soft_max_rss_retires_the_worker_after_its_task(make_pool: Callable[..., ResilientPool]) -> None:
    pool = make_pool(2, limits=Limits(soft_max_rss="400MiB"))
    rec = Recorder()
    pool.add_listener(rec)
    tag, pid, rss = pool.submit(workload.leak_and_report, 450, "kept").result(timeout=T)
    assert tag == "kept" and rss > 400 * 2**20  # its result is kept
    wait_until(lambda: any(e.reason is ExitReason.SOFT_MEMORY and e.pid == pid for e in rec.of(WorkerExited)), timeout=30, what="the leaky worker retired")
    assert all(e.task_id is None for e in rec.of(WorkerExited))  # it cost no task
    assert pool.submit(workload.pid_of).result(timeout=T) != pid


def test_max_rss_kills_the_worker_and_fails_its_task(make_pool: Callable[..., ResilientPool]) -> None:
    from resilpool import MemoryLimitError

    pool = make_pool(2, limits=Limits(max_rss="300MiB"))
    with pytest.raises(MemoryLimitError) as info:
        pool.submit(workload.hog, 400, 30.0).result(timeout=T)
    assert info.value.rss > info.value.limit == 300 * 2**20
    assert pool.stats().recycled.get("memory") == 1


def test_max_lifetime_recycles_idle_workers(make_pool: Callable[..., ResilientPool]) -> None:
    pool = make_pool(2, limits=Limits(max_lifetime=1.0))
    rec = Recorder()
    pool.add_listener(rec)
    assert pool.submit(workload.inc, 1).result(timeout=T) == 2
    wait_until(lambda: any(e.reason is ExitReason.LIFETIME for e in rec.of(WorkerExited)), timeout=30, what="a worker recycled for its lifetime")


# --- the backend's own LocalCluster ------------------------------------------------------


def test_backend_starts_and_closes_its_own_local_cluster() -> None:
    backend = DaskBackend()
    with ResilientPool(1, backend=backend) as pool:
        cluster = backend.cluster
        assert cluster is not None and backend.scheduler_address is not None
        assert backend.scheduler_address.startswith("tcp://127.0.0.1:")
        assert pool.submit(workload.inc, 41).result(timeout=T) == 42
        assert len(cluster.workers) == 1
    assert backend.cluster is None  # closed at shutdown; the leak check sees its processes gone


# --- rebuild ---------------------------------------------------------------------------


@pytest.mark.resilpool_core_errors
def test_core_rebuild_keeps_every_task(make_pool: Callable[..., ResilientPool], tmp_path: Path) -> None:
    pool = make_pool(2)
    futs = [pool.submit(workload.sleep_for, 0.05) for _ in range(20)]
    pool.break_core_for_test()
    more = [pool.submit(workload.inc, i) for i in range(5)]
    done = 0
    for f in futs:
        try:
            f.result(timeout=T)
            done += 1
        except WorkerCrashedError:
            pass  # it had started on the old core and has no retry
    assert done >= 15
    assert [f.result(timeout=T) for f in more] == [1, 2, 3, 4, 5]
    assert pool.stats().rebuilds == 1


def test_task_keys_on_the_scheduler_carry_the_function_name(make_pool: Callable[..., ResilientPool], dask_cluster: Any, tmp_path: Path) -> None:
    from dask.utils import key_split

    pool = make_pool(2)
    started, release = tmp_path / "started", tmp_path / "release"
    fut = pool.submit(workload.touch_and_wait, str(started), str(release))
    wait_until(started.exists, timeout=T, what="the task to start")
    scheduler = dask_cluster.scheduler
    keys = [k for k in list(scheduler.tasks) if isinstance(k, str) and key_split(k) == "touch_and_wait"]
    groups = {k: scheduler.tasks[k].group.name for k in keys if k in scheduler.tasks}
    release.touch()
    assert fut.result(timeout=T) > 0
    assert len(keys) == 1, list(scheduler.tasks)
    assert keys[0].startswith("touch_and_wait-") and keys[0].endswith("-1")  # attempt 1
    assert set(groups.values()) <= {"touch_and_wait"}  # the dashboard's task stream and progress name


# --- one state machine: the same semantics on both backends --------------------------------
# Each test below pins a behaviour in which the local and the Dask cores used to differ
# (issue 11, "Why"), on a local pool and on a pool on the module's LocalCluster.


@pytest.fixture(params=["local", "dask"])
def any_pool(request: pytest.FixtureRequest, dask_cluster: Any) -> Iterator[Callable[..., ResilientPool]]:
    """Pools on either backend, always shut down at the end of the test."""
    pools: list[ResilientPool] = []

    def make(max_workers: int = 2, **kwargs: Any) -> ResilientPool:
        backend = DaskBackend(dask_cluster) if request.param == "dask" else None
        pool = ResilientPool(max_workers, backend=backend, **kwargs)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.shutdown(wait=True, cancel_futures=True)


def _retry_waiting(pool: ResilientPool, count: Path) -> tuple[Any, Recorder]:
    """A task whose first attempt fails and whose retry then waits a 60 s backoff."""
    rec = Recorder()
    pool.add_listener(rec)
    policy = RetryPolicy(stop=stop_after_attempt(3), wait=wait_fixed(60))
    fut = pool.submit(workload.count_and_raise, str(count), retry=policy)
    wait_until(lambda: rec.of(TaskRetried), timeout=T, what="the first attempt to fail and its retry to wait")
    return fut, rec


def test_shutdown_cancel_futures_fails_a_retry_waiting_for_its_backoff(any_pool: Callable[..., ResilientPool], tmp_path: Path) -> None:
    pool = any_pool(2)
    count = tmp_path / "count"
    fut, _ = _retry_waiting(pool, count)
    pool.shutdown(wait=True, cancel_futures=True)  # returns at once: no 60 s wait for the retry
    with pytest.raises(ValueError, match="run 1 failed") as info:
        fut.result(timeout=0)
    assert len(runs(count)) == 1
    notes = getattr(info.value, "__notes__", [])
    assert any("retry not run: shutdown(cancel_futures=True)" in n for n in notes), notes


@pytest.mark.resilpool_core_errors
def test_a_rebuilt_core_keeps_the_remaining_backoff_of_a_waiting_retry(any_pool: Callable[..., ResilientPool], tmp_path: Path) -> None:
    pool = any_pool(2)
    count = tmp_path / "count"
    fut, _ = _retry_waiting(pool, count)
    pool.break_core_for_test()
    wait_until(lambda: pool.stats().rebuilds == 1, timeout=T, what="the core to be rebuilt")
    assert pool.submit(workload.inc, 1).result(timeout=T) == 2  # the new core runs work; the retry still waits
    assert not fut.done()
    pool.shutdown(wait=True, cancel_futures=True)
    with pytest.raises(ValueError, match="run 1 failed"):
        fut.result(timeout=0)
    assert len(runs(count)) == 1  # adopted with its backoff, not run at once


@pytest.mark.resilpool_core_errors
def test_a_crash_loop_fails_a_waiting_retry_with_notes_of_its_attempts(any_pool: Callable[..., ResilientPool], tmp_path: Path) -> None:
    # Initializers succeed until the flag exists. Each worker is replaced after one task, so
    # once the flag is set the next worker to start fails and trips the breaker (no failure
    # tolerated), which fails every task no worker holds: here the retry waiting its backoff.
    flag = tmp_path / "flag"
    pool = any_pool(1, initializer=workload.fail_init_once_flagged, initargs=(str(flag),), limits=Limits(max_tasks=1), breaker=Breaker(max_failures=0))
    count = tmp_path / "count"
    fut, _ = _retry_waiting(pool, count)
    flag.touch()
    other = pool.submit(workload.inc, 1)  # a worker starts after the flag (locally: its replacement; on Dask: the one it runs on)
    with pytest.raises(CrashLoopError) as info:
        fut.result(timeout=T)
    try:
        assert other.result(timeout=T) == 2  # it may have run on a worker started before the flag
    except CrashLoopError:
        pass
    notes = getattr(info.value, "__notes__", [])
    assert len(notes) == 1 and notes[0].startswith("attempt 1 pid ") and "run 1 failed" in notes[0], notes
    assert len(runs(count)) == 1


def test_pause_and_resume_are_logged_and_announced_alike(any_pool: Callable[..., ResilientPool], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="resilpool")
    pool = any_pool(1)
    rec = Recorder()
    pool.add_listener(rec)
    assert pool.submit(workload.inc, 1).result(timeout=T) == 2
    pool._core.pause_dispatch("a test holds new tasks")
    wait_until(lambda: rec.of(DispatchPaused), timeout=T, what="DispatchPaused")
    held = pool.submit(workload.inc, 2)
    pool._core.resume_dispatch()
    assert held.result(timeout=T) == 3
    wait_until(lambda: rec.of(DispatchResumed), timeout=T, what="DispatchResumed")
    assert [e.reason for e in rec.of(DispatchResumed)] == ["a test holds new tasks"]
    messages = [r.getMessage() for r in caplog.records if r.name == "resilpool"]
    assert "resilpool starts no new task: a test holds new tasks" in messages
    assert "resilpool starts tasks again (was: a test holds new tasks)" in messages


def test_a_task_timeout_fails_the_task_with_the_same_error(any_pool: Callable[..., ResilientPool]) -> None:
    pool = any_pool(2, limits=Limits(task_timeout=1.0))
    rec = Recorder()
    pool.add_listener(rec)
    with pytest.raises(TaskTimeoutError) as info:
        pool.submit(workload.sleep_for, 60).result(timeout=T)
    err = info.value
    assert isinstance(err, TimeoutError) and err.timeout == 1.0 and err.elapsed >= 1.0 and err.pid and err.task_id
    assert pickle.loads(pickle.dumps(err)).timeout == 1.0
    wait_until(lambda: any(e.reason is ExitReason.TIMEOUT for e in rec.of(WorkerExited)), timeout=T, what="WorkerExited(TIMEOUT)")


def test_small_outcomes_are_pushed_and_large_ones_fetched(make_pool: Callable[..., ResilientPool]) -> None:
    from resilpool._core.dask import PUSH_MAX_BYTES

    pool = make_pool(2)
    small, large = b"s" * 100, b"L" * (PUSH_MAX_BYTES * 3)
    futs = [pool.submit(workload.identity, v) for v in (small, large, small, large)]
    assert [f.result(timeout=T) for f in futs] == [small, large, small, large]
    with pytest.raises(ValueError, match="x" * 1000):  # a large error payload takes the fetch path too
        pool.submit(workload.raise_value_error, "x" * (PUSH_MAX_BYTES * 2)).result(timeout=T)
    assert pool.stats().completed == 4


# --- abort and shutdown(kill_running=True) on Dask ------------------------------------------


def test_abort_kills_the_started_task_cancels_unstarted_ones_and_keeps_the_pool(any_pool: Callable[..., ResilientPool], tmp_path: Path) -> None:
    pool = any_pool(1)
    assert list(pool.map(workload.inc, range(300), timeout=T))[-1] == 300  # tiny tasks: the local core pipelines
    done = pool.submit(workload.inc, 1)
    assert done.result(timeout=T) == 2
    runs_a, runs_b, runs_c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    a = pool.submit(workload.count_and_wait, str(runs_a), str(tmp_path / "never"), retry=3)
    wait_runs(runs_a)
    b = pool.submit(workload.count_run, str(runs_b), "b")  # queued behind a, maybe already on a worker
    c = pool.submit(workload.count_run, str(runs_c), "c")
    pool.abort([a, b, done], reason="the caller gave up")
    with pytest.raises(WorkerCrashedError, match="the caller gave up"):
        a.result(timeout=T)
    with pytest.raises(cf.CancelledError):
        b.result(timeout=T)
    assert c.result(timeout=T) == "c"  # not aborted: runs, once
    assert done.result(timeout=0) == 2  # a done future is left alone
    assert len(runs(runs_a)) == 1  # never retried
    assert not runs_b.exists()  # never started
    assert len(runs(runs_c)) == 1
    assert pool.submit(workload.inc, 41).result(timeout=T) == 42
    wait_until(lambda: pool.stats().recycled, timeout=T, what="the killed worker counted")  # Dask: its event may come later
    assert pool.stats().recycled == {"abort": 1}
    with pytest.raises(ValueError, match="reason"):
        pool.abort([c], reason="")


def test_a_death_the_poll_sees_before_its_removal_event_keeps_its_cause(make_pool: Callable[..., ResilientPool], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The poll's answer can overtake the ledger's removal event: the worker is then seen
    gone first, and must still be counted as killed for the abort, not as a crash."""
    from resilpool._core.dask.client import DaskCore

    deliver = DaskCore._on_ledger_event
    held: list[Any] = []
    held_delivered: list[Any] = []

    def late_removal(self: Any, event: Any) -> None:
        if event[1].get("op") == "removed" and event not in held:
            held.append(event)  # delivered after several polls have seen the worker gone
            asyncio.get_running_loop().call_later(5.0, late_removal, self, event)
            return
        if event in held:
            held_delivered.append(event)
        deliver(self, event)

    monkeypatch.setattr(DaskCore, "_on_ledger_event", late_removal)
    pool = make_pool(1)
    rec = Recorder()
    pool.add_listener(rec)
    a = pool.submit(workload.count_and_wait, str(tmp_path / "a"), str(tmp_path / "never"), retry=2)
    wait_runs(tmp_path / "a")
    pool.abort([a], reason="the caller gave up")
    with pytest.raises(WorkerCrashedError, match="the caller gave up"):
        a.result(timeout=T)
    assert held, "the removal event was not held back: this test did not test the race"
    assert pool.submit(workload.inc, 1).result(timeout=T) == 2
    wait_until(lambda: pool.stats().recycled, timeout=T, what="the killed worker counted")
    assert held and not held_delivered, "the removal event came before the poll saw the death"
    stats = pool.stats()
    assert stats.recycled == {"abort": 1} and stats.worker_crashes == 0
    # Counted before the event is delivered (on the pool's event thread): wait for it.
    exits = wait_until(lambda: rec.of(WorkerExited), timeout=T, what="the WorkerExited event")
    assert [e.reason for e in exits] == [ExitReason.ABORT]
    assert len(runs(tmp_path / "a")) == 1


def test_results_are_unpickled_off_the_core_thread(make_pool: Callable[..., ResilientPool]) -> None:
    """As locally (issue 13.2): a result blocked in its __setstate__ delays no other
    result, and one whose unpickling raises SystemExit fails only its own task."""
    import core_workload
    import decode_workload

    pool = make_pool(2)
    assert pool.submit(workload.inc, 0).result(timeout=T) == 1
    with decode_workload.result_blocked_in_unpickling(pool, "dask-slow-result", 42, T) as slow:
        assert [f.result(timeout=T) for f in [pool.submit(workload.inc, i) for i in range(20)]] == list(range(1, 21))
        objects = [pool.submit(decode_workload.blocked_result, f"dask-no-gate-{i}", i) for i in range(5)]
        assert [f.result(timeout=T).value for f in objects] == list(range(5))  # on the other decoders
        assert not slow.done()
        pool.check_invariants()  # the slow one is in a place: decoding
    assert slow.result(timeout=T).value == 42
    with pytest.raises(SerializationError, match="SystemExit") as info:
        pool.submit(core_workload.make_system_exit_on_unpickle).result(timeout=T)
    assert info.value.part == "result"
    assert pool.submit(workload.inc, 1).result(timeout=T) == 2
    stats = pool.stats()
    assert (stats.rebuilds, stats.broken, stats.completed, stats.failed) == (0, False, 28, 1)


def test_shutdown_timeout_fails_a_result_stuck_in_unpickling(make_pool: Callable[..., ResilientPool]) -> None:
    """shutdown(timeout=) gives up as locally: a result whose unpickling never ends fails
    (a decoder thread cannot be stopped), and shutdown returns."""
    import decode_workload

    pool = make_pool(1)
    entered, release = decode_workload.gate("dask-stuck-result")
    try:
        fut = pool.submit(decode_workload.blocked_result, "dask-stuck-result", 1)
        assert entered.wait(T), "the result was never unpickled"
        pool.shutdown(wait=True, timeout=0.5)
        with pytest.raises(SerializationError, match="still being unpickled when shutdown"):
            fut.result(timeout=0)
    finally:
        release.set()


def test_shutdown_kill_running_returns_and_resolves_every_future(make_pool: Callable[..., ResilientPool], tmp_path: Path) -> None:
    pool = make_pool(1)
    count = tmp_path / "runs"
    running = pool.submit(workload.count_and_wait, str(count), str(tmp_path / "never"), retry=2)
    wait_runs(count)
    queued = [pool.submit(workload.inc, i) for i in range(5)]
    pool.shutdown(wait=True, cancel_futures=True, kill_running=True)
    with pytest.raises(WorkerCrashedError, match="kill_running"):
        running.result(timeout=0)
    for i, f in enumerate(queued):  # cancelled, or (already on a worker, not started) run elsewhere
        assert f.cancelled() or f.result(timeout=0) == i + 1
    assert len(runs(count)) == 1


# --- the start record: unchecked on a key's first placement, checked on a rerun ------------


def _ledger(cluster: Any) -> Any:
    return cluster.scheduler.plugins["resilpool-ledger"]


def test_first_placements_start_without_waiting_for_the_ledger(make_pool: Callable[..., ResilientPool], dask_cluster: Any) -> None:
    """The hot path: each key's start is recorded by a message the worker does not wait for."""
    pool = make_pool(2)
    assert pool.submit(workload.inc, 0).result(timeout=T) == 1  # the ledger is registered
    ledger = _ledger(dask_cluster)
    checked, unchecked = ledger.checked, ledger.unchecked
    assert list(pool.map(workload.inc, range(40), timeout=T)) == list(range(1, 41))
    wait_until(lambda: ledger.unchecked >= unchecked + 40, timeout=T, what="40 unchecked starts recorded")
    assert ledger.checked == checked


def test_a_rerun_after_a_death_is_checked_and_runs_once(make_pool: Callable[..., ResilientPool], dask_cluster: Any, tmp_path: Path) -> None:
    """A worker that kills itself right after its unchecked start: Dask reruns the key
    elsewhere, the rerun claims its start (checked) and is refused; the task ran once."""
    pool = make_pool(2)
    ledger = _ledger(dask_cluster)
    checked, unchecked, from_log = ledger.checked, ledger.unchecked, ledger.log_started
    for i in range(3):
        count = tmp_path / f"c{i}"
        with pytest.raises(WorkerCrashedError):
            pool.submit(workload.count_and_kill, str(count)).result(timeout=T)
        assert len(runs(count)) == 1
        wait_until(lambda: _cluster_settled(dask_cluster), timeout=60, what="the cluster's 2 workers, running")
    # Whether the start message left the dying worker is a race; when it did not, the
    # worker's start log told the ledger: each start was known one way or the other.
    assert (ledger.unchecked - unchecked) + (ledger.log_started - from_log) == 3
    assert ledger.checked == checked  # refused reruns record no start
    assert pool.submit(workload.inc, 1).result(timeout=T) == 2


def test_start_records_of_a_worker_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker side alone: a start is in the start log before the call runs, the
    nanny's read returns it (and removes the log), and a key cancelled before its start
    never starts."""
    import tempfile

    from resilpool._core.dask import worker as w

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(w, "_RECENT", {})
    monkeypatch.setattr(w, "_CANCELLED", {})
    monkeypatch.setattr(w, "_starts", 0)
    monkeypatch.setattr(w, "_log_fd", None)
    monkeypatch.setattr(w, "_RECENT_MAX", 4)
    try:
        with w._LOCK:
            assert [w._record_start(f"k-{i}") for i in range(3)] == [0, 1, 2]
        assert w.cancel_unstarted(["k-1", "k-9"]) == (["k-9"], {"k-1": 1})
        with w._LOCK:
            assert [w._record_start(f"k-{i}") for i in range(3, 6)] == [3, 4, 5]  # compacts past 4
        assert w.read_start_log(os.getpid()) == {"k-2": 2, "k-3": 3, "k-4": 4, "k-5": 5}
        assert not os.path.exists(w.start_log_path(os.getpid()))
        assert w.read_start_log(os.getpid()) == {}
    finally:
        if w._log_fd is not None:
            os.close(w._log_fd)


@contextlib.contextmanager
def _start_messages_held_back(cluster: Any) -> Iterator[None]:
    """The workers drop their start messages: the ledger hears of no start unless it asks
    (a kill) or reads a dead worker's start log."""

    def hold(dask_worker: Any) -> None:
        stream = dask_worker.batched_stream
        send = stream.send

        def send_all_but_starts(*msgs: Any) -> None:
            send(*[m for m in msgs if not (isinstance(m, dict) and m.get("op") == "resilpool-started")])

        stream.send = send_all_but_starts

    def release(dask_worker: Any) -> None:
        dask_worker.batched_stream.__dict__.pop("send", None)

    with distributed.Client(cluster, set_as_default=False) as client:
        client.run(hold)
        try:
            yield
        finally:
            client.run(release, on_error="ignore")


def test_a_start_the_ledger_has_not_heard_of_is_killed_and_never_rerun(make_pool: Callable[..., ResilientPool], dask_cluster: Any, tmp_path: Path) -> None:
    """A running task whose start message has not reached the ledger: a kill by key still
    finds it (the ledger asks its worker), and after a death the worker's start log,
    read by its nanny, refuses Dask's rerun."""
    pool = make_pool(2)
    assert pool.submit(workload.inc, 0).result(timeout=T) == 1  # the ledger is registered
    ledger = _ledger(dask_cluster)
    from_log = ledger.log_started
    with _start_messages_held_back(dask_cluster):
        died = tmp_path / "died"
        a = pool.submit(workload.count_and_wait, str(died), str(tmp_path / "never"))
        wait_runs(died)
        os.kill(runs(died)[0], signal.SIGKILL)
        with pytest.raises(WorkerCrashedError):
            a.result(timeout=T)
        assert ledger.log_started == from_log + 1
        wait_until(lambda: _cluster_settled(dask_cluster), timeout=60, what="the cluster's 2 workers, running")
        killed = tmp_path / "killed"
        b = pool.submit(workload.count_and_wait, str(killed), str(tmp_path / "never"))
        wait_runs(killed)
        pool.shutdown(wait=True, kill_running=True)
        with pytest.raises(WorkerCrashedError, match="kill_running"):
            b.result(timeout=0)
    assert len(runs(died)) == 1 and len(runs(killed)) == 1


# --- observability: metrics of every task, the pool's progress on the scheduler ------------


def test_metrics_count_every_task_of_a_plain_map_by_error_type_and_duration(make_pool: Callable[..., ResilientPool]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    import resilpool.metrics

    pool = make_pool(2)
    assert list(pool.map(workload.inc, range(6), timeout=T)) == list(range(1, 7))
    with pytest.raises(ZeroDivisionError):
        list(pool.map(workload.inverse, [0], timeout=T))
    with pytest.raises(ValueError):
        list(pool.map(workload.raise_value_error, ["no"], timeout=T))
    text = resilpool.metrics.PoolMetrics(pool).generate().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert {labels: v for (name, labels), v in samples.items() if name == "resilpool_task_errors_total"} == {
        (("error", "ValueError"),): 1,
        (("error", "ZeroDivisionError"),): 1,
    }
    assert samples[("resilpool_task_duration_seconds_count", (("outcome", "succeeded"),))] == 6
    assert samples[("resilpool_task_duration_seconds_count", (("outcome", "failed"),))] == 2
    assert samples[("resilpool_task_duration_seconds_bucket", (("le", "+Inf"), ("outcome", "failed")))] == 2


def _progress(cluster: Any, path: str = "/resilpool/progress.json") -> Any:
    """The scheduler's resilpool progress, fetched over loopback from its HTTP server."""
    import json
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{cluster.scheduler.http_server.port}{path}", timeout=T) as resp:
        body = resp.read().decode()
    return json.loads(body) if path.endswith(".json") else body


def test_the_scheduler_serves_the_progress_of_all_submitted_work(make_pool: Callable[..., ResilientPool], dask_cluster: Any, tmp_path: Path) -> None:
    # Most tasks wait in the pool (at most a few attempts are in flight on Dask); the
    # scheduler's page still counts them all, and counts them done as they finish.
    n = 30
    release = tmp_path / "release"
    pool = make_pool(2)
    futs = [pool.submit(workload.wait_for_file, str(release)) for _ in range(n)]

    def ours() -> Any:
        pools = [p for p in _progress(dask_cluster)["pools"] if "wait_for_file" in p["functions"]]
        return pools[0] if pools else None

    gated = wait_until(lambda: (p := ours()) is not None and p["total"]["running"] > 0 and p, timeout=T, what="the pool's progress on the scheduler")
    fn = gated["functions"]["wait_for_file"]
    assert fn["total"] == fn["submitted"] == n and fn["done"] == 0
    assert fn["pending"] + fn["running"] == n and fn["pending"] > fn["running"]  # most of the work is queued in the pool
    assert gated["total"]["total"] == n
    page = _progress(dask_cluster, "/resilpool")
    assert "wait_for_file" in page and "/resilpool/progress.json" in page
    release.touch()
    assert [f.result(timeout=T) for f in futs] == [str(release)] * n
    done = wait_until(lambda: (p := ours()) is not None and p["functions"]["wait_for_file"]["done"] == n and p, timeout=T, what="all done on the page")
    assert done["functions"]["wait_for_file"] == {
        "submitted": n, "pending": 0, "running": 0, "completed": n, "failed": 0, "cancelled": 0, "done": n, "total": n,
    }  # fmt: skip
    pool.shutdown(wait=True)
    assert all(p["owner"] != gated["owner"] for p in _progress(dask_cluster)["pools"])  # gone with its pool


def test_progress_reports_are_bounded_checked_and_escaped(caplog: pytest.LogCaptureFixture) -> None:
    # No cluster: the client's tally, the ledger's checks and the page, as pure code.
    from concurrent.futures import Future

    from resilpool._core.dask import PROGRESS_MAX_FUNCTIONS, PROGRESS_OTHER
    from resilpool._core.dask.client import _Progress
    from resilpool._core.dask.scheduler import AttemptLedger, render_progress
    from resilpool._core.tasks import Task

    def task(i: int, name: str) -> Task:
        fn = type("F", (), {"__qualname__": name, "__call__": lambda self, x: x})()  # fn_name: its type's qualname
        return Task(i, fn, (i,), {}, b"", Future(), None, None)

    progress = _Progress("a pool")
    tasks = [task(i, f"fn_{i}") for i in range(PROGRESS_MAX_FUNCTIONS + 5)]
    progress.add(tasks)
    tasks[0].future.set_result(1)
    tasks[1].future.set_exception(ValueError("x"))
    assert tasks[2].future.cancel()
    report = progress.payload([])
    assert len(report["functions"]) == PROGRESS_MAX_FUNCTIONS
    assert report["functions"][PROGRESS_OTHER] == [6, 6, 0, 0, 0, 0]
    assert [report["functions"][f"fn_{i}"] for i in range(3)] == [[1, 0, 0, 1, 0, 0], [1, 0, 0, 0, 1, 0], [1, 0, 0, 0, 0, 1]]

    ledger = AttemptLedger()
    ledger._keep_progress("stranger", report)  # not registered: ignored
    ledger.register("owner")
    ledger._keep_progress("owner", {"label": "bad", "functions": {"f": [1, 2]}})  # wrong shape: ignored, logged
    assert ledger.progress == {} and "malformed progress report" in caplog.text
    ledger._keep_progress("owner", {"label": "<b>pool</b>", "functions": {"<script>": [3, 1, 1, 1, 0, 0]}})
    (pool,) = ledger.progress_report()["pools"]
    assert pool["total"] == {"submitted": 3, "pending": 1, "running": 1, "completed": 1, "failed": 0, "cancelled": 0, "done": 1, "total": 3}
    page = render_progress(ledger.progress_report(), "/resilpool/progress.json")
    assert "<script>" not in page and "&lt;script&gt;" in page and "&lt;b&gt;pool&lt;/b&gt;" in page
    ledger.unregister("owner")
    assert ledger.progress_report() == {"pools": []}


@pytest.mark.resilpool_core_errors
def test_errors_and_durations_survive_a_core_rebuild(any_pool: Callable[..., ResilientPool]) -> None:
    pool = any_pool(2)
    assert list(pool.map(workload.inc, range(5), timeout=T)) == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError):
        pool.submit(workload.raise_value_error).result(timeout=T)
    before = pool.stats()
    assert before.errors == {"ValueError": 1}
    pool.break_core_for_test()
    wait_until(lambda: pool.stats().rebuilds == 1, timeout=T, what="the core's rebuild")
    with pytest.raises(ZeroDivisionError):
        pool.submit(workload.inverse, 0).result(timeout=T)
    assert pool.submit(workload.inc, 1).result(timeout=T) == 2
    after = pool.stats()
    assert after.rebuilds == 1
    assert after.errors == {"ValueError": 1, "ZeroDivisionError": 1}
    assert after.durations["succeeded"].count == before.durations["succeeded"].count + 1 == 6
    assert after.durations["failed"].count == before.durations["failed"].count + 1 == 2
    assert after.durations["succeeded"].sum_s >= before.durations["succeeded"].sum_s


@pytest.mark.parametrize(
    ("log_of_the_dead", "cancelled"),
    [
        ({"k1": 4}, ["k2", "k3"]),  # its start log: it started k1 only; the others are cancelled
        (None, []),  # its start log could not be read: it may have started any of them
    ],
)
def test_cancel_asks_a_worker_that_died_mid_question_its_start_log(log_of_the_dead: dict[str, int] | None, cancelled: list[str]) -> None:
    """A worker killed just before a core rebuild cannot answer which keys it started: its
    start log, read by its nanny once the scheduler removes it, answers for it; without one,
    nothing is cancelled (at most once first). Found by the Dask chaos suite (seed 3438599282):
    every unknown key counted as started, and five tasks that never ran were failed."""
    from types import SimpleNamespace

    from distributed.comm.core import CommClosedError

    from resilpool._core.dask.scheduler import AttemptLedger

    async def scenario() -> tuple[list[str], set[str]]:
        ledger = AttemptLedger()
        ledger.scheduler = SimpleNamespace(workers={"alive": object(), "dead": object()}, tasks={})

        async def run_on(address: str, fn: Any, keys: list[str]) -> Any:
            if address == "dead":
                raise CommClosedError("Connection reset by peer")
            return list(keys), {}

        ledger._run_on = run_on  # type: ignore[method-assign]

        def removed() -> None:  # what remove_worker and its nanny's read do, a little later
            del ledger.scheduler.workers["dead"]
            ledger._log_read("dead", log_of_the_dead)

        asyncio.get_running_loop().call_later(0.05, removed)
        out = await asyncio.wait_for(ledger.cancel(["k1", "k2", "k3"], "owner"), T)
        return out, {k for k, r in ledger.records.items()}

    out, recorded = asyncio.run(scenario())
    assert sorted(out) == cancelled
    assert recorded == set(cancelled)  # the cancelled keys' records refuse any later claim


def test_cancel_waits_for_the_start_log_of_keys_placed_on_a_worker_that_left() -> None:
    """A key placed on a worker that has just left is in doubt until that worker's nanny has
    read its start log. cancel() waits for the log, then cancels what it says never started
    there. Found by the Dask chaos suite (seed 1670075336): a cancel during a core rebuild
    counted a key in doubt as started, and its task was failed though it never ran."""
    from types import SimpleNamespace

    from resilpool._core.dask import scheduler as ledger_module

    async def scenario() -> tuple[list[str], dict[str, int]]:
        ledger = ledger_module.AttemptLedger()
        ledger.scheduler = SimpleNamespace(workers={"alive": object()}, tasks={})
        for key in ("k1", "k2"):  # what transition() records for the keys of a worker being removed
            rec = ledger.records[key] = ledger_module._Rec("owner", ledger_module._DOUBT, None, 7, 0)
            rec.address = "dead"
        ledger.doubts["dead"] = ["k1", "k2"]
        ledger.resolved["dead"] = asyncio.Event()

        async def run_on(address: str, fn: Any, *args: Any) -> Any:
            if address == "nanny":  # read_start_log: the dead worker started k1 only
                return {"k1": 3}
            return list(args[0]), {}  # cancel_unstarted on the live worker: it started none

        ledger._run_on = run_on  # type: ignore[method-assign]
        reading = ledger._read_log("dead", 7, "nanny", 3, ["k1", "k2"], {}, None)
        asyncio.get_running_loop().call_later(0.05, lambda: asyncio.ensure_future(reading))
        out = await asyncio.wait_for(ledger.cancel(["k1", "k2", "k3"], "owner"), T)
        return out, {k: r.state for k, r in ledger.records.items()}

    out, states = asyncio.run(scenario())
    assert sorted(out) == ["k2", "k3"]  # k2 never started on the worker that left
    assert states == {"k1": ledger_module._DONE, "k2": ledger_module._CANCELLED, "k3": ledger_module._CANCELLED}


def test_cancel_hears_a_worker_that_dies_mid_question_through_its_start_log() -> None:
    """Asking a worker that was just killed can hang for the connection's whole timeout (a
    connection to it is retried). Its start log answers as soon as its nanny has read it.
    Found by the Dask chaos suite (seed 1670075336): the question outlasted the client's
    timeout, and every in-flight task of a rebuilt core was failed as started."""
    from types import SimpleNamespace

    from resilpool._core.dask.scheduler import AttemptLedger

    async def scenario() -> list[str]:
        ledger = AttemptLedger()
        ledger.scheduler = SimpleNamespace(workers={"alive": object(), "dead": object()}, tasks={})

        async def run_on(address: str, fn: Any, keys: list[str]) -> Any:
            if address == "dead":
                await asyncio.Event().wait()  # never answers: cancel() must not wait for it
            return list(keys), {}

        ledger._run_on = run_on  # type: ignore[method-assign]

        def removed() -> None:
            del ledger.scheduler.workers["dead"]
            ledger._log_read("dead", {"k1": 2})

        asyncio.get_running_loop().call_later(0.05, removed)
        return await asyncio.wait_for(ledger.cancel(["k1", "k2"], "owner"), T)

    assert asyncio.run(scenario()) == ["k2"]


def test_cancel_counts_every_key_started_when_a_silent_worker_stays(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that cannot answer and does not leave (a stuck event loop) has no final start
    log: nothing is cancelled. The ledger waits for that worker's log only while the worker
    is in the cluster, and forgets it ``DEPARTED_KEEP_S`` after the worker left."""
    from types import SimpleNamespace

    from resilpool._core.dask import scheduler as ledger_module

    monkeypatch.setattr(ledger_module, "RPC_TIMEOUT_S", 0.1)

    async def scenario() -> tuple[list[str], bool, bool, bool]:
        ledger = ledger_module.AttemptLedger()
        ledger.scheduler = SimpleNamespace(workers={"stuck": object()}, tasks={})

        async def run_on(address: str, fn: Any, keys: list[str]) -> Any:
            raise TimeoutError

        ledger._run_on = run_on  # type: ignore[method-assign]
        out = await asyncio.wait_for(ledger.cancel(["k1", "k2"], "owner"), T)
        waiting = not ledger.start_logs["stuck"].done()
        del ledger.scheduler.workers["stuck"]  # it leaves at last: remove_worker's steps
        ledger.departed["stuck"] = (None, time.monotonic() - ledger_module.DEPARTED_KEEP_S - 1)
        ledger._log_read("stuck", None)
        resolved = ledger.start_logs["stuck"].done()
        ledger.status("owner")  # drops what it keeps of workers that left long ago
        return out, waiting, resolved, "stuck" in ledger.start_logs

    out, waiting, resolved, kept = asyncio.run(scenario())
    assert out == []
    assert waiting and resolved and not kept


@pytest.mark.resilpool_core_errors  # the handler's failure is logged at ERROR, on purpose
def test_a_workers_message_the_ledger_cannot_handle_never_costs_the_cluster_that_worker(caplog: pytest.LogCaptureFixture) -> None:
    """An exception out of a stream handler makes the scheduler drop that worker's stream,
    and Dask then closes the worker and its nanny for good. Found by the Dask chaos suite
    (seed 1078970092): an outcome pushed while a rebuilt core's old client was closing raised
    CommClosedError, and the cluster was one worker short for the rest of the run."""
    from types import SimpleNamespace

    from distributed.comm.core import CommClosedError

    from resilpool._core.dask import CLAIM_OP, PUSH_OP
    from resilpool._core.dask.scheduler import AttemptLedger

    class ClosedComm:
        def send(self, msg: Any) -> None:
            raise CommClosedError("Comm <TCP (closed) Scheduler->Client> already closed.")

    scheduler = SimpleNamespace(handlers={}, stream_handlers={}, workers={}, client_comms={"old client": ClosedComm()})
    ledger = AttemptLedger()
    asyncio.run(ledger.start(scheduler))
    push, claim = scheduler.stream_handlers[PUSH_OP], scheduler.stream_handlers[CLAIM_OP]
    # The client left mid-send: nobody waits for the outcome, and nothing is logged.
    push(key="k", owner="old client", kind=1, elapsed=0.1, body=b"", pid=1, worker="tcp://w")
    assert "failed on a message" not in caplog.text
    # Anything else a handler raises is logged, never raised into the worker's stream.
    ledger.scheduler = None  # started_on now fails on its first look at the scheduler
    claim(key="k2", owner="old client", pid=1, worker="tcp://w")
    assert "started_on failed on a message from worker tcp://w" in caplog.text
