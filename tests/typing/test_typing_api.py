"""mypy on the public API: good.py type-checks clean, each marked line of bad.py is an error.

mypy is in the ``test`` extra: this test fails, never skips, when it is missing.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
ERROR = re.compile(r"^(?P<path>[^:\n]+):(?P<line>\d+): error: ", re.MULTILINE)


# A cold mypy run checks resilpool and the stubs it uses: about 4 s on an idle machine,
# over 50 s on a loaded one (seen on 3.13 with the machine shared). Generous bounds.
@pytest.mark.timeout(300)
def test_mypy_accepts_the_good_calls_and_rejects_each_bad_one(tmp_path: Path) -> None:
    import mypy  # noqa: F401  (an ImportError here means the test extra is not installed)

    files = [HERE / "good.py", HERE / "bad.py"]
    r = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "pyproject.toml", "--strict", "--cache-dir", str(tmp_path), *map(str, files)],
        cwd=ROOT,  # resilpool/ of this checkout, not whatever is installed
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert r.returncode in (0, 1), r.stdout + r.stderr  # 1: type errors found; anything else: mypy failed
    found = {(Path(m["path"]).name, int(m["line"])) for m in ERROR.finditer(r.stdout)}
    bad_lines = (HERE / "bad.py").read_text().splitlines()
    expected = {("bad.py", n) for n, text in enumerate(bad_lines, 1) if "# E:" in text}
    assert len(expected) >= 5
    assert found == expected, r.stdout
