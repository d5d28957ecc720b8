"""Experiment 5: depth (the paper's PlainNet claim), plain nets without skips or BN.

ReLU MLPs (``depth`` Dense layers of ``width`` units, the last the logits)
and plain conv nets (``depth - 1`` conv layers, each followed by ReLU and a
2x2 (or 2-wide) max pool, then a Dense head: ``ecopt.zoo`` PlainNet on the
8x8 digits, CNN1D on MNIST-1D), depth 4 / 8 / 16 / 32, no skip connections,
no normalisation. Weight-space optimizers (SGD, SGD with momentum 0.9,
Path-SGD, Adam) start from He initialisation (Flax's LeCun-normal kernels
times sqrt 2; LeCun's own init vanishes with depth: logits of 2e-5 at depth
32); the G-space ones (G-SGD, G-momentum, G-Adam) from ``ecopt.skeleton_init``
of the same draw, with the mode given in ``G_INIT`` (see experiment 6), and
G-SGD also from the paper's mode as a reference. SGD, momentum and Adam also
run from the G-space runs' init ("G init"), which separates what the init does
from what the optimizer does.

Every (optimizer, depth, arch, dataset) is one jit: ``lax.scan`` over an
epoch's steps, ``jax.vmap`` over learning rates x seeds (``lax.map`` for the
conv nets: a vmapped conv is a grouped conv, slow on CPU). The rate is chosen
per optimizer by the lowest mean final train loss over the seeds; a grid
whose best rate is at an edge is widened by half decades (at most three
times) and a rate still at an edge is flagged.

Usage: python benchmarks/experiments/exp5_depth.py [--small] [--only NAME ...]
"""

from __future__ import annotations

import pathlib
import sys
import time
from typing import Optional

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import ecopt  # noqa: E402
from benchmarks.experiments import common as C  # noqa: E402
from ecopt.zoo import linen as zl  # noqa: E402

EXPERIMENT = C.Experiment("exp5", "exp5_depth")

# skeleton_init keywords of the G-space runs (experiment 6's choice).
G_INIT = dict(mode="variance", keep_sign=True)

FULL = dict(
    datasets=["mnist1d", "digits"],
    depths={"mlp": [4, 8, 16, 32], "conv": [4, 8, 16, 32]},
    width={"mlp": 32, "conv": 16},
    seeds=list(range(5)),
    epochs={"mnist1d": 6, "digits": 12},
    batch_size=64,
    grids={
        "SGD": [0.003, 0.01, 0.03, 0.1, 0.3],
        "Momentum": [0.0003, 0.001, 0.003, 0.01, 0.03],
        "Path-SGD": [0.003, 0.01, 0.03, 0.1, 0.3],
        "Adam": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
        "G-SGD": [0.003, 0.01, 0.03, 0.1, 0.3],
        "G-momentum": [0.0003, 0.001, 0.003, 0.01, 0.03],
        "G-Adam": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
        "G-SGD (paper init)": [0.001, 0.003, 0.01, 0.03, 0.1],
        "SGD (G init)": [0.003, 0.01, 0.03, 0.1, 0.3],
        "Momentum (G init)": [0.0003, 0.001, 0.003, 0.01, 0.03],
        "Adam (G init)": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
    },
    optimizers={
        "mlp": ["SGD", "Momentum", "Path-SGD", "Adam", "G-SGD", "G-momentum",
                "G-Adam", "G-SGD (paper init)", "SGD (G init)", "Momentum (G init)",
                "Adam (G init)"],
        "conv": ["SGD", "Momentum", "Path-SGD", "Adam", "G-SGD", "G-momentum",
                 "G-Adam", "SGD (G init)", "Momentum (G init)", "Adam (G init)"],
    },
    g_init=G_INIT,
)
SMALL = dict(
    datasets=["digits"],
    depths={"mlp": [3], "conv": [3]},
    width={"mlp": 8, "conv": 4},
    seeds=[0, 1],
    epochs={"digits": 1},
    batch_size=64,
    grids={"SGD": [0.1], "G-SGD": [0.03, 0.1]},
    optimizers={"mlp": ["SGD", "G-SGD"], "conv": ["G-SGD"]},
    g_init=G_INIT,
)

# Pairs compared in the verdicts: G-space optimizer and its weight-space twin,
# from He init and (the "G init" controls) from the G-space runs' own init.
PAIRS = (("G-SGD", "SGD"), ("G-momentum", "Momentum"), ("G-Adam", "Adam"),
         ("G-SGD", "SGD (G init)"), ("G-momentum", "Momentum (G init)"),
         ("G-Adam", "Adam (G init)"))


def optimizers(spec, g_init):
  """name -> (lr -> transformation, (params, key) -> params)."""
  he = lambda p, k: C.he_kernels(p)
  skel = lambda p, k: ecopt.skeleton_init(C.he_kernels(p), spec, **g_init)
  paper = lambda p, k: ecopt.skeleton_init(C.he_kernels(p), spec)
  g_adam = getattr(ecopt, "g_adam", None) or (
      lambda lr, sp: ecopt.g_space(optax.adam(lr), sp))
  return {
      "SGD": (lambda lr: optax.sgd(lr), he),
      "Momentum": (lambda lr: optax.sgd(lr, momentum=0.9), he),
      "Path-SGD": (lambda lr: ecopt.path_sgd(lr, spec), he),
      "Adam": (lambda lr: optax.adam(lr), he),
      "G-SGD": (lambda lr: ecopt.g_sgd(lr, spec), skel),
      "G-momentum": (lambda lr: ecopt.g_sgd(lr, spec, momentum=0.9), skel),
      "G-Adam": (lambda lr: g_adam(lr, spec), skel),
      "G-SGD (paper init)": (lambda lr: ecopt.g_sgd(lr, spec), paper),
      "SGD (G init)": (lambda lr: optax.sgd(lr), skel),
      "Momentum (G init)": (lambda lr: optax.sgd(lr, momentum=0.9), skel),
      "Adam (G init)": (lambda lr: optax.adam(lr), skel),
  }


def load(name, arch):
  if name == "digits":
    return C.load_digits(image=arch == "conv")
  data = C.load_mnist1d()
  if arch == "conv":
    return C.Data(data.name, data.x_train[..., None], data.y_train,
                  data.x_test[..., None], data.y_test)
  return data


def build(arch, dataset, depth, width, classes):
  if arch == "mlp":
    return zl.MLP(features=(width,) * (depth - 1) + (classes,))
  channels = (width,) * (depth - 1)
  if dataset == "digits":
    return zl.PlainNet(channels=channels, num_classes=classes, pool="max")
  return zl.CNN1D(channels=channels, num_classes=classes, kernel_size=3, pool="max")


def key_of(dataset, arch, depth):
  return f"{dataset}/{arch}/{depth}"


def run(settings, out_dir: pathlib.Path, progress=True, only=None, names=None):
  """Runs every optimizer on every (dataset, arch, depth); resumable.

  Finished grids are kept in ``out_dir/results.json`` after each one, so an
  interrupted run continues where it stopped (``only`` reruns those names;
  ``names`` restricts this invocation to those optimizers).
  """
  from tqdm import tqdm

  path = out_dir / "results.json"
  previous = C.json.loads(path.read_text()) if path.exists() else {}
  # A finished grid is reused when what it was run with is unchanged: the
  # shared settings and its optimizer's own grid.
  shared = lambda s: {k: v for k, v in s.items() if k not in ("depths", "optimizers", "grids")}
  old = previous.get("settings", {})
  runs = previous.get("runs", {}) if shared(old) == shared(settings) else {}
  stale = {n for n, g in settings["grids"].items() if old.get("grids", {}).get(n) != g}
  # Shallow settings first, so an interrupted run has the cheap ones.
  jobs = sorted(
      ((d, a, depth, name)
       for d in settings["datasets"] for a in settings["depths"]
       for depth in settings["depths"][a] for name in settings["optimizers"][a]
       if names is None or name in names),
      key=lambda job: job[2],
  )
  cache = {}
  start = time.time()
  for d, a, depth, name in tqdm(jobs, desc="exp5", disable=not progress):
    key = key_of(d, a, depth)
    if name in runs.get(key, {}) and name not in stale and not (only and name in only):
      continue
    if (d, a) not in cache:
      cache[d, a] = load(d, a)
    data = cache[d, a]
    model = build(a, d, depth, settings["width"][a], data.num_classes)
    spec = model.spec()
    make, prep = optimizers(spec, settings["g_init"])[name]
    res, initial = C.run_widened_grid(
        C.linen_task(model, data.x_train.shape[1:]), make, settings["grids"][name],
        settings["seeds"], data, epochs=settings["epochs"][d],
        batch_size=settings["batch_size"], prepare=prep, progress=False,
        vectorize=a == "mlp",
    )
    runs.setdefault(key, {})[name] = {
        "summary": res.summary(), "grid": res.to_json(), "initial_grid": initial,
        "edge": C.edge(res),
    }
    runs = _save(path, settings, runs)
  payload = {"settings": settings, "runs": _save(path, settings, runs),
             "seconds_this_invocation": time.time() - start}
  return payload


def _save(path: pathlib.Path, settings, runs) -> dict:
  """Writes ``runs`` merged with what is on disk (several invocations may share it)."""
  on_disk = C.json.loads(path.read_text()).get("runs", {}) if path.exists() else {}
  merged = {k: dict(v) for k, v in on_disk.items()}
  for key, entries in runs.items():
    merged.setdefault(key, {}).update(entries)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  C.write_json(tmp, {"settings": settings, "runs": merged})
  tmp.replace(path)
  return merged


def verdict(g: dict, w: dict, key: str) -> str:
  """'wins' / 'loses' when the ±1 std bands over seeds do not overlap, else 'ties'.

  A side whose every seed diverged loses to a finite one.
  """
  gm, gs, wm, ws = (g[f"{key}_mean"], g[f"{key}_std"], w[f"{key}_mean"], w[f"{key}_std"])
  if not np.isfinite(gm) or not np.isfinite(wm):
    if np.isfinite(gm) == np.isfinite(wm):
      return "ties"
    return "wins" if np.isfinite(gm) else "loses"
  if gm + gs < wm - ws:
    return "wins"
  if gm - gs > wm + ws:
    return "loses"
  return "ties"


def verdicts(results) -> dict:
  """``{pair: {"train_loss": [...], "test_error": [...]}}`` over every setting."""
  out = {}
  for g, w in PAIRS:
    for key in ("train_loss", "test_error"):
      rows = []
      for setting, runs in results["runs"].items():
        if g in runs and w in runs:
          rows.append((setting, verdict(runs[g]["summary"], runs[w]["summary"], key)))
      out.setdefault(f"{g} vs {w}", {})[key] = rows
  return out


def plot(results, out_dir: pathlib.Path):
  """Final train loss and test error against depth, one panel per (dataset, arch)."""
  s = results["settings"]
  panels = [(d, a) for d in s["datasets"] for a in s["depths"]]
  fig, axes = plt.subplots(2, len(panels), figsize=(4.6 * len(panels), 8), squeeze=False)
  names = list(s["grids"])
  colors = {n: f"C{i}" for i, n in enumerate(names)}
  for col, (d, a) in enumerate(panels):
    depths = s["depths"][a]
    for name in s["optimizers"][a]:
      for row, key in enumerate(("train_loss", "test_error")):
        ax = axes[row, col]
        xs, mean, std, dead = [], [], [], []
        for depth in depths:
          r = results["runs"].get(key_of(d, a, depth), {}).get(name)
          if r is None:
            continue
          m, sd = r["summary"][f"{key}_mean"], r["summary"][f"{key}_std"]
          if r["summary"]["diverged_seeds"] == len(s["seeds"]) or not np.isfinite(m):
            dead.append(depth)
            continue
          xs.append(depth)
          mean.append(m)
          std.append(sd)
        control = name.endswith("(G init)")
        style = "--" if name.startswith("G-") else ":" if control else "-"
        marker = "s" if name.startswith("G-") else "^" if control else "o"
        ax.errorbar(xs, mean, yerr=std, linestyle=style, marker=marker, capsize=3,
                    color=colors[name], label=name, ms=4)
        if dead:  # every rate diverged: marked at the top of the panel
          ax.scatter(dead, [1.0] * len(dead), marker="x", color=colors[name], s=60,
                     transform=ax.get_xaxis_transform(), clip_on=False)
    axes[0, col].set_yscale("log")
    axes[0, col].set_title(f"{d}, {a}: final train loss")
    axes[1, col].set_title(f"{d}, {a}: final test error")
    for ax in axes[:, col]:
      ax.set_xscale("log", base=2)
      ax.set_xticks(depths, [str(x) for x in depths])
      ax.set_xlabel("depth (weight layers)")
      ax.grid(alpha=0.3)
  # One legend for all panels: the conv panels have optimizers the MLP ones lack.
  handles = {}
  for ax in axes.flat:
    for h, label in zip(*ax.get_legend_handles_labels()):
      handles.setdefault(label, h)
  axes[0, 0].legend(handles.values(), handles.keys(), fontsize=7)
  fig.suptitle(
      f"Plain ReLU nets without skips or BN; mean ± std over {len(s['seeds'])} seeds at each"
      " optimizer's chosen rate (x at the top: every seed diverged at every rate)"
  )
  fig.tight_layout()
  fig.savefig(out_dir / "depth.png", dpi=100)
  plt.close(fig)


def _depth_cell(entry: Optional[dict]) -> str:
  """A depth table's cell: final train loss / test error (%) at the chosen rate.

  ``entry`` is one optimizer's saved grid at one depth; None if not run (empty cell).
  """
  if entry is None:
    return ""
  x = entry["summary"]
  if not np.isfinite(x["train_loss_mean"]):
    return f"diverged (lr {x['lr']:g})"
  star = "*" if entry["edge"] else ""
  return (f"{x['train_loss_mean']:.3g} ± {x['train_loss_std']:.2g} /"
          f" {100 * x['test_error_mean']:.1f} ± {100 * x['test_error_std']:.1f}"
          f" (lr {x['lr']:g}{star})")


def table(results, png_rel: str) -> str:
  s = results["settings"]
  lines = [
      f"Width {s['width']['mlp']} (MLP) / {s['width']['conv']} channels (conv), batch"
      f" {s['batch_size']}, epochs {s['epochs']}, {len(s['seeds'])} seeds; G-space runs"
      f" from `skeleton_init(..., {', '.join(f'{k}={v!r}' for k, v in s['g_init'].items())})`"
      " of the He draw (G-SGD (paper init): the default mode). Cell: final train loss"
      " / test error (%) at the chosen lr, mean over seeds; `*` marks a chosen rate at"
      " an edge of the widened grid.",
      "",
  ]
  for d in s["datasets"]:
    for a in s["depths"]:
      depths = s["depths"][a]
      rows = [[name] + [_depth_cell(results["runs"].get(key_of(d, a, depth), {}).get(name))
                        for depth in depths]
              for name in s["optimizers"][a]]
      lines += [f"**{d}, {a}**", ""]
      lines += C.markdown_table(["optimizer"] + [f"depth {x}" for x in depths], rows)
      lines.append("")
  lines += ["Verdicts (G-space optimizer against its weight-space twin, per setting;"
            " 'wins' when the ±1 std bands over seeds do not overlap):", ""]
  cnt = lambda rows: " / ".join(str(sum(x == k for _, x in rows))
                                for k in ("wins", "ties", "loses"))
  lines += C.markdown_table(
      ["pair", "train loss: wins / ties / loses", "test error: wins / ties / loses"],
      ([pair, cnt(v["train_loss"]), cnt(v["test_error"])]
       for pair, v in verdicts(results).items()))
  edges = [(k, n, r["edge"]) for k, runs in results["runs"].items()
           for n, r in runs.items() if r["edge"]]
  lines += ["", "Rates still at a grid edge after widening: "
            + (", ".join(f"{k} {n} ({e})" for k, n, e in edges) if edges else "none") + ".",
            "", f"![depth]({png_rel})"]
  return "\n".join(lines)


def main():
  def report(call: C.Invocation) -> str:
    results = run(SMALL if call.small else FULL, call.out, only=call.args.only,
                  names=call.args.optimizers)
    plot(results, call.out)
    return table(results, call.figure("depth.png"))

  EXPERIMENT.main(__doc__, report, options={
      "--only": dict(nargs="*", help="rerun these optimizers"),
      "--optimizers": dict(nargs="*", help="run only these optimizers")})


if __name__ == "__main__":
  main()
