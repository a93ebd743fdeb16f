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
from conftest import RESULT_TIMEOUT, wait_for_line, wait_until

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


@pytest.mark.resilpool_core_errors
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


@pytest.mark.resilpool_core_errors
def test_pool_broken_for_good_when_rebuilds_keep_failing(make_pool) -> None:
    pool = make_pool(1)
    for n in range(1, 7):
        pool.break_core_for_test()
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


# --- abort and shutdown(kill_running=True) ---------------------------------------------


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_abort_takes_queued_tasks_back_from_a_busy_worker_and_runs_the_rest_once(tmp_path: Path, make_pool) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(1)
    list(pool.map(workload.inc, range(300), timeout=T))  # tiny tasks: several go down one pipe
    release = tmp_path / "release"
    started = tmp_path / "started"
    busy = pool.submit(workload.touch_and_wait, str(started), str(release))
    wait_until(started.exists, T, "the blocking task to start")
    paths = [tmp_path / f"run{i}" for i in range(8)]
    queued = [pool.submit(workload.count_run, str(p), i) for i, p in enumerate(paths)]
    pool.abort(queued[::2], reason="every other one")  # the worker is busy: these are taken back
    release.touch()
    assert busy.result(timeout=T) > 0
    for i, (f, p) in enumerate(zip(queued, paths)):
        if i % 2 == 0:
            with pytest.raises(cf.CancelledError):
                f.result(timeout=T)
            assert _lines(p) == 0
        else:
            assert f.result(timeout=T) == i
            assert _lines(p) == 1
    assert pool.stats().worker_crashes == 0


def test_abort_leaves_other_pools_futures_alone(tmp_path: Path, make_pool) -> None:  # type: ignore[no-untyped-def]
    # Task ids restart at 1 in every pool: a future is this pool's by its tag, not by its id.
    mine, theirs = make_pool(1), make_pool(1)
    release = tmp_path / "release"
    started = tmp_path / "started"
    busy = theirs.submit(workload.touch_and_wait, str(started), str(release))  # task 1 of "theirs"
    wait_until(started.exists, T, "the other pool's task to start")
    queued = theirs.submit(workload.inc, 41)  # task 2 of "theirs", waiting behind it
    mine_busy = mine.submit(workload.touch_and_wait, str(tmp_path / "mine"), str(release))  # task 1 of "mine"
    wait_until((tmp_path / "mine").exists, T, "this pool's task to start")
    mine_queued = mine.submit(workload.inc, 1)  # task 2 of "mine"
    mine.abort([busy, queued, cf.Future()], reason="not mine")
    release.touch()
    assert busy.result(timeout=T) > 0 and queued.result(timeout=T) == 42
    assert mine_busy.result(timeout=T) > 0 and mine_queued.result(timeout=T) == 2
    assert mine.stats().worker_crashes == theirs.stats().worker_crashes == 0


def test_shutdown_kill_running_returns_and_resolves_every_future(tmp_path: Path, make_pool) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(1)
    runs = tmp_path / "runs"
    running = pool.submit(workload.count_and_wait, str(runs), str(tmp_path / "never"), retry=2)
    wait_until(lambda: _lines(runs) == 1, T, "the task to start")  # its line written, not only the file made
    queued = [pool.submit(workload.inc, i) for i in range(5)]
    pool.shutdown(wait=True, cancel_futures=True, kill_running=True)
    with pytest.raises(WorkerCrashedError, match="kill_running"):
        running.result(timeout=0)
    for f in queued:
        assert f.cancelled() or isinstance(f.exception(timeout=0), cf.CancelledError)
    assert _lines(runs) == 1


# --- issue 13: nothing on the manager thread breaks the core; every state has a deadline ---


@pytest.mark.resilpool_core_errors
def test_junk_on_a_result_pipe_kills_only_that_worker(make_pool) -> None:  # type: ignore[no-untyped-def]
    import core_workload

    pool = make_pool(2)
    junk = pool.submit(core_workload.write_junk, 64)
    with pytest.raises(WorkerCrashedError, match="protocol error"):
        junk.result(timeout=T)
    assert [f.result(timeout=T) for f in [pool.submit(workload.inc, i) for i in range(20)]] == list(range(1, 21))
    assert pool.stats().rebuilds == 0


@pytest.mark.resilpool_core_errors
def test_a_result_for_another_task_is_a_protocol_error_for_that_worker_only(tmp_path: Path, make_pool) -> None:  # type: ignore[no-untyped-def]
    import core_workload

    pool = make_pool(2)
    other = pool.submit(core_workload.start_and_wait, str(tmp_path / "s"), str(tmp_path / "r"))
    wait_until((tmp_path / "s").exists, T, "the other task to start")
    liar = pool.submit(core_workload.answer_for, 1)  # task 1 is `other`, running on the other worker
    with pytest.raises(WorkerCrashedError, match="protocol error"):
        liar.result(timeout=T)
    (tmp_path / "r").touch()
    assert other.result(timeout=T) > 0  # its real result, not the forged 42
    assert pool.stats().rebuilds == 0


def test_system_exit_while_unpickling_a_result_fails_only_that_task(make_pool) -> None:  # type: ignore[no-untyped-def]
    import core_workload

    pool = make_pool(2)
    bad = pool.submit(core_workload.make_system_exit_on_unpickle)
    with pytest.raises(SerializationError, match="SystemExit"):
        bad.result(timeout=T)
    assert pool.submit(workload.inc, 1).result(timeout=T) == 2
    assert pool.stats().rebuilds == 0


def test_a_done_callback_raising_system_exit_is_logged_and_breaks_nothing(make_pool, caplog) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(2)
    seen: list[int] = []

    def bad(_: cf.Future) -> None:  # type: ignore[type-arg]
        raise SystemExit(1)

    futs = []
    for i in range(10):
        f = pool.submit(workload.inc, i)
        f.add_done_callback(bad)
        f.add_done_callback(lambda f: seen.append(f.result()))
        futs.append(f)
    assert [f.result(timeout=T) for f in futs] == list(range(1, 11))
    wait_until(lambda: len(seen) == 10, T, "every second callback to run")
    assert pool.stats().rebuilds == 0
    assert any("exception calling callback" in r.getMessage() for r in caplog.records)


def test_after_a_burst_of_tiny_tasks_two_blocking_tasks_run_on_two_workers_at_once(tmp_path: Path, make_pool) -> None:  # type: ignore[no-untyped-def]
    import core_workload

    pool = make_pool(2)
    for _ in range(3):
        futs = [pool.submit(workload.inc, i) for i in range(1000)]
        assert futs[-1].result(timeout=T) == 1000
        s = [tmp_path / f"s{i}" for i in range(2)]
        release = tmp_path / "release"
        blocking = [pool.submit(core_workload.start_and_wait, str(p), str(release)) for p in s]
        wait_until(lambda: all(p.exists() for p in s), T, "both blocking tasks to start before either is released")
        release.touch()
        assert len({f.result(timeout=T) for f in blocking}) == 2  # two workers
        for p in (*s, release):
            p.unlink()
        cf.wait(futs, timeout=T)


def test_tasks_taken_back_from_a_busy_worker_run_exactly_once(tmp_path: Path, make_pool) -> None:  # type: ignore[no-untyped-def]
    import core_workload

    pool = make_pool(2)
    for rnd in range(4):
        release = tmp_path / f"release{rnd}"
        started = tmp_path / f"started{rnd}"
        list(pool.map(workload.inc, range(500), timeout=T))  # tiny: deep pipelining
        blocker = pool.submit(core_workload.start_and_wait, str(started), str(release))
        runs = [tmp_path / f"r{rnd}-{i}" for i in range(200)]
        tiny = [pool.submit(core_workload.record, str(p), i) for i, p in enumerate(runs)]
        # Some of these were queued behind the blocker; the idle worker must run them all.
        assert [f.result(timeout=T) for f in tiny] == list(range(200))
        assert started.exists() or not blocker.done()
        release.touch()
        blocker.result(timeout=T)
        assert all(len(p.read_text().splitlines()) == 1 for p in runs)


@pytest.mark.resilpool_core_errors
def test_a_worker_stopped_between_tasks_is_replaced_and_its_queue_runs_elsewhere(make_pool, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from resilpool import Limits

    events: list[WorkerExited] = []
    pool = make_pool(2, limits=Limits(stall_timeout=1.0))
    pool.add_listener(lambda e: events.append(e) if isinstance(e, WorkerExited) else None)
    list(pool.map(workload.inc, range(500), timeout=T))
    # The other worker is kept busy, so the stopped one (idle, the least loaded) is sent
    # the next tasks: they wait in its pipe, never started.
    ran, go = tmp_path / "ran", tmp_path / "go"
    blocker = pool.submit(workload.count_and_spin, str(ran), str(go))  # busy: no stall
    wait_for_line(ran, T, "the blocker to start")
    busy = int(ran.read_text())
    # An idle, ready worker: under load a worker starved for stall_timeout with tasks queued
    # is replaced (by design), and its replacement may still be starting here.
    victim = wait_until(lambda: next((w.pid for w in pool.workers() if w.pid != busy and w.ready and not w.retiring), None), T, "an idle ready worker")
    os.kill(victim, signal.SIGSTOP)
    futs = [pool.submit(workload.inc, i) for i in range(500)]
    wait_until(lambda: any(e.pid == victim and e.reason is ExitReason.STALL for e in events), T, "the stopped worker to be replaced")
    go.touch()
    assert [f.result(timeout=T) for f in futs] == list(range(1, 501))
    assert blocker.result(timeout=T) == busy


@pytest.mark.resilpool_core_errors
def test_a_hung_initializer_misses_init_timeout_and_trips_the_breaker(tmp_path: Path, make_pool) -> None:  # type: ignore[no-untyped-def]
    import core_workload

    from resilpool import Breaker, Limits

    pool = make_pool(1, initializer=core_workload.hang, initargs=(str(tmp_path / "never"),), limits=Limits(init_timeout=0.3), breaker=Breaker(max_failures=1))
    futs = [pool.submit(workload.inc, i) for i in range(5)]
    for f in futs:
        with pytest.raises(CrashLoopError):
            f.result(timeout=T)
    pool.shutdown(wait=True)  # returns


def test_check_invariants_holds_after_mixed_work_and_flags_an_idle_pool_that_is_not(make_pool, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from resilpool._core.tasks import InvariantViolation

    pool = make_pool(2)
    futs = [pool.submit(workload.inc, i) for i in range(200)]
    futs += [pool.submit(workload.raise_value_error, "x") for _ in range(5)]
    futs.append(pool.submit(workload.kill_self))
    cf.wait(futs, timeout=T)
    pool.check_invariants(idle=True)
    blocker = pool.submit(workload.wait_for_file, str(tmp_path / "go"))
    pool.check_invariants()  # consistent while busy
    with pytest.raises(InvariantViolation, match="unresolved in an idle pool"):
        pool.check_invariants(idle=True)
    (tmp_path / "go").touch()
    blocker.result(timeout=T)


@pytest.mark.resilpool_core_errors  # the pool logs the listener's exception at ERROR
def test_a_listener_raising_system_exit_is_logged_and_later_events_still_arrive(make_pool, caplog) -> None:  # type: ignore[no-untyped-def]
    from resilpool.events import WorkerStarted

    pool = make_pool(1)
    seen: list[object] = []

    def bad(event: object) -> None:
        raise SystemExit(2)

    pool.add_listener(bad)
    pool.add_listener(seen.append)
    assert pool.submit(workload.inc, 1).result(timeout=T) == 2
    # (The first WorkerStarted may have been delivered before the listeners were added.)
    pool.submit(workload.kill_self)
    wait_until(lambda: any(isinstance(e, WorkerExited) for e in seen), T, "an event after the bad listener")
    wait_until(lambda: any(isinstance(e, WorkerStarted) and e.replaces for e in seen), T, "a later event")
    assert any("listener" in r.getMessage() for r in caplog.records)


def test_results_failing_to_unpickle_do_not_pin_their_workers_pipes() -> None:
    # Found by the soak: the unpickling error's traceback began at the manager's frame,
    # whose locals held the worker and its pipes; with every worker recycled after one task,
    # each failed future held on to a dead worker's two descriptors for as long as it lived.
    import gc

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    gc.collect()
    before = fds()
    with ResilientPool(2, max_tasks_per_child=1) as pool:
        futs = [pool.submit(workload.make_fails_to_unpickle) for _ in range(30)]
        errs = [f.exception(timeout=RESULT_TIMEOUT) for f in futs]
    gc.collect()
    extra = fds() - before
    assert all(isinstance(e, SerializationError) for e in errs)
    # The unpickling's traceback travels as text (as a worker's does), naming the failing call.
    causes = [e.__cause__ for e in errs if e is not None]
    assert len(causes) == 30 and all(c is not None and c.__traceback__ is None for c in causes)
    assert all(isinstance(c.__cause__, cf.process._RemoteTraceback) and "_raise_on_load" in str(c.__cause__) for c in causes if c)
    assert extra <= 4, f"{extra} more fds open after shutdown while 30 failed futures are held"


# --- fd hygiene: a worker holds no end of the pipes between the parent and another worker ----


def _pipe_ends(pid: int) -> set[tuple[int, int]]:
    """``(pipe inode, access mode)`` of every pipe end process ``pid`` holds (0 read, 1 write)."""
    ends = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if not target.startswith("pipe:["):
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                flags = next(int(line.split()[1], 8) for line in f if line.startswith("flags:"))
        except (OSError, StopIteration):  # closed meanwhile
            continue
        ends.add((int(target[len("pipe:[") : -1]), flags & 3))
    return ends


def _crossed_pipes(pids: list[int]) -> list[tuple[int, int, int]]:
    """``(pid, other pid, inode)`` for each pipe of which two workers hold opposite ends.

    Workers never talk to each other: a pipe they share is one they all read (the
    lifeline) or all write (inherited stdout/stderr). One held at both ends by two
    workers is a parent-side end one of them inherited: the task pipe's write end or the
    result pipe's read end of the other.
    """
    ends = {pid: _pipe_ends(pid) for pid in pids}
    return [(a, b, ino) for a in pids for b in pids if a != b for ino, mode in ends[a] if (ino, 1 - mode) in ends[b]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_no_worker_holds_the_parent_side_of_another_workers_pipes(make_pool, start_method: str) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(3, mp_context=start_method)
    assert pool.submit(workload.inc, 1).result(timeout=RESULT_TIMEOUT) == 2
    pids = wait_until(lambda: [w.pid for w in pool.workers()] if len(pool.workers()) == 3 and all(w.ready for w in pool.workers()) else None, RESULT_TIMEOUT, "3 ready workers")
    assert _crossed_pipes(pids) == []
    # A replacement is started beside the live workers (from the manager thread, with fork).
    os.kill(pids[0], signal.SIGKILL)
    new = wait_until(
        lambda: [w.pid for w in pool.workers()] if len(pool.workers()) == 3 and pids[0] not in {w.pid for w in pool.workers()} and all(w.ready for w in pool.workers()) else None,
        RESULT_TIMEOUT,
        "the replacement, ready",
    )
    assert _crossed_pipes(new) == []
    assert pool.submit(workload.inc, 2).result(timeout=RESULT_TIMEOUT) == 3
