"""``resilpool run`` killed with SIGKILL again and again: only the running items run again.

The short loop (4 kills over 400 items); the long one (>= 20 kills over 2,000
items) is chaos/test_cli_kills.py.
"""

from __future__ import annotations

import random
from pathlib import Path

from cli_kills import kill_loop


def test_kill_9_again_and_again_reruns_only_running_items(tmp_path: Path) -> None:
    seed = 12  # the kill points vary with timing anyway; chaos/test_cli_kills.py draws its seed
    print(f"seed {seed}")
    fig = kill_loop(tmp_path, random.Random(seed), n=400, kills=4, workers=2)
    print(fig.line())
    assert fig.kills >= 1
    # Each kill costs at most the items its workers were running: one per worker (docs/cli.md,
    # the guarantee); a finished item's line is in the output or in its worker's transit file.
    assert fig.reruns <= fig.workers * fig.kills, fig.line()
    assert max(fig.reruns_per_kill) <= fig.workers, fig.line()
