"""The task state machine (resilpool._core.tasks) on its own: no processes, a fake clock.

A hypothesis stateful test drives a TaskBook the way a transport would (submit, take,
answer, fail, worker death, take-back, timers, drain, abort, breaker, rebuild) in any
order and calls ``check_invariants()`` after every step; it also checks that no
future is lost: every future is resolved or its task is still in the book.

The default run is short; ``HYPOTHESIS_PROFILE=ci`` runs 2,000 examples.
"""

from __future__ import annotations

import os
from concurrent.futures import CancelledError, Future
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from resilpool import errors
from resilpool._core.tasks import InvariantViolation, ProtocolViolation, Task, TaskBook, resolve
from resilpool.events import Event, ExitReason
from resilpool.retry import RetryPolicy
from resilpool.supervisor.policy import Kill

# The book logs quarantines and breaker trips at ERROR, as it should: these tests provoke them.
pytestmark = pytest.mark.resilpool_core_errors

settings.register_profile("default-tasks", max_examples=60, stateful_step_count=40, deadline=None, database=None)
settings.register_profile(
    "ci", max_examples=2000, stateful_step_count=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "default-tasks")

HOLDERS = (101, 102, 103)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def noop(*args: Any) -> None:
    return None


def make_task(task_id: int, retry: RetryPolicy | None = None) -> Task:
    return Task(task_id, noop, (task_id,), {}, b"", Future(), retry, None)


def make_book(clock: FakeClock, events: list[Event] | None = None, max_startup_failures: int = 3) -> TaskBook[int]:
    sink = events.append if events is not None else (lambda e: None)
    return TaskBook(quarantine_after=2, max_startup_failures=max_startup_failures, startup_window_s=60.0, emit=sink, clock=clock)


class TaskBookMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.book = make_book(self.clock)
        self.next_id = 1
        self.futures: dict[int, Future[Any]] = {}
        self.resolutions: dict[int, int] = {}
        self.started: dict[int, bool] = {}  # holder -> its first held task has started
        self.decoding: list[Task] = []  # answered, result with a decoder thread

    # --- helpers ----------------------------------------------------------------

    def _count(self, tid: int) -> Any:
        def done(_: Future[Any]) -> None:
            self.resolutions[tid] = self.resolutions.get(tid, 0) + 1

        return done

    def _busy(self) -> list[int]:
        return [h for h in HOLDERS if self.book.held(h)]

    # --- rules ------------------------------------------------------------------

    @rule(n=st.integers(1, 4), retries=st.sampled_from([None, 0, 1, 3]), backoff=st.booleans())
    def submit(self, n: int, retries: int | None, backoff: bool) -> None:
        policy = None
        if retries is not None:
            import tenacity

            policy = RetryPolicy(stop=tenacity.stop_after_attempt(retries + 1), wait=tenacity.wait_fixed(2.0 if backoff else 0.0))
        tasks = []
        for _ in range(n):
            t = make_task(self.next_id, policy)
            t.future.add_done_callback(self._count(t.id))
            self.futures[t.id] = t.future
            tasks.append(t)
            self.next_id += 1
        self.book.submit(tasks)

    @rule(data=st.data())
    def user_cancels_a_future(self, data: st.DataObject) -> None:
        if self.futures:
            fut = self.futures[data.draw(st.sampled_from(sorted(self.futures)))]
            fut.cancel()  # only a pending (never dispatched) future can be

    @rule(holder=st.sampled_from(HOLDERS), fresh=st.booleans(), n=st.integers(1, 3))
    def take(self, holder: int, fresh: bool, n: int) -> None:
        for _ in range(n):
            if self.book.take(holder, fresh_holder=fresh) is None:
                break
        if not fresh:
            self.book.release_fresh()

    @precondition(lambda self: bool(self._busy()))
    @rule(data=st.data(), ok=st.booleans())
    def answer(self, data: st.DataObject, ok: bool) -> None:
        h = data.draw(st.sampled_from(self._busy()))
        head = self.book.held(h)[0]
        task = self.book.answered(h, head.id)
        self.started.pop(h, None)
        if ok:
            self.book.succeeded(task, head.id * 2)
        else:
            self.book.attempt_failed(task, ValueError("boom"), pid=h, elapsed=0.1, died=False, blamed=False)

    @precondition(lambda self: bool(self._busy()))
    @rule(data=st.data(), bogus=st.booleans())
    def answer_ok_in_one_step(self, data: st.DataObject, bogus: bool) -> None:
        """The local core's hot path: answered, observed and succeeded at once."""
        h = data.draw(st.sampled_from(self._busy()))
        held = list(self.book.held(h))
        if bogus:  # not the head: refused as answered() refuses it, nothing moved
            with pytest.raises(ProtocolViolation):
                self.book.answered_ok(h, max(self.futures) + 1000, 0.1, None)
            assert list(self.book.held(h)) == held
            return
        head = held[0]
        self.book.answered_ok(h, head.id, 0.1, head.id * 2)
        self.started.pop(h, None)
        assert head.future.done() and head.future.result(timeout=0) == head.id * 2

    @precondition(lambda self: bool(self._busy()))
    @rule(data=st.data())
    def answer_to_a_decoder(self, data: st.DataObject) -> None:
        h = data.draw(st.sampled_from(self._busy()))
        task = self.book.answered(h, self.book.held(h)[0].id)
        self.started.pop(h, None)
        self.book.decoding(task)
        self.decoding.append(task)

    @precondition(lambda self: bool(self.decoding))
    @rule(data=st.data(), ok=st.booleans())
    def decoder_finishes(self, data: st.DataObject, ok: bool) -> None:
        task = self.decoding.pop(data.draw(st.integers(0, len(self.decoding) - 1)))
        if not self.book.decoded(task):
            return
        if ok:
            self.book.succeeded(task, task.id * 2)
        else:
            self.book.attempt_failed(task, ValueError("unpickled boom"), pid=None, elapsed=0.1, died=False, blamed=False)

    @precondition(lambda self: bool(self.decoding))
    @rule()
    def shutdown_gives_up_on_decoding(self) -> None:
        still = sum(1 for t in self.decoding if not t.future.done())
        n = self.book.abandon_decoding(lambda t: errors.SerializationError("gave up", part="result", task_id=t.id))
        assert n == still
        assert all(t.future.done() for t in self.decoding)

    @precondition(lambda self: bool(self._busy()))
    @rule(data=st.data())
    def answer_out_of_order_is_a_protocol_violation(self, data: st.DataObject) -> None:
        h = data.draw(st.sampled_from(self._busy()))
        held = list(self.book.held(h))
        bogus = max(self.futures) + 1000
        with pytest.raises(ProtocolViolation):
            self.book.answered(h, bogus)
        assert list(self.book.held(h)) == held  # nothing moved

    @precondition(lambda self: bool(self._busy()))
    @rule(data=st.data(), started=st.booleans(), blamed=st.booleans())
    def worker_dies(self, data: st.DataObject, started: bool, blamed: bool) -> None:
        h = data.draw(st.sampled_from(self._busy()))
        crashed = self.book.lost(h, started=started)
        assert (crashed is not None) == started
        if crashed is not None:
            err = Kill(pid=h, task_id=crashed.id, reason=ExitReason.CRASH, detail="test").to_error(crashed.id, crashed.fn_name, 0.5)
            self.book.attempt_failed(crashed, err, pid=h, elapsed=0.5, died=True, blamed=blamed)

    @precondition(lambda self: bool(self._busy()))
    @rule(data=st.data(), n=st.integers(0, 4))
    def worker_dies_with_its_answers_lost(self, data: st.DataObject, n: int) -> None:
        # A corrupt result channel: the first n held tasks ran, their answers never came.
        h = data.draw(st.sampled_from(self._busy()))
        held = list(self.book.held(h))
        ran = self.book.lost_started(h, n)
        assert ran == held[: min(n, len(held))]
        self.started.pop(h, None)
        for t in ran:
            err = Kill(pid=h, task_id=t.id, reason=ExitReason.CRASH, detail="protocol error").to_error(t.id, t.fn_name, 0.0)
            self.book.attempt_failed(t, err, pid=h, elapsed=0.0, died=True, blamed=False)

    @precondition(lambda self: bool(self._busy()))
    @rule(data=st.data())
    def take_back_unstarted(self, data: st.DataObject) -> None:
        h = data.draw(st.sampled_from(self._busy()))
        tail = [t.id for t in list(self.book.held(h))[1:]]  # the first one may have started
        ids = data.draw(st.lists(st.sampled_from(tail), unique=True)) if tail else []
        back = self.book.take_back(h, ids)
        assert sorted(t.id for t in back) == sorted(ids)

    @rule(dt=st.sampled_from([0.5, 1.0, 2.5, 10.0]))
    def time_passes(self, dt: float) -> None:
        self.clock.now += dt
        self.book.fire_timers()

    @rule(cancel=st.booleans())
    def drain(self, cancel: bool) -> None:
        self.book.drain(cancel_futures=cancel)

    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        if not self.futures:
            return
        ids = data.draw(st.lists(st.sampled_from(sorted(self.futures)), max_size=4, unique=True))
        for h, tasks in self.book.abort(ids, "test abort").items():
            held = list(self.book.held(h))
            head_started = data.draw(st.booleans())
            unstarted = [t for t in tasks if not (head_started and t is held[0])]
            back = self.book.take_back(h, [t.id for t in unstarted])
            assert all(t.future.done() for t in back)  # aborted: never queued again
            if head_started and held[0] in tasks:  # the transport kills the worker
                crashed = self.book.lost(h, started=True)
                assert crashed is not None and crashed.aborted == "test abort"
                self.book.attempt_failed(crashed, errors.WorkerCrashedError("aborted"), pid=h, elapsed=0.1, died=True, blamed=False)
                assert crashed.id not in self.book.tasks  # never retried

    @rule(paused=st.booleans())
    def pause(self, paused: bool) -> None:
        self.book.set_paused("low memory" if paused else None)

    @rule()
    def startup_failure(self) -> None:
        self.book.startup_failed(errors.WorkerCrashedError("init failed"))

    @rule(data=st.data())
    def rebuild(self, data: st.DataObject) -> None:
        """The core broke: salvage every task, a new book adopts them."""
        interrupted = []
        for h in list(self._busy()):
            t = self.book.lost(h, started=data.draw(st.booleans()))
            if t is not None:
                t.last_worker = (h, 0.2)
                interrupted.append(t)
        unstarted, interrupted = self.book.salvage(interrupted)
        assert not any(t in unstarted for t in self.decoding)  # answered: interrupted, if anything
        self.decoding.clear()  # the old core's decoders are gone with it
        new = make_book(self.clock)
        new.adopt(unstarted, [(t, errors.WorkerCrashedError("rebuilt", task_id=t.id)) for t in interrupted])
        self.book = new

    # --- invariants ----------------------------------------------------------------

    @invariant()
    def book_is_consistent(self) -> None:
        self.book.check_invariants()

    @invariant()
    def no_future_is_lost_or_resolved_twice(self) -> None:
        for tid, fut in self.futures.items():
            if not fut.done():
                assert tid in self.book.tasks, f"future of task {tid} unresolved but its task is gone"
            assert self.resolutions.get(tid, 0) <= 1


TaskBookMachine.TestCase.settings = settings.get_profile(_PROFILE)
# 2,000 examples take about a minute on a loaded 2-core machine: more than the default timeout.
test_task_book_state_machine = pytest.mark.timeout(900)(TaskBookMachine.TestCase)


# --- plain examples ------------------------------------------------------------------


def test_a_retry_waits_for_its_backoff_and_keeps_the_error_it_follows() -> None:
    clock = FakeClock()
    book = make_book(clock)
    t = make_task(1, RetryPolicy.attempts(1))
    t.retry = RetryPolicy(stop=__import__("tenacity").stop_after_attempt(2), wait=__import__("tenacity").wait_fixed(5.0))
    book.submit([t])
    assert book.take(7) is t
    err = ValueError("first")
    book.attempt_failed(book.answered(7, 1), err, pid=7, elapsed=0.1, died=False, blamed=False)
    assert t.due == clock.now + 5.0 and t.last_error is err
    assert book.take(7) is None
    clock.now += 5.0
    assert book.fire_timers() == 1
    assert book.take(7) is t and t.attempt == 2
    book.check_invariants()


def test_shutdown_cancel_futures_fails_a_waiting_retry_with_its_last_error_and_notes() -> None:
    clock = FakeClock()
    book = make_book(clock)
    import tenacity

    t = make_task(1, RetryPolicy(stop=tenacity.stop_after_attempt(3), wait=tenacity.wait_fixed(5.0)))
    queued = make_task(2)
    book.submit([t, queued])
    book.take(7)
    book.attempt_failed(book.answered(7, 1), ValueError("first"), pid=7, elapsed=0.1, died=False, blamed=False)
    book.drain(cancel_futures=True)
    assert queued.future.cancelled()
    exc = t.future.exception(timeout=0)
    assert isinstance(exc, ValueError)
    assert any("attempt 1 pid 7" in n for n in exc.__notes__)
    assert any("cancel_futures" in n for n in exc.__notes__)
    assert len(book) == 0
    book.check_invariants()


def test_quarantine_after_blamed_deaths_and_notes_for_every_attempt() -> None:
    book = make_book(FakeClock())
    t = make_task(1, RetryPolicy.attempts(5))
    book.submit([t])
    for attempt in (1, 2):
        assert book.take(attempt) is t
        crashed = book.lost(attempt, started=True)
        assert crashed is t
        book.attempt_failed(t, errors.WorkerCrashedError("died", pid=attempt), pid=attempt, elapsed=0.1, died=True, blamed=True)
    exc = t.future.exception(timeout=0)
    assert isinstance(exc, errors.PoisonTaskError)
    assert [n.split(":")[0] for n in exc.__notes__] == ["attempt 1 pid 1", "attempt 2 pid 2"]
    book.check_invariants()


def test_unstarted_tasks_of_a_lost_holder_go_back_to_the_front_in_order() -> None:
    book = make_book(FakeClock())
    tasks = [make_task(i) for i in range(1, 5)]
    book.submit(tasks)
    for _ in range(3):
        book.take(9)
    crashed = book.lost(9, started=True)
    assert crashed is tasks[0]
    book.attempt_failed(crashed, errors.WorkerCrashedError("x"), pid=9, elapsed=0.0, died=True, blamed=False)
    assert [book.take(8).id for _ in range(3)] == [2, 3, 4]  # type: ignore[union-attr]
    book.check_invariants()


def test_a_holder_lost_with_several_started_tasks_never_queues_them_again() -> None:
    # Behind a corrupt frame several tasks may have run with their answers lost: each is
    # handed back for attempt_failed (a task without retry fails: at most once), the
    # unstarted rest go back to the queue in order.
    book = make_book(FakeClock())
    tasks = [make_task(i) for i in range(1, 6)]
    book.submit(tasks)
    for _ in range(4):
        book.take(9)
    ran = book.lost_started(9, 2)
    assert ran == tasks[:2]
    for t in ran:
        book.attempt_failed(t, errors.WorkerCrashedError("x"), pid=9, elapsed=0.0, died=True, blamed=False)
        assert isinstance(t.future.exception(timeout=0), errors.WorkerCrashedError)
    assert [book.take(8).id for _ in range(3)] == [3, 4, 5]  # type: ignore[union-attr]
    book.check_invariants()


def test_drain_with_cancel_keeps_the_reserved_first_attempts_queued() -> None:
    # shutdown(cancel_futures=True) while workers are still starting: the transport keeps one
    # queued task per starting worker (the stdlib's call queue); the rest are cancelled.
    book = make_book(FakeClock())
    tasks = [make_task(i) for i in range(1, 6)]
    book.submit(tasks)
    book.drain(cancel_futures=True, keep_queued=2)
    assert [t.future.cancelled() for t in tasks] == [False, False, True, True, True]
    assert [book.take(7).id for _ in range(2)] == [1, 2]  # type: ignore[union-attr]
    assert book.take(7) is None
    book.check_invariants()


def test_tripping_the_breaker_fails_unassigned_tasks_with_notes_but_not_held_ones() -> None:
    import tenacity

    book = make_book(FakeClock(), max_startup_failures=0)
    held = make_task(1)
    retried = make_task(2, RetryPolicy(stop=tenacity.stop_after_attempt(3), wait=tenacity.wait_fixed(9.0)))
    book.submit([held, retried])
    book.take(5)
    book.take(6)
    book.attempt_failed(book.answered(6, 2), ValueError("no"), pid=6, elapsed=0.0, died=False, blamed=False)
    assert book.startup_failed(ValueError("init"))
    exc = retried.future.exception(timeout=0)
    assert isinstance(exc, errors.CrashLoopError)
    assert any(n.startswith("attempt 1 pid 6") for n in exc.__notes__)
    assert not held.future.done()
    assert book.take(5) is None
    book.check_invariants()


def test_abort_cancels_queued_first_attempts_and_marks_held_tasks() -> None:
    book = make_book(FakeClock())
    a, b, c = make_task(1, RetryPolicy.attempts(3)), make_task(2), make_task(3)
    book.submit([a, b, c])
    book.take(4)
    held = book.abort([1, 2], "the caller gave up")
    assert b.future.cancelled() and not c.future.done()
    assert held == {4: [a]} and a.aborted == "the caller gave up"
    crashed = book.lost(4, started=True)
    assert crashed is a
    book.attempt_failed(a, errors.WorkerCrashedError("killed"), pid=4, elapsed=0.1, died=True, blamed=False)
    assert isinstance(a.future.exception(timeout=0), errors.WorkerCrashedError)  # not retried
    book.check_invariants()


def test_an_aborted_task_taken_back_from_a_worker_fails_as_cancelled() -> None:
    book = make_book(FakeClock())
    t = make_task(1)
    book.submit([t])
    book.take(4)
    book.abort([1], "stop")
    assert book.take_back(4, [1]) == [t]
    with pytest.raises(CancelledError, match="aborted"):
        t.future.result(timeout=0)
    book.check_invariants()


def test_check_invariants_catches_a_task_in_two_places_and_a_lost_one() -> None:
    book = make_book(FakeClock())
    t = make_task(1)
    book.submit([t])
    book._queued.append(t)  # a bug: twice in the queue
    with pytest.raises(InvariantViolation, match="two places"):
        book.check_invariants()
    book._queued.clear()
    with pytest.raises(InvariantViolation, match="in no place"):
        book.check_invariants()


def test_snapshot_counts_add_up() -> None:
    book = make_book(FakeClock())
    book.submit([make_task(1), make_task(2)])
    t = book.take(3)
    assert t is not None
    book.succeeded(book.answered(3, t.id), 1)
    s = book.snapshot()
    assert (s.submitted, s.completed, s.unresolved, s.held, s.queued) == (2, 1, 1, 0, 1)


@pytest.mark.parametrize(
    ("kill", "cls"),
    [
        (Kill(pid=5, task_id=1, reason=ExitReason.MEMORY, rss=300, limit=200), errors.MemoryLimitError),
        (Kill(pid=5, task_id=1, reason=ExitReason.TIMEOUT, timeout=2.0, elapsed=2.5), errors.TaskTimeoutError),
        (Kill(pid=5, task_id=1, reason=ExitReason.STALL, timeout=3.0, elapsed=3.1, cpu_s=0.01), errors.TaskStalledError),
        (Kill(pid=5, task_id=1, reason=ExitReason.SHUTDOWN, detail="joblib aborted the call"), errors.WorkerCrashedError),
    ],
)
def test_kill_maps_to_one_error_per_reason(kill: Kill, cls: type[BaseException]) -> None:
    import pickle

    err = kill.to_error(1, "f", 1.0, address="tcp://x:1")
    assert type(err) is cls
    assert err.task_id == 1 and err.pid == 5  # type: ignore[attr-defined]
    assert pickle.loads(pickle.dumps(err)).address == "tcp://x:1"  # type: ignore[attr-defined]
    if cls is errors.WorkerCrashedError:
        assert "joblib aborted the call" in str(err)
    if cls is errors.TaskTimeoutError:
        assert err.elapsed == 2.5  # type: ignore[attr-defined]


# --- resolve(): the stdlib's set_result/set_exception under one lock --------------------------


@pytest.mark.parametrize("outcome", ["value", "error"])
def test_resolve_wakes_waiters_and_runs_callbacks_once(outcome: str) -> None:
    import concurrent.futures as cf
    import threading

    fut: Future[Any] = Future()
    fut.set_running_or_notify_cancel()
    seen: list[Future[Any]] = []
    fut.add_done_callback(seen.append)
    got: list[set[Future[Any]]] = []
    waiting = threading.Event()

    def waiter() -> None:
        waiting.set()
        done, _ = cf.wait([fut], timeout=30, return_when=cf.FIRST_COMPLETED)  # an installed waiter
        got.append(done)

    t = threading.Thread(target=waiter)
    t.start()
    assert waiting.wait(timeout=30)
    err = ValueError("boom")
    assert resolve(fut, 42, None) if outcome == "value" else resolve(fut, None, err)
    t.join(timeout=30)
    assert not t.is_alive() and got == [{fut}]
    assert seen == [fut]
    if outcome == "value":
        assert fut.result(timeout=0) == 42
    else:
        assert fut.exception(timeout=0) is err
    assert list(cf.as_completed([fut], timeout=30)) == [fut]
    # Resolved once: a second resolve changes nothing and runs no callback again.
    assert not resolve(fut, 43, None)
    assert not resolve(fut, None, RuntimeError("late"))
    assert seen == [fut]
    assert (fut.result(timeout=0) == 42) if outcome == "value" else (fut.exception(timeout=0) is err)


def test_resolve_refuses_a_cancelled_future_and_logs_a_callbacks_base_exception(caplog: pytest.LogCaptureFixture) -> None:
    cancelled: Future[Any] = Future()
    assert cancelled.cancel()
    assert not resolve(cancelled, 1, None)
    assert cancelled.cancelled()

    def exits(_: Future[Any]) -> None:
        raise SystemExit(3)

    fut: Future[Any] = Future()
    fut.add_done_callback(exits)
    with caplog.at_level("ERROR", logger="concurrent.futures"):
        assert resolve(fut, 1, None)  # the SystemExit is logged, not raised
    assert fut.result(timeout=0) == 1
    assert any("exception calling callback" in r.getMessage() for r in caplog.records)
