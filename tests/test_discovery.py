"""Tests for ecopt.discovery: infer_spec and verify_spec.

The zoo's hand-written specs are the reference for inference (linen and nnx,
BatchNorm in both modes). Negative cases check that no chain ever runs through
a level that is not scale-invariant, and every such wrong chain written by
hand is rejected by verify_spec, which names the chain, the layer and a node.
"""

from __future__ import annotations

import functools
import pickle
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ecopt
from ecopt.discovery import InferredSpec, infer_spec, verify_spec
from ecopt.zoo import linen as zl
from ecopt.zoo import nnx as zn

import nets



# Inputs and parameters are drawn with NumPy from abstract shapes
# (jax.eval_shape): eager jax initialisation compiles one small XLA program
# per op and shape, which would dominate this file's run time.


def _x(shape, seed=1, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _fill(abstract, seed=0):
  """Random values for an abstract params/state tree, by leaf name."""
  rng = np.random.default_rng(seed)
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  leaves = []
  for path, leaf in flat:
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    name = [n for n in names if n != "value"][-1]
    shape, dtype = leaf.shape, leaf.dtype
    if name == "kernel":
      fan_in = int(np.prod(shape[:-1]))
      value = rng.standard_normal(shape) / np.sqrt(fan_in)
    elif name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, shape)
    else:
      value = 0.1 * rng.standard_normal(shape)
    leaves.append(jnp.asarray(value, dtype))
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _linen(model, x, *args, **kw):
  """Variables for a linen model, without running its initialisers."""
  init = lambda key, x: model.init(key, x, *args, **kw)  # args are static
  return _fill(jax.eval_shape(init, jax.random.key(0), x))


def _nnx(make):
  """An nnx model built abstractly, then filled with values."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
  return nnx.merge(graphdef, _fill(state))


def _pairs(spec):
  """Every (layer, next layer) pair that some chain links by a hidden level."""
  return {(a, b) for chain in spec for a, b in zip(chain.layers, chain.layers[1:])}


def _layers(spec):
  return {layer for chain in spec for layer in chain.layers}


# ------------------------------------------------------------------ zoo ---

X2 = (3, 8, 8, 2)
X1 = (3, 12, 2)

_LINEN = {
    "mlp": (lambda: zl.MLP(features=(12, 10, 4)), X2),
    "plain": (lambda: zl.PlainNet(channels=(4, 6), num_classes=4), X2),
    "plain_bn_avg": (
        lambda: zl.PlainNet(channels=(4, 6), num_classes=4, use_bn=True, pool="avg"),
        X2,
    ),
    "resnet": (lambda: zl.ResNet(stage_channels=(4, 6), num_classes=4), X2),
    "resnet_no_bn": (
        lambda: zl.ResNet(stage_channels=(4, 6), num_classes=4, use_bn=False),
        X2,
    ),
    "cnn1d": (lambda: zl.CNN1D(channels=(4, 6), num_classes=4, kernel_size=3), X1),
}

_NNX = {
    "mlp": (lambda r: zn.MLP(in_features=128, features=(12, 10, 4), rngs=r), X2),
    "plain": (
        lambda r: zn.PlainNet(
            in_channels=2, channels=(4, 6), num_classes=4, input_size=(8, 8), rngs=r
        ),
        X2,
    ),
    "plain_bn_avg": (
        lambda r: zn.PlainNet(
            in_channels=2, channels=(4, 6), num_classes=4, use_bn=True, pool="avg",
            input_size=(8, 8), rngs=r,
        ),
        X2,
    ),
    "resnet": (
        lambda r: zn.ResNet(in_channels=2, stage_channels=(4, 6), num_classes=4, rngs=r),
        X2,
    ),
    "resnet_no_bn": (
        lambda r: zn.ResNet(
            in_channels=2, stage_channels=(4, 6), num_classes=4, use_bn=False, rngs=r
        ),
        X2,
    ),
    "cnn1d": (
        lambda r: zn.CNN1D(
            in_channels=2, channels=(4, 6), num_classes=4, kernel_size=3,
            input_length=12, rngs=r,
        ),
        X1,
    ),
}


@pytest.mark.parametrize("name", sorted(_LINEN))
def test_zoo_linen_reproduces_hand_written_spec(name):
  make, shape = _LINEN[name]
  model = make()
  x = _x(shape)
  variables = _linen(model, x)
  spec = infer_spec(model.apply, variables, x)
  assert isinstance(spec, InferredSpec)
  assert tuple(spec) == tuple(model.spec())  # same chains, same order
  assert spec.structure.dim == ecopt.g_space_dim(variables["params"], model.spec())


def test_zoo_linen_train_mode_batchnorm_gives_the_same_chains():
  model = zl.PlainNet(channels=(4, 6), num_classes=4, use_bn=True)
  x = _x(X2)
  variables = _linen(model, x)
  apply = functools.partial(model.apply, train=True, mutable=["batch_stats"])
  spec = infer_spec(apply, variables, x)
  assert tuple(spec) == tuple(model.spec())


@pytest.mark.parametrize("name", sorted(_NNX))
def test_zoo_nnx_reproduces_hand_written_spec(name):
  make, shape = _NNX[name]
  model = _nnx(make)
  if name == "resnet":
    model.eval()  # running statistics; the other BN model runs in train mode
  x = _x(shape)
  spec = infer_spec(model, None, x)
  assert tuple(spec) == tuple(model.spec())
  params = nnx.state(model, nnx.Param)
  assert spec.structure.dim == ecopt.g_space_dim(params, model.spec())


# ------------------------------------------------------- positive cases ---


@jax.custom_vjp
def _vjp_relu(z):
  return jnp.maximum(z, 0.0)


_vjp_relu.defvjp(lambda z: (_vjp_relu(z), z), lambda z, g: (g * (z > 0),))

_ACTS = {
    "relu": jax.nn.relu,  # custom_jvp around a jit around max
    "bare_max": lambda z: jnp.maximum(z, 0.0),
    "where": lambda z: jnp.where(z > 0, z, 0.0),
    "jit_relu": jax.jit(jax.nn.relu),
    "custom_vjp": _vjp_relu,
    "leaky": lambda z: jax.nn.leaky_relu(z, 0.1),
    "identity": lambda z: z,
    "scaled": lambda z: -2.0 * jax.nn.relu(z) / 3.0,
    "abs": jnp.abs,
    "clip0": lambda z: jnp.clip(z, 0),  # max with an integer 0, inside a jit
    "repeat": lambda z: jnp.repeat(jax.nn.relu(z), 2, axis=0)[::2],
}


class _Acts(nn.Module):
  """Dense layers joined by the ways a ReLU-like op can be written."""

  acts: tuple[str, ...]

  @nn.compact
  def __call__(self, x):
    for k, act in enumerate(self.acts):
      x = _ACTS[act](nn.Dense(5 + k % 3, name=f"Dense_{k}")(x))
    return nn.Dense(3, name=f"Dense_{len(self.acts)}")(x)


def test_homogeneous_activations_are_passed_through():
  """One level per way of writing ReLU; verify_spec (inside) confirms each."""
  acts = tuple(_ACTS)
  model = _Acts(acts)
  x = _x((6, 3))
  spec = infer_spec(model.apply, _linen(model, x), x)
  assert tuple(spec) == (
      ecopt.Chain(*[f"Dense_{k}" for k in range(len(acts) + 1)]),
  )


class _Pools(nn.Module):
  """Convs with pooling, remat, a spatial transpose, a flatten, a mean."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(3, (3, 3))(x))
    x = nn.max_pool(x, (2, 2), (2, 2), padding="SAME")
    x = nn.remat(nn.Conv)(4, (3, 3))(x)
    x = jnp.swapaxes(nn.relu(x), 1, 2)  # H <-> W, channels stay last
    x = nn.avg_pool(x, (2, 2), (1, 1), padding="SAME", count_include_pad=False)
    x = jax.jit(lambda z: z.reshape(z.shape[0], -1))(x)
    x = nn.relu(nn.Dense(5)(x))
    x = x.reshape(x.shape[0], 1, 5)
    x = nn.relu(nn.Conv(6, (1,))(x))
    x = jnp.mean(x, axis=1)
    return nn.Dense(2)(x)


def test_pooling_reshape_transpose_remat_and_mean():
  model = _Pools()
  x = _x((2, 6, 6, 2))
  variables = _linen(model, x)
  spec = infer_spec(model.apply, variables, x)
  assert tuple(spec) == (
      ecopt.Chain("Conv_0", "CheckpointConv_0", "Dense_0", "Conv_1", "Dense_1"),
  )
  # Dense_0 after the flatten is read as (positions, channels, out).
  geometry = spec.structure.chains[0]
  assert geometry.widths == (2, 3, 4, 5, 6, 2)
  assert geometry.layers[2].taps == 9


def test_plain_function_float64():
  widths = (4, 7, 6, 3)
  params = _fill({f"l{k}": {"kernel": jax.ShapeDtypeStruct(widths[k:k + 2], jnp.float64),
                            "bias": jax.ShapeDtypeStruct(widths[k + 1:k + 2], jnp.float64)}
                   for k in range(3)})
  x = _x((5, 4), dtype=jnp.float64)
  apply = functools.partial(nets.mlp_apply, n_layers=3)
  spec = infer_spec(apply, params, x)  # verified inside, at float64 tolerance
  assert tuple(spec) == (nets.mlp_spec(widths),)


def test_static_arguments_and_flags():
  class Flag(nn.Module):

    @nn.compact
    def __call__(self, x, use_tanh, scale):
      act = jnp.tanh if use_tanh else nn.relu
      h = act(scale * nn.Dense(4)(x))
      return nn.Dense(2)(h)

  model = Flag()
  x = _x((3, 2))
  variables = _linen(model, x, False, 1.0)
  # Non-array positional arguments are static.
  assert tuple(infer_spec(model.apply, variables, x, False, 2.0, verify=False)) == (
      ecopt.Chain("Dense_0", "Dense_1"),
  )
  assert tuple(infer_spec(model.apply, variables, x, True, 2.0, verify=False)) == ()
  # Keyword arguments are static too.
  kw = infer_spec(model.apply, variables, x, use_tanh=True, scale=1.0, verify=False)
  assert tuple(kw) == ()


# ------------------------------------------------------- negative cases ---


class _Mixed(nn.Module):
  """Dense_0 -act0-> Dense_1 -relu-> Dense_2, plus variants."""

  kind: str

  @nn.compact
  def __call__(self, x):
    if self.kind == "tanh":
      x = jnp.tanh(nn.Dense(6)(x))
    elif self.kind == "gelu_tanh":
      x = nn.gelu(nn.Dense(6)(x), approximate=True)
    elif self.kind == "gelu_erf":
      x = nn.gelu(nn.Dense(6)(x), approximate=False)
    elif self.kind == "layernorm":
      x = nn.relu(nn.LayerNorm()(nn.Dense(6)(x)))
    elif self.kind == "relu6":
      x = jax.nn.relu6(nn.Dense(6)(x))
    elif self.kind == "softmax":
      x = jax.nn.softmax(nn.Dense(6)(x))
    elif self.kind == "square":
      x = nn.Dense(6)(x) ** 2
    elif self.kind == "concat":  # the hidden level next to unscaled inputs
      x = jnp.concatenate([nn.relu(nn.Dense(6)(x)), x], axis=-1)
    elif self.kind == "offset":  # relu(z + 1) is not homogeneous in z
      x = nn.relu(nn.Dense(6)(x) + 1.0)
    elif self.kind == "one_node_tanh":  # only node 3 is not homogeneous
      z = nn.Dense(6)(x)
      x = jnp.where(jnp.arange(6) == 3, jnp.tanh(z), nn.relu(z))
    x = nn.relu(nn.Dense(5)(x))
    return nn.Dense(2)(x)


_NEG = [
    "tanh", "gelu_tanh", "gelu_erf", "layernorm", "relu6", "softmax", "square",
    "concat", "offset", "one_node_tanh",
]


@pytest.mark.parametrize("kind", _NEG)
def test_no_chain_through_a_non_homogeneous_level(kind):
  model = _Mixed(kind)
  x = _x((8, 3))
  variables = _linen(model, x)
  spec = infer_spec(model.apply, variables, x, verify=kind == "layernorm")
  assert ("Dense_0", "Dense_1") not in _pairs(spec)
  assert ("Dense_1", "Dense_2") in _pairs(spec)  # the ReLU level is still found
  if kind == "layernorm":
    # LayerNorm's affine is a diagonal layer like BatchNorm's: it may start a
    # chain, but the Dense_0 level, which LayerNorm normalises, is not hidden.
    assert "Dense_0" not in _layers(spec)
    assert tuple(spec) == (ecopt.Chain("LayerNorm_0", "Dense_1", "Dense_2"),)
  else:
    assert tuple(spec) == (ecopt.Chain("Dense_1", "Dense_2"),)
  assert "Dense_0" in spec.ends


@pytest.mark.parametrize("kind", ["tanh", "gelu_erf", "offset"])
def test_verify_rejects_the_wrong_hand_written_chain(kind):
  model = _Mixed(kind)
  x = _x((8, 3))
  variables = _linen(model, x)
  wrong = ecopt.Chain("Dense_0", "Dense_1", "Dense_2")
  with pytest.raises(ValueError) as info:
    verify_spec(model.apply, variables, wrong, x)
  message = str(info.value)
  assert "Chain('Dense_0', 'Dense_1', 'Dense_2')" in message
  assert "hidden level 1" in message and "'Dense_0'" in message
  assert re.search(r"node \d", message)
  assert {"tanh": "`tanh`", "gelu_erf": "`erf", "offset": "constant"}[kind] in message
  assert "used outside its chain" not in message  # it is a non-homogeneous op
  if kind == "tanh":  # the correct part of the chain passes
    verify_spec(model.apply, variables, ecopt.Chain("Dense_1", "Dense_2"), x)


def test_verify_names_the_offending_node():
  model = _Mixed("one_node_tanh")
  x = _x((8, 3))
  variables = _linen(model, x)
  with pytest.raises(ValueError, match=r"scaling node 3 changes the outputs"):
    verify_spec(model.apply, variables, ecopt.Chain("Dense_0", "Dense_1"), x)


class _Skip(nn.Module):
  """h1 = relu(D0 x) is reused by a skip connection around D1."""

  @nn.compact
  def __call__(self, x):
    h1 = nn.relu(nn.Dense(6)(x))
    h2 = nn.relu(nn.Dense(6)(h1)) + h1
    h3 = nn.relu(nn.Dense(6)(h2))
    return nn.Dense(2)(h3)


def test_skip_connection_level_is_not_hidden_and_verify_says_why():
  model = _Skip()
  x = _x((8, 3))
  variables = _linen(model, x)
  spec = infer_spec(model.apply, variables, x)
  assert ("Dense_0", "Dense_1") not in _pairs(spec)
  assert ("Dense_1", "Dense_2") not in _pairs(spec)
  assert tuple(spec) == (ecopt.Chain("Dense_2", "Dense_3"),)
  with pytest.raises(ValueError) as info:
    verify_spec(model.apply, variables, ecopt.Chain("Dense_0", "Dense_1"), x)
  message = str(info.value)
  assert "used outside its chain" in message
  assert "Chain('Dense_0', 'Dense_1')" in message and "'Dense_1'" in message


def test_zoo_resnet_wrong_chain_through_the_block_input_is_rejected():
  model = zl.ResNet(stage_channels=(4,), num_classes=3, use_bn=False)
  x = _x((2, 6, 6, 2))
  variables = _linen(model, x)
  wrong = (ecopt.Chain("stem_conv", "blocks_0/conv1", "blocks_0/conv2"),)
  with pytest.raises(ValueError, match=r"stem_conv.*used outside its chain"):
    verify_spec(model.apply, variables, wrong, x)
  verify_spec(model.apply, variables, model.spec(), x)


class _SharedDense(nn.Module):
  """One Dense module applied twice (tied weights)."""

  @nn.compact
  def __call__(self, x):
    shared = nn.Dense(5)
    h = nn.relu(shared(x))
    h = nn.relu(shared(h))
    return nn.Dense(2)(h)


class _Fork(nn.Module):
  """One hidden level read by two layers (two heads)."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(6)(x))
    return nn.Dense(2)(h), nn.Dense(3)(h)


def test_level_with_two_consumers_is_not_hidden():
  model = _Fork()
  x = _x((4, 3))
  spec = infer_spec(model.apply, _linen(model, x), x, verify=False)
  assert tuple(spec) == ()
  assert "two layers" in spec.ends["Dense_0"]
  with pytest.raises(ValueError, match="used outside its chain"):
    verify_spec(model.apply, _linen(model, x), ecopt.Chain("Dense_0", "Dense_1"), x)


def test_tied_weights_same_module_twice():
  model = _SharedDense()
  x = _x((4, 5))
  variables = _linen(model, x)
  spec = infer_spec(model.apply, variables, x)
  assert "Dense_0" not in _layers(spec)
  assert tuple(spec) == ()


def _autoencoder(params, x):
  h = jax.nn.relu(x @ params["enc"]["kernel"] + params["enc"]["bias"])
  h = jax.nn.relu(h @ params["mid"]["kernel"])
  return h @ params["enc"]["kernel"].T  # decoder tied to the encoder


def _tied_next(params, x):
  h = jax.nn.relu(x @ params["a"]["kernel"])
  h = jax.nn.relu(h @ params["b"]["kernel"])
  h = jax.nn.relu(h @ params["b"]["kernel"])  # 'b' used twice
  return h @ params["c"]["kernel"]


def test_tied_weights_plain_functions():
  sd = jax.ShapeDtypeStruct
  params = _fill({
      "enc": {"kernel": sd((4, 6), jnp.float32), "bias": sd((6,), jnp.float32)},
      "mid": {"kernel": sd((6, 6), jnp.float32)},
  })
  x = _x((5, 4))
  spec = infer_spec(_autoencoder, params, x)
  assert "enc" not in _layers(spec)
  params2 = _fill({
      "a": {"kernel": sd((3, 4), jnp.float32)},
      "b": {"kernel": sd((4, 4), jnp.float32)},
      "c": {"kernel": sd((4, 2), jnp.float32)},
  })
  spec2 = infer_spec(_tied_next, params2, _x((5, 3)))
  assert "b" not in _layers(spec2)
  with pytest.raises(ValueError, match="Chain\\('a', 'b'\\)"):
    verify_spec(_tied_next, params2, ecopt.Chain("a", "b"), _x((5, 3)))


def test_depthwise_conv_and_channel_moving_transpose_end_chains():
  class M(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(4, (3, 3))(x))
      x = nn.relu(nn.Conv(4, (3, 3), feature_group_count=4)(x))  # depthwise
      x = nn.relu(nn.Conv(3, (3, 3))(x))
      x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # NCHW flatten
      return nn.Dense(2)(x)

  model = M()
  x = _x((2, 5, 5, 2))
  spec = infer_spec(model.apply, _linen(model, x), x)
  assert tuple(spec) == ()
  assert "Conv_1" in spec.ends and "Conv_2" in spec.ends


def test_nnx_negative_case_and_argument_check():
  class TanhNet(nnx.Module):

    def __init__(self, rngs):
      self.a = nnx.Linear(3, 5, rngs=rngs)
      self.b = nnx.Linear(5, 5, rngs=rngs)
      self.c = nnx.Linear(5, 2, rngs=rngs)

    def __call__(self, x):
      return self.c(nnx.relu(self.b(jnp.tanh(self.a(x)))))

  model = _nnx(TanhNet)
  x = _x((6, 3))
  spec = infer_spec(model, None, x)
  assert tuple(spec) == (ecopt.Chain("b", "c"),)
  with pytest.raises(ValueError, match="Chain\\('a', 'b'\\).*'a'"):
    verify_spec(model, None, ecopt.Chain("a", "b"), x)
  with pytest.raises(ValueError, match="variables=None"):
    infer_spec(model, nnx.state(model), x)


# ---------------------------------------------------- verify_spec itself ---


class _Leak(nn.Module):
  """relu plus a tiny non-homogeneous term: 1e-7 * tanh(z)."""

  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    z = nn.Dense(6, param_dtype=self.param_dtype)(x)
    return nn.Dense(2, param_dtype=self.param_dtype)(nn.relu(z) + 1e-7 * jnp.tanh(z))


def test_tolerance_is_set_by_dtype():
  spec = ecopt.Chain("Dense_0", "Dense_1")
  # float32: a 1e-7 effect is below the float32 tolerance.
  model = _Leak(jnp.float32)
  x = _x((8, 3))
  variables = _linen(model, x)
  verify_spec(model.apply, variables, spec, x)
  with pytest.raises(ValueError, match="tolerance 1e-09"):
    verify_spec(model.apply, variables, spec, x, rtol=1e-9)
  # float64: the same effect is far above the float64 tolerance.
  model = _Leak(jnp.float64)
  x = _x((8, 3), dtype=jnp.float64)
  variables = _linen(model, x)
  with pytest.raises(ValueError, match="tolerance 1e-08"):
    verify_spec(model.apply, variables, spec, x)
  # bfloat16 compute: rounding of the rescaled weights stays below 5e-2.
  model = nn.Sequential([nn.Dense(6, dtype=jnp.bfloat16), nn.relu,
                         nn.Dense(2, dtype=jnp.bfloat16)])
  x = _x((8, 3))
  variables = _linen(model, x)
  assert tuple(infer_spec(model.apply, variables, x)) == (
      ecopt.Chain("layers_0", "layers_2"),
  )
  with pytest.raises(ValueError, match="tolerance 1e-06"):
    verify_spec(model.apply, variables, ecopt.Chain("layers_0", "layers_2"), x,
                rtol=1e-6)


def test_verify_passes_a_correct_spec_with_large_factors():
  model = zl.MLP(features=(7, 6, 3))
  x = _x((5, 4))
  variables = _linen(model, x)
  verify_spec(model.apply, variables, model.spec(), x, log_range=3.0, seed=3)


def test_verify_bad_spec_geometry_raises_value_error():
  model = zl.MLP(features=(7, 6, 3))
  x = _x((5, 4))
  variables = _linen(model, x)
  with pytest.raises(ValueError, match="Dense_9"):
    verify_spec(model.apply, variables, ecopt.Chain("Dense_0", "Dense_9"), x)
  with pytest.raises(ValueError, match="Sizes do not chain"):
    verify_spec(model.apply, variables, ecopt.Chain("Dense_0", "Dense_2"), x)


# ---------------------------------------------------------- the summary ---


def test_summary_and_spec_behaviour():
  model = zl.PlainNet(channels=(4, 6), num_classes=4, use_bn=True)
  x = _x(X2)
  variables = _linen(model, x)
  spec = infer_spec(model.apply, variables, x)
  params = variables["params"]
  text = str(spec)
  m = sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(params))
  assert f"m = {m}" in text
  assert "H = 10" in text  # 4 + 6 hidden nodes
  assert f"dim = m - H = {m - 10}" in text
  assert "Chain('BatchNorm_0', 'Conv_1')" in text
  assert "hidden sizes (4,)" in text and "hidden sizes (6,)" in text
  assert "Conv_0" in text  # listed among the layers in no chain
  assert repr(spec) == text
  assert "Conv_0" in spec.explain() and "BatchNorm_0" in spec.explain()
  # An ordinary spec: equal to the tuple of its chains, editable, picklable.
  assert spec == model.spec() and spec.chains == tuple(spec)
  assert [c.layers for c in spec][0] == ("BatchNorm_0", "Conv_1")
  edited = [c for c in spec if c.layers[-1] != "Dense_0"]
  assert ecopt.g_space_dim(params, edited) == m - 4
  assert pickle.loads(pickle.dumps(spec)) == spec
  assert ecopt.g_space_dim(params, spec) == spec.structure.dim
  hash(spec)


# ---------------------------------------------------- training-mode calls ---


class _TrainNet(nn.Module):
  """Dense -> BatchNorm(axis_name) -> ReLU -> Dropout -> Dense."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(6)(x)
    x = nn.BatchNorm(use_running_average=not train, axis_name="batch")(x)
    x = nn.Dropout(0.5, deterministic=not train)(nn.relu(x))
    return nn.Dense(2)(x)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"train": False},
        {"train": True, "mutable": ["batch_stats"], "rngs": {"dropout": jax.random.key(1)}},
        {"train": True},  # mutable and the dropout stream are added
    ],
    ids=["eval", "train", "train_bare"],
)
def test_linen_training_call_with_axis_name_dropout_and_mutable(kwargs):
  model, x = _TrainNet(), _x((5, 3))
  variables = _linen(model, x, False)
  spec = infer_spec(model.apply, variables, x, **kwargs)
  assert tuple(spec) == (ecopt.Chain("BatchNorm_0", "Dense_1"),)
  verify_spec(model.apply, variables, spec, x, **kwargs)


def test_reasons_name_the_real_cause():
  """A linear level, a normalisation's statistics, and a softmax, each named."""

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.LayerNorm()(x)
      h = nn.relu(nn.Dense(6)(x))
      logits = nn.Dense(4)(h)
      return jax.nn.softmax(logits), nn.Dense(3)(nn.LayerNorm()(logits))

  model, x = Net(), _x((5, 3))
  variables = _linen(model, x)
  spec = infer_spec(model.apply, variables, x, require_activation=True)
  assert tuple(spec) == (ecopt.Chain("Dense_0", "Dense_1"),)
  why = spec.ends
  assert "no ReLU-family activation" in why["LayerNorm_0"]
  assert "reduced over its node axis" in why["Dense_1"]  # the softmax's max
  assert "squared" in why["Dense_2"] or "reaches an output" in why["Dense_2"]
  assert "require_activation" in spec.explain()
  linear_too = infer_spec(model.apply, variables, x)
  assert tuple(linear_too) == (
      ecopt.Chain("LayerNorm_0", "Dense_0", "Dense_1"), ecopt.Chain("LayerNorm_1", "Dense_2"),
  )
  assert linear_too.kind(0).startswith("mixed") and linear_too.kind(1) == "linear"
  assert "mixed" in str(linear_too) and "linear chain" in str(linear_too)
