"""Layer views: how each kernel layout is read as ``K[t, i, j]``.

``docs/g-space.md`` §1 reads every chain layer as ``K[t, i, j]`` (taps, nodes
of the level before, nodes of the level after). The mathematics in
:mod:`ecopt.paths` asks a layer only a handful of questions through
:class:`LayerView`: its skeleton entries, where its skeleton edges are, how a
per-node vector spreads over its edges and how its edges sum back to nodes.
Every layout (dense, conv taps, a dense head after a flatten, a per-channel
diagonal) and every trick that keeps XLA's fused loops cheap lives here.

A kernel keeps its own shape ``(*window, rows, n_out)``: a reshape would cost
XLA its in-place update of the donated kernel. Rows are ``position * n_in +
node`` (``positions`` is 1 except for a flatten head).
"""

from __future__ import annotations

import functools
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ecopt.layer_geometry import LayerGeometry


def materialize(x: jax.Array) -> jax.Array:
  """``x`` itself, computed once into its own buffer before any consumer.

  XLA fuses cheap elementwise producers into their consumers even through a
  broadcast, so a per-node sweep would be recomputed for every edge of the
  layer inside the update loop. A gather is never fused that way, so an
  identity gather pins the vector (``lax.optimization_barrier`` does not
  survive XLA:CPU's fusion passes). Higher ranks are pinned row by row.
  """
  return jax.lax.gather(
      x,
      jnp.asarray(np.arange(x.shape[0])[:, None], np.int32),
      jax.lax.GatherDimensionNumbers(
          offset_dims=tuple(range(1, x.ndim)),
          collapsed_slice_dims=(0,),
          start_index_map=(0,),
      ),
      slice_sizes=(1,) + x.shape[1:],
      indices_are_sorted=True,
      unique_indices=True,
      mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS,
  )


class NodeVector:
  """A per-node vector that is pinned (:func:`materialize`) at most once.

  With hidden units sharded, XLA's partitioner all-gathers a pinned vector
  once per pin and does not merge equal all-gathers, so a vector that many
  layers read (``1/rho`` of equal-width levels, ``1/B``) carries its pinned
  copy with it.
  """

  def __init__(self, value: jax.Array):
    self.value = value
    self._pinned = None

  @property
  def pinned(self) -> jax.Array:
    if self._pinned is None:
      self._pinned = materialize(self.value)
    return self._pinned


Vector = Union[jax.Array, NodeVector]


def _pinned(x: Vector) -> jax.Array:
  return x.pinned if isinstance(x, NodeVector) else materialize(x)


def _value(x: Vector) -> jax.Array:
  return x.value if isinstance(x, NodeVector) else x


def cycle(x: Vector, n: int) -> jax.Array:
  """``x[arange(n) % len(x)]`` along the first axis: ``j mod h`` of §2.

  A static tile and slice, no gather.
  """
  x = _value(x)
  size = x.shape[0]
  if n == size:
    return x
  if n < size:
    return x[:n]
  return jnp.tile(x, (-(-n // size),) + (1,) * (x.ndim - 1))[:n]


def head(x: jax.Array, n: int) -> jax.Array:
  """``x[:n]`` padded with zeros to length ``n``: the ``[j < h]`` of §3."""
  if n <= x.shape[0]:
    return x[:n]
  return jnp.pad(x, (0, n - x.shape[0]))


class LayerView:
  """A dense, conv or flatten-head kernel read as ``K[t, i, j]``."""

  def __init__(self, layer: LayerGeometry):
    self.layer = layer
    self.shape = layer.shape
    self.n_in, self.n_out = layer.n_in, layer.n_out
    self.rows = layer.shape[-2] if len(layer.shape) > 1 else layer.n_in

  # -- skeleton entries (§2) -------------------------------------------------

  def _column_entries(self, kernel, nodes: np.ndarray, distinct=True):
    """``K[t*, nodes[c, p], c]`` for every column ``c``: ``(n_out, P)``.

    One gather batched over the output axis: with a kernel's columns split
    across devices, XLA's partitioner keeps such a gather local.
    """
    window = self.layer.skeleton_window
    index = np.concatenate(
        [
            np.broadcast_to(np.asarray(window, np.int64), nodes.shape + (len(window),)),
            (self.layer.skeleton_row + nodes)[..., None],
        ],
        axis=-1,
    )
    last = kernel.ndim - 1
    return jax.lax.gather(
        kernel,
        jnp.asarray(index, np.int32),
        jax.lax.GatherDimensionNumbers(
            offset_dims=(),
            collapsed_slice_dims=tuple(range(last)),
            start_index_map=tuple(range(last)),
            operand_batching_dims=(last,),
            start_indices_batching_dims=(0,),
        ),
        slice_sizes=(1,) * kernel.ndim,
        indices_are_sorted=distinct,
        unique_indices=distinct,
        mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS,
    )

  def in_skeleton(self, kernel: jax.Array) -> jax.Array:
    """``K[t*, j mod n_in, j]`` for every output node ``j``."""
    cols = np.arange(self.n_out)
    return self._column_entries(kernel, (cols % self.n_in)[:, None])[:, 0]

  def out_skeleton(self, kernel: jax.Array) -> jax.Array:
    """``K[t*, i, i mod n_out]`` for every input node ``i``.

    Column ``c`` holds those of rows ``c, c + n_out, ...``: read per column
    and put back in row order; rows past the last node read row 0 and are cut.
    """
    per_column = -(-self.n_in // self.n_out)
    rows = np.arange(self.n_out)[:, None] + self.n_out * np.arange(per_column)[None, :]
    inside = rows < self.n_in
    entries = self._column_entries(
        kernel, np.where(inside, rows, 0), distinct=bool(inside.all())
    )
    return entries.T.reshape(-1)[: self.n_in]

  def _mask(self, out_edges: bool) -> jax.Array:
    """Bool kernel-shaped mask of the in- (or out-) skeleton edges.

    Built from ``iota`` comparisons against a static table of each row's (or
    column's) skeleton index: integer remainders per edge do not vectorise on
    CPU. Comparisons that are the identity are left out statically.
    """
    shape, ndim, layer = self.shape, len(self.shape), self.layer
    if out_edges:  # row skeleton_row + i holds column i mod n_out
      table = np.full((self.rows,), -1, np.int64)
      i = np.arange(self.n_in)
      table[layer.skeleton_row + i] = i % self.n_out
      axis, other = ndim - 2, ndim - 1
    else:  # column j holds row skeleton_row + (j mod n_in)
      table = layer.skeleton_row + np.arange(self.n_out) % self.n_in
      axis, other = ndim - 1, ndim - 2
    index = jax.lax.broadcasted_iota(jnp.int32, shape, axis)
    if not np.array_equal(table, np.arange(len(table))):
      index = jax.lax.broadcast_in_dim(jnp.asarray(table, np.int32), shape, (axis,))
    mask = jax.lax.broadcasted_iota(jnp.int32, shape, other) == index
    for window_axis, tap in enumerate(layer.skeleton_window):
      if shape[window_axis] > 1:
        mask = mask & (jax.lax.broadcasted_iota(jnp.int32, shape, window_axis) == tap)
    return mask

  def in_mask(self) -> jax.Array:
    """True at the in-skeleton edges (kernel-shaped)."""
    return self._mask(out_edges=False)

  def out_mask(self) -> jax.Array:
    """True at the out-skeleton edges, the free weights of §2."""
    return self._mask(out_edges=True)

  def with_in_skeleton(self, x: jax.Array, per_node: Vector) -> jax.Array:
    """``x`` with each in-skeleton edge set to its output node's value."""
    return jnp.where(self.in_mask(), self.along_out(per_node), x)

  def without_free(self, x: jax.Array) -> jax.Array:
    """``x`` with the free (out-skeleton) edges set to 0."""
    return jnp.where(self.out_mask(), jnp.zeros((), x.dtype), x)

  # -- per-node vectors over edges ------------------------------------------

  def broadcast_in(self, x: Vector) -> jax.Array:
    """A per-input-node vector over the kernel, not pinned.

    For a reduction's operand: XLA:CPU's reductions take a plain broadcast,
    but a pinned vector's broadcast is written out at the kernel's size.
    """
    x = cycle(x, self.rows)  # rows are position * n_in + node
    return jax.lax.broadcast_in_dim(x, self.shape, (len(self.shape) - 2,))

  def broadcast_out(self, x: Vector) -> jax.Array:
    """A per-output-node vector over the kernel, not pinned."""
    return jax.lax.broadcast_in_dim(_value(x), self.shape, (len(self.shape) - 1,))

  def along_in(self, x: Vector) -> jax.Array:
    """A per-input-node vector, pinned, over the kernel: for its loops."""
    return self.along_in_all([x])[0]

  def along_in_all(self, xs: Sequence[Vector]) -> list[jax.Array]:
    """:meth:`along_in` of several vectors of this layer.

    A flatten head reads each vector once per position, so a vector is tiled
    over the rows and pinned at that size (pinned before the tile too, else
    its sweep is fused into the tile and redone per row). Several are stacked
    and tiled together: one pinned ``(rows, len(xs))`` array instead of one
    pinned tile each, each of which cost a kernel.
    """
    if self.rows == self.n_in:
      return [self.broadcast_in(_pinned(x)) for x in xs]
    if len(xs) == 1:
      return [self.broadcast_in(materialize(cycle(_pinned(xs[0]), self.rows)))]
    stacked = materialize(jnp.stack([_value(x) for x in xs], axis=1))
    tiled = materialize(cycle(stacked, self.rows))
    return [self.broadcast_in(tiled[:, c]) for c in range(len(xs))]

  def along_out(self, x: Vector) -> jax.Array:
    """A per-output-node vector, pinned, over the kernel."""
    return self.broadcast_out(_pinned(x))

  def row_sums(self, x: jax.Array) -> jax.Array:
    """Sum over all edges leaving each input node.

    Output nodes first (the contiguous minor axis), then taps: taps first,
    over ``(taps, n_in * n_out)``, hits a slow path of XLA:CPU's reductions
    (a 3x3x512 conv took 14 ms instead of 0.3 ms).
    """
    x = jnp.sum(x, axis=-1)
    return jnp.sum(x.reshape(self.layer.taps, self.n_in), axis=0)

  def col_sums(self, x: jax.Array) -> jax.Array:
    """Sum over all edges entering each output node."""
    return jnp.sum(x, axis=tuple(range(x.ndim - 1)))


class DiagonalView(LayerView):
  """A per-channel scale (BatchNorm's ``scale``): one edge ``i = j`` per node.

  Each entry is its node's in- and out-skeleton edge at once, so every
  question has the entry itself as its answer.
  """

  def in_skeleton(self, kernel):
    return kernel

  out_skeleton = in_skeleton
  row_sums = in_skeleton
  col_sums = in_skeleton

  def in_mask(self):
    return jnp.ones(self.shape, bool)

  out_mask = in_mask

  def with_in_skeleton(self, x, per_node):
    return _value(per_node)

  def without_free(self, x):
    return jnp.zeros_like(x)

  def broadcast_in(self, x):
    return _value(x)

  broadcast_out = broadcast_in
  along_out = broadcast_in

  def along_in_all(self, xs):
    return [_value(x) for x in xs]


@functools.lru_cache(maxsize=None)
def view_of(layer: LayerGeometry) -> LayerView:
  """The :class:`LayerView` that reads ``layer``."""
  return DiagonalView(layer) if layer.diagonal else LayerView(layer)
