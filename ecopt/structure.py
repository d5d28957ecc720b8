"""Static chain geometry: each layer read as ``(taps, in, out)`` from shapes.

Everything here runs in Python on shapes and dtypes only, so it is evaluated
once at trace time under ``jit``; nothing depends on array values.
"""

from __future__ import annotations

import dataclasses
import math
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
    shape: the kernel leaf's own shape.
  """

  name: str
  kernel_index: int
  bias_index: Optional[int]
  diagonal: bool
  taps: int
  n_in: int
  n_out: int
  shape: tuple[int, ...]

  @property
  def skeleton_tap(self) -> int:
    return (self.taps - 1) // 2

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
    window = self.shape[:-2]
    if not window:
      return ()
    flat = self.skeleton_tap // self.positions
    return tuple(int(i) for i in np.unravel_index(flat, window))

  @property
  def skeleton_row(self) -> int:
    """Row of input node 0 at the skeleton tap (``position * n_in``)."""
    return (self.skeleton_tap % self.positions) * self.n_in

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
    raise ValueError(
        "The params tree changed between init and update ("
        + "; ".join(changes)
        + "). Call init again with the new params."
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
      layer without ``kernel``, an unsupported kernel rank, non-float
      parameters, sizes that do not chain, or a parameter in two chains.
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
    for position, layer in enumerate(chain.layers):
      prefix = spec_lib.layer_key(layer)
      if not any(p[: len(prefix)] == prefix for p in paths):
        tops = sorted({_fmt(p[:-1]) for p in paths if len(p) > 1})
        raise ValueError(
            f"Layer '{layer}' of {chain!r} is not in the params; layers with"
            f" parameters are: {tops[:20]}{' ...' if len(tops) > 20 else ''}."
            + _MASKING_HINT
        )
      kernel = _find_leaf(layer, prefix, "kernel", paths)
      diagonal = False
      if kernel is None:
        kernel = _find_leaf(layer, prefix, "scale", paths)
        diagonal = kernel is not None
      if kernel is None:
        if prefix in paths:
          index = paths.index(prefix)
          raise ValueError(
              f"Layer '{layer}' of {chain!r} names a single parameter (shape"
              f" {shapes[index]}), not a layer; name the module that holds"
              f" it, e.g. '{_fmt(prefix[:-1])}'."
          )
        found = [
            f"{_fmt(p[len(prefix):])} {shapes[i]}"
            for i, p in enumerate(paths)
            if p[: len(prefix)] == prefix
        ]
        raise ValueError(
            f"Layer '{layer}' of {chain!r} has no 'kernel' (nor a BatchNorm"
            f" 'scale'); its leaves are {found}."
        )
      bias = _find_leaf(layer, prefix, "bias", paths)
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
      shape = shapes[kernel]
      previous = layers[-1] if layers else None
      geometry = _layer_geometry(layer, shape, diagonal, previous)
      if bias is not None and shapes[bias] != (geometry.n_out,):
        raise ValueError(
            f"Layer '{layer}': bias shape {shapes[bias]} does not match its"
            f" {'scale' if diagonal else 'kernel'} shape {shape} (expected"
            f" ({geometry.n_out},))."
        )
      layers.append(
          dataclasses.replace(geometry, kernel_index=kernel, bias_index=bias)
      )
    geometries.append(ChainGeometry(chain, tuple(layers)))
  return Structure(tuple(paths), tuple(shapes), tuple(dtypes), tuple(geometries))


def _layer_geometry(
    layer: str,
    shape: tuple[int, ...],
    diagonal: bool,
    previous: Optional[LayerGeometry],
) -> LayerGeometry:
  """Reads one layer as ``(taps, n_in, n_out)`` from its shape."""
  prev_out = previous.n_out if previous is not None else None
  where = (
      f"layer '{layer}' (shape {shape}) after layer '{previous.name}' (shape"
      f" {previous.shape}, {prev_out} output nodes)"
      if previous is not None
      else f"layer '{layer}' (shape {shape})"
  )
  if diagonal:
    if len(shape) != 1:
      raise ValueError(
          f"Layer '{layer}': a BatchNorm 'scale' must be 1-D, got shape {shape}."
      )
    if prev_out is not None and shape[0] != prev_out:
      raise ValueError(f"Sizes do not chain: {where}; a scale needs {prev_out}.")
    return LayerGeometry(layer, -1, None, True, 1, shape[0], shape[0], shape)
  if len(shape) < 2 or len(shape) > 5:
    raise ValueError(
        f"Layer '{layer}': unsupported kernel rank {len(shape)} (shape"
        f" {shape}); expected a Dense kernel (in, out) or a 1-3D conv kernel"
        " (*window, in, out)."
    )
  if any(d == 0 for d in shape):
    raise ValueError(f"Layer '{layer}': empty kernel of shape {shape}.")
  n_in, n_out = shape[-2], shape[-1]
  taps = math.prod(shape[:-2])
  if prev_out is not None and n_in != prev_out:
    if len(shape) == 2 and n_in % prev_out == 0:
      # A Dense layer after a channels-last flatten of a (..., C) feature map:
      # row index = position * C + channel, so (P*C, out) -> (P, C, out).
      taps, n_in = n_in // prev_out, prev_out
    else:
      raise ValueError(
          f"Sizes do not chain: {where} expects {n_in} input"
          f" {'features' if len(shape) == 2 else 'channels'}."
          + (
              " A Dense input size must equal the previous layer's outputs or"
              " be a multiple of them (a channels-last flatten)."
              if len(shape) == 2
              else ""
          )
      )
  return LayerGeometry(layer, -1, None, False, taps, n_in, n_out, shape)
