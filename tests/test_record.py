"""record.py: the dataclass stand-in of the wire messages, and what the forkserver imports."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

from resilpool._core import protocol as P
from resilpool._core.serialization import ErrorPayload, error_payload


def test_a_record_behaves_as_a_frozen_keyword_only_dataclass() -> None:
    msg = P.TaskSucceeded(task_id=7, elapsed_s=0.5, body=b"x")
    assert (msg.task_id, msg.elapsed_s, msg.body) == (7, 0.5, b"x")
    assert repr(msg) == "TaskSucceeded(task_id=7, elapsed_s=0.5, body=b'x')"
    assert msg == P.TaskSucceeded(task_id=7, elapsed_s=0.5, body=b"x")
    assert hash(msg) == hash(P.TaskSucceeded(task_id=7, elapsed_s=0.5, body=b"x"))
    assert msg != P.TaskFailed(task_id=7, elapsed_s=0.5, body=b"x")  # type: ignore[comparison-overlap]  # same fields, another meaning
    assert P.Retire() != P.WorkerReady() and P.Retire() == P.Retire()  # type: ignore[comparison-overlap]
    with pytest.raises(AttributeError, match="frozen"):
        msg.task_id = 8  # type: ignore[misc]
    with pytest.raises(AttributeError):
        msg.other = 1  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="missing keyword argument 'body'"):
        P.RunTask(task_id=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        P.RunTask(task_id=1, body=b"", extra=2)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        P.RunTask(1, b"")  # type: ignore[call-arg]
    match msg:
        case P.TaskSucceeded(task_id=tid, body=body):
            assert (tid, body) == (7, b"x")
        case _:
            pytest.fail("no keyword match")


def test_a_record_with_defaults_and_properties_pickles_by_value() -> None:
    payload = pickle.loads(error_payload(ValueError("v")))
    assert isinstance(payload, ErrorPayload) and payload.type_name == "builtins.ValueError"
    assert payload.problem == ""  # the default
    again = pickle.loads(pickle.dumps(payload))
    assert again == payload and type(again) is ErrorPayload
    for msg in (P.RunTask(task_id=1, body=b"b"), P.Retire(), P.InitializerFailed(body=b"e")):
        assert pickle.loads(pickle.dumps(msg)) == msg


def test_the_worker_modules_import_neither_typing_nor_dataclasses() -> None:
    """What the forkserver preloads is paid by every first pool: dataclasses alone
    (inspect, ast, dis, tokenize) was a tenth of a first result; the slot table is a
    memfd, not a RawArray (multiprocessing.heap). ctypes is preloaded on
    purpose: every worker calls prctl through it at start."""
    code = (
        "import sys, multiprocessing.forkserver, multiprocessing.popen_forkserver\n"
        "import resilpool._core.worker\n"
        "print(sorted(m for m in ('typing', 'dataclasses', 'inspect', 'ast', 'logging', 'concurrent.futures', 'multiprocessing.heap') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == "[]"
    code = "import sys, resilpool._core.worker; print('ctypes' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout.strip() == "True"


def test_the_slot_table_is_shared_with_a_child_that_maps_its_descriptor() -> None:
    import multiprocessing

    table = P.SlotTable(12)
    try:
        table.view[3] = -(2**62)
        ctx = multiprocessing.get_context("spawn")
        p = ctx.Process(target=_bump_slot, args=(table, 3, 5))
        p.start()
        p.join(60)
        assert p.exitcode == 0
        assert (table.view[3], table.view[5]) == (-(2**62) + 1, 7)  # read and written by the child
    finally:
        table.close()
    table.close()  # twice: no error
    with pytest.raises(ValueError):
        table.view[0]
    with pytest.raises(ValueError, match="closed"):
        pickle.dumps(table)


def _bump_slot(table: P.SlotTable, i: int, j: int) -> None:
    table.view[i] += 1
    table.view[j] = 7
