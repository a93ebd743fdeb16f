"""resilpool: a supervised, self-healing process pool for work that must finish unattended.

A dead worker costs only its own task; limits recycle leaky or hung workers;
``retry=`` reruns idempotent tasks; the crash-loop breaker stops a pool that
cannot start.  See ``docs/`` for the failure semantics.
"""

from __future__ import annotations

from ._pool import ResilientPool, TaskOptions
from .errors import (
    CrashLoopError,
    MemoryLimitError,
    PoisonTaskError,
    ResilpoolError,
    SerializationError,
    TaskStalledError,
    TaskTimeoutError,
    WorkerCrashedError,
)
from .events import ExitReason, PoolStats, WorkerInfo
from .retry import RetryPolicy
from .supervisor.breaker import Breaker
from .supervisor.limits import Limits

__all__ = [
    "Breaker",
    "CrashLoopError",
    "ExitReason",
    "Limits",
    "MemoryLimitError",
    "PoisonTaskError",
    "PoolStats",
    "ResilientPool",
    "ResilpoolError",
    "RetryPolicy",
    "SerializationError",
    "TaskOptions",
    "TaskStalledError",
    "TaskTimeoutError",
    "WorkerCrashedError",
    "WorkerInfo",
]

__version__ = "0.1.0"
