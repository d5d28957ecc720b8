"""canonicalize, skeleton_init, rescale, scale_nodes (g-space.md section 7)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ecopt
import nets

ARCHS = [[4, 6, 3, 2], [5, 2, 7, 3], [3, 3, 3]]


@pytest.mark.parametrize("widths", ARCHS, ids=str)
def test_canonicalize_keeps_function_and_path_values(widths):
  n = len(widths) - 1
  params = nets.mlp_params(jax.random.key(0), widths)
  spec = nets.mlp_spec(widths)
  # Compiled (eager dispatch compiles a program per op and shape).
  canonicalize = jax.jit(lambda p: ecopt.canonicalize(p, spec))
  values = jax.jit(lambda p: ecopt.basis_path_values(p, spec))
  apply = jax.jit(lambda p, x: nets.mlp_apply(p, x, n))
  canon = canonicalize(params)
  x, _ = nets.data(jax.random.key(1), widths[0], widths[-1])
  assert nets.rel_err(apply(canon, x), apply(params, x)) < 1e-13
  assert nets.tree_rel_err(values(canon), values(params)) < 1e-13
  mask = jax.jit(lambda p: ecopt.free_mask(p, spec))(params)
  for m, w, w0 in zip(jax.tree.leaves(mask), jax.tree.leaves(canon), jax.tree.leaves(params)):
    m, w, w0 = np.asarray(m), np.asarray(w), np.asarray(w0)
    np.testing.assert_allclose(np.abs(w[m]), 1.0, rtol=1e-14)
    np.testing.assert_array_equal(np.sign(w[m]), np.sign(w0[m]))
  # It is a projection: canonical params are their own canonical form, and
  # every rescaled copy has the same canonical form.
  assert nets.tree_rel_err(canonicalize(canon), canon) < 1e-14
  scaled = jax.jit(lambda p, k: ecopt.rescale(p, spec, k, log_range=3.0))(params, jax.random.key(2))
  assert nets.tree_rel_err(canonicalize(scaled), canon) < 1e-12


def test_canonicalize_leaves_a_node_with_zero_free_weight_unscaled():
  params = {"l0": {"kernel": jnp.array([[2.0, 3.0]])}, "l1": {"kernel": jnp.array([[0.0], [4.0]])}}
  canon = ecopt.canonicalize(params, ecopt.Chain("l0", "l1"))
  np.testing.assert_allclose(canon["l0"]["kernel"], [[2.0, 12.0]])
  np.testing.assert_allclose(canon["l1"]["kernel"], [[0.0], [1.0]])


@pytest.mark.parametrize("keep_sign", [False, True])
@pytest.mark.parametrize("widths", ARCHS, ids=str)
def test_skeleton_init_sets_skeleton_weights(widths, keep_sign):
  params = nets.mlp_params(jax.random.key(3), widths)
  spec = nets.mlp_spec(widths)
  init = ecopt.skeleton_init(params, spec, keep_sign=keep_sign)
  n = len(widths) - 1
  skeleton = set()
  for k in range(1, n):  # hidden levels; layer index k-1 feeds level k
    for j in range(widths[k]):
      skeleton.add((k - 1, j % widths[k - 1], j))  # in-skeleton edge of (k, j)
      skeleton.add((k, j, j % widths[k + 1]))  # out-skeleton edge of (k, j)
  for layer in range(n):
    w, w0 = init[f"l{layer}"]["kernel"], params[f"l{layer}"]["kernel"]
    for i in range(w.shape[0]):
      for j in range(w.shape[1]):
        if (layer, i, j) in skeleton:
          want = (1.0 if w0[i, j] >= 0 else -1.0) if keep_sign else 1.0
          assert w[i, j] == want
        else:
          assert w[i, j] == w0[i, j]
    np.testing.assert_array_equal(init[f"l{layer}"]["bias"], params[f"l{layer}"]["bias"])
  # Every all-skeleton path value, hence every S_e, is +-1: a non-skeleton
  # coordinate's basis-path value is the weight itself, up to sign.
  values = ecopt.basis_path_values(init, spec)
  for layer in range(n):
    np.testing.assert_allclose(
        np.abs(values[f"l{layer}"]["kernel"]), np.abs(init[f"l{layer}"]["kernel"]), rtol=1e-14
    )


def test_scale_nodes_is_function_preserving_and_validates_shapes():
  widths = [3, 4, 2]
  params = nets.mlp_params(jax.random.key(4), widths)
  spec = nets.mlp_spec(widths)
  factors = [[jnp.array([2.0, 0.5, 3.0, 1.0])]]
  scaled = ecopt.scale_nodes(params, spec, factors)
  np.testing.assert_allclose(scaled["l0"]["kernel"], params["l0"]["kernel"] * factors[0][0])
  np.testing.assert_allclose(scaled["l0"]["bias"], params["l0"]["bias"] * factors[0][0])
  np.testing.assert_allclose(scaled["l1"]["kernel"], params["l1"]["kernel"] / factors[0][0][:, None])
  x, _ = nets.data(jax.random.key(5), 3, 2)
  assert nets.rel_err(nets.mlp_apply(scaled, x, 2), nets.mlp_apply(params, x, 2)) < 1e-14
  with pytest.raises(ValueError, match="level 1"):
    ecopt.scale_nodes(params, spec, [[jnp.ones(3)]])


@pytest.mark.parametrize("widths", ARCHS, ids=str)
def test_canonicalize_moves_skeleton_products_not_g_sgd_relative_steps(widths):
  """Why canonicalize cannot stand in for skeleton_init (docs/g-space.md section 7).

  A node scaling multiplies ``S_e = v_e / w_e`` of an edge ``i -> j`` by
  ``c_i / c_j``, so the skeleton products move; but G-SGD's step relative to
  each weight does not. In canonical form ``S_e`` is, up to sign, the
  all-skeleton path value through ``i`` (the in-skeleton coordinate of ``i``;
  1 in the first layer), which no scaling changes.
  """
  n = len(widths) - 1
  params = nets.mlp_params(jax.random.key(3), widths)
  spec = nets.mlp_spec(widths)
  x, y = nets.data(jax.random.key(4), widths[0], widths[-1])
  values = jax.jit(lambda p: ecopt.basis_path_values(p, spec))
  opt = ecopt.g_sgd(0.05, spec)

  @jax.jit
  def relative_step(p):
    grads = jax.grad(nets.mse_loss)(p, x, y, n)
    updates, _ = opt.update(grads, opt.init(p), p)
    return jax.tree.map(lambda u, w: u / w, updates, p)

  canon = ecopt.canonicalize(params, spec)
  v = values(canon)
  products = lambda p, v: [np.asarray(v[f"l{k}"]["kernel"] / p[f"l{k}"]["kernel"])
                           for k in range(n)]
  s_params, s_canon = products(params, values(params)), products(canon, v)
  assert max(np.abs(a - b).max() / np.abs(b).max() for a, b in zip(s_params, s_canon)) > 1e-2
  assert nets.tree_rel_err(relative_step(canon), relative_step(params)) < 1e-10
  np.testing.assert_allclose(np.abs(s_canon[0]), 1.0, rtol=1e-13)
  for k in range(1, n):
    in_skeleton = np.asarray(v[f"l{k - 1}"]["kernel"])[
        np.arange(widths[k]) % widths[k - 1], np.arange(widths[k])]
    expected = np.abs(in_skeleton)[:, None] * np.ones(widths[k + 1])
    np.testing.assert_allclose(np.abs(s_canon[k]), expected, rtol=1e-12)
