"""resilpool: a supervised, self-healing process pool for work that must finish unattended.

A dead worker costs only its own task; limits recycle leaky or hung workers;
``retry=`` reruns idempotent tasks; the crash-loop breaker stops a pool that
cannot start.  See ``docs/`` for the failure semantics.

The public names are imported on first use (PEP 562): a worker process imports
``resilpool._core.worker``, and so this package, without the pool, the
supervisor, tenacity and psutil it never uses.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # no typing at run time: a worker's forkserver imports this package
if TYPE_CHECKING:
    from typing import Any

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

#: Where each public name lives (imported by ``__getattr__`` on first use).
_WHERE = {
    "Breaker": ".supervisor.breaker",
    "CrashLoopError": ".errors",
    "ExitReason": ".events",
    "Limits": ".supervisor.limits",
    "MemoryLimitError": ".errors",
    "PoisonTaskError": ".errors",
    "PoolStats": ".events",
    "ResilientPool": "._pool",
    "ResilpoolError": ".errors",
    "RetryPolicy": ".retry",
    "SerializationError": ".errors",
    "TaskOptions": "._pool",
    "TaskStalledError": ".errors",
    "TaskTimeoutError": ".errors",
    "WorkerCrashedError": ".errors",
    "WorkerInfo": ".events",
}

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


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'resilpool' has no attribute {name!r}")
    value = getattr(importlib.import_module(where, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
