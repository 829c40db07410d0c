"""The notebooks run as committed: executed headless (nbclient, CPU), every cell without error, and
every cell tagged "figure" shows an image. The committed notebooks carry no outputs; after running
one in Jupyter, strip it with `python tests/test_notebooks.py --strip`.
"""

import json
import sys
from pathlib import Path

import pytest

# The test extra (`pip install -e ".[test]"`, as CI does) brings nbformat and nbclient; a GPU machine
# running only `pytest -m cuda` may lack them, and a collection error would stop the whole session.
nbformat = pytest.importorskip("nbformat", reason='needs the test extra: pip install -e ".[test]"')

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ("01_quickstart.ipynb", "02_subspace.ipynb", "03_methods.ipynb")


def _execute(name: str, cwd: Path) -> nbformat.NotebookNode:
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    # No kernel directories: ipykernel's own python3 spec, i.e. this interpreter, whatever kernels the
    # machine has installed (a user's "python3" kernel may point at another environment).
    km = KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))
    NotebookClient(nb, km=km, timeout=600, resources={"metadata": {"path": str(cwd)}}).execute()
    return nb  # nbclient raised CellExecutionError if a cell failed


def _images(cell: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {}) for out in cell.get("outputs", []))


def _text(nb: nbformat.NotebookNode) -> str:
    return "".join(out.get("text", "") for cell in nb.cells for out in cell.get("outputs", []))


def _check_figures(nb: nbformat.NotebookNode) -> None:
    tagged = [c for c in nb.cells if "figure" in c.metadata.get("tags", [])]
    assert tagged, "no cell is tagged 'figure'"
    for cell in tagged:
        assert _images(cell) >= 1, f"cell {cell.id} shows no image:\n{cell.source[:300]}"


def _stripped(nb: nbformat.NotebookNode) -> bool:
    return all(not c.outputs and c.execution_count is None for c in nb.cells if c.cell_type == "code")


def test_committed_notebooks_have_no_outputs():
    found = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert set(NAMES) <= set(found), found
    for name in found:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        assert _stripped(nb), f"{name} has outputs: run `python tests/test_notebooks.py --strip`"


@pytest.mark.parametrize("name", ["01_quickstart.ipynb", "02_subspace.ipynb"])
def test_notebook_runs_and_draws(name, tmp_path, monkeypatch):
    cwd, scratch = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))  # the notebooks' tempfile.mkdtemp() land here
    nb = _execute(name, cwd)
    _check_figures(nb)
    assert not any(cwd.iterdir()), f"{name} wrote into its working directory: {list(cwd.iterdir())}"


def test_methods_notebook_as_committed():
    # From the notebooks folder, as a reader runs it: whatever benchmarks/results/ holds.
    saved = [*NOTEBOOKS.parent.glob("benchmarks/results/methods*.json"),
             *NOTEBOOKS.parent.glob("benchmarks/results/methods*/results.json")]
    nb = _execute("03_methods.ipynb", NOTEBOOKS)
    if saved:
        _check_figures(nb)
    else:
        assert "No saved methods comparison" in _text(nb)
        assert not any(_images(c) for c in nb.cells)


def test_methods_notebook_without_results(tmp_path):
    nb = _execute("03_methods.ipynb", tmp_path)
    assert "No saved methods comparison" in _text(nb)
    assert not any(_images(c) for c in nb.cells)


# Rows as benchmarks/methods.py writes them to results.json.
_ROWS = [
    {"method": "full", "notes": "torch AdamW", "steps": 40, "peak_mib": 2713.6, "memory_kind": "cuda",
     "states_mib": 1040.5, "tokens_per_s": 92411.0, "train_loss": 5.1, "val_loss": 5.2, "val_ppl": 181.3,
     "svds": 0},
    {"method": "qgalore", "notes": "qgl", "steps": 40, "peak_mib": 2539.5, "memory_kind": "cuda",
     "states_mib": 180.25, "tokens_per_s": 35859.0, "train_loss": 4.9, "val_loss": None, "val_ppl": None,
     "svds": 56},
    {"method": "q-galore-torch", "notes": "public package",
     "error": "not installed (pip install q-galore-torch==1.0)"},
]


@pytest.mark.parametrize("layout", ["folder with run logs", "json only"])
def test_methods_notebook_plots_saved_results(tmp_path, layout):
    results = tmp_path / "benchmarks" / "results"
    if layout == "json only":
        results.mkdir(parents=True)
        (results / "methods_h100_2026-01-01.json").write_text(json.dumps(_ROWS))
    else:
        folder = results / "methods_h100_2026-01-01"
        for i, row in enumerate(_ROWS[:2]):
            log = folder / "runs" / "qgl" / row["method"] / "metrics.csv"
            log.parent.mkdir(parents=True)
            losses = "".join(f"0,{step},{6 - step / 10 - i / 5}\n" for step in range(40))
            log.write_text("epoch,step,train/loss\n" + losses)
        (folder / "results.json").write_text(json.dumps(_ROWS))
    nb = _execute("03_methods.ipynb", tmp_path)
    _check_figures(nb)
    text = _text(nb)
    assert "2 of 3 methods ran" in text and "did not run: not installed" in text


def _strip(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("execution", None)
    nbformat.write(nb, path)


if __name__ == "__main__":
    if sys.argv[1:] != ["--strip"]:
        sys.exit(f"usage: python {sys.argv[0]} --strip   (clears the outputs of notebooks/*.ipynb)")
    for p in sorted(NOTEBOOKS.glob("*.ipynb")):
        _strip(p)
        print("stripped", p)
