"""The layers of docs/architecture.md hold: `lint-imports` checks the import-linter contracts in pyproject.toml
(tools -> commands -> api | indexer -> retrieval; the retrieval library imports neither click nor Flask)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def lint_imports() -> str:
    """The lint-imports of this interpreter's environment (the venv's bin/), else the one on PATH."""
    script = Path(sys.executable).parent / "lint-imports"
    if script.is_file():
        return str(script)
    found = shutil.which("lint-imports")
    if found is None:
        pytest.fail(f"lint-imports not found next to {sys.executable} nor on PATH: pip install -e '.[dev]'")
    return found


def test_the_import_contracts_hold():
    done = subprocess.run([lint_imports(), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"lint-imports exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert "0 broken" in done.stdout, done.stdout


def test_no_test_imports_another_test_module_or_conftest():
    """Shared test code lives in tests/helpers/; a test module importing another one drags its fixtures along."""
    tests = Path(__file__).resolve().parent
    pattern = re.compile(r"^\s*(from|import)\s+(tests\.)?(test_\w+|conftest)\b", re.M)
    offenders = [f"{path.name}: {m.group(0).strip()}" for path in sorted(tests.glob("**/*.py"))
                 for m in pattern.finditer(path.read_text(encoding="utf-8"))]
    assert offenders == [], offenders
