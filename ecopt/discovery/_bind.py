"""Binding a model: three calling conventions as one ``fn(params, state, *args)``.

Training-mode calls are bound too: linen ``apply`` with ``mutable=[...]`` or
``rngs=...`` (added when the model asks for them), nnx modules with ``Rngs``
passed positionally or by keyword (split and merged inside the trace, as
nnx's own transforms do), and collective axis names such as BatchNorm's
``axis_name='batch'`` (bound by a size-1 ``jax.vmap`` for the trace: a mean
over one device is the identity).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Bound:
  """A model as ``fn(params, state, *dynamic)``, its params and other state.

  ``state`` (linen's other collections, nnx's non-Param state and Rngs) is
  traced as an input like the params, so that inference never relies on its
  current values (fresh BatchNorm statistics are exact zeros and ones).
  ``dynamic`` are the array arguments; static ones are bound in ``fn``.
  """

  params: Any
  state: Any
  fn: Callable[..., Any]
  dynamic: tuple[Any, ...]


def _nnx():
  # flax.nnx is looked up, not imported: a model that is an nnx module has
  # imported it already, and ecopt itself does not import flax.
  return sys.modules.get("flax.nnx")


def _is_graph_node(obj: Any) -> bool:
  nnx = _nnx()
  return nnx is not None and nnx.graph.is_graph_node(obj)


def _is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _is_dynamic(arg: Any) -> bool:
  leaves = jax.tree_util.tree_leaves(arg)
  return bool(leaves) and all(_is_array(x) for x in leaves)


def bind(
    apply_fn: Any,
    variables: Any,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    axis_names: Sequence[str] = (),
) -> Bound:
  """The model bound to its arguments, adjusted until it traces.

  A model that needs a collective axis, a mutable collection or a PRNG
  stream it was not given gets it (linen raises for each), and the call is
  traced again, a few times at most.
  """
  kwargs = dict(kwargs)
  axis_names = list(axis_names)
  for _ in range(6):
    bound = _bind_once(apply_fn, variables, args, kwargs, tuple(axis_names))
    try:
      jax.eval_shape(bound.fn, bound.params, bound.state, *bound.dynamic)
      return bound
    except NameError as e:
      name = re.search(r"unbound axis name: ([^\s.]+)", str(e))
      if name is None or name.group(1) in axis_names:
        raise
      axis_names.append(name.group(1))
    except Exception as e:  # pylint: disable=broad-except
      if not _linen_fix(e, variables, kwargs):
        raise
  return bound


def _linen_fix(error: Exception, variables: Any, kwargs: dict) -> bool:
  """Adds what a linen model in training mode asked for; False if nothing."""
  kind = type(error).__name__
  if kind == "ModifyScopeVariableError" and "mutable" not in kwargs:
    collections = [k for k in variables if k != "params"] if isinstance(variables, Mapping) else []
    found = re.search(r'collection "([^"]+)"', str(error))
    if found and found.group(1) not in collections:
      collections.append(found.group(1))
    kwargs["mutable"] = collections
    return True
  if kind == "InvalidRngError":
    found = re.search(r'PRNG for "([^"]+)"', str(error))
    rngs = dict(kwargs.get("rngs") or {})
    if found is None or found.group(1) in rngs:
      return False
    # Which random numbers are drawn does not matter for the structure; the
    # same key in every run keeps verify_spec's comparisons exact.
    rngs[found.group(1)] = jax.random.key(0)
    kwargs["rngs"] = rngs
    return True
  return False


def _bind_once(apply_fn, variables, args, kwargs, axis_names) -> Bound:
  extras = {}  # nnx graph nodes among the arguments (Rngs, modules)
  if _is_graph_node(apply_fn):
    extras = {
        key: value
        for key, value in list(enumerate(args)) + list(kwargs.items())
        if _is_graph_node(value)
    }
  dynamic_pos = [
      i for i, a in enumerate(args) if i not in extras and _is_dynamic(a)
  ]

  def call_args(dynamic, graph_args):
    out = list(args)
    for i, value in zip(dynamic_pos, dynamic):
      out[i] = value
    kw = dict(kwargs)
    for key, value in graph_args.items():
      if isinstance(key, int):
        out[key] = value
      else:
        kw[key] = value
    return out, kw

  if _is_graph_node(apply_fn):
    params, state, call = _bind_nnx(apply_fn, variables, extras, call_args)
  elif not callable(apply_fn):
    raise ValueError(
        "apply_fn must be a callable apply_fn(variables, *args) or a"
        f" flax.nnx.Module, got {type(apply_fn).__name__}."
    )
  elif isinstance(variables, Mapping) and "params" in variables:
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}

    def call(p, s, dynamic):
      a, kw = call_args(dynamic, {})
      return apply_fn({**s, "params": p}, *a, **kw)
  else:
    params, state = variables, None

    def call(p, s, dynamic):
      del s
      a, kw = call_args(dynamic, {})
      return apply_fn(p, *a, **kw)

  def fn(p, s, *dynamic):
    run = lambda: call(p, s, dynamic)
    for name in axis_names:
      run = _with_axis(run, name)
    return run()

  return Bound(params, state, fn, tuple(args[i] for i in dynamic_pos))


def _with_axis(run: Callable[[], Any], name: str) -> Callable[[], Any]:
  """``run`` with the collective axis ``name`` bound, of size 1."""
  return lambda: jax.vmap(lambda _: run(), axis_name=name, out_axes=None)(
      jnp.zeros((1,))
  )


def _bind_nnx(module, variables, extras, call_args):
  from flax import nnx  # pylint: disable=g-import-not-at-top

  if variables is not None:
    raise ValueError(
        "For a flax.nnx module pass variables=None, e.g."
        " infer_spec(model, None, x): the spec is relative to"
        f" nnx.state(model, nnx.Param). Got variables of type"
        f" {type(variables).__name__}."
    )
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  keys = list(extras)
  extra_def, extra_state = nnx.split(tuple(extras.values())) if extras else (None, None)

  def call(p, s, dynamic):
    state, graph_state = s
    model = nnx.merge(graphdef, p, state)
    graph_args = dict(zip(keys, nnx.merge(extra_def, graph_state))) if extras else {}
    a, kw = call_args(dynamic, graph_args)
    return model(*a, **kw)

  return params, (rest, extra_state), call
