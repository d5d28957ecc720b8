"""Checks on node scalings: positive, finite factors, results that fit the dtype.

``scale_nodes`` and ``rescale`` are exact only for positive factors, and a
factor that overflows the parameters' dtype turns weights into Inf without a
sign. These checks run on concrete values, before and after the (compiled)
scaling; under a caller's ``jit`` the values are tracers and are not checked.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def check_factors(factors: Sequence[Sequence[Any]], what: str) -> None:
  """Raises ValueError for a concrete factor that is not positive and finite."""
  for c_index, levels in enumerate(factors):
    for level, c in enumerate(levels, start=1):
      if not _concrete(c):
        continue
      values = np.asarray(c, np.float64)
      bad = ~(np.isfinite(values) & (values > 0))
      if bad.any():
        first = int(np.flatnonzero(bad.ravel())[0])
        raise ValueError(
            f"{what}: factors of chain {c_index}, hidden level {level} must be"
            f" positive and finite; {int(bad.sum())} are not (node {first}:"
            f" {float(values.ravel()[first])!r}). A node scaling by c <= 0 is not in"
            " G and does not keep the network function."
        )


def _float_dtypes(tree: Any) -> list[Any]:
  return [
      jnp.result_type(x)
      for x in jax.tree_util.tree_leaves(tree)
      if jnp.issubdtype(jnp.result_type(x), jnp.floating)
  ]


def check_log_range(log_range: Any, params: Any) -> None:
  """Raises ValueError for a ``log_range`` whose ``exp`` the dtype cannot hold."""
  if not _concrete(log_range):
    return
  value = float(log_range)
  if not (math.isfinite(value) and value >= 0):
    raise ValueError(f"rescale: log_range must be finite and >= 0, got {value!r}.")
  for dtype in _float_dtypes(params):
    limit = math.log(float(jnp.finfo(dtype).max))
    if value >= limit:
      raise ValueError(
          f"rescale: log_range={value!r} gives factors up to exp({value!r}),"
          f" beyond the largest {jnp.dtype(dtype).name} ({jnp.finfo(dtype).max});"
          f" use log_range < {limit:.1f}."
      )


def check_finite_result(params: Any, scaled: Any, what: str) -> None:
  """Raises ValueError where a concrete finite parameter became non-finite."""
  for before, after in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(scaled)):
    if not (_concrete(before) and _concrete(after)):
      return
    if not jnp.issubdtype(jnp.result_type(after), jnp.floating):
      continue
    became = np.isfinite(np.asarray(before)) & ~np.isfinite(np.asarray(after))
    if became.any():
      raise ValueError(
          f"{what}: the scaled parameters overflow their dtype"
          f" {jnp.result_type(after)} ({int(became.sum())} entries of a leaf of"
          f" shape {np.shape(after)} became non-finite); use smaller factors."
      )
