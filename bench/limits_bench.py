"""Kill latency of a hard memory limit: from a worker crossing ``max_rss`` to its death.

The task grows its memory, writes the moment it crossed (``time.monotonic()``,
which is system-wide on Linux), then holds it; a listener on the pool records
when the ``WorkerExited(reason=MEMORY)`` event arrives.  Reported as a median and
a maximum over N kills, in milliseconds and in sampling intervals (the target is
at most two intervals).  Run: ``bench/run`` sets up the venv; then
``bench/.venv/bin/python bench/limits_bench.py [N]`` with ``bench/`` on PYTHONPATH.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time

import tasks

from resilpool import Limits, MemoryLimitError, ResilientPool
from resilpool.events import ExitReason, WorkerExited

INTERVAL_S = 0.2  # the pool's default monitor interval
LIMIT = 150 * 2**20


def main(n: int = 20) -> None:
    exits: dict[int, float] = {}
    got = threading.Condition()

    def on_event(e: object) -> None:
        if isinstance(e, WorkerExited) and e.reason is ExitReason.MEMORY:
            with got:
                exits[e.task_id or 0] = time.monotonic()
                got.notify_all()

    lat = []
    with tempfile.TemporaryDirectory() as tmp, ResilientPool(1, limits=Limits(max_rss=LIMIT), monitor_interval=INTERVAL_S) as pool:
        pool.add_listener(on_event)
        for i in range(n):
            mark = os.path.join(tmp, f"m{i}")
            fut = pool.submit(tasks.cross_and_hold, LIMIT, mark)
            try:
                fut.result(timeout=30)
            except MemoryLimitError as err:
                with got:
                    got.wait_for(lambda: err.task_id in exits, timeout=10)
                crossed = float(open(mark).read())
                lat.append(exits[err.task_id] - crossed)  # type: ignore[index]
    ms = [x * 1000 for x in lat]
    print("| figure | median | max | n |")
    print("|---|---|---|---|")
    print(f"| max_rss crossing -> worker killed (ms) | {statistics.median(ms):.0f} | {max(ms):.0f} | {len(ms)} |")
    print(f"| ... in monitor intervals ({INTERVAL_S}s) | {statistics.median(lat) / INTERVAL_S:.2f} | {max(lat) / INTERVAL_S:.2f} | {len(ms)} |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
