"""Pure tests of the supervisor's settings and decisions: no processes, a fake clock.

Covers ``Limits`` parsing and validation, ``parse_size``, ``policy.decide`` on
made-up :class:`WorkerSample` values and ``lifetime_with_jitter`` with a seeded
``random.Random``.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from typing import Any

import pytest

import resilpool
from resilpool import ExitReason, Limits
from resilpool.supervisor.limits import parse_size
from resilpool.supervisor.policy import STALL_CPU_FRACTION, Kill, Retire, WorkerSample, decide, lifetime_with_jitter

MiB = 2**20
GiB = 2**30

# --- parse_size --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, 1),
        (4096, 4096),
        (float(MiB), MiB),
        ("100", 100),
        ("100B", 100),
        ("512MiB", 512 * MiB),
        ("512mib", 512 * MiB),
        ("2GB", 2 * 10**9),
        ("2G", 2 * 10**9),
        ("1.5GiB", int(1.5 * GiB)),
        (".5GiB", GiB // 2),
        ("10 kb", 10_000),
        ("  3 MiB  ", 3 * MiB),
        ("1KiB", 1024),
        ("1TiB", 2**40),
        ("1tb", 10**12),
    ],
)
def test_parse_size_accepts_bytes_and_unit_strings(value: Any, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize(
    "value",
    ["", "MiB", "lots", "12 parsecs", "1e9", "-5MiB", "5 Mi B", "1.2.3GB", "0", "0.1B", 0, -1, -1.5, 0.5,
     True, False, None, [1], math.nan, math.inf],
)
def test_parse_size_rejects_bad_values_naming_field_and_value(value: Any) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(value, "Limits.max_rss")
    msg = str(info.value)
    assert "Limits.max_rss" in msg
    assert repr(value) in msg


# --- Limits -------------------------------------------------------------------------


def test_limits_is_exported_and_defaults_to_no_limit() -> None:
    assert resilpool.Limits is Limits
    lim = Limits()
    assert (lim.soft_max_rss, lim.max_rss, lim.max_tasks, lim.max_lifetime, lim.task_timeout, lim.stall_timeout) == (None,) * 6
    assert lim.min_available == 0.03  # a fraction of total RAM by default


def test_limits_normalizes_sizes_to_bytes_and_durations_to_float() -> None:
    lim = Limits(soft_max_rss="150MiB", max_rss="1.5GiB", max_tasks=5, max_lifetime=60, task_timeout=2, stall_timeout=0.5, min_available="1GB")
    assert lim.soft_max_rss == 150 * MiB
    assert lim.max_rss == int(1.5 * GiB)
    assert lim.max_tasks == 5
    assert lim.max_lifetime == 60.0 and isinstance(lim.max_lifetime, float)
    assert lim.task_timeout == 2.0 and isinstance(lim.task_timeout, float)
    assert lim.stall_timeout == 0.5
    assert lim.min_available == 10**9
    assert Limits(max_rss="1KiB") == Limits(max_rss=1024)
    assert hash(Limits(max_rss="1KiB")) == hash(Limits(max_rss=1024))


def test_limits_is_frozen() -> None:
    lim = Limits(max_rss="1GiB")
    with pytest.raises(dataclasses.FrozenInstanceError):
        lim.max_rss = 1  # type: ignore[misc]


def test_limits_takes_keywords_only() -> None:
    with pytest.raises(TypeError):
        Limits("1GiB")  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("soft_max_rss", "lots"),
        ("soft_max_rss", 0),
        ("soft_max_rss", -1),
        ("max_rss", "-5MiB"),
        ("max_rss", "12 parsecs"),
        ("max_rss", 0),
        ("max_rss", True),
        ("max_tasks", 0),
        ("max_tasks", -3),
        ("max_tasks", 2.5),
        ("max_tasks", "5"),
        ("max_tasks", True),
        ("max_lifetime", 0),
        ("max_lifetime", -1.0),
        ("max_lifetime", math.inf),
        ("task_timeout", 0),
        ("task_timeout", -0.5),
        ("task_timeout", math.nan),
        ("task_timeout", "30"),
        ("task_timeout", True),
        ("stall_timeout", 0.0),
        ("stall_timeout", -2),
        ("min_available", 0),
        ("min_available", 0.0),
        ("min_available", -0.5),
        ("min_available", "nope"),
        ("min_available", True),
    ],
)
def test_limits_rejects_invalid_values_naming_field_and_value(field: str, value: Any) -> None:
    with pytest.raises(ValueError) as info:
        Limits(**{field: value})
    msg = str(info.value)
    assert f"Limits.{field}" in msg
    assert repr(value) in msg


@pytest.mark.parametrize(("soft", "hard"), [("300MiB", "200MiB"), (2 * GiB, "1GiB"), (1025, 1024)])
def test_limits_rejects_soft_above_hard(soft: Any, hard: Any) -> None:
    with pytest.raises(ValueError, match=r"Limits\.soft_max_rss .*must be <= max_rss") as info:
        Limits(soft_max_rss=soft, max_rss=hard)
    # The values, in bytes, are named too.
    assert str(parse_size(soft)) in str(info.value)
    assert str(parse_size(hard)) in str(info.value)


def test_limits_allows_soft_equal_to_hard_and_either_alone() -> None:
    assert Limits(soft_max_rss="1GiB", max_rss=GiB).soft_max_rss == GiB
    assert Limits(soft_max_rss="1GiB").max_rss is None
    assert Limits(max_rss="1GiB").soft_max_rss is None


def test_min_available_is_a_fraction_or_a_size() -> None:
    total = 16 * GiB
    assert Limits(min_available=0.25).min_available_bytes(total) == 4 * GiB
    assert Limits().min_available_bytes(total) == int(0.03 * total)
    assert Limits(min_available="512MiB").min_available_bytes(total) == 512 * MiB
    assert Limits(min_available=2 * GiB).min_available_bytes(total) == 2 * GiB
    assert Limits(min_available=None).min_available_bytes(total) is None


def test_needs_monitor_only_for_sampled_limits() -> None:
    assert not Limits(min_available=None).needs_monitor()
    assert not Limits(min_available=None, max_tasks=3).needs_monitor()  # counted by the core
    for field in ("soft_max_rss", "max_rss", "max_lifetime", "task_timeout", "stall_timeout", "min_available"):
        value = "1GiB" if field.endswith("rss") or field == "min_available" else 1.0
        assert Limits(**{"min_available": None, field: value}).needs_monitor(), field


# --- lifetime_with_jitter -------------------------------------------------------------


def test_lifetime_without_limit_is_none() -> None:
    assert lifetime_with_jitter(None, random.Random(1)) is None


def test_lifetime_jitter_stays_within_ten_percent_and_spreads() -> None:
    rng = random.Random(20240611)
    draws = [lifetime_with_jitter(100.0, rng) for _ in range(200)]
    assert all(d is not None and 90.0 <= d <= 110.0 for d in draws)
    values = [d for d in draws if d is not None]
    # Workers must not all restart at once: the draws spread over the band, on both sides.
    assert len(set(values)) == len(values)
    assert min(values) < 95.0 and max(values) > 105.0


def test_lifetime_jitter_replays_with_the_same_seed() -> None:
    a = [lifetime_with_jitter(1.0, random.Random(7)) for _ in range(3)]
    b = [lifetime_with_jitter(1.0, random.Random(7)) for _ in range(3)]
    assert a == b
    rng1, rng2 = random.Random(7), random.Random(7)
    assert [lifetime_with_jitter(1.0, rng1) for _ in range(5)] == [lifetime_with_jitter(1.0, rng2) for _ in range(5)]


# --- decide ---------------------------------------------------------------------------

NOW = 1000.0  # the fake clock


def sample(**kw: Any) -> WorkerSample:
    base: dict[str, Any] = dict(
        pid=4242,
        rss=50 * MiB,
        age_s=10.0,
        lifetime_s=None,
        task_id=0,
        task_started=None,
        task_timeout=None,
        cpu_window_s=None,
        retiring=False,
    )
    base.update(kw)
    return WorkerSample(**base)


def running(elapsed: float, task_id: int = 7, **kw: Any) -> WorkerSample:
    return sample(task_id=task_id, task_started=NOW - elapsed, **kw)


def test_decide_nothing_to_do() -> None:
    lim = Limits(soft_max_rss="100MiB", max_rss="200MiB", max_lifetime=60, task_timeout=5, stall_timeout=2)
    assert decide(sample(), lim, NOW) is None
    assert decide(running(1.0, cpu_window_s=1.0), lim, NOW) is None
    assert decide(sample(), Limits(), NOW) is None


@pytest.mark.parametrize("busy", [False, True])
def test_decide_kills_over_max_rss_at_once(busy: bool) -> None:
    lim = Limits(soft_max_rss="100MiB", max_rss="200MiB", task_timeout=1.0)
    s = running(5.0, rss=300 * MiB) if busy else sample(rss=300 * MiB)
    action = decide(s, lim, NOW)
    # Memory comes first, even before an expired timeout; the kill is unconditional.
    assert action == Kill(pid=4242, task_id=None, reason=ExitReason.MEMORY, rss=300 * MiB, limit=200 * MiB)


def test_decide_max_rss_is_strictly_above() -> None:
    assert decide(sample(rss=200 * MiB), Limits(max_rss="200MiB"), NOW) is None
    assert isinstance(decide(sample(rss=200 * MiB + 1), Limits(max_rss="200MiB"), NOW), Kill)


def test_decide_times_out_a_running_task() -> None:
    action = decide(running(0.75, task_id=9), Limits(task_timeout=0.5), NOW)
    assert action == Kill(pid=4242, task_id=9, reason=ExitReason.TIMEOUT, timeout=0.5, elapsed=0.75)
    assert decide(running(0.5), Limits(task_timeout=0.5), NOW) is None  # strictly over


def test_decide_timeout_counts_from_the_task_start_only() -> None:
    lim = Limits(task_timeout=0.5)
    # Idle, or a task sent but not started (no start time): never timed out, however old the worker.
    assert decide(sample(age_s=1e6), lim, NOW) is None
    assert decide(sample(task_id=3, task_started=None, age_s=1e6), lim, NOW) is None
    assert decide(running(0.1, age_s=1e6), lim, NOW) is None


def test_decide_task_override_beats_the_pool_timeout() -> None:
    assert decide(running(5.0, task_timeout=60.0), Limits(task_timeout=0.5), NOW) is None
    action = decide(running(1.0, task_timeout=0.5), Limits(), NOW)
    assert isinstance(action, Kill) and action.reason is ExitReason.TIMEOUT and action.timeout == 0.5


def test_decide_calls_a_task_without_cpu_stalled() -> None:
    lim = Limits(stall_timeout=2.0)
    action = decide(running(3.0, task_id=5, cpu_window_s=0.001), lim, NOW)
    assert action == Kill(pid=4242, task_id=5, reason=ExitReason.STALL, timeout=2.0, elapsed=3.0, cpu_s=0.001)


@pytest.mark.parametrize(
    ("elapsed", "cpu", "stalled"),
    [
        (3.0, 0.0, True),
        (3.0, STALL_CPU_FRACTION * 2.0 * 0.99, True),
        (3.0, STALL_CPU_FRACTION * 2.0, False),  # a little CPU is enough to be alive
        (3.0, 1.5, False),
        (1.9, 0.0, False),  # the task has not run for stall_timeout yet
        (2.0, 0.0, True),
        (3.0, None, False),  # not enough history to judge
    ],
)
def test_decide_stall_threshold(elapsed: float, cpu: float | None, stalled: bool) -> None:
    action = decide(running(elapsed, cpu_window_s=cpu), Limits(stall_timeout=2.0), NOW)
    assert (action is not None and action.reason is ExitReason.STALL) is stalled


def test_decide_idle_worker_is_never_stalled() -> None:
    assert decide(sample(cpu_window_s=0.0), Limits(stall_timeout=1.0), NOW) is None


def test_decide_timeout_before_stall() -> None:
    action = decide(running(5.0, cpu_window_s=0.0), Limits(task_timeout=4.0, stall_timeout=1.0), NOW)
    assert isinstance(action, Kill) and action.reason is ExitReason.TIMEOUT


def test_decide_retires_over_soft_max_rss_even_mid_task() -> None:
    lim = Limits(soft_max_rss="100MiB", max_rss="200MiB")
    assert decide(sample(rss=150 * MiB), lim, NOW) == Retire(pid=4242, reason=ExitReason.SOFT_MEMORY)
    # Mid-task too: retiring lets the task finish and keeps its result.
    assert decide(running(1.0, rss=150 * MiB), lim, NOW) == Retire(pid=4242, reason=ExitReason.SOFT_MEMORY)
    assert decide(sample(rss=100 * MiB), lim, NOW) is None


def test_decide_retires_after_lifetime() -> None:
    lim = Limits(max_lifetime=10.0)
    assert decide(sample(age_s=10.5, lifetime_s=10.4), lim, NOW) == Retire(pid=4242, reason=ExitReason.LIFETIME)
    assert decide(sample(age_s=10.3, lifetime_s=10.4), lim, NOW) is None
    # A running task is not interrupted: the worker is only retired (replaced between tasks).
    assert decide(running(1.0, age_s=99.0, lifetime_s=10.4), lim, NOW) == Retire(pid=4242, reason=ExitReason.LIFETIME)


def test_decide_soft_memory_before_lifetime() -> None:
    lim = Limits(soft_max_rss="100MiB", max_lifetime=1.0)
    action = decide(sample(rss=150 * MiB, age_s=5.0, lifetime_s=1.0), lim, NOW)
    assert action == Retire(pid=4242, reason=ExitReason.SOFT_MEMORY)


def test_decide_does_not_retire_twice() -> None:
    lim = Limits(soft_max_rss="100MiB", max_lifetime=1.0)
    assert decide(sample(rss=150 * MiB, age_s=5.0, lifetime_s=1.0, retiring=True), lim, NOW) is None


@pytest.mark.parametrize(
    ("s", "reason"),
    [
        (sample(rss=300 * MiB, retiring=True), ExitReason.MEMORY),
        (running(2.0, retiring=True), ExitReason.TIMEOUT),
        (running(1.5, cpu_window_s=0.0, retiring=True), ExitReason.STALL),
    ],
)
def test_decide_still_kills_a_retiring_worker(s: WorkerSample, reason: ExitReason) -> None:
    # A retiring worker still runs its last task: that task can still blow its limits.
    lim = Limits(soft_max_rss="100MiB", max_rss="200MiB", task_timeout=1.8, stall_timeout=1.0)
    action = decide(s, lim, NOW)
    assert isinstance(action, Kill) and action.reason is reason


def test_actions_are_frozen_records() -> None:
    k = Kill(pid=1, task_id=None, reason=ExitReason.MEMORY)
    with pytest.raises(dataclasses.FrozenInstanceError):
        k.pid = 2  # type: ignore[misc]
    assert re.search("MEMORY", repr(k))
