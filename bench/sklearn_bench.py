"""scikit-learn under joblib: loky vs the "resilpool" backend vs ``pool=``, on the same machine, in one run.

Usage::

    .venv/bin/python bench/sklearn_bench.py              # 5 interleaved repeats
    .venv/bin/python bench/sklearn_bench.py --repeats 3 --json out.json

Needs scikit-learn (not a resilpool dependency).  As a scikit-learn user would:
``load_digits``, ``n_jobs=2``, and

- **cross_val_score**: ``RandomForestClassifier(n_estimators=50)``, ``cv=5``;
- **GridSearchCV**: ``RandomForestClassifier`` over 6 candidates
  (``n_estimators`` 10/20 x ``max_depth`` None/5/10), ``cv=3``.

Three ways to run them:

- **loky**: joblib's default backend (its reusable executor);
- **resilpool**: ``parallel_config(backend="resilpool")``, the default path every
  ``n_jobs=`` user takes (the backend's reusable pool);
- **pool=**: ``parallel_config(backend="resilpool", pool=pool)`` with a
  ``ResilientPool(2)`` built once.

Each way first runs both workloads once untimed (workers started, scikit-learn
imported: loky's executor and resilpool's reusable pool both outlive a call).  Then
each repeat times every (workload, way) pair, rotating which way goes first; the
table shows the median over repeats and the ratio to loky.  Target: the resilpool
column within 10% of loky.  On a shared or loaded machine figures are noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from joblib import parallel_config

import resilpool.joblib
from resilpool import ResilientPool

WAYS = ("loky", "resilpool", "pool=")


def workloads() -> dict[str, Callable[[], Any]]:
    from sklearn.datasets import load_digits
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import GridSearchCV, cross_val_score

    X, y = load_digits(return_X_y=True)

    def cv() -> Any:
        return cross_val_score(RandomForestClassifier(n_estimators=50, random_state=0), X, y, cv=5, n_jobs=2)

    def grid() -> Any:
        search = GridSearchCV(
            RandomForestClassifier(random_state=0),
            {"n_estimators": [10, 20], "max_depth": [None, 5, 10]},
            cv=3,
            n_jobs=2,
        )
        return search.fit(X, y).best_params_

    return {"cross_val_score RF50 cv=5": cv, "GridSearchCV 6x3": grid}


@contextmanager
def way(name: str, pool: ResilientPool) -> Iterator[None]:
    if name == "loky":
        ctx: Any = nullcontext()
    elif name == "resilpool":
        ctx = parallel_config(backend="resilpool")
    else:
        ctx = parallel_config(backend="resilpool", pool=pool)
    with ctx:
        yield


def run(repeats: int) -> dict[str, dict[str, list[float]]]:
    jobs = workloads()
    times: dict[str, dict[str, list[float]]] = {job: {w: [] for w in WAYS} for job in jobs}
    with ResilientPool(2) as pool:
        for w in WAYS:  # warm-up, untimed
            for fn in jobs.values():
                with way(w, pool):
                    fn()
        for r in range(repeats):
            order = WAYS[r % len(WAYS):] + WAYS[: r % len(WAYS)]
            for job, fn in jobs.items():
                for w in order:
                    with way(w, pool):
                        t0 = time.perf_counter()
                        fn()
                        times[job][w].append(time.perf_counter() - t0)
    resilpool.joblib.shutdown_reusable_pool()
    return times


def table(times: dict[str, dict[str, list[float]]]) -> str:
    lines = ["| | " + " | ".join(WAYS) + " |", "|---|" + "---|" * len(WAYS)]
    for job, by_way in times.items():
        loky = statistics.median(by_way["loky"])
        cells = []
        for w in WAYS:
            m = statistics.median(by_way[w])
            cells.append(f"{m:.2f} s" + ("" if w == "loky" else f" ({m / loky:.2f}x)"))
        lines.append(f"| {job} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the raw timings here")
    args = parser.parse_args()
    times = run(max(1, args.repeats))
    print(f"median of {args.repeats} interleaved repeats, n_jobs=2, python {sys.version.split()[0]}")
    print(table(times))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(times, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
