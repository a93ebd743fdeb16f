"""shutdown() always returns (issue 13.1): a timeout, a pool-level grace, and Ctrl-C end the wait."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import core_workload
import decode_workload
import psutil
import pytest
import workload
from conftest import RESULT_TIMEOUT, wait_until

from resilpool import ResilientPool, SerializationError, WorkerCrashedError

T = RESULT_TIMEOUT
FOREVER = 3600.0  # a task "blocked forever", as far as any test can tell


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _runs(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_shutdown_timeout_kills_a_task_blocked_forever_and_returns(tmp_path: Path, start_method: str, make_pool) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(1, mp_context=start_method)
    runs = tmp_path / "runs"
    blocked = pool.submit(workload.count_and_wait, str(runs), str(tmp_path / "never"), FOREVER, retry=3)
    wait_until(lambda: _runs(runs) == 1, T, "the blocked task to start")
    pid = pool.workers()[0].pid
    queued = [pool.submit(workload.inc, i) for i in range(3)]  # behind it: never started
    pool.shutdown(wait=True, timeout=0.5)
    with pytest.raises(WorkerCrashedError, match=r"shutdown\(timeout=0.5\) ran out"):
        blocked.result(timeout=0)
    assert _runs(runs) == 1  # killed, not retried
    for f in queued:
        assert f.cancelled()
    assert _gone(pid)
    s = pool.stats()
    assert (s.workers, s.running, s.pending) == (0, 0, 0)


def test_the_pool_level_shutdown_timeout_ends_a_with_block(tmp_path: Path) -> None:
    started = tmp_path / "started"
    with ResilientPool(2, shutdown_timeout=0.5) as pool:
        blocked = pool.submit(core_workload.start_and_wait, str(started), str(tmp_path / "never"), FOREVER)
        done = [pool.submit(workload.inc, i) for i in range(10)]
        wait_until(started.exists, T, "the blocked task to start")
        assert [f.result(timeout=T) for f in done] == list(range(1, 11))
    with pytest.raises(WorkerCrashedError, match="ran out"):
        blocked.result(timeout=0)
    assert pool.stats().workers == 0


def test_work_that_finishes_within_the_timeout_is_not_touched(make_pool) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(2)
    futs = [pool.submit(workload.inc, i) for i in range(200)]
    pool.shutdown(wait=True, timeout=T)
    assert [f.result(timeout=0) for f in futs] == list(range(1, 201))
    assert pool.stats().completed == 200


def test_shutdown_without_wait_gives_up_in_the_background(tmp_path: Path, make_pool) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(1)
    started = tmp_path / "started"
    blocked = pool.submit(core_workload.start_and_wait, str(started), str(tmp_path / "never"), FOREVER)
    wait_until(started.exists, T, "the blocked task to start")
    pool.shutdown(wait=False, timeout=0.2)
    with pytest.raises(WorkerCrashedError, match="ran out"):
        blocked.result(timeout=T)  # resolved by the core alone, nobody waiting in shutdown
    pool.shutdown(wait=True)  # returns: the core has finished


@pytest.mark.resilpool_core_errors  # the decoder left running is logged
def test_a_result_stuck_unpickling_fails_when_the_timeout_runs_out(make_pool) -> None:  # type: ignore[no-untyped-def]
    pool = make_pool(1)
    # Leaving the block releases the decoder thread (the leak check waits for it to end).
    with decode_workload.result_blocked_in_unpickling(pool, "stuck-at-shutdown", 1, T) as stuck:
        pool.shutdown(wait=True, timeout=0.2)  # returns while the unpickling is still blocked
        with pytest.raises(SerializationError, match="still being unpickled"):
            stuck.result(timeout=0)


@pytest.mark.parametrize("bad", [-1, "1", True, float("nan")])
def test_a_bad_shutdown_timeout_is_refused(bad: object, make_pool) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="shutdown_timeout must be a number of seconds >= 0"):
        ResilientPool(1, shutdown_timeout=bad)  # type: ignore[arg-type]
    pool = make_pool(1)
    with pytest.raises(ValueError, match="timeout must be a number of seconds >= 0"):
        pool.shutdown(timeout=bad)  # type: ignore[arg-type]
    assert pool.submit(workload.inc, 1).result(timeout=T) == 2  # a refused call changes nothing


_CTRL_C = textwrap.dedent(
    """
    import faulthandler, os, signal, sys, threading, time
    # A terminal's Ctrl-C: Python's handler, even when the test runs as a background job of a
    # non-interactive shell (as .ci/run starts 3.12 and 3.13), whose children ignore SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path.insert(0, {tests!r})
    import core_workload
    from resilpool import ResilientPool

    def in_shutdown_wait(main):
        f = sys._current_frames().get(main)
        while f is not None:
            if f.f_code.co_name == "_wait_for_core":
                return True
            f = f.f_back
        return False

    def say_when_waiting(pool, main):
        # The pids go out only once the main thread waits inside shutdown(): the test's
        # SIGINT then lands there, never before.
        while not in_shutdown_wait(main):
            time.sleep(0.01)
        print(" ".join(str(w.pid) for w in pool.workers()), flush=True)

    if __name__ == "__main__":
        pool = ResilientPool(2)
        futs = [pool.submit(core_workload.start_and_wait, {started!r} + str(i), {never!r}, 3600.0) for i in range(2)]
        while not all(os.path.exists({started!r} + str(i)) for i in range(2)):
            time.sleep(0.01)
        threading.Thread(target=say_when_waiting, args=(pool, threading.main_thread().ident), daemon=True).start()
        faulthandler.dump_traceback_later(20)  # stacks on stderr if we are still here then: the test shows them
        try:
            pool.shutdown(wait=True)
        except KeyboardInterrupt:
            print("interrupted", [type(f.exception(timeout=0)).__name__ for f in futs], flush=True)
            raise
    """
)


def test_ctrl_c_during_shutdown_kills_the_workers_and_is_raised_again(tmp_path: Path) -> None:
    script = tmp_path / "ctrl_c.py"
    script.write_text(_CTRL_C.format(tests=os.path.dirname(__file__), started=str(tmp_path / "s"), never=str(tmp_path / "never")))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2
        proc.send_signal(signal.SIGINT)  # the parent's main thread waits in shutdown (see the script)
        try:
            out, err = proc.communicate(timeout=T)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate(timeout=T)
            pytest.fail(f"the interrupted shutdown did not return within {T}s; its output:\n{out}\n{err}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(T)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    assert "KeyboardInterrupt" in err
    assert "interrupted ['WorkerCrashedError', 'WorkerCrashedError']" in out, (out, err)
    assert all(_gone(pid) for pid in pids)
