"""The chaos tools themselves: the injector's seeded decisions, its rules, and the pytest plugin."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import pytest
from chaos_workload import Work, expected_value, work_label

from resilpool import Limits, ResilientPool, WorkerCrashedError
from resilpool.testing import FaultInjector, FaultKind

pytest_plugins = ["pytester"]


def _decisions(pool: ResilientPool, seed: int, tmp_path: Path) -> list[tuple[int, str, str]]:
    """Submit 300 tasks with an injector whose faults never get to run; return what it drew."""
    with FaultInjector(pool, seed=seed, rate=0.3, label=work_label) as inj:
        for i in range(300):
            inj._wrap(Work, (str(tmp_path / "log"), i, "pure", False, 0.0), {})
    return [(f.call, f.kind.value, f.detail) for f in inj.faults]


def test_same_seed_same_faults(tmp_path: Path) -> None:
    limits = Limits(stall_timeout=1.0, max_rss="300MiB")
    with ResilientPool(1, limits=limits) as pool:
        a = _decisions(pool, 42, tmp_path)
        b = _decisions(pool, 42, tmp_path)
        c = _decisions(pool, 43, tmp_path)
    assert a == b
    assert a != c
    assert 50 < len(a) < 130  # ~30% of 300
    assert {k for _, k, _ in a} == {k.value for k in FaultKind}  # every kind, with these limits


def test_kinds_the_pool_cannot_survive_are_refused() -> None:
    with ResilientPool(1) as pool:
        with pytest.raises(ValueError, match="hang needs a pool with Limits.stall_timeout or task_timeout"):
            FaultInjector(pool, kinds=["hang"])
        with pytest.raises(ValueError, match="stop needs"):
            FaultInjector(pool, kinds=["stop"])
        with pytest.raises(ValueError, match="balloon needs a pool with Limits.max_rss"):
            FaultInjector(pool, kinds=["balloon"])
        with pytest.raises(ValueError, match="unknown fault 'nope'"):
            FaultInjector(pool, kinds=["nope"])
        with pytest.raises(ValueError, match="rate must be a number from 0 to 1"):
            FaultInjector(pool, rate=1.5)
        # By default they are left out, not refused.
        inj = FaultInjector(pool)
        assert {FaultKind.HANG, FaultKind.STOP, FaultKind.BALLOON}.isdisjoint(inj._weights)


@pytest.mark.timeout(60)
def test_task_faults_fire_on_the_first_attempt_only(tmp_path: Path) -> None:
    log = str(tmp_path / "log")
    with ResilientPool(2) as pool:
        with FaultInjector(pool, seed=7, rate=1.0, kinds=["exit"], label=work_label) as inj:
            idem = [pool.submit(Work(log, i, "pure", False, 0.0), retry=1) for i in range(10)]
            plain = [pool.submit(Work(log, 100 + i, "pure", True, 0.0)) for i in range(10)]
            assert [f.result(timeout=30) for f in idem] == [expected_value(i) for i in range(10)]
            errors = [f.exception(timeout=30) for f in plain]
        assert all(isinstance(e, WorkerCrashedError) for e in errors), errors
        assert inj.counts() == {"exit": 20}
        assert all(f.fired and f.pid for f in inj.faults)
    lines = (tmp_path / "log").read_text().splitlines()
    assert not [line for line in lines if line.startswith("E ")]  # the plain ones never got to their effect


@pytest.mark.timeout(60)
def test_detach_restores_the_pool(tmp_path: Path) -> None:
    with ResilientPool(1) as pool:
        inj = FaultInjector(pool, seed=1, rate=1.0, kinds=["delay"])
        with inj:
            assert pool._task_wrapper is not None
        assert pool._task_wrapper is None
        assert pool.submit(int, "5").result(timeout=30) == 5
        assert not inj.attached and not os.path.exists(inj._dir or "")


# --- the pytest plugin ----------------------------------------------------------------

SAMPLE = """
    from resilpool import ResilientPool

    def test_chaos_seed(chaos):
        print("SEED", chaos.seed)

    def test_fails_under_chaos(chaos):
        with ResilientPool(1) as pool:
            with chaos.attach(pool, rate=1.0, kinds=["delay"]):
                assert pool.submit(int, "1").result(timeout=30) == 1
        assert False, "boom"
"""


@pytest.mark.timeout(120)
def test_plugin_reports_seed_and_replay(pytester: Any) -> None:
    pytester.makepyfile(test_sample=textwrap.dedent(SAMPLE))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s", "--chaos-seed=1234")
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    assert "resilpool chaos: seed=1234" in out  # the header, since the seed was given
    assert "SEED 1234" in out
    assert "chaos seed=1234 rate=1: 1 submissions, 1 faults fired (delay=1) of 1 drawn" in out
    assert "replay: cd " in out and "test_sample.py::test_fails_under_chaos --chaos-seed=1234" in out
    assert "FAILED test_sample.py::test_fails_under_chaos with chaos seed=1234; replay:" in out  # terminal summary


@pytest.mark.timeout(120)
def test_plugin_rate_override_and_random_seed(pytester: Any) -> None:
    pytester.makepyfile(test_sample=textwrap.dedent(SAMPLE))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s", "--chaos-rate=0", "-k", "fails")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "rate=0: 1 submissions, 0 faults fired" in out
    assert "--chaos-rate=0" in out  # kept in the replay command


def test_plugin_is_cheap_to_load() -> None:
    """Loaded by every pytest run that has resilpool installed: it must not pull the fault
    injector (or psutil) in at import."""
    import subprocess
    import sys

    code = "import sys, resilpool.testing.plugin; print('resilpool.testing.faults' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
