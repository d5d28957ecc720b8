"""Basis-path regularisation (Zheng et al., AAAI 2019), to run inside g_space.

Zheng, Meng, Zhang, Chen, Yu and Liu, "Capacity Control of ReLU Neural
Networks by Basis-path Norm" (AAAI 2019, arXiv:1809.07122), split the basis
paths of the skeleton method into two groups by the sign of their exponent
when a non-basis path value is written as a product of basis-path values:

- *negative* basis paths appear in denominators. With the skeleton of
  ``g-space.md`` these are the all-skeleton paths that are coordinates: the
  basis paths of the in-skeleton edges that are not free (for equal widths,
  the ``d`` diagonal paths ``w1(j, j) w2(j, j) ... wL(j, j)``);
- *positive* basis paths appear in numerators: every other coordinate (paths
  with exactly one non-skeleton edge, biases included).

Their basis-path norm keeps positive basis paths small and negative basis
paths away from both 0 and infinity: it takes the largest ``|v|`` over the
positive paths and the largest ``|log|v||`` over the negative ones. A ``sup``
is not a useful gradient regulariser, so ecopt implements the smooth,
separable surrogate (the same step from a max-norm to a sum of squares that
turns an l_inf weight bound into weight decay)

    R(v) = 1/2 sum_{p positive} v_p^2  +  1/2 sum_{p negative} (log|v_p|)^2,

    dR/dv_p = v_p                (positive),
    dR/dv_p = log|v_p| / v_p     (negative),

and adds ``weight_decay * dR/dv`` to the path gradients. Decaying a negative
basis path towards 0 like a positive one would inflate every non-basis path
that it divides (and, in weights, blow up G-SGD's ``1/S_e^2`` step scale);
the log term instead pulls it towards magnitude 1, where the skeleton
initialisation puts it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ecopt import _tree
from ecopt import chain_transform
from ecopt import numerics
from ecopt import paths as paths_lib
from ecopt import spec as spec_lib
from ecopt import structure as structure_lib
from ecopt.structure import ChainGeometry

_NAME = "ecopt.add_basis_path_decay"


class AddBasisPathDecayState(NamedTuple):
  """State of :func:`add_basis_path_decay`: the step, for a schedule."""

  count: jax.Array


def _chain_decay_gradient(geometry: ChainGeometry, values, bias_values):
  """``dR/dv`` of one chain: ``v`` (positive), ``log|v|/v`` (negative), 0 (free)."""
  grads, bias_grads = [], []
  for k, v in enumerate(values, start=1):
    negative = paths_lib.all_skeleton_mask(geometry, k)
    magnitude = jnp.abs(v)
    tiny = jnp.finfo(v.dtype).tiny
    # log|v|/v is unbounded at v = 0: a zero negative path has no chart
    # (docs/g-space.md §6), so it gets no decay rather than Inf/NaN.
    log_term = jnp.log(jnp.where(magnitude >= tiny, magnitude, 1.0))
    d = jnp.where(negative, log_term * numerics.safe_reciprocal(v), v)
    grads.append(jnp.where(paths_lib.coordinate_mask(geometry, k), d, 0.0))
    bias_grads.append(bias_values[k - 1])
  return grads, bias_grads


def basis_path_regularizer(
    values: Any, spec: spec_lib.Spec, *, outside_chains: bool = True
) -> jax.Array:
  """The surrogate ``R(v)`` that :func:`add_basis_path_decay` differentiates.

  ``R(v) = 1/2 sum_pos v^2 + 1/2 sum_neg (log|v|)^2`` over the coordinates of
  every chain (free positions excluded); parameters outside every chain count
  as positive coordinates when ``outside_chains`` is True.

  Args:
    values: basis-path values, e.g. ``ecopt.basis_path_values(params, spec)``.
    spec: an ``ecopt.Chain`` or a sequence of them.
    outside_chains: include ``1/2 w^2`` of parameters outside every chain.

  Returns:
    A scalar.
  """
  structure = structure_lib.resolve(values, spec)
  leaves, _ = _tree.flat(values)
  in_chain = np.zeros(len(leaves), bool)
  total = jnp.zeros((), jnp.float32)
  for geometry in structure.chains:
    views, biases = _tree.chain_views(geometry, leaves)
    for k, (layer, v) in enumerate(zip(geometry.layers, views), start=1):
      in_chain[layer.kernel_index] = True
      negative = paths_lib.all_skeleton_mask(geometry, k)
      positive = ~negative & paths_lib.coordinate_mask(geometry, k)
      safe = jnp.where(negative, v, 1.0)
      total = total + 0.5 * jnp.sum(jnp.where(positive, v * v, 0.0))
      total = total + 0.5 * jnp.sum(jnp.where(negative, jnp.log(jnp.abs(safe)) ** 2, 0.0))
      if biases[k - 1] is not None:
        in_chain[layer.bias_index] = True
        total = total + 0.5 * jnp.sum(biases[k - 1] ** 2)
  if outside_chains:
    for leaf, inside in zip(leaves, in_chain):
      if not inside:
        total = total + 0.5 * jnp.sum(jnp.asarray(leaf) ** 2)
  return total


def add_basis_path_decay(
    weight_decay: optax.ScalarOrSchedule,
    spec: spec_lib.Spec,
    *,
    outside_chains: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """Adds ``weight_decay * dR/dv`` of the basis-path regulariser (G-SGD+BPR).

  Use it inside :func:`ecopt.g_space`, whose inner transformation sees the
  basis-path values ``v`` as its params and path gradients as its updates::

      opt = ecopt.g_space(
          optax.chain(ecopt.add_basis_path_decay(1e-4, spec), optax.sgd(lr)),
          spec)

  With ``R(v) = 1/2 sum_{positive} v^2 + 1/2 sum_{negative} (log|v|)^2``
  (see the module docstring for the definitions and the reasons), the update
  becomes ``dL/dv + weight_decay * dR/dv`` where

  - a positive basis path (a coordinate that is not an in-skeleton edge,
    biases included) gets ``+ weight_decay * v``;
  - a negative basis path (the in-skeleton edge of a hidden node, not free:
    an all-skeleton path) gets ``+ weight_decay * log|v| / v``, which pulls
    ``|v|`` towards 1 from either side; a zero value gets nothing;
  - free positions (out-skeleton edges, not coordinates) get nothing;
  - parameters outside every chain are their own coordinates (``v = w``) and
    get plain decay ``weight_decay * w`` when ``outside_chains`` is True.

  ``R`` depends only on basis-path values, so the regularised optimizer stays
  exactly invariant under node scaling. Run anywhere but inside ``g_space``,
  its params would be weights: ``update`` raises ``ValueError`` there.

  Args:
    weight_decay: the regularisation strength ``lambda``: a scalar or an
      optax schedule of the step.
    spec: an ``ecopt.Chain`` or a sequence of them (the one given to
      ``g_space``).
    outside_chains: decay parameters outside every chain too.

  Returns:
    A ``GradientTransformationExtraArgs``; ``update`` requires ``params`` (the
    basis-path values, which ``g_space`` passes).

  Example:
    >>> import optax, ecopt
    >>> spec = ecopt.Chain("Dense_0", "Dense_1")
    >>> opt = ecopt.g_space(
    ...     optax.chain(ecopt.add_basis_path_decay(1e-4, spec), optax.sgd(0.1)),
    ...     spec)

  References:
    Zheng, Meng, Zhang, Chen, Yu and Liu, "Capacity Control of ReLU Neural
    Networks by Basis-path Norm", AAAI 2019 (arXiv:1809.07122).
    Meng et al., "G-SGD: Optimizing ReLU Neural Networks in its Positively
    Scale-Invariant Space", ICLR 2019 (arXiv:1802.03713).
  """
  chains = spec_lib.as_chains(spec)

  def strength(step):
    return weight_decay(step) if callable(weight_decay) else weight_decay

  def update_chain(geometry, values, updates, step):
    d, db = _chain_decay_gradient(geometry, *values)
    lam = strength(step)
    grads, bias_grads = updates
    return (
        [g + (lam * r).astype(g.dtype) for g, r in zip(grads, d)],
        [None if g is None else g + (lam * r).astype(g.dtype) for g, r in zip(bias_grads, db)],
    )

  return chain_transform.chain_transformation(
      _NAME,
      chains,
      update_chain,
      update_outside=(
          (lambda u, v, step: u + (strength(step) * v).astype(u.dtype))
          if outside_chains
          else None
      ),
      init_state=lambda params: AddBasisPathDecayState(jnp.zeros([], jnp.int32)),
      next_state=lambda state: AddBasisPathDecayState(optax.safe_increment(state.count)),
      step_of=lambda state: state.count,
      check_call=lambda: chain_transform.require_path_space(_NAME),
  )
