"""Retry, poison quarantine, crash-loop breaker and core rebuild, with real worker processes.

Runs are counted outside the pool: each task function appends a line (its pid) to a
file, so "ran exactly twice" is read from the file system, not from the pool's own
bookkeeping.  Ordering comes from futures, files and pool events, never from sleeps.
The decisions themselves are tested as pure functions in ``test_retry_policy.py``.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import re
import signal
import threading
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pytest
import workload
from conftest import RESULT_TIMEOUT, wait_until
from tenacity import retry_if_exception_type, stop_after_attempt, wait_fixed

from resilpool import (
    Breaker,
    CrashLoopError,
    PoisonTaskError,
    ResilientPool,
    RetryPolicy,
    WorkerCrashedError,
)
from resilpool.events import CoreRebuilt, CrashLoopTripped, Event, TaskQuarantined, TaskRetried

T = RESULT_TIMEOUT
MakePool = Callable[..., ResilientPool]


# --- helpers ---------------------------------------------------------------------------


def pids(path: Path) -> list[int]:
    """The runs ``workload.count_*`` recorded in ``path``: one worker pid per run."""
    return [int(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_runs(*paths: Path, n: int = 1) -> None:
    """Wait until each ``path`` records ``n`` runs (a file's mere existence is not a finished count)."""
    wait_until(lambda: all(len(pids(p)) >= n for p in paths), timeout=T, what=f"{n} run(s) in {[p.name for p in paths]}")


def marker_runs(marker: Path) -> int:
    """How often ``workload.crash_first_time``/``hang_first_time`` ran for ``marker``."""
    runs = Path(str(marker) + ".runs")
    return len(runs.read_text()) if runs.exists() else 0


class Recorder:
    """A pool listener: keeps every event; waits (polling, bounded) for the ones a test expects."""

    def __init__(self, pool: ResilientPool) -> None:
        self.events: list[Event] = []
        pool.add_listener(self.events.append)

    def of(self, cls: type[Any]) -> list[Any]:
        return [e for e in list(self.events) if isinstance(e, cls)]

    def wait_for(self, cls: type[Any], n: int = 1) -> list[Any]:
        wait_until(lambda: len(self.of(cls)) >= n, timeout=T, what=f"{n} {cls.__name__} event(s)")
        return self.of(cls)


def failure(fut: cf.Future[Any]) -> BaseException:
    """The future's exception, waiting at most RESULT_TIMEOUT."""
    exc = fut.exception(timeout=T)
    assert exc is not None, f"expected a failure, got {fut.result(timeout=0)!r}"
    return exc


def check_notes(err: BaseException, runs: list[int], mentions: str) -> None:
    """One PEP 678 note per earlier attempt, naming its number and its worker's pid."""
    notes = getattr(err, "__notes__", [])
    assert len(notes) == len(runs), notes
    for i, (note, pid) in enumerate(zip(notes, runs, strict=True), start=1):
        assert re.match(rf"attempt {i}(/\d+)? pid {pid}: ", note), note
        assert mentions in note, note


# --- retry=N ------------------------------------------------------------------------------


def test_retry_survives_a_worker_death_and_runs_exactly_twice(start_method: str, make_pool: MakePool, tmp_path: Path) -> None:
    pool = make_pool(2, mp_context=start_method)
    rec = Recorder(pool)
    marker = tmp_path / "crash-once"
    fut = pool.submit(workload.crash_first_time, str(marker), "survived", retry=2)
    assert fut.result(timeout=T) == "survived"
    assert marker_runs(marker) == 2  # the kill on the first run, the success on the second; no third
    s = pool.stats()
    assert (s.retried, s.worker_crashes, s.completed, s.failed) == (1, 1, 1, 0)
    (ev,) = rec.wait_for(TaskRetried)
    assert ev.attempt == 1 and ev.delay_s == 0.0 and "WorkerCrashedError" in ev.error


@pytest.mark.parametrize("n", [0, 1, 3])
def test_retry_n_means_n_plus_one_attempts_with_the_history_as_notes(n: int, make_pool: MakePool, tmp_path: Path) -> None:
    pool = make_pool(2)
    rec = Recorder(pool)
    runs_file = tmp_path / "runs"
    err = failure(pool.submit(workload.count_and_raise, str(runs_file), retry=n))
    runs = pids(runs_file)
    assert len(runs) == n + 1
    # The future raises the last attempt's own exception; each earlier attempt is a note.
    assert type(err) is ValueError and str(err) == f"run {n + 1} failed"
    check_notes(err, runs[:-1], "raised ValueError: run ")
    for i, note in enumerate(getattr(err, "__notes__", []), start=1):
        assert f"run {i} failed" in note
    s = pool.stats()
    assert (s.retried, s.failed, s.completed) == (n, 1, 0)
    if n:
        assert [e.attempt for e in rec.wait_for(TaskRetried, n)] == list(range(1, n + 1))
    assert len(rec.of(TaskRetried)) == n


def test_a_task_raising_system_exit_is_retried_like_any_failure(make_pool: MakePool, tmp_path: Path) -> None:
    pool = make_pool(1)
    runs_file = tmp_path / "runs"
    err = failure(pool.submit(workload.count_and_raise, str(runs_file), "SystemExit", retry=1))
    assert type(err) is SystemExit and str(err) == "run 2 failed"
    runs = pids(runs_file)
    assert len(runs) == 2 and len(set(runs)) == 1  # the worker survived its task's SystemExit
    check_notes(err, runs[:1], "raised SystemExit: run 1 failed")


def test_exhausted_retries_after_worker_deaths_keep_every_attempt(make_pool: MakePool, tmp_path: Path) -> None:
    pool = make_pool(2)  # quarantine_after=3 by default: two deaths do not quarantine
    runs_file = tmp_path / "runs"
    err = failure(pool.submit(workload.count_and_kill, str(runs_file), retry=1))
    runs = pids(runs_file)
    assert len(runs) == 2
    assert isinstance(err, WorkerCrashedError) and isinstance(err, BrokenProcessPool)
    assert err.pid == runs[1] and err.exitcode == -signal.SIGKILL  # the last attempt's error
    check_notes(err, runs[:1], "SIGKILL")
    assert pool.stats().worker_crashes == 2


@pytest.mark.parametrize("retry", [None, 0])
def test_a_task_without_retry_never_runs_twice(retry: int | None, make_pool: MakePool, tmp_path: Path) -> None:
    pool = make_pool(2)
    killed, raised = tmp_path / "killed", tmp_path / "raised"
    crash = failure(pool.submit(workload.count_and_kill, str(killed), retry=retry))
    assert isinstance(crash, WorkerCrashedError)
    assert crash.pid == pids(killed)[0] and crash.fn_name == "count_and_kill"
    assert isinstance(failure(pool.submit(workload.count_and_raise, str(raised), retry=retry)), ValueError)
    assert pool.submit(workload.inc, 1).result(timeout=T) == 2  # the pool lives on
    pool.shutdown(wait=True)  # nothing left anywhere that could run them again
    assert len(pids(killed)) == 1 and len(pids(raised)) == 1
    s = pool.stats()
    assert (s.retried, s.failed, s.completed, s.worker_crashes) == (0, 2, 1, 1)


def test_retry_policy_predicate_decides_which_failures_are_retried(make_pool: MakePool, tmp_path: Path) -> None:
    pool = make_pool(2)
    policy = RetryPolicy(stop=stop_after_attempt(3), retry=retry_if_exception_type(ConnectionError))
    other, transient = tmp_path / "other", tmp_path / "transient"
    err = failure(pool.submit(workload.count_and_raise, str(other), "ValueError", retry=policy))
    assert type(err) is ValueError and len(pids(other)) == 1 and not hasattr(err, "__notes__")
    err = failure(pool.submit(workload.count_and_raise, str(transient), "ConnectionError", retry=policy))
    assert type(err) is ConnectionError and len(pids(transient)) == 3
    check_notes(err, pids(transient)[:2], "raised ConnectionError")


def test_a_task_timeout_is_retried_too(make_pool: MakePool, tmp_path: Path) -> None:
    pool = make_pool(1, monitor_interval=0.05)
    rec = Recorder(pool)
    marker = tmp_path / "hang-once"
    fut = pool.options(task_timeout=0.3, retry=1).submit(workload.hang_first_time, str(marker), "woke")
    assert fut.result(timeout=T) == "woke"
    assert marker_runs(marker) == 2
    s = pool.stats()
    assert s.retried == 1 and s.recycled.get("timeout") == 1
    (ev,) = rec.wait_for(TaskRetried)
    assert "TaskTimeoutError" in ev.error


def _broken_predicate(retry_state: Any) -> bool:
    raise ZeroDivisionError("bug in a user's retry predicate")


@pytest.mark.resilpool_core_errors
def test_a_faulty_retry_policy_fails_its_task_not_the_pool(make_pool: MakePool, tmp_path: Path) -> None:
    pool = make_pool(2)
    runs_file = tmp_path / "runs"
    err = failure(pool.submit(workload.count_and_raise, str(runs_file), retry=RetryPolicy(retry=_broken_predicate)))
    assert type(err) is ValueError and len(pids(runs_file)) == 1
    assert getattr(err, "__notes__", []) == ["not retried: the retry policy raised ZeroDivisionError: bug in a user's retry predicate"]
    assert pool.submit(workload.inc, 1).result(timeout=T) == 2
    assert pool.stats().rebuilds == 0


# --- backoff ------------------------------------------------------------------------------


def test_backoff_holds_neither_a_worker_nor_the_caller(make_pool: MakePool, tmp_path: Path) -> None:
    pool = make_pool(1)  # one worker: if the backoff slept in it, nothing else could run meanwhile
    rec = Recorder(pool)
    marker = tmp_path / "crash-once"
    policy = RetryPolicy(stop=stop_after_attempt(2), wait=wait_fixed(2))
    slow = pool.submit(workload.crash_first_time, str(marker), "after backoff", retry=policy)
    (ev,) = rec.wait_for(TaskRetried)  # the first attempt failed; the second waits 2 s in the parent
    assert ev.delay_s == 2.0
    others = [pool.submit(workload.inc, i) for i in range(5)]
    assert [f.result(timeout=T) for f in others] == [1, 2, 3, 4, 5]
    assert not slow.done()  # the others ran on the only worker while the retry waited
    assert marker_runs(marker) == 1
    assert slow.result(timeout=T) == "after backoff"
    assert marker_runs(marker) == 2


# --- poison quarantine ------------------------------------------------------------------------


@pytest.mark.resilpool_core_errors
def test_poison_task_is_quarantined_after_k_deaths_whatever_retries_remain(make_pool: MakePool, tmp_path: Path) -> None:
    # One worker and the poison submitted first: every attempt runs on a fresh worker,
    # so every death is blamed on it and it dies exactly K times.
    pool = make_pool(1, breaker=Breaker(quarantine_after=3))
    rec = Recorder(pool)
    runs_file = tmp_path / "runs"
    poison = pool.submit(workload.count_and_kill, str(runs_file), tag="bad-input-17", retry=10)
    others = [pool.submit(workload.inc, i) for i in range(10)]
    err = failure(poison)
    assert [f.result(timeout=T) for f in others] == list(range(1, 11))
    runs = pids(runs_file)
    assert len(runs) == 3 and len(set(runs)) == 3
    assert isinstance(err, PoisonTaskError)
    assert err.crashes == 3 and err.fn_name == "count_and_kill"
    assert "tag='bad-input-17'" in (err.args_repr or "")
    assert "count_and_kill(" in str(err) and "tag='bad-input-17'" in str(err)
    assert isinstance(err.__cause__, WorkerCrashedError) and err.__cause__.pid == runs[-1]
    check_notes(err, runs, "SIGKILL")  # every attempt, the last included
    s = pool.stats()
    assert (s.quarantined, s.retried, s.worker_crashes, s.completed, s.failed) == (1, 2, 3, 10, 1)
    (ev,) = rec.wait_for(TaskQuarantined)
    assert (ev.crashes, ev.fn_name) == (3, "count_and_kill")


@pytest.mark.resilpool_core_errors
def test_poison_task_is_quarantined_while_other_tasks_finish(make_pool: MakePool, tmp_path: Path) -> None:
    pool = make_pool(2, breaker=Breaker(quarantine_after=2))
    runs_file = tmp_path / "runs"
    poison = pool.submit(workload.count_and_kill, str(runs_file), tag="poison", retry=10)
    others = [pool.submit(workload.add, i, i) for i in range(30)]
    err = failure(poison)
    assert [f.result(timeout=T) for f in others] == [2 * i for i in range(30)]
    assert isinstance(err, PoisonTaskError) and err.crashes == 2
    # A death on a worker that had run other tasks is not blamed (it may be their leak):
    # the retry goes to a fresh worker. So 2 blamed deaths take 2 or 3 runs, never 11.
    runs = pids(runs_file)
    assert 2 <= len(runs) <= 3
    check_notes(err, runs, "SIGKILL")
    assert pool.stats().quarantined == 1


@pytest.mark.resilpool_core_errors
def test_a_death_on_a_worker_that_ran_other_tasks_is_not_blamed(make_pool: MakePool, tmp_path: Path) -> None:
    pool = make_pool(1, breaker=Breaker(quarantine_after=1))
    assert pool.submit(workload.inc, 0).result(timeout=T) == 1  # the only worker is no longer fresh
    runs_file = tmp_path / "runs"
    err = failure(pool.submit(workload.count_and_kill, str(runs_file), retry=5))
    runs = pids(runs_file)
    # First death: old worker, not blamed, retried on a fresh one; second death: blamed, quarantined.
    assert len(runs) == 2
    assert isinstance(err, PoisonTaskError) and err.crashes == 1
    check_notes(err, runs, "SIGKILL")
    # A fresh pool: the first death is blamed at once.
    fresh = make_pool(1, breaker=Breaker(quarantine_after=1))
    runs_file2 = tmp_path / "runs2"
    err = failure(fresh.submit(workload.count_and_kill, str(runs_file2), retry=5))
    assert isinstance(err, PoisonTaskError) and len(pids(runs_file2)) == 1


# --- crash-loop breaker ---------------------------------------------------------------------


@pytest.mark.resilpool_core_errors
def test_failing_initializer_trips_the_breaker(start_method: str, make_pool: MakePool, tmp_path: Path) -> None:
    max_failures, max_workers = 3, 2
    release = tmp_path / "fail-now"  # workers fail their initializer once it exists
    pool = make_pool(
        max_workers,
        mp_context=start_method,
        initializer=workload.fail_init_when,
        initargs=(str(release), "initializer exploded: no database"),
        breaker=Breaker(max_failures=max_failures, window=60.0),
    )
    rec = Recorder(pool)
    futures = [pool.submit(workload.inc, i, retry=3) for i in range(4)]  # pending: no worker is ready
    release.touch()
    for fut in futures:
        err = failure(fut)
        assert isinstance(err, CrashLoopError) and isinstance(err, BrokenProcessPool)
        cause = err.__cause__
        assert isinstance(cause, RuntimeError) and str(cause) == "initializer exploded: no database"
        assert "fail_init_when" in str(cause.__cause__)  # the worker's traceback
    s = pool.stats()
    assert s.broken
    assert max_failures + 1 <= s.workers_started <= max_failures + max_workers + 1
    assert s.worker_crashes >= max_failures + 1  # workers still in their initializer die later
    # Later submits fail at once, with the same cause.
    with pytest.raises(CrashLoopError) as later:
        pool.submit(workload.inc, 5)
    assert str(later.value.__cause__) == "initializer exploded: no database"
    with pytest.raises(CrashLoopError):
        list(pool.map(workload.inc, range(3), timeout=T))
    assert pool.stats().workers_started == s.workers_started  # it stopped starting workers
    (ev,) = rec.wait_for(CrashLoopTripped)
    assert ev.deaths == max_failures + 1 and ev.window_s == 60.0 and "initializer exploded" in ev.cause


@pytest.mark.resilpool_core_errors
def test_breaker_default_bounds_process_starts(make_pool: MakePool, tmp_path: Path) -> None:
    release = tmp_path / "fail-now"
    pool = make_pool(2, initializer=workload.fail_init_when, initargs=(str(release),))  # default max_failures: 4
    fut = pool.submit(workload.inc, 1)
    release.touch()
    err = failure(fut)
    assert isinstance(err, CrashLoopError) and err.deaths == 5
    assert 5 <= pool.stats().workers_started <= 4 + 2 + 1


@pytest.mark.resilpool_core_errors
def test_deaths_of_ready_workers_do_not_trip_the_crash_loop_breaker(make_pool: MakePool, tmp_path: Path) -> None:
    # The breaker counts start-up failures only; task deaths are the quarantine's business.
    pool = make_pool(1, breaker=Breaker(max_failures=0, quarantine_after=4))
    runs_file = tmp_path / "runs"
    err = failure(pool.submit(workload.count_and_kill, str(runs_file), retry=10))
    assert isinstance(err, PoisonTaskError) and len(pids(runs_file)) == 4
    s = pool.stats()
    assert not s.broken and s.worker_crashes == 4
    assert pool.submit(workload.inc, 1).result(timeout=T) == 2


@pytest.mark.resilpool_core_errors
def test_breaker_fails_pending_tasks_but_lets_running_ones_finish(make_pool: MakePool, tmp_path: Path) -> None:
    # One worker initializes fine; every other fails its initializer until the breaker trips.
    # Four blocking tasks: the good worker takes one and holds it; the others stay pending.
    flag, release = tmp_path / "first-worker", tmp_path / "release"
    pool = make_pool(2, initializer=workload.init_ok_once, initargs=(str(flag),), breaker=Breaker(max_failures=4))
    files = [tmp_path / f"task-{i}" for i in range(4)]
    futures = [pool.submit(workload.count_and_wait, str(f), str(release), retry=2) for f in files]
    wait_until(lambda: sum(f.done() for f in futures) == 3, timeout=T, what="the pending tasks to fail")
    assert pool.stats().broken
    wait_until(lambda: any(pids(f) for f in files), timeout=T, what="a task to start on the good worker")
    started = [f for f in files if pids(f)]
    assert len(started) == 1  # only the good worker ever ran anything
    for fut in futures:
        if fut.done():
            err = failure(fut)
            assert isinstance(err, CrashLoopError)
            assert str(err.__cause__) == "initializer failed: not the first worker"
    (running,) = [fut for fut in futures if not fut.done()]
    release.touch()
    assert running.result(timeout=T) == pids(started[0])[0]  # the good worker finished its task
    with pytest.raises(CrashLoopError):
        pool.submit(workload.inc, 1)


@pytest.mark.resilpool_core_errors
def test_breaker_trip_fails_a_retry_waiting_in_backoff(make_pool: MakePool, tmp_path: Path) -> None:
    # The one good worker dies under a task; every replacement fails its initializer.
    flag, marker = tmp_path / "first-worker", tmp_path / "crash-once"
    pool = make_pool(2, initializer=workload.init_ok_once, initargs=(str(flag),), breaker=Breaker(max_failures=4))
    rec = Recorder(pool)
    policy = RetryPolicy(stop=stop_after_attempt(2), wait=wait_fixed(600))  # far beyond RESULT_TIMEOUT
    fut = pool.submit(workload.crash_first_time, str(marker), retry=policy)
    rec.wait_for(TaskRetried)
    err = failure(fut)  # at the trip, not after the backoff
    assert isinstance(err, CrashLoopError) and pool.stats().broken
    assert marker_runs(marker) == 1


# --- core rebuild ---------------------------------------------------------------------------


@pytest.mark.resilpool_core_errors
def test_core_rebuild_loses_no_queued_task(make_pool: MakePool, tmp_path: Path) -> None:
    pool = make_pool(2)
    rec = Recorder(pool)
    release = tmp_path / "release"

    # A retry waiting out its backoff when the core breaks.
    marker = tmp_path / "crash-once"
    backing_off = pool.submit(
        workload.crash_first_time, str(marker), "backed off", retry=RetryPolicy(stop=stop_after_attempt(3), wait=wait_fixed(3))
    )
    rec.wait_for(TaskRetried)
    # Two tasks running when it breaks: one idempotent (retry=1), one not.
    idem, plain = tmp_path / "idempotent", tmp_path / "plain"
    running_idem = pool.submit(workload.count_and_wait, str(idem), str(release), retry=1)
    running_plain = pool.submit(workload.count_and_wait, str(plain), str(release))
    wait_runs(idem, plain)  # both started
    # Queued behind them (both workers are busy).
    queued_files = [tmp_path / f"queued-{i}" for i in range(6)]
    queued = [pool.submit(workload.count_run, str(p), i) for i, p in enumerate(queued_files)]
    assert not any(f.done() for f in queued)

    pool.break_core_for_test()
    (ev,) = rec.wait_for(CoreRebuilt)
    release.touch()

    assert [f.result(timeout=T) for f in queued] == list(range(6))
    assert all(len(pids(p)) == 1 for p in queued_files)  # each ran once: they had never started
    assert backing_off.result(timeout=T) == "backed off" and marker_runs(marker) == 2
    assert running_idem.result(timeout=T) in pids(idem)
    assert len(pids(idem)) == 2  # interrupted by the rebuild, run again on the new core
    err = failure(running_plain)
    assert isinstance(err, WorkerCrashedError) and "rebuilt" in str(err)
    assert len(pids(plain)) == 1  # not idempotent: never run twice
    assert (ev.carried_over, ev.failed) == (8, 1)
    assert "CoreBrokenForTest" in ev.cause
    s = pool.stats()
    assert s.rebuilds == 1 and not s.broken
    assert (s.completed, s.failed, s.retried) == (8, 1, 2)
    assert pool.submit(workload.inc, 1).result(timeout=T) == 2  # the new core takes new work


@pytest.mark.resilpool_core_errors
def test_core_rebuilds_again_and_again(make_pool: MakePool, tmp_path: Path) -> None:
    pool = make_pool(1)
    rec = Recorder(pool)
    for n in range(1, 3):
        queued = [pool.submit(workload.inc, i, retry=1) for i in range(20)]
        pool.break_core_for_test()
        rec.wait_for(CoreRebuilt, n)
        assert [f.result(timeout=T) for f in queued] == list(range(1, 21))
    assert pool.stats().rebuilds == 2


@pytest.mark.resilpool_core_errors
def test_rebuild_note_names_the_interrupted_attempts_worker(make_pool: MakePool, tmp_path: Path) -> None:
    pool = make_pool(1)
    rec = Recorder(pool)
    runs_file, release = tmp_path / "runs", tmp_path / "release"
    fut = pool.submit(workload.count_wait_raise, str(runs_file), str(release), retry=1)
    wait_runs(runs_file)
    pool.break_core_for_test()
    rec.wait_for(CoreRebuilt)
    release.touch()
    err = failure(fut)
    runs = pids(runs_file)
    assert type(err) is ValueError and str(err) == "run 2 failed" and len(runs) == 2
    notes = getattr(err, "__notes__", [])
    assert len(notes) == 1 and notes[0].startswith("attempt 1 ") and "rebuilt" in notes[0]
    assert re.match(rf"attempt 1(/\d+)? pid {runs[0]}: ", notes[0]), notes[0]


# --- where retry= comes from ---------------------------------------------------------------


@pytest.mark.parametrize(("chunksize", "retry"), [(1, 1), (2, 2)])
def test_map_with_retry(chunksize: int, retry: int, make_pool: MakePool, tmp_path: Path) -> None:
    pool = make_pool(2)
    markers = [str(tmp_path / f"m{i}") for i in range(6)]
    got = list(pool.map(workload.crash_first_time, markers, range(6), chunksize=chunksize, retry=retry, timeout=T))
    assert got == list(range(6))
    # A chunk is retried as a whole: with two items, each crashing once, it needs two retries.
    assert pool.stats().retried == 6
    if chunksize == 1:
        assert [marker_runs(Path(m)) for m in markers] == [2] * 6


def test_pool_default_retry_applies_and_can_be_overridden(make_pool: MakePool, tmp_path: Path) -> None:
    pool = make_pool(2, retry=1)
    a, b, c, d = (tmp_path / x for x in "abcd")
    assert pool.submit(workload.crash_first_time, str(a), "a").result(timeout=T) == "a"
    assert marker_runs(a) == 2
    assert list(pool.map(workload.crash_first_time, [str(b)], ["b"], timeout=T)) == ["b"]
    assert marker_runs(b) == 2
    assert isinstance(failure(pool.submit(workload.crash_first_time, str(c), retry=0)), WorkerCrashedError)
    assert marker_runs(c) == 1  # retry=0 opts out of the default
    assert pool.options(retry=2).submit(workload.count_and_raise, str(d)).exception(timeout=T) is not None
    assert len(pids(d)) == 3


def test_partial_passes_a_functions_own_retry_parameter(make_pool: MakePool, tmp_path: Path) -> None:
    pool = make_pool(2)
    marker = tmp_path / "crash-once"
    fn = functools.partial(workload.crash_first_time_own_retry, retry="the function's own")
    # submit consumes retry=; the partial carries the function's parameter of the same name.
    fut = pool.submit(fn, str(marker), retry=1)
    assert fut.result(timeout=T) == ("own retry", "the function's own")
    assert marker_runs(marker) == 2
    assert pool.stats().retried == 1


def test_concurrent_retries_from_many_threads(make_pool: MakePool, tmp_path: Path) -> None:
    pool = make_pool(2)
    markers = [tmp_path / f"m{i}" for i in range(8)]
    results: dict[int, Any] = {}

    def submit(i: int) -> None:
        results[i] = pool.submit(workload.crash_first_time, str(markers[i]), i, retry=2).result(timeout=T)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T)
    assert results == {i: i for i in range(8)}
    assert [marker_runs(m) for m in markers] == [2] * 8
    assert pool.stats().retried == 8
