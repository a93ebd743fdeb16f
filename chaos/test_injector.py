"""The chaos tools themselves: the injector's seeded decisions, its rules, and the pytest plugin."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import pytest
from chaos_workload import Work, expected_value, work_label

from resilpool import Limits, ResilientPool, WorkerCrashedError
from resilpool.testing import DEFAULT_WEIGHTS, FaultInjector, FaultKind
from resilpool.testing.faults import ALL_WEIGHTS, HangingInitializer

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
    assert {k for _, k, _ in a} == {k.value for k in DEFAULT_WEIGHTS}  # every default kind, with these limits


def test_every_kind_is_drawn_and_replayed_with_all_weights(tmp_path: Path) -> None:
    limits = Limits(stall_timeout=1.0, max_rss="300MiB")
    with ResilientPool(1, limits=limits) as pool:
        runs = []
        for seed in (42, 42):
            with FaultInjector(pool, seed=seed, rate=0.5, kinds=ALL_WEIGHTS, label=work_label) as inj:
                for i in range(600):
                    inj._wrap(Work, (str(tmp_path / "log"), i, "pure", False, 0.0), {})
            # A process fault's detail says whether it fired meanwhile (timing); a task fault's is drawn.
            runs.append([(f.call, f.kind.value, f.detail if f.kind.per_task else "") for f in inj.faults])
    assert runs[0] == runs[1]
    assert {k for _, k, _ in runs[0]} == {k.value for k in FaultKind}
    junk = [d for _, k, d in runs[0] if k == "junk_frame"]
    assert all(int(d.split("claiming ")[1].split()[0]) >= 2**62 for d in junk)  # a frame no reader should await
    assert {d.split()[0] for _, k, d in runs[0] if k.startswith("result_")} == {"KeyboardInterrupt", "SystemExit"}


def test_new_kinds_stay_out_of_the_default_mix() -> None:
    new = {FaultKind.STOP_IDLE, FaultKind.STOP_RESUME, FaultKind.JUNK_FRAME, FaultKind.TRUNCATED_FRAME}
    new |= {FaultKind.RESULT_PICKLE_RAISES, FaultKind.RESULT_UNPICKLE_RAISES}
    assert new.isdisjoint(DEFAULT_WEIGHTS) and set(ALL_WEIGHTS) == set(FaultKind)
    assert all(k.fails_attempt for k in new - {FaultKind.STOP_IDLE, FaultKind.STOP_RESUME})
    assert not FaultKind.DELAY.fails_attempt and not FaultKind.STOP_RESUME.per_task


@pytest.mark.resilpool_core_errors  # the core logs the corrupt frame at ERROR, as it must
@pytest.mark.timeout(60)
def test_truncated_frame_kills_the_worker_on_the_first_attempt(tmp_path: Path) -> None:
    log = str(tmp_path / "log")
    with ResilientPool(1) as pool:
        with FaultInjector(pool, seed=5, rate=1.0, kinds=["truncated_frame"], label=work_label) as inj:
            fut = pool.submit(Work(log, 1, "pure", False, 0.0), retry=1)
            assert fut.result(timeout=30) == expected_value(1)
        assert inj.counts() == {"truncated_frame": 1}
        assert pool.stats().worker_crashes == 1


@pytest.mark.timeout(60)
def test_stop_resume_resumes_its_worker(tmp_path: Path) -> None:
    """No stall limit that could kill it: the task can only finish because the injector resumed it."""
    log = str(tmp_path / "log")
    with ResilientPool(1, limits=Limits(task_timeout=50.0)) as pool:
        with FaultInjector(pool, seed=9, rate=1.0, kinds=["stop_resume"], label=work_label) as inj:
            fut = pool.submit(Work(log, 1, "spin", False, 2.0))
            assert fut.result(timeout=40) == expected_value(1)
        fired = [f for f in inj.faults if f.fired]
        assert len(fired) == 1 and "SIGCONT after" in fired[0].detail and fired[0].task_id is not None
        assert pool.stats().worker_crashes == 0


def test_hanging_initializer_counts_its_hangs_across_calls(tmp_path: Path) -> None:
    calls: list[tuple[int, ...]] = []
    init = HangingInitializer(str(tmp_path), hangs=2, inner=lambda *a: calls.append(a))
    (tmp_path / "init-hang-0").touch()  # two earlier calls hung (in workers that were killed)
    (tmp_path / "init-hang-1").touch()
    init(1, 2)
    assert calls == [(1, 2)]
    assert HangingInitializer(str(tmp_path), hangs=0)() is None


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
@pytest.mark.parametrize(
    ("kind", "errors", "ran"),
    [("exit", (WorkerCrashedError,), False), ("result_pickle_raises", (KeyboardInterrupt, SystemExit), True)],
)
def test_task_faults_fire_on_the_first_attempt_only(kind: str, errors: tuple[type, ...], ran: bool, tmp_path: Path) -> None:
    log = str(tmp_path / "log")
    with ResilientPool(2) as pool:
        with FaultInjector(pool, seed=7, rate=1.0, kinds=[kind], label=work_label) as inj:
            idem = [pool.submit(Work(log, i, "pure", False, 0.0), retry=1) for i in range(10)]
            plain = [pool.submit(Work(log, 100 + i, "pure", True, 0.0), retry=0) for i in range(10)]
            assert [f.result(timeout=30) for f in idem] == [expected_value(i) for i in range(10)]
            failed = [f.exception(timeout=30) for f in plain]
        assert all(isinstance(e, errors) for e in failed), failed
        assert inj.counts() == {kind: 20}
        assert all(f.fired and f.pid for f in inj.faults)
    lines = (tmp_path / "log").read_text().splitlines()
    # The plain ones got to their effect only if the fault comes after the task ran.
    assert len([line for line in lines if line.startswith("E ")]) == (10 if ran else 0)


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
