"""The notebooks execute top to bottom (small settings: ECOPT_NOTEBOOK_SMALL=1).

Both notebooks run at the same time, each in its own kernel: most of their
time is XLA compilation, which is largely single-threaded. For the same
reason the kernels compile without XLA's optimisation passes
(JAX_DISABLE_MOST_OPTIMIZATIONS=1): with the tiny settings this more than
halves the run time; the committed notebooks run with the defaults.
"""

import concurrent.futures
import os
import pathlib
import re

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[2] / "notebooks"
NAMES = ("quickstart.ipynb", "reproduce_paper.ipynb")


def _execute(nb):
  client = nbclient.NotebookClient(
      nb, timeout=600, kernel_name="python3",
      resources={"metadata": {"path": str(NOTEBOOKS)}},
  )
  client.execute()
  return nb


def test_notebooks_run(monkeypatch):
  notebooks = {name: nbformat.read(NOTEBOOKS / name, as_version=4) for name in NAMES}
  for name, nb in notebooks.items():
    # Committed without outputs, so the diff stays readable.
    for cell in nb.cells:
      if cell.cell_type == "code":
        assert not cell.get("outputs"), f"{name}: commit the notebook without outputs"
  # The kernels inherit the environment: tiny settings, CPU.
  monkeypatch.setenv("ECOPT_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "cpu"))
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
  with concurrent.futures.ThreadPoolExecutor(len(NAMES)) as pool:
    done = dict(zip(NAMES, pool.map(_execute, notebooks.values())))
  for name, nb in done.items():
    errors = [
        out for cell in nb.cells if cell.cell_type == "code"
        for out in cell.get("outputs", []) if out.get("output_type") == "error"
    ]
    assert not errors, name

  # What the notebooks compute, not only that they ran.
  text = _stream_text(done["quickstart.ipynb"])
  gaps = dict(re.findall(r"^(SGD|G-SGD): max \|loss\(base run\) - loss\(rescaled run\)\| = (\S+)$", text, re.M))
  assert set(gaps) == {"SGD", "G-SGD"}, text
  # G-SGD's trajectories from a rescaled copy coincide (float32); SGD's do not.
  assert float(gaps["G-SGD"]) < 1e-4 and float(gaps["SGD"]) > 1e-2, gaps
  accuracy = float(re.search(r"test accuracy (\S+)", text).group(1))
  assert accuracy > 0.5, text
  # Each experiment of reproduce_paper shows its table and its figure.
  shown = [
      out for cell in done["reproduce_paper.ipynb"].cells if cell.cell_type == "code"
      for out in cell.get("outputs", []) if out.get("output_type") == "display_data"
  ]
  tables = [o["data"]["text/markdown"] for o in shown if "text/markdown" in o["data"]]
  images = [o for o in shown if "image/png" in o["data"]]
  assert len(tables) == 3 and all(t.count("|") > 10 for t in tables), tables
  assert len(images) == 3


def _stream_text(nb):
  return "".join(
      out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
      for out in cell.get("outputs", []) if out.get("output_type") == "stream"
  )
