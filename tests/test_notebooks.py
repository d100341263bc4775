"""Every notebook runs end to end (fresh kernel, cwd notebooks/) and is stored without outputs."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_the_four_research_notebooks():
  assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_scaling_study.ipynb", "03_parallel_layouts.ipynb",
                                         "04_datacenter_optimization.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
  book = nbformat.read(path, as_version=4)
  assert all(not c.get("outputs") and c.get("execution_count") is None for c in book.cells if c.cell_type == "code")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path):
  book = nbformat.read(path, as_version=4)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}   # the notebook sets its own devices
  NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute(env=env)
  images = sum("image/png" in o.get("data", {}) for c in book.cells for o in c.get("outputs", []))
  assert images >= 1, "every notebook draws at least one plot"
  errors = [o for c in book.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
  assert not errors
