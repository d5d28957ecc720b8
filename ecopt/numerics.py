"""The numerics guards of ``docs/g-space.md`` §6, in one place.

The update is the exact formula of §3-§4 wherever the chart is regular. The
guards below only act where it is not:

* **hold** (:func:`hold_small_ratios`): an in-skeleton path value whose ratio
  ``rho = v'/v`` would be below ``min_ratio`` in magnitude keeps its value for
  the step; any other ratio, negative (a sign flip) included, is exact;
* **freeze** (:func:`safe_reciprocal`, :func:`freeze`): a coordinate whose
  skeleton product or in-skeleton value is zero or subnormal has path
  gradient 0, and an entry whose arithmetic overflows from finite inputs
  moves by 0;
* **saturate** (:func:`fit_update`, :func:`saturate`): results are kept at the
  largest finite value of the parameter's dtype instead of rounding to Inf;
* **propagate**: a NaN or Inf gradient (or a NaN path update) reaches the
  updates at its own position, as in optax, so ``optax.apply_if_finite``
  skips the step.

Every check reads the inputs themselves, never a product of them: XLA
reassociates products (``(-lr * g) * (1/B)`` may run as ``g * (-lr/B)``), so a
guard resting on one evaluation order would not hold under ``jit``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def compute_dtype(dtype: Any) -> Any:
  """16-bit floats are computed in float32 and cast back."""
  dtype = jnp.dtype(dtype)
  return jnp.promote_types(dtype, jnp.float32) if dtype.itemsize < 4 else dtype


def safe_reciprocal(x: jax.Array) -> jax.Array:
  """``1/x``, and 0 where ``|x|`` is below the dtype's smallest normal.

  A coordinate whose skeleton product (or in-skeleton value) is zero or
  subnormal has no finite chart: its path gradient and update are 0.
  """
  ok = jnp.abs(x) >= jnp.finfo(x.dtype).tiny
  return jnp.where(ok, 1.0 / jnp.where(ok, x, 1.0), 0.0).astype(x.dtype)


def damaged(x: jax.Array) -> jax.Array:
  """True where ``x`` is NaN or Inf."""
  return ~jnp.isfinite(x)


def damage_marker(x: jax.Array) -> jax.Array:
  """NaN where ``x`` is NaN or Inf, else 0: damage as a float, so that sums
  carry it and, with hidden units sharded, it moves as a float vector."""
  return jnp.zeros((), x.dtype) * x


def freeze(x: jax.Array, *, result: jax.Array, damage: jax.Array) -> jax.Array:
  """NaN where ``damage``; else ``x`` where ``result`` is finite, else 0.

  ``result`` is the quantity that must stay finite (a path gradient, a new
  weight); ``damage`` marks entries whose gradients were not finite, which
  become NaN as in optax instead of being frozen. It is read from the
  gradients, never from the inner optimizer's output, so it is the same
  whatever order XLA evaluates products in. Finite entries pass bit for bit.
  """
  nan = jnp.asarray(jnp.nan, x.dtype)
  return jnp.where(damage, nan, jnp.where(jnp.isfinite(result), x, jnp.zeros((), x.dtype)))


def validate_min_ratio(min_ratio: Any) -> Any:
  """Checks ``min_ratio`` at construction: a float or 0-d array in (0, 1).

  A traced value (``optax.inject_hyperparams``) is checked for shape only.
  """
  if isinstance(min_ratio, bool) or not (
      isinstance(min_ratio, (int, float, np.floating, np.integer))
      or hasattr(min_ratio, "shape")
  ):
    raise ValueError(
        f"min_ratio must be a Python float or a 0-d array in (0, 1), got"
        f" {type(min_ratio).__name__}: {min_ratio!r}."
    )
  if np.shape(min_ratio) != ():
    raise ValueError(
        f"min_ratio must be a scalar (0-d), got an array of shape"
        f" {np.shape(min_ratio)}."
    )
  if isinstance(min_ratio, jax.core.Tracer):
    return min_ratio
  value = float(np.asarray(min_ratio))
  if not 0.0 < value < 1.0:
    raise ValueError(
        f"min_ratio must be in (0, 1) (the smallest |v'/v| an in-skeleton"
        f" path value may take in one step), got {value!r}."
    )
  return min_ratio


def hold_small_ratios(r: jax.Array, min_ratio: Any) -> jax.Array:
  """``r = rho - 1``, with ``rho`` held at 1 where ``|rho| < min_ratio``.

  Also held where ``r`` is not finite (damage reaches the updates through
  :func:`freeze`). ``rho`` is G-invariant, so the hold is too.
  """
  rho = 1 + r
  return jnp.where(jnp.isfinite(r) & (jnp.abs(rho) >= min_ratio), r, 0.0)


def fit_update(d: jax.Array, w: jax.Array, dtype: Any) -> jax.Array:
  """``d`` clipped so that ``w + d`` is finite in ``dtype``.

  For parameters of a narrower dtype than the computation (bfloat16 in
  float32) the new weight saturates at the dtype's largest finite value
  instead of rounding to Inf. NaN passes.
  """
  big = jnp.asarray(jnp.finfo(dtype).max, d.dtype)
  if jnp.finfo(dtype).max >= jnp.finfo(d.dtype).max:
    return d
  return jnp.clip(d, -big - w, big - w)


def saturate(v: jax.Array, w: jax.Array) -> jax.Array:
  """A path value that overflowed, at the largest finite float of its sign.

  ``0 * inf`` (a zero weight times an overflowed product) gives 0; a
  non-finite weight keeps its non-finite value.
  """
  return jnp.where(jnp.isfinite(w), jnp.nan_to_num(v), v)
