"""The command line's views and night-shift comforts (issue 12, item 6), without processes
where possible: the live view rendered to a fixed 80x24 console, progress lines,
JSON log lines, ``--version`` and "did you mean"."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from test_cli import _env, assert_one_line_error, resilpool, squares, write_items

from resilpool.cli._run import setup_logging
from resilpool.cli._view import LiveView, LogFormatter, RateWindow, Tally, fit, format_eta, human_bytes, humanize


@dataclass
class FakeWorker:
    pid: int
    rss: int | None = 300 * 2**20
    cpu_percent: float | None = 97.0
    task_id: int | None = 12
    running_since: float | None = 0.0
    tasks_done: int = 41
    age_s: float = 120.0


@dataclass
class FakeStats:
    running: int = 16
    retried: int = 3
    worker_crashes: int = 1
    workers: int = 16
    recycled: dict[str, int] = field(default_factory=dict)


class FakePool:
    def __init__(self, n: int) -> None:
        self._workers = [FakeWorker(pid=1000 + i) for i in range(n)]

    def stats(self) -> FakeStats:
        return FakeStats()

    def workers(self) -> list[FakeWorker]:
        return self._workers


def render(view: LiveView, width: int = 80, height: int = 24) -> list[str]:
    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=width, height=height, force_terminal=False, color_system=None).print(view._render())
    return out.getvalue().splitlines()


def test_the_live_view_fits_80x24_and_keeps_its_header() -> None:
    from rich.console import Console

    tally = Tally(lambda t: f"item {t}")
    for k in range(8):
        tally.recent.append(
            f"23:0{k}:00 worker {4000 + k} left: memory (uses 656515072 bytes, over max_rss 419430400; killed by SIGKILL after a very long night of work)"
        )
    console = Console(file=io.StringIO(), width=80, height=24, force_terminal=True)
    view = LiveView(FakePool(16), tally, lambda: (500, 7, 2000), stream=io.StringIO(), label="items", console=console)  # type: ignore[arg-type]
    try:
        view.note("SIGINT: draining: 16 running items finish, nothing new starts; SIGINT again cancels them")
        lines = render(view)
    finally:
        view.close()
    text = "\n".join(lines)
    assert len(lines) <= 24, text
    assert all(len(line) <= 80 for line in lines), text
    assert lines[0].startswith("items"), text  # the bar first: the header never scrolls away
    assert "500/2000" not in text or "507/2000" in text
    assert "+" in text and "more" in text  # workers that do not fit are counted, not dropped silently
    event_lines = [line for line in lines if "left: memory" in line]
    assert event_lines
    for line in event_lines:
        assert line.endswith("…") and not line[:-1].endswith(" ")  # elided at a word boundary
        assert "626 MiB" in line  # sizes for people


def test_close_leaves_one_final_bar() -> None:
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, width=80, height=24, force_terminal=True, color_system=None)
    view = LiveView(FakePool(2), Tally(), lambda: (10, 0, 10), stream=io.StringIO(), label="items", console=console)  # type: ignore[arg-type]
    view.note("SIGINT: draining")
    view.update(force=True)
    view.close()
    view.close()
    final = out.getvalue().rsplit("\x1b[?25h", 1)[-1]  # what stays after the live display is erased
    assert final.count("10/10") == 1, repr(final)


def test_fit_elides_at_word_boundaries() -> None:
    assert fit("short", 80) == "short"
    assert fit("one two three four", 12) == "one two…"
    assert fit("x" * 30, 10) == "x" * 9 + "…"


def test_eta_from_a_recent_window() -> None:
    now = [0.0]
    rate = RateWindow(window_s=10.0, clock=lambda: now[0])
    for t, done in ((0, 0), (5, 100), (10, 110), (15, 120), (20, 130)):  # fast at first, then slow
        now[0] = float(t)
        rate.add(done)
    assert rate.rate() == 2.0  # the last 10 s, not the average since the start (6.5/s)
    assert rate.eta_s(70) == 35.0
    assert format_eta(35.0) == "0:35" and format_eta(None) == "--:--" and format_eta(3725) == "1:02:05"


def test_sizes_for_people() -> None:
    assert human_bytes(812) == "812 B"
    assert human_bytes(156 * 2**20) == "156 MiB"
    assert human_bytes(1.5 * 2**30) == "1.50 GiB"
    assert humanize("uses 656515072 bytes, over max_rss 419430400") == "uses 626 MiB, over max_rss 400 MiB"


def test_json_log_lines() -> None:
    record = logging.LogRecord("resilpool", logging.WARNING, __file__, 1, "worker %d uses %d bytes", (42, 656515072), None)
    line = json.loads(LogFormatter(json_lines=True).format(record))
    assert line["level"] == "WARNING" and line["event"] == "log" and line["message"] == "worker 42 uses 656515072 bytes"
    assert "time" in line
    assert "626 MiB" in LogFormatter().format(record)


def test_distributed_logs_at_warning_unless_verbose() -> None:
    logger = logging.getLogger("distributed")
    old = logger.level
    try:
        setup_logging(io.StringIO(), live=True, json_lines=False, verbose=False)
        assert logger.level == logging.WARNING
        setup_logging(io.StringIO(), live=True, json_lines=False, verbose=True)
        assert logger.level == logging.INFO
    finally:
        logger.setLevel(old)
        logging.getLogger("resilpool").setLevel(logging.NOTSET)


def test_version() -> None:
    proc = subprocess.run([sys.executable, "-m", "resilpool.cli", "--version"], capture_output=True, text=True, timeout=60, env=_env())
    assert proc.returncode == 0
    from resilpool import __version__

    assert proc.stdout.strip() == f"resilpool {__version__}"


def test_log_format_json_lines_parse_and_progress_has_rate_and_eta(tmp_path: Path) -> None:
    write_items(tmp_path / "items.jsonl", squares(20, sleep=0.02))
    proc = resilpool("run", "workload:cli_square", "-i", "items.jsonl", "-o", "out.jsonl", "-w", "2", "--log-format", "json", "--progress-interval", "0.2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stderr.splitlines()]
    assert all({"time", "level", "event", "message"} <= set(r) for r in records)
    events = [r["event"] for r in records]
    assert events[0] == "run.start" and events[-1] == "run.end"
    progress = [r for r in records if r["event"] == "progress"]
    assert progress and progress[-1]["done"] == 20 and progress[-1]["total"] == 20
    assert {"rate_per_s", "eta_s", "failed"} <= set(progress[-1])
    assert records[-1]["exit_status"] == 0 and records[-1]["status"] == "completed"


def test_plain_progress_lines_show_rate_and_eta(tmp_path: Path) -> None:
    write_items(tmp_path / "items.jsonl", squares(4))
    proc = resilpool("run", "workload:cli_square", "-i", "items.jsonl", "-o", "out.jsonl", "--progress-interval", "600", cwd=tmp_path)
    assert proc.returncode == 0
    (line,) = [x for x in proc.stderr.splitlines() if "done 4/4" in x]
    assert "/s  ETA " in line and "failed 0" in line


def test_did_you_mean(tmp_path: Path) -> None:
    write_items(tmp_path / "items.jsonl", squares(1))
    assert_one_line_error(resilpool("run", "workload:cli_sqare", "-i", "items.jsonl", "-o", "o.jsonl", cwd=tmp_path), "did you mean 'cli_square'?")
    assert_one_line_error(resilpool("run", "worklaod:cli_square", "-i", "items.jsonl", "-o", "o.jsonl", cwd=tmp_path), "did you mean 'workload'")


