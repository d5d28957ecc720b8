"""Model zoo: small ReLU networks in ``flax.linen`` and ``flax.nnx``, with specs.

Every model has a method ``spec()`` that returns its hand-written
``ecopt.Spec``: relative to ``variables["params"]`` for ``linen`` models and
to ``nnx.state(model, nnx.Param)`` for ``nnx`` models. Models:

- ``MLP``: Dense-ReLU stack; one chain through all layers.
- ``PlainNet``: channels-last conv stack (optional BatchNorm), pooling,
  channels-last flatten and a Dense head.
- ``ResNet``: basic residual blocks (optional BatchNorm), global average
  pooling and a Dense head.
- ``CNN1D``: 1-D conv stack on ``(N, L, C)`` inputs, pooling, flatten, Dense.

Where a chain starts and ends (``docs/g-space.md`` §1, §8).
A level between two layers is a hidden level of a chain only if every
operation between them is positively homogeneous *per node* (degree 1): ReLU,
max/avg pooling, reshapes. Then scaling the node's incoming weights (and bias)
by ``c > 0`` and its outgoing weights by ``1/c`` keeps the function.

- Without BatchNorm, a whole conv stack plus its head is one chain: convs read
  as ``(kh*kw, cin, cout)``, the head after a channels-last flatten as
  ``(H*W, C, out)``.
- BatchNorm followed by ReLU. Train mode computes
  ``y = scale * (z - mean_B(z)) / sqrt(var_B(z) + eps) + bias``, eval mode the
  same with fixed running statistics. The node *after* the affine part is a
  hidden node: scaling ``scale[j]``, ``bias[j]`` by ``c`` multiplies
  ``y[j]`` by ``c`` in both modes (the statistics are those of ``z``, which do
  not change), ReLU passes the factor on and the next layer's rows divide it
  out. So ``Chain("BatchNorm_0", "Conv_1")`` holds the BN scale as a
  diagonal incoming layer (its ``bias`` as that layer's bias) and the next
  conv as the outgoing layer.
- The output of a conv that feeds a BatchNorm is *not* a hidden level: the
  normalisation is homogeneous of degree 0 in train mode (it removes a
  per-channel factor instead of passing it on) and affine with an offset in
  eval mode (``(c z - mean) / std`` is not ``c (z - mean) / std``). Scaling
  that level would have to be compensated by BN's ``scale``, which is not
  what happens. So the chain that holds this conv *ends* at it, and the conv
  *before* a BatchNorm that starts a chain is outside that chain.
- The first conv of a BN network (and the stem of a ResNet) feeds a
  BatchNorm and no chain ends there, so it is a plain coordinate (``v = w``):
  the inner optimizer sees its raw gradient. In train mode such a conv has
  its own per-output-channel scale symmetry (degree 0, removed by BN), which
  G-space does not quotient out; see :mod:`ecopt.batchnorm` for the paper's
  approximate treatment of it.
- Residual networks: the identity skip pins a block's input and output
  levels, so each residual branch is its own chain: ``(conv1, conv2)``
  without BN, ``(bn1, conv2)`` with BN (``conv1`` feeds ``bn1``). The stem,
  shortcut projections, the BN of a branch output and the classifier are
  plain coordinates.

BN models also have ``pre_bn_layers()``: the layers whose outputs a
BatchNorm normalises (the "incoming weights" of the approximate treatment in
:func:`ecopt.batchnorm.scale_by_incoming_norm`), and
``pre_bn_layers(outside_chains=True)``, the subset that is in no chain.

Example:
  >>> import jax, jax.numpy as jnp, ecopt
  >>> from ecopt.zoo import linen as zl
  >>> model = zl.PlainNet(channels=(4, 8), num_classes=3, use_bn=True)
  >>> variables = model.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
  >>> model.spec()
  (Chain('BatchNorm_0', 'Conv_1'), Chain('BatchNorm_1', 'Dense_0'))
  >>> ecopt.g_space_dim(variables["params"], model.spec()) > 0
  True
"""

from ecopt.zoo import linen
from ecopt.zoo import nnx

__all__ = ("linen", "nnx")
