"""Exclusive locks of the files a run writes (journal, output, errors file), naming the holder.

A run holds an exclusive ``flock`` on each file it writes, for its whole life: the
kernel releases it however the process ends (kill -9 included), so a stale lock
never outlives its run.  When a lock is taken, :func:`holder_pid` finds the
process holding it in ``/proc/locks`` (Linux), so that the refusal can name it.
"""

from __future__ import annotations

import fcntl
import os

__all__ = ["InUseError", "holder_pid", "lock_exclusive", "locked_by"]


class InUseError(Exception):
    """The file is locked by another process (``pid``, None when it cannot be told)."""

    def __init__(self, path: str, pid: int | None) -> None:
        super().__init__(path, pid)
        self.path = path
        self.pid = pid

    def __str__(self) -> str:
        by = f"pid {self.pid}" if self.pid is not None else "another process"
        return f"{self.path} is in use by another resilpool run ({by})"


def lock_exclusive(fd: int, path: str) -> None:
    """Take an exclusive ``flock`` on ``fd`` without waiting; InUseError naming the holder."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise InUseError(path, holder_pid(fd)) from None


def holder_pid(fd: int) -> int | None:
    """The pid holding a ``flock`` on the file of ``fd`` (another than ours), from ``/proc/locks``."""
    st = os.fstat(fd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        # "1: FLOCK  ADVISORY  WRITE 4242 08:01:1234 0 EOF" (a "->" marks a waiter)
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[2] != "->" and fields[5] == key:
            try:
                pid = int(fields[4])
            except ValueError:
                continue
            if pid != os.getpid():
                return pid
    return None


def locked_by(path: str) -> int | None:
    """The pid of the run holding ``path`` locked now (0 if it cannot be told), None if nobody does."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return holder_pid(fd) or 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
