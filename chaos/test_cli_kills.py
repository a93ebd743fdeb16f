"""``resilpool run`` under >= 20 SIGKILLs over a 2,000-item job (issue 12, item 3).

Every result must be in the output exactly once, and each kill may cost at most
one execution per worker (the items that were running).  The seed is the chaos
session's (printed in the header; ``--chaos-seed`` replays the kill points, the
timing of the machine aside).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cli_kills import kill_loop


def test_twenty_kills_over_two_thousand_items(chaos: Any, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    rng = chaos.random("cli-kills")
    fig = kill_loop(tmp_path, rng, n=2000, kills=20, workers=2, sleep=0.005)
    request.node.user_properties.append(("chaos_figure", fig.line()))
    print(fig.line())
    assert fig.kills >= 20, fig.line()
    # Per worker, a kill costs the item it was running, nothing more (docs/cli.md, the
    # guarantee): a result that had finished but not reached the output yet is in its
    # worker's transit file, and the rerun recovers it.
    assert fig.reruns <= fig.workers * fig.kills, fig.line()
    assert max(fig.reruns_per_kill) <= fig.workers, fig.line()
