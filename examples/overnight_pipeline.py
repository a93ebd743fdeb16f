"""An overnight pipeline step: score the documents of a CSV export, unattended and resumable.

``score`` is the step's function; each CSV row reaches it as a ``dict``.  Real
exports are never clean, so this small one (``data/documents.csv``) holds what
goes wrong at night, and shows what ``resilpool run`` does with each:

- a row with a field missing: a malformed item, written to the errors file, the
  run goes on;
- a document whose fetch fails once (``ConnectionError``): retried (``--retry 2``);
- a document that deadlocks the parser the first time: its worker uses no CPU,
  is killed after ``--stall-timeout`` and the item is retried;
- a document the parser always rejects: failed after 3 attempts, with its
  traceback and the history of its attempts in the errors file;
- the machine reboots, or someone kills the job: rerun the same command, with
  the same ``--journal``; items done are not run again.

From this directory::

    resilpool run overnight_pipeline:score --input data/documents.csv --output scores.jsonl \\
        --journal scores.db --retry 2 --task-timeout 30 --stall-timeout 2 --max-tasks 500 \\
        --report scores-report.json
    resilpool report scores.db

The exit status says how it went (0: every item done; 1: some failed; 130/143:
interrupted, rerun to resume), so a cron line can act on it::

    0 1 * * *  cd /srv/nightly && resilpool run overnight_pipeline:score -i data/documents.csv -o scores.jsonl -j scores.db --retry 2 --report scores-report.json || notify-admin

``python examples/overnight_pipeline.py [OUTPUT_DIR]`` runs that command with its
outputs in OUTPUT_DIR (default: a new temporary directory).  The simulated
one-time failures remember that they happened in ``$PIPELINE_STATE_DIR``
(default: the output directory when run this way, else the temporary directory).
See docs/cli.md.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
import time

_POSITIVE = frozenset("good great excellent reliable fast clear robust calm stable".split())
_NEGATIVE = frozenset("bad poor slow broken unclear fragile noisy late unstable".split())
_WORD = re.compile(r"[a-zà-ÿ']+")


def _first_time(kind: str, doc_id: str) -> bool:
    """True the first time (per state directory) this document hits this problem."""
    state = os.environ.get("PIPELINE_STATE_DIR") or os.path.join(tempfile.gettempdir(), "overnight-pipeline-state")
    os.makedirs(state, exist_ok=True)
    try:
        fd = os.open(os.path.join(state, f"{kind}-{doc_id}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def _fetch(row: dict[str, str]) -> str:
    if "TRANSIENT" in row["body"] and _first_time("transient", row["id"]):
        raise ConnectionError(f"document {row['id']}: connection reset by {row['source']}")
    return row["body"]


def _parse(doc_id: str, text: str) -> list[str]:
    if "DEADLOCK" in text and _first_time("deadlock", doc_id):
        lock = threading.Lock()
        lock.acquire()
        lock.acquire()  # hangs, using no CPU: --stall-timeout kills the worker
    if "CORRUPT" in text:
        raise ValueError(f"document {doc_id}: cannot parse body: unexpected byte at offset {text.index('CORRUPT')}")
    return _WORD.findall(text.lower())


def score(row: dict[str, str]) -> dict[str, object]:
    """Fetch, parse and score one document: word count and a lexicon sentiment in [-1, 1]."""
    started = time.perf_counter()
    words = _parse(row["id"], _fetch(row))
    pos = sum(w in _POSITIVE for w in words)
    neg = sum(w in _NEGATIVE for w in words)
    return {
        "id": row["id"],
        "title": row["title"],
        "words": len(words),
        "sentiment": round((pos - neg) / max(1, pos + neg), 3),
        "seconds": round(time.perf_counter() - started, 6),
    }


def main(argv: list[str]) -> int:
    from resilpool.cli import main as resilpool

    here = os.path.dirname(os.path.abspath(__file__))
    out = os.path.abspath(argv[0]) if argv else tempfile.mkdtemp(prefix="resilpool-overnight-")
    os.makedirs(out, exist_ok=True)
    os.environ.setdefault("PIPELINE_STATE_DIR", os.path.join(out, "state"))  # workers inherit it
    print(f"outputs in {out}", flush=True)
    return resilpool([
        "run", os.path.join(here, "overnight_pipeline.py") + ":score",
        "--input", os.path.join(here, "data", "documents.csv"),
        "--output", os.path.join(out, "scores.jsonl"),
        "--journal", os.path.join(out, "scores.db"),
        "--retry", "2", "--task-timeout", "30", "--stall-timeout", "2", "--max-tasks", "500",
        "--report", os.path.join(out, "scores-report.json"),
    ])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
