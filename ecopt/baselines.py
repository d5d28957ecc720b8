"""Peer baselines: Path-SGD (Neyshabur, Salakhutdinov and Srebro, 2015).

Path-SGD divides each gradient entry by ``kappa_e``, the sum over all paths
through edge ``e`` of the product of the *other* weights squared. In a layered
chain this factorises into a forward and a backward pass with squared weights,
``kappa_e = gamma_in(tail) * gamma_out(head)``, so it costs about one extra
forward/backward pass over the weights (not over the data).
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from ecopt import _tree
from ecopt import chain_transform
from ecopt import numerics
from ecopt import spec as spec_lib
from ecopt import structure as structure_lib
from ecopt.layer_views import view_of
from ecopt.structure import ChainGeometry


def _after(x, sums):
  """``x``, in a form XLA computes only after the sums of squares ``sums``.

  A layer's kappa needs the gammas of the other layers only, so XLA could
  write its update into the donated weights before its own sweeps have
  read them, and copies every kernel to be safe. Sums of squares are never
  negative (NaN compares false), so the select always picks ``x``, but XLA
  cannot know that.
  """
  if not sums:
    return x
  negative = functools.reduce(operator.add, [s[0] for s in sums]) < 0
  return jnp.where(negative, -x, x)


def path_gammas(
    geometry: ChainGeometry,
    views: Sequence[jax.Array],
    biases: Sequence[Optional[jax.Array]],
) -> tuple[list[jax.Array], list[jax.Array]]:
  """``gamma_in`` (levels ``0..n-1``) and ``gamma_out`` (levels ``1..n``).

  ``gamma_in(k, j)`` sums, over every path from a level-0 node or a bias
  (constant-1) node to node ``(k, j)``, the product of its weights squared:
  ``gamma_in(0, .) = 1`` and
  ``gamma_in(k, j) = sum_{t, i} K_k[t, i, j]^2 gamma_in(k-1, i) + b_k[j]^2``.
  ``gamma_out(k, i)`` does the same for paths from ``(k, i)`` to level ``n``:
  ``gamma_out(n, .) = 1`` and
  ``gamma_out(k-1, i) = sum_{t, j} K_k[t, i, j]^2 gamma_out(k, j)``.
  Taps are parallel edges between the same two nodes (channels).

  Returns:
    ``(gamma_in, gamma_out)``: lists indexed by level; ``gamma_out[0]`` is
    never needed and is returned as the level-0 value for completeness.
  """
  layers = geometry.layers
  n = len(layers)
  widths = geometry.widths
  dtype = views[0].dtype
  # Each sweep squares the weights inside its own reduction, as
  # w * (w * gamma): a shared w * w has two reductions as users, so XLA
  # writes it to a parameter-sized buffer and reads it twice (5x slower).
  g_in = [jnp.ones((widths[0],), dtype)]
  for k in range(1, n):
    view, w, b = view_of(layers[k - 1]), views[k - 1], biases[k - 1]
    g = view.col_sums(w * (w * view.broadcast_in(g_in[k - 1])))
    if b is not None:
      g = g + b * b
    g_in.append(g)
  g_out: list[jax.Array] = [None] * (n + 1)  # type: ignore[list-item]
  g_out[n] = jnp.ones((widths[n],), dtype)
  for k in range(n, 0, -1):
    view, w = view_of(layers[k - 1]), views[k - 1]
    g_out[k - 1] = view.row_sums(w * (w * view.broadcast_out(g_out[k])))
  return g_in, g_out


def chain_kappa(
    geometry: ChainGeometry,
    views: Sequence[jax.Array],
    biases: Sequence[Optional[jax.Array]],
) -> tuple[list[jax.Array], list[Optional[jax.Array]]]:
  """Per-edge ``kappa`` of one chain, in the layer views' shapes.

  A kernel entry ``K_k[t, i, j]`` gets ``gamma_in(k-1, i) * gamma_out(k, j)``;
  a bias ``b_k[j]`` (an edge from a constant node, whose ``gamma_in`` is 1)
  gets ``gamma_out(k, j)``.
  """
  g_in, g_out = path_gammas(geometry, views, biases)
  n = len(geometry.layers)
  kappas, bias_kappas = [], []
  for k, layer in enumerate(geometry.layers, start=1):
    own = ([g_in[k]] if k < n else []) + ([g_out[k - 1]] if k > 1 else [])
    view = view_of(layer)
    kappa = view.along_in(g_in[k - 1]) * view.along_out(_after(g_out[k], own))
    kappas.append(jnp.broadcast_to(kappa, layer.shape))
    bias_kappas.append(None if biases[k - 1] is None else g_out[k])
  return kappas, bias_kappas


def path_kappa(params: Any, spec: spec_lib.Spec) -> Any:
  """Path-SGD's per-parameter normaliser ``kappa`` as a pytree like ``params``.

  ``kappa_e`` is the sum, over all paths through edge ``e``, of the product of
  the squares of the path's other weights; a bias is an edge from a constant-1
  node. Parameters outside every chain get ``kappa = 1``.

  Args:
    params: a params pytree.
    spec: an ``ecopt.Chain`` or a sequence of them.

  Returns:
    ``kappa``, in the layout of ``params``.

  Example:
    >>> import jax.numpy as jnp, ecopt
    >>> from ecopt.baselines import path_kappa
    >>> params = {"l0": {"kernel": jnp.full((3, 2), 2.0)},
    ...           "l1": {"kernel": jnp.full((2, 1), 3.0)}}
    >>> kappa = path_kappa(params, ecopt.Chain("l0", "l1"))
    >>> float(kappa["l0"]["kernel"][0, 0]), float(kappa["l1"]["kernel"][0, 0])
    (9.0, 12.0)
  """
  structure = structure_lib.resolve(params, spec)
  leaves, treedef = _tree.flat(params)
  ones = [jnp.ones(jnp.shape(leaf), jnp.result_type(leaf)) for leaf in leaves]
  out = _tree.map_chain_leaves(
      structure, lambda g, views: chain_kappa(g, *views), [leaves], ones
  )
  return jax.tree_util.tree_unflatten(treedef, out)


def scale_by_path_norm(
    spec: spec_lib.Spec,
) -> optax.GradientTransformationExtraArgs:
  """Divides each update entry by Path-SGD's ``kappa_e`` of the current params.

  For an edge ``e = K_k[t, i, j]`` of a chain layer (viewed as
  ``(taps, in, out)``, ``docs/g-space.md`` §1),

      kappa_e = gamma_in(k-1, i) * gamma_out(k, j),

  where ``gamma_in`` sums the products of squared weights over all paths from
  the chain's input (or a bias node) into a node, and ``gamma_out`` over all
  paths from a node to the chain's output. Both come from one forward and one
  backward pass with squared weights; a bias ``b_k[j]`` is an edge from a
  constant-1 node, so it adds ``b_k[j]^2`` to ``gamma_in(k, j)`` and its own
  ``kappa`` is ``gamma_out(k, j)``. Conv layers are read through the taps view:
  nodes are channels and each tap is a parallel edge, which is the per-channel
  form of the path norm (node scaling acts per channel). kappa is recomputed
  from ``params`` at every step and never accumulated.

  Parameters outside every chain get ``kappa = 1`` (their gradient passes
  through unchanged). A ``kappa`` that is zero or subnormal (a node whose
  every in- or out-path has weight zero, where the gradient is zero too)
  gives a zero update instead of Inf/NaN.

  Under a node scaling ``w_e -> w_e c_j / c_i`` the gradient scales by
  ``c_i / c_j`` and ``kappa_e`` by ``c_i^2 / c_j^2``, so ``g_e / kappa_e``
  scales exactly like ``w_e``: a Path-SGD step commutes with node scaling and
  two rescaled copies compute the same function at every step.

  Args:
    spec: an ``ecopt.Chain`` or a sequence of them.

  Returns:
    A ``GradientTransformationExtraArgs``; ``update`` requires ``params``
    (and ignores any extra arguments).

  Example:
    >>> import optax, ecopt
    >>> spec = ecopt.Chain("Dense_0", "Dense_1", "Dense_2")
    >>> opt = optax.chain(ecopt.scale_by_path_norm(spec),
    ...                   optax.scale_by_adam(), optax.scale(-1e-3))

  References:
    Neyshabur, Salakhutdinov and Srebro, "Path-SGD: Path-Normalized
    Optimization in Deep Neural Networks", NeurIPS 2015 (arXiv:1506.02617).
  """

  def update_chain(geometry, params, updates, step):
    del step
    kappas, bias_kappas = chain_kappa(geometry, *params)
    grads, bias_grads = updates
    return (
        [g * numerics.safe_reciprocal(c) for g, c in zip(grads, kappas)],
        [
            None if g is None else g * numerics.safe_reciprocal(c)
            for g, c in zip(bias_grads, bias_kappas)
        ],
    )

  return chain_transform.chain_transformation(
      "ecopt.scale_by_path_norm", spec, update_chain
  )


def path_sgd(
    learning_rate: optax.ScalarOrSchedule, spec: spec_lib.Spec
) -> optax.GradientTransformationExtraArgs:
  """Path-SGD: SGD with each gradient entry divided by ``kappa_e``.

  ``w_e <- w_e - lr * (dL/dw_e) / kappa_e(w)`` with ``kappa_e`` the sum over
  all paths through ``e`` of the product of the other weights squared (see
  :func:`scale_by_path_norm` for how it is computed, and for biases, conv
  taps and parameters outside every chain). This is the approximate steepest
  descent of Neyshabur et al. (2015) with respect to the (squared) l2 path
  regulariser; its updates commute with node scaling, so its function
  trajectory does not depend on how the network is balanced.

  Args:
    learning_rate: a scalar or an optax schedule.
    spec: an ``ecopt.Chain`` or a sequence of them.

  Returns:
    A ``GradientTransformationExtraArgs``; ``update`` requires ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, ecopt
    >>> params = {"a": {"kernel": jnp.full((3, 4), 0.5)},
    ...           "b": {"kernel": jnp.full((4, 1), 2.0)}}
    >>> opt = ecopt.path_sgd(0.01, ecopt.Chain("a", "b"))
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, _ = opt.update(grads, opt.init(params), params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Neyshabur, Salakhutdinov and Srebro, "Path-SGD: Path-Normalized
    Optimization in Deep Neural Networks", NeurIPS 2015 (arXiv:1506.02617).
  """
  return optax.with_extra_args_support(
      optax.chain(
          scale_by_path_norm(spec),
          optax.scale_by_learning_rate(learning_rate),
      )
  )
