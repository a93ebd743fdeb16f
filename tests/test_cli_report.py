"""``resilpool report``: a true report (issue 12, item 5).

Run rows come from the items, so a killed run shows what it completed; a run in
progress (its journal lock held) shows as running with its pid; sizes read as
sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

from test_cli import StderrReader, kill_9_after, logged_pids, resilpool, squares, start, wait_gone, write_items


def test_a_killed_run_shows_what_it_completed(tmp_path: Path) -> None:
    log, release = tmp_path / "runs.log", tmp_path / "release"
    items = [{"i": i, "log": str(log), **({"gate": str(release)} if i >= 30 else {})} for i in range(40)]
    write_items(tmp_path / "items.jsonl", items)
    proc = start("run", "workload:cli_square", "-i", "items.jsonl", "-o", "out.jsonl", "-j", "run.db", "-w", "2", cwd=tmp_path)
    kill_9_after(proc, tmp_path / "run.db", 30, running=2)  # items 30 and 31 wait at the gate
    wait_gone(logged_pids(log))
    report = json.loads(resilpool("report", "run.db", "--json", cwd=tmp_path).stdout)
    (run,) = report["runs"]
    assert run["status"] == "killed"
    assert run["done"] == report["totals"]["done"] >= 30
    assert report["totals"]["interrupted"] == 2 and report["live"] is None
    text = resilpool("report", "run.db", cwd=tmp_path).stdout
    assert "killed" in text and f"done {run['done']}" in text
    assert "items     " in text and "interrupted" in text


def test_a_live_run_is_shown_running_with_its_pid(tmp_path: Path) -> None:
    release = tmp_path / "release"
    write_items(tmp_path / "items.jsonl", squares(6, gate=str(release)))
    proc = start("run", "workload:cli_square", "-i", "items.jsonl", "-o", "out.jsonl", "-j", "run.db", "-w", "2", "--plain", cwd=tmp_path)
    err = StderrReader(proc)
    try:
        err.wait_for("(run 1)")
        report = json.loads(resilpool("report", "run.db", "--json", cwd=tmp_path).stdout)
        assert report["live"] == {"run": 1, "pid": proc.pid}
        assert report["runs"][0]["status"] == "running"
        assert report["totals"]["interrupted"] == 0
        text = resilpool("report", "run.db", cwd=tmp_path).stdout
        assert f"run #1 is running now (pid {proc.pid})" in text
        release.touch()
        code, out = err.finish()
        assert code == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    report = json.loads(resilpool("report", "run.db", "--json", cwd=tmp_path).stdout)
    assert report["live"] is None and report["runs"][0]["status"] == "completed"
    assert report["peak_rss"]["bytes"] > 0
    text = resilpool("report", "run.db", cwd=tmp_path).stdout
    assert "peak worker RSS" in text and "MiB" in text
