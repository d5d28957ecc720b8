"""CIFAR-10 and CIFAR-100 from their standard python-pickle batches.

Nothing is downloaded: point the loaders at the directory a user unpacked
``cifar-10-python.tar.gz`` (``cifar-10-batches-py/``) or
``cifar-100-python.tar.gz`` (``cifar-100-python/``) into. Only numpy and the
standard library are used, and this module is not imported by ``import
ecopt``.

The format (Krizhevsky, 2009, "Learning Multiple Layers of Features from
Tiny Images"; the dataset's web page describes the files): each file is a
pickled dict with bytes keys. ``b"data"`` is a ``uint8`` array of shape
``(N, 3072)``, one image per row, its 1024 red values first, then green,
then blue, each channel row-major over the 32x32 pixels (CHW order).
CIFAR-10 has ``data_batch_1`` .. ``data_batch_5`` (10000 images each) and
``test_batch`` with labels under ``b"labels"``, and ``batches.meta`` with
``b"label_names"``. CIFAR-100 has ``train`` and ``test`` with
``b"fine_labels"`` (100 classes) and ``b"coarse_labels"`` (20
superclasses), and ``meta`` with ``b"fine_label_names"`` and
``b"coarse_label_names"``.

Example:
  >>> from ecopt import datasets  # doctest: +SKIP
  >>> cifar = datasets.load_cifar10("~/data/cifar-10-batches-py")  # doctest: +SKIP
  >>> cifar.x_train.shape, cifar.x_train.dtype  # doctest: +SKIP
  ((50000, 32, 32, 3), dtype('uint8'))
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import pickle
from typing import Sequence, Union

import numpy as np

PathLike = Union[str, os.PathLike]

IMAGE_SHAPE = (32, 32, 3)
_ROW = 32 * 32 * 3

CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_META_FILE = "batches.meta"
CIFAR100_TRAIN_FILE = "train"
CIFAR100_TEST_FILE = "test"
CIFAR100_META_FILE = "meta"

# Per-channel mean and std of the CIFAR-10 training images in [0, 1], the
# usual normalisation constants (He et al., 2016 and most reference code).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclasses.dataclass(frozen=True)
class ImageDataset:
  """Images as ``uint8`` NHWC arrays and ``int32`` labels.

  Attributes:
    x_train: ``(N, 32, 32, 3)`` uint8.
    y_train: ``(N,)`` int32.
    x_test: ``(M, 32, 32, 3)`` uint8.
    y_test: ``(M,)`` int32.
    label_names: class names, index = label.
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  label_names: tuple[str, ...]

  @property
  def num_classes(self) -> int:
    return len(self.label_names)


def _unpickle(path: pathlib.Path) -> dict:
  if not path.is_file():
    raise FileNotFoundError(
        f"{path} not found: expected the python-pickle CIFAR files (unpack"
        " cifar-10-python.tar.gz or cifar-100-python.tar.gz and pass the"
        " directory that holds them)."
    )
  with open(path, "rb") as f:
    # The files were written by Python 2's cPickle: bytes keys, and numpy
    # arrays that need the latin1 codec to unpickle under Python 3.
    batch = pickle.load(f, encoding="bytes")
  if not isinstance(batch, dict):
    raise ValueError(f"{path}: expected a pickled dict, got {type(batch).__name__}.")
  return batch


def _field(batch: dict, key: bytes, path: pathlib.Path):
  if key not in batch:
    found = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in batch)
    raise ValueError(f"{path}: no {key!r} entry (found {found}).")
  return batch[key]


def _images(batch: dict, path: pathlib.Path) -> np.ndarray:
  """``b"data"`` rows (CHW, 3072 bytes) as ``(N, 32, 32, 3)`` uint8 NHWC."""
  data = np.asarray(_field(batch, b"data", path))
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW:
    raise ValueError(
        f"{path}: b'data' must be uint8 of shape (N, {_ROW}), got"
        f" {data.dtype} {data.shape}."
    )
  return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _labels(batch: dict, key: bytes, path: pathlib.Path, n: int) -> np.ndarray:
  labels = np.asarray(_field(batch, key, path), np.int64)
  if labels.shape != (n,):
    raise ValueError(
        f"{path}: {key!r} has shape {labels.shape}, expected ({n},) for {n}"
        " images."
    )
  return labels.astype(np.int32)


def _read(path: pathlib.Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
  batch = _unpickle(path)
  x = _images(batch, path)
  return x, _labels(batch, label_key, path, len(x))


def _names(meta: dict, key: bytes, path: pathlib.Path) -> tuple[str, ...]:
  return tuple(
      n.decode() if isinstance(n, bytes) else str(n)
      for n in _field(meta, key, path)
  )


def _check_labels(y: np.ndarray, num_classes: int, what: str) -> None:
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise ValueError(
        f"{what}: labels must lie in [0, {num_classes}), got [{y.min()},"
        f" {y.max()}]."
    )


def _load(
    directory: PathLike,
    train_files: Sequence[str],
    test_file: str,
    meta_file: str,
    label_key: bytes,
    names_key: bytes,
) -> ImageDataset:
  root = pathlib.Path(directory).expanduser()
  train = [_read(root / name, label_key) for name in train_files]
  x_test, y_test = _read(root / test_file, label_key)
  names = _names(_unpickle(root / meta_file), names_key, root / meta_file)
  x_train = np.concatenate([x for x, _ in train])
  y_train = np.concatenate([y for _, y in train])
  _check_labels(y_train, len(names), f"{root} (train)")
  _check_labels(y_test, len(names), f"{root / test_file}")
  return ImageDataset(x_train, y_train, x_test, y_test, names)


def load_cifar10(directory: PathLike) -> ImageDataset:
  """CIFAR-10 from ``data_batch_1..5``, ``test_batch`` and ``batches.meta``.

  Args:
    directory: the folder holding the python-pickle batches (usually
      ``cifar-10-batches-py``).

  Returns:
    An :class:`ImageDataset`: 50000 train and 10000 test images,
    ``(N, 32, 32, 3)`` uint8, labels 0..9, and the ten class names.

  Raises:
    FileNotFoundError: a file is missing.
    ValueError: a file does not have the documented format.
  """
  return _load(
      directory, CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE, CIFAR10_META_FILE,
      b"labels", b"label_names",
  )


def load_cifar100(directory: PathLike, *, coarse: bool = False) -> ImageDataset:
  """CIFAR-100 from ``train``, ``test`` and ``meta``.

  Args:
    directory: the folder holding the files (usually ``cifar-100-python``).
    coarse: the 20 superclass labels instead of the 100 fine labels.

  Returns:
    An :class:`ImageDataset`: 50000 train and 10000 test images,
    ``(N, 32, 32, 3)`` uint8, with fine (or coarse) labels and names.

  Raises:
    FileNotFoundError: a file is missing.
    ValueError: a file does not have the documented format.
  """
  kind = b"coarse" if coarse else b"fine"
  return _load(
      directory, (CIFAR100_TRAIN_FILE,), CIFAR100_TEST_FILE,
      CIFAR100_META_FILE, kind + b"_labels", kind + b"_label_names",
  )


def normalize(
    images: np.ndarray,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    dtype=np.float32,
) -> np.ndarray:
  """``uint8`` NHWC images to ``(x / 255 - mean) / std`` per channel."""
  x = np.asarray(images, dtype) / 255.0
  return (x - np.asarray(mean, dtype)) / np.asarray(std, dtype)


def write_cifar_batch(path: PathLike, batch: dict) -> None:
  """Writes one pickled batch in the files' own layout (for tests and fakes).

  ``batch`` holds bytes keys as in the real files; arrays are written as
  they are given (``b"data"`` should be uint8 ``(N, 3072)``, CHW rows).
  """
  with open(path, "wb") as f:
    pickle.dump(batch, f, protocol=2)


def synthetic_cifar(
    directory: PathLike,
    *,
    num_train: int = 20,
    num_test: int = 10,
    cifar100: bool = False,
    seed: int = 0,
) -> pathlib.Path:
  """Writes small random files in the CIFAR-10 (or CIFAR-100) format.

  Random uint8 images and labels, split over the same files as the real
  dataset (CIFAR-10's training images over its five batches). For tests and
  smoke runs of code that reads the real files.

  Returns:
    ``directory`` as a path.
  """
  root = pathlib.Path(directory)
  root.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  classes = 100 if cifar100 else 10

  def batch(n, label_key):
    out = {
        b"data": rng.integers(0, 256, (n, _ROW), dtype=np.uint8),
        label_key: rng.integers(0, classes, n).tolist(),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    if cifar100:
      out[b"coarse_labels"] = (np.asarray(out[label_key]) // 5).tolist()
    return out

  if cifar100:
    write_cifar_batch(root / CIFAR100_TRAIN_FILE, batch(num_train, b"fine_labels"))
    write_cifar_batch(root / CIFAR100_TEST_FILE, batch(num_test, b"fine_labels"))
    write_cifar_batch(root / CIFAR100_META_FILE, {
        b"fine_label_names": [f"fine_{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)],
    })
    return root
  sizes = np.diff(np.linspace(0, num_train, 6).astype(int))
  for name, n in zip(CIFAR10_TRAIN_FILES, sizes):
    write_cifar_batch(root / name, batch(int(n), b"labels"))
  write_cifar_batch(root / CIFAR10_TEST_FILE, batch(num_test, b"labels"))
  write_cifar_batch(root / CIFAR10_META_FILE, {
      b"label_names": [f"class_{i}".encode() for i in range(10)],
      b"num_cases_per_batch": int(sizes.max()),
      b"num_vis": _ROW,
  })
  return root
