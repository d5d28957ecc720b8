"""benchmarks/experiments/cifar.py trains on files in the CIFAR pickle format.

Tiny fake batches (ecopt.datasets.synthetic_cifar writes the real files'
layout) and a tiny BatchNorm PlainNet, two steps per optimizer: the script
reads the files, runs SGD and G-SGD, and their losses are finite. (The zoo
ResNet it also offers is covered by tests/test_zoo.py.)
"""

import json
import pathlib
import sys

import jax
import numpy as np

import ecopt
from ecopt import datasets

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from benchmarks.experiments import cifar  # noqa: E402


def test_cifar_script_on_tiny_pickles(tmp_path):
  data_dir = datasets.synthetic_cifar(tmp_path / "cifar-10-batches-py", num_train=16, num_test=4)
  result = cifar.main([
      "--data", str(data_dir), "--model", "plain", "--blocks", "1",
      "--channels", "4", "8", "8", "--epochs", "1", "--batch-size", "8",
      "--out", str(tmp_path / "out"),
  ])
  runs = {(r["model"], r["optimizer"]): r for r in result["runs"]}
  assert set(runs) == {("plain", "sgd"), ("plain", "g_sgd")}
  for r in runs.values():
    assert r["steps_per_epoch"] == 2
    assert np.all(np.isfinite(r["train_loss"])) and len(r["train_loss"]) == 1, r
    assert 0.0 <= r["test_acc"][0] <= 1.0
  saved = json.loads((tmp_path / "out" / "results.json").read_text())
  assert len(saved["runs"]) == 2


def test_plain_cifar_spec_is_exact():
  """PlainCIFAR's hand-written spec: node scalings keep the function."""
  for bn in (True, False):
    model = cifar.PlainCIFAR(stage_channels=(3, 4, 5), blocks_per_stage=1, num_classes=3, use_bn=bn)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    variables = model.init(jax.random.key(1), x)
    assert len(model.layout()) == 7  # stem + 2 per stage
    ecopt.verify_spec(lambda v, x: model.apply(v, x), variables, model.spec(), x)
