"""The chaos suite: seeded faults against the pool's invariants (see docs/chaos.md).

``pytest chaos/`` runs the bounded CI pass (works with ``-n auto``); ``--chaos-long``
adds the soak; ``--chaos-seed=N`` replays a run.  Every test checks afterwards that
no child process, thread or file descriptor was left behind.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from chaos_check import Figures, run

from resilpool import ResilientPool
from resilpool.testing.plugin import LeakCheck, session_seed


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--chaos-long",
        action="store_true",
        default=False,
        help="also run the chaos soak (100,000 tasks at a 20%% fault rate; for releases)",
    )
    parser.addoption(
        "--chaos-soak-tasks",
        type=int,
        default=100_000,
        metavar="N",
        help="how many tasks the soak (--chaos-long) runs (default 100,000; fewer for a time-boxed soak)",
    )
    parser.addoption(
        "--chaos-bound",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="how long a chaos run may take before its unresolved futures count as hung (default 120)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "soak: long chaos run, only with --chaos-long")


def pytest_report_header(config: pytest.Config) -> list[str]:
    seed = session_seed(config)
    mode = "CI pass + soak (--chaos-long)" if config.getoption("--chaos-long") else "CI pass (--chaos-long adds the soak)"
    return [f"chaos suite: seed={seed}; replay with --chaos-seed={seed}; {mode}"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--chaos-long"):
        return
    skip = pytest.mark.skip(reason="soak: run with --chaos-long")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    lines = []
    for category in ("passed", "failed"):
        for r in terminalreporter.stats.get(category, []):
            if getattr(r, "when", None) != "call":
                continue
            for k, v in getattr(r, "user_properties", ()):
                if k == "chaos_figure":
                    lines.append(f"{'ok  ' if category == 'passed' else 'FAIL'} {r.nodeid.split('::')[-1]}: {v}")
    if lines:
        terminalreporter.section(f"chaos figures (seed {session_seed(config)})")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def _core_guard(resilpool_core_guard: list[Any]) -> None:
    """No ERROR from the core and no rebuild unless the test asks (resilpool.testing.plugin)."""


@pytest.fixture(scope="session", autouse=True)
def _services_started() -> None:
    """Start the forkserver and resource tracker before the first leak baseline."""
    with ResilientPool(1) as pool:
        pool.submit(int, "1").result(timeout=60)


# The leak check wraps each test from the outside (outermost hook wrappers): its baseline
# is taken after every fixture is set up, and it looks after every fixture and plugin has
# torn down (pytest's log capture, for one, holds the records of the test, and a record
# with exc_info holds frames, until then).
_LEAKS = pytest.StashKey[LeakCheck]()
_CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    result = yield
    item.stash[_LEAKS] = LeakCheck()
    return result


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    report = yield
    if report.when == "call" and (report.failed or hasattr(report, "wasxfail")):
        item.stash[_CALL_FAILED] = True
    return report


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    result = yield
    check = item.stash.get(_LEAKS, None)
    if check is not None:
        leaks = check.wait_clean(timeout=15.0)
        # A failed test's traceback (sys.last_traceback) holds its frames, and with them the
        # pool's objects: only processes and threads count then.
        if leaks is not None and (not item.stash.get(_CALL_FAILED, False) or leaks.processes or leaks.threads):
            pytest.fail(f"left behind after the test: {leaks}", pytrace=False)
    return result


@pytest.fixture
def chaos_run(chaos: Any, tmp_path: Path, request: pytest.FixtureRequest) -> Callable[..., Figures]:
    """``chaos_run(plan, rate=..., ...)``: :func:`chaos_check.run` with this test's seed, recording its figure."""

    def record(fig: Figures) -> None:
        request.node.user_properties.append(("chaos_figure", fig.line()))

    return functools.partial(run, chaos, tmp_path, record=record, bound_s=request.config.getoption("--chaos-bound"))
