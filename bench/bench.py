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
    bench/run --baseline b32f233   # also resilpool at that git revision: before/after in one run
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import adapters
import figures
import noise
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
    ap.add_argument(
        "--baseline",
        metavar="REV",
        default=None,
        help="also measure resilpool at git revision REV (installed into bench/.baseline/REV/venv) in the "
        "interleaved figures, and print a before/after table",
    )
    ap.add_argument(
        "--reps",
        type=int,
        default=None,
        help="repetitions of the interleaved figures (default 5, 2 with --quick)",
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


@dataclass(frozen=True)
class Job:
    """One child process: a figure for one library, one repetition (interleaved figures) or all."""

    fig: Figure
    lib: str
    rep: int | None = None  # 0-based repetition of an interleaved figure; None: the child does all


def figure_libs(fig: Figure, args: argparse.Namespace) -> list[str]:
    """The libraries (row sources) of one figure, in table order."""
    if fig.single:
        return ["floor"]
    libs = [lib for lib in args.libs if not (fig.subject_only and lib != "resilpool")]
    if "resilpool" in libs and not args.start_method:
        variants = ["resilpool-fork"] * fig.fork_variant + ["resilpool-spawn"] * fig.spawn_variant
        libs[libs.index("resilpool") + 1 : libs.index("resilpool") + 1] = variants
    if args.baseline and fig.interleaved:
        libs.insert(0, "baseline")
    return libs


def plan(args: argparse.Namespace, fig: Figure) -> list[Job]:
    """The children of one figure, in the order they run.

    An interleaved figure runs repetition by repetition, every library once per
    repetition, the order rotated by one library each time: a slow stretch of
    the machine then hits all libraries alike instead of the one that happened
    to be running, and no library is always first or last.
    """
    libs = figure_libs(fig, args)
    if not fig.interleaved:
        return [Job(fig, lib) for lib in libs]
    jobs = []
    for rep in range(reps(args)):
        k = rep % len(libs)
        jobs += [Job(fig, lib, rep) for lib in libs[k:] + libs[:k]]
    return jobs


def reps(args: argparse.Namespace) -> int:
    return args.reps or int(figures.PARAMS["quick" if args.quick else "full"]["reps"])


def run_child(job: Job, args: argparse.Namespace, tmp: Path, baseline: Baseline | None) -> list[dict[str, Any]]:
    """Run one child process; return its rows.

    On timeout the child and every process below it (its workers, their
    forkserver) are SIGKILLed and unfinished rows become ``timeout``; a crash
    turns them into ``error`` with the end of the child's output.
    """
    fig, lib = job.fig, job.lib
    stem = f"{fig.name}-{lib}" + ("" if job.rep is None else f"-{job.rep}")
    out, log = tmp / f"{stem}.json", tmp / f"{stem}.log"
    env = _child_env()
    python = sys.executable
    if lib == "baseline" and baseline is not None:
        python, env[adapters.BASELINE_ENV] = baseline.python, baseline.rev
    cmd = [python, str(HERE / "child.py"), fig.name, lib, str(out), "quick" if args.quick else "full"]
    if args.standin:
        cmd.append("--standin")
    if args.start_method:
        cmd += ["--start-method", args.start_method]
    limit = fig.quick_timeout if args.quick else fig.timeout
    with open(log, "wb") as fh:
        # cwd: not the checkout.  CPython's forkserver (3.11-3.13) ignores the sys.path it is sent and
        # keeps its own, which starts with the current directory: started from the checkout, a
        # baseline child's forkserver would import the checkout's resilpool, not the baseline's.
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=tmp
        )
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
    label = f"resilpool@{baseline.rev}" if lib == "baseline" and baseline else None
    return _rows(out, fig, lib, failure, label)


@dataclass(frozen=True)
class Baseline:
    """resilpool at an earlier revision, installed in a venv of its own."""

    rev: str  # short commit id
    python: str  # that venv's interpreter


def prepare_baseline(rev: str) -> Baseline:
    """Install resilpool at git revision ``rev`` into ``bench/.baseline/<commit>/venv`` (once; reused).

    The source is ``git archive`` of that commit (not a checkout: the working
    tree is left alone); the venv gets it non-editable plus psutil, which the
    bench child needs.  Its children run this checkout's bench code against
    the old library.
    """
    root = HERE.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--verify", f"{rev}^{{commit}}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"bench: --baseline {rev}: not a commit in {root}: {exc.stderr.strip()}") from exc
    short = sha[:7]
    base = HERE / ".baseline" / short
    python = base / "venv" / "bin" / "python"
    stamp = base / ".installed"
    if not stamp.exists():
        print(f"bench: installing resilpool at {short} into {base}/venv", file=sys.stderr, flush=True)
        shutil.rmtree(base, ignore_errors=True)
        src = base / "src"
        src.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(root), "archive", sha], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        subprocess.run([sys.executable, "-m", "venv", str(base / "venv")], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-qq", str(src), "psutil"], check=True)
        stamp.touch()
    return Baseline(short, str(python))


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


def _rows(
    out: Path, fig: Figure, lib: str, failure: tuple[str, str] | None, label: str | None = None
) -> list[dict[str, Any]]:
    """Read the child's rows; mark unfinished ones with ``failure``; never return none."""
    rows: list[dict[str, Any]] = json.loads(out.read_text())["rows"] if out.exists() else []
    for row in rows:
        if row["status"] == "running":
            row["status"], row["reason"] = failure or ("error", "row left unfinished")
    if not rows:
        label = label or ("multiprocessing.Pipe (floor)" if lib == "floor" else adapters.LABELS[lib])
        status, reason = failure or ("error", "no result")
        rows = [
            {
                "label": label,
                "lib": lib,
                "subject": lib in adapters.SUBJECTS,
                "baseline": lib == "baseline",
                "status": status,
                "reason": reason,
                "metrics": {},
                "info": {},
            }
        ]
    return rows


def aggregate(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Merge the rows of an interleaved figure's repetitions: one row per label.

    Each metric becomes the median over the repetitions that measured it;
    ``samples`` keeps every repetition's value and ``spread`` their min and
    max.  The first repetition that did not end ``ok`` gives the row its
    status (its reason names the repetition); values measured before it count.
    """
    merged: dict[str, dict[str, Any]] = {}
    for rep, rows in enumerate(runs, 1):
        for row in rows:
            m = merged.setdefault(
                row["label"], {**row, "status": "ok", "reason": "", "metrics": {}, "info": {}, "samples": {}}
            )
            m["info"].update(row["info"])
            for key, value in row["metrics"].items():
                m["samples"].setdefault(key, []).append(value)
            if row["status"] != "ok" and m["status"] == "ok":
                m["status"], m["reason"] = row["status"], f"repetition {rep}: {row['reason']}"
    for m in merged.values():
        m["metrics"] = {k: statistics.median(v) for k, v in m["samples"].items()}
        m["spread"] = {k: [min(v), max(v)] for k, v in m["samples"].items()}
    return list(merged.values())


def progress(fig: Figure, rows: list[dict[str, Any]], seconds: float, rep: int | None = None) -> None:
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
        where = fig.name if rep is None else f"{fig.name} {rep + 1}"
        print(f"[{where}] {row['label']}: {text}  ({seconds:.1f} s)", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- tables


def _fmt(metric: Metric, value: Any) -> str:
    return "-" if value is None else metric.fmt.format(value)


def best_peer(rows: list[dict[str, Any]], metric: Metric) -> float | None:
    """Best value of ``metric`` among peer rows (resilpool excluded); None if there is none to speak of.

    A value a peer measured before it broke or hung counts: it is real (the
    row shows what happened next).  A best value at or below the metric's
    floor (e.g. ~0 % CPU) gives no meaningful ratio and counts as none.
    """
    values = [
        r["metrics"][metric.key]
        for r in rows
        if not r["subject"] and not r.get("baseline") and metric.key in r["metrics"]
    ]
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
        elif len(row.get("samples", {}).get(m.key, ())) > 1:
            low, high = row["spread"][m.key]
            cells.append(f"{_fmt(m, value)} [{_fmt(m, low)}-{_fmt(m, high)}]")
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
    for lib in (*adapters.LIBS, *adapters.EXTRA, "floor"):
        if lib in seen:
            e = seen[lib]
            lines.append(f"| {e['label']} | {e['version'] or '-'} | {', '.join(sorted(e['methods'])) or '-'} |")
    return "\n".join(lines)


def meta(args: argparse.Namespace) -> dict[str, Any]:
    """Where and how the run was made."""
    params = figures.PARAMS["quick" if args.quick else "full"]
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "mode": "quick" if args.quick else "full",
        "params": params,
        "workers": figures.WORKERS,
        "standin": args.standin,
        "start_method": args.start_method or "each library's default",
        "baseline": args.baseline,
        "repeats": "submit, map, latency, head-of-line, first start: median of {r} interleaved repetitions "
        "(one child process each, libraries round-robin, order rotated per repetition), [min-max] over them; "
        "pipe, retry: best of {n}; leaky, monitor: median of {n}; recovery: median over {k} kills".format(
            r=reps(args), n=params["repeats"], k=params["kills"]
        ),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    baseline = prepare_baseline(args.baseline) if args.baseline else None
    figs = [FIGURES[name] for name in args.only]
    n_jobs = sum(len(plan(args, fig)) for fig in figs)
    info = meta(args)
    if baseline:
        info["baseline"] = baseline.rev
    print(
        f"resilpool bench: {info['mode']} run, {n_jobs} child processes, python {info['python']}, "
        f"{info['cpus']} cpus",
        file=sys.stderr,
    )
    results: dict[str, list[dict[str, Any]]] = {}
    noisy: dict[str, dict[str, Any]] = {}
    become_subreaper()
    started = time.monotonic()
    info["noise_start"] = noise.reading()
    with tempfile.TemporaryDirectory(prefix="resilpool-bench-") as tmp:
        for fig in figs:
            before = noise.reading()
            runs: dict[str, list[list[dict[str, Any]]]] = {}
            for job in plan(args, fig):
                t0 = time.monotonic()
                rows = run_child(job, args, Path(tmp), baseline)
                progress(fig, rows, time.monotonic() - t0, job.rep)
                runs.setdefault(job.lib, []).append(rows)
            noisy[fig.name] = noise.summary(before, noise.reading())
            libs = figure_libs(fig, args)
            if fig.interleaved:
                results[fig.name] = [row for lib in libs for row in aggregate(runs[lib])]
            else:
                results[fig.name] = [row for lib in libs for rows in runs[lib] for row in rows]
    info["seconds"] = round(time.monotonic() - started, 1)
    info["noise_end"] = noise.reading()
    info["noise"] = noisy
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


def before_after(results: dict[str, list[dict[str, Any]]], rev: str) -> str:
    """Markdown: resilpool at the baseline revision against this checkout, metric by metric, same run."""
    lines = [
        f"### Before / after: resilpool@{rev} vs. this checkout (same run, interleaved)",
        "",
        "| figure | metric | before | after | after / before | better |",
        "|---|---|---|---|---|---|",
    ]
    for name in ORDER:
        rows = results.get(name, [])
        before = next((r for r in rows if r.get("baseline")), None)
        after = next((r for r in rows if r["lib"] == "resilpool"), None)
        if before is None or after is None:
            continue
        for m in FIGURES[name].metrics:
            if not m.ratio:
                continue
            b, a = before["metrics"].get(m.key), after["metrics"].get(m.key)
            ratio = f"{a / b:.2f}x" if a is not None and b else "-"
            lines.append(f"| {name} | {m.label} | {_fmt(m, b)} | {_fmt(m, a)} | {ratio} | {m.better} |")
    return "\n".join(lines)


def report(info: dict[str, Any], results: dict[str, list[dict[str, Any]]]) -> str:
    """The whole Markdown report: header, noise, libraries, before/after, one table per figure."""
    start, end = info["noise_start"], info["noise_end"]
    parts = [
        f"## resilpool benchmark ({info['mode']} run)",
        "",
        f"Python {info['python']} on {info['platform']}, {info['cpus']} CPUs, {info['workers']} workers per pool "
        f"(8 for the monitor figure), start method: {info['start_method']}. Repeats: {info['repeats']}. "
        "Ratios are value / best peer (resilpool and the baseline excluded from 'best peer'). "
        f"Load average (1/5/15 min) at start {start['loadavg']}, at end {end['loadavg']}; calibration loop "
        f"{start['wall_ms']:.1f} ms at start, {end['wall_ms']:.1f} ms at end "
        f"(end/start {end['wall_ms'] / start['wall_ms']:.2f}). "
        "A load well above 0 or a calibration ratio far from 1.00 means something else shared the machine.",
    ]
    if info["standin"]:
        parts.append(
            "\n**resilpool rows come from the STAND-IN (stdlib ProcessPoolExecutor on forkserver), "
            "not from resilpool.**"
        )
    parts += ["", noise.table(info["noise"]), "", libraries_table(results)]
    if info.get("baseline"):
        parts += ["", before_after(results, info["baseline"])]
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
