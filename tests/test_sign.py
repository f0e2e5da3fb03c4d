"""Exact and statistical tests of the sign codecs (jrelu.compressors.sign).

signSGD (Bernstein et al., arXiv 1802.04434), its majority vote (arXiv 1810.05291) and the
scaled sign of EF-SGD (Karimireddy et al., arXiv 1901.09847): exact outputs, the tie rule,
majority vote under symmetric unimodal noise (where it helps) and under skewed noise
(where it hurts), and the scaled sign's contraction identity.

The statistical tests use fixed keys (deterministic) and compare empirical error rates with
their exact binomial values, with a 6-sigma tolerance derived at each check.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jrelu import aggregation
from jrelu import compressors

import helpers

PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)


@functools.lru_cache(maxsize=None)
def _jitted(scaled):
  return jax.jit(compressors.sign(scaled=scaled).__call__)


@functools.lru_cache(maxsize=None)
def _jit_fns(scaled):
  """Jitted (encode, decode, vmapped call, vmapped encode, vmapped decode) of one sign codec.

  The tests call these instead of the eager codec: eager JAX compiles every primitive on
  its own (dozens of XLA programs per call), a jit one program per shape, reused across
  tests. The eager path is checked for every codec by test_compressor_contract's
  jit-vs-eager test. The vmapped forms map over keys (the input is shared) or codes.
  """
  c = compressors.sign(scaled=scaled)
  return (jax.jit(c.encode), jax.jit(c.decode), jax.jit(jax.vmap(c, in_axes=(0, None))),
          jax.jit(jax.vmap(c.encode, in_axes=(0, None))), jax.jit(jax.vmap(c.decode)))


def roundtrip(c, x):
  """decode(encode(x)) as numpy, jitted (one compilation per shape, not per primitive)."""
  return np.asarray(_jitted(c.scaled)(jax.random.key(0), jnp.asarray(x)))


def random_vector(d, seed, kind="normal"):
  rng = np.random.default_rng(seed)
  if kind == "normal":
    v = rng.standard_normal(d)
  elif kind == "heavy":
    v = rng.standard_cauchy(d)
  elif kind == "sparse":
    v = rng.standard_normal(d) * (rng.uniform(size=d) < 0.1)
  else:  # mixed magnitudes
    v = rng.standard_normal(d) * rng.choice([1e-3, 1.0, 1e3], size=d)
  return v.astype(np.float32)


def six_sigma(p, n):
  """Tolerance for the mean of n iid Bernoulli(p): 6 standard deviations plus 2 counts.

  6 sigma is a two-sided Gaussian tail of 2e-9; the 2 / n absorbs the lattice (and the
  Poisson-like tail when n p is small) and the ~1e-7 error of float32 sampling.
  """
  return 6.0 * math.sqrt(p * (1.0 - p) / n) + 2.0 / n


# ----------------------------------------------------------------------------------------
# Exact outputs on handmade vectors.


def test_unscaled_exact_outputs():
  encode, _, call_keys, _, _ = _jit_fns(False)
  # No exact zeros: the output is deterministic. The negative subnormal -1e-45 stays
  # negative although XLA on CPU flushes it to zero in arithmetic; the positive subnormal
  # 1e-45 stays positive.
  x = np.array([3.0, -1.0, 1e-45, 0.25, 2.5, -1e-30, 1e30, -1e-45], np.float32)
  expected = np.array([1, -1, 1, 1, 1, -1, 1, -1], np.float32)
  # The key does not matter away from exact zeros: the same output under 8 keys.
  out = np.asarray(call_keys(jax.random.split(jax.random.key(1), 8), jnp.asarray(x)))
  np.testing.assert_array_equal(out, np.broadcast_to(expected, (8, 8)))
  code = encode(jax.random.key(0), x)
  assert code.scale is None
  # Negative coordinates 1, 5 and 7 set bits 1, 5 and 7 of the single word.
  np.testing.assert_array_equal(np.asarray(code.words), np.array([2 + 32 + 128], np.uint32))


def test_unscaled_exact_zeros_get_a_sign_and_the_rest_is_exact():
  _, _, _, encode_keys, decode_codes = _jit_fns(False)
  # Coordinates 2 and 3 are +0.0 and -0.0: each decodes to +1 or -1 (the coin of the key),
  # every other coordinate exactly as without zeros.
  x = np.array([3.0, -1.0, 0.0, -0.0, 2.5, -1e-30, 1e30, -1e-45], np.float32)
  zero = np.array([False, False, True, True, False, False, False, False])
  expected = np.array([1, -1, 0, 0, 1, -1, 1, -1], np.float32)
  codes = encode_keys(jax.random.split(jax.random.key(0), 16), jnp.asarray(x))
  outs = np.asarray(decode_codes(codes))
  words = np.asarray(codes.words)
  for out, word in zip(outs, words):
    np.testing.assert_array_equal(out[~zero], expected[~zero])
    assert set(out[zero].tolist()) <= {-1.0, 1.0}
    # The word has bits 1, 5, 7 (the negatives) plus bit i for a zero decoded as -1.
    flips = sum(1 << i for i in (2, 3) if out[i] == -1.0)
    np.testing.assert_array_equal(word, np.array([2 + 32 + 128 + flips], np.uint32))
  # 16 keys x 2 zeros: all 32 coins equal has probability 2^-31 (fixed keys: deterministic).
  assert set(np.unique(outs[:, zero]).tolist()) == {-1.0, 1.0}


def test_unscaled_zeros_decode_to_random_signs():
  c = compressors.sign()
  for shape in [(), (1,), (7, 13), (100,)]:
    zeros = np.zeros(shape, np.float32)
    out = roundtrip(c, zeros)
    assert out.shape == shape and out.dtype == np.float32
    assert set(np.unique(out).tolist()) <= {-1.0, 1.0}
    np.testing.assert_array_equal(roundtrip(c, zeros), out)  # same key, same signs
    if out.size >= 91:
      # d fair coins all equal: probability 2^(1 - d) <= 2^-90.
      assert set(np.unique(out).tolist()) == {-1.0, 1.0}


def test_scaled_exact_outputs():
  c = compressors.sign(scaled=True)
  encode, _, call_keys, _, _ = _jit_fns(True)
  # ||x||_1 = 8 over d = 4: scale 2. The non-zero coordinates are exact; the zero gets
  # a random sign, +-2.
  x = np.array([3.0, -1.0, 0.0, -4.0], np.float32)
  out = np.asarray(call_keys(jax.random.split(jax.random.key(0), 4), jnp.asarray(x)))
  np.testing.assert_array_equal(out[:, [0, 1, 3]], np.broadcast_to([2.0, -2.0, -2.0], (4, 3)))
  assert set(out[:, 2].tolist()) <= {-2.0, 2.0}
  x = np.array([3.0, -1.0, 0.5, -4.0], np.float32)  # no zero: scale 2.125, exact
  np.testing.assert_array_equal(roundtrip(c, x), np.array([2.125, -2.125, 2.125, -2.125],
                                                          np.float32))
  code = encode(jax.random.key(0), x)
  np.testing.assert_array_equal(np.asarray(code.scale), np.array([2.125], np.float32))
  # Zeros: scale 0, so 0 * (+-1) = 0, no NaN.
  for shape in [(), (1,), (7, 13)]:
    out = roundtrip(c, np.zeros(shape, np.float32))
    assert out.shape == shape and np.all(out == 0)


def test_scaled_bfloat16_matches_float32_reference():
  x = jnp.asarray(random_vector(300, seed=3)).astype(jnp.bfloat16)
  out = _jitted(True)(jax.random.key(0), x)
  assert out.dtype == jnp.bfloat16
  x32 = np.asarray(x, np.float32)
  expected = np.mean(np.abs(x32)) * np.where(x32 >= 0, 1.0, -1.0)
  # The only rounding is the final cast to bfloat16: 2^-8 relative.
  np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=2**-8)


def test_key_is_unused_away_from_zeros():
  x = jnp.asarray(random_vector(100, seed=4))
  assert np.all(np.asarray(x) != 0)
  for scaled in (False, True):
    encode = _jit_fns(scaled)[0]
    a = encode(jax.random.key(1), x)
    b = encode(jax.random.key(2), x)
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
      np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_flags():
  plain, scaled = compressors.sign(), compressors.sign(scaled=True)
  assert plain.majority_vote and not scaled.majority_vote
  for c in (plain, scaled):
    assert not c.unbiased and not c.integer_sum
    assert c.name == "sign" and compressors.REGISTRY["sign"] is compressors.sign
  assert compressors.sign(np.bool_(True)).scaled is True


def _quoted(value):
  """Regex matching repr(value) as a whole token (not inside a longer number or word)."""
  return r"(?<![\w.\-])" + re.escape(repr(value)) + r"(?![\w.])"


@pytest.mark.parametrize("bad", [1, 0, "yes", None, 1.0])
def test_factory_rejects_non_bool(bad):
  with pytest.raises(ValueError, match=_quoted(bad)):
    compressors.sign(scaled=bad)


# ----------------------------------------------------------------------------------------
# The sign of an exact zero: a fair coin drawn from the key.

COIN_KEYS, COIN_ZEROS = 4096, 256
COIN_LAGS = (1, 2, 31, 32, 33, 64, 255)  # within a word, across word boundaries, far


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_sign_of_zero_is_a_fair_independent_coin(dtype):
  # x: COIN_ZEROS exact zeros (+0.0 and -0.0 alternating) followed by 64 non-zeros, coded
  # under COIN_KEYS independent keys. If the sign of each zero is an independent fair coin,
  # then (a) for every subset of n (key, zero) pairs the fraction of +1 is a Binomial(n,
  # 1/2) / n; (b) for a lag L the agreements s_i s_{i+L} (i < COIN_ZEROS - L) of the same
  # key are iid fair signs too (the edges i -- i+L form disjoint paths, a forest, and edge
  # products of iid fair signs on a forest are iid fair), and so are the agreements of
  # the same coordinate under consecutive keys. Each fraction of n iid Bernoulli(1/2) is
  # within six_sigma(1/2, n) = 3 / sqrt(n) + 2 / n of 1/2 but with probability <= 2
  # exp(-18) = 3e-8 (Hoeffding, no Gaussian approximation needed), so the ~4,700 checks
  # below fail by chance with probability < 2e-4; the keys are fixed, so the test is
  # deterministic. A fixed sign (the old sign(0) = +1) gives fraction 1; a coin shared by
  # all coordinates (or by all keys) gives agreement 1; a coin reused every 32 coordinates
  # gives agreement 1 at lag 32.
  c = compressors.sign()
  rng = np.random.default_rng(5)
  nonzero = (rng.choice([-1.0, 1.0], 64) * rng.uniform(0.5, 2.0, 64)).astype(np.float32)
  zeros = np.where(np.arange(COIN_ZEROS) % 2 == 0, 0.0, -0.0).astype(np.float32)
  assert np.all(zeros == 0) and np.sum(np.signbit(zeros)) == COIN_ZEROS // 2
  x = jnp.asarray(np.concatenate([zeros, nonzero])).astype(dtype)
  keys = jax.random.split(jax.random.key(2024), COIN_KEYS)
  fn = jax.jit(jax.vmap(c, in_axes=(0, None)))
  out = np.asarray(fn(keys, x), np.float32)
  assert out.shape == (COIN_KEYS, COIN_ZEROS + 64)
  # Same keys, same flips (and the same codes).
  np.testing.assert_array_equal(np.asarray(fn(keys, x), np.float32), out)
  encode = _jit_fns(False)[0]
  np.testing.assert_array_equal(np.asarray(encode(keys[7], x).words),
                                np.asarray(encode(keys[7], x).words))
  # Away from exact zeros the output is the exact sign under every key.
  np.testing.assert_array_equal(out[:, COIN_ZEROS:],
                                np.broadcast_to(np.sign(nonzero), (COIN_KEYS, 64)))
  coins = out[:, :COIN_ZEROS]
  assert set(np.unique(coins).tolist()) == {-1.0, 1.0}
  plus = coins == 1.0

  def check_half(fraction, n, what):
    assert abs(fraction - 0.5) <= six_sigma(0.5, n), (what, fraction, six_sigma(0.5, n))

  # (a) Fair: pooled, +0.0 and -0.0 separately, per coordinate, per key.
  check_half(float(plus.mean()), plus.size, "all")
  check_half(float(plus[:, 0::2].mean()), plus.size // 2, "+0.0")
  check_half(float(plus[:, 1::2].mean()), plus.size // 2, "-0.0")
  for i, f in enumerate(plus.mean(axis=0)):
    check_half(float(f), COIN_KEYS, f"coordinate {i}")
  for k, f in enumerate(plus.mean(axis=1)):
    check_half(float(f), COIN_ZEROS, f"key {k}")
  # (b) Independent across coordinates (several lags) and across keys.
  for lag in COIN_LAGS:
    agree = coins[:, lag:] == coins[:, :-lag]
    check_half(float(agree.mean()), agree.size, f"lag {lag}")
  agree = coins[1:] == coins[:-1]
  check_half(float(agree.mean()), agree.size, "consecutive keys")
  print(f"{jnp.dtype(dtype).name}: fraction +1 = {plus.mean():.5f} "
        f"(tolerance {six_sigma(0.5, plus.size):.5f}); lag-1 agreement = "
        f"{(coins[:, 1:] == coins[:, :-1]).mean():.5f}; per-coordinate max deviation = "
        f"{np.abs(plus.mean(axis=0) - 0.5).max():.4f} (tolerance "
        f"{six_sigma(0.5, COIN_KEYS):.4f})")


def test_scaled_sign_of_a_zero_coordinate_is_a_coin():
  # The scaled codec shares the coin: a zero coordinate of a non-zero array decodes to
  # +-scale, +scale with probability 1/2 (tolerance as above, n = COIN_KEYS draws).
  call_keys = _jit_fns(True)[2]
  x = jnp.array([3.0, 0.0, -1.0, -0.0], jnp.float32)  # scale 1
  out = np.asarray(call_keys(jax.random.split(jax.random.key(9), COIN_KEYS), x))
  np.testing.assert_array_equal(out[:, [0, 2]], np.broadcast_to([1.0, -1.0], (COIN_KEYS, 2)))
  assert set(np.unique(out[:, [1, 3]]).tolist()) == {-1.0, 1.0}
  for j in (1, 3):
    fraction = float(np.mean(out[:, j] == 1.0))
    assert abs(fraction - 0.5) <= six_sigma(0.5, COIN_KEYS), (j, fraction)


# ----------------------------------------------------------------------------------------
# Majority vote: re-encoding the mean of decoded signs.


def majority_vote(c, codes, key):
  """Server side of signSGD with majority vote, as the two_phase aggregation runs it:
  decode every worker's code, average, re-encode (the key breaks ties), decode."""
  mean = jnp.mean(jax.vmap(c.decode)(codes), axis=0)
  return c.decode(c.encode(key, mean))


def test_majority_vote_with_ties_on_a_handmade_example():
  c = compressors.sign()
  # Rows are 4 workers. Column sums of the votes:
  #   col 0: +1+1-1+1 = 2 -> +1   col 1: +1-1-1+1 = 0 (tie) -> coin
  #   col 2: -4       -> -1       col 3: coin+1+1+1 >= 2 (a zero gradient votes a coin) -> +1
  #   col 4: -1-1-1+1 = -2 -> -1  col 5: +1+1+1-1 = 2 -> +1
  grads = np.array([[0.5, 2.0, -1.0, 0.0, -3.0, 1.0],
                    [0.1, -2.0, -0.1, 1.0, -0.5, 1.0],
                    [-9.0, -0.1, -5.0, 2.0, -0.5, 1.0],
                    [0.2, 0.3, -2.0, 4.0, 7.0, -100.0]], np.float32)
  clear = np.array([0, 2, 3, 4, 5])

  @jax.jit
  @jax.vmap
  def vote(key):
    worker_key, server_key = jax.random.split(key)
    codes = jax.vmap(c.encode)(jax.random.split(worker_key, 4), jnp.asarray(grads))
    return majority_vote(c, codes, server_key)

  out = np.asarray(vote(jax.random.split(jax.random.key(0), 16)))
  np.testing.assert_array_equal(out[:, clear],
                                np.broadcast_to([1.0, -1.0, 1.0, -1.0, 1.0], (16, 5)))
  # The tie: a coin under each key; 16 independent coins all equal has probability 2^-15
  # (fixed keys: deterministic).
  assert set(out[:, 1].tolist()) == {-1.0, 1.0}
  # The vote ignores magnitudes: column 5's float mean is negative (-24.25), its vote +1.
  assert grads[:, 5].mean() < 0


VOTE_DEVICES, VOTE_COLUMNS, VOTE_KEYS = 4, 64, 4000


def test_majority_vote_aggregation_breaks_ties_with_a_fair_coin():
  # The real aggregation, jrelu.aggregation.aggregate("majority_vote", ...) under pmap on
  # 4 devices, each with its own key (fold_in of the device index), over VOTE_KEYS key
  # draws. Column j has the vote pattern PATTERNS[j % 8] (rows = devices; 0 is an exact
  # zero gradient, whose vote is itself a coin). Two_phase splits the 64 columns into 4
  # chunks of 16, so every device re-encodes (and breaks the ties of) 2 columns of each
  # pattern. Expected outcome of each column:
  #   ties (two +1, two -1): the mean is exactly 0, re-encoded as a fair coin: +1 w.p. 1/2;
  #   clear majorities (3-1, 4-0, coin+3): the exact majority under every key;
  #   two zeros and two +: votes c1 + c2 + 2 with c1, c2 fair coins: 4 or 2 (+1) w.p. 3/4,
  #     0 (a tie, then a coin) w.p. 1/4: +1 w.p. 3/4 + 1/8 = 7/8.
  # Tolerances: the VOTE_KEYS draws of a column are iid (independent keys), so each
  # fraction is a Binomial(n, p) / n, within six_sigma(p, n) of p but w.p. <= 2 exp(-18)
  # (Hoeffding) per check; different tied columns have independent coins (different
  # coordinates of a coin vector, or different devices), so the pooled fraction and the
  # agreement of consecutive tied columns (edge products on a path: iid fair) are too.
  # A fixed sign(0) = +1 gives fraction 1 for ties and 1 for the two-zero columns; devices
  # breaking ties separately would make the devices disagree.
  patterns = np.array([[1, 1, -1, -1], [1, -1, 1, -1], [-1, 1, 1, -1],   # ties
                       [1, 1, -1, 1], [-1, 1, -1, -1], [-1, -1, -1, -1],  # clear
                       [0, 1, 1, 1],                                       # clear, a zero
                       [0, 0, 1, 1]], np.float32).T                        # 7/8
  tie_types, clear_types, two_zero_type = (0, 1, 2), (3, 4, 5, 6), 7
  types = np.arange(VOTE_COLUMNS) % 8
  signs = patterns[:, types]                                    # [devices, columns]
  rng = np.random.default_rng(11)
  magnitudes = np.exp(rng.uniform(-5.0, 5.0, signs.shape))      # votes ignore magnitudes
  x = (signs * magnitudes).astype(np.float32)
  x[signs == 0] = np.where(rng.uniform(size=int(np.sum(signs == 0))) < 0.5, 0.0, -0.0)
  assert np.all((x == 0) == (signs == 0))
  c = compressors.sign()

  def per_device(x_i, keys):
    device_keys = jax.vmap(lambda k: jax.random.fold_in(k, jax.lax.axis_index("data")))(keys)
    return jax.vmap(lambda k: aggregation.aggregate("majority_vote", c, k, x_i, "data"))(
        device_keys)

  keys = jnp.broadcast_to(jax.random.split(jax.random.key(31), VOTE_KEYS),
                          (VOTE_DEVICES, VOTE_KEYS))
  out = np.asarray(jax.pmap(per_device, axis_name="data",
                            devices=jax.devices()[:VOTE_DEVICES])(jnp.asarray(x), keys))
  assert out.shape == (VOTE_DEVICES, VOTE_KEYS, VOTE_COLUMNS)
  for i in range(1, VOTE_DEVICES):
    np.testing.assert_array_equal(out[i], out[0])  # every device gets the same votes
  out = out[0]
  assert set(np.unique(out).tolist()) == {-1.0, 1.0}
  # Clear majorities: exact, under every key.
  majority = np.sign(np.sum(np.where(signs == 0, 1.0, signs), axis=0))  # coin+1+1+1 > 0
  clear = np.isin(types, clear_types)
  np.testing.assert_array_equal(out[:, clear],
                                np.broadcast_to(majority[clear], (VOTE_KEYS, clear.sum())))
  # Ties: +1 about half of the time, per column and pooled; independent across columns.
  tied = out[:, np.isin(types, tie_types)] == 1.0
  for j, f in enumerate(tied.mean(axis=0)):
    assert abs(f - 0.5) <= six_sigma(0.5, VOTE_KEYS), (j, f, six_sigma(0.5, VOTE_KEYS))
  assert abs(tied.mean() - 0.5) <= six_sigma(0.5, tied.size), tied.mean()
  agree = tied[:, 1:] == tied[:, :-1]
  assert abs(agree.mean() - 0.5) <= six_sigma(0.5, agree.size), agree.mean()
  # Two zero gradients and two +1 votes: +1 with probability 7/8.
  two_zero = out[:, types == two_zero_type] == 1.0
  assert abs(two_zero.mean() - 7 / 8) <= six_sigma(7 / 8, two_zero.size), two_zero.mean()
  print(f"ties: fraction +1 = {tied.mean():.4f} (tolerance {six_sigma(0.5, tied.size):.4f}),"
        f" per column in [{tied.mean(axis=0).min():.3f}, {tied.mean(axis=0).max():.3f}] "
        f"(tolerance {six_sigma(0.5, VOTE_KEYS):.3f}); consecutive-tie agreement = "
        f"{agree.mean():.4f}; two zeros: fraction +1 = {two_zero.mean():.4f} vs 0.875 "
        f"(tolerance {six_sigma(7 / 8, two_zero.size):.4f})")


def majority_error(q, num_workers):
  """P(majority of num_workers (odd) independent votes is wrong), each wrong w.p. q."""
  return sum(math.comb(num_workers, k) * q**k * (1 - q)**(num_workers - k)
             for k in range((num_workers + 1) // 2, num_workers + 1))


TRIALS, DIM = 200, 256      # 51,200 independent (trial, coordinate) samples per rate
MAX_WORKERS = 27
MU = 0.3                    # |true gradient| in units of the noise scale
ODD_WORKERS = (1, 3, 9, 27)  # odd: no ties, so both signs of g have the same error rate


@functools.lru_cache(maxsize=None)
def _vote_fns():
  """Jitted (worker side, server side) of majority vote; fixed shapes, compiled once."""
  c = compressors.sign()
  # The key only breaks ties (exact zeros), which neither the workers' noisy gradients
  # (continuous or never 0) nor an odd number of votes produce.
  key = jax.random.key(0)
  workers = jax.jit(jax.vmap(jax.vmap(lambda g: c(key, g))))  # [TRIALS, MAX_WORKERS, DIM]
  server = jax.jit(jax.vmap(lambda mean: c(key, mean)))        # [TRIALS, DIM]
  return workers, server


def votes_by_prefix(worker_grads, worker_counts):
  """Majority votes of the first N workers of worker_grads [TRIALS, MAX_WORKERS, DIM],
  for each N in worker_counts: {N: float32 [TRIALS, DIM] of +-1}.

  Every worker sends its decoded sign (one vmapped codec call); the server averages the
  first N and re-encodes, as majority_vote above. Prefixes share workers, so rates for
  different N are correlated, but each one is an exact sample of its own N.
  """
  workers, server = _vote_fns()
  signs = workers(worker_grads)
  return {n: np.asarray(server(jnp.mean(signs[:, :n], axis=1))) for n in worker_counts}


@pytest.mark.parametrize("noise", ["gaussian", "laplace"])
def test_majority_vote_error_decreases_with_workers(noise):
  # Majority vote under symmetric unimodal noise (the noise assumption of Bernstein et
  # al. 2019, arXiv 1810.05291). Worker m sees g + xi_m with xi iid symmetric and
  # unimodal (Gaussian N(0, 1) or Laplace with scale 1) and |g_i| = MU. It votes wrong with probability
  # q = P(xi < -MU): Phi(-0.3) = 0.382 (Gaussian), exp(-0.3) / 2 = 0.370 (Laplace). The
  # majority of N (odd) independent votes is wrong with the exact binomial probability
  # majority_error(q, N) = 0.38, 0.33, 0.23, 0.10 (Gaussian) for N = 1, 3, 9, 27 (the
  # repetition code). For each N, every (trial, coordinate) is an independent
  # Bernoulli(p_N) sample (independent noise; the same p for g_i = +MU and -MU by
  # symmetry), so the empirical rate over n = TRIALS * DIM samples is within
  # six_sigma(p_N, n) <= 0.013 of p_N, while consecutive p_N differ by >= 0.055 > the sum
  # of two tolerances: the empirical rates decrease strictly as well (this implication
  # needs no independence between the rates of different N, which share workers).
  if noise == "gaussian":
    q = 0.5 * math.erfc(MU / math.sqrt(2.0))
    xi = jax.random.normal(jax.random.key(123), (TRIALS, MAX_WORKERS, DIM))
  else:
    q = 0.5 * math.exp(-MU)
    xi = jax.random.laplace(jax.random.key(123), (TRIALS, MAX_WORKERS, DIM))
  signs = np.random.default_rng(0).choice([-1.0, 1.0], size=DIM).astype(np.float32)
  votes = votes_by_prefix(MU * signs + xi, ODD_WORKERS)
  n = TRIALS * DIM
  rates, exact = [], []
  for num_workers in ODD_WORKERS:
    out = votes[num_workers]
    assert set(np.unique(out)) <= {-1.0, 1.0}
    rate = float(np.mean(out != signs))
    p = majority_error(q, num_workers)
    assert abs(rate - p) <= six_sigma(p, n), (num_workers, rate, p, six_sigma(p, n))
    rates.append(rate)
    exact.append(p)
  assert all(a - b > six_sigma(a, n) + six_sigma(b, n) for a, b in zip(exact, exact[1:]))
  assert all(a > b for a, b in zip(rates, rates[1:])), rates


def test_skewed_noise_makes_more_workers_hurt():
  # Skewed noise (Remark 3 of Bernstein et al. 2018, arXiv 1802.04434). Each worker's stochastic gradient is 50
  # with probability 0.1 and -1 otherwise: mean +4.1 > 0, yet a single worker's sign is
  # right only with probability 0.1. The majority of N (odd) votes is right with
  # probability P(Bin(N, 0.1) > N / 2) = 1 - majority_error(0.9, N) = 0.1, 0.028, 0.00089
  # for N = 1, 3, 9: more workers hurt. The float mean of the N gradients is positive iff
  # at least one worker drew 50 (50 k - (N - k) > 0 iff k >= 1 for N < 51), probability
  # 1 - 0.9^N = 0.1, 0.271, 0.613: averaging before taking the sign helps. Tolerances:
  # six_sigma over n = TRIALS * DIM independent samples (<= 0.0135 here), below every gap
  # between consecutive exact values (>= 0.027), so both orderings hold empirically too.
  n = TRIALS * DIM
  counts = (1, 3, 9)
  big = jax.random.uniform(jax.random.key(7), (TRIALS, MAX_WORKERS, DIM)) < 0.1
  grads = jnp.where(big, 50.0, -1.0)
  votes = votes_by_prefix(grads, counts)
  right_vote, right_mean, exact_vote, exact_mean = [], [], [], []
  for num_workers in counts:
    out = votes[num_workers]
    p_vote = 1.0 - majority_error(0.9, num_workers)  # each vote wrong w.p. 0.9
    p_mean = 1.0 - 0.9**num_workers
    rate_vote = float(np.mean(out == 1.0))
    rate_mean = float(np.mean(np.asarray(jnp.mean(grads[:, :num_workers], axis=1)) > 0))
    assert abs(rate_vote - p_vote) <= six_sigma(p_vote, n), (num_workers, rate_vote, p_vote)
    assert abs(rate_mean - p_mean) <= six_sigma(p_mean, n), (num_workers, rate_mean, p_mean)
    right_vote.append(rate_vote)
    right_mean.append(rate_mean)
    exact_vote.append(p_vote)
    exact_mean.append(p_mean)
  assert all(a - b > six_sigma(a, n) + six_sigma(b, n)
             for a, b in zip(exact_vote, exact_vote[1:]))
  assert all(b - a > six_sigma(a, n) + six_sigma(b, n)
             for a, b in zip(exact_mean, exact_mean[1:]))
  assert all(a > b for a, b in zip(right_vote, right_vote[1:])), right_vote
  assert all(a < b for a, b in zip(right_mean, right_mean[1:])), right_mean


# ----------------------------------------------------------------------------------------
# Packing and wire size.


@pytest.mark.parametrize("shape", [(), (1,), (31,), (32,), (33,), (64,), (1000,), (7, 13),
                                   (2, 3, 5)])
@pytest.mark.parametrize("scaled", [False, True])
def test_one_bit_per_coordinate(shape, scaled):
  c = compressors.sign(scaled=scaled)
  d = math.prod(shape)
  # Unscaled: the d sign bits and the non-finite flag; scaled: d bits and the scale.
  expected = 32 * math.ceil(d / 32) + 32 if scaled else 32 * math.ceil((d + 1) / 32)
  assert c.wire_bits(shape) == expected
  x = random_vector(d, seed=d).reshape(shape)
  assert np.all(x != 0)  # no exact zero: no coin, so the bits are exactly x < 0
  code = _jit_fns(scaled)[0](jax.random.key(0), x)
  assert compressors.payload_bits(code) == expected
  stream_bits = d if scaled else d + 1
  assert code.words.dtype == jnp.uint32 and code.words.shape == (math.ceil(stream_bits / 32),)
  if scaled:
    assert code.scale.dtype == jnp.float32 and code.scale.shape == (1,)
  # Stream bit i (bit i % 32 of word i // 32) is 1 exactly where x_i < 0; the flag bit d
  # (unscaled; x is finite) and the padding are 0.
  words = np.asarray(code.words)
  stream = (words[:, None] >> np.arange(32, dtype=np.uint32)) & 1
  np.testing.assert_array_equal(stream.reshape(-1)[:d], (x.reshape(-1) < 0).astype(np.uint32))
  assert np.all(stream.reshape(-1)[d:] == 0)
  np.testing.assert_array_equal(
      np.asarray(helpers.unpack(code.words, 1, stream_bits))[:d],
      (x.reshape(-1) < 0).astype(np.uint32))


def test_wire_bits_docstring_example():
  assert compressors.sign().wire_bits((1000,)) == 1024
  assert compressors.sign(scaled=True).wire_bits((1000,)) == 1056


# ----------------------------------------------------------------------------------------
# The scaled sign (EF-SGD): l1 norm and the contraction identity.


@pytest.mark.parametrize("shape", [(1,), (5,), (300,), (7, 13)])
@pytest.mark.parametrize("kind", ["normal", "heavy", "sparse", "mixed"])
def test_scaled_keeps_the_l1_norm(shape, kind):
  c = compressors.sign(scaled=True)
  x = random_vector(math.prod(shape), seed=len(kind) + math.prod(shape), kind=kind)
  out = roundtrip(c, x.reshape(shape)).astype(np.float64)
  l1 = float(np.sum(np.abs(x.astype(np.float64))))
  # ||C(x)||_1 = d * (||x||_1 / d) = ||x||_1 up to the float32 mean (relative error
  # <= d * 2^-24 < 1e-4 for d <= 300 in the worst case, ~1e-7 typically).
  np.testing.assert_allclose(float(np.sum(np.abs(out))), l1, rtol=1e-4)
  # Every coordinate has the same magnitude, the mean |x|.
  np.testing.assert_allclose(np.abs(out), l1 / x.size, rtol=1e-4)


def density(p):
  """phi(p) = ||p||_1^2 / (d ||p||_2^2) in float64 (signSGD's density, EF-SGD's delta)."""
  p = np.asarray(p, np.float64).ravel()
  return float(np.sum(np.abs(p))**2 / (p.size * np.sum(p * p)))


def contraction_gap(c, p):
  """(||C(p) - p||^2, (1 - phi(p)) ||p||^2, ||p||^2), all in float64."""
  p64 = np.asarray(p, np.float64)
  out = roundtrip(c, p).astype(np.float64)
  norm2 = float(np.sum(p64 * p64))
  return float(np.sum((out - p64) ** 2)), (1.0 - density(p)) * norm2, norm2


def test_scaled_sign_contraction_identity():
  # The scaled sign of EF-SGD (Karimireddy et al., arXiv 1901.09847): with m = ||p||_1 / d and C(p) = m sign(p) (the coin of sign(0) is
  # harmless: (m * (+-1) - 0)^2 = m^2 either way), ||C(p) - p||^2 = ||p||^2 - 2 m ||p||_1 + d m^2 = ||p||^2 - ||p||_1^2 / d
  # = (1 - phi(p)) ||p||^2 exactly. Float tolerance: m is the least-squares scale of sign(p)
  # (d/da ||a sign(p) - p||^2 = 0 at a = m), so a float32 error dm in m changes the left
  # side only by d dm^2 <= d (1e-4 m)^2 <= 1e-8 ||p||^2 (Cauchy-Schwarz: d m^2 <= ||p||^2);
  # the squares and sums in float64 add ~1e-15 relative.
  c = compressors.sign(scaled=True)
  kinds = ("normal", "heavy", "sparse", "mixed")
  for d in (1, 2, 37, 499):
    for trial in range(8):
      p = random_vector(d, seed=1000 * d + trial, kind=kinds[trial % 4])
      if not np.any(p):
        p[0] = 1.0
      lhs, rhs, norm2 = contraction_gap(c, p)
      assert abs(lhs - rhs) <= 1e-8 * norm2, (trial, d, lhs, rhs)
      # delta-approximate with delta = phi >= 1/d (Cauchy-Schwarz): the worst case.
      assert lhs <= (1.0 - 1.0 / d) * norm2 + 1e-8 * norm2


@pytest.mark.parametrize("d", [1, 2, 10, 257])
def test_density_extremes(d):
  # Scaled sign density: phi = 1 for constant magnitude (C is exact: no error at all), phi = 1/d for a
  # 1-sparse vector (the worst case: ||C(p) - p||^2 = (1 - 1/d) ||p||^2). Tolerances as in
  # the identity test above.
  c = compressors.sign(scaled=True)
  rng = np.random.default_rng(d)
  flat = (0.37 * rng.choice([-1.0, 1.0], size=d)).astype(np.float32)
  assert density(flat) == pytest.approx(1.0, rel=1e-12)
  lhs, rhs, norm2 = contraction_gap(c, flat)
  assert abs(rhs) <= 1e-12 * norm2 and lhs <= 1e-8 * norm2
  sparse = np.zeros(d, np.float32)
  sparse[d // 2] = -3.0
  assert density(sparse) == pytest.approx(1.0 / d, rel=1e-12)
  lhs, rhs, norm2 = contraction_gap(c, sparse)
  assert rhs == pytest.approx((1.0 - 1.0 / d) * 9.0, rel=1e-12)
  assert abs(lhs - rhs) <= 1e-8 * norm2


# ----------------------------------------------------------------------------------------
# Property tests.


# A few fixed shapes (scalar, short, word boundary +-1, 2-D) keep compilations few.
PROPERTY_SHAPES = st.sampled_from([(), (1,), (5,), (31,), (33,), (7, 13)])


@PROPERTY_SETTINGS
@given(hnp.arrays(np.float32, PROPERTY_SHAPES,
                  elements=st.floats(width=32, allow_nan=False, allow_infinity=False)))
def test_unscaled_decode_is_sign_with_random_sign_at_zero(x):
  # Hypothesis draws +-0.0 and subnormals too; numpy compares subnormals exactly.
  out = roundtrip(compressors.sign(), x)
  assert out.shape == x.shape and out.dtype == np.float32
  zero = x == 0
  np.testing.assert_array_equal(out[~zero], np.where(x < 0, -1.0, 1.0)[~zero])
  assert np.all(np.abs(out[zero]) == 1.0)


@PROPERTY_SETTINGS
@given(hnp.arrays(np.float32, PROPERTY_SHAPES,
                  elements=st.floats(-2.0**100, 2.0**100, width=32)))
def test_scaled_decode_is_mean_magnitude_times_sign(x):
  out = roundtrip(compressors.sign(scaled=True), x).astype(np.float64)
  x64 = x.astype(np.float64)
  mean_abs = float(np.mean(np.abs(x64))) if x.size else 0.0
  zero = x == 0
  expected = mean_abs * np.where(x < 0, -1.0, 1.0)
  # float32 mean of <= 91 terms: relative error <= 91 * 2^-24 < 1e-5; subnormal inputs
  # (< 1.2e-38 each) may be flushed to zero by XLA on CPU, hence the absolute 1e-37.
  # Every magnitude is the mean |x|; signs are exact away from exact zeros (a coin there).
  np.testing.assert_allclose(np.abs(out), np.abs(expected), rtol=1e-5, atol=1e-37)
  np.testing.assert_allclose(out[~zero], expected[~zero], rtol=1e-5, atol=1e-37)
  # Output signs are exact even where the magnitude is not.
  if mean_abs > 1e-37:
    np.testing.assert_array_equal(np.sign(out[~zero]), np.where(x < 0, -1.0, 1.0)[~zero])
