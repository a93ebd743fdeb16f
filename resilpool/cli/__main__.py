"""``python -m resilpool.cli``: the ``resilpool`` command."""

from __future__ import annotations

from . import main

raise SystemExit(main())
