"""Path-SGD: kappa against brute-force path enumeration, invariance, optax."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ecopt
import nets
from ecopt.baselines import path_sgd, scale_by_path_norm
from ecopt.baselines import path_kappa as _path_kappa

path_kappa = jax.jit(_path_kappa, static_argnums=1)


# ------------------------------------------------- brute-force oracle ---


def brute_kappa(kernels, biases, diagonal):
  """kappa of every edge by enumerating every path, node by node.

  ``kernels[k]`` is a ``(T, in, out)`` view (or a vector if ``diagonal[k]``),
  ``biases[k]`` a vector or None. A path starts at a level-0 node or at the
  constant node of some layer's bias, then takes one edge (a tap) per layer up
  to the output. For each edge on the path the product of the *other* edges'
  squared weights is added to that edge's kappa.
  """
  kernels = [np.asarray(K, np.float64) for K in kernels]
  n = len(kernels)
  kap = [np.zeros_like(K) for K in kernels]
  kap_b = [None if b is None else np.zeros(len(b)) for b in biases]

  def out_edges(k, i):
    """Edges of layer k (0-based) leaving node i: (index, weight, next node)."""
    K = kernels[k]
    if diagonal[k]:
      return [((i,), K[i], i)]
    return [((t, i, j), K[t, i, j], j) for t in range(K.shape[0]) for j in range(K.shape[2])]

  def walk(k, node, edges):
    if k == n:
      sq = [w * w for _, _, w in edges]
      for pos, (kind, idx, _) in enumerate(edges):
        others = np.prod([s for q, s in enumerate(sq) if q != pos])
        if kind == "b":
          kap_b[idx[0]][idx[1]] += others
        else:
          kap[idx[0]][idx[1]] += others
      return
    for idx, w, nxt in out_edges(k, node):
      walk(k + 1, nxt, edges + [("w", (k, idx), w)])

  n_in = kernels[0].shape[0] if diagonal[0] else kernels[0].shape[1]
  for i in range(n_in):
    walk(0, i, [])
  for k, b in enumerate(biases):
    if b is None:
      continue
    for j in range(len(b)):
      walk(k + 1, j, [("b", (k, j), float(b[j]))])
  return kap, kap_b


def _rand(seed, shape, dtype=jnp.float64):
  """Normal numbers from numpy (eager jax.random compiles per shape: slow)."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _mlp(seed, widths, *, bias=True, dtype=jnp.float64):
  """Like nets.mlp_params, from numpy: {l0: {kernel, bias}, ...}."""
  rng = np.random.default_rng(seed)
  params = {}
  for k in range(len(widths) - 1):
    layer = {"kernel": jnp.asarray(
        rng.normal(size=(widths[k], widths[k + 1])) * 1.5 / np.sqrt(widths[k]), dtype)}
    if bias:
      layer["bias"] = jnp.asarray(0.1 * rng.normal(size=widths[k + 1]), dtype)
    params[f"l{k}"] = layer
  return params


def _data(seed, n_in, n_out, batch=16, dtype=jnp.float64):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(batch, n_in)), dtype),
          jnp.asarray(rng.normal(size=(batch, n_out)), dtype))


def _factors(seed, widths, log_range, dtype=jnp.float64):
  rng = np.random.default_rng(seed)
  return [[jnp.asarray(np.exp(rng.uniform(-log_range, log_range, h)), dtype)
           for h in widths[1:-1]]]


scale_nodes = jax.jit(ecopt.scale_nodes, static_argnums=1)


def test_kappa_dense_matches_enumeration():
  widths = [3, 4, 2, 3]
  params = _mlp(0, widths, bias=True)
  kappa = path_kappa(params, nets.mlp_spec(widths))
  ks = [params[f"l{k}"]["kernel"][None] for k in range(3)]
  bs = [params[f"l{k}"]["bias"] for k in range(3)]
  want, want_b = brute_kappa(ks, bs, [False] * 3)
  for k in range(3):
    np.testing.assert_allclose(kappa[f"l{k}"]["kernel"], want[k][0], rtol=1e-12)
    np.testing.assert_allclose(kappa[f"l{k}"]["bias"], want_b[k], rtol=1e-12)


def test_kappa_conv_flatten_batchnorm_taps_view():
  """A 1-D conv (3 taps), a BatchNorm scale, a Dense after a flatten, a Dense."""
  params = {
      "conv": {"kernel": _rand(0, (3, 2, 3)), "bias": _rand(1, (3,))},
      "bn": {"scale": _rand(2, (3,)), "bias": _rand(3, (3,))},
      "head": {"kernel": _rand(4, (2 * 3, 2)), "bias": _rand(5, (2,))},
      "out": {"kernel": _rand(6, (2, 2))},
  }
  spec = ecopt.Chain("conv", "bn", "head", "out")
  kappa = path_kappa(params, spec)
  ks = [
      params["conv"]["kernel"],
      params["bn"]["scale"],
      params["head"]["kernel"].reshape(2, 3, 2),
      params["out"]["kernel"][None],
  ]
  bs = [params["conv"]["bias"], params["bn"]["bias"], params["head"]["bias"], None]
  want, want_b = brute_kappa(ks, bs, [False, True, False, False])
  np.testing.assert_allclose(kappa["conv"]["kernel"], want[0], rtol=1e-12)
  np.testing.assert_allclose(kappa["bn"]["scale"], want[1], rtol=1e-12)
  np.testing.assert_allclose(
      kappa["head"]["kernel"], want[2].reshape(6, 2), rtol=1e-12
  )
  np.testing.assert_allclose(kappa["out"]["kernel"], want[3][0], rtol=1e-12)
  for name, wb in zip(["conv", "bn", "head"], want_b):
    np.testing.assert_allclose(kappa[name]["bias"], wb, rtol=1e-12)


def test_kappa_outside_chain_is_one_and_not_accumulated():
  widths = [2, 3, 2]
  params = _mlp(2, widths)
  params["extra"] = {"kernel": jnp.full((2, 2), 5.0)}
  spec = nets.mlp_spec(widths)
  opt = scale_by_path_norm(spec)
  state = opt.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  kappa = path_kappa(params, spec)
  for _ in range(2):  # The same params twice give the same scaling.
    updates, state = opt.update(grads, state, params)
    np.testing.assert_array_equal(updates["extra"]["kernel"], 1.0)
    np.testing.assert_allclose(
        updates["l0"]["kernel"], 1.0 / kappa["l0"]["kernel"], rtol=1e-14
    )


def test_scale_by_path_norm_takes_extra_args_as_optax_does():
  widths = [2, 3, 2]
  params = _mlp(2, widths)
  spec = nets.mlp_spec(widths)
  opt = scale_by_path_norm(spec)
  assert isinstance(opt, optax.GradientTransformationExtraArgs)
  grads = jax.tree.map(jnp.ones_like, params)
  plain, _ = opt.update(grads, opt.init(params), params)
  # An extra argument meant for another member of a chain is ignored.
  chained = optax.chain(opt, optax.scale(-1.0))
  extra, _ = chained.update(grads, chained.init(params), params, loss=1.0)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(-a, b), plain, extra)


# ------------------------------------------------------------ invariance ---


def _train_pair(opt, params_a, params_b, x, y, n, steps):
  """``steps`` steps of ``opt`` from two starting points (vmapped, one jit)."""
  loss = lambda p: nets.mse_loss(p, x, y, n)

  def body(carry, _):
    p, s = carry
    updates, s = opt.update(jax.grad(loss)(p), s, p)
    p = optax.apply_updates(p, updates)
    return (p, s), loss(p)

  def run(p):
    return jax.lax.scan(body, (p, opt.init(p)), length=steps)

  stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), params_a, params_b)
  (params, _), losses = jax.jit(jax.vmap(run))(stacked)
  first = jax.tree.map(lambda a: a[0], params)
  second = jax.tree.map(lambda a: a[1], params)
  losses = np.asarray(losses)
  return first, second, losses[0], losses[1]


@pytest.mark.parametrize("widths", [[3, 6, 3, 5, 2]])
def test_path_sgd_step_commutes_with_node_scaling(widths):
  """Exact statement: path_sgd(g w) = g path_sgd(w) for every step.

  kappa_e scales by c_i^2/c_j^2 and g_e by c_i/c_j, so the update scales like
  w_e itself; the two runs stay related by the same node scaling and compute
  the same function. Plain SGD does not.
  """
  n = len(widths) - 1
  params = _mlp(3, widths, bias=True)
  spec = nets.mlp_spec(widths)
  x, y = _data(4, widths[0], widths[-1], batch=32)
  factors = _factors(5, widths, 2.0)
  scaled = scale_nodes(params, spec, factors)

  p1, p2, l1, l2 = _train_pair(path_sgd(0.05, spec), params, scaled, x, y, n, 30)
  assert l1[-1] < l1[0]  # It trains.
  np.testing.assert_allclose(l2, l1, rtol=1e-10)
  assert nets.tree_rel_err(scale_nodes(p1, spec, factors), p2) < 1e-10

  _, _, s1, s2 = _train_pair(optax.sgd(0.05), params, scaled, x, y, n, 30)
  assert np.max(np.abs(s1 - s2) / s1) > 1e-3


def test_path_sgd_invariance_float32():
  widths = [4, 6, 3, 2]
  n = len(widths) - 1
  params = _mlp(6, widths, dtype=jnp.float32)
  spec = nets.mlp_spec(widths)
  x, y = _data(7, widths[0], widths[-1], dtype=jnp.float32)
  scaled = scale_nodes(params, spec, _factors(8, widths, 2.0, jnp.float32))
  _, _, l1, l2 = _train_pair(path_sgd(0.05, spec), params, scaled, x, y, n, 20)
  np.testing.assert_allclose(l2, l1, rtol=2e-4)


# ---------------------------------------------------------------- optax ---


def test_jit_schedule_and_zero_guard():
  widths = [3, 4, 2]
  params = _mlp(9, widths)
  # Node 0 of level 1 has no outgoing weight: its gamma_out and kappa are 0.
  params["l1"]["kernel"] = params["l1"]["kernel"].at[0].set(0.0)
  spec = nets.mlp_spec(widths)
  schedule = optax.linear_schedule(0.1, 0.0, 4)
  opt = path_sgd(schedule, spec)
  state = opt.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  step = jax.jit(opt.update)
  kappa = path_kappa(params, spec)
  for count in range(5):
    updates, state = step(grads, state, params)
    for leaf in jax.tree.leaves(updates):
      assert np.all(np.isfinite(leaf))
    lr = float(schedule(count))
    np.testing.assert_allclose(
        updates["l1"]["kernel"][1], -lr / kappa["l1"]["kernel"][1], rtol=1e-6
    )
    np.testing.assert_array_equal(updates["l0"]["kernel"][:, 0], 0.0)
    np.testing.assert_array_equal(updates["l0"]["bias"][0], 0.0)


def test_needs_params_and_composes():
  widths = [3, 4, 2]
  params = _mlp(10, widths)
  spec = nets.mlp_spec(widths)
  opt = path_sgd(0.1, spec)
  state = opt.init(params)
  with pytest.raises(ValueError, match="params"):
    opt.update(params, state)
  with pytest.raises(ValueError, match="not in the params"):
    path_sgd(0.1, ecopt.Chain("l0", "nope")).init(params)
  adam = optax.chain(scale_by_path_norm(spec), optax.adam(1e-2))
  state = adam.init(params)
  updates, _ = jax.jit(adam.update)(params, state, params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)


def test_flax_conv_model_trains_under_jit():
  class Net(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(4, (3, 3))(x))
      x = nn.relu(nn.Conv(4, (3, 3))(x))
      x = x.reshape((x.shape[0], -1))
      return nn.Dense(3)(x)

  x = _rand(11, (8, 5, 5, 2), jnp.float32)
  y = jnp.asarray(np.random.default_rng(12).integers(0, 3, 8))
  model = Net()
  params = jax.jit(model.init)(jax.random.key(13), x)["params"]
  spec = ecopt.Chain("Conv_0", "Conv_1", "Dense_0")

  @jax.jit
  def loss(p):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  opt = path_sgd(0.05, spec)
  state = opt.init(params)

  def body(carry, _):
    p, s = carry
    updates, s = opt.update(jax.grad(loss)(p), s, p)
    return (optax.apply_updates(p, updates), s), None

  start = float(loss(params))
  (params, state), _ = jax.jit(
      lambda c: jax.lax.scan(body, c, length=30))((params, state))
  assert float(loss(params)) < start
  assert params["Conv_0"]["kernel"].dtype == jnp.float32
