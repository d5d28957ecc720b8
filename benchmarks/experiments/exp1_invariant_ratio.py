"""Experiment 1 (paper Fig. 4 analogue): the invariant ratio H/m.

[64:h:h:10] ReLU MLPs (with biases) on scikit-learn digits for
h in {8, 16, ..., 1024}; plain SGD from Flax's default init (LeCun normal,
zero biases) against G-SGD from the paper's skeleton initialisation of the
same draw. Each optimizer's learning rate is chosen from its own grid by the
lowest mean final training loss over the seeds; final train loss and test
error (mean ± std over seeds) are reported against h and against
H/m = 2h / (number of parameters).

Usage: python benchmarks/experiments/exp1_invariant_ratio.py [--small]
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import ecopt  # noqa: E402
from benchmarks.experiments import common as C  # noqa: E402
from ecopt.zoo import linen as zl  # noqa: E402

EXPERIMENT = C.Experiment("exp1", "exp1_invariant_ratio")

FULL = dict(
    widths=[8, 16, 32, 64, 128, 256, 512, 1024],
    seeds=list(range(5)),
    epochs=5,
    sgd_lrs=[0.03, 0.1, 0.3, 1.0],
    gsgd_lrs=[0.003, 0.01, 0.03, 0.1, 0.3],
)
SMALL = dict(widths=[8, 32], seeds=[0, 1], epochs=2, sgd_lrs=[0.3], gsgd_lrs=[0.03])


def optimizers(spec, settings):
  """name -> (lr -> transformation, grid, prepare)."""
  skel = lambda p, k: ecopt.skeleton_init(p, spec)
  return {
      "SGD": (lambda lr: optax.sgd(lr), settings["sgd_lrs"], None),
      "G-SGD": (lambda lr: ecopt.g_sgd(lr, spec), settings["gsgd_lrs"], skel),
  }


def run(settings, out_dir: pathlib.Path, progress=True, resume=False) -> dict:
  """Runs every width; with ``resume``, widths already in ``partial.json``
  (written after each width, for the same settings) are not run again."""
  import json

  data = C.load_digits()
  results = {"settings": settings, "widths": {}}
  partial = out_dir / "partial.json"
  if resume and partial.exists():
    saved = json.loads(partial.read_text())
    if saved["settings"] == json.loads(json.dumps(settings)):
      results = saved
  from tqdm import tqdm

  for h in tqdm(settings["widths"], desc="exp1 widths", disable=not progress):
    if str(h) in results["widths"]:
      continue
    model = zl.MLP(features=(h, h, 10))
    spec = model.spec()
    task = C.linen_task(model, (64,))
    m = 64 * h + h + h * h + h + 10 * h + 10
    entry = {"H": 2 * h, "m": m, "ratio": 2 * h / m, "runs": {}}
    for name, (make, lrs, prep) in optimizers(spec, settings).items():
      res = C.run_grid(
          task, make, lrs, settings["seeds"], data, epochs=settings["epochs"],
          prepare=prep, desc=f"h={h} {name}", progress=progress,
      )
      entry["runs"][name] = {"summary": res.summary(), "grid": res.to_json()}
    results["widths"][str(h)] = entry
    if resume:
      C.write_json(partial, results)
  out_dir.mkdir(parents=True, exist_ok=True)
  C.write_json(out_dir / "results.json", results)
  plot(results, out_dir)
  return results


def plot(results, out_dir):
  widths = [int(h) for h in results["widths"]]
  ratios = [results["widths"][str(h)]["ratio"] for h in widths]
  fig, axes = plt.subplots(2, 2, figsize=(10, 7))
  for name, marker in (("SGD", "o"), ("G-SGD", "s")):
    s = [results["widths"][str(h)]["runs"][name]["summary"] for h in widths]
    for col, (key, label) in enumerate(
        (("train_loss", "final train loss"), ("test_error", "final test error"))
    ):
      mean = np.array([x[f"{key}_mean"] for x in s])
      std = np.array([x[f"{key}_std"] for x in s])
      for row, xs in enumerate((widths, ratios)):
        ax = axes[row, col]
        ax.errorbar(xs, mean, yerr=std, marker=marker, label=name, capsize=3)
        ax.set_xscale("log")
        ax.set_ylabel(label)
        ax.set_xlabel("hidden width h" if row == 0 else "invariant ratio H/m")
  for ax in axes.ravel():
    ax.grid(alpha=0.3)
    ax.legend()
  axes[0, 0].set_yscale("log")
  axes[1, 0].set_yscale("log")
  fig.suptitle(
      f"[64:h:h:10] on digits, {results['settings']['epochs']} epochs, mean ± std over"
      f" {len(results['settings']['seeds'])} seeds"
  )
  fig.tight_layout()
  fig.savefig(out_dir / "invariant_ratio.png", dpi=110)
  plt.close(fig)


def table(results) -> str:
  s = results["settings"]
  intro = (
      f"Grid: SGD lr in {s['sgd_lrs']}, G-SGD lr in {s['gsgd_lrs']};"
      f" {len(s['seeds'])} seeds, {s['epochs']} epochs, batch 64. SGD starts from"
      " Flax's default init, G-SGD from `ecopt.skeleton_init` of the same draw."
      " lr chosen per optimizer and width by the lowest mean final train loss."
  )
  names = ("SGD", "G-SGD")
  header = ["h", "H/m"] + [f"{n} {c}" for n in names for c in ("lr", "train loss", "test error")]
  rows = []
  for h, e in results["widths"].items():
    rows.append([h, f"{e['ratio']:.4f}"])
    for n in names:
      rows[-1] += C.summary_cells(e["runs"][n]["summary"])
  return C.table_report(intro, C.markdown_table(header, rows), "invariant ratio",
                        "results/exp1_invariant_ratio/invariant_ratio.png")


def main():
  def report(call: C.Invocation) -> str:
    return table(run(SMALL if call.small else FULL, call.out, resume=not call.small))

  EXPERIMENT.main(__doc__, report)


if __name__ == "__main__":
  main()
