"""One chain layer's geometry: how its kernel is read as ``(taps, in, out)``.

A layer's reading comes from its spec entry and its kernel's shape alone:
which leaf axes are the window, the input and the output features, whether a
Dense kernel follows a channels-last flatten, and whether a rank >= 3 kernel
is too ambiguous to read without a declaration. Shapes only, so this runs once
at trace time under ``jit``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

import numpy as np

from ecopt import spec as spec_lib


@dataclasses.dataclass(frozen=True)
class LayerGeometry:
  """How one chain layer is read: ``K[t, i, j]`` with ``taps`` taps.

  Attributes:
    name: the layer path as written in the spec.
    kernel_index: position of the kernel (or BatchNorm ``scale``) leaf in the
      flattened params.
    bias_index: position of the bias leaf, or ``None``.
    diagonal: True for a per-node affine scale (BatchNorm), one edge per node.
    taps: number of taps ``T`` (1 for Dense, ``kh*kw`` for a 2-D conv,
      ``Y*X`` for a Dense after a channels-last flatten).
    n_in: nodes of the level before the layer.
    n_out: nodes of the level after the layer.
    shape: the kernel's canonical shape ``(*window, rows, n_out)`` (``(n,)``
      if diagonal), which the array code works on.
    leaf_shape: the kernel leaf's own shape.
    permutation: the transpose taking the leaf to the canonical axis order
      (window, input-feature, output-feature axes), or ``None``; a reshape to
      ``shape`` follows. For an ordinary Dense or Flax conv kernel both are
      identities and no operation is emitted.
  """

  name: str
  kernel_index: int
  bias_index: Optional[int]
  diagonal: bool
  taps: int
  n_in: int
  n_out: int
  shape: tuple[int, ...]
  leaf_shape: tuple[int, ...] = ()
  permutation: Optional[tuple[int, ...]] = None

  @property
  def canonical(self) -> bool:
    """True when the leaf already has the canonical layout."""
    return self.permutation is None and self.leaf_shape == self.shape

  @property
  def skeleton_tap(self) -> int:
    """Flat index of the skeleton tap ``t*`` in the ``(taps, ...)`` view.

    The centre of the window in every dimension (``docs/g-space.md`` §2):
    ``(k_1//2, ..., k_d//2)`` of a conv window, and position ``P//2`` of a
    flatten head's ``P`` positions (read as a one-dimensional window).
    """
    window = self.shape[:-2] if not self.diagonal else ()
    flat = int(np.ravel_multi_index(self.skeleton_window, window)) if window else 0
    return flat * self.positions + self.positions // 2

  @property
  def view_shape(self) -> tuple[int, ...]:
    """The ``(taps, n_in, n_out)`` reading of the kernel (``(n,)`` if diagonal).

    The array code works on the kernel in its own ``shape`` (reshaping a
    kernel would cost XLA its in-place update); this is the shape it stands
    for.
    """
    return (self.n_out,) if self.diagonal else (self.taps, self.n_in, self.n_out)

  @property
  def positions(self) -> int:
    """Input positions per node along the kernel's row axis (flatten: ``P``)."""
    return 1 if self.diagonal else self.shape[-2] // self.n_in

  @property
  def skeleton_window(self) -> tuple[int, ...]:
    """Index of the skeleton tap in the kernel's leading (window) axes."""
    return tuple(k // 2 for k in self.shape[:-2]) if not self.diagonal else ()

  @property
  def skeleton_row(self) -> int:
    """Row of input node 0 at the skeleton tap (``position * n_in``)."""
    return (self.positions // 2) * self.n_in

  @property
  def num_edges(self) -> int:
    kernel = self.n_out if self.diagonal else self.taps * self.n_in * self.n_out
    return kernel + (self.n_out if self.bias_index is not None else 0)


def check_bias_shape(
    entry: spec_lib.Layer, geometry: LayerGeometry, bias_shape: tuple[int, ...]
) -> None:
  """Raises ValueError unless ``bias_shape`` fits the layer's output nodes."""
  fits = _bias_shapes(geometry, entry)
  if bias_shape in fits:
    return
  raise ValueError(
      f"Layer '{entry.name}': bias shape {bias_shape} does not match its"
      f" {'scale' if geometry.diagonal else 'kernel'} shape {geometry.leaf_shape}"
      f" (expected {' or '.join(map(str, fits))})."
      + (_declare_hint(entry) if len(geometry.leaf_shape) > 2 else "")
  )


def _bias_shapes(geometry: LayerGeometry, entry: spec_lib.Layer) -> list[tuple[int, ...]]:
  """Bias leaf shapes that fit: ``(n_out,)``, or the output-feature axes."""
  shapes = [(geometry.n_out,)]
  if geometry.diagonal:
    shapes.append(geometry.leaf_shape)
  elif geometry.permutation is not None or geometry.leaf_shape != geometry.shape:
    out_axes = _normalized_axes(entry, len(geometry.leaf_shape))[2]
    shapes.append(tuple(geometry.leaf_shape[a] for a in out_axes))
  return list(dict.fromkeys(shapes))


# A rank >= 3 kernel under such a name is a DenseGeneral/Einsum/attention
# projection far more often than a convolution: its shape alone cannot say.
_DENSE_STYLE = re.compile(
    r"dense|einsum|linear|query|key|value|proj|attn|attention|^out$|^fc|mlp",
    re.IGNORECASE,
)
_CONV_STYLE = re.compile(r"conv", re.IGNORECASE)


def _normalized_axes(
    entry: spec_lib.Layer, rank: int
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
  """``(window, in, out)`` leaf axes of a dense or conv kernel of ``rank``."""
  def norm(axes):
    return None if axes is None else tuple(a % rank if -rank <= a < rank else rank for a in axes)

  in_axes, out_axes = norm(entry.in_axes), norm(entry.out_axes)
  if entry.kind == "dense" and rank > 2 and in_axes is None and out_axes is None:
    raise ValueError(
        f"Layer '{entry.name}': a dense kernel of rank {rank} needs in_axes or"
        " out_axes (e.g. in_axes=(0,), out_axes=(1, 2) for a DenseGeneral"
        " kernel (in, heads, dim))."
    )
  if entry.kind == "dense":
    rest = lambda used: tuple(a for a in range(rank) if a not in used)
    in_axes = rest(out_axes) if in_axes is None else in_axes
    out_axes = rest(in_axes) if out_axes is None else out_axes
  else:
    in_axes = (rank - 2,) if in_axes is None else in_axes
    out_axes = (rank - 1,) if out_axes is None else out_axes
  used = in_axes + out_axes
  if any(a >= rank for a in used) or len(set(used)) != len(used):
    raise ValueError(
        f"Layer '{entry.name}': in_axes {entry.in_axes} and out_axes"
        f" {entry.out_axes} must be distinct axes of its rank-{rank} kernel."
    )
  window = tuple(a for a in range(rank) if a not in used)
  if entry.kind == "dense" and window:
    raise ValueError(
        f"Layer '{entry.name}': a dense kernel's axes must all be input or"
        f" output features; axes {window} are neither (kind='conv' reads them"
        " as the window)."
    )
  return window, in_axes, out_axes


def _check_unambiguous(entry: spec_lib.Layer, shape: tuple[int, ...], has_bias: bool):
  """Refuses a plain entry whose rank >= 3 kernel may not be a Flax conv."""
  if entry.kind != "auto" or len(shape) < 3:
    return
  module = entry.path[-1]
  if _CONV_STYLE.search(module):
    return
  dense_style = _DENSE_STYLE.search(module)
  # A bias-free rank-3 kernel is a 1-D conv or stacked members (members, in,
  # out); rank 4 and 5 bias-free kernels are 2-D/3-D convs in practice.
  if not dense_style and (has_bias or len(shape) > 3):
    return
  why = (
      "its name is dense-style (a DenseGeneral, Einsum or attention projection"
      " kernel is rank >= 3 too)"
      if dense_style
      else "it has no bias (stacked members (members, in, out) look the same)"
  )
  raise ValueError(
      f"Layer '{entry.name}': the kernel of shape {shape} is ambiguous from its"
      f" shape alone: a Flax conv (*window, in, out), or not, as {why}."
      + _declare_hint(entry)
  )


def _declare_hint(entry: spec_lib.Layer) -> str:
  if entry.kind != "auto":
    return ""
  return (
      f" Declare it: ecopt.Layer({entry.name!r}, kind='conv') for a"
      f" convolution, or ecopt.Layer({entry.name!r}, kind='dense',"
      " in_axes=(0,), out_axes=(1, 2)) for a DenseGeneral kernel (in, heads,"
      " dim); or let ecopt.infer_spec read the layer from the computation."
      " Stacked members (a batched contraction) are not one chain layer: leave"
      " them out of the spec or give each member its own params entry."
  )


def kernel_geometry(
    entry: spec_lib.Layer,
    shape: tuple[int, ...],
    diagonal: bool,
    previous: Optional[LayerGeometry],
    has_bias: bool,
) -> LayerGeometry:
  """Reads one layer as ``(taps, n_in, n_out)`` from its kernel shape and entry.

  Args:
    entry: the layer's spec entry (its kind and declared axes).
    shape: the kernel (or BatchNorm ``scale``) leaf's shape.
    diagonal: whether the leaf is a per-node scale.
    previous: the chain's preceding layer, whose outputs this one must take.
    has_bias: whether the layer has a bias leaf (a bias-free rank-3 kernel is
      ambiguous).

  Returns:
    The layer's ``LayerGeometry``, with ``kernel_index`` and ``bias_index``
    still unset (-1 and None).

  Raises:
    ValueError: naming the layer and shapes, for an empty, unsupported or
      ambiguous kernel, or sizes that do not chain to ``previous``.
  """
  layer = entry.name
  prev_out = previous.n_out if previous is not None else None
  where = (
      f"layer '{layer}' (shape {shape}) after layer '{previous.name}' (shape"
      f" {previous.leaf_shape}, {prev_out} output nodes)"
      if previous is not None
      else f"layer '{layer}' (shape {shape})"
  )
  if any(d == 0 for d in shape):
    raise ValueError(f"Layer '{layer}': empty kernel of shape {shape}.")
  if diagonal:
    if len(shape) != 1 and entry.kind != "scale":
      raise ValueError(
          f"Layer '{layer}': a normalisation 'scale' must be 1-D, got shape"
          f" {shape} (declare kind='scale' to read it flattened)."
      )
    n = math.prod(shape)
    if prev_out is not None and n != prev_out:
      raise ValueError(f"Sizes do not chain: {where}; a scale needs {prev_out}.")
    return LayerGeometry(layer, -1, None, True, 1, n, n, (n,), shape)
  if len(shape) < 2 or (entry.kind == "auto" and len(shape) > 5):
    raise ValueError(
        f"Layer '{layer}': unsupported kernel rank {len(shape)} (shape"
        f" {shape}); expected a Dense kernel (in, out) or a 1-3D conv kernel"
        " (*window, in, out), or an ecopt.Layer declaring its axes."
    )
  _check_unambiguous(entry, shape, has_bias)
  window, in_axes, out_axes = _normalized_axes(entry, len(shape))
  order = window + in_axes + out_axes
  n_in = math.prod(shape[a] for a in in_axes)
  n_out = math.prod(shape[a] for a in out_axes)
  canonical = tuple(shape[a] for a in window) + (n_in, n_out)
  permutation = None if order == tuple(range(len(shape))) else order
  taps = math.prod(shape[a] for a in window)
  if prev_out is not None and n_in != prev_out:
    if not window and n_in % prev_out == 0:
      # A Dense layer after a channels-last flatten of a (..., C) feature map:
      # row index = position * C + channel, so (P*C, out) -> (P, C, out).
      taps, n_in = n_in // prev_out, prev_out
    else:
      raise ValueError(
          f"Sizes do not chain: {where} expects {n_in} input"
          f" {'channels' if window else 'features'}."
          + (
              ""
              if window
              else " A Dense input size must equal the previous layer's outputs"
              " or be a multiple of them (a channels-last flatten)."
          )
      )
  return LayerGeometry(
      layer, -1, None, False, taps, n_in, n_out, canonical, shape, permutation
  )
