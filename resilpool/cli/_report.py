"""The report of a journal: ``resilpool report run.db [--json]`` and ``resilpool run --report``.

:func:`build_report` reads a journal into a dict of plain JSON values (its keys
are documented in ``docs/cli.md``); :func:`render_report` prints it for people.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from typing import Any

from ._journal import (
    elapsed_totals,
    quarantined_count,
    run_item_counts,
    event_counts,
    failed_item_rows,
    failure_counts,
    finish_buckets,
    finish_span,
    peak_item_row,
    read_meta,
    recycle_counts,
    retried_item_count,
    run_rows,
    slowest_rows,
    state_counts,
)
from ._locks import locked_by
from ._view import human_bytes

__all__ = ["build_report", "render_report", "write_report"]

_SLOWEST = 10
_MAX_BUCKETS = 60


def build_report(conn: sqlite3.Connection, journal_path: str | None = None) -> dict[str, Any]:
    """Totals, runs, recycles by reason, retries, failures, slowest items, peak memory and a timeline."""
    meta = read_meta(conn)
    total = int(meta.get("item_count", "0"))
    states = state_counts(conn)
    done, failed, running = states.get("done", 0), states.get("failed", 0), states.get("running", 0)
    live_pid = None if journal_path is None else locked_by(journal_path)
    per_run = run_item_counts(conn)
    rows = run_rows(conn)
    last_id = rows[-1][0] if rows else None
    runs = []
    for rid, started, finished, status, pid, workers, _, _, stats in rows:
        # Counts come from the items (what each run's items are now), not from the run's
        # own row, which a killed run never wrote.  A run left 'running' is live only if
        # its journal lock is held; otherwise it was killed.
        live = status == "running" and rid == last_id and live_pid is not None
        if status == "running" and not live:
            status = "killed"
        counts = per_run.get(rid, {})
        runs.append(
            {
                "id": rid,
                "status": status,
                "started": _iso(started),
                "finished": _iso(finished),
                "elapsed_s": None if finished is None else round(finished - started, 3),
                "pid": pid,
                "workers": workers,
                "done": counts.get("done", 0),
                "failed": counts.get("failed", 0),
                "running": counts.get("running", 0) if live else 0,
                "stats": json.loads(stats) if stats else None,
            }
        )
    live_run = next((r for r in runs if r["status"] == "running"), None)
    recycles = recycle_counts(conn)
    kinds = event_counts(conn)
    retried_items = retried_item_count(conn)
    failures = failure_counts(conn)
    failed_items = [
        {"index": i, "line": line, "attempts": a, "pid": pid, "error_type": et, "error": e}
        for i, line, a, pid, et, e in failed_item_rows(conn, 20)
    ]
    slowest = [
        {"index": i, "line": line, "elapsed_s": round(el, 6), "pid": pid, "attempts": a, "state": st}
        for i, line, el, pid, a, st in slowest_rows(conn, _SLOWEST)
    ]
    peak_row = peak_item_row(conn)
    pool_peak = max((int((r["stats"] or {}).get("peak_worker_rss") or 0) for r in runs), default=0)
    item_peak = 0 if peak_row is None else int(peak_row[2])
    elapsed = elapsed_totals(conn)
    return {
        "journal": journal_path,
        "function": meta.get("function"),
        "input": {
            "path": meta.get("input_path"),
            "format": meta.get("input_format"),
            "size": int(meta.get("input_size", "0")),
            "digest": meta.get("input_digest"),
        },
        "output": meta.get("output_path"),
        "totals": {
            "items": total,
            "done": done,
            "failed": failed,
            "pending": max(0, total - done - failed - running),
            "running": running if live_run else 0,
            "interrupted": 0 if live_run else running,  # 'running' in a journal nobody runs: stopped mid-item
        },
        "live": None if live_run is None else {"run": live_run["id"], "pid": live_run["pid"]},
        "complete": done == total,
        "runs": runs,
        "recycles": recycles,
        "worker_crashes": recycles.get("crash", 0) + recycles.get("startup", 0),
        "retries": {"attempts_retried": int(kinds.get("retried", 0)), "items_retried": int(retried_items)},
        "quarantined": quarantined_count(conn),
        "quarantine_events": int(kinds.get("quarantined", 0)),
        "failures_by_type": failures,
        "failed_items": failed_items,
        "task_time_s": {"mean": _round(elapsed[0]), "total": _round(elapsed[1])},
        "slowest": slowest,
        "peak_rss": {
            # One figure: the highest resident memory of one worker, the larger of the worker's
            # own peak at an item's end (ru_maxrss) and the monitor's samples of its process tree.
            "bytes": max(item_peak, pool_peak) or None,
            "item_bytes": None if peak_row is None else int(peak_row[2]),
            "item_index": None if peak_row is None else int(peak_row[0]),
            "item_pid": None if peak_row is None else peak_row[1],
            "pool_bytes": pool_peak or None,
        },
        "timeline": _timeline(conn),
    }


def _timeline(conn: sqlite3.Connection) -> dict[str, Any]:
    """Items finished per time bucket, from the first finish to the last (at most 60 buckets)."""
    first, last = finish_span(conn)
    if first is None or last is None:
        return {"start": None, "bucket_s": None, "buckets": []}
    span = max(last - first, 1e-9)
    bucket = max(1, math.ceil(span / _MAX_BUCKETS))
    n = int(span // bucket) + 1
    done = [0] * n
    failed = [0] * n
    for b, state, count in finish_buckets(conn, first, bucket):
        b = min(b, n - 1)
        (done if state == "done" else failed)[b] += count
    return {
        "start": _iso(first),
        "bucket_s": bucket,
        "buckets": [{"t": i * bucket, "done": d, "failed": f} for i, (d, f) in enumerate(zip(done, failed))],
    }


def _iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) + f".{int((t % 1) * 1000):03d}"


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


def _secs(x: float) -> str:
    if x < 0.1:
        return f"{x * 1000:.2f} ms"
    if x < 600:
        return f"{x:.2f} s"
    return f"{x / 3600:.2f} h"


def render_report(r: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    t = r["totals"]
    lines = [
        f"journal   {r['journal']}",
        f"function  {r['function']}",
        f"input     {r['input']['path']} ({r['input']['format']}, {t['items']} items, {human_bytes(r['input']['size'])})",
        f"output    {r['output']}",
        "",
        f"items     {t['done']} done, {t['failed']} failed, {t['pending']} pending"
        + (f", {t['running']} running" if t["running"] else "")
        + (f", {t['interrupted']} interrupted" if t["interrupted"] else "")
        + ("  (complete)" if r["complete"] else ""),
    ]
    if r["live"] is not None:
        pct = 100 * (t["done"] + t["failed"]) / max(1, t["items"])
        lines.append(f"live      run #{r['live']['run']} is running now (pid {r['live']['pid']}): {pct:.0f}% resolved")
    lines.append(f"runs      {len(r['runs'])}")
    for run in r["runs"]:
        took = "-" if run["elapsed_s"] is None else f"{run['elapsed_s']:.1f}s"
        running = f"  running {run['running']}" if run["running"] else ""
        lines.append(
            f"  #{run['id']} {run['started']}  {run['status']:<11} {took:>9}  done {run['done']}  failed {run['failed']}{running}"
            f"  workers {run['workers']}  pid {run['pid']}"
        )
    recycles = ", ".join(f"{k} {v}" for k, v in r["recycles"].items()) or "none"
    lines.append(f"recycles  {recycles}")
    lines.append(f"retries   {r['retries']['attempts_retried']} attempts retried; items with more than one attempt: {r['retries']['items_retried']}; quarantined now: {r['quarantined']}")
    if r["failures_by_type"]:
        lines.append("failures  " + ", ".join(f"{k} {v}" for k, v in r["failures_by_type"].items()))
        for f in r["failed_items"][:5]:
            where = f" (line {f['line']})" if f["line"] else ""
            lines.append(f"  item {f['index']}{where}: {f['error_type']}: {(f['error'] or '')[:100]}")
    tt = r["task_time_s"]
    if tt["mean"] is not None:
        lines.append(f"item time mean {_secs(tt['mean'])}, total {_secs(tt['total'])} (in workers)")
    if r["slowest"]:
        lines.append("slowest   " + ", ".join(f"item {s['index']} {_secs(s['elapsed_s'])}" for s in r["slowest"][:5]))
    p = r["peak_rss"]
    if p["bytes"]:
        lines.append(f"peak worker RSS {human_bytes(p['bytes'])} (the most resident memory one worker held)")
    tl = r["timeline"]
    if tl["buckets"]:
        counts = [b["done"] + b["failed"] for b in tl["buckets"]]
        lines.append(f"timeline  from {tl['start']}, per {tl['bucket_s']}s: {_spark(counts)}  (max {max(counts)})")
    return "\n".join(lines)


def _spark(values: list[int]) -> str:
    bars = "▁▂▃▄▅▆▇█"
    top = max(values) or 1
    return "".join(bars[min(len(bars) - 1, (v * (len(bars) - 1) + top - 1) // top)] if v else " " for v in values)


def write_report(path: str, report: dict[str, Any]) -> None:
    """Write ``report`` as JSON, atomically (a temporary file, then rename)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)
