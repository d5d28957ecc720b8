"""Bad specs and bad params fail at init (or first update) with clear errors.

Every case must raise ``ValueError`` before any array math runs, naming the
offending layer and quoting the shapes involved, and it must do so under
``jit`` too (structure is static, so errors surface at trace time).
"""

import re

import jax
import jax.numpy as jnp
import optax
import pytest

import ecopt


def mlp(widths, dtype=jnp.float32, prefix="l"):
  return {
      f"{prefix}{k}": {
          "kernel": jnp.ones((widths[k], widths[k + 1]), dtype),
          "bias": jnp.zeros((widths[k + 1],), dtype),
      }
      for k in range(len(widths) - 1)
  }


SPEC = ecopt.Chain("l0", "l1", "l2")
WIDTHS = [3, 4, 5, 2]


def init_error(params, spec=SPEC):
  with pytest.raises(ValueError) as info:
    ecopt.g_sgd(0.1, spec).init(params)
  return str(info.value)


def with_layer(layer, leaves):
  params = mlp(WIDTHS)
  params[layer] = leaves
  return params


# ------------------------------------------------------------ spec errors ---


def test_unknown_layer_path():
  msg = init_error(mlp(WIDTHS), ecopt.Chain("l0", "dense_1", "l2"))
  assert "'dense_1'" in msg and "not in the params" in msg
  assert "['l0', 'l1', 'l2']" in msg  # the layers that do exist


def test_unknown_nested_layer_path():
  params = {"block": mlp(WIDTHS)}
  msg = init_error(params, ecopt.Chain("block/l0", "block/lx"))
  assert "'block/lx'" in msg and "block/l1" in msg


def test_missing_kernel():
  msg = init_error(with_layer("l1", {"w": jnp.ones((4, 5))}))
  assert "'l1'" in msg and "no 'kernel'" in msg and "(4, 5)" in msg


def test_layer_path_naming_a_leaf():
  msg = init_error(mlp(WIDTHS), ecopt.Chain("l0/kernel", "l1", "l2"))
  assert "'l0/kernel'" in msg and "single parameter" in msg and "(3, 4)" in msg


def test_kernel_that_is_not_one_array():
  params = with_layer("l1", {"kernel": {"a": jnp.ones((4, 5)), "b": jnp.ones((4, 5))}})
  msg = init_error(params)
  assert "'l1'" in msg and "not a single array" in msg


@pytest.mark.parametrize(
    "shape", [(4,), (), (1, 1, 1, 1, 4, 5)], ids=["rank1", "rank0", "rank6"]
)
def test_unsupported_kernel_rank(shape):
  msg = init_error(with_layer("l1", {"kernel": jnp.ones(shape)}))
  assert "'l1'" in msg and f"rank {len(shape)}" in msg and str(shape) in msg


def test_empty_kernel():
  params = mlp([3, 0, 5, 2])
  msg = init_error(params)
  assert "'l0'" in msg and "(3, 0)" in msg


def test_dense_size_mismatch_quotes_both_shapes():
  msg = init_error(with_layer("l1", {"kernel": jnp.ones((3, 5))}))
  assert "Sizes do not chain" in msg
  assert "'l1' (shape (3, 5))" in msg and "'l0' (shape (3, 4)" in msg


def test_conv_size_mismatch_quotes_both_shapes():
  msg = init_error(with_layer("l1", {"kernel": jnp.ones((3, 3, 5, 5))}))
  assert "'l1' (shape (3, 3, 5, 5))" in msg and "'l0' (shape (3, 4)" in msg
  assert "channels" in msg


def test_batchnorm_scale_size_mismatch():
  msg = init_error(with_layer("l1", {"scale": jnp.ones((7,)), "bias": jnp.ones((7,))}))
  assert "'l1' (shape (7,))" in msg and "'l0' (shape (3, 4)" in msg


def test_bias_shape_mismatch():
  msg = init_error(with_layer("l1", {"kernel": jnp.ones((4, 5)), "bias": jnp.ones((4,))}))
  assert "'l1'" in msg and "(4,)" in msg and "(4, 5)" in msg


def test_leaf_in_two_chains():
  spec = [ecopt.Chain("l0", "l1"), ecopt.Chain("l1", "l2")]
  msg = init_error(mlp(WIDTHS), spec)
  assert "'l1/kernel' (shape (4, 5))" in msg and "two chains" in msg
  assert "Chain('l0', 'l1')" in msg and "Chain('l1', 'l2')" in msg


def test_chain_of_one_layer():
  with pytest.raises(ValueError, match="at least two layers"):
    ecopt.Chain("l0")
  with pytest.raises(ValueError, match="at least two layers"):
    ecopt.Chain(["l0"])


def test_chain_naming_a_layer_twice():
  with pytest.raises(ValueError, match="same layer twice"):
    ecopt.Chain("l0", "l1", "l0")


@pytest.mark.parametrize("spec", ["l0", ["l0", "l1"], [ecopt.Chain("l0", "l1"), "l2"], 3])
def test_spec_that_is_not_chains(spec):
  with pytest.raises(ValueError, match="ecopt.Chain"):
    ecopt.g_sgd(0.1, spec)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.complex64])
def test_non_float_parameters(dtype):
  params = mlp(WIDTHS)
  params["l1"]["kernel"] = params["l1"]["kernel"].astype(dtype)
  msg = init_error(params)
  assert "'l1'" in msg and jnp.dtype(dtype).name in msg and "(4, 5)" in msg


def test_non_float_bias():
  params = mlp(WIDTHS)
  params["l2"]["bias"] = jnp.zeros((2,), jnp.int32)
  msg = init_error(params)
  assert "'l2'" in msg and "bias" in msg and "int32" in msg


def test_every_public_function_validates():
  bad = ecopt.Chain("l0", "nope")
  params = mlp(WIDTHS)
  for fn in (
      ecopt.basis_path_values,
      ecopt.free_mask,
      ecopt.g_space_dim,
      ecopt.canonicalize,
      ecopt.skeleton_init,
  ):
    with pytest.raises(ValueError, match="'nope'"):
      fn(params, bad)


# ----------------------------------------------- errors at the first update ---


def changed_trees():
  base = mlp(WIDTHS)
  wider_head = mlp([3, 4, 5, 3])
  extra = dict(base, head={"kernel": jnp.ones((2, 2))})
  renamed_bias = dict(base, l1={"kernel": base["l1"]["kernel"], "b": base["l1"]["bias"]})
  return [
      pytest.param(wider_head, ["'l2/kernel' had shape (5, 2) at init and has (5, 3) now"], id="shape"),
      pytest.param(extra, ["new leaves: 'head/kernel' (2, 2)"], id="new-leaf"),
      pytest.param(
          renamed_bias,
          ["leaves gone: 'l1/bias' (5,)", "new leaves: 'l1/b' (5,)"],
          id="renamed-leaf",
      ),
  ]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("new_params,expected", changed_trees())
def test_params_tree_changed_between_init_and_update(new_params, expected, jit):
  opt = ecopt.g_sgd(0.1, SPEC, momentum=0.9)
  state = opt.init(mlp(WIDTHS))
  update = jax.jit(opt.update) if jit else opt.update
  with pytest.raises(ValueError) as info:
    update(new_params, state, new_params)
  msg = str(info.value)
  assert "changed between init and update" in msg
  for part in expected:
    assert part in msg


def test_removed_leaf_between_init_and_update():
  params = dict(mlp(WIDTHS), head={"kernel": jnp.ones((2, 2))})
  opt = ecopt.g_sgd(0.1, SPEC)
  state = opt.init(params)
  smaller = mlp(WIDTHS)
  with pytest.raises(ValueError, match=re.escape("leaves gone: 'head/kernel' (2, 2)")):
    opt.update(smaller, state, smaller)


def test_update_without_params():
  params = mlp(WIDTHS)
  opt = ecopt.g_sgd(0.1, SPEC)
  with pytest.raises(ValueError, match="needs the current params"):
    opt.update(params, opt.init(params))


def test_gradients_that_do_not_match_params():
  params = mlp(WIDTHS)
  opt = ecopt.g_sgd(0.1, SPEC)
  state = opt.init(params)
  grads = mlp([3, 4, 5, 3])
  with pytest.raises(ValueError, match=re.escape("'l2/bias' has shape (3,) in the updates but (2,)")):
    opt.update(grads, state, params)


def test_inner_transformation_changing_the_tree():
  params = mlp(WIDTHS)

  def init(p):
    return optax.EmptyState()

  def update(updates, state, params=None):
    return {"other": jnp.zeros(3)}, state

  opt = ecopt.g_space(optax.GradientTransformation(init, update), SPEC)
  with pytest.raises(ValueError, match="inner transformation's output"):
    opt.update(params, opt.init(params), params)


def test_valid_specs_still_pass():
  """The checks reject nothing legitimate: Dense, flatten, conv, BatchNorm."""
  params = {
      "conv": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.zeros(4)},
      "bn": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
      "dense": {"kernel": jnp.ones((4 * 9, 6)), "bias": jnp.zeros(6)},
      "out": {"kernel": jnp.ones((6, 2))},
      "free": {"kernel": jnp.ones((5, 5))},
  }
  spec = [ecopt.Chain("bn", "dense", "out")]
  opt = ecopt.g_sgd(0.1, spec)
  state = opt.init(params)
  # Tracing runs every check; nothing needs compiling.
  updates, _ = jax.eval_shape(opt.update, params, state, params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  assert ecopt.g_space_dim(params, ecopt.Chain("conv", "dense", "out")) > 0
