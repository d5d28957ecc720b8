"""The scaffold every chain-aware transformation shares.

A transformation of ecopt reads the current params, splits params and
updates by chain (each chain's kernels and biases as per-layer arrays, in the
compute dtype), rewrites each chain and leaves every other leaf alone. This
module does that once: :func:`open_update` checks the call, :func:`map_chains`
runs a per-chain function over any number of trees, and
:func:`chain_transformation` builds a whole stateless transformation from a
per-chain function.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from ecopt import _tree
from ecopt import spec as spec_lib
from ecopt import structure as structure_lib
from ecopt.structure import ChainGeometry, Structure

ChainArrays = tuple[list[jax.Array], list[Optional[jax.Array]]]


def no_params_message(name: str) -> str:
  return (
      f"{name} needs the current params: call `update(updates, state, params)`"
      " (optax.apply_updates follows it as usual)."
  )


@dataclasses.dataclass(frozen=True)
class Update:
  """One ``update`` call, checked: its structure and flat trees."""

  structure: Structure
  params: list[Any]
  updates: list[Any]
  treedef: Any

  def unflatten(self, leaves: Sequence[Any]) -> Any:
    return jax.tree_util.tree_unflatten(self.treedef, list(leaves))

  def flat(self, tree: Any, what: str) -> list[Any]:
    """Leaves of another tree of this call, checked against the params."""
    return _tree.check_same_layout(self.structure, tree, what, "updates")

  def param_dtypes(self, geometry: ChainGeometry) -> list[Any]:
    return [self.structure.dtypes[layer.kernel_index] for layer in geometry.layers]


def open_update(
    chains: Sequence[spec_lib.Chain], updates: Any, params: Any, name: str
) -> Update:
  """Resolves the spec against ``params`` and checks ``updates`` against it."""
  if params is None:
    raise ValueError(no_params_message(name))
  structure = structure_lib.resolve(params, chains)
  update_leaves = _tree.check_same_layout(structure, updates, "updates")
  param_leaves, _ = _tree.flat(params)
  _, treedef = _tree.flat(updates)
  return Update(structure, param_leaves, update_leaves, treedef)


map_chains = _tree.map_chain_leaves


def chain_transformation(
    name: str,
    spec: spec_lib.Spec,
    update_chain: Callable[[ChainGeometry, ChainArrays, ChainArrays, Any], ChainArrays],
    *,
    update_outside: Optional[Callable[[Any, Any, Any], Any]] = None,
    init_state: Callable[[Any], Any] = lambda params: optax.EmptyState(),
    next_state: Callable[[Any], Any] = lambda state: state,
    step_of: Callable[[Any], Any] = lambda state: None,
    check_call: Callable[[], None] = lambda: None,
) -> optax.GradientTransformationExtraArgs:
  """A transformation that rewrites each chain's updates from the params.

  Args:
    name: the public name, for error messages.
    spec: the chains.
    update_chain: ``(geometry, (kernels, biases), (updates, bias_updates),
      step) -> (new_updates, new_bias_updates)``; ``step`` is
      ``step_of(state)``, for schedules.
    update_outside: ``(update, param, step) -> update`` for each leaf outside
      every chain; by default those updates pass unchanged.
    init_state: the state, from the params (default ``optax.EmptyState()``).
    next_state: the state after an update.
    step_of: what ``update_chain`` is told of the state.
    check_call: runs first in every ``update`` (a precondition check).

  Returns:
    A ``GradientTransformationExtraArgs``; ``update`` requires ``params`` and
    ignores other extra arguments.
  """
  chains = spec_lib.as_chains(spec)

  def init_fn(params):
    structure_lib.resolve(params, chains)  # Validates the spec at init.
    return init_state(params)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    check_call()
    call = open_update(chains, updates, params, name)
    step = step_of(state)
    out = map_chains(
        call.structure,
        lambda geometry, w, g: update_chain(geometry, w, g, step),
        [call.params, call.updates],
        call.updates,
    )
    if update_outside is not None:
      inside = call.structure.chain_leaves
      out = [
          u if i in inside else update_outside(jnp.asarray(u), p, step)
          for i, (u, p) in enumerate(zip(out, call.params))
      ]
    return call.unflatten(out), next_state(state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


_PATH_SPACE = contextvars.ContextVar("ecopt_path_space", default=False)


@contextlib.contextmanager
def in_path_space():
  """Marks the inner transformation's call of :func:`ecopt.g_space`.

  Set while the inner transformation's ``update`` is traced, so a
  transformation that is only meaningful on basis-path values can refuse to
  run on weights.
  """
  token = _PATH_SPACE.set(True)
  try:
    yield
  finally:
    _PATH_SPACE.reset(token)


def require_path_space(name: str) -> None:
  """Raises unless called inside :func:`ecopt.g_space`'s inner update."""
  if not _PATH_SPACE.get():
    raise ValueError(
        f"{name} acts on basis-path values and must run inside"
        f" ecopt.g_space(...): e.g. ecopt.g_space(optax.chain({name}(...),"
        " optax.sgd(lr)), spec). Outside it, its params are weights, and its"
        " decay would be neither the basis-path norm's nor invariant."
    )
