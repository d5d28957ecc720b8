"""One run of the overhead benchmark, and its command line.

Per model: the update alone and the full step, timed interleaved against
the optax counterparts; then compile times and memory. Then the update's
cost at three MLP sizes, the update alone across ``ecopt.zoo``
architectures, and the sharded run. Writes
``benchmarks/results/overhead.json`` (``--out`` elsewhere) and prints the
markdown tables; ``--readme`` also puts them into ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ecopt
from benchmarks.overhead import compile_memory
from benchmarks.overhead import models
from benchmarks.overhead import report
from benchmarks.overhead import sharding
from benchmarks.overhead import timing

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results"


def _timed(runners, pairs, rounds, inner):
  wall, cpu = timing.time_interleaved(runners, rounds, inner)
  return timing.summarise(wall, cpu, pairs)


def bench_model(name, desc, builder, batch, args, log):
  """Update alone, full step, compile times and memory of one model."""
  model, spec, in_shape = builder()
  case = timing.Case(model, spec, in_shape, batch)
  opts = models.optimizers(spec)
  log(f"[{name}] {desc}, batch {batch}: {case.num_params} params")
  result = {"description": desc,
            "model_source": f"{type(model).__module__}.{type(model).__name__}",
            "batch": batch, "num_params": case.num_params,
            "param_bytes": case.param_bytes}

  names = sorted({k for pair in models.UPDATE_PAIRS for k in pair})
  runners = {k: case.update_runner(opts[k]()) for k in names}
  result["update"] = _timed(runners, models.UPDATE_PAIRS, args.rounds,
                            args.update_inner)
  del runners
  log(f"[{name}] update: " + timing.brief(result["update"]))

  names = sorted({k for pair in models.STEP_PAIRS for k in pair})
  runners = {k: case.step_runner(opts[k]()) for k in names}
  for k, run in runners.items():
    if not all(bool(jnp.isfinite(x).all())
               for x in jax.tree.leaves(run.carry[0])):
      raise RuntimeError(f"{name}/{k}: non-finite params after warm-up")
  rounds = args.cnn_rounds if name.startswith("cnn") else args.rounds
  result["step"] = _timed(runners, models.STEP_PAIRS, rounds, args.step_inner)
  del runners
  log(f"[{name}] step: " + timing.brief(result["step"]))

  result.update(compile_memory.compare(case, opts, models.STEP_PAIRS,
                                       models.UPDATE_PAIRS, args.compile_reps))
  log(f"[{name}] compile: " + ", ".join(
      f"{k} {v['total']:.2f}x" for k, v in result["compile_ratios"].items()))
  log(f"[{name}] memory: " + json.dumps(result["extra_memory"]))
  return result


def bench_scaling(args, log):
  """Update-alone time of g_sgd and sgd at three MLP sizes."""
  out = []
  for h in (64, 128, 256) if args.quick else (256, 512, 1024):
    model, spec, in_shape = models.make_mlp([784, h, h, h, 10])
    case = timing.Case(model, spec, in_shape, 8)
    opts = models.optimizers(spec)
    runners = {k: case.update_runner(opts[k]()) for k in ("sgd", "g_sgd")}
    res = _timed(runners, [("g_sgd", "sgd")], args.rounds, args.update_inner)
    row = {"hidden": h, "num_params": case.num_params, **res}
    for k in ("sgd", "g_sgd"):
      times = res["times"][k]
      row[f"{k}_ns_per_param"] = (
          1e6 * times["wall_ms"]["median"] / case.num_params)
      row[f"{k}_cpu_ns_per_param"] = (
          1e6 * times["cpu_ms"]["median"] / case.num_params)
    out.append(row)
    log(f"[scaling] h={h} m={case.num_params}: g_sgd"
        f" {row['g_sgd_ns_per_param']:.3f} ns/param, sgd"
        f" {row['sgd_ns_per_param']:.3f} ns/param")
  return out


def bench_zoo(args, log):
  """Update alone of g_sgd and g_space(adam) across ``ecopt.zoo``.

  Random gradients (the update's cost does not depend on their values),
  params from ``ecopt.skeleton_init``.
  """
  pairs = [("g_sgd", "sgd"), ("g_adam", "adam")]
  out = {}
  for name, desc, model, shape in models.zoo_table(args.quick):
    x = jnp.ones((2,) + tuple(shape), jnp.float32)
    spec = model.spec()
    params = ecopt.skeleton_init(
        model.init(jax.random.key(0), x)["params"], spec)
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(0)
    grads = jax.tree.unflatten(treedef, [
        jnp.asarray(1e-2 * rng.standard_normal(l.shape), l.dtype)
        for l in leaves])
    opts = models.optimizers(spec)
    runners = {}
    for k in ("sgd", "g_sgd", "adam", "g_adam"):
      opt = opts[k]()
      runners[k] = timing.runner(timing.jit_update(opt), params, opt, (grads,))
    res = _timed(runners, pairs, args.rounds, args.update_inner)
    out[name] = {"description": desc, "input": list(shape),
                 "num_params": int(sum(l.size for l in leaves)), **res}
    log(f"[zoo] {name} ({out[name]['num_params']} params): "
        + timing.brief(res))
  return out


def parse_args(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.overhead",
      description="What G-space optimization costs beyond back-propagation.")
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
                      help="rewrite the tables in benchmarks/README.md")
  parser.add_argument("--sharded-worker", action="store_true",
                      help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  q = args.quick
  args.rounds = args.rounds or (5 if q else 15)
  args.cnn_rounds = args.cnn_rounds or (3 if q else 5)
  args.update_inner = args.update_inner or (3 if q else 5)
  args.step_inner = args.step_inner or (1 if q else 2)
  args.compile_reps = args.compile_reps or (1 if q else 3)
  return args


def main(argv=None):
  args = parse_args(argv)
  if args.sharded_worker:
    sharding.child_main(args)
    return

  def log(line):
    print(line, flush=True)

  results = {"mode": "quick" if args.quick else "full",
             "machine": report.machine_info(),
             "settings": {k: v for k, v in vars(args).items()
                          if k != "sharded_worker"},
             "targets_limits": report.TARGETS, "models": {}}
  wanted = args.models.split(",")
  for name, desc, builder, batch in models.model_table(args.quick,
                                                       args.cnn_batch):
    if name in wanted:
      results["models"][name] = bench_model(name, desc, builder, batch, args,
                                            log)
  if not args.no_scaling:
    results["scaling"] = bench_scaling(args, log)
  if not args.no_zoo:
    results["zoo"] = bench_zoo(args, log)
  if not args.no_sharded:
    results["sharded"] = sharding.run_child(args, log)
  results["load_average_end"] = report.load_average()
  results["targets"] = report.check_targets(results)
  if args.out:
    out = pathlib.Path(args.out)
  else:
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("overhead_quick.json" if args.quick else "overhead.json")
  out.write_text(json.dumps(results, indent=1), encoding="utf-8")
  table = report.markdown(results)
  print(table)
  if args.readme:
    report.write_readme(table)
  log(f"wrote {out}")
