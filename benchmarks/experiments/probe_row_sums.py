"""Measurement of a proposal: row sums from the backward pass (not in ecopt).

G-space's inverse chain rule needs, for every hidden node ``j`` of level
``k``, the row sum ``sum_j' w[j, j'] g[j, j']`` over the edges leaving it
(``g-space.md`` section 3). ecopt computes it from the weights and the
gradients, one extra pass over every kernel after back-propagation; that
pass is what keeps the MLP training step above 1.03x of optax's
(``benchmarks/README.md``).

By the chain rule the same number is ``sum over the batch of h_k[:, j] *
dL/dh_k[:, j]``, where ``h_k`` is the input of the layer after level ``k``:
the gradient of the loss with respect to a per-node scale ``s_k = 1``
multiplying ``h_k``. Back-propagation would produce it at the cost of the
activations, not of the kernels. It equals the row sums of ``w * g`` only
when ``g`` is the unmodified gradient of that loss (no per-leaf clipping,
no weight decay or noise added to ``g``), so it could only be an opt-in
path; this script measures what it would gain before anyone designs one.

It (1) checks the identity on MLP 784-1024-1024-1024-10, (2) checks that
one G-SGD step with the probe sums equals the step with ecopt's row sums,
and (3) times the full training step of both against optax, interleaved in
one process. The probe sums reach ``ecopt.paths.row_sums`` by replacing it
while the step is traced: a measurement device, not an API.

Measured on the 2-core CPU VM of session 12 (100 rounds, median [q25, q75]
of same-round ratios): identity to 2.3-2.7e-7 relative (float32); one step
equal to 7e-9; `g_sgd` with momentum 1.031x [1.002, 1.065] of `optax.sgd`
with ecopt's row sums against 1.018x [0.983, 1.045] with the probe sums;
`g_space(adam)` 1.044x [1.017, 1.075] against 1.036x [1.013, 1.059].

Usage: python benchmarks/experiments/probe_row_sums.py [--rounds N]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import ecopt  # noqa: E402
from ecopt import paths  # noqa: E402
import overhead  # noqa: E402  (benchmarks/overhead.py: runners and timer)

WIDTHS = (784, 1024, 1024, 1024, 10)


class ProbedMLP(nn.Module):
  """Dense-ReLU stack whose hidden activations can be scaled per node."""

  @nn.compact
  def __call__(self, x, probes=None):
    for k, width in enumerate(WIDTHS[1:]):
      if probes is not None and k > 0:
        x = x * probes[k - 1]
      x = nn.Dense(width, name=f"Dense_{k}")(x)
      if k < len(WIDTHS) - 2:
        x = nn.relu(x)
    return x


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=100)
  args = parser.parse_args(argv)

  model = ProbedMLP()
  spec = ecopt.Chain(*[f"Dense_{k}" for k in range(len(WIDTHS) - 1)])
  kx, ky, kp = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (128, WIDTHS[0]))
  y = jax.random.randint(ky, (128,), 0, WIDTHS[-1])
  params = ecopt.skeleton_init(model.init(kp, x[:1])["params"], spec)
  probes = [jnp.ones((w,)) for w in WIDTHS[1:-1]]

  def loss(p, s, x, y):
    logits = model.apply({"params": p}, x, s)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  grads, probe_grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(
      params, probes, x, y)
  for k in range(1, len(WIDTHS) - 1):
    layer = f"Dense_{k}"
    row = np.asarray(jnp.sum(
        params[layer]["kernel"] * grads[layer]["kernel"], axis=1), np.float64)
    err = np.max(np.abs(np.asarray(probe_grads[k - 1]) - row))
    print(f"level {k}: max |probe - row sum| / max |row sum| ="
          f" {err / np.max(np.abs(row)):.1e}")

  row_sums = paths.row_sums

  def make_step(opt, use_probes):
    def step(p, state, x, y):
      if not use_probes:
        g = jax.grad(lambda p: loss(p, None, x, y))(p)
        u, state = opt.update(g, state, p)
        return optax.apply_updates(p, u), state
      g, sums = jax.grad(loss, argnums=(0, 1))(p, probes, x, y)
      pending = list(reversed(sums))  # path_gradients sweeps levels n-1 .. 1
      paths.row_sums = lambda _, layer: pending.pop(0)
      try:
        u, state = opt.update(g, state, p)
      finally:
        paths.row_sums = row_sums
      return optax.apply_updates(p, u), state

    return jax.jit(step, donate_argnums=(0, 1))

  g_sgd = lambda: ecopt.g_sgd(1e-3, spec, momentum=0.9)
  steps = [make_step(g_sgd(), probe)(*overhead.fresh(params, g_sgd()), x, y)[0]
           for probe in (False, True)]
  diff = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
             for a, b in zip(*map(jax.tree.leaves, steps)))
  print(f"one G-SGD step, probe sums vs row sums: max rel diff {diff:.1e}")

  configs = {
      "sgd_m": (lambda: optax.sgd(1e-3, momentum=0.9), False),
      "g_sgd_m": (g_sgd, False),
      "g_sgd_m_probe": (g_sgd, True),
      "adam": (lambda: optax.adam(1e-4), False),
      "g_adam": (lambda: ecopt.g_space(optax.adam(1e-4), spec), False),
      "g_adam_probe": (lambda: ecopt.g_space(optax.adam(1e-4), spec), True),
  }
  runners = {}
  for name, (make, use_probes) in configs.items():
    opt = make()
    runners[name] = overhead.runner(
        make_step(opt, use_probes), params, opt, (x, y))
  wall, _ = overhead.time_interleaved(runners, args.rounds, 2)
  for new, base in [("g_sgd_m", "sgd_m"), ("g_sgd_m_probe", "sgd_m"),
                    ("g_adam", "adam"), ("g_adam_probe", "adam")]:
    r = [a / b for a, b in zip(wall[new], wall[base])]
    print(f"step {new}/{base}: {np.median(r):.3f}"
          f" [{np.percentile(r, 25):.3f}, {np.percentile(r, 75):.3f}]")


if __name__ == "__main__":
  main()
