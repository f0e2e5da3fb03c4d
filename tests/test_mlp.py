"""``jrelu.mlp``: the windowed loss is the loss on the window's rows; the uniform model."""

import jax
import jax.numpy as jnp
import numpy as np

from jrelu import mlp
from jrelu import sampling

U = 2.0 ** -24  # float32 unit roundoff


def problem(rows=64, dim=5, classes=3):
  x = jax.random.normal(jax.random.key(0), (rows, dim), jnp.float32)
  y = (jnp.arange(rows) % classes).astype(jnp.float32)
  train = sampling.Dataset(x, y)
  params = mlp.init_params(jax.random.key(1), (train, train), num_hidden=4,
                           num_classes=classes)
  return train, params


def test_windowed_loss_and_gradient_equal_those_on_the_gathered_rows():
  train, params = problem()
  # Device 1 of 2 reads 8 rows of its 32-row segment, in blocks of 2 rows (4 blocks).
  x, y, window = sampling.make_batch_fn(16, block_rows=2)(jax.random.key(2), (train, None), 1, 2)
  rows = window.indices()
  value_and_grad = jax.jit(jax.value_and_grad(mlp.loss))
  value, grad = value_and_grad(params, x, y, window)
  ref_value, ref_grad = value_and_grad(params, train.x[rows], train.y[rows])
  # The same 8 per-row terms, averaged per block then over blocks instead of at once:
  # a few roundings of float32 sums of 8 terms, well under 64 u relative.
  np.testing.assert_allclose(value, ref_value, rtol=64 * U)
  for name in params:
    np.testing.assert_allclose(grad[name], ref_grad[name], rtol=64 * U, atol=64 * U)


def test_zero_parameters_give_log_c_loss_and_the_first_class_everywhere():
  train, params = problem(classes=3)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  # Equal scores: the softmax is uniform, so the cross-entropy is log 3 up to rounding of
  # one log-sum-exp, and argmax picks class 0, whose share of the labels is 22 / 64.
  np.testing.assert_allclose(mlp.loss(zeros, train.x, train.y), np.log(3.0), rtol=8 * U)
  assert float(mlp.accuracy(zeros, train)) == 22 / 64
  metrics = mlp.metrics_fn(zeros, (train, train))
  assert set(metrics) == {"train_loss", "test_accuracy"}
