"""``resilpool run``: failure storms stay bounded (issue 12, item 4).

``--retry-wait`` backs off (the delays are read from the journal, the spacing of
attempts from the job's own log of start times), ``--halt`` stops a run after too
many failures, ``--skip-failed`` resumes without retrying failures, and quarantined
items are skipped on a rerun unless ``--retry-quarantined``.
"""

from __future__ import annotations

import json
from pathlib import Path

from test_cli import assert_one_line_error, journal_query, read_jsonl, resilpool, write_items

JOB = '''
import os, time

def flaky(item):
    with open(item["log"], "a") as f:
        f.write(f"{item['i']} {time.time()!r}\\n")
    if os.path.exists(item["fail_if"]):
        raise ConnectionError(f"item {item['i']}: connection refused")
    if item.get("poison"):
        os._exit(13)
    return item["i"]
'''


def setup_job(tmp_path: Path, n: int, *, poison: frozenset[int] = frozenset()) -> tuple[Path, Path]:
    (tmp_path / "job.py").write_text(JOB)
    log, cause = tmp_path / "runs.log", tmp_path / "cause"
    write_items(tmp_path / "items.jsonl", [{"i": i, "log": str(log), "fail_if": str(cause), "poison": i in poison} for i in range(n)])
    return log, cause


def runs_of(log: Path) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for line in log.read_text().splitlines():
        i, t = line.split()
        out.setdefault(int(i), []).append(float(t))
    return out


def test_retry_wait_backs_off_exponentially(tmp_path: Path) -> None:
    log, cause = setup_job(tmp_path, 2)
    cause.touch()
    proc = resilpool("run", "job:flaky", "-i", "items.jsonl", "-o", "out.jsonl", "-j", "run.db", "--retry", "3", "--retry-wait", "0.2:0.5", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    delays: dict[int, list[float]] = {}
    for idx, reason in journal_query(tmp_path / "run.db", "SELECT idx, reason FROM events WHERE kind = 'retried' ORDER BY t"):
        delays.setdefault(idx, []).append(float(reason))
    assert sorted(delays) == [0, 1]
    for idx, ds in delays.items():
        assert len(ds) == 3
        # retry k waits 0.2 * 2**(k-1) s, at most 0.5 s, plus up to 0.1 s of jitter
        for k, d in enumerate(ds, 1):
            base = min(0.2 * 2 ** (k - 1), 0.5)
            assert base <= d <= base + 0.1, (idx, k, d)
        starts = runs_of(log)[idx]
        assert len(starts) == 4
        # An attempt starts at least its delay after the previous one (which ended before).
        assert all(b - a >= d for a, b, d in zip(starts, starts[1:], ds)), (starts, ds)
    attempts = dict(journal_query(tmp_path / "run.db", "SELECT idx, attempts FROM items"))
    assert attempts == {0: 4, 1: 4}


def test_retry_wait_needs_retry_and_a_valid_range(tmp_path: Path) -> None:
    setup_job(tmp_path, 1)
    base = ("run", "job:flaky", "-i", "items.jsonl", "-o", "out.jsonl")
    assert_one_line_error(resilpool(*base, "--retry-wait", "1:60", cwd=tmp_path), "--retry-wait needs --retry N")
    assert_one_line_error(resilpool(*base, "--retry", "2", "--retry-wait", "60:1", cwd=tmp_path), "need 0 < MIN <= MAX")
    assert_one_line_error(resilpool(*base, "--retry", "2", "--retry-wait", "soon", cwd=tmp_path), "bad --retry-wait 'soon'")
    assert_one_line_error(resilpool(*base, "--halt", "later", cwd=tmp_path), "bad --halt 'later': expected soon,fail=N")


def test_halt_soon_stops_dispatching_and_exits_4(tmp_path: Path) -> None:
    log, cause = setup_job(tmp_path, 200)
    cause.touch()
    proc = resilpool("run", "job:flaky", "-i", "items.jsonl", "-o", "out.jsonl", "-j", "run.db", "-w", "2", "--halt", "soon,fail=3", "--plain", cwd=tmp_path)
    assert proc.returncode == 4, proc.stderr
    assert "halted (--halt soon,fail=3: " in proc.stderr
    ran = len(log.read_text().splitlines())
    assert ran < 200  # a storm stopped early (the window handed out ahead is cancelled)
    statuses = [s for (s,) in journal_query(tmp_path / "run.db", "SELECT status FROM runs")]
    assert statuses == ["halted"]
    cause.unlink()
    again = resilpool("run", "job:flaky", "-i", "items.jsonl", "-o", "out.jsonl", "-j", "run.db", "-w", "2", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert sorted(r["index"] for r in read_jsonl(tmp_path / "out.jsonl")) == list(range(200))


def test_halt_on_a_percentage(tmp_path: Path) -> None:
    log, cause = setup_job(tmp_path, 100)
    cause.touch()
    proc = resilpool("run", "job:flaky", "-i", "items.jsonl", "-o", "out.jsonl", "-w", "2", "--halt", "soon,fail=50%", "--plain", cwd=tmp_path)
    assert proc.returncode == 4, proc.stderr
    assert "--halt soon,fail=50%" in proc.stderr


def test_skip_failed_resumes_without_retrying_failures(tmp_path: Path) -> None:
    log, cause = setup_job(tmp_path, 5)
    cause.touch()
    args = ("run", "job:flaky", "-i", "items.jsonl", "-o", "out.jsonl", "-j", "run.db")
    assert resilpool(*args, cwd=tmp_path).returncode == 1
    assert len(runs_of(log)) == 5
    cause.unlink()
    log.unlink()
    proc = resilpool(*args, "--skip-failed", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "5 of 5 items failed earlier and were skipped (--skip-failed)" in proc.stderr
    assert not log.exists()  # nothing ran
    proc = resilpool(*args, cwd=tmp_path)  # the default retries them
    assert proc.returncode == 0, proc.stderr
    assert sorted(runs_of(log)) == list(range(5))


def test_quarantined_items_are_skipped_on_rerun_unless_asked(tmp_path: Path) -> None:
    log, cause = setup_job(tmp_path, 4, poison=frozenset({2}))
    args = ("run", "job:flaky", "-i", "items.jsonl", "-o", "out.jsonl", "-j", "run.db", "-w", "2", "--retry", "5")
    first = resilpool(*args, cwd=tmp_path)
    assert first.returncode == 1, first.stderr
    (err,) = read_jsonl(tmp_path / "out.errors.jsonl")
    assert err["index"] == 2 and err["error"]["type"] == "PoisonTaskError"
    before = len(runs_of(log)[2])
    proc = resilpool(*args, cwd=tmp_path)
    assert proc.returncode == 1
    assert "1 of 4 items failed earlier and were skipped (quarantined; --retry-quarantined retries them)" in proc.stderr
    assert len(runs_of(log)[2]) == before
    proc = resilpool(*args, "--retry-quarantined", cwd=tmp_path)
    assert proc.returncode == 1
    assert len(runs_of(log)[2]) > before
    report = json.loads(resilpool("report", "run.db", "--json", cwd=tmp_path).stdout)
    assert report["totals"]["failed"] == 1


HANG_JOB = '''
import os, time

def slow_or_fail(item):
    with open(item["log"], "a") as f:
        f.write(f"{item['i']} {os.getpid()}\\n")
    if item["i"] < 3:
        raise ConnectionError("refused")
    time.sleep(60)  # killed by --halt now long before
'''


def test_halt_now_kills_the_running_items_which_stay_pending(tmp_path: Path) -> None:
    (tmp_path / "job.py").write_text(HANG_JOB)
    log = tmp_path / "runs.log"
    write_items(tmp_path / "items.jsonl", [{"i": i, "log": str(log)} for i in range(20)])
    proc = resilpool("run", "job:slow_or_fail", "-i", "items.jsonl", "-o", "out.jsonl", "-j", "run.db", "-w", "2", "--halt", "now,fail=3", "--plain", cwd=tmp_path)
    assert proc.returncode == 4, proc.stderr
    assert "halted (--halt now,fail=3: 3 items failed in this run)" in proc.stderr
    states = dict(journal_query(tmp_path / "run.db", "SELECT state, COUNT(*) FROM items GROUP BY state"))
    assert states.get("failed") == 3 and states.get("done") is None  # the killed items did not fail
    assert len(read_jsonl(tmp_path / "out.errors.jsonl")) == 3


def test_a_worker_dying_inside_a_chunk_costs_only_its_running_item(tmp_path: Path) -> None:
    # Fast items go several to a task (a chunk).  Item 400 kills its worker: the items its
    # chunk had finished are known from the worker's transit file and count as done, item
    # 400 fails as it would alone, and the chunk's other items run once, later.
    n = 600
    log, _ = setup_job(tmp_path, n, poison=frozenset({400}))
    # --chunk-size: the measured size depends on the machine's load (one or two items per task
    # on a loaded CI machine), and item 400 must run inside a chunk (the second item of 399..405).
    proc = resilpool("run", "job:flaky", "-i", "items.jsonl", "-o", "out.jsonl", "-j", "run.db", "-w", "2", "--plain", "--chunk-size", "7", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert sorted(r["index"] for r in read_jsonl(tmp_path / "out.jsonl")) == [i for i in range(n) if i != 400]
    [error] = read_jsonl(tmp_path / "out.errors.jsonl")
    assert error["index"] == 400 and error["error"]["type"] == "WorkerCrashedError", error
    # The crash's event names no item (a one-item task's would name 400): it was a chunk.
    assert journal_query(tmp_path / "run.db", "SELECT idx FROM events WHERE kind = 'worker_exited' AND reason = 'crash'") == [(None,)]
    runs = runs_of(log)
    assert sorted(runs) == list(range(n)) and all(len(t) == 1 for t in runs.values()), {i: t for i, t in runs.items() if len(t) != 1}
    [(stats,)] = journal_query(tmp_path / "run.db", "SELECT stats FROM runs")
    assert json.loads(stats)["submitted"] < n // 2, "the items did not go several to a task"
    assert not (tmp_path / "run.db.transit").exists()  # removed at the end of the run
