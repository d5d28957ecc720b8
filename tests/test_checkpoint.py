"""Non-finite gradients, apply_if_finite, checkpoint round trips, determinism."""

import functools

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import ecopt
import nets

WIDTHS = [4, 6, 5, 3]
N = len(WIDTHS) - 1
SPEC = nets.mlp_spec(WIDTHS)


@functools.lru_cache(maxsize=None)
def problem(seed=0):
  params = nets.mlp_params(jax.random.key(seed), WIDTHS, dtype=jnp.float32)
  params = jax.jit(lambda p: ecopt.skeleton_init(p, SPEC))(params)
  x, y = nets.data(jax.random.key(seed + 1), WIDTHS[0], WIDTHS[-1], batch=32, dtype=jnp.float32)
  return params, x, y


loss_grad = jax.jit(jax.grad(nets.mse_loss), static_argnums=3)


def bits(tree):
  """Every leaf as raw bytes, for bitwise comparisons."""
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def assert_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert bits(a) == bits(b)


@functools.lru_cache(maxsize=None)
def cached_step(name):
  """One compiled training step per optimizer, shared by the tests."""
  return make_step(OPTIMIZERS[name]())


def make_step(opt):
  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(nets.mse_loss)(params, x, y, N)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


OPTIMIZERS = {
    "g_sgd_momentum_schedule": lambda: ecopt.g_sgd(
        optax.cosine_decay_schedule(0.05, 10), SPEC, momentum=0.9
    ),
    "g_adam": lambda: ecopt.g_space(optax.adam(1e-2), SPEC),
}


# ----------------------------------------------------- non-finite gradients ---


# (layer, leaf, index): node (1, 1)'s in-skeleton weight is l0[1, 1] and its
# free weight l1[1, 1]; l1[0, 3] is an ordinary coordinate; l2[2, 2] is the
# free weight of node (2, 2).
POSITIONS = {
    "coordinate": ("l1", "kernel", (0, 3)),
    "in-skeleton": ("l0", "kernel", (1, 1)),
    "free": ("l1", "kernel", (1, 1)),
    "free-last": ("l2", "kernel", (2, 2)),
    "bias": ("l2", "bias", (1,)),
}


@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_non_finite_gradients_propagate(inner):
  """One NaN/Inf gradient entry anywhere makes the update non-finite."""
  params, x, y = problem()
  grads = loss_grad(params, x, y, N)
  # The corrupted batch is built in numpy (eager .at[].set compiles a
  # program per index).
  cases, corrupted = [], []
  for name, (layer, leaf, index) in POSITIONS.items():
    for value in (np.nan, np.inf, -np.inf):
      g = jax.tree.map(np.array, grads)
      g[layer][leaf][index] = value
      cases.append((name, value))
      corrupted.append(g)
  batch = jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *corrupted)
  opt = ecopt.g_space(optax.sgd(0.05) if inner == "sgd" else optax.adam(1e-2), SPEC)
  update = jax.jit(jax.vmap(opt.update, in_axes=(0, None, None)))
  updates, _ = update(batch, jax.jit(opt.init)(params), params)
  mask = jax.tree.leaves(jax.jit(lambda p: ecopt.free_mask(p, SPEC))(params))
  for b, case in enumerate(cases):
    leaves = [np.asarray(u[b]) for u in jax.tree.leaves(updates)]
    assert not all(np.all(np.isfinite(u)) for u in leaves), case
    # Even so, free weights do not move.
    for m, u in zip(mask, leaves):
      np.testing.assert_array_equal(u[np.asarray(m)], 0.0, err_msg=str(case))


@pytest.mark.parametrize("inner", ["sgd", "adam"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_gradient_of_a_diagonal_free_weight_propagates(inner, value):
  """A BatchNorm scale is a free weight with no row sum behind it.

  Its damaged gradient must still reach the updates (at the in-skeleton
  path gradient upstream), or apply_if_finite would not skip the step.
  """
  rng = np.random.default_rng(0)
  params = {
      "d0": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=(4,))},
      "bn": {"scale": 1 + 0.1 * rng.normal(size=(4,)), "bias": rng.normal(size=(4,))},
      "d1": {"kernel": rng.normal(size=(4, 2)), "bias": rng.normal(size=(2,))},
  }
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  spec = ecopt.Chain("d0", "bn", "d1")
  grads = jax.tree.map(lambda a: np.asarray(0.1 * rng.normal(size=a.shape), np.float32), params)
  finite = jax.tree.map(jnp.asarray, grads)
  grads["bn"]["scale"][1] = value
  grads = jax.tree.map(jnp.asarray, grads)
  opt = ecopt.g_space(optax.sgd(0.05) if inner == "sgd" else optax.adam(1e-2), spec)
  state = opt.init(params)
  ok, _ = opt.update(finite, state, params)
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(ok))
  updates, _ = opt.update(grads, state, params)
  assert not all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
  mask = ecopt.free_mask(params, spec)
  for m, u in zip(jax.tree.leaves(mask), jax.tree.leaves(updates)):
    np.testing.assert_array_equal(np.asarray(u)[np.asarray(m)], 0.0)


def test_plain_optax_propagates_too():
  """The reference behaviour: optax.sgd passes a NaN gradient on."""
  params, x, y = problem()
  grads = loss_grad(params, x, y, N)
  grads["l1"]["kernel"] = grads["l1"]["kernel"].at[0, 3].set(jnp.nan)
  updates, _ = optax.sgd(0.05).update(grads, optax.sgd(0.05).init(params), params)
  assert jnp.isnan(updates["l1"]["kernel"][0, 3])


def test_apply_if_finite_skips_the_step():
  params, x, y = problem()
  opt = optax.apply_if_finite(ecopt.g_sgd(0.05, SPEC, momentum=0.9), max_consecutive_errors=5)
  grad = loss_grad
  update = jax.jit(opt.update)

  def run(schedule):
    p, state = params, opt.init(params)
    for kind in schedule:
      g = grad(p, x, y, N)
      if kind == "nan":
        g["l0"]["kernel"] = g["l0"]["kernel"].at[0, 0].set(jnp.nan)
        updates, new_state = update(g, state, p)
        # Skipped: zero updates, params and inner state untouched.
        assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
        assert_bitwise_equal(optax.apply_updates(p, updates), p)
        assert_bitwise_equal(new_state.inner_state, state.inner_state)
        assert int(new_state.notfinite_count) == 1
        state = new_state
        continue
      updates, state = update(g, state, p)
      p = optax.apply_updates(p, updates)
    return p, state

  p, state = run(["ok", "ok", "nan", "ok"])
  q, ref_state = run(["ok", "ok", "ok"])
  # The skipped step left no trace: the run equals one without it.
  assert_bitwise_equal(p, q)
  assert_bitwise_equal(state.inner_state, ref_state.inner_state)
  assert int(state.total_notfinite) == 1 and int(ref_state.total_notfinite) == 0


# ------------------------------------------------------------- checkpoints ---


def train(step, state, params, x, y, steps):
  for _ in range(steps):
    params, state = step(params, state, x, y)
  return params, state


def abstract_target(opt, seed):
  """What a fresh process builds before restoring: a new init, new values."""
  params, _, _ = problem(seed)
  return {"params": params, "opt_state": opt.init(params)}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_orbax_resume_is_bitwise_identical(name, tmp_path):
  params, x, y = problem()
  opt = OPTIMIZERS[name]()
  step = cached_step(name)
  full_params, full_state = train(step, opt.init(params), params, x, y, 6)

  mid_params, mid_state = train(step, opt.init(params), params, x, y, 3)
  checkpointer = ocp.StandardCheckpointer()
  try:
    checkpointer.save(tmp_path / "step3", {"params": mid_params, "opt_state": mid_state})
    checkpointer.wait_until_finished()
    # Restore as a new process would: into a target from a fresh init.
    target = jax.tree.map(
        ocp.utils.to_shape_dtype_struct, abstract_target(OPTIMIZERS[name](), seed=7)
    )
    restored = checkpointer.restore(tmp_path / "step3", target)
  finally:
    checkpointer.close()
  assert isinstance(restored["opt_state"], ecopt.GSpaceState)
  assert restored["opt_state"].layout == mid_state.layout
  assert_bitwise_equal(restored["params"], mid_params)
  assert_bitwise_equal(restored["opt_state"], mid_state)

  resumed_params, resumed_state = train(
      step, restored["opt_state"], restored["params"], x, y, 3
  )
  assert_bitwise_equal(resumed_params, full_params)
  assert_bitwise_equal(resumed_state, full_state)


def test_flax_serialization_resume_is_bitwise_identical():
  params, x, y = problem()
  opt = OPTIMIZERS["g_adam"]()
  step = cached_step("g_adam")
  full_params, full_state = train(step, opt.init(params), params, x, y, 6)
  mid_params, mid_state = train(step, opt.init(params), params, x, y, 3)
  blob = flax.serialization.to_bytes({"params": mid_params, "opt_state": mid_state})
  restored = flax.serialization.from_bytes(abstract_target(OPTIMIZERS["g_adam"](), seed=7), blob)
  assert restored["opt_state"].layout == mid_state.layout
  resumed_params, resumed_state = train(
      step, restored["opt_state"], restored["params"], x, y, 3
  )
  assert_bitwise_equal(resumed_params, full_params)
  assert_bitwise_equal(resumed_state, full_state)


def test_restored_state_still_checks_the_params_layout(tmp_path):
  params, _, _ = problem()
  opt = OPTIMIZERS["g_adam"]()
  state = opt.init(params)
  checkpointer = ocp.StandardCheckpointer()
  try:
    checkpointer.save(tmp_path / "c", state)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(
        tmp_path / "c", jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    )
  finally:
    checkpointer.close()
  other = nets.mlp_params(jax.random.key(0), [4, 6, 5, 2], dtype=jnp.float32)
  with pytest.raises(ValueError, match="changed between init and update"):
    opt.update(other, restored, other)


# -------------------------------------------------------------- determinism ---


def seeded_run(seed, steps=5):
  """Init, node rescaling, mini-batches and training, all from one seed."""
  k_init, k_data, k_scale = jax.random.split(jax.random.key(seed), 3)
  params = nets.mlp_params(k_init, WIDTHS, dtype=jnp.float32)
  params = ecopt.rescale(ecopt.skeleton_init(params, SPEC), SPEC, k_scale, log_range=0.5)
  x, y = nets.data(k_data, WIDTHS[0], WIDTHS[-1], batch=64, dtype=jnp.float32)
  step = cached_step("g_adam")
  state = OPTIMIZERS["g_adam"]().init(params)
  for i in range(steps):
    order = jax.random.permutation(jax.random.fold_in(k_data, i), 64)[:32]
    params, state = step(params, state, x[order], y[order])
  return params, state


def test_same_seed_is_bitwise_deterministic():
  a = seeded_run(0)
  b = seeded_run(0)
  assert_bitwise_equal(a, b)
  # The comparison can fail: another seed gives other bits.
  c = seeded_run(1)
  assert bits(c[0]) != bits(a[0])
