"""Every notebook in notebooks/ executes top to bottom in a real Jupyter kernel (nbclient + ipykernel) against
the small real random-weight run it needs (`RUN_OF`: a conftest fixture per notebook), passed to it as
MASKLET_RUN in the kernel's environment; any cell error fails the test with that cell's traceback. The
executed copy is kept in the test's tmp dir (the committed notebooks stay without outputs)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
KERNEL = "python3"
CELL_TIMEOUT_S = 60

# notebook -> the session fixture whose run it reads (a run folder, or (dataset root, run folder)). The runs
# are session fixtures shared with other tests, so each is made once per test session.
RUN_OF = {
    "quality.ipynb": "small_run",  # any run: quality signals, flags, frames decoded from the media
    "export-and-evaluate.ipynb": "davis_run",  # a run on a DAVIS-layout dataset: its manifest names the GT
    "data-engine-phases.ipynb": "phase_runs",  # a folder with one run per preset (configs/phases/)
}


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no .ipynb"


def test_every_notebook_names_the_run_it_needs():
    assert sorted(RUN_OF) == sorted(p.name for p in NOTEBOOKS), "add the new notebook to RUN_OF"


def _client(path: Path, tmp_path: Path, monkeypatch):
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from nbclient import NotebookClient

    # The kernel is a child process: it inherits this environment. PYTHONPATH keeps it importing the same
    # `pipeline` as the tests (a worktree's copy before an installed one); MPLBACKEND keeps plots off screens.
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))

    argv0 = KernelSpecManager().get_kernel_spec(KERNEL).argv[0]
    # jupyter_client runs a spec's bare "python" as this interpreter; any other is someone's own kernel.
    assert argv0 in ("python", "python3", sys.executable), (
        f"kernel {KERNEL!r} runs {argv0}, not this interpreter ({sys.executable}); remove that kernelspec "
        "(`jupyter kernelspec list`) so the notebooks run in the environment under test")
    nb = nbformat.read(path, as_version=4)
    return nb, NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL,
                              resources={"metadata": {"path": str(tmp_path)}})


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, request, tmp_path, monkeypatch):
    import nbformat

    run = request.getfixturevalue(RUN_OF[path.name])
    run = run[1] if isinstance(run, tuple) else run  # (dataset root, run folder): the GT comes from the manifest
    monkeypatch.setenv("MASKLET_RUN", run)
    monkeypatch.delenv("MASKLET_GT", raising=False)
    nb, client = _client(path, tmp_path, monkeypatch)
    client.execute()  # raises CellExecutionError, naming the cell and its traceback, on any error
    nbformat.write(nb, tmp_path / path.name)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_without_a_run_says_to_set_masklet_run(path, tmp_path, monkeypatch):
    from nbclient.exceptions import CellExecutionError

    monkeypatch.delenv("MASKLET_RUN", raising=False)
    monkeypatch.delenv("MASKLET_GT", raising=False)
    _, client = _client(path, tmp_path, monkeypatch)
    with pytest.raises(CellExecutionError, match="Set MASKLET_RUN to a run folder"):
        client.execute()
