"""The 8x8 digits of scikit-learn, standardized and split, as ``jrelu.sampling.Dataset``.

scikit-learn ships the data set inside its package (``sklearn.datasets.load_digits``: 1,797
images of 8x8 pixels in 0..16, ten classes, a copy of the UCI "Optical Recognition of
Handwritten Digits" test set), so nothing is downloaded at run time. The held-out split
is stratified (each class keeps its share in both parts) with a fixed seed, and the pixels
are standardized with the training part's mean and standard deviation (pixels that never
vary in the training part are only centred).

References:
  Alpaydin, Kaynak, "Optical Recognition of Handwritten Digits", UCI Machine Learning
  Repository (1998), the source scikit-learn bundles.
"""

from __future__ import annotations

import numpy as np

from jrelu import sampling

NUM_CLASSES = 10
# A pixel whose training standard deviation is below this (the always-blank corners) is
# only centred: dividing by ~0 would blow its rare test values up.
MIN_STD = 1e-6


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int):
  """Row indices of a held-out split that keeps each class's share in both parts.

  Each class's rows are shuffled with ``numpy.random.default_rng(seed)`` and its first
  ``round(test_fraction * count)`` go to the test part.

  Args:
    labels: int ``[n]`` class of each row.
    test_fraction: in (0, 1).
    seed: the shuffle's seed.

  Returns:
    ``(train_rows, test_rows)``: int arrays, disjoint, together ``0 .. n-1``, each
    shuffled (so that consecutive training rows are in random order, which the window
    sampler of ``jrelu.sampling.make_batch_fn`` relies on).

  Raises:
    ValueError: if ``test_fraction`` is not in (0, 1).

  Example:
    >>> train_rows, test_rows = stratified_split(np.array([0, 0, 1, 1]), 0.5, 0)
  """
  if not 0 < test_fraction < 1:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
  rng = np.random.default_rng(seed)
  train, test = [], []
  for label in np.unique(labels):
    rows = rng.permutation(np.flatnonzero(labels == label))
    cut = int(round(test_fraction * rows.size))
    test.append(rows[:cut])
    train.append(rows[cut:])
  return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def load(test_fraction: float = 0.2, seed: int = 0):
  """The digits as ``(train, test)`` Datasets: standardized pixels, labels as float32.

  Args:
    test_fraction: the held-out share, in (0, 1) (0.2: 1,438 training and 359 test
      rows; each class rounds its own share).
    seed: seed of the split.

  Returns:
    ``(train, test)``, each a ``jrelu.sampling.Dataset`` of NumPy arrays: ``x`` float32
    ``[rows, 64]`` standardized with the training rows' statistics, ``y`` float32
    ``[rows]`` class indices 0..9 (``jrelu.mlp``'s convention).

  Raises:
    ImportError: when scikit-learn is not installed (``pip install -e '.[bench]'``).

  Example:
    >>> train, test = load()
    >>> train.x.shape, test.x.shape
    ((1438, 64), (359, 64))
  """
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  x = np.asarray(digits.data, np.float64)
  labels = np.asarray(digits.target, np.int64)
  train_rows, test_rows = stratified_split(labels, test_fraction, seed)
  mean = x[train_rows].mean(0)
  std = x[train_rows].std(0)
  scale = np.where(std > MIN_STD, std, 1.0)
  x = ((x - mean) / scale).astype(np.float32)
  y = labels.astype(np.float32)
  return (sampling.Dataset(x[train_rows], y[train_rows]),
          sampling.Dataset(x[test_rows], y[test_rows]))
