"""Independent oracles for G-space, written node by node with Python loops.

Nothing here imports ecopt's math: the skeleton is walked edge by edge from the
definitions of ``docs/g-space.md`` §2, and the gauge map
``(v, free weights) -> w`` follows section 4 literally. Only for tiny networks.

A chain is given as a list of kernel views ``K[t, i, j]`` (shape
``(T, n_in, n_out)``; a diagonal layer as a vector, flagged in ``diagonal``)
and a list of biases (or None).
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np


def tap(K):
  """The centre ``T//2`` of ``T`` taps: the window centre of a one-dimensional
  window (or of a window with one dimension above 1; odd windows too)."""
  return K.shape[0] // 2


def widths_of(kernels, diagonal):
  ws = [kernels[0].shape[0] if diagonal[0] else kernels[0].shape[1]]
  for K, d in zip(kernels, diagonal):
    ws.append(K.shape[0] if d else K.shape[2])
  return ws


def entry(K, d, t, i, j):
  if d:
    assert i == j and t == 0
    return K[j]
  return K[t, i, j]


def in_edge(kernels, diagonal, widths, k, j):
  """(t, i, j) of the in-skeleton edge of node (k, j), in layer k (1-based)."""
  K = kernels[k - 1]
  return (0 if diagonal[k - 1] else tap(K), j % widths[k - 1], j)


def out_edge(kernels, diagonal, widths, k, j):
  """(t, i, j') of the out-skeleton edge of node (k, j), in layer k+1."""
  K = kernels[k]
  return (0 if diagonal[k] else tap(K), j, j % widths[k + 1])


def walk_in(kernels, diagonal, widths, k, i):
  """Product of in-skeleton weights from node (k, i) back to level 0."""
  prod = 1.0
  while k > 0:
    t, a, b = in_edge(kernels, diagonal, widths, k, i)
    prod = prod * entry(kernels[k - 1], diagonal[k - 1], t, a, b)
    k, i = k - 1, a
  return prod


def walk_out(kernels, diagonal, widths, k, j):
  """Product of out-skeleton weights from node (k, j) on to level n."""
  n = len(kernels)
  prod = 1.0
  while k < n:
    t, a, b = out_edge(kernels, diagonal, widths, k, j)
    prod = prod * entry(kernels[k], diagonal[k], t, a, b)
    k, j = k + 1, b
  return prod


def edges(K, d):
  if d:
    return [(0, j, j) for j in range(K.shape[0])]
  T, I, J = K.shape
  return list(itertools.product(range(T), range(I), range(J)))


def free_set(kernels, diagonal, widths):
  """{(layer k, t, i, j)} of the free (out-skeleton) edges."""
  n = len(kernels)
  return {
      (k + 1,) + out_edge(kernels, diagonal, widths, k, j)
      for k in range(1, n)
      for j in range(widths[k])
  }


def values(kernels, biases, diagonal):
  """Basis-path value of every edge, by walking the skeleton per edge.

  Plain numpy on concrete arrays (no per-scalar JAX dispatch); the result is
  returned as JAX arrays of the kernels' dtypes.
  """
  kernels = [np.asarray(K) for K in kernels]
  widths = widths_of(kernels, diagonal)
  out_k, out_b = [], []
  for k, (K, d) in enumerate(zip(kernels, diagonal), start=1):
    V = np.zeros_like(K)
    for t, i, j in edges(K, d):
      v = entry(K, d, t, i, j) * walk_in(kernels, diagonal, widths, k - 1, i) * walk_out(
          kernels, diagonal, widths, k, j
      )
      V[j if d else (t, i, j)] = v
    out_k.append(jnp.asarray(V))
    b = biases[k - 1]
    if b is None:
      out_b.append(None)
    else:
      b = np.asarray(b)
      out_b.append(
          jnp.asarray(np.stack([b[j] * walk_out(kernels, diagonal, widths, k, j) for j in range(len(b))]))
      )
  return out_k, out_b


def _flat(K, d, t, i, j):
  """Position of edge (t, i, j) in the flattened layer (C order, like ``edges``)."""
  return j if d else int(np.ravel_multi_index((t, i, j), K.shape))


def weights_from(values_k, values_b, free_kernels, diagonal):
  """The gauge map of section 4: w from (v at coordinates, free weights).

  ``free_kernels`` supplies the free weights (other entries are ignored).
  Layer by layer: every coordinate is ``v / (B(k-1, i) F(k, j))``; ``B`` of a
  node follows from its in-skeleton edge once that edge is known.

  Which edge, node and free weight each entry uses is worked out node by node
  in Python (index tables); the arithmetic then runs one layer at a time, so
  that ``jax.grad`` of it traces and compiles quickly.
  """
  n = len(values_k)
  widths = widths_of(free_kernels, diagonal)
  free = free_set(free_kernels, diagonal, widths)
  dtype = jnp.result_type(*values_k)
  # F only involves free weights: F(k, j) = w(out edge of (k, j)) F(k+1, j').
  F = [None] * (n + 1)
  F[n] = jnp.ones(widths[n], dtype)
  for k in range(n - 1, 0, -1):
    K, d = free_kernels[k], diagonal[k]
    out = [out_edge(free_kernels, diagonal, widths, k, j) for j in range(widths[k])]
    pos = np.array([_flat(K, d, *e) for e in out], dtype=int)
    nxt = np.array([e[2] for e in out], dtype=int)
    F[k] = jnp.reshape(K, -1)[pos] * F[k + 1][nxt]
  B = [jnp.ones(widths[0], dtype)]
  out_k, out_b = [], []
  for k in range(1, n + 1):
    K, d = free_kernels[k - 1], diagonal[k - 1]
    es = edges(K, d)
    assert [_flat(K, d, *e) for e in es] == list(range(len(es)))
    is_free = np.array([(k, t, i, j) in free for t, i, j in es], dtype=bool)
    src = np.array([i for _, i, _ in es], dtype=int)
    dst = np.array([j for _, _, j in es], dtype=int)
    coord = jnp.reshape(values_k[k - 1], -1) / (B[k - 1][src] * F[k][dst])
    W = jnp.where(is_free, jnp.reshape(K, -1), coord).reshape(K.shape)
    out_k.append(W)
    vb = values_b[k - 1]
    out_b.append(None if vb is None else vb / F[k])
    if k < n:
      ins = [in_edge(free_kernels, diagonal, widths, k, j) for j in range(widths[k])]
      pos = np.array([_flat(K, d, *e) for e in ins], dtype=int)
      prev = np.array([e[1] for e in ins], dtype=int)
      B.append(jnp.reshape(W, -1)[pos] * B[k - 1][prev])
  return out_k, out_b


def free_mask(kernels, diagonal):
  widths = widths_of(kernels, diagonal)
  free = free_set(kernels, diagonal, widths)
  masks = []
  for k, (K, d) in enumerate(zip(kernels, diagonal), start=1):
    M = np.zeros(K.shape, bool)
    for t, i, j in edges(K, d):
      if (k, t, i, j) in free:
        M[j if d else (t, i, j)] = True
    masks.append(M)
  return masks


def in_skeleton_ratios(values_k, new_values_k, kernels, diagonal):
  """v'_s / v_s for every non-free in-skeleton edge (regular if not near 0)."""
  values_k = [np.asarray(v) for v in values_k]
  new_values_k = [np.asarray(v) for v in new_values_k]
  widths = widths_of(kernels, diagonal)
  free = free_set(kernels, diagonal, widths)
  ratios = []
  for k in range(1, len(kernels)):
    for j in range(widths[k]):
      t, a, b = in_edge(kernels, diagonal, widths, k, j)
      if (k, t, a, b) in free:
        continue
      idx = b if diagonal[k - 1] else (t, a, b)
      ratios.append(float(new_values_k[k - 1][idx] / values_k[k - 1][idx]))
  return ratios
