"""Imports on first use that never overlap a fork of this process.

A worker forked while another thread is in the middle of importing a module inherits
that module's import lock held: a task that then imports the same module in that worker
hangs. The pool imports some modules only when first needed, from whichever thread needs
them (cloudpickle for a call sent by value, tenacity for a retry policy); under the
``fork`` start method its manager thread forks workers. Both hold :data:`FORK_LOCK`, so
no fork copies a half-done import of these. (What user code imports while a pool forks
is the user's, as with any fork-based pool.)

Owner: any thread; the lock is held only for one ``fork()`` or one import.
"""

from __future__ import annotations

import importlib
import threading
from types import ModuleType

__all__ = ["FORK_LOCK", "import_module"]

#: Held while this process forks a worker (``fork`` start method) and while a lazy import runs.
FORK_LOCK = threading.Lock()


def import_module(name: str) -> ModuleType:
    """``importlib.import_module(name)``, never while a worker is being forked.

    Raises ImportError as the import does. Callers cache the module: the lock is taken
    on every call.
    """
    with FORK_LOCK:
        return importlib.import_module(name)
