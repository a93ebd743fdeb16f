"""Prometheus / OpenMetrics metrics of a :class:`ResilientPool` (``pip install 'resilpool[metrics]'``).

What it owns: turning a pool's public view (``stats()``, ``workers()``) into metric
families, and an HTTP endpoint to scrape them::

    from resilpool import ResilientPool
    import resilpool.metrics

    with ResilientPool(4) as pool, resilpool.metrics.serve(pool, 9464) as server:
        results = list(pool.map(work, xs))    # curl http://127.0.0.1:9464/metrics

Every family is read from ``pool.stats()`` and ``pool.workers()`` when scraped, so it
costs nothing between scrapes and covers every task of the pool, from its first: the
pool itself counts failures and retries by error type and times each task from
submission to resolution into a histogram of fixed buckets
(:data:`resilpool.events.DURATION_BOUNDS_S`).  :meth:`PoolMetrics.track`, which used to
add those for the futures given to it, is deprecated: it adds nothing now.

Threads: scrapes run on the HTTP server's threads and only read the pool's snapshots.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from typing import Any, Final, TypeVar, final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import start_http_server

from ._pool import ResilientPool
from .events import DURATION_BOUNDS_S, ExitReason

__all__ = ["MetricsServer", "PoolMetrics", "serve"]

F = TypeVar("F", bound="Future[Any]")

#: Task-duration buckets, seconds: the pool's own (``resilpool.events.DURATION_BOUNDS_S``).
DURATION_BUCKETS: Final = DURATION_BOUNDS_S


@final
class PoolMetrics:
    """The metrics of one pool, in a :class:`prometheus_client.CollectorRegistry` of their own.

    Args:
        pool: the pool to describe (only its public API is used).
        registry: where to register; default a new registry (not prometheus-client's global one,
            so two pools never clash). Pass ``prometheus_client.REGISTRY`` to join your process's.
        namespace: the metric name prefix.
    """

    def __init__(self, pool: ResilientPool, *, registry: CollectorRegistry | None = None, namespace: str = "resilpool") -> None:
        if not isinstance(pool, ResilientPool):
            raise TypeError(f"pool must be a resilpool.ResilientPool, got {pool!r}")
        self.pool = pool
        self.namespace = namespace
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.registry.register(_PoolCollector(pool, namespace))

    def track(self, future: F) -> F:
        """Deprecated: return ``future`` unchanged.

        The pool counts every task's outcome, error type and duration itself now
        (``resilpool_task_errors_total``, ``resilpool_task_duration_seconds``), so there is
        nothing left to add per future. Drop the call.
        """
        warnings.warn(
            "PoolMetrics.track() is deprecated and does nothing: the pool counts every task's"
            " error type and duration itself; drop the call",
            DeprecationWarning,
            stacklevel=2,
        )
        return future

    def generate(self) -> bytes:
        """The metrics now, in Prometheus text format (what a scrape returns)."""
        return bytes(generate_latest(self.registry))

    def close(self) -> None:
        """Nothing to release: a scrape reads the pool when it happens (kept for compatibility)."""


class _PoolCollector:
    """Reads ``pool.stats()`` and ``pool.workers()`` at each scrape."""

    def __init__(self, pool: ResilientPool, namespace: str) -> None:
        self._pool = pool
        self._ns = namespace

    def describe(self) -> list[Any]:
        return []  # families are only known by collecting; the registry then skips the name check

    def collect(self) -> Iterator[Any]:
        ns = self._ns
        s = self._pool.stats()
        workers = self._pool.workers()

        def counter(name: str, doc: str, value: float) -> Any:
            c = CounterMetricFamily(f"{ns}_{name}", doc)
            c.add_metric([], value)
            return c

        def counter_by(name: str, doc: str, label: str, values: Iterable[tuple[str, float]]) -> Any:
            c = CounterMetricFamily(f"{ns}_{name}", doc, labels=[label])
            for key, value in values:
                c.add_metric([key], value)
            return c

        def gauge(name: str, doc: str, value: float) -> Any:
            g = GaugeMetricFamily(f"{ns}_{name}", doc)
            g.add_metric([], value)
            return g

        yield counter("tasks_submitted", "Tasks submitted", s.submitted)
        yield counter("tasks_succeeded", "Tasks resolved with a result", s.completed)
        yield counter("tasks_failed", "Tasks resolved with an exception (every error type)", s.failed)
        yield counter("tasks_cancelled", "Tasks cancelled before they started", s.cancelled)
        yield counter_by("task_errors", "Tasks that failed, by the qualified name of the error's type", "error", s.errors.items())
        yield counter("task_retries", "Failed attempts scheduled again", s.retried)
        yield counter_by("retried_attempts_by_error", "Failed attempts scheduled again, by the qualified name of the error's type", "error", s.retried_errors.items())
        yield counter("tasks_quarantined", "Tasks failed with PoisonTaskError", s.quarantined)
        yield counter("workers_started", "Worker processes ever started", s.workers_started)
        yield counter("worker_crashes", "Workers that died by themselves or at start-up", s.worker_crashes)
        yield counter("core_rebuilds", "Times the executor core was replaced", s.rebuilds)
        yield counter_by("worker_exits", "Workers that left the pool, by reason", "reason", ((r.value, s.recycled.get(r.value, 0)) for r in ExitReason))
        busy = sum(1 for w in workers if w.task_id is not None)
        yield gauge("workers", "Live, ready workers", s.workers)
        yield gauge("workers_max", "The pool's size (max_workers)", s.max_workers)
        state = GaugeMetricFamily(f"{ns}_workers_by_state", "Live workers, busy (running a task) or idle", labels=["state"])
        state.add_metric(["busy"], busy)
        state.add_metric(["idle"], len(workers) - busy)
        yield state
        yield gauge("tasks_pending", "Queue depth: submitted tasks not started and not resolved", s.pending)
        yield gauge("tasks_running", "Tasks started in a worker and not resolved", s.running)
        yield gauge("broken", "1 when the crash-loop breaker has broken the pool", 1 if s.broken else 0)
        yield gauge("worker_rss_peak_bytes", "Highest process-tree RSS sampled from any worker", s.peak_worker_rss)
        rss = GaugeMetricFamily(f"{ns}_worker_rss_bytes", "Resident memory of each worker's process tree", labels=["pid"])
        for w in workers:
            if w.rss is not None:
                rss.add_metric([str(w.pid)], w.rss)
        yield rss
        durations = HistogramMetricFamily(
            f"{ns}_task_duration_seconds", "Tasks resolved, seconds from submission to resolution", labels=["outcome"]
        )
        for outcome in ("succeeded", "failed"):
            h = s.durations.get(outcome)
            if h is None:
                continue
            buckets = [(repr(float(b)), n) for b, n in zip(h.bounds_s, h.cumulative)]
            buckets.append(("+Inf", h.count))
            durations.add_metric([outcome], buckets, h.sum_s)
        yield durations


@final
class MetricsServer:
    """An HTTP endpoint serving one pool's metrics (``GET /metrics``); stop it with :meth:`close`."""

    def __init__(self, metrics: PoolMetrics, port: int, addr: str) -> None:
        self.metrics = metrics
        self.addr = addr
        self._httpd, self._thread = start_http_server(port, addr=addr, registry=metrics.registry)
        self.port: int = int(self._httpd.server_address[1])  # the bound port (port=0 picks a free one)
        self._lock = threading.Lock()
        self._closed = False

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving and join the server thread; the pool is left alone."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout)
        self.metrics.close()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(pool: ResilientPool, port: int, addr: str = "127.0.0.1", *, registry: CollectorRegistry | None = None) -> MetricsServer:
    """Serve ``pool``'s metrics at ``http://addr:port/metrics`` from a background thread.

    Args:
        pool: the pool to describe.
        port: TCP port; 0 picks a free one (``server.port`` says which).
        addr: the address to bind: loopback unless you give another explicitly
            (``"0.0.0.0"`` exposes the pool's figures to the network).
        registry: as for :class:`PoolMetrics`.

    Returns:
        The running :class:`MetricsServer`.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an int from 0 to 65535, got {port!r}")
    if not isinstance(addr, str) or not addr:
        raise ValueError(f"addr must be an address to bind such as '127.0.0.1', got {addr!r}")
    return MetricsServer(PoolMetrics(pool, registry=registry), port, addr)

