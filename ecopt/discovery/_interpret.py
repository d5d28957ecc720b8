"""The interpreter: runs a jaxpr on abstract values under one node scaling."""

from __future__ import annotations

from typing import Any, Optional

from ecopt.discovery import _rules
from ecopt.discovery._values import INV, ZERO, Break, Literal, V, is_zero_const, sub_jaxpr, where

# Ops that keep a constant zero a zero, and those that keep a parameter leaf
# recognisable as that leaf (a kernel cast to the compute dtype, transposed).
_ZERO_KEEPING = frozenset({
    "convert_element_type", "copy", "copy_p", "broadcast_in_dim", "reshape",
    "transpose", "squeeze", "neg", "reduce_precision", "rev",
})
_ORIGIN_KEEPING = frozenset({"convert_element_type", "copy", "copy_p", "reduce_precision"})


class Flow:
  """Abstract interpretation of a jaxpr under one node scaling.

  Args:
    layers_by_kernel: leaf index of a kernel -> its candidate layer.
    seeds: leaf index -> scaled abstract value at the start.
    allow_consumer: True in the first pass: one contraction of the scaled
      level with an unscaled layer kernel over the kernel's input axes is
      recorded as the level's consumer. In the second pass the consumer's
      kernel is itself seeded, so such a contraction is an error.
    zero_cache: shared between passes, so constants are read back from the
      device once per trace.

  After ``run_top``: ``consumer`` (the layer), ``consumer_axes`` (its leaf
  axes contracted with the level, in the level's node order) and
  ``activated`` (the level passed a ReLU-family operation).
  """

  def __init__(self, layers_by_kernel, seeds, allow_consumer, zero_cache=None):
    self.layers_by_kernel = layers_by_kernel
    self.seeds = seeds
    self.allow_consumer = allow_consumer
    self.consumer = None
    self.consumer_axes: tuple[int, ...] = ()
    self.activated = False
    self.zero_cache = {} if zero_cache is None else zero_cache

  def const_value(self, c) -> V:
    hit = self.zero_cache.get(id(c))
    if hit is None or hit[0] is not c:
      hit = (c, is_zero_const(c))
      self.zero_cache[id(c)] = hit
    return ZERO if hit[1] else INV

  def run_top(self, closed, n_params: int) -> None:
    jaxpr = closed.jaxpr
    in_vals = []
    for i in range(len(jaxpr.invars)):
      if i in self.seeds:
        in_vals.append(self.seeds[i])
      elif i < n_params:
        in_vals.append(V("inv", origin=i))
      else:
        in_vals.append(INV)
    for v in self.run(jaxpr, closed.consts, in_vals):
      if v.kind == "s":
        raise Break("reaches an output of the function", outside=True)

  def run(self, jaxpr, consts, in_vals) -> list[V]:
    env: dict[Any, V] = {}
    for var, c in zip(jaxpr.constvars, consts):
      env[var] = self.const_value(c)
    for var, v in zip(jaxpr.invars, in_vals):
      env[var] = v

    def read(atom):
      if isinstance(atom, Literal):
        return ZERO if is_zero_const(atom.val) else INV
      return env.get(atom, INV)

    for eqn in jaxpr.eqns:
      vals = [read(a) for a in eqn.invars]
      try:
        outs = self.eqn(eqn, vals)
      except Break as e:
        if e.where is None:
          e.where = where(eqn)
        raise
      for var, v in zip(eqn.outvars, outs):
        env[var] = v
    return [read(a) for a in jaxpr.outvars]

  def eqn(self, eqn, vals: list[V]) -> list[V]:
    sub = sub_jaxpr(eqn)
    if sub is not None:  # entered even when nothing is scaled: it may make zeros
      return self.run(sub[0], sub[1], vals)
    name = eqn.primitive.name
    if not any(v.kind == "s" for v in vals):
      return _unscaled(eqn, name, vals)
    rule = _rules.RULES.get(name)
    if rule is None:
      raise Break(
          f"reaches `{name}`, which is not positively homogeneous per node (or"
          " not known to ecopt)"
      )
    return rule(self, eqn, vals)

  def consume(self, other: V, other_axes, v: V, what: str) -> list[V]:
    """``v`` contracted over its node axes with an unscaled operand."""
    if v.power < 0:
      raise Break(
          "the next layer's kernel is also used elsewhere, against a value of"
          " another level (tied or shared weights)"
      )
    layer = self.layers_by_kernel.get(other.origin)
    leaf_axes = tuple(other.leaf_axis(a) for a in other_axes)
    if layer is None or layer.diagonal or sorted(leaf_axes) != sorted(layer.in_axes):
      raise Break(
          f"is contracted over its node axis by {what} with a value that is not"
          " a layer kernel's input axis"
      )
    if not self.allow_consumer:
      raise Break(f"also reaches layer '{layer.label}' (a second consumer)", outside=True)
    if self.consumer is not None:
      raise Break(
          f"reaches two layers, '{self.consumer.label}' and '{layer.label}' (a"
          " level with two consumers is not hidden)",
          outside=True,
      )
    self.consumer, self.consumer_axes = layer, leaf_axes
    return [INV]


def _unscaled(eqn, name, vals) -> list[V]:
  n_out = len(eqn.outvars)
  if n_out == 1 and vals:
    first = vals[0]
    if name in _ZERO_KEEPING and first.kind == "zero":
      return [ZERO]
    if name == "mul" and any(v.kind == "zero" for v in vals):
      return [ZERO]
    if first.origin >= 0 and name in _ORIGIN_KEEPING:
      return [first]
    if first.origin >= 0 and name == "transpose":
      perm = tuple(eqn.params["permutation"])
      return [first._replace(perm=tuple(first.leaf_axis(p) for p in perm))]
  return [INV] * n_out
