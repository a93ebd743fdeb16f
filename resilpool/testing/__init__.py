"""Chaos testing for pools and the pipelines built on them (see docs/chaos.md).

``FaultInjector`` attaches seeded faults to a :class:`~resilpool.ResilientPool`;
the pytest plugin (:mod:`resilpool.testing.plugin`, loaded by pytest through the
``pytest11`` entry point) gives tests the ``chaos`` fixture and the
``--chaos-seed``/``--chaos-rate`` options.  Names load on first use, so importing
this package (as pytest does for every run) costs nothing more.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .faults import DEFAULT_WEIGHTS, Fault, FaultInjector, FaultKind

__all__ = ["DEFAULT_WEIGHTS", "Fault", "FaultInjector", "FaultKind"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import faults

        return getattr(faults, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
