"""The fault matrix: raise, exit and crash while pickling or unpickling calls and results.

Each case fails only its own future, with an error that names the part, and the
pool goes on.
"""

from __future__ import annotations

import os
import pickle
from concurrent.futures.process import _RemoteTraceback

import boundary
import pytest
import workload
from conftest import RESULT_TIMEOUT, wait_until

from resilpool import ResilpoolError, SerializationError, WorkerCrashedError
from resilpool._core.protocol import ErrorPayload, error_payload, rebuild_error

T = RESULT_TIMEOUT


@pytest.fixture
def pool(make_pool):
    return make_pool(2)


def _still_usable(pool) -> None:
    assert pool.submit(workload.inc, 41).result(timeout=T) == 42


def test_argument_raises_while_pickled_in_parent(pool) -> None:
    fut = pool.submit(workload.identity, workload.Unpicklable())
    with pytest.raises(SerializationError, match="argument 0"):
        fut.result(timeout=T)
    _still_usable(pool)


def test_argument_raises_while_unpickled_in_worker(pool) -> None:
    fut = pool.submit(workload.identity, workload.FailsToUnpickle())
    with pytest.raises(SerializationError, match="could not be unpickled in the worker.*cannot rebuild") as info:
        fut.result(timeout=T)
    assert isinstance(info.value, pickle.PicklingError)
    _still_usable(pool)


def test_argument_exits_while_unpickled_in_worker(pool) -> None:
    # The worker acknowledged the task before unpickling it: it started, so its death costs it.
    fut = pool.submit(workload.identity, workload.ExitsOnUnpickle())
    with pytest.raises(WorkerCrashedError, match="exited with code 9"):
        fut.result(timeout=T)
    _still_usable(pool)


def test_result_raises_while_pickled_in_worker(pool) -> None:
    with pytest.raises(SerializationError, match="result.*could not be pickled"):
        pool.submit(workload.return_lock).result(timeout=T)
    _still_usable(pool)


def test_result_exits_while_pickled_in_worker(pool) -> None:
    with pytest.raises(WorkerCrashedError, match="exited with code 8"):
        pool.submit(workload.make_exits_on_pickle).result(timeout=T)
    _still_usable(pool)


def test_result_raises_while_unpickled_in_parent(pool) -> None:
    with pytest.raises(SerializationError, match="could not be unpickled in the parent") as info:
        pool.submit(workload.make_fails_to_unpickle).result(timeout=T)
    assert info.value.part == "result"
    _still_usable(pool)


def test_unpicklable_exception_keeps_its_type(pool) -> None:
    with pytest.raises(workload.UnpicklableError, match="with a lock inside") as info:
        pool.submit(workload.raise_unpicklable_error).result(timeout=T)
    assert "raise_unpicklable_error" in str(info.value.__cause__)  # the remote traceback survives
    assert any("could not be pickled in the worker" in n for n in info.value.__notes__)
    _still_usable(pool)


def test_exception_needing_two_init_args_keeps_its_type(pool) -> None:
    # It pickles, and fails only when unpickled: the worker checks the round trip.
    with pytest.raises(boundary.TwoArgsError, match="code 7: needs two") as info:
        pool.submit(boundary.raise_two_args_error).result(timeout=T)
    assert isinstance(info.value.__cause__, _RemoteTraceback)
    assert "raise_two_args_error" in info.value.__cause__.tb
    _still_usable(pool)


def test_exception_too_deep_to_pickle_keeps_its_type(pool) -> None:
    with pytest.raises(boundary.DeepError, match="too deep to pickle") as info:
        pool.submit(boundary.raise_deep_error).result(timeout=T)
    assert any("RecursionError" in n for n in info.value.__notes__)
    _still_usable(pool)


def test_recursion_error_with_a_deep_traceback_arrives_as_itself(pool) -> None:
    with pytest.raises(RecursionError) as info:
        pool.submit(boundary.recurse).result(timeout=T)
    assert "in recurse" in str(info.value.__cause__)
    _still_usable(pool)


def test_exception_failing_to_unpickle_in_the_parent_keeps_its_type(pool) -> None:
    with pytest.raises(boundary.FailsInParentError, match="raised for parent") as info:
        pool.submit(boundary.raise_fails_in_parent, os.getpid()).result(timeout=T)
    assert any("could not be unpickled in the parent" in n for n in info.value.__notes__)
    _still_usable(pool)


def test_exception_of_a_type_the_parent_cannot_import(pool) -> None:
    with pytest.raises(ResilpoolError, match="no_such_module_anywhere.Phantom: from nowhere") as info:
        pool.submit(boundary.raise_not_importable).result(timeout=T)
    assert "raise_not_importable" in str(info.value.__cause__)
    _still_usable(pool)


@pytest.mark.parametrize(
    ("make", "expected"),
    [(boundary.result_raising_keyboard_interrupt, KeyboardInterrupt), (boundary.result_raising_system_exit, SystemExit)],
    ids=["KeyboardInterrupt", "SystemExit"],
)
def test_result_raising_a_base_exception_while_pickled_is_contained(pool, make, expected) -> None:
    """As with the stdlib (``_sendback_result``): the caller gets the pickling exception itself."""
    pid = pool.submit(os.getpid).result(timeout=T)
    fut = pool.submit(make, retry=0)
    err = fut.exception(timeout=T)
    assert type(err) is expected
    assert "__reduce__" in str(err.__cause__)
    assert pool.submit(os.getpid).result(timeout=T) in {pid} | {w.pid for w in pool.workers()}
    assert pool.stats().workers_started == 2  # no worker died for it
    _still_usable(pool)


def test_remote_traceback_is_the_stdlib_class(pool) -> None:
    with pytest.raises(ValueError) as info:
        pool.submit(workload.raise_value_error).result(timeout=T)
    assert isinstance(info.value.__cause__, _RemoteTraceback)
    assert "raise_value_error" in info.value.__cause__.tb
    cause = pickle.loads(pickle.dumps(info.value.__cause__))
    assert type(cause) is type(info.value.__cause__) and cause.tb == info.value.__cause__.tb


def test_error_payload_round_trips_and_a_corrupt_one_is_reported() -> None:
    err = rebuild_error(error_payload(boundary.TwoArgsError(1, "x"), "initializer failed:"))
    assert type(err) is boundary.TwoArgsError and str(err) == "code 1: x"
    assert str(err.__cause__).lstrip().startswith('"""\ninitializer failed:')
    assert isinstance(pickle.loads(error_payload(ValueError("v"))), ErrorPayload)
    corrupt = rebuild_error(b"not a pickle")
    assert type(corrupt) is ResilpoolError and "could not be unpickled in the parent" in str(corrupt)


def test_worker_drops_a_finished_tasks_arguments_and_result(make_pool, tmp_path) -> None:
    """Like the stdlib's worker: nothing of a finished task stays alive in the idle worker."""
    pool = make_pool(1)
    arg, result = tmp_path / "argument-freed", tmp_path / "result-freed"
    assert pool.submit(boundary.take, boundary.Tracked(str(arg))).result(timeout=T) is None
    wait_until(arg.exists, T, "the worker to free the argument of its finished task")
    assert isinstance(pool.submit(boundary.give_tracked, str(result)).result(timeout=T), boundary.Tracked)
    wait_until(result.exists, T, "the worker to free the result of its finished task")
