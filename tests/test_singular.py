"""Singular charts (docs/g-space.md §6).

Property-based tests over random Dense chains (widths 1..12, 2..6 layers, with
and without biases):

* float32 weights and gradients with exact zeros and magnitudes up to 1e+-20,
  random learning rates and inner optimizers: every output is finite, free
  weights never move, and the inner state stays finite;
* float64 draws inside the regular chart: the update agrees with an
  independent oracle (skeleton walks from ``oracle.py``, path gradients from a
  dense Jacobian solve instead of ecopt's inverse chain rule, and the gauge map
  of section 4).

Plus one deterministic test per guard, each showing the exact documented
behaviour.
"""

import itertools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ecopt
import oracle

SETTINGS = dict(deadline=None, derandomize=True, print_blob=True)


# ----------------------------------------------------------------- helpers ---


def record_then(inner):
  """``inner``, with the last path gradients it saw kept in its state."""

  def init(params):
    return (jax.tree.map(jnp.zeros_like, params), inner.init(params))

  def update(updates, state, params=None):
    out, inner_state = inner.update(updates, state[1], params)
    return out, (updates, inner_state)

  return optax.GradientTransformation(init, update)


def fixed_path_update(dv):
  """An inner transformation that always proposes the path update ``dv``."""
  return optax.GradientTransformation(
      lambda params: optax.EmptyState(), lambda u, s, p=None: (dv, s)
  )


def leaves_finite(tree):
  # numpy: eager jnp compiles a program per leaf shape.
  return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree))


def spec_of(n):
  return ecopt.Chain(*[f"l{k}" for k in range(n)])


def to_params(kernels, biases):
  out = {}
  for k, (K, b) in enumerate(zip(kernels, biases)):
    out[f"l{k}"] = {"kernel": K}
    if b is not None:
      out[f"l{k}"]["bias"] = b
  return out


# ------------------------------------------------------------- strategies ---


@st.composite
def architectures(draw, max_width=12, max_layers=6):
  n = draw(st.integers(2, max_layers))
  widths = draw(st.lists(st.integers(1, max_width), min_size=n + 1, max_size=n + 1))
  return widths, draw(st.booleans())


# Each hypothesis example is an architecture (one compilation); inside it a
# batch of random weight draws runs under vmap, so weights are explored widely
# at little cost. XLA's backend optimisations only slow compilation here.
BATCH = 16
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def fast_jit(fn):
  return jax.jit(fn, compiler_options=FAST_COMPILE)


def batched_step(opt):
  return fast_jit(jax.vmap(opt.update))


def wild_tensor(rng, shape):
  """O(1) normals mixed with exact zeros and magnitudes 10**U(-L, L)."""
  p_zero = rng.choice([0.0, 0.1, 0.5])
  p_wild = rng.choice([0.0, 0.3, 1.0])
  log_max = rng.choice([5.0, 20.0])
  mag = 10.0 ** rng.uniform(-log_max, log_max, shape)
  wild = rng.choice([-1.0, 1.0], shape) * mag
  wild = np.where(rng.random(shape) < p_zero, 0.0, wild)
  return np.where(rng.random(shape) < p_wild, wild, rng.normal(size=shape)).astype(np.float32)


def wild_batch(rng, widths, bias):
  """Params and gradients, each leaf with a leading batch axis."""
  n = len(widths) - 1

  def tree():
    draws = []
    for _ in range(BATCH):
      kernels = [wild_tensor(rng, (widths[k], widths[k + 1])) for k in range(n)]
      biases = [wild_tensor(rng, (widths[k + 1],)) if bias else None for k in range(n)]
      draws.append(to_params(kernels, biases))
    return jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *draws)

  return tree(), tree()


def make_inner(name, lr):
  return {
      "sgd": lambda: optax.sgd(lr),
      "momentum": lambda: optax.sgd(lr, momentum=0.9, nesterov=True),
      "adam": lambda: optax.adam(lr),
      "adamw": lambda: optax.adamw(lr, weight_decay=0.1),
  }[name]()


def batch_all_finite(tree):
  return leaves_finite(tree)


@hypothesis.settings(max_examples=3, **SETTINGS)
@hypothesis.given(
    architectures(),
    st.integers(0, 2**32 - 1),
    st.sampled_from(["sgd", "momentum", "adam", "adamw"]),
    st.floats(-6.0, 0.0),
)
def test_float32_extremes_stay_finite_and_keep_free_weights(arch, seed, name, log_lr):
  widths, bias = arch
  spec = spec_of(len(widths) - 1)
  params, grads = wild_batch(np.random.default_rng(seed), widths, bias)
  opt = ecopt.g_space(record_then(make_inner(name, 10.0**log_lr)), spec)
  one = jax.tree.map(lambda x: x[0], params)
  free = jax.tree.leaves(fast_jit(lambda p: ecopt.free_mask(p, spec))(one))
  values, state = fast_jit(jax.vmap(lambda p: (ecopt.basis_path_values(p, spec), opt.init(p))))(params)
  assert batch_all_finite(values)
  step = batched_step(opt)
  add = fast_jit(lambda a, b: jax.tree.map(jnp.add, a, b))
  for _ in range(2):  # the second step runs on a non-trivial inner state
    updates, state = step(grads, state, params)
    new_params = add(params, updates)
    assert all(u.dtype == jnp.float32 for u in jax.tree.leaves(updates))
    assert batch_all_finite(updates), "non-finite update from finite input"
    assert batch_all_finite(new_params)
    # Path gradients are finite; the inner state itself may overflow (momentum
    # of path gradients near finfo.max, Adam's g**2): the allocation then
    # freezes or clips, so the updates above stay finite regardless.
    assert batch_all_finite(state.inner_state[0])
    for m, u, p, q in zip(free, *(jax.tree.leaves(t) for t in (updates, params, new_params))):
      m = np.broadcast_to(np.asarray(m), u.shape)
      np.testing.assert_array_equal(np.asarray(u)[m], 0.0)
      np.testing.assert_array_equal(np.asarray(q)[m].view(np.uint32), np.asarray(p)[m].view(np.uint32))
    params = new_params


# ------------------------------- property: regular chart agrees with oracle ---


def np_values(kernels, biases):
  """Basis-path values by walking the skeleton edge by edge (oracle.py)."""
  diag = [False] * len(kernels)
  widths = oracle.widths_of(kernels, diag)
  vk, vb = [], []
  for k, K in enumerate(kernels, start=1):
    V = np.zeros_like(K)
    for t, i, j in oracle.edges(K, False):
      V[t, i, j] = (
          K[t, i, j]
          * oracle.walk_in(kernels, diag, widths, k - 1, i)
          * oracle.walk_out(kernels, diag, widths, k, j)
      )
    vk.append(V)
    b = biases[k - 1]
    vb.append(
        None
        if b is None
        else np.array([b[j] * oracle.walk_out(kernels, diag, widths, k, j) for j in range(len(b))])
    )
  return vk, vb


def np_coordinates(kernels, biases):
  """The coordinates as ('w', k, t, i, j) / ('b', k, j), free weights left out."""
  diag = [False] * len(kernels)
  free = oracle.free_set(kernels, diag, oracle.widths_of(kernels, diag))
  coords = []
  for k, K in enumerate(kernels, start=1):
    coords += [("w", k, t, i, j) for t, i, j in oracle.edges(K, False) if (k, t, i, j) not in free]
    if biases[k - 1] is not None:
      coords += [("b", k, j) for j in range(len(biases[k - 1]))]
  return coords, free


def np_path_gradients(kernels, biases, gk, gb):
  """dL/dv at the coordinates by a dense solve: g = J^T dL/dv, J = dv/dw.

  With the free weights held fixed, ``v`` is a function of the coordinates
  alone; ``J[e, f]`` is the product of the other weights on e's basis path
  when the coordinate ``f`` lies on it. Independent of ecopt's O(m) sweep.
  """
  diag = [False] * len(kernels)
  widths = oracle.widths_of(kernels, diag)
  coords, _ = np_coordinates(kernels, biases)
  index = {c: a for a, c in enumerate(coords)}
  J = np.zeros((len(coords), len(coords)))
  for a, c in enumerate(coords):
    if c[0] == "b":
      _, k, j = c
      J[a, a] = oracle.walk_out(kernels, diag, widths, k, j)
      continue
    _, k, t, i, j = c
    out = oracle.walk_out(kernels, diag, widths, k, j)
    chain = [(k, t, i, j)]  # e, then the in-skeleton chain back to level 0
    level, node = k - 1, i
    while level > 0:
      tt, aa, bb = oracle.in_edge(kernels, diag, widths, level, node)
      chain.append((level, tt, aa, bb))
      level, node = level - 1, aa
    for f in chain:
      key = ("w",) + f
      if key in index:
        others = [kernels[g[0] - 1][g[1:]] for g in chain if g != f]
        J[a, index[key]] = out * np.prod(others)
  g = np.array(
      [gb[c[1] - 1][c[2]] if c[0] == "b" else gk[c[1] - 1][c[2:]] for c in coords]
  )
  dv = np.linalg.solve(J.T, g)
  return {c: dv[a] for a, c in enumerate(coords)}


def np_weights_from(vk, vb, kernels):
  """The gauge map of g-space.md section 4, node by node (free weights kept)."""
  diag = [False] * len(kernels)
  widths = oracle.widths_of(kernels, diag)
  free = oracle.free_set(kernels, diag, widths)
  n = len(kernels)
  F = [None] + [
      [oracle.walk_out(kernels, diag, widths, k, j) for j in range(widths[k])]
      for k in range(1, n + 1)
  ]
  B = [[1.0] * widths[0]]
  wk, wb = [], []
  for k in range(1, n + 1):
    K = kernels[k - 1]
    W = np.zeros_like(K)
    for t, i, j in oracle.edges(K, False):
      if (k, t, i, j) in free:
        W[t, i, j] = K[t, i, j]
      else:
        W[t, i, j] = vk[k - 1][t, i, j] / (B[k - 1][i] * F[k][j])
    wk.append(W)
    wb.append(None if vb[k - 1] is None else np.array(vb[k - 1]) / np.array(F[k]))
    if k < n:
      B.append(
          [
              W[oracle.in_edge(kernels, diag, widths, k, j)]
              * B[k - 1][oracle.in_edge(kernels, diag, widths, k, j)[1]]
              for j in range(widths[k])
          ]
      )
  return wk, wb


def regular_draw(rng, widths, bias):
  """Weights +-U(0.5, 2), some exact zeros off the skeleton; N(0, 1) grads."""
  n = len(widths) - 1
  p_zero = rng.choice([0.0, 0.3])
  kernels, biases = [], []
  for k in range(n):
    shape = (1, widths[k], widths[k + 1])
    K = rng.choice([-1.0, 1.0], shape) * rng.uniform(0.5, 2.0, shape)
    kernels.append(np.where(rng.random(shape) < p_zero, 0.0, K))
    biases.append(rng.normal(size=widths[k + 1]) if bias else None)
  diag = [False] * n
  ws = oracle.widths_of(kernels, diag)
  for k in range(1, n):
    for j in range(ws[k]):
      for lay, edge in (
          (k, oracle.in_edge(kernels, diag, ws, k, j)),
          (k + 1, oracle.out_edge(kernels, diag, ws, k, j)),
      ):
        if kernels[lay - 1][edge] == 0.0:
          kernels[lay - 1][edge] = 1.0
  gk = [rng.normal(size=K.shape) for K in kernels]
  gb = [None if b is None else rng.normal(size=b.shape) for b in biases]
  return kernels, biases, gk, gb


@hypothesis.settings(max_examples=3, **SETTINGS)
@hypothesis.given(
    architectures(max_width=8, max_layers=5), st.integers(0, 2**32 - 1), st.floats(-4.0, -1.0)
)
def test_regular_chart_agrees_with_oracle(arch, seed, log_lr):
  widths, bias = arch
  n = len(widths) - 1
  lr = 10.0**log_lr
  spec = spec_of(n)
  rng = np.random.default_rng(seed)
  draws = [regular_draw(rng, widths, bias) for _ in range(6)]

  def stack(trees):
    return jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs), jnp.float64), *trees)

  params = stack([to_params([K[0] for K in d[0]], d[1]) for d in draws])
  grads = stack([to_params([g[0] for g in d[2]], d[3]) for d in draws])
  opt = ecopt.g_space(record_then(optax.sgd(lr)), spec)
  updates, state = batched_step(opt)(grads, fast_jit(jax.vmap(opt.init))(params), params)
  new_params = jax.tree.map(jnp.add, params, updates)

  compared = 0
  for b, (kernels, biases, gk, gb) in enumerate(draws):
    vk, vb = np_values(kernels, biases)
    dv = np_path_gradients(kernels, biases, gk, gb)
    new_vk = [v.copy() for v in vk]
    new_vb = [None if v is None else v.copy() for v in vb]
    for c, d in dv.items():
      if c[0] == "b":
        new_vb[c[1] - 1][c[2]] -= lr * d
      else:
        new_vk[c[1] - 1][c[2:]] -= lr * d
    # Regular chart: every in-skeleton path value moves by a factor, of
    # either sign, well away from the hold (|rho| >= min_ratio = 1e-3).
    ratios = oracle.in_skeleton_ratios(vk, new_vk, kernels, [False] * n)
    if not all(0.05 < abs(r) < 20 for r in ratios):
      continue
    compared += 1
    recorded = jax.tree.map(lambda x: np.asarray(x[b]), state.inner_state[0])
    scale = max([1.0] + [abs(x) for x in dv.values()])
    for c, d in dv.items():
      leaf = recorded[f"l{c[1] - 1}"]["bias" if c[0] == "b" else "kernel"]
      got = leaf[c[2]] if c[0] == "b" else leaf[c[3:]]
      assert abs(got - d) <= 1e-9 * scale, (c, got, d)
    wk, wb = np_weights_from(new_vk, new_vb, kernels)
    want = to_params([w[0] for w in wk], wb)
    got_params = jax.tree.map(lambda x: np.asarray(x[b]), new_params)
    for (path, got), ref in zip(
        jax.tree_util.tree_leaves_with_path(got_params), jax.tree.leaves(want)
    ):
      err = np.max(np.abs(got - ref))
      assert err <= 1e-9 * max(1.0, np.max(np.abs(ref))), (path, err)
    # Free weights are carried over bit for bit.
    old = jax.tree.map(lambda x: np.asarray(x[b]), params)
    free = oracle.free_mask(kernels, [False] * n)
    for k in range(n):
      m = free[k][0]
      np.testing.assert_array_equal(got_params[f"l{k}"]["kernel"][m], old[f"l{k}"]["kernel"][m])
  hypothesis.assume(compared > 0)


# ---------------------------------------------------- one test per guard ---


def first_update(opt, grads, params):
  """``opt.update`` from a fresh state, compiled (cheaper than op by op)."""
  return fast_jit(lambda g, p: opt.update(g, opt.init(p), p))(grads, params)


def path_values(params, spec):
  return fast_jit(lambda p: ecopt.basis_path_values(p, spec))(params)


def chain3(dtype, skeleton=1.0, off=0.5, bias=True):
  """Widths 2-3-3-2: every skeleton weight is ``skeleton``, the others ``off``.

  Node (k, j)'s in-skeleton weight is ``l{k-1}[j mod h, j]`` and its free
  weight ``l{k}[j, j mod h']``; biases are 0.1.
  """
  widths = [2, 3, 3, 2]
  params = {}
  for k in range(3):
    params[f"l{k}"] = {"kernel": jnp.full((widths[k], widths[k + 1]), 7.0, dtype)}
    if bias:
      params[f"l{k}"]["bias"] = jnp.full((widths[k + 1],), 0.1, dtype)
  spec = spec_of(3)
  marked = ecopt.skeleton_init(params, spec)  # skeleton entries become 1
  params = jax.tree.map(
      lambda m: jnp.where(m == 1.0, jnp.asarray(skeleton, dtype), jnp.asarray(off, dtype)),
      marked,
  )
  for k in range(3):
    if bias:
      params[f"l{k}"]["bias"] = jnp.full((widths[k + 1],), 0.1, dtype)
  return params, spec


def test_zero_in_skeleton_weight_freezes_its_coordinates():
  params, spec = chain3(jnp.float32)
  # Node (1, 0)'s in-skeleton weight is 0: v_s = 0 and B(1, 0) = 0.
  params["l0"]["kernel"] = params["l0"]["kernel"].at[0, 0].set(0.0)
  grads = jax.tree.map(jnp.ones_like, params)
  opt = ecopt.g_space(record_then(optax.sgd(0.1)), spec)
  updates, state = first_update(opt, grads, params)
  assert leaves_finite(updates)
  pg = state.inner_state[0]
  # Its own path gradient and update are 0 ...
  assert pg["l0"]["kernel"][0, 0] == 0 and updates["l0"]["kernel"][0, 0] == 0
  # ... and so are those of the coordinates leaving node (1, 0) (S = 0).
  np.testing.assert_array_equal(pg["l1"]["kernel"][0, 1:], 0.0)
  np.testing.assert_array_equal(updates["l1"]["kernel"][0], 0.0)
  # Coordinates elsewhere still move (l1[1, 1] and l1[2, 2] are free).
  for index in ((1, 0), (1, 2), (2, 0), (2, 1)):
    assert updates["l1"]["kernel"][index] != 0, index


def test_underflowing_skeleton_products_freeze_float32():
  """S_e below 1/finfo.max: subnormal, or its reciprocal overflowing."""
  params, spec = chain3(jnp.float32, skeleton=1e-20, off=1.0)
  grads = jax.tree.map(jnp.ones_like, params)
  opt = ecopt.g_space(record_then(optax.sgd(1e-3)), spec)
  updates, state = first_update(opt, grads, params)
  assert leaves_finite(updates) and leaves_finite(state)
  assert leaves_finite(path_values(params, spec))
  pg = state.inner_state[0]
  free = ecopt.free_mask(params, spec)
  # l1 coordinates: B(1) and F(2) are 1e-20 (normal) but 1/S_e = 1e40
  # overflows; l2 coordinates: S_e = B(2) = 1e-40 is subnormal. Both frozen.
  for layer in ("l1", "l2"):
    m = np.asarray(free[layer]["kernel"])
    np.testing.assert_array_equal(np.asarray(pg[layer]["kernel"])[~m], 0.0)
    np.testing.assert_array_equal(np.asarray(updates[layer]["kernel"])[~m], 0.0)
  # The last layer's biases (F = 1) are regular and move.
  assert np.all(np.asarray(updates["l2"]["bias"]) != 0)


def test_huge_weights_float32():
  params, spec = chain3(jnp.float32, skeleton=1e20, off=1e20)
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 1e20, p.dtype), params)
  for opt in (ecopt.g_sgd(0.5, spec, momentum=0.9), ecopt.g_space(optax.adamw(1.0), spec)):
    state = fast_jit(opt.init)(params)
    assert leaves_finite(state)
    update = fast_jit(opt.update)
    for _ in range(3):
      updates, state = update(grads, state, params)
      new = optax.apply_updates(params, updates)
      assert leaves_finite(updates) and leaves_finite(new)
  v = path_values(params, spec)
  # Path values that overflow saturate at the largest float32.
  assert float(v["l2"]["kernel"][1, 0]) == float(jnp.finfo(jnp.float32).max)


def test_saturated_path_value_of_zero_weight_is_zero():
  params, spec = chain3(jnp.float32, skeleton=1e30, off=0.0)
  v = path_values(params, spec)
  assert leaves_finite(v)
  # v = 0 * (1e30 * 1e30 = inf) is reported as 0, not NaN.
  assert float(v["l1"]["kernel"][0, 1]) == 0.0


def dv_at(params, where_value):
  """A path update tree: zeros with the given (layer, index) -> value."""
  dv = jax.tree.map(jnp.zeros_like, params)
  for (layer, leaf, index), value in where_value.items():
    dv[layer][leaf] = dv[layer][leaf].at[index].set(value)
  return dv


@pytest.mark.parametrize(
    "factor", [-5.0, -1.0, -0.01, 0.5, 1e3], ids=["cross", "mirror", "small-cross", "halve", "grow"]
)
def test_in_skeleton_ratio_is_exact_sign_flips_included(factor):
  params, spec = chain3(jnp.float32, skeleton=1.0, off=0.5)
  # The in-skeleton edge of node (1, 1) has v_s = 1: dv = factor - 1 asks
  # for rho = factor, which is taken exactly, negative or large. (The new
  # weights are w + (w' - w), as optax applies them: w' = w / rho carries an
  # absolute rounding error of eps * |w|, relative eps * rho.)
  dv = dv_at(params, {("l0", "kernel", (1, 1)): factor - 1.0})
  opt = ecopt.g_space(fixed_path_update(dv), spec)
  updates, _ = first_update(opt, params, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["l0"]["kernel"][1, 1], factor, rtol=3e-6)
  # Coordinates leaving node (1, 1) keep their path values: divided by rho,
  # so a sign flip flips them. (w' = w + dw rounds at the scale of w.)
  eps = float(jnp.finfo(jnp.float32).eps)
  np.testing.assert_allclose(new["l1"]["kernel"][1, 0], 0.5 / factor, rtol=3e-6, atol=eps)
  # The node's out-skeleton weight is free: it keeps its value and sign.
  assert new["l1"]["kernel"][1, 1] == 1.0
  assert leaves_finite(new)
  v0, v1 = path_values(params, spec), path_values(new, spec)
  np.testing.assert_allclose(v1["l0"]["kernel"][1, 1], factor * v0["l0"]["kernel"][1, 1], rtol=3e-6)
  # Every other coordinate keeps its path value (free positions hold the
  # all-skeleton values through them, which follow v_s).
  free = ecopt.free_mask(params, spec)
  tol = 4 * eps * max(1.0, abs(factor))
  for layer in ("l1", "l2"):
    coordinates = ~np.asarray(free[layer]["kernel"])
    np.testing.assert_allclose(
        np.asarray(v1[layer]["kernel"])[coordinates],
        np.asarray(v0[layer]["kernel"])[coordinates], rtol=tol, atol=tol)


@pytest.mark.parametrize("min_ratio", [1e-3, 0.25])
@pytest.mark.parametrize("factor", [0.0, 1e-4, -1e-4, 0.2, -0.2])
def test_ratio_below_min_ratio_is_held_and_the_rest_is_exact(factor, min_ratio):
  params, spec = chain3(jnp.float32, skeleton=1.0, off=0.5)
  # Node (1, 1) asks for rho = factor; node (1, 0) for rho = 3; coordinate
  # l1[2, 0] for dv = 0.25.
  dv = dv_at(params, {
      ("l0", "kernel", (1, 1)): factor - 1.0,
      ("l0", "kernel", (0, 0)): 2.0,
      ("l1", "kernel", (2, 0)): 0.25,
  })
  opt = ecopt.g_space(fixed_path_update(dv), spec, min_ratio=min_ratio)
  new = optax.apply_updates(params, first_update(opt, params, params)[0])
  held = abs(factor) < min_ratio
  rho = 1.0 if held else factor
  np.testing.assert_allclose(new["l0"]["kernel"][1, 1], rho, rtol=3e-6)
  np.testing.assert_allclose(new["l1"]["kernel"][1, 0], 0.5 / rho, rtol=3e-6)
  # Every other coordinate takes its exact step.
  np.testing.assert_allclose(new["l0"]["kernel"][0, 0], 3.0, rtol=3e-6)
  np.testing.assert_allclose(new["l1"]["kernel"][0, 1], 0.5 / 3.0, rtol=3e-6)
  np.testing.assert_allclose(new["l1"]["kernel"][2, 0], 0.75, rtol=3e-6)
  assert leaves_finite(new)


@pytest.mark.parametrize(
    "bad", [0.0, 1.0, -0.1, 1.5, float("nan"), "0.1", None, True, [1e-3], np.full((2,), 1e-3)]
)
def test_min_ratio_must_be_a_scalar_in_the_open_unit_interval(bad):
  spec = spec_of(2)
  with pytest.raises(ValueError, match="min_ratio"):
    ecopt.g_space(optax.sgd(0.1), spec, min_ratio=bad)
  with pytest.raises(ValueError, match="min_ratio"):
    ecopt.g_sgd(0.1, spec, min_ratio=bad)


def test_min_ratio_accepts_floats_and_0d_arrays_and_is_injectable():
  params, spec = chain3(jnp.float32)
  grads = jax.tree.map(jnp.ones_like, params)
  for good in (0.5, np.float32(1e-3), jnp.asarray(1e-2), np.asarray(0.1)):
    ecopt.g_space(optax.sgd(0.1), spec, min_ratio=good)
  opt = optax.inject_hyperparams(ecopt.g_sgd)(learning_rate=0.1, spec=spec, min_ratio=0.25)
  state = opt.init(params)
  assert float(state.hyperparams["min_ratio"]) == 0.25
  want, _ = first_update(ecopt.g_sgd(0.1, spec, min_ratio=0.25), grads, params)
  got, _ = jax.jit(opt.update)(grads, state, params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("state", ["none", "dict", "sgd"])
def test_a_foreign_state_is_refused(state):
  params, spec = chain3(jnp.float32)
  opt = ecopt.g_sgd(0.1, spec, momentum=0.9)
  grads = jax.tree.map(jnp.ones_like, params)
  good = opt.init(params)
  foreign = {
      "none": None,
      "dict": {"inner_state": good.inner_state, "layout": {}},
      "sgd": optax.sgd(0.1, momentum=0.9).init(params),
  }[state]
  with pytest.raises(ValueError, match="GSpaceState"):
    opt.update(grads, foreign, params)


@pytest.mark.parametrize("skeleton", [1e-15, 1e-16])
@pytest.mark.parametrize("lr", [1e6, 1e9])
def test_zero_gradients_give_zero_updates_under_jit_for_any_lr(lr, skeleton):
  # Skeleton products of 1e-30 and below: -lr / S overflows float32, which
  # XLA may fold into the update before multiplying by the zero gradient.
  params, spec = chain3(jnp.float32, skeleton=skeleton, off=1.0)
  grads = jax.tree.map(jnp.zeros_like, params)
  for opt in (ecopt.g_sgd(lr, spec), ecopt.g_sgd(lr, spec, momentum=0.9), ecopt.g_adam(lr, spec)):
    state = opt.init(params)
    for update in (jax.jit(opt.update), opt.update):
      updates, _ = update(grads, state, params)
      for leaf in jax.tree.leaves(updates):
        np.testing.assert_array_equal(np.asarray(leaf), 0.0)


def test_bias_overflow_freezes_the_bias():
  params, spec = chain3(jnp.float32)
  params["l2"]["bias"] = jnp.asarray([-3e38, 1.0], jnp.float32)
  grads = jax.tree.map(jnp.zeros_like, params)
  grads["l2"]["bias"] = jnp.asarray([3e38, 1.0], jnp.float32)
  opt = ecopt.g_sgd(1.0, spec)
  for update in (jax.jit(opt.update), opt.update):
    updates, _ = update(grads, opt.init(params), params)
    new = optax.apply_updates(params, updates)
    assert leaves_finite(updates) and leaves_finite(new)
    assert float(updates["l2"]["bias"][0]) == 0.0  # -3e38 - 3e38 would be -inf
    np.testing.assert_allclose(updates["l2"]["bias"][1], -1.0)


def test_bfloat16_new_weights_saturate_instead_of_overflowing():
  big = float(jnp.finfo(jnp.bfloat16).max)
  params, spec = chain3(jnp.bfloat16, skeleton=1.0, off=1.0)
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  params["l1"]["kernel"] = params["l1"]["kernel"].at[0, 1].set(-0.5 * big)
  grads = jax.tree.map(jnp.zeros_like, params)
  # A float32 step of +1e38 * 10 on that entry, beyond bfloat16's range.
  grads["l1"]["kernel"] = grads["l1"]["kernel"].at[0, 1].set(3e38)
  opt = ecopt.g_sgd(10.0, spec)
  for update in (jax.jit(opt.update), opt.update):
    updates, _ = update(grads, opt.init(params), params)
    new = optax.apply_updates(params, updates)
    assert new["l1"]["kernel"].dtype == jnp.bfloat16
    assert leaves_finite(updates) and leaves_finite(new)
    assert float(new["l1"]["kernel"][0, 1]) == -big


def test_path_gradient_overflow_freezes_the_coordinate():
  # S = 1e-15 for the l2 coordinates: g / S = 1e25 / 1e-15 overflows float32.
  params, spec = chain3(jnp.float32, skeleton=jnp.sqrt(jnp.float32(1e-15)), off=1.0)
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 1e25, p.dtype), params)
  opt = ecopt.g_space(record_then(optax.sgd(1e-30)), spec)
  updates, state = first_update(opt, grads, params)
  assert leaves_finite(updates) and leaves_finite(state)
  pg = np.asarray(state.inner_state[0]["l2"]["kernel"])
  np.testing.assert_array_equal(pg, 0.0)
  # Where g / S is representable, it is passed through.
  np.testing.assert_array_equal(state.inner_state[0]["l2"]["bias"], np.float32(1e25))


def test_weight_update_overflow_freezes_the_entry():
  params, spec = chain3(jnp.float32, skeleton=1e-15, off=1e20)
  # dv / S = 1e30 / 1e-30 overflows: the new weight would be Inf.
  dv = dv_at(params, {("l2", "kernel", (1, 0)): 1e30, ("l2", "kernel", (2, 1)): 1e-9})
  opt = ecopt.g_space(fixed_path_update(dv), spec)
  updates, _ = first_update(opt, params, params)
  assert leaves_finite(updates)
  assert updates["l2"]["kernel"][1, 0] == 0.0
  np.testing.assert_allclose(updates["l2"]["kernel"][2, 1], 1e-9 / 1e-30, rtol=1e-5)


def test_nan_gradient_is_repaired_before_g_space_not_inside():
  """Damage is read from the gradients: an inner ``zero_nans`` cannot hide it."""
  params = {"l0": {"kernel": jnp.full((3, 4), 0.5), "bias": jnp.zeros(4)},
            "l1": {"kernel": jnp.full((4, 2), 0.5), "bias": jnp.zeros(2)}}
  spec = ecopt.Chain("l0", "l1")
  grads = jax.tree.map(jnp.ones_like, params)
  bad = jax.tree.map(lambda a: a, grads)
  bad["l0"]["kernel"] = grads["l0"]["kernel"].at[1, 2].set(jnp.nan)

  inside = ecopt.g_space(optax.chain(optax.zero_nans(), optax.sgd(0.1)), spec)
  updates, _ = inside.update(bad, inside.init(params), params)
  nan = jnp.isnan(updates["l0"]["kernel"])
  assert bool(nan[1, 2]) and int(nan.sum()) == 1
  assert leaves_finite(updates["l1"])

  before = optax.chain(optax.zero_nans(), ecopt.g_sgd(0.1, spec))
  updates, _ = jax.jit(before.update)(bad, before.init(params), params)
  cleaned = jax.tree.map(lambda a: a, grads)
  cleaned["l0"]["kernel"] = grads["l0"]["kernel"].at[1, 2].set(0.0)
  plain = ecopt.g_sgd(0.1, spec)
  expected, _ = plain.update(cleaned, plain.init(params), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), updates, expected)
