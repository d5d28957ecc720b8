"""ecopt.layer_views checked against plain numpy indexing.

The skeleton entries and per-node broadcasts are what every edge loop
reads, and the skip of free in-skeleton edges rests on a containment
between the two skeleton masks; all are checked here directly, on a dense
chain, a conv chain and a conv chain with a Dense head after a flatten
(whose rows are position * n_in + node).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ecopt
from ecopt import paths
from ecopt import structure
from ecopt.layer_views import view_of

RNG = np.random.default_rng(0)


def _dense(widths):
  params = {
      f"l{k}": {"kernel": jnp.zeros((widths[k], widths[k + 1]))}
      for k in range(len(widths) - 1)
  }
  return params, ecopt.Chain(*params)


def _conv_with_head(channels, image, classes):
  params = {}
  for k in range(len(channels) - 1):
    params[f"c{k}"] = {"kernel": jnp.zeros((3, 3, channels[k], channels[k + 1]))}
  params["head"] = {
      "kernel": jnp.zeros((image * image * channels[-1], classes))
  }
  return params, ecopt.Chain(*params)


CHAINS = {
    "dense_equal": lambda: _dense([4, 4, 4, 3]),
    "dense_mixed": lambda: _dense([5, 3, 7, 7, 2]),
    "conv_head": lambda: _conv_with_head([2, 3, 3], 2, 4),
    "conv_even": lambda: _conv([2, 3, 4], (2, 4)),
}


def _conv(channels, window):
  params = {
      f"c{k}": {
          "kernel": jnp.zeros(window + (channels[k], channels[k + 1])),
          "bias": jnp.zeros(channels[k + 1]),
      }
      for k in range(len(channels) - 1)
  }
  return params, ecopt.Chain(*params)


@pytest.mark.parametrize(
    "window, centre", [((3, 3), (1, 1)), ((2, 2), (1, 1)), ((2, 4), (1, 2)), ((5,), (2,)), ((1, 4), (0, 2))]
)
def test_skeleton_tap_is_the_window_centre(window, centre):
  params, spec = _conv([2, 3, 4], window)
  for layer in structure.resolve(params, spec).chains[0].layers:
    assert layer.skeleton_window == centre
    assert layer.skeleton_tap == int(np.ravel_multi_index(centre, window))
    kernel = RNG.standard_normal(layer.shape)
    j = np.arange(layer.n_out)
    want = kernel[centre + (j % layer.n_in, j)]
    np.testing.assert_array_equal(np.asarray(view_of(layer).in_skeleton(jnp.asarray(kernel))), want)


def _geometry(name):
  params, spec = CHAINS[name]()
  return structure.resolve(params, spec).chains[0]


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_per_node_broadcasts_match_numpy_indexing(name):
  geometry = _geometry(name)
  for layer in geometry.layers:
    rows = layer.shape[-2]
    x_in = RNG.standard_normal(layer.n_in)
    x_out = RNG.standard_normal(layer.n_out)
    # Row r of the kernel is input node r mod n_in (a flatten head's rows
    # are position * n_in + node); column j is output node j.
    def along_rows(x):
      return np.broadcast_to(x[np.arange(rows) % layer.n_in][:, None], layer.shape)

    want_in = along_rows(x_in)
    want_out = np.broadcast_to(x_out, layer.shape)
    for fn, x, want in [
        ("along_in", x_in, want_in),
        ("broadcast_in", x_in, want_in),
        ("along_out", x_out, want_out),
        ("broadcast_out", x_out, want_out),
    ]:
      fn = getattr(view_of(layer), fn)
      got = jax.jit(lambda v, fn=fn: fn(v))(jnp.asarray(x))
      np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{layer.name} {fn.__name__}")
    xs = [RNG.standard_normal(layer.n_in) for _ in range(3)]
    got = jax.jit(lambda vs: view_of(layer).along_in_all(vs))(
        [jnp.asarray(x) for x in xs])
    for g, x in zip(got, xs):
      np.testing.assert_array_equal(
          np.asarray(g), along_rows(x), err_msg=f"{layer.name} along_in_all")


def _gathers(fn, *args):
  return sum(e.primitive.name == "gather"
             for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns)


def test_flatten_head_factors_share_one_pinned_tile():
  head = _geometry("conv_head").layers[-1]
  assert head.shape[-2] == 4 * head.n_in  # a head after a 2x2 flatten
  xs = [jnp.arange(head.n_in, dtype=jnp.float32) + k for k in range(4)]
  # One pin of the stacked per-node vectors, one of their tile over the
  # rows, however many vectors; one by one, each needs both.
  assert _gathers(lambda vs: view_of(head).along_in_all(vs), xs) == 2
  assert _gathers(lambda vs: [view_of(head).along_in(v) for v in vs], xs) == 8
  # A layer that needs no tile pins each vector by itself (one gather each):
  # stacking them would only add a kernel.
  conv = _geometry("conv_head").layers[1]
  ys = [jnp.arange(conv.n_in, dtype=jnp.float32) + k for k in range(2)]
  assert _gathers(lambda vs: view_of(conv).along_in_all(vs), ys) == 2


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_free_in_skeleton_edges_are_out_skeleton_edges(name):
  # The premise of skipping a layer's in-skeleton values when all its
  # in-skeleton edges are free: the loops zero out-skeleton edges anyway.
  geometry = _geometry(name)
  for k, layer in enumerate(geometry.layers, start=1):
    if k == 1 or k == len(geometry.layers):
      continue
    in_mask = np.asarray(view_of(layer).in_mask())
    out_mask = np.asarray(view_of(layer).out_mask())
    free = ~paths.own_in_skeleton(geometry, k)
    cols = np.arange(layer.n_out)
    # In-skeleton edge of node j sits in column j; keep the free ones.
    free_in = in_mask & np.broadcast_to(free[cols], in_mask.shape)
    assert not np.any(free_in & ~out_mask), layer.name
    if free.all():
      assert not np.any(in_mask & ~out_mask), layer.name
    else:
      # Some in-skeleton edge is not free: it must not be an out-skeleton
      # edge, or the skip's condition would be too weak to matter.
      assert np.any(in_mask & ~out_mask), layer.name


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_skeleton_entries_match_numpy_indexing(name):
  # dense_mixed has widths that do not divide each other (5 -> 3, 7 -> 2:
  # several out-skeleton entries per column, the last block short; 3 -> 7:
  # fewer rows than columns), the conv head a flatten's position rows.
  geometry = _geometry(name)
  for layer in geometry.layers:
    kernel = RNG.standard_normal(layer.shape).astype(np.float32)
    view = kernel.reshape(layer.view_shape)
    tap = layer.skeleton_tap
    cols, rows = np.arange(layer.n_out), np.arange(layer.n_in)
    for fn, want in [
        ("in_skeleton", view[tap, cols % layer.n_in, cols]),
        ("out_skeleton", view[tap, rows, rows % layer.n_out]),
    ]:
      fn = getattr(view_of(layer), fn)
      got = jax.jit(lambda k, fn=fn: fn(k))(jnp.asarray(kernel))
      np.testing.assert_array_equal(
          np.asarray(got), want, err_msg=f"{layer.name} {fn.__name__}"
      )


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_row_and_col_sums_match_numpy(name):
  geometry = _geometry(name)
  for layer in geometry.layers:
    x = RNG.standard_normal(layer.shape).astype(np.float32)
    view = x.astype(np.float64).reshape(layer.view_shape)
    for fn, want in [
        ("row_sums", view.sum(axis=(0, 2))),
        ("col_sums", view.sum(axis=(0, 1))),
    ]:
      fn = getattr(view_of(layer), fn)
      got = jax.jit(lambda v, fn=fn: fn(v))(jnp.asarray(x))
      np.testing.assert_allclose(
          np.asarray(got), want, rtol=1e-5, atol=1e-5,
          err_msg=f"{layer.name} {fn.__name__}",
      )
