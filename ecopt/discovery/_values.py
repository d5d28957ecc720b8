"""Abstract values: what one node scaling does to a value of the jaxpr."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import numpy as np

try:
  from jax.extend.core import Literal
except ImportError:  # older jax
  from jax.core import Literal  # type: ignore


class V(NamedTuple):
  """What a node scaling does to one value of the jaxpr.

  ``kind``: ``"inv"`` unchanged; ``"zero"`` a constant zero (unchanged, and
  also compatible with any scaling); ``"s"`` multiplied elementwise by
  ``c_j ** power``, where ``j`` is the row-major index over ``axes`` (in that
  order) taken ``mod h``: ``h`` is smaller than the axes' size only for
  nodes innermost in a flattened axis (a channels-last flatten).
  ``origin``: for an unchanged value that is a parameter leaf (possibly cast
  or transposed), the leaf's index, and ``perm`` the transpose applied
  (``perm[d]`` is the leaf axis of axis ``d``); -1 and None otherwise.
  """

  kind: str
  axes: tuple[int, ...] = ()
  h: int = 0
  power: int = 0
  origin: int = -1
  perm: Optional[tuple[int, ...]] = None

  def leaf_axis(self, axis: int) -> int:
    return axis if self.perm is None else self.perm[axis]

  def moved(self, axes) -> "V":
    """The same scaling along other axes (no longer a parameter leaf)."""
    return self._replace(axes=tuple(axes), origin=-1, perm=None)


INV = V("inv")
ZERO = V("zero")


def signature(v: V) -> tuple:
  return (v.axes, v.h, v.power)


class Break(Exception):
  """A scaled value reached an operation that does not carry the scaling."""

  def __init__(self, reason: str, outside: bool = False):
    super().__init__(reason)
    self.reason = reason
    # True when the level's values leave the chain (an output, a skip
    # connection, a second consumer) rather than meet a non-homogeneous op.
    self.outside = outside
    self.where: Optional[str] = None


def is_zero_const(value: Any) -> bool:
  try:
    arr = np.asarray(value)
  except Exception:  # pylint: disable=broad-except
    return False
  if arr.size > 1_000_000 or arr.dtype == object:
    return False
  return bool(arr.size) and bool(np.all(arr == 0))


def where(eqn: Any) -> str:
  """``prim`` plus the user source line and module path of an equation."""
  text = f"`{eqn.primitive.name}`"
  try:
    from jax._src import source_info_util  # pylint: disable=g-import-not-at-top

    text += f" at {source_info_util.summarize(eqn.source_info)}"
    stack = str(eqn.source_info.name_stack)
    if stack:
      text += f" (in {stack})"
  except Exception:  # pylint: disable=broad-except
    pass
  return text


# Primitives whose sub-jaxpr is entered (nested jit, custom derivatives, remat).
CALLS = frozenset({
    "jit", "pjit", "closed_call", "core_call", "named_call", "remat", "remat2",
    "checkpoint", "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr",
})


def sub_jaxpr(eqn: Any):
  """``(jaxpr, consts)`` of a call-like equation, or None."""
  if eqn.primitive.name not in CALLS:
    return None
  for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    sub = eqn.params.get(name)
    if sub is None:
      continue
    if hasattr(sub, "jaxpr") and hasattr(sub, "consts"):
      jaxpr, consts = sub.jaxpr, sub.consts
    elif hasattr(sub, "eqns"):
      jaxpr, consts = sub, ()
    else:
      continue
    if len(jaxpr.invars) == len(eqn.invars) and len(jaxpr.outvars) == len(eqn.outvars):
      return jaxpr, consts
  return None


def shapes(eqn) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
  return [tuple(a.aval.shape) for a in eqn.invars], [
      tuple(a.aval.shape) for a in eqn.outvars
  ]
