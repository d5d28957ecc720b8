"""Skeleton, basis paths and the G-space chart: ``docs/g-space.md`` §2-§4.

One chain at a time. Layer ``k`` (1-based) maps level ``k-1`` to level ``k``;
its kernel is read through a :class:`ecopt.layer_views.LayerView`, which owns
every layout question, and the guards of §6 come from :mod:`ecopt.numerics`.
What is left here is the mathematics, one formula per statement, in static
Python loops over layers: per-node vectors only, O(m) work, no matrices.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ecopt import numerics
from ecopt.layer_views import LayerView, NodeVector, cycle, head, view_of
from ecopt.structure import ChainGeometry

Arrays = Sequence[jax.Array]
Biases = Sequence[Optional[jax.Array]]


@dataclasses.dataclass(frozen=True)
class LayerSkeleton:
  """What the edges of layer ``k`` read from the skeleton (§2).

  Attributes:
    view: the layer's :class:`LayerView`.
    a: its in-skeleton weights ``K_k[t*, j mod h_{k-1}, j]``, per node of
      level ``k``.
    o: its out-skeleton weights ``K_k[t*, i, i mod h_k]``, per node of level
      ``k-1`` (the free weights of that level when ``k > 1``).
    B_in: ``B(k-1, .)``; ``B_out``: ``B(k, .)``; ``F_out``: ``F(k, .)``.
    inv_B_in, inv_F_out: their guarded reciprocals.
    inv_S: ``1/S_e = 1/(B(k-1, i) F(k, j))`` over the kernel.
    own_in_skeleton: static bool per node of level ``k``: is its in-skeleton
      edge a coordinate (not free)? All False for the last layer, whose
      level ``n`` has no hidden node.
  """

  view: LayerView
  a: jax.Array
  o: jax.Array
  B_in: NodeVector
  B_out: jax.Array
  F_out: jax.Array
  inv_B_in: NodeVector
  inv_F_out: NodeVector
  inv_S: jax.Array
  own_in_skeleton: np.ndarray

  @property
  def has_own_in_skeleton(self) -> bool:
    return bool(self.own_in_skeleton.any())

  def in_skeleton_values(self) -> jax.Array:
    """``v_s = B(k, j) F(k, j)``, the values of the all-skeleton paths."""
    return self.B_out * self.F_out


def own_in_skeleton(geometry: ChainGeometry, k: int) -> np.ndarray:
  """Per node of level ``k``: is its in-skeleton edge not free?

  Node ``j`` of level ``k >= 2`` has in-skeleton edge ``K_k[t*, j mod h_{k-1},
  j]``, which is the out-skeleton (free) edge of node ``j`` of level ``k-1``
  exactly when ``j < h_{k-1}``.
  """
  widths = geometry.widths
  if k == len(geometry.layers):
    return np.zeros((widths[k],), bool)
  if k == 1:
    return np.ones((widths[k],), bool)
  return np.arange(widths[k]) >= widths[k - 1]


def skeleton(geometry: ChainGeometry, kernels: Arrays) -> tuple[LayerSkeleton, ...]:
  """``B`` and ``F`` of §2 with one forward and one backward sweep."""
  widths, n = geometry.widths, len(geometry.layers)
  views = [view_of(layer) for layer in geometry.layers]
  dtype = kernels[0].dtype
  a = [view.in_skeleton(w) for view, w in zip(views, kernels)]
  o = [view.out_skeleton(w) for view, w in zip(views, kernels)]
  B = [jnp.ones((widths[0],), dtype)]
  for k in range(1, n + 1):
    B.append(a[k - 1] * cycle(B[k - 1], widths[k]))  # B(k, j) = a_k(j) B(k-1, j mod h_{k-1})
  F = [None] * n + [jnp.ones((widths[n],), dtype)]
  for k in range(n - 1, 0, -1):
    F[k] = o[k] * cycle(F[k + 1], widths[k])  # F(k, j) = o_{k+1}(j) F(k+1, j mod h_{k+1})
  inv_B = [NodeVector(numerics.safe_reciprocal(b)) for b in B]
  inv_F = [None] + [NodeVector(numerics.safe_reciprocal(f)) for f in F[1:]]
  return tuple(
      LayerSkeleton(
          view=views[k - 1],
          a=a[k - 1],
          o=o[k - 1],
          B_in=NodeVector(B[k - 1]),
          B_out=B[k],
          F_out=F[k],
          inv_B_in=inv_B[k - 1],
          inv_F_out=inv_F[k],
          inv_S=views[k - 1].along_in(inv_B[k - 1]) * views[k - 1].along_out(inv_F[k]),
          own_in_skeleton=own_in_skeleton(geometry, k),
      )
      for k in range(1, n + 1)
  )


def path_values(
    sk: Sequence[LayerSkeleton], kernels: Arrays, biases: Biases
) -> tuple[list[jax.Array], list[Optional[jax.Array]]]:
  """``v_e = w_e S_e`` for every edge; a bias gets ``b F(k, j)`` (§2).

  At a free position this is the value of the all-skeleton path through it.
  """
  values, bias_values = [], []
  for layer, w, b in zip(sk, kernels, biases):
    S = layer.view.along_in(layer.B_in) * layer.view.along_out(layer.F_out)
    values.append(numerics.saturate(w * S, w))
    bias_values.append(None if b is None else numerics.saturate(b * layer.F_out, b))
  return values, bias_values


@dataclasses.dataclass(frozen=True)
class GradientDamage:
  """Where non-finite gradients must reach the updates.

  A non-finite gradient damages its own entry. A free weight has no update
  of its own to carry its damage to the optimizer: the nearest in-skeleton
  path gradient upstream does, found in one backward sweep like ``U``. Free
  weights themselves are never damaged: they never move.

  Attributes:
    in_skeleton: per layer, a NaN marker per node of its output level (NaN
      where that node's in-skeleton entry is damaged), or None where the
      layer has no in-skeleton coordinates. Shared by the path gradients'
      and the allocation's loops; each loop reads its own gradients for the
      other entries, so no kernel-sized mask is kept between them.
  """

  in_skeleton: tuple[Optional[NodeVector], ...]

  def of(self, k: int, layer: LayerSkeleton, g: jax.Array) -> jax.Array:
    """Kernel-shaped bool: the damaged entries of layer ``k``."""
    marker = numerics.damage_marker(g)
    if self.in_skeleton[k - 1] is not None:
      marker = layer.view.with_in_skeleton(marker, self.in_skeleton[k - 1])
    return jnp.isnan(marker if k == 1 else layer.view.without_free(marker))


def _gradient_damage(
    sk: Sequence[LayerSkeleton], grads: Arrays, g_out: Sequence[Optional[jax.Array]]
) -> GradientDamage:
  """``g_out[k]``: the out-skeleton gradients of layer ``k+1`` (the free
  weights of level ``k``)."""
  n = len(sk)
  hurt: list[Optional[jax.Array]] = [None] * (n + 1)
  for k in range(n - 1, 0, -1):
    hurt[k] = numerics.damage_marker(sk[k].o) + numerics.damage_marker(g_out[k])
    if hurt[k + 1] is not None:
      hurt[k] = hurt[k] + head(hurt[k + 1], hurt[k].shape[0])
  return GradientDamage(tuple(
      NodeVector(hurt[k] + numerics.damage_marker(layer.view.in_skeleton(g)))
      if layer.has_own_in_skeleton else None
      for k, (layer, g) in enumerate(zip(sk, grads), start=1)
  ))


def path_gradients(
    sk: Sequence[LayerSkeleton],
    kernels: Arrays,
    grads: Arrays,
    bias_grads: Biases,
) -> tuple[list[jax.Array], list[Optional[jax.Array]], GradientDamage]:
  """The inverse chain rule of §3: ``dL/dv`` for every edge, 0 where free.

  A coordinate gets ``g_e / S_e``; the in-skeleton edge of hidden node
  ``(k, j)`` that is not free gets ``(phi_s - U(k, j)) / v_s`` with
  ``phi = w g`` and ``U`` summed in one backward sweep of row sums.

  Returns:
    The path gradients of the kernels and of the biases, and the
    :class:`GradientDamage` of ``grads``, which :func:`allocate` carries to
    the updates.
  """
  n = len(sk)
  U: list[Optional[jax.Array]] = [None] * (n + 1)
  g_out: list[Optional[jax.Array]] = [None] * n
  for k in range(n - 1, 0, -1):
    nxt, w, g = sk[k], kernels[k], grads[k]  # layer k+1
    g_out[k] = nxt.view.out_skeleton(g)
    R = nxt.view.row_sums(w * g) - nxt.o * g_out[k]
    U[k] = R if U[k + 1] is None else R + head(U[k + 1], R.shape[0])
  damage = _gradient_damage(sk, grads, g_out)
  out, out_bias = [], []
  for k, (layer, g, gb) in enumerate(zip(sk, grads, bias_grads), start=1):
    p = g * layer.inv_S
    if layer.has_own_in_skeleton:
      q = (layer.a * layer.view.in_skeleton(g) - U[k]) * numerics.safe_reciprocal(layer.in_skeleton_values())
      p = layer.view.with_in_skeleton(p, q)
    if k > 1:
      p = layer.view.without_free(p)
    out.append(numerics.freeze(p, result=p, damage=damage.of(k, layer, g)))
    if gb is None:
      out_bias.append(None)
    else:
      pb = gb * layer.inv_F_out.value
      out_bias.append(numerics.freeze(pb, result=pb, damage=numerics.damaged(gb)))
  return out, out_bias, damage


def allocate(
    sk: Sequence[LayerSkeleton],
    kernels: Arrays,
    biases: Biases,
    path_updates: Arrays,
    bias_path_updates: Biases,
    *,
    grads: Arrays,
    bias_grads: Biases,
    damage: GradientDamage,
    min_ratio: Any,
    dtypes: Sequence[Any],
) -> tuple[list[jax.Array], list[Optional[jax.Array]]]:
  """Weight allocation, §4: the weight updates ``w' - w`` that realise ``dv``.

  ``rho(k, j) = 1 + dv_s / v_s`` for an in-skeleton edge that is not free,
  inherited along free ones, built in one forward sweep as ``r = rho - 1``;
  then ``w'_e = (w_e + dv_e / S_e) / rho(k-1, i)`` and ``b' = b + dv_b / F``.
  Free weights do not move. The updates carry the damage of the gradients
  ``grads`` and ``bias_grads`` (``damage`` from :func:`path_gradients`);
  ``dtypes`` are the parameters' own dtypes, at whose largest finite value
  they saturate.
  """
  # r and 1/rho per level. A level that inherits every ratio from an equal
  # width level shares its NodeVectors, so one pinned copy serves all.
  r = [NodeVector(jnp.zeros_like(sk[0].B_in.value))]
  inv_rho = [NodeVector(jnp.ones_like(sk[0].B_in.value))]
  for k, layer in enumerate(sk[:-1], start=1):
    h = layer.B_out.shape[0]
    if not layer.has_own_in_skeleton:
      same = h == r[-1].value.shape[0]
      r.append(r[-1] if same else NodeVector(cycle(r[-1], h)))
      inv_rho.append(inv_rho[-1] if same else NodeVector(cycle(inv_rho[-1], h)))
      continue
    dv_s = layer.view.in_skeleton(path_updates[k - 1])
    ratio = dv_s * numerics.safe_reciprocal(layer.in_skeleton_values())  # rho - 1
    ratio = numerics.hold_small_ratios(ratio, min_ratio)
    r.append(NodeVector(jnp.where(layer.own_in_skeleton, ratio, cycle(r[-1], h))))
    inv_rho.append(NodeVector(1 / (1 + r[k].value)))
  out, out_bias = [], []
  for k, (layer, w, b, g, gb, dv, dvb, dtype) in enumerate(
      zip(sk, kernels, biases, grads, bias_grads, path_updates, bias_path_updates, dtypes),
      start=1,
  ):
    view = layer.view
    if k == 1:
      d = dv * layer.inv_S
    else:
      r_in, inv_rho_in = view.along_in_all([r[k - 1], inv_rho[k - 1]])
      d = (dv * layer.inv_S - w * r_in) * inv_rho_in  # (w + dv/S)/rho - w, no cancellation
    if layer.has_own_in_skeleton:
      h = layer.a.shape[0]
      d_s = layer.a * (r[k].value - cycle(r[k - 1], h)) * cycle(inv_rho[k - 1], h)  # w_s (rho_k/rho_{k-1} - 1)
      d = view.with_in_skeleton(d, d_s)
    if k > 1:
      d = view.without_free(d)
    d = numerics.fit_update(d, w, dtype)
    out.append(numerics.freeze(d, result=w + d, damage=damage.of(k, layer, g)))
    if dvb is None:
      out_bias.append(None)
    else:
      db = numerics.fit_update(dvb * layer.inv_F_out.value, b, dtype)
      out_bias.append(numerics.freeze(db, result=b + db, damage=numerics.damaged(gb)))
  return out, out_bias


def all_skeleton_mask(geometry: ChainGeometry, k: int) -> jax.Array:
  """Kernel-shaped bool: the in-skeleton coordinates of layer ``k``.

  Their basis paths are the all-skeleton paths ``v_s`` (the "negative" basis
  paths of Zheng et al., 2019), which weight decay on path values leaves out.
  """
  view = view_of(geometry.layers[k - 1])
  own = jnp.asarray(own_in_skeleton(geometry, k))
  return view.in_mask() & view.broadcast_out(own)


def coordinate_mask(geometry: ChainGeometry, k: int) -> jax.Array:
  """Kernel-shaped bool: the coordinates of layer ``k`` (not free)."""
  view = view_of(geometry.layers[k - 1])
  everything = jnp.ones(view.shape, bool)
  return everything if k == 1 else view.without_free(everything)
