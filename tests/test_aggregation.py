"""Statistical properties of the aggregation strategies on 8 devices.

Each device holds a fixed vector x_i; an aggregation returns an estimate of mean_i x_i.
With K independent keys the sample mean of the estimates has per-coordinate standard
error sigma_j / sqrt(K), sigma_j^2 the estimator's variance (estimated from the same K
draws, K = 4000, so the estimate itself is within a few percent). A 6-sigma bound per
coordinate is a deterministic test with fixed keys and leaves no room for flakiness
(a two-sided 6-sigma event has probability 2e-9 per coordinate).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrelu import aggregation
from jrelu import compressors

N, D, K = 8, 40, 4000


def draws(strategy, compressor):
  x = jax.random.normal(jax.random.key(11), (N, D))

  def per_device(x_i, keys):
    device_keys = jax.vmap(lambda k: jax.random.fold_in(k, jax.lax.axis_index("data")))(keys)
    return jax.vmap(lambda k: aggregation.aggregate(strategy, compressor, k, x_i, "data"))(
        device_keys)

  keys = jnp.broadcast_to(jax.random.split(jax.random.key(12), K), (N, K))
  out = jax.pmap(per_device, axis_name="data", devices=jax.devices()[:N])(x, keys)
  return np.asarray(x), np.asarray(out)  # out: [N devices, K draws, D]


@pytest.mark.parametrize("strategy", aggregation.STRATEGIES)
@pytest.mark.parametrize("num_levels", [1, 4])
def test_unbiased_mean_over_devices(strategy, num_levels):
  x, out = draws(strategy, compressors.qsgd(num_levels))
  for i in range(1, N):
    np.testing.assert_array_equal(out[i], out[0])  # every device gets the same estimate
  estimates = out[0]
  target = x.mean(axis=0)
  stderr = estimates.std(axis=0) / np.sqrt(K)
  z = np.abs(estimates.mean(axis=0) - target) / stderr
  assert z.max() <= 6, f"max z-score {z.max():.2f}"
  assert stderr.min() > 0  # the estimator is random, so the test has teeth


def test_two_phase_variance_below_sum_of_both_phases_bound():
  """Var of two_phase <= (phase-1 variance)/N + phase-2 variance, each by Lemma 3.1.

  With l2 QSGD at s levels on chunks of c = D/N coordinates, one quantization of v adds
  at most min(c/s^2, sqrt(c)/s) ||v||^2; phase 1 averages N independent ones, phase 2
  adds one on the average.
  """
  s = 2
  x, out = draws("two_phase", compressors.qsgd(s))
  c = D // N
  factor = min(c / s**2, np.sqrt(c) / s)
  chunks = x.reshape(N, N, c)  # [device, chunk, coord]
  phase1 = sum(factor * np.sum(chunks[i] ** 2) for i in range(N)) / N**2
  mean_chunks = chunks.mean(axis=0)
  phase2_upper = factor * np.sum(mean_chunks**2) + factor * phase1  # E||avg_hat||^2 bound
  mse = np.mean(np.sum((out[0] - x.mean(0)) ** 2, axis=1))
  # mse is a mean of K iid values; its sampling error is far below the slack used here.
  assert mse <= phase1 + phase2_upper


def test_wire_bits_formulas():
  q = compressors.qsgd(1)
  assert aggregation.wire_bits("psum", q, (1000,), 8) == 56000
  assert aggregation.wire_bits("all_gather", q, (1000,), 8) == 7 * q.wire_bits((1000,))
  assert aggregation.wire_bits("two_phase", q, (1000,), 8) == 14 * q.wire_bits((125,))
  assert aggregation.chunk_size(1001, 8) == 126


def test_unknown_strategy_is_rejected():
  with pytest.raises(ValueError, match="'ring'"):
    aggregation.check_strategy("ring")
  with pytest.raises(ValueError, match="num_devices must be >= 1, got 0"):
    aggregation.wire_bits("psum", None, (3,), 0)
