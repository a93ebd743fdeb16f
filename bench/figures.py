"""The figures: what each one measures, and the code that measures it.

:data:`FIGURES` describes every figure for the driver (title, metrics, which
way is better, time limit); the ``run_*`` functions do the measuring and run
inside a child process that the driver starts for one library and one figure
(``python bench/child.py``), so a hang or crash costs one row.  A runner
records its rows through a :class:`Recorder`, which rewrites the child's
result file after every value, so whatever was measured before a timeout is
kept.

Repeats: throughput, latency and the pipe floor are *best of N* (fastest rate,
lowest median / p99) — the run least disturbed by the rest of the machine.
Leaky workload and monitor overhead are *median of N*; recovery is the median
over many kills of one pool.  N is 3 (1 with ``--quick``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import statistics
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
    notes: tuple[str, ...] = ()


#: Sizes of a full run and of a --quick smoke run.  Besides the counts:
#: recovery_deadline - how long a pool gets to be whole again after a kill;
#: probe_timeout - how long the task after a kill may take before the pool counts as hung;
#: stall_timeout - how long the leaky map may go without a result before it counts as hung.
PARAMS: dict[str, dict[str, Any]] = {
    "full": dict(
        repeats=3,
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
        submit_n=2_000,
        map_n=4_000,
        latency_n=300,
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
    """Tiny-task throughput: N submits of ``x + 1``, then wait for all."""
    measure_row(ctx, lambda ad, row: ctx.rec.set(row, rate=best_submit_rate(ctx, ad)))


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
    """``map`` over N items at chunksize 1 and at chunksize 1000."""
    n = ctx.params["map_n"]

    def body(ad: Adapter, row: dict[str, Any]) -> None:
        for chunksize, key in ((1, "cs1"), (1000, "cs1000")):
            map_rate(ad, max(n // 10, 2000), chunksize)  # warm-up
            ctx.rec.set(row, **{key: max(map_rate(ad, n, chunksize) for _ in range(ctx.repeats))})

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
    """Round-trip latency of one submit -> result, median and p99."""

    def body(ad: Adapter, row: dict[str, Any]) -> None:
        round_trips(ad, ctx.params["latency_warm"])
        runs = [round_trips(ad, ctx.params["latency_n"]) for _ in range(ctx.repeats)]
        ctx.rec.set(row, median=min(statistics.median(r) for r in runs), p99=min(pct(r, 99) for r in runs))

    measure_row(ctx, body)


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
            "Tiny-task throughput: submit N x `x + 1`, then wait all (tasks/s, best of N)",
            (Metric("rate", "tasks/s", "higher"),),
            timeout=240,
        ),
        Figure(
            "map",
            "Ordered map over N items (items/s, best of N)",
            (Metric("cs1", "chunksize=1 items/s", "higher"), Metric("cs1000", "chunksize=1000 items/s", "higher")),
            timeout=900,
        ),
        Figure(
            "latency",
            "Round trip of one submit -> result (microseconds, best of N runs of sequential trips)",
            (Metric("median", "median us", "lower", "{:,.1f}"), Metric("p99", "p99 us", "lower", "{:,.1f}")),
            timeout=120,
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

ORDER = ("submit", "map", "latency", "pipe", "recovery", "leaky", "monitor", "retry")
