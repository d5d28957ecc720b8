"""Zoo models in ``flax.linen``, each with its ``spec()``.

Call ``model.apply(variables, x, train=False)``. BatchNorm models keep
``batch_stats``; with ``train=True`` pass ``mutable=["batch_stats"]``. Specs
are relative to ``variables["params"]``. See :mod:`ecopt.zoo` for where each
chain starts and ends.

Example:
  >>> import jax, jax.numpy as jnp, optax, ecopt
  >>> from ecopt.zoo import linen as zl
  >>> model = zl.CNN1D(channels=(4, 8), num_classes=3)
  >>> x = jnp.ones((2, 16, 1))
  >>> params = model.init(jax.random.key(0), x)["params"]
  >>> params = ecopt.skeleton_init(params, model.spec())
  >>> opt = ecopt.g_sgd(0.01, model.spec())
  >>> state = opt.init(params)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from ecopt.spec import Chain
from ecopt.zoo import _common

Dtype = Any


class MLP(nn.Module):
  """Dense-ReLU network on flattened inputs; one chain through all layers.

  Attributes:
    features: output sizes of the Dense layers, the last one the logits.
    param_dtype: parameter dtype.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> model = MLP(features=(16, 16, 3))
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 8)))["params"]
    >>> model.spec()
    (Chain('Dense_0', 'Dense_1', 'Dense_2'),)
  """

  features: Sequence[int] = (128, 128, 10)
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # No train-dependent layers.
    features = _common.check_channels(self.features, "MLP features")
    x = x.reshape((x.shape[0], -1))
    for k, width in enumerate(features):
      x = nn.Dense(width, param_dtype=self.param_dtype, name=f"Dense_{k}")(x)
      if k < len(features) - 1:
        x = nn.relu(x)
    return x

  @nn.nowrap
  def spec(self) -> tuple[Chain, ...]:
    return _common.chain_or_empty(
        [f"Dense_{k}" for k in range(len(self.features))]
    )


def _conv_stack(module, x, train: bool, ndim: int):
  """[Conv, (BN), ReLU, pool] * L, channels-last flatten, Dense head.

  Called inside ``module``'s compact ``__call__`` so the layers are its own
  direct children (``Conv_0``, ``BatchNorm_0``, ..., ``Dense_0``).
  """
  channels = _common.check_channels(module.channels, "channels")
  kernel = _common.as_tuple(module.kernel_size, ndim, "kernel_size")
  strides = _common.as_tuple(module.strides, ndim, "strides")
  dilation = _common.as_tuple(module.dilation, ndim, "dilation")
  kind = _common.check_pool(module.pool)
  if x.ndim != ndim + 2:
    raise ValueError(
        f"{type(module).__name__} expects inputs of rank {ndim + 2} (batch,"
        f" {ndim} spatial, channels), got shape {x.shape}."
    )
  for k, width in enumerate(channels):
    x = nn.Conv(
        width,
        kernel,
        strides=strides,
        padding=module.padding,
        kernel_dilation=dilation,
        use_bias=not module.use_bn,  # BN's bias replaces the conv bias.
        param_dtype=module.param_dtype,
        name=f"Conv_{k}",
    )(x)
    if module.use_bn:
      x = nn.BatchNorm(
          use_running_average=not train,
          param_dtype=module.param_dtype,
          name=f"BatchNorm_{k}",
      )(x)
    x = nn.relu(x)
    x = _common.pool(x, kind, ndim)
  x = x.reshape((x.shape[0], -1))
  return nn.Dense(
      module.num_classes, param_dtype=module.param_dtype, name="Dense_0"
  )(x)


def _stack_spec(module) -> tuple[Chain, ...]:
  n = len(module.channels)
  bns = [f"BatchNorm_{k}" for k in range(n)] if module.use_bn else None
  return _common.plain_spec([f"Conv_{k}" for k in range(n)], bns, "Dense_0")


def _stack_pre_bn(module, outside_chains: bool) -> tuple[str, ...]:
  if not module.use_bn:
    return ()
  n = 1 if outside_chains else len(module.channels)
  return tuple(f"Conv_{k}" for k in range(n))


class _ConvStack(nn.Module):
  """What PlainNet and CNN1D share: fields, the blocks and the spec rule."""

  channels: Sequence[int] = (16, 32)
  num_classes: int = 10
  use_bn: bool = False
  kernel_size: Any = (3, 3)
  strides: Any = 1
  padding: Any = "SAME"
  dilation: Any = 1
  pool: Optional[str] = "max"
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    return _conv_stack(self, x, train, self._ndim)

  @nn.nowrap
  def spec(self) -> tuple[Chain, ...]:
    return _stack_spec(self)

  @nn.nowrap
  def pre_bn_layers(self, outside_chains: bool = False) -> tuple[str, ...]:
    """Layers whose outputs a BatchNorm normalises (all, or those in no chain)."""
    return _stack_pre_bn(self, outside_chains)


class PlainNet(_ConvStack):
  """A plain 2-D conv stack (NHWC) with optional BatchNorm and a Dense head.

  Each block is ``Conv -> [BatchNorm] -> ReLU -> [2x2 pool]``; then a
  channels-last flatten and ``Dense(num_classes)``. Without BN the spec is
  one chain ``(Conv_0, ..., Conv_{L-1}, Dense_0)``; with BN it is the chains
  ``(BatchNorm_k, Conv_{k+1})`` and ``(BatchNorm_{L-1}, Dense_0)``, and
  ``Conv_0`` is a plain coordinate. Convs have no bias when BN follows.

  Attributes:
    channels: output channels of the convs.
    num_classes: logits.
    use_bn: BatchNorm after every conv.
    kernel_size: conv window (int or 2 ints), any size (even sizes too).
    strides: conv strides.
    padding: conv padding ('SAME', 'VALID', or explicit pairs).
    dilation: conv kernel dilation.
    pool: 'max', 'avg' or None: 2x2 stride-2 pooling after each block.
    param_dtype: parameter dtype.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> model = PlainNet(channels=(4, 8), num_classes=3)
    >>> variables = model.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
    >>> model.spec()
    (Chain('Conv_0', 'Conv_1', 'Dense_0'),)
  """

  kernel_size: Any = (3, 3)
  _ndim = 2  # spatial dimensions: a class constant, not a field


class CNN1D(_ConvStack):
  """A 1-D conv stack on ``(N, L, C)`` inputs, flatten and a Dense head.

  Each block is ``Conv1D -> [BatchNorm] -> ReLU -> [2-wide pool]``. Conv
  kernels ``(k, cin, cout)`` are read as ``(k, cin, cout)`` views; the head
  after the channels-last flatten as ``(L', C, out)``. Spec as for
  :class:`PlainNet`.

  Attributes:
    channels: output channels of the convs.
    num_classes: logits.
    use_bn: BatchNorm after every conv.
    kernel_size: conv window (int), any size.
    strides: conv stride.
    padding: conv padding.
    dilation: conv kernel dilation.
    pool: 'max', 'avg' or None.
    param_dtype: parameter dtype.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> model = CNN1D(channels=(4, 8), num_classes=3)
    >>> variables = model.init(jax.random.key(0), jnp.ones((1, 40, 1)))
    >>> model.spec()
    (Chain('Conv_0', 'Conv_1', 'Dense_0'),)
  """

  kernel_size: Any = 5
  _ndim = 1


class BasicBlock(nn.Module):
  """ResNet basic block: ``relu(branch(x) + shortcut(x))``.

  ``branch = conv1 -> [bn1] -> ReLU -> conv2 -> [bn2]`` (3x3 convs, the first
  with ``strides``); ``shortcut`` is the identity, or ``proj_conv`` (1x1,
  ``strides``) ``-> [proj_bn]`` when the shape changes. The branch's chain is
  :meth:`chain`.
  """

  channels: int
  strides: int = 1
  use_bn: bool = True
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    def conv(features, kernel, strides, name):
      return nn.Conv(
          features, kernel, strides=strides, use_bias=not self.use_bn,
          param_dtype=self.param_dtype, name=name,
      )

    def norm(name):
      return nn.BatchNorm(
          use_running_average=not train, param_dtype=self.param_dtype, name=name
      )

    s = (self.strides, self.strides)
    y = conv(self.channels, (3, 3), s, "conv1")(x)
    if self.use_bn:
      y = norm("bn1")(y)
    y = nn.relu(y)
    y = conv(self.channels, (3, 3), (1, 1), "conv2")(y)
    if self.use_bn:
      y = norm("bn2")(y)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.channels:
      shortcut = conv(self.channels, (1, 1), s, "proj_conv")(x)
      if self.use_bn:
        shortcut = norm("proj_bn")(shortcut)
    return nn.relu(y + shortcut)

  @nn.nowrap
  def chain(self, prefix: str) -> Chain:
    """The branch chain, with layer paths under ``prefix``."""
    return _common.branch_chain(prefix, self.use_bn)


class ResNet(nn.Module):
  """A small ResNet of basic blocks (NHWC).

  ``stem_conv (3x3) -> [stem_bn] -> ReLU -> blocks -> global average pool ->
  head (Dense)``. Stage ``s > 0`` starts with a stride-2 block. The spec has
  one chain per residual branch (``blocks_i/bn1 -> blocks_i/conv2`` with BN,
  ``blocks_i/conv1 -> blocks_i/conv2`` without); the stem, projections, the
  branch-output BN and the head are plain coordinates.

  Attributes:
    stage_channels: channels of each stage.
    blocks_per_stage: basic blocks per stage.
    num_classes: logits.
    use_bn: BatchNorm after every conv (the usual ResNet); without it convs
      have biases.
    param_dtype: parameter dtype.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> model = ResNet(stage_channels=(4, 8), blocks_per_stage=1, num_classes=3)
    >>> variables = model.init(jax.random.key(0), jnp.ones((1, 8, 8, 3)))
    >>> model.spec()
    (Chain('blocks_0/bn1', 'blocks_0/conv2'), Chain('blocks_1/bn1', 'blocks_1/conv2'))
  """

  stage_channels: Sequence[int] = (16, 32)
  blocks_per_stage: int = 1
  num_classes: int = 10
  use_bn: bool = True
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    stages = _common.check_channels(self.stage_channels, "stage_channels")
    if x.ndim != 4:
      raise ValueError(f"ResNet expects NHWC inputs, got shape {x.shape}.")
    x = nn.Conv(
        stages[0], (3, 3), use_bias=not self.use_bn,
        param_dtype=self.param_dtype, name="stem_conv",
    )(x)
    if self.use_bn:
      x = nn.BatchNorm(
          use_running_average=not train, param_dtype=self.param_dtype,
          name="stem_bn",
      )(x)
    x = nn.relu(x)
    for i, (ch, strides) in enumerate(
        _common.block_layout(stages, self.blocks_per_stage)
    ):
      x = self._block(ch, strides, i)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, param_dtype=self.param_dtype, name="head")(x)

  @nn.nowrap
  def _block(self, ch, strides, i):
    return BasicBlock(
        ch, strides, self.use_bn, self.param_dtype, name=f"blocks_{i}"
    )

  @nn.nowrap
  def spec(self) -> tuple[Chain, ...]:
    layout = _common.block_layout(self.stage_channels, self.blocks_per_stage)
    return tuple(
        _common.branch_chain(f"blocks_{i}", self.use_bn)
        for i in range(len(layout))
    )

  @nn.nowrap
  def pre_bn_layers(self, outside_chains: bool = False) -> tuple[str, ...]:
    """Layers whose outputs a BatchNorm normalises (all, or those in no chain)."""
    if not self.use_bn:
      return ()
    return _common.resnet_pre_bn(
        self.stage_channels, self.blocks_per_stage, "blocks_{}", outside_chains
    )
