"""One optax conformance suite that every ecopt transformation passes.

Every transformation is admitted through one table, ``ENTRIES``, as optax's
``contrib/_common_test.py`` admits its optimizers: each entry is a factory
``(learning_rate, spec, **hyperparameters) -> GradientTransformation`` (a
transformation that only rescales, such as ``scale_by_path_norm``, is
wrapped into a full optimizer) with the hyperparameters it is tested at.
Every check below runs on every entry; an entry that cannot meet a check
says so in its ``exclusions``, with the reason, and the check reports it as
skipped with that reason. Adding a transformation to ecopt means adding an
entry here.

Every check compares against the entry's own plain update (the
transformation alone, eager, from a fresh state), so a wrapper that changes
the step fails, whatever the transformation computes; the mathematics is
checked elsewhere (test_transform_math, test_invariance, the oracles).
"""

import dataclasses
import functools
import inspect
from typing import Any, Callable, Mapping

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import FrozenDict

import ecopt
import nets

WIDTHS = [5, 7, 4, 3]
N = len(WIDTHS) - 1
SPEC = nets.mlp_spec(WIDTHS)
LR = 0.01


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity
class Entry:
  """One transformation under test.

  Attributes:
    name: the test id.
    factory: ``(learning_rate, spec, **hyperparameters) -> tx``; what
      ``optax.inject_hyperparams`` wraps.
    hyperparameters: numeric keyword arguments the entry is tested with;
      the inject check changes each of them, and ``learning_rate``.
    covers: the public ecopt transformations this entry exercises.
    exclusions: check name -> why this entry cannot meet that check.
  """

  name: str
  factory: Callable[..., optax.GradientTransformation]
  hyperparameters: Mapping[str, float] = dataclasses.field(
      default_factory=dict)
  covers: tuple[str, ...] = ()
  exclusions: Mapping[str, str] = dataclasses.field(default_factory=dict)

  def make(self, learning_rate=LR, **overrides):
    return self.factory(learning_rate, SPEC,
                        **{**self.hyperparameters, **overrides})


def _path_norm_sgd(learning_rate, spec):
  # scale_by_path_norm only rescales; with a learning rate it is Path-SGD
  # written as an optax chain.
  return optax.chain(ecopt.scale_by_path_norm(spec),
                     optax.scale_by_learning_rate(learning_rate))


def _g_space_sgd_with_decay(learning_rate, spec, weight_decay):
  return ecopt.g_space(
      optax.chain(ecopt.add_basis_path_decay(weight_decay, spec),
                  optax.sgd(learning_rate)), spec)


def _incoming_norm_sgd(learning_rate, spec, power):
  # scale_by_incoming_norm only rescales, and names layers, not chains; as
  # the paper's BatchNorm rule it precedes the optimizer.
  del spec
  layers = [f"l{k}" for k in range(N)]
  return optax.chain(ecopt.scale_by_incoming_norm(layers, power=power),
                     optax.sgd(learning_rate))


ENTRIES = [
    Entry("g_sgd", ecopt.g_sgd, covers=("g_sgd",)),
    Entry("g_sgd_momentum",
          lambda learning_rate, spec, momentum: ecopt.g_sgd(
              learning_rate, spec, momentum=momentum, nesterov=True),
          {"momentum": 0.9}, covers=("g_sgd",)),
    Entry("g_space_adam",
          lambda learning_rate, spec, b1: ecopt.g_space(
              optax.adam(learning_rate, b1=b1), spec),
          {"b1": 0.8}, covers=("g_space",)),
    Entry("path_sgd", ecopt.path_sgd, covers=("path_sgd",)),
    Entry("scale_by_path_norm", _path_norm_sgd,
          covers=("scale_by_path_norm",)),
    Entry("g_space_basis_path_decay", _g_space_sgd_with_decay,
          {"weight_decay": 1e-2}, covers=("g_space", "add_basis_path_decay")),
    Entry("scale_by_incoming_norm", _incoming_norm_sgd, {"power": 2.0},
          covers=("scale_by_incoming_norm",)),
]
# The optax-style aliases join the table as soon as ecopt has them
# (test_every_public_transformation_is_in_the_table keeps it so).
ALIASES = {
    "g_adam": {"b1": 0.8, "b2": 0.99},
    "g_adamw": {"b1": 0.8, "weight_decay": 1e-2},
    "g_rmsprop": {"decay": 0.95},
}
ENTRIES += [Entry(name, getattr(ecopt, name), hyper, covers=(name,))
            for name, hyper in ALIASES.items() if hasattr(ecopt, name)]

CHECKS = (
    "extra_args", "jit", "scan", "inject_hyperparams", "schedule", "dtypes",
    "no_recompilation", "partition_and_masked", "apply_if_finite",
    "multi_steps", "chain_after_clipping", "needs_params", "pytree_types",
    "trains",
)


def _admitted(check):
  """The table's entries for ``check``, exclusions marked with their reason."""
  assert check in CHECKS, check
  return [
      pytest.param(entry, id=entry.name, marks=pytest.mark.skip(
          reason=f"{entry.name} excluded: {entry.exclusions[check]}"))
      if check in entry.exclusions else pytest.param(entry, id=entry.name)
      for entry in ENTRIES
  ]


# Inputs (params, data, gradients) are compiled once per dtype. The
# transformations run eagerly unless a check is about jit: eager dispatch
# compiles each operation once per process, while every jitted program of a
# G-space update costs about a second of XLA compilation here.
_skeleton = jax.jit(lambda p: ecopt.skeleton_init(p, SPEC, keep_sign=True))


@functools.cache
def _setup(dtype=jnp.float64, seed=0):
  params = _skeleton(nets.mlp_params(jax.random.key(seed), WIDTHS,
                                     dtype=dtype))
  x, y = nets.data(jax.random.key(seed + 1), WIDTHS[0], WIDTHS[-1],
                   dtype=dtype)
  return params, x, y


@jax.jit
def _grads(params, x, y):
  return jax.grad(nets.mse_loss)(params, x, y, N)


def _hyper(entry, **overrides):
  return {"learning_rate": LR, **entry.hyperparameters, **overrides}


def _updates(entry, grads_seq, params, **overrides):
  """``entry``'s updates on ``grads_seq``, one step each, from a fresh state."""
  tx = entry.factory(spec=SPEC, **_hyper(entry, **overrides))
  state, out = tx.init(params), []
  for g in grads_seq:
    u, state = tx.update(g, state, params)
    params = optax.apply_updates(params, u)
    out.append(u)
  return out


def _expected(entry, grads, params, **overrides):
  return _updates(entry, [grads], params, **overrides)[0]


def _close(a, b, tol):
  err = nets.tree_rel_err(a, b)
  assert err <= tol, err


def _all_zero(tree):
  return all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(tree))


def _loss(params):
  _, x, y = _setup()
  return float(nets.mse_loss(params, x, y, N))


@functools.cache
def _jitted_step(entry):
  """A jitted step of ``entry`` on a cosine schedule, counting its traces."""
  params, x, y = _setup()
  tx = entry.make(optax.cosine_decay_schedule(LR, 10))
  traces = []

  @jax.jit
  def step(p, s):
    traces.append(None)  # runs only while tracing
    u, s = tx.update(_grads(p, x, y), s, p)
    return optax.apply_updates(p, u), s, u

  return tx, step, traces


SCAN_STEPS = 6


@functools.cache
def _scanned(entry):
  """Params after SCAN_STEPS steps of ``entry`` in one jitted lax.scan."""
  params, x, y = _setup()
  tx = entry.make()

  def step(carry, _):
    p, s = carry
    u, s = tx.update(_grads(p, x, y), s, p)
    return (optax.apply_updates(p, u), s), None

  run = jax.jit(lambda c: jax.lax.scan(step, c, None, length=SCAN_STEPS))
  (scanned, _), _ = run((params, tx.init(params)))
  return scanned


def test_every_exclusion_names_a_check():
  for entry in ENTRIES:
    unknown = set(entry.exclusions) - set(CHECKS)
    assert not unknown, (entry.name, unknown)
    assert all(reason.strip() for reason in entry.exclusions.values())


def test_every_public_transformation_is_in_the_table():
  """Each public factory of a GradientTransformation has an entry."""
  public = []
  for name in ecopt.__all__:
    obj = getattr(ecopt, name)
    if inspect.isfunction(obj):
      returns = inspect.signature(obj).return_annotation
      if "GradientTransformation" in str(returns):
        public.append(name)
  assert "g_sgd" in public and "g_space" in public, public
  covered = {name for entry in ENTRIES for name in entry.covers}
  assert sorted(set(public) - covered) == []


@pytest.mark.parametrize("entry", _admitted("extra_args"))
def test_factory_returns_extra_args_transformation(entry):
  assert isinstance(entry.make(), optax.GradientTransformationExtraArgs)


@pytest.mark.parametrize("entry", _admitted("jit"))
def test_jit_matches_eager(entry):
  params, x, y = _setup()
  tx, step, _ = _jitted_step(entry)
  state = tx.init(params)
  eager, _ = tx.update(_grads(params, x, y), state, params)
  _, _, jitted = step(params, state)
  _close(jitted, eager, 1e-12)
  assert not _all_zero(jitted)
  chex.assert_trees_all_close(jax.jit(tx.init)(params), state)


@pytest.mark.parametrize("entry", _admitted("no_recompilation"))
def test_no_recompilation(entry):
  """Steps on a schedule reuse one compiled program."""
  params, _, _ = _setup()
  tx, step, traces = _jitted_step(entry)
  state = tx.init(params)
  for _ in range(5):
    params, state, _ = step(params, state)
  assert len(traces) == 1


@pytest.mark.parametrize("entry", _admitted("scan"))
def test_lax_scan_matches_python_loop(entry):
  params, x, y = _setup()
  tx = entry.make()
  state = tx.init(params)
  looped = params
  for _ in range(SCAN_STEPS):
    u, state = tx.update(_grads(looped, x, y), state, looped)
    looped = optax.apply_updates(looped, u)
  _close(_scanned(entry), looped, 1e-11)
  assert nets.tree_rel_err(looped, params) > 1e-6


@pytest.mark.parametrize("entry", _admitted("trains"))
def test_steps_reduce_the_loss(entry):
  first, last = _loss(_setup()[0]), _loss(_scanned(entry))
  assert np.isfinite(last) and last < 0.99 * first, (first, last)


@pytest.mark.parametrize("entry", _admitted("inject_hyperparams"))
def test_inject_hyperparams(entry):
  """Every numeric hyperparameter can be injected and then changed.

  Two steps on different gradients, since some hyperparameters (Adam's
  b1 and b2) cancel out of a first step.
  """
  params, x, y = _setup()
  grads = [_grads(params, x[:8], y[:8]), _grads(params, x[8:], y[8:])]
  injected = optax.inject_hyperparams(entry.factory)(
      spec=SPEC, **_hyper(entry))

  def second(hyperparams):
    state = injected.init(params)
    state = state._replace(hyperparams={
        **state.hyperparams,
        **{k: jnp.asarray(v) for k, v in hyperparams.items()}})
    u1, state = injected.update(grads[0], state, params)
    return injected.update(grads[1], state,
                           optax.apply_updates(params, u1))[0]

  unchanged = _updates(entry, grads, params)[1]
  _close(second({}), unchanged, 1e-12)
  for name, value in _hyper(entry).items():
    changed = {name: 0.5 * value}
    want = _updates(entry, grads, params, **changed)[1]
    _close(second(changed), want, 1e-12)
    # The change has teeth: the step differs from the unchanged one.
    assert nets.tree_rel_err(want, unchanged) > 1e-9, name


@pytest.mark.parametrize("entry", _admitted("schedule"))
def test_schedule_is_followed(entry):
  """A learning rate that drops to 0 after one step: a zero second update."""
  params, x, y = _setup()
  tx = entry.make(optax.piecewise_constant_schedule(LR, {1: 0.0}))
  g = _grads(params, x, y)
  u1, state = tx.update(g, tx.init(params), params)
  _close(u1, _expected(entry, g, params), 1e-12)
  params = optax.apply_updates(params, u1)
  u2, _ = tx.update(_grads(params, x, y), state, params)
  assert _all_zero(u2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16],
                         ids=["f32", "bf16"])
@pytest.mark.parametrize("entry", _admitted("dtypes"))
def test_dtypes_are_preserved_under_jit(entry, dtype):
  params64, x64, y64 = _setup(jnp.float64)
  ref = _expected(entry, _grads(params64, x64, y64), params64)
  cast = lambda t: jax.tree.map(lambda a: a.astype(dtype), t)
  params, x, y = cast(params64), x64.astype(dtype), y64.astype(dtype)
  tx = entry.make()
  updates, _ = jax.jit(tx.update)(_grads(params, x, y),
                                  jax.jit(tx.init)(params), params)
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert u.dtype == p.dtype and u.shape == p.shape
    assert bool(jnp.all(jnp.isfinite(u)))
  tol = {jnp.float32: 1e-4, jnp.bfloat16: 5e-2}[dtype]
  _close(updates, ref, tol)


@pytest.mark.parametrize("entry", _admitted("partition_and_masked"))
def test_partition_and_masked(entry):
  params, _, _ = _setup()
  params = {**params, "head": {"kernel": jnp.ones((3, 2), jnp.float64)}}
  grads = jax.tree.map(lambda p: 0.1 * jnp.cos(p), params)
  without_head = lambda t: {k: v for k, v in t.items() if k != "head"}
  expected = _expected(entry, without_head(grads), without_head(params))

  labels = {k: jax.tree.map(lambda _, k=k: "plain" if k == "head" else "g", v)
            for k, v in params.items()}
  tx = optax.partition({"g": entry.make(), "plain": optax.sgd(0.5)}, labels)
  updates, _ = tx.update(grads, tx.init(params), params)
  _close(without_head(updates), expected, 1e-12)
  _close(updates["head"], jax.tree.map(lambda g: -0.5 * g, grads["head"]),
         1e-14)

  mask = {k: jax.tree.map(lambda _, k=k: k != "head", v)
          for k, v in params.items()}
  masked = optax.masked(entry.make(), mask)
  m_updates, _ = masked.update(grads, masked.init(params), params)
  _close(without_head(m_updates), expected, 1e-12)
  _close(m_updates["head"], grads["head"], 0.0)


@pytest.mark.parametrize("entry", _admitted("apply_if_finite"))
def test_apply_if_finite(entry):
  params, x, y = _setup()
  tx = optax.apply_if_finite(entry.make(), max_consecutive_errors=3)
  update = jax.jit(tx.update)  # its lax.cond would compile eagerly anyway
  g = _grads(params, x, y)
  bad = jax.tree.map(lambda a: a.at[(0,) * a.ndim].set(jnp.nan), g)
  updates, state = update(bad, tx.init(params), params)
  assert _all_zero(updates)
  assert int(state.notfinite_count) == 1
  updates, state = update(g, state, params)
  _close(updates, _expected(entry, g, params), 1e-12)
  assert int(state.notfinite_count) == 0


@pytest.mark.parametrize("entry", _admitted("multi_steps"))
def test_multi_steps_accumulate(entry):
  params, x, y = _setup()
  tx = optax.MultiSteps(entry.make(), every_k_schedule=2)
  update = jax.jit(tx.update)  # its lax.cond would compile eagerly anyway
  g1, g2 = _grads(params, x[:8], y[:8]), _grads(params, x[8:], y[8:])
  u1, state = update(g1, tx.init(params), params)
  assert _all_zero(u1)
  u2, _ = update(g2, state, params)
  mean_g = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  # optax.MultiSteps keeps its gradient accumulator in float32 even for
  # float64 params, so the mean gradient is only float32-accurate.
  _close(u2, _expected(entry, mean_g, params), 1e-6)


@pytest.mark.parametrize("entry", _admitted("chain_after_clipping"))
def test_chain_after_clipping(entry):
  params, x, y = _setup()
  g = jax.tree.map(lambda a: 100.0 * a, _grads(params, x, y))
  tx = optax.chain(optax.clip_by_global_norm(1.0), entry.make())
  updates, _ = tx.update(g, tx.init(params), params)
  clipped, _ = optax.clip_by_global_norm(1.0).update(g, None)
  _close(updates, _expected(entry, clipped, params), 1e-12)


@pytest.mark.parametrize("entry", _admitted("needs_params"))
def test_update_without_params_is_a_value_error(entry):
  params, x, y = _setup()
  tx = entry.make()
  with pytest.raises(ValueError, match="params"):
    tx.update(_grads(params, x, y), tx.init(params))


@pytest.mark.parametrize("entry", _admitted("pytree_types"))
def test_frozendict_and_nnx_state_match_plain_dicts(entry):
  from flax import nnx  # pylint: disable=g-import-not-at-top

  params, x, y = _setup()
  g = _grads(params, x, y)
  ref = jax.tree.leaves(_expected(entry, g, params))
  tx = entry.make()
  update = lambda g, p: tx.update(g, tx.init(p), p)[0]
  u_frozen = update(FrozenDict(g), FrozenDict(params))
  _close(jax.tree.leaves(u_frozen), ref, 0.0)
  as_state = lambda t: nnx.State(
      {k: {n: nnx.Param(a) for n, a in v.items()} for k, v in t.items()})
  u_nnx = update(as_state(g), as_state(params))
  _close(jax.tree.leaves(u_nnx), ref, 0.0)


def test_nnx_optimizer_trains_an_nnx_model():
  from flax import nnx  # pylint: disable=g-import-not-at-top

  class MLP(nnx.Module):

    def __init__(self, rngs):
      self.layers = nnx.List(
          [nnx.Linear(a, b, rngs=rngs) for a, b in zip(WIDTHS[:-1], WIDTHS[1:])]
      )

    def __call__(self, x):
      for i, layer in enumerate(self.layers):
        x = layer(x)
        if i < len(self.layers) - 1:
          x = nnx.relu(x)
      return x

  model = MLP(nnx.Rngs(0))
  spec = ecopt.Chain(*[f"layers/{i}" for i in range(N)])
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.jit(
      lambda p: ecopt.skeleton_init(p, spec, keep_sign=True))(params))
  start = nnx.state(model, nnx.Param)
  mask = jax.jit(lambda p: ecopt.free_mask(p, spec))(start)
  optimizer = nnx.Optimizer(model, ecopt.g_sgd(LR, spec), wrt=nnx.Param)
  _, x, y = _setup(jnp.float32)
  x, y = x.astype(jnp.float32), y.astype(jnp.float32)
  loss = lambda m: jnp.mean((m(x) - y) ** 2)
  first = float(nnx.jit(loss)(model))

  @nnx.jit  # as nnx training loops run; eager steps compile op by op
  def train_step(model, optimizer):
    optimizer.update(model, nnx.grad(loss)(model))

  for _ in range(5):
    train_step(model, optimizer)
  assert float(nnx.jit(loss)(model)) < first
  end = nnx.state(model, nnx.Param)
  for m, a, b in zip(jax.tree.leaves(mask), jax.tree.leaves(end),
                     jax.tree.leaves(start)):
    np.testing.assert_array_equal(np.asarray(a)[np.asarray(m)],
                                  np.asarray(b)[np.asarray(m)])
