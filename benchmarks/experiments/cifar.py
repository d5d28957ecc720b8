"""SGD vs G-SGD on CIFAR-10 / CIFAR-100: PlainNet-20 and ResNet-20 (paper Table 1, scaled).

The paper (Meng et al., 2019, Table 1) trains PlainNet-34 and ResNet-34 with
BatchNorm on CIFAR-10 with SGD and G-SGD (momentum, weight decay, step
schedule). This script runs the same comparison at ResNet-20 size
(He et al., 2016, Section 4.2: a 3x3 stem of 16 channels, three stages of
``n`` blocks of two 3x3 convs with 16 / 32 / 64 channels, stride 2 at each
new stage, global average pooling, a Dense head; ``6n + 2`` weight layers):

- ``resnet``: ``ecopt.zoo.linen.ResNet(stage_channels=(16, 32, 64),
  blocks_per_stage=n)``, one chain per residual branch;
- ``plain``: the same layers without the shortcuts (:class:`PlainCIFAR`),
  with BatchNorm chains ``(BatchNorm_k, Conv_{k+1})`` and
  ``(BatchNorm_last, Dense_0)``, or one chain through every conv and the
  head with ``--no-bn``.

Both optimizers use the same momentum, weight decay, schedule (lr divided by
10 at 50 % and 75 % of the steps), batches and augmentation (4-pixel pad and
random 32x32 crop, horizontal flip). G-SGD is ``ecopt.g_sgd`` with momentum
and the official weight decay on path values, from
``ecopt.skeleton_init(params, spec, mode=--init)``; SGD is ``optax.sgd``
with ``optax.add_decayed_weights`` from the model's own init.

Data: ``--data DIR`` reads the python-pickle batches a user unpacked from
``cifar-10-python.tar.gz`` (``DIR`` holds ``data_batch_1`` ...; add
``--cifar100`` for ``cifar-100-python``) with :mod:`ecopt.datasets`; nothing
is downloaded. ``--synthetic N`` generates ``N`` random CIFAR-shaped images
in memory instead (for timing and smoke runs; the accuracies mean nothing).

Examples::

  python -m benchmarks.experiments.cifar --data ~/data/cifar-10-batches-py \\
      --model plain resnet --epochs 160 --out results/cifar10
  python -m benchmarks.experiments.cifar --synthetic 2048 --epochs 1

Each (model, optimizer) prints one line per epoch (train loss, test
accuracy, seconds) and the whole run is written to ``--out/results.json``.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import pathlib
import sys
import time
from typing import Any, Optional, Sequence

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import ecopt  # noqa: E402
from ecopt import datasets  # noqa: E402
from ecopt.zoo import linen as zl  # noqa: E402


class PlainCIFAR(nn.Module):
  """ResNet-20's layers without its shortcuts: a plain net (He et al., 2016).

  ``Conv_0`` (the stem), then ``2 * blocks_per_stage`` convs per stage, the
  first of each later stage with stride 2, each ``Conv -> [BN] -> ReLU``;
  global average pooling (per channel, so node scaling passes through it)
  and ``Dense_0``.
  """

  stage_channels: Sequence[int] = (16, 32, 64)
  blocks_per_stage: int = 3
  num_classes: int = 10
  use_bn: bool = True

  def layout(self) -> list[tuple[int, int]]:
    """``(channels, stride)`` of every conv, the stem first."""
    out = [(int(self.stage_channels[0]), 1)]
    for s, ch in enumerate(self.stage_channels):
      for b in range(2 * int(self.blocks_per_stage)):
        out.append((int(ch), 2 if s > 0 and b == 0 else 1))
    return out

  @nn.compact
  def __call__(self, x, train: bool = False):
    for k, (ch, stride) in enumerate(self.layout()):
      x = nn.Conv(ch, (3, 3), strides=(stride, stride), use_bias=not self.use_bn,
                  name=f"Conv_{k}")(x)
      if self.use_bn:
        x = nn.BatchNorm(use_running_average=not train, name=f"BatchNorm_{k}")(x)
      x = nn.relu(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="Dense_0")(x)

  @nn.nowrap
  def spec(self) -> tuple[ecopt.Chain, ...]:
    n = len(self.layout())
    convs = [f"Conv_{k}" for k in range(n)]
    if not self.use_bn:
      return (ecopt.Chain(*convs, "Dense_0"),)
    outgoing = convs[1:] + ["Dense_0"]
    return tuple(ecopt.Chain(f"BatchNorm_{k}", nxt) for k, nxt in enumerate(outgoing))


def build_model(name: str, blocks: int, channels: Sequence[int], classes: int, bn: bool):
  if name == "resnet":
    return zl.ResNet(stage_channels=tuple(channels), blocks_per_stage=blocks,
                     num_classes=classes, use_bn=bn)
  if name == "plain":
    return PlainCIFAR(stage_channels=tuple(channels), blocks_per_stage=blocks,
                      num_classes=classes, use_bn=bn)
  raise ValueError(f"--model must be 'plain' or 'resnet', got {name!r}.")


def load(args) -> datasets.ImageDataset:
  if args.synthetic:
    rng = np.random.default_rng(args.seed)
    n, m = args.synthetic, max(args.synthetic // 5, 1)
    classes = 100 if args.cifar100 else 10
    return datasets.ImageDataset(
        rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, classes, n).astype(np.int32),
        rng.integers(0, 256, (m, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, classes, m).astype(np.int32),
        tuple(f"class_{i}" for i in range(classes)),
    )
  if args.data is None:
    raise SystemExit("give --data DIR (the unpacked python-pickle CIFAR files) or --synthetic N")
  if args.cifar100:
    return datasets.load_cifar100(args.data)
  return datasets.load_cifar10(args.data)


def augment(key, images):
  """4-pixel zero pad, random 32x32 crop and random horizontal flip, per image."""
  n = images.shape[0]
  k_crop, k_flip = jax.random.split(key)
  padded = jnp.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
  offsets = jax.random.randint(k_crop, (n, 2), 0, 9)
  crop = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (32, 32, 3)))
  out = crop(padded, offsets)
  flip = jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1))
  return jnp.where(flip, out[:, :, ::-1], out)


def make_optimizer(name, lr, spec, momentum, weight_decay):
  if name == "sgd":
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(lr, momentum=momentum))
  kwargs = {}
  if weight_decay:
    if "weight_decay" not in inspect.signature(ecopt.g_sgd).parameters:
      raise SystemExit("this ecopt's g_sgd has no weight_decay; use --weight-decay 0")
    kwargs["weight_decay"] = weight_decay
  return ecopt.g_sgd(lr, spec, momentum=momentum, **kwargs)


def train(args, data, model_name: str, opt_name: str, log=print) -> dict[str, Any]:
  """One training run; returns its per-epoch history."""
  model = build_model(model_name, args.blocks, args.channels, data.num_classes, not args.no_bn)
  spec = model.spec()
  mean = jnp.asarray(datasets.CIFAR10_MEAN, jnp.float32)
  std = jnp.asarray(datasets.CIFAR10_STD, jnp.float32)
  prep = lambda x: (x.astype(jnp.float32) / 255.0 - mean) / std

  key = jax.random.key(args.seed)
  k_init, k_data = jax.random.split(key)
  variables = jax.jit(model.init)(k_init, jnp.zeros((1, 32, 32, 3)))
  params = variables["params"]
  state = {k: v for k, v in variables.items() if k != "params"}
  if opt_name == "g_sgd":
    params = jax.jit(lambda p: ecopt.skeleton_init(p, spec, mode=args.init))(params)

  x_tr, y_tr = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
  x_te, y_te = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
  batch = min(args.batch_size, len(x_tr))
  steps = len(x_tr) // batch
  total = steps * args.epochs
  lr = args.lr_sgd if opt_name == "sgd" else args.lr_gsgd
  schedule = optax.piecewise_constant_schedule(
      lr, {int(total * 0.5): 0.1, int(total * 0.75): 0.1})
  opt = make_optimizer(opt_name, schedule, spec, args.momentum, args.weight_decay)
  opt_state = jax.jit(opt.init)(params)

  def loss_fn(params, state, x, y):
    if state:  # BatchNorm: batch statistics, running averages updated
      logits, state = model.apply({"params": params, **state}, x, train=True,
                                  mutable=list(state))
    else:
      logits = model.apply({"params": params}, x, train=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, dict(state)

  # One jitted step per batch, not a lax.scan over the epoch: XLA:CPU runs
  # convolutions inside a loop body about 40x slower (jax-ml/jax#12868).
  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def step(params, state, opt_state, x_all, y_all, idx, k):
    x = prep(augment(k, x_all[idx]))
    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, y_all[idx])
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), state, opt_state, loss

  @jax.jit
  def epoch_plan(e):
    k = jax.random.fold_in(k_data, e)
    order = jax.random.permutation(k, len(x_tr))[: steps * batch].reshape(steps, batch)
    return order, jax.random.split(jax.random.fold_in(k, 1), steps)

  def epoch(params, state, opt_state, e):
    order, keys = epoch_plan(e)
    losses = []
    for i in range(steps):
      params, state, opt_state, loss = step(params, state, opt_state, x_tr, y_tr, order[i],
                                            keys[i])
      losses.append(loss)
    return params, state, opt_state, jnp.mean(jnp.stack(losses))

  @jax.jit
  def accuracy(params, state, x, y):
    logits = model.apply({"params": params, **state}, prep(x), train=False)
    return jnp.sum(jnp.argmax(logits, -1) == y)

  def test_accuracy(params, state):
    correct, chunk = 0, 1000
    for i in range(0, len(x_te), chunk):
      correct += int(accuracy(params, state, x_te[i:i + chunk], y_te[i:i + chunk]))
    return correct / len(x_te)

  history = {"model": model_name, "optimizer": opt_name, "lr": lr, "train_loss": [],
             "test_acc": [], "seconds": [], "steps_per_epoch": steps,
             "num_params": int(sum(np.size(p) for p in jax.tree.leaves(params)))}
  for e in range(args.epochs):
    t0 = time.perf_counter()
    params, state, opt_state, loss = epoch(params, state, opt_state, e)
    loss = float(loss)  # blocks: the time is the epoch's
    seconds = time.perf_counter() - t0
    acc = test_accuracy(params, state)
    history["train_loss"].append(loss)
    history["test_acc"].append(acc)
    history["seconds"].append(seconds)
    log(f"{model_name:>6} {opt_name:>5} epoch {e + 1:>3}/{args.epochs}: train loss"
        f" {loss:.4f}, test acc {acc:.2%}, {seconds:.1f} s"
        + (" (compilation included)" if e == 0 else ""))
  return history


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m benchmarks.experiments.cifar",
                              description=__doc__.splitlines()[0])
  src = p.add_mutually_exclusive_group()
  src.add_argument("--data", help="directory of the python-pickle CIFAR files")
  src.add_argument("--synthetic", type=int, metavar="N",
                   help="N random CIFAR-shaped training images instead of --data")
  p.add_argument("--cifar100", action="store_true")
  p.add_argument("--model", nargs="+", default=["plain", "resnet"], choices=("plain", "resnet"))
  p.add_argument("--optimizer", nargs="+", default=["sgd", "g_sgd"], choices=("sgd", "g_sgd"))
  p.add_argument("--blocks", type=int, default=3, help="blocks per stage n (6n + 2 layers; 3: 20)")
  p.add_argument("--channels", type=int, nargs=3, default=[16, 32, 64])
  p.add_argument("--no-bn", action="store_true", help="no BatchNorm (plain: one chain)")
  p.add_argument("--epochs", type=int, default=160)
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--lr-sgd", type=float, default=0.1)
  p.add_argument("--lr-gsgd", type=float, default=0.1)
  p.add_argument("--momentum", type=float, default=0.9)
  p.add_argument("--weight-decay", type=float, default=1e-4)
  p.add_argument("--init", default="paper", choices=("paper", "variance"),
                 help="skeleton_init mode of G-SGD's start (default: the paper's)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", help="folder for results.json")
  args = p.parse_args(argv)
  if args.data is None and args.synthetic is None:
    p.error("give --data DIR or --synthetic N")
  if args.epochs < 1 or args.batch_size < 1 or args.blocks < 1:
    p.error("--epochs, --batch-size and --blocks must be >= 1")
  return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = parse_args(argv)
  data = load(args)
  print(f"{len(data.x_train)} train / {len(data.x_test)} test images, {data.num_classes} classes,"
        f" backend {jax.default_backend()}", flush=True)
  runs = []
  for model_name in args.model:
    for opt_name in args.optimizer:
      runs.append(train(args, data, model_name, opt_name,
                        log=lambda s: print(s, flush=True)))
  result = {"args": vars(args), "backend": jax.default_backend(),
            "device": str(jax.devices()[0]), "runs": runs}
  if args.out:
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
  return result


if __name__ == "__main__":
  main()
