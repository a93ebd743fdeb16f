"""Crash-loop breaker and poison-task blame: pure decisions, no processes, clock injected.

The breaker is restart intensity as in Erlang/OTP supervisors: more than
``max_failures`` start-up failures within ``window_s`` seconds trip it, and the
pool stops starting workers for good.  Start-up failures are deaths before a
worker said it was ready (a failing initializer, a broken environment); deaths
of ready workers are blamed on tasks instead (see :func:`blame`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import final

__all__ = ["Breaker", "CrashLoopBreaker", "blame"]


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Breaker:
    """Settings of the crash-loop breaker and the poison quarantine.

    Args:
        max_failures: start-up failures tolerated within ``window``; one more trips the breaker.
            None: ``max(3, 2 * max_workers)``.
        window: seconds over which start-up failures are counted.
        quarantine_after: worker deaths blamed on one task before it is quarantined
            with ``PoisonTaskError``, whatever retries it has left.
    """

    max_failures: int | None = None
    window: float = 60.0
    quarantine_after: int = 3

    def __post_init__(self) -> None:
        if self.max_failures is not None and (isinstance(self.max_failures, bool) or not isinstance(self.max_failures, int) or self.max_failures < 0):
            raise ValueError(f"Breaker.max_failures must be an int >= 0, got {self.max_failures!r}")
        if not isinstance(self.window, (int, float)) or isinstance(self.window, bool) or not self.window > 0:
            raise ValueError(f"Breaker.window must be > 0 seconds, got {self.window!r}")
        if isinstance(self.quarantine_after, bool) or not isinstance(self.quarantine_after, int) or self.quarantine_after < 1:
            raise ValueError(f"Breaker.quarantine_after must be an int >= 1, got {self.quarantine_after!r}")


@final
class CrashLoopBreaker:
    """Counts start-up failures in a sliding window; trips once, for good."""

    __slots__ = ("_times", "max_failures", "tripped", "window_s")

    def __init__(self, max_failures: int, window_s: float) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._times: deque[float] = deque()
        self.tripped = False

    def record_failure(self, now: float) -> bool:
        """Count a start-up failure at ``now``; return True if the breaker is (now) tripped."""
        times = self._times
        times.append(now)
        while times and times[0] < now - self.window_s:
            times.popleft()
        if len(times) > self.max_failures:
            self.tripped = True
        return self.tripped

    @property
    def recent_failures(self) -> int:
        """Failures counted in the current window."""
        return len(self._times)


def blame(worker_tasks_before: int) -> bool:
    """Should a worker's death count against the task it was running?

    A death on a fresh worker (the task was its first) points at the task.  A death
    on a worker that had run other tasks may be the fault of what they left behind
    (a leak, a corrupted global), so it does not count; the retry is sent to a
    fresh worker instead, where a second death will count.
    """
    return worker_tasks_before == 0
