"""Which optax transformations keep G-SGD's invariance, and where.

One float64 ReLU MLP and its node-rescaled twin (random factors exp(U(-2, 2))
per hidden node: the same function) are trained for a few steps by each
optimizer of ``CASES``; the gap is the largest relative difference of the
two networks' outputs afterwards. Inside ``g_space`` a transformation sees
path gradients and path values, which the rescaling does not change; before
``g_space`` (or in the loss) it sees weights, which it does.

``python tests/test_invariance_table.py`` prints the README's table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ecopt

WIDTHS = (6, 16, 16, 3)
SPEC = ecopt.Chain("l0", "l1", "l2")
LR = 0.01
STEPS = 5


def _schedule():
  return optax.exponential_decay(LR, transition_steps=1, decay_rate=0.8)


# name -> (where, builder of the optimizer, L2 coefficient in the loss, invariant)
CASES = {
    "g_sgd": ("-", lambda: ecopt.g_sgd(LR, SPEC), 0.0, True),
    "g_space(chain(clip_by_global_norm, sgd))": (
        "inside",
        lambda: ecopt.g_space(optax.chain(optax.clip_by_global_norm(0.1), optax.sgd(LR)), SPEC),
        0.0, True,
    ),
    "g_space(chain(add_decayed_weights, sgd))": (
        "inside",
        lambda: ecopt.g_space(optax.chain(optax.add_decayed_weights(0.1), optax.sgd(LR)), SPEC),
        0.0, True,
    ),
    "g_space(sgd(exponential_decay schedule))": (
        "inside", lambda: ecopt.g_space(optax.sgd(_schedule()), SPEC), 0.0, True,
    ),
    "g_space(adam)": ("inside", lambda: ecopt.g_space(optax.adam(1e-3), SPEC), 0.0, True),
    "chain(clip_by_global_norm, g_sgd)": (
        "before",
        lambda: optax.chain(optax.clip_by_global_norm(0.1), ecopt.g_sgd(LR, SPEC)),
        0.0, False,
    ),
    "chain(add_decayed_weights, g_sgd)": (
        "before",
        lambda: optax.chain(optax.add_decayed_weights(0.1), ecopt.g_sgd(LR, SPEC)),
        0.0, False,
    ),
    "g_sgd, loss + 0.05 * sum(w**2)": ("loss", lambda: ecopt.g_sgd(LR, SPEC), 0.05, False),
    "optax.sgd (reference)": ("-", lambda: optax.sgd(LR), 0.0, False),
}


def _problem():
  rng = np.random.default_rng(0)
  params = {
      f"l{k}": {
          "kernel": jnp.asarray(rng.standard_normal(WIDTHS[k:k + 2]) / np.sqrt(WIDTHS[k])),
          "bias": jnp.asarray(0.1 * rng.standard_normal(WIDTHS[k + 1])),
      }
      for k in range(len(WIDTHS) - 1)
  }
  params = ecopt.skeleton_init(params, SPEC)
  x = jnp.asarray(rng.standard_normal((32, WIDTHS[0])))
  y = jnp.asarray(rng.standard_normal((32, WIDTHS[-1])))
  return params, x, y


def _apply(params, x):
  h = x
  for k in range(len(WIDTHS) - 1):
    h = h @ params[f"l{k}"]["kernel"] + params[f"l{k}"]["bias"]
    if k < len(WIDTHS) - 2:
      h = jax.nn.relu(h)
  return h


def gap(name: str) -> float:
  """Largest relative output gap between the two runs of case ``name``."""
  _, build, l2, _ = CASES[name]
  params, x, y = _problem()
  twin = ecopt.rescale(params, SPEC, jax.random.key(1), log_range=2.0)

  def loss(p):
    penalty = sum(jnp.sum(w ** 2) for w in jax.tree.leaves(p))
    return jnp.mean((_apply(p, x) - y) ** 2) + l2 * penalty

  tx = build()

  @jax.jit
  def train(p):
    def step(_, carry):
      p, state = carry
      updates, state = tx.update(jax.grad(loss)(p), state, p)
      return optax.apply_updates(p, updates), state

    return _apply(jax.lax.fori_loop(0, STEPS, step, (p, tx.init(p)))[0], x)

  a, b = np.asarray(train(params)), np.asarray(train(twin))
  return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_table_claims(name):
  where, _, _, invariant = CASES[name]
  value = gap(name)
  if invariant:
    assert value < 1e-10, (name, value)
  else:
    assert value > 1e-3, (name, value)  # orders of magnitude above rounding


def table() -> str:
  lines = [
      "| optimizer | where the transformation runs | invariant | measured gap |",
      "|---|---|---|---|",
  ]
  for name, (where, _, _, invariant) in CASES.items():
    lines.append(
        f"| `{name}` | {where} | {'yes' if invariant else 'no'} | {gap(name):.1e} |"
    )
  return "\n".join(lines)


if __name__ == "__main__":
  jax.config.update("jax_enable_x64", True)
  print(table())
