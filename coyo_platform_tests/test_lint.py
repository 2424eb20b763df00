"""One linter and formatter for the whole repo (ruff, configured in pyproject.toml)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUFF = str(Path(sys.executable).parent / "ruff")


def test_ruff_check():
    done = subprocess.run([RUFF, "check", "."], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_ruff_format():
    done = subprocess.run(
        [RUFF, "format", "--check", "."], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout
