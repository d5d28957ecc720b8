"""Trace + compile times of a fresh jitted step, and XLA's memory analysis."""

from __future__ import annotations

import time

import numpy as np

from benchmarks.overhead import timing


def memory_of(compiled):
  """Temp, argument, output and alias bytes of a compiled program."""
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
  """Memory analysis of the compiled update alone."""
  opt = make_opt()
  params, state = case.fresh(opt)
  lowered = timing.jit_update(opt).lower(params, state, case.grads)
  return memory_of(lowered.compile())


def compare(case, opts, step_pairs, update_pairs, reps):
  """Compile ratios and extra temp memory of each pair, against params."""
  step_names = sorted({k for pair in step_pairs for k in pair})
  update_names = sorted({k for pair in update_pairs for k in pair})
  compile_ = {k: compile_times(case, opts[k], reps) for k in step_names}
  memory = {k: update_memory(case, opts[k]) for k in update_names}
  ratios, extra = {}, {}
  for new, base in step_pairs:
    cn, cb = compile_[new], compile_[base]
    ratios[f"{new}/{base}"] = {
        "total": cn["total_s"] / cb["total_s"],
        "compile": cn["compile_s"] / cb["compile_s"],
    }
    mn, mb = cn["step_memory"], cb["step_memory"]
    if mn and mb:
      more = mn["temp_bytes"] - mb["temp_bytes"]
      extra[f"{new}/{base}"] = {
          "step_temp_extra_bytes": more,
          "vs_param_bytes": more / case.param_bytes,
      }
  for new, base in update_pairs:
    mn, mb = memory[new], memory[base]
    if mn and mb:
      more = mn["temp_bytes"] - mb["temp_bytes"]
      extra.setdefault(f"{new}/{base}", {}).update(
          update_temp_extra_bytes=more,
          update_vs_param_bytes=more / case.param_bytes)
  return {"compile": compile_, "update_memory": memory,
          "compile_ratios": ratios, "extra_memory": extra}
