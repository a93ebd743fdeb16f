"""The half of a core that other threads call, the same for every transport.

Callers' threads (``submit``), the monitor (``retire_worker``, ``kill_worker``,
``pause_dispatch``) and the pool (``shutdown``, ``abort``, ``adopt``) never touch a
core's tables: they append to its inbox under ``_lock`` and wake its owner thread,
which takes everything over on its next turn (:meth:`CoreInbox._take_submitted`, the
command deque) and carries the commands out with ``match``.  A transport subclasses
:class:`CoreInbox`, creates ``_book``, ``_counters`` and ``_thread``, and implements ``_wake``.

Ownership: ``_accepting`` and ``_submitted`` are guarded by ``_lock`` (a caller's
``submit_many`` lands as one step; the owner empties the deque under it);
``_commands`` is a deque appended by callers and popped by the owner only;
``_wake_pending`` is a hint (a lost update only costs one extra wake-up).  Counters are
read through the book's ``snapshot()``, which reads ints only.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import Any

from ..events import ExitReason
from ..supervisor.policy import Kill
from .commands import Abort, Adopt, BreakForTest, CheckInvariants, Command, KillWorker, RetireWorker, SetPaused, Shutdown
from .tasks import CoreCounts, CoreGone, Task, TaskBook, WorkerCounters, rebuilt_error

__all__ = ["CoreBrokenForTest", "CoreInbox"]


class CoreBrokenForTest(RuntimeError):
    """Raised on a core's owner thread by :meth:`CoreInbox.inject_break` (the rebuild path's test hook)."""


class CoreInbox:
    """Submit, commands and counters of a core; see the module docstring."""

    _book: TaskBook[Any]
    _counters: WorkerCounters
    _thread: threading.Thread

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._accepting = True
        self._submitted: deque[Task] = deque()
        self._commands: deque[Command] = deque()
        self._wake_pending = False
        self._owner_done = threading.Event()  # set as the owner thread ends (_owner_main)

    # --- called from any thread ----------------------------------------------------

    def submit(self, task: Task) -> None:
        """Queue a task; raises CoreGone if this core no longer accepts work."""
        with self._lock:
            if not self._accepting:
                raise CoreGone
            self._submitted.append(task)
        if not self._wake_pending:
            self._wake()

    def submit_many(self, tasks: Iterable[Task]) -> None:
        """Queue several tasks with one wake-up."""
        with self._lock:
            if not self._accepting:
                raise CoreGone
            self._submitted.extend(tasks)
        self._wake()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def retire_worker(self, pid: int, reason: ExitReason) -> None:
        """Retire a worker after its running task."""
        self._command(RetireWorker(pid=pid, reason=reason))

    def kill_worker(self, kill: Kill) -> None:
        """Kill worker ``kill.pid`` now (with ``kill.task_id``: only if it still runs that task);
        the task it costs fails with ``kill.to_error``."""
        self._command(KillWorker(kill=kill))

    def pause_dispatch(self, reason: str) -> None:
        """Start no new task until :meth:`resume_dispatch`."""
        self._command(SetPaused(reason=reason))

    def resume_dispatch(self) -> None:
        self._command(SetPaused(reason=None))

    def abort(self, task_ids: Iterable[int], reason: str) -> None:
        """Abort tasks: unstarted ones are cancelled, the workers of started ones killed."""
        self._command(Abort(task_ids=frozenset(task_ids), reason=reason))

    def inject_break(self) -> None:
        """Test hook: break the core from inside, as an internal bug would."""
        self._command(BreakForTest())

    def adopt(self, unstarted: list[Task], interrupted: list[Task]) -> None:
        """Take over tasks from a broken core: ``interrupted`` ones had started there."""
        self._command(Adopt(unstarted=unstarted, interrupted=interrupted))

    def shutdown(self, *, cancel_futures: bool, kill_running: bool = False, timeout: float | None = None) -> None:
        """Stop accepting work; finish what was submitted (see ``ResilientPool.shutdown``);
        with ``timeout``, give up waiting that many seconds from now (both transports do;
        the pool still escalates to ``kill_running`` should a core not stop)."""
        with self._lock:
            self._accepting = False
        self._command(Shutdown(cancel_futures=cancel_futures, kill_running=kill_running, timeout_s=timeout))

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the owner thread to finish; True if it has.

        Waits on an Event, not in ``Thread.join``: a KeyboardInterrupt landing inside
        ``Thread.join`` on Python 3.11 and 3.12 leaves the Thread marked stopped while it
        still runs, and a Ctrl-C during ``shutdown(wait=True)`` must be survivable.
        """
        if threading.current_thread() is self._thread:
            return False
        if not self._owner_done.wait(timeout):
            return False
        self._thread.join(1.0)  # past its last line already: only the interpreter's teardown is left
        return True

    def unresolved(self) -> int:
        """Tasks submitted to this core and not yet resolved (approximate from other threads)."""
        return len(self._book) + len(self._submitted)

    def counts(self) -> tuple[int, int]:
        """``(pending, running)``: running means held by a worker or in flight; approximate."""
        running = self._book.held_count
        return max(0, self.unresolved() - running), running

    def snapshot(self) -> CoreCounts:
        """The counters now, frozen (any thread)."""
        return self._counters.snapshot(self._book)

    def check_invariants(self, *, idle: bool = False, timeout: float = 10.0) -> None:
        """Check the book's invariants on the owner thread, between two of its steps.

        Raises :class:`~resilpool._core.tasks.InvariantViolation`. With ``idle`` the caller
        says nothing submitted is unresolved: a task left anywhere is a violation too.
        """
        if not self._thread.is_alive():
            self._book.check_invariants(idle=idle)  # no owner thread any more: nothing moves
            return
        reply: Future[None] = Future()
        self._command(CheckInvariants(reply=reply, idle=idle))
        try:
            reply.result(timeout)
        except FuturesTimeout:
            if self._thread.is_alive():
                raise
            self._book.check_invariants(idle=idle)  # it finished meanwhile

    # --- the owner thread's side ------------------------------------------------------

    def _owner_main(self, run: Callable[[], None]) -> None:
        """The owner thread's target: ``run``, then tell :meth:`join` it has finished."""
        try:
            run()
        finally:
            self._owner_done.set()

    def _command(self, cmd: Command) -> None:
        self._commands.append(cmd)
        self._wake()

    def _wake(self) -> None:
        """Wake the owner thread (from any thread); set ``_wake_pending`` first."""
        raise NotImplementedError

    def _execute_shared(self, cmd: Command) -> bool:
        """Owner thread: carry out a command every transport handles alike; False for the rest."""
        match cmd:
            case Adopt(unstarted=unstarted, interrupted=interrupted):
                self._book.adopt(unstarted, [(t, rebuilt_error(t)) for t in interrupted])
            case SetPaused(reason=reason):
                self._book.set_paused(reason)
            case CheckInvariants():
                self._answer_check(cmd)
            case BreakForTest():
                raise CoreBrokenForTest("core broken on purpose by the test hook")
            case _:
                return False
        return True

    def _answer_check(self, cmd: CheckInvariants) -> None:
        """Owner thread, between two steps: carry out a :class:`CheckInvariants` command."""
        try:
            self._book.check_invariants(idle=cmd.idle)
        except BaseException as exc:
            cmd.reply.set_exception(exc)
        else:
            cmd.reply.set_result(None)

    def _take_submitted(self) -> list[Task]:
        """Owner thread: hand everything submitted so far to the book; returns it."""
        if not self._submitted:  # the hot loop's common case; a racing submit wakes us again
            return []
        with self._lock:
            items = list(self._submitted)
            self._submitted.clear()
        if items:
            self._book.submit(items)
        return items
