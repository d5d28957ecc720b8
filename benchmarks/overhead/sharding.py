"""The step sharded over 8 simulated CPU devices, against one device.

Mesh data=2 x model=4: the batch over ``data``, hidden units over
``model``. Reported: step time sharded and unsharded, their agreement after
a few steps, and the collectives XLA inserted in the step and in the update
alone (``tests/test_sharding.py`` checks the values and the collectives in
float64; this measures time).

XLA fixes the number of host devices when its CPU backend starts, from
``XLA_FLAGS``. So the sharded run is a child process that receives the flag
in its environment from :func:`run_child`, before it starts: the one place
where the order of jax's initialisation and the flag matters.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from benchmarks.overhead import models
from benchmarks.overhead import timing

DEVICES = 8
MESH = {"data": 2, "model": 4}
OPTIMIZERS = ("sgd_m", "g_sgd_m", "g_adam")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")
_RESULT = "SHARDED_JSON "
_REPO = pathlib.Path(__file__).resolve().parents[2]


def collectives_in(hlo_text):
  """Collectives of a compiled HLO module: count and operand sizes.

  Returns:
    ``{op: {"count", "max_elements", "total_elements"}}`` for every
    collective op found (an async ``-start`` counts as its op).
  """
  found = {}
  pattern = re.compile(
      r"=\s*(\(?[^=]*?\)?)\s+(%s)(?:-start)?\(" % "|".join(COLLECTIVES))
  for line in hlo_text.split("\n"):
    m = pattern.search(line)
    if not m:
      continue
    shapes, op = m.group(1), m.group(2)
    sizes = [math.prod(int(d) for d in dims.split(",") if d)
             for dims in re.findall(r"[a-z]\d+\[([\d,]*)\]", shapes)]
    entry = found.setdefault(op, {"count": 0, "max_elements": 0,
                                  "total_elements": 0})
    entry["count"] += 1
    entry["max_elements"] = max(entry["max_elements"], max(sizes or [0]))
    entry["total_elements"] += sum(sizes)
  return found


def partition_specs(params, model_size):
  """Hidden units over ``model``: a kernel's output dimension where it
  divides, else its input dimension, else replicated."""

  def spec_for(x):
    if x.ndim >= 2:
      if x.shape[-1] % model_size == 0:
        return P(*([None] * (x.ndim - 1)), "model")
      if x.shape[-2] % model_size == 0:
        return P(*([None] * (x.ndim - 2)), "model", None)
      return P()
    return P("model") if x.shape[0] % model_size == 0 else P()

  return jax.tree.map(spec_for, params)


def run_child(args, log):
  """Runs :func:`child_main` in a process with 8 host devices."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={DEVICES}"
                      ).strip()
  cmd = [sys.executable, "-m", "benchmarks.overhead", "--sharded-worker",
         "--rounds", str(args.rounds), "--step-inner", str(args.step_inner)]
  if args.quick:
    cmd.append("--quick")
  proc = subprocess.run(cmd, env=env, cwd=_REPO, capture_output=True,
                        text=True, check=False)
  for line in proc.stdout.splitlines():
    if line.startswith(_RESULT):
      res = json.loads(line[len(_RESULT):])
      for k, v in res["results"].items():
        log(f"[sharded] {k}: sharded/unsharded"
            f" {v['ratios']['sharded/unsharded']['wall']['median']:.2f}x,"
            f" max rel diff {v['max_rel_diff_after_steps']:.2e}")
      return res
  raise RuntimeError("sharded worker failed:\n" + proc.stdout[-3000:] +
                     proc.stderr[-3000:])


def child_main(args, steps=3):
  """The sharded measurement; prints its result as one JSON line."""
  devices = jax.devices()
  if len(devices) != DEVICES:
    raise RuntimeError(f"expected {DEVICES} CPU devices, got {len(devices)}")
  if args.quick:
    widths, batch = [784, 256, 256, 256, 10], 32
  else:
    widths, batch = [784, 1024, 1024, 1024, 10], 128
  model, spec, in_shape = models.make_mlp(widths)
  case = timing.Case(model, spec, in_shape, batch)
  mesh = Mesh(np.array(devices).reshape(tuple(MESH.values())), tuple(MESH))
  specs = partition_specs(case.params, MESH["model"])

  def shard(tree):
    return jax.tree.map(lambda s, x: jax.device_put(x, NamedSharding(mesh, s)),
                        specs, tree, is_leaf=lambda s: isinstance(s, P))

  data = NamedSharding(mesh, P("data"))
  xs, ys = jax.device_put(case.x, data), jax.device_put(case.y, data)
  opts = models.optimizers(spec)
  out = {"widths": widths, "batch": batch, "mesh": MESH, "results": {}}
  for k in OPTIMIZERS:
    opt = opts[k]()
    fn = case.step_fn(opt)
    params, state = case.fresh(opt)
    for _ in range(steps):
      params, state = fn(params, state, case.x, case.y)
    ref = jax.device_get(params)
    params = shard(case.fresh(opt)[0])
    state = opt.init(params)
    step_hlo = fn.lower(params, state, xs, ys).compile().as_text()
    for _ in range(steps):
      params, state = fn(params, state, xs, ys)
    got = jax.device_get(params)
    rel = max(
        float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)))
    sharded_params = shard(case.params)
    update_hlo = timing.jit_update(opt).lower(
        sharded_params, opt.init(sharded_params), shard(case.grads)
    ).compile().as_text()
    runners = {
        "unsharded": timing.runner(fn, case.params, opt, (case.x, case.y)),
        "sharded": timing.runner(fn, sharded_params, opt, (xs, ys)),
    }
    wall, cpu = timing.time_interleaved(runners, args.rounds, args.step_inner)
    out["results"][k] = {
        "max_rel_diff_after_steps": rel,
        "steps": steps,
        "step_collectives": collectives_in(step_hlo),
        "update_collectives": collectives_in(update_hlo),
        **timing.summarise(wall, cpu, [("sharded", "unsharded")]),
    }
  print(_RESULT + json.dumps(out), flush=True)
