"""Experiment 3: unbalanced initialisation.

The networks, data, seeds and grids of experiment 2, after a random
function-preserving node rescaling: every hidden node scaled by ``e^u``,
``u ~ U(-3, 3)`` (``ecopt.rescale(..., log_range=3)``), applied after each
optimizer's own init. SGD, Path-SGD and G-SGD are compared with their
balanced runs from experiment 2 (run that first). G-SGD and Path-SGD updates
commute with node scaling, so their curves must coincide with the balanced
ones up to float32 rounding; SGD's do not.

Usage: python benchmarks/experiments/exp3_unbalanced.py [--small]
"""

from __future__ import annotations

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402

import ecopt  # noqa: E402
from benchmarks.experiments import common as C  # noqa: E402
from benchmarks.experiments import exp2_path_sgd as exp2  # noqa: E402

EXPERIMENT = C.Experiment("exp3", "exp3_unbalanced")

OPTIMIZERS = ("SGD", "Path-SGD", "G-SGD")
LOG_RANGE = 3.0


def settings_from(exp2_settings):
  s = dict(exp2_settings)
  s["grids"] = {k: v for k, v in exp2_settings["grids"].items() if k in OPTIMIZERS}
  s["log_range"] = LOG_RANGE
  return s


def rescaler(spec):
  return lambda p, k: ecopt.rescale(p, spec, k, log_range=LOG_RANGE)


def run(balanced, out_dir, progress=True):
  """``balanced``: experiment 2's results (with GridResults or from JSON)."""
  settings = settings_from(balanced["settings"])
  unbalanced = exp2.run(settings, out_dir, progress, prepare_extra=rescaler, tag="3")
  compare = {}
  for d, runs in unbalanced["datasets"].items():
    for name, r in runs.items():
      bal = _grid(balanced["datasets"][d][name])
      unb = r["result"]
      i = bal.best_lr_index()
      rel = np.abs(unb.train_loss - bal.train_loss) / np.abs(bal.train_loss)
      finite = np.isfinite(rel).all(axis=(1, 2))
      compare.setdefault(d, {})[name] = {
          "balanced_lr": bal.lrs[i],
          "max_rel_diff_at_balanced_lr": float(np.max(rel[i])),
          "max_rel_diff_all_finite_lrs": float(np.max(rel[finite])) if finite.any() else None,
          "balanced": bal.summary(i),
          "unbalanced_same_lr": unb.summary(i),
          "unbalanced_best": unb.summary(),
      }
  payload = exp2.strip(unbalanced)
  payload["comparison"] = compare
  C.write_json(out_dir / "results.json", payload)
  return unbalanced, compare


def _grid(run):
  return run["result"] if "result" in run else C.GridResult.from_json(run["grid"])


def plot(balanced, unbalanced, out_path):
  datasets = list(unbalanced["datasets"])
  fig, axes = C.curve_panels(len(datasets))
  colors = dict(zip(OPTIMIZERS, ("tab:blue", "tab:orange", "tab:green")))
  for col, d in enumerate(datasets):
    for name in unbalanced["datasets"][d]:
      bal = _grid(balanced["datasets"][d][name])
      unb = unbalanced["datasets"][d][name]["result"]
      i = bal.best_lr_index()
      epochs = np.arange(bal.train_loss.shape[-1])
      c = colors[name]
      C.plot_seed_curves(axes[0, col], bal.train_loss[i], f"{name} balanced (lr={bal.lrs[i]:g})",
                         color=c, lw=3, alpha=0.4)
      # A diverged unbalanced run (SGD) is drawn up to its last finite loss.
      C.plot_seed_curves(axes[0, col], unb.train_loss[i], f"{name} unbalanced e^U(-3,3)",
                         color=c, ls="--")
      both = np.isfinite(unb.train_loss[i]) & np.isfinite(bal.train_loss[i])
      rel = np.abs(np.where(both, unb.train_loss[i] - bal.train_loss[i], 0.0)) / np.where(
          both, bal.train_loss[i], 1.0)
      has = both.any(0)
      gap = np.where(has, np.where(both, rel, -np.inf).max(0), np.nan)
      axes[1, col].plot(epochs[has], np.maximum(gap[has], 1e-9), color=c, marker=".",
                        label=name + ("" if has.all() else " (until it diverged)"))
    axes[0, col].set_yscale("log")
    axes[0, col].set_title(f"{d}: train loss, balanced vs unbalanced (same lr)")
    axes[1, col].set_yscale("log")
    axes[1, col].set_title(f"{d}: max over seeds |unbalanced - balanced| / balanced")
  C.save_curve_panels(fig, axes, out_path)


SGD_LOW_GRID = [1e-4, 3e-4, 1e-3, 3e-3]


def extra_checks(balanced, compare, progress=True):
  """Float64 reruns at the chosen rates, and SGD's lower grid when unbalanced.

  In float32 the rescaled copy differs from the original by rounding
  (~1e-7 relative), and training amplifies any difference over hundreds of
  steps; rerunning balanced and unbalanced copies in float64 separates that
  amplification from the optimizer's own (exact) invariance. SGD diverges on
  the unbalanced networks at every rate of experiment 2's grid, so it also
  gets a grid of smaller rates there.
  """
  import jax
  import jax.numpy as jnp

  settings = settings_from(balanced["settings"])
  out = {}
  for d in settings["datasets"]:
    data = exp2.load(d)
    model = exp2.zl.MLP(features=tuple(settings["hidden"]) + (data.num_classes,))
    spec = model.spec()
    task = C.linen_task(model, data.x_train.shape[1:])
    epochs = settings["epochs"][d]
    for name in OPTIMIZERS:
      make, prep = exp2.optimizers(spec)[name]
      lr = compare[d][name]["balanced_lr"]
      jax.config.update("jax_enable_x64", True)
      runs = {}
      for tag, extra in (("balanced", None), ("unbalanced", rescaler(spec))):
        runs[tag] = C.run_grid(
            task, make, [lr], settings["seeds"], data, epochs=epochs,
            prepare=exp2._compose(prep, extra), dtype=jnp.float64,
            desc=f"{d} {name} float64 {tag}", progress=progress)
      jax.config.update("jax_enable_x64", False)
      rel = np.abs(runs["unbalanced"].train_loss - runs["balanced"].train_loss)
      rel = rel / np.abs(runs["balanced"].train_loss)
      out.setdefault(d, {})[name] = {
          "lr": lr,
          "float64_max_rel_diff": float(np.max(rel)) if np.isfinite(rel).all() else None,
          "float64_rel_diff_per_epoch": np.max(rel, axis=(0, 1)).tolist(),
          "float64_balanced": runs["balanced"].summary(),
          "float64_unbalanced": runs["unbalanced"].summary(),
      }
    make, prep = exp2.optimizers(spec)["SGD"]
    low = C.run_grid(task, make, SGD_LOW_GRID, settings["seeds"], data, epochs=epochs,
                     prepare=exp2._compose(prep, rescaler(spec)),
                     desc=f"{d} SGD unbalanced low grid", progress=progress)
    out[d]["SGD low grid, unbalanced"] = {"summary": low.summary(), "grid": low.to_json()}
  return out


def checks_table(checks) -> str:
  lines = [
      "Float64 reruns (balanced and unbalanced, chosen rate, same seeds): max over seeds"
      " and epochs of |L_unbalanced - L_balanced| / L_balanced.",
      "",
  ]
  rows = []
  for d, runs in checks.items():
    for name in OPTIMIZERS:
      c = runs[name]
      diff = "diverged" if c["float64_max_rel_diff"] is None else f"{c['float64_max_rel_diff']:.2e}"
      losses = [C.summary_cell(c[f"float64_{k}"], "train_loss") for k in ("balanced", "unbalanced")]
      rows.append([d, name, f"{c['lr']:g}", diff, " / ".join(losses)])
  lines += C.markdown_table(
      ["dataset", "optimizer", "lr", "float64 max rel. diff",
       "float64 train loss balanced / unbalanced"], rows)
  lines += ["", f"SGD on the unbalanced networks with a lower grid {SGD_LOW_GRID}:", ""]
  lines += C.markdown_table(
      ["dataset", "chosen lr", "final train loss", "final test error"],
      ([d] + C.summary_cells(runs["SGD low grid, unbalanced"]["summary"])
       for d, runs in checks.items()))
  return "\n".join(lines)


def table(compare, png_rel) -> str:
  intro = (
      f"Every hidden node rescaled by e^u, u ~ U(-{LOG_RANGE:g}, {LOG_RANGE:g}), after"
      " each optimizer's own init; same seeds, data order and grids as experiment 2."
      " 'same lr' is the rate chosen on the balanced network; 'best' re-selects it on"
      " the unbalanced one. Relative difference: max over seeds and epochs of"
      " |L_unbalanced - L_balanced| / L_balanced of the full-train loss."
  )
  header = ["dataset", "optimizer", "lr", "balanced train loss", "unbalanced, same lr",
            "max rel. diff (same lr)", "unbalanced, best lr",
            "test error (balanced / unbalanced same lr)"]
  rows = []
  for d, runs in compare.items():
    for name, c in runs.items():
      b, u, ub = c["balanced"], c["unbalanced_same_lr"], c["unbalanced_best"]
      rows.append([
          d, name, f"{c['balanced_lr']:g}", C.summary_cell(b, "train_loss"),
          C.summary_cell(u, "train_loss"), f"{c['max_rel_diff_at_balanced_lr']:.2e}",
          f"{C.summary_cell(ub, 'train_loss')} (lr {ub['lr']:g})",
          f"{C.summary_cell(b, 'test_error')} / {C.summary_cell(u, 'test_error')}",
      ])
  return C.table_report(intro, C.markdown_table(header, rows), "unbalanced", png_rel)


def main():
  def report(call: C.Invocation) -> str:
    src = C.RESULTS_DIR / exp2.EXPERIMENT.results_name(call.small) / "results.json"
    if not src.exists():
      raise SystemExit(f"Run experiment 2 first: {src} is missing.")
    balanced = json.loads(src.read_text())
    out = call.out
    if call.args.checks_only:
      saved = json.loads((out / "results.json").read_text())
      compare = saved["comparison"]
    else:
      unbalanced, compare = run(balanced, out)
      plot(balanced, unbalanced, out / "unbalanced.png")
      saved = json.loads((out / "results.json").read_text())
    text = table(compare, call.figure("unbalanced.png"))
    if not call.small:
      checks = extra_checks(balanced, compare)
      saved["checks"] = checks
      C.write_json(out / "results.json", saved)
      text += "\n\n" + checks_table(checks)
    return text

  EXPERIMENT.main(__doc__, report, options={"--checks-only": dict(
      action="store_true",
      help="reuse this experiment's results.json; run only the float64 checks")})


if __name__ == "__main__":
  main()
