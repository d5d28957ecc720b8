"""Moving chain layers between a params pytree and per-layer views."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from ecopt import paths as paths_lib
from ecopt import spec as spec_lib
from ecopt import structure as structure_lib
from ecopt.structure import ChainGeometry, Structure


def flat(tree: Any) -> tuple[list[Any], Any]:
  """Leaves and treedef of a pytree (MaskedNode leaves vanish)."""
  return jax.tree_util.tree_flatten(tree)


def check_same_layout(
    structure: Structure, tree: Any, what: str, reference: str = "params"
) -> list[Any]:
  """Leaves of ``tree`` after checking they match ``structure`` leaf by leaf."""
  paths, leaves, _ = spec_lib.flatten_with_names(tree)
  if tuple(paths) != structure.paths:
    missing = sorted(set(structure.paths) - set(paths))
    extra = sorted(set(paths) - set(structure.paths))
    raise ValueError(
        f"The {what} tree does not match the {reference} tree: missing"
        f" {['/'.join(p) for p in missing][:5]}, unexpected"
        f" {['/'.join(p) for p in extra][:5]}."
    )
  for path, leaf, shape in zip(paths, leaves, structure.shapes):
    if tuple(jnp.shape(leaf)) != shape:
      raise ValueError(
          f"Leaf '{'/'.join(path)}' has shape {tuple(jnp.shape(leaf))} in the"
          f" {what} but {shape} in the {reference}."
      )
  return leaves


def chain_views(
    geometry: ChainGeometry, leaves: Sequence[Any]
) -> tuple[list[jax.Array], list[Optional[jax.Array]]]:
  """Kernels and biases of one chain, in the compute dtype.

  Kernels keep their own shapes (``ecopt.paths`` reads them as
  ``(taps, in, out)`` through ``LayerGeometry``): a reshape here would make
  XLA copy every updated kernel instead of writing it in place. The compute
  dtype is float32 for 16-bit parameters.
  """
  dtype = paths_lib.compute_dtype(leaves[geometry.layers[0].kernel_index].dtype)
  views, biases = [], []
  for layer in geometry.layers:
    kernel = jnp.asarray(leaves[layer.kernel_index])
    views.append(kernel.astype(dtype))
    if layer.bias_index is None:
      biases.append(None)
    else:
      biases.append(jnp.asarray(leaves[layer.bias_index]).astype(dtype))
  return views, biases


def write_chain(
    geometry: ChainGeometry,
    out: list[Any],
    like: Sequence[Any],
    views: Sequence[jax.Array],
    biases: Sequence[Optional[jax.Array]],
) -> None:
  """Writes per-layer results into ``out``, with the shapes/dtypes of ``like``."""
  for layer, view, bias in zip(geometry.layers, views, biases):
    ref = like[layer.kernel_index]
    out[layer.kernel_index] = view.astype(ref.dtype)
    if layer.bias_index is not None and bias is not None:
      ref = like[layer.bias_index]
      out[layer.bias_index] = bias.astype(ref.dtype)


ChainFn = Callable[
    [ChainGeometry, list, list],
    tuple[Sequence[jax.Array], Sequence[Optional[jax.Array]]],
]


def map_chains(params: Any, spec: spec_lib.Spec, fn: ChainFn) -> Any:
  """Applies ``fn(geometry, views, biases) -> (views, biases)`` to each chain.

  Leaves outside every chain are returned unchanged.
  """
  structure = structure_lib.resolve(params, spec)
  leaves, treedef = flat(params)
  out = list(leaves)
  for geometry in structure.chains:
    views, biases = chain_views(geometry, leaves)
    new_views, new_biases = fn(geometry, views, biases)
    write_chain(geometry, out, leaves, new_views, new_biases)
  return jax.tree_util.tree_unflatten(treedef, out)
