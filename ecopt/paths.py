"""Skeleton and basis paths: the array mathematics of ``g-space.md``.

Notation (``shared/design/g-space.md``): a chain has layers ``k = 1..n``;
layer ``k`` is read as ``K_k[t, i, j]`` (taps, nodes of level ``k-1``, nodes of
level ``k``) with skeleton tap ``t* = (T-1)//2``. Hidden node ``j`` of level
``k`` has in-skeleton edge ``K_k[t*, j mod h_{k-1}, j]`` and out-skeleton edge
``K_{k+1}[t*, j, j mod h_{k+1}]``; the out-skeleton edges are the free weights.
``B`` and ``F`` are the in- and out-skeleton chain products, and the basis path
of ``e = K_k[t, i, j]`` has value ``v_e = K_k[t, i, j] * B(k-1, i) * F(k, j)``.

Every function here works on one chain at a time, on per-layer views, with a
static Python loop over layers only: per-node vectors are built with static
reshapes and ``iota`` comparisons, so the work is O(m) and jit-friendly.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ecopt.structure import ChainGeometry, LayerGeometry


# ----------------------------------------------------------------- guards ---


def safe_reciprocal(x: jax.Array) -> jax.Array:
  """``1/x``, and 0 where ``|x|`` is below the dtype's smallest normal.

  This is the singular-chart guard of ``g-space.md`` section 6: a coordinate
  whose skeleton product ``S_e`` (or in-skeleton value ``v_s``) is zero or
  subnormal has no finite chart, so its path gradient and its update are 0
  (the coordinate is frozen) instead of Inf/NaN.
  """
  tiny = jnp.finfo(x.dtype).tiny
  ok = jnp.abs(x) >= tiny
  return jnp.where(ok, 1.0 / jnp.where(ok, x, 1.0), 0.0).astype(x.dtype)


def damage(*xs: jax.Array) -> jax.Array:
  """0 where every ``x`` is finite, NaN where one is not (elementwise).

  ``0 * x`` is NaN exactly for non-finite ``x``, so sums of ``damage`` mark
  damaged inputs without confusing them with an overflow of finite ones.
  """
  return functools.reduce(operator.add, [jnp.zeros((), x.dtype) * x for x in xs])


def nan_marker(x: jax.Array) -> jax.Array:
  """NaN where ``x`` is NaN, else 0: an ``Inf`` path update is an overflow
  (frozen), a NaN one is damage (propagated)."""
  return jnp.where(jnp.isnan(x), x, jnp.zeros((), x.dtype))


def freeze_non_finite(
    x: jax.Array, fill: jax.Array, check: Optional[jax.Array] = None
) -> jax.Array:
  """``x`` where ``check`` (default ``x``) is finite, else ``fill``.

  The per-entry guard of ``docs/singular_charts.md``, with ``fill`` 0 for an
  entry whose own inputs are finite (its chart arithmetic overflowed, or hit
  ``0 * inf``: the entry is frozen) and NaN for an entry whose own inputs are
  damaged (a NaN or Inf gradient, a NaN path update): NaN is the marker the
  weight allocation propagates instead of freezing, so damage reaches the
  updates as in optax. :func:`damage` builds such a ``fill`` in one
  multiply. Finite entries pass through bit for bit; everything is
  elementwise, so XLA fuses it into the loop that computes ``x``.
  """
  check = x if check is None else check
  return jnp.where(jnp.isfinite(check), x, fill)


def compute_dtype(dtype: Any) -> Any:
  """16-bit floats are computed in float32 and cast back."""
  dtype = jnp.dtype(dtype)
  return jnp.promote_types(dtype, jnp.float32) if dtype.itemsize < 4 else dtype


# ------------------------------------------------------- per-node vectors ---


def tile_to(x: jax.Array, n: int) -> jax.Array:
  """``x[arange(n) % len(x)]`` (along the first axis) with a static tile and
  slice (no gather)."""
  size = x.shape[0]
  if n == size:
    return x
  if n < size:
    return x[:n]
  reps = -(-n // size)
  return jnp.tile(x, (reps,) + (1,) * (x.ndim - 1))[:n]


def pad_to(x: jax.Array, n: int) -> jax.Array:
  """``x[:n]`` padded with zeros to length ``n``."""
  size = x.shape[0]
  if n <= size:
    return x[:n]
  return jnp.pad(x, (0, n - size))


def _column_entries(
    kernel: jax.Array,
    layer: LayerGeometry,
    nodes: np.ndarray,
    distinct: bool = True,
) -> jax.Array:
  """``K[t*, nodes[c, p], c]`` for every column ``c``: shape ``(n_out, P)``.

  One gather batched over the output axis: each column reads its own
  entries. Where a kernel's columns are split across devices (hidden units
  sharded), XLA's partitioner then keeps the gather local; a gather with
  free indices into the whole kernel made it move index tables and
  vectors between devices. ``distinct``: each column's nodes increase
  along ``p`` (the gather's sorted and unique hints).
  """
  window = layer.skeleton_window
  index = np.concatenate(
      [
          np.broadcast_to(
              np.asarray(window, np.int64), nodes.shape + (len(window),)
          ),
          (layer.skeleton_row + nodes)[..., None],
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


def in_skeleton(kernel: jax.Array, layer: LayerGeometry) -> jax.Array:
  """``K[t*, j mod n_in, j]`` for ``j < n_out``: in-skeleton entries."""
  if layer.diagonal:
    return kernel
  cols = np.arange(layer.n_out)
  return _column_entries(kernel, layer, (cols % layer.n_in)[:, None])[:, 0]


def out_skeleton(kernel: jax.Array, layer: LayerGeometry) -> jax.Array:
  """``K[t*, i, i mod n_out]`` for ``i < n_in``: out-skeleton entries.

  Column ``c`` holds those of rows ``c, c + n_out, ...``: read per column
  (``(n_out, P)``) and put back in row order.
  """
  if layer.diagonal:
    return kernel
  n_in, n_out = layer.n_in, layer.n_out
  per_column = -(-n_in // n_out)
  rows = np.arange(n_out)[:, None] + n_out * np.arange(per_column)[None, :]
  inside = rows < n_in
  # Rows past the last node read row 0 and are cut off after the transpose.
  entries = _column_entries(
      kernel, layer, np.where(inside, rows, 0), distinct=bool(inside.all())
  )
  return entries.T.reshape(-1)[:n_in]


def _skeleton_mask(layer: LayerGeometry, out_edges: bool) -> jax.Array:
  """Bool kernel-shaped mask of the in- (or out-) skeleton edges.

  The kernel keeps its own shape ``(*window, rows, n_out)``; input node ``i``
  at the skeleton tap is row ``skeleton_row + i``. Built from ``iota``
  comparisons, so nothing is materialised: XLA evaluates it inside the loop
  that uses it. Comparisons that are the identity are left out statically,
  which keeps the fused loops and their compile time small.
  """
  shape = layer.shape
  ndim = len(shape)
  # The skeleton edge of each row (out) or column (in) is a static table of
  # indices, compared with an iota; integer remainders computed per edge do
  # not vectorise on CPU and cost more than the rest of the update.
  if out_edges:  # row skeleton_row + i holds column i mod n_out; others none
    table = np.full((shape[-2],), -1, np.int64)
    i = np.arange(layer.n_in)
    table[layer.skeleton_row + i] = i % layer.n_out
    axis, other = ndim - 2, ndim - 1
  else:  # column j holds row skeleton_row + (j mod n_in)
    table = layer.skeleton_row + np.arange(layer.n_out) % layer.n_in
    axis, other = ndim - 1, ndim - 2
  index = jax.lax.broadcasted_iota(jnp.int32, shape, axis)
  if not np.array_equal(table, np.arange(len(table))):
    index = jax.lax.broadcast_in_dim(
        jnp.asarray(table, np.int32), shape, (axis,)
    )
  mask = jax.lax.broadcasted_iota(jnp.int32, shape, other) == index
  for window_axis, tap in enumerate(layer.skeleton_window):
    if shape[window_axis] > 1:
      tap_index = jax.lax.broadcasted_iota(jnp.int32, shape, window_axis)
      mask = mask & (tap_index == tap)
  return mask


def in_skeleton_mask(layer: LayerGeometry) -> jax.Array:
  """Bool array of the kernel's shape, True at in-skeleton positions."""
  if layer.diagonal:
    return jnp.ones(layer.shape, bool)
  return _skeleton_mask(layer, out_edges=False)


def out_skeleton_mask(layer: LayerGeometry) -> jax.Array:
  """Bool array of the kernel's shape, True at out-skeleton positions."""
  if layer.diagonal:
    return jnp.ones(layer.shape, bool)
  return _skeleton_mask(layer, out_edges=True)


def materialize(x: jax.Array) -> jax.Array:
  """``x`` itself, computed once into its own buffer before any consumer.

  XLA fuses cheap elementwise producers into their consumers, even through a
  broadcast: the per-node arithmetic of the skeleton sweeps would then be
  recomputed for every edge of the layer inside the update loop, which made
  that loop compute-bound at several times ``w - lr * g``. A gather cannot
  be fused that way, so an identity gather pins the vector to memory
  (``lax.optimization_barrier`` does not survive XLA:CPU's fusion passes).
  An array of higher rank is pinned row by row.
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


def broadcast_in(x: jax.Array, layer: LayerGeometry) -> jax.Array:
  """A per-input-node vector broadcast to the kernel's shape, not pinned.

  For the operand of a reduction: XLA:CPU's reduction kernels (YNNPACK)
  take a plain broadcast into the reduction, but a pinned vector's
  broadcast (:func:`along_in`) is written out at the kernel's full size.
  """
  if layer.diagonal:
    return x
  x = tile_to(x, layer.shape[-2])  # rows are position * n_in + node
  return jax.lax.broadcast_in_dim(x, layer.shape, (len(layer.shape) - 2,))


def broadcast_out(x: jax.Array, layer: LayerGeometry) -> jax.Array:
  """A per-output-node vector broadcast to the kernel's shape, not pinned."""
  if layer.diagonal:
    return x
  return jax.lax.broadcast_in_dim(x, layer.shape, (len(layer.shape) - 1,))


def along_in(
    x: jax.Array,
    layer: LayerGeometry,
    pin: Callable[[jax.Array], jax.Array] = materialize,
) -> jax.Array:
  """A per-input-node vector, pinned (:func:`materialize`, or ``pin``),
  broadcast to the kernel's shape: for elementwise loops over the kernel."""
  if layer.diagonal:
    return x
  if layer.shape[-2] != x.shape[0]:
    # Pinned before it is tiled too: else its arithmetic (a whole skeleton
    # sweep) is fused into the tile and redone for every row.
    x = tile_to(pin(x), layer.shape[-2])
  return broadcast_in(pin(x), layer)


def along_in_all(
    xs: Sequence[jax.Array],
    layer: LayerGeometry,
    pin: Callable[[jax.Array], jax.Array] = materialize,
) -> list[jax.Array]:
  """:func:`along_in` of several per-input-node vectors of one layer.

  A layer after a flatten reads each vector once per position, so each one
  is tiled over the kernel's rows and pinned at that size. Here the vectors
  are stacked and tiled together: one pinned ``(rows, len(xs))`` array
  instead of ``len(xs)`` pinned tiles, each of which cost a kernel that
  read an index table of the rows' length. Elsewhere the vectors are
  pinned one by one (``pin``), as :func:`along_in` does; stacking them
  there would only add a kernel.
  """
  rows = None if layer.diagonal else layer.shape[-2]
  if rows is None or len(xs) < 2 or rows == xs[0].shape[0]:
    return [along_in(x, layer, pin) for x in xs]
  tiled = materialize(tile_to(materialize(jnp.stack(xs, axis=1)), rows))
  return [broadcast_in(tiled[:, c], layer) for c in range(len(xs))]


def along_out(x: jax.Array, layer: LayerGeometry) -> jax.Array:
  """A per-output-node vector, pinned, broadcast to the kernel's shape."""
  if layer.diagonal:
    return x
  return broadcast_out(materialize(x), layer)


def row_sums(x: jax.Array, layer: LayerGeometry) -> jax.Array:
  """Sum over all edges leaving each input node of the layer."""
  if layer.diagonal:
    return x
  # Output nodes first (the contiguous minor axis), then taps over a small
  # (taps, n_in) array. Taps first, over (taps, n_in * n_out), hits a slow
  # path of XLA:CPU's reductions when n_in * n_out is large: a 3x3 conv of
  # 512 channels took 14 ms instead of 0.3 ms, a 7x7x512 -> 1000 head
  # 190 ms instead of 6.5 ms.
  x = jnp.sum(x, axis=-1)
  return jnp.sum(x.reshape(layer.taps, layer.n_in), axis=0)


def col_sums(x: jax.Array, layer: LayerGeometry) -> jax.Array:
  """Sum over all edges entering each output node of the layer."""
  if layer.diagonal:
    return x
  return jnp.sum(x, axis=tuple(range(x.ndim - 1)))


# ------------------------------------------------------- chain products ---


@dataclasses.dataclass(frozen=True)
class Skeleton:
  """Skeleton products of one chain, all as per-node vectors.

  ``B[k]`` (levels ``0..n-1``) and ``F[k]`` (levels ``1..n``, stored at index
  ``k``; ``F[0]`` is unused and None) as in ``g-space.md`` section 2;
  ``inv_B`` and ``inv_F`` their guarded reciprocals; ``a[k]`` the in-skeleton
  weights of layer ``k`` (index ``k-1``) and ``o[k]`` its out-skeleton weights.
  ``inv_S[k-1]`` is ``1/S_e`` over layer ``k``'s kernel
  (:func:`inv_skeleton_product`), built once per skeleton: the inverse chain
  rule and the weight allocation share one pinned copy of each factor. Two
  copies would cost one more kernel each, and, with hidden units sharded,
  one more all-gather of the pinned per-node vector each.
  """

  B: tuple[jax.Array, ...]
  F: tuple[Optional[jax.Array], ...]
  inv_B: tuple[jax.Array, ...]
  inv_F: tuple[Optional[jax.Array], ...]
  a: tuple[jax.Array, ...]
  o: tuple[jax.Array, ...]
  inv_S: tuple[jax.Array, ...]


def skeleton(geometry: ChainGeometry, views: Sequence[jax.Array]) -> Skeleton:
  """Computes ``B`` and ``F`` with one forward and one backward sweep."""
  layers = geometry.layers
  n = len(layers)
  widths = geometry.widths
  dtype = views[0].dtype
  a = tuple(in_skeleton(v, l) for v, l in zip(views, layers))
  o = tuple(out_skeleton(v, l) for v, l in zip(views, layers))
  B = [jnp.ones((widths[0],), dtype)]
  for k in range(1, n):
    B.append(a[k - 1] * tile_to(B[k - 1], widths[k]))
  F: list[Optional[jax.Array]] = [None] * (n + 1)
  F[n] = jnp.ones((widths[n],), dtype)
  for k in range(n, 1, -1):
    F[k - 1] = o[k - 1] * tile_to(F[k], widths[k - 1])
  inv_B = tuple(safe_reciprocal(b) for b in B)
  inv_F = (None,) + tuple(safe_reciprocal(f) for f in F[1:])
  inv_S = tuple(
      along_in(inv_B[k - 1], layer) * along_out(inv_F[k], layer)
      for k, layer in enumerate(layers, start=1)
  )
  return Skeleton(
      B=tuple(B), F=tuple(F), inv_B=inv_B, inv_F=inv_F, a=a, o=o, inv_S=inv_S
  )


def inv_skeleton_product(sk: Skeleton, k: int) -> jax.Array:
  """``1/S_e`` for every edge of layer ``k`` (1-based), broadcast.

  Both factors are finite, so the product is finite or overflows to Inf,
  which happens exactly when ``|S_e|`` is below ``1/finfo.max``. It is not
  guarded here: the entry guards of :func:`path_gradients` and
  :func:`allocate` see the resulting non-finite value with finite inputs and
  freeze the coordinate, as they do for a zero ``S_e`` (reciprocal 0).
  """
  return sk.inv_S[k - 1]


def skeleton_product(sk: Skeleton, k: int, layer: LayerGeometry) -> jax.Array:
  """``S_e = B(k-1, i) F(k, j)`` for every edge of layer ``k``, broadcast."""
  return along_in(sk.B[k - 1], layer) * along_out(sk.F[k], layer)


def in_skeleton_values(sk: Skeleton, k: int) -> jax.Array:
  """``v_s = B(k, j) F(k, j)`` of the in-skeleton edges of level ``k``."""
  return sk.B[k] * sk.F[k]


def free_in_skeleton(geometry: ChainGeometry, k: int) -> np.ndarray:
  """Static bool per node of level k: is its in-skeleton edge free?"""
  widths = geometry.widths
  if k < 2:
    return np.zeros((widths[k],), bool)
  return np.arange(widths[k]) < widths[k - 1]


def _has_own_in_skeleton(geometry: ChainGeometry, k: int) -> bool:
  """Does layer k (1-based) hold an in-skeleton edge that is not free?

  A free in-skeleton edge is also an out-skeleton edge of the same layer
  (``K_k[t*, j, j]`` for ``j`` below both widths), which the edge loops set
  to zero. Where every in-skeleton edge of a layer is free (equal widths,
  the common case), its per-node in-skeleton values would be computed and
  discarded: skipping them saves two selects per edge and their kernels.
  """
  return k < len(geometry.layers) and not free_in_skeleton(geometry, k).all()


# --------------------------------------------- inverse chain rule, §3 ---


def path_gradients(
    geometry: ChainGeometry,
    sk: Skeleton,
    views: Sequence[jax.Array],
    grads: Sequence[jax.Array],
    bias_grads: Sequence[Optional[jax.Array]],
) -> tuple[list[jax.Array], list[Optional[jax.Array]]]:
  """``dL/dv`` for every edge of the chain (0 at free weights).

  Coordinates that are not in-skeleton edges get ``g_e / S_e``; the
  in-skeleton edge ``s`` of hidden node ``(k, j)`` gets
  ``(phi_s - U(k, j)) / v_s`` with ``phi = w * g`` and ``U`` accumulated in
  one backward sweep of row sums (``g-space.md`` section 3).
  """
  layers = geometry.layers
  n = len(layers)
  widths = geometry.widths
  # R(k, j) and U(k, j) for hidden levels k = n-1 .. 1. D(k, j) is NaN where
  # U(k, j) includes the gradient of a damaged (NaN/Inf) free weight: a free
  # weight has no update of its own to carry the damage, so it is carried by
  # the nearest in-skeleton path gradient upstream. Any other damaged entry
  # carries it at its own position.
  U: list[Optional[jax.Array]] = [None] * n
  D: list[Optional[jax.Array]] = [None] * n
  for k in range(n - 1, 0, -1):
    nxt = layers[k]  # layer k+1
    g_o = out_skeleton(grads[k], nxt)
    D[k] = damage(sk.o[k], g_o)
    if nxt.diagonal:
      U[k] = jnp.zeros((widths[k],), views[k].dtype)
    else:
      U[k] = row_sums(views[k] * grads[k], nxt) - sk.o[k] * g_o
    if k < n - 1:
      U[k] = U[k] + pad_to(U[k + 1], widths[k])
      D[k] = D[k] + pad_to(D[k + 1], widths[k])
  # Guard 3 per entry: overflow from finite inputs freezes the entry; an
  # entry whose own inputs are damaged becomes NaN, which propagates.
  out, out_bias = [], []
  for k, layer in enumerate(layers, start=1):
    g = grads[k - 1]
    dtype = g.dtype
    p = (g * inv_skeleton_product(sk, k)).astype(dtype)
    p = freeze_non_finite(p, damage(g))
    if _has_own_in_skeleton(geometry, k):
      g_s = in_skeleton(g, layer)
      q = (sk.a[k - 1] * g_s - U[k]) * safe_reciprocal(
          in_skeleton_values(sk, k)
      )
      # Checked with D[k] too: a damaged free weight of a diagonal layer
      # (a BatchNorm scale) has no row sum to make U, hence q, non-finite.
      q = q.astype(dtype)
      q = freeze_non_finite(q, damage(g_s) + D[k], q + D[k])
      p = jnp.where(in_skeleton_mask(layer), along_out(q, layer), p)
    if k > 1:
      p = jnp.where(out_skeleton_mask(layer), jnp.zeros((), dtype), p)
    out.append(p)
    gb = bias_grads[k - 1]
    out_bias.append(
        None
        if gb is None
        else freeze_non_finite(gb * sk.inv_F[k], damage(gb))
    )
  return out, out_bias


# ------------------------------------------------ weight allocation, §4 ---


def allocate(
    geometry: ChainGeometry,
    sk: Skeleton,
    views: Sequence[jax.Array],
    path_updates: Sequence[jax.Array],
    bias_path_updates: Sequence[Optional[jax.Array]],
    min_ratio: Any,
) -> tuple[list[jax.Array], list[Optional[jax.Array]]]:
  """Weight updates ``w' - w`` that realise the path update ``dv``.

  With ``r = rho - 1`` (``rho(k, j) = B'(k, j) / B(k, j)``) built in one
  forward sweep, a coordinate of layer ``k`` moves by
  ``(dv / S - w r(k-1, i)) / (1 + r(k-1, i))``, which is
  ``(w + dv/S) / rho - w`` written without cancellation; an in-skeleton edge
  moves by ``w (r(k, j) - r(k-1, i)) / (1 + r(k-1, i))``; free weights do not
  move; a bias moves by ``dv_b / F(k, j)``.

  Guards (``g-space.md`` section 6, ``docs/singular_charts.md``): ``rho`` is
  clipped to ``[min_ratio, 1/eps]``, so an in-skeleton path value never
  reaches or crosses zero in one step, and ``r`` stays finite (a growth
  beyond ``1/eps`` leaves the old value below the new one's rounding). An
  entry whose new weight would not be finite is frozen (update 0) unless its
  own path update is NaN: an infinite path update (an inner optimizer that
  overflowed) is thus frozen or clipped, while NaN, which non-finite
  gradients become, propagates at its own position.
  """
  layers = geometry.layers
  n = len(layers)
  widths = geometry.widths
  dtype = views[0].dtype
  min_ratio = jnp.asarray(min_ratio, dtype)
  max_r = jnp.asarray(1 / jnp.finfo(dtype).eps - 1, dtype)
  r: list[jax.Array] = [jnp.zeros((widths[0],), dtype)]
  for k in range(1, n):
    free = free_in_skeleton(geometry, k)
    inherited = tile_to(r[k - 1], widths[k])
    if free.all():
      # Level k inherits rho. Where widths are equal this is the very array
      # of level k-1, so one pin (below) serves every such level.
      r.append(inherited)
      continue
    dv_s = in_skeleton(path_updates[k - 1], layers[k - 1])
    ratio = dv_s * safe_reciprocal(in_skeleton_values(sk, k))
    ratio = jnp.minimum(jnp.maximum(ratio, min_ratio - 1), max_r)
    if free.any():
      ratio = jnp.where(free, inherited, ratio)
    r.append(ratio)
  # 1/rho per node: one division per node instead of one per edge.
  inv_rho: list[Optional[jax.Array]] = [None]
  for k in range(1, n):
    same = k > 1 and r[k] is r[k - 1]
    inv_rho.append(inv_rho[k - 1] if same else 1 / (1 + r[k]))
  # Each vector is pinned once, however many layers read it. With hidden
  # units sharded, XLA's partitioner gathers a pinned vector once per pin:
  # a vector pinned again for every layer was all-gathered again.
  pins: dict[int, tuple[jax.Array, jax.Array]] = {}

  def pin(x: jax.Array) -> jax.Array:
    if id(x) not in pins:
      pins[id(x)] = (x, materialize(x))  # x kept alive: its id stays unique
    return pins[id(x)][1]

  out, out_bias = [], []
  for k, layer in enumerate(layers, start=1):
    w = views[k - 1]
    dv = path_updates[k - 1]
    if k == n:
      # In the last layer 1/S_e is one per-node factor (F = 1 at level n),
      # into which XLA folds the inner's last scale (the learning rate): a
      # NaN marker reading dv then reads the inner's output a second time,
      # and XLA writes the layer's whole update to memory when it is
      # expensive (Adam's divide; a classifier head can be most of the
      # parameters). So dv is read once: t = dv * (factor, or 1 where it is
      # 0) is NaN exactly where dv is, and d = t * (1, or 0 there) is
      # dv * factor bit for bit. The first layer has one factor too (B = 1
      # at level 0), but its update is written out anyway, for the gather
      # of its in-skeleton entries, so the split would only cost there.
      factor = sk.inv_B[k - 1]
      regular = factor != 0
      split = [jnp.where(regular, factor, 1.0), regular.astype(factor.dtype)]
    else:
      split = []
    # All per-input-node factors of this layer's loop, broadcast together.
    per_row = along_in_all(
        split + ([r[k - 1], inv_rho[k - 1]] if k > 1 else []), layer, pin
    )
    if k == n:
      t = dv * per_row[0]
      d = t * per_row[1]
    else:
      t = dv
      d = dv * inv_skeleton_product(sk, k)
    if k > 1:
      r_in, inv_rho_in = per_row[-2:]
      d = (d - w * r_in) * inv_rho_in
    if _has_own_in_skeleton(geometry, k):
      # In-skeleton edges, per node j (input node j mod n_in): one value per
      # column instead of a formula evaluated on every edge and discarded.
      if k > 1:
        d_s = sk.a[k - 1] * (r[k] - tile_to(r[k - 1], widths[k]))
        d_s = d_s * tile_to(inv_rho[k - 1], widths[k])
      else:
        d_s = sk.a[k - 1] * r[k]
      d = jnp.where(in_skeleton_mask(layer), along_out(d_s, layer), d)
    if k > 1:
      d = jnp.where(out_skeleton_mask(layer), 0.0, d)
    out.append(freeze_non_finite(d, nan_marker(t), w + d))
    dvb = bias_path_updates[k - 1]
    out_bias.append(
        None
        if dvb is None
        else freeze_non_finite(dvb * sk.inv_F[k], nan_marker(dvb))
    )
  return out, out_bias


def path_values(
    geometry: ChainGeometry,
    sk: Skeleton,
    views: Sequence[jax.Array],
    biases: Sequence[Optional[jax.Array]],
) -> tuple[list[jax.Array], list[Optional[jax.Array]]]:
  """``v_e = w_e S_e`` for every edge; a bias gets ``b F(k, j)``.

  Guard: for finite params, a value that overflows is saturated at the
  largest finite float of its sign, and ``0 * inf`` (a zero weight times an
  overflowed skeleton product) gives 0. A non-finite weight keeps a
  non-finite value.
  """
  def saturate(v, w):
    return jnp.where(jnp.isfinite(w), jnp.nan_to_num(v), v)

  out, out_bias = [], []
  for k, layer in enumerate(geometry.layers, start=1):
    w = views[k - 1]
    out.append(saturate(w * skeleton_product(sk, k, layer), w))
    b = biases[k - 1]
    out_bias.append(None if b is None else saturate(b * sk.F[k], b))
  return out, out_bias
