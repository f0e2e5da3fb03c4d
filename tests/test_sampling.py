"""Mini-batch samplers (jrelu.sampling) on planted data: windows, draws with replacement,
the blocked windowed loss, data held per device, and the online sampler."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrelu import planted
from jrelu import sampling

U = 2.0 ** -24  # float32 unit roundoff


def test_minibatch_shards_partition_the_global_batch():
  w_star = planted.sample_w_star(jax.random.key(0), 4)
  data = planted.sample_dataset(jax.random.key(1), w_star, 50)
  key = jax.random.key(5)
  whole_x, whole_y = sampling.minibatch(key, data, 16)
  shards = [sampling.minibatch(key, data, 16, i, 4) for i in range(4)]
  np.testing.assert_array_equal(np.concatenate([s[0] for s in shards]), whole_x)
  np.testing.assert_array_equal(np.concatenate([s[1] for s in shards]), whole_y)
  with pytest.raises(ValueError, match="batch_size=10 is not divisible by num_shards=4"):
    sampling.minibatch(key, data, 10, 0, 4)


def _problem(dim=6, num_samples=203, seed=0):
  w_star = planted.sample_w_star(jax.random.key(seed), dim)
  return planted.sample_dataset(jax.random.key(seed + 1), w_star, num_samples), w_star


@pytest.mark.parametrize("num_shards, num_segments", [(1, 1), (4, 4), (1, 4), (2, 8)])
def test_window_shards_tile_the_batch_one_device_reads(num_shards, num_segments):
  data, _ = _problem()
  key = jax.random.key(5)
  whole_x, whole_y = sampling.window_minibatch(key, data, 16, 0, 1, num_segments)
  shards = [sampling.window_minibatch(key, data, 16, i, num_shards, num_segments)
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
    x, _, window = sampling._window_batch(jax.random.key(0), data, batch, 0, 1, segments, 3)
    window = dataclasses.replace(window, offset=jnp.int32(offset))
    np.add.at(counts, np.asarray(window.indices()), 1)
  assert np.all(counts[:200] == 6) and np.all(counts[200:] == 0)


def test_window_offset_is_uniform_over_the_segment():
  """The step key draws the offset u uniformly from all L = 50 starts of a segment.

  With the test above this makes every row's inclusion probability B / (S L). 20,000 keys:
  each start's count is Binomial(20000, 1/50), mean 400, sd 19.8; every count within
  6 sd of 400 (a fixed set of keys, so the check is deterministic).
  """
  data, _ = _problem(num_samples=203)
  offset = jax.jit(jax.vmap(
      lambda k: sampling._window_batch(k, data, 24, 0, 1, 4, 3)[2].offset))
  offsets = np.asarray(offset(jax.random.split(jax.random.key(5), 20_000)))
  counts = np.bincount(offsets, minlength=50)
  assert counts.shape == (50,)                   # no offset outside [0, L)
  sd = np.sqrt(20_000 * (1 / 50) * (1 - 1 / 50))
  assert np.all(np.abs(counts - 400) <= 6 * sd), counts


@pytest.mark.parametrize("block_rows", [1, 2, 6, 12])
def test_window_loss_equals_loss_on_the_gathered_rows(block_rows):
  """Value and gradients of the blocked loss, with offsets that wrap and that do not."""
  data, w_star = _problem(dim=7, num_samples=203)
  w = 0.7 * w_star + 0.3 * planted.sample_w_star(jax.random.key(9), 7)
  for offset in (0, 17, 45, 49):  # L = 50, 12 rows per window: 45 and 49 wrap around
    x, y, window = sampling._window_batch(jax.random.key(1), data, 48, 1, 2, 4, block_rows)
    window = dataclasses.replace(window, offset=jnp.int32(offset))
    rows = np.asarray(window.indices())
    value, grads = jax.value_and_grad(planted.loss, argnums=(0, 1, 2))(w, x, y, window)
    ref_value, ref_grads = jax.value_and_grad(planted.loss, argnums=(0, 1, 2))(
        w, x[rows], y[rows])
    # Value and w-gradient: the blocked loss sums the same m = 24 rows in another order
    # (block means, then their mean). Per side, with r_i = relu(x_i w) - y_i computed to
    # |dr_i| <= (d + 1) u a_i, a_i = |x_i| |w| + |y_i| (a d = 7-term dot), and the sums
    # over rows to (m + 3) u (terms, 1/m, 1/2): |dL| <= (m + 3) u L + (d + 1) u mean|r| a,
    # |dg_j| <= [(m + 3) u sum|r_i x_ij| + (d + 1) u sum a_i |x_ij|] / m; twice that
    # between the sides. Per coordinate for g, since sum_i r_i x_ij cancels. (ReLU' flips
    # only if some |x_i w| < (d + 1) u a_i, which these fixed keys do not draw.)
    xr, yr = np.asarray(x, np.float64)[rows], np.asarray(y, np.float64)[rows]
    m, d = xr.shape
    r = np.maximum(xr @ np.asarray(w, np.float64), 0) - yr
    a = np.abs(xr) @ np.abs(np.asarray(w, np.float64)) + np.abs(yr)
    value_bound = 2 * U * ((m + 3) * 0.5 * np.mean(r * r) + (d + 1) * np.mean(np.abs(r) * a))
    assert abs(float(value) - float(ref_value)) <= value_bound, (value, ref_value)
    grad_bound = 2 * U * ((m + 3) * (np.abs(r) @ np.abs(xr)) + (d + 1) * (a @ np.abs(xr))) / m
    grad_error = np.abs(np.asarray(grads[0], np.float64) - np.asarray(ref_grads[0], np.float64))
    assert np.all(grad_error <= grad_bound), (grad_error / grad_bound).max()
    # Data cotangents, bit for bit: the backward pass computes them with the very same
    # eager ops (the vjp of the same loss on the same gathered rows x[rows], y[rows]) and
    # scatter-adds them into zeros with each row once (no row twice in a window), which
    # is exact; np.add.at into zeros below is exact for the same reason.
    for full, at_rows in zip(grads[1:], ref_grads[1:]):
      expected = np.zeros(full.shape, np.float32)
      np.add.at(expected, rows, np.asarray(at_rows))
      np.testing.assert_array_equal(full, expected)


def test_window_reads_segments_held_per_device():
  data, _ = _problem(num_samples=200)
  segments = sampling.split_segments(data, 4)
  assert segments.x.shape == (4, 50, 6) and segments.y.shape == (4, 50)
  key = jax.random.key(3)
  for i in range(4):
    mine = jax.tree_util.tree_map(lambda a, i=i: a[i], segments)
    np.testing.assert_array_equal(sampling.window_minibatch(key, mine, 16, i, 4)[0],
                                  sampling.window_minibatch(key, data, 16, i, 4)[0])
  np.testing.assert_array_equal(sampling.window_minibatch(key, segments, 16, 0, 1, 4)[0],
                                sampling.window_minibatch(key, data, 16, 0, 1, 4)[0])


def test_batch_fn_validation():
  data, w_star = _problem(num_samples=40)
  with pytest.raises(ValueError, match="'shuffle'"):
    sampling.make_batch_fn(8, sampling="shuffle")
  for bad in (0, 2.5):
    with pytest.raises(ValueError, match="batch_size"):
      sampling.make_batch_fn(bad)
  with pytest.raises(ValueError, match="divisible by num_segments=3"):
    sampling.make_batch_fn(8, num_segments=3)(jax.random.key(0), (data, w_star), 0, 1)
  with pytest.raises(ValueError, match="segment has 10 rows"):
    sampling.make_batch_fn(64)(jax.random.key(0), (data, w_star), 0, 4)
  with pytest.raises(ValueError, match="block_rows=3 must divide the 4 rows"):
    sampling.make_batch_fn(16, block_rows=3)(jax.random.key(0), (data, w_star), 0, 4)
  with pytest.raises(ValueError, match="num_segments"):
    sampling.split_segments(data, 41)
  x, y = sampling.make_batch_fn(8, sampling="replacement")(jax.random.key(0),
                                                           (data, w_star), 1, 2)
  np.testing.assert_array_equal(x, sampling.minibatch(jax.random.key(0), data, 8, 1, 2)[0])


def test_default_block_rows_divides_and_fits():
  assert sampling.default_block_rows(512, 1000) == 256        # 256 rows x 4 kB = 1 MiB
  assert sampling.default_block_rows(500, 1000) == 250
  assert sampling.default_block_rows(7, 10**7) == 1
  for rows in (1, 12, 97, 128):
    r = sampling.default_block_rows(rows, 100)
    assert rows % r == 0 and r * 400 <= sampling.BLOCK_BYTES


def test_online_batch_statistics():
  """x ~ N(0, I) per device, y = ReLU(x w_star) exactly, devices draw independent rows.

  Tolerances, 6 standard errors with m = 4096 rows (8 shards of 512): a mean entry has
  sd 1/sqrt(m) = 0.0156 (tolerance 0.094); an off-diagonal covariance entry sd 1/sqrt(m),
  a diagonal one sqrt(2/m) = 0.022 (tolerance 0.133).
  """
  dim, batch, shards = 12, 4096, 8
  w_star = planted.sample_w_star(jax.random.key(0), dim)
  batch_fn = sampling.make_online_batch_fn(batch, planted.sample_batch)
  key = jax.random.key(7)
  parts = [batch_fn(key, (None, w_star), i, shards) for i in range(shards)]
  x = np.concatenate([np.asarray(p[0]) for p in parts])
  y = np.concatenate([np.asarray(p[1]) for p in parts])
  assert x.shape == (batch, dim) and x.dtype == np.float32
  # Bit for bit: the reference runs the same eager ops on the same [512, 12] operands as
  # each device's sampler (per part, so the dot has the same shape too).
  np.testing.assert_array_equal(
      y, np.concatenate([np.asarray(planted.relu(p[0] @ w_star)) for p in parts]))
  m = batch
  # Rounding is negligible next to these tolerances: the float32 means and the 4096-term
  # covariance dot products round by at most m u E|x_j x_k| <= 2.4e-4, 1/400 of 0.094.
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
    sampling.make_online_batch_fn(0, planted.sample_batch)
