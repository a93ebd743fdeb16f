"""``resilpool run``: the output belongs to its journal (issue 12, item 1).

A run never cuts or appends to an output (or errors file) that its journal does
not account for; two runs never write one output; a resume refuses an output
that is not the one its journal wrote.  Each refusal leaves the files byte for
byte as they were.
"""

from __future__ import annotations

import re
import sqlite3
import urllib.request
from pathlib import Path

import pytest
from conftest import RESULT_TIMEOUT, wait_until

from test_cli import StderrReader, assert_one_line_error, read_jsonl, resilpool, squares, start, write_items

RUN = ("run", "workload:cli_square", "-i", "items.jsonl", "-w", "2")


def _files(tmp_path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(tmp_path.iterdir()) if p.is_file()}


def test_a_typo_in_the_journal_name_does_not_clobber_the_output(tmp_path: Path) -> None:
    write_items(tmp_path / "items.jsonl", squares(30))
    assert resilpool(*RUN, "-o", "r.jsonl", "-j", "r.db", cwd=tmp_path).returncode == 0
    write_items(tmp_path / "small.jsonl", squares(5))
    before = (tmp_path / "r.jsonl").read_bytes()
    proc = resilpool("run", "workload:cli_square", "-i", "small.jsonl", "-o", "r.jsonl", "-j", "rtypo.db", cwd=tmp_path)
    assert_one_line_error(
        proc,
        "--output r.jsonl already holds",
        "journal rtypo.db is new (it did not write it)",
        "pass the --journal that wrote it to resume, --overwrite to replace it, or another --output",
    )
    assert (tmp_path / "r.jsonl").read_bytes() == before
    assert not (tmp_path / "r.errors.jsonl").exists() or (tmp_path / "r.errors.jsonl").read_bytes() == b""


def test_without_a_journal_an_existing_output_is_refused_then_overwritten_on_request(tmp_path: Path) -> None:
    write_items(tmp_path / "items.jsonl", squares(8))
    assert resilpool(*RUN, "-o", "r.jsonl", cwd=tmp_path).returncode == 0
    before = _files(tmp_path)
    proc = resilpool(*RUN, "-o", "r.jsonl", cwd=tmp_path)
    assert_one_line_error(proc, "--output r.jsonl already holds", "and no --journal accounts for it", "--overwrite")
    assert _files(tmp_path) == before
    proc = resilpool(*RUN, "-o", "r.jsonl", "--overwrite", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(r["index"] for r in read_jsonl(tmp_path / "r.jsonl")) == list(range(8))


def test_a_non_empty_errors_file_is_not_clobbered_either(tmp_path: Path) -> None:
    write_items(tmp_path / "items.jsonl", squares(3))
    (tmp_path / "r.errors.jsonl").write_text("an earlier run's failures\n")
    proc = resilpool(*RUN, "-o", "r.jsonl", cwd=tmp_path)
    assert_one_line_error(proc, "--errors r.errors.jsonl already holds 26 B", "--overwrite")
    assert (tmp_path / "r.errors.jsonl").read_text() == "an earlier run's failures\n"
    assert not (tmp_path / "r.jsonl").exists()  # a refused run leaves no trace


def test_overwrite_with_a_journal_that_wrote_the_output_is_refused(tmp_path: Path) -> None:
    write_items(tmp_path / "items.jsonl", squares(4))
    assert resilpool(*RUN, "-o", "r.jsonl", "-j", "r.db", cwd=tmp_path).returncode == 0
    before = _files(tmp_path)
    proc = resilpool(*RUN, "-o", "r.jsonl", "-j", "r.db", "--overwrite", cwd=tmp_path)
    assert_one_line_error(proc, "--overwrite starts over, but journal r.db records results in r.jsonl", "use a new journal")
    assert _files(tmp_path) == before


def test_a_second_run_on_the_same_output_is_refused_naming_the_first(tmp_path: Path) -> None:
    release = tmp_path / "release"
    write_items(tmp_path / "items.jsonl", squares(4, gate=str(release)))
    write_items(tmp_path / "other.jsonl", squares(3))
    first = start(*RUN, "-o", "r.jsonl", "-j", "a.db", "--plain", cwd=tmp_path)
    err = StderrReader(first)
    try:
        err.wait_for("(run 1)")
        second = resilpool("run", "workload:cli_square", "-i", "other.jsonl", "-o", "r.jsonl", "-j", "b.db", cwd=tmp_path)
        assert_one_line_error(second, f"--output r.jsonl is being written by another resilpool run (pid {first.pid})")
        third = resilpool(*RUN, "-o", "s.jsonl", "-j", "a.db", cwd=tmp_path)
        assert_one_line_error(third, f"journal a.db is in use by another resilpool run (pid {first.pid})", f"kill {first.pid}")
        release.touch()
        code, text = err.finish()
        assert code == 0, text
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate(timeout=30)
    rows = read_jsonl(tmp_path / "r.jsonl")
    assert sorted(r["index"] for r in rows) == [0, 1, 2, 3]
    assert all(r["input"].get("gate") for r in rows)  # the second run wrote nothing there


def test_a_resume_refuses_an_output_that_is_not_the_one_it_wrote(tmp_path: Path) -> None:
    write_items(tmp_path / "items.jsonl", squares(6, fail=False))
    assert resilpool(*RUN, "-o", "r.jsonl", "-j", "r.db", cwd=tmp_path).returncode == 0
    text = (tmp_path / "r.jsonl").read_text()
    head, last = text[: text.rindex("{")], text[text.rindex("{") :]
    (tmp_path / "r.jsonl").write_text(head + last.replace('"i": ', '"j": '))  # same length, another last line
    before = _files(tmp_path)
    proc = resilpool(*RUN, "-o", "r.jsonl", "-j", "r.db", cwd=tmp_path)
    assert_one_line_error(proc, "output r.jsonl is not the one journal r.db wrote", "restore the output file")
    assert _files(tmp_path) == before
    (tmp_path / "r.jsonl").unlink()
    (tmp_path / "r.jsonl").write_text(text)  # restored (a new inode, the same content): accepted
    proc = resilpool(*RUN, "-o", "r.jsonl", "-j", "r.db", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "all 6 items done" in proc.stderr
    assert (tmp_path / "r.jsonl").read_text() == text


def test_an_unrelated_sqlite_database_is_refused_as_a_journal(tmp_path: Path) -> None:
    write_items(tmp_path / "items.jsonl", squares(2))
    conn = sqlite3.connect(tmp_path / "app.db")
    conn.execute("CREATE TABLE customers (id INTEGER)")
    conn.commit()
    conn.close()
    before = (tmp_path / "app.db").read_bytes()
    proc = resilpool(*RUN, "-o", "r.jsonl", "-j", "app.db", cwd=tmp_path)
    assert_one_line_error(proc, "app.db is a SQLite database but not a resilpool journal (its tables: customers)")
    assert (tmp_path / "app.db").read_bytes() == before
    assert not (tmp_path / "r.jsonl").exists()


def test_a_journaled_run_under_warnings_as_errors_completes(tmp_path: Path) -> None:
    # On 3.12, numbered SQLite placeholders were a DeprecationWarning: under -W error every
    # commit failed and the run abandoned its items.
    import os
    import subprocess
    import sys

    from test_cli import _env

    write_items(tmp_path / "items.jsonl", squares(20))
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-m", "resilpool.cli", *RUN, "-o", "r.jsonl", "-j", "r.db"],
        cwd=tmp_path,
        env={**_env(), "PYTHONWARNINGS": "error"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(read_jsonl(tmp_path / "r.jsonl")) == 20
    assert os.path.getsize(tmp_path / "r.jsonl") > 0


def test_metrics_port_serves_the_runs_pool_on_loopback_while_it_runs(tmp_path: Path) -> None:
    # resilpool run --metrics-port 0: the URL is logged; a scrape during the run parses with
    # prometheus-client's own parser and counts the run's tasks; the port closes with the run.
    from prometheus_client.parser import text_string_to_metric_families

    release = tmp_path / "release"
    (tmp_path / "items.txt").write_text(f"{release}\n" * 3)  # text lines: each item is the path
    proc = start(
        "run", "workload:wait_for_file", "-i", "items.txt", "--format", "txt", "-o", "out.jsonl",
        "--workers", "2", "--plain", "--metrics-port", "0", cwd=tmp_path,
    )  # fmt: skip
    err = StderrReader(proc)
    done = False
    try:
        url = re.search(r"metrics at (http://127\.0\.0\.1:\d+/metrics)", err.wait_for("/metrics"))
        assert url is not None, err.text

        def submitted() -> float:
            body = urllib.request.urlopen(url.group(1), timeout=10).read().decode()  # type: ignore[union-attr]
            families = {f.name: f for f in text_string_to_metric_families(body)}
            values = [s.value for s in families["resilpool_tasks_submitted"].samples if s.name.endswith("_total")]
            assert len(values) == 1
            return values[0]

        # The port opens before the run submits its items: scrape until two workers each
        # hold one gated item (the run cannot finish before the release below).
        wait_until(lambda: submitted() >= 2, RESULT_TIMEOUT, "two gated items counted as submitted")
        done = True
    finally:
        release.touch()
        code, text = err.finish()  # reaped and its pipes closed, pass or fail
    assert done
    assert code == 0, text
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 3
    with pytest.raises(OSError):
        urllib.request.urlopen(url.group(1), timeout=5)


def test_metrics_port_out_of_range_is_refused_before_anything_runs(tmp_path: Path) -> None:
    write_items(tmp_path / "items.jsonl", [{"x": 1}])
    proc = resilpool("run", "workload:cli_square", "-i", "items.jsonl", "-o", "out.jsonl", "--metrics-port", "70000", cwd=tmp_path)
    assert proc.returncode != 0
    assert "--metrics-port must be a TCP port from 0 to 65535, got 70000" in proc.stderr
    assert not (tmp_path / "out.jsonl").exists()
