"""Retry, crash-loop and blame decisions as pure functions: no processes, a fake clock.

``RetryPolicy.next_delay(state, error, now=...)`` is the pool's whole retry decision;
``CrashLoopBreaker.record_failure(now)`` its whole breaker decision; ``blame`` its
poison-task rule.  Times here are made-up ``time.monotonic()`` values.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pickle
import threading
from typing import Any

import pytest
from tenacity import (
    retry_if_exception_message,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_exponential_jitter,
    wait_fixed,
    wait_none,
)

from resilpool import (
    Breaker,
    CrashLoopError,
    MemoryLimitError,
    PoisonTaskError,
    RetryPolicy,
    TaskTimeoutError,
    WorkerCrashedError,
)
from resilpool.retry import MAX_DELAY_S
from resilpool.supervisor.breaker import CrashLoopBreaker, blame

T0 = 1000.0  # the fake clock's reading when the first attempt started


def delays(policy: RetryPolicy, errors: list[BaseException], times: list[float] | None = None) -> list[float | None]:
    """Feed one task's failed attempts to ``policy``; the decision after each."""
    state = policy.new_state(T0)
    times = times if times is not None else [T0] * len(errors)
    return [policy.next_delay(state, err, now=now) for err, now in zip(errors, times, strict=True)]


# --- RetryPolicy.coerce: what retry= accepts ----------------------------------------


def test_coerce_none_means_run_at_most_once() -> None:
    assert RetryPolicy.coerce(None) is None


def test_coerce_passes_a_policy_through() -> None:
    policy = RetryPolicy(stop=stop_after_attempt(2))
    assert RetryPolicy.coerce(policy) is policy


@pytest.mark.parametrize("n", [0, 1, 2, 5])
def test_coerce_int_n_gives_n_retries(n: int) -> None:
    policy = RetryPolicy.coerce(n)
    assert policy is not None
    # N retries: a delay after each of the first N failures, then give up, and stay given up.
    assert delays(policy, [ValueError("x")] * (n + 2)) == [0.0] * n + [None, None]


def test_coerce_int_is_shared_and_equivalent_to_attempts() -> None:
    assert RetryPolicy.coerce(3) is RetryPolicy.coerce(3)  # hot path: one policy per N
    assert delays(RetryPolicy.attempts(3), [OSError()] * 4) == delays(RetryPolicy.coerce(3), [OSError()] * 4)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-1, -100])
def test_coerce_rejects_negative_retries(bad: int) -> None:
    with pytest.raises(ValueError, match=r"retry must be >= 0"):
        RetryPolicy.coerce(bad)


@pytest.mark.parametrize("bad", [True, False, 1.0, 2.5, "2", [2], stop_after_attempt(2)])
def test_coerce_rejects_other_types(bad: Any) -> None:
    with pytest.raises(TypeError, match=r"retry must be an int >= 0, a RetryPolicy or None"):
        RetryPolicy.coerce(bad)


def test_coerce_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"^default_retry must be >= 0"):
        RetryPolicy.coerce(-1, field="default_retry")


@pytest.mark.parametrize("bad", [-1, True, 1.5])
def test_attempts_validates_like_coerce(bad: Any) -> None:
    with pytest.raises((ValueError, TypeError), match=r"retries must be"):
        RetryPolicy.attempts(bad)


@pytest.mark.parametrize("field", ["stop", "wait", "retry"])
def test_policy_rejects_non_strategies(field: str) -> None:
    with pytest.raises(TypeError, match=rf"RetryPolicy\.{field} must be a tenacity strategy"):
        RetryPolicy(**{field: 3})


@pytest.mark.parametrize(
    ("field", "cls"), [("stop", stop_after_attempt), ("wait", wait_fixed), ("retry", retry_if_exception_type)]
)
def test_policy_rejects_a_strategy_class_instead_of_an_instance(field: str, cls: type) -> None:
    # A class is callable, so without this check stop=stop_after_attempt would silently never retry.
    with pytest.raises(TypeError, match=rf"RetryPolicy\.{field} .*not the class {cls.__qualname__}"):
        RetryPolicy(**{field: cls})


def test_policy_defaults_and_repr() -> None:
    policy = RetryPolicy()
    assert isinstance(policy.stop, stop_after_attempt)
    assert isinstance(policy.wait, wait_none)
    assert isinstance(policy.retry, retry_if_exception_type)
    assert delays(policy, [ValueError()] * 4) == [0.0, 0.0, 0.0, None]  # 4 attempts
    text = repr(policy)
    assert text.startswith("RetryPolicy(stop=") and "wait=" in text and "retry=" in text


def test_default_policy_retries_any_failure() -> None:
    # "on any failure": the pool's own errors, and whatever the task raised, SystemExit included.
    policy = RetryPolicy()
    for err in (
        WorkerCrashedError(pid=1, exitcode=-9, task_id=1, fn_name="f"),
        TaskTimeoutError(pid=1, timeout=1.0, elapsed=1.5, task_id=1),
        MemoryLimitError(pid=1, rss=2, limit=1, task_id=1),
        ValueError("task raised"),
        SystemExit(3),
        KeyboardInterrupt(),
    ):
        assert delays(policy, [err]) == [0.0], err


# --- next_delay with tenacity's strategies ------------------------------------------


def test_stop_after_attempt() -> None:
    policy = RetryPolicy(stop=stop_after_attempt(3))
    state = policy.new_state(T0)
    assert state.attempt_number == 1
    assert policy.next_delay(state, ValueError(), now=T0) == 0.0
    assert state.attempt_number == 2
    assert policy.next_delay(state, ValueError(), now=T0) == 0.0
    assert state.attempt_number == 3
    assert policy.next_delay(state, ValueError(), now=T0) is None


def test_stop_after_delay_counts_from_the_first_start_on_the_given_clock() -> None:
    policy = RetryPolicy(stop=stop_after_delay(5), wait=wait_fixed(1))
    times = [T0 + 1, T0 + 2, T0 + 4.9, T0 + 5]
    assert delays(policy, [ValueError()] * 4, times) == [1.0, 1.0, 1.0, None]


def test_stop_after_delay_started_long_ago_gives_up_at_once() -> None:
    policy = RetryPolicy(stop=stop_after_delay(5))
    state = policy.new_state(T0 - 60)  # first attempt started a minute before it failed
    assert policy.next_delay(state, ValueError(), now=T0) is None


def test_wait_exponential_jitter_without_jitter_doubles_up_to_max() -> None:
    policy = RetryPolicy(stop=stop_after_attempt(7), wait=wait_exponential_jitter(multiplier=1, max=10, jitter=0))
    assert delays(policy, [ValueError()] * 7) == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, None]


def test_wait_exponential_jitter_stays_within_its_bounds() -> None:
    policy = RetryPolicy(stop=stop_after_attempt(6), wait=wait_exponential_jitter(multiplier=1, max=20, jitter=1))
    got = delays(policy, [ValueError()] * 6)
    assert got[-1] is None
    for i, d in enumerate(got[:-1]):
        assert d is not None
        assert 2.0**i <= d <= min(20.0, 2.0**i + 1), (i, d)


def test_retry_if_exception_type_filters_failures() -> None:
    policy = RetryPolicy(stop=stop_after_attempt(5), retry=retry_if_exception_type(ConnectionError))
    assert delays(policy, [ConnectionResetError(), ValueError("not transient")]) == [0.0, None]


def test_retry_predicates_combine_with_or() -> None:
    retry = retry_if_exception_type(ConnectionError) | retry_if_exception_type(WorkerCrashedError)
    policy = RetryPolicy(stop=stop_after_attempt(10), retry=retry)
    assert delays(policy, [ConnectionError(), WorkerCrashedError(pid=1), ValueError()]) == [0.0, 0.0, None]


def test_retry_predicates_combine_with_and() -> None:
    retry = retry_if_exception_type(OSError) & retry_if_exception_message(match="transient.*")
    policy = RetryPolicy(stop=stop_after_attempt(10), retry=retry)
    assert delays(policy, [OSError("transient glitch"), OSError("disk on fire")]) == [0.0, None]
    assert delays(policy, [ValueError("transient")]) == [None]


def test_stops_combine_with_or_whichever_comes_first() -> None:
    policy = RetryPolicy(stop=stop_after_attempt(3) | stop_after_delay(10), wait=wait_fixed(2))
    assert delays(policy, [ValueError()] * 3, [T0, T0, T0]) == [2.0, 2.0, None]  # attempts first
    assert delays(policy, [ValueError()] * 2, [T0 + 1, T0 + 10]) == [2.0, None]  # delay first


def test_stops_combine_with_and_both_must_hold() -> None:
    policy = RetryPolicy(stop=stop_after_attempt(2) & stop_after_delay(10))
    assert delays(policy, [ValueError()] * 4, [T0, T0 + 1, T0 + 2, T0 + 11]) == [0.0, 0.0, 0.0, None]


def test_waits_add_with_plus() -> None:
    policy = RetryPolicy(stop=stop_after_attempt(4), wait=wait_fixed(1) + wait_exponential_jitter(multiplier=2, jitter=0))
    assert delays(policy, [ValueError()] * 4) == [3.0, 5.0, 9.0, None]


def test_policy_states_are_independent() -> None:
    policy = RetryPolicy.coerce(1)  # shared by every retry=1 task
    assert policy is not None
    a, b = policy.new_state(T0), policy.new_state(T0)
    assert policy.next_delay(a, ValueError(), now=T0) == 0.0
    assert policy.next_delay(b, ValueError(), now=T0) == 0.0
    assert policy.next_delay(a, ValueError(), now=T0) is None
    assert policy.next_delay(b, ValueError(), now=T0) is None


def test_policy_works_from_another_thread() -> None:
    # tenacity keeps its statistics per thread; each pool calls from its own manager thread.
    policy = RetryPolicy(stop=stop_after_attempt(3), wait=wait_fixed(4))
    assert delays(policy, [ValueError()]) == [4.0]
    got: list[list[float | None]] = []
    t = threading.Thread(target=lambda: got.append(delays(policy, [ValueError()] * 3)))
    t.start()
    t.join(10)
    assert got == [[4.0, 4.0, None]]


def test_delay_is_clamped_to_what_the_manager_can_wait() -> None:
    # wait_exponential() without max grows past what select() accepts (~24.8 days).
    policy = RetryPolicy(stop=stop_after_attempt(40), wait=wait_exponential())
    got = delays(policy, [ValueError()] * 39)
    assert all(d is not None and 0.0 <= d <= MAX_DELAY_S for d in got)
    assert got[-1] == MAX_DELAY_S
    assert delays(RetryPolicy(wait=wait_fixed(math.inf)), [ValueError()]) == [MAX_DELAY_S]
    assert delays(RetryPolicy(wait=lambda rs: math.nan), [ValueError()]) == [0.0]
    assert delays(RetryPolicy(wait=lambda rs: -5.0), [ValueError()]) == [0.0]


def _broken_predicate(rs: Any) -> bool:
    raise ZeroDivisionError("predicate bug")


@pytest.mark.resilpool_core_errors
@pytest.mark.parametrize(
    "policy",
    [
        RetryPolicy(retry=_broken_predicate),
        RetryPolicy(wait=lambda rs: 1 / 0),
        RetryPolicy(wait=lambda rs: "soon"),
        RetryPolicy(stop=lambda rs: [][1]),
    ],
    ids=["retry", "wait", "wait-type", "stop"],
)
def test_a_faulty_strategy_gives_up_with_a_note_instead_of_raising(policy: RetryPolicy, caplog: pytest.LogCaptureFixture) -> None:
    # next_delay runs on the pool's manager thread: it must not raise for user code.
    err = ValueError("task failed")
    with caplog.at_level(logging.ERROR, logger="resilpool"):
        assert delays(policy, [err]) == [None]
    assert len(err.__notes__) == 1
    assert err.__notes__[0].startswith("not retried: the retry policy raised ")
    assert any(r.exc_info for r in caplog.records)


# --- CrashLoopBreaker: restart intensity on a fake clock ------------------------------


def test_breaker_trips_on_one_failure_more_than_allowed() -> None:
    b = CrashLoopBreaker(max_failures=2, window_s=10.0)
    assert b.record_failure(T0) is False
    assert b.record_failure(T0 + 1) is False
    assert not b.tripped
    assert b.record_failure(T0 + 2) is True
    assert b.tripped
    assert b.recent_failures == 3


def test_breaker_ignores_failures_spread_beyond_the_window() -> None:
    b = CrashLoopBreaker(max_failures=1, window_s=10.0)
    for i in range(20):
        assert b.record_failure(T0 + 10.5 * i) is False
    assert b.recent_failures == 1


def test_breaker_window_slides() -> None:
    b = CrashLoopBreaker(max_failures=2, window_s=10.0)
    assert not b.record_failure(T0)
    assert not b.record_failure(T0 + 5)
    assert not b.record_failure(T0 + 11)  # T0 fell out: 2 in the window
    assert b.recent_failures == 2
    assert b.record_failure(T0 + 12)  # T0+5, T0+11, T0+12
    assert b.recent_failures == 3


def test_breaker_stays_tripped_for_good() -> None:
    b = CrashLoopBreaker(max_failures=0, window_s=1.0)
    assert b.record_failure(T0) is True  # max_failures=0: the first start-up failure trips it
    assert b.record_failure(T0 + 3600) is True
    assert b.tripped


def test_breaker_default_settings() -> None:
    assert Breaker() == Breaker(max_failures=None, window=60.0, quarantine_after=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Breaker().window = 1.0  # type: ignore[misc]
    assert Breaker(max_failures=0, window=0.5, quarantine_after=1).quarantine_after == 1


@pytest.mark.parametrize("bad", [-1, True, 1.5, "3"])
def test_breaker_rejects_bad_max_failures(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"Breaker\.max_failures must be an int >= 0"):
        Breaker(max_failures=bad)


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, True, "60", None])
def test_breaker_rejects_bad_window(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"Breaker\.window must be > 0 seconds"):
        Breaker(window=bad)


@pytest.mark.parametrize("bad", [0, -3, True, 2.0, None])
def test_breaker_rejects_bad_quarantine_after(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"Breaker\.quarantine_after must be an int >= 1"):
        Breaker(quarantine_after=bad)


# --- blame: which deaths count against a task ---------------------------------------------


def test_blame_only_a_death_on_a_fresh_worker() -> None:
    assert blame(0) is True  # the task was the worker's first: nothing else to blame
    assert blame(1) is False  # an earlier task may have left a leak behind
    assert blame(50) is False


# --- the errors the decisions produce travel with their notes -----------------------------


def test_quarantine_and_crash_loop_errors_survive_pickle_with_notes() -> None:
    poison = PoisonTaskError(crashes=3, fn_name="explode", args_repr="(1, 'x')", task_id=7)
    poison.add_note("attempt 1 pid 42: WorkerCrashedError: ...")
    loop = CrashLoopError(deaths=4, window=60.0)
    for err in (poison, loop):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err)
        assert str(back) == str(err)
        assert back.__dict__ == err.__dict__
    assert "explode(1, 'x')" in str(poison) and "3 times" in str(poison)
    assert pickle.loads(pickle.dumps(poison)).__notes__ == ["attempt 1 pid 42: WorkerCrashedError: ..."]
