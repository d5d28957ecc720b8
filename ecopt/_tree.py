"""Moving chain layers between a params pytree and per-layer views."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ecopt import numerics
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

  Kernels come in the canonical layout ``(*window, rows, n_out)`` of
  ``LayerGeometry.shape`` (``ecopt.paths`` reads it as ``(taps, in, out)``).
  An ordinary Dense or Flax conv kernel already has it and is passed as it
  is: a reshape here would make XLA copy every updated kernel instead of
  writing it in place. Other layouts (``DenseGeneral``, ``Einsum``) are
  transposed and reshaped, and ``write_chain`` undoes it. Biases are 1-D.
  The compute dtype is float32 for 16-bit parameters.
  """
  dtype = numerics.compute_dtype(leaves[geometry.layers[0].kernel_index].dtype)
  views, biases = [], []
  for layer in geometry.layers:
    kernel = to_canonical(layer, jnp.asarray(leaves[layer.kernel_index]))
    views.append(kernel.astype(dtype))
    if layer.bias_index is None:
      biases.append(None)
    else:
      bias = jnp.asarray(leaves[layer.bias_index])
      bias = bias if bias.ndim == 1 else bias.reshape(-1)
      biases.append(bias.astype(dtype))
  return views, biases


def to_canonical(layer: structure_lib.LayerGeometry, kernel: jax.Array) -> jax.Array:
  """A kernel leaf in the canonical layout ``layer.shape``.

  For an ordinary Dense or Flax conv kernel the leaf already has that layout
  and no operation is emitted, so XLA keeps updating it in place.
  """
  if layer.permutation is not None:
    kernel = jnp.transpose(kernel, layer.permutation)
  return kernel if kernel.shape == layer.shape else kernel.reshape(layer.shape)


def to_leaf(layer: structure_lib.LayerGeometry, view: jax.Array) -> jax.Array:
  """Inverse of :func:`to_canonical`: a canonical-layout array as the leaf."""
  if layer.canonical:
    return view
  if layer.permutation is None:
    return view.reshape(layer.leaf_shape)
  permuted = tuple(layer.leaf_shape[a] for a in layer.permutation)
  inverse = tuple(int(i) for i in np.argsort(layer.permutation))
  return jnp.transpose(view.reshape(permuted), inverse)


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
    out[layer.kernel_index] = to_leaf(layer, view).astype(ref.dtype)
    if layer.bias_index is not None and bias is not None:
      ref = like[layer.bias_index]
      if bias.shape != jnp.shape(ref):
        bias = bias.reshape(jnp.shape(ref))
      out[layer.bias_index] = bias.astype(ref.dtype)


def map_chain_leaves(
    structure: Structure,
    fn: Callable[..., tuple[Sequence[jax.Array], Sequence[Optional[jax.Array]]]],
    trees: Sequence[Sequence[Any]],
    like: Sequence[Any],
    outside: Optional[Sequence[Any]] = None,
) -> list[Any]:
  """Each chain's leaves replaced by ``fn(geometry, *views)``.

  ``trees`` are flat leaf lists in the params' layout; ``fn`` receives one
  ``(kernels, biases)`` pair for each and returns new kernels and biases,
  written back with the shapes and dtypes of ``like``. Leaves outside every
  chain are those of ``outside`` (default ``like``).
  """
  out = list(like if outside is None else outside)
  for geometry in structure.chains:
    views = [chain_views(geometry, leaves) for leaves in trees]
    kernels, biases = fn(geometry, *views)
    write_chain(geometry, out, like, kernels, biases)
  return out


def map_chains(params: Any, spec: spec_lib.Spec, fn: Callable) -> Any:
  """Applies ``fn(geometry, kernels, biases) -> (kernels, biases)`` to each
  chain of ``params``; leaves outside every chain are returned unchanged."""
  structure = structure_lib.resolve(params, spec)
  leaves, treedef = flat(params)
  out = map_chain_leaves(
      structure, lambda g, views: fn(g, *views), [leaves], leaves
  )
  return jax.tree_util.tree_unflatten(treedef, out)
