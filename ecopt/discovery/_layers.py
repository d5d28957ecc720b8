"""Finding the layers from data flow: what the computation does with each leaf.

A leaf is a layer **kernel** when it is an operand of a ``dot_general``
(input axes: its contracting dimensions; output axes: its free ones) or the
kernel of an ungrouped ``conv_general_dilated``, whatever its name or layout
(``DenseGeneral``, ``Einsum`` in either layout, an nnx ``Linear`` with ``w``).
A 1-D leaf multiplied into a value is a per-node **scale** (a normalisation's
affine, a diagonal layer). A leaf added to a layer's output, with the shape of
its output features, is its **bias**. Names play no part; the spec records
what was found (``ecopt.Layer``) so ``g_space`` reads the kernel the same way.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from ecopt import spec as spec_lib
from ecopt import structure as structure_lib
from ecopt.discovery._values import Literal, sub_jaxpr

_CASTS = frozenset({"convert_element_type", "copy", "copy_p", "reduce_precision"})
_SHAPING = frozenset({"reshape", "broadcast_in_dim", "squeeze", "expand_dims"})


@dataclasses.dataclass(frozen=True)
class Candidate:
  """A layer found among the leaves: a kernel or a scale, and its bias."""

  label: str
  kernel: int
  bias: Optional[int]
  diagonal: bool
  kind: str  # "dense", "conv" or "scale"
  in_axes: tuple[int, ...]
  out_axes: tuple[int, ...]
  shape: tuple[int, ...]

  @property
  def n_out(self) -> int:
    return math.prod(self.shape[a] for a in self.out_axes)


@dataclasses.dataclass
class _Info:
  """What one value is, for layer finding."""

  leaf: int = -1  # a parameter leaf, through casts and transposes ...
  perm: Optional[tuple[int, ...]] = None  # ... (perm[d]: leaf axis of axis d)
  shaped: int = -1  # a parameter leaf, through casts and reshapes/broadcasts
  out: int = -1  # kernel leaf of the layer whose output this is


_NONE = _Info()


@dataclasses.dataclass
class Found:
  """Raw findings: leaf -> (kind, in_axes, out_axes); scales; biases; order."""

  kernels: dict[int, tuple[str, tuple[int, ...], tuple[int, ...]]] = dataclasses.field(default_factory=dict)
  scales: list[int] = dataclasses.field(default_factory=list)
  biases: dict[int, int] = dataclasses.field(default_factory=dict)
  order: dict[int, int] = dataclasses.field(default_factory=dict)
  skipped: dict[int, str] = dataclasses.field(default_factory=dict)


def _leaf_axes(info: _Info, dims) -> tuple[int, ...]:
  return tuple(d if info.perm is None else info.perm[d] for d in dims)


def walk(closed, n_params: int, shapes: Sequence[tuple[int, ...]]) -> Found:
  """One pass over the jaxpr recording kernels, scales, biases, first uses."""
  found = Found()
  counter = [0]

  def kernel(leaf, kind, in_axes, out_axes):
    if leaf not in found.kernels and leaf not in found.skipped:
      found.kernels[leaf] = (kind, in_axes, out_axes)

  def run(jaxpr, in_infos):
    env = dict(zip(jaxpr.invars, in_infos))
    read = lambda a: _NONE if isinstance(a, Literal) else env.get(a, _NONE)
    for eqn in jaxpr.eqns:
      counter[0] += 1
      infos = [read(a) for a in eqn.invars]
      sub = sub_jaxpr(eqn)
      if sub is not None:
        for var, info in zip(eqn.outvars, run(sub[0], infos)):
          env[var] = info
        continue
      for info in infos:
        for leaf in (info.leaf, info.shaped):
          if leaf >= 0:
            found.order.setdefault(leaf, counter[0])
      out = _step(eqn, infos, found, kernel, shapes)
      if out is not None:
        env[eqn.outvars[0]] = out
    return [read(a) for a in jaxpr.outvars]

  infos = [_Info(leaf=i, shaped=i) for i in range(n_params)]
  run(closed.jaxpr, infos + [_NONE] * (len(closed.jaxpr.invars) - n_params))
  return found


def _step(eqn, infos, found, kernel, shapes) -> Optional[_Info]:
  """The info of an equation's (first) output, recording what it finds."""
  name = eqn.primitive.name
  first = infos[0] if infos else _NONE
  if name in _CASTS:
    return first
  if name == "transpose":
    perm = tuple(eqn.params["permutation"])
    leaf_perm = tuple(first.perm[p] if first.perm else p for p in perm)
    return _Info(leaf=first.leaf, perm=leaf_perm if first.leaf >= 0 else None, out=first.out)
  if name in _SHAPING:
    return _Info(shaped=first.shaped, out=first.out)
  if name == "dot_general" and len(infos) == 2:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    for side, (info, other) in enumerate(((infos[0], infos[1]), (infos[1], infos[0]))):
      if info.leaf < 0 or other.leaf >= 0 or other.shaped >= 0:
        continue
      contract, batch = (lc, lb) if side == 0 else (rc, rb)
      rank = len(shapes[info.leaf])
      free = [d for d in range(rank) if d not in contract and d not in batch]
      if batch:
        found.skipped.setdefault(
            info.leaf,
            "its kernel is contracted with a batch dimension (stacked members,"
            " as in an ensemble without vmap), which is not one chain layer",
        )
        return _NONE
      if not free or not contract:
        return _NONE
      kernel(info.leaf, "dense", _leaf_axes(info, contract), _leaf_axes(info, free))
      return _Info(out=info.leaf)
    return _NONE
  if name == "conv_general_dilated" and len(infos) == 2:
    rhs = infos[1]
    if rhs.leaf < 0 or infos[0].leaf >= 0:
      return _NONE
    if eqn.params["feature_group_count"] != 1 or eqn.params["batch_group_count"] != 1:
      found.skipped.setdefault(rhs.leaf, "its kernel is a grouped (e.g. depthwise) convolution")
      return _NONE
    spec = eqn.params["dimension_numbers"].rhs_spec
    kernel(rhs.leaf, "conv", _leaf_axes(rhs, (spec[1],)), _leaf_axes(rhs, (spec[0],)))
    return _Info(out=rhs.leaf)
  if name == "mul" and len(infos) == 2:
    for info, other in ((infos[0], infos[1]), (infos[1], infos[0])):
      if info.shaped >= 0 and len(shapes[info.shaped]) == 1 and other.shaped < 0:
        if info.shaped not in found.scales:
          found.scales.append(info.shaped)
        return _Info(out=info.shaped)
    outs = [i.out for i in infos if i.out >= 0]
    return _Info(out=outs[0]) if len(outs) == 1 else _NONE
  if name in ("add", "add_any") and len(infos) == 2:
    for info, other in ((infos[0], infos[1]), (infos[1], infos[0])):
      if info.out >= 0 and other.shaped >= 0 and other.out < 0:
        found.biases.setdefault(info.out, other.shaped)
        return _Info(out=info.out)
  return None


def candidates(found: Found, paths, leaves) -> list[Candidate]:
  """The layers, each with its bias when it has the output features' shape."""
  shapes = [tuple(np.shape(x)) for x in leaves]
  floating = [jnp.issubdtype(jnp.result_type(x), jnp.floating) for x in leaves]
  layers = []
  roles = set(found.kernels) | set(found.scales)
  for leaf, (kind, in_axes, out_axes) in found.kernels.items():
    layers.append((leaf, False, kind, in_axes, out_axes))
  for leaf in found.scales:
    if leaf not in found.kernels:
      layers.append((leaf, True, "scale", (0,), (0,)))
  result, used_bias = [], set()
  for leaf, diagonal, kind, in_axes, out_axes in layers:
    if not floating[leaf]:
      continue
    bias = found.biases.get(leaf)
    out_shape = tuple(shapes[leaf][a] for a in out_axes)
    if bias is not None and (
        bias in roles
        or bias in used_bias
        or not floating[bias]
        or paths[bias][:-1] != paths[leaf][:-1]
        or shapes[bias] not in (out_shape, (math.prod(out_shape),))
    ):
      bias = None
    if bias is not None:
      used_bias.add(bias)
    result.append(
        Candidate("", leaf, bias, diagonal, kind, in_axes, out_axes, shapes[leaf])
    )
  parents = [paths[c.kernel][:-1] for c in result]
  labels = []
  for c, parent in zip(result, parents):
    unique = parent and parents.count(parent) == 1
    labels.append("/".join(parent if unique else paths[c.kernel]))
  return [dataclasses.replace(c, label=l) for c, l in zip(result, labels)]


def entry(c: Candidate, paths, shapes, in_axes: Optional[tuple[int, ...]] = None) -> spec_lib.LayerLike:
  """The spec entry for a candidate: a plain path when that reads the same."""
  path = paths[c.kernel]
  parent, leaf_name = path[:-1], path[-1]
  bias = None if c.bias is None else paths[c.bias][-1]
  in_axes = c.in_axes if in_axes is None else in_axes
  if not parent:
    explicit = spec_lib.Layer(path, kind=c.kind, in_axes=None if c.diagonal else in_axes,
                              out_axes=None if c.diagonal else c.out_axes, bias=None)
  else:
    explicit = spec_lib.Layer(
        parent, kernel=leaf_name, bias=bias, kind=c.kind,
        in_axes=None if c.diagonal else in_axes,
        out_axes=None if c.diagonal else c.out_axes,
    )
  plain = spec_lib.Layer(parent) if parent else None
  if plain is not None and plain.is_default:
    try:
      if structure_lib.read_layer(plain, paths, shapes) == structure_lib.read_layer(
          explicit, paths, shapes
      ):
        return plain.name
    except ValueError:
      pass
  return explicit
