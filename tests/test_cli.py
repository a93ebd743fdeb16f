"""End-to-end tests of the command line: ``resilpool run``, ``resilpool report``, ``resilpool demo``.

Each test runs the command in a subprocess (``python -m resilpool.cli``), in its
own temporary directory, with ``tests/`` on ``PYTHONPATH`` so that workers import
``workload``.  Every wait has a timeout; order comes from files the tasks write
and from the command's own output, never from sleeping.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from cli_helpers import (  # noqa: F401  (re-exported for the other test_cli_*.py modules)
    TESTS,
    RUN_TIMEOUT,
    StderrReader,
    _env,
    assert_one_line_error,
    done_in_journal,
    journal_query,
    kill_9_after,
    logged_pids,
    logged_runs,
    read_jsonl,
    resilpool,
    squares,
    start,
    wait_gone,
    wait_until,
    write_items,
)


# --- a run, end to end -------------------------------------------------------------


def test_run_writes_each_result_once_and_reports(tmp_path: Path) -> None:
    log = tmp_path / "runs.log"
    write_items(tmp_path / "items.jsonl", squares(300, log=str(log)))
    proc = resilpool(
        "run", "workload:cli_square", "--input", "items.jsonl", "--output", "out.jsonl",
        "--journal", "run.db", "--report", "report.json", "--workers", "2", "--max-tasks", "50",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "all 300 items done" in proc.stderr
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert sorted(r["index"] for r in rows) == list(range(300))
    for r in rows:
        assert r["input"]["i"] == r["index"]
        assert r["result"] == {"i": r["index"], "square": r["index"] ** 2}
    assert logged_runs(log) == collections.Counter(range(300))
    assert (tmp_path / "out.errors.jsonl").read_text() == ""

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["totals"] == {"items": 300, "done": 300, "failed": 0, "pending": 0, "running": 0, "interrupted": 0}
    assert report["complete"] is True
    assert report["function"] == "workload:cli_square"
    assert [r["status"] for r in report["runs"]] == ["completed"]
    assert report["recycles"].get("max_tasks", 0) >= 4  # 300 items, 50 per worker
    assert sum(b["done"] for b in report["timeline"]["buckets"]) == 300
    assert len(report["slowest"]) == 10
    assert report["peak_rss"]["item_bytes"] > 0
    pids = {pid for (pid,) in journal_query(tmp_path / "run.db", "SELECT DISTINCT pid FROM items")}
    assert pids == logged_pids(log)  # the journal knows which worker ran each item


@pytest.mark.parametrize(
    ("name", "text", "fmt", "expected"),
    [
        ("rows.csv", "a,b\nx,y\n\nz,w\n", None, [{"a": "X", "b": "Y"}, {"a": "Z", "b": "W"}]),
        ("lines.txt", "one\n\ntwo\r\nthree", None, ["ONE", "TWO", "THREE"]),
        ("array.json", '[{"a": "q"}, "r", 3]', None, [{"a": "Q"}, "R", 3]),
        ("lines.json", '"s"\n"t"\n', None, ["S", "T"]),
        ("data.dat", "u\nv\n", "txt", ["U", "V"]),
    ],
)
def test_input_formats(tmp_path: Path, name: str, text: str, fmt: str | None, expected: list[Any]) -> None:
    (tmp_path / name).write_text(text)
    extra = ["--format", fmt] if fmt else []
    proc = resilpool("run", "workload:cli_upper", "-i", name, "-o", "out.jsonl", "--ordered", *extra, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"over {len(expected)} items" in proc.stderr and f"all {len(expected)} items done" in proc.stderr
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [r["index"] for r in rows] == list(range(len(expected)))
    assert [r["result"] for r in rows] == expected


def test_ordered_output_follows_the_input(tmp_path: Path) -> None:
    # Early items sleep, so without --ordered they would finish last.
    items = [{"i": i, "sleep": 0.05 if i < 4 else 0} for i in range(60)]
    write_items(tmp_path / "items.jsonl", items)
    proc = resilpool("run", "workload:cli_square", "-i", "items.jsonl", "-o", "out.jsonl", "--ordered", "-w", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [r["index"] for r in read_jsonl(tmp_path / "out.jsonl")] == list(range(60))


def test_malformed_lines_become_failed_items(tmp_path: Path) -> None:
    good = [json.dumps({"i": i}) for i in range(5)]
    data = "\n".join([good[0], "{not json", good[1], good[2], "", good[3]]).encode() + b"\n\xff\xfe broken\n" + good[4].encode() + b"\n"
    (tmp_path / "items.jsonl").write_bytes(data)
    proc = resilpool("run", "workload:cli_square", "-i", "items.jsonl", "-o", "out.jsonl", "--errors", "bad.jsonl", "-j", "run.db", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "2 of 7 items failed" in proc.stderr
    assert sorted(r["result"]["i"] for r in read_jsonl(tmp_path / "out.jsonl")) == [0, 1, 2, 3, 4]
    errors = sorted(read_jsonl(tmp_path / "bad.jsonl"), key=lambda r: r["index"])
    assert [(e["index"], e["line"]) for e in errors] == [(1, 2), (5, 7)]
    assert errors[0]["input"] == "{not json"
    assert errors[0]["error"]["type"] == "InputError" and "not valid JSON" in errors[0]["error"]["message"]
    assert "not valid UTF-8" in errors[1]["error"]["message"]
    states = dict(journal_query(tmp_path / "run.db", "SELECT idx, state FROM items"))
    assert states[1] == states[5] == "failed"


def test_failures_carry_type_message_and_attempt_history(tmp_path: Path) -> None:
    items = [{"i": i, "fail": i in (3, 8)} for i in range(12)]
    write_items(tmp_path / "items.jsonl", items)
    proc = resilpool("run", "workload:cli_square", "-i", "items.jsonl", "-o", "out.jsonl", "--retry", "2", "-j", "run.db", cwd=tmp_path)
    assert proc.returncode == 1
    assert "2 of 12 items failed" in proc.stderr and "out.errors.jsonl" in proc.stderr
    errors = sorted(read_jsonl(tmp_path / "out.errors.jsonl"), key=lambda r: r["index"])
    assert [e["index"] for e in errors] == [3, 8]
    for e in errors:
        err = e["error"]
        assert (err["type"], err["module"]) == ("ValueError", "builtins")
        assert err["message"] == f"item {e['index']} fails"
        assert len(err["notes"]) == 2 and all(n.startswith(f"attempt {k + 1} pid ") for k, n in enumerate(err["notes"]))
        assert "raise ValueError" in err["traceback"]
        assert e["attempts"] == 3 and e["input"] == {"i": e["index"], "fail": True}
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 10
    rows = journal_query(tmp_path / "run.db", "SELECT attempts, error_type FROM items WHERE state = 'failed'")
    assert rows == [(3, "ValueError"), (3, "ValueError")]


def test_result_without_json_form_fails_its_item(tmp_path: Path) -> None:
    write_items(tmp_path / "items.jsonl", [1, 2])
    proc = resilpool("run", "workload:cli_not_json", "-i", "items.jsonl", "-o", "out.jsonl", cwd=tmp_path)
    assert proc.returncode == 1
    errors = read_jsonl(tmp_path / "out.errors.jsonl")
    assert {e["error"]["type"] for e in errors} == {"TypeError"}
    assert "not JSON serializable" in errors[0]["error"]["message"]


def test_module_in_the_current_directory_is_found_by_the_workers(tmp_path: Path) -> None:
    (tmp_path / "mymod.py").write_text("import os\n\ndef f(x):\n    return [x, os.getpid()]\n")
    write_items(tmp_path / "items.jsonl", range(20))
    script = Path(sys.executable).parent / "resilpool"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "resilpool.cli"]
    proc = subprocess.run([*cmd, "run", "mymod:f", "-i", "items.jsonl", "-o", "out.jsonl", "-w", "2"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert sorted(r["result"][0] for r in rows) == list(range(20))
    assert os.getpid() not in {r["result"][1] for r in rows}


# --- resuming -------------------------------------------------------------------------


def test_kill_9_halfway_then_rerun_runs_each_item_exactly_once(tmp_path: Path) -> None:
    n, gated_from = 2000, 1500
    log, release = tmp_path / "runs.log", tmp_path / "release"
    # Items from 1500 on wait for `release`: the first run cannot finish before the kill.
    items = [{"i": i, "log": str(log), "sleep": 0.001, **({"gate": str(release)} if i >= gated_from else {})} for i in range(n)]
    write_items(tmp_path / "items.jsonl", items)
    args = ("run", "workload:cli_square", "-i", "items.jsonl", "-o", "out.jsonl", "-j", "run.db", "-w", "2")
    proc = start(*args, cwd=tmp_path)
    kill_9_after(proc, tmp_path / "run.db", 500)
    assert proc.returncode == -signal.SIGKILL
    wait_gone(logged_pids(log))
    done_before = done_in_journal(tmp_path / "run.db")
    assert len(done_before) >= 500
    runs_before = logged_runs(log)

    release.touch()
    proc2 = resilpool(*args, cwd=tmp_path)
    assert proc2.returncode == 0, proc2.stderr
    recovered = int(m.group(1)) if (m := re.search(r"recovered (\d+) results", proc2.stderr)) else 0
    assert f"{len(done_before) + recovered} done earlier" in proc2.stderr

    rows = read_jsonl(tmp_path / "out.jsonl")
    indices = [r["index"] for r in rows]
    assert len(indices) == len(set(indices)) == n  # every result exactly once
    assert all(r["result"] == {"i": r["index"], "square": r["index"] ** 2} for r in rows)
    runs = logged_runs(log)
    assert set(runs) == set(range(n))
    # An item recorded done before the kill never ran again; only unrecorded ones may have.
    assert all(runs[i] == 1 for i in done_before)
    assert all(runs[i] <= runs_before[i] + 1 for i in runs)

    assert done_in_journal(tmp_path / "run.db") == set(range(n))
    statuses = [s for (s,) in journal_query(tmp_path / "run.db", "SELECT status FROM runs ORDER BY id")]
    assert statuses == ["killed", "completed"]


def test_sigterm_drains_running_items_and_rerun_resumes(tmp_path: Path) -> None:
    log, release = tmp_path / "runs.log", tmp_path / "release"
    write_items(tmp_path / "items.jsonl", squares(10, log=str(log), gate=str(release)))
    args = ("run", "workload:cli_square", "-i", "items.jsonl", "-o", "out.jsonl", "-j", "run.db", "-w", "2", "--plain")
    proc = start(*args, cwd=tmp_path)
    err = StderrReader(proc)
    try:
        wait_until(lambda: len(logged_runs(log)) == 2, 30, "two items running")
        proc.send_signal(signal.SIGTERM)
        err.wait_for("draining")
        release.touch()
        code, text = err.finish()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert code == 128 + signal.SIGTERM, text
    assert "interrupted by SIGTERM" in text and "rerun the same command to resume" in text
    assert "Traceback" not in text
    started = set(logged_runs(log))
    assert len(started) == 2  # nothing new started after the signal
    assert {r["index"] for r in read_jsonl(tmp_path / "out.jsonl")} == started  # the running ones finished
    assert done_in_journal(tmp_path / "run.db") == started
    assert journal_query(tmp_path / "run.db", "SELECT status FROM runs") == [("interrupted",)]

    proc2 = resilpool(*args, cwd=tmp_path)
    assert proc2.returncode == 0, proc2.stderr
    assert sorted(r["index"] for r in read_jsonl(tmp_path / "out.jsonl")) == list(range(10))
    assert logged_runs(log) == collections.Counter(range(10))


def test_second_signal_cancels_running_items(tmp_path: Path) -> None:
    log, release = tmp_path / "runs.log", tmp_path / "release"
    write_items(tmp_path / "items.jsonl", squares(6, log=str(log), gate=str(release)))
    args = ("run", "workload:cli_square", "-i", "items.jsonl", "-o", "out.jsonl", "-j", "run.db", "-w", "2", "--plain")
    proc = start(*args, cwd=tmp_path)
    err = StderrReader(proc)
    try:
        wait_until(lambda: len(logged_runs(log)) == 2, 30, "two items running")
        proc.send_signal(signal.SIGINT)
        err.wait_for("draining")
        proc.send_signal(signal.SIGINT)
        code, text = err.finish()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert code == 128 + signal.SIGINT, text
    assert "cancelled by a second SIGINT" in text and "2 running items abandoned" in text
    wait_gone(logged_pids(log))  # the abandoned items' workers were killed
    assert done_in_journal(tmp_path / "run.db") == set()
    assert (tmp_path / "out.jsonl").read_text() == ""
    assert journal_query(tmp_path / "run.db", "SELECT status FROM runs") == [("cancelled",)]

    release.touch()
    proc2 = resilpool(*args, cwd=tmp_path)
    assert proc2.returncode == 0, proc2.stderr
    assert sorted(r["index"] for r in read_jsonl(tmp_path / "out.jsonl")) == list(range(6))


def test_rerun_retries_failed_items_only(tmp_path: Path) -> None:
    flag = tmp_path / "fixed"
    (tmp_path / "job.py").write_text(
        "import os\n\ndef f(x):\n"
        f"    if x % 5 == 0 and not os.path.exists({str(flag)!r}):\n"
        "        raise RuntimeError('not yet')\n"
        "    return x\n"
    )
    write_items(tmp_path / "items.jsonl", range(20))
    args = ("run", "job:f", "-i", "items.jsonl", "-o", "out.jsonl", "-j", "run.db")
    first = resilpool(*args, cwd=tmp_path)
    assert first.returncode == 1 and "4 of 20 items failed" in first.stderr
    assert len(read_jsonl(tmp_path / "out.errors.jsonl")) == 4
    flag.touch()
    second = resilpool(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "(4 to run, 16 done earlier)" in second.stderr
    assert sorted(r["index"] for r in read_jsonl(tmp_path / "out.jsonl")) == list(range(20))
    assert (tmp_path / "out.errors.jsonl").read_text() == ""
    attempts = dict(journal_query(tmp_path / "run.db", "SELECT idx, attempts FROM items"))
    assert {i for i, a in attempts.items() if a == 2} == {0, 5, 10, 15}


def test_completed_journal_reruns_nothing(tmp_path: Path) -> None:
    log = tmp_path / "runs.log"
    write_items(tmp_path / "items.jsonl", squares(30, log=str(log)))
    args = ("run", "workload:cli_square", "-i", "items.jsonl", "-o", "out.jsonl", "-j", "run.db")
    assert resilpool(*args, cwd=tmp_path).returncode == 0
    before = (tmp_path / "out.jsonl").read_bytes()
    again = resilpool(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "(0 to run, 30 done earlier)" in again.stderr
    assert (tmp_path / "out.jsonl").read_bytes() == before
    assert logged_runs(log) == collections.Counter(range(30))


def test_an_output_that_fails_mid_run_ends_it_and_a_rerun_resumes(tmp_path: Path) -> None:
    log = tmp_path / "runs.log"
    write_items(tmp_path / "items.jsonl", squares(200, log=str(log)))
    args = ["run", "workload:cli_square", "-i", "items.jsonl", "-o", "out.jsonl", "-j", "run.db", "-w", "2"]
    # The write that would reach 50 result lines fails (a full disk): a fatal error, not an item's failure.
    script = (
        "import errno, sys\n"
        "from resilpool.cli import _inputs\n"
        "from resilpool.cli import main\n"
        "write, n = _inputs.Sink.write, [0]\n"
        "def full(self, data):\n"
        "    if self.path.endswith('out.jsonl'):\n"
        "        n[0] += data.count(b'\\n')\n"
        "        if n[0] >= 50:\n"
        "            raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "    return write(self, data)\n"
        "_inputs.Sink.write = full\n"
        "raise SystemExit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == 3, proc.stderr
    assert "No space left on device" in proc.stderr and "rerun the same command to resume" in proc.stderr
    wait_gone(logged_pids(log))
    assert journal_query(tmp_path / "run.db", "SELECT status FROM runs") == [("broken",)]
    done_before = done_in_journal(tmp_path / "run.db")

    again = resilpool(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    indices = [r["index"] for r in read_jsonl(tmp_path / "out.jsonl")]
    assert sorted(indices) == list(range(200))
    assert all(logged_runs(log)[i] == 1 for i in done_before)


# --- --dry-run ------------------------------------------------------------------------


def test_dry_run_runs_the_first_item_and_writes_nothing(tmp_path: Path) -> None:
    write_items(tmp_path / "items.jsonl", squares(5))
    proc = resilpool("run", "workload:cli_square", "-i", "items.jsonl", "-o", "out.jsonl", "-j", "run.db", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"index": 0, "input": {"i": 0}, "result": {"i": 0, "square": 0}}
    assert "nothing written" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["items.jsonl"]


def test_dry_run_shows_the_failure(tmp_path: Path) -> None:
    write_items(tmp_path / "items.jsonl", [{"i": 0, "fail": True}])
    proc = resilpool("run", "workload:cli_square", "-i", "items.jsonl", "--dry-run", "--retry", "1", cwd=tmp_path)
    assert proc.returncode == 1
    assert "item 0 failed: ValueError: item 0 fails" in proc.stderr
    assert "attempt 1 pid" in proc.stderr
    assert proc.stdout == ""


# --- bad arguments: one line, exit status 2, nothing run ------------------------------


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("nosuchmodule:f",), ("cannot import module 'nosuchmodule'", "no such module")),
        (("workload",), ("bad target 'workload'", "MODULE:FUNCTION")),
        (("workload:",), ("bad target",)),
        (("workload:nosuchfunction",), ("has no function 'nosuchfunction'",)),
        (("workload:_LEAK",), ("is not callable",)),
        (("brokenmod:f",), ("importing module 'brokenmod' failed: ZeroDivisionError",)),
        (("workload:cli_square", "-i", "missing.jsonl"), ("cannot read input missing.jsonl", "No such file")),
        (("workload:cli_square", "-i", "items.dat"), ("cannot tell the format", "--format")),
        (("workload:cli_square", "-i", "adir"), ("cannot read input adir: it is a directory",)),
        (("workload:cli_square", "-i", "items.jsonl/nested.jsonl"), ("cannot read input items.jsonl/nested.jsonl: Not a directory",)),
        (("workload:cli_square", "-o", "/proc/out.jsonl"), ("cannot write --output /proc/out.jsonl",)),
        (("workload:cli_square", "--report", "/proc/report.json"), ("cannot write --report /proc/report.json",)),
        (("workload:cli_square", "-o", "nodir/out.jsonl"), ("cannot write --output nodir/out.jsonl", "no directory")),
        (("workload:cli_square", "-o", "adir"), ("cannot write --output adir: it is a directory",)),
        (("workload:cli_square", "-o", "items.jsonl"), ("--output items.jsonl is also the input",)),
        (("workload:cli_square", "--max-rss", "lots"), ("--max-rss: Limits.max_rss could not be parsed as a size: 'lots'",)),
        (("workload:cli_square", "--max-rss", "1GiB", "--soft-max-rss", "2GiB"), ("Limits.soft_max_rss", "must be <= max_rss")),
        (("workload:cli_square", "--task-timeout", "-1"), ("--task-timeout: Limits.task_timeout must be > 0 seconds",)),
        (("workload:cli_square", "--task-timeout", "soon"), ("argument --task-timeout: invalid float value: 'soon'",)),
        (("workload:cli_square", "--max-tasks", "0"), ("--max-tasks: Limits.max_tasks must be an int >= 1",)),
        (("workload:cli_square", "--workers", "0"), ("--workers must be >= 1",)),
        (("workload:cli_square", "--retry", "-1"), ("--retry must be >= 0",)),
        (("workload:cli_square", "--chunk-size", "0"), ("--chunk-size must be from 1 to 256, got 0",)),
        (("workload:cli_square", "--chunk-size", "8", "--retry", "2"), ("--chunk-size 8 cannot go with --retry", "drop --chunk-size")),
        (("workload:cli_square", "--journal", "nodir/run.db"), ("cannot write --journal nodir/run.db",)),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(tmp_path: Path, args: Sequence[str], needles: Sequence[str]) -> None:
    write_items(tmp_path / "items.jsonl", squares(3))
    (tmp_path / "items.dat").write_text("x\n")
    (tmp_path / "adir").mkdir()
    (tmp_path / "brokenmod.py").write_text("1 / 0\n")
    full = ["run", *args]
    if "-i" not in args:
        full += ["-i", "items.jsonl"]
    if "-o" not in args:
        full += ["-o", "out.jsonl"]
    proc = resilpool(*full, cwd=tmp_path)
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "out.jsonl").exists()


def test_unreadable_input_and_unwritable_output(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads and writes regardless of permissions")
    write_items(tmp_path / "items.jsonl", squares(3))
    (tmp_path / "items.jsonl").chmod(0)
    assert_one_line_error(resilpool("run", "workload:cli_square", "-i", "items.jsonl", "-o", "out.jsonl", cwd=tmp_path), "cannot read input", "Permission denied")
    (tmp_path / "items.jsonl").chmod(0o644)
    (tmp_path / "ro").mkdir(mode=0o555)
    assert_one_line_error(resilpool("run", "workload:cli_square", "-i", "items.jsonl", "-o", "ro/out.jsonl", cwd=tmp_path), "cannot write --output ro/out.jsonl")


def test_journal_of_another_input_or_function_is_refused(tmp_path: Path) -> None:
    write_items(tmp_path / "a.jsonl", squares(5))
    write_items(tmp_path / "b.jsonl", squares(6))
    ok = resilpool("run", "workload:cli_square", "-i", "a.jsonl", "-o", "out.jsonl", "-j", "run.db", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    before = (tmp_path / "out.jsonl").read_bytes()

    other_input = resilpool("run", "workload:cli_square", "-i", "b.jsonl", "-o", "out.jsonl", "-j", "run.db", cwd=tmp_path)
    assert_one_line_error(other_input, "journal run.db was made for input", "a.jsonl", "input size differs", "use a new journal")
    write_items(tmp_path / "a.jsonl", [{"i": i} for i in (0, 1, 2, 3, 9)])  # same size, other content
    changed = resilpool("run", "workload:cli_square", "-i", "a.jsonl", "-o", "out.jsonl", "-j", "run.db", cwd=tmp_path)
    assert_one_line_error(changed, "input content (SHA-256) differs")
    write_items(tmp_path / "a.jsonl", squares(5))
    other_fn = resilpool("run", "workload:cli_upper", "-i", "a.jsonl", "-o", "out.jsonl", "-j", "run.db", cwd=tmp_path)
    assert_one_line_error(other_fn, "function differs", "workload:cli_square")
    other_out = resilpool("run", "workload:cli_square", "-i", "a.jsonl", "-o", "other.jsonl", "-j", "run.db", cwd=tmp_path)
    assert_one_line_error(other_out, "writes its results to", "pass --output")
    assert (tmp_path / "out.jsonl").read_bytes() == before  # a refused run touches nothing
    assert not (tmp_path / "other.jsonl").exists()


def test_output_that_lost_journaled_results_is_refused(tmp_path: Path) -> None:
    write_items(tmp_path / "items.jsonl", squares(5))
    args = ("run", "workload:cli_square", "-i", "items.jsonl", "-o", "out.jsonl", "-j", "run.db")
    assert resilpool(*args, cwd=tmp_path).returncode == 0
    (tmp_path / "out.jsonl").write_text("")
    assert_one_line_error(resilpool(*args, cwd=tmp_path), "out.jsonl holds 0 bytes", "records 5 results", "restore the output")
    (tmp_path / "out.jsonl").unlink()
    assert_one_line_error(resilpool(*args, cwd=tmp_path), "out.jsonl is missing")


def test_journal_in_use_is_refused(tmp_path: Path) -> None:
    release = tmp_path / "release"
    write_items(tmp_path / "items.jsonl", squares(2, gate=str(release)))
    args = ("run", "workload:cli_square", "-i", "items.jsonl", "-o", "out.jsonl", "-j", "run.db")
    proc = start(*args, cwd=tmp_path)
    err = StderrReader(proc)
    try:
        err.wait_for("(run 1)")
        second = resilpool(*args, cwd=tmp_path)
        assert_one_line_error(second, "journal run.db is in use by another resilpool run")
        release.touch()
        code, text = err.finish()
        assert code == 0, text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)


# --- resilpool report -------------------------------------------------------------------


def test_report_command_text_and_json(tmp_path: Path) -> None:
    items = [{"i": i, "fail": i == 4} for i in range(40)]
    write_items(tmp_path / "items.jsonl", items)
    run = resilpool("run", "workload:cli_square", "-i", "items.jsonl", "-o", "out.jsonl", "-j", "run.db", "--retry", "1", "--max-tasks", "10", "-w", "2", cwd=tmp_path)
    assert run.returncode == 1
    as_json = resilpool("report", "run.db", "--json", cwd=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    r = json.loads(as_json.stdout)
    assert r["totals"] == {"items": 40, "done": 39, "failed": 1, "pending": 0, "running": 0, "interrupted": 0}
    assert r["complete"] is False
    assert r["failures_by_type"] == {"ValueError": 1}
    assert r["failed_items"][0]["index"] == 4 and r["failed_items"][0]["attempts"] == 2
    assert r["retries"] == {"attempts_retried": 1, "items_retried": 1}
    assert r["recycles"]["max_tasks"] >= 3
    assert r["runs"][0]["status"] == "failed" and r["runs"][0]["workers"] == 2
    assert sum(b["done"] + b["failed"] for b in r["timeline"]["buckets"]) == 40
    assert [s["elapsed_s"] for s in r["slowest"]] == sorted((s["elapsed_s"] for s in r["slowest"]), reverse=True)

    text = resilpool("report", "run.db", cwd=tmp_path)
    assert text.returncode == 0
    for needle in ("items     39 done, 1 failed, 0 pending", "recycles  max_tasks", "failures  ValueError 1", "item 4 (line 5): ValueError", "timeline"):
        assert needle in text.stdout, text.stdout


def test_report_of_a_missing_or_foreign_file(tmp_path: Path) -> None:
    assert_one_line_error(resilpool("report", "nothing.db", cwd=tmp_path), "no journal at nothing.db")
    (tmp_path / "notes.txt").write_text("hello")
    assert_one_line_error(resilpool("report", "notes.txt", cwd=tmp_path), "is not a resilpool journal")


# --- resilpool demo still works ---------------------------------------------------------


def test_demo_plain(tmp_path: Path) -> None:
    # 12 tasks: leaky ones and one crash that is retried (the poison and hanging tasks come from 20 and 23 on).
    proc = resilpool("demo", "--tasks", "12", "--workers", "2", "--plain", cwd=tmp_path, timeout=50)
    assert proc.returncode == 0, proc.stderr
    assert "done 12/12" in proc.stdout
    assert "lost:      0" in proc.stdout
