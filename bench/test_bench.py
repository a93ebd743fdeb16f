"""Tests of the benchmark harness itself (no pools are started): ``python -m pytest bench/test_bench.py``.

They pin what the report's numbers mean: which children run in which order,
how repetitions are merged, which rows count as "best peer", and what the
noise readings and the before/after table say.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import adapters  # noqa: E402
import bench  # noqa: E402
import noise  # noqa: E402
import tasks  # noqa: E402
from figures import FIGURES, read_marks  # noqa: E402


def _row(lib: str, label: str, status: str = "ok", **metrics: float) -> dict:
    return {
        "label": label,
        "lib": lib,
        "subject": lib in adapters.SUBJECTS,
        "baseline": lib == "baseline",
        "status": status,
        "reason": "boom" if status != "ok" else "",
        "metrics": dict(metrics),
        "info": {},
    }


def test_interleaved_plan_runs_every_library_once_per_repetition_in_rotated_order() -> None:
    args = bench.parse_args(["--only", "latency", "--libs", "resilpool,mp,cf", "--reps", "4"])
    jobs = bench.plan(args, FIGURES["latency"])
    by_rep = [[j.lib for j in jobs if j.rep == r] for r in range(4)]
    assert by_rep == [
        ["resilpool", "cf", "mp"],
        ["cf", "mp", "resilpool"],
        ["mp", "resilpool", "cf"],
        ["resilpool", "cf", "mp"],
    ]
    # one repetition ends before the next begins: the repetitions are interleaved, not the libraries run apart
    assert [j.rep for j in jobs] == sorted(j.rep for j in jobs)


def test_plain_figure_runs_one_child_per_library() -> None:
    args = bench.parse_args(["--libs", "resilpool,mp"])
    assert [(j.lib, j.rep) for j in bench.plan(args, FIGURES["recovery"])] == [("resilpool", None), ("mp", None)]


def test_baseline_and_fork_rows_join_only_where_they_belong() -> None:
    args = bench.parse_args(["--libs", "resilpool,mp", "--baseline", "HEAD"])
    assert bench.figure_libs(FIGURES["firststart"], args) == ["baseline", "resilpool", "resilpool-fork", "resilpool-spawn", "mp"]
    assert bench.figure_libs(FIGURES["latency"], args) == ["baseline", "resilpool", "mp"]
    assert bench.figure_libs(FIGURES["recovery"], args) == ["resilpool", "mp"]
    forced = bench.parse_args(["--libs", "resilpool,mp", "--start-method", "spawn"])
    assert not {"resilpool-fork", "resilpool-spawn"} & set(bench.figure_libs(FIGURES["firststart"], forced))


def test_aggregate_takes_median_and_spread_and_keeps_the_first_failure() -> None:
    runs = [
        [_row("mp", "multiprocessing.Pool", median=50.0, p99=900.0)],
        [_row("mp", "multiprocessing.Pool", median=40.0, p99=100.0)],
        [_row("mp", "multiprocessing.Pool", status="hangs", median=70.0)],
        [_row("mp", "multiprocessing.Pool", status="error")],
    ]
    (row,) = bench.aggregate(runs)
    assert row["metrics"] == {"median": 50.0, "p99": 500.0}
    assert row["spread"] == {"median": [40.0, 70.0], "p99": [100.0, 900.0]}
    assert row["samples"]["median"] == [50.0, 40.0, 70.0]
    assert (row["status"], row["reason"]) == ("hangs", "repetition 3: boom")


def test_render_prints_spread_and_ignores_resilpool_and_baseline_for_best_peer() -> None:
    rows = bench.aggregate([[_row("resilpool", "resilpool", median=10.0)], [_row("resilpool", "resilpool", median=30.0)]])
    rows += [_row("baseline", "resilpool@abc1234", median=5.0), _row("mp", "multiprocessing.Pool", median=40.0, p99=1.0)]
    table = bench.render(FIGURES["latency"], rows)
    assert "| **resilpool** <- | - | 20.0 [10.0-30.0] | 0.50x |" in table
    assert "| resilpool@abc1234 | - | 5.0 | 0.12x |" in table
    assert "| multiprocessing.Pool | - | 40.0 | 1.00x |" in table


def test_before_after_compares_baseline_with_this_checkout() -> None:
    results = {
        "submit": [_row("baseline", "resilpool@abc1234", rate=100.0), _row("resilpool", "resilpool", rate=150.0)],
        "latency": [_row("resilpool", "resilpool", median=1.0)],  # no baseline row: no line
    }
    table = bench.before_after(results, "abc1234")
    assert "| submit | tasks/s | 100 | 150 | 1.50x | higher |" in table
    assert "latency" not in table.split("|---|")[-1]


def test_noise_reading_and_summary() -> None:
    before, after = noise.reading(), {"loadavg": [0.0, 0.0, 0.0], "wall_ms": 0.0, "cpu_share": 1.0}
    assert before["wall_ms"] > 0 and 0 < before["cpu_share"] <= 1.5 and len(before["loadavg"]) == 3
    after["wall_ms"] = before["wall_ms"] * 2
    assert noise.summary(before, after)["calib_ratio"] == 2.0
    assert "| latency |" in noise.table({"latency": noise.summary(before, after)})


def test_ready_marks_round_trip(tmp_path: Path) -> None:
    path = str(tmp_path / "ready")
    assert read_marks(path) == []
    tasks.mark_ready(path)
    tasks.mark_ready(path)
    marks = read_marks(path)
    assert len(marks) == 2 and marks[0][0] <= marks[1][0] and all(cpu > 0 for _, cpu in marks)
