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


def draws(strategy, compressor, common=False):
  """K draws of the aggregate; with ``common``, a fresh shared key per draw, as in
  jrelu.transforms (per-device key = fold_in(step key, device), common key from the step
  key before the fold)."""
  x = jax.random.normal(jax.random.key(11), (N, D))

  def one(x_i, k):
    device_key = jax.random.fold_in(k, jax.lax.axis_index("data"))
    common_key = aggregation.common_key(k) if common else None
    return aggregation.aggregate(strategy, compressor, device_key, x_i, "data", common_key)

  def per_device(x_i, keys):
    return jax.vmap(lambda k: one(x_i, k))(keys)

  keys = jnp.broadcast_to(jax.random.split(jax.random.key(12), K), (N, K))
  out = jax.pmap(per_device, axis_name="data", devices=jax.devices()[:N])(x, keys)
  return np.asarray(x), np.asarray(out)  # out: [N devices, K draws, D]


@pytest.mark.parametrize("strategy", aggregation.supported(compressors.qsgd(1)))
@pytest.mark.parametrize("num_levels", [1, 4])
def test_unbiased_mean_over_devices(strategy, num_levels):
  x, out = draws(strategy, compressors.qsgd(num_levels, norm="l2"))
  for i in range(1, N):
    np.testing.assert_array_equal(out[i], out[0])  # every device gets the same estimate
  estimates = out[0]
  target = x.mean(axis=0)
  stderr = estimates.std(axis=0) / np.sqrt(K)
  z = np.abs(estimates.mean(axis=0) - target) / stderr
  assert z.max() <= 6, f"max z-score {z.max():.2f}"
  assert stderr.min() > 0  # the estimator is random, so the test has teeth


UNBIASED = [(name, make, strategy) for name, make in [
    ("terngrad", compressors.terngrad), ("rand_k", lambda: compressors.rand_k(2)),
    ("atomo", lambda: compressors.atomo(2))]
    for strategy in aggregation.supported(make()) if strategy != "psum"]


@pytest.mark.parametrize("name,make,strategy", UNBIASED,
                         ids=[f"{u[0]}-{u[2]}" for u in UNBIASED])
def test_other_unbiased_codecs_stay_unbiased_over_devices(name, make, strategy):
  """Same 6-sigma test for the other unbiased codecs, with common randomness bound as the
  transforms bind it (rand-k's shared indices differ between two_phase's phases)."""
  x, out = draws(strategy, make(), common=True)
  for i in range(1, N):
    np.testing.assert_array_equal(out[i], out[0])
  estimates = out[0]
  stderr = estimates.std(axis=0) / np.sqrt(K)
  z = np.abs(estimates.mean(axis=0) - x.mean(axis=0)) / stderr
  assert z.max() <= 6, f"{name} {strategy}: max z-score {z.max():.2f}"
  assert stderr.min() > 0


def test_two_phase_variance_below_sum_of_both_phases_bound():
  """Var of two_phase <= (phase-1 variance)/N + phase-2 variance, each by Lemma 3.1.

  With l2 QSGD at s levels on chunks of c = D/N coordinates, one quantization of v adds
  at most min(c/s^2, sqrt(c)/s) ||v||^2; phase 1 averages N independent ones, phase 2
  adds one on the average.
  """
  s = 2
  x, out = draws("two_phase", compressors.qsgd(s, norm="l2"))  # Lemma 3.1 is for l2
  c = D // N
  factor = min(c / s**2, np.sqrt(c) / s)
  chunks = x.reshape(N, N, c)  # [device, chunk, coord]
  phase1 = sum(factor * np.sum(chunks[i] ** 2) for i in range(N)) / N**2
  mean_chunks = chunks.mean(axis=0)
  phase2_upper = factor * np.sum(mean_chunks**2) + factor * phase1  # E||avg_hat||^2 bound
  mse = np.mean(np.sum((out[0] - x.mean(0)) ** 2, axis=1))
  # mse is a mean of K iid values; its sampling error is far below the slack used here.
  assert mse <= phase1 + phase2_upper


def test_integer_psum_is_exact_at_the_extremes():
  """Every |x_j| equal to its scale makes every level +-s deterministically: the packed
  fields then hold 0 or 2s on every device, the largest sums integer_psum must carry
  (2 s N < 2**bits_for(2 s N + 1)), and the result must be the exact mean."""
  s = 4
  signs = jnp.where(jax.random.bernoulli(jax.random.key(5), 0.5, (N, D)), 1.0, -1.0)
  signs = signs.at[:, :3].set(1.0).at[:, 3:6].set(-1.0)  # all-max and all-min columns
  x = 0.75 * signs

  def per_device(x_i):
    return aggregation.aggregate("integer_psum", compressors.qsgd(s, norm="max"),
                                 jax.random.key(0), x_i, "data")

  out = np.asarray(jax.pmap(per_device, axis_name="data", devices=jax.devices()[:N])(x))
  np.testing.assert_allclose(out[0], np.asarray(x).mean(axis=0), rtol=0, atol=1e-7)
  np.testing.assert_array_equal(out[0, :3], 0.75)
  np.testing.assert_array_equal(out[0, 3:6], -0.75)


def test_local_estimate_is_what_the_device_sent():
  """aggregate_with_local's second output is this device's own decoded contribution:
  for psum it is exactly compressor(key, x)."""
  c = compressors.qsgd(2)
  x = jax.random.normal(jax.random.key(1), (N, D))

  def per_device(x_i):
    key = jax.random.fold_in(jax.random.key(3), jax.lax.axis_index("data"))
    mean, local = aggregation.aggregate_with_local("psum", c, key, x_i, "data")
    return mean, local, c(key, x_i)

  mean, local, direct = jax.pmap(per_device, axis_name="data", devices=jax.devices()[:N])(x)
  np.testing.assert_array_equal(np.asarray(local), np.asarray(direct))
  np.testing.assert_allclose(np.asarray(mean[0]), np.asarray(direct).mean(0), atol=1e-6)


def test_wire_bits_formulas():
  q = compressors.qsgd(1)
  assert aggregation.wire_bits("psum", q, (1000,), 8) == 56000
  assert aggregation.wire_bits("all_gather", q, (1000,), 8) == 7 * q.wire_bits((1000,))
  assert aggregation.wire_bits("two_phase", q, (1000,), 8) == 14 * q.wire_bits((125,))
  assert aggregation.chunk_size(1001, 8) == 126
  # integer_psum at N=8, s=1: fields of bits_for(17) = 5 bits, 6 per word, one scale.
  assert aggregation.wire_bits("integer_psum", q, (1000,), 8) == 2 * 7 / 8 * 32 * (167 + 1)


def test_strategy_must_fit_the_codec():
  with pytest.raises(ValueError, match="majority_vote"):
    aggregation.check_strategy("majority_vote", compressors.qsgd(4))
  with pytest.raises(ValueError, match="integer_psum"):
    aggregation.check_strategy("integer_psum", compressors.identity())
  assert "integer_psum" in aggregation.supported(compressors.qsgd(4))


def test_unknown_strategy_is_rejected():
  with pytest.raises(ValueError, match="'ring'"):
    aggregation.check_strategy("ring")
  with pytest.raises(ValueError, match="num_devices must be an integer >= 1, got 0"):
    aggregation.wire_bits("psum", None, (3,), 0)


def test_fused_collective_equals_one_collective_per_leaf():
  """A code sent as one uint32 buffer arrives exactly as leaf-by-leaf collectives send it,
  for 32-bit leaves (fused, scalars included) and other widths (sent on their own)."""
  n = 4
  key = jax.random.key(0)
  code = {"words": jax.random.bits(key, (n, 5), jnp.uint32),
          "scale": jax.random.normal(key, (n,), jnp.float32),
          "index": jnp.arange(n * 3, dtype=jnp.int32).reshape(n, 3),
          "small": jnp.arange(n * 2, dtype=jnp.uint8).reshape(n, 2)}
  gather = lambda w: jax.lax.all_gather(w, "i")
  swap = lambda w: jax.lax.all_to_all(w, "i", 0, 0)
  # Jitted: an eager vmap compiles every batched primitive on its own. The collectives
  # only move bits, so the comparisons stay exact.
  by_leaf, fused = jax.jit(jax.vmap(
      lambda c: (jax.tree_util.tree_map(gather, c), aggregation._fused(gather, c)),
      axis_name="i"))(code)
  rows = {k: jnp.broadcast_to(v[:, None], (n, n) + v.shape[1:]) for k, v in code.items()}
  by_leaf_swap, fused_swap = jax.jit(jax.vmap(
      lambda c: (jax.tree_util.tree_map(swap, c), aggregation._fused(swap, c, batched=True)),
      axis_name="i"))(rows)
  for got, want in ((fused, by_leaf), (fused_swap, by_leaf_swap)):
    for k in code:
      assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
      np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))
