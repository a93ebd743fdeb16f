"""The chaos suite's runner: a seeded workload under a FaultInjector, then every invariant.

A *plan* (drawn from ``chaos.random("workload")``) lists the tasks: what each does
(``chaos_workload.Work``), whether it is idempotent (``retry=``) or not (a side effect
counted outside the pool), and its options.  :func:`run` submits the plan to a fresh
pool with an injector attached, waits for every future within a bound, shuts the pool
down, and checks:

1. every future resolved within the bound (a hang is a failure);
2. every idempotent task that should succeed holds its right result;
3. every non-idempotent task started at most once and its side effect happened at most
   once (exactly once when it succeeded);
4. a task that failed was hit: it started on the worker that died (its start line names
   that pid), or it was itself given a fault, or it fails by design;
5. the pool's own account agrees: the task it blamed for each worker death is the task
   the injector saw running there; stats add up; the pool is back to full strength; and,
   idle, its core's task tables pass ``check_invariants(idle=True)``;
6. shutdown finishes within a bound (the leak check of ``conftest.py`` then checks that
   no process, thread or file descriptor is left).

Pool task ids are 1, 2, ... in submission order for a fresh pool with one submitting
thread, so task id ``i + 1`` is plan entry ``i`` (checked against the ids in errors).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import faulthandler
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from chaos_workload import FAILING, SUCCEEDING, Work, call, expected_value, work_label

from resilpool import (
    Breaker,
    Limits,
    PoisonTaskError,
    ResilientPool,
    ResilpoolError,
    TaskStalledError,
    TaskTimeoutError,
    WorkerCrashedError,
)
from resilpool.events import CoreRebuilt, Event, ExitReason, WorkerExited
from resilpool.testing import FaultKind
from resilpool.testing.faults import MID_TASK_PROCESS_FAULTS

#: Default task mix: kind -> weight.
MIX: Mapping[str, float] = {
    "pure": 35.0,
    "spin": 30.0,
    "sleep": 8.0,
    "leak": 3.0,
    "subproc": 0.5,
    "timeout": 0.3,
    "poison": 0.15,
    "raise": 1.0,
}

#: Limits of the chaos pools: everything the injector can throw is caught quickly.
LIMITS = Limits(max_rss="400MiB", soft_max_rss="160MiB", stall_timeout=0.3, task_timeout=30.0)
RETRIES = 25  # idempotent tasks: enough that random faults never exhaust them
QUARANTINE_AFTER = 8
TIMEOUT_TASK_S = 0.3  # per-task timeout of the "timeout" tasks (they spin for 5 s)

_NOT_DEATHS = frozenset({ExitReason.SHUTDOWN, ExitReason.SOFT_MEMORY, ExitReason.MAX_TASKS, ExitReason.LIFETIME})
_FATAL_TASK_FAULTS = frozenset(k for k in FaultKind if k.fails_attempt)
_POOL_ERRORS = (WorkerCrashedError, TaskTimeoutError, PoisonTaskError, ResilpoolError)


@dataclass(frozen=True, slots=True)
class Planned:
    key: int
    kind: str
    effect: bool  # non-idempotent: a side effect, no retry
    param: float
    retry: int | None
    task_timeout: float | None


def make_plan(rng: random.Random, n: int, mix: Mapping[str, float] = MIX, *, effect_share: float = 0.4, spin_ms: tuple[float, float] = (0.5, 15.0)) -> list[Planned]:
    """``n`` tasks drawn from ``rng``."""
    kinds = sorted(mix)
    weights = [mix[k] for k in kinds]
    plan = []
    for key in range(n):
        kind = rng.choices(kinds, weights)[0]
        effect = rng.random() < effect_share
        param = 0.0
        if kind == "spin":
            param = rng.uniform(*spin_ms) / 1000
        elif kind == "sleep":
            param = rng.uniform(0.001, 0.03)
        elif kind == "leak":
            param = float(rng.choice((2, 4, 8)))
        elif kind == "subproc":
            param = 0.02
        elif kind == "timeout":
            param = 5.0
        retry: int | None = None
        if not effect:
            retry = 1 if kind in ("timeout", "raise") else RETRIES
        plan.append(Planned(key, kind, effect, param, retry, TIMEOUT_TASK_S if kind == "timeout" else None))
    return plan


@dataclass
class Figures:
    """What one run did; ``line()`` is the one-line figure printed per run."""

    seed: int
    rate: float
    tasks: int = 0
    faults: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    lost: int = 0
    duplicated: int = 0
    failed_expected: int = 0
    unmarked: int = 0
    worker_deaths: int = 0
    recycled: int = 0  # workers retired by limits (soft_max_rss, max_tasks, max_lifetime)
    rebuilds: int = 0
    wall_s: float = 0.0
    parent: str = ""  # the parent's RSS, fds and threads before the pool, at most, and after shutdown

    def line(self) -> str:
        kinds = ",".join(f"{k}:{n}" for k, n in sorted(self.by_kind.items()))
        return (
            f"seed={self.seed} rate={self.rate:g} tasks={self.tasks} faults={self.faults} [{kinds}]"
            f" retries={self.retries} worker_deaths={self.worker_deaths} recycled={self.recycled} rebuilds={self.rebuilds}"
            f" failed_as_expected={self.failed_expected} started_unlogged={self.unmarked} lost={self.lost} duplicated={self.duplicated}"
            f" wall={self.wall_s:.1f}s{' parent ' + self.parent if self.parent else ''}"
        )


class ParentSampler:
    """The test process's RSS, open fds and threads: first, highest (sampled each second) and last."""

    def __init__(self) -> None:
        self._me = psutil.Process()
        self.first = self._sample()
        self.peak = self.first
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-parent-sampler", daemon=True)
        self._thread.start()

    def _sample(self) -> tuple[float, int, int]:
        threads = sum(1 for t in threading.enumerate() if t.name != "chaos-parent-sampler")
        return (self._me.memory_info().rss / 2**20, self._me.num_fds(), threads)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.peak = tuple(max(a, b) for a, b in zip(self.peak, self._sample()))  # type: ignore[assignment]

    def finish(self) -> str:
        self._stop.set()
        self._thread.join(timeout=5)
        last = self._sample()
        f = self.first
        p = tuple(max(a, b) for a, b in zip(self.peak, last))
        return (
            f"rss={f[0]:.0f}->{last[0]:.0f}MiB(max {p[0]:.0f}) fds={f[1]}->{last[1]}(max {p[1]})"
            f" threads={f[2]}->{last[2]}(max {p[2]})"
        )

    def released(self) -> str:
        """Once the run's own records (futures with their results, events, effects) are
        dropped: the fds and threads the shut-down pool still holds. (Not RSS: the
        allocator keeps freed memory; a run's RSS grows with the records it keeps.)"""
        import gc

        gc.collect()
        _, fds, threads = self._sample()
        return f"released: fds={fds} threads={threads}"


class ChaosFailure(AssertionError):
    pass


class CheckedFuture(cf.Future):  # type: ignore[type-arg]
    """A Future that records a second resolution (the pool swallows InvalidStateError,
    which would hide it).  Installed as the pool's Future class during a run."""

    twice: list[str] = []

    def set_result(self, result: Any) -> None:
        self._check("set_result", result)
        super().set_result(result)

    def set_exception(self, exception: BaseException | None) -> None:
        self._check("set_exception", exception)
        super().set_exception(exception)

    def _check(self, what: str, value: Any) -> None:
        with self._condition:  # type: ignore[attr-defined]
            if self._state == "FINISHED":  # type: ignore[attr-defined]
                first = self._exception if self._exception is not None else self._result  # type: ignore[attr-defined]
                CheckedFuture.twice.append(f"a future resolved twice: first {first!r}, then {what}({value!r})")


@contextlib.contextmanager
def checked_futures() -> Iterator[list[str]]:
    """Make the pool create CheckedFutures; yield the list of double resolutions."""
    import resilpool._pool as pool_module

    saved = pool_module.Future
    CheckedFuture.twice = []
    pool_module.Future = CheckedFuture  # type: ignore[misc]
    try:
        yield CheckedFuture.twice
    finally:
        pool_module.Future = saved  # type: ignore[misc]


def read_effects(path: Path) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """``(starts, effects)``: key -> pids, from the run's append-only log."""
    starts: dict[int, list[int]] = collections.defaultdict(list)
    effects: dict[int, list[int]] = collections.defaultdict(list)
    if not path.exists():
        return starts, effects
    for line in path.read_text().splitlines():
        tag, key, pid = line.split()
        (starts if tag == "S" else effects)[int(key)].append(int(pid))
    return starts, effects


def _stacks() -> str:
    with tempfile.TemporaryFile("w+") as f:
        faulthandler.dump_traceback(file=f, all_threads=True)
        f.seek(0)
        return f.read()


def _shutdown_bounded(pool: ResilientPool, timeout: float) -> bool:
    """Shut the pool down; False if it did not finish in time (then kill what is left)."""
    t = threading.Thread(target=pool.shutdown, kwargs={"wait": True, "cancel_futures": True}, name="chaos-shutdown", daemon=True)
    t.start()
    t.join(timeout)
    if not t.is_alive():
        return True
    for w in pool.workers():
        try:
            psutil.Process(w.pid).kill()
        except psutil.Error:
            pass
    t.join(15.0)
    # A pool that cannot finish would also block the interpreter's exit (the pool's atexit
    # handler shuts live pools down without a bound): the failure is reported already.
    import resilpool._pool as pool_module

    pool_module._LIVE_POOLS.discard(pool)
    return False


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "succeeded"
    notes = "; ".join(getattr(exc, "__notes__", ())[-3:])
    return f"{type(exc).__name__}: {exc}" + (f" [notes: {notes}]" if notes else "")


def run(
    chaos: Any,
    tmp_path: Path,
    plan: list[Planned],
    *,
    rate: float,
    workers: int = 2,
    limits: Limits = LIMITS,
    kinds: Any = None,
    start_method: str | None = None,
    bound_s: float = 120.0,
    chunksize: int | None = None,
    record: Callable[[Figures], None] | None = None,
) -> Figures:
    """Run ``plan`` under faults; check the invariants; return the figures (raise ChaosFailure)."""
    log = tmp_path / "effects.log"
    events: list[Event] = []
    violations: list[str] = []
    fig = Figures(seed=chaos.seed, rate=chaos.rate if chaos.rate is not None else rate, tasks=len(plan))
    sampler = ParentSampler()
    pool = ResilientPool(
        workers,
        mp_context=start_method,
        limits=limits,
        breaker=Breaker(quarantine_after=QUARANTINE_AFTER),
        monitor_interval=0.05,
    )
    pool.add_listener(events.append)
    t0 = time.monotonic()
    futures: list[cf.Future[Any]] = []
    map_results: list[Any] | None = None
    shut = False
    try:
        with checked_futures() as resolved_twice, chaos.attach(pool, rate=rate, kinds=kinds, label=work_label) as inj:
            works = [Work(str(log), p.key, p.kind, p.effect, p.param) for p in plan]
            if chunksize is None:
                for p, w in zip(plan, works):
                    if p.task_timeout:
                        futures.append(pool.options(task_timeout=p.task_timeout, retry=p.retry).submit(w))
                    else:
                        futures.append(pool.submit(w, retry=p.retry))
                done, not_done = cf.wait(futures, timeout=bound_s)
            else:
                # One idempotent map (every entry must be idempotent and succeed).
                assert all(p.retry is not None and p.kind in SUCCEEDING for p in plan)
                got: list[Any] = []
                try:
                    for v in pool.map(call, works, chunksize=chunksize, retry=RETRIES, timeout=bound_s):
                        got.append(v)
                except BaseException as exc:  # noqa: BLE001 - recorded as a violation
                    violations.append(f"map raised after {len(got)} results: {_describe(exc)}")
                map_results = got
                not_done = set()
            if not_done:
                index = {id(f): i for i, f in enumerate(futures)}
                stuck = sorted(index[id(f)] for f in not_done)[:20]
                violations.append(
                    f"{len(not_done)} futures unresolved after {bound_s:.0f}s (a hang); first keys {stuck};"
                    f" stats {pool.stats()}; workers {pool.workers()}\n{_stacks()}"
                )
            fig.wall_s = time.monotonic() - t0
            # The pool must heal to full strength (a replacement for every dead worker).
            deadline = time.monotonic() + 15.0
            while time.monotonic() < deadline:
                ready = [w for w in pool.workers() if w.ready and not w.retiring]
                if len(ready) >= workers and not pool.stats().broken:
                    break
                time.sleep(0.02)
            else:
                violations.append(f"the pool did not get back to {workers} ready workers within 15s: {pool.workers()} {pool.stats()}")
            if not not_done:  # idle: every future resolved, so the core's tables must be empty and consistent
                try:
                    pool.check_invariants(idle=True)
                except Exception as exc:  # noqa: BLE001 - recorded as a violation
                    violations.append(f"the core's invariants do not hold with the pool idle: {exc}")
        stats = pool.stats()
        shut = _shutdown_bounded(pool, 30.0)
        if not shut:
            violations.append("shutdown did not finish within 30s")
    finally:
        if not shut:
            _shutdown_bounded(pool, 30.0)
        fig.parent = sampler.finish()

    fig.faults = inj.fired
    fig.by_kind = inj.counts()
    fig.retries = stats.retried
    fig.rebuilds = stats.rebuilds
    exits = [e for e in events if isinstance(e, WorkerExited)]
    fig.worker_deaths = sum(1 for e in exits if e.reason not in _NOT_DEATHS)
    fig.recycled = sum(1 for e in exits if e.reason in _NOT_DEATHS and e.reason is not ExitReason.SHUTDOWN)
    starts, effects = read_effects(log)

    violations.extend(resolved_twice[:10])
    if stats.pending or stats.running:
        violations.append(f"stats after the run: pending={stats.pending} running={stats.running}")
    if stats.completed + stats.failed + stats.cancelled != stats.submitted:
        violations.append(f"stats do not add up: {stats}")

    if map_results is not None:
        _check_map(plan, map_results, starts, fig, violations)
    else:
        _check_futures(plan, futures, starts, effects, exits, events, inj, fig, violations)
    _check_process_faults(plan, futures, starts, exits, inj, violations)

    # Last: drop what the run recorded (every future and its result, every event), so
    # the figures show what the shut-down pool still holds, apart from the test's records.
    futures.clear()
    events.clear()
    works.clear()
    starts.clear()
    effects.clear()
    exits.clear()
    map_results = None
    fig.parent += " " + sampler.released()
    if record is not None:
        record(fig)
    print(fig.line())
    if violations:
        head = "\n".join(f"- {v}" for v in violations[:25])
        more = f"\n... and {len(violations) - 25} more" if len(violations) > 25 else ""
        raise ChaosFailure(
            f"chaos invariants violated ({len(violations)}), seed={chaos.seed}\n{fig.line()}\n{head}{more}\nreplay: {chaos.replay}"
        )
    return fig


def _check_map(plan: list[Planned], got: list[Any], starts: dict[int, list[int]], fig: Figures, violations: list[str]) -> None:
    want = [expected_value(p.key) for p in plan]
    if got != want:
        wrong = [i for i, (a, b) in enumerate(zip(got, want)) if a != b][:10]
        fig.lost = abs(len(want) - len(got)) + len(wrong)
        violations.append(f"map results differ: {len(got)} of {len(want)} results, wrong at {wrong}")


def _check_futures(
    plan: list[Planned],
    futures: list[cf.Future[Any]],
    starts: dict[int, list[int]],
    effects: dict[int, list[int]],
    exits: list[WorkerExited],
    events: list[Event],
    inj: Any,
    fig: Figures,
    violations: list[str],
) -> None:
    blamed = {(e.pid, e.task_id) for e in exits if e.task_id is not None}
    failed_by_pid: collections.Counter[int] = collections.Counter()
    rebuilt = any(isinstance(e, CoreRebuilt) for e in events)
    fired = [f for f in inj.faults if f.fired]
    seen_running = {(f.pid, f.task_id) for f in fired if f.kind in MID_TASK_PROCESS_FAULTS}
    # Behind junk on a result pipe the answers of the tasks that ran after it are lost: the
    # worker's death may fail each of them, but only tasks that did start on that worker.
    corrupted = {f.pid for f in fired if f.kind in (FaultKind.JUNK_FRAME, FaultKind.TRUNCATED_FRAME)}
    idle_killed = {f.pid for f in fired if f.kind is FaultKind.KILL_IDLE}
    for p, fut in zip(plan, futures):
        key = p.key
        if not fut.done() or fut.cancelled():  # cancelled: still unresolved when shutdown came
            fig.lost += 1
            continue
        exc = fut.exception(timeout=0)
        s, e = starts.get(key, []), effects.get(key, [])
        faults = inj.faults_for(key)
        fatal = [f for f in faults if f.kind in _FATAL_TASK_FAULTS and f.fired]
        what = f"task {key} ({p.kind}, {'non-idempotent' if p.effect else f'retry={p.retry}'}; starts on {s}; effects on {e}; faults {[f.line() for f in faults]})"
        task_id = getattr(exc, "task_id", None)
        if exc is not None and task_id is not None and not isinstance(exc, PoisonTaskError) and task_id != key + 1:
            violations.append(f"{what}: its error names task id {task_id}, expected {key + 1}")
        if exc is not None and isinstance(getattr(exc, "pid", None), int):
            if exc.pid in corrupted and exc.pid in s:
                pass  # it ran there; its answer was lost with the channel (never run twice: below)
            else:
                failed_by_pid[exc.pid] += 1

        if p.effect:
            if len(s) > 1 or len(e) > 1:
                fig.duplicated += 1
                violations.append(f"{what}: a non-idempotent task ran more than once; {_describe(exc)}")
                continue
            if exc is None:
                if fut.result(timeout=0) != expected_value(key):
                    fig.lost += 1
                    violations.append(f"{what}: wrong result {fut.result(timeout=0)!r}")
                elif p.kind in SUCCEEDING and len(e) != 1:
                    fig.lost += 1
                    violations.append(f"{what}: succeeded but its side effect happened {len(e)} times")
                elif p.kind in FAILING:
                    violations.append(f"{what}: succeeded, but it always fails")
                continue
            fig.failed_expected += 1
            if p.kind in FAILING and _fails_as_designed(p.kind, exc):
                continue
            if fatal:
                continue  # it was given a fault itself
            ok, unmarked = _explained(exc, s, blamed, seen_running, idle_killed | corrupted, rebuilt)
            fig.unmarked += unmarked
            if not ok:
                fig.lost += 1
                violations.append(f"{what}: failed without having been hit: {_describe(exc)}")
            continue

        # Idempotent.
        if p.kind in SUCCEEDING:
            if exc is not None:
                fig.lost += 1
                violations.append(f"{what}: an idempotent task failed: {_describe(exc)}")
            elif fut.result(timeout=0) != expected_value(key):
                fig.lost += 1
                violations.append(f"{what}: wrong result {fut.result(timeout=0)!r}")
        else:
            if exc is None:
                violations.append(f"{what}: succeeded, but it always fails")
            elif not (_fails_as_designed(p.kind, exc) or isinstance(exc, _POOL_ERRORS)):
                violations.append(f"{what}: unexpected error {_describe(exc)}")
            else:
                fig.failed_expected += 1
    # A pid may come back (pid_max wraps in a long run): each death may cost one task.
    deaths_of = collections.Counter(e.pid for e in exits)
    for pid, n in failed_by_pid.items():
        if n > max(1, deaths_of[pid]):
            violations.append(
                f"worker {pid}: its death failed {n} tasks (at most the one it was running may fail;"
                f" that pid died {deaths_of[pid]} times)"
            )


def _fails_as_designed(kind: str, exc: BaseException) -> bool:
    if kind == "timeout":
        return isinstance(exc, TaskTimeoutError)
    if kind == "poison":
        return isinstance(exc, (WorkerCrashedError, PoisonTaskError))
    if kind == "raise":
        return isinstance(exc, ValueError)
    return False


def _explained(
    exc: BaseException,
    starts: list[int],
    blamed: set[tuple[int, int | None]],
    seen_running: set[tuple[int | None, int | None]],
    killed_unwatched: set[int | None],
    rebuilt: bool,
) -> tuple[bool, int]:
    """Was this failed non-idempotent task hit while running?  ``(explained, unlogged)``.

    The start line is the evidence: it is written as the task is unpickled, right after
    the worker's acknowledgement.  A kill can land between the two (a few syscalls; with
    tiny tasks often enough): then the evidence is the injector's own look at the
    worker's slot while it held it stopped (``kill_busy``/``stop``), or, for a kill the
    injector could not watch (a worker that looked idle, or one the pool killed for junk on
    its result pipe, which goes on claiming tasks until the kill lands), the pool's blame:
    the task it names is the last one that worker claimed, read from the slot after death.
    """
    if not isinstance(exc, ResilpoolError) or isinstance(exc, PoisonTaskError):
        return False, 0
    pid = getattr(exc, "pid", None)
    task_id = getattr(exc, "task_id", None)
    if isinstance(exc, WorkerCrashedError) and "rebuilt" in str(exc):  # interrupted by a core rebuild
        if not rebuilt:
            return False, 0
        if starts and (pid is None or pid in starts):
            return True, 0
        # Killed by the rebuild between its acknowledgement and its start line: the pool's
        # account (it emits WorkerExited for each worker it kills, with the task it ran).
        return (not starts and (pid is None or (pid, task_id) in blamed)), 1
    if pid in starts:
        return True, 0  # it started on the worker that died: its start line says so
    if starts:
        return False, 0  # it started elsewhere, and was failed by this worker's death
    if (pid, task_id) in seen_running:
        return True, 1
    if pid in killed_unwatched and (pid, task_id) in blamed:
        return True, 1
    if isinstance(exc, TaskStalledError) and (pid, task_id) in blamed:
        # Killed as stalled (no CPU: stopped, or starved) between its acknowledgement and
        # its start line: the pool's account names it, and a stall is the machine's doing.
        return True, 1
    return False, 0


def _check_process_faults(
    plan: list[Planned],
    futures: list[cf.Future[Any]],
    starts: dict[int, list[int]],
    exits: list[WorkerExited],
    inj: Any,
    violations: list[str],
) -> None:
    exits_of: dict[int, list[WorkerExited]] = collections.defaultdict(list)
    for e in exits:
        exits_of[e.pid].append(e)  # a pid may come back in a long run: one entry per lifetime
    for f in inj.faults:
        if not f.fired or f.kind not in (FaultKind.KILL_BUSY, FaultKind.KILL_IDLE, FaultKind.STOP):
            continue
        exs = exits_of.get(f.pid, [])
        if not exs:
            violations.append(f"{f.line()}: the pool never reported that worker's exit")
            continue
        if f.kind is not FaultKind.KILL_BUSY or f.task_id is None:
            continue
        # The worker was stopped while its slot said it ran task_id, then killed.
        key = f.task_id - 1
        crashes = [e for e in exs if e.reason is ExitReason.CRASH]
        if not crashes or any(e.task_id == f.task_id for e in exs):
            continue
        e = next((c for c in crashes if c.task_id is None), crashes[0])
        if e.task_id is None and not futures:
            continue  # a map: its chunks have no futures of their own; their results were checked
        if e.task_id is None and 0 <= key < len(futures) and futures[key].done() and not futures[key].cancelled():
            exc = futures[key].exception(timeout=0)
            if not (isinstance(exc, WorkerCrashedError) and exc.pid == f.pid):
                continue  # it had sent its answer already: the slot lags the answer by a moment
        violations.append(
            f"{f.line()}: the pool blamed task {e.task_id} for that worker's death ({e.detail});"
            f" task {f.task_id} started there: {starts.get(key, [])}"
        )
