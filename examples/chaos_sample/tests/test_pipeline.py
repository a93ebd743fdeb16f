"""The pipeline under chaos: workers killed, tasks exiting, hanging, ballooning, late results.

Run ``pytest``; replay a failure with the command its report prints
(``--chaos-seed=N``); turn chaos up or off with ``--chaos-rate``.
"""

from __future__ import annotations

from pathlib import Path

from chaos_sample import run_pipeline, score

from resilpool import Limits, ResilientPool

ITEMS = [f"item-{i:04d}" for i in range(300)]


def expected(tmp_path: Path) -> dict[str, int]:
    ref = tmp_path / "reference"
    ref.mkdir()
    return {item: score(item, str(ref)) for item in ITEMS}


def test_pipeline(chaos, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    limits = Limits(max_rss="400MiB", stall_timeout=1.0)
    with ResilientPool(2, limits=limits) as pool:
        with chaos.attach(pool, rate=0.1) as injector:
            results = run_pipeline(pool, ITEMS, str(out))
    print(injector.summary())
    assert results == expected(tmp_path)
    assert injector.calls == len(ITEMS)


def test_pipeline_replays_the_same_task_faults(chaos, tmp_path: Path) -> None:
    """Same seed, same submissions: the same tasks draw the same faults."""
    drawn = []
    for run in range(2):
        out = tmp_path / f"out{run}"
        out.mkdir()
        with ResilientPool(2) as pool:
            with chaos.attach(pool, rate=0.2, kinds=["exit", "delay"]) as injector:
                run_pipeline(pool, ITEMS[:100], str(out))
        drawn.append([(f.call, f.kind.value, f.detail) for f in injector.faults])
    assert drawn[0] == drawn[1] and drawn[0]
