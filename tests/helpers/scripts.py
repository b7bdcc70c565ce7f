"""The console scripts as a user runs them: the installed ones next to the running interpreter (the venv's bin/),
whether or not that folder is on PATH (`make test` runs .venv/bin/python without activating the venv)."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def console_script(name: str) -> str:
    """The path of the console script `name`: next to the interpreter, else on PATH; fails the test when neither."""
    path = BIN / name
    if path.is_file():
        return str(path)
    found = shutil.which(name)
    assert found, f"console script {name} not found next to {sys.executable} nor on PATH: pip install -e '.[dev]'"
    return found
