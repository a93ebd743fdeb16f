"""``resilpool run`` with streams and encodings (issue 12, items 2 and 6).

Pipes, FIFOs, ``/dev/stdin`` and process substitution are read to their end (spooled)
before the run; with ``--journal`` the spool is kept beside the journal so that a
rerun resumes.  ``-o -`` writes the results to standard output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from test_cli import RUN_TIMEOUT, _env, assert_one_line_error, kill_9_after, logged_pids, read_jsonl, resilpool, squares, wait_gone, write_items


def piped(*args: str, stdin: bytes, cwd: Path, shell: str | None = None) -> subprocess.CompletedProcess[bytes]:
    """``resilpool ARGS`` with ``stdin`` on its standard input (or a shell line ``shell``)."""
    cmd = ["bash", "-c", shell] if shell else [sys.executable, "-m", "resilpool.cli", *args]
    env = {**_env(), "PY": sys.executable}
    return subprocess.run(cmd, cwd=cwd, env=env, input=stdin, capture_output=True, timeout=RUN_TIMEOUT)


def lines(n: int) -> bytes:
    return "".join(json.dumps(item) + "\n" for item in squares(n)).encode()


def test_standard_input_dash(tmp_path: Path) -> None:
    proc = piped("run", "workload:cli_square", "-i", "-", "--format", "jsonl", "-o", "out.jsonl", stdin=lines(7), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(r["index"] for r in read_jsonl(tmp_path / "out.jsonl")) == list(range(7))
    assert b"all 7 items done" in proc.stderr
    assert [p.name for p in tmp_path.iterdir() if "input" in p.name] == []  # the spool is gone


def test_dev_stdin_and_process_substitution(tmp_path: Path) -> None:
    proc = piped("run", "workload:cli_upper", "-i", "/dev/stdin", "--format", "txt", "-o", "p.jsonl", stdin=b"a\nb\nc\n", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(r["result"] for r in read_jsonl(tmp_path / "p.jsonl")) == ["A", "B", "C"]
    shell = '"$PY" -m resilpool.cli run workload:cli_upper -i <(printf "x\\ny\\n") --format txt -o q.jsonl'
    proc = piped(shell=shell, stdin=b"", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(r["result"] for r in read_jsonl(tmp_path / "q.jsonl")) == ["X", "Y"]


def test_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "items.fifo"
    os.mkfifo(fifo)

    def feed() -> None:
        with open(fifo, "wb") as f:
            f.write(lines(5))

    writer = threading.Thread(target=feed)
    writer.start()
    try:
        proc = resilpool("run", "workload:cli_square", "-i", "items.fifo", "--format", "jsonl", "-o", "out.jsonl", cwd=tmp_path)
    finally:
        writer.join(timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 5


def test_output_to_standard_output(tmp_path: Path) -> None:
    write_items(tmp_path / "items.jsonl", squares(4, fail=False) + [{"i": 4, "fail": True}])
    proc = resilpool("run", "workload:cli_square", "-i", "items.jsonl", "-o", "-", cwd=tmp_path)
    assert proc.returncode == 1
    rows = [json.loads(x) for x in proc.stdout.splitlines()]
    assert sorted(r["index"] for r in rows) == [0, 1, 2, 3]  # results only: progress and logs on stderr
    assert '"index": 4' in proc.stderr and "ValueError" in proc.stderr  # the failure's line, on stderr
    assert "results to standard output" in proc.stderr
    proc = resilpool("run", "workload:cli_square", "-i", "items.jsonl", "-o", "/dev/stdout", "--errors", "err.jsonl", cwd=tmp_path)
    assert proc.returncode == 1
    assert len(proc.stdout.splitlines()) == 4
    assert len(read_jsonl(tmp_path / "err.jsonl")) == 1


def test_a_journal_with_output_to_standard_output_is_refused(tmp_path: Path) -> None:
    write_items(tmp_path / "items.jsonl", squares(2))
    proc = resilpool("run", "workload:cli_square", "-i", "items.jsonl", "-o", "-", "-j", "run.db", cwd=tmp_path)
    assert_one_line_error(proc, "--output - is a stream", "write the results to a file (-o FILE), or run without --journal")
    assert proc.stdout == ""


def test_an_empty_input_warns(tmp_path: Path) -> None:
    (tmp_path / "items.jsonl").write_text("")
    proc = resilpool("run", "workload:cli_square", "-i", "items.jsonl", "-o", "out.jsonl", cwd=tmp_path)
    assert proc.returncode == 0
    assert "warning: input items.jsonl has no items" in proc.stderr
    proc = piped("run", "workload:cli_square", "-i", "-", "--format", "jsonl", "-o", "o2.jsonl", stdin=b"", cwd=tmp_path)
    assert b"warning: input - has no items" in proc.stderr


def test_a_killed_run_on_a_stream_resumes_from_its_spool(tmp_path: Path) -> None:
    n, gated_from = 40, 20
    log, release = tmp_path / "runs.log", tmp_path / "release"
    items = [{"i": i, "log": str(log), **({"gate": str(release)} if i >= gated_from else {})} for i in range(n)]
    data = "".join(json.dumps(x) + "\n" for x in items).encode()
    args = [sys.executable, "-m", "resilpool.cli", "run", "workload:cli_square", "-i", "-", "--format", "jsonl", "-o", "out.jsonl", "-j", "run.db", "-w", "2"]
    (tmp_path / "feed").write_bytes(data)
    with open(tmp_path / "feed", "rb") as feed:
        proc = subprocess.Popen(args, cwd=tmp_path, env=_env(), stdin=feed, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_9_after(proc, tmp_path / "run.db", 10)
    wait_gone(logged_pids(log))
    assert (tmp_path / "run.db.input").read_bytes() == data
    release.touch()
    again = piped(*args[3:], stdin=data, cwd=tmp_path)  # the same stream again: resumes
    assert again.returncode == 0, again.stderr
    assert b"done earlier" in again.stderr
    indices = [r["index"] for r in read_jsonl(tmp_path / "out.jsonl")]
    assert sorted(indices) == list(range(n))
    other = piped(*args[3:], stdin=data + b'{"i": 99}\n', cwd=tmp_path)  # another stream: refused
    assert other.returncode == 2
    assert b"input size differs" in other.stderr
    assert (tmp_path / "run.db.input").read_bytes() == data  # the journal's spool is kept
    by_spool = resilpool("run", "workload:cli_square", "-i", "run.db.input", "--format", "jsonl", "-o", "out.jsonl", "-j", "run.db", cwd=tmp_path)
    assert by_spool.returncode == 0 and "all 40 items done" in by_spool.stderr


def test_encodings_get_a_hint_and_work_with_encoding(tmp_path: Path) -> None:
    (tmp_path / "latin.txt").write_bytes("café\nnaïve\n".encode("latin-1"))
    proc = resilpool("run", "workload:cli_upper", "-i", "latin.txt", "-o", "out.jsonl", cwd=tmp_path)
    assert_one_line_error(proc, "cannot read input latin.txt as utf-8: line 1 does not decode", "pass --encoding latin-1")
    proc = resilpool("run", "workload:cli_upper", "-i", "latin.txt", "-o", "out.jsonl", "--encoding", "latin-1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(r["result"] for r in read_jsonl(tmp_path / "out.jsonl")) == ["CAFÉ", "NAÏVE"]
    (tmp_path / "u16.jsonl").write_bytes('{"i": 1}\n{"i": 2}\n'.encode("utf-16"))
    proc = resilpool("run", "workload:cli_square", "-i", "u16.jsonl", "-o", "o16.jsonl", cwd=tmp_path)
    assert_one_line_error(proc, "pass --encoding utf-16")
    proc = resilpool("run", "workload:cli_square", "-i", "u16.jsonl", "-o", "o16.jsonl", "--encoding", "utf-16", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(r["result"]["square"] for r in read_jsonl(tmp_path / "o16.jsonl")) == [1, 4]
    proc = resilpool("run", "workload:cli_square", "-i", "u16.jsonl", "-o", "o17.jsonl", "--encoding", "klingon", cwd=tmp_path)
    assert_one_line_error(proc, "unknown --encoding 'klingon'")


def test_malformed_json_names_one_line_number(tmp_path: Path) -> None:
    (tmp_path / "items.jsonl").write_text('{"i": 0}\n{"i": 1}}\n')
    proc = resilpool("run", "workload:cli_square", "-i", "items.jsonl", "-o", "out.jsonl", cwd=tmp_path)
    assert proc.returncode == 1
    (err,) = read_jsonl(tmp_path / "out.errors.jsonl")
    message = err["error"]["message"]
    assert message.startswith("JSONDecodeError: line 2 is not valid JSON: Extra data (column 9)"), message
    assert "line 1" not in message and message.count("line") == 1
