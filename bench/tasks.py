"""Task functions the benchmark sends to worker processes.

They live in their own small module, not in ``bench.py``, so that a worker
started by ``spawn``, ``forkserver`` or loky's own start method can import
them by name: ``bench/run`` puts ``bench/`` on ``PYTHONPATH`` and the driver
passes that on to every process it starts.  The module imports nothing heavy,
so a freshly spawned worker pays next to nothing for it.
"""

from __future__ import annotations

import os
import resource
import time

PAGE = 4096

#: What :func:`leak` keeps alive on purpose: the module-level list is the leak.
_LEAKED: list[bytearray] = []


def add_one(x: int) -> int:
    """The tiny task: costs nothing, so only the pool's own overhead is timed."""
    return x + 1


def whoami(_: object = None) -> int:
    """Return the pid of the worker that ran it (finds workers, checks recycling)."""
    return os.getpid()


def module_file(name: str) -> str | None:
    """Where module ``name`` was imported from in this worker (None: not imported)."""
    import sys

    mod = sys.modules.get(name)
    return getattr(mod, "__file__", None)


def sleep_for(seconds: float) -> int:
    """Keep a worker busy without using CPU (for the monitor-overhead figure)."""
    time.sleep(seconds)
    return os.getpid()


def leak(mib: int) -> tuple[int, int]:
    """Leak ``mib`` MiB on purpose and return ``(pid, peak RSS in bytes)``.

    The buffer is written to, one byte per page, so the pages are really
    resident: a plain ``bytearray(n)`` comes from ``calloc``/``mmap`` and would
    not count towards RSS until touched.  The peak is the worker's own
    ``ru_maxrss``, a cross-check of the sampler in the bench process.
    """
    n = mib * 2**20
    buf = bytearray(n)
    buf[::PAGE] = b"\x01" * len(range(0, n, PAGE))
    _LEAKED.append(buf)
    return os.getpid(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mark_ready(path: str) -> None:
    """Pool initializer of the first-start figure: append ``"<pid> <monotonic> <cpu>"`` to ``path``.

    ``time.monotonic()`` is system-wide on Linux, so the bench process can set
    it against its own clock; ``cpu`` is the CPU time this worker has used so
    far (its own clock starts at zero when it is forked or spawned), which
    load on the machine does not inflate the way it inflates wall time.  One
    short ``O_APPEND`` write per worker does not interleave with another's.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, f"{os.getpid()} {time.monotonic()!r} {time.process_time()!r}\n".encode())
    finally:
        os.close(fd)


def echo_loop(conn: object) -> None:
    """Serve the raw ``multiprocessing.Pipe`` floor: send back whatever arrives until ``None``."""
    recv, send = conn.recv, conn.send  # type: ignore[attr-defined]
    while True:
        item = recv()
        if item is None:
            return
        send(item)


def cross_and_hold(limit_bytes: int, mark: str) -> None:
    """Grow 8 MiB at a time; the moment RSS passes ``limit_bytes``, write ``time.monotonic()``
    (system-wide on Linux) to ``mark``, then hold the memory until killed."""
    held = []
    while True:
        block = bytearray(8 * 2**20)
        for i in range(0, len(block), PAGE):
            block[i] = 1
        held.append(block)
        with open("/proc/self/statm", "rb") as f:
            rss = int(f.read().split()[1]) * PAGE
        if rss > limit_bytes:
            with open(mark, "w") as f:
                f.write(repr(time.monotonic()))
            time.sleep(60)
            return
