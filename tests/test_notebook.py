"""notebooks/quickstart.ipynb runs end to end in a kernel of this Python (nbclient); any cell error fails."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # kernel "python3" runs with sys.executable (jupyter_client swaps in the running interpreter for "python").
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError on the first failing cell

    outputs = "".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    )
    assert "loss per 10 steps" in outputs
    assert "model.safetensors" in outputs and "modeling_lasp.py" in outputs
