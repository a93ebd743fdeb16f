"""The figures: what each one measures, and the code that measures it.

:data:`FIGURES` describes every figure for the driver (title, metrics, which
way is better, time limit); the ``run_*`` functions do the measuring and run
inside a child process that the driver starts for one library and one figure
(``python bench/child.py``), so a hang or crash costs one row.  A runner
records its rows through a :class:`Recorder`, which rewrites the child's
result file after every value, so whatever was measured before a timeout is
kept.

Repeats: the *interleaved* figures (submit, map, latency, head-of-line, first
start) measure one repetition per child process; the driver runs R
repetitions round-robin over the libraries (R = 5, 2 with ``--quick``) and
reports the median of the repetitions with their spread.  The pipe floor and
retry are *best of N*; leaky workload and monitor overhead are *median of N*;
recovery is the median over many kills of one pool.  N is 3 (1 with ``--quick``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import adapters
import tasks
from adapters import Adapter, Unsupported


@dataclass(frozen=True)
class Metric:
    """One column of a figure's table."""

    key: str
    label: str
    better: str  # "higher" or "lower"
    fmt: str = "{:,.0f}"
    ratio: bool = True  # print a "x best peer" column next to it
    floor: float = 0.0  # a best peer at or below this is ~nothing: no ratio is printed


@dataclass(frozen=True)
class Figure:
    """What the driver needs to run and print one figure."""

    name: str
    title: str
    metrics: tuple[Metric, ...]
    timeout: float  # seconds per library, full run
    quick_timeout: float = 30.0
    subject_only: bool = False  # resilpool only (retry)
    single: bool = False  # not per library (the pipe floor)
    peer_ratio: bool = True  # "x best peer" columns (off: no peers, or a single row)
    interleaved: bool = False  # one repetition per child; the driver interleaves libraries per repetition
    fork_variant: bool = False  # also run resilpool with mp_context="fork" (lib "resilpool-fork")
    spawn_variant: bool = False  # also run resilpool with mp_context="spawn" (lib "resilpool-spawn")
    notes: tuple[str, ...] = ()


#: Sizes of a full run and of a --quick smoke run.  Besides the counts:
#: recovery_deadline - how long a pool gets to be whole again after a kill;
#: probe_timeout - how long the task after a kill may take before the pool counts as hung;
#: stall_timeout - how long the leaky map may go without a result before it counts as hung.
PARAMS: dict[str, dict[str, Any]] = {
    "full": dict(
        repeats=3,
        reps=5,
        hol_burst=5_000,
        hol_sleep=0.5,
        submit_n=20_000,
        map_n=100_000,
        latency_n=2_000,
        latency_warm=200,
        pipe_n=10_000,
        kills=20,
        leak_tasks=200,
        leak_mib=20,
        monitor_s=5.0,
        monitor_workers=8,
        recovery_deadline=5.0,
        probe_timeout=5.0,
        stall_timeout=20.0,
    ),
    "quick": dict(
        repeats=1,
        reps=2,
        hol_burst=1_000,
        hol_sleep=0.2,
        submit_n=2_000,
        map_n=4_000,
        latency_n=500,
        latency_warm=50,
        pipe_n=2_000,
        kills=3,
        leak_tasks=40,
        leak_mib=20,
        monitor_s=0.3,
        monitor_workers=8,
        recovery_deadline=2.0,
        probe_timeout=2.0,
        stall_timeout=3.0,
    ),
}

WORKERS = 2
RETRY = 3
#: Length of one busy sleep-task in the monitor figure.
SLEEP_TASK = 0.25


class Stalled(Exception):
    """No result arrived for ``stall_timeout`` seconds: the pool is hung."""


class Recorder:
    """Rows of one child's result, rewritten to ``path`` (JSON) after every change."""

    def __init__(self, path: str, lib: str) -> None:
        self.path = path
        self.lib = lib
        self.rows: list[dict[str, Any]] = []

    def row(self, label: str, subject: bool) -> dict[str, Any]:
        """Start a row; its status stays ``running`` until :meth:`finish`."""
        row = {
            "label": label,
            "lib": self.lib,
            "subject": subject,
            "baseline": self.lib == "baseline",
            "status": "running",
            "reason": "",
            "metrics": {},
            "info": {},
        }
        self.rows.append(row)
        self.flush()
        return row

    def set(self, row: dict[str, Any], **metrics: Any) -> None:
        row["metrics"].update(metrics)
        self.flush()

    def info(self, row: dict[str, Any], **info: Any) -> None:
        row["info"].update({k: v for k, v in info.items() if v not in (None, "")})
        self.flush()

    def finish(self, row: dict[str, Any], status: str = "ok", reason: str = "") -> None:
        row["status"], row["reason"] = status, reason
        self.flush()

    def flush(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"rows": self.rows}, fh)
        os.replace(tmp, self.path)


@dataclass
class Ctx:
    """Everything a runner needs: the library, the sizes, where rows go."""

    make: Callable[[], Adapter]
    params: dict[str, Any]
    rec: Recorder

    @property
    def repeats(self) -> int:
        return int(self.params["repeats"])


# --------------------------------------------------------------------------- helpers


def warm_up(ad: Adapter, *, sleep: float = 0.0) -> list[int]:
    """Run a few tasks so every worker has started; wait for full strength.

    Returns the pids that answered.  resilpool is waited for until
    ``stats().workers`` counts them all ready; peers until their own worker
    list is full (where it can be read).
    """
    fn, arg = (tasks.sleep_for, sleep) if sleep else (tasks.whoami, None)
    handles = [ad.submit(fn, arg) for _ in range(4 * ad.workers)]
    pids = sorted({ad.result(h, 60) for h in handles})
    wait_until(lambda: _whole(ad), 30)
    return pids


def check_same_resilpool(ad: Adapter) -> None:
    """Fail unless the workers run the very resilpool this process imported.

    A forkserver keeps its own ``sys.path`` (CPython 3.11-3.13 ignore the one it is
    sent), so a forkserver started in a directory holding another resilpool
    would give the workers that one: a baseline row would then measure the
    checkout.  Peers are not checked.
    """
    if not isinstance(ad, adapters.Resilpool) or ad.standin:
        return
    ours = ad.module().__file__
    theirs = ad.result(ad.submit(tasks.module_file, "resilpool"), 60)
    if theirs != ours:
        raise RuntimeError(f"workers run resilpool from {theirs}, the bench process from {ours}")


def _whole(ad: Adapter) -> bool:
    try:
        if isinstance(ad, adapters.Resilpool):
            return ad.ready_workers() >= ad.workers
        return len(ad.worker_pids()) >= ad.workers
    except Unsupported:
        return True


def wait_until(cond: Callable[[], bool], timeout: float, step: float = 0.001) -> bool:
    """Poll ``cond`` every ``step`` seconds; True if it held before ``timeout``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return cond()


Body = Callable[[Adapter, dict[str, Any]], None]


def measure_row(ctx: Ctx, body: Body, *, workers: int = WORKERS, suffix: str = "", **options: Any) -> dict[str, Any]:
    """Open a pool and its row, run ``body(adapter, row)``, finish the row; return it.

    A missing resilpool feature (Unsupported) makes the row ``n/a``; any other
    exception makes it ``error``.  The pool is closed only when the row ended
    ``ok``: closing a broken or hung pool can itself hang
    (``multiprocessing.Pool.terminate`` waits for a queue lock a killed worker
    may hold); whatever is left is killed when the child exits.
    """
    ad = ctx.make()
    row = ctx.rec.row(ad.label + suffix, subject=ad.key == "resilpool")
    try:
        ctx.rec.info(row, version=ad.version())
        try:
            ad.open(workers, **options)
            pids = warm_up(ad)
            check_same_resilpool(ad)
        except Unsupported:
            raise
        except Exception as exc:
            raise RuntimeError(f"pool did not start: {type(exc).__name__}: {exc}") from exc
        ctx.rec.info(row, start_method=adapters.describe_start_method(pids[0]), variant=ad.variant_note)
        body(ad, row)
        if row["status"] == "running":
            ctx.rec.finish(row)
    except Unsupported as exc:
        ctx.rec.finish(row, "n/a", str(exc))
    except Exception as exc:
        ctx.rec.finish(row, "error", f"{type(exc).__name__}: {exc}")
    if row["status"] == "ok":
        close_within(ad, 15.0)
    return row


def close_within(ad: Adapter, seconds: float) -> None:
    """Close the pool, giving up after ``seconds`` (the child's exit kills what is left)."""

    def close() -> None:
        with contextlib.suppress(Exception):
            ad.close()

    t = threading.Thread(target=close, daemon=True, name="close")
    t.start()
    t.join(seconds)


def pct(samples: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``samples``, nearest-rank."""
    ordered = sorted(samples)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


# --------------------------------------------------------------------------- throughput


def submit_rate(ad: Adapter, n: int) -> float:
    """Submit ``n`` tiny tasks, then wait for all; tasks per second."""
    t0 = time.perf_counter()
    handles = [ad.submit(tasks.add_one, i) for i in range(n)]
    for i, h in enumerate(handles):
        if ad.result(h, 120) != i + 1:
            raise RuntimeError(f"task {i} returned a wrong result")
    return n / (time.perf_counter() - t0)


def best_submit_rate(ctx: Ctx, ad: Adapter) -> float:
    """Warm up with a tenth of N, then the best of the repeats of :func:`submit_rate`."""
    n = ctx.params["submit_n"]
    submit_rate(ad, max(n // 10, 100))
    return max(submit_rate(ad, n) for _ in range(ctx.repeats))


def run_submit(ctx: Ctx) -> None:
    """Tiny-task throughput: N submits of ``x + 1``, then wait for all (one interleaved repetition)."""

    def body(ad: Adapter, row: dict[str, Any]) -> None:
        n = ctx.params["submit_n"]
        submit_rate(ad, max(n // 10, 100))  # warm-up
        ctx.rec.set(row, rate=submit_rate(ad, n))

    measure_row(ctx, body)


def map_rate(ad: Adapter, n: int, chunksize: int) -> float:
    """Consume the library's ordered map over ``n`` items; items per second."""
    t0 = time.perf_counter()
    count = 0
    for count, value in enumerate(ad.map(tasks.add_one, range(n), chunksize), 1):
        if value != count:
            raise RuntimeError(f"map item {count - 1} out of order or wrong")
    if count != n:
        raise RuntimeError(f"map returned {count} of {n} items")
    return n / (time.perf_counter() - t0)


def run_map(ctx: Ctx) -> None:
    """``map`` over N items at chunksize 1 and at chunksize 1000 (one interleaved repetition)."""
    n = ctx.params["map_n"]

    def body(ad: Adapter, row: dict[str, Any]) -> None:
        for chunksize, key in ((1, "cs1"), (1000, "cs1000")):
            map_rate(ad, max(n // 10, 2000), chunksize)  # warm-up
            ctx.rec.set(row, **{key: map_rate(ad, n, chunksize)})

    measure_row(ctx, body)


def run_retry(ctx: Ctx) -> None:
    """resilpool's tiny-task throughput with ``retry=3`` on every submit vs. without."""
    plain = measure_row(
        ctx, lambda ad, row: ctx.rec.set(row, rate=best_submit_rate(ctx, ad), ratio=1.0), suffix=" submit()"
    )

    def with_retry(ad: Adapter, row: dict[str, Any]) -> None:
        if not isinstance(ad, adapters.Resilpool):
            raise Unsupported("retry= is resilpool's")
        ad.enable_retry(RETRY)
        rate = best_submit_rate(ctx, ad)
        ctx.rec.set(row, rate=rate)
        if "rate" in plain["metrics"]:
            ctx.rec.set(row, ratio=rate / plain["metrics"]["rate"])

    measure_row(ctx, with_retry, suffix=f" submit(retry={RETRY})")


# --------------------------------------------------------------------------- latency


def round_trips(ad: Adapter, n: int) -> list[float]:
    """``n`` sequential submit -> result round trips, in microseconds each."""
    out = []
    clock = time.perf_counter_ns
    for i in range(n):
        t0 = clock()
        ad.result(ad.submit(tasks.add_one, i), 30)
        out.append((clock() - t0) / 1000)
    return out


def run_latency(ctx: Ctx) -> None:
    """Round-trip latency of one submit -> result: median and p99 of one interleaved repetition."""

    def body(ad: Adapter, row: dict[str, Any]) -> None:
        round_trips(ad, ctx.params["latency_warm"])
        trips = round_trips(ad, ctx.params["latency_n"])
        ctx.rec.set(row, median=statistics.median(trips), p99=pct(trips, 99))

    measure_row(ctx, body)


# --------------------------------------------------------------------------- head-of-line blocking


def blocking_ratio(ad: Adapter, seconds: float) -> tuple[float, int]:
    """Submit one ``sleep(seconds)`` task per worker at once; wall time / one task, and workers used.

    With every worker idle the tasks run side by side and the ratio is about
    1.0; a ratio near 2.0 means two of them ran one after the other on one
    worker while another sat idle (head-of-line blocking).
    """
    t0 = time.perf_counter()
    handles = [ad.submit(tasks.sleep_for, seconds) for _ in range(ad.workers)]
    pids = {ad.result(h, 60 + 10 * seconds) for h in handles}
    return (time.perf_counter() - t0) / seconds, len(pids)


def run_hol(ctx: Ctx) -> None:
    """N blocking tasks on N idle workers: right after a burst of tiny tasks, and on a fresh pool."""
    p = ctx.params

    def body(ad: Adapter, row: dict[str, Any]) -> None:
        n = p["hol_burst"]
        handles = [ad.submit(tasks.add_one, i) for i in range(n)]
        for i, h in enumerate(handles):
            if ad.result(h, 120) != i + 1:
                raise RuntimeError(f"burst task {i} returned a wrong result")
        ratio, used = blocking_ratio(ad, p["hol_sleep"])
        ctx.rec.set(row, burst=ratio, burst_workers=used)
        close_within(ad, 15.0)  # no other pool's threads and workers around the fresh one
        # A fresh pool right after its first task (and once every worker is ready, so that
        # worker start-up is not what is timed).
        fresh = ctx.make()
        fresh.open(WORKERS)
        fresh.result(fresh.submit(tasks.whoami), 60)
        wait_until(lambda: _whole(fresh), 30)
        ratio, used = blocking_ratio(fresh, p["hol_sleep"])
        ctx.rec.set(row, fresh=ratio, fresh_workers=used)
        close_within(fresh, 15.0)

    measure_row(ctx, body)


# --------------------------------------------------------------------------- first pool start


class StartProbe:
    """Times every ``Process.start()`` in this process, by wrapping the stdlib's (bench child only).

    Each start is recorded as ``(called, returned)`` on the monotonic clock.
    For a forkserver pool the first start includes starting the forkserver
    itself (a fresh interpreter importing what it preloads): ``start()`` waits
    until the server has forked the child.  Libraries whose process class
    does not derive from ``multiprocessing.process.BaseProcess`` leave no record.
    """

    def __init__(self) -> None:
        import multiprocessing.process
        from multiprocessing import forkserver

        self.starts: list[tuple[float, float]] = []
        #: when this process launched its forkserver (None: it did not)
        self.forkserver_launched: float | None = None
        base = multiprocessing.process.BaseProcess
        original = base.start

        def start(proc: Any) -> None:
            t0 = time.monotonic()
            original(proc)
            self.starts.append((t0, time.monotonic()))

        base.start = start  # type: ignore[method-assign]

        # The forkserver is launched by ensure_running(), which Process.start() calls, and
        # which a library may call earlier itself: both the module's alias and the method
        # that connect_to_new_process() looks up on the instance are wrapped.
        server = forkserver._forkserver
        launch = server.ensure_running

        def ensure_running() -> None:
            t0 = time.monotonic()
            before = server._forkserver_pid
            launch()
            if self.forkserver_launched is None and server._forkserver_pid not in (None, before):
                self.forkserver_launched = t0

        server.ensure_running = ensure_running  # type: ignore[method-assign]
        forkserver.ensure_running = ensure_running


def read_marks(path: str) -> list[tuple[float, float]]:
    """``(monotonic time, worker CPU seconds)`` at which workers ran the initializer, by time.

    See :func:`tasks.mark_ready`.
    """
    try:
        with open(path) as fh:
            return sorted((float(f[1]), float(f[2])) for f in (line.split() for line in fh) if len(f) == 3)
    except FileNotFoundError:
        return []


def forkserver_cpu_ms(pid: int) -> float | None:
    """CPU time (ms, 10 ms ticks) the forkserver above worker ``pid`` has used, if its parent is one."""
    import psutil

    try:
        parent = psutil.Process(pid).parent()
        if parent is None or "forkserver" not in " ".join(parent.cmdline()):
            return None
        t = parent.cpu_times()
        return (t.user + t.system) * 1000
    except psutil.Error:
        return None


def run_firststart(ctx: Ctx) -> None:
    """A fresh process's first pool: time to each phase, then to a later pool's first result.

    Phases, in ms from just before the constructor (each child is a fresh
    process: nothing of a pool has run in it yet; the library is imported):
    the constructor returns; the first and the last worker's ``Process.start()``
    return; the first and the last worker runs its initializer (it is up and
    about to say it is ready); the first trivial task's result is in hand.
    """
    import tempfile

    probe = StartProbe()
    ad = ctx.make()
    row = ctx.rec.row(ad.label, subject=ad.key == "resilpool")
    marks = os.path.join(tempfile.mkdtemp(prefix="bench-ready-"), "ready")
    try:
        ctx.rec.info(row, version=ad.version())
        if isinstance(ad, adapters.Resilpool):
            # Imported before the clock starts (Unsupported if it fails); its own column.
            fresh = "resilpool" not in sys.modules
            t_import = time.monotonic()
            ad.module()
            if fresh and not ad.standin:
                ctx.rec.set(row, import_ms=(time.monotonic() - t_import) * 1000)
        t0 = time.monotonic()
        ad.open(WORKERS, initializer=(tasks.mark_ready, (marks,)))
        t_ctor = time.monotonic()
        pid = ad.result(ad.submit(tasks.whoami), 60)
        t_result = time.monotonic()
        ctx.rec.info(row, start_method=adapters.describe_start_method(pid))
        check_same_resilpool(ad)
        if ad.has_initializer:
            wait_until(lambda: len(read_marks(marks)) >= WORKERS, 30)
        ready = read_marks(marks)
        starts = [end for _, end in probe.starts]
        ms = {"ctor_ms": t_ctor, "first_result_ms": t_result}
        if starts:
            ms.update(
                first_call_ms=probe.starts[0][0],
                first_fork_ms=starts[0],
                all_forked_ms=starts[min(WORKERS, len(starts)) - 1],
            )
        if ready:
            ms.update(first_ready_ms=ready[0][0], all_ready_ms=ready[min(WORKERS, len(ready)) - 1][0])
        if probe.forkserver_launched is not None:
            ms.update(forkserver_launched_ms=probe.forkserver_launched)
        ctx.rec.set(row, **{k: (v - t0) * 1000 for k, v in ms.items()})
        if ready:
            ctx.rec.set(row, worker_cpu_ms=statistics.median(cpu for _, cpu in ready) * 1000)
        server_cpu = forkserver_cpu_ms(pid)
        if server_cpu is not None:
            ctx.rec.set(row, forkserver_cpu_ms=server_cpu)
        close_within(ad, 15.0)
        # A later pool in the same process: the forkserver (if any) and the imports are warm.
        later = ctx.make()
        t0 = time.monotonic()
        later.open(WORKERS)
        later.result(later.submit(tasks.whoami), 60)
        ctx.rec.set(row, later_ms=(time.monotonic() - t0) * 1000)
        close_within(later, 15.0)
        ctx.rec.finish(row)
    except Unsupported as exc:
        ctx.rec.finish(row, "n/a", str(exc))
    except Exception as exc:
        ctx.rec.finish(row, "error", f"{type(exc).__name__}: {exc}")


def run_pipe(ctx: Ctx) -> None:
    """The floor: a raw ``multiprocessing.Pipe`` round trip to an echoing process."""
    import multiprocessing

    row = ctx.rec.row("multiprocessing.Pipe (floor)", subject=False)
    mp = multiprocessing.get_context()
    ours, theirs = mp.Pipe()
    proc = mp.Process(target=tasks.echo_loop, args=(theirs,), daemon=True)
    proc.start()
    ctx.rec.info(row, start_method=mp.get_start_method())

    def trips(n: int) -> list[float]:
        clock, out = time.perf_counter_ns, []
        for i in range(n):
            t0 = clock()
            ours.send(i)
            ours.recv()
            out.append((clock() - t0) / 1000)
        return out

    try:
        trips(1000)
        runs = [trips(ctx.params["pipe_n"]) for _ in range(ctx.repeats)]
        ctx.rec.set(row, median=min(statistics.median(r) for r in runs), p99=min(pct(r, 99) for r in runs))
        ctx.rec.finish(row)
    finally:
        ours.send(None)
        proc.join(5)


# --------------------------------------------------------------------------- recovery


@dataclass
class KillOutcome:
    """What one SIGKILL of an idle worker led to."""

    seconds: float | None  # time to full strength; None if it never got there
    broken: str | None = None  # the library said the pool is broken
    probe: str = "ok"  # "ok", "hangs" or the error a task raised after the kill


def kill_one(ad: Adapter, rng: random.Random, deadline: float, probe_timeout: float) -> KillOutcome:
    """SIGKILL one idle worker; time until the pool is whole again; then probe it with a task."""
    wait_until(lambda: _whole(ad), 30)
    time.sleep(0.1)  # idle: nothing in flight
    before = set(ad.worker_pids())
    victim = rng.choice(sorted(before))
    t0 = time.perf_counter()
    os.kill(victim, signal.SIGKILL)
    seconds: float | None = None
    broken: str | None = None
    end = t0 + deadline
    while time.perf_counter() < end:
        if ad.full_strength(before, victim):
            seconds = time.perf_counter() - t0
            break
        broken = ad.broken()
        if broken:
            return KillOutcome(None, broken, "not tried")
        time.sleep(0.001)
    return KillOutcome(seconds, None, probe_pool(ad, probe_timeout))


def probe_pool(ad: Adapter, timeout: float) -> str:
    """Submit one task after a kill: does the pool still work?"""
    import concurrent.futures
    import multiprocessing

    try:
        ad.result(ad.submit(tasks.whoami), timeout)
        return "ok"
    except (TimeoutError, concurrent.futures.TimeoutError, multiprocessing.TimeoutError):
        return "hangs"
    except Exception as exc:
        return adapters.first_sentence(exc)


def run_recovery(ctx: Ctx) -> None:
    """Time from SIGKILL of an idle worker to the pool being back at full strength."""

    def body(ad: Adapter, row: dict[str, Any]) -> None:
        ad.worker_pids()  # Unsupported if the library cannot list its workers
        rng = random.Random(1)
        p = ctx.params
        times: list[float] = []
        for k in range(1, p["kills"] + 1):
            out = kill_one(ad, rng, p["recovery_deadline"], p["probe_timeout"])
            if out.seconds is not None and out.probe == "ok":
                times.append(out.seconds)
                ctx.rec.set(row, median_ms=statistics.median(times) * 1000, max_ms=max(times) * 1000, kills=len(times))
                continue
            ctx.rec.finish(row, *verdict(out, k, p, times))
            return

    measure_row(ctx, body)


def verdict(out: KillOutcome, k: int, p: dict[str, Any], times: list[float]) -> tuple[str, str]:
    """Status and words for the kill that did not end in a whole, working pool."""
    before = (
        f" ({len(times)} earlier kills recovered, median {statistics.median(times) * 1000:.1f} ms)" if times else ""
    )
    where = f"at kill {k}/{p['kills']}{before}"
    if out.broken or (out.seconds is None and out.probe not in ("ok", "hangs")):
        why = out.broken or out.probe
        return "breaks", f"pool broken {where}: {why[:120]}"
    if out.probe == "hangs":
        respawn = f"worker replaced after {out.seconds * 1000:.1f} ms but " if out.seconds is not None else ""
        return "hangs", f"{respawn}no task completes within {p['probe_timeout']:.0f} s {where}"
    if out.seconds is None:
        return (
            "degraded",
            f"no replacement within {p['recovery_deadline']:.0f} s {where}; still runs tasks on fewer workers",
        )
    return "breaks", f"a task failed after the kill {where}: {out.probe[:120]}"


# --------------------------------------------------------------------------- leaky workload


class RssSampler:
    """Background thread: largest RSS any single descendant process reached.

    Every 10 ms it reads the RSS of every process below this one (workers,
    their forkserver, helper processes) with psutil; the maximum over
    processes and over time is the peak single-worker RSS.
    """

    def __init__(self, interval: float = 0.01) -> None:
        import psutil

        self._me = psutil.Process()
        self._psutil = psutil
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        for proc in self._me.children(recursive=True):
            with contextlib.suppress(self._psutil.Error):  # it may exit between listing and reading
                self.peak = max(self.peak, proc.memory_info().rss)


def consume(iterator: Iterator[Any], n: int, stall: float) -> list[Any]:
    """Collect ``n`` results from ``iterator``; Stalled if none arrives for ``stall`` seconds.

    The iterator is drained by a daemon thread so that a hung library cannot
    block this one; on a stall the thread is left behind (the child exits soon).
    """
    out: list[Any] = []
    failure: list[BaseException] = []
    done = threading.Event()

    def drain() -> None:
        try:
            out.extend(x for x, _ in zip(iterator, range(n), strict=False))
        except BaseException as exc:  # handed over to the caller
            failure.append(exc)
        done.set()

    threading.Thread(target=drain, daemon=True, name="drain").start()
    seen, last = 0, time.monotonic()
    while not done.wait(0.05):
        if len(out) != seen:
            seen, last = len(out), time.monotonic()
        elif time.monotonic() - last > stall:
            raise Stalled(f"no result for {stall:.0f} s after {seen} of {n} tasks")
    if failure:
        raise failure[0]
    return out


def leak_once(ctx: Ctx, recycle: str, row: dict[str, Any]) -> dict[str, Any]:
    """One fresh pool, N leaking tasks through its map: peak RSS, wall time, workers used."""
    ad = ctx.make()
    ad.open(WORKERS, recycle=recycle)
    warm_up(ad)
    ctx.rec.info(row, start_method=adapters.describe_start_method(current_worker(ad)), variant=ad.variant_note)
    n, mib = ctx.params["leak_tasks"], ctx.params["leak_mib"]
    with RssSampler() as sampler:
        t0 = time.perf_counter()
        results = consume(ad.map(tasks.leak, [mib] * n, 1), n, ctx.params["stall_timeout"])
        wall = time.perf_counter() - t0
        sampler.sample()
    if len(results) != n:
        raise RuntimeError(f"{len(results)} of {n} leaking tasks returned")
    close_within(ad, 30.0)  # only a healthy pool: a stalled one is left to the child's exit
    return {
        "peak_mib": sampler.peak / 2**20,
        "self_peak_mib": max(r[1] for r in results) / 2**20,
        "wall_s": wall,
        "workers_used": len({r[0] for r in results}),
    }


def current_worker(ad: Adapter) -> int:
    """A live worker's pid right now (recycling pools replace the warm-up's quickly)."""
    try:
        pids = ad.worker_pids()
    except Unsupported:
        pids = []
    return pids[0] if pids else ad.result(ad.submit(tasks.whoami), 60)


def run_leaky(ctx: Ctx) -> None:
    """Tasks that each leak 20 MiB: peak worker RSS and wall time under each library's recycling."""
    probe = ctx.make()
    variants = ["rss", "tasks"] if probe.key == "resilpool" else ["tasks"]
    for recycle in variants:
        suffix = {"rss": f" (soft_max_rss={adapters.SOFT_MAX_RSS})", "tasks": f" (max_tasks={adapters.RECYCLE_TASKS})"}
        row = ctx.rec.row(probe.label + (suffix[recycle] if probe.key == "resilpool" else ""), probe.key == "resilpool")
        try:
            ctx.rec.info(row, version=probe.version())
            runs = [leak_once(ctx, recycle, row) for _ in range(ctx.repeats)]
        except Unsupported as exc:
            ctx.rec.finish(row, "n/a", str(exc))
            continue
        except Stalled as exc:
            ctx.rec.finish(row, "hangs", str(exc))
            continue
        except Exception as exc:
            ctx.rec.finish(row, "error", f"{type(exc).__name__}: {exc}")
            continue
        med = {
            k: statistics.median(r[k] for r in runs) for k in ("peak_mib", "self_peak_mib", "wall_s", "workers_used")
        }
        ctx.rec.set(row, **med)
        ctx.rec.finish(row)


# --------------------------------------------------------------------------- monitor overhead


def cpu_seconds() -> float:
    """CPU time (user + system, all threads) of this process alone, not its children.

    The same quantity as ``psutil.Process().cpu_times()`` user + system, read
    from ``CLOCK_PROCESS_CPUTIME_ID``: nanoseconds instead of 10 ms ticks, which
    matters for an idle pool that uses a fraction of a percent.
    """
    return time.process_time()


def idle_share(seconds: float) -> float:
    """Share of one core this process used while the pool sat idle for ``seconds``, in %."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    time.sleep(seconds)
    return 100 * (cpu_seconds() - c0) / (time.perf_counter() - t0)


def busy_share(ad: Adapter, seconds: float) -> float:
    """Share of one core this process used while every worker slept in tasks for ~``seconds``, in %."""
    n = max(ad.workers, round(ad.workers * seconds / SLEEP_TASK))
    c0, t0 = cpu_seconds(), time.perf_counter()
    for h in [ad.submit(tasks.sleep_for, SLEEP_TASK) for _ in range(n)]:
        ad.result(h, 120)
    return 100 * (cpu_seconds() - c0) / (time.perf_counter() - t0)


def run_monitor(ctx: Ctx) -> None:
    """Parent-process CPU while an 8-worker pool idles and while it runs sleep tasks."""
    secs = ctx.params["monitor_s"]

    def body(ad: Adapter, row: dict[str, Any]) -> None:
        warm_up(ad, sleep=0.02)
        time.sleep(min(0.3, secs / 3))  # let start-up work settle
        ctx.rec.set(row, idle_pct=statistics.median(idle_share(secs) for _ in range(ctx.repeats)))
        ctx.rec.set(row, busy_pct=statistics.median(busy_share(ad, secs) for _ in range(ctx.repeats)))

    workers = ctx.params["monitor_workers"]
    measure_row(ctx, body, workers=workers)
    if ctx.make().key == "resilpool":
        measure_row(ctx, body, workers=workers, suffix=" (monitor_interval=None)", monitor=False)


# --------------------------------------------------------------------------- registry

RUNNERS: dict[str, Callable[[Ctx], None]] = {
    "submit": run_submit,
    "map": run_map,
    "latency": run_latency,
    "hol": run_hol,
    "firststart": run_firststart,
    "recovery": run_recovery,
    "pipe": run_pipe,
    "leaky": run_leaky,
    "monitor": run_monitor,
    "retry": run_retry,
}

_RATE = "{:,.0f}"
FIGURES: dict[str, Figure] = {
    f.name: f
    for f in (
        Figure(
            "submit",
            "Tiny-task throughput: submit N x `x + 1`, then wait all (tasks/s)",
            (Metric("rate", "tasks/s", "higher"),),
            timeout=120,
            interleaved=True,
        ),
        Figure(
            "map",
            "Ordered map over N items (items/s)",
            (Metric("cs1", "chunksize=1 items/s", "higher"), Metric("cs1000", "chunksize=1000 items/s", "higher")),
            timeout=300,
            interleaved=True,
        ),
        Figure(
            "latency",
            "Round trip of one submit -> result (microseconds; per repetition the median and p99 of its "
            "sequential trips)",
            (Metric("median", "median us", "lower", "{:,.1f}"), Metric("p99", "p99 us", "lower", "{:,.1f}")),
            timeout=60,
            interleaved=True,
            notes=(
                "Each repetition is one child process: a warm pool, untimed warm-up trips, then 2,000 timed "
                "sequential round trips (500 with --quick); the row's median and p99 are the median over the "
                "repetitions of each repetition's median and p99, [min-max] over the repetitions.",
            ),
        ),
        Figure(
            "hol",
            "Head-of-line: one blocking task per worker on idle workers (wall / one task; 1.00 is ideal)",
            (
                Metric("burst", "after a tiny burst", "lower", "{:.2f}"),
                Metric("burst_workers", "workers used", "higher", "{:.0f}", ratio=False),
                Metric("fresh", "fresh pool, after its first task", "lower", "{:.2f}"),
                Metric("fresh_workers", "workers used", "higher", "{:.0f}", ratio=False),
            ),
            timeout=120,
            interleaved=True,
            notes=(
                "After 5,000 tiny tasks (1,000 with --quick; all results in), one `time.sleep(0.5)` task per "
                "worker (0.2 s with --quick) is submitted at once; the figure is the wall time until all are "
                "back, divided by one task's sleep. 1.00: they ran side by side; 2.00: two ran one after the "
                "other on one worker while another was idle. 'fresh pool': a new pool runs one tiny task and "
                "waits until every worker is ready, then the same. 'workers used': distinct pids that ran them.",
            ),
        ),
        Figure(
            "firststart",
            "First pool start in a fresh process (ms from just before the constructor)",
            (
                Metric("first_result_ms", "first result", "lower", "{:,.1f}"),
                Metric("import_ms", "import (before the clock)", "lower", "{:,.1f}", ratio=False),
                Metric("ctor_ms", "constructor", "lower", "{:,.1f}", ratio=False),
                Metric("forkserver_launched_ms", "forkserver launched", "lower", "{:,.1f}", ratio=False),
                Metric("first_call_ms", "1st Process.start called", "lower", "{:,.1f}", ratio=False),
                Metric("first_fork_ms", "1st Process.start", "lower", "{:,.1f}", ratio=False),
                Metric("all_forked_ms", "last Process.start", "lower", "{:,.1f}", ratio=False),
                Metric("first_ready_ms", "1st worker up", "lower", "{:,.1f}", ratio=False),
                Metric("all_ready_ms", "last worker up", "lower", "{:,.1f}", ratio=False),
                Metric("later_ms", "later pool: first result", "lower", "{:,.1f}"),
                Metric("worker_cpu_ms", "worker CPU to up", "lower", "{:,.1f}", ratio=False),
                Metric("forkserver_cpu_ms", "forkserver CPU", "lower", "{:,.0f}", ratio=False),
            ),
            timeout=90,
            interleaved=True,
            fork_variant=True,
            spawn_variant=True,
            notes=(
                "Each repetition is a fresh child process with the library imported and nothing else of a "
                "pool run yet. Clock starts just before the constructor. 'import': resilpool's rows only, "
                "`import resilpool; resilpool.ResilientPool` in that fresh process, before the clock starts. "
                "'forkserver launched': when the process launched its forkserver (the server's boot runs "
                "from then until the first `Process.start()` returns). '1st Process.start called': when the "
                "first worker's start began; 'Process.start' columns: when the first and last worker's "
                "`Process.start()` returned (for forkserver the first includes waiting for "
                "the forkserver to finish booting and importing its preloads; '-': the library's processes are not stdlib "
                "`BaseProcess`es). 'worker up': when the worker ran the pool's initializer (a stub that "
                "writes the time; mpire has no pool initializer: '-'). 'first result': one trivial task "
                "submitted right after the constructor, result in hand. 'later pool': a second pool in the "
                "same process after the first was shut down, constructor to first result.",
                "CPU columns do not grow with the machine's load the way wall times do: 'worker CPU to up' is "
                "the CPU time a worker used from its fork (or exec) to the initializer (median over workers); "
                "'forkserver CPU' is the forkserver's own CPU time once the first pool is up (its interpreter "
                "start and preloads; 10 ms ticks).",
                "`resilpool [fork]` and `resilpool [spawn]` are resilpool with `mp_context=\"fork\"` and "
                "`\"spawn\"`.",
            ),
        ),
        Figure(
            "pipe",
            "Floor: raw multiprocessing.Pipe round trip between two processes (microseconds)",
            (Metric("median", "median us", "lower", "{:,.1f}"), Metric("p99", "p99 us", "lower", "{:,.1f}")),
            timeout=60,
            single=True,
            peer_ratio=False,
        ),
        Figure(
            "recovery",
            "Recovery: SIGKILL an idle worker -> pool at full strength (ms, median over kills)",
            (
                Metric("median_ms", "median ms", "lower", "{:,.1f}"),
                Metric("max_ms", "max ms", "lower", "{:,.1f}"),
                Metric("kills", "kills survived", "higher", ratio=False),
            ),
            timeout=300,
            quick_timeout=40,
            notes=(
                "Full strength: resilpool - `stats().workers == max_workers` and the set of `workers()` pids changed "
                "(the killed pid gone). Peers - the library's own worker list (private attribute) holds max_workers "
                "live processes and not the killed pid; a replacement counts from the moment it is started, "
                "which for fork-based pools is close to ready.",
                "After every kill one task must complete within 5 s (2 s with --quick); otherwise the row says "
                "`hangs`: an idle multiprocessing.Pool/billiard worker blocks in the task queue's read while "
                "holding its lock, so killing that one leaves the queue locked for good; kill the other and "
                "the pool recovers. Which one is killed is random (seeded), so these rows hang at some kill.",
                "A peer's values measured before it broke or hung count for 'x best peer'.",
                "`breaks`: the library declared the pool broken (concurrent.futures BrokenProcessPool, loky "
                "TerminatedWorkerError - loky's get_reusable_executor() would build a new executor on its next call, "
                "losing pending work; pebble 'All workers expired' when no task was running; mpire shuts the pool "
                "down). Such a pool has no recovery time.",
            ),
        ),
        Figure(
            "leaky",
            "Leaky workload: each task leaks 20 MiB (peak single-worker RSS and wall time, median of N)",
            (
                Metric("peak_mib", "peak worker RSS MiB", "lower"),
                Metric("wall_s", "wall s", "lower", "{:,.2f}"),
                Metric("workers_used", "worker pids used", "lower", ratio=False),
                Metric("self_peak_mib", "self-reported peak MiB", "lower", ratio=False),
            ),
            timeout=300,
            quick_timeout=40,
            notes=(
                "Each library runs with its best offer against leaks: resilpool `Limits(soft_max_rss=200MiB)` "
                "(and `Limits(max_tasks=10)` for like-for-like), concurrent.futures `max_tasks_per_child=10` "
                "(forces spawn on 3.11), multiprocessing/billiard `maxtasksperchild=10`, pebble `max_tasks=10`, "
                "mpire `worker_lifespan=10`, loky its automatic leak detection (psutil, 300 MB growth, checked "
                "at most once a second).",
                "concurrent.futures with max_tasks_per_child deadlocks on 3.11 once a worker retires with work "
                "still queued (CPython gh-115634, fixed in later releases); the row then says `hangs`.",
                "Peak RSS is sampled from the bench process with psutil every 10 ms over all descendant processes; "
                "the self-reported peak is the workers' own ru_maxrss, a check on the sampler. Wall time covers "
                "the map over all tasks, recycling included, pool start-up excluded.",
            ),
        ),
        Figure(
            "monitor",
            "Monitor overhead: parent-process CPU of an 8-worker pool (% of one core, median of N)",
            (
                Metric("idle_pct", "idle %", "lower", "{:,.2f}", floor=0.05),
                Metric("busy_pct", "busy (sleep tasks) %", "lower", "{:,.2f}", floor=0.05),
            ),
            timeout=180,
            quick_timeout=30,
            notes=(
                "CPU time (user+system, CLOCK_PROCESS_CPUTIME_ID) of the bench process itself - where the pool's "
                "threads run - over a 5 s idle window and over ~5 s of 0.25 s sleep tasks keeping all 8 workers "
                "busy; children's CPU is not counted. Each library runs in its own process, so the figure holds "
                "only that pool.",
                "`resilpool (monitor_interval=None)` is resilpool with its monitor switched off, where that option "
                "exists.",
                "No ratio where the best peer is at 0.05 % or below: a ratio to almost nothing says nothing.",
            ),
        ),
        Figure(
            "retry",
            f"Retry overhead: resilpool tiny-task throughput with retry={RETRY} on every submit (tasks/s, best of N)",
            (Metric("rate", "tasks/s", "higher"), Metric("ratio", "vs. no retry", "higher", "{:.2f}x", ratio=False)),
            timeout=240,
            subject_only=True,
            peer_ratio=False,
        ),
    )
}

ORDER = ("submit", "map", "latency", "hol", "firststart", "pipe", "recovery", "leaky", "monitor", "retry")
