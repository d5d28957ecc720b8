"""Basis-path decay (G-SGD+BPR): definition, use inside g_space, invariance."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ecopt
import nets
import oracle
from ecopt.chain_transform import in_path_space as _path_space
from ecopt.regularization import add_basis_path_decay, basis_path_regularizer


def in_path_space(fn):
  """``fn`` called as g_space calls its inner transformation."""

  def wrapped(*args, **kwargs):
    with _path_space():
      return fn(*args, **kwargs)

  return wrapped

ARCHS = [
    pytest.param([3, 3, 3, 2], id="equal"),
    pytest.param([6, 3, 7, 2], id="narrow-widen"),
]

values_of = jax.jit(ecopt.basis_path_values, static_argnums=1)
scale_nodes = jax.jit(ecopt.scale_nodes, static_argnums=1)
skeleton_init = jax.jit(ecopt.skeleton_init, static_argnums=1)


def _mlp(seed, widths, *, bias=True, dtype=jnp.float64):
  """Weights +-U(0.5, 1.5) (numpy: eager jax.random is slow to compile)."""
  rng = np.random.default_rng(seed)
  params = {}
  for k in range(len(widths) - 1):
    u = rng.uniform(-1, 1, (widths[k], widths[k + 1]))
    layer = {"kernel": jnp.asarray(np.sign(u) * (0.5 + np.abs(u)), dtype)}
    if bias:
      layer["bias"] = jnp.asarray(0.1 * rng.normal(size=widths[k + 1]), dtype)
    params[f"l{k}"] = layer
  return params


def _negative_oracle(widths):
  """Per layer: bool (in, out) mask of non-free in-skeleton edges, by walking."""
  ks = [np.zeros((1, widths[k], widths[k + 1])) for k in range(len(widths) - 1)]
  diag = [False] * len(ks)
  free = oracle.free_set(ks, diag, widths)
  masks = [np.zeros(K.shape[1:], bool) for K in ks]
  for k in range(1, len(ks)):
    for j in range(widths[k]):
      t, a, b = oracle.in_edge(ks, diag, widths, k, j)
      if (k, t, a, b) not in free:
        masks[k - 1][a, b] = True
  return masks


@pytest.mark.parametrize("widths", ARCHS)
def test_decay_is_gradient_of_regularizer(widths):
  """The added term is wd * dR/dv, with R's groups as in the paper."""
  params = _mlp(len(widths), widths)
  spec = nets.mlp_spec(widths)
  values = values_of(params, spec)
  wd = 0.3
  opt = add_basis_path_decay(wd, spec)
  zeros = jax.tree.map(jnp.zeros_like, values)
  got, _ = jax.jit(in_path_space(opt.update))(zeros, opt.init(values), values)

  negative = _negative_oracle(widths)
  free = oracle.free_mask([params[f"l{k}"]["kernel"][None] for k in range(len(widths) - 1)],
                          [False] * (len(widths) - 1))
  for k in range(len(widths) - 1):
    v = np.asarray(values[f"l{k}"]["kernel"])
    want = np.where(negative[k], np.log(np.abs(v)) / v, v)
    want = np.where(free[k][0], 0.0, want)
    np.testing.assert_allclose(got[f"l{k}"]["kernel"], wd * want, rtol=1e-12)
    np.testing.assert_allclose(
        got[f"l{k}"]["bias"], wd * values[f"l{k}"]["bias"], rtol=1e-12
    )
  # And R is the function whose gradient that is (free entries excluded).
  grad_r = jax.jit(jax.grad(lambda v: basis_path_regularizer(v, spec)))(values)
  for k in range(len(widths) - 1):
    np.testing.assert_allclose(
        got[f"l{k}"]["kernel"], wd * grad_r[f"l{k}"]["kernel"], rtol=1e-12, atol=1e-15
    )
  # Equal widths: the negative paths are exactly the paper's d diagonal paths.
  if len(set(widths[:-1])) == 1:
    assert negative[0].sum() == widths[1] and all(m.sum() == 0 for m in negative[1:])


def test_inside_g_space_moves_basis_paths_as_defined():
  """With zero loss gradient, one G-SGD+BPR step sets v' = v - lr wd dR/dv."""
  widths = [3, 5, 4, 2]
  params = skeleton_init(_mlp(0, widths), nets.mlp_spec(widths))
  # Move the all-skeleton paths off 1 so the log term acts.
  params["l0"]["kernel"] = params["l0"]["kernel"] * 1.7
  spec = nets.mlp_spec(widths)
  lr, wd = 0.1, 0.2
  opt = ecopt.g_space(optax.chain(add_basis_path_decay(wd, spec), optax.sgd(lr)), spec)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(opt.update)(zeros, opt.init(params), params)
  new = optax.apply_updates(params, updates)
  v, v_new = values_of(params, spec), values_of(new, spec)
  negative = _negative_oracle(widths)
  free = oracle.free_mask([params[f"l{k}"]["kernel"][None] for k in range(3)], [False] * 3)
  for k in range(3):
    a = np.asarray(v[f"l{k}"]["kernel"])
    want = np.where(negative[k], a - lr * wd * np.log(np.abs(a)) / a, (1 - lr * wd) * a)
    # Free positions hold all-skeleton path values that are not coordinates
    # (each equals a negative path's value), so they are not checked here.
    got = np.asarray(v_new[f"l{k}"]["kernel"])
    np.testing.assert_allclose(got[~free[k][0]], want[~free[k][0]], rtol=1e-12)
    np.testing.assert_allclose(
        v_new[f"l{k}"]["bias"], (1 - lr * wd) * v[f"l{k}"]["bias"], rtol=1e-12
    )
  # Negative paths move towards magnitude 1 (here from 1.7).
  assert np.all(np.abs(v_new["l0"]["kernel"])[negative[0]] < 1.7)


def test_g_sgd_bpr_is_invariant_and_sgd_weight_decay_is_not():
  widths = [4, 6, 3, 2]
  n = len(widths) - 1
  spec = nets.mlp_spec(widths)
  params = skeleton_init(_mlp(1, widths), spec)
  rng = np.random.default_rng(2)
  factors = [[jnp.asarray(np.exp(rng.uniform(-2, 2, h))) for h in widths[1:-1]]]
  scaled = scale_nodes(params, spec, factors)
  xr = np.random.default_rng(3)
  x = jnp.asarray(xr.normal(size=(32, widths[0])))
  y = jnp.asarray(xr.normal(size=(32, widths[-1])))
  loss = lambda p: nets.mse_loss(p, x, y, n)

  def run(opt):
    def body(carry, _):
      p, s = carry
      u, s = opt.update(jax.grad(loss)(p), s, p)
      p = optax.apply_updates(p, u)
      return (p, s), loss(p)

    def one(p):
      return jax.lax.scan(body, (p, opt.init(p)), length=25)[1]

    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), params, scaled)
    return np.asarray(jax.jit(jax.vmap(one))(stacked))

  bpr = ecopt.g_space(
      optax.chain(add_basis_path_decay(1e-2, spec), optax.sgd(0.01, momentum=0.9)), spec
  )
  l = run(bpr)
  assert l[0, -1] < l[0, 0]
  np.testing.assert_allclose(l[1], l[0], rtol=1e-10)
  # Weight decay in weight space is not invariant.
  w = run(optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.01, momentum=0.9)))
  assert np.max(np.abs(w[1] - w[0]) / w[0]) > 1e-3


def test_zero_value_outside_chains_and_errors():
  widths = [2, 3, 2]
  spec = nets.mlp_spec(widths)
  params = _mlp(4, widths)
  params["extra"] = {"kernel": jnp.full((2, 2), 2.0)}
  values = values_of(params, spec)
  values["l0"]["kernel"] = values["l0"]["kernel"].at[0, 0].set(0.0)  # negative
  zeros = jax.tree.map(jnp.zeros_like, values)
  opt = add_basis_path_decay(0.5, spec)
  got, _ = jax.jit(in_path_space(opt.update))(zeros, opt.init(values), values)
  for leaf in jax.tree.leaves(got):
    assert np.all(np.isfinite(leaf))
  assert float(got["l0"]["kernel"][0, 0]) == 0.0
  np.testing.assert_allclose(got["extra"]["kernel"], 1.0)
  off = add_basis_path_decay(0.5, spec, outside_chains=False)
  got, _ = jax.jit(in_path_space(off.update))(zeros, off.init(values), values)
  np.testing.assert_array_equal(got["extra"]["kernel"], 0.0)
  with pytest.raises(ValueError, match="needs the current params"):
    in_path_space(opt.update)(zeros, opt.init(values))
  # Outside g_space its params would be weights: refused, also under jit and
  # inside an optax.chain.
  for tx in [opt, optax.chain(opt, optax.sgd(0.1))]:
    with pytest.raises(ValueError, match="must run inside"):
      jax.jit(tx.update)(zeros, tx.init(values), values)


def test_decay_strength_takes_a_schedule():
  widths = [2, 3, 2]
  spec = nets.mlp_spec(widths)
  values = values_of(_mlp(4, widths), spec)
  zeros = jax.tree.map(jnp.zeros_like, values)
  opt = add_basis_path_decay(optax.linear_schedule(1.0, 0.0, 2), spec)
  state = opt.init(values)
  update = jax.jit(in_path_space(opt.update))
  first, state = update(zeros, state, values)
  second, state = update(zeros, state, values)
  third, _ = update(zeros, state, values)
  bias = values["l1"]["bias"]
  np.testing.assert_allclose(first["l1"]["bias"], bias, rtol=1e-12)
  np.testing.assert_allclose(second["l1"]["bias"], 0.5 * bias, rtol=1e-12)
  np.testing.assert_array_equal(third["l1"]["bias"], 0.0)
