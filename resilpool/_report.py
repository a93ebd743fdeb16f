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

__all__ = ["build_report", "render_report", "write_report"]

_SLOWEST = 10
_MAX_BUCKETS = 60


def build_report(conn: sqlite3.Connection, journal_path: str | None = None) -> dict[str, Any]:
    """Totals, runs, recycles by reason, retries, failures, slowest items, peak memory and a timeline."""
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    total = int(meta.get("item_count", "0"))
    states = dict(conn.execute("SELECT state, COUNT(*) FROM items GROUP BY state").fetchall())
    done, failed, running = states.get("done", 0), states.get("failed", 0), states.get("running", 0)
    runs = []
    for rid, started, finished, status, pid, workers, rdone, rfailed, stats in conn.execute(
        "SELECT id, started, finished, status, pid, workers, done, failed, stats FROM runs ORDER BY id"
    ):
        runs.append(
            {
                "id": rid,
                "status": status,
                "started": _iso(started),
                "finished": _iso(finished),
                "elapsed_s": None if finished is None else round(finished - started, 3),
                "pid": pid,
                "workers": workers,
                "done": rdone,
                "failed": rfailed,
                "stats": json.loads(stats) if stats else None,
            }
        )
    recycles: dict[str, int] = {}
    for reason, n in conn.execute("SELECT reason, COUNT(*) FROM events WHERE kind = 'worker_exited' AND reason != 'shutdown' GROUP BY reason ORDER BY reason"):
        recycles[str(reason)] = int(n)
    kinds = dict(conn.execute("SELECT kind, COUNT(*) FROM events GROUP BY kind").fetchall())
    retried_items = conn.execute("SELECT COUNT(*) FROM items WHERE attempts > 1").fetchone()[0]
    failures = {
        str(t): int(n)
        for t, n in conn.execute("SELECT error_type, COUNT(*) FROM items WHERE state = 'failed' GROUP BY error_type ORDER BY COUNT(*) DESC, error_type")
    }
    failed_items = [
        {"index": i, "line": line, "attempts": a, "pid": pid, "error_type": et, "error": e}
        for i, line, a, pid, et, e in conn.execute(
            "SELECT idx, line, attempts, pid, error_type, error FROM items WHERE state = 'failed' ORDER BY idx LIMIT 20"
        )
    ]
    slowest = [
        {"index": i, "line": line, "elapsed_s": round(el, 6), "pid": pid, "attempts": a, "state": st}
        for i, line, el, pid, a, st in conn.execute(
            "SELECT idx, line, elapsed, pid, attempts, state FROM items WHERE elapsed IS NOT NULL ORDER BY elapsed DESC LIMIT ?",
            (_SLOWEST,),
        )
    ]
    peak_row = conn.execute("SELECT idx, pid, peak_rss FROM items WHERE peak_rss IS NOT NULL ORDER BY peak_rss DESC LIMIT 1").fetchone()
    pool_peak = max((int((r["stats"] or {}).get("peak_worker_rss") or 0) for r in runs), default=0)
    elapsed = conn.execute("SELECT AVG(elapsed), SUM(elapsed) FROM items WHERE state = 'done' AND elapsed IS NOT NULL").fetchone()
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
            "interrupted": running,  # 'running' in a journal nobody runs: the run was stopped mid-item
        },
        "complete": done == total,
        "runs": runs,
        "recycles": recycles,
        "worker_crashes": recycles.get("crash", 0) + recycles.get("startup", 0),
        "retries": {"attempts_retried": int(kinds.get("retried", 0)), "items_retried": int(retried_items)},
        "quarantined": int(kinds.get("quarantined", 0)),
        "failures_by_type": failures,
        "failed_items": failed_items,
        "task_time_s": {"mean": _round(elapsed[0]), "total": _round(elapsed[1])},
        "slowest": slowest,
        "peak_rss": {
            "item_bytes": None if peak_row is None else int(peak_row[2]),
            "item_index": None if peak_row is None else int(peak_row[0]),
            "item_pid": None if peak_row is None else peak_row[1],
            "pool_bytes": pool_peak or None,
        },
        "timeline": _timeline(conn),
    }


def _timeline(conn: sqlite3.Connection) -> dict[str, Any]:
    """Items finished per time bucket, from the first finish to the last (at most 60 buckets)."""
    first, last = conn.execute("SELECT MIN(finished), MAX(finished) FROM items WHERE finished IS NOT NULL AND state IN ('done', 'failed')").fetchone()
    if first is None:
        return {"start": None, "bucket_s": None, "buckets": []}
    span = max(last - first, 1e-9)
    bucket = max(1, math.ceil(span / _MAX_BUCKETS))
    n = int(span // bucket) + 1
    done = [0] * n
    failed = [0] * n
    for b, state, count in conn.execute(
        "SELECT CAST((finished - ?) / ? AS INTEGER) AS b, state, COUNT(*) FROM items"
        " WHERE finished IS NOT NULL AND state IN ('done', 'failed') GROUP BY b, state",
        (first, bucket),
    ):
        b = min(int(b), n - 1)
        (done if state == "done" else failed)[b] += int(count)
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


def _mib(n: int | None) -> str:
    return "-" if not n else f"{n / 2**20:.0f} MiB"


def render_report(r: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    t = r["totals"]
    lines = [
        f"journal   {r['journal']}",
        f"function  {r['function']}",
        f"input     {r['input']['path']} ({r['input']['format']}, {t['items']} items)",
        f"output    {r['output']}",
        "",
        f"items     {t['done']} done, {t['failed']} failed, {t['pending']} pending"
        + (f", {t['interrupted']} interrupted" if t["interrupted"] else "")
        + ("  (complete)" if r["complete"] else ""),
    ]
    lines.append(f"runs      {len(r['runs'])}")
    for run in r["runs"]:
        took = "-" if run["elapsed_s"] is None else f"{run['elapsed_s']:.1f}s"
        lines.append(f"  #{run['id']} {run['started']}  {run['status']:<11} {took:>9}  done {run['done']}  failed {run['failed']}  workers {run['workers']}")
    recycles = ", ".join(f"{k} {v}" for k, v in r["recycles"].items()) or "none"
    lines.append(f"recycles  {recycles}")
    lines.append(f"retries   {r['retries']['attempts_retried']} attempts retried; items with more than one attempt: {r['retries']['items_retried']}; quarantined: {r['quarantined']}")
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
    lines.append(f"peak RSS  {_mib(p['pool_bytes'])} (pool sample), {_mib(p['item_bytes'])} (worker at item end{'' if p['item_index'] is None else ', item ' + str(p['item_index'])})")
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
