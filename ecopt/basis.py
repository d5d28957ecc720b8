"""Basis-path coordinates of a params pytree, and node scalings.

These functions take a params pytree and a spec (``ecopt.Chain`` or a sequence
of them) and work under ``jit`` (the spec is static). See
``docs/g-space.md`` for the definitions.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ecopt import _tree
from ecopt import node_factors
from ecopt import paths as paths_lib
from ecopt.layer_views import cycle, view_of
from ecopt import spec as spec_lib
from ecopt import structure as structure_lib
from ecopt.structure import ChainGeometry

Params = Any


def _jit_with_static_spec(fn=None, *, static_argnames=()):
  """Compiles ``fn(params, spec, ...)`` once per spec and params layout.

  Called eagerly, these functions would otherwise dispatch (and compile) one
  small XLA program per array operation. The spec is normalised to a tuple of
  Chains, which is hashable, and passed as a static argument.
  """
  if fn is None:
    return functools.partial(_jit_with_static_spec, static_argnames=static_argnames)
  jitted = jax.jit(fn, static_argnums=(1,), static_argnames=static_argnames)

  @functools.wraps(fn)
  def wrapper(params, spec, *args, **kwargs):
    return jitted(params, spec_lib.as_chains(spec), *args, **kwargs)

  return wrapper


@_jit_with_static_spec
def basis_path_values(params: Params, spec: spec_lib.Spec) -> Params:
  """The G-space coordinates: each parameter's basis-path value.

  For an edge ``e = K_k[t, i, j]`` of a chain layer the value is
  ``v_e = w_e * B(k-1, i) * F(k, j)``, the product of the weights on the
  in-skeleton chain into ``i``, on ``e``, and on the out-skeleton chain out of
  ``j``; a bias ``b_k[j]`` has ``v = b_k[j] * F(k, j)``. These values are
  invariant under node scaling. At a free (out-skeleton) position the entry is
  the value of the all-skeleton path through that edge: also invariant, but
  not a coordinate (see :func:`free_mask`). Parameters outside every chain are
  their own coordinates (``v = w``).

  Args:
    params: a params pytree.
    spec: an ``ecopt.Chain`` or a sequence of them.

  Returns:
    A pytree shaped like ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, ecopt
    >>> params = {"l0": {"kernel": jnp.ones((3, 4))},
    ...           "l1": {"kernel": jnp.full((4, 2), 2.0)}}
    >>> v = ecopt.basis_path_values(params, ecopt.Chain("l0", "l1"))
    >>> float(v["l0"]["kernel"][0, 0])  # 1 * F = 1 * 2
    2.0
  """

  def fn(geometry, views, biases):
    sk = paths_lib.skeleton(geometry, views)
    return paths_lib.path_values(sk, views, biases)

  return _tree.map_chains(params, spec, fn)


@_jit_with_static_spec
def free_mask(params: Params, spec: spec_lib.Spec) -> Params:
  """A bool pytree, True at the free skeleton weights.

  The free weights are the ``H`` out-skeleton edges
  ``K_{k+1}[t*, j, j mod h_{k+1}]`` of the hidden nodes. G-space optimizers
  never change them; only their signs matter for the network function.

  Args:
    params: a params pytree.
    spec: an ``ecopt.Chain`` or a sequence of them.

  Returns:
    A pytree shaped like ``params`` holding bool arrays.

  Example:
    >>> import jax.numpy as jnp, ecopt
    >>> params = {"l0": {"kernel": jnp.ones((3, 2))},
    ...           "l1": {"kernel": jnp.ones((2, 2))}}
    >>> mask = ecopt.free_mask(params, ecopt.Chain("l0", "l1"))
    >>> mask["l1"]["kernel"].tolist()
    [[True, False], [False, True]]
  """
  structure = structure_lib.resolve(params, spec)
  leaves, treedef = _tree.flat(params)
  out = [jnp.zeros(jnp.shape(leaf), bool) for leaf in leaves]
  for geometry in structure.chains:
    for layer in geometry.layers[1:]:
      mask = view_of(layer).out_mask()
      out[layer.kernel_index] = _tree.to_leaf(layer, jnp.broadcast_to(mask, layer.shape))
  return jax.tree_util.tree_unflatten(treedef, out)


def g_space_dim(params: Params, spec: spec_lib.Spec) -> int:
  """Dimension of G-space: ``m - H``.

  ``m`` counts every scalar parameter (those outside every chain are their
  own coordinates) and ``H`` the hidden nodes of all chains.

  Example:
    >>> import jax.numpy as jnp, ecopt
    >>> params = {"l0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
    ...           "l1": {"kernel": jnp.ones((4, 2))}}
    >>> ecopt.g_space_dim(params, ecopt.Chain("l0", "l1"))  # 12 + 4 + 8 - 4
    20
  """
  return structure_lib.resolve(params, spec).dim


def scale_nodes(
    params: Params,
    spec: spec_lib.Spec,
    factors: Sequence[Sequence[jax.Array]],
) -> Params:
  """Applies the node scaling ``g`` in ``G`` given by positive ``factors``.

  Scaling hidden node ``j`` of level ``k`` by ``c > 0`` multiplies its
  incoming kernel column and bias entry by ``c`` and divides its outgoing
  kernel row by ``c``; the network function does not change.

  Args:
    params: a params pytree.
    spec: an ``ecopt.Chain`` or a sequence of them.
    factors: for each chain, for each hidden level ``k = 1..n-1``, an array of
      ``h_k`` positive factors.

  Returns:
    The scaled params.

  Raises:
    ValueError: for concrete factors that are zero, negative or not finite,
      or that overflow the parameters' dtype (inside a caller's ``jit`` the
      values are not known and are not checked).
  """
  node_factors.check_factors(factors, "scale_nodes")
  scaled = _scale_nodes(params, spec, factors)
  node_factors.check_finite_result(params, scaled, "scale_nodes")
  return scaled


@_jit_with_static_spec
def _scale_nodes(params, spec, factors):
  chains = spec_lib.as_chains(spec)
  if len(factors) != len(chains):
    raise ValueError(
        f"scale_nodes: got factors for {len(factors)} chains, spec has"
        f" {len(chains)}."
    )
  lookup = dict(zip(chains, factors))

  def fn(geometry: ChainGeometry, views, biases):
    level_factors = lookup[geometry.chain]
    widths = geometry.widths
    if len(level_factors) != len(widths) - 2:
      raise ValueError(
          f"scale_nodes: {geometry.chain!r} has {len(widths) - 2} hidden"
          f" levels, got {len(level_factors)} factor arrays."
      )
    ones = [None] + [jnp.asarray(c, views[0].dtype) for c in level_factors]
    for k, c in enumerate(ones[1:], start=1):
      if c.shape != (widths[k],):
        raise ValueError(
            f"scale_nodes: level {k} of {geometry.chain!r} has {widths[k]}"
            f" nodes, got factors of shape {c.shape}."
        )
    return _apply_node_factors(geometry, views, biases, ones)

  return _tree.map_chains(params, spec, fn)


def _apply_node_factors(geometry, views, biases, factors):
  """``factors[k]`` (or None for boundary levels) applied to every layer."""
  n = len(geometry.layers)
  factors = list(factors) + [None] * (n + 1 - len(factors))
  new_views, new_biases = [], []
  for k, layer in enumerate(geometry.layers, start=1):
    w, b = views[k - 1], biases[k - 1]
    if factors[k] is not None:
      w = w * view_of(layer).along_out(factors[k])
      b = None if b is None else b * factors[k]
    if factors[k - 1] is not None:
      w = w / view_of(layer).along_in(factors[k - 1])
    new_views.append(w)
    new_biases.append(b)
  return new_views, new_biases


def rescale(
    params: Params,
    spec: spec_lib.Spec,
    key: jax.Array,
    *,
    log_range: float = 1.0,
) -> Params:
  """A random function-preserving node scaling, for tests and demos.

  Every hidden node of every chain is scaled by ``exp(u)``, ``u`` drawn
  uniformly from ``[-log_range, log_range]``. Basis-path values and the
  network function do not change; plain SGD then trains differently, G-space
  optimizers do not.

  Args:
    params: a params pytree.
    spec: an ``ecopt.Chain`` or a sequence of them.
    key: a PRNG key.
    log_range: half-width of the uniform distribution of ``log c``.

  Returns:
    The rescaled params.

  Example:
    >>> import jax, jax.numpy as jnp, ecopt
    >>> params = {"l0": {"kernel": jnp.ones((3, 4))},
    ...           "l1": {"kernel": jnp.ones((4, 2))}}
    >>> spec = ecopt.Chain("l0", "l1")
    >>> scaled = ecopt.rescale(params, spec, jax.random.key(0), log_range=3.0)
    >>> v0 = ecopt.basis_path_values(params, spec)["l0"]["kernel"]
    >>> v1 = ecopt.basis_path_values(scaled, spec)["l0"]["kernel"]
    >>> bool(jnp.allclose(v0, v1, rtol=1e-5))
    True

  Raises:
    ValueError: for a ``log_range`` that is negative, not finite or whose
      factors ``exp(log_range)`` the parameters' dtype cannot hold, or
      scaled parameters that overflow (checked on concrete values).
  """
  node_factors.check_log_range(log_range, params)
  scaled = _rescale(params, spec, key, log_range=log_range)
  node_factors.check_finite_result(params, scaled, "rescale")
  return scaled


@_jit_with_static_spec
def _rescale(params, spec, key, *, log_range=1.0):
  structure = structure_lib.resolve(params, spec)
  factors = []
  for geometry in structure.chains:
    widths = geometry.widths
    key, *keys = jax.random.split(key, len(widths) - 1)
    factors.append(
        [
            jnp.exp(
                jax.random.uniform(
                    sub, (h,), minval=-log_range, maxval=log_range
                )
            )
            for sub, h in zip(keys, widths[1:-1])
        ]
    )
  return _scale_nodes(params, spec, factors)


@_jit_with_static_spec
def canonicalize(params: Params, spec: spec_lib.Spec) -> Params:
  """Function-preserving node scaling that sets every free weight to +-1.

  Sweeps hidden levels from ``n-1`` down to ``1`` and scales node ``(k, j)``
  by the magnitude of its current free (out-skeleton) weight. The network
  function and every basis-path value are unchanged. A free weight that is
  exactly zero cannot be normalised; its node is left unscaled.

  Canonicalization does not change G-SGD's steps relative to the weights: a
  node scaling moves each skeleton product ``S_e`` by the inverse of its
  weight's factor, and in canonical form ``S_e`` is, up to sign, an
  all-skeleton path value, which no scaling changes. The paper's
  initialisation, :func:`skeleton_init`, changes those values.

  Example:
    >>> import jax.numpy as jnp, ecopt
    >>> params = {"l0": {"kernel": jnp.ones((3, 2))},
    ...           "l1": {"kernel": jnp.array([[3.0, 1.0], [1.0, -0.5]])}}
    >>> c = ecopt.canonicalize(params, ecopt.Chain("l0", "l1"))
    >>> c["l1"]["kernel"].tolist()
    [[1.0, 0.3333333432674408], [2.0, -1.0]]
  """

  def fn(geometry: ChainGeometry, views, biases):
    widths = geometry.widths
    n = len(geometry.layers)
    factors: list[Optional[jax.Array]] = [None] * (n + 1)
    for k in range(n - 1, 0, -1):
      # The free weight of (k, j), after level k+1 was scaled.
      layer = geometry.layers[k]
      current = view_of(layer).out_skeleton(views[k])
      if factors[k + 1] is not None:
        current = current * cycle(factors[k + 1], widths[k])
      magnitude = jnp.abs(current)
      factors[k] = jnp.where(magnitude > 0, magnitude, 1.0)
    return _apply_node_factors(geometry, views, biases, factors)

  return _tree.map_chains(params, spec, fn)


SKELETON_INIT_MODES = ("paper", "variance")

# Squared norm of a column under He initialisation (variance 2 / fan_in):
# it keeps the second moment of the pre-activations from level to level
# under ReLU, which halves it.
_HE_COLUMN_ENERGY = 2.0


@_jit_with_static_spec(static_argnames=("keep_sign", "mode"))
def skeleton_init(
    params: Params,
    spec: spec_lib.Spec,
    *,
    keep_sign: bool = False,
    mode: str = "paper",
) -> Params:
  """The paper's initialisation: every skeleton weight set to 1.

  Meng et al. (2019), Appendix 11.3: the in- and out-skeleton weights of every
  hidden node are overwritten with 1 (or, with ``keep_sign``, with the sign of
  their current value, 0 counting as +). This changes the network function but
  puts every all-skeleton path value, hence every skeleton product ``S_e``,
  at +-1, so G-SGD's weight-space step ``~ lr * g / S_e^2`` is on the scale of
  SGD's. Starting G-SGD from ordinary He/Glorot weights instead gives tiny
  ``S_e`` and huge steps.

  With ``mode="paper"`` (the default) every other weight is kept as drawn.
  The skeleton entries of 1 then add to the He- or LeCun-scale rest: a
  node's pre-activation grows from level to level, and a classifier whose
  ``c`` hidden nodes per class feed it through free weights of 1 starts
  with logits of about ``c`` times a hidden activation (large initial
  losses). ``mode="variance"`` keeps every ``S_e`` at 1 and rescales the
  other kernel entries of each output column ``j`` by one factor so that
  the column's squared norm, counting its ``c_j`` skeleton entries, is 2,
  He's expectation:
  ``beta_j^2 = max(2 - c_j, 0) / sum of the column's other squared
  entries``. No ``S_e`` depends on those entries, and the second moment of
  the pre-activations stays level to level as under He initialisation
  (a column whose skeleton entries alone reach 2, such as a classifier
  column fed by several free weights, keeps only them). Biases and
  parameters outside every chain are unchanged in both modes.

  Args:
    params: a params pytree.
    spec: an ``ecopt.Chain`` or a sequence of them.
    keep_sign: keep each skeleton weight's sign instead of setting it to +1.
    mode: ``"paper"`` (Appendix 11.3) or ``"variance"`` (see above).

  Returns:
    The re-initialised params.

  Example:
    >>> import jax, ecopt, flax.linen as nn, jax.numpy as jnp
    >>> model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    >>> params = ecopt.skeleton_init(params, ecopt.Chain("layers_0", "layers_2"))
    >>> float(params["layers_2"]["kernel"][0, 0])
    1.0
    >>> kernel = ecopt.skeleton_init(
    ...     params, ecopt.Chain("layers_0", "layers_2"), mode="variance"
    ... )["layers_0"]["kernel"]
    >>> round(float((kernel[:, 0] ** 2).sum()), 4)  # 1 + the rest: 2
    2.0
  """
  if mode not in SKELETON_INIT_MODES:
    raise ValueError(
        f"skeleton_init: mode must be one of {SKELETON_INIT_MODES}, got"
        f" {mode!r}."
    )

  def fn(geometry: ChainGeometry, views, biases):
    n = len(geometry.layers)
    out = []
    for k, (layer, w) in enumerate(zip(geometry.layers, views), start=1):
      masks = []
      if k < n:
        masks.append(view_of(layer).in_mask())
      if k > 1:
        masks.append(view_of(layer).out_mask())
      if masks:
        mask = masks[0] if len(masks) == 1 else masks[0] | masks[1]
        value = jnp.where(w < 0, -1.0, 1.0) if keep_sign else 1.0
        rest = w
        if mode == "variance":
          rest = w * view_of(layer).broadcast_out(_rest_factor(w, mask, layer))
        w = jnp.where(mask, value, rest).astype(w.dtype)
      out.append(w)
    return out, biases

  return _tree.map_chains(params, spec, fn)


def _rest_factor(w: jax.Array, mask: jax.Array, layer) -> jax.Array:
  """Per output column: the factor that brings its squared norm to 2.

  The column's skeleton entries (``mask``) will be +-1 and count 1 each;
  the factor scales the others. Zero where the skeleton entries alone reach
  2; 1 where the other entries are all zero (nothing to scale).
  """
  count = view_of(layer).col_sums(mask.astype(w.dtype))
  energy = view_of(layer).col_sums(jnp.where(mask, 0.0, w * w))
  room = jnp.maximum(_HE_COLUMN_ENERGY - count, 0.0)
  return jnp.where(energy > 0, jnp.sqrt(room / jnp.where(energy > 0, energy, 1.0)), 1.0)
