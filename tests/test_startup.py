"""A pool's start-up: what it asks of the forkserver, and a fresh pool on every start method.

Timing is the benchmark's business (``bench/run --only firststart``); these
tests pin the behaviour that the figure depends on.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import subprocess
import sys
import threading
from multiprocessing import forkserver
from pathlib import Path
from typing import Any

import pytest
import workload
from conftest import wait_until

from resilpool import Breaker, CrashLoopError, _pool

T = 60.0  # seconds: the bound of every wait here


class _Ctx:
    """Records what ``set_forkserver_preload`` is called with."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def set_forkserver_preload(self, names: list[str]) -> None:
        self.calls.append(list(names))


def test_preload_appends_the_worker_modules_and_keeps_the_users(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forkserver._forkserver, "_preload_modules", ["__main__", "numpy"])
    ctx = _Ctx()
    _pool._preload_worker_module(ctx)  # type: ignore[arg-type]
    assert ctx.calls == [["__main__", "numpy", *_pool._FORKSERVER_PRELOAD]]


def test_preload_leaves_a_complete_list_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forkserver._forkserver, "_preload_modules", ["__main__", *_pool._FORKSERVER_PRELOAD])
    ctx = _Ctx()
    _pool._preload_worker_module(ctx)  # type: ignore[arg-type]
    assert ctx.calls == []


def test_only_a_pool_with_local_workers_launches_the_forkserver(monkeypatch: pytest.MonkeyPatch) -> None:
    launched: list[bool] = []
    monkeypatch.setattr(forkserver, "ensure_running", lambda: launched.append(True))
    _pool._resolve_context("forkserver", local=False)  # a backend's pool (Dask): not its workers
    assert launched == []
    _pool._resolve_context("forkserver")
    assert launched == [True]


def test_every_preloaded_module_imports() -> None:
    # A name that does not import would be skipped by the forkserver in silence (it ignores
    # ImportError): the worker would then pay for the import after every fork.
    code = "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]"
    subprocess.run([sys.executable, "-c", code, *_pool._FORKSERVER_PRELOAD], check=True, timeout=60)



def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, timeout=60, capture_output=True, text=True)
    return set(out.stdout.split())


def test_the_worker_module_imports_without_the_pool() -> None:
    # The forkserver imports resilpool._core.worker, so every forkserver start pays for what it
    # drags in: the package must not import the pool, the supervisor, tenacity or psutil.
    loaded = _modules_after("import resilpool._core.worker")
    heavy = {"resilpool._pool", "resilpool._core.executor", "resilpool.supervisor.monitor", "tenacity", "psutil"}
    assert not loaded & heavy
    # Nor what only the parent or a failing task needs: the error classes (they import
    # concurrent.futures), logging, traceback formatting.
    parents = {"resilpool.errors", "concurrent.futures", "logging", "traceback"}
    assert not loaded & parents


def test_the_pool_imports_tenacity_only_for_a_retry_policy() -> None:
    # tenacity imports asyncio: a pool without retries has no use for either.
    loaded = _modules_after("import resilpool; resilpool.ResilientPool")
    assert not loaded & {"tenacity", "asyncio"}
    assert "tenacity" in _modules_after("import resilpool; resilpool.RetryPolicy.attempts(2)")


def test_public_names_resolve_on_first_use() -> None:
    import resilpool

    for name in resilpool.__all__:
        assert getattr(resilpool, name).__name__ == name
    assert set(resilpool.__all__) <= set(dir(resilpool))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        resilpool.Nope  # type: ignore[attr-defined]  # noqa: B018
    namespace: dict[str, object] = {}
    exec("from resilpool import *", namespace)
    assert set(resilpool.__all__) <= set(namespace)


_FRESH_FORKSERVER_POOL = """
import sys
from multiprocessing import forkserver

from resilpool._core import reaper

seen = []
original = reaper.Reaper.__init__


def record(self, *args, **kwargs):
    # The core builds its reaper before its manager thread starts the first worker.
    seen.append(forkserver._forkserver._forkserver_pid)
    original(self, *args, **kwargs)


reaper.Reaper.__init__ = record

import resilpool

if __name__ == "__main__":
    with resilpool.ResilientPool(1, mp_context="forkserver") as pool:
        print("cloudpickle" in sys.modules, seen[0] is not None)
        print(pool.submit(lambda: 6 * 7).result(timeout=60))
"""


def test_a_forkserver_pool_launches_the_server_first_and_imports_cloudpickle_when_needed(tmp_path: Path) -> None:
    # Fresh interpreter: nothing has started a forkserver or imported cloudpickle yet.
    script = tmp_path / "fresh_pool.py"
    script.write_text(_FRESH_FORKSERVER_POOL)
    out = subprocess.run([sys.executable, str(script)], check=True, timeout=120, capture_output=True, text=True)
    assert out.stdout.split() == ["False", "True", "42"]


_FRESH_FORK_POOL = """
import sys

import resilpool

if __name__ == "__main__":
    with resilpool.ResilientPool(1, mp_context="fork") as pool:
        print("cloudpickle" in sys.modules, "tenacity" in sys.modules)
        print(pool.submit(lambda: 6 * 7, retry=2).result(timeout=60))
"""


def test_a_fork_pool_imports_cloudpickle_and_tenacity_only_when_needed(tmp_path: Path) -> None:
    script = tmp_path / "fresh_fork_pool.py"
    script.write_text(_FRESH_FORK_POOL)
    out = subprocess.run([sys.executable, str(script)], check=True, timeout=120, capture_output=True, text=True)
    assert out.stdout.split() == ["False", "False", "42"]


def test_a_lazy_import_waits_while_the_pool_forks() -> None:
    # The manager holds FORK_LOCK across a fork (fork start method): an import of ours
    # started meanwhile waits, so no worker is forked with it half done.
    from resilpool._core import lazy

    done = threading.Event()

    def importer() -> None:
        lazy.import_module("json")
        done.set()

    with lazy.FORK_LOCK:
        thread = threading.Thread(target=importer)
        thread.start()
        assert not done.wait(0.2)  # it cannot get the lock: deterministic, not a timing
    thread.join(T)
    assert done.is_set()


# --- a fresh pool on every start method ---------------------------------------------------


def test_every_worker_of_a_fresh_pool_becomes_ready_and_the_first_result_arrives(start_method: str, make_pool: Any) -> None:
    pool = make_pool(2, mp_context=start_method)
    first = pool.submit(os.getpid)  # right away, while the workers are starting
    assert first.result(timeout=T) > 0
    wait_until(lambda: pool.stats().workers == 2, T, "both workers ready")
    workers = pool.workers()
    assert len({w.pid for w in workers}) == 2 and all(w.ready for w in workers)
    assert first.result() in {w.pid for w in workers}
    assert sorted(pool.map(abs, range(-3, 1))) == [0, 1, 2, 3]


@pytest.mark.resilpool_core_errors  # the pool logs each failed start at ERROR
def test_a_worker_that_cannot_be_started_is_a_startup_failure(start_method: str, make_pool: Any) -> None:
    # With fork and spawn the first starts run in the constructor itself: a start that
    # raises there must still be counted by the breaker, not escape the constructor.
    ctx = type(multiprocessing.get_context(start_method))()
    base = ctx.Process

    class Refused(base):  # type: ignore[misc, valid-type]
        def start(self) -> None:
            raise OSError(errno.EAGAIN, "cannot fork (test)")

    ctx.Process = Refused  # type: ignore[misc]
    pool = make_pool(1, mp_context=ctx, breaker=Breaker(max_failures=2))
    with pytest.raises(CrashLoopError) as info:
        pool.submit(os.getpid).result(timeout=T)
    assert "cannot fork (test)" in str(info.value.__cause__)
    assert pool.stats().workers == 0


@pytest.mark.resilpool_core_errors  # the pool logs the initializer's failure at ERROR
def test_an_initializer_that_fails_is_a_startup_failure_on_every_start_method(start_method: str, make_pool: Any) -> None:
    pool = make_pool(2, mp_context=start_method, initializer=workload.fail_init, initargs=("no database",), breaker=Breaker(max_failures=2))
    with pytest.raises(CrashLoopError) as info:
        pool.submit(os.getpid).result(timeout=T)
    assert "no database" in str(info.value.__cause__)
