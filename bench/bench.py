"""resilpool side by side with the other process pools: one run, one table per figure.

Run it through ``bench/run``, which builds ``bench/.venv`` with resilpool and
its peers (loky, pebble, billiard, mpire, psutil) and puts ``bench/`` on
``PYTHONPATH`` so that every worker, whatever its start method, can import
``tasks``.  Each (figure, library) pair runs in a child process of its own
(``child.py``) under a time limit, so a library that hangs or crashes costs
its row, never the run; a timed-out child is killed with everything below it.
The tables go to stdout as Markdown, progress to stderr, and everything to
``bench/results.json``.

    bench/run                      # full run, all libraries
    bench/run --quick              # smoke run, well under a minute
    bench/run --only submit,latency --libs resilpool,cf,loky
    bench/run --quick --standin    # exercise the harness with a stand-in resilpool
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import adapters
import figures
from figures import FIGURES, ORDER, Figure, Metric

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes and one repeat: a smoke run")
    ap.add_argument(
        "--only",
        type=_names(ORDER),
        default=list(ORDER),
        help=f"comma-separated figures to run (default all: {','.join(ORDER)})",
    )
    ap.add_argument(
        "--libs",
        type=_names(adapters.LIBS),
        default=list(adapters.LIBS),
        help=f"comma-separated libraries (default all: {','.join(adapters.LIBS)}; "
        "cf = concurrent.futures, mp = multiprocessing.Pool)",
    )
    ap.add_argument(
        "--standin",
        action="store_true",
        help="use bench/standin.py (stdlib executor on forkserver) in place of resilpool",
    )
    ap.add_argument(
        "--start-method",
        default=None,
        help="force this start method on every library that takes one (default: each library's own)",
    )
    ap.add_argument("--json", type=Path, default=HERE / "results.json", help="where to write the full results")
    return ap.parse_args(argv)


def _names(allowed: tuple[str, ...]) -> Any:
    """An argparse type for a comma-separated subset of ``allowed``, returned in canonical order."""

    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {','.join(allowed)}")
        return [n for n in allowed if n in names]  # canonical order

    return parse


# --------------------------------------------------------------------------- running children


def plan(args: argparse.Namespace) -> list[tuple[Figure, str]]:
    """The (figure, library) pairs to run, in table order."""
    jobs = []
    for name in args.only:
        fig = FIGURES[name]
        if fig.single:
            jobs.append((fig, "floor"))
            continue
        for lib in args.libs:
            if fig.subject_only and lib != "resilpool":
                continue
            jobs.append((fig, lib))
    return jobs


def run_child(fig: Figure, lib: str, args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    """Run one figure for one library in a child process; return its rows.

    On timeout the child and every process below it (its workers, their
    forkserver) are SIGKILLed and unfinished rows become ``timeout``; a crash
    turns them into ``error`` with the end of the child's output.
    """
    out, log = tmp / f"{fig.name}-{lib}.json", tmp / f"{fig.name}-{lib}.log"
    cmd = [sys.executable, str(HERE / "child.py"), fig.name, lib, str(out), "quick" if args.quick else "full"]
    if args.standin:
        cmd.append("--standin")
    if args.start_method:
        cmd += ["--start-method", args.start_method]
    limit = fig.quick_timeout if args.quick else fig.timeout
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_child_env(), start_new_session=True)
        try:
            proc.wait(limit)
            failure = None if proc.returncode == 0 else ("error", f"child exited {proc.returncode}: {_tail(log)}")
        except subprocess.TimeoutExpired:
            failure = ("timeout", f"timeout after {limit:.0f} s")
            _kill_tree(proc)
        except BaseException:  # Ctrl-C: the child has its own session and would not see it
            _kill_tree(proc)
            raise
        finally:
            sweep_orphans()
    return _rows(out, fig, lib, failure)


def _child_env() -> dict[str, str]:
    """This environment with ``bench/`` first on PYTHONPATH (for ``tasks`` in every worker)."""
    env = dict(os.environ)
    paths = [str(HERE), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(HERE)]]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a timed-out child and every process below it, by pid, then reap the child.

    The tree is read before the child dies (orphans lose their place in it);
    its resource trackers are spared and clean up after it.
    """
    from child import kill_descendants

    kill_descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def become_subreaper() -> bool:
    """Adopt the orphans of our children (Linux ``PR_SET_CHILD_SUBREAPER``); False where unavailable.

    A pool can start a worker after its child process swept its own tree
    (``multiprocessing.Pool`` replaces killed workers at once); such a process
    outlives the child.  As subreaper the driver inherits it and
    :func:`sweep_orphans` ends it.
    """
    try:
        import ctypes

        return int(ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def sweep_orphans() -> None:
    """SIGKILL and reap every process still below the driver once a child is done.

    The driver starts nothing but its one child at a time, so whatever is left
    below it then is a leftover of that child.  Resource trackers go last:
    given a moment, they unlink what the dead pool leaked and exit by themselves.
    """
    import psutil

    from child import is_tracker

    for _ in range(3):
        left = psutil.Process().children(recursive=True)
        if not left:
            return
        others = [p for p in left if not is_tracker(p)]
        for proc in others:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(others, timeout=5)
        _, alive = psutil.wait_procs([p for p in left if is_tracker(p)], timeout=3)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)


def _tail(log: Path, lines: int = 3) -> str:
    text = log.read_text(errors="replace").strip().splitlines()
    return " | ".join(text[-lines:])[-400:] if text else "(no output)"


def _rows(out: Path, fig: Figure, lib: str, failure: tuple[str, str] | None) -> list[dict[str, Any]]:
    """Read the child's rows; mark unfinished ones with ``failure``; never return none."""
    rows: list[dict[str, Any]] = json.loads(out.read_text())["rows"] if out.exists() else []
    for row in rows:
        if row["status"] == "running":
            row["status"], row["reason"] = failure or ("error", "row left unfinished")
    if not rows:
        label = "multiprocessing.Pipe (floor)" if lib == "floor" else adapters.LABELS[lib]
        status, reason = failure or ("error", "no result")
        rows = [
            {
                "label": label,
                "lib": lib,
                "subject": lib == "resilpool",
                "status": status,
                "reason": reason,
                "metrics": {},
                "info": {},
            }
        ]
    return rows


def progress(fig: Figure, rows: list[dict[str, Any]], seconds: float) -> None:
    """One line per row on stderr as results come in."""
    for row in rows:
        if row["status"] == "ok" or row["metrics"]:
            text = ", ".join(
                f"{m.label} {_fmt(m, row['metrics'].get(m.key))}" for m in fig.metrics if m.key in row["metrics"]
            )
        else:
            text = ""
        if row["status"] != "ok":
            text = f"{text}; {row['status']}: {row['reason']}" if text else f"{row['status']}: {row['reason']}"
        print(f"[{fig.name}] {row['label']}: {text}  ({seconds:.1f} s)", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- tables


def _fmt(metric: Metric, value: Any) -> str:
    return "-" if value is None else metric.fmt.format(value)


def best_peer(rows: list[dict[str, Any]], metric: Metric) -> float | None:
    """Best value of ``metric`` among peer rows (resilpool excluded); None if there is none to speak of.

    A value a peer measured before it broke or hung counts: it is real (the
    row shows what happened next).  A best value at or below the metric's
    floor (e.g. ~0 % CPU) gives no meaningful ratio and counts as none.
    """
    values = [r["metrics"][metric.key] for r in rows if not r["subject"] and metric.key in r["metrics"]]
    if not values:
        return None
    best = max(values) if metric.better == "higher" else min(values)
    return best if best > metric.floor else None


def render(fig: Figure, rows: list[dict[str, Any]]) -> str:
    """One Markdown table: a row per library, each value with its ratio to the best peer."""
    with_ratio = fig.peer_ratio
    head = ["library", "start method"]
    bests: dict[str, float | None] = {}
    for m in fig.metrics:
        head.append(f"{m.label} ({m.better} is better)" if m.ratio else m.label)
        if with_ratio and m.ratio:
            bests[m.key] = best_peer(rows, m)
            head.append("x best peer")
    lines = [f"### {fig.title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        lines.append("| " + " | ".join(_cells(fig, row, bests, with_ratio)) + " |")
    for i, note in enumerate(fig.notes, 1):
        lines.append(f"\n{'*' * i} {note}" if i == 1 else f"{'*' * i} {note}")
    return "\n".join(lines)


def _cells(fig: Figure, row: dict[str, Any], bests: dict[str, float | None], with_ratio: bool) -> list[str]:
    label = f"**{row['label']}** <-" if row["subject"] else row["label"]
    variant = row["info"].get("variant")
    if variant and variant not in label:
        label += f" [{variant}]"
    cells = [label, row["info"].get("start_method", "-")]
    for i, m in enumerate(fig.metrics):
        value = row["metrics"].get(m.key)
        if value is None:
            cells.append(f"{row['status']}: {row['reason']}" if i == 0 and row["status"] != "ok" else "-")
        else:
            cells.append(_fmt(m, value))
        if with_ratio and m.ratio:
            best = bests.get(m.key)
            cells.append(f"{value / best:.2f}x" if value is not None and best else "-")
    if row["status"] != "ok" and row["metrics"]:
        cells[2] += f" ({row['status']}: {row['reason']})"
    return [c.replace("|", "/") for c in cells]


def libraries_table(results: dict[str, list[dict[str, Any]]]) -> str:
    """Versions and the start methods each library was seen to use."""
    seen: dict[str, dict[str, Any]] = {}
    for rows in results.values():
        for row in rows:
            entry = seen.setdefault(row["lib"], {"label": row["label"], "version": None, "methods": set()})
            entry["version"] = entry["version"] or row["info"].get("version")
            if row["info"].get("start_method"):
                entry["methods"].add(row["info"]["start_method"])
    lines = ["### Libraries", "", "| library | version | start method(s) seen |", "|---|---|---|"]
    for lib in (*adapters.LIBS, "floor"):
        if lib in seen:
            e = seen[lib]
            label = adapters.LABELS.get(lib, e["label"])
            lines.append(f"| {label} | {e['version'] or '-'} | {', '.join(sorted(e['methods'])) or '-'} |")
    return "\n".join(lines)


def meta(args: argparse.Namespace) -> dict[str, Any]:
    """Where and how the run was made."""
    params = figures.PARAMS["quick" if args.quick else "full"]
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "mode": "quick" if args.quick else "full",
        "params": params,
        "workers": figures.WORKERS,
        "standin": args.standin,
        "start_method": args.start_method or "each library's default",
        "repeats": "throughput, latency, pipe: best of {n}; leaky, monitor: median of {n}; recovery: median over "
        "{k} kills".format(n=params["repeats"], k=params["kills"]),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    jobs = plan(args)
    info = meta(args)
    print(
        f"resilpool bench: {info['mode']} run, {len(jobs)} figure x library runs, python {info['python']}, "
        f"{info['cpus']} cpus",
        file=sys.stderr,
    )
    results: dict[str, list[dict[str, Any]]] = {}
    become_subreaper()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="resilpool-bench-") as tmp:
        for fig, lib in jobs:
            t0 = time.monotonic()
            rows = run_child(fig, lib, args, Path(tmp))
            progress(fig, rows, time.monotonic() - t0)
            results.setdefault(fig.name, []).extend(rows)
    info["seconds"] = round(time.monotonic() - started, 1)
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(report(info, results))
    args.json.write_text(
        json.dumps(
            {
                "meta": info,
                "figures": {name: {"title": FIGURES[name].title, "rows": rows} for name, rows in results.items()},
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nfull results: {args.json}  ({info['seconds']} s)", file=sys.stderr)
    return 0


def report(info: dict[str, Any], results: dict[str, list[dict[str, Any]]]) -> str:
    """The whole Markdown report: header, libraries, one table per figure."""
    parts = [
        f"## resilpool benchmark ({info['mode']} run)",
        "",
        f"Python {info['python']} on {info['platform']}, {info['cpus']} CPUs, {info['workers']} workers per pool "
        f"(8 for the monitor figure), start method: {info['start_method']}. Repeats: {info['repeats']}. "
        "Ratios are value / best peer (resilpool excluded from 'best peer'). "
        f"Load average (1/5/15 min) at start {info['loadavg_start']}, at end {info['loadavg_end']}: "
        "anything well above 0 means something else shared the machine.",
    ]
    if info["standin"]:
        parts.append(
            "\n**resilpool rows come from the STAND-IN (stdlib ProcessPoolExecutor on forkserver), "
            "not from resilpool.**"
        )
    parts += ["", libraries_table(results)]
    for name in ORDER:
        if name in results:
            parts += ["", render(FIGURES[name], results[name])]
    if "latency" in results and "pipe" in results:
        floor = results["pipe"][0]["metrics"].get("median")
        if floor:
            parts.append(f"\nFloor for the latency table: raw Pipe round trip, median {floor:,.1f} us.")
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
