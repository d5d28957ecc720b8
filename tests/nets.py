"""Small Dense ReLU chains as plain params dicts, shared by the tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ecopt


def _rng(key):
  """A numpy generator seeded by a JAX key.

  The draws are numpy's, not jax.random's: compiling jax.random for every new
  shape costs seconds per call, numpy costs nothing. A key still determines
  its draws, and different keys give different draws.
  """
  return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


def mlp_params(key, widths, *, bias=True, dtype=jnp.float64, prefix="l", away=False):
  """{prefix0: {kernel, bias}, ...} with N(0, 1/fan_in)-ish weights.

  With ``away``, every weight is +-U(0.5, 1.5): skeleton products stay away
  from zero, so a moderate step stays inside the regular chart.
  """
  rng = _rng(key)
  params = {}
  for k in range(len(widths) - 1):
    fan_in = widths[k]
    shape = (widths[k], widths[k + 1])
    if away:
      u = rng.uniform(-1.0, 1.0, shape)
      kernel = np.sign(u) * (0.5 + np.abs(u))
    else:
      kernel = rng.standard_normal(shape) * (1.5 / np.sqrt(fan_in))
    layer = {"kernel": jnp.asarray(kernel, dtype)}
    if bias:
      layer["bias"] = jnp.asarray(0.1 * rng.standard_normal(widths[k + 1]), dtype)
    params[f"{prefix}{k}"] = layer
  return params


def mlp_spec(widths, prefix="l"):
  return ecopt.Chain(*[f"{prefix}{k}" for k in range(len(widths) - 1)])


def mlp_apply(params, x, n_layers, prefix="l"):
  h = x
  for k in range(n_layers):
    layer = params[f"{prefix}{k}"]
    h = h @ layer["kernel"]
    if "bias" in layer:
      h = h + layer["bias"]
    if k < n_layers - 1:
      h = jax.nn.relu(h)
  return h


def mse_loss(params, x, y, n_layers, prefix="l"):
  return jnp.mean((mlp_apply(params, x, n_layers, prefix) - y) ** 2)


def data(key, n_in, n_out, batch=16, dtype=jnp.float64):
  """Standard normal inputs and targets (numpy draws, see ``_rng``)."""
  rng = _rng(key)
  return (
      jnp.asarray(rng.standard_normal((batch, n_in)), dtype),
      jnp.asarray(rng.standard_normal((batch, n_out)), dtype),
  )


def rel_err(a, b):
  # numpy, not jnp: eager jnp compiles a small program for every new shape.
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm((a - b).ravel()) / (np.linalg.norm(b.ravel()) + 1e-300))


def tree_rel_err(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  return max(rel_err(x, y) for x, y in zip(la, lb))


def recording_sgd(lr):
  """SGD whose state records the last updates it saw (the path gradients)."""

  def init(params):
    return jax.tree.map(jnp.zeros_like, params)

  def update(updates, state, params=None):
    del state, params
    return jax.tree.map(lambda g: -lr * g, updates), updates

  return optax.GradientTransformation(init, update)
