"""Limits: what a worker may use before the supervisor recycles or kills it.

Sizes are int bytes or strings such as ``"512MiB"``, ``"2GB"``, ``"1.5GiB"``;
durations are seconds.  Every field is validated when the object is built, and a
bad value raises ``ValueError`` naming the field and the value.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Final, final

__all__ = ["Limits", "parse_size"]

_UNITS: Final = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE_RE: Final = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | float | str, field: str = "size") -> int:
    """Bytes from an int or a string like ``"512MiB"``; ValueError names ``field`` on bad input."""
    if isinstance(value, bool):
        raise ValueError(f"{field} must be a size in bytes or a string like '512MiB', got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{field} must be a finite size, got {value!r}")
        n = int(value)
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ValueError(
                f"{field} could not be parsed as a size: {value!r} (use bytes or a unit: B, KB, KiB, MB, MiB, GB, GiB, TB, TiB)"
            )
        n = int(float(m.group(1)) * _UNITS[unit])
    else:
        raise ValueError(f"{field} must be a size in bytes or a string like '512MiB', got {value!r}")
    if n <= 0:
        raise ValueError(f"{field} must be > 0, got {value!r}")
    return n


def _seconds(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{field} must be > 0 seconds, got {value!r}")
    return float(value)


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Per-worker limits; every field is optional (None: no limit).

    Args:
        soft_max_rss: above it a worker is retired after its current task (its result is
            kept); the replacement starts before it leaves.
        max_rss: above it a worker is killed at once; its task fails with ``MemoryLimitError``.
        max_tasks: a worker is replaced after this many tasks.
        max_lifetime: a worker is replaced between tasks after this many seconds, with
            about 10% random jitter so workers do not restart all at once.
        task_timeout: wall-clock seconds a task may run (counted from its start in the
            worker); over it the worker is killed and the task fails with ``TaskTimeoutError``.
        stall_timeout: a running task whose worker tree used almost no CPU (under 2%) for
            this long is hung and is killed: ``TaskStalledError``.
        min_available: when the machine's available memory is below this (bytes, a size
            string, or a fraction of total RAM such as 0.03), no new task starts until it recovers.
        cgroup: put each worker in a cgroup v2 of its own, so that a kill takes every process
            its tasks started, ``setsid`` daemons included (Linux; see docs/limits.md for the
            requirements; where they are not met a warning is logged and the pool runs without).
        init_timeout: seconds a new worker may take to run its initializer and say it is
            ready (no task is sent to it before); past it the worker is killed and counts as
            a start-up failure for the crash-loop breaker. None: no limit.

    Memory is the resident set of the worker's whole process tree, so a task that
    starts subprocesses cannot hide memory from the limit.
    """

    soft_max_rss: int | str | None = None
    max_rss: int | str | None = None
    max_tasks: int | None = None
    max_lifetime: float | None = None
    task_timeout: float | None = None
    stall_timeout: float | None = None
    min_available: int | float | str | None = 0.03
    cgroup: bool = False
    init_timeout: float | None = 60.0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for name in ("soft_max_rss", "max_rss"):
            v = getattr(self, name)
            if v is not None:
                set_(self, name, parse_size(v, f"Limits.{name}"))
        if self.soft_max_rss is not None and self.max_rss is not None and self.soft_max_rss > self.max_rss:  # type: ignore[operator]
            raise ValueError(
                f"Limits.soft_max_rss ({self.soft_max_rss}) must be <= max_rss ({self.max_rss})"
            )
        if self.max_tasks is not None:
            if isinstance(self.max_tasks, bool) or not isinstance(self.max_tasks, int) or self.max_tasks < 1:
                raise ValueError(f"Limits.max_tasks must be an int >= 1, got {self.max_tasks!r}")
        for name in ("max_lifetime", "task_timeout", "stall_timeout", "init_timeout"):
            v = getattr(self, name)
            if v is not None:
                set_(self, name, _seconds(v, f"Limits.{name}"))
        if not isinstance(self.cgroup, bool):
            raise TypeError(f"Limits.cgroup must be True or False, got {self.cgroup!r}")
        ma = self.min_available
        if ma is not None:
            if isinstance(ma, float) and 0 < ma < 1:
                pass
            elif isinstance(ma, float):
                raise ValueError(
                    f"Limits.min_available must be a fraction of RAM between 0 and 1, or a size, got {ma!r}"
                )
            else:
                set_(self, "min_available", parse_size(ma, "Limits.min_available"))

    def sampled_fields(self, *, ignore_default_floor: bool = False) -> list[str]:
        """The limits set here that need the sampling thread (all but max_tasks, init_timeout)."""
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("max_tasks", "cgroup", "init_timeout") or value is None:
                continue
            if ignore_default_floor and f.name == "min_available" and value == f.default:
                continue
            out.append(f.name)
        return out

    def needs_monitor(self, *, ignore_default_floor: bool = False) -> bool:
        """True if any limit needs the sampling thread (all but max_tasks, init_timeout)."""
        return bool(self.sampled_fields(ignore_default_floor=ignore_default_floor))

    def min_available_bytes(self, total_bytes: int) -> int | None:
        """``min_available`` in bytes on a machine with ``total_bytes`` of RAM."""
        ma = self.min_available
        if ma is None:
            return None
        if isinstance(ma, float):
            return int(ma * total_bytes)
        return int(ma)
