"""skeleton_init's modes: every S_e at 1, and what mode="variance" adds.

Skeleton products are checked two ways: by brute force on a small MLP (the
skeleton chains of g-space.md section 2 followed node by node in Python) and
through ``basis_path_values`` (``v_e = w_e * S_e``, so ``v == w`` everywhere
exactly when every ``S_e`` is 1).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ecopt
from ecopt.zoo import linen as zl

MODES = ("paper", "variance")


def _mlp(widths, key=0):
  net = zl.MLP(features=tuple(widths[1:]))
  params = net.init(jax.random.key(key), jnp.ones((1, widths[0])))["params"]
  return net, jax.tree.map(lambda a: a.astype(jnp.float64), params)


def _brute_force_skeleton_products(kernels):
  """``S[k][i, j] = B(k-1, i) * F(k, j)`` for every edge, by following chains."""
  n = len(kernels)
  widths = [kernels[0].shape[0]] + [k.shape[1] for k in kernels]

  def backward(k, j):  # B(k, j): in-skeleton chain from node (k, j) to level 0
    value = 1.0
    while k > 0:
      i = j % widths[k - 1]
      value *= kernels[k - 1][i, j]
      k, j = k - 1, i
    return value

  def forward(k, j):  # F(k, j): out-skeleton chain from (k, j) to level n
    value = 1.0
    while k < n:
      o = j % widths[k + 1]
      value *= kernels[k][j, o]
      k, j = k + 1, o
    return value

  return [
      np.array([[backward(k - 1, i) * forward(k, j) for j in range(widths[k])]
                for i in range(widths[k - 1])])
      for k in range(1, n + 1)
  ]


def _skeleton_positions(widths):
  """Bool masks of the in- and out-skeleton edges of each Dense layer."""
  n = len(widths) - 1
  masks = [np.zeros((widths[k - 1], widths[k]), bool) for k in range(1, n + 1)]
  for k in range(1, n):  # hidden level k: its in- and out-skeleton edges
    for j in range(widths[k]):
      masks[k - 1][j % widths[k - 1], j] = True
      masks[k][j, j % widths[k + 1]] = True
  return masks


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("keep_sign", [False, True])
@pytest.mark.parametrize("widths", [(5, 7, 3, 6, 2), (4, 4, 4, 3)])
def test_every_skeleton_product_is_one(widths, mode, keep_sign):
  net, params = _mlp(widths)
  params = jax.tree.map(lambda a: a + 0.1, params)  # nonzero biases too
  spec = net.spec()
  init = ecopt.skeleton_init(params, spec, keep_sign=keep_sign, mode=mode)
  kernels = [np.asarray(init[f"Dense_{k}"]["kernel"]) for k in range(len(widths) - 1)]
  for s in _brute_force_skeleton_products(kernels):
    if keep_sign:
      np.testing.assert_array_equal(np.abs(s), 1.0)
    else:
      np.testing.assert_array_equal(s, 1.0)
  values = ecopt.basis_path_values(init, spec)
  for v, w in zip(jax.tree.leaves(values), jax.tree.leaves(init)):
    if keep_sign:
      np.testing.assert_allclose(np.abs(v), np.abs(w), rtol=1e-12)
    else:
      np.testing.assert_allclose(v, w, rtol=1e-12)
  # The skeleton entries are exactly +-1; biases are untouched.
  for k, mask in enumerate(_skeleton_positions(widths)):
    np.testing.assert_array_equal(np.abs(kernels[k][mask]), 1.0)
    np.testing.assert_array_equal(init[f"Dense_{k}"]["bias"], params[f"Dense_{k}"]["bias"])


@pytest.mark.parametrize("keep_sign", [False, True])
def test_variance_mode_sets_each_column_norm_to_hes(keep_sign):
  widths = (6, 9, 9, 4, 3)
  net, params = _mlp(widths, key=3)
  init = ecopt.skeleton_init(params, net.spec(), keep_sign=keep_sign, mode="variance")
  paper = ecopt.skeleton_init(params, net.spec(), keep_sign=keep_sign)
  for k, mask in enumerate(_skeleton_positions(widths)):
    w, w0 = np.asarray(init[f"Dense_{k}"]["kernel"]), np.asarray(params[f"Dense_{k}"]["kernel"])
    count = mask.sum(0)
    # max(2, c_j): the rest fills the column up to 2, or is zeroed when the
    # skeleton entries alone reach 2.
    np.testing.assert_allclose((w ** 2).sum(0), np.maximum(2.0, count), rtol=1e-12)
    # One factor per column on the non-skeleton entries.
    ratio = np.where(mask, np.nan, w / w0)
    for j in range(w.shape[1]):
      column = ratio[:, j][~np.isnan(ratio[:, j])]
      np.testing.assert_allclose(column, column[0], rtol=1e-12)
    np.testing.assert_array_equal(w[mask], np.asarray(paper[f"Dense_{k}"]["kernel"])[mask])
  # The last layer: 9 + ... no, 4 hidden nodes into 3 classes: class 0 has
  # two free weights of 1 (from nodes 0 and 3), so its other entries are 0.
  head = np.asarray(init["Dense_3"]["kernel"])
  np.testing.assert_array_equal(head[1:3, 0], 0.0)


def _hidden_rms(net, params, x):
  """Root mean square of every hidden pre-activation level, in order."""
  _, inter = net.apply({"params": params}, x, capture_intermediates=True,
                       mutable=["intermediates"])
  levels = [inter["intermediates"][f"Dense_{k}"]["__call__"][0]
            for k in range(len(net.features))]
  return np.array([float(jnp.sqrt(jnp.mean(z ** 2))) for z in levels])


def test_variance_mode_with_signs_keeps_the_output_scale_of_a_deep_net():
  depth, width = 16, 64
  net, params = _mlp((width,) * depth + (10,), key=0)
  x = jax.random.normal(jax.random.key(1), (512, width))
  spec = net.spec()
  keep = _hidden_rms(net, ecopt.skeleton_init(params, spec, mode="variance", keep_sign=True), x)
  paper = _hidden_rms(net, ecopt.skeleton_init(params, spec), x)
  # He-like: each hidden level's pre-activation scale within a factor 1.5
  # of the one before. The logits: each class sums c = 6 or 7 hidden
  # activations through free weights of +-1 (64 nodes, 10 classes), about
  # sqrt(c / 2) times the last hidden level's scale.
  steps = keep[1:-1] / keep[:-2]
  assert np.all((steps > 1 / 1.5) & (steps < 1.5)), steps
  head = keep[-1] / keep[-2] / np.sqrt(6.4 / 2)
  assert 1 / 1.5 < head < 1.5, keep
  # The paper's mode grows with depth (the test has teeth).
  assert paper[-1] / paper[0] > 10, paper


def test_variance_mode_on_conv_and_batchnorm_chains():
  for net, shape in [
      (zl.PlainNet(channels=(4, 6), num_classes=3), (1, 8, 8, 2)),
      (zl.PlainNet(channels=(4, 6), num_classes=3, use_bn=True), (1, 8, 8, 2)),
      (zl.CNN1D(channels=(3, 5), num_classes=2, kernel_size=4), (1, 12, 1)),
  ]:
    params = net.init(jax.random.key(0), jnp.ones(shape))["params"]
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    spec = net.spec()
    init = ecopt.skeleton_init(params, spec, mode="variance", keep_sign=True)
    values = ecopt.basis_path_values(init, spec)
    for v, w in zip(jax.tree.leaves(values), jax.tree.leaves(init)):
      np.testing.assert_allclose(np.abs(v), np.abs(w), rtol=1e-12)
    free = ecopt.free_mask(init, spec)
    for w, m in zip(jax.tree.leaves(init), jax.tree.leaves(free)):
      np.testing.assert_array_equal(np.abs(np.asarray(w)[np.asarray(m)]), 1.0)
    if not any("BatchNorm" in str(c) for c in spec):
      kernel = np.asarray(init["Conv_1"]["kernel"])  # (*window, in, out): a column per channel
      column_norms = (kernel ** 2).reshape(-1, kernel.shape[-1]).sum(0)
      np.testing.assert_allclose(column_norms, 2.0, rtol=1e-12)


def test_default_is_the_papers_and_bad_modes_are_rejected():
  net, params = _mlp((3, 4, 2))
  spec = net.spec()
  default = ecopt.skeleton_init(params, spec)
  paper = ecopt.skeleton_init(params, spec, mode="paper")
  for a, b in zip(jax.tree.leaves(default), jax.tree.leaves(paper)):
    np.testing.assert_array_equal(a, b)
  # Paper mode keeps every non-skeleton entry as drawn.
  mask = _skeleton_positions((3, 4, 2))[0]
  np.testing.assert_array_equal(np.asarray(default["Dense_0"]["kernel"])[~mask],
                                np.asarray(params["Dense_0"]["kernel"])[~mask])
  with pytest.raises(ValueError, match="mode must be one of"):
    ecopt.skeleton_init(params, spec, mode="he")
