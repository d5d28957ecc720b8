"""G-space gradient transformations: any optax optimizer on basis-path values."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from ecopt import _tree
from ecopt import basis as basis_lib
from ecopt import paths as paths_lib
from ecopt import spec as spec_lib
from ecopt import structure as structure_lib

_NO_PARAMS = (
    "ecopt's G-space transformations need the current params: call"
    " `update(updates, state, params)`."
)


class GSpaceState(NamedTuple):
  """State of :func:`g_space`.

  Attributes:
    inner_state: the state of the inner transformation, which lives in path
      space (e.g. SGD momentum of path gradients).
    layout: the leaf paths and shapes of the params seen at ``init``
      (:class:`ecopt.structure.ParamsLayout`), kept so ``update`` can report
      a params tree that changed since. Static pytree metadata with no
      leaves: it costs nothing, and checkpointing (orbax,
      ``flax.serialization``) restores it from the target state.
  """

  inner_state: optax.OptState
  layout: structure_lib.ParamsLayout


def _layout(structure: structure_lib.Structure) -> structure_lib.ParamsLayout:
  return structure_lib.ParamsLayout.of(structure)


def _check_layout(structure: structure_lib.Structure, layout) -> None:
  if not isinstance(layout, structure_lib.ParamsLayout):
    raise ValueError(
        "GSpaceState.layout is not a ParamsLayout (got"
        f" {type(layout).__name__}); build the state with the transformation's"
        " init."
    )
  layout.check(structure)


def g_space(
    inner: optax.GradientTransformation,
    spec: spec_lib.Spec,
    *,
    min_ratio: ArrayLike = 1e-3,
) -> optax.GradientTransformationExtraArgs:
  """Runs an optax transformation in G-space, on basis-path values.

  Each update (``g-space.md`` sections 3 and 4):

  1. *Inverse chain rule.* The weight gradients ``g = dL/dw`` become path
     gradients ``dL/dv``: ``g_e / S_e`` for a coordinate, and
     ``(w_s g_s - U(k, j)) / v_s`` for the in-skeleton edge of hidden node
     ``(k, j)``, where ``U`` sums ``w g`` over the non-skeleton edges
     downstream of the node's skeleton chain (one backward sweep of row sums).
  2. ``inner`` runs with the path gradients as its updates and the
     basis-path values (:func:`ecopt.basis_path_values`) as its params, so
     anything that reads params, such as weight decay, acts in G-space. Its
     output is a path update ``dv``.
  3. *Weight allocation.* ``v' = v + dv`` is realised with the free skeleton
     weights fixed: ``w'_e = (w_e + dv_e / S_e) / rho(k-1, i)`` with
     ``rho = B'/B`` built in one forward sweep. The returned update is
     ``w' - w``, so this transformation must be the last of an optax chain.

  Free weights never move. Starting from two params related by a node
  scaling, every step yields params related by a node scaling: the same
  network function. The structure is static and all work is O(m) array code.

  Singular charts (``docs/singular_charts.md``): for finite params and
  gradients the update is always finite, free weights never move, and where
  nothing below triggers every bit is the exact formula's. (1) A coordinate
  whose skeleton product ``S_e`` (or in-skeleton path value ``v_s``) is zero,
  subnormal, not finite, or has a reciprocal that overflows is frozen: path
  gradient 0, path value kept. (2) One step changes an in-skeleton path value
  by a factor ``rho`` clipped to ``[min_ratio, 1/eps]``: it never reaches
  zero or flips sign, and stays finite (the clip is G-invariant). (3) A path
  gradient or weight update that overflows (or a new weight that would) is 0
  for that step; a path value that overflows is saturated at the largest
  float. Non-finite gradients are not guarded: they propagate to the updates
  as in optax, so ``optax.apply_if_finite`` can skip the step.

  Args:
    inner: any optax transformation (e.g. ``optax.sgd(0.1)``,
      ``optax.adam(1e-3)``, an ``optax.chain``).
    spec: an ``ecopt.Chain`` or a sequence of them; parameters outside every
      chain are their own coordinates.
    min_ratio: smallest allowed ratio ``B'/B`` of an in-skeleton path value
      in one step (must be in ``(0, 1]``).

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

  def init_fn(params):
    structure = structure_lib.resolve(params, chains)
    # Compiled: called eagerly, op-by-op dispatch took seconds per new shape.
    values = basis_lib.basis_path_values(params, chains)
    return GSpaceState(inner.init(values), _layout(structure))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(_NO_PARAMS)
    structure = structure_lib.resolve(params, chains)
    _check_layout(structure, state.layout)
    grad_leaves = _tree.check_same_layout(structure, updates, "updates")
    param_leaves, param_def = _tree.flat(params)
    _, grad_def = _tree.flat(updates)

    path_grads, values, saved = list(grad_leaves), list(param_leaves), []
    for geometry in structure.chains:
      views, biases = _tree.chain_views(geometry, param_leaves)
      grads, bias_grads = _tree.chain_views(geometry, grad_leaves)
      sk = paths_lib.skeleton(geometry, views)
      pg, pgb = paths_lib.path_gradients(geometry, sk, views, grads, bias_grads)
      _tree.write_chain(geometry, path_grads, grad_leaves, pg, pgb)
      pv, pvb = paths_lib.path_values(geometry, sk, views, biases)
      _tree.write_chain(geometry, values, param_leaves, pv, pvb)
      saved.append((geometry, sk, views))

    path_updates, inner_state = inner.update(
        jax.tree_util.tree_unflatten(grad_def, path_grads),
        state.inner_state,
        jax.tree_util.tree_unflatten(param_def, values),
        **extra_args,
    )
    dv_leaves = _tree.check_same_layout(
        structure, path_updates, "inner transformation's output", "updates"
    )
    out = list(dv_leaves)
    for geometry, sk, views in saved:
      dv, dvb = _tree.chain_views(geometry, dv_leaves)
      d, db = paths_lib.allocate(geometry, sk, views, dv, dvb, min_ratio)
      _tree.write_chain(geometry, out, grad_leaves, d, db)
    new_updates = jax.tree_util.tree_unflatten(grad_def, out)
    return new_updates, GSpaceState(inner_state, state.layout)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def g_sgd(
    learning_rate: optax.ScalarOrSchedule,
    spec: spec_lib.Spec,
    *,
    momentum: Optional[float] = None,
    nesterov: bool = False,
    min_ratio: ArrayLike = 1e-3,
) -> optax.GradientTransformationExtraArgs:
  """G-SGD: stochastic gradient descent on basis-path values.

  ``v <- v - lr * dL/dv`` (with optional momentum on path gradients), realised
  in weights with the free skeleton weights fixed. For an equal-width MLP
  without biases one step is the closed form of Meng et al. (2019),
  Appendix 11.1. This is ``ecopt.g_space(optax.sgd(...), spec)``.

  In weight terms a step is ``w' ~ w - lr * g / S_e^2``; start from
  :func:`ecopt.skeleton_init` (the paper's initialisation) so ``S_e`` is 1,
  or expect to need a much smaller learning rate than SGD.

  Args:
    learning_rate: a scalar or an optax schedule.
    spec: an ``ecopt.Chain`` or a sequence of them.
    momentum: optional heavy-ball momentum, applied to path gradients.
    nesterov: use Nesterov momentum.
    min_ratio: singular-chart guard, see :func:`ecopt.g_space`.

  Returns:
    A ``GradientTransformationExtraArgs``; ``update`` requires ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, ecopt, flax.linen as nn
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    >>> spec = ecopt.Chain("layers_0", "layers_2")
    >>> params = ecopt.skeleton_init(params, spec)
    >>> opt = ecopt.g_sgd(0.1, spec, momentum=0.9)
    >>> state = opt.init(params)

  References:
    Meng et al., "G-SGD: Optimizing ReLU Neural Networks in its Positively
    Scale-Invariant Space", ICLR 2019 (arXiv:1802.03713).
  """
  return g_space(
      optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
      spec,
      min_ratio=min_ratio,
  )
