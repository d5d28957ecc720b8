"""The update's temporary memory, from XLA's analysis of the compiled update.

Not a timing: the buffers XLA allocates are a deterministic property of the
compiled program. The issue's bound is one parameter's worth of bytes.
``path_sgd`` once broke it 2.9 times over here (a shared ``w * w`` feeding
two reductions, broadcasts written out for reductions, a copy of the
donated kernels). ``g_space(adam)`` stays under it but not far: it writes
one layer's inner update out for a gather (about 0.35x here). Measured
values and the per-model story are in ``benchmarks/README.md``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

import ecopt
import nets

WIDTHS = (256, 512, 512, 10)

OPTIMIZERS = {
    "g_sgd": lambda spec: ecopt.g_sgd(1e-3, spec),
    "g_sgd_momentum": lambda spec: ecopt.g_sgd(1e-3, spec, momentum=0.9),
    "g_space_adam": lambda spec: ecopt.g_space(optax.adam(1e-4), spec),
    "path_sgd": lambda spec: ecopt.path_sgd(1e-3, spec),
}


def _update_temp_bytes(opt, params, grads):
  def update(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  compiled = (
      jax.jit(update, donate_argnums=(0, 1))
      .lower(params, opt.init(params), grads)
      .compile()
  )
  analysis = compiled.memory_analysis()
  if analysis is None:
    pytest.skip("this backend reports no memory analysis")
  return analysis.temp_size_in_bytes


def _problem(widths):
  """float32 params and gradients of a Dense chain of these widths."""
  params = nets.mlp_params(jax.random.key(0), widths, dtype=jnp.float32)
  grads = nets.mlp_params(jax.random.key(1), widths, dtype=jnp.float32)
  return params, grads


def _param_bytes(params):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_update_needs_at_most_one_parameter_worth_of_temporaries(name):
  params, grads = _problem(WIDTHS)
  spec = nets.mlp_spec(WIDTHS)
  temp = _update_temp_bytes(OPTIMIZERS[name](spec), params, grads)
  assert temp <= _param_bytes(params), (name, temp, _param_bytes(params))


def test_path_sgd_update_has_no_parameter_sized_temporary():
  # Tighter than the bound above, which path_sgd once exceeded 2.9 times:
  # no buffer as large as the smallest hidden kernel.
  params, grads = _problem(WIDTHS)
  temp = _update_temp_bytes(
      ecopt.path_sgd(1e-3, nets.mlp_spec(WIDTHS)), params, grads
  )
  assert temp < WIDTHS[0] * WIDTHS[1] * 4, temp


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_large_last_layer_is_not_written_out(name):
  # A classifier head that holds most of the parameters: at the chain's end
  # 1/S_e is one per-node factor, into which XLA folds the learning rate;
  # read twice, Adam's update of the whole head was written to memory (the
  # step of such an MLP ran 2.1x of optax.adam's).
  widths = (64, 128, 128, 4096)
  params, grads = _problem(widths)
  temp = _update_temp_bytes(OPTIMIZERS[name](nets.mlp_spec(widths)), params, grads)
  assert temp < widths[-2] * widths[-1] * 4 // 2, (name, temp)
