"""The notebook lab in examples/: kept without outputs in git, and executed end to end (slow) in a fresh folder."""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.ipynb"))
CELL_TIMEOUT_S = 600


def test_there_is_a_notebook_lab():
    assert any(p.name == "transfer_learning_lab.ipynb" for p in NOTEBOOKS), NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_kept_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, (f"{path.name}: cells {dirty} hold outputs or execution counts; clear them before committing "
                       "(Jupyter's Clear All Outputs, or jupyter nbconvert --clear-output --inplace)")


def this_python_kernel():  # noqa: ANN201 - jupyter_client.KernelManager
    """A kernel manager that starts ipykernel with this interpreter, whatever kernelspecs are installed elsewhere."""
    from jupyter_client.kernelspec import KernelSpec
    from jupyter_client.manager import KernelManager

    class ThisPython(KernelManager):
        @property
        def kernel_spec(self) -> KernelSpec:
            return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                              display_name=f"Python ({sys.executable})", language="python")

    return ThisPython()


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_without_errors(path, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("LAB_WEIGHTS", "random")   # no download attempt: tests need no network
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, km=this_python_kernel(), timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(tmp_path)}})   # the lab writes into its working folder
    client.execute()   # raises CellExecutionError, with the cell and its traceback, at the first failing cell
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
    assert not errors, errors
    assert (tmp_path / "index-a").is_dir() and (tmp_path / "colours-b").is_dir() and (tmp_path / "tuned.pt").is_file()
    shown = "".join(o.get("data", {}).get("text/html", "") for cell in nb.cells if cell.cell_type == "code"
                    for o in cell.outputs if o.output_type in ("execute_result", "display_data"))
    assert 'src="data:image/jpeg;base64,' in shown and "B &minus; A" in shown
