"""The Dask transport: the pool's tasks run as Dask tasks on a ``distributed`` cluster.

Used through :class:`resilpool.dask.DaskBackend`.  One module per process its code
runs in:

- :mod:`.client`: the core in the pool's process (the ``DaskCore`` thread and its
  asyncio loop, the Dask client, dispatch, outcomes, the limits poller);
- :mod:`.scheduler`: the :class:`~.scheduler.AttemptLedger` scheduler plugin (the
  at-most-once start record, retirement, kills through the nannies);
- :mod:`.worker`: :func:`~.worker.run_attempt`, the Dask task of one attempt, and
  what it raises.

This package's ``__init__`` holds only the names the three sides share; it imports
nothing of ``distributed``.

Data flow::

    caller threads          core thread "resilpool-dask" (an asyncio loop; owns every table)     scheduler                    Dask worker (1 thread)
    --------------          -------------------------------------------------------------       ---------                    ----------------------
    submit() ──pickle──> _submitted ──┐ call_soon_threadsafe(wake)
    shutdown(), seams ──> _commands ──┘
                                      v
                 _pending (FIFO, retries at the front), _timers (retry backoff)
                                      │ dispatch: at most cap() attempts in flight
                                      v
                 client.map(run_attempt, keys, bodies) ── update-graph ──> queue, place ──> run_attempt(key, body):
                                                                                            1. start log line (local file);
                                                                          AttemptLedger <── started (stream, not waited for)
                                                                          (plugin)      <──> or, on a rerun: claim RPC,
                                                                                             refused if it had started
                 watchers + one batched gather <── (kind, elapsed, bytes, pid) ─────────── 2. loads body, fn(*args)
                 futures resolved here (done-callbacks run on this thread)                   3. pickled result or
                                                                                                error payload
                 supervise() every interval ── resilpool_status ──> ledger: running attempts,
                   + the pool's progress      <──────────────────  worker pid, memory, CPU
                   policy.decide() per worker                      (progress kept per pool: HTTP /resilpool,
                                                                    /resilpool/progress.json on the dashboard server)
                                            ── resilpool_retire ──> closing_gracefully, restart when idle
                                            ── resilpool_kill ────> nanny SIGKILLs the worker (nanny restarts it)
                 topic "resilpool-<client id>" <── added / removed + lost attempts ── ledger hooks
                                                    (unconfirmed starts: the dead worker's start log, read by its nanny)
                 events ──> the pool's event thread ──> logging, listeners

One Dask key is one *attempt* of a task (``<fn name>-<core token>-<task id>-<attempt>``,
so the dashboard groups and names tasks by the user's function).
The start of each attempt is recorded before the task's call is unpickled (the start
acknowledgement, as the local slot is): on a key's first placement in the worker's start
log and by a message to the ledger, a scheduler plugin, without waiting; a rerun of the
same key (Dask reruns a task whose worker died) claims its start and waits, and is
refused if the key had started, so an attempt runs at most once, and a retry is always a new attempt under a new key, scheduled by this
core's retry policy and timers.  Dask's own ``retries`` stay off.

Ownership and invariants of the client side are in :mod:`.client`; the ledger's in
:class:`~.scheduler.AttemptLedger`.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "CANCEL_BUDGET_S",
    "CLAIM_OP",
    "LEDGER_NAME",
    "PROGRESS_FIELDS",
    "PROGRESS_MAX_FUNCTIONS",
    "PROGRESS_OTHER",
    "PUSH_MAX_BYTES",
    "PUSH_OP",
    "RPC_TIMEOUT_S",
    "SYNC_ANNOTATION",
    "TOPIC_PREFIX",
]

LEDGER_NAME: Final = "resilpool-ledger"  #: the scheduler plugin's name
TOPIC_PREFIX: Final = "resilpool-"  #: + client id: the topic of the ledger's worker events
RPC_TIMEOUT_S: Final = 10.0  #: every request between the sides waits at most this long
#: The ledger's ``resilpool_cancel`` answers within this (it asks every worker, and reads the
#: start logs of those that die meanwhile); its callers wait it plus ``RPC_TIMEOUT_S``.
CANCEL_BUDGET_S: Final = RPC_TIMEOUT_S
PUSH_OP: Final = "resilpool-outcome"  #: worker -> scheduler stream message: an attempt's outcome, pushed ahead
PUSH_MAX_BYTES: Final = 64 * 1024  #: outcomes up to this size are pushed; larger ones are fetched as Dask results
CLAIM_OP: Final = "resilpool-started"  #: worker -> scheduler stream message: an attempt started (not waited for)
SYNC_ANNOTATION: Final = "resilpool-checked"  #: task annotation set by the ledger: claim this start and wait for the answer
#: A pool's progress, per function name, as each poll carries it to the ledger: counts in this order.
PROGRESS_FIELDS: Final = ("submitted", "pending", "running", "completed", "failed", "cancelled")
PROGRESS_MAX_FUNCTIONS: Final = 100  #: function names per pool at most; the rest count under PROGRESS_OTHER
PROGRESS_OTHER: Final = "(other functions)"
