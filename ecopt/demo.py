"""SGD vs G-SGD on scikit-learn's digits: ``python -m ecopt.demo``.

Trains the same ReLU network twice, once with ``optax.sgd`` and once with
``ecopt.g_sgd``, with the same learning rate and the same mini-batches (one
shuffling key), and prints the per-epoch train loss and test accuracy side by
side. Each run's epoch is one jitted ``lax.scan`` over its batches.

G-SGD starts from ``ecopt.skeleton_init(params0, spec)`` (Meng et al., 2019,
Appendix 11.3): every skeleton weight of ``params0`` set to 1. Without it,
G-SGD's weight-space step ``~ lr * g / S_e^2`` explodes from ordinary He or
Glorot weights, whose skeleton products ``S_e`` are small. SGD starts from
``params0`` itself by default (``--sgd-init skeleton`` gives it the same
start as G-SGD).

Then the same two runs start from a node-rescaled copy of their starts
(``ecopt.rescale``: every hidden unit's incoming weights multiplied by
``e^u`` and its outgoing weights divided by ``e^u``, ``u ~ U(-r, r)``,
``--rescale-range r``), which computes the same function: G-SGD's numbers
are those of its first run, SGD's are not.

Data: ``sklearn.datasets.load_digits`` (1797 8x8 images, shipped with
scikit-learn, no download), a fixed stratified 75/25 split, features
standardised with the training split's statistics. ``--model mlp`` reads each
image as 64 features ([64, 128, 128, 10] ReLU MLP), ``--model cnn`` as an
8x8x1 image (a small conv PlainNet).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ecopt
from ecopt.zoo import linen as zl

DEFAULT_LR = 0.1
DEFAULT_RESCALE_RANGE = 2.0


@dataclasses.dataclass
class History:
  """Per-epoch metrics of one run; index 0 is before training."""

  name: str
  train_loss: list[float] = dataclasses.field(default_factory=list)
  test_acc: list[float] = dataclasses.field(default_factory=list)
  seconds: float = 0.0


def load_data(model: str):
  """Digits as float32 arrays: ``(x_train, y_train, x_test, y_test)``.

  The split is stratified and fixed (``random_state=0``), so every run, any
  ``--seed``, sees the same test set; the seed drives init and shuffling.
  """
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  x = digits.data.astype(np.float64)
  y = digits.target.astype(np.int32)
  x_tr, x_te, y_tr, y_te = train_test_split(
      x, y, test_size=0.25, random_state=0, stratify=y
  )
  # Per-pixel standardisation; border pixels that are constant in the
  # training split get std 1 instead of 0.
  mean = x_tr.mean(0)
  std = x_tr.std(0)
  std = np.where(std > 0, std, 1.0)
  x_tr = ((x_tr - mean) / std).astype(np.float32)
  x_te = ((x_te - mean) / std).astype(np.float32)
  if model == "cnn":
    x_tr = x_tr.reshape(-1, 8, 8, 1)
    x_te = x_te.reshape(-1, 8, 8, 1)
  return x_tr, y_tr, x_te, y_te


def build_model(model: str):
  """The network and its ``ecopt`` spec (relative to ``variables['params']``)."""
  if model == "mlp":
    net = zl.MLP(features=(128, 128, 10))
  elif model == "cnn":
    # 8x8x1 -> conv3x3(16), 2x2 max pool -> conv3x3(32), pool -> Dense(10).
    net = zl.PlainNet(channels=(16, 32), num_classes=10, use_bn=False)
  else:
    raise ValueError(f"--model must be 'mlp' or 'cnn', got {model!r}.")
  return net, net.spec()


def make_epoch(apply_fn: Callable, opt: optax.GradientTransformation):
  """A jitted epoch: ``lax.scan`` of optimizer steps over stacked batches."""

  def loss_fn(params, x, y):
    logits = apply_fn({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(carry, batch):
    params, state = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
    updates, state = opt.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), loss

  @jax.jit
  def epoch(params, state, xs, ys):
    (params, state), losses = jax.lax.scan(step, (params, state), (xs, ys))
    return params, state, losses.mean()

  return epoch


def make_eval(apply_fn: Callable):
  """Jitted ``(params, x, y) -> (mean cross-entropy, accuracy)``."""

  @jax.jit
  def evaluate(params, x, y):
    logits = apply_fn({"params": params}, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (logits.argmax(-1) == y).mean()

  return evaluate


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m ecopt.demo",
      description=(
          "Train the same ReLU network on scikit-learn's digits with optax.sgd"
          " and with ecopt.g_sgd (same learning rate, same batches) and"
          " compare."
      ),
  )
  parser.add_argument("--epochs", type=int, default=20)
  parser.add_argument(
      "--lr", type=float, default=DEFAULT_LR,
      help="learning rate of both optimizers (default %(default)s)",
  )
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
  parser.add_argument(
      "--sgd-init", choices=("default", "skeleton"), default="default",
      help=(
          "SGD's start: the model's own init (default) or the same"
          " skeleton_init params G-SGD starts from"
      ),
  )
  parser.add_argument(
      "--rescale-range", type=float, default=DEFAULT_RESCALE_RANGE,
      help=(
          "the rescaled runs scale each hidden unit by e^u, u ~ U(-r, r)"
          " (default %(default)s); 0 skips them"
      ),
  )
  parser.add_argument(
      "--no-progress", action="store_true",
      help="no progress bar (it is shown only when stderr is a terminal)",
  )
  args = parser.parse_args(argv)
  if args.epochs < 1 or args.batch_size < 1 or not args.lr > 0:
    parser.error("--epochs and --batch-size must be >= 1 and --lr > 0")
  if args.rescale_range < 0:
    parser.error("--rescale-range must be >= 0")
  return args


def run(args: argparse.Namespace, out=None) -> dict[str, Any]:
  """Runs the comparison described by ``args``; returns the histories.

  Args:
    args: parsed options (see :func:`parse_args`).
    out: where rows are printed (default ``sys.stdout``).

  Returns:
    ``{"sgd": History, "g_sgd": History, "spec": spec, "g_space_dim": int,
    "num_params": int, "params0": {...}, "params": {...}}``, the last two
    holding each run's initial and final params under ``"sgd"`` and
    ``"g_sgd"``. With ``--rescale-range`` > 0 the rescaled runs are there
    too, under ``"sgd_rescaled"`` and ``"g_sgd_rescaled"`` (histories, and
    in ``params0`` and ``params``), with ``"rescale_gap"``: per optimizer,
    the largest relative difference of its rescaled run's train loss from
    its first run's over the epochs.
  """
  from tqdm import tqdm

  out = sys.stdout if out is None else out

  def say(line=""):
    tqdm.write(line, file=out)

  x_tr, y_tr, x_te, y_te = load_data(args.model)
  net, spec = build_model(args.model)
  key = jax.random.key(args.seed)
  init_key, shuffle_key = jax.random.split(key)
  # Jitted: eager init and skeleton_init would compile dozens of tiny ops.
  params0 = jax.jit(lambda k, x: net.init(k, x)["params"])(
      init_key, jnp.asarray(x_tr[:1])
  )
  g_params0 = jax.jit(ecopt.skeleton_init, static_argnums=1)(params0, spec)
  sgd_params0 = g_params0 if args.sgd_init == "skeleton" else params0
  starts = {"sgd": sgd_params0, "g_sgd": g_params0}
  rescaled = args.rescale_range > 0
  if rescaled:
    # One node scaling for both runs (same key, same hidden units).
    rescale_key = jax.random.fold_in(key, 1)
    scale = jax.jit(
        lambda p: ecopt.rescale(
            p, spec, rescale_key, log_range=args.rescale_range
        )
    )
    starts["sgd_rescaled"] = scale(sgd_params0)
    starts["g_sgd_rescaled"] = scale(g_params0)

  num_params = sum(int(np.size(p)) for p in jax.tree.leaves(params0))
  dim = ecopt.g_space_dim(params0, spec)
  batch = min(args.batch_size, len(x_tr))
  num_batches = len(x_tr) // batch

  say(
      f"digits, --model {args.model}: {len(x_tr)} train / {len(x_te)} test,"
      f" {num_params} weights, G-space dimension {dim}"
  )
  say(f"spec: {spec!r}")
  say(
      f"lr {args.lr:g} for both, batch {batch} ({num_batches} steps/epoch, the"
      f" same shuffled batches for both), seed {args.seed}"
  )
  say(
      "G-SGD starts from ecopt.skeleton_init(params0) (the paper's"
      " initialisation: skeleton weights set to 1);"
  )
  say(
      "SGD starts from "
      + (
          "the same skeleton_init params."
          if args.sgd_init == "skeleton"
          else "params0, the model's own init (--sgd-init skeleton: same start)."
      )
  )

  apply_fn = net.apply
  evaluate = make_eval(apply_fn)
  xs_tr, ys_tr = jnp.asarray(x_tr), jnp.asarray(y_tr)
  xs_te, ys_te = jnp.asarray(x_te), jnp.asarray(y_te)

  @jax.jit
  def shuffled(epoch):
    """The epoch's batches, ``(num_batches, batch, ...)``, shared by both runs."""
    perm = jax.random.permutation(
        jax.random.fold_in(shuffle_key, epoch), len(x_tr)
    )[: num_batches * batch]
    return (
        xs_tr[perm].reshape((num_batches, batch) + xs_tr.shape[1:]),
        ys_tr[perm].reshape(num_batches, batch),
    )

  optimizers = {"sgd": optax.sgd(args.lr), "g_sgd": ecopt.g_sgd(args.lr, spec)}
  runs = {}
  for name, p0 in starts.items():
    opt = optimizers[name.removesuffix("_rescaled")]
    history = History(name)
    loss, acc = evaluate(p0, xs_tr, ys_tr)[0], evaluate(p0, xs_te, ys_te)[1]
    history.train_loss.append(float(loss))
    history.test_acc.append(float(acc))
    runs[name] = dict(
        history=history, epoch=make_epoch(apply_fn, opt),
        params=p0, state=jax.jit(opt.init)(p0),
    )

  header = (
      f"{'epoch':>5} | {'SGD loss':>9} {'test acc':>8} |"
      f" {'G-SGD loss':>10} {'test acc':>8}"
  )

  def row(label, i, suffix=""):
    s = runs["sgd" + suffix]["history"]
    g = runs["g_sgd" + suffix]["history"]
    return (
        f"{label:>5} | {s.train_loss[i]:9.4f} {s.test_acc[i]:8.2%} |"
        f" {g.train_loss[i]:10.4f} {g.test_acc[i]:8.2%}"
    )

  say("train loss: mean over the epoch's steps (epoch 0: at init, full train set)")
  say(header)
  say(row("0", 0))
  # disable=None: tqdm draws only when stderr is a terminal, so logs and
  # notebooks get no bar.
  bar = tqdm(
      range(1, args.epochs + 1), desc=f"{args.model}", unit="epoch",
      disable=True if args.no_progress else None, file=sys.stderr,
      leave=False,
  )
  for epoch in bar:
    xs, ys = shuffled(epoch)
    for r in runs.values():
      t0 = time.perf_counter()
      r["params"], r["state"], loss = r["epoch"](r["params"], r["state"], xs, ys)
      loss = float(loss)  # Blocks, so the timing is honest.
      r["history"].seconds += time.perf_counter() - t0
      r["history"].train_loss.append(loss)
      r["history"].test_acc.append(float(evaluate(r["params"], xs_te, ys_te)[1]))
    say(row(str(epoch), epoch))
  bar.close()
  s, g = runs["sgd"]["history"], runs["g_sgd"]["history"]
  say(
      f"training time (compilation included): SGD {s.seconds:.1f} s,"
      f" G-SGD {g.seconds:.1f} s"
  )
  say(
      f"final test accuracy: SGD {s.test_acc[-1]:.2%}, G-SGD"
      f" {g.test_acc[-1]:.2%}"
  )
  result = {
      "sgd": s, "g_sgd": g, "spec": spec, "g_space_dim": dim,
      "num_params": num_params,
      "params0": starts,
      "params": {name: r["params"] for name, r in runs.items()},
  }
  if rescaled:
    result.update(
        _report_rescaled(runs, starts, apply_fn, xs_tr, args, say, header, row)
    )
  return result


def _report_rescaled(runs, starts, apply_fn, xs_tr, args, say, header, row):
  """Prints the rescaled runs' table and how far each is from its first run."""
  change = float(
      jnp.max(
          jnp.abs(
              apply_fn({"params": starts["g_sgd"]}, xs_tr)
              - apply_fn({"params": starts["g_sgd_rescaled"]}, xs_tr)
          )
      )
  )
  say()
  say(
      "The same two runs from a node-rescaled start: ecopt.rescale multiplies"
      " each hidden unit's incoming"
  )
  say(
      f"weights by e^u and divides its outgoing weights by e^u, u ~ U(-"
      f"{args.rescale_range:g}, {args.rescale_range:g}); the network computes"
      f" the same function"
  )
  say(
      f"(largest change of a logit on the train set: {change:.1e}). Same lr,"
      " same batches."
  )
  say(header + "   (rescaled start)")
  for i in range(args.epochs + 1):
    say(row(str(i), i, "_rescaled"))
  gap = {}
  for name in ("sgd", "g_sgd"):
    plain = np.asarray(runs[name]["history"].train_loss)
    other = np.asarray(runs[name + "_rescaled"]["history"].train_loss)
    with np.errstate(invalid="ignore", divide="ignore"):
      rel = np.abs(other - plain) / np.abs(plain)
    gap[name] = float(np.max(np.where(np.isnan(rel), np.inf, rel)))
  say(
      "largest relative difference of the train loss from the first run,"
      f" over the epochs: SGD {gap['sgd']:.1e}, G-SGD {gap['g_sgd']:.1e}"
  )
  say(
      "G-SGD sees only basis-path values, which the rescaling leaves"
      " unchanged, so it takes the same steps"
  )
  say(
      "(up to float32 rounding); SGD's steps depend on how the weights happen"
      " to be balanced."
  )
  return {
      "sgd_rescaled": runs["sgd_rescaled"]["history"],
      "g_sgd_rescaled": runs["g_sgd_rescaled"]["history"],
      "rescale_gap": gap,
  }


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  """Command-line entry point; ``argv`` defaults to ``sys.argv[1:]``."""
  return run(parse_args(argv))


if __name__ == "__main__":
  main()
