"""BatchNorm in G-space: the exact treatment, and the paper's approximation.

**Exact treatment** (``docs/g-space.md`` §8; nothing to add
here, it is a spec). For ``conv_a -> BN -> ReLU -> layer_b``, the node after
BN's affine part is a hidden node: ``Chain("BatchNorm_0", "Conv_1")`` reads
BN's ``scale`` as a diagonal incoming layer (its ``bias`` as that layer's
bias) and ``Conv_1`` as the outgoing layer. Scaling ``scale[j]``, ``bias[j]``
by ``c > 0`` and ``Conv_1``'s input rows by ``1/c`` keeps the function in
train *and* eval mode, because BN's statistics are those of its input, which
does not change. ``conv_a`` lies outside the chain: BN normalises its output,
so its per-channel scale is not passed on (in train mode it is removed,
degree-0 homogeneity; in eval mode the running mean makes the map affine, not
homogeneous). ``conv_a`` is therefore optimised as plain coordinates, and a
chain that ends in a conv feeding a BN ends *at* that conv. See
:mod:`ecopt.zoo` for complete specs.

**Approximate treatment** (Meng et al. 2019, Appendix 11.2, as summarised in
``g-space.md`` section 8): multiply the gradient of each incoming weight of a
BN-normalised node by the norm of that node's incoming weights,
:func:`scale_by_incoming_norm`. It targets the symmetry the exact treatment
leaves alone: in train mode the loss depends on the incoming weights
``W[..., j]`` of a BN-normalised channel ``j`` only through their direction
``u = W[..., j] / ||W[..., j]||``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from ecopt import spec as spec_lib


def _kernel_index(layer: str, paths) -> int:
  """Index of the unique ``kernel`` leaf under ``layer``."""
  prefix = spec_lib.layer_key(layer)
  key = prefix + ("kernel",)
  hits = [i for i, p in enumerate(paths) if p[: len(key)] == key]
  if len(hits) != 1:
    under = ["/".join(p[len(prefix):]) for p in paths if p[: len(prefix)] == prefix]
    raise ValueError(
        f"scale_by_incoming_norm: layer '{layer}' needs exactly one 'kernel'"
        f" leaf; its leaves are {under}."
        + (" (No such layer in the params.)" if not under else "")
    )
  return hits[0]


def scale_by_incoming_norm(
    layers: Sequence[str], *, power: float = 1.0
) -> optax.GradientTransformationExtraArgs:
  """Scales the gradient of BN-normalised nodes' incoming weights by their norm.

  The paper's *approximate* BatchNorm treatment (Meng et al. 2019,
  Appendix 11.2). For each named layer (a Dense or conv kernel whose outputs a
  BatchNorm normalises), output node ``j`` has incoming weights
  ``W[..., j]`` (every tap and input channel), and

      g[..., j]  <-  g[..., j] * ||W[..., j]||_2 ** power.

  Biases and all other leaves pass through unchanged.

  Why (``power=1``, the paper's rule): in train mode BN makes the loss a
  function of the direction ``u = W[..., j] / ||W[..., j]||`` only, so
  ``dL/dW[..., j] = (I - u u^T) dL/du / ||W[..., j]||``: the scaled gradient
  is the gradient with respect to the normalised incoming weights. Using it
  as the step of ``W`` itself is an approximation: the step is not taken on
  the normalised weights (nothing re-normalises ``W``), and in eval mode
  (fixed running statistics) the loss is not a function of ``u`` alone.
  ``power=2`` is offered as a variant (not from the paper): then plain SGD on
  these layers is exactly equivariant under ``W[..., j] -> c W[..., j]`` in
  train mode (up to BN's epsilon), since the gradient scales by ``1/c``.

  Composition with the exact treatment: put this transformation *before* the
  G-space optimizer, e.g.
  ``optax.chain(scale_by_incoming_norm(layers), ecopt.g_sgd(lr, spec))``.
  For layers outside every chain of ``spec`` (a zoo model's
  ``pre_bn_layers(outside_chains=True)``) the G-space run stays exactly
  invariant under node scaling. A layer that is also the outgoing layer of a
  chain has column norms that change under that chain's node scaling, so
  including it makes the combination approximate with respect to G as well.

  Args:
    layers: ``/``-separated paths of the layers whose outputs are normalised
      by BatchNorm (the convs *before* BN).
    power: exponent of the norm (1 for the paper's rule).

  Returns:
    A ``GradientTransformationExtraArgs``; ``update`` requires ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, ecopt
    >>> from ecopt.batchnorm import scale_by_incoming_norm
    >>> params = {"conv": {"kernel": jnp.array([[3.0, 0.0], [4.0, 1.0]])}}
    >>> grads = {"conv": {"kernel": jnp.ones((2, 2))}}
    >>> tx = scale_by_incoming_norm(["conv"])
    >>> upd, _ = tx.update(grads, tx.init(params), params)
    >>> upd["conv"]["kernel"].tolist()
    [[5.0, 1.0], [5.0, 1.0]]

  References:
    Meng et al., "G-SGD: Optimizing ReLU Neural Networks in its Positively
    Scale-Invariant Space", ICLR 2019 (arXiv:1802.03713), Appendix 11.2.
  """
  layers = tuple(layers)
  for layer in layers:
    if not isinstance(layer, str) or not spec_lib.layer_key(layer):
      raise ValueError(
          f"scale_by_incoming_norm: layers must be '/'-separated path strings,"
          f" got {layer!r}."
      )

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(
          "scale_by_incoming_norm needs the current params: call"
          " `update(updates, state, params)`."
      )
    p_paths, p_leaves, _ = spec_lib.flatten_with_names(params)
    u_paths, u_leaves, u_def = spec_lib.flatten_with_names(updates)
    if p_paths != u_paths:
      raise ValueError(
          "scale_by_incoming_norm: the updates tree does not match the params"
          " tree."
      )
    out = list(u_leaves)
    for layer in layers:
      i = _kernel_index(layer, p_paths)
      w = jnp.asarray(p_leaves[i])
      if w.ndim < 2:
        raise ValueError(
            f"scale_by_incoming_norm: layer '{layer}' has a kernel of shape"
            f" {w.shape}; expected (..., in, out)."
        )
      sq = jnp.sum(jnp.square(w), axis=tuple(range(w.ndim - 1)), keepdims=True)
      factor = sq ** (jnp.asarray(power, sq.dtype) / 2)
      out[i] = (out[i] * factor).astype(jnp.asarray(u_leaves[i]).dtype)
    return jax.tree_util.tree_unflatten(u_def, out), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
