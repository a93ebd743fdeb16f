"""DaskBackend: the same pool, with its tasks run on a Dask cluster (optional extra).

``pip install 'resilpool[dask]'``, then::

    from resilpool import ResilientPool, Limits
    from resilpool.dask import DaskBackend

    # A LocalCluster of worker processes on this machine, started and closed by the pool:
    with ResilientPool(4, backend=DaskBackend(), limits=Limits(task_timeout=60)) as pool:
        results = list(pool.map(work, items))

    # An existing cluster: its scheduler's address, a Client, or a Cluster object.
    with ResilientPool(16, backend=DaskBackend("tcp://scheduler:8786"), retry=2) as pool:
        ...

The Executor API, the stdlib futures, ``retry=``, :class:`~resilpool.Limits`,
``stats()``, events and errors are the local pool's; what each failure does on Dask,
and what is approximate there, is in ``docs/dask.md``.  ``distributed`` is imported
only when a backend is created, so ``import resilpool`` never needs it.

Ownership: a backend serves one pool at a time.  It owns the ``LocalCluster`` it
started (closed when the pool's last core finishes) and the telemetry its cores
publish (``samples``, ``peak_rss``: what the pool's ``workers()`` and ``stats()``
read).  The cores (``resilpool._core.dask``) own everything else.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, final

from . import errors
from ._core.serialization import Serializer, serialize_task
from .events import Event
from .supervisor.limits import Limits

if TYPE_CHECKING:
    from ._core.commands import Backend
    from ._core.dask.client import DaskCore
    from ._core.executor import CoreConfig

__all__ = ["DaskBackend"]

log = logging.getLogger("resilpool")


def _require_distributed() -> None:
    if importlib.util.find_spec("distributed") is None:
        raise ImportError("resilpool.dask.DaskBackend needs dask.distributed: pip install 'resilpool[dask]'")


class _Telemetry:
    """The pool's "monitor" on Dask: the cores sample the cluster on their own thread and publish here.

    ``samples`` (pid -> Sample) and ``peak_rss`` are replaced whole by the current core;
    ``start``/``stop`` exist for the pool, which starts and stops its monitor.
    """

    def __init__(self) -> None:
        self.samples: dict[int, Any] = {}
        self.peak_rss = 0

    def update(self, samples: dict[int, Any], peak_rss: int) -> None:
        self.samples = samples
        if peak_rss > self.peak_rss:
            self.peak_rss = peak_rss

    def start(self) -> None:
        pass

    def stop(self, timeout: float = 5.0) -> None:
        pass


@final
class DaskBackend:
    """Run a :class:`~resilpool.ResilientPool`'s tasks on a Dask cluster.

    Args:
        address_or_client: None to start a ``LocalCluster`` of worker processes on this
            machine (loopback only, no dashboard, ``max_workers`` workers of one thread
            each), closed when the pool shuts down; or the address of a running scheduler
            (``"tcp://host:8786"``), a ``distributed.Client``, or a cluster object (its
            ``scheduler_address``), which the pool connects to and leaves running.
        cluster_kwargs: extra keyword arguments for the ``LocalCluster`` the backend
            starts (they override the defaults above).
        connect_timeout: seconds to wait for the scheduler when a pool (or a rebuilt
            core) connects; past it the pool's constructor raises ``TimeoutError``.
        monitor_interval: seconds between two looks at the workers' memory, CPU and
            running tasks (one request to the scheduler); default the pool's
            ``monitor_interval``.

    Requirements of a cluster you bring: resilpool (the same version) importable on the
    scheduler and on every worker, and nannies on the workers (``dask worker`` starts
    them by default) so a worker that is killed or recycled is restarted.

    A backend serves one pool at a time; make one per pool.
    """

    def __init__(
        self,
        address_or_client: Any = None,
        *,
        cluster_kwargs: dict[str, Any] | None = None,
        connect_timeout: float = 30.0,
        monitor_interval: float | None = None,
    ) -> None:
        _require_distributed()
        if isinstance(connect_timeout, bool) or not isinstance(connect_timeout, (int, float)) or not connect_timeout > 0:
            raise ValueError(f"DaskBackend.connect_timeout must be > 0 seconds, got {connect_timeout!r}")
        if monitor_interval is not None and (
            isinstance(monitor_interval, bool) or not isinstance(monitor_interval, (int, float)) or not monitor_interval > 0
        ):
            raise ValueError(f"DaskBackend.monitor_interval must be > 0 seconds, got {monitor_interval!r}")
        if address_or_client is not None and not isinstance(address_or_client, str):
            if not (hasattr(address_or_client, "scheduler_address") or hasattr(address_or_client, "scheduler")):
                raise TypeError(
                    "DaskBackend(address_or_client=) must be None, a scheduler address, a distributed.Client"
                    f" or a cluster object, got {address_or_client!r}"
                )
        self._target = address_or_client
        self._cluster_kwargs = dict(cluster_kwargs or {})
        self._connect_timeout_s = float(connect_timeout)
        self._interval_fixed = monitor_interval is not None
        self.monitor_interval_s = float(monitor_interval) if monitor_interval is not None else 0.2
        self._lock = threading.Lock()
        self._cluster: Any = None  # the LocalCluster we started (None: not started, or closed)
        self._active: DaskCore | None = None  # the core made last (a rebuild replaces it)
        self._telemetry = _Telemetry()

    # --- what the pool calls ----------------------------------------------------------

    def make_core(
        self,
        config: CoreConfig,
        *,
        emit: Callable[[Event], None],
        on_broken: Callable[[Any, BaseException], None] | None,
        limits: Limits,
        serializer: Serializer = "auto",
    ) -> DaskCore:
        """Connect a new core to the cluster (starting the LocalCluster first if need be).

        ``config.mp_context`` is ignored (Dask starts its own worker processes), and so are
        the local core's other options (``soft_max_rss``: ``limits`` carries every limit).
        """
        from ._core.dask.client import DaskCore

        init_body = None
        if config.initializer is not None:
            try:
                init_body = serialize_task(0, config.initializer, tuple(config.initargs), {}, serializer)
            except errors.SerializationError as exc:
                raise TypeError(f"initializer and initargs must be picklable to run on Dask workers: {exc}") from exc
        active = self._active
        if active is not None and active.serving:
            raise RuntimeError("this DaskBackend already serves a running pool; make one DaskBackend per pool")
        address, security = self._connect_target(config.max_workers)
        try:
            core = self._active = DaskCore(
                config,
                backend=self,
                address=address,
                security=security,
                emit=emit,
                on_broken=on_broken,
                limits=limits,
                init_body=init_body,
                connect_timeout_s=self._connect_timeout_s,
            )
        except BaseException:
            self._close_cluster()
            raise
        return core

    def make_monitor(self, pool: Any) -> _Telemetry:
        """The pool's monitor: the cores sample the workers themselves and publish here."""
        interval = pool.config.monitor_interval  # the pool's frozen configuration (None: sampling off)
        if not self._interval_fixed and interval is not None:
            self.monitor_interval_s = float(interval)
        return self._telemetry

    # --- the cluster ---------------------------------------------------------------------

    @property
    def cluster(self) -> Any:
        """The ``LocalCluster`` this backend started and has not closed yet, else None."""
        return self._cluster

    @property
    def scheduler_address(self) -> str | None:
        """The scheduler the pool's cores connect to (None before a LocalCluster is started)."""
        target = self._cluster if self._cluster is not None else self._target
        return _address_of(target) if target is not None else None

    def _connect_target(self, max_workers: int) -> tuple[str, Any]:
        target = self._target
        if target is None:
            with self._lock:
                if self._cluster is None:
                    self._cluster = self._start_cluster(max_workers)
                target = self._cluster
        elif hasattr(target, "scheduler_address") and hasattr(target, "worker_spec"):
            _keep_restarted_workers(target)  # a LocalCluster (SpecCluster) object of this process
        return _address_of(target), _security_of(target)

    def _start_cluster(self, max_workers: int) -> Any:
        from distributed import LocalCluster

        kwargs: dict[str, Any] = {
            "n_workers": max_workers,
            "threads_per_worker": 1,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": None,
            # The scheduler serves its HTTP routes (/health, metrics) even without a dashboard:
            # on loopback and a free port, not on 8787 of every interface.
            "scheduler_kwargs": {"dashboard_address": "127.0.0.1:0"},
        }
        kwargs.update(self._cluster_kwargs)
        log.info("resilpool starts a Dask LocalCluster of %s workers", kwargs.get("n_workers"))
        make_cluster: Callable[..., Any] = LocalCluster
        cluster = make_cluster(**kwargs)
        _keep_restarted_workers(cluster)
        return cluster

    def _core_finished(self, core: Any) -> None:
        """Called on a core's thread when it ended for good (not replaced by a rebuild)."""
        self._close_cluster()

    def _close_cluster(self) -> None:
        with self._lock:
            cluster, self._cluster = self._cluster, None
        if cluster is not None:
            try:
                cluster.close(timeout=30)
            except Exception:
                log.error("resilpool: closing the Dask LocalCluster failed", exc_info=True)

    def __repr__(self) -> str:
        where = self.scheduler_address or "a LocalCluster (not started)"
        return f"<DaskBackend {where}>"


def _keep_restarted_workers(cluster: Any) -> None:
    """Stop a LocalCluster from closing a nanny whose worker is being restarted.

    A SpecCluster closes a worker's nanny for good when no worker of that name is
    registered ``distributed.deploy.lost-worker-timeout`` (15 s) after *some* removal of
    it; a worker the pool recycles often (``max_tasks``, timeouts) can be mid-restart at
    that moment, and the cluster would shrink.  The nannies restart their workers
    themselves, so the base class's bookkeeping (without that timer) is all we need.
    """
    try:
        from distributed.deploy.cluster import Cluster
    except ImportError:  # pragma: no cover - moved: keep Dask's behaviour
        return
    update = getattr(Cluster, "_update_worker_status", None)
    if update is not None and hasattr(cluster, "_update_worker_status"):
        cluster._update_worker_status = update.__get__(cluster)


def _address_of(target: Any) -> str:
    if isinstance(target, str):
        return target
    address = getattr(target, "scheduler_address", None)
    if isinstance(address, str):
        return address
    scheduler = getattr(target, "scheduler", None)  # a Client: its rpc to the scheduler
    address = getattr(scheduler, "address", None)
    if isinstance(address, str):
        return address
    raise TypeError(f"cannot find a scheduler address in {target!r}")


def _security_of(target: Any) -> Any:
    if isinstance(target, str):
        return None
    return getattr(target, "security", None)


if TYPE_CHECKING:

    def _is_a_backend(backend: DaskBackend) -> Backend:
        return backend  # mypy checks here that DaskBackend fits the pool's Backend seam
