"""Execute every notebooks/*.ipynb top to bottom (nbclient, as nbmake does) and check what it did.

Each notebook ends with a cell of assertions on its own results (R-free fell, the weight scan has
its minimum inside the range, jax.grad agrees with finite differences, the register shift is
flagged, ...), so a notebook that runs but shows nonsense fails here.

The kernel is the interpreter running pytest: a kernelspec pointing at ``sys.executable`` is
written to a temporary folder, so the test does not depend on any kernel installed for the user
(a fresh CI venv has none, and a user-level "python3" kernel may belong to another Python).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from conftest import DATA, XRAY

nbformat = pytest.importorskip("nbformat", reason="notebook tests need nbmake/nbclient: pip install -e '.[test]'")
nbclient = pytest.importorskip("nbclient", reason="notebook tests need nbmake/nbclient: pip install -e '.[test]'")
pytest.importorskip("ipykernel", reason="notebook tests need ipykernel: pip install -e '.[test]'")
pytest.importorskip("matplotlib", reason="notebooks plot with matplotlib: pip install -e '.[test]'")

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
# Whole notebooks take 43-72 s each on 2 lightly loaded cores (01 54 s, 02 53 s, 03 43 s, 04 72 s;
# 2x on a loaded machine). Seconds per cell: generous so that a slow CI machine does not fail, small
# enough that a hung kernel does not stall the suite.
CELL_TIMEOUT_S = 600
KERNEL_NAME = "jaxrefine-test-python"
DATA_MARKER = "find_shared_data()"  # notebooks that read the shared data call this
DATA_NEEDED = XRAY / "5kzb"


def _kernel_manager(tmp_path):
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = tmp_path / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "jaxrefine test (this interpreter)", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    if DATA_MARKER in source and not DATA_NEEDED.is_dir():
        pytest.skip(f"{path.name} needs the shared data ({DATA_NEEDED} not found; set JAXREFINE_DATA)")
    if DATA_NEEDED.is_dir():
        monkeypatch.setenv("JAXREFINE_DATA", str(DATA.resolve()))  # the kernel inherits the environment; its cwd is notebooks/
    km = _kernel_manager(tmp_path)
    client = nbclient.NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    t0 = time.perf_counter()
    try:
        client.execute()  # raises CellExecutionError on the first cell that raises
    finally:  # nbclient leaves a kernel it did not create running
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    wall = time.perf_counter() - t0
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "a code cell did not run"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    images = [o for c in code for o in c.outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert images, f"{path.name} shows no plot"
    assert "assert " in code[-1].source, f"{path.name}: the last cell must check the notebook's results"
    print(f"{path.name}: {wall:.0f} s")
