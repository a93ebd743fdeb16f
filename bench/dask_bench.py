"""resilpool on Dask vs plain ``client.submit``, on the same LocalCluster, in one run.

Usage::

    /work/venv/bin/python bench/dask_bench.py                 # 10,000 tiny + 200 x 50 ms, 3 repeats
    /work/venv/bin/python bench/dask_bench.py --quick         # 2,000 tiny + 100 x 50 ms, 1 repeat
    /work/venv/bin/python bench/dask_bench.py --only 10ms     # one workload kind
    /work/venv/bin/python bench/dask_bench.py --json out.json

One ``LocalCluster`` (2 worker processes of 1 thread, nannies, loopback, no
dashboard) serves every measurement, so both sides pay the same scheduler and
the same workers.  Each repeat runs the plain side and the resilpool side back to
back, alternating which goes first; the table shows the median over repeats, and
each resilpool path against plain Dask in the same repeat (the median ratio and its
range over repeats), for wall time and for CPU time (user + system of this process,
which runs the scheduler and both clients, and of the nannies and workers).

Measured:

- **tiny**: N calls of ``add_one`` (does nothing): the per-task cost of each path.
  Plain: ``client.submit`` per call, then one ``client.gather``.  resilpool:
  ``pool.submit`` per call then ``result()`` each, and ``pool.map``.
- **10 ms**: K calls of ``sleep_for(0.01)``.  Plain: one ``client.map`` + ``gather``;
  resilpool: ``pool.map``.  The target is resilpool within 15% of plain.
- **50 ms**: M calls of ``sleep_for(0.05)``.  Plain: ``client.submit`` + ``gather``;
  resilpool: ``pool.map``.  The floor is ``M * 0.05 / 2`` seconds on 2 workers;
  the target is resilpool within 10% of plain.

What resilpool adds per task, on top of Dask: the start record (a line in the
worker's start log and a message to the scheduler, not waited for), pickling the call
once in the caller and the result once in the worker, and a bounded number of tasks
in flight (the rest wait in the pool's own queue, so they can still be cancelled).
Task functions come from ``bench/tasks.py``, importable by the workers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tasks  # noqa: E402  (bench/tasks.py: add_one, sleep_for)


def _cpu_s() -> tuple[float, float]:
    """CPU seconds (user + system) of this process, and of its descendants alive now."""
    import psutil

    me = psutil.Process()
    t = me.cpu_times()
    children = 0.0
    for p in me.children(recursive=True):
        try:
            c = p.cpu_times()
        except psutil.Error:
            continue  # exited meanwhile
        children += c.user + c.system
    return t.user + t.system, children


def _timed(fn: Callable[[], Any]) -> tuple[float, float, float]:
    """(wall, CPU, CPU of the nannies and workers) seconds of one run."""
    (m0, w0), t0 = _cpu_s(), time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    m1, w1 = _cpu_s()
    return wall, (m1 - m0) + (w1 - w0), w1 - w0


def plain_tiny(client: Any, n: int) -> None:
    futs = [client.submit(tasks.add_one, i, pure=False) for i in range(n)]
    out = client.gather(futs)
    assert out[-1] == n
    del futs


def plain_sleep(client: Any, m: int) -> None:
    futs = [client.submit(tasks.sleep_for, 0.05, pure=False) for _ in range(m)]
    client.gather(futs)
    del futs


def pool_tiny_submit(pool: Any, n: int) -> None:
    futs = [pool.submit(tasks.add_one, i) for i in range(n)]
    out = [f.result(timeout=600) for f in futs]
    assert out[-1] == n


def pool_tiny_map(pool: Any, n: int) -> None:
    out = list(pool.map(tasks.add_one, range(n), timeout=600))
    assert out[-1] == n


def pool_sleep(pool: Any, m: int) -> None:
    list(pool.map(tasks.sleep_for, [0.05] * m, timeout=600))


def plain_10ms(client: Any, k: int) -> None:
    futs = client.map(tasks.sleep_for, [0.01] * k, pure=False)
    client.gather(futs)
    del futs


def pool_10ms(pool: Any, k: int) -> None:
    list(pool.map(tasks.sleep_for, [0.01] * k, timeout=600))


def _vs(xs: list[float], base: list[float]) -> str:
    """Paired ratios (same repeat) as "+m% (lo..hi)"."""
    ratios = sorted(100 * (x / b - 1) for x, b in zip(xs, base))
    return f"{statistics.median(ratios):+.1f}% ({ratios[0]:+.0f}..{ratios[-1]:+.0f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    ap.add_argument("--tiny", type=int, default=None, help="tiny tasks (default 10000; 2000 with --quick)")
    ap.add_argument("--sleeps", type=int, default=None, help="50 ms tasks (default 200; 100 with --quick)")
    ap.add_argument("--tens", type=int, default=None, help="10 ms tasks (default 2000; 500 with --quick)")
    ap.add_argument("--only", default=None, help="run only the workloads of this kind: tiny, 10ms or 50ms")
    ap.add_argument("--repeats", type=int, default=None, help="repeats (default 3; 1 with --quick)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    n = args.tiny or (2000 if args.quick else 10_000)
    m = args.sleeps or (100 if args.quick else 200)
    k = args.tens or (500 if args.quick else 2000)
    repeats = args.repeats or (1 if args.quick else 3)

    logging.getLogger("distributed").setLevel(logging.ERROR)
    from distributed import Client, LocalCluster

    from resilpool import ResilientPool
    from resilpool.dask import DaskBackend

    load0 = os.getloadavg()
    rows: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    print(f"# resilpool on Dask vs plain Dask: {n} tiny tasks, {k} x 10 ms, {m} x 50 ms, {repeats} repeat(s), 2 workers", file=sys.stderr)
    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
    ) as cluster:
        with Client(cluster, set_as_default=False) as client, ResilientPool(2, backend=DaskBackend(cluster)) as pool:
            # Warm up both paths (imports in the workers, the ledger plugin, connections).
            plain_tiny(client, 200)
            pool_tiny_map(pool, 200)
            cases: list[tuple[str, Callable[[], None]]] = [
                ("tiny/plain client.submit+gather", lambda: plain_tiny(client, n)),
                ("tiny/resilpool submit+result", lambda: pool_tiny_submit(pool, n)),
                ("tiny/resilpool map", lambda: pool_tiny_map(pool, n)),
                ("10ms/plain client.map+gather", lambda: plain_10ms(client, k)),
                ("10ms/resilpool map", lambda: pool_10ms(pool, k)),
                ("50ms/plain client.submit+gather", lambda: plain_sleep(client, m)),
                ("50ms/resilpool map", lambda: pool_sleep(pool, m)),
            ]
            if args.only:
                cases = [c for c in cases if c[0].startswith(args.only + "/")]
            for r in range(repeats):
                order = cases if r % 2 == 0 else cases[::-1]
                for name, run in order:
                    t, c, w = _timed(run)
                    rows.setdefault(name, []).append(t)
                    cpu.setdefault(name, []).append(c)
                    print(f"  repeat {r + 1}: {name}: {t:.2f}s wall, {c:.2f}s CPU ({w:.2f}s of it in the workers)", file=sys.stderr)
            stats = pool.stats()
    load1 = os.getloadavg()

    med = {k: statistics.median(v) for k, v in rows.items()}
    floor = m * 0.05 / 2
    plain = {name.split("/", 1)[0]: secs for name, secs in med.items() if "/plain" in name}
    print(f"\nload average {load0[0]:.2f} at start, {load1[0]:.2f} at end (2 cores; other work skews these numbers)\n")
    print("| workload | path | wall (median) | tasks/s | wall vs plain, same repeat: median (range) | CPU (median) | CPU vs plain: median (range) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, secs in med.items():
        kind, path = name.split("/", 1)
        count = {"tiny": n, "10ms": k, "50ms": m}[kind]
        base = next(b for b in rows if b.startswith(kind + "/plain"))
        label = f"{count} tiny" if kind == "tiny" else f"{count} x {kind[:-2]} ms"
        print(
            f"| {label} | {path} | {secs:.2f} s | {count / secs:,.0f} | {_vs(rows[name], rows[base])}"
            f" | {statistics.median(cpu[name]):.2f} s | {_vs(cpu[name], cpu[base])} |"
        )
    if "50ms" in plain:
        print(f"\n50 ms floor on 2 workers: {floor:.2f} s; plain is {100 * (plain['50ms'] / floor - 1):+.1f}% over it,"
              f" resilpool {100 * (med['50ms/resilpool map'] / floor - 1):+.1f}%.")
    print(f"pool stats after the run: completed={stats.completed} failed={stats.failed} retried={stats.retried}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tiny": n, "tens": k, "sleeps": m, "repeats": repeats, "runs": rows, "cpu": cpu, "median": med, "load": [load0, load1]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
