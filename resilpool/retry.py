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

import time
from typing import Any, TypeAlias, final

import tenacity
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_none

__all__ = ["RetryPolicy", "RetrySpec"]



def _no_sleep(seconds: float) -> None:  # pragma: no cover - never called: we never loop in Retrying
    raise AssertionError("resilpool schedules retries itself")


@final
class RetryPolicy:
    """When to run a failed idempotent task again.

    Args:
        stop: a tenacity stop strategy; default ``stop_after_attempt(4)`` (3 retries).
        wait: a tenacity wait strategy (backoff before the next attempt); default no wait.
        retry: a tenacity retry predicate over the attempt's outcome; default any ``Exception``
            (including the pool's own ``WorkerCrashedError``, ``MemoryLimitError``,
            ``TaskTimeoutError``).

    Example::

        from tenacity import stop_after_attempt, wait_exponential_jitter, retry_if_exception_type
        policy = RetryPolicy(stop=stop_after_attempt(5), wait=wait_exponential_jitter(1, 30),
                             retry=retry_if_exception_type(ConnectionError))
        pool.submit(fetch, url, retry=policy)
    """

    __slots__ = ("_retrying", "retry", "stop", "wait")

    def __init__(self, *, stop: Any = None, wait: Any = None, retry: Any = None) -> None:
        self.stop = stop_after_attempt(4) if stop is None else stop
        self.wait = wait_none() if wait is None else wait
        self.retry = retry_if_exception_type(Exception) if retry is None else retry
        for name in ("stop", "wait", "retry"):
            if not callable(getattr(self, name)):
                raise TypeError(f"RetryPolicy.{name} must be a tenacity strategy (callable), got {getattr(self, name)!r}")
        self._retrying = Retrying(stop=self.stop, wait=self.wait, retry=self.retry, reraise=True, sleep=_no_sleep)

    @classmethod
    def attempts(cls, retries: int) -> RetryPolicy:
        """``retries`` retries after the first attempt, on any failure, without backoff."""
        return cls(stop=stop_after_attempt(retries + 1))

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
        state = RetryCallState(self._retrying, fn=None, args=(), kwargs={})
        if start_time is not None:
            state.start_time = start_time
        return state

    def next_delay(self, state: RetryCallState, error: BaseException, now: float | None = None) -> float | None:
        """Record a failed attempt; return the delay before the next one, or None to give up.

        Must be called from one thread per policy object at a time (tenacity keeps its
        iteration state thread-local); the pool calls it from its manager thread only.
        """
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
                return None
            raise
        if not isinstance(action, tenacity.DoSleep):  # pragma: no cover - defensive
            return None
        state.prepare_for_next_attempt()
        return max(0.0, float(action))

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
