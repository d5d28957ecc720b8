"""A plain reference implementation of docs/g-space.md §2-§4, for the tests.

One formula per statement, a Python loop over layers, no guards: an oracle
for ecopt's fast path. A chain is a list of layer views ``K[t, i, j]``
(``(T, n_in, n_out)``), one skeleton tap per layer, and optional biases.
Lists are indexed by layer ``l = 0..n-1`` (layer ``l`` maps level ``l`` to
level ``l+1``) or, for per-node arrays, by level ``0..n``.
"""

import numpy as np
import jax.numpy as jnp


def centre_tap(window):
  """Flat tap index of the window centre ``(k_1//2, ..., k_d//2)``; 0 for a Dense layer.

  A conv's window is its kernel's leading axes; a flatten head's is ``(P,)``.
  """
  return int(np.ravel_multi_index(tuple(k // 2 for k in window), window)) if window else 0


def skeleton(Ks, taps):
  """Masks of the free (out-skeleton) and in-skeleton edges, and the chain products B, F."""
  n, h = len(Ks), [Ks[0].shape[1]] + [K.shape[2] for K in Ks]
  free = [np.zeros(K.shape, bool) for K in Ks]
  ins = [np.zeros(K.shape, bool) for K in Ks]
  B, F = [jnp.ones(h[0])], [None] * n + [jnp.ones(h[n])]
  for l in range(1, n):  # out-skeleton edge of node (l, j): K_l[t*, j, j mod h_{l+1}]
    j = np.arange(h[l])
    free[l][taps[l], j, j % h[l + 1]] = True
  for l in range(n - 1):  # in-skeleton edge of node (l+1, j): K_l[t*, j mod h_l, j]
    j = np.arange(h[l + 1])
    ins[l][taps[l], j % h[l], j] = True
    B.append(Ks[l][taps[l], j % h[l], j] * B[l][j % h[l]])
  for l in range(n - 1, 0, -1):
    j = np.arange(h[l])
    F[l] = Ks[l][taps[l], j, j % h[l + 1]] * F[l + 1][j % h[l + 1]]
  return free, [m & ~f for m, f in zip(ins, free)], B, F


def skeleton_products(B, F, l):
  """S_e = B(l, i) F(l+1, j) of every edge of layer l, broadcast to its view."""
  return B[l][None, :, None] * F[l + 1][None, None, :]


def path_values(Ks, bs, taps):
  free, _, B, F = skeleton(Ks, taps)
  vk = [K * skeleton_products(B, F, l) for l, K in enumerate(Ks)]
  return vk, [None if b is None else b * F[l + 1] for l, b in enumerate(bs)]


def path_gradients(Ks, gk, gb, taps):
  """Inverse chain rule (§3): dL/dv at every coordinate, 0 at free edges."""
  n = len(Ks)
  free, ins, B, F = skeleton(Ks, taps)
  phi = [K * g for K, g in zip(Ks, gk)]
  # U(k, j) for hidden levels k = 1..n-1, one backward sweep: the row sums of
  # layer k without the out-skeleton edge, plus U(k+1, j) where that edge is
  # also node (k+1, j)'s in-skeleton edge (j < h_{k+1}).
  U = [None] * n
  for k in range(n - 1, 0, -1):
    U[k] = phi[k].sum(axis=(0, 2)) - jnp.where(free[k], phi[k], 0.0).sum(axis=(0, 2))
    if k < n - 1:
      m = min(U[k].shape[0], U[k + 1].shape[0])
      U[k] = U[k].at[:m].add(U[k + 1][:m])
  out_k = []
  for l in range(n):
    S = skeleton_products(B, F, l)
    if l < n - 1:  # the in-skeleton edge of node (l+1, j)
      s = (phi[l] - U[l + 1][None, None, :]) / (Ks[l] * S)
      pg = jnp.where(ins[l], s, gk[l] / S)
    else:
      pg = gk[l] / S
    out_k.append(jnp.where(free[l], 0.0, pg))
  return out_k, [None if g is None else g / F[l + 1] for l, g in enumerate(gb)]


def allocate(Ks, bs, dvk, dvb, taps):
  """Weight allocation (§4): new kernels and biases realising v + dv, free weights fixed."""
  n = len(Ks)
  free, ins, B, F = skeleton(Ks, taps)
  rho = [jnp.ones(Ks[0].shape[1])]
  for l in range(n - 1):  # rho of level l+1 from its in-skeleton edge
    j = np.arange(Ks[l].shape[2])
    i, t = j % Ks[l].shape[1], taps[l]
    own = 1.0 + dvk[l][t, i, j] / (Ks[l][t, i, j] * skeleton_products(B, F, l)[0, i, j])
    rho.append(jnp.where(ins[l][t, i, j], own, rho[l][i]))
  new_k = [
      jnp.where(free[l], K, (K + dvk[l] / skeleton_products(B, F, l)) / rho[l][None, :, None])
      for l, K in enumerate(Ks)
  ]
  return new_k, [None if b is None else b + db / F[l + 1] for l, (b, db) in enumerate(zip(bs, dvb))]
