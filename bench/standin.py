"""A stand-in for ``resilpool.ResilientPool``, used only with ``bench/run --standin``.

It is the standard library's ``ProcessPoolExecutor`` on the ``forkserver``
start method (resilpool's default) with the two introspection calls the
benchmark reads, ``stats().workers`` and ``workers()``.  It exists so the
harness can be run end to end before the real library works; it has no
``Limits``, no ``retry=`` and no monitor, so those figures print ``n/a`` just
as they would for a resilpool that lacks them.  Its numbers are stdlib
numbers and say nothing about resilpool.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Stats:
    """What the benchmark reads of ``ResilientPool.stats()``."""

    workers: int


@dataclass(frozen=True)
class WorkerSnapshot:
    """What the benchmark reads of one ``ResilientPool.workers()`` entry."""

    pid: int


class ResilientPool(ProcessPoolExecutor):
    """``ProcessPoolExecutor`` dressed as resilpool's API (no self-healing at all)."""

    def __init__(self, max_workers: int | None = None, mp_context: Any = None) -> None:
        super().__init__(max_workers, mp_context=mp_context or multiprocessing.get_context("forkserver"))

    def workers(self) -> list[WorkerSnapshot]:
        """Live worker processes."""
        procs = list((self._processes or {}).values())
        return [WorkerSnapshot(p.pid) for p in procs if p.pid is not None and p.is_alive()]

    def stats(self) -> Stats:
        """Only the live-worker count; broken pools count zero."""
        return Stats(0 if self._broken else len(self.workers()))
