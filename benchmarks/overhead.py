"""What G-space optimization costs beyond back-propagation, measured.

Times, for each model, pairs of optimizers run in the same process and
interleaved round by round (the order shuffled every round, so drifting
machine load hits both sides of a pair alike):

- ``ecopt.g_sgd`` vs ``optax.sgd`` with the same momentum (0.9, and none);
- ``ecopt.g_space(optax.adam)`` vs ``optax.adam``;
- ``ecopt.path_sgd`` vs ``optax.sgd`` when ``ecopt.path_sgd`` exists.

Two jitted functions are timed: the full training step (loss, grad, update,
apply; params and optimizer state donated) and the update alone
(``update`` + ``apply_updates`` from fixed gradients, also donated). For
``optax.sgd`` without momentum the update alone is exactly ``w - lr * g``.
Every number is a median over rounds with its interquartile range; ratios are
taken per round (new / base in the same round) and then summarised, so they
are same-run ratios. Wall-clock and process CPU time are both recorded (the
CPU time is steadier on a shared machine).

Also reported: the compiled step's temporary memory from XLA's memory
analysis (the update's extra memory is the difference to the optax
counterpart, set against the parameter bytes), trace and compile times, the
update's cost at three MLP sizes (to show it grows linearly in the number of
parameters m), the update alone across ``ecopt.zoo`` architectures (residual
branches, BatchNorm chains, 1-D convs, unequal widths, large heads: shapes
where a slow path would show), and, in a subprocess with 8 simulated CPU
devices, the step
sharded (batch over a ``data`` axis, hidden units over a ``model`` axis) vs
unsharded, their agreement, and the collectives XLA inserted.

Usage::

  python benchmarks/overhead.py --quick           # small sizes, ~2 minutes
  python benchmarks/overhead.py                    # full, writes results/
  python benchmarks/overhead.py --readme           # also rewrites the table

Output: ``benchmarks/results/overhead.json`` (``overhead_quick.json`` with
``--quick``) and, with ``--readme``, the tables in ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import random
import re
import subprocess
import sys
import time
from typing import Any, Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
README = os.path.join(HERE, "README.md")

TARGETS = {
    "step_ratio": 1.03,
    "update_ratio_vs_sgd": 2.0,
    "extra_memory_vs_params": 1.0,
    "compile_ratio": 1.5,
}


# ---------------------------------------------------------------- models ---


def _imports():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import optax
  import flax.linen as nn
  import ecopt
  return jax, jnp, optax, nn, ecopt


def make_mlp(widths):
  _, _, _, nn, ecopt = _imports()

  class MLP(nn.Module):
    """Dense-ReLU stack, one chain through all layers."""

    @nn.compact
    def __call__(self, x):
      x = x.reshape((x.shape[0], -1))
      for k, width in enumerate(widths[1:]):
        x = nn.Dense(width, name=f"Dense_{k}")(x)
        if k < len(widths) - 2:
          x = nn.relu(x)
      return x

  spec = ecopt.Chain(*[f"Dense_{k}" for k in range(len(widths) - 1)])
  return MLP(), spec, (widths[0],)


def make_cnn(channels, image):
  """A PlainNet-style conv3x3 stack without pooling, flatten, Dense head."""
  _, _, _, nn, ecopt = _imports()
  try:
    from ecopt.zoo import linen as zl  # pylint: disable=g-import-not-at-top

    model = zl.PlainNet(
        channels=tuple(channels), num_classes=10, use_bn=False, pool=None
    )
    spec = model.spec()
    source = "ecopt.zoo.linen.PlainNet(pool=None)"
  except (ImportError, AttributeError, TypeError):

    class PlainNet(nn.Module):

      @nn.compact
      def __call__(self, x):
        for k, c in enumerate(channels):
          x = nn.relu(nn.Conv(c, (3, 3), padding="SAME", name=f"Conv_{k}")(x))
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(10, name="Dense_0")(x)

    model = PlainNet()
    spec = ecopt.Chain(
        *[f"Conv_{k}" for k in range(len(channels))], "Dense_0"
    )
    source = "local flax PlainNet"
  return model, spec, (image, image, 3), source


def model_table(quick: bool, cnn_batch: Optional[int]):
  """(name, description, builder, batch) for the benchmarked models."""
  if quick:
    return [
        ("mlp_a", "MLP 784-256-256-256-10", lambda: make_mlp([784, 256, 256, 256, 10]), 32),
        ("mlp_b", "MLP 3072-512-512-10", lambda: make_mlp([3072, 512, 512, 10]), 32),
        ("cnn", "PlainNet 4x conv3x3 16ch, 16x16x3", lambda: make_cnn([16] * 4, 16), cnn_batch or 4),
        ("cnn_wide", "PlainNet 2x conv3x3 64ch, 8x8x3", lambda: make_cnn([64] * 2, 8), 4),
    ]
  return [
      ("mlp_a", "MLP 784-1024-1024-1024-10", lambda: make_mlp([784, 1024, 1024, 1024, 10]), 128),
      ("mlp_b", "MLP 3072-4096-4096-10", lambda: make_mlp([3072, 4096, 4096, 10]), 256),
      ("cnn", "PlainNet 8x conv3x3 64ch, 32x32x3", lambda: make_cnn([64] * 8, 32), cnn_batch or 128),
      # ResNet-like channel counts: the row sums of wide conv kernels.
      ("cnn_wide", "PlainNet 4x conv3x3 256ch, 8x8x3", lambda: make_cnn([256] * 4, 8), 16),
  ]


# ------------------------------------------------------------ optimizers ---


def optimizers(spec) -> dict[str, Callable[[], Any]]:
  _, _, optax, _, ecopt = _imports()
  lr = 1e-3
  opts = {
      "sgd": lambda: optax.sgd(lr),
      "g_sgd": lambda: ecopt.g_sgd(lr, spec),
      "sgd_m": lambda: optax.sgd(lr, momentum=0.9),
      "g_sgd_m": lambda: ecopt.g_sgd(lr, spec, momentum=0.9),
      "adam": lambda: optax.adam(1e-4),
      "g_adam": lambda: ecopt.g_space(optax.adam(1e-4), spec),
  }
  if hasattr(ecopt, "path_sgd"):
    opts["path_sgd"] = lambda: ecopt.path_sgd(lr, spec)
  return opts


# (new, base) pairs; "update" pairs are timed on the update alone only.
STEP_PAIRS = [("g_sgd_m", "sgd_m"), ("g_adam", "adam"), ("path_sgd", "sgd")]
UPDATE_PAIRS = [
    ("g_sgd", "sgd"),
    ("g_sgd_m", "sgd_m"),
    ("g_adam", "adam"),
    ("path_sgd", "sgd"),
]


# --------------------------------------------------------------- timing ---


def _stats(xs):
  import numpy as np  # pylint: disable=g-import-not-at-top

  xs = np.asarray(xs, float)
  q25, q50, q75 = np.percentile(xs, [25, 50, 75])
  return {"median": float(q50), "q25": float(q25), "q75": float(q75),
          "iqr": float(q75 - q25), "n": int(xs.size)}


def time_interleaved(runners: dict[str, Callable[[], None]], rounds: int,
                     inner: int, seed: int = 0):
  """Per-iteration wall and CPU seconds of each runner, round by round."""
  rng = random.Random(seed)
  names = list(runners)
  wall = {k: [] for k in names}
  cpu = {k: [] for k in names}
  for _ in range(rounds):
    rng.shuffle(names)
    for k in names:
      t0, c0 = time.perf_counter(), time.process_time()
      for _ in range(inner):
        runners[k]()
      wall[k].append((time.perf_counter() - t0) / inner)
      cpu[k].append((time.process_time() - c0) / inner)
  return wall, cpu


def summarise(wall, cpu, pairs):
  out = {"times": {}, "ratios": {}}
  for k in wall:
    out["times"][k] = {"wall_ms": _stats([1e3 * t for t in wall[k]]),
                       "cpu_ms": _stats([1e3 * t for t in cpu[k]])}
  for new, base in pairs:
    if new in wall and base in wall:
      out["ratios"][f"{new}/{base}"] = {
          "wall": _stats([a / b for a, b in zip(wall[new], wall[base])]),
          "cpu": _stats([a / b for a, b in zip(cpu[new], cpu[base])]),
      }
  return out


class Case:
  """One model with its params, a batch and jitted step/update per optimizer."""

  def __init__(self, model, spec, in_shape, batch, seed=0):
    jax, jnp, optax, _, ecopt = _imports()
    self.model, self.spec = model, spec
    kx, ky, kp = jax.random.split(jax.random.key(seed), 3)
    self.x = jax.random.normal(kx, (batch,) + tuple(in_shape), jnp.float32)
    self.y = jax.random.randint(ky, (batch,), 0, 10)
    params = model.init(kp, self.x[:1])["params"]
    # The paper's initialisation (every S_e = 1): G-SGD's usual start.
    self.params = ecopt.skeleton_init(params, spec)
    self.param_bytes = sum(
        x.size * x.dtype.itemsize for x in jax.tree.leaves(self.params))
    self.num_params = sum(x.size for x in jax.tree.leaves(self.params))
    self.grads = jax.jit(jax.grad(self.loss))(self.params, self.x, self.y)

  def loss(self, params, x, y):
    _, _, optax, _, _ = _imports()
    logits = self.model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step_fn(self, opt):
    jax, _, optax, _, _ = _imports()

    def step(params, state, x, y):
      grads = jax.grad(self.loss)(params, x, y)
      updates, state = opt.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))

  def update_fn(self, opt):
    return jit_update(opt)

  def fresh(self, opt):
    return fresh(self.params, opt)

  def runner(self, fn, opt, extra):
    return runner(fn, self.params, opt, extra)


def jit_update(opt):
  """The jitted update alone (``update`` + ``apply_updates``), donated."""
  jax, _, optax, _, _ = _imports()

  def update(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(update, donate_argnums=(0, 1))


def fresh(params, opt):
  """A copy of ``params`` (donated away by the runs) and its ``opt`` state."""
  jax, jnp, _, _, _ = _imports()
  params = jax.tree.map(jnp.copy, params)
  return params, opt.init(params)


def runner(fn, params, opt, extra):
  """A closure that runs ``fn`` once, carrying donated params and state."""
  jax, _, _, _, _ = _imports()
  carry = list(fresh(params, opt))

  def run():
    carry[0], carry[1] = fn(carry[0], carry[1], *extra)
    jax.block_until_ready(carry[0])

  run()  # compile and warm up
  run()
  run.carry = carry
  return run


def memory_of(compiled):
  m = compiled.memory_analysis()
  if m is None:
    return None
  return {
      "temp_bytes": int(m.temp_size_in_bytes),
      "argument_bytes": int(m.argument_size_in_bytes),
      "output_bytes": int(m.output_size_in_bytes),
      "alias_bytes": int(m.alias_size_in_bytes),
  }


def compile_times(case, make_opt, reps):
  """Median trace+lower and XLA compile seconds of a fresh jitted step."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  lower_s, compile_s, memory = [], [], None
  for _ in range(reps):
    opt = make_opt()
    params, state = case.fresh(opt)
    fn = case.step_fn(opt)  # a new function object: nothing is cached
    t0 = time.perf_counter()
    lowered = fn.lower(params, state, case.x, case.y)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    lower_s.append(t1 - t0)
    compile_s.append(t2 - t1)
    memory = memory_of(compiled)
  return {
      "trace_lower_s": float(np.median(lower_s)),
      "compile_s": float(np.median(compile_s)),
      "total_s": float(np.median(np.add(lower_s, compile_s))),
      "step_memory": memory,
  }


def update_memory(case, make_opt):
  opt = make_opt()
  params, state = case.fresh(opt)
  compiled = case.update_fn(opt).lower(params, state, case.grads).compile()
  return memory_of(compiled)


def bench_model(name, desc, builder, batch, args, log):
  jax, _, _, _, _ = _imports()
  built = builder()
  model, spec, in_shape = built[:3]
  source = built[3] if len(built) > 3 else "local flax MLP"
  case = Case(model, spec, in_shape, batch)
  opts = optimizers(spec)
  log(f"[{name}] {desc}, batch {batch}: {case.num_params} params")
  result = {"description": desc, "model_source": source, "batch": batch,
            "num_params": case.num_params, "param_bytes": case.param_bytes}

  # Update alone.
  names = sorted({k for pair in UPDATE_PAIRS for k in pair if k in opts})
  runners = {}
  for k in names:
    opt = opts[k]()
    runners[k] = case.runner(case.update_fn(opt), opt, (case.grads,))
  wall, cpu = time_interleaved(runners, args.rounds, args.update_inner)
  result["update"] = summarise(wall, cpu, UPDATE_PAIRS)
  del runners
  log(f"[{name}] update: " + _brief(result["update"]))

  # Full step.
  names = sorted({k for pair in STEP_PAIRS for k in pair if k in opts})
  rounds = args.cnn_rounds if name.startswith("cnn") else args.rounds
  runners = {}
  for k in names:
    opt = opts[k]()
    runners[k] = case.runner(case.step_fn(opt), opt, (case.x, case.y))
  for k, run in runners.items():
    ok = all(bool(jax.numpy.isfinite(x).all())
             for x in jax.tree.leaves(run.carry[0]))
    if not ok:
      raise RuntimeError(f"{name}/{k}: non-finite params after warm-up")
  wall, cpu = time_interleaved(runners, rounds, args.step_inner)
  result["step"] = summarise(wall, cpu, STEP_PAIRS)
  del runners
  log(f"[{name}] step: " + _brief(result["step"]))

  # Compile time and memory.
  result["compile"] = {}
  result["update_memory"] = {}
  for k in names:
    result["compile"][k] = compile_times(case, opts[k], args.compile_reps)
  for k in sorted({k for pair in UPDATE_PAIRS for k in pair if k in opts}):
    result["update_memory"][k] = update_memory(case, opts[k])
  result["compile_ratios"] = {}
  result["extra_memory"] = {}
  for new, base in STEP_PAIRS:
    if new not in opts:
      continue
    cn, cb = result["compile"][new], result["compile"][base]
    result["compile_ratios"][f"{new}/{base}"] = {
        "total": cn["total_s"] / cb["total_s"],
        "compile": cn["compile_s"] / cb["compile_s"],
    }
    mn, mb = cn["step_memory"], cb["step_memory"]
    if mn and mb:
      extra = mn["temp_bytes"] - mb["temp_bytes"]
      result["extra_memory"][f"{new}/{base}"] = {
          "step_temp_extra_bytes": extra,
          "vs_param_bytes": extra / case.param_bytes,
      }
  for new, base in UPDATE_PAIRS:
    mn = result["update_memory"].get(new)
    mb = result["update_memory"].get(base)
    if mn and mb:
      extra = mn["temp_bytes"] - mb["temp_bytes"]
      result["extra_memory"].setdefault(f"{new}/{base}", {}).update(
          update_temp_extra_bytes=extra,
          update_vs_param_bytes=extra / case.param_bytes)
  log(f"[{name}] compile: " + ", ".join(
      f"{k} {v['total']:.2f}x" for k, v in result["compile_ratios"].items()))
  log(f"[{name}] memory: " + json.dumps(result["extra_memory"]))
  return result


def _brief(res):
  return ", ".join(
      f"{k} {v['wall']['median']:.3f}x (cpu {v['cpu']['median']:.3f}x)"
      for k, v in res["ratios"].items())


def bench_scaling(args, log):
  """Update-alone time of g_sgd and sgd at three MLP sizes."""
  hidden = (64, 128, 256) if args.quick else (256, 512, 1024)
  out = []
  for h in hidden:
    model, spec, in_shape = make_mlp([784, h, h, h, 10])
    case = Case(model, spec, in_shape, 8)
    opts = optimizers(spec)
    runners = {}
    for k in ("sgd", "g_sgd"):
      opt = opts[k]()
      runners[k] = case.runner(case.update_fn(opt), opt, (case.grads,))
    wall, cpu = time_interleaved(runners, args.rounds, args.update_inner)
    res = summarise(wall, cpu, [("g_sgd", "sgd")])
    row = {"hidden": h, "num_params": case.num_params, **res}
    for k in ("sgd", "g_sgd"):
      row[f"{k}_ns_per_param"] = (
          1e6 * res["times"][k]["wall_ms"]["median"] / case.num_params)
      row[f"{k}_cpu_ns_per_param"] = (
          1e6 * res["times"][k]["cpu_ms"]["median"] / case.num_params)
    out.append(row)
    log(f"[scaling] h={h} m={case.num_params}: g_sgd"
        f" {row['g_sgd_ns_per_param']:.3f} ns/param, sgd"
        f" {row['sgd_ns_per_param']:.3f} ns/param")
  return out


# ------------------------------------------------------------------ zoo ---


def zoo_table(quick: bool):
  """(name, description, model, input shape) of the architecture sweep."""
  from ecopt.zoo import linen as zl  # pylint: disable=g-import-not-at-top

  if quick:
    return [
        ("resnet", "ResNet stages 16-32, BN", zl.ResNet(stage_channels=(16, 32)), (16, 16, 3)),
        ("plainnet_head", "PlainNet 16-32, pool, 100-way head", zl.PlainNet(channels=(16, 32), num_classes=100), (16, 16, 3)),
        ("cnn1d", "CNN1D 16-32, kernel 5", zl.CNN1D(channels=(16, 32)), (64, 1)),
        ("mlp_uneven", "MLP 784-300-100-10", zl.MLP(features=(300, 100, 10)), (784,)),
    ]
  return [
      ("resnet18", "ResNet stages 64-128-256-512 x2 blocks, BN",
       zl.ResNet(stage_channels=(64, 128, 256, 512), blocks_per_stage=2), (32, 32, 3)),
      ("plainnet_head", "PlainNet 64-128, pool, 1000-way head on 28x28",
       zl.PlainNet(channels=(64, 128), num_classes=1000), (28, 28, 3)),
      ("plainnet_bn", "PlainNet 4x128, BN, pool",
       zl.PlainNet(channels=(128,) * 4, use_bn=True), (32, 32, 3)),
      ("cnn1d", "CNN1D 64-128-256, kernel 5",
       zl.CNN1D(channels=(64, 128, 256)), (128, 1)),
      ("mlp_head", "MLP 784-512-512-8000",
       zl.MLP(features=(512, 512, 8000)), (784,)),
      ("mlp_uneven", "MLP 784-1500-700-2000-10",
       zl.MLP(features=(1500, 700, 2000, 10)), (784,)),
  ]


def bench_zoo(args, log):
  """Update alone of g_sgd / g_space(adam) against optax across ecopt.zoo.

  Shapes the fixed models do not have (residual branches, BatchNorm chains,
  1-D convs, unequal widths, large heads): a slow path that depends on a
  kernel's shape shows up here. Random gradients (the update's cost does
  not depend on their values), params from ``ecopt.skeleton_init``.
  """
  jax, jnp, optax, _, ecopt = _imports()
  import numpy as np  # pylint: disable=g-import-not-at-top

  pairs = [("g_sgd", "sgd"), ("g_adam", "adam")]
  out = {}
  for name, desc, model, shape in zoo_table(args.quick):
    x = jnp.ones((2,) + tuple(shape), jnp.float32)
    spec = model.spec()
    params = ecopt.skeleton_init(
        model.init(jax.random.key(0), x)["params"], spec)
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(0)
    grads = jax.tree.unflatten(treedef, [
        jnp.asarray(1e-2 * rng.standard_normal(l.shape), l.dtype)
        for l in leaves])
    opts = {"sgd": optax.sgd(1e-3), "g_sgd": ecopt.g_sgd(1e-3, spec),
            "adam": optax.adam(1e-4),
            "g_adam": ecopt.g_space(optax.adam(1e-4), spec)}
    runners = {k: runner(jit_update(opt), params, opt, (grads,))
               for k, opt in opts.items()}
    wall, cpu = time_interleaved(runners, args.rounds, args.update_inner)
    res = summarise(wall, cpu, pairs)
    out[name] = {"description": desc, "input": list(shape),
                 "num_params": int(sum(l.size for l in leaves)), **res}
    log(f"[zoo] {name} ({out[name]['num_params']} params): " + _brief(res))
  return out


# -------------------------------------------------------------- sharded ---


def _mesh_specs(params, model_size):
  jax, _, _, _, _ = _imports()
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  def spec_for(x):
    # Hidden units over the model axis: a kernel's output dimension where it
    # divides, else its input dimension, else replicated.
    if x.ndim >= 2:
      if x.shape[-1] % model_size == 0:
        return P(*([None] * (x.ndim - 1)), "model")
      if x.shape[-2] % model_size == 0:
        return P(*([None] * (x.ndim - 2)), "model", None)
      return P()
    return P("model") if x.shape[0] % model_size == 0 else P()

  return jax.tree.map(spec_for, params)


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")


def collectives_in(hlo_text):
  """Collectives of a compiled HLO module: count and largest operand size."""
  found = {}
  pattern = re.compile(
      r"=\s*(\(?[^=]*?\)?)\s+(%s)(?:-start)?\(" % "|".join(COLLECTIVES))
  for line in hlo_text.split("\n"):
    m = pattern.search(line)
    if not m:
      continue
    shapes, op = m.group(1), m.group(2)
    sizes = [
        int(functools.reduce(lambda a, b: a * b,
                             [int(d) for d in dims.split(",") if d], 1))
        for dims in re.findall(r"[a-z]\d+\[([\d,]*)\]", shapes)
    ]
    entry = found.setdefault(op, {"count": 0, "max_elements": 0,
                                  "total_elements": 0})
    entry["count"] += 1
    entry["max_elements"] = max(entry["max_elements"], max(sizes or [0]))
    entry["total_elements"] += sum(sizes)
  return found


def sharded_worker(args):
  """Runs inside a process started with 8 simulated CPU devices."""
  jax, jnp, _, _, _ = _imports()
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

  devices = jax.devices()
  if len(devices) != 8:
    raise RuntimeError(f"expected 8 CPU devices, got {len(devices)}")
  widths = [784, 256, 256, 256, 10] if args.quick else [784, 1024, 1024, 1024, 10]
  batch = 32 if args.quick else 128
  model, spec, in_shape = make_mlp(widths)
  case = Case(model, spec, in_shape, batch)
  mesh = Mesh(np.array(devices).reshape(2, 4), ("data", "model"))
  pspecs = _mesh_specs(case.params, 4)
  shard = lambda tree, specs: jax.tree.map(
      lambda s, x: jax.device_put(x, NamedSharding(mesh, s)), specs, tree,
      is_leaf=lambda s: isinstance(s, P))
  data_sharding = NamedSharding(mesh, P("data"))
  xs = jax.device_put(case.x, data_sharding)
  ys = jax.device_put(case.y, data_sharding)
  opts = optimizers(spec)
  out = {"widths": widths, "batch": batch, "mesh": {"data": 2, "model": 4},
         "results": {}}
  steps = 3
  for k in ("sgd_m", "g_sgd_m", "g_adam"):
    opt = opts[k]()
    fn = case.step_fn(opt)
    # Unsharded reference on one device.
    params, state = case.fresh(opt)
    for _ in range(steps):
      params, state = fn(params, state, case.x, case.y)
    ref = jax.device_get(params)
    params, state = case.fresh(opt)
    params = shard(params, pspecs)
    state = opt.init(params)
    hlo = fn.lower(params, state, xs, ys).compile().as_text()
    for _ in range(steps):
      params, state = fn(params, state, xs, ys)
    got = jax.device_get(params)
    rel = max(
        float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)))
    # The update alone, sharded: which collectives does G-space add?
    opt2 = opts[k]()
    p2, s2 = case.fresh(opt2)
    p2 = shard(p2, pspecs)
    s2 = opt2.init(p2)
    g2 = shard(case.grads, pspecs)
    upd_hlo = case.update_fn(opt2).lower(p2, s2, g2).compile().as_text()
    # Timing: unsharded vs sharded steps, interleaved.
    runners = {}
    p1, s1 = case.fresh(opt)
    runners["unsharded"] = case.runner(fn, opt, (case.x, case.y))
    sharded_fn = fn  # already compiled for the sharded inputs above
    carry = [shard(case.fresh(opt)[0], pspecs), None]
    carry[1] = opt.init(carry[0])

    def run_sharded(carry=carry, sharded_fn=sharded_fn):
      carry[0], carry[1] = sharded_fn(carry[0], carry[1], xs, ys)
      jax.block_until_ready(carry[0])

    run_sharded()
    run_sharded()
    runners["sharded"] = run_sharded
    wall, cpu = time_interleaved(runners, args.rounds, args.step_inner)
    res = summarise(wall, cpu, [("sharded", "unsharded")])
    out["results"][k] = {
        "max_rel_diff_after_steps": rel,
        "steps": steps,
        "step_collectives": collectives_in(hlo),
        "update_collectives": collectives_in(upd_hlo),
        **res,
    }
    del p1, s1
  print("SHARDED_JSON " + json.dumps(out))


def bench_sharded(args, log):
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      " --xla_force_host_platform_device_count=8").strip()
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, os.path.abspath(__file__), "--sharded-worker",
         "--rounds", str(args.rounds), "--step-inner", str(args.step_inner)]
  if args.quick:
    cmd.append("--quick")
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                        check=False)
  for line in proc.stdout.splitlines():
    if line.startswith("SHARDED_JSON "):
      res = json.loads(line[len("SHARDED_JSON "):])
      for k, v in res["results"].items():
        log(f"[sharded] {k}: sharded/unsharded"
            f" {v['ratios']['sharded/unsharded']['wall']['median']:.2f}x,"
            f" max rel diff {v['max_rel_diff_after_steps']:.2e}")
      return res
  raise RuntimeError("sharded worker failed:\n" + proc.stdout[-3000:] +
                     proc.stderr[-3000:])


# --------------------------------------------------------------- report ---


def machine_info():
  jax, _, optax, _, _ = _imports()
  import flax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  dev = jax.devices()[0]
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--short", "--", "ecopt"],
                           cwd=os.path.dirname(HERE), capture_output=True,
                           text=True).stdout
    dirty = [l[3:] for l in dirty.splitlines() if l.startswith(" M")]
  except OSError:
    commit, dirty = None, None
  return {
      "git_commit": commit,
      "ecopt_files_modified_since_commit": dirty,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "platform": platform.platform(),
      "python": platform.python_version(),
      "cpu": cpu,
      "cpu_count": os.cpu_count(),
      "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
      "backend": jax.default_backend(),
      "device": getattr(dev, "device_kind", str(dev)),
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      "optax": optax.__version__,
      "flax": flax.__version__,
      "numpy": np.__version__,
      "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
  }


def check_targets(results):
  """Each target with the measured value (worst over models) and a verdict."""
  rows = []
  models = results["models"]
  for new, base in (("g_sgd_m", "sgd_m"), ("g_adam", "adam")):
    for mname, m in models.items():
      r = m["step"]["ratios"].get(f"{new}/{base}")
      if r:
        rows.append({"target": "full step vs optax", "pair": f"{new}/{base}",
                     "model": mname, "wall": r["wall"]["median"],
                     "cpu": r["cpu"]["median"],
                     "limit": TARGETS["step_ratio"]})
  for mname, m in models.items():
    r = m["update"]["ratios"].get("g_sgd/sgd")
    if r:
      rows.append({"target": "update alone vs w - lr*g", "pair": "g_sgd/sgd",
                   "model": mname, "wall": r["wall"]["median"],
                   "cpu": r["cpu"]["median"],
                   "limit": TARGETS["update_ratio_vs_sgd"]})
  for mname, m in models.items():
    for pair in ("g_sgd_m/sgd_m", "g_adam/adam"):
      e = m["extra_memory"].get(pair)
      if e and "step_temp_extra_bytes" in e:
        rows.append({"target": "extra memory (step temp) / param bytes",
                     "pair": pair, "model": mname,
                     "value": e["vs_param_bytes"],
                     "limit": TARGETS["extra_memory_vs_params"]})
      c = m["compile_ratios"].get(pair)
      if c:
        rows.append({"target": "compile time (trace+compile)", "pair": pair,
                     "model": mname, "value": c["total"],
                     "limit": TARGETS["compile_ratio"]})
  for row in rows:
    value = row.get("wall", row.get("value"))
    row["met"] = bool(value <= row["limit"])
  return rows


def markdown(results):
  info = results["machine"]
  lines = []
  w = lines.append
  w(f"Machine: {info['cpu']}, {info['cpu_count']} cores, {info['platform']};"
    f" backend {info['backend']} ({info['device']}).")
  w(f"Versions: Python {info['python']}, jax {info['jax']}, jaxlib"
    f" {info['jaxlib']}, optax {info['optax']}, flax {info['flax']},"
    f" numpy {info['numpy']}.")
  w(f"ecopt at commit {info.get('git_commit')} (files modified in the working"
    f" tree: {info.get('ecopt_files_modified_since_commit')}).")
  w(f"Run: {info['date']}, mode `{results['mode']}`, load average at start"
    f" {info['load_average']}, at end {results.get('load_average_end')}.")
  w("")
  w("Ratios are per-round same-run ratios (new / base), median over rounds"
    " with [q25, q75]; wall clock, then process CPU time.")
  w("")
  w("### Targets")
  w("")
  w("| target | pair | model | measured (wall) | cpu | limit | met |")
  w("| --- | --- | --- | --- | --- | --- | --- |")
  for row in results["targets"]:
    wall = row.get("wall", row.get("value"))
    cpu = row.get("cpu")
    w(f"| {row['target']} | {row['pair']} | {row['model']} | {wall:.3f} |"
      f" {'' if cpu is None else f'{cpu:.3f}'} | {row['limit']} |"
      f" {'yes' if row['met'] else 'NO'} |")
  w("")
  for kind, title in (("step", "Full step (loss, grad, update, apply)"),
                      ("update", "Update alone (update + apply)")):
    w(f"### {title}")
    w("")
    w("| model | pair | new ms (wall) | base ms (wall) | ratio wall [q25, q75] |"
      " ratio cpu [q25, q75] |")
    w("| --- | --- | --- | --- | --- | --- |")
    for mname, m in results["models"].items():
      times = m[kind]["times"]
      for pair, r in m[kind]["ratios"].items():
        new, base = pair.split("/")
        rw, rc = r["wall"], r["cpu"]
        w(f"| {mname} | {pair} | {times[new]['wall_ms']['median']:.2f} |"
          f" {times[base]['wall_ms']['median']:.2f} |"
          f" {rw['median']:.3f} [{rw['q25']:.3f}, {rw['q75']:.3f}] |"
          f" {rc['median']:.3f} [{rc['q25']:.3f}, {rc['q75']:.3f}] |")
    w("")
  w("### Memory and compile time")
  w("")
  w("| model | pair | param MB | extra step temp MB (x params) |"
    " extra update temp MB (x params) | compile new s | compile base s |"
    " ratio |")
  w("| --- | --- | --- | --- | --- | --- | --- | --- |")
  for mname, m in results["models"].items():
    pb = m["param_bytes"]
    for pair, c in m["compile_ratios"].items():
      new, base = pair.split("/")
      e = m["extra_memory"].get(pair, {})
      st = e.get("step_temp_extra_bytes")
      up = e.get("update_temp_extra_bytes")
      fmt = lambda b: "" if b is None else f"{b / 1e6:.2f} ({b / pb:.3f})"
      w(f"| {mname} | {pair} | {pb / 1e6:.1f} | {fmt(st)} | {fmt(up)} |"
        f" {m['compile'][new]['total_s']:.2f} |"
        f" {m['compile'][base]['total_s']:.2f} | {c['total']:.2f} |")
  w("")
  if results.get("scaling"):
    w("### Update cost vs size (MLP 784-h-h-h-10, update alone)")
    w("")
    w("| h | params m | g_sgd ns/param | sgd ns/param | ratio wall |")
    w("| --- | --- | --- | --- | --- |")
    for row in results["scaling"]:
      w(f"| {row['hidden']} | {row['num_params']} |"
        f" {row['g_sgd_ns_per_param']:.3f} | {row['sgd_ns_per_param']:.3f} |"
        f" {row['ratios']['g_sgd/sgd']['wall']['median']:.3f} |")
    w("")
  if results.get("zoo"):
    w("### Update alone across `ecopt.zoo` architectures (random gradients)")
    w("")
    w("| model | params m | pair | new ms (wall) | base ms (wall) |"
      " ratio wall [q25, q75] |")
    w("| --- | --- | --- | --- | --- | --- |")
    for mname, m in results["zoo"].items():
      for pair, r in m["ratios"].items():
        new, base = pair.split("/")
        rw = r["wall"]
        w(f"| {mname}: {m['description']} | {m['num_params']} | {pair} |"
          f" {m['times'][new]['wall_ms']['median']:.2f} |"
          f" {m['times'][base]['wall_ms']['median']:.2f} |"
          f" {rw['median']:.3f} [{rw['q25']:.3f}, {rw['q75']:.3f}] |")
    w("")
  if results.get("sharded"):
    s = results["sharded"]
    w(f"### Sharded: 8 simulated CPU devices, mesh data=2 x model=4, MLP"
      f" {'-'.join(map(str, s['widths']))}, batch {s['batch']}")
    w("")
    w("| optimizer | unsharded ms | sharded ms | ratio | max rel diff vs"
      " unsharded | collectives in the update alone |")
    w("| --- | --- | --- | --- | --- | --- |")
    for k, v in s["results"].items():
      coll = ", ".join(
          f"{op} x{c['count']} (max {c['max_elements']} elems)"
          for op, c in v["update_collectives"].items()) or "none"
      w(f"| {k} | {v['times']['unsharded']['wall_ms']['median']:.2f} |"
        f" {v['times']['sharded']['wall_ms']['median']:.2f} |"
        f" {v['ratios']['sharded/unsharded']['wall']['median']:.2f} |"
        f" {v['max_rel_diff_after_steps']:.1e} | {coll} |")
    w("")
  return "\n".join(lines)


BEGIN, END = "<!-- overhead:begin -->", "<!-- overhead:end -->"


def write_readme(table):
  with open(README) as f:
    text = f.read()
  if BEGIN in text and END in text:
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    text = head + BEGIN + "\n" + table + "\n" + END + tail
  else:
    text = text.rstrip() + "\n\n" + BEGIN + "\n" + table + "\n" + END + "\n"
  with open(README, "w") as f:
    f.write(text)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="small models and few rounds (a smoke run)")
  parser.add_argument("--rounds", type=int, default=None)
  parser.add_argument("--cnn-rounds", type=int, default=None)
  parser.add_argument("--update-inner", type=int, default=None,
                      help="update calls per round and optimizer")
  parser.add_argument("--step-inner", type=int, default=None)
  parser.add_argument("--compile-reps", type=int, default=None)
  parser.add_argument("--cnn-batch", type=int, default=None,
                      help="CNN batch (default 128; 4 with --quick)")
  parser.add_argument("--models", default="mlp_a,mlp_b,cnn,cnn_wide")
  parser.add_argument("--no-scaling", action="store_true")
  parser.add_argument("--no-zoo", action="store_true",
                      help="skip the update-alone sweep over ecopt.zoo")
  parser.add_argument("--no-sharded", action="store_true")
  parser.add_argument("--out", default=None)
  parser.add_argument("--readme", action="store_true",
                      help="rewrite the results section of benchmarks/README.md")
  parser.add_argument("--sharded-worker", action="store_true",
                      help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  q = args.quick
  args.rounds = args.rounds or (5 if q else 15)
  args.cnn_rounds = args.cnn_rounds or (3 if q else 5)
  args.update_inner = args.update_inner or (3 if q else 5)
  args.step_inner = args.step_inner or (1 if q else 2)
  args.compile_reps = args.compile_reps or (1 if q else 3)

  if args.sharded_worker:
    sharded_worker(args)
    return

  log = lambda s: print(s, flush=True)
  results = {"mode": "quick" if q else "full", "machine": machine_info(),
             "settings": {k: v for k, v in vars(args).items()
                          if k not in ("sharded_worker",)},
             "targets_limits": TARGETS, "models": {}}
  wanted = args.models.split(",")
  for name, desc, builder, batch in model_table(q, args.cnn_batch):
    if name in wanted:
      results["models"][name] = bench_model(name, desc, builder, batch, args,
                                            log)
  if not args.no_scaling:
    results["scaling"] = bench_scaling(args, log)
  if not args.no_zoo:
    results["zoo"] = bench_zoo(args, log)
  if not args.no_sharded:
    results["sharded"] = bench_sharded(args, log)
  results["load_average_end"] = (list(os.getloadavg())
                                 if hasattr(os, "getloadavg") else None)
  results["targets"] = check_targets(results)
  os.makedirs(RESULTS, exist_ok=True)
  out = args.out or os.path.join(
      RESULTS, "overhead_quick.json" if q else "overhead.json")
  with open(out, "w") as f:
    json.dump(results, f, indent=1)
  table = markdown(results)
  print(table)
  if args.readme:
    write_readme(table)
  log(f"wrote {out}")


if __name__ == "__main__":
  main()
