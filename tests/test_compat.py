"""ResilientPool as a drop-in for ``concurrent.futures.ProcessPoolExecutor``, checked side by side.

Every scenario runs against both executors (the ``kind`` parameter): a claim that
resilpool behaves like the stdlib is checked against the real stdlib on the
interpreter running the tests. Scenarios and messages follow CPython's
``Lib/test/test_concurrent_futures/``. Where resilpool differs on purpose, the
test asserts each side's own behaviour, and docs/failures.md ("Differences from
ProcessPoolExecutor") gives the reason; the ``DIFFERENCE:`` comments point there.

The stdlib executor is never given the ``fork`` start method in this process: on
3.12+ forking a multi-threaded process (pytest-xdist has threads) warns, and
warnings are errors here. Fork is covered in subprocesses (the atexit tests).
"""

from __future__ import annotations

import concurrent.futures as cf
import concurrent.futures.process
import contextlib
import gc
import io
import itertools
import multiprocessing
import os
import pickle
import subprocess
import sys
import textwrap
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import workload
from conftest import START_METHODS, wait_until

from resilpool import Limits, ResilientPool

T = 30.0  # every wait on a future has this bound
KINDS = ["stdlib", "resilpool"]
#: Start methods the stdlib executor may use in this (multi-threaded) process.
IN_PROCESS_METHODS = [m for m in START_METHODS if m != "fork"]

Executor = cf.ProcessPoolExecutor | ResilientPool


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make(kind: str) -> Iterator[Callable[..., Executor]]:
    """Build executors of this test's kind (forkserver unless told); shut down and joined at the end."""
    made: list[Executor] = []

    def build(*args: Any, **kwargs: Any) -> Executor:
        if len(args) < 2 and "mp_context" not in kwargs:
            kwargs["mp_context"] = multiprocessing.get_context("forkserver")
        ex = construct(kind, *args, **kwargs)
        made.append(ex)
        return ex

    yield build
    for ex in made:
        ex.shutdown(wait=True, cancel_futures=True)


def construct(kind: str, *args: Any, **kwargs: Any) -> Executor:
    if kind == "stdlib":
        return cf.ProcessPoolExecutor(*args, **kwargs)
    return ResilientPool(*args, **kwargs)


# --- task functions (workers import this module by name) ----------------------------------


def mul(x: int, y: int) -> int:
    return x * y


def capture(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


def raise_runtime_error() -> None:
    raise RuntimeError(123)  # some comment


class Dummy:
    """A result or argument whose lifetime a weak reference tells."""

    def __init__(self, value: Any = None) -> None:
        self.value = value

    def method(self) -> None:
        pass


def make_dummy(value: Any) -> Dummy:
    return Dummy(value)


def take(obj: Any) -> None:
    return None


class TouchWhenFreedElsewhere:
    """Touches ``path`` when freed in a process other than the one that made it (a worker)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.owner = os.getpid()

    def __del__(self) -> None:
        if os.getpid() != self.owner:
            Path(self.path).touch()


class ExitAtPickle:
    """Raises SystemExit while being pickled (CPython's ``ExitAtPickle``)."""

    def __reduce__(self) -> Any:
        raise SystemExit()


def return_exit_at_pickle(_: Any = None) -> ExitAtPickle:
    return ExitAtPickle()


def raise_base(name: str) -> None:
    raise {"SystemExit": SystemExit(7), "KeyboardInterrupt": KeyboardInterrupt()}[name]


def record_then_wait(record_dir: str, i: int, gate: str) -> int:
    """Mark item ``i`` as run; item 0 returns after 20 ms, the others when ``gate`` exists."""
    Path(record_dir, str(i)).touch()
    if i == 0:
        time.sleep(0.02)  # long enough that the pool queues one task per worker (no pipelining)
    else:
        workload.wait_for_file(gate)
    return i


def ran(record_dir: Path) -> int:
    return len(list(record_dir.iterdir()))


# --- constructor -----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, -1])
def test_max_workers_must_be_greater_than_zero(kind: str, n: int) -> None:
    with pytest.raises(ValueError, match="^max_workers must be greater than 0$"):
        construct(kind, max_workers=n)


def test_max_tasks_per_child_validation(kind: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    with pytest.raises(TypeError, match="^max_tasks_per_child must be an integer$"):
        construct(kind, 1, ctx, max_tasks_per_child="3")
    with pytest.raises(ValueError, match="^max_tasks_per_child must be >= 1$"):
        construct(kind, 1, ctx, max_tasks_per_child=0)


@pytest.mark.parametrize("method", IN_PROCESS_METHODS)
def test_max_tasks_per_child_replaces_the_worker(make: Callable[..., Executor], method: str) -> None:
    # CPython's test_max_tasks_per_child: three tasks on one worker, the fourth on a new one.
    ex = make(1, multiprocessing.get_context(method), max_tasks_per_child=3)
    pids = [ex.submit(os.getpid).result(timeout=T) for _ in range(4)]
    assert pids[0] == pids[1] == pids[2]
    assert pids[3] != pids[0]


def test_max_tasks_per_child_with_fork() -> None:
    # DIFFERENCE (max_tasks_per_child with fork): the stdlib refuses it; resilpool recycles.
    fork = multiprocessing.get_context("fork")
    with pytest.raises(ValueError, match="max_tasks_per_child is incompatible with the 'fork'"):
        cf.ProcessPoolExecutor(1, fork, max_tasks_per_child=3)
    pool = ResilientPool(1, fork, max_tasks_per_child=2)
    try:
        pids = [pool.submit(os.getpid).result(timeout=T) for _ in range(3)]
        assert pids[0] == pids[1] != pids[2]
    finally:
        pool.shutdown(wait=True)


def test_max_tasks_per_child_is_limits_max_tasks() -> None:
    # resilpool's own spelling of the setting: the same, and a conflict is refused.
    with pytest.raises(ValueError, match=r"max_tasks_per_child=3 conflicts with limits.max_tasks=5"):
        ResilientPool(1, max_tasks_per_child=3, limits=Limits(max_tasks=5))
    pool = ResilientPool(1, "spawn", max_tasks_per_child=4, limits=Limits(max_tasks=4), monitor_interval=None)
    try:
        assert pool.limits.max_tasks == 4
    finally:
        pool.shutdown(wait=True)


def test_max_tasks_early_shutdown(make: Callable[..., Executor]) -> None:
    # CPython's test_max_tasks_early_shutdown: replacements keep running queued work at shutdown.
    ex = make(3, max_tasks_per_child=1)
    futures = [ex.submit(mul, i, i) for i in range(6)]
    ex.shutdown()
    assert [f.result(timeout=T) for f in futures] == [i * i for i in range(6)]


def test_initializer_runs_in_every_worker(make: Callable[..., Executor]) -> None:
    ex = make(2, initializer=workload.set_global, initargs=("initialized",))
    futures = [ex.submit(workload.get_global) for _ in range(4)]
    assert [f.result(timeout=T) for f in futures] == ["initialized"] * 4


@pytest.mark.resilpool_core_errors  # each failed initializer and the tripped breaker log at ERROR
def test_failing_initializer_breaks_the_pool(make: Callable[..., Executor]) -> None:
    # CPython's FailingInitializerMixin: the future fails with BrokenExecutor, and once the
    # pool is broken every submit raises it. (resilpool: after its crash-loop breaker trips.)
    ex = make(1, initializer=workload.fail_init, initargs=("error in initializer",))
    try:
        future = ex.submit(workload.get_global)
    except cf.BrokenExecutor:
        pass
    else:
        with pytest.raises(cf.BrokenExecutor):
            future.result(timeout=T)

    def broken() -> bool:
        try:
            ex.submit(workload.get_global).cancel()
        except cf.BrokenExecutor:
            return True
        return False

    wait_until(broken, timeout=T, what="submit() to raise BrokenExecutor")


def test_initializer_must_be_callable(kind: str) -> None:
    with pytest.raises(TypeError, match="^initializer must be a callable"):
        construct(kind, 1, multiprocessing.get_context("spawn"), 5)


def test_max_workers_of_the_wrong_type(kind: str) -> None:
    # DIFFERENCE (max_workers type): the stdlib fails on the comparison; resilpool names it.
    with pytest.raises(TypeError if kind == "stdlib" else ValueError, match=None if kind == "stdlib" else "max_workers"):
        construct(kind, "2")


def test_workers_start_with_the_pool(kind: str) -> None:
    # DIFFERENCE (worker start): the stdlib starts workers on submit; resilpool at construction.
    from conftest import _children

    before = _children()  # spawn: forkserver's children would pass for the forkserver here
    ex = construct(kind, 2, mp_context=multiprocessing.get_context("spawn"))
    try:
        if kind == "stdlib":
            assert _children() == before
        else:
            # The pool's reaper (resilpool/_core/reaper.py) is a child too: count the workers.
            def started() -> bool:
                pids = {w.pid for w in ex.workers()}  # type: ignore[attr-defined]
                return len(pids) == 2 and pids <= _children() - before

            wait_until(started, timeout=T, what="two workers before any submit")
    finally:
        ex.shutdown(wait=True)


@pytest.mark.parametrize("method", IN_PROCESS_METHODS)
def test_mp_context_is_used(kind: str, method: str) -> None:
    ctx = multiprocessing.get_context(method)
    ex = construct(kind, 2, mp_context=ctx)
    try:
        assert ex.submit(os.getpid).result(timeout=T) != os.getpid()
    finally:
        ex.shutdown(wait=True)


def test_positional_arguments_in_the_stdlib_order(make: Callable[..., Executor]) -> None:
    ex = make(2, multiprocessing.get_context("spawn"), workload.set_global, ("positional",))
    assert ex.submit(workload.get_global).result(timeout=T) == "positional"


# --- submit ----------------------------------------------------------------------------------


def test_submit(make: Callable[..., Executor]) -> None:
    ex = make(2)
    assert ex.submit(pow, 2, 8).result(timeout=T) == 256
    assert ex.submit(mul, 2, y=8).result(timeout=T) == 16


def test_submit_keywords_named_like_its_own_parameters(make: Callable[..., Executor]) -> None:
    # CPython's test_submit_keyword: self and fn are positional-only.
    ex = make(2)
    assert ex.submit(capture, 1, self=2, fn=3).result(timeout=T) == ((1,), {"self": 2, "fn": 3})
    with pytest.raises(TypeError):
        ex.submit(fn=capture, arg=1)
    with pytest.raises(TypeError):
        ex.submit(arg=1)


def test_cancel_a_pending_future(make: Callable[..., Executor], tmp_path: Path) -> None:
    ex = make(1)
    started, release = tmp_path / "started", tmp_path / "release"
    first = ex.submit(workload.touch_and_wait, str(started), str(release))
    wait_until(started.exists, timeout=T, what="first task started")
    # The stdlib hands max_workers + 1 calls to its queue; those run (and cannot be cancelled).
    queued = [ex.submit(workload.count_run, str(tmp_path / "count"), i) for i in range(5)]
    last = queued[-1]
    assert not first.cancel()  # running
    assert last.cancel()
    assert last.cancelled()
    with pytest.raises(cf.CancelledError):
        last.result(timeout=T)
    release.touch()
    first.result(timeout=T)
    ex.shutdown(wait=True)
    runs = (tmp_path / "count").read_text().splitlines() if (tmp_path / "count").exists() else []
    assert len(runs) == sum(1 for f in queued if not f.cancelled())


def test_task_exception_type_args_and_remote_traceback(make: Callable[..., Executor]) -> None:
    # CPython's test_traceback: the task's own exception; the worker's traceback as __cause__.
    future = make(1).submit(raise_runtime_error)
    with pytest.raises(RuntimeError) as info:
        future.result(timeout=T)
    exc = info.value
    assert type(exc) is RuntimeError
    assert exc.args == (123,)
    assert "raise RuntimeError(123)  # some comment" in str(exc.__cause__)
    assert "raise RuntimeError(123)  # some comment" in exc.__cause__.tb
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            raise exc
        except RuntimeError:
            sys.excepthook(*sys.exc_info())
    assert "raise RuntimeError(123)  # some comment" in stderr.getvalue()


def test_remote_traceback_class(make: Callable[..., Executor]) -> None:
    future = make(1).submit(raise_runtime_error)
    exc = future.exception(timeout=T)
    assert isinstance(exc, RuntimeError)
    assert isinstance(exc.__cause__, concurrent.futures.process._RemoteTraceback)


def test_result_raising_system_exit_while_pickled(make: Callable[..., Executor]) -> None:
    # CPython's ExecutorDeadlockTest "exit at task pickle": the caller gets the SystemExit.
    ex = make(1)
    with pytest.raises(SystemExit):
        ex.submit(return_exit_at_pickle).result(timeout=T)
    assert ex.submit(mul, 3, 4).result(timeout=T) == 12


@pytest.mark.parametrize("name", ["SystemExit", "KeyboardInterrupt"])
def test_task_raising_a_base_exception(make: Callable[..., Executor], name: str) -> None:
    ex = make(1)
    exc = ex.submit(raise_base, name).exception(timeout=T)
    assert type(exc).__name__ == name
    assert ex.submit(mul, 2, 3).result(timeout=T) == 6


def test_submit_consumes_retry(kind: str, make: Callable[..., Executor]) -> None:
    # DIFFERENCE (retry=): resilpool's own keyword; the stdlib passes it to the function.
    got = make(1).submit(capture, 1, retry=0).result(timeout=T)
    assert got == (((1,), {"retry": 0}) if kind == "stdlib" else ((1,), {}))


def test_lambda(kind: str, make: Callable[..., Executor]) -> None:
    # DIFFERENCE (lambdas, local functions): sent by value with cloudpickle (serializer="auto").
    future = make(1).submit(lambda x: x + 1, 1)
    if kind == "stdlib":
        assert isinstance(future.exception(timeout=T), (pickle.PicklingError, AttributeError))
    else:
        assert future.result(timeout=T) == 2


def test_unpicklable_argument_fails_the_future_not_submit(kind: str, make: Callable[..., Executor]) -> None:
    ex = make(1)
    future = ex.submit(take, workload.Unpicklable())  # submit itself does not raise
    exc = future.exception(timeout=T)
    if kind == "stdlib":
        assert type(exc) is TypeError
    else:
        # DIFFERENCE (pickling errors): a SerializationError (a PicklingError) naming the part.
        from resilpool import SerializationError

        assert isinstance(exc, SerializationError)
        assert isinstance(exc.__cause__, TypeError)
    assert "Unpicklable refuses to be pickled" in str(exc) + str(exc.__cause__)
    assert ex.submit(mul, 2, 3).result(timeout=T) == 6


def test_worker_death_fails_its_task_with_broken_process_pool(kind: str, make: Callable[..., Executor]) -> None:
    ex = make(1)
    with pytest.raises(cf.process.BrokenProcessPool):
        ex.submit(workload.exit_now, 3).result(timeout=T)
    if kind == "stdlib":
        with pytest.raises(cf.process.BrokenProcessPool):
            ex.submit(mul, 2, 3)
    else:
        # DIFFERENCE (a dead worker): resilpool replaces it and carries on.
        assert ex.submit(mul, 2, 3).result(timeout=T) == 6


# --- map -------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunksize", [1, 6])
def test_map_results_in_order(make: Callable[..., Executor], chunksize: int) -> None:
    ex = make(2)
    assert list(ex.map(pow, range(40), range(40), chunksize=chunksize)) == list(map(pow, range(40), range(40)))
    assert list(ex.map(mul, range(5), range(100), chunksize=chunksize)) == [i * i for i in range(5)]  # zip's length
    assert list(ex.map(mul)) == []


def test_map_chunksize_must_be_positive(make: Callable[..., Executor]) -> None:
    ex = make(1)
    with pytest.raises(ValueError, match="chunksize must be >= 1"):
        ex.map(mul, range(3), range(3), chunksize=0)


@pytest.mark.parametrize("chunksize", [1, 2])
def test_map_exception_at_its_index(make: Callable[..., Executor], chunksize: int) -> None:
    # CPython's test_map_exception.
    it = make(2).map(divmod, [1, 1, 1, 1], [2, 3, 0, 5], chunksize=chunksize)
    assert next(it) == (0, 1)
    assert next(it) == (0, 1)
    with pytest.raises(ZeroDivisionError):
        next(it)
    with pytest.raises(StopIteration):
        next(it)


def test_map_timeout(make: Callable[..., Executor], tmp_path: Path) -> None:
    # CPython's test_map_timeout, with a file gate instead of a 6 s sleep.
    present, gate = tmp_path / "present", tmp_path / "gate"
    present.touch()
    ex = make(2)
    assert list(ex.map(mul, range(4), range(4))) == [0, 1, 4, 9]  # workers started: the timeout is the map's only
    results = []
    with pytest.raises(cf.TimeoutError):
        for r in ex.map(workload.wait_for_file, [str(present), str(present), str(gate)], timeout=3):
            results.append(r)
    assert results == [str(present)] * 2
    assert cf.TimeoutError is TimeoutError
    gate.touch()


def test_map_reads_its_inputs_lazily() -> None:
    # DIFFERENCE (map inputs): the stdlib submits every item at once (an endless iterable
    # never returns); resilpool reads ahead a bounded window.
    with ResilientPool(2, "forkserver") as pool:
        assert list(itertools.islice(pool.map(mul, itertools.count(), itertools.count()), 5)) == [0, 1, 4, 9, 16]


@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_does_not_pin_yielded_results(make: Callable[..., Executor], chunksize: int) -> None:
    # CPython issue 14406 (test_free_reference): a yielded result is freed once the caller drops it.
    for obj in make(2).map(make_dummy, range(10), chunksize=chunksize):
        wr = weakref.ref(obj)
        del obj
        wait_until(lambda: (gc.collect(), wr() is None)[1], timeout=T, what="the yielded result to be freed")


@pytest.mark.parametrize("how", ["close", "del"])
def test_map_dropped_before_first_next_cancels_the_rest(kind: str, make: Callable[..., Executor], tmp_path: Path, how: str) -> None:
    # Issue 13 item 4. DIFFERENCE (map closed before its first next()): the stdlib's generator
    # has not entered its try block yet, so nothing is cancelled and every item runs.
    records, gate = tmp_path / "ran", tmp_path / "gate"
    records.mkdir()
    n = 50
    ex = make(2)
    it = ex.map(record_then_wait, itertools.repeat(str(records), n), range(1, n + 1), itertools.repeat(str(gate), n))
    if how == "close":
        it.close()
    else:
        del it
        gc.collect()
    gate.touch()
    ex.shutdown(wait=True)
    if kind == "stdlib":
        assert ran(records) == n
    else:
        assert ran(records) <= 2  # at most one handed to each worker before the close


def test_map_closed_after_first_next_cancels_the_rest(kind: str, make: Callable[..., Executor], tmp_path: Path) -> None:
    records, gate = tmp_path / "ran", tmp_path / "gate"
    records.mkdir()
    n = 50
    ex = make(2)
    it = ex.map(record_then_wait, itertools.repeat(str(records), n), range(n), itertools.repeat(str(gate), n))
    assert next(it) == 0
    it.close()
    gate.touch()
    ex.shutdown(wait=True)
    # Only what was handed over before the close ran: the stdlib's call queue holds
    # max_workers + 1 calls besides the running ones; resilpool hands one to each worker.
    assert ran(records) <= (1 + 2 + 3 if kind == "stdlib" else 1 + 2)


# --- shutdown and the context manager --------------------------------------------------------


def test_submit_and_map_after_shutdown(make: Callable[..., Executor]) -> None:
    ex = make(1)
    ex.shutdown()
    ex.shutdown()  # again: no error
    with pytest.raises(RuntimeError, match="^cannot schedule new futures after shutdown$"):
        ex.submit(pow, 2, 5)
    with pytest.raises(RuntimeError, match="^cannot schedule new futures after shutdown$"):
        ex.map(abs, [1])


def test_context_manager_shuts_down_and_waits(kind: str) -> None:
    with construct(kind, 2, mp_context=multiprocessing.get_context("forkserver")) as ex:
        futures = [ex.submit(mul, i, 2) for i in range(10)]
    assert all(f.done() for f in futures)
    assert [f.result(timeout=0) for f in futures] == [2 * i for i in range(10)]
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        ex.submit(mul, 1, 1)


def test_shutdown_without_wait_still_finishes_the_work(make: Callable[..., Executor], tmp_path: Path) -> None:
    started, release = tmp_path / "started", tmp_path / "release"
    ex = make(1)
    running = ex.submit(workload.touch_and_wait, str(started), str(release))
    queued = ex.submit(mul, 6, 7)
    wait_until(started.exists, timeout=T, what="first task started")
    ex.shutdown(wait=False)
    release.touch()
    assert running.result(timeout=T) > 0
    assert queued.result(timeout=T) == 42


def test_shutdown_cancel_futures(kind: str, make: Callable[..., Executor]) -> None:
    # CPython's test_cancel_futures, on a fresh pool: the calls already handed to workers
    # finish (at least one), the rest are cancelled.
    ex = make(2)
    futures = [ex.submit(time.sleep, 0.1) for _ in range(50)]
    ex.shutdown(cancel_futures=True)
    cancelled = [f for f in futures if f.cancelled()]
    others = [f for f in futures if not f.cancelled()]
    assert len(cancelled) > 20
    assert others
    for f in others:
        assert f.done()
        assert f.exception(timeout=0) is None


def test_dropped_executor(kind: str) -> None:
    # CPython's test_del_shutdown: work submitted before the last reference went still finishes.
    ex = construct(kind, 2, mp_context=multiprocessing.get_context("forkserver"))
    results = ex.map(abs, range(-5, 5))
    ref = weakref.ref(ex)
    del ex
    gc.collect()
    assert sorted(results) == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    if kind == "stdlib":
        wait_until(lambda: (gc.collect(), ref() is None)[1], timeout=T, what="the executor to be freed")
    else:
        # DIFFERENCE (a dropped pool): it runs until shutdown() or interpreter exit.
        pool = ref()
        assert pool is not None
        assert pool.submit(mul, 2, 2).result(timeout=T) == 4
        pool.shutdown(wait=True)


# --- reference lifetimes in the parent and in the worker -------------------------------------


def test_no_stale_reference_to_a_submitted_callable(make: Callable[..., Executor]) -> None:
    # CPython's test_no_stale_references (issue 16284): the future is dropped at once.
    ex = make(1)
    obj = Dummy()
    wr = weakref.ref(obj)
    ex.submit(obj.method)
    del obj
    wait_until(lambda: (gc.collect(), wr() is None)[1], timeout=T, what="the bound method's object to be freed")


def test_arguments_and_results_are_not_pinned_in_the_parent(make: Callable[..., Executor]) -> None:
    ex = make(1)
    arg = Dummy("arg")
    arg_ref = weakref.ref(arg)
    future = ex.submit(make_dummy, arg)
    result = future.result(timeout=T)
    assert result.value.value == "arg"
    result_ref = weakref.ref(result)
    del arg
    wait_until(lambda: (gc.collect(), arg_ref() is None)[1], timeout=T, what="the argument to be freed")
    del future, result
    wait_until(lambda: (gc.collect(), result_ref() is None)[1], timeout=T, what="the result to be freed")


def test_worker_frees_a_tasks_arguments_when_it_ends(make: Callable[..., Executor], tmp_path: Path) -> None:
    # The stdlib's worker deletes the call as soon as its result is sent; the worker is idle after.
    freed = tmp_path / "freed"
    ex = make(1)
    ex.submit(take, TouchWhenFreedElsewhere(str(freed))).result(timeout=T)
    wait_until(freed.exists, timeout=10, what="the worker to free the finished task's argument")


# --- futures interop --------------------------------------------------------------------------


def test_wait_and_as_completed(make: Callable[..., Executor], tmp_path: Path) -> None:
    ex = make(2)
    release = tmp_path / "release"
    slow = ex.submit(workload.wait_for_file, str(release))
    fast = ex.submit(mul, 2, 3)
    failing = ex.submit(divmod, 1, 0)
    done, not_done = cf.wait([slow, fast, failing], timeout=T, return_when=cf.FIRST_EXCEPTION)
    assert failing in done and slow in not_done
    assert isinstance(failing.exception(timeout=0), ZeroDivisionError)
    done, not_done = cf.wait([slow, fast], timeout=T, return_when=cf.FIRST_COMPLETED)
    assert done == {fast} and not_done == {slow}
    release.touch()
    done, not_done = cf.wait([slow, fast, failing], timeout=T, return_when=cf.ALL_COMPLETED)
    assert len(done) == 3 and not not_done
    futures = [ex.submit(mul, i, i) for i in range(8)]
    assert sorted(f.result(timeout=0) for f in cf.as_completed(futures, timeout=T)) == [i * i for i in range(8)]
    assert isinstance(fast, cf.Future)


def test_future_result_timeout_is_the_builtin_timeout_error(make: Callable[..., Executor], tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    future = make(1).submit(workload.wait_for_file, str(gate))
    with pytest.raises(TimeoutError):
        future.result(timeout=0.05)
    gate.touch()
    assert future.result(timeout=T) == str(gate)


# --- interpreter exit (subprocesses, every start method) -------------------------------------

_SUBMIT_AFTER_EXIT = """
import atexit

@atexit.register
def run_last():
    try:
        t.submit(id, None)
    except RuntimeError:
        print("runtime-error")
        raise

{imports}
from multiprocessing import get_context

if __name__ == "__main__":
    t = {executor}(2, mp_context=get_context("{method}"))
    t.submit(id, 42).result(timeout=30)
"""

_EXIT_WITHOUT_SHUTDOWN = """
{imports}
from multiprocessing import get_context
from test_compat import sleep_and_print

if __name__ == "__main__":
    t = {executor}(2, mp_context=get_context("{method}"))
    t.submit(sleep_and_print, 0.5, "apple")
"""


def sleep_and_print(t: float, msg: str) -> None:
    time.sleep(t)
    print(msg)
    sys.stdout.flush()


def _run(script: str, kind: str, method: str, tmp_path: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    if kind == "stdlib":
        fill = {"imports": "from concurrent.futures import ProcessPoolExecutor", "executor": "ProcessPoolExecutor"}
    else:
        fill = {"imports": "from resilpool import ResilientPool", "executor": "ResilientPool"}
    path = tmp_path / "main.py"
    path.write_text(textwrap.dedent(script.format(method=method, **fill)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)


@pytest.mark.parametrize("method", START_METHODS)
def test_submit_from_atexit_after_interpreter_shutdown(kind: str, method: str, tmp_path: Path) -> None:
    # CPython's test_submit_after_interpreter_shutdown: the hook was registered first, so it
    # runs last; the executor is already shut down by then.
    r = _run(_SUBMIT_AFTER_EXIT, kind, method, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "RuntimeError: cannot schedule new futures after" in r.stderr
    assert r.stdout.strip() == "runtime-error"
    if kind == "resilpool":
        # DIFFERENCE (submit at exit): the stdlib ends with "after shutdown" for an executor
        # that had started its manager thread, "after interpreter shutdown" otherwise.
        assert "RuntimeError: cannot schedule new futures after interpreter shutdown" in r.stderr


@pytest.mark.parametrize("method", START_METHODS)
def test_interpreter_exit_runs_submitted_work(kind: str, method: str, tmp_path: Path) -> None:
    # CPython's test_interpreter_shutdown: no shutdown() call; the work still runs, silently.
    r = _run(_EXIT_WITHOUT_SHUTDOWN, kind, method, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert r.stdout.strip() == "apple"


def _run_exit_hook_and_report(pool: ResilientPool, path: str) -> None:
    from resilpool import _pool

    _pool._python_exit()
    Path(path).write_text(str(pool._shutdown))


def test_exit_hook_in_a_forked_child_leaves_the_parents_pool_alone(tmp_path: Path) -> None:
    # The hook runs in every process that ends normally, a fork-started child (resilpool's own
    # workers under fork included) too: there it must not shut down the parent's pool, whose
    # threads are not in the child and whose locks may have been held at the fork.
    pool = ResilientPool(1, "forkserver")
    try:
        report = tmp_path / "report"
        child = multiprocessing.get_context("fork").Process(target=_run_exit_hook_and_report, args=(pool, str(report)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork of a multi-threaded process
            child.start()
        child.join(T)
        assert child.exitcode == 0
        assert report.read_text() == "False"
        assert pool.submit(mul, 2, 5).result(timeout=T) == 10
    finally:
        pool.shutdown(wait=True)

