"""G-space optimizers under jax.sharding: sharded == single-device.

XLA_FLAGS must be set before JAX initialises, and conftest.py has already
imported jax, so the sharded runs happen in a subprocess with 8 simulated
CPU devices. Params are sharded with hidden units over a ``model`` mesh axis
(4 devices) and the batch over a ``data`` axis (2 devices); the results must
equal the unsharded run on one device (float64: to rounding of the
reordered reductions), the params must keep their sharding, and the
G-space update may communicate only per-node vectors (row sums and
skeleton products), never a parameter-sized array, and each of them once.
"""

import json
import os
import subprocess
import sys

import pytest

_SCRIPT = r"""
import json
import re
import numpy as np
import jax, jax.numpy as jnp, optax, flax.linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ecopt

assert len(jax.devices()) == 8, jax.devices()
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))

class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16, name="d0")(x))
    x = nn.relu(nn.Dense(24, name="d1")(x))
    x = nn.relu(nn.Dense(8, name="d2")(x))
    return nn.Dense(3, name="d3")(x)

model = Net()
spec = ecopt.Chain("d0", "d1", "d2", "d3")

# Set-up in one compiled program: eager dispatch compiles a program per op.
@jax.jit
def setup(key):
  kx, ky, kp = jax.random.split(key, 3)
  x = jax.random.normal(kx, (8, 12), jnp.float64)
  y = jax.random.randint(ky, (8,), 0, 3)
  params = model.init(kp, x[:1])["params"]
  params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
  params = ecopt.skeleton_init(params, spec)
  # Away from the skeleton's exact ones, so every term of the update matters.
  params = jax.tree.map(
      lambda p: p * (1 + 0.1 * jax.random.normal(jax.random.key(p.size), p.shape)),
      params)
  return x, y, params

x, y, params = setup(jax.random.key(0))

def loss(p, x, y):
  logits = model.apply({"params": p}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

def pspec(a):
  # Hidden units over "model": a kernel's output axis where it divides,
  # else its input axis; biases along their units.
  if a.ndim >= 2:
    if a.shape[-1] % 4 == 0:
      return P(*([None] * (a.ndim - 1)), "model")
    if a.shape[-2] % 4 == 0:
      return P(*([None] * (a.ndim - 2)), "model", None)
    return P()
  return P("model") if a.shape[0] % 4 == 0 else P()

specs = jax.tree.map(pspec, params)
def shard(tree):
  return jax.tree.map(lambda s, a: jax.device_put(a, NamedSharding(mesh, s)),
                      specs, tree, is_leaf=lambda s: isinstance(s, P))

def collectives(text):
  out = []
  for line in text.split("\n"):
    m = re.search(r"=\s*(\(?[^=]*?\)?)\s+(all-reduce|all-gather|reduce-scatter|"
                  r"all-to-all|collective-permute)(?:-start)?\(", line)
    if m:
      shapes = re.findall(r"([a-z]+)\d+\[([\d,]*)\]", m.group(1))
      sizes = [int(np.prod([int(d) for d in dims.split(",") if d]))
               for _, dims in shapes]
      kinds = sorted({kind for kind, _ in shapes})
      out.append((m.group(2), max(sizes or [0]), kinds))
  return out

results = {}
# One optimizer keeps the test fast (compiling for 8 devices dominates); the
# inner transformation is elementwise, so g_space(adam) shards the same way.
for name, make in [
    ("g_sgd_momentum", lambda: ecopt.g_sgd(0.05, spec, momentum=0.9)),
]:
  opt = make()

  @jax.jit
  def step(p, s, x, y):
    g = jax.grad(loss)(p, x, y)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  init = jax.jit(opt.init)
  p, s = params, init(params)
  for _ in range(2):
    p, s = step(p, s, x, y)
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  ys = jax.device_put(y, NamedSharding(mesh, P("data")))
  ps = shard(params)
  ss = init(ps)
  for _ in range(2):
    ps, ss = step(ps, ss, xs, ys)
  same_sharding = all(
      a.sharding.is_equivalent_to(NamedSharding(mesh, sp), a.ndim)
      for a, sp in zip(jax.tree.leaves(ps),
                       jax.tree.leaves(specs, is_leaf=lambda t: isinstance(t, P))))
  rel = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))) /
                  np.max(np.abs(np.asarray(b))))
            for a, b in zip(jax.tree.leaves(ps), jax.tree.leaves(p)))
  moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
              for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(params)))
  # The update alone, on sharded params and gradients.
  grads = shard(jax.jit(jax.grad(loss))(params, x, y))
  upd = jax.jit(lambda g, s, p: opt.update(g, s, p))
  text = upd.lower(grads, init(ps), shard(params)).compile().as_text()
  gathered = re.findall(r"all-gather(?:-start)?\((%[\w.\-]+)\)", text)
  results[name] = {"rel": rel, "moved": moved, "same_sharding": same_sharding,
                   "collectives": collectives(text), "gathered": gathered}
print("RESULT " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def sharded_results():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
      env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_ENABLE_X64"] = "1"
  proc = subprocess.run(
      [sys.executable, "-c", _SCRIPT],
      env=env,
      capture_output=True,
      text=True,
      timeout=900,
      check=False,
  )
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("name", ["g_sgd_momentum"])
def test_sharded_equals_single_device(sharded_results, name):
  res = sharded_results[name]
  # The steps really move the params, so agreement is not trivial.
  assert res["moved"] > 1e-3
  # float64: only the order of the sharded reductions differs.
  assert res["rel"] < 1e-12, res["rel"]


@pytest.mark.parametrize("name", ["g_sgd_momentum"])
def test_sharded_params_keep_their_sharding(sharded_results, name):
  assert sharded_results[name]["same_sharding"]


@pytest.mark.parametrize("name", ["g_sgd_momentum"])
def test_update_communicates_only_per_node_vectors(sharded_results, name):
  coll = sharded_results[name]["collectives"]
  # The row sums of a layer sharded along its outputs need a reduction
  # across the model axis.
  assert any(op == "all-reduce" for op, _, _ in coll), coll
  # Nothing parameter-sized moves: the kernels have 192 to 384 entries, the
  # widest level 24 nodes.
  assert all(size <= 3 * 24 for _, size, _ in coll), coll
  # Only values move, never the gathers' index tables: the skeleton entries
  # are read by gathers batched over the kernel's columns, which the
  # partitioner keeps on the device that owns each column (gathers with
  # free indices made it permute and all-gather their s32 index tables).
  assert all(kinds == ["f"] for _, _, kinds in coll), coll


@pytest.mark.parametrize("name", ["g_sgd_momentum"])
def test_update_gathers_each_vector_once(sharded_results, name):
  gathered = sharded_results[name]["gathered"]
  assert gathered, "expected per-node vectors to be all-gathered"
  # A per-node vector that several loops read is all-gathered once. XLA's
  # partitioner gathers once per pin and does not merge equal all-gathers,
  # so a vector pinned again for every consuming loop (the inverse chain
  # rule's 1/S and the allocation's, or rho of equal-width levels) moved
  # twice: this net had 17 all-gathers of 15 distinct values.
  assert len(gathered) == len(set(gathered)), gathered
