"""Experiment 2 (paper Fig. 5 analogue): SGD, Path-SGD, G-SGD, Adam, G-Adam.

A ReLU MLP with 5 hidden layers of 64 units (with biases) on scikit-learn
digits and on MNIST-1D. SGD, Path-SGD and Adam start from Flax's default
init (LeCun normal, zero biases); G-SGD and G-Adam (``ecopt.g_space`` around
``optax.adam``) from ``ecopt.skeleton_init`` of the same draw, the paper's
initialisation. For fairness SGD is also run from the skeleton init. Each
optimizer's learning rate is chosen from its own grid by the lowest mean final
training loss over the seeds; curves are mean ± std over seeds at that rate.

Usage: python benchmarks/experiments/exp2_path_sgd.py [--small]
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import matplotlib

matplotlib.use("Agg")
import optax  # noqa: E402

import ecopt  # noqa: E402
from benchmarks.experiments import common as C  # noqa: E402
from ecopt.baselines import path_sgd  # noqa: E402
from ecopt.zoo import linen as zl  # noqa: E402

EXPERIMENT = C.Experiment("exp2", "exp2_path_sgd")

FULL = dict(
    datasets=["digits", "mnist1d"],
    hidden=[64] * 5,
    seeds=list(range(5)),
    epochs={"digits": 30, "mnist1d": 20},
    grids={
        "SGD": [0.01, 0.03, 0.1, 0.3],
        "SGD (skeleton init)": [0.01, 0.03, 0.1, 0.3],
        "Path-SGD": [0.003, 0.01, 0.03, 0.1],
        "G-SGD": [0.003, 0.01, 0.03, 0.1, 0.3],
        "Adam": [1e-4, 3e-4, 1e-3, 3e-3],
        "G-Adam": [1e-4, 3e-4, 1e-3, 3e-3],
    },
)
SMALL = dict(
    datasets=["digits"],
    hidden=[16, 16],
    seeds=[0, 1],
    epochs={"digits": 2},
    grids={"SGD": [0.1], "Path-SGD": [0.03], "G-SGD": [0.03]},
)


def optimizers(spec):
  """name -> (lr -> transformation, prepare)."""
  skel = lambda p, k: ecopt.skeleton_init(p, spec)
  return {
      "SGD": (lambda lr: optax.sgd(lr), None),
      "SGD (skeleton init)": (lambda lr: optax.sgd(lr), skel),
      "Path-SGD": (lambda lr: path_sgd(lr, spec), None),
      "G-SGD": (lambda lr: ecopt.g_sgd(lr, spec), skel),
      "Adam": (lambda lr: optax.adam(lr), None),
      "G-Adam": (lambda lr: ecopt.g_space(optax.adam(lr), spec), skel),
  }


def load(name):
  return C.load_digits() if name == "digits" else C.load_mnist1d()


def run(settings, out_dir: pathlib.Path, progress=True, prepare_extra=None, tag=""):
  """Runs every optimizer of ``settings['grids']`` on every dataset.

  ``prepare_extra(spec) -> (params, key) -> params`` is applied after each
  optimizer's own init (experiment 3 passes a random rescaling).
  """
  from tqdm import tqdm

  results = {"settings": settings, "datasets": {}}
  jobs = [(d, o) for d in settings["datasets"] for o in settings["grids"]]
  bar = tqdm(jobs, desc=f"exp{tag or 2}", disable=not progress)
  data_cache = {}
  for dataset, name in bar:
    if dataset not in data_cache:
      data_cache[dataset] = load(dataset)
    data = data_cache[dataset]
    model = zl.MLP(features=tuple(settings["hidden"]) + (data.num_classes,))
    spec = model.spec()
    task = C.linen_task(model, data.x_train.shape[1:])
    make, prep = optimizers(spec)[name]
    if prepare_extra is not None:
      extra = prepare_extra(spec)
      prep = _compose(prep, extra)
    res = C.run_grid(
        task, make, settings["grids"][name], settings["seeds"], data,
        epochs=settings["epochs"][dataset], prepare=prep,
        desc=f"{dataset} {name}", progress=progress,
    )
    results["datasets"].setdefault(dataset, {})[name] = {
        "summary": res.summary(), "grid": res.to_json(), "result": res,
    }
  out_dir.mkdir(parents=True, exist_ok=True)
  C.write_json(out_dir / "results.json", strip(results))
  return results


def _compose(first, second):
  if first is None or second is None:
    return second if first is None else first
  return lambda p, k: second(first(p, k), k)


def strip(results):
  """The JSON-able part of ``results`` (drops the GridResult objects)."""
  out = {"settings": results["settings"], "datasets": {}}
  for d, runs in results["datasets"].items():
    out["datasets"][d] = {
        n: {"summary": r["summary"], "grid": r["grid"]} for n, r in runs.items()
    }
  return out


def plot(results, out_path, title_suffix=""):
  """Train loss and test error per epoch at each optimizer's chosen rate, per dataset."""
  columns = {d: {name: r["result"] for name, r in runs.items()}
             for d, runs in results["datasets"].items()}
  C.plot_chosen_curves(
      columns, out_path, title_suffix=title_suffix,
      style=lambda name: dict(linestyle="--" if name.startswith("G-") else "-"))


def table(results, png_rel) -> str:
  s = results["settings"]
  intro = (f"{len(s['seeds'])} seeds, batch 64, hidden {s['hidden']}; epochs {s['epochs']}."
           " lr chosen per optimizer and dataset by the lowest mean final train loss.")
  return C.table_report(intro, C.chosen_rate_table("dataset", results["datasets"], s["grids"]),
                        "curves", png_rel)


def main():
  def report(call: C.Invocation) -> str:
    results = run(SMALL if call.small else FULL, call.out)
    plot(results, call.out / "curves.png")
    return table(results, call.figure("curves.png"))

  EXPERIMENT.main(__doc__, report)


if __name__ == "__main__":
  main()
