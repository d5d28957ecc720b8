"""Small Dense ReLU chains as plain params dicts, shared by the tests."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import ecopt


# Compiled once per shape: eager jax.random compiles several programs per call.
@functools.partial(jax.jit, static_argnames=("widths", "bias", "dtype", "prefix", "away"))
def _mlp_params(key, widths, *, bias, dtype, prefix, away):
  return _draw_mlp_params(key, widths, bias=bias, dtype=dtype, prefix=prefix, away=away)


def mlp_params(key, widths, *, bias=True, dtype=jnp.float64, prefix="l", away=False):
  """{prefix0: {kernel, bias}, ...} with N(0, 1/fan_in)-ish weights.

  With ``away``, every weight is +-U(0.5, 1.5): skeleton products stay away
  from zero, so a moderate step stays inside the regular chart.
  """
  return _mlp_params(key, tuple(widths), bias=bias, dtype=dtype, prefix=prefix, away=away)


def _draw_mlp_params(key, widths, *, bias, dtype, prefix, away):
  params = {}
  keys = jax.random.split(key, 2 * len(widths))
  for k in range(len(widths) - 1):
    fan_in = widths[k]
    shape = (widths[k], widths[k + 1])
    if away:
      u = jax.random.uniform(keys[2 * k], shape, dtype, -1.0, 1.0)
      kernel = jnp.sign(u) * (0.5 + jnp.abs(u))
    else:
      kernel = jax.random.normal(keys[2 * k], shape, dtype) * (1.5 / np.sqrt(fan_in))
    layer = {"kernel": kernel.astype(dtype)}
    if bias:
      layer["bias"] = (0.1 * jax.random.normal(keys[2 * k + 1], (widths[k + 1],), dtype)).astype(dtype)
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


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def data(key, n_in, n_out, batch=16, dtype=jnp.float64):
  kx, ky = jax.random.split(key)
  return (
      jax.random.normal(kx, (batch, n_in), dtype),
      jax.random.normal(ky, (batch, n_out), dtype),
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
