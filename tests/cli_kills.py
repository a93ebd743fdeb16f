"""The kill -9 loop of ``resilpool run`` (used by tests/test_cli_kill_loop.py and chaos/test_cli_kills.py).

:func:`kill_loop` runs one journaled job, kills it at random points (after a random
number of new result lines), reruns it, and at the end checks that every result
is in the output exactly once and counts, from a side-effect log written by each
execution, how many executions each kill cost.  The short loop runs here; the
long one (>= 20 kills over 2,000 items) is chaos/test_cli_kills.py.
"""

from __future__ import annotations

import collections
import dataclasses
import random
import signal
from pathlib import Path

from cli_helpers import logged_pids, read_jsonl, resilpool, start, wait_gone, wait_until, write_items


@dataclasses.dataclass
class KillFigures:
    items: int
    workers: int
    kills: int
    executions: int
    reruns_per_kill: list[int]
    recovered: int

    @property
    def reruns(self) -> int:
        return self.executions - self.items

    def line(self) -> str:
        return (
            f"kills={self.kills} items={self.items} workers={self.workers} executions={self.executions}"
            f" reruns={self.reruns} (per kill: max {max(self.reruns_per_kill, default=0)},"
            f" mean {self.reruns / max(1, self.kills):.2f}) recovered_lines={self.recovered}"
        )


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def kill_loop(tmp_path: Path, rng: random.Random, *, n: int, kills: int, workers: int = 2, sleep: float = 0.005) -> KillFigures:
    """Kill a journaled run of ``n`` items ``kills`` times at random points, then let it finish."""
    log, out = tmp_path / "runs.log", tmp_path / "out.jsonl"
    write_items(tmp_path / "items.jsonl", [{"i": i, "log": str(log), "sleep": sleep} for i in range(n)])
    args = ("run", "workload:cli_square", "-i", "items.jsonl", "-o", "out.jsonl", "-j", "run.db", "-w", str(workers), "--plain")
    done_kills = 0
    marks: list[int] = []  # log lines at each kill: the executions of run k are lines marks[k-1]:marks[k]
    recovered = 0
    while done_kills < kills:
        before = _lines(out)
        if before >= n:
            break  # the job finished before all the kills: fewer kills
        step = rng.randint(max(1, n // (kills * 4)), max(2, n // (kills + 1)))
        proc = start(*args, cwd=tmp_path)
        try:
            # Kill after `step` more result lines, or as soon as the run is over if it ends first.
            wait_until(lambda: _lines(out) >= min(n, before + step) or proc.poll() is not None, 120, f"{step} more results")
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=60)
        recovered += sum(int(w) for w in _words_after(err, "recovered"))
        if proc.returncode == -signal.SIGKILL:
            done_kills += 1
        wait_gone(logged_pids(log))  # the killed run's workers die by their lifeline
        marks.append(_lines(log))
    final = resilpool(*args, cwd=tmp_path, timeout=300)
    assert final.returncode == 0, final.stderr
    recovered += sum(int(w) for w in _words_after(final.stderr, "recovered"))

    rows = read_jsonl(out)
    indices = [r["index"] for r in rows]
    assert len(indices) == len(set(indices)) == n, "a result is missing or duplicated"
    assert all(r["result"] == {"i": r["index"], "square": r["index"] ** 2} for r in rows)
    execs = [int(x.split()[0]) for x in log.read_text().splitlines()]
    assert set(execs) == set(range(n))
    # Executions of the items each killed run started that ran again later.
    per_kill = []
    start_at = 0
    for k, end in enumerate(marks):
        later = collections.Counter(execs[end:])
        per_kill.append(sum(1 for i in set(execs[start_at:end]) if later[i]))
        start_at = end
    return KillFigures(n, workers, done_kills, len(execs), per_kill, recovered)


def _words_after(text: str, word: str) -> list[str]:
    parts = text.split()
    return [parts[i + 1] for i, p in enumerate(parts[:-1]) if p == word and parts[i + 1].isdigit()]
