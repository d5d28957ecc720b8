"""Exact invariance under node scaling (g-space.md section 5, property 1)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ecopt
import nets

STEPS = 25


def two_chain_params(key, dtype, bias=True):
  """Two chains joined by a tanh, plus a parameter outside every chain."""
  ka, kb = jax.random.split(key)
  params = {
      **nets.mlp_params(ka, [5, 7, 4], bias=bias, dtype=dtype, prefix="a"),
      **nets.mlp_params(kb, [4, 3, 6, 2], bias=bias, dtype=dtype, prefix="b"),
  }
  params["gain"] = jnp.asarray([1.3, 0.7], dtype)
  spec = [ecopt.Chain("a0", "a1"), ecopt.Chain("b0", "b1", "b2")]
  return params, spec


def two_chain_apply(params, x):
  h = jnp.tanh(nets.mlp_apply(params, x, 2, prefix="a"))
  return nets.mlp_apply(params, h, 3, prefix="b") * params["gain"]


def _mlp_case(widths, bias):
  n = len(widths) - 1

  def make(key, dtype):
    return nets.mlp_params(key, widths, bias=bias, dtype=dtype), nets.mlp_spec(widths)

  return make, functools.partial(_apply_mlp, n=n), widths[0], widths[-1]


def _apply_mlp(params, x, n):
  return nets.mlp_apply(params, x, n)


CASES = {
    "widen-narrow-bias": _mlp_case([6, 9, 4, 3], True),
    "narrow-widen-nobias": _mlp_case([6, 3, 8, 2], False),
    "deep-bias": _mlp_case([4, 5, 5, 3, 7, 2], True),
    "two-chains": (two_chain_params, two_chain_apply, 5, 2),
}

OPTIMIZERS = {
    "g_sgd": lambda spec: ecopt.g_sgd(0.02, spec),
    "g_sgd_momentum": lambda spec: ecopt.g_sgd(0.004, spec, momentum=0.9, nesterov=True),
    "g_adam": lambda spec: ecopt.g_space(optax.adam(3e-3), spec),
    "g_adamw_chain": lambda spec: ecopt.g_space(
        optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-3, weight_decay=1e-2)), spec
    ),
}


def _train(opt, params, apply_fn, x, y, steps):
  def loss(p):
    return jnp.mean((apply_fn(p, x) - y) ** 2)

  def step(carry, _):
    p, s = carry
    u, s = opt.update(jax.grad(loss)(p), s, p)
    return (optax.apply_updates(p, u), s), None

  def run(p):
    (p, _), _ = jax.lax.scan(step, (p, opt.init(p)), None, length=steps)
    return p

  return jax.jit(run)(params)


def _train_both(opt, params_a, params_b, apply_fn, x, y, steps):
  """Trains two copies in one compiled program (vmap over the pair)."""
  stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), params_a, params_b)
  ends = jax.jit(jax.vmap(lambda p: _train(opt, p, apply_fn, x, y, steps)))(stacked)
  return jax.tree.map(lambda e: e[0], ends), jax.tree.map(lambda e: e[1], ends)


def _run_pair(case, make_opt, dtype, seed=0):
  make, apply_fn, n_in, n_out = CASES[case]
  params, spec = make(jax.random.key(seed), dtype)

  # Compiled: eager dispatch compiles a program per op (and rescale's random
  # draws per shape).
  @jax.jit
  def starts(params, key):
    params = ecopt.skeleton_init(params, spec, keep_sign=True)
    return params, ecopt.rescale(params, spec, key, log_range=2.0)

  params, scaled = starts(params, jax.random.key(seed + 1))
  x, y = nets.data(jax.random.key(seed + 2), n_in, n_out, batch=32, dtype=dtype)
  apply_fn = jax.jit(apply_fn)
  # The two starting points compute the same function.
  assert nets.rel_err(apply_fn(scaled, x), apply_fn(params, x)) < (
      1e-12 if dtype == jnp.float64 else 1e-5
  )
  opt = make_opt(spec)
  end_a, end_b = _train_both(opt, params, scaled, apply_fn, x, y, STEPS)
  x_test, _ = nets.data(jax.random.key(seed + 3), n_in, n_out, batch=64, dtype=dtype)
  moved = nets.rel_err(apply_fn(end_a, x_test), apply_fn(params, x_test))
  gap = nets.rel_err(apply_fn(end_b, x_test), apply_fn(end_a, x_test))
  return moved, gap, (end_a, end_b, spec)


# Every case with G-SGD, and every optimizer on at least one case.
F64_PAIRS = [(case, "g_sgd") for case in CASES] + [
    ("widen-narrow-bias", "g_adam"),
    ("deep-bias", "g_sgd_momentum"),
    ("two-chains", "g_adamw_chain"),
    ("narrow-widen-nobias", "g_sgd_momentum"),
]


@pytest.mark.parametrize("case,opt_name", F64_PAIRS)
def test_float64_trajectories_coincide(case, opt_name):
  moved, gap, (end_a, end_b, spec) = _run_pair(case, OPTIMIZERS[opt_name], jnp.float64)
  assert moved > 1e-3, "training must actually move the function"
  assert gap <= 1e-10
  # The basis-path values coincide too.
  values = jax.jit(lambda p: ecopt.basis_path_values(p, spec))
  assert nets.tree_rel_err(values(end_b), values(end_a)) <= 1e-10


@pytest.mark.parametrize(
    "case,opt_name",
    [("widen-narrow-bias", "g_sgd"), ("two-chains", "g_sgd_momentum"), ("deep-bias", "g_sgd")],
)
def test_float32_trajectories_coincide(case, opt_name):
  moved, gap, _ = _run_pair(case, OPTIMIZERS[opt_name], jnp.float32)
  assert moved > 1e-3
  assert gap <= 1e-4


@pytest.mark.parametrize("case", ["deep-bias", "two-chains"])
def test_plain_sgd_is_not_invariant(case):
  """The same experiment with optax.sgd: rescaled copies train differently."""
  moved, gap, _ = _run_pair(case, lambda spec: optax.sgd(0.02), jnp.float64)
  assert moved > 1e-3
  assert gap > 1e-3


@pytest.mark.parametrize(
    "case,opt_name",
    [("widen-narrow-bias", "g_sgd_momentum"), ("two-chains", "g_adamw_chain")],
)
def test_free_weights_never_change(case, opt_name):
  make, apply_fn, n_in, n_out = CASES[case]
  params, spec = make(jax.random.key(5), jnp.float64)
  start = jax.jit(lambda p, k: ecopt.rescale(ecopt.skeleton_init(p, spec), spec, k))(
      params, jax.random.key(6)
  )
  x, y = nets.data(jax.random.key(7), n_in, n_out, batch=32)
  end = _train(OPTIMIZERS[opt_name](spec), start, apply_fn, x, y, STEPS)
  mask = jax.jit(lambda p: ecopt.free_mask(p, spec))(start)
  n_free = 0
  for m, a, b in zip(jax.tree.leaves(mask), jax.tree.leaves(end), jax.tree.leaves(start)):
    m, a, b = np.asarray(m), np.asarray(a), np.asarray(b)
    assert np.array_equal(a[m], b[m]), "a free weight moved"
    n_free += int(m.sum())
  assert n_free == sum(g.num_hidden for g in ecopt.structure.resolve(start, spec).chains)
  moved = [float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(jax.tree.leaves(end), jax.tree.leaves(start))]
  assert max(moved) > 1e-3
