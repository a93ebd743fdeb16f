"""The joblib backend "resilpool": joblib's own contract, and what the pool adds to it.

joblib's contract: results in input order, a task's exception raised by the
call, generators (ordered and unordered), ``n_jobs=1`` sequential in-process,
``n_jobs=-1`` every CPU, an error aborts the rest.  resilpool's additions: a
crashed batch is retried (``retry=``) or fails with ``WorkerCrashedError``;
leaky workers are recycled with results intact; lambdas and functions of an
interactive ``__main__`` run on every start method; nested loops get joblib's
threading backend, as under loky; one reusable pool serves every call of one
configuration and keeps its workers; large arrays are memory-mapped, and the
folder goes with the call.

Ordering comes from files the tasks write and from the pool's events, never
from sleeps; every wait has a timeout; nothing asserts how fast anything ran.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import warnings
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import joblib
import psutil
import pytest
import workload
from conftest import RESULT_TIMEOUT, wait_for_line
from joblib import Parallel, delayed, parallel_config

import resilpool.joblib
from resilpool import CrashLoopError, Limits, ResilientPool, SerializationError, WorkerCrashedError
from resilpool.events import Event, ExitReason, WorkerExited
from resilpool.joblib import ResilpoolBackend

JOBLIB_VERSION = tuple(int(p) for p in joblib.__version__.split(".")[:2])


def test_importing_the_module_registers_the_backend() -> None:
    from joblib.parallel import BACKENDS

    assert BACKENDS["resilpool"] is ResilpoolBackend
    assert resilpool.joblib.__all__ == ["ResilpoolBackend", "get_reusable_pool", "register", "shutdown_reusable_pool"]


@pytest.fixture(autouse=True)
def no_reusable_pool_left(no_leaks: None) -> Iterator[None]:
    """Each test starts without the backend's reusable pool, and shuts the one it made down.

    Runs inside ``no_leaks`` (it depends on it), so the leak check sees the pool gone.
    """
    resilpool.joblib.shutdown_reusable_pool()
    yield
    resilpool.joblib.shutdown_reusable_pool()


# --- joblib's contract ----------------------------------------------------------


@pytest.mark.parametrize("batch_size", ["auto", 1, 7])
def test_results_come_back_in_input_order(batch_size: Any) -> None:
    out = Parallel(n_jobs=2, backend="resilpool", batch_size=batch_size)(delayed(workload.add)(i, y=1) for i in range(300))
    assert out == [i + 1 for i in range(300)]


def test_parallel_config_options_reach_the_pool_and_the_call_gives_it_back() -> None:
    events: list[Event] = []
    with parallel_config(backend="resilpool", n_jobs=2, limits=Limits(max_tasks=3), retry=2, listeners=[events.append]) as cfg:
        backend = cfg["backend"]
        out = Parallel(batch_size=1)(delayed(workload.pid_of)() for _ in range(12))
    assert len(set(out)) >= 4  # max_tasks=3 batches per worker: 12 batches need 4 workers or more
    assert backend.pool is None  # given back when the call ended
    pool = resilpool.joblib.get_reusable_pool()
    assert pool is not None
    resilpool.joblib.shutdown_reusable_pool()  # joins its workers and event thread: every event is in
    stats = pool.stats()
    assert stats.max_workers == 2 and stats.completed == 12
    # Four workers retire after 3 batches each; the last ones may still be leaving at shutdown.
    assert stats.recycled.get("max_tasks", 0) >= 4 - 2
    assert any(isinstance(e, WorkerExited) and e.reason is ExitReason.MAX_TASKS for e in events)


def test_a_task_exception_propagates_with_the_worker_traceback() -> None:
    with pytest.raises(ValueError, match="bad input") as info:
        Parallel(n_jobs=2, backend="resilpool")(
            delayed(workload.raise_value_error)("bad input") if i == 5 else delayed(workload.inc)(i) for i in range(10)
        )
    assert "raise_value_error" in str(info.value.__cause__)


@pytest.mark.parametrize("return_as", ["generator", "generator_unordered"])
def test_generator_output(return_as: str) -> None:
    if return_as == "generator_unordered" and JOBLIB_VERSION < (1, 4):
        pytest.skip("generator_unordered needs joblib >= 1.4")
    gen = Parallel(n_jobs=2, backend="resilpool", return_as=return_as)(delayed(workload.inc)(i) for i in range(50))
    assert not isinstance(gen, list)
    out = list(gen)
    expected = [i + 1 for i in range(50)]
    assert (out if return_as == "generator" else sorted(out)) == expected


def test_closing_a_generator_early_kills_the_batches_still_running(tmp_path: Path) -> None:
    runs, release = tmp_path / "runs", tmp_path / "release"  # release is never created
    with parallel_config(backend="resilpool", n_jobs=2) as cfg:
        gen = Parallel(return_as="generator", batch_size=1)(
            [delayed(workload.identity)(0), delayed(workload.count_and_wait)(str(runs), str(release))]
        )
        assert next(gen) == 0
        wait_for_line(runs, what="the blocking batch to start")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # joblib warns that work was cancelled
            gen.close()
    assert cfg["backend"].pool is None
    assert len(runs.read_text().splitlines()) == 1


def test_n_jobs_1_runs_sequentially_in_the_calling_process() -> None:
    out = Parallel(n_jobs=1, backend="resilpool")(delayed(workload.pid_of)() for _ in range(5))
    assert out == [os.getpid()] * 5


def test_n_jobs_minus_1_uses_every_cpu() -> None:
    with parallel_config(backend="resilpool", n_jobs=-1) as cfg:
        assert joblib.effective_n_jobs() == joblib.cpu_count()
        out = Parallel()(delayed(workload.inc)(i) for i in range(40))
    assert out == [i + 1 for i in range(40)]
    if joblib.cpu_count() > 1:
        assert cfg["backend"].stats().max_workers == joblib.cpu_count()


def test_parallel_timeout_raises_and_kills_the_batch(tmp_path: Path) -> None:
    runs, release = tmp_path / "runs", tmp_path / "release"
    with pytest.raises(multiprocessing.TimeoutError):
        Parallel(n_jobs=2, backend="resilpool", timeout=0.5)(
            delayed(workload.count_and_wait)(str(runs), str(release)) for _ in range(2)
        )


# --- errors, retries and aborts ----------------------------------------------------


def _crash_one(marker: Path, n: int = 8) -> list[Any]:
    return [delayed(workload.crash_first_time)(str(marker), i) if i == 3 else delayed(workload.identity)(i) for i in range(n)]


def test_a_crashed_batch_is_retried_and_succeeds_on_its_second_attempt(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    with parallel_config(backend="resilpool", n_jobs=2, retry=1) as cfg:
        out = Parallel()(_crash_one(marker))
    assert out == list(range(8))
    assert (tmp_path / "marker.runs").read_text() == "xx"  # killed once, then ran to the end
    stats = cfg["backend"].stats()
    assert stats.worker_crashes == 1 and stats.retried == 1 and stats.failed == 0


def test_a_crashed_batch_without_retry_raises_worker_crashed_error(tmp_path: Path) -> None:
    with pytest.raises(WorkerCrashedError) as info:
        Parallel(n_jobs=2, backend="resilpool")(_crash_one(tmp_path / "marker"))
    err = info.value
    assert isinstance(err, BrokenProcessPool)
    assert err.exitcode == -9 and "crash_first_time" in str(err.fn_name)
    assert "joblib batch of" in str(err)


def test_an_error_aborts_the_call_and_kills_the_running_batch_without_retrying_it(tmp_path: Path) -> None:
    runs, release = tmp_path / "runs", tmp_path / "release"  # release is never created
    events: list[Event] = []
    with parallel_config(backend="resilpool", n_jobs=2, retry=1, listeners=[events.append]) as cfg:
        with pytest.raises(ValueError, match="boom"):
            Parallel(batch_size=1)(
                [delayed(workload.count_and_wait)(str(runs), str(release)), delayed(workload.raise_when_file)(str(runs), "boom")]
            )
    (pid,) = map(int, runs.read_text().split())  # ran once: killed, not retried
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    resilpool.joblib.shutdown_reusable_pool()  # joins its event thread: every event is delivered
    killed = [e for e in events if isinstance(e, WorkerExited) and e.pid == pid]
    assert killed and killed[0].task_id is not None  # killed while running its batch
    assert cfg["backend"].pool is None


def test_a_retry_never_queues_behind_a_running_batch_while_a_worker_is_idle(tmp_path: Path, make_pool: Any) -> None:
    # The cause of the aborted batch's second run (issue 13): the failed batch's retry was sent
    # behind the blocking batch (short tasks are pipelined), so joblib saw no error until that
    # batch timed out, and its own retry then ran it a second time.
    runs, release = tmp_path / "runs", tmp_path / "release"
    pool: ResilientPool = make_pool(2, retry=1)
    # Tiny tasks first: the pool learns that tasks are short and starts to pipeline them.
    assert list(pool.map(workload.inc, range(200), timeout=RESULT_TIMEOUT)) == list(range(1, 201))
    blocking = pool.submit(workload.count_and_wait, str(runs), str(release), 120.0)
    wait_for_line(runs, what="the blocking task to start")
    failing = pool.submit(workload.raise_when_file, str(runs), "boom")  # fails at once, twice
    with pytest.raises(ValueError, match="boom"):
        failing.result(timeout=RESULT_TIMEOUT)  # behind the blocking task, it would wait 120 s
    assert not blocking.done()
    release.touch()
    assert blocking.result(timeout=RESULT_TIMEOUT) == int(runs.read_text())  # one run


def test_an_unpicklable_argument_names_the_call_and_the_argument() -> None:
    with pytest.raises(SerializationError, match="argument 0 of the joblib call identity") as info:
        Parallel(n_jobs=2, backend="resilpool")(delayed(workload.identity)(threading.Lock()) for _ in range(2))
    assert info.value.part == "argument 0"


def test_bad_options_are_refused_when_the_backend_is_configured(make_pool: Any) -> None:
    with pytest.raises(TypeError, match="unknown option"):
        parallel_config(backend="resilpool", max_rss="1GiB")
    with pytest.raises(ValueError, match="retry must be >= 0"):
        ResilpoolBackend(retry=-1)
    with pytest.raises(ValueError, match="serializer"):
        ResilpoolBackend(serializer="json")
    with pytest.raises(ValueError, match="pool="):
        ResilpoolBackend(pool=make_pool(1), limits=Limits(max_tasks=2))
    with pytest.raises(ValueError, match="contradicts"):
        ResilpoolBackend(limits=Limits(max_tasks=2), max_tasks=3)


# --- supervision --------------------------------------------------------------


def test_leaky_batches_get_their_workers_recycled_with_results_intact(tmp_path: Path) -> None:
    # Each batch leaks 120 MiB, over soft_max_rss, then waits until the test has seen its
    # worker marked retiring: every batch runs to the end, and every one in a fresh worker.
    stop = threading.Event()
    holder: dict[str, ResilpoolBackend] = {}

    def flag_retiring_workers() -> None:
        while not stop.wait(0.01):
            backend = holder.get("backend")
            pool = backend.pool if backend is not None else None
            for w in pool.workers() if pool is not None else ():
                if w.retiring:
                    (tmp_path / str(w.pid)).touch()

    watcher = threading.Thread(target=flag_retiring_workers, name="test-watcher")
    watcher.start()
    try:
        with parallel_config(backend="resilpool", n_jobs=2, limits=Limits(soft_max_rss="100MiB"), monitor_interval=0.05) as cfg:
            holder["backend"] = cfg["backend"]
            out = Parallel(batch_size=1)(delayed(workload.leak_until_flagged)(120, i, str(tmp_path)) for i in range(6))
    finally:
        stop.set()
        watcher.join(RESULT_TIMEOUT)
    assert [tag for tag, _ in out] == list(range(6))  # every result, in order
    assert len({pid for _, pid in out}) == 6  # each batch's worker was retired after it
    pool = resilpool.joblib.get_reusable_pool()
    assert pool is not None
    resilpool.joblib.shutdown_reusable_pool()  # the retiring workers have left: every exit is counted
    stats = pool.stats()
    # The last ones may still be leaving when the call ends: the pool counts those as shutdown.
    assert stats.recycled.get("soft_memory", 0) >= 6 - 2
    assert stats.completed == 6 and stats.failed == 0 and stats.worker_crashes == 0


def test_initializer_and_inner_thread_limits_reach_the_workers() -> None:
    with parallel_config(
        backend="resilpool", n_jobs=2, initializer=workload.set_global, initargs=(42,), inner_max_num_threads=1
    ):
        assert Parallel()(delayed(workload.get_global)() for _ in range(4)) == [42] * 4
        assert Parallel()(delayed(workload.env_of)("OMP_NUM_THREADS") for _ in range(2)) == ["1"] * 2


# --- pools: reuse and ownership ------------------------------------------------------


def test_a_managed_parallel_reuses_one_pool_across_calls() -> None:
    backend = ResilpoolBackend()
    with Parallel(n_jobs=2, backend=backend) as parallel:
        a = parallel(delayed(workload.inc)(i) for i in range(20))
        pool = backend.pool
        b = parallel(delayed(workload.inc)(i) for i in range(20, 40))
        assert backend.pool is pool is not None
    assert a + b == [i + 1 for i in range(40)]
    assert backend.pool is None
    assert backend.stats().workers_started == 2  # type: ignore[union-attr]


def test_a_managed_parallel_still_works_after_an_error() -> None:
    backend = ResilpoolBackend()
    with Parallel(n_jobs=2, backend=backend) as parallel:
        with pytest.raises(ValueError, match="first"):
            parallel(delayed(workload.raise_value_error)("first") for _ in range(3))
        assert parallel(delayed(workload.inc)(i) for i in range(10)) == [i + 1 for i in range(10)]
    assert backend.pool is None


@pytest.mark.resilpool_core_errors
def test_a_failing_initializer_raises_crash_loop_error() -> None:
    with pytest.raises(CrashLoopError) as info:
        with parallel_config(backend="resilpool", n_jobs=2, initializer=workload.fail_init, initargs=("no config",)):
            Parallel()(delayed(workload.inc)(i) for i in range(4))
    assert "no config" in str(info.value.__cause__)


def test_a_pool_you_pass_is_used_and_left_open(make_pool: Any) -> None:
    pool: ResilientPool = make_pool(2)
    with parallel_config(backend="resilpool", pool=pool):
        assert joblib.effective_n_jobs() == 2
        a = Parallel()(delayed(workload.inc)(i) for i in range(20))
        b = Parallel()(delayed(workload.inc)(i) for i in range(20))
    assert a == b == [i + 1 for i in range(20)]
    assert pool.submit(workload.inc, 1).result(timeout=RESULT_TIMEOUT) == 2
    assert pool.stats().workers_started == 2


def test_separate_parallel_calls_reuse_one_pool_and_its_workers() -> None:
    first = Parallel(n_jobs=2, backend="resilpool")(delayed(workload.pid_of)() for _ in range(20))
    pool = resilpool.joblib.get_reusable_pool()
    assert pool is not None
    second = Parallel(n_jobs=2, backend="resilpool")(delayed(workload.pid_of)() for _ in range(20))
    assert resilpool.joblib.get_reusable_pool() is pool
    # Reused: both calls ran on this pool's two workers, and no other worker ever started
    # (which worker took which tiny batch is the scheduler's business, not this test's).
    assert set(first) | set(second) <= {w.pid for w in pool.workers()}
    assert pool.stats().workers_started == 2


def test_another_configuration_replaces_the_reusable_pool_and_shuts_the_old_one_down() -> None:
    assert Parallel(n_jobs=2, backend="resilpool")(delayed(workload.inc)(i) for i in range(4)) == [1, 2, 3, 4]
    old = resilpool.joblib.get_reusable_pool()
    assert old is not None
    with parallel_config(backend="resilpool", n_jobs=2, limits=Limits(max_tasks=50)):
        assert Parallel()(delayed(workload.inc)(i) for i in range(4)) == [1, 2, 3, 4]
    new = resilpool.joblib.get_reusable_pool()
    assert new is not None and new is not old
    assert old.workers() == []
    with pytest.raises(RuntimeError, match="after shutdown"):
        old.submit(workload.inc, 1)


def test_an_abort_keeps_the_reusable_pool_for_the_next_call() -> None:
    with pytest.raises(ValueError, match="first"):
        Parallel(n_jobs=2, backend="resilpool")(delayed(workload.raise_value_error)("first") for _ in range(3))
    pool = resilpool.joblib.get_reusable_pool()
    assert pool is not None and not pool.stats().broken
    assert Parallel(n_jobs=2, backend="resilpool")(delayed(workload.inc)(i) for i in range(10)) == [i + 1 for i in range(10)]
    assert resilpool.joblib.get_reusable_pool() is pool


def _nested_backend_name() -> tuple[str, int]:
    backend, n_jobs = joblib.parallel.get_active_backend()
    return type(backend).__name__, backend.nesting_level


def test_nested_calls_get_the_threading_backend_then_sequential_as_under_loky() -> None:
    out = Parallel(n_jobs=2, backend="resilpool")(delayed(_nested_backend_name)() for _ in range(2))
    assert out == [("ThreadingBackend", 1)] * 2


def _in_a_daemonic_process(conn: Any) -> None:
    import warnings as w

    with w.catch_warnings(record=True) as caught:
        w.simplefilter("always")
        out = Parallel(n_jobs=2, backend="resilpool")(delayed(workload.pid_of)() for _ in range(3))
    try:
        ResilientPool(1)
        refused = ""
    except RuntimeError as exc:
        refused = str(exc)
    conn.send((out, [str(m.message) for m in caught], refused))


def test_inside_a_daemonic_process_the_backend_warns_and_runs_in_process_and_the_pool_refuses() -> None:
    ctx = multiprocessing.get_context("forkserver")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_in_a_daemonic_process, args=(send,), daemon=True)
    proc.start()
    send.close()
    try:
        assert recv.poll(RESULT_TIMEOUT), "the daemonic process did not answer"
        out, caught, refused = recv.recv()
    finally:
        proc.join(RESULT_TIMEOUT)
    assert out == [proc.pid] * 3
    assert any("Resilpool-backed parallel loops cannot be called in a daemonic process" in m for m in caught)
    assert "daemonic process" in refused


def test_nested_loops_run_sequentially_inside_the_worker() -> None:
    out = Parallel(n_jobs=2, backend="resilpool")(delayed(workload.nested_pids)(3) for _ in range(2))
    for outer, inner in out:
        assert inner == [outer] * 3
    out2 = Parallel(n_jobs=2, backend="resilpool")(delayed(workload.nested_resilpool)(3) for _ in range(2))
    for outer, inner, caught in out2:
        assert inner == [outer] * 3
        assert any("cannot be nested inside a resilpool worker" in m for m in caught)


# --- automatic memory-mapping of large arrays ------------------------------------------


def _array_info(a: Any, crash_marker: str | None = None) -> tuple[str, str | None, float]:
    if crash_marker is not None:
        workload.crash_first_time(crash_marker)
    return type(a).__name__, getattr(a, "filename", None), float(a.sum())


def test_large_arrays_reach_the_workers_memory_mapped_and_the_folder_goes_with_the_call(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    big, small = np.arange(300_000, dtype=np.float64), np.arange(10, dtype=np.float64)
    out = Parallel(n_jobs=2, backend="resilpool", max_nbytes="1M", temp_folder=str(tmp_path))(
        delayed(_array_info)(a) for a in [big, small, big]
    )
    (kind_big, file_big, sum_big), (kind_small, file_small, sum_small), (_, file_big2, _) = out
    assert kind_big == "memmap" and file_big is not None and file_big.startswith(str(tmp_path))
    assert file_big2 == file_big  # the same array is dumped once
    assert kind_small == "ndarray" and file_small is None
    assert (sum_big, sum_small) == (float(big.sum()), float(small.sum()))
    assert os.listdir(tmp_path) == []  # removed when the call ended


def test_max_nbytes_none_turns_memory_mapping_off(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    out = Parallel(n_jobs=2, backend="resilpool", max_nbytes=None, temp_folder=str(tmp_path))(
        delayed(_array_info)(np.ones(300_000)) for _ in range(2)
    )
    assert [kind for kind, _, _ in out] == ["ndarray", "ndarray"]
    assert os.listdir(tmp_path) == []


def test_the_memmapping_folder_is_removed_after_a_worker_crash(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    folder, marker = tmp_path / "mm", tmp_path / "marker"
    folder.mkdir()
    with pytest.raises(WorkerCrashedError):
        Parallel(n_jobs=2, backend="resilpool", max_nbytes=1, temp_folder=str(folder), batch_size=1)(
            delayed(_array_info)(np.ones(1000) * i, str(marker) if i == 2 else None) for i in range(4)
        )
    assert (tmp_path / "marker.runs").read_text() == "x"
    assert os.listdir(folder) == []


def test_a_managed_parallel_keeps_its_memmaps_until_the_block_ends(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    with Parallel(n_jobs=2, backend="resilpool", max_nbytes=1, temp_folder=str(tmp_path)) as parallel:
        out = parallel(delayed(_array_info)(a) for a in [np.ones(100)] * 2)
        assert [kind for kind, _, _ in out] == ["memmap", "memmap"]
        assert os.listdir(tmp_path) != []
    assert os.listdir(tmp_path) == []


# --- functions a worker cannot import ------------------------------------------------

_MAIN_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from joblib import Parallel, delayed, parallel_config
    import resilpool.joblib
    from resilpool import SerializationError

    def square(x):
        return x * x

    class Box:
        def __init__(self, v):
            self.v = v

    def unbox(box):
        return box.v + 1

    method = sys.argv[1]
    with Parallel(n_jobs=2, backend=resilpool.joblib.ResilpoolBackend(mp_context=method)) as parallel:
        squares = parallel(delayed(square)(i) for i in range(30))
        plus = parallel(delayed(lambda x: x + 1)(i) for i in range(30))
        boxes = parallel(delayed(unbox)(Box(i)) for i in range(5))
    with parallel_config(backend="resilpool", n_jobs=2, mp_context=method, serializer="pickle"):
        try:
            Parallel()(delayed(square)(i) for i in range(3))
            stdlib = "ok"
        except SerializationError as exc:
            stdlib = type(exc).__name__
    print(json.dumps({"squares": squares, "plus": plus, "boxes": boxes, "stdlib": stdlib}))
    """
)


def test_a_lambda_and_a_function_of_an_interactive_main_run(start_method: str) -> None:
    # python -c: __main__ has no file, as in a notebook; workers not forked cannot import it.
    proc = subprocess.run(
        [sys.executable, "-c", _MAIN_SCRIPT, start_method],
        capture_output=True,
        text=True,
        timeout=RESULT_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["squares"] == [i * i for i in range(30)]
    assert out["plus"] == [i + 1 for i in range(30)]
    assert out["boxes"] == [i + 1 for i in range(5)]
    # serializer="pickle" keeps the stdlib pickler: only a forked worker finds __main__.square.
    assert out["stdlib"] == ("ok" if start_method == "fork" else "SerializationError")


def _doc_block(text: str, marker: str) -> str:
    start = text.index(marker)
    body = text[text.index("```", start) :]
    body = body[body.index("\n") + 1 :]
    return body[: body.index("```")]


def test_the_notebook_example_runs_as_documented() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "notebooks.md").read_text()
    code, expected = _doc_block(doc, "<!-- example: notebook -->"), _doc_block(doc, "<!-- output: notebook -->")
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=RESULT_TIMEOUT, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == expected.splitlines()


# --- scikit-learn -------------------------------------------------------------------


def test_cross_val_score_runs_under_the_backend() -> None:
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    X, y = load_iris(return_X_y=True)
    with parallel_config(backend="resilpool", limits=Limits(soft_max_rss="1GiB"), retry=1) as cfg:
        scores = cross_val_score(LogisticRegression(max_iter=1000), X, y, cv=3, n_jobs=2)
    assert len(scores) == 3 and all(0.8 < s <= 1.0 for s in scores)
    stats = cfg["backend"].stats()
    assert stats.max_workers == 2 and stats.completed >= 1 and stats.failed == 0
