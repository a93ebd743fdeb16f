"""How busy the machine was: load average and a calibration loop, taken around every figure.

A figure taken while something else shares the CPUs is slower for reasons
that have nothing to do with the pool; these two readings let a reader
recognise such a figure instead of believing it:

- the load average (1, 5, 15 min) from ``os.getloadavg()``;
- a calibration loop: a fixed amount of pure-Python CPU work, timed by the
  wall clock and by this process's CPU clock.  ``wall_ms`` grows when the
  process has to wait for a CPU; ``cpu_share`` (CPU time / wall time, 1.0 on
  an idle core) says how much of a core it actually got.  The ratio of the
  loop's time after a figure to before it (``end / start``) is printed per
  figure: far from 1.0 means the load changed while the figure ran.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

#: Iterations of one calibration round; about 15 ms on an idle 2024 core.
CALIBRATION_N = 200_000
#: Rounds per reading; the reading is their median.
CALIBRATION_ROUNDS = 5


def _spin(n: int) -> int:
    """The fixed CPU-bound work: integer arithmetic in a Python loop (no I/O, no allocation to speak of)."""
    acc = 0
    for i in range(n):
        acc += i * i % 7
    return acc


def calibrate(n: int = CALIBRATION_N, rounds: int = CALIBRATION_ROUNDS) -> dict[str, float]:
    """Time :func:`_spin` ``rounds`` times: median wall milliseconds and the share of a core it got."""
    walls, shares = [], []
    for _ in range(rounds):
        c0, t0 = time.process_time(), time.perf_counter()
        _spin(n)
        wall = time.perf_counter() - t0
        walls.append(wall * 1000)
        shares.append((time.process_time() - c0) / wall if wall > 0 else 1.0)
    return {"wall_ms": round(statistics.median(walls), 2), "cpu_share": round(statistics.median(shares), 2)}


def reading() -> dict[str, Any]:
    """Load average and a calibration, now."""
    return {"loadavg": [round(x, 2) for x in os.getloadavg()], **calibrate()}


def summary(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What the report prints for one figure: both readings and the calibration's end / start ratio."""
    return {"before": before, "after": after, "calib_ratio": round(after["wall_ms"] / before["wall_ms"], 2)}


def table(per_figure: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per figure with its load and calibration before and after."""
    lines = [
        "### Machine and noise",
        "",
        "Load average (1 min) and the calibration loop (a fixed pure-Python loop: median wall ms of "
        f"{CALIBRATION_ROUNDS} rounds, and the share of a core it got) before and after each figure. "
        "On a quiet machine the loop's time stays put (end/start about 1.00), its CPU share is about 1.00 "
        "and the load is well below the CPU count; a figure whose row is far from that was measured under load.",
        "",
        "| figure | load before | load after | calib ms before | calib ms after | end/start | CPU share before | after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in per_figure.items():
        b, a = s["before"], s["after"]
        lines.append(
            f"| {name} | {b['loadavg'][0]:.2f} | {a['loadavg'][0]:.2f} | {b['wall_ms']:.1f} | {a['wall_ms']:.1f} "
            f"| {s['calib_ratio']:.2f} | {b['cpu_share']:.2f} | {a['cpu_share']:.2f} |"
        )
    return "\n".join(lines)
