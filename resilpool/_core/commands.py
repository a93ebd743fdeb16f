"""The commands other threads send to a core (local or Dask), one frozen dataclass each.

Callers' threads, the monitor and the pool put a command in the core's inbox and wake
its owner thread, which carries it out with ``match`` (see ``executor.py`` and
``dask_core.py``). Commands are imperative and carry values, never closures: a kill
carries a :class:`~resilpool.supervisor.policy.Kill`, which maps itself to the error
its task fails with.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from ..events import ExitReason
from ..supervisor.policy import Kill

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from .._pool import ResilientPool
    from ..events import Event
    from ..supervisor.limits import Limits
    from .executor import CoreConfig
    from .tasks import CoreCounts, Task

__all__ = [
    "Abort",
    "Adopt",
    "Backend",
    "BreakForTest",
    "CheckInvariants",
    "Command",
    "CoreLike",
    "KillWorker",
    "MonitorLike",
    "RetireWorker",
    "SetPaused",
    "Shutdown",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class RetireWorker:
    """Retire a worker after its running task; a replacement starts now."""

    pid: int
    reason: ExitReason


@dataclass(frozen=True, slots=True, kw_only=True)
class KillWorker:
    """Kill ``kill.pid`` now (with ``kill.task_id``: only if it still runs that task)."""

    kill: Kill


@dataclass(frozen=True, slots=True, kw_only=True)
class SetPaused:
    """Start no new task (``reason``) or start them again (None)."""

    reason: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Shutdown:
    """Stop accepting work; drain. See ``ResilientPool.shutdown``."""

    cancel_futures: bool
    kill_running: bool = False
    #: give up waiting this many seconds after the command: kill what runs, cancel what
    #: waits, fail what is being unpickled (None: wait for the drain to finish)
    timeout_s: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Abort:
    """Abort these tasks: unstarted ones are cancelled, started ones' workers killed."""

    task_ids: frozenset[int]
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Adopt:
    """Take over a broken core's tasks: ``interrupted`` ones had started there."""

    unstarted: list[Task]
    interrupted: list[Task]


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckInvariants:
    """Check the task tables between two steps of the owner thread; the outcome goes to ``reply``.

    With ``idle``, also require that no task is unresolved (the caller knows the pool is idle).
    """

    reply: Future[None]
    idle: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakForTest:
    """Test hook: make the owner thread fail as if from an internal bug."""


Command: TypeAlias = "RetireWorker | KillWorker | SetPaused | Shutdown | Abort | Adopt | CheckInvariants | BreakForTest"


class CoreLike(Protocol):
    """What the pool and the monitor use of a core (local or Dask): the typed seam.

    Every method may be called from any thread; each puts a command in the core's inbox
    or reads something the owner thread publishes whole.
    """

    @property
    def broken(self) -> BaseException | None: ...

    @property
    def thread(self) -> threading.Thread: ...

    def submit(self, task: Task) -> None: ...

    def submit_many(self, tasks: Iterable[Task]) -> None: ...

    def worker_views(self) -> tuple[Any, ...]: ...

    def read_slot(self, slot: int) -> tuple[int, float | None, int]: ...

    def retire_worker(self, pid: int, reason: ExitReason) -> None: ...

    def kill_worker(self, kill: Kill) -> None: ...

    def pause_dispatch(self, reason: str) -> None: ...

    def resume_dispatch(self) -> None: ...

    def abort(self, task_ids: Iterable[int], reason: str) -> None: ...

    def shutdown(self, *, cancel_futures: bool, kill_running: bool = False, timeout: float | None = None) -> None: ...

    def join(self, timeout: float | None = None) -> bool: ...

    def counts(self) -> tuple[int, int]: ...

    def snapshot(self) -> CoreCounts: ...

    def salvage(self) -> tuple[list[Task], list[Task]]: ...

    def adopt(self, unstarted: list[Task], interrupted: list[Task]) -> None: ...

    def inject_break(self) -> None: ...

    def check_invariants(self, *, idle: bool = False, timeout: float = 10.0) -> None: ...


class MonitorLike(Protocol):
    """What the pool uses of its monitor: the local psutil sampler (``supervisor.monitor``),
    a backend's telemetry, or nothing when sampling is off. ``start``/``stop`` are called by
    the pool's constructor and ``shutdown``; the two readings by ``stats()``/``workers()``
    from any thread (the monitor republishes them whole)."""

    @property
    def samples(self) -> Mapping[int, Any]: ...

    @property
    def peak_rss(self) -> int: ...

    def start(self) -> None: ...

    def stop(self, timeout: float = 5.0) -> None: ...


class Backend(Protocol):
    """Where a pool's tasks run instead of local worker processes (``backend=``; today
    ``resilpool.dask.DaskBackend``). It makes the pool's cores (again on each rebuild) and
    the monitor that samples its workers, which are not the pool's children."""

    def make_core(
        self,
        config: CoreConfig,
        *,
        emit: Callable[[Event], None],
        on_broken: Callable[[Any, BaseException], None] | None,
        limits: Limits,
        serializer: Any,
    ) -> CoreLike: ...

    def make_monitor(self, pool: ResilientPool) -> MonitorLike: ...
