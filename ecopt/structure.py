"""Static chain geometry: each layer read as ``(taps, in, out)`` from shapes.

Everything here runs in Python on shapes and dtypes only, so it is evaluated
once at trace time under ``jit``; nothing depends on array values.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ecopt import spec as spec_lib

_MASKING_HINT = (
    " If the optimizer runs inside optax.masked or optax.partition, every"
    " layer of a chain must be inside the mask."
)


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


@dataclasses.dataclass(frozen=True)
class ChainGeometry:
  """The resolved layers of one chain."""

  chain: spec_lib.Chain
  layers: tuple[LayerGeometry, ...]

  @property
  def widths(self) -> tuple[int, ...]:
    """Node counts ``(h_0, ..., h_n)`` of the chain's levels."""
    return (self.layers[0].n_in,) + tuple(l.n_out for l in self.layers)

  @property
  def num_hidden(self) -> int:
    return sum(self.widths[1:-1])

  @property
  def num_edges(self) -> int:
    return sum(l.num_edges for l in self.layers)


@dataclasses.dataclass(frozen=True)
class Structure:
  """The params' leaves and the chains found among them."""

  paths: tuple[tuple[str, ...], ...]
  shapes: tuple[tuple[int, ...], ...]
  dtypes: tuple[Any, ...]
  chains: tuple[ChainGeometry, ...]

  @property
  def num_params(self) -> int:
    return sum(math.prod(s) for s in self.shapes)

  @property
  def num_hidden(self) -> int:
    return sum(c.num_hidden for c in self.chains)

  @property
  def dim(self) -> int:
    return self.num_params - self.num_hidden

  @property
  def chain_leaves(self) -> frozenset[int]:
    """Indices of the leaves (kernels and biases) that belong to a chain."""
    return frozenset(
        i
        for chain in self.chains
        for layer in chain.layers
        for i in (layer.kernel_index, layer.bias_index)
        if i is not None
    )


@dataclasses.dataclass(frozen=True)
class ParamsLayout:
  """Leaf paths and shapes of a params tree, kept as static pytree metadata.

  A pytree node without leaves (``jax.tree_util.register_static``): it lives
  in an optimizer state at no cost, is static under ``jit``, and checkpoint
  libraries skip it and restore it from the target state (orbax; and
  ``flax.serialization`` once flax is imported). ``update`` uses it to report
  a params tree that changed since ``init``.
  """

  paths: tuple[tuple[str, ...], ...]
  shapes: tuple[tuple[int, ...], ...]

  @classmethod
  def of(cls, structure: "Structure") -> "ParamsLayout":
    _register_flax_serialization()
    return cls(structure.paths, structure.shapes)

  def check(self, structure: "Structure") -> None:
    """Raises ValueError naming the leaves that differ from ``structure``."""
    _register_flax_serialization()
    if (self.paths, self.shapes) == (structure.paths, structure.shapes):
      return
    old = dict(zip(self.paths, self.shapes))
    new = dict(zip(structure.paths, structure.shapes))
    changes = [
        f"'{_fmt(p)}' had shape {old[p]} at init and has {new[p]} now"
        for p in structure.paths
        if p in old and old[p] != new[p]
    ]
    missing = [f"'{_fmt(p)}' {s}" for p, s in old.items() if p not in new]
    added = [f"'{_fmt(p)}' {s}" for p, s in new.items() if p not in old]
    if missing:
      changes.append("leaves gone: " + ", ".join(missing[:5]))
    if added:
      changes.append("new leaves: " + ", ".join(added[:5]))
    if not changes:
      changes.append("the leaves are in a different order")
    sharded = any(
        p in old and _is_local_shard(old[p], new[p]) for p in structure.paths
    )
    raise ValueError(
        "The params tree changed between init and update ("
        + "; ".join(changes)
        + "). "
        + (_SHARD_MAP_HINT if sharded else "Call init again with the new params.")
    )


_SHARD_MAP_HINT = (
    "The shapes shrank by whole factors, as for local shards inside"
    " jax.shard_map (or pmap) with hidden units split across devices: G-space"
    " couples every node of a chain, so the update must see whole chains, and"
    " G-SGD on each local sub-network would be silently wrong. Shard with"
    " jax.jit instead, e.g. params = jax.device_put(params,"
    " NamedSharding(mesh, PartitionSpec(None, 'model'))) and"
    " jax.jit(optimizer.update): ecopt then sees global shapes and XLA"
    " partitions the update; or replicate each chain's parameters inside"
    " shard_map."
)


def _is_local_shard(old: tuple[int, ...], new: tuple[int, ...]) -> bool:
  """True when ``new`` divides ``old`` axis by axis and is smaller."""
  return (
      len(old) == len(new)
      and old != new
      and all(n > 0 and o % n == 0 for o, n in zip(old, new))
  )


jax.tree_util.register_static(ParamsLayout)


def _register_flax_serialization() -> None:
  """Lets flax.serialization skip ParamsLayout (restored from the target).

  Done lazily so ecopt does not import flax; every Flax user has imported it
  by the time an optimizer state exists.
  """
  global _FLAX_REGISTERED
  if _FLAX_REGISTERED or "flax.serialization" not in sys.modules:
    return
  sys.modules["flax.serialization"].register_serialization_state(
      ParamsLayout,
      lambda layout: {},
      lambda layout, state: layout,
      override=True,
  )
  _FLAX_REGISTERED = True


_FLAX_REGISTERED = False


def _shape_dtype(leaf: Any) -> tuple[tuple[int, ...], Any]:
  shape = tuple(getattr(leaf, "shape", np.shape(leaf)))
  dtype = getattr(leaf, "dtype", None)
  if dtype is None:
    dtype = np.result_type(leaf)
  return shape, np.dtype(dtype)


def _fmt(path: tuple[str, ...]) -> str:
  return "/".join(path)


def _find_leaf(
    layer: str,
    prefix: tuple[str, ...],
    name: str,
    paths: Sequence[tuple[str, ...]],
) -> Optional[int]:
  """Index of the unique leaf ``prefix/name[/...]``, or None."""
  key = prefix + (name,)
  hits = [i for i, p in enumerate(paths) if p[: len(key)] == key]
  if len(hits) > 1:
    raise ValueError(
        f"Layer '{layer}': '{name}' is not a single array; found"
        f" {[_fmt(paths[i]) for i in hits]}."
    )
  return hits[0] if hits else None


def layer_leaves(
    entry: spec_lib.Layer,
    paths: Sequence[tuple[str, ...]],
    shapes: Sequence[tuple[int, ...]],
    where: str = "",
) -> tuple[int, Optional[int], bool]:
  """The leaves of one layer: ``(kernel index, bias index, diagonal)``.

  The one lookup from a spec entry to leaves, used by ``resolve`` and by
  ``ecopt.discovery``. A plain entry's kernel is its ``kernel`` leaf, else a
  ``scale`` leaf (diagonal); ``Layer.kernel``/``Layer.bias`` name others.
  """
  layer, prefix = entry.name, entry.path
  if not any(p[: len(prefix)] == prefix for p in paths):
    tops = sorted({_fmt(p[:-1]) for p in paths if len(p) > 1})
    raise ValueError(
        f"Layer '{layer}'{where} is not in the params; layers with"
        f" parameters are: {tops[:20]}{' ...' if len(tops) > 20 else ''}."
        + _MASKING_HINT
    )
  if entry.kernel is not None:
    names = (entry.kernel,)
  else:
    names = ("scale",) if entry.kind == "scale" else ("kernel", "scale")
  kernel = None
  if entry.kernel is None and entry.kind != "auto" and prefix in paths:
    # An explicit entry may name a bare leaf (a params dict {"w1": array}).
    return paths.index(prefix), None, entry.kind == "scale"
  for name in names:
    kernel = _find_leaf(layer, prefix, name, paths)
    if kernel is not None:
      break
  diagonal = entry.kind == "scale" or (
      entry.kind == "auto" and entry.kernel is None and name == "scale"
  )
  found = [
      f"{_fmt(p[len(prefix):])} {shapes[i]}"
      for i, p in enumerate(paths)
      if p[: len(prefix)] == prefix
  ]
  if kernel is None:
    if prefix in paths:
      raise ValueError(
          f"Layer '{layer}'{where} names a single parameter (shape"
          f" {shapes[paths.index(prefix)]}), not a layer; name the module that"
          f" holds it, e.g. '{_fmt(prefix[:-1])}'."
      )
    wanted = " nor ".join(repr(n) for n in names)
    raise ValueError(
        f"Layer '{layer}'{where} has no {wanted} leaf; its leaves are {found}."
        " Name them with ecopt.Layer(path, kernel=..., bias=...), or let"
        " ecopt.infer_spec find them."
    )
  bias = None if entry.bias is None else _find_leaf(layer, prefix, entry.bias, paths)
  if bias is None and entry.bias not in (None, "bias"):
    raise ValueError(
        f"Layer '{layer}'{where} has no bias leaf '{entry.bias}'; its leaves"
        f" are {found}."
    )
  return kernel, bias, diagonal


def read_layer(
    entry: spec_lib.Layer,
    paths: Sequence[tuple[str, ...]],
    shapes: Sequence[tuple[int, ...]],
) -> tuple[int, Optional[int], LayerGeometry]:
  """How ``entry`` reads the params on its own: leaves and geometry.

  Two entries with equal readings are the same layer to ``g_space``.
  """
  kernel, bias, diagonal = layer_leaves(entry, paths, shapes)
  geometry = _layer_geometry(entry, shapes[kernel], diagonal, None, bias is not None)
  return kernel, bias, dataclasses.replace(geometry, name="")


def resolve(params: Any, spec: spec_lib.Spec) -> Structure:
  """Resolves a spec against a params pytree, validating it.

  Args:
    params: a params pytree (dict, FrozenDict, ``nnx.State``), possibly with
      ``optax.MaskedNode`` leaves.
    spec: an ``ecopt.Chain`` or a sequence of them.

  Returns:
    The static ``Structure``.

  Raises:
    ValueError: naming the layer and the shapes, for an unknown layer path, a
      layer without ``kernel``, an unsupported or ambiguous kernel layout,
      non-float parameters, sizes that do not chain, or a parameter in two
      chains.
  """
  chains = spec_lib.as_chains(spec)
  paths, leaves, _ = spec_lib.flatten_with_names(params)
  shapes, dtypes = [], []
  for leaf in leaves:
    shape, dtype = _shape_dtype(leaf)
    shapes.append(shape)
    dtypes.append(dtype)
  owner: dict[int, str] = {}
  geometries = []
  for chain in chains:
    layers = []
    for entry in chain.entries:
      layer = entry.name
      kernel, bias, diagonal = layer_leaves(entry, paths, shapes, f" of {chain!r}")
      for index, role in ((kernel, "kernel"), (bias, "bias")):
        if index is None:
          continue
        if not jnp.issubdtype(dtypes[index], jnp.floating):
          raise ValueError(
              f"Layer '{layer}': {role} has dtype {dtypes[index]} with shape"
              f" {shapes[index]}; G-space needs floating-point parameters."
          )
        if index in owner:
          raise ValueError(
              f"Parameter '{_fmt(paths[index])}' (shape {shapes[index]}) of"
              f" layer '{layer}' is in two chains: {owner[index]} and"
              f" {chain!r}. Each parameter belongs to at most one chain."
          )
        owner[index] = repr(chain)
      previous = layers[-1] if layers else None
      geometry = _layer_geometry(
          entry, shapes[kernel], diagonal, previous, bias is not None
      )
      if bias is not None and shapes[bias] not in _bias_shapes(geometry, entry):
        raise ValueError(
            f"Layer '{layer}': bias shape {shapes[bias]} does not match its"
            f" {'scale' if diagonal else 'kernel'} shape {shapes[kernel]}"
            f" (expected {' or '.join(map(str, _bias_shapes(geometry, entry)))})."
            + (_declare_hint(entry) if len(shapes[kernel]) > 2 else "")
        )
      layers.append(
          dataclasses.replace(geometry, kernel_index=kernel, bias_index=bias)
      )
    geometries.append(ChainGeometry(chain, tuple(layers)))
  return Structure(tuple(paths), tuple(shapes), tuple(dtypes), tuple(geometries))


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


def _layer_geometry(
    entry: spec_lib.Layer,
    shape: tuple[int, ...],
    diagonal: bool,
    previous: Optional[LayerGeometry],
    has_bias: bool,
) -> LayerGeometry:
  """Reads one layer as ``(taps, n_in, n_out)`` from its shape and entry."""
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
