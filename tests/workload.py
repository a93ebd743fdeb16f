"""Task functions for the tests: importable by workers under every start method."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

_LEAK: list[bytearray] = []


def inc(x: int) -> int:
    return x + 1


def add(x: int, y: int = 0) -> int:
    return x + y


def identity(x: Any) -> Any:
    return x


def pid_of(_: Any = None) -> int:
    return os.getpid()


def kill_self(sig: int = signal.SIGKILL) -> None:
    os.kill(os.getpid(), sig)


def exit_now(code: int = 3) -> None:
    os._exit(code)


def raise_value_error(msg: str = "boom") -> None:
    raise ValueError(msg)


def sleep_for(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def wait_for_file(path: str, timeout: float = 30.0) -> str:
    """Block until ``path`` exists: lets a test hold a task running without sleeping in the test."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.005)
    return path


def touch_and_wait(started: str, release: str, timeout: float = 30.0) -> int:
    Path(started).touch()
    wait_for_file(release, timeout)
    return os.getpid()


def count_run(path: str, value: Any = None) -> Any:
    """Append a line to ``path`` (a side effect counted outside the pool), return ``value``."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return value


def crash_first_time(marker: str, value: Any = None) -> Any:
    """SIGKILL its own worker the first time it runs (no marker file yet), succeed afterwards."""
    with open(marker + ".runs", "a") as f:
        f.write("x")
    if not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return value


def leak(mb: int) -> int:
    """Keep ``mb`` MiB alive in the worker (a leaky task); return the worker's pid."""
    _LEAK.append(bytearray(mb * 2**20))
    return os.getpid()


def hog(mb: int, hold: float = 30.0) -> None:
    """Allocate and touch ``mb`` MiB, then hold it."""
    block = bytearray(mb * 2**20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    time.sleep(hold)


def block_on_lock(_: Any = None) -> None:
    lock = threading.Lock()
    lock.acquire()
    lock.acquire()  # deadlock: no CPU, forever


def stop_self(_: Any = None) -> None:
    os.kill(os.getpid(), signal.SIGSTOP)


def subprocess_hog(mb: int, hold: float = 30.0) -> None:
    """Start a child process that holds ``mb`` MiB; wait for it."""
    import subprocess
    import sys

    code = f"b = bytearray({mb} * 2**20)\nfor i in range(0, len(b), 4096): b[i] = 1\nimport time; time.sleep({hold})"
    subprocess.run([sys.executable, "-c", code], check=False)


def return_lock(_: Any = None) -> Any:
    return threading.Lock()


class Unpicklable:
    def __reduce__(self) -> Any:
        raise TypeError("Unpicklable refuses to be pickled")


def fail_init(msg: str = "initializer exploded") -> None:
    raise RuntimeError(msg)


def set_global(value: Any) -> None:
    global _INIT_VALUE
    _INIT_VALUE = value


_INIT_VALUE: Any = None


def get_global(_: Any = None) -> Any:
    return _INIT_VALUE


# --- retry, quarantine, breaker and rebuild tests (tests/test_retry.py) ----------------


def _count(path: str) -> int:
    """Append this worker's pid to ``path``; return how many runs it records now."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    with open(path) as f:
        return len(f.read().splitlines())


def count_and_raise(path: str, exc_name: str = "ValueError") -> None:
    """Count a run in ``path``, then raise the builtin ``exc_name`` saying which run it was."""
    import builtins

    n = _count(path)
    raise getattr(builtins, exc_name)(f"run {n} failed")


def count_and_kill(path: str, tag: Any = None) -> None:
    """Count a run in ``path``, then SIGKILL its own worker (a poison task; ``tag`` names the input)."""
    _count(path)
    os.kill(os.getpid(), signal.SIGKILL)


def count_and_wait(path: str, release: str, timeout: float = 30.0) -> int:
    """Count a run in ``path`` (a recorded line says the task started), block until ``release`` exists."""
    _count(path)
    wait_for_file(release, timeout)
    return os.getpid()


def count_and_spin(path: str, release: str, timeout: float = 30.0) -> int:
    """As count_and_wait, but busy: it uses CPU until ``release`` exists (no stall)."""
    _count(path)
    deadline = time.monotonic() + timeout
    while not os.path.exists(release):
        if time.monotonic() > deadline:
            raise TimeoutError(release)
    return os.getpid()


def hang_first_time(marker: str, value: Any = None) -> Any:
    """Hang (no result, killed by a task_timeout) the first time; return ``value`` afterwards."""
    with open(marker + ".runs", "a") as f:
        f.write("x")
    if not os.path.exists(marker):
        Path(marker).touch()
        time.sleep(60)
    return value


def crash_first_time_own_retry(marker: str, *, retry: Any) -> Any:
    """Like crash_first_time, for a function whose own parameter is called ``retry``."""
    return crash_first_time(marker, ("own retry", retry))


def count_wait_raise(path: str, release: str, timeout: float = 30.0) -> None:
    """Count a run in ``path``, block until ``release`` exists, then raise ValueError."""
    n = _count(path)
    wait_for_file(release, timeout)
    raise ValueError(f"run {n} failed")


def init_ok_once(flag: str) -> None:
    """An initializer that succeeds in the first worker only (it creates ``flag``) and fails in every later one."""
    try:
        fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        raise RuntimeError("initializer failed: not the first worker") from None
    os.close(fd)


def fail_init_once_flagged(flag: str) -> None:
    """An initializer that succeeds until ``flag`` exists, then fails (a test breaks start-up on demand)."""
    if os.path.exists(flag):
        raise RuntimeError("initializer failed: flagged")


def fail_init_when(release: str, msg: str = "initializer exploded") -> None:
    """An initializer that fails, but only once ``release`` exists (a test holds start-up open)."""
    wait_for_file(release)
    raise RuntimeError(msg)


# --- for tests/test_supervisor.py ------------------------------------------------


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def own_rss() -> int:
    """This process's resident memory in bytes."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def leak_and_report(mb: int, tag: Any = None) -> tuple[Any, int, int]:
    """Leak ``mb`` MiB; return ``(tag, pid, own RSS after the leak)``."""
    leak(mb)
    return tag, os.getpid(), own_rss()


def leak_and_wait(mb: int, started: str, release: str, timeout: float = 30.0) -> int:
    """Leak ``mb`` MiB, write the pid to ``started``, block until ``release`` exists; return the pid."""
    leak(mb)
    _write_atomic(started, str(os.getpid()))
    wait_for_file(release, timeout)
    return os.getpid()


def pid_and_start(tag: Any = None) -> tuple[Any, int, float]:
    """``(tag, pid, time.monotonic() when the task started)``: the clock is system-wide."""
    return tag, os.getpid(), time.monotonic()


def subprocess_hog_reporting(mb: int, child_pidfile: str, worker_rss_file: str, hold: float = 30.0) -> None:
    """Write the worker's own RSS, then run a child that writes its pid *before* it takes ``mb`` MiB."""
    import subprocess
    import sys

    _write_atomic(worker_rss_file, str(own_rss()))
    code = (
        "import os, sys, time\n"
        "p = sys.argv[1]\n"
        "open(p + '.tmp', 'w').write(str(os.getpid()))\n"
        "os.replace(p + '.tmp', p)\n"
        f"b = bytearray({mb} * 2**20)\n"
        "for i in range(0, len(b), 4096): b[i] = 1\n"
        f"time.sleep({hold})\n"
    )
    subprocess.run([sys.executable, "-c", code, child_pidfile], check=False)


def burn_cpu(seconds: float) -> int:
    """Keep one CPU busy for ``seconds`` of wall time; return the loop count."""
    n = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        n += 1
    return n


def burn_in_subprocess_then_here(child_s: float, own_s: float) -> int:
    """A busy task whose work is first done by a subprocess, then by the worker itself."""
    import subprocess
    import sys

    code = f"import time\nd = time.monotonic() + {child_s}\nwhile time.monotonic() < d: pass\n"
    subprocess.run([sys.executable, "-c", code], check=True)
    burn_cpu(own_s)
    return os.getpid()


# --- the serialization fault matrix (tests/test_serialization.py) ---------------------


def _raise_on_load(msg: str) -> None:
    raise ValueError(f"cannot rebuild: {msg}")


def _exit_on_load(code: int) -> None:
    os._exit(code)


class FailsToUnpickle:
    """Pickles fine; raises when unpickled (in the worker, or back in the parent)."""

    def __reduce__(self) -> Any:
        return (_raise_on_load, ("FailsToUnpickle",))


class ExitsOnUnpickle:
    """Pickles fine; kills the process that unpickles it."""

    def __reduce__(self) -> Any:
        return (_exit_on_load, (9,))


class ExitsOnPickle:
    """Kills the process that pickles it (use as a result: the worker dies while sending it)."""

    def __reduce__(self) -> Any:
        os._exit(8)


def make_fails_to_unpickle(_: Any = None) -> FailsToUnpickle:
    return FailsToUnpickle()


def make_exits_on_pickle(_: Any = None) -> ExitsOnPickle:
    return ExitsOnPickle()


class UnpicklableError(Exception):
    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.lock = threading.Lock()


def raise_unpicklable_error(msg: str = "with a lock inside") -> None:
    raise UnpicklableError(msg)


# --- for tests/test_joblib.py ------------------------------------------------------


def raise_when_file(path: str, msg: str = "boom", timeout: float = 30.0) -> None:
    """Wait until ``path`` exists (another task has started), then raise ``ValueError(msg)``."""
    wait_for_file(path, timeout)
    raise ValueError(msg)


def leak_until_flagged(mb: int, tag: Any, flag_dir: str, timeout: float = 30.0) -> tuple[Any, int]:
    """Leak ``mb`` MiB, then wait for ``flag_dir/<pid>`` (written once the test sees this worker retiring)."""
    leak(mb)
    wait_for_file(os.path.join(flag_dir, str(os.getpid())), timeout)
    return tag, os.getpid()


def env_of(name: str) -> str | None:
    return os.environ.get(name)


def nested_pids(n: int) -> tuple[int, list[int]]:
    """Run an inner joblib loop (default backend) of ``n`` calls; return ``(own pid, inner pids)``."""
    from joblib import Parallel, delayed

    return os.getpid(), Parallel(n_jobs=2)(delayed(pid_of)() for _ in range(n))


def nested_resilpool(n: int) -> tuple[int, list[int], list[str]]:
    """Run an inner loop that asks for the resilpool backend by name; return pids and warnings."""
    import warnings

    from joblib import Parallel, delayed

    import resilpool.joblib  # noqa: F401  (registers the backend in this worker)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pids = Parallel(n_jobs=2, backend="resilpool")(delayed(pid_of)() for _ in range(n))
    return os.getpid(), pids, [str(w.message) for w in caught]


# --- for tests/test_cli.py (`resilpool run`): one JSON item each ----------------------


def cli_square(item: dict[str, Any]) -> dict[str, Any]:
    """Log ``"<i> <pid>"`` to ``item["log"]`` (a run counted outside the pool), then maybe sleep,
    wait for the file ``item["gate"]`` or raise; return ``{"i": i, "square": i * i}``."""
    i = item["i"]
    if item.get("log"):
        fd = os.open(item["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{i} {os.getpid()}\n".encode())  # one write: whole lines even when killed
        finally:
            os.close(fd)
    if item.get("sleep"):
        time.sleep(item["sleep"])
    if item.get("gate"):
        wait_for_file(item["gate"], timeout=60.0)
    if item.get("fail"):
        raise ValueError(f"item {i} fails")
    return {"i": i, "square": i * i}


def cli_upper(item: Any) -> Any:
    """A text line upper-cased; a CSV row with its values upper-cased; anything else as is."""
    if isinstance(item, str):
        return item.upper()
    if isinstance(item, dict):
        return {k: str(v).upper() for k, v in item.items()}
    return item


def cli_not_json(item: Any) -> Any:
    """A result with no JSON form."""
    return object()


def kill_once_at(marker: str, x: int, at: int) -> int:
    """``x + 1``; at item ``at``, SIGKILL its own worker the first time (no marker file yet)."""
    if x == at and not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return x + 1


def inverse(x: int) -> float:
    """``1 / x``: ZeroDivisionError at 0."""
    return 1 / x
