"""resilpool.progress (a rich progress bar over results or futures) and resilpool.logs (JSON log lines)."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import workload
from conftest import RESULT_TIMEOUT

from resilpool import WorkerCrashedError
from resilpool.events import ExitReason, WorkerExited
from resilpool.logs import JsonFormatter, log_events

rich_console = pytest.importorskip("rich.console")
from resilpool.progress import as_completed, progress  # noqa: E402


def _console() -> Any:
    return rich_console.Console(file=io.StringIO(), width=120, force_terminal=False, color_system=None)


def test_progress_over_a_map_yields_every_result_and_shows_the_count_and_the_pool(make_pool: Any) -> None:
    pool = make_pool(2)
    console = _console()
    out = list(progress(pool.map(workload.inc, range(30)), total=30, description="incrementing", pool=pool, console=console))
    assert out == list(range(1, 31))
    text = console.file.getvalue()
    assert "incrementing" in text and "30/30" in text and "workers" in text


def test_as_completed_yields_each_future_once_with_a_bar(make_pool: Any) -> None:
    pool = make_pool(2)
    futures = [pool.submit(workload.inc, i) for i in range(12)]
    console = _console()
    done = list(as_completed(futures, timeout=RESULT_TIMEOUT, description="fits", console=console))
    assert sorted(f.result(timeout=0) for f in done) == list(range(1, 13))
    assert len(set(map(id, done))) == 12
    assert "12/12" in console.file.getvalue()


def test_disabled_progress_is_the_iterable_itself() -> None:
    items = [1, 2, 3]
    assert progress(items, disable=True) is items


def test_progress_without_a_length_counts_without_an_end() -> None:
    console = _console()
    assert list(progress((i for i in range(5)), console=console)) == list(range(5))
    assert "5" in console.file.getvalue()


# --- JSON logs --------------------------------------------------------------------


def _record(msg: str, **extra: Any) -> logging.LogRecord:
    logger = logging.getLogger("resilpool.test")
    return logger.makeRecord(logger.name, logging.WARNING, __file__, 1, msg, (), None, extra=extra)


def test_the_json_formatter_writes_one_object_with_the_fields() -> None:
    line = JsonFormatter(static={"service": "etl"}).format(
        _record("worker died", pid=4242, task_id=7, reason=ExitReason.MEMORY, rss_bytes=3 << 30, where=Path("/x"))
    )
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["message"] == "worker died" and obj["level"] == "WARNING" and obj["logger"] == "resilpool.test"
    assert obj["time"].endswith("Z")
    assert (obj["pid"], obj["task_id"], obj["reason"], obj["rss_bytes"], obj["where"]) == (4242, 7, "memory", 3 << 30, "/x")
    assert obj["service"] == "etl"


def test_the_json_formatter_writes_the_traceback_of_an_exception() -> None:
    logger = logging.getLogger("resilpool.test")
    try:
        raise ValueError("bad")
    except ValueError:
        import sys

        record = logger.makeRecord(logger.name, logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    obj = json.loads(JsonFormatter().format(record))
    assert "ValueError: bad" in obj["exc"]


def test_pool_events_become_json_records_with_their_fields(make_pool: Any) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("resilpool.events.test")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        pool = make_pool(1)
        listener = log_events(pool, logger)
        fut = pool.submit(workload.kill_self)
        with pytest.raises(WorkerCrashedError):
            fut.result(timeout=RESULT_TIMEOUT)
        pool.shutdown(wait=True)  # the event thread has delivered everything
        pool.remove_listener(listener)
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    exited = [r for r in records if r["event"] == "WorkerExited" and r["reason"] == "crash"]
    assert len(exited) == 1
    (crash,) = exited
    assert crash["level"] == "WARNING" and isinstance(crash["pid"], int) and isinstance(crash["task_id"], int)
    assert crash["exitcode"] == -9
    assert set(WorkerExited.__dataclass_fields__) <= set(crash)


# --- docs/observability.md -------------------------------------------------------------


def _runnable_examples() -> list[str]:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "observability.md").read_text()
    blocks = [b.split("\n", 1)[1] for b in doc.split("```")[1::2] if b.startswith("python\n")]
    return [b for b in blocks if 'if __name__ == "__main__":' in b]


@pytest.mark.parametrize("index", range(3))
def test_the_observability_examples_run(index: int, tmp_path: Path) -> None:
    pytest.importorskip("prometheus_client")
    examples = _runnable_examples()
    assert len(examples) == 3
    code = examples[index].replace("serve(pool, 9464)", "serve(pool, 0)")  # any free port
    script = tmp_path / "example.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=RESULT_TIMEOUT, check=False)
    assert proc.returncode == 0, proc.stderr
    if index == 0:
        assert proc.stdout.splitlines()[0] == str(sum(x * x for x in range(100)))
        assert "resilpool_tasks_submitted_total 100.0" in proc.stdout
    elif index == 1:
        assert proc.stdout.strip().splitlines()[-1] == str(sum(x * x for x in range(2_000)))
    else:
        assert proc.stdout.strip() == "WorkerCrashedError"
        lines = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
        crash = [r for r in lines if r.get("event") == "WorkerExited" and r["reason"] == "crash"]
        assert crash and crash[0]["service"] == "nightly-etl" and crash[0]["exitcode"] == -9
