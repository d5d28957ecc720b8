"""Static chain geometry: a spec resolved against a params tree's leaves.

``resolve`` finds each spec entry's kernel and bias leaves, checks that they
are floating point, belong to one chain only and chain in size, and records
the result as a ``Structure``; how one kernel is read as ``(taps, in, out)``
lives in :mod:`ecopt.layer_geometry`. Everything here runs in Python on
shapes and dtypes only, so it is evaluated once at trace time under ``jit``;
nothing depends on array values.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

from ecopt import spec as spec_lib
from ecopt.layer_geometry import LayerGeometry, check_bias_shape, kernel_geometry

_MASKING_HINT = (
    " If the optimizer runs inside optax.masked or optax.partition, every"
    " layer of a chain must be inside the mask."
)


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
  geometry = kernel_geometry(entry, shapes[kernel], diagonal, None, bias is not None)
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
      geometry = kernel_geometry(
          entry, shapes[kernel], diagonal, previous, bias is not None
      )
      if bias is not None:
        check_bias_shape(entry, geometry, shapes[bias])
      layers.append(
          dataclasses.replace(geometry, kernel_index=kernel, bias_index=bias)
      )
    geometries.append(ChainGeometry(chain, tuple(layers)))
  return Structure(tuple(paths), tuple(shapes), tuple(dtypes), tuple(geometries))
