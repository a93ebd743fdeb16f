"""A parent for ``test_parent_sigkilled_mid_run_leaves_no_orphan``: a chaotic pool, then the test kills us.

Usage: ``python chaos_parent.py SEED WORKDIR READY_FILE START_METHOD PROFILE``.  Runs tasks
under a fault injector until killed; touches READY_FILE once the workers are busy and
task subprocesses are running (a ``sleep`` of ours, and for the ``hang`` profile a
daemon that left our session).

Profiles (what the tasks start, which faults hit them):

- ``kill``: plain subprocesses and double-forked daemons, under every fault that kills a
  worker (SIGKILL busy or idle, ``os._exit``, ``max_rss``), stops one (SIGSTOP
  mid-task, ``hang``), delays a result or breaks the core.
- ``hang``: plain subprocesses, double-forked daemons and daemons that called ``setsid``
  and double-forked, under the faults that stop workers (SIGSTOP, ``hang``) or delay
  results.  Not with the outright kills: a process that calls ``setsid`` leaves its
  worker's process group, so when something outside the pool SIGKILLs the worker it is
  re-parented to init, out of the pool's reach (``Limits(cgroup=True)`` is the remedy
  where cgroups are available); when the pool kills the worker itself, or its parent
  dies, the worker's whole tree goes.
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

PROFILES = {
    "kill": (
        ["kill_busy", "kill_idle", "exit", "delay", "balloon", "break_core", "stop", "hang"],
        ("spin", "spin", "subproc", "daemon", "sleep"),
    ),
    "hang": (["stop", "hang", "delay"], ("spin", "subproc", "daemon", "setsid", "sleep")),
}
PARAMS = {"spin": 0.05, "subproc": 30.0, "daemon": 30.0, "setsid": 30.0, "sleep": 0.02}


def main() -> None:
    seed, workdir, ready = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    start_method, profile = sys.argv[4], sys.argv[5]
    fault_kinds, task_kinds = PROFILES[profile]
    log = str(workdir / "effects.log")
    rng = random.Random(f"{seed}:parent")
    # A stall is caught after 2 s: some stopped workers are still stopped when we are killed.
    limits = Limits(max_rss="400MiB", stall_timeout=2.0, task_timeout=60.0)
    pool = ResilientPool(3, limits=limits, monitor_interval=0.05, mp_context=start_method)
    with FaultInjector(pool, seed=seed, rate=0.2, kinds=fault_kinds):
        key = 0
        futs = []
        while True:
            for _ in range(20):
                kind = rng.choice(task_kinds)
                futs.append(pool.submit(Work(log, key, kind, False, PARAMS[kind]), retry=3))
                key += 1
            if not ready.exists():
                busy = [w for w in pool.workers() if w.task_id]
                if len(busy) >= 2 and _has_grandchildren(profile):
                    ready.touch()
            futs = [f for f in futs if not f.done()]
            time.sleep(0.05)


def _has_grandchildren(profile: str) -> bool:
    import psutil

    sleeps = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.name() == "sleep":
                sleeps.append(os.getsid(p.pid))
        except (psutil.Error, OSError):  # gone meanwhile
            continue
    if profile == "hang":  # wait for a daemon out of our session: the hardest to find
        return any(sid != os.getsid(0) for sid in sleeps)
    return bool(sleeps)


if __name__ == "__main__":
    os.setpgrp()  # the test kills us alone, not a process group we would share with it
    main()
