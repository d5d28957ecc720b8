"""``verify_spec``: a spec's node scalings checked numerically on the model."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ecopt import basis as basis_lib
from ecopt import spec as spec_lib
from ecopt import structure as structure_lib
from ecopt.discovery import _bind
from ecopt.discovery import _trace


def _tolerance(dtypes: Sequence[Any]) -> float:
  worst = max((jnp.finfo(d).eps for d in dtypes), default=jnp.finfo(jnp.float32).eps)
  if worst <= jnp.finfo(jnp.float64).eps:
    return 1e-8
  if worst <= jnp.finfo(jnp.float32).eps:
    return 1e-4
  return 5e-2


def _rel_change(a: Any, b: Any) -> float:
  """Largest relative change over the output leaves (inf for non-floats)."""
  worst = 0.0
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    # jnp.issubdtype knows bfloat16 (NumPy does not).
    if not jnp.issubdtype(y.dtype, jnp.inexact):
      if not np.array_equal(x, y):
        return float("inf")
      continue
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    if not np.all(np.isfinite(x64) == np.isfinite(y64)):
      return float("inf")
    finite = np.isfinite(y64)
    diff = np.max(np.abs(x64 - y64), where=finite, initial=0.0)
    scale = np.max(np.abs(y64), where=finite, initial=0.0)
    if diff > 0:
      worst = max(worst, float(diff / scale) if scale > 0 else float("inf"))
  return worst


def verify_spec(
    apply_fn: Any,
    variables: Any,
    spec: spec_lib.Spec,
    *example_args: Any,
    seed: int = 0,
    log_range: float = 1.0,
    rtol: Optional[float] = None,
    axis_names: Sequence[str] = (),
    **example_kwargs: Any,
) -> None:
  """Checks numerically that a spec's node scalings preserve the model.

  For every chain and every hidden level ``k``, the level's nodes are scaled
  by random factors ``exp(u)``, ``u ~ U(-log_range, log_range)``
  (``ecopt.scale_nodes``: incoming kernel columns and bias times ``c``, the
  next layer's rows divided by ``c``), and the outputs at ``example_args``
  are compared with the unscaled outputs. The largest relative change
  ``max |y' - y| / max |y|`` over the output leaves must stay below ``rtol``
  (default by the least precise float dtype of the params and outputs:
  ``1e-8`` for float64, ``1e-4`` for float32, ``5e-2`` for 16-bit floats).

  The check is only as good as the example inputs: a level whose ReLUs are
  all inactive at ``example_args`` cannot be told apart. Use a batch of
  realistic inputs.

  Args:
    apply_fn: as for :func:`infer_spec` (linen ``apply``, a plain function,
      or an nnx module with ``variables=None``).
    variables: as for :func:`infer_spec`.
    spec: the spec to check, relative to the params.
    *example_args: example inputs.
    seed: seed of the NumPy generator drawing the factors.
    log_range: half-width of the distribution of ``log c``.
    rtol: the tolerance; ``None`` picks it from the dtypes.
    axis_names: collective axis names to bind, as for :func:`infer_spec`.
    **example_kwargs: static keyword arguments for ``apply_fn``.

  Raises:
    ValueError: for a spec that does not fit the params (from
      ``ecopt.structure.resolve``), or naming the chain, the hidden level
      (the layers around it) and a node whose scaling changes the outputs,
      with the relative change, the tolerance and, when ecopt can trace it,
      where the level's values leave the chain (e.g. a skip connection: the
      level is used outside its chain).

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, ecopt
    >>> model = nn.Sequential([nn.Dense(8), nn.tanh, nn.Dense(2)])
    >>> x = jnp.ones((4, 3))
    >>> variables = model.init(jax.random.key(0), x)
    >>> try:
    ...   ecopt.verify_spec(model.apply, variables,
    ...                     ecopt.Chain("layers_0", "layers_2"), x)
    ... except ValueError as e:
    ...   print(str(e)[:62])
    Chain('layers_0', 'layers_2'): hidden level 1 (the 8 output no
  """
  bound = _bind.bind(apply_fn, variables, example_args, example_kwargs, axis_names)
  verify_bound(bound, spec, seed=seed, log_range=log_range, rtol=rtol)


def verify_bound(
    bound: _bind.Bound,
    spec: spec_lib.Spec,
    *,
    seed: int = 0,
    log_range: float = 1.0,
    rtol: Optional[float] = None,
) -> None:
  """:func:`verify_spec` on a bound model."""
  chains = spec_lib.as_chains(spec)
  structure = structure_lib.resolve(bound.params, chains)
  rng = np.random.default_rng(seed)
  dynamic = bound.dynamic

  if not structure.chains:
    return
  ones = [[np.ones((h,), np.float64) for h in g.widths[1:-1]] for g in structure.chains]

  # One compiled program serves the unscaled run (all factors 1, exact) and
  # every scaled one: compiling once costs less than many eager calls.
  @jax.jit
  def run(params, state, factors, dyn):
    params = basis_lib.scale_nodes(params, chains, factors)
    return bound.fn(params, state, *dyn)

  base = run(bound.params, bound.state, ones, dynamic)
  dtypes = [
      d
      for d in list(structure.dtypes) + [np.result_type(x) for x in jax.tree_util.tree_leaves(base)]
      if jnp.issubdtype(d, jnp.floating)
  ]
  tol = _tolerance(dtypes) if rtol is None else rtol

  def change(c_index, level, factor):
    factors = [list(f) for f in ones]
    factors[c_index][level - 1] = factor
    out = run(bound.params, bound.state, factors, dynamic)
    return _rel_change(out, base)

  for c_index, geometry in enumerate(structure.chains):
    for level, h in enumerate(geometry.widths[1:-1], start=1):
      factor = np.exp(rng.uniform(-log_range, log_range, size=h))
      err = change(c_index, level, factor)
      if not err > tol:
        continue
      # Bisection for one offending node (about 2 log2(h) more runs).
      lo, hi = 0, h
      while hi - lo > 1:
        mid = (lo + hi) // 2
        for a, b in ((lo, mid), (mid, hi)):
          only = np.ones(h)
          only[a:b] = factor[a:b]
          if change(c_index, level, only) > tol:
            lo, hi = a, b
            break
        else:
          break
      node = f"node {lo}" if hi - lo == 1 else f"nodes {lo}..{hi - 1} (together)"
      before = geometry.layers[level - 1].name
      after = geometry.layers[level].name
      message = (
          f"{geometry.chain!r}: hidden level {level} (the {h} output nodes of"
          f" layer '{before}', inputs of layer '{after}') is not"
          f" scale-invariant: scaling {node} changes the outputs (relative"
          f" change {err:.3g} > tolerance {tol:.3g})."
      )
      message += _diagnose(bound, before, after)
      raise ValueError(message)


def _diagnose(bound: _bind.Bound, before: str, after: str) -> str:
  """Where the level's values leave the chain, from the dataflow analysis."""
  try:
    t = _trace.trace(bound)
    a = t.by_label.get(before)
    if a is None:
      return ""
    level = _trace.check_level(t, a)
  except Exception:  # pylint: disable=broad-except
    return ""
  if level.consumer is not None and level.consumer.label == after:
    return ""
  if level.consumer is not None:
    return f" Dataflow: the output of '{before}' reaches '{level.consumer.label}'."
  hint = " The level is used outside its chain." if level.outside else ""
  return f" Dataflow: '{before}': {level.reason}.{hint}"
