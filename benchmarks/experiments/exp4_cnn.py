"""Experiment 4: a small CNN (``ecopt.zoo`` PlainNet) on 8x8 digits, ± BatchNorm.

``PlainNet(channels=(16, 32))``: two 3x3 conv blocks (ReLU, 2x2 max-pool),
a channels-last flatten and a Dense head; with BN every conv is followed by
BatchNorm (train-mode batch statistics while training). Without BN the whole
network is one chain (convs read as ``(9, cin, cout)``, the head as
``(4, 32, 10)``); with BN the chains are ``(BatchNorm_0, Conv_1)`` and
``(BatchNorm_1, Dense_0)`` and ``Conv_0`` is a plain coordinate (see
``ecopt.zoo``). SGD starts from Flax's default init, G-SGD from
``ecopt.skeleton_init``; SGD is also run from the skeleton init. Learning
rates are chosen from each optimizer's grid by the lowest mean final train
loss.

Usage: python benchmarks/experiments/exp4_cnn.py [--small]
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
from ecopt.zoo import linen as zl  # noqa: E402

EXPERIMENT = C.Experiment("exp4", "exp4_cnn")

FULL = dict(
    variants=["no BN", "BN"],
    channels=[16, 32],
    seeds=list(range(5)),
    epochs=15,
    grids={
        "SGD": [0.01, 0.03, 0.1, 0.3],
        "SGD (skeleton init)": [0.01, 0.03, 0.1, 0.3],
        "G-SGD": [0.003, 0.01, 0.03, 0.1, 0.3, 1.0],
    },
)
SMALL = dict(
    variants=["no BN", "BN"], channels=[4, 8], seeds=[0, 1], epochs=2,
    grids={"SGD": [0.1], "G-SGD": [0.03]},
)


def optimizers(spec):
  skel = lambda p, k: ecopt.skeleton_init(p, spec)
  return {
      "SGD": (lambda lr: optax.sgd(lr), None),
      "SGD (skeleton init)": (lambda lr: optax.sgd(lr), skel),
      "G-SGD": (lambda lr: ecopt.g_sgd(lr, spec), skel),
  }


def run(settings, out_dir, progress=True, only=None):
  """Runs every (variant, optimizer); with ``only``, reruns just those
  optimizers and keeps the others from ``out_dir/results.json``."""
  import json

  from tqdm import tqdm

  data = C.load_digits(image=True)
  results = {"settings": settings, "variants": {}}
  names = list(settings["grids"])
  if only:
    saved = json.loads((out_dir / "results.json").read_text())
    for v, runs in saved["variants"].items():
      for n, r in runs.items():
        if n not in only:
          r["result"] = C.GridResult.from_json(r["grid"])
          results["variants"].setdefault(v, {})[n] = r
    names = [n for n in names if n in only]
  jobs = [(v, o) for v in settings["variants"] for o in names]
  for variant, name in tqdm(jobs, desc="exp4", disable=not progress):
    model = zl.PlainNet(channels=tuple(settings["channels"]), num_classes=10,
                        use_bn=variant == "BN")
    spec = model.spec()
    task = C.linen_task(model, (8, 8, 1))
    make, prep = optimizers(spec)[name]
    res = C.run_grid(task, make, settings["grids"][name], settings["seeds"], data,
                     epochs=settings["epochs"], prepare=prep,
                     desc=f"{variant} {name}", progress=progress, vectorize=False)
    results["variants"].setdefault(variant, {})[name] = {
        "summary": res.summary(), "grid": res.to_json(), "result": res}
  for v in results["variants"]:  # Keep the optimizer order of the grids.
    runs = results["variants"][v]
    results["variants"][v] = {n: runs[n] for n in settings["grids"] if n in runs}
  out_dir.mkdir(parents=True, exist_ok=True)
  C.write_json(out_dir / "results.json", {
      "settings": settings,
      "variants": {v: {n: {k: r[k] for k in ("summary", "grid")} for n, r in runs.items()}
                   for v, runs in results["variants"].items()}})
  return results


def plot(results, out_path):
  """Train loss and test error per epoch at each optimizer's chosen rate, per variant."""
  C.plot_chosen_curves({f"PlainNet {v}": {name: r["result"] for name, r in runs.items()}
                        for v, runs in results["variants"].items()}, out_path)


def table(results, png_rel):
  s = results["settings"]
  intro = (f"PlainNet channels {s['channels']}, {len(s['seeds'])} seeds, {s['epochs']} epochs,"
           " batch 64. lr chosen per optimizer and variant by the lowest mean final train loss.")
  return C.table_report(intro, C.chosen_rate_table("variant", results["variants"], s["grids"]),
                        "cnn", png_rel)


def main():
  def report(call: C.Invocation) -> str:
    results = run(SMALL if call.small else FULL, call.out, only=call.args.only)
    plot(results, call.out / "cnn.png")
    return table(results, call.figure("cnn.png"))

  EXPERIMENT.main(__doc__, report, options={
      "--only": dict(nargs="*", help="rerun only these optimizers")})


if __name__ == "__main__":
  main()
