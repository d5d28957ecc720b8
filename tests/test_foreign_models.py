"""infer_spec and g_sgd on models written the way their authors write them.

Each model re-creates, in this file's own code, the shape of a model from
elsewhere (Flax's examples, the nnx tutorial and docs, a transformer encoder
block, PPO, a VAE, an ensemble) and its training call. For each, the
inferred spec has the true hidden node count H, and G-SGD on it is invariant
under a random node scaling in float64 (plain SGD is not). Where a reading
from shapes alone would be wrong, the test shows that reading breaks the
invariance, so the check has teeth.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ecopt


def _x(shape, seed=1):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float64)


def _f64(tree):
  return jax.tree.map(
      lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
  )


def _init(model, *args, **kwargs):
  """Linen variables in float64, from one compiled init (eager init compiles
  one small program per operation)."""
  init = jax.jit(functools.partial(model.init, **kwargs))
  return _f64(init(jax.random.key(0), *args))


def _nnx(make):
  """An nnx model built by one compiled constructor."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
  state = jax.jit(lambda: nnx.split(make(nnx.Rngs(0)))[1])()
  return nnx.merge(graphdef, state)


def _hidden(spec):
  return spec.structure.num_hidden


def _gap(loss, output, params, spec, tx_factory, steps=3, seed=0):
  """Largest relative output gap after ``steps`` steps from params and g(params).

  ``g`` is a random node scaling of ``spec``'s hidden nodes.
  """
  scaled = ecopt.rescale(params, spec, jax.random.key(seed), log_range=1.0)
  before = output(params)
  np.testing.assert_allclose(output(scaled), before, rtol=1e-9, atol=1e-9)

  tx = tx_factory()

  @jax.jit
  def run(p):
    def step(_, carry):
      p, state = carry
      updates, state = tx.update(jax.grad(loss)(p), state, p)
      return optax.apply_updates(p, updates), state

    p, _ = jax.lax.fori_loop(0, steps, step, (p, tx.init(p)))
    return output(p)

  a, b = np.asarray(run(params)), np.asarray(run(scaled))
  assert np.all(np.isfinite(a)) and np.max(np.abs(a - np.asarray(before))) > 1e-6  # it moved
  return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))


def _check_invariance(loss, output, params, spec, lr=1e-3, teeth=False):
  params = ecopt.skeleton_init(params, spec)
  assert _gap(loss, output, params, spec, lambda: ecopt.g_sgd(lr, spec)) < 1e-10
  if teeth:
    assert _gap(loss, output, params, spec, lambda: optax.sgd(lr)) > 1e-4
  return params


def _mse(apply, x, y):
  return lambda p: jnp.mean((apply(p, x) - y) ** 2)


# ------------------------------------------------------- Flax MNIST CNN ---


class MnistCNN(nn.Module):
  """The Flax MNIST example's CNN, smaller."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(features=8, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nn.Conv(features=16, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(features=32)(x)
    x = nn.relu(x)
    return nn.Dense(features=10)(x)


def test_flax_mnist_cnn():
  model, x = MnistCNN(), _x((4, 8, 8, 1))
  params = _init(model, x)["params"]
  spec = ecopt.infer_spec(model.apply, {"params": params}, x)
  assert tuple(spec) == (ecopt.Chain("Conv_0", "Conv_1", "Dense_0", "Dense_1"),)
  assert _hidden(spec) == 8 + 16 + 32
  apply = lambda p, x: model.apply({"params": p}, x)
  _check_invariance(
      _mse(apply, x, _x((4, 10), 2)), lambda p: apply(p, x), params, spec, teeth=True
  )


# ---------------------------------- ResNet-ish block, BatchNorm training ---


class ResBlock(nn.Module):
  """A ResNet basic block in the Flax ImageNet example's style."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=0.9, axis_name="batch"
    )
    x = nn.Conv(8, (3, 3), use_bias=False, name="stem")(x)
    x = nn.relu(norm(name="stem_bn")(x))
    residual = x
    y = nn.Conv(8, (3, 3), use_bias=False)(x)
    y = nn.relu(norm()(y))
    y = nn.Conv(8, (3, 3), use_bias=False)(y)
    y = norm()(y)
    x = nn.relu(residual + y)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(3)(x)


def test_resnet_block_batchnorm_training_call():
  model, x = ResBlock(), _x((4, 6, 6, 2))
  variables = _init(model, x, train=False)  # eval mode needs no axis
  # The call a training step makes: BatchNorm statistics mutable, train=True,
  # its axis_name unbound outside pmap (infer_spec binds it for the trace).
  spec = ecopt.infer_spec(model.apply, variables, x, train=True, mutable=["batch_stats"])
  # Inside the block only: the stem's level also feeds the skip connection.
  assert tuple(spec) == (ecopt.Chain("BatchNorm_0", "Conv_1"),)
  assert _hidden(spec) == 8
  assert "skip/residual" in spec.ends["stem_bn"] and "Conv_1" in spec.ends
  # Eval mode gives the same chains; a call without mutable is completed.
  assert set(ecopt.infer_spec(model.apply, variables, x, train=False)) == set(spec)
  assert set(ecopt.infer_spec(model.apply, variables, x, train=True)) == set(spec)

  stats = variables["batch_stats"]

  def apply(p, x):
    f = lambda _: model.apply(
        {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
    )[0]
    return jax.vmap(f, axis_name="batch", out_axes=None)(jnp.zeros(1))

  _check_invariance(
      _mse(apply, x, _x((4, 3), 2)), lambda p: apply(p, x), variables["params"], spec
  )


# ------------------------------------------------- nnx MNIST tutorial ---


class NnxCNN(nnx.Module):
  """The nnx MNIST tutorial's CNN, smaller, with Dropout."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 4, kernel_size=(3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(4, 8, kernel_size=(3, 3), rngs=rngs)
    self.avg_pool = functools.partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
    self.linear1 = nnx.Linear(2 * 2 * 8, 16, rngs=rngs)
    self.dropout = nnx.Dropout(rate=0.1, rngs=rngs)
    self.linear2 = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x, rngs=None):
    x = self.avg_pool(nnx.relu(self.conv1(x)))
    x = self.avg_pool(nnx.relu(self.conv2(x)))
    x = x.reshape(x.shape[0], -1)
    x = self.dropout(nnx.relu(self.linear1(x)), rngs=rngs)
    return self.linear2(x)


@pytest.mark.parametrize("how", ["eval", "train_rngs_positional", "train_rngs_keyword"])
def test_nnx_mnist_tutorial_cnn(how):
  model, x = _nnx(lambda r: NnxCNN(rngs=r)), _x((4, 8, 8, 1)).astype(jnp.float32)
  if how == "eval":
    model.eval()
  else:
    model.train()
  args = (nnx.Rngs(dropout=1),) if how == "train_rngs_positional" else ()
  kwargs = {"rngs": nnx.Rngs(dropout=1)} if how == "train_rngs_keyword" else {}
  spec = ecopt.infer_spec(model, None, x, *args, **kwargs)
  assert tuple(spec) == (ecopt.Chain("conv1", "conv2", "linear1", "linear2"),)
  assert _hidden(spec) == 4 + 8 + 16
  if how == "eval":
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = _f64(params)
    apply = lambda p, x: nnx.merge(graphdef, p, rest)(x)
    _check_invariance(_mse(apply, _x((4, 8, 8, 1)), _x((4, 10), 2)),
                      lambda p: apply(p, _x((4, 8, 8, 1))), params, spec)


# ------------------------------------------------- transformer encoder ---


class EncoderBlock(nn.Module):
  """A pre-norm transformer encoder block (attention, LayerNorm, ReLU FFN)."""

  heads: int = 2
  mlp_dim: int = 12

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm()(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.heads)(y, y)
    x = x + y
    y = nn.LayerNorm()(x)
    y = nn.Dense(self.mlp_dim)(y)
    y = nn.relu(y)
    y = nn.Dense(x.shape[-1])(y)
    return x + y


def test_transformer_encoder_block():
  model, x = EncoderBlock(), _x((2, 5, 8))
  params = _init(model, x)["params"]
  spec = ecopt.infer_spec(model.apply, {"params": params}, x)
  names = {c.names for c in spec}
  assert ("LayerNorm_1", "Dense_0", "Dense_1") in names
  assert ("MultiHeadDotProductAttention_0/value", "MultiHeadDotProductAttention_0/out") in names
  value_out = next(c for c in spec if c.names[-1].endswith("out"))
  assert isinstance(value_out.layers[0], ecopt.Layer)  # DenseGeneral (D, heads, dim)
  assert _hidden(spec) == 8 + 12 + 2 * 4  # LayerNorm_1, FFN, value -> out
  kinds = {spec[i].names: spec.kind(i) for i in range(len(spec))}
  assert kinds[("LayerNorm_1", "Dense_0", "Dense_1")].startswith("mixed")
  assert "linear" in kinds[value_out.names]
  assert "linear" in str(spec)

  relu_only = ecopt.infer_spec(model.apply, {"params": params}, x, require_activation=True)
  assert tuple(relu_only) == (ecopt.Chain("Dense_0", "Dense_1"),)
  assert relu_only.kind(0) == "relu"
  assert "no ReLU-family activation" in relu_only.ends["LayerNorm_1"]
  assert "no ReLU-family activation" in relu_only.ends["MultiHeadDotProductAttention_0/value"]
  # The reason the query's level is not hidden: the softmax mixes nodes.
  assert "query" in relu_only.explain()

  apply = lambda p, x: model.apply({"params": p}, x)
  _check_invariance(_mse(apply, x, _x((2, 5, 8), 2)), lambda p: apply(p, x), params, spec)


def test_attention_value_out_read_from_shapes_is_refused():
  """The misreading that issue users hit: (D, heads, dim) as a conv."""
  model, x = EncoderBlock(), _x((2, 5, 8))
  params = _init(model, x)["params"]
  with pytest.raises(ValueError, match="ambiguous|declare|Declare"):
    ecopt.g_sgd(0.1, ecopt.Chain(
        "MultiHeadDotProductAttention_0/value", "MultiHeadDotProductAttention_0/out"
    )).init(params)


# --------------------------------------------- SST-2, PPO, VAE, Sequential ---


class BagOfEmbeddings(nn.Module):
  """An SST-2-style classifier: embeddings, mean over tokens, ReLU MLP."""

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(50, 8)(tokens)
    x = jnp.mean(x, axis=1)
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(2)(x)


class ActorCritic(nn.Module):
  """A PPO actor-critic: a shared ReLU torso, a policy and a value head."""

  actions: int = 4

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16, name="torso_0")(x))
    x = nn.relu(nn.Dense(16, name="torso_1")(x))
    logits = nn.Dense(self.actions, name="policy")(x)
    value = nn.Dense(1, name="value")(x)
    return logits, value


class VAE(nn.Module):
  """The Flax VAE example's shape: ReLU encoder with two heads, ReLU decoder."""

  @nn.compact
  def __call__(self, x, z_rng):
    h = nn.relu(nn.Dense(16, name="enc_fc1")(x))
    mean, logvar = nn.Dense(3, name="enc_mean")(h), nn.Dense(3, name="enc_logvar")(h)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(z_rng, logvar.shape, x.dtype)
    h = nn.relu(nn.Dense(16, name="dec_fc1")(z))
    return nn.Dense(x.shape[-1], name="dec_fc2")(h), mean, logvar


def test_sst2_style_mlp():
  model, tokens = BagOfEmbeddings(), jnp.asarray(np.random.default_rng(0).integers(0, 50, (4, 7)))
  params = _init(model, tokens)["params"]
  spec = ecopt.infer_spec(model.apply, {"params": params}, tokens)
  assert tuple(spec) == (ecopt.Chain("Dense_0", "Dense_1"),)
  assert _hidden(spec) == 16
  apply = lambda p, t: model.apply({"params": p}, t)
  _check_invariance(_mse(apply, tokens, _x((4, 2), 2)), lambda p: apply(p, tokens), params, spec)


def test_ppo_actor_critic():
  model, x = ActorCritic(), _x((5, 6))
  params = _init(model, x)["params"]
  spec = ecopt.infer_spec(model.apply, {"params": params}, x)
  assert tuple(spec) == (ecopt.Chain("torso_0", "torso_1"),)
  assert "two layers" in spec.ends["torso_1"]
  apply = lambda p, x: jnp.concatenate(model.apply({"params": p}, x), axis=-1)
  _check_invariance(_mse(apply, x, _x((5, 5), 2)), lambda p: apply(p, x), params, spec)


def test_vae():
  model, x, key = VAE(), _x((4, 10)), jax.random.key(3)
  params = _init(model, x, key)["params"]
  spec = ecopt.infer_spec(model.apply, {"params": params}, x, key)
  assert tuple(spec) == (ecopt.Chain("dec_fc1", "dec_fc2"),)
  assert "two layers" in spec.ends["enc_fc1"]
  apply = lambda p, x: jnp.concatenate(model.apply({"params": p}, x, key), axis=-1)
  _check_invariance(_mse(apply, x, _x((4, 16), 2)), lambda p: apply(p, x), params, spec)


def test_sequential():
  model = nn.Sequential([nn.Dense(12), nn.relu, nn.Dense(12), nn.relu, nn.Dense(3)])
  x = _x((4, 5))
  params = _init(model, x)["params"]
  spec = ecopt.infer_spec(model.apply, {"params": params}, x)
  assert tuple(spec) == (ecopt.Chain("layers_0", "layers_2", "layers_4"),)
  apply = lambda p, x: model.apply({"params": p}, x)
  _check_invariance(_mse(apply, x, _x((4, 3), 2)), lambda p: apply(p, x), params, spec)


# ---------------------------------- kernels whose layout names cannot tell ---


class DenseGeneralMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.DenseGeneral((4, 8))(x))
    x = nn.relu(nn.DenseGeneral(6, axis=(-2, -1))(x))
    return nn.Dense(3)(x)


class EinsumMLP(nn.Module):
  """Einsum layers in the (out, in) layout and the (in, out) layout."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Einsum((10, 5), "bi,oi->bo")(x))
    x = nn.relu(nn.Einsum((10, 7), "bi,io->bo")(x))
    return nn.Einsum((7, 3), "bi,io->bo")(x)


def test_dense_general_mlp_gets_its_true_nodes():
  model, x = DenseGeneralMLP(), _x((4, 5))
  params = _init(model, x)["params"]
  spec = ecopt.infer_spec(model.apply, {"params": params}, x)
  assert len(spec) == 1 and spec[0].names == ("DenseGeneral_0", "DenseGeneral_1", "Dense_0")
  assert _hidden(spec) == 32 + 6  # not 8: the (in, 4, 8) kernel is no conv
  first = spec[0].layers[0]
  assert (first.kind, first.in_axes, first.out_axes) == ("dense", (0,), (1, 2))
  apply = lambda p, x: model.apply({"params": p}, x)
  loss, out = _mse(apply, x, _x((4, 3), 2)), lambda p: apply(p, x)
  params = _check_invariance(loss, out, params, spec)
  # Teeth: the kernels read as (window, in, out) convs (H = 8 + 6, the old
  # reading) make an optimizer that is not invariant under the true scalings.
  conv_reading = ecopt.Chain(
      ecopt.Layer("DenseGeneral_0", bias=None, kind="conv"),
      ecopt.Layer("DenseGeneral_1", kind="conv"),
      "Dense_0",
  )
  assert ecopt.g_space_dim(params, conv_reading) == ecopt.g_space_dim(params, spec) + 32 - 8
  assert _gap(loss, out, params, spec, lambda: ecopt.g_sgd(1e-3, conv_reading)) > 1e-4
  with pytest.raises(ValueError, match="ambiguous"):
    ecopt.g_space_dim(params, ecopt.Chain("DenseGeneral_0", "DenseGeneral_1"))


def test_einsum_both_layouts():
  model, x = EinsumMLP(), _x((4, 5))
  params = _init(model, x)["params"]
  spec = ecopt.infer_spec(model.apply, {"params": params}, x)
  assert len(spec) == 1 and spec[0].names == ("Einsum_0", "Einsum_1", "Einsum_2")
  assert _hidden(spec) == 10 + 7
  assert spec[0].layers[0] == ecopt.Layer("Einsum_0", kernel="kernel", kind="dense", in_axes=1, out_axes=0)
  assert spec[0].layers[1] == "Einsum_1"
  apply = lambda p, x: model.apply({"params": p}, x)
  _check_invariance(_mse(apply, x, _x((4, 3), 2)), lambda p: apply(p, x), params, spec)


class CustomLinear(nnx.Module):
  """The nnx docs' own Linear: parameters named w and b."""

  def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs):
    key = rngs.params()
    self.w = nnx.Param(jax.random.uniform(key, (din, dout)))
    self.b = nnx.Param(jnp.zeros((dout,)))
    self.din, self.dout = din, dout

  def __call__(self, x):
    return x @ self.w + self.b


class CustomMLP(nnx.Module):
  def __init__(self, *, rngs):
    self.linear1 = CustomLinear(5, 9, rngs=rngs)
    self.linear2 = CustomLinear(9, 7, rngs=rngs)
    self.linear3 = CustomLinear(7, 2, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.linear1(x))
    x = nnx.relu(self.linear2(x))
    return self.linear3(x)


def test_nnx_custom_linear_with_w_and_b():
  model, x = _nnx(lambda r: CustomMLP(rngs=r)), _x((4, 5)).astype(jnp.float32)
  spec = ecopt.infer_spec(model, None, x)
  assert len(spec) == 1 and spec[0].names == ("linear1", "linear2", "linear3")
  assert spec[0].layers[0] == ecopt.Layer("linear1", kernel="w", bias="b", kind="dense", in_axes=0, out_axes=1)
  assert _hidden(spec) == 16
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = _f64(params)
  apply = lambda p, x: nnx.merge(graphdef, p, rest)(x)
  _check_invariance(_mse(apply, _x((4, 5)), _x((4, 2), 2)), lambda p: apply(p, _x((4, 5))), params, spec)
  with pytest.raises(ValueError, match="no 'kernel'"):
    ecopt.g_space_dim(params, ecopt.Chain("linear1", "linear2"))


def test_stacked_ensemble_kernel_is_not_a_chain_layer():
  """(members, in, out) kernels used with a batch dimension: refused, not misread."""
  rng = np.random.default_rng(0)
  params = {
      "ens0": {"kernel": jnp.asarray(rng.standard_normal((4, 5, 6)))},
      "ens1": {"kernel": jnp.asarray(rng.standard_normal((4, 6, 3)))},
  }

  def apply(p, x):  # x: (members, batch, in)
    h = jax.nn.relu(jnp.einsum("ebi,eio->ebo", x, p["ens0"]["kernel"]))
    return jnp.einsum("ebi,eio->ebo", h, p["ens1"]["kernel"])

  x = _x((4, 3, 5))
  spec = ecopt.infer_spec(apply, params, x)
  assert tuple(spec) == ()
  assert "stacked members" in spec.ends["ens0"]
  with pytest.raises(ValueError, match="ambiguous.*stacked"):
    ecopt.g_sgd(0.1, ecopt.Chain("ens0", "ens1")).init(params)
  # Teeth: read as 4-tap convs, "G-SGD" is not invariant under the true
  # per-member node scaling (each member's hidden nodes scaled on their own).
  conv = ecopt.Chain(ecopt.Layer("ens0", kind="conv"), ecopt.Layer("ens1", kind="conv"))
  c = jnp.exp(jnp.asarray(rng.uniform(-1, 1, (4, 6))))
  scaled = {"ens0": {"kernel": params["ens0"]["kernel"] * c[:, None, :]},
            "ens1": {"kernel": params["ens1"]["kernel"] / c[:, :, None]}}
  np.testing.assert_allclose(apply(scaled, x), apply(params, x), rtol=1e-12)
  y = _x((4, 3, 3), 2)
  loss = lambda p: jnp.mean((apply(p, x) - y) ** 2)
  tx = ecopt.g_sgd(1e-3, conv)

  def run(p):
    state = tx.init(p)
    for _ in range(2):
      u, state = tx.update(jax.grad(loss)(p), state, p)
      p = optax.apply_updates(p, u)
    return np.asarray(apply(p, x))

  a, b = run(params), run(scaled)
  assert np.max(np.abs(a - b)) / np.max(np.abs(a)) > 1e-4
