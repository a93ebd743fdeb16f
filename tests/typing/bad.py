"""Calls that must fail to type-check, each on the line marked ``# E``: never executed.

As with typeshed's ProcessPoolExecutor.submit, a call is checked against the function's
own signature. tests/typing/test_typing_api.py runs mypy on this file.
"""

from __future__ import annotations

from concurrent.futures import Future

from resilpool import ResilientPool


def square(x: int) -> int:
    return x * x


def check(pool: ResilientPool) -> None:
    pool.submit(square, "x")  # E: wrong argument type
    pool.submit(square)  # E: missing argument
    pool.submit(square, 1, 2)  # E: too many arguments
    pool.submit(square, x=1, y=2)  # E: unexpected keyword
    wrong: Future[str] = pool.submit(square, 1)  # E: wrong result type
    pool.options(retry=1).submit(square, "x")  # E: checked with options() too
    pool.map(square, range(3), chunksize="2")  # E: chunksize is an int
