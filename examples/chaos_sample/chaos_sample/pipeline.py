"""Score items in worker processes and store each score in its own file.

``score`` is idempotent: running it twice writes the same file (atomically), so it is
submitted with ``retry=``; ``run_pipeline`` returns the stored scores.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from resilpool import ResilientPool


def score(item: str, out_dir: str) -> int:
    """A made-up score for ``item``, stored in ``out_dir/<item>``; returns it."""
    digest = hashlib.sha256(item.encode()).digest()
    value = int.from_bytes(digest[:4], "big") % 1000
    path = Path(out_dir) / item
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(str(value))
    os.replace(tmp, path)  # atomic: a worker killed half-way leaves no half-written score
    return value


def run_pipeline(pool: ResilientPool, items: list[str], out_dir: str, *, retry: int = 5) -> dict[str, int]:
    """Score every item on ``pool``; return ``{item: score}`` read back from ``out_dir``."""
    futures = {item: pool.submit(score, item, out_dir, retry=retry) for item in items}
    for item, fut in futures.items():
        fut.result(timeout=120)
    return {item: int((Path(out_dir) / item).read_text()) for item in items}
