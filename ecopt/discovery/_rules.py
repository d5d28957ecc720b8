"""The rules: how each primitive carries a node scaling, one small function each.

``RULES[name](ctx, eqn, vals)`` returns the abstract output values of an
equation some of whose inputs are scaled (``vals``), or raises ``Break``.
``ctx`` is the interpreter (``ecopt.discovery._interpret.Flow``): rules call
``ctx.consume`` when a scaled level meets a layer kernel and set
``ctx.activated`` when it passes a ReLU-family (piecewise-linear) operation.
A primitive without a rule ends the chain. Rules are pure functions of the
equation's parameters and shapes, as kfac-jax's layer-matching rules are.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax.numpy as jnp

from ecopt.discovery._values import INV, ZERO, Break, Literal, V, shapes, signature

Rule = Callable[..., list]
RULES: dict[str, Rule] = {}


def rule(*names: str):
  def register(fn: Rule) -> Rule:
    for name in names:
      RULES[name] = fn
    return fn

  return register


def same(vals: Sequence[V], what: str) -> V:
  """The common scaling of ``vals`` (zeros are compatible with any)."""
  scaled = [v for v in vals if v.kind == "s"]
  if any(v.kind == "inv" for v in vals):
    raise Break(
        f"is combined by {what} with a value that does not scale with it (a"
        " skip/residual connection, a second branch, or an unscaled offset)",
        outside=True,
    )
  first = scaled[0]
  if any(signature(v) != signature(first) for v in scaled[1:]):
    raise Break(f"is combined by {what} with a differently scaled value")
  return first.moved(first.axes)


def _shift(axes, removed) -> tuple[int, ...]:
  return tuple(a - sum(r < a for r in removed) for a in axes)


def _untouched(v: V, dims, why: str) -> None:
  if any(a in tuple(dims) for a in v.axes):
    raise Break(why)


# --- elementwise, degree one under positive per-node factors ---


@rule("neg", "copy", "copy_p", "reduce_precision", "real", "stop_gradient")
def passthrough(ctx, eqn, vals):
  return [vals[0].moved(vals[0].axes)]


@rule("abs")
def _abs(ctx, eqn, vals):
  ctx.activated = True
  return passthrough(ctx, eqn, vals)


@rule("convert_element_type")
def _convert(ctx, eqn, vals):
  if not jnp.issubdtype(eqn.params["new_dtype"], jnp.floating):
    raise Break(f"is converted to {eqn.params['new_dtype']}")
  return [vals[0]]


@rule("integer_pow")
def _integer_pow(ctx, eqn, vals):
  if eqn.params["y"] != 1:
    raise Break(f"is raised to the power {eqn.params['y']}")
  return [vals[0]]


@rule("add", "sub", "add_any", "max", "min")
def _add(ctx, eqn, vals):
  for atom, v in zip(eqn.invars, vals):
    if v.kind == "inv" and isinstance(atom, Literal):
      raise Break(
          f"is shifted by the constant {atom.val} in `{eqn.primitive.name}`"
          " (not homogeneous)"
      )
  if eqn.primitive.name in ("max", "min"):
    ctx.activated = True  # ReLU is max(x, 0); maxout max(x, y)
  return [same(vals, f"`{eqn.primitive.name}`")]


@rule("mul")
def _mul(ctx, eqn, vals):
  if all(v.kind == "s" for v in vals):
    raise Break("is multiplied by another scaled value (degree two)")
  if any(v.kind == "zero" for v in vals):
    return [ZERO]
  scaled = next(v for v in vals if v.kind == "s")
  return [scaled.moved(scaled.axes)]


@rule("div")
def _div(ctx, eqn, vals):
  if vals[1].kind == "s":
    raise Break("divides another value")
  return [vals[0]]


@rule("select_n")
def _select_n(ctx, eqn, vals):
  if vals[0].kind == "s":
    raise Break("is used as a selection predicate")
  ctx.activated = True  # leaky ReLU: where(x > 0, x, a * x)
  return [same(vals[1:], "`select_n` (a where)")]


@rule("ge", "gt", "le", "lt", "eq", "ne")
def _compare(ctx, eqn, vals):
  same(vals, f"the comparison `{eqn.primitive.name}`")  # only with 0
  return [INV]


@rule("sign")
def _sign(ctx, eqn, vals):
  return [INV]


@rule("optimization_barrier")
def _barrier(ctx, eqn, vals):
  return list(vals)


# --- structural ---


@rule("reshape")
def _reshape(ctx, eqn, vals):
  v = vals[0]
  (shape, *_), (out,) = shapes(eqn)
  axes = v.axes
  fail = Break(
      f"is reshaped from {shape} to {out}, which does not keep its {v.h}"
      " nodes together"
  )
  if eqn.params.get("dimensions") is not None:
    raise Break("is reshaped with a transposition")
  if axes != tuple(range(axes[0], axes[0] + len(axes))) or not out:
    raise fail
  inner = math.prod(shape[axes[-1] + 1:])
  if inner == 1:
    # Nodes innermost: node = (flat index) mod h, kept by any suffix of the
    # new shape whose size is a multiple of h.
    for start in range(len(out) - 1, -1, -1):
      if math.prod(out[start:]) % v.h == 0:
        return [v.moved(range(start, len(out)))]
    raise fail
  outer = math.prod(shape[: axes[0]])
  if math.prod(shape[a] for a in axes) != v.h:
    raise fail
  for start in range(len(out) + 1):
    if math.prod(out[:start]) != outer:
      continue
    for stop in range(start, len(out) + 1):
      if math.prod(out[start:stop]) == v.h and math.prod(out[stop:]) == inner:
        if stop > start:
          return [v.moved(range(start, stop))]
  raise fail


@rule("transpose")
def _transpose(ctx, eqn, vals):
  perm = tuple(eqn.params["permutation"])
  return [vals[0].moved(perm.index(a) for a in vals[0].axes)]


@rule("broadcast_in_dim")
def _broadcast(ctx, eqn, vals):
  v = vals[0]
  if any(x.kind == "s" for x in vals[1:]):
    raise Break("sets a dynamic shape")
  (shape, *_), (out,) = shapes(eqn)
  dims = eqn.params["broadcast_dimensions"]
  axes = tuple(dims[a] for a in v.axes)
  if any(out[b] != shape[a] for a, b in zip(v.axes, axes)):
    raise Break(f"is broadcast along its node axis ({shape} -> {out})")
  return [v.moved(axes)]


@rule("squeeze")
def _squeeze(ctx, eqn, vals):
  dims = tuple(eqn.params["dimensions"])
  _untouched(vals[0], dims, "loses its node axis in `squeeze`")
  return [vals[0].moved(_shift(vals[0].axes, dims))]


@rule("rev")
def _rev(ctx, eqn, vals):
  _untouched(vals[0], eqn.params["dimensions"], "is reversed along its node axis")
  return [vals[0]]


@rule("reduce_sum", "reduce_max", "reduce_min")
def _reduce(ctx, eqn, vals):
  axes = tuple(eqn.params["axes"])
  _untouched(
      vals[0], axes,
      f"is reduced over its node axis by `{eqn.primitive.name}` (mixes nodes,"
      " as in a normalisation or a softmax)",
  )
  if eqn.primitive.name != "reduce_sum":
    ctx.activated = True  # global max pooling
  return [vals[0].moved(_shift(vals[0].axes, axes))]


@rule("argmax", "argmin")
def _argmax(ctx, eqn, vals):
  _untouched(vals[0], eqn.params["axes"], "is reduced over its node axis by an arg-max")
  return [INV]


@rule("cumsum", "cummax", "cummin")
def _cumulative(ctx, eqn, vals):
  _untouched(
      vals[0], (eqn.params["axis"],),
      f"is accumulated along its node axis by `{eqn.primitive.name}`",
  )
  return [vals[0]]


@rule("reduce_window_sum", "reduce_window_max", "reduce_window_min")
def _window(ctx, eqn, vals):
  p = eqn.params
  for a in vals[0].axes:
    if (
        p["window_dimensions"][a] != 1
        or p["window_strides"][a] != 1
        or tuple(p["padding"][a]) != (0, 0)
        or p["base_dilation"][a] != 1
        or p["window_dilation"][a] != 1
    ):
      raise Break("is pooled across its node axis")
  if eqn.primitive.name != "reduce_window_sum":
    ctx.activated = True  # max pooling
  return [vals[0]]


@rule("pad")
def _pad(ctx, eqn, vals):
  v, fill = vals
  if fill.kind != "zero":
    raise Break("is padded with a non-zero value")
  if any(tuple(eqn.params["padding_config"][a]) != (0, 0, 0) for a in v.axes):
    raise Break("is padded along its node axis")
  return [v]


@rule("slice")
def _slice(ctx, eqn, vals):
  v = vals[0]
  (shape,), _ = shapes(eqn)
  p = eqn.params
  strides = p.get("strides") or (1,) * len(shape)
  for a in v.axes:
    if (p["start_indices"][a], p["limit_indices"][a], strides[a]) != (0, shape[a], 1):
      raise Break("is sliced along its node axis")
  return [v]


@rule("dynamic_slice")
def _dynamic_slice(ctx, eqn, vals):
  v = vals[0]
  if v.kind != "s" or any(x.kind == "s" for x in vals[1:]):
    raise Break("is used as a slice index")
  for a in v.axes:
    if eqn.params["slice_sizes"][a] != eqn.invars[0].aval.shape[a]:
      raise Break("is sliced along its node axis")
  return [v]


@rule("concatenate")
def _concatenate(ctx, eqn, vals):
  v = same(vals, "`concatenate`")
  _untouched(v, (eqn.params["dimension"],), "is concatenated along its node axis")
  return [v]


@rule("split")
def _split(ctx, eqn, vals):
  _untouched(vals[0], (eqn.params["axis"],), "is split along its node axis")
  return [vals[0]] * len(eqn.outvars)


# --- contractions ---


@rule("dot_general")
def _dot_general(ctx, eqn, vals):
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  lc, rc, lb, rb = tuple(lc), tuple(rc), tuple(lb), tuple(rb)
  lv, rv = vals[0], vals[1]
  (ls, rs, *_), _ = shapes(eqn)
  if lv.kind == "s" and rv.kind == "s":
    if (
        all(a in lc for a in lv.axes)
        and tuple(rc[lc.index(a)] for a in lv.axes) == rv.axes
        and lv.h == rv.h
        and lv.power == -rv.power
    ):
      return [INV]
    raise Break("is multiplied by another scaled value in `dot_general`")
  side = 0 if lv.kind == "s" else 1
  v, other = (lv, rv) if side == 0 else (rv, lv)
  contract, other_contract = (lc, rc) if side == 0 else (rc, lc)
  batch = lb if side == 0 else rb
  contracted = [a in contract for a in v.axes]
  if any(contracted):
    if not all(contracted):
      raise Break("is contracted over part of its node axes in `dot_general`")
    other_axes = tuple(other_contract[contract.index(a)] for a in v.axes)
    return ctx.consume(other, other_axes, v, "`dot_general`")
  if other.kind == "zero":
    return [ZERO]
  lfree = [d for d in range(len(ls)) if d not in lc and d not in lb]
  rfree = [d for d in range(len(rs)) if d not in rc and d not in rb]

  def out_axis(a):
    if a in batch:
      return batch.index(a)
    if side == 0:
      return len(lb) + lfree.index(a)
    return len(lb) + len(lfree) + rfree.index(a)

  return [v.moved(out_axis(a) for a in v.axes)]


@rule("conv_general_dilated")
def _conv(ctx, eqn, vals):
  p = eqn.params
  dn = p["dimension_numbers"]
  lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  lv, rv = vals[0], vals[1]
  (ls, rs, *_), _ = shapes(eqn)
  if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
    raise Break("reaches a grouped (e.g. depthwise) convolution")
  if lv.kind == "s" and rv.kind == "s":
    if (
        lv.axes == (lhs_spec[1],)
        and rv.axes == (rhs_spec[1],)
        and lv.h == rv.h == ls[lhs_spec[1]]
        and lv.power == -rv.power
    ):
      return [INV]
    raise Break("is multiplied by another scaled value in a convolution")
  if lv.kind == "s":
    if lv.axes == (lhs_spec[1],):
      if lv.h != ls[lhs_spec[1]]:
        raise Break("reaches a convolution with its nodes flattened")
      return ctx.consume(rv, (rhs_spec[1],), lv, "a convolution")
    if lv.axes == (lhs_spec[0],):
      return [lv.moved((out_spec[0],))]
    raise Break("is convolved along its node axis")
  if rv.axes == (rhs_spec[0],):
    return [rv.moved((out_spec[1],))]
  if rv.axes == (rhs_spec[1],):
    return ctx.consume(lv, (lhs_spec[1],), rv, "a convolution")
  raise Break("scales a kernel along a spatial axis")


@rule("stack")
def _stack(ctx, eqn, vals):
  v = same(vals, "`stack`")
  axis = eqn.params["axis"]
  return [v.moved(a + (a >= axis) for a in v.axes)]


@rule("square")
def _square(ctx, eqn, vals):
  raise Break(
      "is squared (degree two), as in a variance: a normalisation's"
      " statistics absorb the scaling instead of passing it on"
  )
