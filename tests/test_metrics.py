"""resilpool.metrics: a pool's counters and gauges, scraped over loopback and parsed by prometheus-client."""

from __future__ import annotations

import urllib.request
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import workload
from conftest import RESULT_TIMEOUT

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import resilpool.metrics  # noqa: E402
from resilpool import Limits, SerializationError, WorkerCrashedError  # noqa: E402
from resilpool._core.tasks import Task, TaskBook  # noqa: E402
from resilpool.events import DURATION_BOUNDS_S  # noqa: E402


def _scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``{sample name: {labels: value}}`` of one scrape, parsed by prometheus-client's own parser."""
    with urllib.request.urlopen(url, timeout=RESULT_TIMEOUT) as resp:
        text = resp.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def _by_labels(samples: dict[tuple[tuple[str, str], ...], float], **fixed: str) -> dict[str, float]:
    """The samples of one family whose labels include ``fixed``, by their ``le`` label."""
    out = {}
    for labels, value in samples.items():
        d = dict(labels)
        if all(d.get(k) == v for k, v in fixed.items()):
            out[d["le"]] = value
    return out


def test_a_scrape_over_loopback_reports_every_task_of_a_plain_map_by_error_type_and_duration(make_pool: Any) -> None:
    # No track(): the pool itself counts each task's error type and duration.
    pool = make_pool(2, limits=Limits(max_tasks=5), monitor_interval=0.05)
    with resilpool.metrics.serve(pool, 0) as server:
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        assert list(pool.map(workload.inc, range(8), timeout=RESULT_TIMEOUT)) == list(range(1, 9))
        with pytest.raises(ZeroDivisionError):
            list(pool.map(workload.inverse, [0], timeout=RESULT_TIMEOUT))
        for msg in ("a", "b"):
            with pytest.raises(ValueError):
                list(pool.map(workload.raise_value_error, [msg], timeout=RESULT_TIMEOUT))
        with pytest.raises(WorkerCrashedError):
            list(pool.map(workload.kill_self, [9], timeout=RESULT_TIMEOUT))
        m = _scrape(server.url)

    assert m["resilpool_tasks_submitted_total"][()] == 12
    assert m["resilpool_tasks_succeeded_total"][()] == 8
    assert m["resilpool_tasks_failed_total"][()] == 4
    assert m["resilpool_task_errors_total"] == {
        (("error", "ValueError"),): 2,
        (("error", "ZeroDivisionError"),): 1,
        (("error", "resilpool.errors.WorkerCrashedError"),): 1,
    }
    assert m["resilpool_worker_exits_total"][(("reason", "crash"),)] == 1
    assert m["resilpool_worker_crashes_total"][()] == 1
    assert m["resilpool_workers_max"][()] == 2
    busy_idle = m["resilpool_workers_by_state"]
    assert set(busy_idle) == {(("state", "busy"),), (("state", "idle"),)}
    assert m["resilpool_tasks_pending"][()] == 0
    count = m["resilpool_task_duration_seconds_count"]
    assert count == {(("outcome", "succeeded"),): 8, (("outcome", "failed"),): 4}
    for outcome, n in (("succeeded", 8), ("failed", 4)):
        buckets = _by_labels(m["resilpool_task_duration_seconds_bucket"], outcome=outcome)
        assert buckets["+Inf"] == n
        les = sorted((float(le), v) for le, v in buckets.items())
        assert [le for le, _ in les[:-1]] == list(resilpool.metrics.DURATION_BUCKETS)
        assert all(a <= b for (_, a), (_, b) in zip(les, les[1:]))  # cumulative
        assert m["resilpool_task_duration_seconds_sum"][(("outcome", outcome),)] > 0
    for labels, rss in m.get("resilpool_worker_rss_bytes", {}).items():
        assert labels[0][0] == "pid" and rss > 0


def test_retries_are_counted_by_error_type(make_pool: Any, tmp_path: Path) -> None:
    pool = make_pool(1)
    metrics = resilpool.metrics.PoolMetrics(pool)
    fut = pool.submit(workload.crash_first_time, str(tmp_path / "marker"), "done", retry=1)
    assert fut.result(timeout=RESULT_TIMEOUT) == "done"
    families = {f.name: f for f in text_string_to_metric_families(metrics.generate().decode())}
    retried = {s.labels["error"]: s.value for s in families["resilpool_retried_attempts_by_error"].samples if s.name.endswith("_total")}
    assert retried == {"resilpool.errors.WorkerCrashedError": 1}
    assert [s.value for s in families["resilpool_task_retries"].samples] == [1]
    assert pool.stats().retried_errors == {"resilpool.errors.WorkerCrashedError": 1}


def test_track_is_deprecated_and_returns_the_future_unchanged(make_pool: Any) -> None:
    pool = make_pool(1)
    metrics = resilpool.metrics.PoolMetrics(pool)
    fut = pool.submit(workload.inc, 1)
    with pytest.warns(DeprecationWarning, match="track"):
        assert metrics.track(fut) is fut
    assert fut.result(timeout=RESULT_TIMEOUT) == 2
    metrics.close()


def test_a_rejected_submission_counts_as_a_serialization_error_of_no_duration(make_pool: Any) -> None:
    pool = make_pool(1)
    fut = pool.submit(workload.identity, workload.Unpicklable())
    with pytest.raises(SerializationError):
        fut.result(timeout=RESULT_TIMEOUT)
    s = pool.stats()
    assert s.failed == 1 and s.errors == {"resilpool.errors.SerializationError": 1}
    failed = s.durations["failed"]
    assert failed.cumulative == (1,) * len(failed.cumulative) and failed.sum_s == 0.0


def test_the_book_times_each_task_from_submission_into_fixed_buckets() -> None:
    # The TaskBook alone, with a fake clock: exact buckets, error names, and what a rebuild adds up.
    now = [0.0]  # from 0, each elapsed time is exactly the step taken
    book: TaskBook[int] = TaskBook(quarantine_after=2, max_startup_failures=3, startup_window_s=60.0, emit=lambda e: None, clock=lambda: now[0])

    def task(i: int) -> Task:
        return Task(i, workload.inc, (i,), {}, b"", Future(), None, None)

    tasks = [task(i) for i in range(1, 5)]
    book.submit(tasks)
    for t, took, err in zip(tasks, (0.001, 0.003, 2.0, 7200.0), (None, None, KeyError("k"), WorkerCrashedError("died"))):
        now[0] += took
        assert book.take(1) is t
        answered = book.answered(1, t.id)
        if err is None:
            book.succeeded(answered, 0)
        else:
            book.attempt_failed(answered, err, pid=1, elapsed=took, died=False, blamed=False)
        now[0] -= took
    book.check_invariants(idle=True)
    s = book.snapshot()
    bounds = DURATION_BOUNDS_S
    ok = dict(zip(bounds, s.succeeded_s.cumulative))
    assert ok[0.001] == 1 and ok[0.005] == 2 and s.succeeded_s.count == 2  # 0.001 falls in le="0.001"
    failed = dict(zip(bounds, s.failed_s.cumulative))
    assert failed[1.0] == 0 and failed[2.5] == 1 and failed[3600.0] == 1 and s.failed_s.count == 2  # 7200 s: +Inf only
    assert s.succeeded_s.sum_s == pytest.approx(0.004) and s.failed_s.sum_s == pytest.approx(7202.0)
    assert s.errors == (("KeyError", 1), ("resilpool.errors.WorkerCrashedError", 1))
    both = s + s
    assert both.errors == (("KeyError", 2), ("resilpool.errors.WorkerCrashedError", 2))
    assert both.failed_s.count == 4 and both.failed_s.sum_s == pytest.approx(2 * 7202.0)


def test_serve_binds_loopback_unless_told_and_checks_its_arguments(make_pool: Any) -> None:
    pool = make_pool(1)
    with pytest.raises(ValueError, match="port"):
        resilpool.metrics.serve(pool, 70000)
    with pytest.raises(ValueError, match="addr"):
        resilpool.metrics.serve(pool, 0, addr="")
    with pytest.raises(TypeError, match="ResilientPool"):
        resilpool.metrics.PoolMetrics(object())  # type: ignore[arg-type]
    server = resilpool.metrics.serve(pool, 0)
    try:
        assert server.addr == "127.0.0.1"
    finally:
        server.close()
        server.close()  # twice is fine
