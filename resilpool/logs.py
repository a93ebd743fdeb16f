"""Structured logs: a JSON formatter for the ``resilpool`` logger, and pool events as log records.

What it owns: one JSON object per log line, with the event fields as keys, for log
pipelines (Loki, Elasticsearch, CloudWatch, ``jq``)::

    import logging
    from resilpool.logs import JsonFormatter, log_events

    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.getLogger("resilpool").addHandler(handler)
    logging.getLogger("resilpool").setLevel(logging.INFO)

    with ResilientPool(4, limits=Limits(max_rss="2GiB")) as pool:
        log_events(pool)          # every pool event becomes a "resilpool.events" record
        ...

A line looks like::

    {"time": "2026-11-30T23:20:01.123Z", "level": "WARNING", "logger": "resilpool.events",
     "message": "worker 4242 was killed: over max_rss (memory)", "event": "WorkerExited",
     "pid": 4242, "exitcode": -9, "reason": "memory", "task_id": 17, ...}

Standard library only: no extra to install.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import logging
from collections.abc import Callable
from typing import Any, Final

from ._pool import ResilientPool
from .events import CrashLoopTripped, Event, ExitReason, TaskQuarantined, WorkerExited

__all__ = ["JsonFormatter", "log_events"]

#: Worker exits that cost a task: logged as warnings.
_FAILURES: Final = frozenset({ExitReason.CRASH, ExitReason.STARTUP, ExitReason.MEMORY, ExitReason.TIMEOUT, ExitReason.STALL})

#: Attributes every LogRecord has; anything else on a record came from ``extra=`` and is a field.
_STANDARD: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """Format each record as one JSON object: time, level, logger, message, then its fields.

    Fields are the record's ``extra=`` attributes (for pool events: ``event``, ``pid``,
    ``task_id``, ``reason``, ``exitcode``, ``attempt``, ``delay_s``, ``error``, ...; sizes
    are in bytes, durations in seconds, as their names say).  Enums are written as their
    value; a value JSON cannot hold is written as its ``str()``.  An exception is written
    as ``"exc"``, its formatted traceback.

    Args:
        static: fields added to every line (``{"service": "etl", "host": "..."}``).
    """

    def __init__(self, static: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(self.static)
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out, default=_jsonable, ensure_ascii=False)


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    return str(value)


def log_events(pool: ResilientPool, logger: logging.Logger | None = None) -> Callable[[Event], None]:
    """Log every event of ``pool`` as a record with the event's fields (on the pool's event thread).

    Failures (a worker that crashed or was killed by ``max_rss``, ``task_timeout`` or a
    stall) are WARNING, a quarantined task or a tripped breaker ERROR, the rest INFO.

    Args:
        pool: the pool whose events to log.
        logger: default ``logging.getLogger("resilpool.events")``.

    Returns:
        The listener; ``pool.remove_listener(listener)`` stops the logging.
    """
    log = logger if logger is not None else logging.getLogger("resilpool.events")

    def on_event(event: Event) -> None:
        fields = {"event": type(event).__name__, **{f.name: getattr(event, f.name) for f in dataclasses.fields(event)}}
        log.log(_level(event), "%s", _message(event), extra=fields)

    pool.add_listener(on_event)
    return on_event


def _level(event: Event) -> int:
    if isinstance(event, (CrashLoopTripped, TaskQuarantined)):
        return logging.ERROR
    if isinstance(event, WorkerExited) and event.reason in _FAILURES:
        return logging.WARNING
    return logging.INFO


def _message(event: Event) -> str:
    if isinstance(event, WorkerExited):
        return f"{event.detail} ({event.reason.value})"
    fields = ", ".join(f"{f.name}={getattr(event, f.name)!r}" for f in dataclasses.fields(event))
    return f"{type(event).__name__}({fields})"
