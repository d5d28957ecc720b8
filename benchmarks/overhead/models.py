"""The benchmarked models, the optimizers and the pairs compared."""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import optax

import ecopt
from ecopt.zoo import linen as zl

LEARNING_RATE = 1e-3
ADAM_LEARNING_RATE = 1e-4

# (new, base) pairs. The full step is timed for STEP_PAIRS, the update alone
# for UPDATE_PAIRS; for optax.sgd without momentum the update alone is
# exactly `w - lr * g`.
STEP_PAIRS = [("g_sgd_m", "sgd_m"), ("g_adam", "adam"), ("path_sgd", "sgd")]
UPDATE_PAIRS = [
    ("g_sgd", "sgd"),
    ("g_sgd_m", "sgd_m"),
    ("g_adam", "adam"),
    ("path_sgd", "sgd"),
]


def make_mlp(widths):
  """A Dense-ReLU stack of the given widths, one chain through all layers.

  Returns:
    ``(model, spec, input shape)``.
  """

  class MLP(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = x.reshape((x.shape[0], -1))
      for k, width in enumerate(widths[1:]):
        x = nn.Dense(width, name=f"Dense_{k}")(x)
        if k < len(widths) - 2:
          x = nn.relu(x)
      return x

  spec = ecopt.Chain(*[f"Dense_{k}" for k in range(len(widths) - 1)])
  return MLP(), spec, (widths[0],)


def make_cnn(channels, image):
  """PlainNet-style conv3x3 stack without pooling, flattened into a head.

  Returns:
    ``(model, spec, input shape)``.
  """
  model = zl.PlainNet(channels=tuple(channels), num_classes=10, use_bn=False,
                      pool=None)
  return model, model.spec(), (image, image, 3)


def _mlp(widths, batch):
  return (f"MLP {'-'.join(map(str, widths))}", lambda: make_mlp(widths),
          batch)


def _cnn(layers, channels, image, batch):
  return (f"PlainNet {layers}x conv3x3 {channels}ch, {image}x{image}x3",
          lambda: make_cnn([channels] * layers, image), batch)


def model_table(quick: bool, cnn_batch: Optional[int]):
  """``(name, description, builder, batch)`` of the benchmarked models."""
  if quick:
    models = {
        "mlp_a": _mlp([784, 256, 256, 256, 10], 32),
        "mlp_b": _mlp([3072, 512, 512, 10], 32),
        "cnn": _cnn(4, 16, 16, cnn_batch or 4),
        "cnn_wide": _cnn(2, 64, 8, 4),
    }
  else:
    models = {
        "mlp_a": _mlp([784, 1024, 1024, 1024, 10], 128),
        "mlp_b": _mlp([3072, 4096, 4096, 10], 256),
        "cnn": _cnn(8, 64, 32, cnn_batch or 128),
        # ResNet-like channel counts: the row sums of wide conv kernels.
        "cnn_wide": _cnn(4, 256, 8, 16),
    }
  return [(name, *row) for name, row in models.items()]


def zoo_table(quick: bool):
  """``(name, description, model, input shape)`` of the architecture sweep.

  Shapes the fixed models lack (residual branches, BatchNorm chains, 1-D
  convs, unequal widths, large heads), where a shape-dependent slow path of
  the update would show.
  """
  if quick:
    return [
        ("resnet", "ResNet stages 16-32, BN",
         zl.ResNet(stage_channels=(16, 32)), (16, 16, 3)),
        ("plainnet_head", "PlainNet 16-32, pool, 100-way head",
         zl.PlainNet(channels=(16, 32), num_classes=100), (16, 16, 3)),
        ("cnn1d", "CNN1D 16-32, kernel 5",
         zl.CNN1D(channels=(16, 32)), (64, 1)),
        ("mlp_uneven", "MLP 784-300-100-10",
         zl.MLP(features=(300, 100, 10)), (784,)),
    ]
  return [
      ("resnet18", "ResNet stages 64-128-256-512 x2 blocks, BN",
       zl.ResNet(stage_channels=(64, 128, 256, 512), blocks_per_stage=2),
       (32, 32, 3)),
      ("plainnet_head", "PlainNet 64-128, pool, 1000-way head on 28x28",
       zl.PlainNet(channels=(64, 128), num_classes=1000), (28, 28, 3)),
      ("plainnet_bn", "PlainNet 4x128, BN, pool",
       zl.PlainNet(channels=(128,) * 4, use_bn=True), (32, 32, 3)),
      ("cnn1d", "CNN1D 64-128-256, kernel 5",
       zl.CNN1D(channels=(64, 128, 256)), (128, 1)),
      ("mlp_head", "MLP 784-512-512-8000",
       zl.MLP(features=(512, 512, 8000)), (784,)),
      ("mlp_uneven", "MLP 784-1500-700-2000-10",
       zl.MLP(features=(1500, 700, 2000, 10)), (784,)),
  ]


def optimizers(spec) -> dict[str, Callable[[], Any]]:
  """A fresh optimizer of each name, for ``spec``'s chains."""
  lr, adam_lr = LEARNING_RATE, ADAM_LEARNING_RATE
  return {
      "sgd": lambda: optax.sgd(lr),
      "g_sgd": lambda: ecopt.g_sgd(lr, spec),
      "sgd_m": lambda: optax.sgd(lr, momentum=0.9),
      "g_sgd_m": lambda: ecopt.g_sgd(lr, spec, momentum=0.9),
      "adam": lambda: optax.adam(adam_lr),
      "g_adam": lambda: ecopt.g_space(optax.adam(adam_lr), spec),
      "path_sgd": lambda: ecopt.path_sgd(lr, spec),
  }
