"""Retry policies: which failed attempts of an idempotent task run again, and when.

A :class:`RetryPolicy` holds tenacity's own strategy objects (``stop_*``,
``wait_*``, ``retry_*``, combined with ``|``, ``&`` and ``+`` as tenacity allows)
and asks tenacity's ``Retrying.iter`` for the decision, so the semantics are
exactly tenacity's.  What it never uses is tenacity's sleep: ``iter`` returns
``DoSleep(seconds)`` and the pool's manager thread schedules the next attempt on
its timer heap, holding neither a worker nor the caller's thread meanwhile.

``retry=N`` is ``RetryPolicy(stop=stop_after_attempt(N + 1))``: N retries, N + 1
attempts, on any failure (worker death, limit kill, timeout, exception).
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any, Final, TypeAlias, final

# tenacity is imported by the first RetryPolicy, not with the pool: importing it imports
# asyncio (and tornado, when installed), ~20-40 ms that a pool without retries never needs.
if TYPE_CHECKING:
    from types import ModuleType

    from tenacity import RetryCallState

__all__ = ["RetryPolicy", "RetrySpec"]

log = logging.getLogger("resilpool")

#: Longest backoff the pool schedules, in seconds (a week).  Longer waits (and ``inf``,
#: e.g. from ``wait_exponential()`` without ``max`` after many attempts) are clamped:
#: the manager's ``select()`` cannot wait more than ~24.8 days (2**31 ms) at once.
MAX_DELAY_S: Final = 7 * 24 * 3600.0

_TENACITY: list[ModuleType] = []


def _tenacity() -> ModuleType:
    """The tenacity module, imported on first need (never while the pool forks a worker)."""
    if not _TENACITY:
        from ._core.lazy import import_module

        _TENACITY.append(import_module("tenacity"))
    return _TENACITY[0]


def _no_sleep(seconds: float) -> None:  # pragma: no cover - never called: we never loop in Retrying
    raise AssertionError("resilpool schedules retries itself")


@final
class RetryPolicy:
    """When to run a failed idempotent task again.

    Args:
        stop: a tenacity stop strategy; default ``stop_after_attempt(4)`` (3 retries).
        wait: a tenacity wait strategy (backoff before the next attempt); default no wait.
        retry: a tenacity retry predicate over the attempt's outcome; default any failure
            (any ``BaseException`` the task raised, and the pool's own ``WorkerCrashedError``, ``MemoryLimitError``,
            ``TaskTimeoutError``).

    Example::

        from tenacity import stop_after_attempt, wait_exponential_jitter, retry_if_exception_type
        policy = RetryPolicy(stop=stop_after_attempt(5), wait=wait_exponential_jitter(1, 30),
                             retry=retry_if_exception_type(ConnectionError))
        pool.submit(fetch, url, retry=policy)
    """

    __slots__ = ("_retrying", "retry", "stop", "wait")

    def __init__(self, *, stop: Any = None, wait: Any = None, retry: Any = None) -> None:
        tenacity = _tenacity()
        self.stop = tenacity.stop_after_attempt(4) if stop is None else stop
        self.wait = tenacity.wait_none() if wait is None else wait
        # Any failure, as the brief says: SystemExit raised by a task is a failed attempt too.
        self.retry = tenacity.retry_if_exception_type(BaseException) if retry is None else retry
        for name in ("stop", "wait", "retry"):
            value = getattr(self, name)
            if isinstance(value, type):  # stop=stop_after_attempt: a class is callable, and silently wrong
                raise TypeError(
                    f"RetryPolicy.{name} must be a tenacity strategy object, not the class {value.__qualname__};"
                    f" call it, e.g. stop_after_attempt(3)"
                )
            if not callable(value):
                raise TypeError(f"RetryPolicy.{name} must be a tenacity strategy (callable), got {value!r}")
        self._retrying = tenacity.Retrying(stop=self.stop, wait=self.wait, retry=self.retry, reraise=True, sleep=_no_sleep)

    @classmethod
    def attempts(cls, retries: int) -> RetryPolicy:
        """``retries`` retries after the first attempt, on any failure, without backoff."""
        if isinstance(retries, bool) or not isinstance(retries, int):
            raise TypeError(f"retries must be an int >= 0, got {retries!r}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        return cls(stop=_tenacity().stop_after_attempt(retries + 1))

    @staticmethod
    def coerce(spec: RetrySpec, *, field: str = "retry") -> RetryPolicy | None:
        """Turn a ``retry=`` argument into a policy; None means the task is not idempotent."""
        if spec is None:
            return None
        if isinstance(spec, RetryPolicy):
            return spec
        if isinstance(spec, bool) or not isinstance(spec, int):
            raise TypeError(f"{field} must be an int >= 0, a RetryPolicy or None, got {spec!r}")
        if spec < 0:
            raise ValueError(f"{field} must be >= 0, got {spec}")
        return _attempts_cached(spec)

    def new_state(self, start_time: float | None = None) -> RetryCallState:
        """Per-task state, counting from the first attempt's start (``time.monotonic()``)."""
        state: RetryCallState = _tenacity().RetryCallState(self._retrying, fn=None, args=(), kwargs={})
        if start_time is not None:
            state.start_time = start_time
        return state

    def next_delay(self, state: RetryCallState, error: BaseException, now: float | None = None) -> float | None:
        """Record a failed attempt; return the delay before the next one, or None to give up.

        Must be called from one thread per policy object at a time (tenacity keeps its
        iteration state thread-local); the pool calls it from its manager thread only.

        Never raises for a faulty strategy (a user's predicate or wait that raises): the
        task is not retried, ``error`` gets a note saying why, and the fault is logged.
        That keeps user code from breaking the manager thread that calls this.
        A delay is clamped to ``[0, MAX_DELAY_S]``; NaN counts as 0.
        """
        tenacity = _tenacity()
        fut = tenacity.Future(state.attempt_number)
        fut.set_exception(error)
        state.outcome = fut
        state.outcome_timestamp = time.monotonic() if now is None else now
        retrying = self._retrying
        if "idle_for" not in retrying.statistics:  # statistics are thread-local in tenacity
            retrying.begin()
        try:
            action = retrying.iter(state)
        except BaseException as exc:
            if exc is error:  # tenacity re-raised the outcome: stop, or not retryable
                # The re-raise gave it a traceback through the pool's manager thread; dropped,
                # it would pin those frames (and a dead worker's pipes) for as long as it lives.
                error.__traceback__ = None
                return None
            if not isinstance(exc, Exception):
                raise
            log.error("resilpool: retry policy %r raised; not retrying", self, exc_info=exc)
            error.add_note(f"not retried: the retry policy raised {type(exc).__name__}: {exc}")
            return None
        if not isinstance(action, tenacity.DoSleep):  # pragma: no cover - defensive
            return None
        state.prepare_for_next_attempt()
        delay = float(action)
        if math.isnan(delay):
            return 0.0
        return min(MAX_DELAY_S, max(0.0, delay))

    def __repr__(self) -> str:
        return f"RetryPolicy(stop={self.stop!r}, wait={self.wait!r}, retry={self.retry!r})"


#: What ``retry=`` accepts: a number of retries, a policy, or None (run at most once).
RetrySpec: TypeAlias = "int | RetryPolicy | None"

_CACHE: dict[int, RetryPolicy] = {}


def _attempts_cached(retries: int) -> RetryPolicy:
    # retry=N is hot on submit; policies are immutable, so share one per N.
    policy = _CACHE.get(retries)
    if policy is None:
        policy = _CACHE.setdefault(retries, RetryPolicy.attempts(retries))
    return policy
