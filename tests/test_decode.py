"""Results are unpickled off the manager thread (issue 13.2): a slow one delays nobody else."""

from __future__ import annotations

import concurrent.futures as cf
import threading
from pathlib import Path

import decode_workload
import pytest
import workload
from conftest import RESULT_TIMEOUT, wait_until

from resilpool import ResilientPool, WorkerCrashedError

T = RESULT_TIMEOUT


def _ready(pool: ResilientPool) -> None:
    """Both workers up and warm (the ordering below must not depend on start-up)."""
    assert [f.result(timeout=T) for f in [pool.submit(workload.inc, i) for i in range(20)]] == list(range(1, 21))


@pytest.mark.parametrize("plain", [True, False], ids=["plain-results", "objects-through-decoders"])
def test_a_result_blocked_while_unpickling_delays_no_other_result(make_pool, plain: bool) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(2)
    _ready(pool)
    with decode_workload.result_blocked_in_unpickling(pool, f"slow-result-{plain}", 42, T) as slow:
        # The parent is now inside its __setstate__, blocked until the block is left. Ints are
        # unpickled by the manager; objects (an ungated BlockedResult) by the other decoders.
        if plain:
            tiny = [pool.submit(workload.inc, i) for i in range(100)]
        else:
            tiny = [pool.submit(decode_workload.blocked_result, f"no-gate-{i}", i + 1) for i in range(100)]
        done, not_done = cf.wait(tiny, timeout=T)
        assert not not_done, f"{len(not_done)} tiny tasks waited for another task's unpickling"
        assert [f.result(timeout=0) if plain else f.result(timeout=0).value for f in tiny] == list(range(1, 101))
        assert not slow.done()  # the slow one is still being unpickled
        assert pool.stats().running >= 1  # it counts as running until it is settled
        pool.check_invariants()  # the task is in a place: decoding
    res = slow.result(timeout=T)
    assert (type(res).__name__, res.value) == ("BlockedResult", 42)


def test_a_retry_on_an_exception_that_arrives_pickled_still_runs(tmp_path: Path, make_pool) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(2)
    _ready(pool)
    entered, release = decode_workload.gate("slow-error")
    fut = pool.submit(decode_workload.fail_once_blocked, "slow-error", str(tmp_path / "ran"), retry=2)
    try:
        assert entered.wait(T), "the first attempt's error was never unpickled"
        assert [f.result(timeout=T) for f in [pool.submit(workload.inc, i) for i in range(20)]] == list(range(1, 21))
        assert not fut.done()  # its retry waits for the error: the retry predicate sees it decoded
    finally:
        release.set()
    assert fut.result(timeout=T) > 0  # the second attempt ran and succeeded
    s = pool.stats()
    assert (s.retried, s.failed) == (1, 0)


def test_many_results_unpickled_concurrently_all_resolve_and_threads_are_bounded(make_pool) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(2)
    _ready(pool)
    gates = [decode_workload.gate(f"many-{i}") for i in range(5)]
    slow = [pool.submit(decode_workload.blocked_result, f"many-{i}", i) for i in range(5)]
    try:
        # Decoders are capped at max_workers + 1: three results block, two wait their turn.
        wait_until(lambda: sum(e.is_set() for e, _ in gates) >= 3, T, "three results to block in their unpickling")
        assert pool._core._decoder.threads == 3
    finally:
        for _, release in gates:
            release.set()
    assert [f.result(timeout=T).value for f in slow] == list(range(5))


@pytest.mark.parametrize("n", [2000])
def test_tiny_results_through_the_decoders_keep_every_future_and_count(make_pool, n: int) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(2)
    seen = threading.Event()
    futs = [pool.submit(workload.inc, i) for i in range(n)]
    futs[-1].add_done_callback(lambda f: seen.set())
    assert [f.result(timeout=T) for f in futs] == list(range(1, n + 1))
    assert seen.wait(T)
    s = pool.stats()
    assert (s.completed, s.failed, s.running) == (n, 0, 0)
    pool.check_invariants(idle=True)


@pytest.mark.resilpool_core_errors  # a rebuild is logged at ERROR
def test_a_rebuild_while_a_result_is_unpickled_counts_it_as_interrupted(make_pool) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(1)
    _ready(pool)
    with decode_workload.result_blocked_in_unpickling(pool, "rebuild-decoding", 7, T) as fut:
        pool.break_core_for_test()
        # The old core's salvage gives the decoder a bounded moment, then the task is one that
        # had started when the core broke: without retry, it fails as such.
        with pytest.raises(WorkerCrashedError, match="rebuilt"):
            fut.result(timeout=T)
        wait_until(lambda: pool.stats().rebuilds == 1, T, "the rebuild to be counted")  # counted after the hand-over
    assert pool.submit(workload.inc, 1).result(timeout=T) == 2


@pytest.mark.resilpool_core_errors  # a rebuild is logged at ERROR
def test_results_read_by_a_rebuild_are_still_resolved(tmp_path: Path, make_pool) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(2)
    _ready(pool)
    futs = [pool.submit(workload.inc, i) for i in range(500)]
    pool.break_core_for_test()  # some results are in the pipes or with a decoder right now
    cf.wait(futs, timeout=T)
    failed = [f for f in futs if f.exception(timeout=0) is not None]
    # At most the task each worker was running dies with the old core; every answer that
    # was read, or was being unpickled, resolves the future it belongs to.
    assert len(failed) <= 2 and all(isinstance(f.exception(timeout=0), WorkerCrashedError) for f in failed)
    assert all(f.result(timeout=0) == i + 1 for i, f in enumerate(futs) if f not in failed)


def test_only_small_results_that_name_no_global_are_unpickled_on_the_manager_thread() -> None:
    import decimal
    import pickle

    from resilpool._core.decode import INLINE_MAX_BYTES, loads_plain

    for value in [1, "x", {"i": [1, 2.5, None]}, (True, b"ab", frozenset({1}), {3}), 10**40]:
        assert loads_plain(pickle.dumps(value, pickle.HIGHEST_PROTOCOL)) == (True, value)
    for value in [decimal.Decimal(1), decode_workload.BlockedResult("k", 1), ValueError("x"), b"\0" * (INLINE_MAX_BYTES + 1)]:
        assert loads_plain(pickle.dumps(value, pickle.HIGHEST_PROTOCOL)) == (False, None)  # a decoder's job
    assert loads_plain(b"\x80\x05junk") == (False, None)  # corrupt: the decoder says why
    # Both ways to the manager's answer: no byte of a code-reaching opcode at all (the C
    # unpickler alone), or such a byte inside data only (the restricted unpickler).
    from resilpool._core.decode import _CALLS_CODE

    for value, fast in [(7, True), ([1.5, None, b"\x00"], True), ("cobR", False), ({"ok": 1}, False)]:
        body = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
        assert (_CALLS_CODE.search(body) is None) is fast
        assert loads_plain(body) == (True, value)
    # Every opcode that can look up a name or call something is one of those bytes.
    import pickletools

    risky = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "BUILD", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4"}
    codes = {op.code.encode("latin-1") for op in pickletools.opcodes if op.name in risky}
    assert len(codes) == len(risky) and all(_CALLS_CODE.fullmatch(c) for c in codes)
    # A lone scalar goes to the C unpickler even when its bytes look like such an opcode
    # (99 pickles as b"K" + b"c"); anything more is matched by the rules above.
    from resilpool._core.decode import _SCALAR

    for proto in range(2, pickle.HIGHEST_PROTOCOL + 1):
        for value in [99, ord("R"), 0x93, 99 * 256 + 99, -(2**31), 2**31 - 1, 1.5, None, True, False]:
            body = pickle.dumps(value, proto)
            assert _SCALAR.fullmatch(body) and loads_plain(body) == (True, value)
        for value in [2**31, "c", [99], (99,)]:
            assert not _SCALAR.fullmatch(pickle.dumps(value, proto))
    assert not _SCALAR.fullmatch(pickle.dumps(99, 5) + b"c")


def test_a_decoder_still_unpickling_at_close_closes_the_wake_pipe_when_it_ends() -> None:
    """A core that gave up on a stuck result hands its wake-up pipe to the decoders: the
    last one closes it as it exits (30 core rebuilds left 6 descriptors in a soak before)."""
    import os
    import pickle
    import types

    from resilpool._core.decode import DecodeJob, Decoder

    r, w = os.pipe()
    pipe = os.readlink(f"/proc/self/fd/{w}")
    decoder = Decoder("test", lambda: os.write(w, b"\0"), max_threads=2)
    entered, release = decode_workload.gate("stuck-at-close")
    task = types.SimpleNamespace(id=1, fn_name="blocked_result")
    body = pickle.dumps(decode_workload.BlockedResult("stuck-at-close", 5))
    try:
        decoder.put([DecodeJob(task, 0, True, 0.0, body)])  # type: ignore[arg-type]
        assert entered.wait(T)
        assert decoder.close(0.05) is False  # still unpickling
        decoder.close_fds_when_done((r, w))
        os.fstat(r), os.fstat(w)  # not yet: the decoder will still write its wake-up
    finally:
        release.set()

    def closed() -> bool:  # gone, or its number reused for something else meanwhile
        try:
            return os.readlink(f"/proc/self/fd/{w}") != pipe
        except OSError:
            return True

    wait_until(closed, T, "the last decoder to close the pipe")
    wait_until(lambda: decoder.threads == 0, T, "the decoder thread to exit")
    assert [j.value.value for j in decoder.take_done()] == [5]
