"""Calls that must type-check (mypy --strict), exactly as with ProcessPoolExecutor: never executed.

tests/typing/test_typing_api.py runs mypy on this file and on bad.py.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Iterator
from concurrent.futures import Future
from typing import assert_type

from resilpool import ResilientPool, RetryPolicy


def square(x: int) -> int:
    return x * x


def greet(name: str, *, punctuation: str = "!") -> str:
    return name + punctuation


def check(pool: ResilientPool, stdlib: cf.ProcessPoolExecutor) -> None:
    assert_type(pool.submit(square, 3), Future[int])
    assert_type(pool.submit(greet, "ada", punctuation="?"), Future[str])
    assert_type(pool.submit(square, 3, retry=2), Future[int])  # resilpool's keyword
    assert_type(pool.submit(square, 3, retry=RetryPolicy()), Future[int])
    assert_type(pool.options(retry=2, task_timeout=5).submit(square, 3), Future[int])
    assert_type(pool.map(square, range(3)), Iterator[int])
    assert_type(pool.map(pow, range(3), range(3), timeout=1.0, chunksize=2), Iterator[int])
    assert_type(pool.map(square, range(3), retry=1), Iterator[int])
    assert_type(pool.options(retry=1).map(square, range(3)), Iterator[int])
    pool.shutdown(wait=False, cancel_futures=True)

    # Code written for the stdlib type-checks the same with either executor.
    executors: list[cf.Executor] = [pool, stdlib]
    for ex in executors:
        assert_type(ex.submit(square, 3), Future[int])
    with ResilientPool(2, "spawn", max_tasks_per_child=10) as p:
        assert_type(p, ResilientPool)
