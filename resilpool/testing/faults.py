"""Seeded fault injection for a :class:`~resilpool.ResilientPool` (chaos testing).

A :class:`FaultInjector` attached to a pool injects, at a given rate, the faults a
supervised pool must survive, and logs each one with its seed::

    with FaultInjector(pool, seed=1234, rate=0.1) as chaos:
        futures = [pool.submit(work, x, retry=3) for x in items]
        ...
    print(chaos.summary())

What it owns: the random streams (every choice comes from ``random.Random`` seeded
from ``seed``), the fault log, a temporary directory of per-task markers, and one
thread (``resilpool-chaos``) that fires the process faults.  It touches the pool only
through its documented test hooks: ``pool.set_task_wrapper()`` (set on attach, restored
on detach), ``pool.config``, ``pool.workers()``, ``pool.stats()`` and ``pool.break_core_for_test()``.

Two families of faults:

*Task faults* are decided when a task is submitted (in the submitting thread, from
the stream ``Random(f"{seed}:tasks")``) and travel with the task: the call is wrapped
in :func:`_faulty_call`, which fires the fault in the worker on the task's *first*
attempt only (a marker file in the injector's directory, created with ``O_EXCL``,
records that it fired), so a retried idempotent task then succeeds.

- ``exit``: the task calls ``os._exit(code)`` before running.
- ``hang``: the task SIGSTOPs its own worker (a hang the pool's ``stall_timeout`` or
  ``task_timeout`` must catch; enabled only when the pool has one of them).
- ``balloon``: the task's worker grows past ``Limits.max_rss`` and holds it
  (enabled only when the pool has ``max_rss``).
- ``delay``: the result comes back late (the task sleeps after running).
- ``junk_frame``: the task writes 64 random bytes (claiming a huge frame) on its
  worker's result pipe, then goes on; the pool must kill that worker, fail or retry
  the task, and affect no other.
- ``truncated_frame``: the task writes the first part of a frame on the result pipe,
  then its worker dies (SIGKILL).
- ``result_pickle_raises``: the task's result raises ``KeyboardInterrupt`` or
  ``SystemExit`` when the worker pickles it.
- ``result_unpickle_raises``: the task's result raises ``KeyboardInterrupt`` or
  ``SystemExit`` when the parent unpickles it.

Which task gets which task fault depends only on the seed and the order of the
submissions: with one submitting thread a run replays them exactly.

*Process faults* are decided the same way (a submission draws them, from the same
stream) and fired by the injector's thread when the pool's progress reaches that
submission, so they spread over the run.  Which worker or task they hit depends on
timing and cannot be replayed exactly (its choice among the candidates is drawn from
``Random(f"{seed}:process")``):

- ``kill_busy``: SIGKILL a worker mid-task (the worker is stopped first and its slot
  read, so the log names the task it was running).
- ``kill_idle``: SIGKILL a worker that runs no task (tasks may be queued to it).
- ``stop``: SIGSTOP a worker mid-task (needs ``stall_timeout`` or ``task_timeout``).
- ``break_core``: break the executor core (the rebuild path); at most
  :data:`MAX_CORE_BREAKS_PER_MINUTE` per minute, below the pool's own rebuild limit,
  and never while the previous break's rebuild is under way (it would break the same core).
- ``stop_idle``: SIGSTOP a worker that runs no task (tasks may be queued to it); never
  resumed by the injector (until it detaches).
- ``stop_resume``: SIGSTOP a worker mid-task and SIGCONT it after a random delay (from
  a tenth of the stall timeout to twice it): the task either goes on or is caught as
  stalled.

The kinds above the line in :class:`FaultKind` make :data:`DEFAULT_WEIGHTS`; the
newer ones (``stop_idle``, ``stop_resume``, the frame and result faults) are drawn only
when asked for (``kinds=``, or :data:`ALL_WEIGHTS`). A hung initializer is not a
submission's fault: build the pool with :class:`HangingInitializer`.

Only ready workers are killed: a worker killed while starting counts toward the
crash-loop breaker, which would (rightly) break the pool.
"""

from __future__ import annotations

import bisect
import collections
import enum
import heapq
import itertools
import logging
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from .._pool import ResilientPool

__all__ = [
    "ALL_WEIGHTS",
    "DEFAULT_WEIGHTS",
    "Fault",
    "FaultInjector",
    "FaultKind",
    "HangingInitializer",
    "MAX_CORE_BREAKS_PER_MINUTE",
    "MID_TASK_PROCESS_FAULTS",
]

log = logging.getLogger("resilpool.testing")

#: Core breaks the injector allows itself per rolling minute (the pool stops rebuilding
#: after 5 breaks within 60 s, on purpose; the injector stays below that).
MAX_CORE_BREAKS_PER_MINUTE: Final = 3

_TICK_S: Final = 0.005  # how often the injector's thread looks for a process fault to fire
_BUSY_PATIENCE_S: Final = 2.0  # how long a mid-task fault waits for a busy worker before giving up
_MAX_HITS_PER_TASK: Final = 2  # mid-task process faults on the attempts of one task, at most
_MIB: Final = 1 << 20


class FaultKind(str, enum.Enum):
    """The faults an injector can inject; ``per_task`` ones travel with a task."""

    KILL_BUSY = "kill_busy"  #: SIGKILL a worker mid-task
    KILL_IDLE = "kill_idle"  #: SIGKILL a worker between tasks
    STOP = "stop"  #: SIGSTOP a worker mid-task (needs stall_timeout or task_timeout)
    BREAK_CORE = "break_core"  #: break the executor core: the rebuild path
    EXIT = "exit"  #: the task calls os._exit (first attempt only)
    HANG = "hang"  #: the task SIGSTOPs its worker (first attempt; needs stall_timeout or task_timeout)
    BALLOON = "balloon"  #: the task's worker grows past max_rss (first attempt; needs max_rss)
    DELAY = "delay"  #: the task's result comes back late (first attempt)
    # --- not in DEFAULT_WEIGHTS ---
    STOP_IDLE = "stop_idle"  #: SIGSTOP a worker between tasks
    STOP_RESUME = "stop_resume"  #: SIGSTOP a worker mid-task, SIGCONT it later
    JUNK_FRAME = "junk_frame"  #: the task writes random bytes on its result pipe (first attempt)
    TRUNCATED_FRAME = "truncated_frame"  #: the task writes part of a frame, then its worker dies (first attempt)
    RESULT_PICKLE_RAISES = "result_pickle_raises"  #: the result raises a BaseException when pickled (first attempt)
    RESULT_UNPICKLE_RAISES = "result_unpickle_raises"  #: ... when unpickled in the parent (first attempt)

    @property
    def per_task(self) -> bool:
        return self in _PER_TASK

    @property
    def fails_attempt(self) -> bool:
        """A task fault that makes the attempt it hits fail (the task may have run: not for non-idempotent work)."""
        return self in _FAILS_ATTEMPT


_PER_TASK: Final = frozenset(
    {
        FaultKind.EXIT,
        FaultKind.HANG,
        FaultKind.BALLOON,
        FaultKind.DELAY,
        FaultKind.JUNK_FRAME,
        FaultKind.TRUNCATED_FRAME,
        FaultKind.RESULT_PICKLE_RAISES,
        FaultKind.RESULT_UNPICKLE_RAISES,
    }
)
_FAILS_ATTEMPT: Final = frozenset(
    {
        FaultKind.EXIT,
        FaultKind.HANG,
        FaultKind.BALLOON,
        FaultKind.JUNK_FRAME,
        FaultKind.TRUNCATED_FRAME,
        FaultKind.RESULT_PICKLE_RAISES,
        FaultKind.RESULT_UNPICKLE_RAISES,
    }
)
#: Process faults that hit a worker mid-task (the chaos checks explain a failure by them).
MID_TASK_PROCESS_FAULTS: Final = frozenset({FaultKind.KILL_BUSY, FaultKind.STOP, FaultKind.STOP_RESUME})

#: Relative weights of the kinds when a fault is due (the default mix).
DEFAULT_WEIGHTS: Final[Mapping[FaultKind, float]] = {
    FaultKind.KILL_BUSY: 4.0,
    FaultKind.KILL_IDLE: 1.0,
    FaultKind.STOP: 1.0,
    FaultKind.BREAK_CORE: 0.2,
    FaultKind.EXIT: 3.0,
    FaultKind.HANG: 1.0,
    FaultKind.BALLOON: 0.5,
    FaultKind.DELAY: 3.0,
}

#: Every kind, the newer ones included (for the soak and the scenarios that model them).
ALL_WEIGHTS: Final[Mapping[FaultKind, float]] = {
    **DEFAULT_WEIGHTS,
    FaultKind.STOP_IDLE: 0.5,
    FaultKind.STOP_RESUME: 1.0,
    FaultKind.JUNK_FRAME: 0.5,
    FaultKind.TRUNCATED_FRAME: 0.5,
    FaultKind.RESULT_PICKLE_RAISES: 0.5,
    FaultKind.RESULT_UNPICKLE_RAISES: 0.5,
}


@dataclass(slots=True, kw_only=True)
class Fault:
    """One fault the injector decided on, and what became of it.

    ``call`` is the submission that drew it (0-based, counted from attach).  For a
    task fault ``label`` names the task; ``fired`` is known once the injector is
    detached (or :meth:`FaultInjector.refresh` ran): the task's first attempt started
    and the fault went off (``pid`` is then the worker it hit).  For a process fault
    ``pid``/``task_id`` are the worker hit and the pool's id of the task it was
    running (None: idle), ``fired`` is False if no target was found in time.
    """

    seq: int
    kind: FaultKind
    seed: int
    call: int
    label: Hashable = None
    detail: str = ""
    fired: bool | None = None
    pid: int | None = None
    task_id: int | None = None
    at_s: float | None = None  #: seconds since attach when it fired

    def line(self) -> str:
        """One log line; carries the seed so a failing run can be replayed."""
        where = ""
        if self.pid is not None:
            where += f" pid={self.pid}"
        if self.task_id is not None:
            where += f" task_id={self.task_id}"
        if self.label is not None:
            where += f" label={self.label!r}"
        when = f" at={self.at_s:.3f}s" if self.at_s is not None else ""
        state = {None: "planned", True: "fired", False: "not fired"}[self.fired]
        detail = f" ({self.detail})" if self.detail else ""
        return f"chaos seed={self.seed} fault#{self.seq} call={self.call} {self.kind.value}{where}{when} {state}{detail}"


@dataclass(frozen=True, slots=True)
class _TaskFault:
    """What a wrapped task does on its first attempt (travels pickled with the task)."""

    kind: str
    marker: str
    exit_code: int = 0
    delay_s: float = 0.0
    balloon_bytes: int = 0
    hold_s: float = 0.0
    junk: bytes = b""
    raises: str = ""  #: "KeyboardInterrupt" or "SystemExit" (result faults)


def _first_attempt(marker: str) -> bool:
    """True exactly once per marker: on the first attempt that gets this far."""
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    except OSError:  # the injector was detached and removed its directory: no more faults
        return False
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)
    return True


def _faulty_call(fault: _TaskFault, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run ``fn(*args, **kwargs)`` in a worker with an injected fault (first attempt only)."""
    first = _first_attempt(fault.marker)
    if first:
        if fault.kind == "exit":
            os._exit(fault.exit_code)
        elif fault.kind == "hang":
            os.kill(os.getpid(), signal.SIGSTOP)
            # Resumed (not killed): the pool's supervisor let it go on; run the task.
        elif fault.kind == "balloon":
            block = b"\1" * fault.balloon_bytes  # resident at once
            deadline = time.monotonic() + fault.hold_s
            while time.monotonic() < deadline:  # the supervisor should kill us meanwhile
                time.sleep(0.01)
            del block
        elif fault.kind in ("junk_frame", "truncated_frame"):
            _write_frame_fault(fault)
    value = fn(*args, **kwargs)
    if first and fault.kind == "delay":
        time.sleep(fault.delay_s)
    elif first and fault.kind == "result_pickle_raises":
        return _RaisesWhenPickled(fault.raises)
    elif first and fault.kind == "result_unpickle_raises":
        return _RaisesWhenUnpickled(fault.raises)
    return value


def _base_exception(name: str) -> BaseException:
    return KeyboardInterrupt("injected") if name == "KeyboardInterrupt" else SystemExit("injected")


def _write_frame_fault(fault: _TaskFault) -> None:
    """Junk on the worker's result pipe, or the first part of a frame and then death."""
    from .._core.worker import result_fd

    fd = result_fd()
    if fd is None:  # not in a pool worker (a Dask worker): nothing to corrupt
        return
    os.write(fd, fault.junk)
    if fault.kind == "truncated_frame":
        os.kill(os.getpid(), signal.SIGKILL)


class _RaisesWhenPickled:
    """A result whose ``__reduce__`` raises a BaseException (in the worker)."""

    def __init__(self, raises: str) -> None:
        self.raises = raises

    def __reduce__(self) -> Any:
        raise _base_exception(self.raises)


def _raise_when_unpickled(raises: str) -> Any:
    raise _base_exception(raises)


class _RaisesWhenUnpickled:
    """A result that pickles fine and raises a BaseException when unpickled (in the parent)."""

    def __init__(self, raises: str) -> None:
        self.raises = raises

    def __reduce__(self) -> Any:
        return (_raise_when_unpickled, (self.raises,))


@dataclass(frozen=True, slots=True)
class HangingInitializer:
    """A pool ``initializer`` whose first ``hangs`` calls (across all workers) hang for ever.

    A hung call blocks in ``time.sleep`` without using CPU, as an initializer waiting on
    a lock or a dead server would; later calls run ``inner(*initargs)``. Calls are
    counted with marker files in ``marker_dir`` (the directory must exist and outlive
    the pool), so the count holds across worker processes and start methods::

        init = HangingInitializer(str(tmp_path), hangs=2)
        pool = ResilientPool(2, initializer=init, limits=Limits(init_timeout=3))
    """

    marker_dir: str
    hangs: int = 1
    inner: Callable[..., object] | None = None

    def __call__(self, *initargs: Any) -> None:
        for i in range(self.hangs):
            if _first_attempt(os.path.join(self.marker_dir, f"init-hang-{i}")):
                while True:
                    time.sleep(3600)
        if self.inner is not None:
            self.inner(*initargs)


def _sub_seed(seed: int, stream: str) -> str:
    return f"{seed}:{stream}"


def _fn_label(fn: Callable[..., Any], args: tuple[Any, ...]) -> str:
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    if name == "call_chunk" and args:  # a map chunk: name the user's function
        inner = args[0]
        name = "chunk of " + (getattr(inner, "__qualname__", None) or type(inner).__qualname__)
    return name


class FaultInjector:
    """Injects seeded faults into one pool while attached; see the module docstring.

    Args:
        pool: the :class:`~resilpool.ResilientPool` to torment.
        seed: every random choice comes from ``random.Random`` streams seeded from it.
            None: a random seed (logged, and in :attr:`seed`, so the run can be replayed).
        rate: probability that a submitted task draws a fault (0 to 1).
        kinds: which faults, as an iterable of :class:`FaultKind` (or their values) with the
            default weights, or a mapping kind -> weight.  None: every kind the pool's
            limits can catch (``stop``/``hang`` need ``stall_timeout`` or ``task_timeout``,
            ``balloon`` needs ``max_rss``).
        delay: ``(low, high)`` seconds of a ``delay`` fault.
        label: ``label(fn, args, kwargs)`` names a task in the fault log
            (default: its function's name).

    Raises:
        ValueError: a bad rate, an unknown kind, or a kind the pool cannot survive
            (``hang``/``stop`` without a stall or task timeout: it would hang forever;
            ``balloon`` without ``max_rss``).
    """

    def __init__(
        self,
        pool: ResilientPool,
        *,
        seed: int | None = None,
        rate: float = 0.1,
        kinds: Iterable[FaultKind | str] | Mapping[FaultKind | str, float] | None = None,
        delay: tuple[float, float] = (0.01, 0.2),
        label: Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any]], Hashable] | None = None,
    ) -> None:
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            raise ValueError(f"FaultInjector.rate must be a number from 0 to 1, got {rate!r}")
        if seed is None:
            seed = random.SystemRandom().randrange(2**32)
        elif isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"FaultInjector.seed must be an int or None, got {seed!r}")
        lo, hi = delay
        if not 0 <= lo <= hi:
            raise ValueError(f"FaultInjector.delay must be (low, high) with 0 <= low <= high, got {delay!r}")
        self.pool = pool
        self.seed = seed
        self.rate = float(rate)
        self._label = label
        limits = pool.limits
        self._can_hang = limits.stall_timeout is not None or limits.task_timeout is not None
        self._max_rss: int | None = limits.max_rss  # type: ignore[assignment]
        # A delay must not look like a hang: keep it well under the stall timeout.
        cap = min((t for t in (limits.stall_timeout, limits.task_timeout) if t is not None), default=None)
        self._delay = (lo, hi) if cap is None else (min(lo, cap / 4), min(hi, cap / 4))
        self._weights = self._resolve_kinds(kinds)
        self._kinds = sorted(self._weights, key=lambda k: list(FaultKind).index(k))
        cum = list(itertools.accumulate(self._weights[k] for k in self._kinds))
        self._cum = cum
        self._task_rng = random.Random(_sub_seed(seed, "tasks"))
        self._proc_rng = random.Random(_sub_seed(seed, "process"))
        self._lock = threading.Lock()
        self._calls = 0
        self.faults: list[Fault] = []  # in decision order; read it after detach
        self._by_label: dict[Hashable, list[Fault]] = collections.defaultdict(list)
        self._markers: dict[int, str] = {}  # fault seq -> marker path (task faults)
        self._due: collections.deque[Fault] = collections.deque()  # process faults to fire, in order
        self._core_breaks: collections.deque[float] = collections.deque()
        self._rebuild_due: int | None = None  # pool.stats().rebuilds once the last break's rebuild is done
        self._dir: str | None = None
        self._prev_wrapper: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._t0 = 0.0
        self._resolved0 = 0
        self._stopped: set[int] = set()
        self._hits: collections.Counter[int] = collections.Counter()  # pool task id -> mid-task faults
        self._resumes: list[tuple[float, int]] = []  # heap of (when, pid): stop_resume's SIGCONTs due
        # The scale of a stop_resume's pause: around the stall timeout, so both outcomes happen.
        self._stall_s = float(limits.stall_timeout) if limits.stall_timeout is not None else 0.5
        self.attached = False

    # --- configuration ------------------------------------------------------------

    def _resolve_kinds(self, kinds: Iterable[FaultKind | str] | Mapping[FaultKind | str, float] | None) -> dict[FaultKind, float]:
        if kinds is None:
            weights = dict(DEFAULT_WEIGHTS)
            if not self._can_hang:
                del weights[FaultKind.STOP], weights[FaultKind.HANG]
            if self._max_rss is None:
                del weights[FaultKind.BALLOON]
            return weights
        if isinstance(kinds, Mapping):
            pairs = list(kinds.items())
        else:
            pairs = [(k, None) for k in kinds]
        weights = {}
        for k, w in pairs:
            try:
                kind = FaultKind(k)
            except ValueError:
                raise ValueError(f"FaultInjector.kinds: unknown fault {k!r}; known: {', '.join(x.value for x in FaultKind)}") from None
            weight = ALL_WEIGHTS[kind] if w is None else w
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
                raise ValueError(f"FaultInjector.kinds: the weight of {kind.value} must be a number >= 0, got {w!r}")
            if kind in (FaultKind.STOP, FaultKind.HANG) and not self._can_hang:
                raise ValueError(
                    f"FaultInjector.kinds: {kind.value} needs a pool with Limits.stall_timeout or task_timeout"
                    " (nothing else would ever end the hang)"
                )
            if kind is FaultKind.BALLOON and self._max_rss is None:
                raise ValueError("FaultInjector.kinds: balloon needs a pool with Limits.max_rss")
            if weight > 0:
                weights[kind] = float(weight)
        return weights

    # --- attach / detach ----------------------------------------------------------

    def attach(self) -> FaultInjector:
        """Start injecting: wrap the pool's submissions and start the injector's thread."""
        if self.attached:
            raise RuntimeError("this FaultInjector is already attached")
        self._dir = tempfile.mkdtemp(prefix=f"resilpool-chaos-{self.seed}-")
        self._t0 = time.monotonic()
        s = self.pool.stats()
        self._resolved0 = s.completed + s.failed + s.cancelled
        self._prev_wrapper = self.pool.set_task_wrapper(self._wrap)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="resilpool-chaos", daemon=True)
        self._thread.start()
        self.attached = True
        log.info("chaos seed=%d attached: rate=%.3f kinds=%s", self.seed, self.rate, ",".join(f"{k.value}:{self._weights[k]:g}" for k in self._kinds))
        return self

    def detach(self) -> None:
        """Stop injecting (tasks already wrapped still fire their faults, until the marker
        directory is removed here); resume workers this injector stopped and that still live."""
        if not self.attached:
            return
        self.attached = False
        if self.pool.set_task_wrapper(self._prev_wrapper) != self._wrap:
            self.pool.set_task_wrapper(self._wrap)  # someone else's wrapper is on top: leave it
        self._stop.set()
        if self._thread is not None and threading.current_thread() is not self._thread:
            self._thread.join(10.0)
        with self._lock:
            for f in self._due:
                f.fired = False
                f.detail = (f.detail + "; " if f.detail else "") + "still due at detach"
            self._due.clear()
        self.refresh()
        for f in self.faults:
            if f.fired is None:
                f.fired = False
        self._resumes.clear()
        live = {w.pid for w in self.pool.workers()}
        for pid in self._stopped & live:  # not caught (yet): let the pool's shutdown see it exit
            _signal(pid, signal.SIGCONT)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
        log.info("%s", self.summary())

    def __enter__(self) -> FaultInjector:
        return self if self.attached else self.attach()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.detach()

    # --- the submit-time seam: decide, wrap ---------------------------------------

    def _wrap(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
        if self._prev_wrapper is not None:
            fn, args, kwargs = self._prev_wrapper(fn, args, kwargs)
        if not self.attached:
            return fn, args, kwargs
        with self._lock:
            call = self._calls
            self._calls += 1
            rng = self._task_rng
            if not self._kinds or rng.random() >= self.rate:
                return fn, args, kwargs
            kind = self._kinds[bisect.bisect_right(self._cum, rng.random() * self._cum[-1])]
            fault = Fault(seq=len(self.faults), kind=kind, seed=self.seed, call=call)
            spec: _TaskFault | None = None
            if kind.per_task:
                assert self._dir is not None
                marker = os.path.join(self._dir, f"{fault.seq}.fired")
                self._markers[fault.seq] = marker
                if kind is FaultKind.EXIT:
                    code = rng.choice((0, 1, 3, 13, 70, 255))
                    spec = _TaskFault("exit", marker, exit_code=code)
                    fault.detail = f"os._exit({code})"
                elif kind is FaultKind.HANG:
                    spec = _TaskFault("hang", marker)
                    fault.detail = "SIGSTOP self"
                elif kind is FaultKind.BALLOON:
                    assert self._max_rss is not None
                    extra = rng.randint(32, 96) * _MIB
                    size = self._max_rss + extra
                    hold = max(5.0, 40 * float(self.pool.config.monitor_interval or 0.2))
                    spec = _TaskFault("balloon", marker, balloon_bytes=size, hold_s=hold)
                    fault.detail = f"{size // _MIB} MiB, max_rss {self._max_rss // _MIB} MiB"
                elif kind is FaultKind.DELAY:
                    d = rng.uniform(*self._delay)
                    spec = _TaskFault("delay", marker, delay_s=d)
                    fault.detail = f"{d * 1000:.0f} ms"
                else:
                    spec = self._draw_new_task_fault(kind, marker, fault, rng)
            else:
                self._due.append(fault)
            try:
                fault.label = self._label(fn, args, kwargs) if self._label is not None else _fn_label(fn, args)
            except Exception as exc:  # a user's label function must not break submit
                fault.label = f"<label failed: {exc!r}>"
            self.faults.append(fault)
            self._by_label[fault.label].append(fault)
        if log.isEnabledFor(logging.INFO):
            log.info("%s", fault.line())  # when drawn; a process fault is logged again when it fires
        if spec is None:
            return fn, args, kwargs
        return _faulty_call, (spec, fn, args, kwargs), {}

    def _draw_new_task_fault(self, kind: FaultKind, marker: str, fault: Fault, rng: random.Random) -> _TaskFault:
        """The frame and result faults (see the module docstring); draws from the tasks stream."""
        if kind is FaultKind.JUNK_FRAME:
            # A length field with its high bits set: a frame reader that believes it waits for ever.
            length = rng.getrandbits(64) | (1 << 62)
            junk = length.to_bytes(8, "little") + rng.getrandbits(56 * 8).to_bytes(56, "little")
            fault.detail = f"64 random bytes, claiming {length} bytes"
            return _TaskFault("junk_frame", marker, junk=junk)
        if kind is FaultKind.TRUNCATED_FRAME:
            from .._core import protocol

            body_len = rng.randint(16, 4096)
            frame = protocol.HEADER.pack(body_len, protocol.Kind.SUCCEEDED, 0, 0.0) + rng.randbytes(body_len)
            cut = rng.randrange(1, len(frame))
            fault.detail = f"{cut} of {len(frame)} bytes, then SIGKILL"
            return _TaskFault("truncated_frame", marker, junk=frame[:cut])
        raises = rng.choice(("KeyboardInterrupt", "SystemExit"))
        where = "pickled in the worker" if kind is FaultKind.RESULT_PICKLE_RAISES else "unpickled in the parent"
        fault.detail = f"{raises} when {where}"
        return _TaskFault(kind.value, marker, raises=raises)

    # --- what happened ------------------------------------------------------------

    def refresh(self) -> None:
        """Update the task faults' ``fired``/``pid`` from their markers."""
        for f in self.faults:
            marker = self._markers.get(f.seq)
            if marker is None or f.fired is not None:
                continue
            try:
                with open(marker) as fh:
                    text = fh.read().strip()
            except OSError:
                continue
            f.fired = True
            if text.isdigit():
                f.pid = int(text)

    def faults_for(self, label: Hashable) -> list[Fault]:
        """The faults drawn by submissions with this label."""
        return list(self._by_label.get(label, ()))

    def counts(self) -> dict[str, int]:
        """Faults fired, by kind (task faults count once they fired)."""
        self.refresh()
        c = collections.Counter(f.kind.value for f in self.faults if f.fired)
        return dict(sorted(c.items()))

    @property
    def fired(self) -> int:
        """How many faults went off."""
        self.refresh()
        return sum(1 for f in self.faults if f.fired)

    @property
    def calls(self) -> int:
        """Submissions seen while attached."""
        return self._calls

    def log_lines(self, last: int | None = None) -> list[str]:
        """The fault log, one line per fault (each with the seed)."""
        faults = self.faults if last is None else self.faults[-last:]
        return [f.line() for f in faults]

    def summary(self) -> str:
        """One line: seed, rate, submissions, faults fired by kind."""
        counts = self.counts()
        by_kind = " ".join(f"{k}={n}" for k, n in counts.items()) or "none"
        return f"chaos seed={self.seed} rate={self.rate:g}: {self._calls} submissions, {sum(counts.values())} faults fired ({by_kind}) of {len(self.faults)} drawn"

    # --- the injector's thread: process faults ------------------------------------

    def _run(self) -> None:
        due_since: dict[int, float] = {}  # fault seq -> when the pool's progress reached it
        while not self._stop.wait(_TICK_S):
            try:
                self._resume_due()
                self._step(due_since)
            except Exception:  # the injector must never be what fails a test run
                log.error("chaos seed=%d: the injector's thread failed a step", self.seed, exc_info=True)

    def _step(self, due_since: dict[int, float]) -> None:
        with self._lock:
            due = list(self._due)
        if not due:
            return
        s = self.pool.stats()
        resolved = s.completed + s.failed + s.cancelled - self._resolved0
        now = time.monotonic()
        for f in due:
            if resolved < f.call - 2 * self.pool.max_workers:
                break  # the pool has not got that far yet
            due_since.setdefault(f.seq, now)
        while due and due[0].seq in due_since:
            fault = due[0]
            outcome = self._fire(fault, now)
            if outcome is None and now - due_since[fault.seq] < _BUSY_PATIENCE_S:
                return  # no target now: try again next tick
            with self._lock:
                self._due.popleft()
            due.pop(0)
            del due_since[fault.seq]
            fault.fired = bool(outcome)
            if not outcome:
                fault.detail = (fault.detail + "; " if fault.detail else "") + "no target in time"
            log.info("%s", fault.line())
            if outcome:
                return  # one fault per tick

    def _resume_due(self) -> None:
        """SIGCONT the workers a ``stop_resume`` fault stopped, once their delay is over (injector thread)."""
        now = time.monotonic()
        while self._resumes and self._resumes[0][0] <= now:
            _, pid = heapq.heappop(self._resumes)
            self._stopped.discard(pid)
            _signal(pid, signal.SIGCONT)

    def _pick_target(self, views: list[Any], *, idle: bool) -> int | None:
        """A worker's pid, drawn from the process stream: an idle one, or one running a task."""
        if idle:
            candidates = [w for w in views if w.task_id is None]
        else:
            # Not the same task again and again: when it is the only one left running, the pool
            # would (rightly) quarantine a task whose every attempt dies.
            candidates = [w for w in views if w.task_id is not None and self._hits[w.task_id] < _MAX_HITS_PER_TASK]
        if not candidates:
            return None
        candidates.sort(key=lambda w: w.pid)
        return int(candidates[self._proc_rng.randrange(len(candidates))].pid)

    def _fire_new(self, fault: Fault, views: list[Any]) -> bool | None:
        """``stop_idle`` and ``stop_resume`` (see the module docstring); None: no target yet."""
        pid = self._pick_target(views, idle=fault.kind is FaultKind.STOP_IDLE)
        if pid is None or not _signal(pid, signal.SIGSTOP):
            return None
        task_id = _running_task(self.pool, pid)
        if fault.kind is FaultKind.STOP_RESUME:
            if task_id is None:  # it finished meanwhile: not what this fault is about
                _signal(pid, signal.SIGCONT)
                return None
            delay = self._proc_rng.uniform(0.1, 2.0) * self._stall_s
            heapq.heappush(self._resumes, (time.monotonic() + delay, pid))
            fault.detail = f"SIGSTOP, SIGCONT after {delay:.2f}s"
            self._hits[task_id] += 1
        else:
            fault.detail = "SIGSTOP" + ("" if task_id is None else " (it had just started a task)")
        self._stopped.add(pid)
        fault.pid = pid
        fault.task_id = task_id
        fault.at_s = time.monotonic() - self._t0
        return True

    def _fire(self, fault: Fault, now: float) -> bool | None:
        """Try to fire a process fault now; None: no target yet."""
        kind = fault.kind
        if kind is FaultKind.BREAK_CORE:
            breaks = self._core_breaks
            while breaks and breaks[0] < now - 60.0:
                breaks.popleft()
            if len(breaks) >= MAX_CORE_BREAKS_PER_MINUTE:
                fault.detail = f"skipped: {MAX_CORE_BREAKS_PER_MINUTE} core breaks in the last minute already"
                return False
            stats = self.pool.stats()
            if stats.broken:
                return False
            if self._rebuild_due is not None and stats.rebuilds < self._rebuild_due:
                # A second break would land on the core that is failing already (the pool's
                # current core until the new one takes over): one rebuild for two breaks.
                fault.detail = "skipped: the previous core break's rebuild is under way"
                return False
            breaks.append(now)
            self._rebuild_due = stats.rebuilds + 1
            self.pool.break_core_for_test()
            fault.at_s = now - self._t0
            return True
        views = [w for w in self.pool.workers() if w.ready and not w.retiring and w.pid not in self._stopped]
        if kind in (FaultKind.STOP_IDLE, FaultKind.STOP_RESUME):
            return self._fire_new(fault, views)
        pid = self._pick_target(views, idle=kind is FaultKind.KILL_IDLE)
        if pid is None:
            return None
        task_id: int | None = None
        if kind is not FaultKind.KILL_IDLE:
            # Stop it, then look: the slot cannot move on while we decide.
            if not _signal(pid, signal.SIGSTOP):
                return None
            task_id = _running_task(self.pool, pid)
            if task_id is None:
                _signal(pid, signal.SIGCONT)
                return None
        if kind is FaultKind.STOP:
            self._stopped.add(pid)
            fault.detail = "SIGSTOP"
        else:
            if not _signal(pid, signal.SIGKILL):
                return None
            fault.detail = "SIGKILL"
        fault.pid = pid
        fault.task_id = task_id
        if task_id is not None:
            self._hits[task_id] += 1
        fault.at_s = time.monotonic() - self._t0
        return True


def _running_task(pool: ResilientPool, pid: int) -> int | None:
    for w in pool.workers():
        if w.pid == pid:
            return w.task_id
    return None


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
    except OSError:
        return False
    return True
