"""ecopt.transform: the optax-signature aliases, path-value weight decay and
the extra arguments that mean weights (optax.lbfgs's line search)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ecopt
import nets

WIDTHS = [4, 6, 6, 3]
N = len(WIDTHS) - 1
SPEC = nets.mlp_spec(WIDTHS)


def _problem(seed=0):
  params = ecopt.skeleton_init(
      nets.mlp_params(jax.random.key(seed), WIDTHS, dtype=jnp.float64), SPEC
  )
  x, y = nets.data(jax.random.key(seed + 1), WIDTHS[0], WIDTHS[-1], batch=24)
  return params, x, y


def _loss(params, x, y):
  return nets.mse_loss(params, x, y, N)


def _run(opt, params, x, y, steps):
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(_loss)(params, x, y)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params


@pytest.mark.parametrize(
    "alias, inner",
    [
        (lambda: ecopt.g_adam(1e-2, SPEC, b1=0.8, b2=0.99, eps=1e-6),
         lambda: optax.adam(1e-2, b1=0.8, b2=0.99, eps=1e-6)),
        (lambda: ecopt.g_adamw(1e-2, SPEC, weight_decay=0.0),
         lambda: optax.adam(1e-2)),
        (lambda: ecopt.g_rmsprop(1e-2, SPEC, decay=0.99, eps_in_sqrt=False),
         lambda: optax.rmsprop(1e-2, decay=0.99, eps_in_sqrt=False)),
        (lambda: ecopt.g_sgd(1e-2, SPEC, momentum=0.9, nesterov=True),
         lambda: optax.sgd(1e-2, momentum=0.9, nesterov=True)),
    ],
    ids=["g_adam", "g_adamw_no_decay", "g_rmsprop", "g_sgd"],
)
def test_aliases_are_g_space_of_the_optax_optimizer(alias, inner):
  params, x, y = _problem()
  got = _run(alias(), params, x, y, 4)
  want = _run(ecopt.g_space(inner(), SPEC), params, x, y, 4)
  assert nets.tree_rel_err(got, want) < 1e-14


def _decay_step(opt, params):
  """One step from zero gradients: the decay alone moves the path values."""
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(opt.update)(zeros, opt.init(params), params)
  return optax.apply_updates(params, updates)


@pytest.mark.parametrize(
    "make", [lambda lr, wd: ecopt.g_sgd(lr, SPEC, weight_decay=wd),
             lambda lr, wd: ecopt.g_adamw(lr, SPEC, weight_decay=wd)],
    ids=["g_sgd", "g_adamw"],
)
def test_weight_decay_shrinks_every_path_value_but_the_all_skeleton_ones(make):
  params, _, _ = _problem()
  params["extra"] = {"kernel": jnp.full((2, 2), 3.0, jnp.float64)}
  lr, wd = 0.1, 0.5
  new = _decay_step(make(lr, wd), params)
  v0, v1 = ecopt.basis_path_values(params, SPEC), ecopt.basis_path_values(new, SPEC)
  mask = ecopt.path_decay_mask(v0, SPEC)
  free = ecopt.free_mask(params, SPEC)
  for path, a, b, m, f in zip(
      jax.tree_util.tree_leaves_with_path(v0), jax.tree.leaves(v0),
      jax.tree.leaves(v1), jax.tree.leaves(mask), jax.tree.leaves(free)):
    a, b, m, f = map(np.asarray, (a, b, m, f))
    np.testing.assert_allclose(b[m], (1 - lr * wd) * a[m], rtol=1e-13, err_msg=str(path))
    # All-skeleton values (and the free positions through them) stay.
    np.testing.assert_allclose(b[~m & ~f], a[~m & ~f], rtol=1e-13, err_msg=str(path))
  # Each hidden level's in-skeleton coordinates are the ones left out.
  n_out = sum(int((~np.asarray(m) & ~np.asarray(f)).sum())
              for m, f in zip(jax.tree.leaves(mask), jax.tree.leaves(free)))
  assert n_out == WIDTHS[1]  # equal hidden widths: only level 1 owns its edges


def test_weight_decay_keeps_the_invariance():
  params, x, y = _problem()
  scaled = ecopt.rescale(params, SPEC, jax.random.key(3), log_range=2.0)
  opt = ecopt.g_sgd(0.05, SPEC, momentum=0.9, weight_decay=1e-2)
  a, b = _run(opt, params, x, y, 5), _run(opt, scaled, x, y, 5)
  fa = nets.mlp_apply(a, x, N)
  assert nets.rel_err(fa, nets.mlp_apply(b, x, N)) < 1e-11
  # Teeth: weight decay on weights before G-space breaks it.
  wrong = optax.chain(optax.add_decayed_weights(1e-1), ecopt.g_sgd(0.05, SPEC))
  c, d = _run(wrong, params, x, y, 5), _run(wrong, scaled, x, y, 5)
  assert nets.rel_err(nets.mlp_apply(c, x, N), nets.mlp_apply(d, x, N)) > 1e-4


def test_weight_decay_is_injectable_and_takes_a_schedule():
  params, x, y = _problem()
  opt = optax.inject_hyperparams(ecopt.g_sgd)(learning_rate=0.1, spec=SPEC, weight_decay=0.5)
  want = _decay_step(ecopt.g_sgd(0.1, SPEC, weight_decay=0.5), params)
  got = _decay_step(opt, params)
  assert nets.tree_rel_err(got, want) < 1e-15
  scheduled = _decay_step(ecopt.g_sgd(0.1, SPEC, weight_decay=optax.constant_schedule(0.5)), params)
  assert nets.tree_rel_err(scheduled, want) < 1e-15


def _lbfgs_run(opt, params, x, y, steps, from_state=True):
  loss = lambda p: _loss(p, x, y)
  if from_state:  # the loop optax's documentation shows
    value_and_grad = optax.value_and_grad_from_state(loss)
  else:
    value_and_grad = lambda p, state: jax.value_and_grad(loss)(p)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(params, updates), state

  values = []
  for _ in range(steps):
    params, state = step(params, state)
    values.append(float(loss(params)))
  return params, values


@pytest.mark.parametrize("from_state", [True, False], ids=["value_and_grad_from_state", "value_and_grad"])
def test_lbfgs_line_search_runs_in_path_space(from_state):
  params, x, y = _problem()
  scaled = ecopt.rescale(params, SPEC, jax.random.key(5), log_range=1.5)
  opt = ecopt.g_space(optax.lbfgs(), SPEC)
  a, la = _lbfgs_run(opt, params, x, y, 6, from_state)
  b, lb = _lbfgs_run(opt, scaled, x, y, 6, from_state)
  # The line search's value_fn is the loss at the weights the path values
  # stand for: the loss falls, and two node-rescaled starts stay one function.
  assert la[-1] < 0.5 * float(_loss(params, x, y))
  np.testing.assert_allclose(la, lb, rtol=1e-9)
  assert nets.rel_err(nets.mlp_apply(a, x, N), nets.mlp_apply(b, x, N)) < 1e-9
  # Teeth: L-BFGS on weights is not invariant under node scaling.
  _, lc = _lbfgs_run(optax.lbfgs(), params, x, y, 6)
  _, ld = _lbfgs_run(optax.lbfgs(), scaled, x, y, 6)
  assert abs(lc[-1] - ld[-1]) > 1e-6 * abs(lc[-1])


def test_extra_grad_argument_must_match_the_params():
  params, x, y = _problem()
  opt = ecopt.g_space(optax.lbfgs(), SPEC)
  grads = jax.grad(_loss)(params, x, y)
  with pytest.raises(ValueError, match="grad"):
    opt.update(grads, opt.init(params), params, value=0.0, grad={"l0": grads["l0"]},
               value_fn=lambda p: _loss(p, x, y))


def test_a_transformation_after_g_space_is_not_the_path_step():
  """Why nothing may follow a G-space transformation (README, docs §4)."""
  params, x, y = _problem()
  lr = 0.05
  right = _run(ecopt.g_adam(lr, SPEC), params, x, y, 4)
  same = _run(ecopt.g_space(optax.chain(optax.scale_by_adam(), optax.scale(-lr)), SPEC), params, x, y, 4)
  wrong = _run(optax.chain(ecopt.g_space(optax.scale_by_adam(), SPEC), optax.scale(-lr)), params, x, y, 4)
  assert nets.tree_rel_err(same, right) < 1e-14
  loss = lambda p: float(_loss(p, x, y))
  assert abs(loss(wrong) - loss(right)) > 0.1 * loss(right)
