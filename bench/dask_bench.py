"""resilpool on Dask vs plain ``client.submit``, on the same LocalCluster, in one run.

Usage::

    /work/venv/bin/python bench/dask_bench.py                 # 10,000 tiny + 200 x 50 ms, 3 repeats
    /work/venv/bin/python bench/dask_bench.py --quick         # 2,000 tiny + 100 x 50 ms, 1 repeat
    /work/venv/bin/python bench/dask_bench.py --json out.json

One ``LocalCluster`` (2 worker processes of 1 thread, nannies, loopback, no
dashboard) serves every measurement, so both sides pay the same scheduler and
the same workers.  Each repeat runs the plain side and the resilpool side back to
back, alternating which goes first; the table shows the median over repeats.

Measured:

- **tiny**: N calls of ``add_one`` (does nothing): the per-task cost of each path.
  Plain: ``client.submit`` per call, then one ``client.gather``.  resilpool:
  ``pool.submit`` per call then ``result()`` each, and ``pool.map``.
- **50 ms**: M calls of ``sleep_for(0.05)``.  Plain: ``client.submit`` + ``gather``;
  resilpool: ``pool.map``.  The floor is ``M * 0.05 / 2`` seconds on 2 workers;
  the target is resilpool within 10% of plain.

What resilpool adds per task, on top of Dask: one claim RPC from the worker to the
scheduler before the call starts (the at-most-once start record), pickling the call
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


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    ap.add_argument("--tiny", type=int, default=None, help="tiny tasks (default 10000; 2000 with --quick)")
    ap.add_argument("--sleeps", type=int, default=None, help="50 ms tasks (default 200; 100 with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats (default 3; 1 with --quick)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    n = args.tiny or (2000 if args.quick else 10_000)
    m = args.sleeps or (100 if args.quick else 200)
    repeats = args.repeats or (1 if args.quick else 3)

    logging.getLogger("distributed").setLevel(logging.ERROR)
    from distributed import Client, LocalCluster

    from resilpool import ResilientPool
    from resilpool.dask import DaskBackend

    load0 = os.getloadavg()
    rows: dict[str, list[float]] = {}
    print(f"# resilpool on Dask vs plain Dask: {n} tiny tasks, {m} x 50 ms, {repeats} repeat(s), 2 workers", file=sys.stderr)
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
                ("50ms/plain client.submit+gather", lambda: plain_sleep(client, m)),
                ("50ms/resilpool map", lambda: pool_sleep(pool, m)),
            ]
            for r in range(repeats):
                order = cases if r % 2 == 0 else [*cases[3:], *cases[:3]][::-1]
                for name, run in order:
                    t = _timed(run)
                    rows.setdefault(name, []).append(t)
                    print(f"  repeat {r + 1}: {name}: {t:.2f}s", file=sys.stderr)
            stats = pool.stats()
    load1 = os.getloadavg()

    med = {k: statistics.median(v) for k, v in rows.items()}
    floor = m * 0.05 / 2
    plain_tiny_s = med["tiny/plain client.submit+gather"]
    plain_sleep_s = med["50ms/plain client.submit+gather"]
    print(f"\nload average {load0[0]:.2f} at start, {load1[0]:.2f} at end (2 cores; other work skews these numbers)\n")
    print("| workload | path | wall (median) | tasks/s | vs plain |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, secs in med.items():
        kind, path = name.split("/", 1)
        count = n if kind == "tiny" else m
        base = plain_tiny_s if kind == "tiny" else plain_sleep_s
        label = f"{count} tiny" if kind == "tiny" else f"{count} x 50 ms"
        print(f"| {label} | {path} | {secs:.2f} s | {count / secs:,.0f} | {100 * (secs / base - 1):+.1f}% |")
    print(f"\n50 ms floor on 2 workers: {floor:.2f} s; plain is {100 * (plain_sleep_s / floor - 1):+.1f}% over it,"
          f" resilpool {100 * (med['50ms/resilpool map'] / floor - 1):+.1f}%.")
    print(f"pool stats after the run: completed={stats.completed} failed={stats.failed} retried={stats.retried}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tiny": n, "sleeps": m, "repeats": repeats, "runs": rows, "median": med, "load": [load0, load1]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
