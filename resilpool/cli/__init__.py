"""The command line: ``resilpool demo``, ``resilpool run`` and ``resilpool report``.

Modules (one concept each):

- ``_main``: argument parsing and ``resilpool demo``;
- ``_run``: ``resilpool run``, the runner that feeds the pool and writes the output;
- ``_journal``: the journal's schema and every SQL query (runs, items, events, meta);
- ``_inputs``: input readers and the output writer;
- ``_report``: ``resilpool report`` (a report built from the journal's rows);
- ``_view``: the live view on a terminal and plain progress lines otherwise;
- ``_task``: the call a worker runs for each item (imports nothing heavy);
- ``_demo``: the workload of ``resilpool demo``.

This package's ``__init__`` imports nothing else, so that a worker unpickling a
reference to ``resilpool.cli._task`` imports neither argparse, sqlite3 nor rich.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``resilpool`` command (see ``resilpool --help``)."""
    from ._main import main as _main

    return _main(argv)
