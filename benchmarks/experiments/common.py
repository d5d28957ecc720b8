"""Shared machinery of the paper experiments: data, grid training, reporting.

Every run of a learning-rate grid x seeds is one ``jax.vmap`` over runs inside
one jitted epoch function (``lax.scan`` over minibatches), so a whole grid
costs one compilation. The Python loop over epochs drives a tqdm progress bar
and evaluates full-train loss and test error after each epoch.

Import as ``benchmarks.experiments.common`` with the repository root on
``sys.path`` (the scripts and notebooks do this themselves).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = pathlib.Path(__file__).resolve().parents[2]
RESULTS_DIR = ROOT / "benchmarks" / "results"
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"


def small_mode() -> bool:
  """True under ``ECOPT_NOTEBOOK_SMALL=1`` (tiny settings for CI)."""
  return os.environ.get("ECOPT_NOTEBOOK_SMALL", "0") not in ("", "0")


# ------------------------------------------------------------------ data ---


@dataclasses.dataclass(frozen=True)
class Data:
  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray

  @property
  def num_classes(self) -> int:
    return int(self.y_train.max()) + 1


def load_digits(image: bool = False, test_size: float = 0.3) -> Data:
  """scikit-learn's 8x8 digits (shipped with the package), fixed split.

  Pixels are scaled to [0, 1] and standardised per feature with the train
  statistics. ``image`` returns NHWC ``(N, 8, 8, 1)`` arrays.
  """
  from sklearn.datasets import load_digits as _load
  from sklearn.model_selection import train_test_split

  x, y = _load(return_X_y=True)
  x = x.astype(np.float32) / 16.0
  x_tr, x_te, y_tr, y_te = train_test_split(
      x, y, test_size=test_size, random_state=0, stratify=y
  )
  mean, std = x_tr.mean(0), x_tr.std(0) + 0.1
  x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
  if image:
    x_tr, x_te = x_tr.reshape(-1, 8, 8, 1), x_te.reshape(-1, 8, 8, 1)
  return Data("digits", x_tr, y_tr.astype(np.int32), x_te, y_te.astype(np.int32))


def load_mnist1d() -> Data:
  """MNIST-1D (Greydanus 2020), generated locally by the ``mnist1d`` package.

  The default dataset arguments (seed 42): 4000 train / 1000 test sequences
  of length 40, standardised with the train statistics.
  """
  from mnist1d.data import get_dataset_args, make_dataset

  d = make_dataset(get_dataset_args())
  x_tr = np.asarray(d["x"], np.float32)
  x_te = np.asarray(d["x_test"], np.float32)
  mean, std = x_tr.mean(), x_tr.std()
  return Data(
      "mnist1d",
      (x_tr - mean) / std,
      np.asarray(d["y"], np.int32),
      (x_te - mean) / std,
      np.asarray(d["y_test"], np.int32),
  )


# ------------------------------------------------------------ training ---


@dataclasses.dataclass(frozen=True)
class Task:
  """How to build and run one model.

  ``init(key) -> (params, model_state)``;
  ``train_logits(params, model_state, x) -> (logits, model_state)``;
  ``eval_logits(params, model_state, x) -> logits``.
  """

  init: Callable[[jax.Array], tuple[Any, Any]]
  train_logits: Callable[[Any, Any, jax.Array], tuple[jax.Array, Any]]
  eval_logits: Callable[[Any, Any, jax.Array], jax.Array]


def linen_task(model, input_shape: Sequence[int]) -> Task:
  """A Task for a ``flax.linen`` model; ``batch_stats`` if it has BatchNorm."""

  def init(key):
    variables = model.init(key, jnp.zeros((1,) + tuple(input_shape)))
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    return params, state

  def train_logits(params, state, x):
    if state:
      logits, new = model.apply(
          {"params": params, **state}, x, train=True, mutable=list(state)
      )
      return logits, dict(new)
    return model.apply({"params": params}, x, train=True), state

  def eval_logits(params, state, x):
    return model.apply({"params": params, **state}, x, train=False)

  return Task(init, train_logits, eval_logits)


@dataclasses.dataclass
class GridResult:
  """Curves of a grid: arrays shaped ``(num_lrs, num_seeds, epochs + 1)``."""

  lrs: list[float]
  seeds: list[int]
  train_loss: np.ndarray
  test_error: np.ndarray
  train_error: np.ndarray
  seconds: float

  def final_train_loss(self) -> np.ndarray:
    return self.train_loss[:, :, -1]

  def best_lr_index(self) -> int:
    """The grid point with the lowest mean final train loss (NaN = inf)."""
    final = np.where(np.isfinite(self.final_train_loss()), self.final_train_loss(), np.inf)
    return int(np.argmin(final.mean(axis=1)))

  def summary(self, index: Optional[int] = None) -> dict:
    i = self.best_lr_index() if index is None else index
    loss, err = self.train_loss[i, :, -1], self.test_error[i, :, -1]
    return {
        "lr": self.lrs[i],
        "train_loss_mean": float(np.mean(loss)),
        "train_loss_std": float(np.std(loss)),
        "test_error_mean": float(np.mean(err)),
        "test_error_std": float(np.std(err)),
        "diverged_seeds": int(np.sum(~np.isfinite(loss))),
    }

  @classmethod
  def from_json(cls, d: dict) -> "GridResult":
    arr = lambda k: np.asarray(d[k], np.float64)
    return cls(list(d["lrs"]), list(d["seeds"]), arr("train_loss"),
               arr("test_error"), arr("train_error"), float(d["seconds"]))

  def to_json(self) -> dict:
    def clean(a):
      return np.where(np.isfinite(a), a, np.nan).tolist()

    return {
        "lrs": self.lrs,
        "seeds": self.seeds,
        "seconds": self.seconds,
        "best_lr": self.lrs[self.best_lr_index()],
        "train_loss": clean(self.train_loss),
        "test_error": clean(self.test_error),
        "train_error": clean(self.train_error),
    }


def merge_grids(a: GridResult, b: GridResult) -> GridResult:
  """One grid holding the learning rates of both (same seeds), sorted by lr."""
  if a.seeds != b.seeds:
    raise ValueError(f"merge_grids: seeds differ ({a.seeds} vs {b.seeds}).")
  lrs = a.lrs + b.lrs
  order = np.argsort(lrs)
  cat = lambda x, y: np.concatenate([x, y])[order]
  return GridResult(
      [lrs[i] for i in order], a.seeds, cat(a.train_loss, b.train_loss),
      cat(a.test_error, b.test_error), cat(a.train_error, b.train_error),
      a.seconds + b.seconds,
  )


def half_decade(lr: float, up: bool) -> float:
  """The next rate of the 1-3-10 sequence above (or below) ``lr``."""
  exponent = math.floor(math.log10(lr) + 1e-9)
  mantissa = lr / 10**exponent
  ladder = [1.0, 3.0, 10.0]
  if up:
    nxt = next(m for m in ladder if m > mantissa * (1 + 1e-6))
  else:
    nxt = next(m for m in reversed([0.3] + ladder) if m < mantissa * (1 - 1e-6))
  return float(f"{nxt * 10**exponent:.3g}")


def edge(res: GridResult) -> Optional[str]:
  """'low' or 'high' when the chosen rate is the grid's smallest or largest."""
  i = res.best_lr_index()
  if i == 0:
    return "low"
  if i == len(res.lrs) - 1:
    return "high"
  return None


def run_widened_grid(
    task: Task,
    make_opt: Callable[[jax.Array], optax.GradientTransformation],
    lrs: Sequence[float],
    seeds: Sequence[int],
    data: Data,
    *,
    max_extensions: int = 2,
    **kwargs,
) -> tuple[GridResult, list[float]]:
  """:func:`run_grid`, widened by half decades until the chosen rate is interior.

  While the best rate (lowest mean final train loss) is at an edge of the
  grid, as many further rates as the grid has are run beyond that edge, in
  half-decade steps, with the same compiled runner, and merged, at most
  ``max_extensions`` times; a rate still at an edge afterwards is reported
  by :func:`edge`.

  Returns:
    The merged grid and the initial grid (so reports can show both).
  """
  initial = sorted(map(float, lrs))
  runner = GridRunner(task, make_opt, len(initial), seeds, data, **kwargs)
  res = runner(initial)
  for _ in range(max_extensions):
    side = edge(res)
    if side is None:
      break
    lr, more = res.lrs[-1] if side == "high" else res.lrs[0], []
    for _ in initial:
      lr = half_decade(lr, side == "high")
      more.append(lr)
    res = merge_grids(res, runner(sorted(more)))
  return res, initial


def he_kernels(params):
  """Flax's default LeCun-normal kernels times sqrt(2): He initialisation.

  Biases (zero) and 1-D parameters are left as they are.
  """
  return jax.tree.map(lambda a: a * np.sqrt(2.0).astype(a.dtype) if a.ndim >= 2 else a, params)


def _xent(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def run_grid(
    task: Task,
    make_opt: Callable[[jax.Array], optax.GradientTransformation],
    lrs: Sequence[float],
    seeds: Sequence[int],
    data: Data,
    **kwargs,
) -> GridResult:
  """Trains ``len(lrs) * len(seeds)`` runs in lockstep (one vmap, one jit).

  Args:
    task: the model.
    make_opt: ``lr -> optax transformation``; ``lr`` is a traced scalar.
    lrs: the learning-rate grid.
    seeds: init/shuffle seeds; every learning rate sees the same seeds.
    data: the dataset.
    **kwargs: see :class:`GridRunner` (``epochs`` is required).

  Returns:
    A GridResult; entry ``[..., 0]`` is before training.
  """
  return GridRunner(task, make_opt, len(lrs), seeds, data, **kwargs)(lrs)


class GridRunner:
  """Compiled training of ``num_lrs`` learning rates x ``seeds`` in lockstep.

  The rates are traced, so one runner trains any grid of ``num_lrs`` rates
  without compiling again (grid widening reuses it).

  Args:
    task: the model.
    make_opt: ``lr -> optax transformation``; ``lr`` is a traced scalar.
    num_lrs: how many rates each call trains.
    seeds: init/shuffle seeds; every learning rate sees the same seeds.
    data: the dataset.
    epochs: passes over the training set (the last partial batch is dropped).
    batch_size: minibatch size.
    prepare: optional ``(params, key) -> params`` applied after init (e.g.
      ``ecopt.skeleton_init`` or a random rescaling).
    dtype: parameter and data dtype.
    desc: progress bar label.
    vectorize: ``jax.vmap`` over runs (default); False runs them one after
      the other with ``jax.lax.map`` inside the same jit, which is much
      faster for convolutions on CPU (a vmapped conv becomes a grouped conv).
  """

  def __init__(
      self,
      task: Task,
      make_opt: Callable[[jax.Array], optax.GradientTransformation],
      num_lrs: int,
      seeds: Sequence[int],
      data: Data,
      *,
      epochs: int,
      batch_size: int = 64,
      prepare: Optional[Callable[[Any, jax.Array], Any]] = None,
      dtype: Any = jnp.float32,
      desc: str = "",
      progress: bool = True,
      vectorize: bool = True,
  ):
    self.seeds = list(map(int, seeds))
    self.num_lrs, self.epochs, self.dtype = int(num_lrs), int(epochs), dtype
    self.desc, self.progress = desc, progress
    x_tr = jnp.asarray(data.x_train, dtype)
    y_tr = jnp.asarray(data.y_train)
    x_te = jnp.asarray(data.x_test, dtype)
    y_te = jnp.asarray(data.y_test)
    n = x_tr.shape[0]
    steps = n // batch_size

    def evaluate_one(carry):
      params, state, _ = carry
      logits = task.eval_logits(params, state, x_tr)
      loss = _xent(logits, y_tr)
      train_err = jnp.mean(jnp.argmax(logits, -1) != y_tr)
      test_err = jnp.mean(jnp.argmax(task.eval_logits(params, state, x_te), -1) != y_te)
      return loss, train_err, test_err

    def init_one(seed, lr):
      key = jax.random.key(seed)
      k_init, k_prep = jax.random.split(key)
      params, state = task.init(k_init)
      params = jax.tree.map(lambda a: a.astype(dtype), params)
      if prepare is not None:
        params = prepare(params, k_prep)
      carry = (params, state, make_opt(lr).init(params))
      return carry, evaluate_one(carry)

    def loss_fn(params, state, x, y):
      logits, new_state = task.train_logits(params, state, x)
      return _xent(logits, y), new_state

    def epoch_one(carry, lr, seed, epoch):
      opt = make_opt(lr)
      key = jax.random.fold_in(jax.random.key(seed + 7919), epoch)
      perm = jax.random.permutation(key, n)[: steps * batch_size]
      perm = perm.reshape(steps, batch_size)

      def step(c, idx):
        params, state, opt_state = c
        (_, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, state, x_tr[idx], y_tr[idx]
        )
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), state, opt_state), None

      carry, _ = jax.lax.scan(step, carry, perm)
      return carry, evaluate_one(carry)

    # Two compilations per runner: init (+ first evaluation) and one epoch.
    if vectorize:
      self._init = jax.jit(jax.vmap(init_one))
      self._epoch = jax.jit(jax.vmap(epoch_one, in_axes=(0, 0, 0, None)))
    else:
      self._init = jax.jit(lambda s, l: jax.lax.map(lambda a: init_one(*a), (s, l)))
      self._epoch = jax.jit(lambda c, l, s, e: jax.lax.map(
          lambda a: epoch_one(a[0], a[1], a[2], e), (c, l, s)))

  def __call__(self, lrs: Sequence[float]) -> GridResult:
    """Trains the grid ``lrs`` (``num_lrs`` rates) x the seeds."""
    from tqdm import tqdm

    lrs, seeds = list(map(float, lrs)), self.seeds
    if len(lrs) != self.num_lrs:
      raise ValueError(f"GridRunner: built for {self.num_lrs} rates, got {len(lrs)}.")
    lr_vec = jnp.repeat(jnp.asarray(lrs, self.dtype), len(seeds))
    seed_vec = jnp.tile(jnp.asarray(seeds), len(lrs))
    start = time.time()
    carry, metrics = self._init(seed_vec, lr_vec)
    curves = [metrics]
    bar = tqdm(range(self.epochs), desc=self.desc, leave=False, disable=not self.progress)
    for epoch in bar:
      carry, metrics = self._epoch(carry, lr_vec, seed_vec, epoch)
      curves.append(metrics)
      loss = np.asarray(metrics[0])
      bar.set_postfix(best_loss=f"{np.nanmin(loss):.3g}" if np.isfinite(loss).any() else "nan")
    bar.close()
    stacked = [np.stack([np.asarray(c[i]) for c in curves], -1) for i in range(3)]
    shape = (len(lrs), len(seeds), self.epochs + 1)
    loss, train_err, test_err = (a.reshape(shape).astype(np.float64) for a in stacked)
    return GridResult(lrs, seeds, loss, test_err, train_err, time.time() - start)


# ----------------------------------------------------------- reporting ---


def fmt(mean: float, std: float, digits: int = 3) -> str:
  if not np.isfinite(mean):
    return "diverged"
  return f"{mean:.{digits}f} ± {std:.{digits}f}"


def pct(mean: float, std: float) -> str:
  return f"{100 * mean:.2f} ± {100 * std:.2f} %"


def write_json(path: pathlib.Path, payload: dict) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w") as f:
    json.dump(payload, f, indent=1)


def update_results_md(section: str, body: str) -> None:
  """Replaces the text between ``<!-- BEGIN section -->`` and its END marker.

  The prose around the markers is written by hand and kept; a missing section
  is appended.
  """
  begin, end = f"<!-- BEGIN {section} -->", f"<!-- END {section} -->"
  text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Results\n"
  block = f"{begin}\n{body.rstrip()}\n{end}"
  if begin in text and end in text:
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    text = head + block + tail
  else:
    text = text.rstrip() + "\n\n" + block + "\n"
  RESULTS_MD.write_text(text)


def summary_cell(summary: dict, metric: str) -> str:
  """A table cell: mean ± std over seeds of one metric of :meth:`GridResult.summary`.

  ``metric`` is ``"train_loss"`` (4 decimals, ``diverged`` when the mean is
  not finite) or ``"test_error"`` (in percent).
  """
  mean, std = summary[f"{metric}_mean"], summary[f"{metric}_std"]
  if metric == "test_error":
    return pct(mean, std)
  return fmt(mean, std, 4)


def summary_cells(summary: dict) -> list[str]:
  """A summary's cells: chosen lr, final train loss, final test error."""
  return [f"{summary['lr']:g}", summary_cell(summary, "train_loss"),
          summary_cell(summary, "test_error")]


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
  """The lines of a markdown table: the header, its rule, one line per row of cells."""
  line = lambda cells: "| " + " | ".join(map(str, cells)) + " |"
  return [line(header), "|" + "---|" * len(header)] + [line(row) for row in rows]


def table_report(intro: str, table: Sequence[str], alt: str, figure: str) -> str:
  """An experiment's markdown report: an intro paragraph, a table, its figure.

  ``table`` holds the table's lines (:func:`markdown_table`); ``figure`` is
  the image's path as RESULTS.md links it (:meth:`Invocation.figure`) and
  ``alt`` its alt text.
  """
  return "\n".join([intro, "", *table, "", f"![{alt}]({figure})"])


def chosen_rate_table(group_column: str, groups: Mapping[str, Mapping[str, dict]],
                      grids: Mapping[str, Sequence[float]]) -> list[str]:
  """Each optimizer's grid, chosen rate and final metrics, per group of runs.

  Args:
    group_column: the header of the first column (``"dataset"``, ...).
    groups: ``{group: {optimizer: run}}``, each run holding its ``"summary"``.
    grids: ``{optimizer: the learning-rate grid it was given}``.

  Returns:
    The lines of a markdown table, one row per (group, optimizer).
  """
  header = (group_column, "optimizer", "lr grid", "chosen lr", "final train loss",
            "final test error")
  rows = ([group, name, grids[name]] + summary_cells(r["summary"])
          for group, runs in groups.items() for name, r in runs.items())
  return markdown_table(header, rows)


def plot_curves(
    ax, res: GridResult, label: str, which: str = "train_loss",
    index: Optional[int] = None, **kw,
):
  """Mean ± std over seeds at the selected (or given) learning rate, per epoch.

  See :func:`plot_seed_curves` for how diverged runs are drawn.
  """
  i = res.best_lr_index() if index is None else index
  return plot_seed_curves(ax, getattr(res, which)[i], f"{label} (lr={res.lrs[i]:g}",
                          alive=np.isfinite(res.train_loss[i]), close=")", **kw)


def plot_seed_curves(ax, curves, label: str, alive=None, close: str = "", **kw):
  """Mean ± std over seeds (rows of ``curves``) per epoch; diverged runs marked.

  A diverged run is drawn, not dropped: each epoch's mean is over the seeds
  still finite there (``alive``: where the train loss is finite, defaults to
  ``curves`` itself), the line stops after the last epoch where any seed is,
  and an ``x`` marks the last finite value of every seed that diverged; the
  legend says how many did. Nothing is computed over empty sets, so no
  warnings.
  """
  data = np.asarray(curves, np.float64)
  finite = np.isfinite(data) if alive is None else np.isfinite(data) & np.asarray(alive)
  epochs = np.arange(data.shape[-1])
  count = finite.sum(0)
  some = count > 0
  total = np.where(finite, data, 0.0).sum(0)
  mean = np.where(some, total / np.maximum(count, 1), np.nan)
  var = np.where(finite, (data - mean) ** 2, 0.0).sum(0) / np.maximum(count, 1)
  std = np.sqrt(var)
  diverged = ~finite[:, -1]
  note = f", {int(diverged.sum())}/{data.shape[0]} seeds diverged" if diverged.any() else ""
  line = ax.plot(epochs[some], mean[some], label=f"{label}{note}{close}", **kw)[0]
  ax.fill_between(epochs[some], (mean - std)[some], (mean + std)[some],
                  color=line.get_color(), alpha=0.2)
  for seed_curve, seed_finite in zip(data, finite):
    if not seed_finite[-1] and seed_finite.any():
      last = int(np.nonzero(seed_finite)[0].max())
      ax.plot(epochs[last], seed_curve[last], "x", color=line.get_color(), ms=8, mew=2)
  return line


def curve_panels(columns: int, width: float = 6.0):
  """A figure of two rows of ``columns`` panels, train loss above test error.

  Returns ``(figure, axes)``, ``axes`` shaped ``(2, columns)`` even for one
  column; each column is ``width`` inches wide, the figure 8 high.
  """
  # Imported here, not at the top, so that importing this module picks no
  # backend: the scripts select Agg before pyplot is first imported.
  import matplotlib.pyplot as plt

  return plt.subplots(2, columns, figsize=(width * columns, 8), squeeze=False)


def save_curve_panels(fig, axes, out_path, *, legend_size: int = 8, dpi: int = 110) -> None:
  """Finishes a :func:`curve_panels` figure, writes it to ``out_path`` and closes it.

  Every panel gets an epoch axis label, a light grid and its legend.
  """
  import matplotlib.pyplot as plt

  for ax in axes.ravel():
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
  fig.tight_layout()
  fig.savefig(out_path, dpi=dpi)
  plt.close(fig)


def plot_chosen_curves(
    columns: Mapping[str, Mapping[str, GridResult]], out_path, *,
    style: Optional[Callable[[str], dict]] = None, title_suffix: str = "",
    width: float = 6.0, legend_size: int = 8, dpi: int = 110,
) -> None:
  """Learning curves of every run at its chosen rate, one column per group.

  Top row: full-train loss (log scale); bottom row: test error; each curve is
  the mean ± std over seeds of one run (:func:`plot_curves`, which marks
  diverged seeds). Panels are titled ``"<group>: train loss<title_suffix>"``
  and ``"<group>: test error<title_suffix>"``.

  Args:
    columns: ``{group: {run name: GridResult}}``, in drawing order.
    out_path: the image file to write.
    style: ``run name -> matplotlib keywords`` of its two curves.
    title_suffix: appended to every panel title.
    width, legend_size, dpi: see :func:`curve_panels` and
      :func:`save_curve_panels`.
  """
  fig, axes = curve_panels(len(columns), width)
  for col, (group, runs) in enumerate(columns.items()):
    for name, res in runs.items():
      kw = style(name) if style is not None else {}
      plot_curves(axes[0, col], res, name, "train_loss", **kw)
      plot_curves(axes[1, col], res, name, "test_error", **kw)
    axes[0, col].set_yscale("log")
    axes[0, col].set_title(f"{group}: train loss{title_suffix}")
    axes[1, col].set_title(f"{group}: test error{title_suffix}")
  save_curve_panels(fig, axes, out_path, legend_size=legend_size, dpi=dpi)


def count_params(tree) -> int:
  return int(sum(math.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


# --------------------------------------------------------- command line ---


@dataclasses.dataclass(frozen=True)
class Invocation:
  """One command-line run of an experiment script: its arguments and its folder.

  ``name`` is the results folder (under :data:`RESULTS_DIR`) and ``out`` its
  path; ``small`` is whether the tiny settings were asked for.
  """

  args: argparse.Namespace
  small: bool
  name: str
  out: pathlib.Path

  def figure(self, filename: str) -> str:
    """The path of ``out/filename`` as ``benchmarks/RESULTS.md`` links it."""
    return f"results/{self.name}/{filename}"


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Where an experiment script reports: its RESULTS.md section and results folder.

  The full settings write ``RESULTS_DIR/<folder>`` and rewrite the
  ``<section>`` block of ``RESULTS.md``; the small ones write
  ``RESULTS_DIR/<section>_small`` and report nowhere but stdout, so a smoke
  run never overwrites a real result.
  """

  section: str
  folder: str

  def results_name(self, small: bool) -> str:
    """The results folder of the small or full settings."""
    return f"{self.section}_small" if small else self.folder

  def main(
      self, doc: str, report: Callable[[Invocation], str], *,
      options: Optional[Mapping[str, dict]] = None,
      argv: Optional[Sequence[str]] = None,
  ) -> str:
    """The script's command line: parses it, runs ``report``, publishes its text.

    Args:
      doc: the script's docstring; its first line is the ``--help`` text.
      report: runs the experiment for an :class:`Invocation` and returns its
        markdown report.
      options: the script's own flags, ``{"--flag": add_argument keywords}``;
        ``--small`` (or ``ECOPT_NOTEBOOK_SMALL=1``) is always there.
      argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
      The report, which a full run also writes into its RESULTS.md section
      and every run prints.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny settings")
    for flag, kwargs in (options or {}).items():
      parser.add_argument(flag, **kwargs)
    args = parser.parse_args(argv)
    small = args.small or small_mode()
    name = self.results_name(small)
    text = report(Invocation(args, small, name, RESULTS_DIR / name))
    if not small:
      update_results_md(self.section, text)
    print(text)
    return text
