"""Conv and BatchNorm chains of real Flax models against the autodiff oracle.

The oracle (``tests/oracle.py``) walks the skeleton edge by edge on the layer
views ``K[t, i, j]`` and builds the gauge map ``(v, free weights) -> w`` of
g-space.md section 4 literally. Here the views are cut from Flax kernels by
hand: a conv ``(*window, cin, cout)`` as ``(prod(window), cin, cout)``, a
Dense after a channels-last flatten ``(P*C, out)`` as ``(P, C, out)``, a
BatchNorm scale as a diagonal layer. (1-D convs use the same views; they are
covered by the zoo's CNN1D invariance tests.) ``jax.grad`` of the real model's loss
through the gauge map gives ``dL/dv``; one step ``v - lr dL/dv`` mapped back
must equal ecopt's G-SGD step.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ecopt
import nets
import oracle

F64 = jnp.float64
LR = 0.002


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
  """Everything here compiles once and runs once: skip XLA's optimisation passes.

  Only compile time changes; the flag is restored after the module.
  """
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


class ConvChain(nn.Module):
  """3x3 conv -> ReLU -> max pool -> 1x2 stride-2 conv -> ReLU -> flatten -> Dense.

  The 1x2 window and the 2x2 flatten head have even sizes: their skeleton tap
  is the centre, index ``T//2`` of the ``T`` taps.
  """

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = nn.relu(nn.Conv(3, (3, 3), param_dtype=F64, name="c0")(x))
    x = nn.max_pool(x, (2, 2), (2, 2), padding="SAME")
    x = nn.relu(nn.Conv(2, (1, 2), strides=2, param_dtype=F64, name="c1")(x))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(2, param_dtype=F64, name="d")(x)


class BNChain(nn.Module):
  """conv (outside) -> BN -> ReLU -> 1x3 conv -> ReLU -> avg pool -> flatten -> Dense.

  The chain is (bn, c1, d): BN's scale is the diagonal incoming layer of the
  first hidden level; c0 feeds the BN and is a plain coordinate.
  """

  @nn.compact
  def __call__(self, x, train=True):
    x = nn.Conv(3, (3, 3), use_bias=False, param_dtype=F64, name="c0")(x)
    x = nn.BatchNorm(use_running_average=not train, param_dtype=F64, name="bn")(x)
    x = nn.relu(x)
    x = nn.relu(nn.Conv(2, (1, 3), param_dtype=F64, name="c1")(x))
    x = nn.avg_pool(x, (2, 2), (2, 2), padding="SAME")
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(2, param_dtype=F64, name="d")(x)


def _away(abstract, seed):
  """Every parameter +-U(0.5, 1.5) (numpy, no compilation): a step stays in the regular chart."""
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree_util.tree_flatten(abstract)
  out = []
  for leaf in leaves:
    u = rng.uniform(-1.0, 1.0, leaf.shape)
    out.append(jnp.asarray(np.sign(u) * (0.5 + np.abs(u)), F64))
  return jax.tree_util.tree_unflatten(treedef, out)


def _views(params, layers):
  """Oracle views cut by hand: (name, view_shape or None for diagonal)."""
  ks, bs, diag = [], [], []
  for name, view in layers:
    p = params[name]
    if view is None:
      ks.append(p["scale"])
      diag.append(True)
    else:
      ks.append(p["kernel"].reshape(view))
      diag.append(False)
    bs.append(p.get("bias"))
  return ks, bs, diag


def _write(params, layers, ks, bs):
  out = jax.tree.map(lambda a: a, params)
  for (name, view), k, b in zip(layers, ks, bs):
    layer = dict(out[name])
    key = "scale" if view is None else "kernel"
    layer[key] = k.reshape(params[name][key].shape)
    if b is not None:
      layer["bias"] = b
    out[name] = layer
  return out


CASES = {
    # name: (module, input shape, chain layers with their hand-cut views)
    "conv2d": (
        ConvChain(), (5, 5, 1),
        # 5x5 -> c0 SAME -> 5x5x3 -> pool -> 3x3x3 -> c1 stride 2 -> 2x2x2 -> 8.
        [("c0", (9, 1, 3)), ("c1", (2, 3, 2)), ("d", (4, 2, 2))],
    ),
    "batchnorm": (
        BNChain(), (4, 4, 2),
        # 4x4 -> c0 -> bn -> c1 (1x3) -> 4x4x2 -> pool -> 2x2x2 -> 8.
        [("bn", None), ("c1", (3, 3, 2)), ("d", (4, 2, 2))],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_one_step_matches_autodiff_oracle(name):
  module, in_shape, layers = CASES[name]
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.standard_normal((6,) + in_shape), F64)
  y = jnp.asarray(rng.integers(0, 2, (6,)))
  abstract = jax.eval_shape(module.init, jax.random.key(0), x)
  params = _away(abstract["params"], 12)
  # Train mode below: the running statistics are only carried along.
  stats = _away(abstract["batch_stats"], 13) if "batch_stats" in abstract else None

  def apply(p):
    if stats is None:
      return module.apply({"params": p}, x)
    # Train mode: batch statistics (the chain's invariance holds in both modes).
    return module.apply(
        {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
    )[0]

  def loss(p):
    return optax.softmax_cross_entropy_with_integer_labels(apply(p), y).mean()

  spec = ecopt.Chain(*[n for n, _ in layers])
  ks, bs, diag = _views(params, layers)

  # The views are those ecopt resolves from shapes.
  geometry = ecopt.structure.resolve(params, spec).chains[0]
  assert [l.view_shape for l in geometry.layers] == [
      (k.shape[0],) if d else k.shape for k, d in zip(ks, diag)
  ]

  # The oracle's values are plain numpy; its gauge map and gradient run
  # compiled (eager dispatch compiles a program per op and shape).
  vk, vb = oracle.values(ks, bs, diag)
  gauge = jax.jit(lambda vk, vb: oracle.weights_from(vk, vb, ks, diag))
  wk, wb = gauge(vk, vb)
  assert nets.tree_rel_err(_write(params, layers, wk, wb), params) < 1e-13

  values = jax.jit(lambda p: ecopt.basis_path_values(p, spec))(params)
  assert nets.tree_rel_err(values, _write(params, layers, vk, vb)) < 1e-13
  free = oracle.free_mask(ks, diag)
  mask = ecopt.free_mask(params, spec)
  for (n, view), m, d in zip(layers, free, diag):
    got = mask[n]["scale" if d else "kernel"]
    np.testing.assert_array_equal(np.asarray(got).reshape(m.shape), m)

  def loss_of_values(vk, vb):
    wk, wb = oracle.weights_from(vk, vb, ks, diag)
    return loss(_write(params, layers, wk, wb))

  gk, gb = jax.jit(jax.grad(loss_of_values, argnums=(0, 1)))(vk, vb)

  opt = ecopt.g_space(nets.recording_sgd(LR), spec)
  grads = jax.jit(jax.grad(loss))(params)
  updates, state = jax.jit(opt.update)(grads, jax.jit(opt.init)(params), params)
  recorded = state.inner_state
  for (n, view), g, f, d in zip(layers, gk, free, diag):
    got = recorded[n]["scale" if d else "kernel"].reshape(g.shape)
    assert nets.rel_err(got, jnp.where(f, 0.0, g)) < 1e-10, n
  for (n, _), g in zip(layers, gb):
    if g is not None:
      assert nets.rel_err(recorded[n]["bias"], g) < 1e-10, n

  new_vk = [v - LR * g for v, g in zip(vk, gk)]
  new_vb = [None if v is None else v - LR * g for v, g in zip(vb, gb)]
  assert min(oracle.in_skeleton_ratios(vk, new_vk, ks, diag)) > 0.01
  wk2, wb2 = gauge(new_vk, new_vb)
  expected = _write(params, layers, wk2, wb2)
  got = optax.apply_updates(params, updates)
  for n, _ in layers:
    assert nets.tree_rel_err(got[n], expected[n]) < 1e-10, n

  # Parameters outside the chain (the conv before BN) are their own
  # coordinates: path gradient = gradient, step = plain SGD.
  for n in set(params) - {n for n, _ in layers}:
    assert nets.tree_rel_err(recorded[n], grads[n]) < 1e-15
    assert nets.tree_rel_err(updates[n], jax.tree.map(lambda g: -LR * g, grads[n])) < 1e-15
