"""Result decoding off the manager thread: the threads that unpickle what workers answer.

Unpickling a result runs user code (``__setstate__``, ``__reduce__``'s callable) and
may take seconds (a big object, or code that blocks). On the manager thread that would
stall every other worker's results and all dispatch, so the manager only checks a
result frame's header and its task id (``TaskBook.answered``), parks the task in the
book's ``decoding`` place and hands the body over here as a :class:`DecodeJob`. A
decoder thread unpickles it and queues the job back as done; the manager takes the
done jobs on its next turn (it is woken) and settles each task in the book
(``succeeded`` or ``attempt_failed``: retry on exception works as before, the
exception arriving already decoded). Futures are still resolved by the manager
thread, so done-callbacks run there, as documented.

Threads: an elastic set of daemon threads named ``<pool>-decoder``, at most
``max_threads``. While more jobs wait than decoders are idle, another decoder is
started (up to the cap), by the manager when it hands jobs over and by a decoder
before it decodes a job with others waiting behind it; so one slow result never holds
up another's: it occupies one thread, and the jobs behind it find another. A decoder idle for ``_IDLE_EXIT_S`` exits unless it is
the last one. Results of one worker may thus be decoded out of order: the order in
which a future's siblings resolve was never promised.

Ownership:

- ``_jobs`` (to decode) and ``_done`` (decoded) are deques: the manager appends to
  ``_jobs`` and pops ``_done``; decoders pop ``_jobs`` and append to ``_done``
  (single deque operations, atomic under the GIL).
- ``_cond`` guards ``_idle``, ``_threads`` and ``_closing``; a decoder sleeps on it
  when ``_jobs`` is empty. Nobody holds it while unpickling.
- A job's ``value``/``error`` are written by the one decoder that took it, before it
  is appended to ``_done``; the manager reads them only after popping it from there.
- ``_done_pending`` is a hint: a decoder that appends to an empty-looking ``_done``
  wakes the manager; the manager clears the flag *before* it drains, so a job appended
  after the drain wakes it again (a lost update costs one extra wake-up, never a
  missed one).

Results that cannot run user code are unpickled on the manager thread at once
(:func:`loads_plain`): a body of at most ``INLINE_MAX_BYTES`` that names no global (no
class, no function: only ints, strings, bytes, lists, dicts, tuples, sets...) is decoded
in time proportional to its size, and no ``__setstate__`` or ``__reduce__`` can run, so
it cannot stall the manager. This keeps tiny results as fast as before and a result as
"in flight" for no longer than it was (a parent killed mid-run loses no more finished
results than before). Anything else, and every task error, goes to a decoder.

Every exception from unpickling, ``BaseException`` included (``SystemExit`` from a
``__reduce__``), is caught in the decoder and becomes that task's failed attempt:
``SerializationError(part="result")`` for a result, the rebuilt error for a failure
(:func:`~resilpool._core.serialization.rebuild_error` never raises). A decoder never
dies of what it decodes.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import re
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from .. import errors
from .serialization import rebuild_error
from .tasks import Task

__all__ = ["DecodeJob", "Decoder"]

log = logging.getLogger("resilpool")

_IDLE_EXIT_S: Final = 5.0  # a decoder idle this long exits (the last one stays)
INLINE_MAX_BYTES: Final = 1 << 16  # a plain result this small is unpickled on the manager thread


#: Every pickle opcode through which unpickling can look up a name or call anything:
#: GLOBAL (c), STACK_GLOBAL, INST (i), OBJ (o), REDUCE (R), BUILD (b), NEWOBJ, NEWOBJ_EX,
#: EXT1/2/4. A body in which none of these bytes occurs anywhere (as an opcode or inside
#: data) cannot run code when unpickled: only containers of ints, floats, strings and
#: bytes can come of it (PERSID/BINPERSID fail without a persistent_load). A byte found
#: inside data (a string with a "c" in it) only sends the body the slower, checked way.
_CALLS_CODE: Final = re.compile(rb"[cioRb\x81\x82\x83\x84\x92\x93]")
#: A pickle (protocol 2 to 5) of one int, float, bool or None and nothing else: the most
#: common tiny result, whose argument bytes often look like one of the opcodes above.
_SCALAR: Final = re.compile(rb"\x80[\x02-\x05](?:\x95.{8})?(?:K.|M..|J....|G.{8}|N|\x88|\x89)\.", re.DOTALL)


class _NamesAGlobal(Exception):
    """The pickle names a class or function: user code could run; a decoder's job."""


class _PlainUnpickler(pickle.Unpickler):
    """Refuses every global, so only built-in containers and scalars can be rebuilt."""

    def find_class(self, module: str, name: str) -> Any:
        raise _NamesAGlobal


def loads_plain(body: bytes) -> tuple[bool, Any]:
    """``(True, value)`` if ``body`` is small and names no global (no user code can run
    while it is unpickled: it is safe on the manager thread); ``(False, None)`` otherwise,
    including when it fails to unpickle (a decoder then reports why)."""
    if len(body) > INLINE_MAX_BYTES:
        return False, None
    if _SCALAR.fullmatch(body) is not None or _CALLS_CODE.search(body) is None:
        # No byte of any opcode that can reach code (see _CALLS_CODE): the C unpickler
        # alone, without building a restricted Unpickler and a BytesIO per result.
        try:
            return True, pickle.loads(body)
        except Exception:  # corrupt: the decoder's job (it reports why)
            return False, None
    try:
        return True, _PlainUnpickler(io.BytesIO(body)).load()
    except Exception:  # _NamesAGlobal, or corrupt: the decoder's job
        return False, None


class DecodeJob:
    """One answered attempt whose body is being unpickled (see the module docstring).

    ``ok``: the worker said the task succeeded (the body is its pickled result) rather
    than failed (the body is an ``ErrorPayload``). After decoding, ``error`` is None and
    ``value`` the result, or ``error`` is the attempt's exception.
    """

    __slots__ = ("body", "elapsed", "error", "ok", "pid", "task", "value")

    def __init__(self, task: Task, pid: int, ok: bool, elapsed: float, body: bytes) -> None:
        self.task = task
        self.pid = pid
        self.ok = ok
        self.elapsed = elapsed
        self.body: bytes | None = body
        self.value: Any = None
        self.error: BaseException | None = None

    def decode(self) -> None:
        """Unpickle the body (on a decoder thread); never raises."""
        body, self.body = self.body, None  # the bytes are freed as soon as they are read
        if body is None:  # decoded already (a job is decoded once: nothing to do)
            return
        if not self.ok:
            self.error = rebuild_error(body)
            return
        try:
            self.value = pickle.loads(body)
        except BaseException as exc:  # SystemExit from a __reduce__ too: this task's failure only
            task = self.task
            err = errors.SerializationError(
                f"the result of task {task.id} (fn={task.fn_name}) could not be unpickled in the parent: {type(exc).__name__}: {exc}",
                part="result",
                task_id=task.id,
            )
            # The unpickling's traceback as text, no live frames: they would pin this
            # thread's locals (the job, the body) for as long as the caller keeps the error.
            err.__cause__ = detached(exc)
            self.error = err


class Decoder:
    """The decoder threads of one core. ``put``/``take_done``/``close`` are the manager's."""

    def __init__(self, name: str, wake: Callable[[], None], *, max_threads: int) -> None:
        self._name = f"{name}-decoder"
        self._wake = wake
        self._max_threads = max(1, max_threads)
        self._jobs: deque[DecodeJob] = deque()
        self._done: deque[DecodeJob] = deque()
        self._done_pending = False
        self._cond = threading.Condition(threading.Lock())
        self._threads: set[threading.Thread] = set()
        self._idle = 0
        self._closing = False
        self._fds_at_exit: tuple[int, ...] = ()  # close_fds_when_done: for the last decoder to close

    # --- manager thread ------------------------------------------------------------

    def put(self, jobs: list[DecodeJob]) -> None:
        """Hand ``jobs`` over to be decoded; wakes idle decoders, starts one if too few are idle."""
        self._jobs.extend(jobs)
        with self._cond:
            self._cond.notify(len(jobs))
        self._add_decoder()

    def _add_decoder(self) -> None:
        """Start a decoder if more jobs wait than decoders are idle (up to the cap).

        Called by ``put`` and by a decoder about to decode while others wait, since its own
        job may be a slow one: no job waits behind a slow one while the cap allows a thread.
        (``_idle`` may still count a decoder already woken for an earlier job; comparing
        with every waiting job, not just the new ones, makes up for that.)
        """
        with self._cond:
            if self._closing or len(self._jobs) <= self._idle or len(self._threads) >= self._max_threads:
                return
            t = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._threads.add(t)
        t.start()

    def has_done(self) -> bool:
        return bool(self._done)

    def take_done(self) -> list[DecodeJob]:
        """The jobs decoded since the last call (the hint is cleared first: see the docstring)."""
        self._done_pending = False
        done = self._done
        out: list[DecodeJob] = []
        while done:
            out.append(done.popleft())
        return out

    @property
    def threads(self) -> int:
        """Decoder threads alive now (approximate)."""
        return len(self._threads)

    def close(self, timeout_s: float) -> bool:
        """Stop the decoders once the jobs handed over are decoded; wait at most ``timeout_s``.

        Returns False if a decoder is still busy then (a result that never finishes
        unpickling): it is a daemon thread, left to finish or die with the process.
        """
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            threads = list(self._threads)
        deadline = time.monotonic() + timeout_s
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t for t in threads if t.is_alive()]
        if alive:
            log.warning("resilpool: %d result decoder(s) still unpickling after %.1fs; left running", len(alive), timeout_s)
        return not alive

    def close_fds_when_done(self, fds: tuple[int, ...]) -> None:
        """After a :meth:`close` that returned False: close ``fds`` (the wake-up pipe a
        decoder still writes to when its job ends) once the last decoder has exited, now
        if none is left. So a core that gave up on a stuck result leaks no descriptor."""
        with self._cond:
            if self._threads:
                self._fds_at_exit = fds
                return
        _close_fds(fds)

    # --- decoder threads -----------------------------------------------------------

    def _run(self) -> None:
        me = threading.current_thread()
        jobs, done, cond = self._jobs, self._done, self._cond
        try:
            while True:
                try:
                    job = jobs.popleft()
                except IndexError:
                    with cond:
                        if jobs:
                            continue
                        if self._closing:
                            return
                        self._idle += 1
                        woken = cond.wait(_IDLE_EXIT_S)
                        self._idle -= 1
                        if not woken and not jobs and len(self._threads) > 1:
                            return  # idle too long, and another decoder remains
                    continue
                if jobs:
                    self._add_decoder()  # a spare for the jobs behind this one, in case it is slow
                job.decode()
                done.append(job)
                # No reference while idle: the job pins its task's call, result and future
                # (the stdlib frees them once the caller drops them, CPython issue 16284).
                del job
                if not self._done_pending:
                    self._done_pending = True
                    self._wake()
        finally:
            with cond:
                self._threads.discard(me)
                fds: tuple[int, ...] = ()
                if not self._threads:
                    fds, self._fds_at_exit = self._fds_at_exit, ()
            _close_fds(fds)  # after this thread's last wake-up write: no decoder writes any more


def _close_fds(fds: tuple[int, ...]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def detached(exc: BaseException) -> BaseException:
    """``exc`` without its traceback, which goes along as text in a ``RemoteTraceback`` cause."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next if exc.__traceback__ else None))
    exc.__traceback__ = None
    exc.__context__ = None
    if exc.__cause__ is None:
        exc.__cause__ = errors.RemoteTraceback(f'\n"""\n{text}"""')
    return exc


def settle_decoded(book: Any, decoder: Decoder) -> None:
    """Settle in ``book`` the tasks whose results ``decoder`` unpickled since the last call
    (on the core's owner thread: both transports call this each turn)."""
    for job in decoder.take_done():
        task = job.task
        if not book.decoded(task):
            continue  # given up on by a shutdown that stopped waiting
        if job.error is None:
            book.succeeded(task, job.value)
        else:
            book.attempt_failed(task, job.error, pid=job.pid, elapsed=job.elapsed, died=False, blamed=False)
