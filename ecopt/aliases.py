"""G-space optimizers with optax's signatures: G-SGD, G-Adam, G-AdamW, G-RMSprop.

Each is :func:`ecopt.g_space` of the optax optimizer of the same name, so the
whole optimizer, learning rate included, runs on basis-path values (a
G-space transformation must be the last of a chain, ``docs/g-space.md`` §4).
Weight decay follows the authors' official code (§7b): it acts on every path
value except the all-skeleton ones.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from ecopt import _tree
from ecopt import chain_transform
from ecopt import paths as paths_lib
from ecopt import spec as spec_lib
from ecopt import structure as structure_lib
from ecopt.transform import g_space


def path_decay_mask(values: Any, spec: spec_lib.Spec) -> Any:
  """Where weight decay on path values applies, as the official G-SGD does.

  True at every coordinate except the in-skeleton ones (whose values are the
  all-skeleton paths ``v_s``, ``docs/g-space.md`` §7b) and False at free
  positions, which are not coordinates; True outside every chain.

  Args:
    values: basis-path values (or params: only the layout is read).
    spec: an ``ecopt.Chain`` or a sequence of them.

  Returns:
    A bool pytree like ``values``.
  """
  structure = structure_lib.resolve(values, spec)
  leaves, treedef = _tree.flat(values)
  out = [jnp.ones(jnp.shape(leaf), bool) for leaf in leaves]
  for geometry in structure.chains:
    for k, layer in enumerate(geometry.layers, start=1):
      mask = paths_lib.coordinate_mask(geometry, k) & ~paths_lib.all_skeleton_mask(geometry, k)
      out[layer.kernel_index] = jnp.broadcast_to(mask, jnp.shape(leaves[layer.kernel_index]))
  return jax.tree_util.tree_unflatten(treedef, out)


class AddPathDecayState(NamedTuple):
  """State of the path-value decay inside :func:`g_sgd` and :func:`g_adamw`."""

  count: jax.Array


def _path_decay(
    weight_decay: optax.ScalarOrSchedule, spec: spec_lib.Spec
) -> optax.GradientTransformationExtraArgs:
  """``updates + weight_decay * v`` where :func:`path_decay_mask` holds.

  Elementwise (optax's masks select whole leaves); leaves outside every chain
  are decayed whole.
  """

  def strength(step):
    return weight_decay(step) if callable(weight_decay) else weight_decay

  def update_chain(geometry, values, updates, step):
    lam = strength(step)
    grads, bias_grads = updates
    kernels, biases = values
    new = []
    for k, (g, v) in enumerate(zip(grads, kernels), start=1):
      where = paths_lib.coordinate_mask(geometry, k) & ~paths_lib.all_skeleton_mask(geometry, k)
      new.append(g + jnp.where(where, lam * v, 0.0).astype(g.dtype))
    new_bias = [
        None if g is None else g + (lam * b).astype(g.dtype)
        for g, b in zip(bias_grads, biases)
    ]
    return new, new_bias

  return chain_transform.chain_transformation(
      "ecopt's path-value weight decay",
      spec,
      update_chain,
      update_outside=lambda u, v, step: u + (strength(step) * v).astype(u.dtype),
      init_state=lambda params: AddPathDecayState(jnp.zeros([], jnp.int32)),
      next_state=lambda state: AddPathDecayState(optax.safe_increment(state.count)),
      step_of=lambda state: state.count,
  )


def g_sgd(
    learning_rate: optax.ScalarOrSchedule,
    spec: spec_lib.Spec,
    *,
    momentum: Optional[ArrayLike] = None,
    nesterov: bool = False,
    weight_decay: ArrayLike = 0.0,
    min_ratio: ArrayLike = 1e-3,
) -> optax.GradientTransformationExtraArgs:
  """G-SGD: stochastic gradient descent on basis-path values.

  ``v <- v - lr * (dL/dv + weight_decay * v)`` (with optional momentum on
  path gradients), realised in weights with the free skeleton weights fixed.
  As in the authors' official code, the decay term skips the all-skeleton
  path values ``v_s`` (:func:`path_decay_mask`). For an equal-width MLP
  without biases one step is the closed form of Meng et al. (2019),
  Appendix 11.1. This is ``ecopt.g_space(optax.chain(decay, optax.sgd(...)),
  spec)``.

  In weight terms a step is ``w' ~ w - lr * g / S_e^2``; start from
  :func:`ecopt.skeleton_init` (the paper's initialisation) so ``S_e`` is 1,
  or expect to need a much smaller learning rate than SGD.

  Args:
    learning_rate: a scalar or an optax schedule.
    spec: an ``ecopt.Chain`` or a sequence of them.
    momentum: optional heavy-ball momentum, applied to path gradients.
    nesterov: use Nesterov momentum.
    weight_decay: decay of the path values, added to the path gradient.
    min_ratio: singular-chart guard, see :func:`ecopt.g_space`.

  Returns:
    A ``GradientTransformationExtraArgs``; ``update`` requires ``params``.

  Example:
    >>> import jax.numpy as jnp, ecopt
    >>> params = {"l0": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)},
    ...           "l1": {"kernel": jnp.ones((4, 2))}}
    >>> spec = ecopt.Chain("l0", "l1")
    >>> opt = ecopt.g_sgd(0.1, spec, momentum=0.9, weight_decay=1e-4)
    >>> state = opt.init(ecopt.skeleton_init(params, spec))

  References:
    Meng et al., "G-SGD: Optimizing ReLU Neural Networks in its Positively
    Scale-Invariant Space", ICLR 2019 (arXiv:1802.03713).
  """
  inner = optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov)
  if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
    inner = optax.chain(_path_decay(weight_decay, spec), inner)
  return g_space(inner, spec, min_ratio=min_ratio)


def g_adam(
    learning_rate: optax.ScalarOrSchedule,
    spec: spec_lib.Spec,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: Optional[Any] = None,
    *,
    nesterov: bool = False,
    min_ratio: ArrayLike = 1e-3,
) -> optax.GradientTransformationExtraArgs:
  """G-Adam: ``optax.adam`` on path gradients and basis-path values.

  ``ecopt.g_space(optax.adam(...), spec)`` with optax's signature. The
  official G-Adam is the same algorithm with ``b2=0.99`` (and ``eps`` added
  after the bias-corrected square root, as optax does), ``docs/g-space.md``
  §7b.

  Args:
    learning_rate: a scalar or an optax schedule.
    spec: an ``ecopt.Chain`` or a sequence of them.
    b1, b2, eps, eps_root, mu_dtype, nesterov: as in ``optax.adam``.
    min_ratio: singular-chart guard, see :func:`ecopt.g_space`.

  Returns:
    A ``GradientTransformationExtraArgs``; ``update`` requires ``params``.

  Example:
    >>> import ecopt
    >>> opt = ecopt.g_adam(1e-3, ecopt.Chain("Dense_0", "Dense_1"), b2=0.99)

  References:
    Meng et al., "G-SGD: Optimizing ReLU Neural Networks in its Positively
    Scale-Invariant Space", ICLR 2019 (arXiv:1802.03713).
  """
  inner = optax.adam(learning_rate, b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov)
  return g_space(inner, spec, min_ratio=min_ratio)


def g_adamw(
    learning_rate: optax.ScalarOrSchedule,
    spec: spec_lib.Spec,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: Optional[Any] = None,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Optional[Any] = None,
    *,
    nesterov: bool = False,
    min_ratio: ArrayLike = 1e-3,
) -> optax.GradientTransformationExtraArgs:
  """G-AdamW: ``optax.adamw`` on basis-path values, decoupled path decay.

  The decay ``-lr * weight_decay * v`` applies where :func:`path_decay_mask`
  is True (every coordinate but the all-skeleton paths), and only to the
  leaves ``mask`` selects when one is given (a pytree of bools or a callable
  of the values, as in ``optax.adamw``).

  Args:
    learning_rate: a scalar or an optax schedule.
    spec: an ``ecopt.Chain`` or a sequence of them.
    b1, b2, eps, eps_root, mu_dtype, weight_decay, mask, nesterov: as in
      ``optax.adamw``.
    min_ratio: singular-chart guard, see :func:`ecopt.g_space`.

  Returns:
    A ``GradientTransformationExtraArgs``; ``update`` requires ``params``.

  Example:
    >>> import ecopt
    >>> opt = ecopt.g_adamw(1e-3, ecopt.Chain("Dense_0", "Dense_1"),
    ...                     weight_decay=1e-2)

  References:
    Meng et al., "G-SGD: Optimizing ReLU Neural Networks in its Positively
    Scale-Invariant Space", ICLR 2019 (arXiv:1802.03713).
  """
  decay = _path_decay(weight_decay, spec)
  if mask is not None:
    decay = optax.masked(decay, mask)
  inner = optax.chain(
      optax.scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov),
      decay,
      optax.scale_by_learning_rate(learning_rate),
  )
  return g_space(inner, spec, min_ratio=min_ratio)


def g_rmsprop(
    learning_rate: optax.ScalarOrSchedule,
    spec: spec_lib.Spec,
    decay: ArrayLike = 0.9,
    eps: ArrayLike = 1e-8,
    initial_scale: ArrayLike = 0.0,
    eps_in_sqrt: bool = True,
    centered: bool = False,
    momentum: Optional[ArrayLike] = None,
    nesterov: bool = False,
    bias_correction: bool = False,
    *,
    min_ratio: ArrayLike = 1e-3,
) -> optax.GradientTransformationExtraArgs:
  """G-RMSprop: ``optax.rmsprop`` on path gradients and basis-path values.

  The official G-RMSprop is this with ``decay=0.99`` and ``eps`` added after
  the square root (``eps_in_sqrt=False``), ``docs/g-space.md`` §7b.

  Args:
    learning_rate: a scalar or an optax schedule.
    spec: an ``ecopt.Chain`` or a sequence of them.
    decay, eps, initial_scale, eps_in_sqrt, centered, momentum, nesterov,
      bias_correction: as in ``optax.rmsprop``.
    min_ratio: singular-chart guard, see :func:`ecopt.g_space`.

  Returns:
    A ``GradientTransformationExtraArgs``; ``update`` requires ``params``.

  Example:
    >>> import ecopt
    >>> opt = ecopt.g_rmsprop(1e-3, ecopt.Chain("Dense_0", "Dense_1"),
    ...                       decay=0.99, eps_in_sqrt=False)

  References:
    Meng et al., "G-SGD: Optimizing ReLU Neural Networks in its Positively
    Scale-Invariant Space", ICLR 2019 (arXiv:1802.03713).
  """
  inner = optax.rmsprop(
      learning_rate, decay, eps, initial_scale, eps_in_sqrt, centered,
      momentum, nesterov, bias_correction,
  )
  return g_space(inner, spec, min_ratio=min_ratio)
