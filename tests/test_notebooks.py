"""The research notebooks: each runs end to end in its small setting (papermill injects SMALL = True), and the
committed copy holds the outputs of its full setting (`make notebooks`), figures included."""
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"
# notebook: how many figures its committed outputs hold
EXECUTED = {"paper_figures.ipynb": 3, "posterior_diagnostics.ipynb": 5, "sampler_validity.ipynb": 4,
            "swapping_inference.ipynb": 5}


@pytest.mark.parametrize("name", sorted(EXECUTED))
def test_notebook_runs_in_its_small_setting(name, tmp_path, monkeypatch):
    papermill = pytest.importorskip("papermill")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = papermill.execute_notebook(str(NOTEBOOKS / name), str(tmp_path / name), parameters={"SMALL": True},
                                     cwd=str(tmp_path), kernel_name="python3", progress_bar=False)
    assert not [o for c in out.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert _figures(out) == EXECUTED[name]


@pytest.mark.parametrize("name", sorted(EXECUTED))
def test_the_committed_notebook_holds_its_full_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "a code cell was never executed"
    injected = [c for c in code if "injected-parameters" in c.metadata.get("tags", [])]  # papermill's -p cell
    assert not injected, f"committed with parameters {injected[0].source!r}, not its full setting"
    assert _figures(notebook) == EXECUTED[name]


def _figures(notebook) -> int:
    return sum("image/png" in o.get("data", {}) for c in notebook.cells for o in c.get("outputs", []))
