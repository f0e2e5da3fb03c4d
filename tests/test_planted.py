"""The planted ReLU model: the ReLU'(0) = 1/2 convention, exact gradients, inits, batches."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrelu import planted


def test_relu_derivative_is_one_half_at_zero():
  grad = jax.grad(planted.relu)
  assert grad(0.0) == 0.5
  assert grad(2.0) == 1.0
  assert grad(-2.0) == 0.0
  assert jax.grad(jax.nn.relu)(0.0) == 0.0  # why jrelu cannot use jax.nn.relu


def test_gradient_at_zero_is_minus_half_moment():
  w_star = planted.sample_w_star(jax.random.key(0), 30)
  data = planted.sample_dataset(jax.random.key(1), w_star, 200)
  grad = jax.grad(planted.loss)(jnp.zeros(30), data.x, data.y)
  expected = -(data.y @ data.x) / (2 * 200)
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)
  # With jax.nn.relu the same loss would be stuck at w = 0.
  stuck = jax.grad(lambda w: 0.5 * jnp.mean((jax.nn.relu(data.x @ w) - data.y) ** 2))(
      jnp.zeros(30))
  assert np.all(stuck == 0)


def test_loss_zero_at_w_star_and_relative_error():
  w_star = planted.sample_w_star(jax.random.key(0), 20)
  data = planted.sample_dataset(jax.random.key(1), w_star, 100)
  assert planted.loss(w_star, data.x, data.y) == 0
  assert planted.relative_error(w_star, w_star) == 0
  assert planted.relative_error(jnp.zeros(20), w_star) == pytest.approx(1.0)
  assert planted.relative_error(2 * w_star, w_star) == pytest.approx(1.0)


def test_population_gradient_matches_closed_form():
  """grad L(w) = w/2 - [(pi - theta) w_star + ||w_star|| sin(theta) w/||w||] / (2 pi).

  Monte Carlo with n = 400000 samples; per coordinate the tolerance is 6 standard errors
  of the mean of the per-sample gradients (estimated from the same samples).
  """
  d, n = 5, 400_000
  w_star = planted.sample_w_star(jax.random.key(0), d)
  data = planted.sample_dataset(jax.random.key(1), w_star, n)
  w = w_star + 0.7 * planted.sample_w_star(jax.random.key(2), d)
  per_sample = jax.vmap(jax.grad(planted.loss), in_axes=(None, 0, 0))(
      w, data.x[:, None, :], data.y[:, None])
  mc = np.asarray(per_sample.mean(0))
  stderr = np.asarray(per_sample.std(0)) / np.sqrt(n)
  w, w_star = np.asarray(w, np.float64), np.asarray(w_star, np.float64)
  theta = np.arccos(w @ w_star / (np.linalg.norm(w) * np.linalg.norm(w_star)))
  exact = w / 2 - ((np.pi - theta) * w_star
                   + np.linalg.norm(w_star) * np.sin(theta) * w / np.linalg.norm(w)) / (2 * np.pi)
  assert np.all(np.abs(mc - exact) <= 6 * stderr), (mc, exact, stderr)


def test_first_moment_is_half_w_star():
  """E[y x] = w_star / 2, so the moment init (2/n) sum y_i x_i is unbiased for w_star."""
  d, n = 10, 200_000
  w_star = planted.sample_w_star(jax.random.key(3), d)
  data = planted.sample_dataset(jax.random.key(4), w_star, n)
  products = np.asarray(data.y[:, None] * data.x)
  stderr = products.std(0) / np.sqrt(n)
  assert np.all(np.abs(products.mean(0) - np.asarray(w_star) / 2) <= 6 * stderr)


def test_inits():
  w_star = planted.sample_w_star(jax.random.key(0), 50)
  data = planted.sample_dataset(jax.random.key(1), w_star, 4000)
  zeros = planted.init_params("zeros", jax.random.key(2), data)
  np.testing.assert_array_equal(zeros, np.zeros(50))
  moment = planted.init_params("moment", jax.random.key(2), data)
  np.testing.assert_allclose(moment, 2 / 4000 * (data.y @ data.x), rtol=1e-6)
  # E||moment - w_star||^2 ~ 4 d E[y^2 x_j^2] / n ~ 2 d / n = 0.025: error ~ 0.16.
  assert planted.relative_error(moment, w_star) < 0.3
  random = planted.init_params("random", jax.random.key(2), data)
  assert random.shape == (50,) and 0.5 < float(jnp.linalg.norm(random)) < 1.5
  with pytest.raises(ValueError, match="'ones'"):
    planted.init_params("ones", jax.random.key(2), data)


def test_sampling_shapes_and_validation():
  w_star = planted.sample_w_star(jax.random.key(0), 7)
  assert float(jnp.linalg.norm(w_star)) == pytest.approx(1.0, rel=1e-6)
  data = planted.sample_dataset(jax.random.key(1), w_star, 11)
  assert data.x.shape == (11, 7) and data.y.shape == (11,)
  assert np.all(np.asarray(data.y) >= 0)
  noisy = planted.sample_dataset(jax.random.key(1), w_star, 11, noise_std=0.5)
  assert np.any(np.asarray(noisy.y) != np.asarray(data.y))
  for bad in (0, -3, 2.5):
    with pytest.raises(ValueError, match=repr(bad)):
      planted.sample_w_star(jax.random.key(0), bad)
  with pytest.raises(ValueError, match="num_samples"):
    planted.sample_dataset(jax.random.key(1), w_star, 0)
  with pytest.raises(ValueError, match="-1"):
    planted.sample_dataset(jax.random.key(1), w_star, 5, noise_std=-1.0)


def test_minibatch_shards_partition_the_global_batch():
  w_star = planted.sample_w_star(jax.random.key(0), 4)
  data = planted.sample_dataset(jax.random.key(1), w_star, 50)
  key = jax.random.key(5)
  whole_x, whole_y = planted.minibatch(key, data, 16)
  shards = [planted.minibatch(key, data, 16, i, 4) for i in range(4)]
  np.testing.assert_array_equal(np.concatenate([s[0] for s in shards]), whole_x)
  np.testing.assert_array_equal(np.concatenate([s[1] for s in shards]), whole_y)
  with pytest.raises(ValueError, match="batch_size=10 is not divisible by num_shards=4"):
    planted.minibatch(key, data, 10, 0, 4)


def _problem(dim=6, num_samples=203, seed=0):
  w_star = planted.sample_w_star(jax.random.key(seed), dim)
  return planted.sample_dataset(jax.random.key(seed + 1), w_star, num_samples), w_star


@pytest.mark.parametrize("num_shards, num_segments", [(1, 1), (4, 4), (1, 4), (2, 8)])
def test_window_shards_tile_the_batch_one_device_reads(num_shards, num_segments):
  data, _ = _problem()
  key = jax.random.key(5)
  whole_x, whole_y = planted.window_minibatch(key, data, 16, 0, 1, num_segments)
  shards = [planted.window_minibatch(key, data, 16, i, num_shards, num_segments)
            for i in range(num_shards)]
  np.testing.assert_array_equal(np.concatenate([s[0] for s in shards]), whole_x)
  np.testing.assert_array_equal(np.concatenate([s[1] for s in shards]), whole_y)
  # No row twice in a batch.
  rows = {tuple(r) for r in np.asarray(whole_x)}
  assert len(rows) == 16


def test_window_covers_every_row_equally_often():
  """Over all offsets u, every stored row (but the n % S left over) is read B/S times.

  So with u uniform each row is in a step's batch with probability exactly B / (S L):
  the window sampler weighs every sample alike, as drawing with replacement does.
  """
  data, _ = _problem(num_samples=203)
  segments, batch = 4, 24                      # L = 50 rows per segment, 6 per window
  counts = np.zeros(203, int)
  for offset in range(50):
    x, _, window = planted._window_batch(jax.random.key(0), data, batch, 0, 1, segments, 3)
    window = dataclasses.replace(window, offset=jnp.int32(offset))
    np.add.at(counts, np.asarray(window.indices()), 1)
  assert np.all(counts[:200] == 6) and np.all(counts[200:] == 0)


@pytest.mark.parametrize("block_rows", [1, 2, 6, 12])
def test_window_loss_equals_loss_on_the_gathered_rows(block_rows):
  """Value and gradients of the blocked loss, with offsets that wrap and that do not."""
  data, w_star = _problem(dim=7, num_samples=203)
  w = 0.7 * w_star + 0.3 * planted.sample_w_star(jax.random.key(9), 7)
  for offset in (0, 17, 45, 49):  # L = 50, 12 rows per window: 45 and 49 wrap around
    x, y, window = planted._window_batch(jax.random.key(1), data, 48, 1, 2, 4, block_rows)
    window = dataclasses.replace(window, offset=jnp.int32(offset))
    rows = np.asarray(window.indices())
    value, grads = jax.value_and_grad(planted.loss, argnums=(0, 1, 2))(w, x, y, window)
    ref_value, ref_grads = jax.value_and_grad(planted.loss, argnums=(0, 1, 2))(
        w, x[rows], y[rows])
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    np.testing.assert_allclose(grads[0], ref_grads[0], rtol=1e-5, atol=1e-7)
    for full, at_rows in zip(grads[1:], ref_grads[1:]):
      expected = np.zeros(full.shape, np.float32)
      np.add.at(expected, rows, np.asarray(at_rows))
      np.testing.assert_allclose(full, expected, rtol=1e-5, atol=1e-7)


def test_window_reads_segments_held_per_device():
  data, _ = _problem(num_samples=200)
  segments = planted.split_segments(data, 4)
  assert segments.x.shape == (4, 50, 6) and segments.y.shape == (4, 50)
  key = jax.random.key(3)
  for i in range(4):
    mine = jax.tree_util.tree_map(lambda a, i=i: a[i], segments)
    np.testing.assert_array_equal(planted.window_minibatch(key, mine, 16, i, 4)[0],
                                  planted.window_minibatch(key, data, 16, i, 4)[0])
  np.testing.assert_array_equal(planted.window_minibatch(key, segments, 16, 0, 1, 4)[0],
                                planted.window_minibatch(key, data, 16, 0, 1, 4)[0])


def test_batch_fn_validation():
  data, w_star = _problem(num_samples=40)
  with pytest.raises(ValueError, match="'shuffle'"):
    planted.make_batch_fn(8, sampling="shuffle")
  for bad in (0, 2.5):
    with pytest.raises(ValueError, match="batch_size"):
      planted.make_batch_fn(bad)
  with pytest.raises(ValueError, match="divisible by num_segments=3"):
    planted.make_batch_fn(8, num_segments=3)(jax.random.key(0), (data, w_star), 0, 1)
  with pytest.raises(ValueError, match="segment has 10 rows"):
    planted.make_batch_fn(64)(jax.random.key(0), (data, w_star), 0, 4)
  with pytest.raises(ValueError, match="block_rows=3 must divide the 4 rows"):
    planted.make_batch_fn(16, block_rows=3)(jax.random.key(0), (data, w_star), 0, 4)
  with pytest.raises(ValueError, match="num_segments"):
    planted.split_segments(data, 41)
  x, y = planted.make_batch_fn(8, sampling="replacement")(jax.random.key(0),
                                                           (data, w_star), 1, 2)
  np.testing.assert_array_equal(x, planted.minibatch(jax.random.key(0), data, 8, 1, 2)[0])


def test_default_block_rows_divides_and_fits():
  assert planted.default_block_rows(512, 1000) == 256        # 256 rows x 4 kB = 1 MiB
  assert planted.default_block_rows(500, 1000) == 250
  assert planted.default_block_rows(7, 10**7) == 1
  for rows in (1, 12, 97, 128):
    r = planted.default_block_rows(rows, 100)
    assert rows % r == 0 and r * 400 <= planted.BLOCK_BYTES


def test_online_batch_statistics():
  """x ~ N(0, I) per device, y = ReLU(x w_star) exactly, devices draw independent rows.

  Tolerances, 6 standard errors with m = 4096 rows (8 shards of 512): a mean entry has
  sd 1/sqrt(m) = 0.0156 (tolerance 0.094); an off-diagonal covariance entry sd 1/sqrt(m),
  a diagonal one sqrt(2/m) = 0.022 (tolerance 0.133).
  """
  dim, batch, shards = 12, 4096, 8
  w_star = planted.sample_w_star(jax.random.key(0), dim)
  batch_fn = planted.make_online_batch_fn(batch)
  key = jax.random.key(7)
  parts = [batch_fn(key, (None, w_star), i, shards) for i in range(shards)]
  x = np.concatenate([np.asarray(p[0]) for p in parts])
  y = np.concatenate([np.asarray(p[1]) for p in parts])
  assert x.shape == (batch, dim) and x.dtype == np.float32
  np.testing.assert_array_equal(y, np.asarray(planted.relu(jnp.asarray(x) @ w_star)))
  m = batch
  assert np.all(np.abs(x.mean(0)) <= 6 / np.sqrt(m))
  cov = x.T @ x / m
  off = cov - np.diag(np.diag(cov))
  assert np.all(np.abs(off) <= 6 / np.sqrt(m))
  assert np.all(np.abs(np.diag(cov) - 1) <= 6 * np.sqrt(2 / m))
  assert not np.array_equal(parts[0][0], parts[1][0])          # devices differ
  np.testing.assert_array_equal(batch_fn(key, (None, w_star), 3, shards)[0], parts[3][0])
  with pytest.raises(ValueError, match="not divisible by num_shards=3"):
    batch_fn(key, (None, w_star), 0, 3)
  with pytest.raises(ValueError, match="batch_size"):
    planted.make_online_batch_fn(0)
