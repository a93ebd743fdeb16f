"""A parent for ``test_parent_sigkilled_mid_run_leaves_no_orphan``: a chaotic pool, then the test kills us.

Usage: ``python chaos_parent.py SEED WORKDIR READY_FILE``.  Runs tasks (some with a
subprocess of their own) under a fault injector until killed; touches READY_FILE once
the workers are busy and a task subprocess is running.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

from chaos_workload import Work

from resilpool import Limits, ResilientPool
from resilpool.testing import FaultInjector


def main() -> None:
    seed, workdir, ready = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    log = str(workdir / "effects.log")
    rng = random.Random(f"{seed}:parent")
    pool = ResilientPool(3, limits=Limits(max_rss="400MiB"), monitor_interval=0.05)
    # No stop/hang faults: a worker stopped when its parent dies outlives it (a known bug,
    # pinned by test_stopped_worker_does_not_outlive_a_sigkilled_parent).
    kinds = ["kill_busy", "kill_idle", "exit", "delay", "balloon", "break_core"]
    with FaultInjector(pool, seed=seed, rate=0.2, kinds=kinds):
        key = 0
        futs = []
        while True:
            for _ in range(20):
                kind = rng.choice(("spin", "spin", "subproc", "sleep"))
                param = {"spin": 0.05, "subproc": 30.0, "sleep": 0.02}[kind]
                futs.append(pool.submit(Work(log, key, kind, False, param), retry=3))
                key += 1
            if not ready.exists():
                busy = [w for w in pool.workers() if w.task_id]
                if len(busy) >= 2 and _has_grandchild():
                    ready.touch()
            futs = [f for f in futs if not f.done()]
            time.sleep(0.05)


def _has_grandchild() -> bool:
    import psutil

    return any(p.name() == "sleep" for p in psutil.Process().children(recursive=True))


if __name__ == "__main__":
    os.setpgrp()  # the test kills us alone, not a process group we would share with it
    main()
