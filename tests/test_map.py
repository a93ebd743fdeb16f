"""map at large chunks (issue 16.2): order, failures and retries land at the right item.

No timing is asserted here: bench/ measures speed. These tests pin what a faster chunk
path must keep: results in input order, a chunk retried as a whole after its worker is
killed, and an exception raised at its own item with every earlier result yielded.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import workload
from conftest import RESULT_TIMEOUT

from resilpool import ResilientPool, WorkerCrashedError

T = RESULT_TIMEOUT
N = 10_000
CHUNK = 1000


def _killing_map(pool: ResilientPool, marker: Path, at: int, **kwargs: object) -> Iterator[int]:
    return pool.map(  # type: ignore[call-overload,no-any-return]
        workload.kill_once_at, itertools.repeat(str(marker)), range(N), itertools.repeat(at), chunksize=CHUNK, timeout=T, **kwargs
    )


def test_map_at_chunksize_1000_is_in_order(make_pool: Callable[..., ResilientPool]) -> None:
    pool = make_pool(2)
    assert list(pool.map(workload.inc, range(N + 7), chunksize=CHUNK, timeout=T)) == list(range(1, N + 8))
    # Twice on one pool: a second map sees no stale chunk of the first.
    assert list(pool.map(workload.inc, range(3 * CHUNK), chunksize=CHUNK, timeout=T)) == list(range(1, 3 * CHUNK + 1))


def test_map_at_chunksize_1000_retries_a_killed_chunk_in_place(make_pool: Callable[..., ResilientPool], tmp_path: Path) -> None:
    pool = make_pool(2)
    marker = tmp_path / "killed"
    got = list(_killing_map(pool, marker, at=5 * CHUNK + 555, retry=1))
    assert marker.exists(), "the worker was never killed: the test did not test anything"
    assert got == list(range(1, N + 1))
    stats = pool.stats()
    assert stats.retried == 1 and stats.failed == 0


def test_map_at_chunksize_1000_without_retry_fails_at_the_chunks_first_item(make_pool: Callable[..., ResilientPool], tmp_path: Path) -> None:
    pool = make_pool(2)
    marker = tmp_path / "killed"
    got: list[int] = []
    with pytest.raises(WorkerCrashedError):
        for value in _killing_map(pool, marker, at=5 * CHUNK + 555):
            got.append(value)
    # Everything before the killed chunk came out, in order; nothing of it or after it.
    assert got == list(range(1, 5 * CHUNK + 1))


def test_map_at_chunksize_1000_raises_at_the_failing_chunks_first_item(make_pool: Callable[..., ResilientPool]) -> None:
    # As with the stdlib: a chunk fails as a whole, and its exception comes at its first item.
    pool = make_pool(2)
    zero_at = 4321
    it = pool.map(workload.inverse, range(-zero_at, N - zero_at), chunksize=CHUNK, timeout=T)
    first = zero_at // CHUNK * CHUNK
    got = list(itertools.islice(it, first))
    assert got == [1 / x for x in range(-zero_at, first - zero_at)]
    with pytest.raises(ZeroDivisionError):
        next(it)


def test_map_at_chunksize_1000_reads_a_bounded_window_ahead(make_pool: Callable[..., ResilientPool]) -> None:
    # 32 chunks per worker in flight at most (docs/core.md, "Lazy map"): an endless input works.
    pool = make_pool(2)
    read = itertools.count()

    def endless() -> Iterator[int]:
        for i in itertools.count():
            next(read)
            yield i

    it = pool.map(workload.inc, endless(), chunksize=CHUNK, timeout=T)
    assert list(itertools.islice(it, 3 * CHUNK)) == list(range(1, 3 * CHUNK + 1))
    assert next(read) <= 32 * 2 * CHUNK
    it.close()


def test_a_map_of_large_items_reads_ahead_a_bounded_number_of_bytes(make_pool: Callable[..., ResilientPool], monkeypatch: pytest.MonkeyPatch) -> None:
    # At most _MAP_WINDOW_BYTES_PER_WORKER of pickled inputs per worker in flight (docs/core.md,
    # "Lazy map"). Scaled down 16x (1 MiB per worker, 64 KiB items) so that this test does not
    # grow the test process, whose size every later forked worker inherits: 32 chunks of two
    # items each would be 128 items ahead.
    import resilpool._pool as pool_module

    monkeypatch.setattr(pool_module, "_MAP_WINDOW_BYTES_PER_WORKER", 1 << 20)
    pool = make_pool(2)
    read = itertools.count()
    item = b"x" * (1 << 16)

    def endless() -> Iterator[bytearray]:
        while True:
            next(read)
            yield bytearray(item)  # a new object each (pickle would store one object once)

    it = pool.map(len, endless(), chunksize=2, timeout=T)
    assert list(itertools.islice(it, 6)) == [1 << 16] * 6
    # 16 chunks fill the cap, each of the 3 consumed makes room for one more, and the
    # chunk that crosses the cap is read whole.
    assert next(read) <= 2 * (16 + 3 + 1)
    it.close()


def test_a_chunked_map_closed_mid_chunk_yields_nothing_more(make_pool: Callable[..., ResilientPool]) -> None:
    # The chunked map's iterator is not a generator (its per-item step is C code only); its
    # close() must still end it as closing a generator does: mid-chunk, and for good.
    pool = make_pool(2)
    it = pool.map(workload.inc, range(N), chunksize=CHUNK, timeout=T)
    assert list(itertools.islice(it, CHUNK + 10)) == list(range(1, CHUNK + 11))
    it.close()
    assert list(it) == []
    it.close()  # again: no error
    # After the end, as after an exception: nothing more either.
    done = pool.map(workload.inc, range(5), chunksize=2, timeout=T)
    assert list(done) == [1, 2, 3, 4, 5] and list(done) == []
    failed = pool.map(workload.inverse, [1, 2, 0, 3], chunksize=2, timeout=T)
    assert [next(failed), next(failed)] == [1.0, 0.5]
    with pytest.raises(ZeroDivisionError):
        next(failed)
    assert list(failed) == []
