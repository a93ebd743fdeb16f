"""The fault matrix: raise, exit and crash while pickling or unpickling calls and results.

Each case fails only its own future, with an error that names the part, and the
pool goes on.
"""

from __future__ import annotations

import pickle

import pytest
import workload
from conftest import RESULT_TIMEOUT

from resilpool import ResilpoolError, SerializationError, WorkerCrashedError

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


def test_unpicklable_exception_still_reported(pool) -> None:
    with pytest.raises(ResilpoolError, match="UnpicklableError: with a lock inside") as info:
        pool.submit(workload.raise_unpicklable_error).result(timeout=T)
    assert "raise_unpicklable_error" in str(info.value.__cause__)  # the remote traceback survives
    _still_usable(pool)


def test_unpicklable_chunk_item_fails_only_its_chunk(pool) -> None:
    it = pool.map(workload.identity, [1, 2, workload.Unpicklable(), 4], chunksize=2)
    assert [next(it), next(it)] == [1, 2]
    with pytest.raises(SerializationError):
        next(it)
    _still_usable(pool)
