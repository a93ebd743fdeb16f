"""Chaos on Dask: seeded faults against a ResilientPool whose tasks run on a LocalCluster.

The workload and the fault injector are the suite's own (``chaos_workload.Work``,
``chaos_check.make_plan``, the ``chaos`` fixture); the pool runs on
``DaskBackend``.  Faults: Dask worker processes SIGKILLed mid-task and idle
(through ``pool.workers()``, as the injector does locally), tasks that ``os._exit``
their worker, late results, and breaks of the pool's core (the rebuild path).

Checked after each run, from the append-only effects log (a ``S`` line is written
when a task's call is unpickled in a worker, after its start was recorded: a line in
the worker's start log and a message to the ledger, or on a rerun a claim answered):

1. every future resolves within the bound (nothing hangs);
2. every idempotent task that should succeed returns its right value;
3. a non-idempotent task started at most once and its side effect happened at most
   once (exactly once when it succeeded), though Dask reschedules the keys of dead
   workers;
4. a non-idempotent task failed by a worker's death had started (an unstarted task is
   never failed by a death); failures are the pool's errors, or by design;
5. the stats add up, the pool gets back to full strength, shutdown is bounded.

Each test starts its own LocalCluster (its nannies restart the killed workers) and
closes it before the suite's leak check (``chaos/conftest.py``) looks; one cluster run
before the first test lets distributed start its process-wide threads first.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import distributed  # in the test extra: missing, these tests fail (they never skip)

from chaos_check import RETRIES, make_plan, read_effects  # noqa: E402
from chaos_workload import FAILING, Work, expected_value, work_label  # noqa: E402

from resilpool import Breaker, PoisonTaskError, ResilientPool, TaskTimeoutError, WorkerCrashedError  # noqa: E402
from resilpool.dask import DaskBackend  # noqa: E402
from resilpool.events import Event, ExitReason, WorkerExited  # noqa: E402
from resilpool.testing import FaultKind  # noqa: E402

WORKERS = 2


def _local_cluster() -> Any:
    cluster = distributed.LocalCluster(
        n_workers=WORKERS,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
    )
    return cluster


@pytest.fixture(scope="module")
def _dask_warmed_up() -> None:
    """Run one cluster before the first leak baseline: distributed starts process-wide
    threads and descriptors once (its offload executor, resolvers), and keeps them."""
    with _local_cluster() as cluster, distributed.Client(cluster, set_as_default=False) as client:
        client.submit(int, "1", pure=False).result(timeout=60)


@pytest.fixture
def dask_cluster(_dask_warmed_up: None) -> Iterator[Any]:
    """A LocalCluster per test, closed before the suite's leak check looks: its nannies
    restart killed workers, and the check sees none of them afterwards."""
    cluster = _local_cluster()
    try:
        yield cluster
    finally:
        cluster.close(timeout=30)


def _run(chaos: Any, tmp_path: Path, cluster: Any, *, n: int, rate: float, mix: dict[str, float], kinds: dict[FaultKind, float], bound_s: float) -> None:
    plan = make_plan(chaos.random("workload"), n, mix, effect_share=0.4, spin_ms=(1.0, 20.0))
    log = tmp_path / "effects.log"
    events: list[Event] = []
    violations: list[str] = []
    pool = ResilientPool(WORKERS, backend=DaskBackend(cluster), breaker=Breaker(quarantine_after=2))
    pool.add_listener(events.append)
    futures: list[cf.Future[Any]] = []
    t0 = time.monotonic()
    try:
        with chaos.attach(pool, rate=rate, kinds=kinds, label=work_label) as inj:
            for p in plan:
                w = Work(str(log), p.key, p.kind, p.effect, p.param)
                target = pool.options(task_timeout=p.task_timeout, retry=p.retry) if p.task_timeout else pool
                futures.append(target.submit(w) if p.task_timeout else pool.submit(w, retry=p.retry))
            done, not_done = cf.wait(futures, timeout=bound_s)
            if not_done:
                violations.append(f"{len(not_done)} futures unresolved after {bound_s:.0f}s (a hang); stats {pool.stats()}")
            else:
                try:  # idle: every table of the (current) core's TaskBook must be empty and consistent
                    pool.check_invariants(idle=True)
                except Exception as exc:
                    violations.append(f"the core's invariants do not hold when idle: {exc}")
            deadline = time.monotonic() + 30.0
            while time.monotonic() < deadline and not (sum(1 for w in pool.workers() if not w.retiring) >= WORKERS):
                time.sleep(0.05)
            if sum(1 for w in pool.workers() if not w.retiring) < WORKERS:
                violations.append(f"the pool did not get back to {WORKERS} workers: {pool.workers()}")
        wall = time.monotonic() - t0
        stats = pool.stats()
    finally:
        shut = threading.Thread(target=pool.shutdown, kwargs={"wait": True, "cancel_futures": True}, name="chaos-shutdown")
        shut.start()
        shut.join(60.0)
        if shut.is_alive():
            violations.append("shutdown did not finish within 60s")

    starts, effects = read_effects(log)
    if stats.pending or stats.running or stats.completed + stats.failed + stats.cancelled != stats.submitted:
        violations.append(f"stats do not add up: {stats}")
    failed_as_designed = lost_to_faults = claimed_not_run = 0
    dead_pids = {e.pid for e in events if isinstance(e, WorkerExited) and e.reason is not ExitReason.SHUTDOWN}
    for p, fut in zip(plan, futures):
        if not fut.done():
            continue
        exc = fut.exception(timeout=0)
        n_starts, n_effects = len(starts.get(p.key, [])), len(effects.get(p.key, []))
        if p.effect:
            if n_starts > 1 or n_effects > 1:
                violations.append(f"non-idempotent task {p.key} ({p.kind}) started {n_starts}x, effect {n_effects}x")
            if exc is None and n_effects != 1:
                violations.append(f"non-idempotent task {p.key} succeeded but its effect happened {n_effects}x")
            if isinstance(exc, WorkerCrashedError) and n_starts == 0:
                # Its start was recorded, and its worker died before the call was unpickled
                # (microseconds; a round trip on a checked rerun): it counts as started (docs/dask.md).
                if exc.pid in dead_pids:
                    claimed_not_run += 1
                else:
                    violations.append(f"task {p.key} failed by a death of a worker that did not die ({exc})")
        if exc is None:
            if fut.result(timeout=0) != expected_value(p.key):
                violations.append(f"task {p.key} ({p.kind}) returned a wrong value")
        elif p.kind in FAILING and (isinstance(exc, (ValueError, PoisonTaskError, TaskTimeoutError, WorkerCrashedError))):
            failed_as_designed += 1
        elif isinstance(exc, (WorkerCrashedError, TaskTimeoutError, PoisonTaskError)):
            lost_to_faults += 1
            if p.retry is not None and p.retry >= RETRIES and not isinstance(exc, PoisonTaskError):
                violations.append(f"idempotent task {p.key} ({p.kind}) failed despite {p.retry} retries: {exc!r}")
        else:
            violations.append(f"task {p.key} ({p.kind}) failed unexpectedly: {exc!r}")
    exits = [e for e in events if isinstance(e, WorkerExited)]
    deaths = sum(1 for e in exits if e.reason is not ExitReason.SHUTDOWN)
    print(
        f"dask chaos seed={chaos.seed} rate={rate:g} tasks={n} faults={inj.fired} {inj.counts()} deaths={deaths}"
        f" retried={stats.retried} rebuilds={stats.rebuilds} failed_as_designed={failed_as_designed}"
        f" lost_to_faults={lost_to_faults} claimed_not_run={claimed_not_run} wall={wall:.1f}s"
    )
    fired_breaks = inj.counts().get("break_core", 0)
    if stats.rebuilds != fired_breaks:
        violations.append(f"{fired_breaks} core breaks fired but the pool rebuilt {stats.rebuilds} times")
    if violations:
        head = "\n".join(f"- {v}" for v in violations[:25])
        pytest.fail(f"Dask chaos invariants violated ({len(violations)}), seed={chaos.seed}\n{head}\nreplay: {chaos.replay}")


@pytest.mark.timeout(240)
def test_dask_mixed_workload_under_worker_kills(chaos: Any, tmp_path: Path, dask_cluster: Any) -> None:
    """Idempotent and not, fast and slow, raising and poison, on Dask workers that get killed."""
    mix = {"pure": 5.0, "spin": 4.0, "sleep": 2.0, "raise": 0.5, "poison": 0.1}
    kinds = {FaultKind.KILL_BUSY: 3.0, FaultKind.KILL_IDLE: 1.0, FaultKind.EXIT: 2.0, FaultKind.DELAY: 2.0, FaultKind.BREAK_CORE: 0.3}
    _run(chaos, tmp_path, dask_cluster, n=400, rate=0.03, mix=mix, kinds=kinds, bound_s=150.0)


@pytest.mark.timeout(240)
def test_dask_core_rebuilds_among_worker_kills(chaos: Any, tmp_path: Path, dask_cluster: Any) -> None:
    """Core breaks (the rebuild path: a new client, the ledger says which attempts started)
    among worker kills, with attempts in flight on the cluster."""
    mix = {"pure": 3.0, "spin": 4.0, "sleep": 2.0}
    kinds = {FaultKind.BREAK_CORE: 1.0, FaultKind.KILL_BUSY: 2.0, FaultKind.EXIT: 1.0, FaultKind.DELAY: 1.0}
    _run(chaos, tmp_path, dask_cluster, n=300, rate=0.03, mix=mix, kinds=kinds, bound_s=150.0)
