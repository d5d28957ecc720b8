"""The plain reference of docs/g-space.md §2-§4 (tests/reference.py), checked twice.

Against the node-by-node oracle (tests/oracle.py): path values, free edges,
path gradients as ``jax.grad`` through the oracle's gauge map, and the
allocation as that gauge map applied to ``v + dv``. Against ecopt's fast path:
``ecopt.basis_path_values``, ``ecopt.free_mask`` and one ``ecopt.g_sgd`` step,
which must be the reference step with ``dv = -lr * dL/dv``. Dense chains of
equal and unequal widths, and conv chains ending in a flatten head, with odd
and even windows. All in float64, to 1e-12.

Gradients are random arrays: the transformation is a map from ``(w, g)`` and
any ``g`` is the gradient of the linear loss ``<g, w>``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ecopt
import nets
import oracle
import reference

TOL = 1e-12

# Compiled once per case (taps static): op-by-op dispatch compiles every
# small op for every new shape, which took seconds per call.
skeleton = jax.jit(reference.skeleton, static_argnums=1)
path_values = jax.jit(reference.path_values, static_argnums=2)
path_gradients = jax.jit(reference.path_gradients, static_argnums=3)
allocate = jax.jit(reference.allocate, static_argnums=4)


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
  """Every program here runs once or twice: skip XLA's optimisation passes (compile time only)."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)

# name: [(layer, leaf shape, window)]; a Dense after a flatten of a (Y, X, C)
# map has leaf shape (Y*X*C, out), view (Y*X, C, out) and window (Y*X,).
CASES = {
    "dense-equal": [("Dense_0", (4, 4), ()), ("Dense_1", (4, 4), ()), ("Dense_2", (4, 4), ())],
    "dense-unequal": [
        ("Dense_0", (3, 5), ()), ("Dense_1", (5, 2), ()), ("Dense_2", (2, 6), ()), ("Dense_3", (6, 3), ()),
    ],
    "conv-odd": [
        ("Conv_0", (3, 3, 2, 3), (3, 3)), ("Conv_1", (1, 3, 3, 4), (1, 3)), ("Dense_0", (9 * 4, 2), (9,)),
    ],
    "conv-even": [
        ("Conv_0", (2, 2, 2, 3), (2, 2)), ("Conv_1", (3, 2, 3, 4), (3, 2)), ("Dense_0", (6 * 4, 3), (6,)),
    ],
}
ODD = ["dense-equal", "dense-unequal", "conv-odd"]


def _case(name, seed=0):
  """Params (every entry +-U(0.5, 1.5): the chart stays regular), grads, views, taps, spec."""
  layers = CASES[name]
  rng = np.random.default_rng(seed)
  params, grads, views, taps = {}, {}, [], []
  n_prev = None
  for layer, shape, window in layers:
    u = rng.uniform(-1.0, 1.0, shape)
    kernel = np.sign(u) * (0.5 + np.abs(u))
    bias = 0.2 * rng.standard_normal(shape[-1])
    params[layer] = {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}
    grads[layer] = {"kernel": jnp.asarray(rng.standard_normal(shape)), "bias": jnp.asarray(rng.standard_normal(shape[-1]))}
    n_in = shape[-2] if n_prev is None or len(shape) > 2 else n_prev
    views.append((int(np.prod(shape)) // (n_in * shape[-1]), n_in, shape[-1]))
    taps.append(reference.centre_tap(window))
    n_prev = shape[-1]
  spec = ecopt.Chain(*[layer for layer, _, _ in layers])
  return params, grads, views, tuple(taps), spec


def _split(tree, case):
  """Kernels as views and biases, in chain order."""
  params, _, views, _, spec = case
  ks = [jnp.reshape(tree[l]["kernel"], v) for l, v in zip(spec.layers, views)]
  return ks, [tree[l]["bias"] for l in spec.layers]


def _join(ks, bs, case):
  params, _, _, _, spec = case
  return {l: {"kernel": jnp.reshape(k, params[l]["kernel"].shape), "bias": b} for l, k, b in zip(spec.layers, ks, bs)}


def _reference_step(case, lr):
  params, grads, _, taps, _ = case
  Ks, bs = _split(params, case)
  gk, gb = _split(grads, case)
  pk, pb = path_gradients(Ks, gk, gb, taps)
  dvk, dvb = [-lr * p for p in pk], [-lr * p for p in pb]
  return allocate(Ks, bs, dvk, dvb, taps), (dvk, dvb)


def _ratios(case, dvk):
  """rho = 1 + dv_s / v_s of every in-skeleton coordinate."""
  params, _, _, taps, _ = case
  Ks, bs = _split(params, case)
  _, ins, _, _ = skeleton(Ks, taps)
  vk, _ = path_values(Ks, bs, taps)
  return np.concatenate([np.asarray(1.0 + dv / v)[m] for dv, v, m in zip(dvk, vk, ins)])


@pytest.fixture
def centre_oracle(monkeypatch):
  """The oracle's skeleton walk, with each view's tap given by the test (the window centre)."""

  def use(Ks, taps):
    by_shape = {K.shape: t for K, t in zip(Ks, taps)}
    assert all(by_shape[K.shape] == t for K, t in zip(Ks, taps)), "views of one shape need one tap"
    monkeypatch.setattr(oracle, "tap", lambda K: by_shape[K.shape])

  return use


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_node_by_node_oracle(name, centre_oracle):
  case = _case(name)
  params, grads, _, taps, _ = case
  Ks, bs = _split(params, case)
  gk, gb = _split(grads, case)
  centre_oracle(Ks, taps)
  diag = [False] * len(Ks)

  vk, vb = path_values(Ks, bs, taps)
  ok, ob = oracle.values(Ks, bs, diag)
  assert nets.tree_rel_err((vk, vb), (ok, ob)) < TOL
  free, _, _, _ = skeleton(Ks, taps)
  for mine, theirs in zip(free, oracle.free_mask(Ks, diag)):
    np.testing.assert_array_equal(np.asarray(mine), theirs)

  gauge = lambda vk, vb: oracle.weights_from(vk, vb, Ks, diag)
  linear_loss = lambda vk, vb: sum(jnp.vdot(g, w) for g, w in zip(gk + gb, sum(gauge(vk, vb), [])))
  want_k, want_b = jax.jit(jax.grad(linear_loss, argnums=(0, 1)))(ok, ob)
  want_k = [jnp.where(f, 0.0, g) for f, g in zip(free, want_k)]
  got_k, got_b = path_gradients(Ks, gk, gb, taps)
  assert nets.tree_rel_err((got_k, got_b), (want_k, want_b)) < 1e-11

  (new_k, new_b), (dvk, dvb) = _reference_step(case, 1e-3)
  assert _ratios(case, dvk).min() > 0.5
  moved_k, moved_b = jax.jit(gauge)([v + d for v, d in zip(ok, dvk)], [v + d for v, d in zip(ob, dvb)])
  assert nets.tree_rel_err((new_k, new_b), (moved_k, moved_b)) < TOL


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_ecopt_fast_path(name):
  case = _case(name, seed=1)
  params, grads, _, taps, spec = case
  Ks, bs = _split(params, case)

  vk, vb = path_values(Ks, bs, taps)
  got = jax.jit(lambda p: ecopt.basis_path_values(p, spec))(params)
  assert nets.tree_rel_err(got, _join(vk, vb, case)) < TOL
  free, _, _, _ = skeleton(Ks, taps)
  mask = ecopt.free_mask(params, spec)
  for layer, f in zip(spec.layers, free):
    np.testing.assert_array_equal(np.asarray(mask[layer]["kernel"]).reshape(f.shape), np.asarray(f))

  lr = 1e-3
  (new_k, new_b), (dvk, _) = _reference_step(case, lr)
  assert _ratios(case, dvk).min() > 0.5
  opt = ecopt.g_sgd(lr, spec)
  updates, _ = jax.jit(opt.update)(grads, opt.init(params), params)
  assert nets.tree_rel_err(optax.apply_updates(params, updates), _join(new_k, new_b, case)) < TOL


@pytest.mark.parametrize("name", ODD)
def test_centre_tap_is_the_old_tap_for_odd_windows(name):
  """For odd windows (and Dense layers) the centre is tap (T-1)//2, ecopt's rule before issue 15."""
  _, _, views, taps, _ = _case(name)
  assert list(taps) == [(T - 1) // 2 for T, _, _ in views]


def test_even_windows_take_the_centre_not_the_old_tap():
  """2x2 -> tap 3 (position (1, 1)), 3x2 -> tap 3 ((1, 1)), a 6-position head -> 3."""
  _, _, views, taps, _ = _case("conv-even")
  assert list(taps) == [3, 3, 3]
  assert [(T - 1) // 2 for T, _, _ in views] == [1, 2, 2]


@pytest.mark.parametrize("name", ["dense-unequal", "conv-odd", "conv-even"])
def test_sign_flip_step_is_the_exact_formula(name):
  """A step that takes in-skeleton path values through zero (rho < 0) is still §3-§4 exactly."""
  case = _case(name, seed=2)
  params, grads, _, _, spec = case
  _, (dvk, _) = _reference_step(case, 1.0)
  # Scale lr so that the most negative ratio is -0.5: a flip, far from zero.
  rho_unit = _ratios(case, dvk) - 1.0
  lr = 1.5 / -rho_unit.min()
  (new_k, new_b), (dvk, _) = _reference_step(case, lr)
  rho = _ratios(case, dvk)
  assert rho.min() < 0 and np.abs(rho).min() > 1e-2
  opt = ecopt.g_sgd(lr, spec)
  updates, _ = jax.jit(opt.update)(grads, opt.init(params), params)
  assert nets.tree_rel_err(optax.apply_updates(params, updates), _join(new_k, new_b, case)) < TOL
