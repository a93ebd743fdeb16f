"""Run one figure for one library, in a process of its own; the driver starts it.

Usage (by ``bench.py``, not by hand)::

    python bench/child.py FIGURE LIB OUT.json MODE [--standin] [--start-method NAME]

Rows go to ``OUT.json`` as they are measured (see ``figures.Recorder``), so a
child that the driver kills on timeout still leaves what it had.  Workers
started with ``spawn``, ``forkserver`` (CPython does not pass the main path to
the forkserver, so its ``__main__`` preload does nothing and every worker runs
``prepare()`` on its own) and loky re-run this file as ``__mp_main__``: the
guard below keeps them from running a figure, and the harness modules are
imported inside :func:`main` only, so that re-run costs a worker next to
nothing and the start-up figures time the library, not this harness.
The child does not wait for its pools at exit: it kills what is left below it
and leaves with ``os._exit`` after the last row is written.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def main() -> None:
    import argparse
    import functools

    import adapters
    import figures

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("figure", choices=sorted(figures.RUNNERS))
    ap.add_argument("lib", choices=[*adapters.LIBS, *adapters.EXTRA, "floor"])
    ap.add_argument("out")
    ap.add_argument("mode", choices=sorted(figures.PARAMS))
    ap.add_argument("--standin", action="store_true")
    ap.add_argument("--start-method", default=None)
    args = ap.parse_args()
    make = functools.partial(adapters.make, args.lib, standin=args.standin, start_method=args.start_method)
    ctx = figures.Ctx(make=make, params=figures.PARAMS[args.mode], rec=figures.Recorder(args.out, args.lib))
    figures.RUNNERS[args.figure](ctx)
    # Leave at once: atexit hooks would join a hung pool's threads.  Healthy
    # pools were closed by the figure; what is left (a broken or hung pool's
    # workers, a forkserver) is killed here, by pid.
    kill_descendants(os.getpid())
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def kill_descendants(pid: int) -> list[int]:
    """SIGKILL every process below ``pid``, except resource trackers; return their pids.

    Workers may have left the process group (resilpool's lead their own), so
    the tree is walked instead.  Resource trackers are spared: once their
    parent is gone they unlink the semaphores and shared memory it leaked and
    exit by themselves.
    """
    import signal

    import psutil

    try:
        procs = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    killed = []
    for proc in procs:
        try:
            if is_tracker(proc):
                continue
            proc.send_signal(signal.SIGKILL)
            killed.append(proc.pid)
        except psutil.Error:
            pass  # already gone
    return killed


def is_tracker(proc: Any) -> bool:
    """Is this psutil process a (multiprocessing or loky) resource tracker?"""
    try:
        return "resource_tracker" in " ".join(proc.cmdline())
    except Exception:  # gone, or a zombie without a command line
        return False


if __name__ == "__main__":
    main()
