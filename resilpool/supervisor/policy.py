"""Pure supervisor decisions: ``(sample, limits, now) -> action``.

No processes, no threads, no clock of its own: the monitor measures, this module
decides, and the tests drive it with made-up samples and a fake clock.
"""

from __future__ import annotations

import random
import signal
from dataclasses import dataclass

from .. import errors
from ..events import ExitReason
from .limits import Limits

__all__ = ["Kill", "Retire", "WorkerSample", "decide", "lifetime_with_jitter"]

#: A task is stalled when its worker tree used less than this share of one CPU over stall_timeout.
STALL_CPU_FRACTION = 0.02


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSample:
    """What the monitor measured of one worker at ``now``."""

    pid: int
    rss: int  #: bytes, whole process tree
    age_s: float
    lifetime_s: float | None  #: this worker's jittered max_lifetime
    task_id: int  #: 0 when idle
    task_started: float | None  #: monotonic start of the running task
    task_timeout: float | None  #: the task's own override, else None
    cpu_window_s: float | None  #: CPU seconds the tree used over the last stall_timeout (None: not enough history)
    retiring: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Kill:
    """Kill the worker now; its running task (``task_id``, if any) fails with :meth:`to_error`.

    A value, not a closure: commands carry it from the deciding thread (the monitor,
    the Dask poller, :meth:`ResilientPool.abort`) to the core, which calls
    :meth:`to_error` once it knows which task the kill cost and how long it ran.
    """

    pid: int
    task_id: int | None
    reason: ExitReason
    rss: int = 0
    limit: int = 0
    timeout: float = 0.0
    elapsed: float = 0.0
    cpu_s: float = 0.0
    #: for any other reason: why the worker was killed, said in the task's WorkerCrashedError
    detail: str = ""

    def to_error(self, task_id: int, fn_name: str, elapsed: float, *, address: str | None = None) -> errors.ResilpoolError:
        """The error the task this kill cost fails with (``elapsed``: seconds it had run).

        The one kill-to-error mapping of the pool: MEMORY -> MemoryLimitError, TIMEOUT ->
        TaskTimeoutError, STALL -> TaskStalledError, anything else -> WorkerCrashedError
        naming ``detail``.  ``address`` (a Dask worker's) is kept as ``err.address``.
        """
        err: errors.ResilpoolError
        elapsed = max(elapsed, self.elapsed)
        match self.reason:
            case ExitReason.MEMORY:
                err = errors.MemoryLimitError(pid=self.pid, rss=self.rss, limit=self.limit, task_id=task_id)
            case ExitReason.TIMEOUT:
                err = errors.TaskTimeoutError(pid=self.pid, timeout=self.timeout, elapsed=elapsed, task_id=task_id)
            case ExitReason.STALL:
                err = errors.TaskStalledError(pid=self.pid, timeout=self.timeout, elapsed=elapsed, task_id=task_id, cpu_seconds=self.cpu_s)
            case _:
                why = self.detail or f"its worker was killed ({self.reason.value})"
                err = errors.WorkerCrashedError(
                    f"worker {self.pid} was killed after {elapsed:.2f}s while running task {task_id} (fn={fn_name}): {why}",
                    pid=self.pid,
                    exitcode=-signal.SIGKILL,
                    task_id=task_id,
                    fn_name=fn_name,
                )
        if address is not None:
            setattr(err, "address", address)  # survives pickling (__dict__ is carried)
        return err


@dataclass(frozen=True, slots=True, kw_only=True)
class Retire:
    """Retire the worker after its current task."""

    pid: int
    reason: ExitReason


Action = Kill | Retire


def lifetime_with_jitter(max_lifetime: float | None, rng: random.Random) -> float | None:
    """A worker's own lifetime: ``max_lifetime`` +- 10%, so workers never restart all at once."""
    if max_lifetime is None:
        return None
    return max_lifetime * rng.uniform(0.9, 1.1)


def decide(s: WorkerSample, limits: Limits, now: float) -> Action | None:
    """The one action the supervisor takes for this worker now, most urgent first."""
    running = s.task_id != 0 and s.task_started is not None
    task_id = s.task_id if running else None
    if limits.max_rss is not None and s.rss > limits.max_rss:  # type: ignore[operator]
        return Kill(pid=s.pid, task_id=None, reason=ExitReason.MEMORY, rss=s.rss, limit=int(limits.max_rss))
    if running:
        assert s.task_started is not None
        elapsed = now - s.task_started
        timeout = s.task_timeout if s.task_timeout is not None else limits.task_timeout
        if timeout is not None and elapsed > timeout:
            return Kill(pid=s.pid, task_id=task_id, reason=ExitReason.TIMEOUT, timeout=timeout, elapsed=elapsed)
        stall = limits.stall_timeout
        if (
            stall is not None
            and elapsed >= stall
            and s.cpu_window_s is not None
            and s.cpu_window_s < STALL_CPU_FRACTION * stall
        ):
            return Kill(pid=s.pid, task_id=task_id, reason=ExitReason.STALL, timeout=stall, elapsed=elapsed, cpu_s=s.cpu_window_s)
    if s.retiring:
        return None
    if limits.soft_max_rss is not None and s.rss > limits.soft_max_rss:  # type: ignore[operator]
        return Retire(pid=s.pid, reason=ExitReason.SOFT_MEMORY)
    if s.lifetime_s is not None and s.age_s > s.lifetime_s:
        return Retire(pid=s.pid, reason=ExitReason.LIFETIME)
    return None
