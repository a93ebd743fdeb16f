"""The executor core: Executor API, per-task crash isolation, lazy map, bad input, no orphans."""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import psutil
import pytest
import workload
from conftest import RESULT_TIMEOUT, wait_until

import resilpool
from resilpool import CrashLoopError, ResilientPool, SerializationError, WorkerCrashedError
from resilpool.events import ExitReason, WorkerExited

T = RESULT_TIMEOUT


def test_public_surface_is_pinned() -> None:
    assert resilpool.__all__ == sorted(resilpool.__all__)
    assert set(resilpool.__all__) == {
        "Breaker",
        "CrashLoopError",
        "ExitReason",
        "Limits",
        "MemoryLimitError",
        "PoisonTaskError",
        "PoolStats",
        "ResilientPool",
        "ResilpoolError",
        "RetryPolicy",
        "SerializationError",
        "TaskOptions",
        "TaskStalledError",
        "TaskTimeoutError",
        "WorkerCrashedError",
        "WorkerInfo",
    }
    assert (Path(resilpool.__file__).parent / "py.typed").exists()


def test_submit_map_and_context_manager(start_method: str) -> None:
    with ResilientPool(2, mp_context=start_method) as pool:
        assert pool.submit(workload.add, 2, y=3).result(timeout=T) == 5
        assert list(pool.map(workload.add, range(5), range(5), timeout=T)) == [0, 2, 4, 6, 8]
        futs = [pool.submit(workload.inc, i) for i in range(20)]
        done, not_done = cf.wait(futs, timeout=T)
        assert not not_done
        assert sorted(f.result(timeout=T) for f in cf.as_completed(futs, timeout=T)) == list(range(1, 21))
    assert pool.stats().workers == 0


def test_task_exception_carries_remote_traceback(make_pool) -> None:
    pool = make_pool(1)
    fut = pool.submit(workload.raise_value_error, "bad input 42")
    with pytest.raises(ValueError, match="bad input 42") as info:
        fut.result(timeout=T)
    assert "raise_value_error" in str(info.value.__cause__)
    assert pool.stats().failed == 1


def test_one_sigkilled_worker_costs_one_task(make_pool) -> None:
    pool = make_pool(2)
    exits: list[WorkerExited] = []
    pool.add_listener(lambda e: exits.append(e) if isinstance(e, WorkerExited) else None)
    futs = [pool.submit(workload.kill_self) if i == 17 else pool.submit(workload.inc, i) for i in range(50)]
    ok = 0
    for i, f in enumerate(futs):
        if i == 17:
            with pytest.raises(WorkerCrashedError) as info:
                f.result(timeout=T)
            err = info.value
            assert isinstance(err, cf.process.BrokenProcessPool)
            assert err.exitcode == -signal.SIGKILL
            assert err.pid is not None and f"worker {err.pid}" in str(err)
            assert "SIGKILL" in str(err) and "kill_self" in str(err)
        else:
            assert f.result(timeout=T) == i + 1
            ok += 1
    assert ok == 49
    # The same pool runs 50 more, at full strength.
    assert [f.result(timeout=T) for f in [pool.submit(workload.inc, i) for i in range(50)]] == list(range(1, 51))
    wait_until(lambda: pool.stats().workers == 2, what="full strength")
    s = pool.stats()
    assert s.worker_crashes == 1 and s.completed == 99 and s.failed == 1
    wait_until(lambda: any(e.reason is ExitReason.CRASH for e in exits), what="crash event")


def test_exit_code_reported(make_pool) -> None:
    pool = make_pool(1)
    with pytest.raises(WorkerCrashedError, match="exited with code 7") as info:
        pool.submit(workload.exit_now, 7).result(timeout=T)
    assert info.value.exitcode == 7
    assert pool.submit(workload.inc, 1).result(timeout=T) == 2


def test_tasks_queued_behind_a_crash_all_succeed(make_pool, tmp_path: Path) -> None:
    """Warm the pool with tiny tasks (so several are queued per worker), then crash one mid-batch."""
    pool = make_pool(2)
    assert sum(pool.map(workload.inc, range(3000))) == sum(range(1, 3001))
    runs = tmp_path / "runs"
    futs = [pool.submit(workload.count_run, str(runs), i) for i in range(100)]
    crash = pool.submit(workload.kill_self)
    futs += [pool.submit(workload.count_run, str(runs), i) for i in range(100, 300)]
    with pytest.raises(WorkerCrashedError):
        crash.result(timeout=T)
    assert [f.result(timeout=T) for f in futs] == list(range(300))
    assert len(runs.read_text().splitlines()) == 300  # each ran exactly once


def test_running_tasks_map_to_live_workers(make_pool, tmp_path: Path) -> None:
    # Invariant: each RUNNING task id maps to exactly one live worker pid.
    pool = make_pool(2)
    started = [tmp_path / f"s{i}" for i in range(2)]
    release = tmp_path / "release"
    futs = [pool.submit(workload.touch_and_wait, str(s), str(release)) for s in started]
    wait_until(lambda: all(s.exists() for s in started), what="both tasks started")
    infos = wait_until(lambda: [w for w in pool.workers() if w.task_id is not None] if len([w for w in pool.workers() if w.task_id]) == 2 else None, what="slots")
    assert len({w.pid for w in infos}) == 2
    assert all(psutil.pid_exists(w.pid) and w.running_since is not None for w in infos)
    release.touch()
    assert sorted(f.result(timeout=T) for f in futs) == sorted(w.pid for w in infos)


def test_replacement_keeps_full_strength(make_pool) -> None:
    pool = make_pool(2)
    wait_until(lambda: pool.stats().workers == 2, what="start")
    victim = pool.workers()[0].pid
    os.kill(victim, signal.SIGKILL)  # an idle worker dies: no task is lost, a new one starts
    wait_until(lambda: victim not in {w.pid for w in pool.workers()} and pool.stats().workers == 2, what="replacement")
    assert pool.stats().failed == 0
    assert pool.submit(workload.inc, 1).result(timeout=T) == 2


# --- lazy map ----------------------------------------------------------------------


def test_map_over_infinite_iterator_can_be_abandoned(make_pool) -> None:
    pool = make_pool(2)
    it = pool.map(workload.inc, itertools.count())
    assert [next(it) for _ in range(10)] == list(range(1, 11))
    it.close()  # cancels what has not started
    assert pool.submit(workload.inc, 1).result(timeout=T) == 2


def test_map_reads_inputs_lazily(make_pool) -> None:
    pool = make_pool(2)
    consumed = itertools.count()

    def source():
        for i in itertools.count():
            next(consumed)
            yield i

    it = pool.map(workload.inc, source())
    assert next(it) == 1
    assert next(consumed) < 10_000  # bounded read-ahead, not materialised
    del it


def test_map_chunks_and_order(make_pool) -> None:
    pool = make_pool(2)
    assert list(pool.map(workload.inc, range(1001), chunksize=100, timeout=T)) == list(range(1, 1002))
    with pytest.raises(ValueError, match="chunksize"):
        pool.map(workload.inc, range(3), chunksize=0)


def test_map_timeout(make_pool) -> None:
    pool = make_pool(1)
    it = pool.map(workload.sleep_for, [5.0, 0.0], timeout=0.2)
    with pytest.raises(cf.TimeoutError):
        next(it)


def test_map_propagates_exception_in_order(make_pool) -> None:
    pool = make_pool(2)
    it = pool.map(workload.raise_value_error, ["a"])
    with pytest.raises(ValueError, match="a"):
        next(it)


# --- bad input ---------------------------------------------------------------------


def test_unpicklable_argument_fails_only_its_future(make_pool) -> None:
    pool = make_pool(1)
    bad = pool.submit(workload.identity, workload.Unpicklable())
    good = pool.submit(workload.inc, 1)
    with pytest.raises(SerializationError, match="argument 0") as info:
        bad.result(timeout=T)
    assert isinstance(info.value, pickle.PicklingError)
    assert good.result(timeout=T) == 2


def test_unpicklable_function_is_named(make_pool) -> None:
    pool = make_pool(1, serializer="pickle")
    with pytest.raises(SerializationError, match="function.*lambda.*importable module"):
        pool.submit(lambda x: x, 1).result(timeout=T)
    with pytest.raises(SerializationError, match="keyword argument 'y'"):
        pool.submit(workload.add, 1, y=threading.Lock()).result(timeout=T)


def test_unpicklable_result_fails_only_its_future(make_pool) -> None:
    pool = make_pool(1)
    with pytest.raises(SerializationError, match="result") as info:
        pool.submit(workload.return_lock).result(timeout=T)
    assert info.value.part == "result"
    assert pool.submit(workload.inc, 1).result(timeout=T) == 2


def test_invalid_arguments() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_workers"):
            ResilientPool(bad)
    with pytest.raises(TypeError, match="initializer"):
        ResilientPool(1, initializer=3)  # type: ignore[arg-type]


def test_submit_after_shutdown_raises(make_pool) -> None:
    pool = make_pool(1)
    pool.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(workload.inc, 1)


def test_initializer_runs_and_its_failure_surfaces(make_pool) -> None:
    pool = make_pool(1, initializer=workload.set_global, initargs=("ready",))
    assert pool.submit(workload.get_global).result(timeout=T) == "ready"
    broken = make_pool(1, initializer=workload.fail_init, initargs=("no database",))
    fut = broken.submit(workload.inc, 1)
    with pytest.raises(CrashLoopError) as info:
        fut.result(timeout=T)
    assert "no database" in str(info.value.__cause__)
    assert broken.stats().workers_started <= 3 + 1


# --- shutdown and orphans ---------------------------------------------------------------


def test_shutdown_leaves_no_child(start_method: str) -> None:
    pool = ResilientPool(2, mp_context=start_method)
    assert pool.submit(workload.inc, 1).result(timeout=T) == 2
    pids = {w.pid for w in pool.workers()}
    pool.shutdown(wait=True)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


def test_shutdown_cancel_futures(make_pool, tmp_path: Path) -> None:
    pool = make_pool(1)
    started, release = tmp_path / "s", tmp_path / "r"
    first = pool.submit(workload.touch_and_wait, str(started), str(release))
    wait_until(started.exists, what="first task started")
    rest = [pool.submit(workload.inc, i) for i in range(20)]
    release.touch()
    pool.shutdown(wait=True, cancel_futures=True)
    assert first.result(timeout=T) > 0
    assert all(f.done() for f in rest)
    assert any(f.cancelled() for f in rest)


def test_shutdown_from_done_callback_does_not_deadlock(make_pool) -> None:
    pool = make_pool(1)
    done = threading.Event()

    def cb(_f: cf.Future) -> None:
        pool.shutdown(wait=True)
        done.set()

    pool.submit(workload.inc, 1).add_done_callback(cb)
    assert done.wait(T)


def test_shutdown_with_open_map_iterator(make_pool) -> None:
    pool = make_pool(2)
    it = pool.map(workload.inc, itertools.count())
    assert next(it) == 1
    pool.shutdown(wait=True, cancel_futures=True)
    del it


def _run_script(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout, env=env)


def test_interpreter_exit_without_shutdown_finishes_work() -> None:
    r = _run_script(
        """
        import workload
        from resilpool import ResilientPool
        pool = ResilientPool(2)
        futs = [pool.submit(workload.inc, i) for i in range(100)]
        futs[-1].add_done_callback(lambda f: print("last", f.result(), flush=True))
        """
    )
    assert r.returncode == 0, r.stderr
    assert "last 100" in r.stdout


def test_parent_sigkilled_leaves_no_worker(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, time, workload
            from resilpool import ResilientPool
            if __name__ == "__main__":
                pool = ResilientPool(2)
                pool.submit(workload.subprocess_hog, 1, 60)
                futs = [pool.submit(workload.sleep_for, 60) for _ in range(4)]
                while len([w for w in pool.workers() if w.task_id]) < 2:
                    time.sleep(0.01)
                print(" ".join(str(w.pid) for w in pool.workers()), flush=True)
                time.sleep(60)
            """
        )
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2
        groups = set(pids)
        proc.kill()
        proc.wait(timeout=T)

        def all_gone() -> bool:
            for p in psutil.process_iter(["pid"]):
                try:
                    if p.pid in groups or os.getpgid(p.pid) in groups:
                        if p.status() != psutil.STATUS_ZOMBIE:
                            return False
                except (psutil.Error, ProcessLookupError):
                    continue
            return True

        wait_until(all_gone, timeout=10.0, what="workers and their children to exit after the parent died")
    finally:
        proc.kill()
        proc.wait(timeout=T)
        proc.stdout.close()  # type: ignore[union-attr]


def test_lambdas_and_local_functions_run_on_every_start_method(start_method: str) -> None:
    factor = 3

    def local(x: int) -> int:
        return x * factor

    with ResilientPool(2, mp_context=start_method) as pool:
        assert pool.submit(lambda x: x + 1, 1).result(timeout=T) == 2
        assert list(pool.map(local, range(4), timeout=T)) == [0, 3, 6, 9]
        assert list(pool.map(lambda x: -x, range(5), chunksize=2, timeout=T)) == [0, -1, -2, -3, -4]


def test_interactive_main_functions_run() -> None:
    """A function defined in an interactive __main__ (no file, as in a notebook) reaches the workers."""
    r = _run_script(
        """
        from resilpool import ResilientPool
        def f(x):
            return x * 2
        with ResilientPool(2) as pool:
            print("result", list(pool.map(f, range(4), timeout=30)))
        """
    )
    assert r.returncode == 0, r.stderr
    assert "result [0, 2, 4, 6]" in r.stdout


def test_interactive_main_classes_as_arguments_and_results(start_method: str) -> None:
    """Instances of a class defined in an interactive __main__ go both ways (cloudpickle by value)."""
    r = _run_script(
        f"""
        import workload
        from resilpool import ResilientPool
        class Point:
            def __init__(self, x):
                self.x = x
        def make(x):
            return Point(x)
        with ResilientPool(1, mp_context={start_method!r}) as pool:
            p = pool.submit(workload.identity, Point(3)).result(timeout=30)
            q = pool.submit(make, 4).result(timeout=30)
            print("result", p.x, q.x, type(q).__name__)
        """
    )
    assert r.returncode == 0, r.stderr
    assert "result 3 4 Point" in r.stdout


def test_bad_serializer_rejected() -> None:
    with pytest.raises(ValueError, match="serializer"):
        ResilientPool(1, serializer="json")  # type: ignore[arg-type]


# --- regressions: work left when a worker goes during shutdown, idle-pool retries ------------


def test_shutdown_finishes_work_when_the_last_worker_dies(make_pool) -> None:
    pool = make_pool(1)
    crash = pool.submit(workload.kill_self)
    after = pool.submit(workload.inc, 1)
    pool.shutdown(wait=True)  # must start a replacement for the queued task, not hang
    with pytest.raises(WorkerCrashedError):
        crash.result(timeout=T)
    assert after.result(timeout=T) == 2


def test_shutdown_finishes_work_across_max_tasks_retirements(make_pool) -> None:
    from resilpool import Limits

    pool = make_pool(1, limits=Limits(max_tasks=1))
    futs = [pool.submit(workload.pid_of) for _ in range(3)]
    pool.shutdown(wait=True)
    assert len({f.result(timeout=T) for f in futs}) == 3


def test_retry_on_a_fresh_worker_runs_on_an_idle_pool(make_pool, tmp_path: Path) -> None:
    pool = make_pool(1)
    assert pool.submit(workload.inc, 1).result(timeout=T) == 2  # the worker has run a task: not fresh
    fut = pool.submit(workload.crash_first_time, str(tmp_path / "m"), "ok", retry=1)
    assert fut.result(timeout=T) == "ok"


def test_pool_broken_for_good_when_rebuilds_keep_failing(make_pool) -> None:
    pool = make_pool(1)
    for n in range(1, 7):
        pool._break_core_for_test()
        if n <= 5:
            wait_until(lambda: pool.stats().rebuilds == n, what=f"rebuild {n}")
            assert pool.submit(workload.inc, 1).result(timeout=T) == 2
    wait_until(lambda: pool.stats().broken, what="pool marked broken")
    with pytest.raises(cf.process.BrokenProcessPool, match="could not be rebuilt"):
        pool.submit(workload.inc, 1)


def test_shutdown_cancel_futures_gives_up_waiting_retries(make_pool) -> None:
    from tenacity import stop_after_attempt, wait_fixed

    from resilpool import RetryPolicy

    pool = make_pool(1)
    retried = threading.Event()
    pool.add_listener(lambda e: retried.set() if type(e).__name__ == "TaskRetried" else None)
    policy = RetryPolicy(stop=stop_after_attempt(3), wait=wait_fixed(600))
    fut = pool.submit(workload.raise_value_error, "first attempt", retry=policy)
    assert retried.wait(T)  # now waiting 600 s for its second attempt
    pool.shutdown(wait=True, cancel_futures=True)  # would wait 600 s if the retry were kept
    with pytest.raises(ValueError, match="first attempt") as info:
        fut.result(timeout=T)
    assert any("cancel_futures" in n for n in info.value.__notes__)
