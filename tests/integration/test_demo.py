"""The demo (`python -m ecopt.demo`) trains, with tiny settings, and shows the invariance."""

import io

import jax
import numpy as np
import pytest

import ecopt
from ecopt import demo


def _run(*flags):
  args = demo.parse_args(["--epochs", "2", "--no-progress", *flags])
  out = io.StringIO()
  return demo.run(args, out=out), out.getvalue()


MODELS = ["mlp", "cnn"]

# The MLP runs with SGD started from G-SGD's params, the CNN with the default
# (SGD from the model's own init): both modes are covered by two runs.
FLAGS = {"mlp": ("--sgd-init", "skeleton"), "cnn": ()}


@pytest.fixture(scope="module", params=MODELS)
def demo_run(request):
  """One 2-epoch demo run per model, shared by the tests below."""
  model = request.param
  return model, *_run("--model", model, *FLAGS[model])


def test_both_optimizers_learn(demo_run):
  _, result, text = demo_run
  for name in ("sgd", "g_sgd"):
    h = result[name]
    assert len(h.train_loss) == len(h.test_acc) == 3  # init + 2 epochs
    assert np.all(np.isfinite(h.train_loss)), (name, h.train_loss)
    # The epoch-2 mean loss is below the loss at init, and ten classes give
    # 10% by chance.
    assert h.train_loss[2] < h.train_loss[0], (name, h.train_loss)
    assert h.test_acc[2] > 0.6, (name, h.test_acc)
  assert "skeleton_init" in text
  assert text.count("\n") > 8


def test_g_sgd_keeps_free_weights_and_sgd_does_not(demo_run):
  _, result, _ = demo_run
  spec = result["spec"]
  p0, p1 = result["params0"], result["params"]
  mask = ecopt.free_mask(p0["g_sgd"], spec)
  free = lambda p: np.concatenate(
      [np.asarray(x)[m] for x, m in zip(jax.tree.leaves(p), jax.tree.leaves(mask))]
  )
  # skeleton_init put every free (out-skeleton) weight at 1; G-SGD never
  # moves them, plain SGD does.
  np.testing.assert_array_equal(free(p0["g_sgd"]), 1.0)
  np.testing.assert_array_equal(free(p1["g_sgd"]), 1.0)
  assert np.abs(free(p1["sgd"]) - free(p0["sgd"])).max() > 1e-4


def test_start_points(demo_run):
  model, result, text = demo_run
  p0 = result["params0"]
  if FLAGS[model]:  # --sgd-init skeleton: one start, one initial loss.
    assert "same skeleton_init params" in text
    assert result["sgd"].train_loss[0] == result["g_sgd"].train_loss[0]
    assert result["sgd"].test_acc[0] == result["g_sgd"].test_acc[0]
    same = jax.tree.map(lambda a, b: bool((a == b).all()), p0["sgd"], p0["g_sgd"])
    assert all(jax.tree.leaves(same))
  else:  # default: G-SGD starts from skeleton_init of SGD's start.
    assert "the model's own init" in text
    expected = ecopt.skeleton_init(p0["sgd"], result["spec"])
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(p0["g_sgd"])):
      np.testing.assert_array_equal(a, b)
    assert result["sgd"].train_loss[0] != pytest.approx(
        result["g_sgd"].train_loss[0], rel=1e-3
    )


def test_rescaled_start_changes_sgd_and_not_g_sgd(demo_run):
  """The second table: the same runs from ``ecopt.rescale`` of their starts."""
  _, result, text = demo_run
  spec = result["spec"]
  p0 = result["params0"]
  # Same function, same basis-path values, different weights.
  for name in ("sgd", "g_sgd"):
    a, b = p0[name], p0[name + "_rescaled"]
    va, vb = ecopt.basis_path_values(a, spec), ecopt.basis_path_values(b, spec)
    for x, y in zip(jax.tree.leaves(va), jax.tree.leaves(vb)):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    assert max(float(np.abs(x - y).max())
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))) > 0.5
  g, g_r = result["g_sgd"], result["g_sgd_rescaled"]
  s, s_r = result["sgd"], result["sgd_rescaled"]
  # G-SGD: the same run (float32 rounding only); SGD: a different one.
  np.testing.assert_allclose(g_r.train_loss, g.train_loss, rtol=1e-4)
  np.testing.assert_allclose(g_r.test_acc, g.test_acc, atol=1.5 / 450)
  assert result["rescale_gap"]["g_sgd"] < 1e-4
  sgd_gap = np.abs(np.asarray(s_r.train_loss[1:]) - s.train_loss[1:]) / np.asarray(s.train_loss[1:])
  assert not np.all(sgd_gap < 1e-2), (s.train_loss, s_r.train_loss)
  assert result["rescale_gap"]["sgd"] > 1e-2
  assert "(rescaled start)" in text and "node-rescaled start" in text


def test_bad_flags_are_rejected():
  with pytest.raises(SystemExit):
    demo.parse_args(["--model", "resnet"])
  with pytest.raises(SystemExit):
    demo.parse_args(["--epochs", "0"])
  with pytest.raises(SystemExit):
    demo.parse_args(["--rescale-range", "-1"])
