"""Experiment 6: initialisations that put every skeleton product S_e at 1.

G-SGD's weight-space step is about ``lr * g / S_e^2``, so it needs
``S_e = 1``; the paper's ``skeleton_init`` gets there by overwriting every
skeleton weight with 1, which also blows up the function (large initial
logits). No ``S_e`` depends on a non-skeleton weight, so any per-column
scaling of those, and any signs of the skeleton weights, keep every
``S_e`` at 1. Compared, each applied to Flax's default draw (LeCun normal
kernels, zero biases), as ``ecopt.skeleton_init`` options:

- ``paper``: skeleton weights 1, the rest as drawn (the default);
- ``paper, keep_sign``: skeleton weights +-1 with the drawn signs;
- ``variance``: skeleton weights 1, each column's other entries scaled so
  its squared norm is 2 (He's expectation);
- ``variance, keep_sign``: both.

G-SGD is trained from each; SGD from Flax's default init and from the
``variance, keep_sign`` init are the references. The initial loss and the
largest initial logit are reported along with the curves.

Usage: python benchmarks/experiments/exp6_init.py [--small]
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import matplotlib

matplotlib.use("Agg")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import ecopt  # noqa: E402
from benchmarks.experiments import common as C  # noqa: E402
from ecopt.zoo import linen as zl  # noqa: E402

EXPERIMENT = C.Experiment("exp6", "exp6_init")

INITS = {
    "paper": dict(mode="paper", keep_sign=False),
    "paper, keep_sign": dict(mode="paper", keep_sign=True),
    "variance": dict(mode="variance", keep_sign=False),
    "variance, keep_sign": dict(mode="variance", keep_sign=True),
}
BEST = "variance, keep_sign"

FULL = dict(
    models={
        "digits MLP 64-128-128-10": dict(dataset="digits", arch="mlp", features=[128, 128, 10]),
        "mnist1d MLP 40-64x5-10": dict(dataset="mnist1d", arch="mlp", features=[64] * 5 + [10]),
        # Conv nets are slow on CPU: the paper's init against the best, and SGD.
        "digits PlainNet [16, 32]": dict(
            dataset="digits", arch="conv", channels=[16, 32],
            runs=["G-SGD (paper)", f"G-SGD ({BEST})", "SGD (default init)"]),
    },
    seeds=list(range(5)),
    epochs={"digits": 20, "mnist1d": 10},
    grids={"G-SGD": [0.01, 0.03, 0.1, 0.3], "SGD": [0.01, 0.03, 0.1, 0.3]},
)
SMALL = dict(
    models={"digits MLP 64-16-10": dict(dataset="digits", arch="mlp", features=[16, 10])},
    seeds=[0, 1],
    epochs={"digits": 1},
    grids={"G-SGD": [0.03, 0.1], "SGD": [0.1]},
)


def runs_of():
  """Run name -> (optimizer, skeleton_init keywords or None)."""
  out = {f"G-SGD ({name})": ("G-SGD", kw) for name, kw in INITS.items()}
  out["SGD (default init)"] = ("SGD", None)
  out[f"SGD ({BEST})"] = ("SGD", INITS[BEST])
  return out


def build(m, classes):
  if m["arch"] == "mlp":
    return zl.MLP(features=tuple(m["features"]))
  return zl.PlainNet(channels=tuple(m["channels"]), num_classes=classes)


def load(m):
  return C.load_digits(image=m["arch"] == "conv") if m["dataset"] == "digits" else C.load_mnist1d()


def initial_logits(model, data, spec, init_kw, seeds):
  """Largest |logit| on the train set at init, mean over seeds."""
  out = []
  for seed in seeds:
    k_init, _ = jax.random.split(jax.random.key(seed))
    params = model.init(k_init, jnp.zeros((1,) + data.x_train.shape[1:]))["params"]
    if init_kw is not None:
      params = ecopt.skeleton_init(params, spec, **init_kw)
    logits = model.apply({"params": params}, jnp.asarray(data.x_train))
    out.append(float(jnp.max(jnp.abs(logits))))
  return float(np.mean(out))


def run(settings, out_dir: pathlib.Path, progress=True):
  from tqdm import tqdm

  path = out_dir / "results.json"
  previous = C.json.loads(path.read_text()) if path.exists() else {}
  results = previous.get("models", {}) if previous.get("settings") == settings else {}
  jobs = [(m, r) for m, spec in settings["models"].items()
          for r in spec.get("runs", list(runs_of()))]
  grids = {}
  for model_name, run_name in tqdm(jobs, desc="exp6", disable=not progress):
    done = results.get(model_name, {}).get(run_name)
    if done is not None:
      grids[model_name, run_name] = C.GridResult.from_json(done["grid"])
      continue
    m = settings["models"][model_name]
    data = load(m)
    model = build(m, data.num_classes)
    spec = model.spec()
    opt_name, init_kw = runs_of()[run_name]
    make = (lambda lr: ecopt.g_sgd(lr, spec)) if opt_name == "G-SGD" else (lambda lr: optax.sgd(lr))
    prep = None if init_kw is None else (lambda p, k, kw=init_kw: ecopt.skeleton_init(p, spec, **kw))
    res, initial = C.run_widened_grid(
        C.linen_task(model, data.x_train.shape[1:]), make, settings["grids"][opt_name],
        settings["seeds"], data, epochs=settings["epochs"][m["dataset"]], prepare=prep,
        progress=False, vectorize=m["arch"] == "mlp",
    )
    i = res.best_lr_index()
    results.setdefault(model_name, {})[run_name] = {
        "summary": res.summary(), "grid": res.to_json(), "initial_grid": initial,
        "edge": C.edge(res),
        "initial_loss": float(np.mean(res.train_loss[i, :, 0])),
        "loss_epoch_2": float(np.mean(res.train_loss[i, :, min(2, res.train_loss.shape[-1] - 1)])),
        "max_initial_logit": initial_logits(model, data, spec, init_kw, settings["seeds"]),
    }
    grids[model_name, run_name] = res
    out_dir.mkdir(parents=True, exist_ok=True)
    C.write_json(path, {"settings": settings, "models": results})
  C.write_json(path, {"settings": settings, "models": results})
  return results, grids


def plot(settings, grids, out_path):
  """Train loss and test error per epoch of every run at its chosen rate, per model."""
  colors = {name: f"C{i}" for i, name in enumerate(runs_of())}  # same run, same colour
  columns = {m: {r: grids[m, r] for r in spec.get("runs", list(runs_of()))}
             for m, spec in settings["models"].items()}
  C.plot_chosen_curves(
      columns, out_path, width=5.5, legend_size=7, dpi=100,
      style=lambda r: dict(linestyle="-" if r.startswith("G-") else ":", color=colors[r]))


def table(settings, results, png_rel) -> str:
  intro = (
      f"{len(settings['seeds'])} seeds, batch 64, epochs {settings['epochs']}; every init"
      " applied to Flax's default draw; lr per run from its grid (widened until interior)"
      " by the lowest mean final train loss; `*`: still at an edge."
  )
  header = ["model", "run", "chosen lr (grid)", "initial loss", "max initial logit",
            "loss after 2 epochs", "final train loss", "final test error"]
  rows = []
  for m, runs in results.items():
    for run_name, r in runs.items():
      x, grid = r["summary"], r["grid"]["lrs"]
      rows.append([
          m, run_name, f"{x['lr']:g}{'*' if r['edge'] else ''} ({grid[0]:g}-{grid[-1]:g})",
          f"{r['initial_loss']:.3g}", f"{r['max_initial_logit']:.3g}",
          f"{r['loss_epoch_2']:.3g}", C.summary_cell(x, "train_loss"),
          C.summary_cell(x, "test_error"),
      ])
  return C.table_report(intro, C.markdown_table(header, rows), "init", png_rel)


def main():
  def report(call: C.Invocation) -> str:
    settings = SMALL if call.small else FULL
    results, grids = run(settings, call.out)
    plot(settings, grids, call.out / "init.png")
    return table(settings, results, call.figure("init.png"))

  EXPERIMENT.main(__doc__, report)


if __name__ == "__main__":
  main()
