"""notebooks/quickstart.ipynb runs end to end in a kernel of this Python (nbclient); any cell error fails.

Its last section launches recipes/train_clm.py on 2 CPU processes with sequence parallelism and asserts, in the
notebook, that the per-step losses equal those of the unsharded one-process run within 1e-4 (fp32)."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
@pytest.mark.distributed
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
    # The SP section ran both trainings (its own asserts check the parity) and the SP run took W from the config.
    assert "SP=2 vs unsharded: max relative loss difference" in outputs
    assert "W from lasp_sequence_parallel_size in recipes/accelerate/cpu_sp2.yaml" in outputs
