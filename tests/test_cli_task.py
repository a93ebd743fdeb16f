"""The call a worker runs for a chunk of items (``resilpool.cli._task``), in this process.

With ``capture`` an exception fails its item only; each finished item's line is in
the transit file before the next item starts, and the runner reads the file back
(``_read_transit``): lines, then NULs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from resilpool.cli import _run, _task


def test_a_chunk_captures_failures_and_writes_every_finished_item_to_its_transit_file(tmp_path: Path) -> None:
    import workload

    call = _task.item_call("workload:cli_square", workload.cli_square)
    chunk = [(i, {"i": i, "fail": i == 11}, json.dumps({"i": i})) for i in (10, 11, 12)]
    pid, peak, started, lines, times, failed = call(chunk, str(tmp_path / "g0"), True)
    assert pid == os.getpid() and peak > 0 and started > 0 and len(times) == 3
    assert [json.loads(x) for x in lines.splitlines()] == [
        {"index": 10, "input": {"i": 10}, "result": {"i": 10, "square": 100}},
        {"index": 12, "input": {"i": 12}, "result": {"i": 12, "square": 144}},
    ]
    assert list(failed) == [1] and failed[1]["type"] == "ValueError" and "item 11 fails" in failed[1]["traceback"]
    [name] = os.listdir(tmp_path)
    assert name.startswith(f"g0-{os.getpid()}-")
    read = list(_run._read_transit(str(tmp_path), pid=os.getpid()))
    assert [idx for idx, _, _ in read] == [10, 11, 12]
    assert "result" in read[0][2] and read[1][2]["error"]["type"] == "ValueError"
    assert read[0][1] + read[2][1] == lines  # the same bytes as the output gets
    assert _run.transit_lines(str(tmp_path), {12}, 100) == [(10, read[0][1])]  # results only, not done ones
    _task._transit.close()


def test_a_half_written_transit_line_is_not_read(tmp_path: Path) -> None:
    whole = b'{"index": 3, "input": 3, "result": 4}\n'
    (tmp_path / "g0-42-ab").write_bytes(whole + b'{"index": 4, "input": 4, "res' + b"\0" * 100)
    assert [(i, raw) for i, raw, _ in _run._read_transit(str(tmp_path))] == [(3, whole)]
    assert list(_run._read_transit(str(tmp_path), pid=41)) == []


def test_without_capture_an_exception_propagates_for_the_pool_to_retry() -> None:
    import workload

    call = _task.item_call("workload:cli_square", workload.cli_square)
    with pytest.raises(ValueError, match="item 1 fails"):
        call([(1, {"i": 1, "fail": True}, "{}")], None, False)


def test_a_full_transit_file_grows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_task, "_TRANSIT_BYTES", 64)
    transit = _task._Transit()
    transit.open(str(tmp_path / "g7"))
    lines = [f'{{"index": {i}, "input": {i}, "result": {i + 1}}}\n'.encode() for i in range(50)]
    try:
        for line in lines:
            transit.append(line)
    finally:
        transit.close()
    assert [raw for _, raw, _ in _run._read_transit(str(tmp_path))] == lines
