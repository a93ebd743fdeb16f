"""A leaky scientific job, run to the end by ``resilpool run`` with memory limits.

Each call fits a line to a synthetic noisy signal (pure Python, some CPU) and,
like many C extensions and module-level caches, keeps memory it never gives
back: a worker that ran 50 items holds 50 leaked buffers.  Alone, such a job
grows until the machine swaps or the OOM killer ends it, and the night's work
with it.  Under ``resilpool run`` a worker over ``--soft-max-rss`` is replaced
after its current item (its result is kept), one over ``--max-rss`` is killed at
once (its item fails, or is retried with ``--retry``); the journal lets a rerun
finish what a crash or a reboot interrupted.

From this directory::

    resilpool run leaky_job:analyze --input data/samples.jsonl --output leaky-results.jsonl \\
        --soft-max-rss 150MiB --max-rss 1GiB --task-timeout 60 --retry 1 \\
        --journal leaky.db --report leaky-report.json
    resilpool report leaky.db

or, from anywhere, ``python examples/leaky_job.py [OUTPUT_DIR]``, which runs that
command with its outputs in OUTPUT_DIR (default: a new temporary directory).
See docs/cli.md.
"""

from __future__ import annotations

import math
import os
import random
import sys
import tempfile

_KEPT: list[bytearray] = []  # the leak: buffers a "library" forgot to free


def analyze(sample: dict[str, int | str]) -> dict[str, object]:
    """Fit ``y = a*x + b`` to ``sample["points"]`` noisy points; leak ``sample["leak_mib"]`` MiB."""
    leak = bytearray(int(sample.get("leak_mib", 8)) * 2**20)
    for k in range(0, len(leak), 4096):  # touch every page: resident, not just reserved
        leak[k] = 1
    _KEPT.append(leak)

    rng = random.Random(int(sample["seed"]))
    n = int(sample["points"])
    true_a, true_b = rng.uniform(-2, 2), rng.uniform(-5, 5)
    xs = [i / n for i in range(n)]
    ys = [true_a * x + true_b + rng.gauss(0, 0.1) + 0.05 * math.sin(40 * x) for x in xs]
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    a = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    b = my - a * mx
    rms = math.sqrt(sum((y - (a * x + b)) ** 2 for x, y in zip(xs, ys)) / n)
    return {"id": sample["id"], "slope": round(a, 6), "intercept": round(b, 6), "rms": round(rms, 6), "worker_buffers": len(_KEPT)}


def main(argv: list[str]) -> int:
    from resilpool.cli import main as resilpool

    here = os.path.dirname(os.path.abspath(__file__))
    out = os.path.abspath(argv[0]) if argv else tempfile.mkdtemp(prefix="resilpool-leaky-")
    os.makedirs(out, exist_ok=True)
    print(f"outputs in {out}", flush=True)
    return resilpool([
        "run", os.path.join(here, "leaky_job.py") + ":analyze",
        "--input", os.path.join(here, "data", "samples.jsonl"),
        "--output", os.path.join(out, "leaky-results.jsonl"),
        "--soft-max-rss", "150MiB", "--max-rss", "1GiB", "--task-timeout", "60", "--retry", "1",
        "--journal", os.path.join(out, "leaky.db"), "--report", os.path.join(out, "leaky-report.json"),
    ])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
