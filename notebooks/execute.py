"""Executes the notebooks in place, saving their outputs for readers.

Usage (from the repository root): ``python notebooks/execute.py [NAME ...]``

The notebooks run with their full settings on the CPU. What is saved is what a
reader should see: the outputs, numbered from 1, without the per-cell timing
and kernel metadata that would make every rerun a diff of its own.
``tests/integration/test_notebooks.py`` checks the saved outputs for noise
(standard error, warnings, progress bars, local paths) and reruns the
notebooks with tiny settings.
"""

from __future__ import annotations

import os
import pathlib
import sys

import nbclient
import nbformat

HERE = pathlib.Path(__file__).resolve().parent
NAMES = ("quickstart.ipynb", "reproduce_paper.ipynb")


def execute(path: pathlib.Path) -> None:
  nb = nbformat.read(path, as_version=4)
  nbclient.NotebookClient(
      nb, timeout=3600, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
  ).execute()
  for cell in nb.cells:
    cell.metadata.pop("execution", None)
  nb.metadata.pop("widgets", None)
  nb.metadata["language_info"] = {"name": "python"}
  nbformat.write(nb, path)


def main(names) -> None:
  os.environ.pop("ECOPT_NOTEBOOK_SMALL", None)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  for name in names or NAMES:
    print("executing", name, flush=True)
    execute(HERE / name)


if __name__ == "__main__":
  main(sys.argv[1:])
