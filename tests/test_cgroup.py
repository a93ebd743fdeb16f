"""Limits(cgroup=True): probing for cgroup v2, the per-worker cgroup files, and the fallback."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import RESULT_TIMEOUT

from resilpool import Limits, ResilientPool
from resilpool._core import reaper
from resilpool.supervisor import cgroup
from resilpool.supervisor.cgroup import CgroupUnavailable, WorkerCgroups, kill_placed, probe


def _fake_cgroupfs(tmp_path: Path, *, kill: bool = True) -> tuple[Path, Path, Path]:
    """A mount point with our cgroup /app/job in it, as /proc/self/{mountinfo,cgroup} describe it."""
    mount = tmp_path / "cg"
    base = mount / "app" / "job"
    base.mkdir(parents=True)
    (base / "cgroup.procs").write_text("1\n")
    if kill:
        (base / "cgroup.kill").write_text("")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 0:20 / /proc rw,nosuid - proc proc rw\n"
        f"35 25 0:30 / {mount} rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate\n"
    )
    self_cgroup = tmp_path / "self-cgroup"
    self_cgroup.write_text("4:memory:/x\n0::/app/job\n")
    return mountinfo, self_cgroup, base


def test_probe_finds_our_cgroup(tmp_path: Path) -> None:
    mountinfo, self_cgroup, base = _fake_cgroupfs(tmp_path)
    assert probe(mountinfo, self_cgroup) == base


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("no mount", "no cgroup v2 hierarchy is mounted"),
        ("no membership", "no '0::' line"),
        ("no kill", "needs Linux 5.14 or later"),
        ("elsewhere", "is not this process's cgroup v2 directory"),
    ],
)
def test_probe_says_what_is_missing(breakage: str, message: str, tmp_path: Path) -> None:
    mountinfo, self_cgroup, _ = _fake_cgroupfs(tmp_path, kill=breakage != "no kill")
    if breakage == "no mount":
        mountinfo.write_text("22 1 0:20 / /proc rw,nosuid - proc proc rw\n")
    elif breakage == "no membership":
        self_cgroup.write_text("4:memory:/x\n")
    elif breakage == "elsewhere":
        self_cgroup.write_text("0::/somewhere/else\n")
    with pytest.raises(CgroupUnavailable, match=message):
        probe(mountinfo, self_cgroup)


def test_worker_cgroups_files(tmp_path: Path) -> None:
    _, _, base = _fake_cgroupfs(tmp_path)
    groups = WorkerCgroups(base)
    path = groups.add(4242)
    assert path is not None and path.parent == base and path.name.endswith("-w4242")
    assert (path / "cgroup.procs").read_text() == "4242\n"
    assert groups.memory_current(4242) is None  # no memory controller for our children
    (path / "memory.current").write_text("123456\n")
    assert groups.memory_current(4242) == 123456
    assert groups.memory_current(1) is None and not groups.kill(1)  # not ours
    assert groups.kill(4242) and (path / "cgroup.kill").read_text() == "1\n"
    (path / "cgroup.kill").unlink()
    assert kill_placed(4242) and (path / "cgroup.kill").read_text() == "1\n"
    groups.close()
    assert not kill_placed(4242)  # forgotten once closed


def test_a_worker_that_cannot_be_placed_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, _, base = _fake_cgroupfs(tmp_path)
    (base / "resilpool-blocker").write_text("")
    groups = WorkerCgroups(base / "resilpool-blocker")  # a file: nothing can be created below it
    with caplog.at_level(logging.WARNING, logger="resilpool"):
        assert groups.add(7) is None
    assert "could not put worker 7 in cgroup" in caplog.text


def test_limits_cgroup_field() -> None:
    assert not Limits(cgroup=True).needs_monitor(ignore_default_floor=True)  # needs no sampling
    with pytest.raises(TypeError, match="Limits.cgroup must be True or False"):
        Limits(cgroup="yes")  # type: ignore[arg-type]


@pytest.mark.timeout(60)
def test_pool_with_cgroup_runs_here(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Where cgroups are usable each worker gets its own; elsewhere one warning, and the pool works."""
    monkeypatch.setattr(reaper, "_cgroup_warned", False)
    try:
        probe()
        usable = True
    except CgroupUnavailable as exc:
        usable, reason = False, str(exc)
    with caplog.at_level(logging.WARNING, logger="resilpool"):
        with ResilientPool(1, limits=Limits(cgroup=True)) as pool:
            assert pool.submit(int, "3").result(timeout=RESULT_TIMEOUT) == 3
            pid = pool.workers()[0].pid
            if usable:
                assert "resilpool-" in Path(f"/proc/{pid}/cgroup").read_text()
                assert cgroup._placed.get(pid) is not None
    if not usable:
        assert f"Limits(cgroup=True) is not available here, running without cgroups: {reason}" in caplog.text


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.timeout(60)
def test_a_setsid_daemon_dies_with_its_worker_killed_from_outside(tmp_path: Path) -> None:
    """The case only a cgroup covers: a task's daemon left the worker's process group and
    session, and the worker is SIGKILLed from outside the pool (the OOM killer, kill -9).
    Here, where cgroup v2 is usable (root, Linux 5.14+): a real cgroup, no stand-in."""
    import os
    import signal

    import boundary
    from conftest import wait_until

    try:
        probe()
    except CgroupUnavailable as exc:
        pytest.skip(f"cgroup v2 is not usable here: {exc}")
    ready = tmp_path / "ready"
    with ResilientPool(1, limits=Limits(cgroup=True)) as pool:
        assert pool.submit(int, "1").result(timeout=RESULT_TIMEOUT) == 1
        worker = pool.workers()[0].pid
        path = cgroup._placed[worker]
        fut = pool.submit(boundary.fork_daemons_forever, str(ready), 60)
        wait_until(ready.exists, RESULT_TIMEOUT, "the first daemon")
        daemons = {int(p) for p in (path / "cgroup.procs").read_text().split()} - {worker}
        assert any(os.getsid(p) != os.getsid(worker) for p in daemons if _alive(p)), "no daemon left the worker's session"
        os.kill(worker, signal.SIGKILL)
        with pytest.raises(Exception):
            fut.result(timeout=RESULT_TIMEOUT)  # WorkerCrashedError: its worker died
        wait_until(lambda: not any(_alive(p) for p in daemons), RESULT_TIMEOUT, "the daemons to die with their worker")
        wait_until(lambda: not path.exists(), RESULT_TIMEOUT, "the dead worker's cgroup to be removed")
        assert pool.submit(int, "2").result(timeout=RESULT_TIMEOUT) == 2  # the replacement has its own
        assert cgroup._placed[pool.workers()[0].pid] != path
