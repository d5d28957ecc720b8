"""Jitted steps and updates with donated carries, timed interleaved.

Every number is a median over rounds with its quartiles; ratios are taken
per round (new / base in the same round) and then summarised, so they are
same-run ratios. Wall clock and process CPU time are both recorded (CPU
time is steadier on a shared machine).
"""

from __future__ import annotations

import random
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ecopt


def stats(xs):
  """Median, quartiles, interquartile range and count of ``xs``."""
  xs = np.asarray(xs, float)
  q25, q50, q75 = np.percentile(xs, [25, 50, 75])
  return {"median": float(q50), "q25": float(q25), "q75": float(q75),
          "iqr": float(q75 - q25), "n": int(xs.size)}


def time_interleaved(runners: dict[str, Callable[[], None]], rounds: int,
                     inner: int, seed: int = 0):
  """Per-call wall and CPU seconds of each runner, round by round.

  Each round runs every runner ``inner`` times, in an order shuffled anew
  every round.
  """
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
  """Times in ms of every runner and same-round ratios of every pair."""
  out = {"times": {}, "ratios": {}}
  for k in wall:
    out["times"][k] = {"wall_ms": stats([1e3 * t for t in wall[k]]),
                       "cpu_ms": stats([1e3 * t for t in cpu[k]])}
  for new, base in pairs:
    if new in wall and base in wall:
      out["ratios"][f"{new}/{base}"] = {
          "wall": stats([a / b for a, b in zip(wall[new], wall[base])]),
          "cpu": stats([a / b for a, b in zip(cpu[new], cpu[base])]),
      }
  return out


def brief(summary):
  """One log line of a summary's wall and CPU ratios."""
  return ", ".join(
      f"{k} {v['wall']['median']:.3f}x (cpu {v['cpu']['median']:.3f}x)"
      for k, v in summary["ratios"].items())


def jit_update(opt):
  """The jitted update alone (``update`` + ``apply_updates``), donated."""

  def update(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(update, donate_argnums=(0, 1))


def fresh(params, opt):
  """A copy of ``params`` (the runs donate theirs away) and its state."""
  params = jax.tree.map(jnp.copy, params)
  return params, opt.init(params)


def runner(fn, params, opt, extra):
  """A closure running ``fn`` once on a donated (params, state) carry.

  It is run twice here, to compile and warm up; ``runner.carry`` holds the
  current params and state.
  """
  carry = list(fresh(params, opt))

  def run():
    carry[0], carry[1] = fn(carry[0], carry[1], *extra)
    jax.block_until_ready(carry[0])

  run()
  run()
  run.carry = carry
  return run


class Case:
  """One model: skeleton-initialised params, a batch, fixed gradients."""

  def __init__(self, model, spec, in_shape, batch, seed=0):
    self.model, self.spec = model, spec
    kx, ky, kp = jax.random.split(jax.random.key(seed), 3)
    self.x = jax.random.normal(kx, (batch,) + tuple(in_shape), jnp.float32)
    self.y = jax.random.randint(ky, (batch,), 0, 10)
    params = model.init(kp, self.x[:1])["params"]
    # The paper's initialisation (every S_e = 1): G-SGD's usual start.
    self.params = ecopt.skeleton_init(params, spec)
    leaves = jax.tree.leaves(self.params)
    self.param_bytes = sum(x.size * x.dtype.itemsize for x in leaves)
    self.num_params = sum(x.size for x in leaves)
    self.grads = jax.jit(jax.grad(self.loss))(self.params, self.x, self.y)

  def loss(self, params, x, y):
    logits = self.model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step_fn(self, opt):
    """The jitted training step (loss, grad, update, apply), donated."""

    def step(params, state, x, y):
      grads = jax.grad(self.loss)(params, x, y)
      updates, state = opt.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))

  def fresh(self, opt):
    return fresh(self.params, opt)

  def step_runner(self, opt):
    return runner(self.step_fn(opt), self.params, opt, (self.x, self.y))

  def update_runner(self, opt):
    return runner(jit_update(opt), self.params, opt, (self.grads,))
