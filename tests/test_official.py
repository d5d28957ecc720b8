"""ecopt against the authors' official G-SGD code, transcribed to NumPy.

The oracle below restates, in NumPy and in this file's own words, the MLP step
of the official implementation (MSRA-COLT/gsgd): ``gsgd_mlp/opt/gopt_general_mlp.py``
for plain G-SGD, and the MLP branches (``ec_step_mlp``) of
``gsgd_cnn/opt/gopt_SGD_method.py`` (momentum, weight decay),
``gopt_Adam_method.py`` and ``gopt_RMSprop_method.py``. Their layout is
PyTorch's: a layer's weight ``W`` is ``(out, in)``. Their construction:

- *Masks.* Each layer marks ``max(in, out)`` skeleton ("red") entries: the
  first layer one per output row ``r`` at column ``r % in``; the last layer one
  per input column ``c`` at row ``c % out``; a middle layer one per column
  (row ``c % out``) if it narrows, else one per row (column ``r % in``). Their
  initialisation (``cal_mask``) overwrites every red entry with 1.
- *The special layer* ``s_idx``: the first layer whose output level is the
  widest hidden level. Only its red entries ever change; every other red
  entry stays 1, so the red entry of row ``j`` of the special layer is the
  value ``v[j]`` of the all-skeleton path through widest node ``j``.
- *Path gradients.* A non-red ("blue") entry below the special layer has
  path value ``w * v[row]``, above it ``w * v[column]``, in it ``w``; its path
  gradient is ``g / v[...]`` (``g`` in the special layer). The red entry of
  row ``j`` gets ``(v[j] g_red[j] - sigma[j]) / v[j]``, where ``sigma[j]``
  adds ``w * g`` over the blue entries of the rows ``j`` of the layers below
  and of the columns ``j`` of the layers above.
- *Weight decay* adds ``wd * (path value)`` to every blue path gradient,
  none to the red ones.
- *The inner rule* acts on path gradients: heavy-ball momentum
  (``buf = mu buf + p``), Adam with the bias corrections folded into the step
  size and ``eps`` added after the square root of the raw second moment
  (defaults ``betas=(0.9, 0.99)``, ``eps=1e-8``), or RMSprop without bias
  correction (``alpha=0.99``, ``eps`` after the square root).
- *Their R.* ``R[j] = 1 + dv_red[j] / v[j]`` (``1 - lr p_red / v`` for SGD):
  the factor by which ``v[j]`` changes; negative ``R`` flips the sign of the
  red entry, and nothing in their code clips it.
- *Allocation.* Blue entries of the special layer move by ``dv``; its red
  entries are multiplied by ``R``; a blue entry below it becomes
  ``(w + dv / v[row]) / R[row]``, above it ``(w + dv / v[col]) / R[col]``.

Their basis roots the skeleton at the widest layer; ecopt's (``docs/g-space.md``
§2) follows in-skeleton chains back to the input. For equal or shrinking
widths the two charts coincide entry for entry (the same free weights), so
the weights agree. For growing or unimodal widths the free weights differ but
the basis paths are the same, so the network function and every path value
agree at every step, and the weights differ by a node scaling. For widths
that are not unimodal the official red entries outnumber ``H + h_max``: some
all-skeleton paths are pinned at 1 and the official method moves in fewer
than ``m - H`` coordinates (``docs/g-space.md`` §7b); that difference is shown
below, not hidden.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ecopt
import nets

STEPS = 20


# --------------------------------------------------------------------------
# The official algorithm, in NumPy (torch layout: W is (out, in)).


def official_red_mask(n_out, n_in, where):
  """Boolean (out, in) mask of one layer's red entries ('first', 'middle', 'last')."""
  mask = np.zeros((n_out, n_in), bool)
  one_per_row = where == "first" or (where == "middle" and n_in <= n_out)
  if one_per_row:
    rows = np.arange(n_out)
    mask[rows, rows % n_in] = True
  else:
    cols = np.arange(n_in)
    mask[cols % n_out, cols] = True
  return mask


def official_special_layer(Ws):
  """(s_idx, width): first layer whose output is the widest hidden level."""
  best, width = 0, 0
  for idx, W in enumerate(Ws[:-1]):
    if W.shape[0] > width:
      best, width = idx, W.shape[0]
  return best, width


def official_masks_of(widths):
  n = len(widths) - 1
  where = ["first"] + ["middle"] * (n - 2) + ["last"]
  return [official_red_mask(widths[k + 1], widths[k], where[k]) for k in range(n)]


def official_init(widths, seed):
  """nn.Linear's default draw (U(+-1/sqrt(fan_in))), then every red entry set to 1."""
  rng = np.random.default_rng(seed)
  Ws = []
  for k, mask in enumerate(official_masks_of(widths)):
    bound = 1.0 / np.sqrt(widths[k])
    W = rng.uniform(-bound, bound, mask.shape)
    W[mask] = 1.0
    Ws.append(W)
  return Ws


class OfficialGSGD:
  """One official G-space optimizer on a bias-free MLP (torch layout).

  ``rule`` is ``"sgd"`` (momentum ``mu``, weight decay ``wd``), ``"adam"``
  (``betas``, ``eps``) or ``"rmsprop"`` (``alpha``, ``eps``). ``step`` returns
  the new weights and records ``R`` of the step in ``self.last_R``.
  """

  def __init__(self, Ws, lr, rule="sgd", mu=0.0, wd=0.0, betas=(0.9, 0.99), alpha=0.99, eps=1e-8):
    widths = [Ws[0].shape[1]] + [W.shape[0] for W in Ws]
    self.masks = official_masks_of(widths)
    self.s, self.h = official_special_layer(Ws)
    self.lr, self.rule, self.mu, self.wd = lr, rule, mu, wd
    self.betas, self.alpha, self.eps = betas, alpha, eps
    self.first = [np.zeros_like(W) for W in Ws]
    self.second = [np.zeros_like(W) for W in Ws]
    self.t = 0
    self.last_R = None

  def _path_scale(self, k, W, v):
    """The skeleton product of each blue entry of layer k, broadcast to W's shape."""
    n_out, n_in = W.shape
    if k < self.s:
      return np.broadcast_to(v[:n_out, None], W.shape)
    if k > self.s:
      return np.broadcast_to(v[None, :n_in], W.shape)
    return np.ones(W.shape)

  def step(self, Ws, Gs):
    s, masks = self.s, self.masks
    self.t += 1
    red_s = masks[s]
    v = np.where(red_s, Ws[s], 0.0).sum(axis=1)
    g_red = np.where(red_s, Gs[s], 0.0).sum(axis=1)
    sigma = np.zeros(self.h)
    for k, (W, G, M) in enumerate(zip(Ws, Gs, masks)):
      phi = np.where(M, 0.0, W * G)
      if k < s:
        sigma[: W.shape[0]] += phi.sum(axis=1)
      elif k > s:
        sigma[: W.shape[1]] += phi.sum(axis=0)

    # Path gradients, laid out like the weights (red entries of layers other
    # than the special one are never read).
    grads = []
    for k, (W, G, M) in enumerate(zip(Ws, Gs, masks)):
      S = self._path_scale(k, W, v)
      p = G / S + self.wd * W * S
      if k == s:
        p = np.where(M, ((v * g_red - sigma) / v)[:, None], p)
      grads.append(np.where(M & (k != s), 0.0, p))

    dvs = [self._inner(k, p) for k, p in enumerate(grads)]
    R = 1.0 + np.where(red_s, dvs[s], 0.0).sum(axis=1) / v
    self.last_R = R

    new = []
    for k, (W, M, dv) in enumerate(zip(Ws, masks, dvs)):
      n_out, n_in = W.shape
      if k == s:
        W2 = np.where(M, W * R[:, None], W + dv)
      elif k > s:
        W2 = np.where(M, W, (W + dv / v[None, :n_in]) / R[None, :n_in])
      else:
        W2 = np.where(M, W, (W + dv / v[:n_out, None]) / R[:n_out, None])
      new.append(W2)
    return new

  def _inner(self, k, p):
    """The path update dv of one layer's entries from their path gradients."""
    lr = self.lr
    if self.rule == "sgd":
      self.first[k] = self.mu * self.first[k] + p
      return -lr * self.first[k]
    if self.rule == "adam":
      b1, b2 = self.betas
      self.first[k] = b1 * self.first[k] + (1 - b1) * p
      self.second[k] = b2 * self.second[k] + (1 - b2) * p * p
      size = lr * np.sqrt(1 - b2**self.t) / (1 - b1**self.t)
      # With eps=0 the never-read red entries of other layers are 0/0.
      with np.errstate(invalid="ignore"):
        return -size * self.first[k] / (np.sqrt(self.second[k]) + self.eps)
    if self.rule == "rmsprop":
      a = self.alpha
      self.second[k] = a * self.second[k] + (1 - a) * p * p
      return -lr * p / (np.sqrt(self.second[k]) + self.eps)
    raise ValueError(self.rule)


# --------------------------------------------------------------------------
# The ecopt side and the comparisons.


def official_adam(learning_rate, b1=0.9, b2=0.99, eps=1e-8):
  """Adam as the official code writes it, as an optax transformation.

  ``-lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(s) + eps)``: the same as
  ``optax.adam`` except that ``eps`` is added to the root of the raw second
  moment, not of the bias-corrected one (optax's ``eps`` would have to be
  ``eps * sqrt(1 - b2^t)``, which changes with ``t``). With it ecopt runs the
  official G-Adam exactly.
  """

  def init(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return (jnp.zeros([], jnp.int32), zeros, zeros)

  def update(updates, state, params=None):
    del params
    t, m, s = state
    t = t + 1
    m = jax.tree.map(lambda a, g: b1 * a + (1 - b1) * g, m, updates)
    s = jax.tree.map(lambda a, g: b2 * a + (1 - b2) * g * g, s, updates)
    size = learning_rate * jnp.sqrt(1 - b2**t) / (1 - b1**t)
    out = jax.tree.map(lambda a, b: -size * a / (jnp.sqrt(b) + eps), m, s)
    return out, (t, m, s)

  return optax.GradientTransformation(init, update)


def to_flax(Ws):
  return {f"l{k}": {"kernel": jnp.asarray(W.T)} for k, W in enumerate(Ws)}


def from_flax(params, n):
  return [np.asarray(params[f"l{k}"]["kernel"]).T for k in range(n)]


def path_tensor(Ws):
  """Every input-to-output path value of a bias-free MLP (torch layout), G-invariant."""
  P = Ws[0].T  # (in, h1)
  for W in Ws[1:]:
    P = np.einsum("...i,ji->...ij", P, W)
  return P


def forward(Ws, x):
  h = x
  for k, W in enumerate(Ws):
    h = h @ W.T
    if k < len(Ws) - 1:
      h = np.maximum(h, 0.0)
  return h


def problem(widths, seed, target_scale=1.0, batch=12):
  rng = np.random.default_rng(seed + 100)
  x = rng.standard_normal((batch, widths[0]))
  y = target_scale * rng.standard_normal((batch, widths[-1]))
  return jnp.asarray(x), jnp.asarray(y)


def _grad_fn(n):
  return jax.jit(jax.grad(nets.mse_loss), static_argnums=3)


def run_both(widths, make_ecopt, make_official, seed=0, target_scale=1.0, steps=STEPS):
  """Runs both optimizers from the official init; returns both trajectories and every R.

  ``make_ecopt(spec)`` and ``make_official(Ws)`` build the two optimizers.
  """
  n = len(widths) - 1
  Ws = official_init(widths, seed)
  official = make_official(Ws)
  x, y = problem(widths, seed, target_scale)
  grad = _grad_fn(n)
  opt = make_ecopt(ecopt.Chain(*[f"l{k}" for k in range(n)]))
  params = to_flax(Ws)
  state = opt.init(params)
  update = jax.jit(opt.update)
  oracle_Ws, Rs, ours, theirs = Ws, [], [], []
  for _ in range(steps):
    g = grad(params, x, y, n)
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
    G = from_flax(grad(to_flax(oracle_Ws), x, y, n), n)
    oracle_Ws = official.step(oracle_Ws, G)
    Rs.append(official.last_R)
    ours.append(from_flax(params, n))
    theirs.append(oracle_Ws)
  return ours, theirs, np.concatenate(Rs), np.asarray(x)


def max_rel(a_list, b_list):
  return max(nets.rel_err(a, b) for a, b in zip(a_list, b_list))


def assert_same_function(ours, theirs, x, tol=1e-12):
  for step, (a, b) in enumerate(zip(ours, theirs)):
    assert nets.rel_err(path_tensor(a), path_tensor(b)) < tol, step
    assert nets.rel_err(forward(a, x), forward(b, x)) < tol, step


def assert_same_weights(ours, theirs, tol=1e-12):
  for step, (a, b) in enumerate(zip(ours, theirs)):
    assert max_rel(a, b) < tol, step


EQUAL = [4, 4, 4, 4]


def test_transcription_matches_the_paper_closed_form_on_step_one():
  """The oracle itself: its first step is Appendix 11.1's, entry by entry."""
  widths = [3, 3, 3, 3]
  Ws = official_init(widths, 5)
  x, y = problem(widths, 5)
  G = from_flax(_grad_fn(3)(to_flax(Ws), x, y, 3), 3)
  lr = 0.01
  got = OfficialGSGD(Ws, lr).step(Ws, G)
  # Appendix 11.1 with every skeleton weight 1 except the first layer's
  # diagonal a_j: v_j = a_j, and dL/dv_j = (a_j g_jj - sum of w g over the
  # non-diagonal entries of column j of every later layer) / a_j.
  a = np.diag(Ws[0]).copy()
  down = sum(np.where(np.eye(3, dtype=bool), 0.0, W * g).sum(axis=0) for W, g in zip(Ws[1:], G[1:]))
  dv = -lr * (a * np.diag(G[0]) - down) / a
  ratio = (a + dv) / a
  want0 = Ws[0] - lr * G[0]
  np.fill_diagonal(want0, a + dv)
  np.testing.assert_allclose(got[0], want0, rtol=1e-14)
  for W, g, W2 in zip(Ws[1:], G[1:], got[1:]):
    want = (W - lr * g / a[None, :] ** 2) / ratio[None, :]
    np.fill_diagonal(want, 1.0)
    np.testing.assert_allclose(W2, want, rtol=1e-13)


# name: (lr, momentum, weight decay, target scale, whether some R < 0).
# A large first loss (targets x8) makes a step take an in-skeleton path value
# through zero: the paper's update and the official code flip its sign.
SGD_CASES = {
    "plain": (0.05, 0.0, 0.0, 1.0, False),
    "plain-flip": (0.1, 0.0, 0.0, 8.0, True),
    "momentum": (0.03, 0.9, 0.0, 1.0, False),
    "momentum-decay": (0.03, 0.9, 0.01, 1.0, False),
    "momentum-decay-flip": (0.01, 0.9, 0.01, 8.0, True),
}


def _assert_flips(R):
  assert (R < 0).any(), "some step must take an in-skeleton path value through zero"
  # Every ratio stays clear of zero, where a step is held (docs/g-space.md §6).
  assert np.abs(R).min() > 0.1


@pytest.mark.parametrize("name", list(SGD_CASES))
def test_g_sgd_equal_widths(name):
  lr, mu, wd, target, flips = SGD_CASES[name]
  decay = {"weight_decay": wd} if wd else {}
  ours, theirs, R, x = run_both(
      EQUAL,
      lambda spec: ecopt.g_sgd(lr, spec, momentum=mu or None, **decay),
      lambda Ws: OfficialGSGD(Ws, lr, mu=mu, wd=wd),
      target_scale=target,
  )
  if flips:
    _assert_flips(R)
  else:
    assert R.min() > 0
  assert_same_weights(ours, theirs)
  assert_same_function(ours, theirs, x)


def test_weight_decay_is_not_the_all_path_decay():
  """Teeth for the decay test: shrinking the in-skeleton values too is another method."""
  lr, mu, wd = 0.03, 0.9, 0.01
  every_path = lambda spec: ecopt.g_space(optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, mu)), spec)
  ours, theirs, _, _ = run_both(EQUAL, every_path, lambda Ws: OfficialGSGD(Ws, lr, mu=mu, wd=wd), steps=3)
  assert max_rel(ours[-1], theirs[-1]) > 1e-6


def test_g_adam_official_defaults_exact():
  """Official G-Adam: betas (0.9, 0.99), eps after the raw root; exact with official_adam."""
  lr = 0.01
  ours, theirs, R, x = run_both(
      EQUAL,
      lambda spec: ecopt.g_space(official_adam(lr, 0.9, 0.99, 1e-8), spec),
      lambda Ws: OfficialGSGD(Ws, lr, rule="adam"),
  )
  assert_same_weights(ours, theirs)
  assert_same_function(ours, theirs, x)


def test_optax_adam_differs_from_official_only_by_eps_placement():
  """optax's Adam puts eps on the bias-corrected root.

  Its denominator is ``sqrt(s) + eps * sqrt(1 - b2^t)`` against the official
  ``sqrt(s) + eps`` (both over ``sqrt(1 - b2^t)``): a relative difference of
  at most ``eps / sqrt(s)``, a few 1e-7 after 20 steps here, so the runs agree
  to 1e-5 and no better. With ``eps=0`` the two are one formula.
  """
  lr = 0.01
  optax_adam = lambda eps: lambda spec: ecopt.g_space(optax.adam(lr, b1=0.9, b2=0.99, eps=eps), spec)
  ours, theirs, _, _ = run_both(EQUAL, optax_adam(1e-8), lambda Ws: OfficialGSGD(Ws, lr, rule="adam"))
  assert 1e-12 < max_rel(ours[-1], theirs[-1]) < 1e-5
  assert_same_weights(ours, theirs, tol=1e-5)
  ours, theirs, _, x = run_both(EQUAL, optax_adam(0.0), lambda Ws: OfficialGSGD(Ws, lr, rule="adam", eps=0.0))
  assert_same_weights(ours, theirs)
  assert_same_function(ours, theirs, x)


def _official_rmsprop(lr):
  # eps_in_sqrt=False puts eps after the root, as the official code does.
  return lambda spec: ecopt.g_space(optax.rmsprop(lr, decay=0.99, eps=1e-8, eps_in_sqrt=False), spec)


def test_g_rmsprop_official_defaults():
  """Official G-RMSprop: decay 0.99, eps after the root, no bias correction."""
  lr = 0.003
  ours, theirs, R, x = run_both(EQUAL, _official_rmsprop(lr), lambda Ws: OfficialGSGD(Ws, lr, rule="rmsprop"))
  assert_same_weights(ours, theirs)
  assert_same_function(ours, theirs, x)


# The aliases with the official defaults, each against the official rule.
ALIASES = {
    "g_adam": (0.01, lambda lr, spec: ecopt.g_adam(lr, spec, b1=0.9, b2=0.99, eps=0.0), dict(rule="adam", eps=0.0)),
    "g_rmsprop": (
        0.003,
        lambda lr, spec: ecopt.g_rmsprop(lr, spec, decay=0.99, eps=1e-8, eps_in_sqrt=False),
        dict(rule="rmsprop"),
    ),
}


@pytest.mark.parametrize("name", list(ALIASES))
def test_aliases_with_official_defaults(name):
  lr, make, official = ALIASES[name]
  ours, theirs, _, _ = run_both(
      EQUAL, lambda spec: make(lr, spec), lambda Ws: OfficialGSGD(Ws, lr, **official)
  )
  assert_same_weights(ours, theirs)


def test_g_rmsprop_sign_flip_on_the_first_step():
  lr = 0.3
  ours, theirs, R, x = run_both(
      EQUAL,
      _official_rmsprop(lr),
      lambda Ws: OfficialGSGD(Ws, lr, rule="rmsprop"),
      target_scale=8.0,
  )
  _assert_flips(R)
  assert (R[: EQUAL[1]] < 0).any()
  assert_same_weights(ours, theirs)
  assert_same_function(ours, theirs, x)


# Widths (input, hidden..., output) -> whether the charts coincide. Equal and
# shrinking: the same free weights as ecopt's, so the weights agree. Growing
# and unimodal: the same basis paths with other free weights, so the
# function and every path value agree while the weights differ by a node
# scaling.
UNIMODAL = {
    "equal": ([4, 4, 4, 4, 4], True),
    "shrinking": ([3, 7, 5, 4, 2], True),
    "growing": ([3, 2, 4, 6, 2], False),
    "unimodal": ([3, 4, 7, 5, 2], False),
    "unimodal-plateau": ([2, 3, 6, 6, 4, 3], False),
}


@pytest.mark.parametrize("name", list(UNIMODAL))
def test_unimodal_widths_same_function_every_step(name):
  (widths, same_chart), lr = UNIMODAL[name], 0.05
  ours, theirs, R, x = run_both(
      widths, lambda spec: ecopt.g_sgd(lr, spec, momentum=0.5), lambda Ws: OfficialGSGD(Ws, lr, mu=0.5), seed=1
  )
  assert_same_function(ours, theirs, x)
  if same_chart:
    assert_same_weights(ours, theirs)
  else:
    assert max_rel(ours[-1], theirs[-1]) > 1e-3


def _official_free_count(widths):
  """Red entries outside the special layer: the weights the official code never moves."""
  masks = official_masks_of(widths)
  s, h = official_special_layer([np.zeros(m.shape) for m in masks])
  return sum(int(m.sum()) for m in masks) - h


@pytest.mark.parametrize("name", list(UNIMODAL))
def test_official_chart_has_full_dimension_for_unimodal_widths(name):
  widths, _ = UNIMODAL[name]
  assert _official_free_count(widths) == sum(widths[1:-1])


def test_non_unimodal_widths_differ_by_design():
  """Their model's shape (3, 8, 2, 8, 3): the official chart pins some path values.

  With two peaks the official red entries outnumber ``H + h_max`` (32 red
  entries, 8 in the special layer: 24 never move, against ``H = 18`` free
  weights in ecopt), so official G-SGD moves in 6 fewer coordinates than
  the G-space has, and the two methods take different steps from the first.
  """
  widths, lr = [3, 8, 2, 8, 3], 0.05
  assert _official_free_count(widths) == 24 and sum(widths[1:-1]) == 18
  ours, theirs, _, x = run_both(widths, lambda spec: ecopt.g_sgd(lr, spec), lambda Ws: OfficialGSGD(Ws, lr), seed=2, steps=1)
  assert nets.rel_err(path_tensor(ours[0]), path_tensor(theirs[0])) > 1e-4
