"""G-SGD against independent oracles (g-space.md section 5, properties 2-4)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ecopt
import nets
import oracle

ARCHS = [
    pytest.param([3, 5, 4, 2], id="widen-narrow"),
    pytest.param([6, 3, 7, 2], id="narrow-widen"),
    pytest.param([4, 4, 4, 4], id="equal"),
    pytest.param([2, 9, 3], id="two-layers"),
    pytest.param([5, 2, 2, 6, 3], id="deep-mixed"),
]


def _views(params, n):
  ks = [params[f"l{k}"]["kernel"][None] for k in range(n)]
  bs = [params[f"l{k}"].get("bias") for k in range(n)]
  return ks, bs


def _to_params(ks, bs, n):
  out = {}
  for k in range(n):
    out[f"l{k}"] = {"kernel": ks[k][0]}
    if bs[k] is not None:
      out[f"l{k}"]["bias"] = bs[k]
  return out


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("widths", ARCHS)
def test_one_step_matches_autodiff_oracle(widths, bias):
  n = len(widths) - 1
  key = jax.random.key(len(widths) * 7 + bias)
  params = nets.mlp_params(key, widths, bias=bias, away=True)
  x, y = nets.data(jax.random.key(1), widths[0], widths[-1])
  spec = nets.mlp_spec(widths)
  lr = 0.002
  diag = [False] * n
  ks, bs = _views(params, n)

  # Everything below runs compiled: op-by-op dispatch compiles one tiny XLA
  # program per new shape, which costs far more than one jit per function.
  gauge = jax.jit(lambda vk, vb: oracle.weights_from(vk, vb, ks, diag))

  def loss_of_values(vk, vb):
    wk, wb = gauge(vk, vb)
    return nets.mse_loss(_to_params(wk, wb, n), x, y, n)

  vk, vb = oracle.values(ks, bs, diag)
  # The gauge map reproduces the weights (a check of the oracle itself).
  wk, wb = gauge(vk, vb)
  assert nets.tree_rel_err(_to_params(wk, wb, n), params) < 1e-13
  gk, gb = jax.jit(jax.grad(loss_of_values, argnums=(0, 1)))(vk, vb)
  free = oracle.free_mask(ks, diag)

  # Path gradients at the coordinates.
  opt = ecopt.g_space(nets.recording_sgd(lr), spec)
  state = jax.jit(opt.init)(params)
  grads = jax.jit(jax.grad(nets.mse_loss), static_argnums=3)(params, x, y, n)
  updates, state = jax.jit(opt.update)(grads, state, params)
  recorded = state.inner_state
  for k in range(n):
    got = recorded[f"l{k}"]["kernel"][None]
    want = jnp.where(free[k], 0.0, gk[k])
    assert nets.rel_err(got, want) < 1e-11, k
    if bias:
      assert nets.rel_err(recorded[f"l{k}"]["bias"], gb[k]) < 1e-11

  # One step v - lr dL/dv mapped back through the gauge map.
  new_vk = [v - lr * g for v, g in zip(vk, gk)]
  new_vb = [None if v is None else v - lr * g for v, g in zip(vb, gb)]
  # The step stays inside the regular chart (no in-skeleton path shrinks past
  # min_ratio), where the oracle applies unguarded.
  assert min(oracle.in_skeleton_ratios(vk, new_vk, ks, diag)) > 0.01
  wk2, wb2 = gauge(new_vk, new_vb)
  expected = _to_params(wk2, wb2, n)
  got = optax.apply_updates(params, updates)
  assert nets.tree_rel_err(got, expected) < 1e-11

  # g_sgd is the same transformation.
  sgd = ecopt.g_sgd(lr, spec)
  upd2, _ = jax.jit(sgd.update)(grads, jax.jit(sgd.init)(params), params)
  assert nets.tree_rel_err(upd2, updates) < 1e-13


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("widths", ARCHS)
def test_basis_path_values_and_free_mask_match_skeleton_walk(widths, bias):
  n = len(widths) - 1
  params = nets.mlp_params(jax.random.key(3), widths, bias=bias)
  spec = nets.mlp_spec(widths)
  ks, bs = _views(params, n)
  vk, vb = oracle.values(ks, bs, [False] * n)
  got = jax.jit(lambda p: ecopt.basis_path_values(p, spec))(params)
  assert nets.tree_rel_err(got, _to_params(vk, vb, n)) < 1e-14
  masks = oracle.free_mask(ks, [False] * n)
  got_mask = ecopt.free_mask(params, spec)
  for k in range(n):
    np.testing.assert_array_equal(got_mask[f"l{k}"]["kernel"], masks[k][0])
    if bias:
      assert not got_mask[f"l{k}"]["bias"].any()
  H = sum(widths[1:-1])
  m = sum(x.size for x in jax.tree.leaves(params))
  assert ecopt.g_space_dim(params, spec) == m - H
  assert sum(int(x.sum()) for x in jax.tree.leaves(got_mask)) == H


def _paper_closed_form_step(Ws, g, lr):
  """Meng et al. (2019) Appendix 11.1 for an equal-width bias-free MLP.

  Ws[l] is (d, d) for l < L-1 and (d, K) for the last layer. The skeleton
  is the diagonal chain j: W_1[j, j], ..., W_L[j, j mod K]; the first-layer
  diagonal weights are the only non-free skeleton weights. Written per weight
  with Python loops, independent of ecopt.
  """
  L = len(Ws)
  d = Ws[0].shape[0]
  Ws = [np.asarray(w, np.float64) for w in Ws]
  g = [np.asarray(x, np.float64) for x in g]

  def skel(l, j):  # skeleton weight of chain j in layer l (0-based)
    return Ws[l][j, j % Ws[l].shape[1]] if l == L - 1 else Ws[l][j, j]

  def is_skel(l, i, j):
    return (i == j) if l < L - 1 else (j == i % Ws[l].shape[1])

  def S(l, i, j):  # product of the skeleton weights on the basis path of (l,i,j)
    p = 1.0
    for a in range(l):
      p *= skel(a, i)
    if l < L - 1:
      for a in range(l + 1, L):
        p *= skel(a, j)
    return p

  v = {j: np.prod([skel(l, j) for l in range(L)]) for j in range(d)}
  # dL/dv_j = (w g of W_1[j,j] - sum of w g of non-skeleton weights downstream of chain j) / v_j
  dv_skel = {}
  for j in range(d):
    down = 0.0
    for l in range(1, L):
      for jj in range(Ws[l].shape[1]):
        if not is_skel(l, j, jj):
          down += Ws[l][j, jj] * g[l][j, jj]
    dv_skel[j] = (Ws[0][j, j] * g[0][j, j] - down) / v[j]
  new = [w.copy() for w in Ws]
  ratio = {}
  for j in range(d):
    v_new = v[j] - lr * dv_skel[j]
    new[0][j, j] = v_new / np.prod([skel(l, j) for l in range(1, L)])
    ratio[j] = new[0][j, j] / Ws[0][j, j]
    assert ratio[j] > 0.01, "test step must stay inside the regular chart"
  for l in range(L):
    for i in range(Ws[l].shape[0]):
      for j in range(Ws[l].shape[1]):
        if is_skel(l, i, j):
          continue
        s = S(l, i, j)
        v_e = Ws[l][i, j] * s
        v_e_new = v_e - lr * g[l][i, j] / s
        s_new = s * (ratio[i] if l > 0 else 1.0)
        new[l][i, j] = v_e_new / s_new
  return new


@pytest.mark.parametrize("d,K,L", [(4, 3, 3), (5, 5, 4), (3, 2, 2)])
def test_equal_width_step_matches_paper_closed_form(d, K, L):
  widths = [d] * L + [K]
  params = nets.mlp_params(jax.random.key(d * 10 + L), widths, bias=False, away=True)
  x, y = nets.data(jax.random.key(2), d, K)
  lr = 0.002
  grads = jax.jit(jax.grad(nets.mse_loss), static_argnums=3)(params, x, y, L)
  opt = ecopt.g_sgd(lr, nets.mlp_spec(widths))
  updates, _ = jax.jit(opt.update)(grads, jax.jit(opt.init)(params), params)
  got = optax.apply_updates(params, updates)
  want = _paper_closed_form_step(
      [params[f"l{k}"]["kernel"] for k in range(L)],
      [grads[f"l{k}"]["kernel"] for k in range(L)],
      lr,
  )
  for k in range(L):
    np.testing.assert_allclose(got[f"l{k}"]["kernel"], want[k], rtol=1e-11, atol=1e-13)
