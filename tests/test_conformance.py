"""One optax conformance suite that every ecopt transformation passes.

Each entry of ``TRANSFORMS`` is a factory ``(learning_rate, spec) -> tx``.
Adding a transformation to ecopt means adding it here.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import FrozenDict

import ecopt
import nets

WIDTHS = [5, 7, 4, 3]
N = len(WIDTHS) - 1
SPEC = nets.mlp_spec(WIDTHS)


def _g_sgd(learning_rate, spec):
  return ecopt.g_sgd(learning_rate, spec)


def _g_sgd_momentum(learning_rate, spec):
  return ecopt.g_sgd(learning_rate, spec, momentum=0.9, nesterov=True)


def _g_adam(learning_rate, spec):
  return ecopt.g_space(optax.adam(learning_rate), spec)


TRANSFORMS = {
    "g_sgd": _g_sgd,
    "g_sgd_momentum": _g_sgd_momentum,
    "g_space_adam": _g_adam,
}
try:  # Path-SGD joins the suite once it exists.
  from ecopt import baselines as _baselines

  if hasattr(_baselines, "path_sgd"):
    TRANSFORMS["path_sgd"] = lambda learning_rate, spec: _baselines.path_sgd(learning_rate, spec)
except ImportError:
  pass

LR = 0.01
NAMES = list(TRANSFORMS)


# The inputs (params, data, gradients) are compiled once per dtype: eager
# dispatch compiles a program per op. The transformations under test run as
# each test says (eagerly unless it jits them).
_skeleton = jax.jit(lambda p: ecopt.skeleton_init(p, SPEC, keep_sign=True))


def _setup(dtype=jnp.float64, seed=0):
  params = _skeleton(nets.mlp_params(jax.random.key(seed), WIDTHS, dtype=dtype))
  x, y = nets.data(jax.random.key(seed + 1), WIDTHS[0], WIDTHS[-1], dtype=dtype)
  return params, x, y


@jax.jit
def _grads(params, x, y):
  return jax.grad(nets.mse_loss)(params, x, y, N)


def _tol(dtype):
  return {jnp.float64: 1e-12, jnp.float32: 1e-5}[dtype]


def _close(a, b, tol):
  assert nets.tree_rel_err(a, b) <= tol, nets.tree_rel_err(a, b)


def _steps(tx, params, x, y, n):
  state = tx.init(params)
  for _ in range(n):
    updates, state = tx.update(_grads(params, x, y), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


@pytest.mark.parametrize("name", NAMES)
def test_jit_matches_eager(name):
  params, x, y = _setup()
  tx = TRANSFORMS[name](LR, SPEC)
  state = tx.init(params)
  g = _grads(params, x, y)
  eager, _ = tx.update(g, state, params)
  jitted, _ = jax.jit(tx.update)(g, state, params)
  _close(jitted, eager, 1e-12)
  # init is jittable too.
  chex.assert_trees_all_close(jax.jit(tx.init)(params), state)


@pytest.mark.parametrize("name", NAMES)
def test_lax_scan_matches_python_loop(name):
  params, x, y = _setup()
  tx = TRANSFORMS[name](LR, SPEC)
  looped, _ = _steps(tx, params, x, y, 4)

  def step(carry, _):
    p, s = carry
    u, s = tx.update(_grads(p, x, y), s, p)
    return (optax.apply_updates(p, u), s), None

  (scanned, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=4)
  _close(scanned, looped, 1e-11)
  assert nets.tree_rel_err(scanned, params) > 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams(name):
  params, x, y = _setup()
  factory = TRANSFORMS[name]
  injected = optax.inject_hyperparams(factory)(learning_rate=LR, spec=SPEC)
  state = injected.init(params)
  g = _grads(params, x, y)
  u_injected, _ = injected.update(g, state, params)
  u_plain, _ = factory(LR, SPEC).update(g, factory(LR, SPEC).init(params), params)
  _close(u_injected, u_plain, 1e-12)
  # Changing the hyperparameter in the state changes the step.
  state.hyperparams["learning_rate"] = jnp.asarray(3 * LR)
  u_changed, _ = jax.jit(injected.update)(g, state, params)
  u_expected, _ = factory(3 * LR, SPEC).update(g, factory(3 * LR, SPEC).init(params), params)
  _close(u_changed, u_expected, 1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_schedule_is_followed(name):
  """A schedule that drops to 0 after the first step gives a zero second update."""
  params, x, y = _setup()
  schedule = optax.piecewise_constant_schedule(LR, {1: 0.0})
  tx = TRANSFORMS[name](schedule, SPEC)
  state = tx.init(params)
  u1, state = tx.update(_grads(params, x, y), state, params)
  u_const, _ = TRANSFORMS[name](LR, SPEC).update(
      _grads(params, x, y), TRANSFORMS[name](LR, SPEC).init(params), params
  )
  _close(u1, u_const, 1e-12)
  params = optax.apply_updates(params, u1)
  u2, _ = tx.update(_grads(params, x, y), state, params)
  assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(u2))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_dtypes_are_preserved(name, dtype):
  params64, x64, y64 = _setup(jnp.float64)
  tx = TRANSFORMS[name](LR, SPEC)
  ref, _ = tx.update(_grads(params64, x64, y64), tx.init(params64), params64)
  cast = lambda t: jax.tree.map(lambda a: a.astype(dtype), t)
  params, x, y = cast(params64), x64.astype(dtype), y64.astype(dtype)
  updates, state = jax.jit(tx.update)(_grads(params, x, y), jax.jit(tx.init)(params), params)
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert u.dtype == p.dtype and u.shape == p.shape
    assert bool(jnp.all(jnp.isfinite(u)))
  tol = {jnp.float32: 1e-4, jnp.bfloat16: 5e-2}[dtype]
  assert nets.tree_rel_err(updates, ref) <= tol


@pytest.mark.parametrize("name", NAMES)
def test_no_recompilation(name):
  params, x, y = _setup(jnp.float32)
  tx = TRANSFORMS[name](optax.cosine_decay_schedule(LR, 10), SPEC)
  traces = []

  @jax.jit
  def step(p, s):
    traces.append(None)  # runs only while tracing
    u, s = tx.update(_grads(p, x, y), s, p)
    return optax.apply_updates(p, u), s

  state = tx.init(params)
  for _ in range(5):
    params, state = step(params, state)
  assert len(traces) == 1


@pytest.mark.parametrize("name", NAMES)
def test_partition_and_masked(name):
  params, x, y = _setup()
  params = {**params, "head": {"kernel": jnp.ones((3, 2), jnp.float64)}}
  grads = jax.tree.map(lambda p: 0.1 * jnp.cos(p), params)
  labels = {
      k: jax.tree.map(lambda _, k=k: "plain" if k == "head" else "gspace", v)
      for k, v in params.items()
  }
  tx = optax.partition(
      {"gspace": TRANSFORMS[name](LR, SPEC), "plain": optax.sgd(0.5)}, labels
  )
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  chain_part = {k: v for k, v in params.items() if k != "head"}
  chain_grads = {k: v for k, v in grads.items() if k != "head"}
  inner = TRANSFORMS[name](LR, SPEC)
  expected, _ = inner.update(chain_grads, inner.init(chain_part), chain_part)
  _close({k: v for k, v in updates.items() if k != "head"}, expected, 1e-12)
  _close(updates["head"], jax.tree.map(lambda g: -0.5 * g, grads["head"]), 1e-14)

  mask = {k: jax.tree.map(lambda _: k != "head", v) for k, v in params.items()}
  masked = optax.masked(TRANSFORMS[name](LR, SPEC), mask)
  m_updates, _ = masked.update(grads, masked.init(params), params)
  _close({k: v for k, v in m_updates.items() if k != "head"}, expected, 1e-12)
  _close(m_updates["head"], grads["head"], 0.0)


@pytest.mark.parametrize("name", NAMES)
def test_apply_if_finite(name):
  params, x, y = _setup()
  tx = optax.apply_if_finite(TRANSFORMS[name](LR, SPEC), max_consecutive_errors=3)
  state = tx.init(params)
  g = _grads(params, x, y)
  bad = jax.tree.map(lambda a: a.at[(0,) * a.ndim].set(jnp.nan), g)
  updates, state = jax.jit(tx.update)(bad, state, params)
  assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(updates))
  assert int(state.notfinite_count) == 1
  updates, state = tx.update(g, state, params)
  ref, _ = TRANSFORMS[name](LR, SPEC).update(g, TRANSFORMS[name](LR, SPEC).init(params), params)
  _close(updates, ref, 1e-12)
  assert int(state.notfinite_count) == 0


@pytest.mark.parametrize("name", NAMES)
def test_multi_steps_accumulate(name):
  params, x, y = _setup()
  tx = optax.MultiSteps(TRANSFORMS[name](LR, SPEC), every_k_schedule=2)
  state = tx.init(params)
  x1, x2 = x[:8], x[8:]
  y1, y2 = y[:8], y[8:]
  u1, state = tx.update(_grads(params, x1, y1), state, params)
  assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(u1))
  u2, state = tx.update(_grads(params, x2, y2), state, params)
  mean_g = jax.tree.map(lambda a, b: (a + b) / 2, _grads(params, x1, y1), _grads(params, x2, y2))
  ref, _ = TRANSFORMS[name](LR, SPEC).update(mean_g, TRANSFORMS[name](LR, SPEC).init(params), params)
  # optax.MultiSteps keeps its gradient accumulator in float32 even for
  # float64 params, so the mean gradient is only float32-accurate.
  _close(u2, ref, 1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_chain_after_clipping(name):
  params, x, y = _setup()
  g = jax.tree.map(lambda a: 100.0 * a, _grads(params, x, y))
  tx = optax.chain(optax.clip_by_global_norm(1.0), TRANSFORMS[name](LR, SPEC))
  updates, _ = tx.update(g, tx.init(params), params)
  clipped, _ = optax.clip_by_global_norm(1.0).update(g, None)
  ref, _ = TRANSFORMS[name](LR, SPEC).update(clipped, TRANSFORMS[name](LR, SPEC).init(params), params)
  _close(updates, ref, 1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_update_without_params_is_a_value_error(name):
  params, x, y = _setup()
  tx = TRANSFORMS[name](LR, SPEC)
  with pytest.raises(ValueError, match="params"):
    tx.update(_grads(params, x, y), tx.init(params))


@pytest.mark.parametrize("name", NAMES)
def test_frozendict_and_nnx_state_match_plain_dicts(name):
  from flax import nnx

  params, x, y = _setup()
  tx = TRANSFORMS[name](LR, SPEC)
  g = _grads(params, x, y)
  ref, _ = tx.update(g, tx.init(params), params)
  frozen, fg = FrozenDict(params), FrozenDict(g)
  u_frozen, _ = tx.update(fg, tx.init(frozen), frozen)
  _close(jax.tree.leaves(u_frozen), jax.tree.leaves(ref), 0.0)
  state = nnx.State({k: {n: nnx.Param(a) for n, a in v.items()} for k, v in params.items()})
  gstate = nnx.State({k: {n: nnx.Param(a) for n, a in v.items()} for k, v in g.items()})
  u_nnx, _ = tx.update(gstate, tx.init(state), state)
  _close(jax.tree.leaves(u_nnx), jax.tree.leaves(ref), 0.0)


def test_nnx_optimizer_trains_an_nnx_model():
  from flax import nnx

  class MLP(nnx.Module):

    def __init__(self, rngs):
      self.layers = nnx.List(
          [nnx.Linear(a, b, rngs=rngs) for a, b in zip(WIDTHS[:-1], WIDTHS[1:])]
      )

    def __call__(self, x):
      for i, layer in enumerate(self.layers):
        x = layer(x)
        if i < len(self.layers) - 1:
          x = nnx.relu(x)
      return x

  model = MLP(nnx.Rngs(0))
  spec = ecopt.Chain(*[f"layers/{i}" for i in range(N)])
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.jit(lambda p: ecopt.skeleton_init(p, spec, keep_sign=True))(params))
  start = nnx.state(model, nnx.Param)
  mask = jax.jit(lambda p: ecopt.free_mask(p, spec))(start)
  optimizer = nnx.Optimizer(model, ecopt.g_sgd(LR, spec), wrt=nnx.Param)
  _, x, y = _setup(jnp.float32)
  x, y = x.astype(jnp.float32), y.astype(jnp.float32)
  loss = lambda m: jnp.mean((m(x) - y) ** 2)
  first = float(nnx.jit(loss)(model))

  @nnx.jit  # as nnx training loops run; eager steps compile op by op
  def train_step(model, optimizer):
    optimizer.update(model, nnx.grad(loss)(model))

  for _ in range(5):
    train_step(model, optimizer)
  assert float(nnx.jit(loss)(model)) < first
  end = nnx.state(model, nnx.Param)
  for m, a, b in zip(jax.tree.leaves(mask), jax.tree.leaves(end), jax.tree.leaves(start)):
    np.testing.assert_array_equal(np.asarray(a)[np.asarray(m)], np.asarray(b)[np.asarray(m)])
