"""G-space gradient transformations: any optax optimizer on basis-path values."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from ecopt import basis
from ecopt import chain_transform
from ecopt import numerics
from ecopt import paths as paths_lib
from ecopt import spec as spec_lib
from ecopt import structure as structure_lib
from ecopt.params_layout import ParamsLayout

class GSpaceState(NamedTuple):
  """State of :func:`g_space`.

  Attributes:
    inner_state: the state of the inner transformation, which lives in path
      space (e.g. SGD momentum of path gradients).
    layout: the leaf paths and shapes of the params seen at ``init``
      (:class:`ecopt.params_layout.ParamsLayout`), so ``update`` can report a
      params tree that changed since. Static pytree metadata with no leaves:
      checkpointing (orbax, ``flax.serialization``) restores it from the
      target state.
  """

  inner_state: optax.OptState
  layout: ParamsLayout


def _check_state(state: Any, structure: structure_lib.Structure) -> None:
  if not isinstance(state, GSpaceState):
    raise ValueError(
        "ecopt.g_space: expected the GSpaceState its init returned, got"
        f" {type(state).__name__}. A state restored from a checkpoint must be"
        " restored into the structure of opt.init(params) (e.g. orbax's"
        " `target=` / flax.serialization.from_state_dict(opt.init(params),"
        " ...)), and another optimizer's state cannot be reused."
    )
  if not isinstance(state.layout, ParamsLayout):
    raise ValueError(
        "GSpaceState.layout is not a ParamsLayout (got"
        f" {type(state.layout).__name__}); build the state with the"
        " transformation's init."
    )
  state.layout.check(structure)


def _path_space_extra_args(call, skeletons, values, extra_args):
  """The inner's extra args, in path space.

  ``grad`` (a weight gradient, as optax.lbfgs passes) becomes the path
  gradient; ``value_fn`` (a loss of the weights) becomes the loss of the
  weights that the path values stand for, through the gauge map of
  ``docs/g-space.md`` §4; ``value`` is invariant and passes as it is.
  """
  extra = dict(extra_args)
  if "grad" in extra:
    grad_leaves = call.flat(extra["grad"], "`grad` extra argument")
    extra["grad"] = call.unflatten(_path_gradients(call, skeletons, grad_leaves))
  if "value_fn" in extra:
    value_fn = extra["value_fn"]

    def path_value_fn(new_values, *args, **kwargs):
      dv = jax.tree_util.tree_map(jnp.subtract, new_values, values)
      zeros = [jnp.zeros_like(u) for u in call.updates]
      healthy = {
          geometry.chain: paths_lib.GradientDamage((None,) * len(geometry.layers))
          for geometry in call.structure.chains
      }
      updates = _allocate(
          call, skeletons, healthy, zeros, call.flat(dv, "`value_fn` argument"), 0.0
      )
      weights = optax.apply_updates(call.unflatten(call.params), call.unflatten(updates))
      return value_fn(weights, *args, **kwargs)

    extra["value_fn"] = path_value_fn
  return extra


def _forget_path_space_values(inner_state):
  """Marks a line search's stored value and gradient as stale.

  ``optax.scale_by_zoom_linesearch`` keeps the value and gradient of its
  accepted point for ``optax.value_and_grad_from_state``; here they are of
  the loss in path values, while the training loop needs a weight gradient.
  A stored value of Inf makes ``value_and_grad_from_state`` evaluate both
  afresh at the weights.
  """

  def stale(x):
    if isinstance(x, optax.ScaleByZoomLinesearchState):
      return x._replace(value=jnp.full_like(x.value, jnp.inf))
    return x

  return jax.tree_util.tree_map(
      stale, inner_state,
      is_leaf=lambda x: isinstance(x, optax.ScaleByZoomLinesearchState),
  )


def _path_gradients(call, skeletons, grad_leaves):
  def per_chain(geometry, w, g):
    return paths_lib.path_gradients(skeletons[geometry.chain], w[0], *g)[:2]

  return chain_transform.map_chains(
      call.structure, per_chain, [call.params, grad_leaves], grad_leaves
  )


def _allocate(call, skeletons, damages, grad_leaves, dv_leaves, min_ratio):
  """``damages``: per chain, the damage :func:`ecopt.paths.path_gradients`
  found in the gradients ``grad_leaves`` (whose biases carry their own)."""
  return chain_transform.map_chains(
      call.structure,
      lambda g, w, grads, dv: paths_lib.allocate(
          skeletons[g.chain], *w, *dv, grads=grads[0], bias_grads=grads[1],
          damage=damages[g.chain], min_ratio=min_ratio, dtypes=call.param_dtypes(g),
      ),
      [call.params, grad_leaves, dv_leaves],
      call.updates,
      outside=dv_leaves,
  )


def g_space(
    inner: optax.GradientTransformation,
    spec: spec_lib.Spec,
    *,
    min_ratio: ArrayLike = 1e-3,
) -> optax.GradientTransformationExtraArgs:
  """Runs an optax transformation in G-space, on basis-path values.

  Each update (``docs/g-space.md`` §3-§4):

  1. *Inverse chain rule.* The weight gradients ``g = dL/dw`` become path
     gradients ``dL/dv``: ``g_e / S_e`` for a coordinate, and
     ``(w_s g_s - U(k, j)) / v_s`` for the in-skeleton edge of hidden node
     ``(k, j)``, where ``U`` sums ``w g`` over the non-skeleton edges
     downstream of the node's skeleton chain (one backward sweep).
  2. ``inner`` runs with the path gradients as its updates and the basis-path
     values (:func:`ecopt.basis_path_values`) as its params, so anything that
     reads params, such as weight decay, acts in G-space. Its output is a
     path update ``dv``.
  3. *Weight allocation.* ``v' = v + dv`` is realised with the free skeleton
     weights fixed: ``w'_e = (w_e + dv_e / S_e) / rho(k-1, i)`` with
     ``rho = B'/B`` built in one forward sweep. The returned update is
     ``w' - w``.

  The result is a weight update of a nonlinear chart map, not a gradient:
  nothing may follow this transformation in an optax chain (a following
  ``optax.scale(-lr)`` would scale ``w' - w``, not ``dv``). Put the whole
  optimizer inside: ``g_space(optax.adam(lr), spec)``, or use
  :func:`g_sgd`, :func:`g_adam`, :func:`g_adamw`, :func:`g_rmsprop`.

  Free weights never move. Starting from two params related by a node
  scaling, every step yields params related by a node scaling: the same
  network function. A step that takes an in-skeleton path value through zero
  (``rho < 0``) is exact: the node's outgoing weights change sign.

  Singular charts (``docs/g-space.md`` §6): only ``|rho| < min_ratio`` is
  held (that all-skeleton path keeps its value for the step); a coordinate
  whose skeleton product is zero or subnormal is frozen; an entry that would
  overflow moves by 0, and 16-bit parameters saturate at their largest
  finite value. For finite params and gradients every update is finite,
  under ``jit`` too. Non-finite gradients propagate as in optax, so
  ``optax.apply_if_finite`` can skip the step.

  The ``grad`` and ``value_fn`` extra arguments (``optax.lbfgs``'s line
  search) are taken to path space: ``value_fn`` is evaluated at the weights
  the candidate path values stand for. The line search's stored value is
  marked stale, so ``optax.value_and_grad_from_state`` evaluates the loss and
  its weight gradient afresh (the stored ones are of path values).

  Args:
    inner: any optax transformation (``optax.sgd(0.1)``, ``optax.adam(1e-3)``,
      an ``optax.chain``), ending with its learning rate.
    spec: an ``ecopt.Chain`` or a sequence of them; parameters outside every
      chain are their own coordinates.
    min_ratio: a Python float or 0-d array in ``(0, 1)``: the smallest
      ``|v'_s / v_s|`` an all-skeleton path value may take in one step.

  Returns:
    A ``GradientTransformationExtraArgs``; ``update`` requires ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, ecopt, flax.linen as nn
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    >>> spec = ecopt.Chain("layers_0", "layers_2")
    >>> opt = ecopt.g_space(optax.adam(1e-3), spec)
    >>> state = opt.init(params)
    >>> grads = jax.grad(lambda p: model.apply({"params": p},
    ...                                          jnp.ones((1, 4))).sum())(params)
    >>> updates, state = opt.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Meng et al., "G-SGD: Optimizing ReLU Neural Networks in its Positively
    Scale-Invariant Space", ICLR 2019 (arXiv:1802.03713).
  """
  chains = spec_lib.as_chains(spec)
  inner = optax.with_extra_args_support(inner)
  min_ratio = numerics.validate_min_ratio(min_ratio)

  def init_fn(params):
    structure = structure_lib.resolve(params, chains)
    values = basis.basis_path_values(params, chains)
    return GSpaceState(inner.init(values), ParamsLayout.of(structure))

  def update_fn(updates, state, params=None, **extra_args):
    call = chain_transform.open_update(chains, updates, params, "ecopt.g_space")
    _check_state(state, call.structure)
    skeletons, damages = {}, {}

    def per_chain(geometry, w, g):
      sk = skeletons[geometry.chain] = paths_lib.skeleton(geometry, w[0])
      kernels, biases, damages[geometry.chain] = paths_lib.path_gradients(sk, w[0], *g)
      return kernels, biases

    path_grads = chain_transform.map_chains(
        call.structure, per_chain, [call.params, call.updates], call.updates
    )
    values = chain_transform.map_chains(
        call.structure,
        lambda geometry, w: paths_lib.path_values(skeletons[geometry.chain], *w),
        [call.params],
        call.params,
    )
    values = call.unflatten(values)
    extra = _path_space_extra_args(call, skeletons, values, extra_args)
    with chain_transform.in_path_space():
      path_updates, inner_state = inner.update(
          call.unflatten(path_grads), state.inner_state, values, **extra
      )
    inner_state = _forget_path_space_values(inner_state)
    dv = call.flat(path_updates, "inner transformation's output")
    out = _allocate(call, skeletons, damages, call.updates, dv, min_ratio)
    return call.unflatten(out), GSpaceState(inner_state, state.layout)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
