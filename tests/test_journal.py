"""The journal, the readers and writers, and the report of ``resilpool run``, without processes.

The central test replays the runner's write protocol (append a result line, queue
its done row, now and then fsync and commit) and checks, for every commit and
every length the output file can have when the process is killed after it, that
a resume keeps exactly the lines of the items the journal records as done.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pickle
import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from resilpool.cli import _task
from resilpool.cli._inputs import InputError, Malformed, Sink, detect_format, line_digest, open_input
from resilpool.cli._journal import Journal, JournalError, open_readonly
from resilpool.cli._report import build_report, render_report
from resilpool.cli._run import resume_output

IDENTITY = {
    "function": "mod:f",
    "output_path": "/tmp/out.jsonl",
    "input_path": "/tmp/in.jsonl",
    "input_format": "jsonl",
    "input_size": "100",
    "input_digest": "sha256:" + "ab" * 32,
    "item_count": "50",
}


def new_journal(path: Path, identity: dict[str, str] = IDENTITY) -> Journal:
    j = Journal(str(path))
    j.bind(identity)
    j.begin_run(["resilpool", "run"], 2)
    return j


def sink_at(path: Path, keep: int = 0) -> Sink:
    return Sink(os.open(path, os.O_WRONLY | os.O_CREAT), str(path), keep=keep)


def line(idx: int) -> bytes:
    return f'{{"index": {idx}, "input": {idx}, "result": {idx * idx}}}\n'.encode()


# --- consistency of the output and the journal, at every instant ------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_kill_at_any_instant_leaves_no_duplicate_and_no_loss(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    print(f"seed {seed}")
    n = int(IDENTITY["item_count"])
    out = tmp_path / "out.jsonl"
    j = new_journal(tmp_path / "run.db")
    sink = sink_at(out)
    stream = b""
    snapshots: list[tuple[Path, int, set[int]]] = []  # (journal copy, committed offset, done set)
    done: set[int] = set()
    order = list(range(n))
    rng.shuffle(order)  # completion order
    for k, idx in enumerate(order):
        data = line(idx)
        sink.write(data)
        stream += data
        j.add_done((idx, 1234, 1.0, 0.5, 2**20))
        done.add(idx)
        if rng.random() < 0.3:
            sink.flush()
        if rng.random() < 0.2 or k == n - 1:
            offset = sink.sync()  # the runner's _commit: fsync, then commit
            j.commit(offset, line_digest(sink.last_line))
            snap = tmp_path / f"snap{len(snapshots)}.db"
            dst = sqlite3.connect(snap)
            j._conn.backup(dst)
            dst.close()
            snapshots.append((snap, offset, set(done)))
    sink.close()
    j.close()
    assert len(snapshots) >= 3

    for snap, offset, committed in snapshots:
        # The file holds the committed bytes and any part of what was written after them.
        cuts = sorted({offset, len(stream), *rng.sample(range(offset, len(stream) + 1), min(8, len(stream) - offset + 1))})
        for cut in cuts:
            resume = tmp_path / "resume"
            resume.mkdir(exist_ok=True)
            db = resume / "run.db"
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
            db.write_bytes(snap.read_bytes())
            resumed_out = resume / "out.jsonl"
            resumed_out.write_bytes(stream[:cut])
            rj = Journal(str(db))
            try:
                rj.bind(IDENTITY)
                fd = os.open(resumed_out, os.O_WRONLY)
                keep, recovered, tail = resume_output(rj, str(resumed_out), fd)
                # Every complete line written after the commit is recovered, the rest cut off.
                whole = stream[:cut][: stream[:cut].rfind(b"\n") + 1]
                assert keep == len(whole)
                if recovered:
                    rj.recover(recovered, keep, line_digest(tail))
                Sink(fd, str(resumed_out), keep=keep).close()
                indices = [json.loads(x)["index"] for x in resumed_out.read_bytes().splitlines()]
                assert len(indices) == len(set(indices)), "a duplicate line survived the resume"
                assert set(indices) == rj.done_indices() >= committed, "a done item lost its line"
                assert len(recovered) == len(indices) - len(committed)
            finally:
                rj.close()


def test_an_output_shorter_than_the_journal_is_refused(tmp_path: Path) -> None:
    j = new_journal(tmp_path / "run.db")
    out = tmp_path / "out.jsonl"
    sink = sink_at(out)
    for i in range(3):
        sink.write(line(i))
        j.add_done((i, 1, 1.0, 0.1, 1))
    j.commit(sink.sync(), line_digest(sink.last_line))
    sink.close()

    def resume() -> int:
        fd = os.open(out, os.O_RDONLY)
        try:
            return resume_output(j, str(out), fd)[0]
        finally:
            os.close(fd)

    out.write_bytes(line(0))
    with pytest.raises(JournalError, match=r"holds \d+ bytes, but journal .* records 3 results"):
        resume()
    out.write_bytes(line(0) + line(1) + line(2)[:-1] + b"X")  # same length, not ending a line
    with pytest.raises(JournalError, match="restore the output file"):
        resume()
    out.write_bytes(line(0) + line(1) + line(2).replace(b"4", b"5"))  # same length, another last line
    with pytest.raises(JournalError, match="is not the one journal .* wrote: the line that ends at byte"):
        resume()
    out.write_bytes(line(0) + line(1) + line(2) + line(3) + line(4)[:-3])
    assert resume() == len(line(0) + line(1) + line(2) + line(3))  # item 3 recovered, the half line cut
    j.close()


def test_sink_cuts_what_follows_the_kept_bytes(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"keep me\nhalf a li")
    s = sink_at(out, keep=8)
    assert s.offset == 8
    s.write(b"next\n")
    assert s.sync() == 13
    s.close()
    assert out.read_bytes() == b"keep me\nnext\n"


# --- the journal ---------------------------------------------------------------------------


def test_a_journal_is_locked_by_its_run(tmp_path: Path) -> None:
    j = new_journal(tmp_path / "run.db")
    with pytest.raises(JournalError, match="in use by another resilpool run"):
        Journal(str(tmp_path / "run.db"))
    j.close()
    Journal(str(tmp_path / "run.db")).close()  # released with the run


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("function", "mod:g", r"function differs \(mod:f != mod:g\)"),
        ("input_size", "101", "input size differs"),
        ("input_digest", "sha256:" + "cd" * 32, r"input content \(SHA-256\) differs"),
        ("input_format", "txt", "input format differs"),
        ("output_path", "/tmp/other.jsonl", "writes its results to /tmp/out.jsonl, not /tmp/other.jsonl"),
    ],
)
def test_a_journal_refuses_another_job(tmp_path: Path, key: str, value: str, message: str) -> None:
    new_journal(tmp_path / "run.db").close()
    j = Journal(str(tmp_path / "run.db"))
    try:
        with pytest.raises(JournalError, match=message):
            j.bind({**IDENTITY, key: value})
        j.bind({**IDENTITY, "input_path": "/elsewhere/in.jsonl"})  # the same file, moved: accepted
    finally:
        j.close()


def test_item_states_attempts_and_runs(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    j = new_journal(path)
    j.add_running(1, 2, 4242, 10.0)
    j.add_running(2, 3, 4243, 10.0)
    j.add_resolved((2, "failed", 2, j.run_id, 3, 4243, None, 0.5, 11.0, None, "ValueError", "boom"))
    j.add_done((3, 4244, 10.0, 0.25, 2**20))
    j.add_event("worker_exited", pid=4242, reason="max_tasks", idx=1, detail="retired")
    j.commit(0)
    assert j.counts() == {"running": 1, "failed": 1, "done": 1}
    j.close()  # killed: the run never ended

    j = Journal(str(path))
    j.bind(IDENTITY)
    second = j.begin_run(["resilpool", "run"], 2)
    assert j.counts() == {"pending": 1, "failed": 1, "done": 1}  # an interrupted item is pending again
    j.add_done((2, 5000, 20.0, 0.5, 2**21))
    j.add_done((1, 5000, 20.0, 0.5, 2**21))
    j.commit(0)
    j.end_run("completed", 2, 0, {})
    rows = dict(j._conn.execute("SELECT idx, attempts FROM items").fetchall())
    assert rows == {1: 1, 2: 3, 3: 1}  # attempts add up across runs
    runs = j._conn.execute("SELECT id, status FROM runs ORDER BY id").fetchall()
    assert runs == [(1, "killed"), (second, "completed")]
    j.close()


def test_a_failed_commit_leaves_the_journal_as_it_was(tmp_path: Path) -> None:
    j = new_journal(tmp_path / "run.db")
    j.add_done((1, 1, 1.0, 0.1, 1))
    j.commit(10)
    j.add_done((2, 1, 1.0, 0.1, 1))
    j.add_resolved((3,))  # malformed row: the transaction fails as a whole
    with pytest.raises(sqlite3.Error):
        j.commit(20)
    assert j.done_indices() == {1}
    assert j.output_offset() == 10
    j.close()


def test_open_readonly_refuses_what_is_not_a_journal(tmp_path: Path) -> None:
    with pytest.raises(JournalError, match="no journal at"):
        open_readonly(str(tmp_path / "none.db"))
    (tmp_path / "text.db").write_text("not sqlite at all, just text" * 10)
    with pytest.raises(JournalError, match="is not a resilpool journal"):
        open_readonly(str(tmp_path / "text.db"))
    sqlite3.connect(tmp_path / "other.db").execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(JournalError, match="is not a resilpool journal"):
        open_readonly(str(tmp_path / "other.db"))


def test_an_unrelated_sqlite_database_is_refused_and_left_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE customers (id INTEGER)")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with pytest.raises(JournalError, match=r"app.db is a SQLite database but not a resilpool journal \(its tables: customers\)"):
        Journal(str(path))
    assert path.read_bytes() == before  # not extended with our tables
    (tmp_path / "text.db").write_text("not sqlite at all, just text" * 10)
    with pytest.raises(JournalError, match="cannot use journal"):
        Journal(str(tmp_path / "text.db"))


def test_a_journal_made_by_a_refused_run_is_still_a_journal(tmp_path: Path) -> None:
    Journal(str(tmp_path / "run.db")).close()  # tables made, never bound
    new_journal(tmp_path / "run.db").close()


def test_journal_queries_raise_no_warning(tmp_path: Path) -> None:
    # filterwarnings=error: on 3.12 numbered placeholders (?1) were a DeprecationWarning, on
    # 3.13 open_readonly's error path left a connection open (ResourceWarning at collection).
    import gc

    j = new_journal(tmp_path / "run.db")
    j.add_done((1, 1, 1.0, 0.1, 1))
    j.commit(10)
    assert j.done_indices() == {1}
    j.close()
    sqlite3.connect(tmp_path / "other.db").execute("CREATE TABLE t (x)").connection.close()
    for _ in range(3):
        with pytest.raises(JournalError):
            open_readonly(str(tmp_path / "other.db"))
    gc.collect()


# --- the report ------------------------------------------------------------------------------


def test_report_totals_recycles_retries_slowest_memory_and_timeline(tmp_path: Path) -> None:
    j = new_journal(tmp_path / "run.db")
    for i in range(40):
        j.add_done((i, 100 + i % 2, 1000.0 + i * 0.5, 0.01 * (i % 10), (i + 1) * 2**20))
    j.add_resolved((40, "failed", 3, j.run_id, 41, 101, None, 0.2, 1030.0, None, "MemoryLimitError", "too big"))
    j.add_resolved((41, "done", 2, j.run_id, 42, 100, 1001.0, 3.5, 1004.5, 2**20, None, None))
    for reason in ("max_tasks", "max_tasks", "crash", "shutdown"):
        j.add_event("worker_exited", pid=1, reason=reason, detail="x")
    for _ in range(3):
        j.add_event("retried", idx=40, detail="attempt")
    j.commit(0)
    j.end_run("failed", 41, 1, {"peak_worker_rss": 300 * 2**20})
    r = build_report(j._conn, "run.db")
    j.close()

    assert r["totals"] == {"items": 50, "done": 41, "failed": 1, "pending": 8, "running": 0, "interrupted": 0}
    assert r["live"] is None
    assert r["complete"] is False
    assert r["recycles"] == {"crash": 1, "max_tasks": 2}  # shutdown is not a recycle
    assert r["worker_crashes"] == 1
    assert r["retries"] == {"attempts_retried": 3, "items_retried": 2}
    assert r["failures_by_type"] == {"MemoryLimitError": 1}
    assert r["failed_items"] == [{"index": 40, "line": 41, "attempts": 3, "pid": 101, "error_type": "MemoryLimitError", "error": "too big"}]
    assert r["slowest"][0]["index"] == 41 and r["slowest"][0]["elapsed_s"] == 3.5
    assert len(r["slowest"]) == 10
    assert r["peak_rss"] == {"bytes": 300 * 2**20, "item_bytes": 40 * 2**20, "item_index": 39, "item_pid": 101, "pool_bytes": 300 * 2**20}
    tl = r["timeline"]
    assert tl["bucket_s"] == 1
    assert sum(b["done"] for b in tl["buckets"]) == 41 and sum(b["failed"] for b in tl["buckets"]) == 1
    assert [b["t"] for b in tl["buckets"]] == list(range(len(tl["buckets"])))
    assert r["runs"][0]["status"] == "failed"
    assert (r["runs"][0]["done"], r["runs"][0]["failed"]) == (41, 1)
    json.dumps(r)  # plain JSON values only

    text = render_report(r)
    assert "items     41 done, 1 failed, 8 pending" in text
    assert "recycles  crash 1, max_tasks 2" in text
    assert "item 40 (line 41): MemoryLimitError: too big" in text
    assert "peak worker RSS 300 MiB (the most resident memory one worker held)" in text


def test_a_killed_run_shows_what_it_completed_and_current_quarantine(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    j = new_journal(path)
    for i in range(7):
        j.add_done((i, 100, 1000.0, 0.1, 2**20))
    j.add_running(7, None, 100, 1000.0)
    j.add_resolved((8, "failed", 3, j.run_id, None, 100, None, 0.1, 1001.0, None, "PoisonTaskError", "poison"))
    j.add_resolved((9, "failed", 3, j.run_id, None, 100, None, 0.1, 1001.0, None, "PoisonTaskError", "poison"))
    j.add_event("quarantined", idx=8)
    j.add_event("quarantined", idx=9)
    j.commit(0)
    j.close()  # killed: its run row still says 'running' with done 0

    conn = open_readonly(str(path))
    try:
        r = build_report(conn, str(path))
    finally:
        conn.close()
    (run,) = r["runs"]
    assert (run["status"], run["done"], run["failed"]) == ("killed", 7, 2)
    assert r["totals"]["interrupted"] == 1 and r["live"] is None
    assert r["quarantined"] == 2

    j = Journal(str(path))  # a second run retries item 9, which now succeeds
    j.bind(IDENTITY)
    j.begin_run(["resilpool", "run"], 2)
    j.add_resolved((9, "done", 1, j.run_id, None, 100, 1002.0, 0.1, 1002.1, 2**20, None, None))
    j.commit(0)
    conn = open_readonly(str(path))
    try:
        r = build_report(conn, str(path))  # the journal is locked by this (live) run
    finally:
        conn.close()
    assert r["quarantined"] == 1  # current, not the 2 quarantine events
    assert r["live"] == {"run": j.run_id, "pid": os.getpid()}
    assert [x["status"] for x in r["runs"]] == ["killed", "running"]
    assert r["runs"][1]["done"] == 1
    assert f"run #{j.run_id} is running now (pid {os.getpid()})" in render_report(r)
    j.close()


def test_timeline_has_at_most_60_buckets(tmp_path: Path) -> None:
    j = new_journal(tmp_path / "run.db")
    for i in range(50):
        j.add_done((i, 1, i * 100.0, 0.0, 1))  # 4900 s of work
    j.commit(0)
    tl = build_report(j._conn)["timeline"]
    j.close()
    assert len(tl["buckets"]) <= 60
    assert sum(b["done"] for b in tl["buckets"]) == 50


# --- the input readers ---------------------------------------------------------------------


def test_formats_from_extensions_and_json_arrays(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(' \n[1, 2]')
    (tmp_path / "b.json").write_text('1\n2\n')
    assert detect_format(str(tmp_path / "a.json")) == "json"
    assert detect_format(str(tmp_path / "b.json")) == "jsonl"
    assert detect_format("x.JSONL") == "jsonl" and detect_format("x.csv") == "csv" and detect_format("x.txt") == "txt"
    with pytest.raises(InputError, match="pass --format"):
        detect_format("x.parquet")
    with pytest.raises(InputError, match="unknown --format"):
        detect_format("x.txt", "xml")
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(InputError, match="not a valid JSON array"):
        open_input(str(tmp_path / "bad.json"))


def test_json_lines_items_skip_and_malformed(tmp_path: Path) -> None:
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n  \n[2]\r\n{bad\n"\xff"\n3')
    inp = open_input(str(p))
    assert (inp.format, inp.count, inp.size) == ("jsonl", 5, p.stat().st_size)
    assert inp.digest.startswith("sha256:") and len(inp.digest) == 71
    items = list(inp.items())
    assert [(i.index, i.line) for i in items] == [(0, 1), (1, 4), (2, 5), (3, 6), (4, 7)]
    assert items[0].value == {"a": 1} and items[0].input_json == '{"a": 1}'
    assert items[1].value == [2] and items[4].value == 3
    assert isinstance(items[2].value, Malformed) and "line 5 is not valid JSON" in items[2].value.message
    assert json.loads(items[2].input_json) == "{bad"
    assert isinstance(items[3].value, Malformed) and items[3].value.error_type == "UnicodeDecodeError"
    assert [i.index for i in inp.items(skip={0, 2, 3})] == [1, 4]


def test_csv_rows_are_dicts_and_bad_rows_are_malformed(tmp_path: Path) -> None:
    p = tmp_path / "in.csv"
    p.write_text('name,note\nann,"two\nlines"\n\nbob,x,extra\ncy,z\n')
    inp = open_input(str(p))
    assert inp.count == 3
    items = list(inp.items())
    assert items[0].value == {"name": "ann", "note": "two\nlines"} and items[0].line == 2
    assert isinstance(items[1].value, Malformed) and "3 fields, the header 2" in items[1].value.message
    assert items[1].line == 5
    assert items[2].value == {"name": "cy", "note": "z"}
    assert json.loads(items[2].input_json) == {"name": "cy", "note": "z"}


def test_text_lines(tmp_path: Path) -> None:
    p = tmp_path / "in.txt"
    p.write_text("alpha\n\nbeta gamma\r\n  \nlast")
    inp = open_input(str(p))
    assert [i.value for i in inp.items()] == ["alpha", "beta gamma", "last"]
    assert inp.count == 3


def test_unreadable_inputs(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read input .*missing.jsonl: No such file"):
        open_input(str(tmp_path / "missing.jsonl"))
    with pytest.raises(InputError, match="it is a directory"):
        open_input(str(tmp_path))


# --- the call sent to workers ------------------------------------------------------------------


def test_item_call_pickles_by_reference_and_rebuilds_itself(tmp_path: Path) -> None:
    import workload

    call = _task.item_call("workload:cli_upper", workload.cli_upper)
    assert call.__qualname__ == "workload:cli_upper" and call.__module__ == "resilpool.cli._task"
    data = pickle.dumps(call)
    assert len(data) < 80  # a reference, not the function
    del _task.__dict__["workload:cli_upper"]  # as in a fresh worker
    rebuilt = pickle.loads(data)
    assert rebuilt is _task.item_call("workload:cli_upper")
    pid, peak, started, lines, [elapsed], failed = rebuilt([(0, "abc", '"abc"')], None, False)
    assert json.loads(lines) == {"index": 0, "input": "abc", "result": "ABC"} and lines.endswith(b"\n")
    assert pid > 0 and elapsed >= 0 and peak > 0 and started > 0 and failed == {}
    dotted = _task.item_call("os.path:basename")
    assert dotted.__qualname__ == "os/path:basename"  # pickle splits names on dots
    assert pickle.loads(pickle.dumps(dotted)) is dotted


def test_item_call_records_where_a_failure_ran() -> None:
    import workload

    call = _task.item_call("workload:cli_square", workload.cli_square)
    with pytest.raises(ValueError) as info:
        call([(1, {"i": 1, "fail": True}, "{}")], None, False)
    again = pickle.loads(pickle.dumps(info.value))
    assert again._resilpool_pid > 0 and again._resilpool_elapsed >= 0


def test_results_take_a_json_form() -> None:
    @dataclasses.dataclass
    class Point:
        x: int
        y: int

    class ArrayLike:
        def tolist(self) -> list[int]:
            return [1, 2]

    value = {"p": Point(1, 2), "a": ArrayLike(), "s": {3, 1}, "d": datetime.date(2024, 5, 6), "path": Path("/x"), "t": (1, "é")}
    assert json.loads(_task.dumps_result(value)) == {"p": {"x": 1, "y": 2}, "a": [1, 2], "s": [1, 3], "d": "2024-05-06", "path": "/x", "t": [1, "é"]}
    with pytest.raises(TypeError, match="not JSON serializable: object"):
        _task.dumps_result(object())
    with pytest.raises(TypeError):
        _task.dumps_result({"k": Any})
