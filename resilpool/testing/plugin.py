"""pytest plugin (entry point ``pytest11``): the ``chaos`` fixture and ``--chaos-*`` options.

pytest loads this module in every run of every project that has resilpool installed,
so at import it only defines hooks and fixtures: the fault injector, psutil and the
pool load when a test asks for a fixture.

- ``--chaos-seed=N``: the seed of every ``chaos`` fixture in the run (default: a
  random one, drawn once per run and shared with pytest-xdist workers).
- ``--chaos-rate=R``: overrides the rate of every ``chaos.attach()`` (0 turns chaos off).
- ``chaos`` fixture: ``with chaos.attach(pool, rate=0.1): ...`` injects seeded faults
  (see :mod:`resilpool.testing.faults`); a failing test's report gets a ``chaos``
  section with the seed, the faults injected and the command that replays it.
- ``resilpool_leak_check`` fixture: fails a test that leaves child processes,
  threads or file descriptors behind.
- ``resilpool_core_guard`` fixture: fails a test in which the pool's core logs an ERROR
  or rebuilds, unless it is marked ``@pytest.mark.resilpool_core_errors``.
"""

from __future__ import annotations

import gc
import os
import random
import shlex
import sys
import threading
import time
from collections.abc import Callable, Generator, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .._pool import ResilientPool
    from .faults import FaultInjector, FaultKind

__all__ = [
    "CORE_ERRORS_MARKER",
    "Chaos",
    "LeakCheck",
    "Leaks",
    "chaos",
    "replay_command",
    "resilpool_core_guard",
    "resilpool_leak_check",
    "session_seed",
]

DEFAULT_RATE = 0.1
_SEED = pytest.StashKey[int]()
_SEED_GIVEN = pytest.StashKey[bool]()
_CHAOS = pytest.StashKey["Chaos"]()
_WORKER_KEY = "resilpool_chaos_seed"


def _seed_arg(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise pytest.UsageError(f"--chaos-seed must be an integer, got {text!r}") from None
    if value < 0:
        raise pytest.UsageError(f"--chaos-seed must be >= 0, got {text!r}")
    return value


def _rate_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise pytest.UsageError(f"--chaos-rate must be a number from 0 to 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise pytest.UsageError(f"--chaos-rate must be from 0 to 1, got {text!r}")
    return value


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("resilpool", "resilpool chaos testing")
    group.addoption(
        "--chaos-seed",
        dest="chaos_seed",
        type=_seed_arg,
        default=None,
        metavar="N",
        help="seed of the `chaos` fixture's fault injection (replays a run); default: random, printed",
    )
    group.addoption(
        "--chaos-rate",
        dest="chaos_rate",
        type=_rate_arg,
        default=None,
        metavar="R",
        help="fault rate for every chaos.attach(), overriding the test's own (0 to 1; 0: no faults)",
    )


def pytest_configure(config: pytest.Config) -> None:
    seed = config.getoption("chaos_seed", None)
    config.stash[_SEED_GIVEN] = seed is not None
    if seed is None:
        workerinput = getattr(config, "workerinput", None)
        if workerinput is not None and _WORKER_KEY in workerinput:
            seed = int(workerinput[_WORKER_KEY])  # an xdist worker: the controller's seed
        else:
            seed = random.SystemRandom().randrange(2**32)
    config.stash[_SEED] = seed
    config.addinivalue_line(
        "markers", f"{CORE_ERRORS_MARKER}: the test provokes ERROR logs from the pool's core (or a rebuild) on purpose"
    )


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """pytest-xdist (controller): every worker uses the controller's seed."""
    node.workerinput[_WORKER_KEY] = node.config.stash[_SEED]


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    if not config.stash.get(_SEED_GIVEN, False) and config.getoption("chaos_rate", None) is None:
        return None
    return [_header(config)]


def _header(config: pytest.Config) -> str:
    rate = config.getoption("chaos_rate", None)
    rate_text = "per test" if rate is None else f"{rate:g} (--chaos-rate)"
    return f"resilpool chaos: seed={config.stash[_SEED]} rate={rate_text} (replay: --chaos-seed={config.stash[_SEED]})"


def session_seed(config: pytest.Config) -> int:
    """The run's chaos seed (from ``--chaos-seed``, or drawn at start)."""
    return config.stash[_SEED]


def replay_command(config: pytest.Config, nodeid: str, seed: int) -> str:
    """The shell command that reruns ``nodeid`` with ``seed`` and this run's other ``--chaos*`` options."""
    args = [str(a) for a in config.invocation_params.args]
    extra: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        takes_value = a in ("--chaos-seed", "--chaos-rate")  # the "--opt value" spelling
        if a.startswith("--chaos") and not a.startswith("--chaos-seed"):
            extra.extend(args[i : i + 2] if takes_value else [a])
        i += 2 if takes_value else 1
    cmd = [sys.executable, "-m", "pytest", nodeid, f"--chaos-seed={seed}", *extra]
    return f"cd {shlex.quote(str(config.rootpath))} && {shlex.join(cmd)}"


class Chaos:
    """The ``chaos`` fixture: attach seeded fault injectors to pools for one test.

    Attributes:
        seed: the seed of this test's injectors (``--chaos-seed``, or the run's random seed).
        rate: ``--chaos-rate`` if given (it overrides every ``attach``), else None.
        injectors: the injectors attached so far, in order.
    """

    def __init__(self, seed: int, rate: float | None, nodeid: str, config: pytest.Config) -> None:
        self.seed = seed
        self.rate = rate
        self.nodeid = nodeid
        self.injectors: list[FaultInjector] = []
        self._config = config

    def attach(
        self,
        pool: ResilientPool,
        rate: float | None = None,
        *,
        kinds: Iterable[FaultKind | str] | Mapping[FaultKind | str, float] | None = None,
        delay: tuple[float, float] = (0.01, 0.2),
        label: Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any]], Hashable] | None = None,
    ) -> FaultInjector:
        """Start injecting faults into ``pool``; use the result as a context manager.

        ``rate`` defaults to 0.1; ``--chaos-rate`` overrides it.  The injector is detached
        at the end of ``with``, or at the latest when the test ends.
        """
        from .faults import FaultInjector

        if self.rate is not None:
            rate = self.rate
        elif rate is None:
            rate = DEFAULT_RATE
        inj = FaultInjector(pool, seed=self.seed, rate=rate, kinds=kinds, delay=delay, label=label)
        self.injectors.append(inj)
        print(f"chaos seed={self.seed} rate={rate:g} attached to {pool!r}")
        return inj.attach()

    def random(self, stream: str = "workload") -> random.Random:
        """A ``random.Random`` for the test's own choices, seeded from the chaos seed and ``stream``."""
        return random.Random(f"{self.seed}:{stream}")

    @property
    def replay(self) -> str:
        """The command that replays this test with this seed."""
        return replay_command(self._config, self.nodeid, self.seed)

    def summary(self) -> str:
        """One line per injector (seed, rate, faults by kind)."""
        if not self.injectors:
            return f"chaos seed={self.seed}: no injector attached"
        return "\n".join(inj.summary() for inj in self.injectors)

    def report(self, last: int = 30) -> str:
        """What a failing test shows: seed, summary, the last faults, the replay command."""
        lines = [f"chaos seed={self.seed}", self.summary()]
        for inj in self.injectors:
            inj.refresh()
            log = inj.log_lines()
            if len(log) > last:
                lines.append(f"... {len(log) - last} earlier faults (FaultInjector.log_lines() has all)")
            lines.extend(log[-last:])
        lines.append(f"replay: {self.replay}")
        return "\n".join(lines)

    def close(self) -> None:
        for inj in self.injectors:
            inj.detach()


@pytest.fixture
def chaos(request: pytest.FixtureRequest) -> Iterator[Chaos]:
    """Seeded fault injection: ``with chaos.attach(pool, rate=0.1): ...`` (see docs/chaos.md)."""
    config = request.config
    c = Chaos(config.stash[_SEED], config.getoption("chaos_rate", None), request.node.nodeid, config)
    request.node.stash[_CHAOS] = c
    request.node.user_properties.append(("chaos_seed", c.seed))  # before the call's report is made
    print(f"chaos seed={c.seed} (replay: {c.replay})")
    try:
        yield c
    finally:
        c.close()
        if c.injectors:
            request.node.user_properties.append(("chaos", c.summary()))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    c = item.stash.get(_CHAOS, None)
    if c is None:
        return
    report = outcome.get_result()
    if report.failed:
        report.sections.append(("chaos (seed, faults, replay)", c.report()))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    failed = [r for r in terminalreporter.stats.get("failed", []) if any(k == "chaos_seed" for k, _ in getattr(r, "user_properties", ()))]
    if not failed:
        return
    terminalreporter.section("resilpool chaos")
    for r in failed:
        seed = next(v for k, v in r.user_properties if k == "chaos_seed")
        terminalreporter.write_line(f"FAILED {r.nodeid} with chaos seed={seed}; replay:")
        terminalreporter.write_line(f"  {replay_command(config, r.nodeid, int(seed))}")


# --- leaks ------------------------------------------------------------------------

_SERVICE_MARKERS = ("forkserver", "resource_tracker")
# multiprocessing.heap keeps the small shared-memory arenas behind RawArray/Value for reuse
# (a process-wide cache, two descriptors each: the file and the mmap's own): not a leak.
_HEAP_ARENA = "/dev/shm/pym-"


@dataclass(frozen=True)
class Leaks:
    """What a test left behind: child process ids, thread names, new file descriptors."""

    processes: list[int]
    threads: list[str]
    fds: dict[int, str]

    def __str__(self) -> str:
        parts = []
        if self.processes:
            parts.append(f"child processes {self.processes}")
        if self.threads:
            parts.append(f"threads {self.threads}")
        if self.fds:
            parts.append(f"{len(self.fds)} more open file descriptors {self.fds}")
        return ", ".join(parts)


class LeakCheck:
    """Children, threads and open file descriptors of this process, to compare later."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.children = self._children()
        self.threads = set(threading.enumerate())
        self.fds = _open_fds()

    def _children(self) -> set[int]:
        import psutil

        out = set()
        for p in self._proc.children(recursive=True):
            try:
                if any(m in " ".join(p.cmdline()) for m in _SERVICE_MARKERS):
                    continue  # multiprocessing's long-lived helpers
            except psutil.Error:
                continue
            out.add(p.pid)
        return out

    def leaks(self) -> Leaks | None:
        """What is left over compared to when this was made, or None.

        Garbage is collected first: objects kept only by reference cycles (and the file
        descriptors they own) go at the next collection anyway; what stays is a leak.
        """
        gc.collect()
        children = sorted(self._children() - self.children)
        threads = [t.name for t in threading.enumerate() if t not in self.threads and t.is_alive()]
        now = _open_fds()
        fds = {fd: what for fd, what in now.items() if self.fds.get(fd) != what and not what.startswith(_HEAP_ARENA)}
        if len([w for w in now.values() if not w.startswith(_HEAP_ARENA)]) <= len([w for w in self.fds.values() if not w.startswith(_HEAP_ARENA)]):
            fds = {}
        if not children and not threads and not fds:
            return None
        return Leaks(children, threads, fds)

    def wait_clean(self, timeout: float = 10.0) -> Leaks | None:
        """Wait up to ``timeout`` s for the leaks to go (processes exit asynchronously)."""
        deadline = time.monotonic() + timeout
        while True:
            leaks = self.leaks()
            if leaks is None or time.monotonic() > deadline:
                return leaks
            time.sleep(0.05)


def _open_fds() -> dict[int, str]:
    """This process's open file descriptors and what they point to (Linux /proc; else just numbers)."""
    out: dict[int, str] = {}
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        import psutil

        return {i: "?" for i in range(psutil.Process().num_fds())}
    for name in names:
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the listing's own descriptor, closed by now
    return out


@pytest.fixture
def resilpool_leak_check() -> Iterator[LeakCheck]:
    """Fail the test if it leaves child processes, threads or file descriptors behind.

    The multiprocessing forkserver and resource tracker are allowed to stay (they are
    per interpreter); start one pool before the first checked test if the fd count must
    not include theirs.
    """
    check = LeakCheck()
    yield check
    leaks = check.wait_clean()
    if leaks is not None:
        pytest.fail(f"test leaked {leaks}", pytrace=False)



# --- the core guard: no ERROR from the pool's core, no rebuild, unless a test asks for it --

#: Marker: this test provokes ERROR logs from the pool's core (or a core rebuild) on purpose.
CORE_ERRORS_MARKER = "resilpool_core_errors"
#: Where "the core" lives: its ERROR records are bugs unless a test asks for them.
_CORE_PATHS = (
    os.sep + os.path.join("resilpool", "_core") + os.sep,
    os.sep + os.path.join("resilpool", "supervisor") + os.sep,
    os.sep + os.path.join("resilpool", "_pool.py"),
    os.sep + os.path.join("resilpool", "retry.py"),
)


class _CoreErrors:
    """A logging handler collecting ERROR records of the core (any thread)."""

    def __init__(self) -> None:
        import logging

        self.records: list[Any] = []
        lock = threading.Lock()
        records = self.records

        class Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if record.levelno >= logging.ERROR and any(p in record.pathname for p in _CORE_PATHS):
                    with lock:
                        records.append(record)

        self.handler = Handler(logging.ERROR)

    def messages(self, limit: int = 5) -> str:
        lines = []
        for r in self.records[:limit]:
            try:
                text = r.getMessage()
            except Exception:  # a bad record must not hide the others
                text = str(r.msg)
            lines.append(f"{os.path.basename(r.pathname)}:{r.lineno}: {text}")
        more = f" (+{len(self.records) - limit} more)" if len(self.records) > limit else ""
        return "; ".join(lines) + more


@pytest.fixture
def resilpool_core_guard(request: pytest.FixtureRequest) -> Iterator[list[Any]]:
    """Fail the test if the pool's core logs an ERROR or rebuilds (a rebuild logs one).

    Such a record means a bug in resilpool unless the test provokes it on purpose: mark
    that test ``@pytest.mark.resilpool_core_errors``. Yields the records collected.
    Use it from an autouse fixture (``tests/conftest.py`` and ``chaos/conftest.py`` do).
    """
    import logging

    guard = _CoreErrors()
    logger = logging.getLogger("resilpool")
    logger.addHandler(guard.handler)
    try:
        yield guard.records
    finally:
        logger.removeHandler(guard.handler)
    if not guard.records or request.node.get_closest_marker(CORE_ERRORS_MARKER) is not None:
        return
    # A test that injects faults (the chaos fixture) asks for their designed outcomes: a
    # quarantine, a tripped breaker, a protocol error; a rebuild only if it broke the core.
    chaos = request.node.stash.get(_CHAOS, None)
    fired: set[str] = set()
    if chaos is not None:
        for inj in chaos.injectors:
            fired |= {k for k, n in inj.counts().items() if n}
    guard.records[:] = [r for r in guard.records if not _asked_for(getattr(r, "resilpool_outcome", None), chaos, fired)]
    if guard.records:
        pytest.fail(
            f"the pool's core logged {len(guard.records)} ERROR record(s) this test did not ask for"
            f" (mark it @pytest.mark.{CORE_ERRORS_MARKER} if it provokes them): {guard.messages()}",
            pytrace=False,
        )


def _asked_for(outcome: str | None, chaos: Chaos | None, fired: set[str]) -> bool:
    """Is an ERROR record with this designed ``outcome`` one the test's injected faults explain?"""
    if outcome is None or chaos is None or not chaos.injectors:
        return False  # not a designed outcome, or no fault injected: a bug
    if outcome == "rebuild":
        return "break_core" in fired
    return True
