"""``resilpool run`` against the library alone, on trivial items, in one run.

Each repetition times, as separate processes and interleaved (so a burst of load on
the machine hits every variant alike):

- ``lib map``: a script that reads the same JSON-lines input, runs
  ``ResilientPool(W).map(add_one, items)`` (chunksize 1, the default) and writes
  one JSON line per result: what a user would write by hand;
- ``lib map chunked``: the same with the chunk size ``resilpool run`` would pick;
- ``run``: ``resilpool run tasks:add_one -i in.jsonl -o out.jsonl --plain``;
- ``run -j``: the same with a new ``--journal`` each time.

Wall time of each process, start-up included.  The report gives each variant's
median and spread, and the ratio of ``run`` (and ``run -j``) to each library
variant: per repetition, then the median and the min..max of those ratios.

    python bench/cli_bench.py [--items 10000] [--workers 2] [--reps 7]

The machine's load is printed with the figures: numbers taken under load are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

_LIB = """
import json, sys
from resilpool import ResilientPool
from tasks import add_one

def main():
    src, dst, workers, chunksize = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    with open(src, "rb") as f:
        items = [json.loads(line) for line in f if not line.isspace()]
    with ResilientPool(workers) as pool, open(dst, "w") as out:
        for i, (x, r) in enumerate(zip(items, pool.map(add_one, items, chunksize=chunksize))):
            out.write(json.dumps({"index": i, "input": x, "result": r}) + "\\n")

if __name__ == "__main__":  # workers started by forkserver or spawn import this module
    main()
"""


def _time(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system of the process and the workers it reaped)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=600)
    elapsed = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--chunksize", type=int, default=0, help="the chunked map's chunk size (default: the runner's)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    py = sys.executable
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent), env.get("PYTHONPATH", "")])
    # An installed package has its bytecode; without it every process would compile its imports.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    chunk = args.chunksize
    if not chunk:
        sys.path.insert(0, str(HERE.parent))
        from resilpool.cli._run import CHUNK_MAX  # the runner's pick for trivial items

        chunk = CHUNK_MAX
    with tempfile.TemporaryDirectory(prefix="cli-bench-") as tmp:
        d = Path(tmp)
        (d / "in.jsonl").write_text("".join(f"{i}\n" for i in range(args.items)))
        (d / "lib.py").write_text(_LIB)
        variants = {
            "lib map": lambda: [py, "lib.py", "in.jsonl", "lib.jsonl", str(args.workers), "1"],
            f"lib map chunked ({chunk})": lambda: [py, "lib.py", "in.jsonl", "lib.jsonl", str(args.workers), str(chunk)],
            "run": lambda: [py, "-m", "resilpool.cli", "run", "tasks:add_one", "-i", "in.jsonl", "-o", "run.jsonl", "--overwrite", "--plain", "-w", str(args.workers)],
            "run -j": lambda: [py, "-m", "resilpool.cli", "run", "tasks:add_one", "-i", "in.jsonl", "-o", "runj.jsonl", "--overwrite", "-j", "run.db", "--plain", "-w", str(args.workers)],
        }
        times: dict[str, list[float]] = {k: [] for k in variants}
        cpu: dict[str, list[float]] = {k: [] for k in variants}
        _time(variants["run"](), d, env)  # warm the page cache and the bytecode
        for rep in range(args.reps):
            for name, cmd in variants.items():
                for stale in ("run.db", "run.db-wal", "run.db-shm", "runj.jsonl", "runj.errors.jsonl"):
                    (d / stale).unlink(missing_ok=True)
                wall, used = _time(cmd(), d, env)
                times[name].append(wall)
                cpu[name].append(used)
            print(f"rep {rep + 1}/{args.reps}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()), file=sys.stderr)
        lines = (d / "run.jsonl").read_bytes().count(b"\n")
        assert lines == args.items, f"run wrote {lines} lines, not {args.items}"
    load = os.getloadavg()
    print(f"# resilpool run vs the library: {args.items} trivial items, {args.workers} workers, {args.reps} interleaved repetitions")
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (2 cores: above ~0.5, the figures are noisy)\n")
    print("| variant | wall median s | wall min s | wall max s | CPU median s |")
    print("| --- | --- | --- | --- | --- |")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.3f} | {min(ts):.3f} | {max(ts):.3f} | {statistics.median(cpu[name]):.3f} |")
    print("\nRatios per repetition (run / library, same repetition), then their median, min and max:\n")
    print("| ratio | wall median | wall min | wall max | CPU median | CPU min | CPU max |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    ratios: dict[str, dict[str, list[float]]] = {}
    for cli in ("run", "run -j"):
        for lib in [k for k in variants if k.startswith("lib")]:
            rs = [c / b for c, b in zip(times[cli], times[lib])]
            cs = [c / b for c, b in zip(cpu[cli], cpu[lib])]
            ratios[f"{cli} / {lib}"] = {"wall": rs, "cpu": cs}
            print(
                f"| {cli} / {lib} | {statistics.median(rs):.3f} | {min(rs):.3f} | {max(rs):.3f}"
                f" | {statistics.median(cs):.3f} | {min(cs):.3f} | {max(cs):.3f} |"
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "times": times, "cpu": cpu, "ratios": ratios, "load": load}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
