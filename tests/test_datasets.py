"""ecopt.datasets reads the python-pickle CIFAR files (tiny fakes, same format).

The fakes are written here with pickle directly, as the dataset's files are:
a dict with bytes keys, ``b"data"`` a uint8 ``(N, 3072)`` array whose rows
hold the red plane, then green, then blue, each row-major over 32x32 pixels.
"""

import pickle

import numpy as np
import pytest

from ecopt import datasets


def _dump(path, obj):
  with open(path, "wb") as f:
    pickle.dump(obj, f, protocol=2)


def _rows(rng, n):
  return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


@pytest.fixture
def cifar10_dir(tmp_path):
  rng = np.random.default_rng(1)
  batches = []
  for i in range(1, 6):
    data, labels = _rows(rng, i), rng.integers(0, 10, i).tolist()
    _dump(tmp_path / f"data_batch_{i}", {b"batch_label": b"x", b"data": data,
                                         b"labels": labels, b"filenames": []})
    batches.append((data, labels))
  test = (_rows(rng, 4), [9, 0, 3, 3])
  _dump(tmp_path / "test_batch", {b"data": test[0], b"labels": test[1]})
  _dump(tmp_path / "batches.meta",
        {b"label_names": [f"c{i}".encode() for i in range(10)]})
  return tmp_path, batches, test


def test_cifar10_shapes_order_and_chw_to_hwc(cifar10_dir):
  root, batches, (test_data, test_labels) = cifar10_dir
  d = datasets.load_cifar10(str(root))
  assert d.x_train.shape == (15, 32, 32, 3) and d.x_train.dtype == np.uint8
  assert d.x_test.shape == (4, 32, 32, 3)
  assert d.y_train.dtype == np.int32
  # Batches in file order 1..5.
  np.testing.assert_array_equal(d.y_train, sum((l for _, l in batches), []))
  np.testing.assert_array_equal(d.y_test, test_labels)
  assert d.label_names == tuple(f"c{i}" for i in range(10))
  assert d.num_classes == 10
  # Pixel (y, x) of channel c is byte c * 1024 + y * 32 + x of the row.
  rows = np.concatenate([b for b, _ in batches])
  for n, y, x, c in [(0, 0, 0, 0), (3, 5, 7, 1), (14, 31, 30, 2), (9, 0, 31, 2)]:
    assert d.x_train[n, y, x, c] == rows[n, c * 1024 + y * 32 + x]
  assert d.x_test[2, 10, 20, 1] == test_data[2, 1024 + 10 * 32 + 20]


def test_cifar100_fine_and_coarse(tmp_path):
  rng = np.random.default_rng(2)
  train = _rows(rng, 6)
  fine, coarse = [0, 99, 5, 6, 50, 1], [0, 19, 1, 1, 10, 0]
  _dump(tmp_path / "train", {b"data": train, b"fine_labels": fine,
                             b"coarse_labels": coarse})
  _dump(tmp_path / "test", {b"data": _rows(rng, 2), b"fine_labels": [3, 4],
                            b"coarse_labels": [0, 0]})
  _dump(tmp_path / "meta", {
      b"fine_label_names": [f"f{i}".encode() for i in range(100)],
      b"coarse_label_names": [f"g{i}".encode() for i in range(20)]})
  d = datasets.load_cifar100(tmp_path)
  np.testing.assert_array_equal(d.y_train, fine)
  assert d.num_classes == 100 and d.label_names[99] == "f99"
  assert d.x_train[5, 1, 2, 0] == train[5, 0 * 1024 + 1 * 32 + 2]
  c = datasets.load_cifar100(tmp_path, coarse=True)
  np.testing.assert_array_equal(c.y_train, coarse)
  assert c.num_classes == 20


def test_missing_file_and_bad_format_are_reported(cifar10_dir, tmp_path_factory):
  root, _, _ = cifar10_dir
  (root / "data_batch_3").unlink()
  with pytest.raises(FileNotFoundError, match="data_batch_3"):
    datasets.load_cifar10(root)
  bad = tmp_path_factory.mktemp("bad")
  _dump(bad / "train", {b"data": np.zeros((2, 100), np.uint8), b"fine_labels": [0, 1]})
  with pytest.raises(ValueError, match=r"uint8 of shape \(N, 3072\)"):
    datasets.load_cifar100(bad)
  _dump(bad / "train", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})
  with pytest.raises(ValueError, match="fine_labels"):
    datasets.load_cifar100(bad)


def test_labels_out_of_range_are_reported(cifar10_dir):
  root, _, _ = cifar10_dir
  _dump(root / "test_batch", {b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]})
  with pytest.raises(ValueError, match=r"\[0, 10\)"):
    datasets.load_cifar10(root)


def test_synthetic_files_read_back(tmp_path):
  d = datasets.load_cifar10(datasets.synthetic_cifar(tmp_path / "c10", num_train=12, num_test=3))
  assert d.x_train.shape == (12, 32, 32, 3) and d.x_test.shape == (3, 32, 32, 3)
  e = datasets.load_cifar100(datasets.synthetic_cifar(tmp_path / "c100", cifar100=True))
  assert e.num_classes == 100


def test_normalize():
  x = np.full((1, 2, 2, 3), 255, np.uint8)
  out = datasets.normalize(x, mean=(0.5, 0.5, 0.0), std=(0.5, 0.25, 1.0))
  np.testing.assert_allclose(out[0, 0, 0], [1.0, 2.0, 1.0])
  assert out.dtype == np.float32


def test_not_imported_by_ecopt():
  import subprocess
  import sys
  code = "import sys, ecopt; print('ecopt.datasets' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""})
  assert out.stdout.strip() == "False"
