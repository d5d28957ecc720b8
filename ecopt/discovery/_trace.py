"""Tracing a bound model and following one level's node scaling through it."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import numpy as np

from ecopt import spec as spec_lib
from ecopt.discovery import _layers
from ecopt.discovery._bind import Bound
from ecopt.discovery._interpret import Flow
from ecopt.discovery._values import Break, V


@dataclasses.dataclass
class Trace:
  """A model's jaxpr, its leaves and the layers found in it."""

  bound: Bound
  paths: list[tuple[str, ...]]
  leaves: list[Any]
  closed: Any
  layers: list[_layers.Candidate]
  found: _layers.Found
  zero_cache: dict = dataclasses.field(default_factory=dict)

  @property
  def shapes(self) -> list[tuple[int, ...]]:
    return [tuple(np.shape(x)) for x in self.leaves]

  @property
  def by_kernel(self) -> dict[int, _layers.Candidate]:
    return {layer.kernel: layer for layer in self.layers}

  @property
  def by_label(self) -> dict[str, _layers.Candidate]:
    return {layer.label: layer for layer in self.layers}

  def order(self, layer: _layers.Candidate) -> int:
    return self.found.order.get(layer.kernel, 1 << 60)


def trace(bound: Bound) -> Trace:
  paths, leaves, treedef = spec_lib.flatten_with_names(bound.params)

  def flat_fn(param_leaves, state, dynamic):
    params = jax.tree_util.tree_unflatten(treedef, param_leaves)
    return bound.fn(params, state, *dynamic)

  closed = jax.make_jaxpr(flat_fn)(list(leaves), bound.state, list(bound.dynamic))
  shapes = [tuple(np.shape(x)) for x in leaves]
  found = _layers.walk(closed, len(leaves), shapes)
  return Trace(bound, paths, leaves, closed, _layers.candidates(found, paths, leaves), found)


@dataclasses.dataclass(frozen=True)
class Level:
  """The output level of one layer: its consumer, or why it is not hidden."""

  consumer: Optional[_layers.Candidate]
  consumer_axes: tuple[int, ...] = ()
  reason: str = ""
  outside: bool = False  # the level's values leave the chain
  activated: bool = False  # it passes a ReLU-family operation


def _seeds_out(layer: _layers.Candidate, shapes) -> dict[int, V]:
  seeds = {layer.kernel: V("s", layer.out_axes, layer.n_out, 1)}
  if layer.bias is not None:
    seeds[layer.bias] = V("s", tuple(range(len(shapes[layer.bias]))), layer.n_out, 1)
  return seeds


def _located(e: Break) -> str:
  return e.reason + (f", at {e.where}" if e.where else "")


def check_level(t: Trace, a: _layers.Candidate) -> Level:
  """Follows the scaling of ``a``'s output nodes through the function.

  First pass: ``a``'s kernel columns and bias are scaled; the level must
  reach exactly one layer ``b``'s kernel over its input axes and nothing else
  outside per-node homogeneous operations. Second pass: ``b``'s rows are
  scaled by the inverse too, and every output must be unchanged (which also
  rules out tied or shared weights).
  """
  n_params, shapes = len(t.leaves), t.shapes
  flow = Flow(t.by_kernel, _seeds_out(a, shapes), True, t.zero_cache)
  try:
    flow.run_top(t.closed, n_params)
  except Break as e:
    return Level(None, reason=f"its output {_located(e)}", outside=e.outside)
  b = flow.consumer
  if b is None:
    return Level(None, reason="its output reaches no other layer")
  if b is a:
    return Level(None, reason="its output reaches the same layer again (shared weights)")
  seeds = _seeds_out(a, shapes)
  if b.kernel in seeds:
    return Level(None, reason=f"'{b.label}' shares parameters with '{a.label}'")
  seeds[b.kernel] = V("s", flow.consumer_axes, a.n_out, -1)
  second = Flow(t.by_kernel, seeds, False, t.zero_cache)
  try:
    second.run_top(t.closed, n_params)
  except Break as e:
    return Level(
        None,
        reason=(
            f"scaling its output nodes and the input rows of '{b.label}'"
            f" changes the function: the scaled value {_located(e)}"
        ),
        outside=e.outside,
    )
  return Level(b, flow.consumer_axes, activated=flow.activated)
