"""Exact and statistical tests of the sparsifiers top_k and rand_k (jrelu.compressors).

top_k is deterministic, so its tests are exact: the kept set equals numpy's stable argsort
of -|x| (ties to the lowest index), and ||C(x) - x||^2 equals the sum of the d - k smallest
squares. rand_k is checked with FIXED keys and many vmapped draws (deterministic tests);
every tolerance is derived from the exact variance of the checked quantity, with a
6-sigma margin, in the comment next to it.
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

from jrelu import compressors
from jrelu.compressors import bitpack
from jrelu.compressors._sparse import kept_count

import helpers


def make_vector(shape, seed, kind="generic"):
  """float32 test input. generic: normal times mixed scales (no zeros, no ties);
  ties: small integers (many equal magnitudes, both signs, some zeros)."""
  rng = np.random.default_rng(seed)
  if kind == "ties":
    x = rng.integers(-4, 5, size=shape).astype(np.float64)
  else:
    x = rng.standard_normal(shape) * rng.choice([0.1, 1.0, 10.0], size=shape)
  return x.astype(np.float32)


def reference_top_k(x, k):
  """numpy oracle: flat indices of the k largest |x|, ties to the lowest index."""
  flat = np.asarray(x, np.float32).ravel()
  return np.argsort(-np.abs(flat), kind="stable")[:k]


# Eager JAX compiles every primitive on its own (dozens of small XLA programs per codec
# call), but those programs are shared by every later eager call on the same shapes; a jit
# compiles one larger program per codec and shape (bound codecs: per common key too). The
# tests below use jit (or eval_shape, which compiles nothing) where that costs less
# compile time, measured; the rand_k tests on many small configurations stay eager.


def _quoted(value):
  """Regex matching repr(value) as a whole token."""
  return r"(?<![\w.\-])" + re.escape(repr(value)) + r"(?![\w.])"


# ----------------------------------------------------------------------------------------
# The k / fraction rule and the factories.


@pytest.mark.parametrize("k, fraction, size, expected", [
    (10, None, 1000, 10),
    (10, None, 91, 10),
    (10, None, 3, 3),        # clamped to the size
    (10, None, 1, 1),
    (None, 0.1, 1000, 100),
    (None, 0.1, 91, 10),     # ceil(9.1)
    (None, 0.25, 1, 1),      # ceil(0.25) = 1: never zero coordinates
    (None, 0.07, 100, 7),    # 0.07 * 100 = 7.000000000000001 in binary floating point
    (None, 0.3, 10, 3),      # 0.3 * 10 = 3.0000000000000004
    (None, 1e-6, 50, 1),
    (None, 1.0, 37, 37),
    (None, 0.5, 0, 0),       # empty array
])
def test_kept_count(k, fraction, size, expected):
  assert kept_count(k, fraction, size) == expected
  for factory in (compressors.top_k, compressors.rand_k):
    assert factory(k, fraction=fraction).num_kept((size,)) == expected


@pytest.mark.parametrize("factory", [compressors.top_k, compressors.rand_k],
                         ids=["top_k", "rand_k"])
@pytest.mark.parametrize("kwargs, bad", [
    (dict(k=0), 0),
    (dict(k=-3), -3),
    (dict(k=2.5), 2.5),
    (dict(k=True), True),
    (dict(k="10"), "10"),
    (dict(fraction=0.0), 0.0),
    (dict(fraction=-0.1), -0.1),
    (dict(fraction=1.5), 1.5),
    (dict(fraction=float("nan")), float("nan")),
    (dict(fraction=True), True),
    (dict(fraction="0.1"), "0.1"),
    (dict(k=5, fraction=0.1), 0.1),   # both given
    (dict(), None),                   # neither given
])
def test_factories_reject_bad_hyper_parameters(factory, kwargs, bad):
  with pytest.raises(ValueError, match=_quoted(bad)):
    factory(**kwargs)


def test_factories_accept_numpy_numbers():
  assert compressors.top_k(np.int64(4)).k == 4
  assert compressors.rand_k(fraction=np.float32(0.5)).fraction == 0.5
  assert compressors.rand_k(fraction=1).num_kept((9,)) == 9
  c = compressors.top_k(3)
  assert isinstance(c, compressors.TopK) and c.name == "top_k" and not c.unbiased
  r = compressors.rand_k(3)
  assert isinstance(r, compressors.RandK) and r.name == "rand_k" and r.unbiased


# ----------------------------------------------------------------------------------------
# top_k: exact.

TOP_K_CASES = [
    (dict(k=10), (1000,)),
    (dict(k=10), (7, 13)),
    (dict(k=10), (3,)),
    (dict(k=1), (1,)),
    (dict(k=1), ()),
    (dict(fraction=0.1), (1000,)),
    (dict(fraction=0.1), (7, 13)),
    (dict(fraction=0.07), (4, 25)),
    (dict(fraction=1.0), (2, 3, 5)),
]
TOP_K_IDS = [f"{'k' if 'k' in kw else 'f'}{next(iter(kw.values()))}-{'x'.join(map(str, s))}"
             for kw, s in TOP_K_CASES]


@pytest.mark.parametrize("kind", ["generic", "ties"])
@pytest.mark.parametrize("kwargs, shape", TOP_K_CASES, ids=TOP_K_IDS)
def test_top_k_keeps_exactly_the_largest_magnitudes(kwargs, shape, kind):
  c = compressors.top_k(**kwargs)
  x = make_vector(shape, seed=len(shape) + sum(shape), kind=kind)
  size = x.size
  k = kept_count(kwargs.get("k"), kwargs.get("fraction"), size)
  encode = jax.jit(c.encode)
  code = encode(jax.random.key(0), jnp.asarray(x))
  order = reference_top_k(x, k)
  # The code holds the values in descending magnitude, ties to the lowest index (the
  # order of numpy's stable argsort of -|x|), and exactly those indices.
  indices = np.asarray(helpers.unpack(code.words, bitpack.bits_for(size), k))
  np.testing.assert_array_equal(indices, order)
  np.testing.assert_array_equal(np.asarray(code.values), x.ravel()[order])
  expected = np.zeros(size, np.float32)
  expected[order] = x.ravel()[order]
  out = np.asarray(jax.jit(c.decode)(code))
  assert out.shape == shape and out.dtype == np.float32
  np.testing.assert_array_equal(out.ravel(), expected)
  # The key is ignored: the codec is deterministic.
  other = encode(jax.random.key(123), jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(other.words), np.asarray(code.words))
  np.testing.assert_array_equal(np.asarray(other.values), np.asarray(code.values))
  # Kept coordinates are copied exactly, so ||C(x) - x||^2 is exactly the sum of the
  # d - k smallest squares; float64 summation order is the only difference (relative
  # ~1e-13 at d = 1000).
  x64, out64 = x.astype(np.float64).ravel(), out.astype(np.float64).ravel()
  sq = np.sort(x64**2)
  err = float(np.sum((out64 - x64) ** 2))
  assert err == pytest.approx(float(np.sum(sq[:size - k])), rel=1e-12, abs=0.0)
  # ... and the d - k smallest squares average at most the mean: the k/d contraction.
  assert err <= (1.0 - k / size) * float(np.sum(sq)) * (1 + 1e-12)


@pytest.mark.parametrize("shape, k, expected", [
    ((1000,), 10, 32 * 10 + 32 * 4),      # 10 indices of 10 bits = 100 bits -> 4 words
    ((7, 13), 10, 32 * 10 + 32 * 3),      # 91 -> 7 bits, 70 bits -> 3 words
    ((1,), 10, 32 * 1 + 32 * 1),          # clamped to 1 value, 1-bit index -> 1 word
    ((1024,), 32, 32 * 32 + 32 * 10),     # exactly 10 bits per index
    ((1025,), 32, 32 * 32 + 32 * 11),
    ((4,), 2, 96),                        # the docstring example's array, 2-bit indices
])
def test_top_k_wire_bits(shape, k, expected):
  c = compressors.top_k(k)
  assert c.wire_bits(shape) == expected
  # The payload's shapes and dtypes are static: tracing encode (no compilation) gives them.
  code = jax.eval_shape(c.encode, jax.random.key(0), jnp.asarray(make_vector(shape, seed=1)))
  assert compressors.payload_bits(code) == expected
  assert code.values.dtype == jnp.float32 and code.words.dtype == jnp.uint32


def test_top_k_docstring_examples():
  c = compressors.top_k(2)
  out = c(jax.random.key(0), jnp.array([0.5, -3.0, 1.0, 2.0]))
  np.testing.assert_array_equal(np.asarray(out), [0.0, -3.0, 0.0, 2.0])
  assert c.wire_bits((1000,)) == 96


def test_top_k_bfloat16_values_are_exact():
  c = compressors.top_k(fraction=0.2)
  x = jnp.asarray(make_vector((10, 30), seed=5)).astype(jnp.bfloat16)
  out = jax.jit(c)(jax.random.key(0), x)
  assert out.dtype == jnp.bfloat16 and out.shape == (10, 30)
  x32 = np.asarray(x, np.float32)
  order = reference_top_k(x32, 60)
  expected = np.zeros(300, np.float32)
  expected[order] = x32.ravel()[order]
  np.testing.assert_array_equal(np.asarray(out, np.float32).ravel(), expected)


@functools.lru_cache(maxsize=None)
def _jitted_top_k(k):
  c = compressors.top_k(k)
  return jax.jit(lambda x: c(jax.random.key(0), x))


# Each new (d, k) compiles once, so d and k come from small sets (k = 17 and 70 clamp for
# the small d); derandomize makes every run draw the same examples. The properties are
# exact.
@settings(max_examples=40, deadline=None, derandomize=True)
@given(data=st.data(), d=st.sampled_from([1, 2, 5, 17, 64]),
       k=st.sampled_from([1, 3, 17, 70]))
def test_top_k_property_at_most_k_nonzeros_that_agree_with_x(data, d, k):
  elements = st.one_of(
      st.sampled_from([0.0, -1.0, 1.0, 2.0]),  # ties and zeros
      st.floats(-1e6, 1e6, width=32, allow_subnormal=False))
  x = data.draw(hnp.arrays(np.float32, d, elements=elements))
  out = np.asarray(_jitted_top_k(k)(jnp.asarray(x)))
  kept = min(k, d)
  nonzero = out != 0
  assert np.count_nonzero(nonzero) <= kept
  np.testing.assert_array_equal(out[nonzero], x[nonzero])
  # As multisets, the output magnitudes are the `kept` largest |x_i| and d - kept zeros
  # (whichever of tied entries is kept): nothing dropped beats anything kept.
  mags = np.sort(np.abs(x))
  np.testing.assert_array_equal(
      np.sort(np.abs(out)), np.concatenate([np.zeros(d - kept, np.float32), mags[d - kept:]]))
  # The contraction bound, with the same slack for float64 summation order.
  err = float(np.sum((out.astype(np.float64) - x) ** 2))
  assert err <= (1.0 - kept / d) * float(np.sum(x.astype(np.float64) ** 2)) * (1 + 1e-12)


# ----------------------------------------------------------------------------------------
# rand_k: exact structure.


def test_rand_k_decode_regenerates_the_indices_from_the_seed():
  d, k = 300, 30
  c = compressors.rand_k(k)
  x = make_vector((d,), seed=3)
  code = c.encode(jax.random.key(11), jnp.asarray(x))
  assert code.seed.shape == (1,) and code.seed.dtype == jnp.uint32
  assert code.values.shape == (k,) and code.values.dtype == jnp.float32
  # Independent reconstruction: the documented index rule, applied to the sent seed.
  seed = np.uint32(np.asarray(code.seed)[0])
  indices = np.asarray(jax.random.permutation(jax.random.key(seed), d)[:k])
  assert len(set(indices.tolist())) == k
  expected = np.zeros(d, np.float32)
  expected[indices] = x[indices] * np.float32(d / k)
  np.testing.assert_array_equal(np.asarray(code.values), expected[indices])
  np.testing.assert_array_equal(np.asarray(c.decode(code)), expected)


def test_rand_k_bound_to_the_seed_key_gives_the_unbound_estimate():
  # The unbound codec draws its index set from jax.random.key(seed); a codec bound to
  # that very key picks the same set, so both estimates are identical.
  c = compressors.rand_k(fraction=0.25)
  x = jnp.asarray(make_vector((7, 13), seed=4))
  for key_seed in range(5):
    key = jax.random.key(key_seed)
    code = c.encode(key, x)
    bound = c.bind(jax.random.key(np.uint32(np.asarray(code.seed)[0])))
    bound_code = bound.encode(key, x)
    assert bound_code.seed is None
    np.testing.assert_array_equal(np.asarray(bound_code.values), np.asarray(code.values))
    np.testing.assert_array_equal(np.asarray(bound.decode(bound_code)),
                                  np.asarray(c.decode(code)))


def test_rand_k_bound_shares_indices_and_drops_the_seed():
  d = 200
  c = compressors.rand_k(20)
  a = c.bind(jax.random.key(7))
  b = c.bind(jax.random.key(7))
  other = c.bind(jax.random.key(8))
  x, y = (jnp.asarray(make_vector((d,), seed=s)) for s in (1, 2))  # no zeros
  # Same common key: same index set on different inputs and whatever the encode key.
  out_ax = np.asarray(a(jax.random.key(0), x))
  out_by = np.asarray(b(jax.random.key(1), y))
  np.testing.assert_array_equal(out_ax != 0, out_by != 0)
  assert np.count_nonzero(out_ax) == 20
  # Another common key: another set (two fixed 20-of-200 draws coincide w.p. 1/C(200,20)).
  assert not np.array_equal(np.asarray(other(jax.random.key(0), x)) != 0, out_ax != 0)
  # The unbound codec is unchanged by bind (bind returns a copy) and keeps its seed.
  assert c.common_key is None and c.unbiased
  assert a.common_key is not None and not a.unbiased
  # Exactly the 32-bit seed is saved. The payload's shapes are static: tracing encode
  # (no compilation) gives them exactly.
  for shape in [(1,), (7, 13), (1000,)]:
    assert c.wire_bits(shape) - a.wire_bits(shape) == 32
    assert a.wire_bits(shape) == 32 * a.num_kept(shape)
    ones = jax.ShapeDtypeStruct(shape, jnp.float32)
    assert compressors.payload_bits(jax.eval_shape(a.encode, jax.random.key(0), ones)) == \
        a.wire_bits(shape)
    assert compressors.payload_bits(jax.eval_shape(c.encode, jax.random.key(0), ones)) == \
        c.wire_bits(shape)
  # A code of one kind cannot be decoded by the other.
  with pytest.raises(ValueError, match="binding"):
    a.decode(c.encode(jax.random.key(0), x))
  with pytest.raises(ValueError, match="binding"):
    c.decode(a.encode(jax.random.key(0), x))


def test_rand_k_bound_codes_commute_with_sum():
  c = compressors.rand_k(fraction=0.1).bind(jax.random.key(3))
  xs = jnp.asarray(np.stack([make_vector((300,), seed=s) for s in range(4)]))
  codes = [c.encode(jax.random.key(s), x) for s, x in enumerate(xs)]
  summed = jax.tree_util.tree_map(lambda *leaves: sum(leaves), *codes)
  # The decode is a scatter of the values at fixed indices: linear in the values. Only
  # float32 summation order differs (a few ulps of the largest value, 10 * |x| * 2^-22).
  np.testing.assert_allclose(np.asarray(c.decode(summed)),
                             sum(np.asarray(c.decode(code), np.float64) for code in codes),
                             rtol=1e-6, atol=1e-4)


def test_rand_k_bound_under_vmap_uses_the_same_indices_for_every_chunk():
  # The two_phase aggregation vmaps encode over chunks with one common key.
  c = compressors.rand_k(fraction=0.1).bind(jax.random.key(5))
  chunks = jnp.asarray(make_vector((8, 125), seed=6))
  keys = jax.random.split(jax.random.key(0), 8)
  outs = np.asarray(jax.jit(jax.vmap(lambda k, x: c.decode(c.encode(k, x))))(keys, chunks))
  pattern = outs != 0
  assert np.all(pattern.sum(axis=1) == 13)  # ceil(0.1 * 125)
  assert np.all(pattern == pattern[0])


@pytest.mark.parametrize("shape", [(1,), (), (7, 13)])
def test_rand_k_keeping_everything_is_exact(shape):
  c = compressors.rand_k(fraction=1.0)
  x = jnp.asarray(make_vector(shape, seed=2))
  for comp in (c, c.bind(jax.random.key(0))):
    np.testing.assert_array_equal(np.asarray(comp(jax.random.key(4), x)), np.asarray(x))


def test_rand_k_bfloat16():
  c = compressors.rand_k(fraction=0.5)
  x = jnp.asarray(make_vector((64,), seed=3)).astype(jnp.bfloat16)
  out = jax.jit(c)(jax.random.key(0), x)
  assert out.dtype == jnp.bfloat16 and out.shape == (64,)
  kept = np.asarray(out, np.float32) != 0
  assert np.count_nonzero(kept) == 32
  # Scaling by 2 is exact, so the kept entries are exactly 2 x.
  np.testing.assert_array_equal(np.asarray(out, np.float32)[kept],
                                2 * np.asarray(x, np.float32)[kept])


def test_rand_k_docstring_examples():
  assert compressors.rand_k(10).bind(jax.random.key(7)).wire_bits((1000,)) == 320
  c = compressors.rand_k(fraction=0.25)
  assert int(jnp.count_nonzero(c(jax.random.key(0), jnp.arange(8.0)))) <= 2
  assert (c.wire_bits((8,)), c.bind(jax.random.key(1)).wire_bits((8,))) == (96, 64)


# ----------------------------------------------------------------------------------------
# rand_k: statistics over many draws.

D, K_KEPT = 200, 50   # p = k / d = 0.25
NUM_DRAWS = 10_000


@functools.lru_cache(maxsize=None)
def rand_k_draws(bound: bool):
  """NUM_DRAWS decoded draws of rand_k (k = 50 of d = 200) on one fixed vector.

  Unbound: one encode key per draw. Bound: the codec is bound inside the vmap to one
  common key per draw (as the aggregation rebinds every step) and the encode key is fixed.
  """
  x = make_vector((D,), seed=17)
  keys = jax.random.split(jax.random.key(20240612 + bound), NUM_DRAWS)
  if bound:
    c = compressors.rand_k(fraction=K_KEPT / D)
    fn = lambda ck: c.bind(ck)(jax.random.key(0), jnp.asarray(x))
  else:
    c = compressors.rand_k(K_KEPT)
    fn = lambda k: c(k, jnp.asarray(x))
  return x.astype(np.float64), np.asarray(jax.jit(jax.vmap(fn))(keys), np.float64)


@pytest.mark.parametrize("bound", [False, True], ids=["unbound", "bound"])
def test_rand_k_exactly_k_distinct_nonzeros_at_the_scaled_values(bound):
  x, draws = rand_k_draws(bound)
  nonzero = draws != 0  # x has no zeros
  assert np.all(nonzero.sum(axis=1) == K_KEPT)
  # Different keys draw different sets: among 1000 draws of a 50-of-200 set a repeat has
  # probability < 1000^2 / C(200, 50) ~ 1e-41.
  assert len({row.tobytes() for row in nonzero[:1000]}) == 1000
  scaled = np.broadcast_to(x * (D / K_KEPT), draws.shape)
  np.testing.assert_allclose(draws[nonzero], scaled[nonzero], rtol=2e-7)


@pytest.mark.parametrize("bound", [False, True], ids=["unbound", "bound"])
def test_rand_k_inclusion_probability_is_k_over_d(bound):
  _, draws = rand_k_draws(bound)
  counts = np.sum(draws != 0, axis=0)
  p = K_KEPT / D
  # Draws are independent, so the count of index i is exactly Binomial(K, p): mean K p =
  # 2500, sd sqrt(K p (1 - p)) = 43.3. At K p = 2500 the binomial is near Gaussian; 6 sd
  # (+1 for discreteness) has two-sided tail ~2e-9 per index, < 1e-6 over 200 indices.
  # An index rule favouring low indices, or k not exact, moves counts by >> 6 sd.
  sd = math.sqrt(NUM_DRAWS * p * (1 - p))
  dev = np.abs(counts - NUM_DRAWS * p)
  assert np.all(dev <= 6 * sd + 1), (int(np.argmax(dev)), float(dev.max()), 6 * sd + 1)
  # Their total is exactly k per draw.
  assert counts.sum() == NUM_DRAWS * K_KEPT


@pytest.mark.parametrize("bound", [False, True], ids=["unbound", "bound"])
def test_rand_k_unbiased(bound):
  x, draws = rand_k_draws(bound)
  mean = draws.mean(axis=0)
  # Coordinate i of one draw is (d/k) x_i B_i with B_i ~ Bernoulli(k/d): variance
  # x_i^2 (d/k)^2 p (1 - p) = x_i^2 (d/k - 1) = 3 x_i^2. The mean of K independent draws
  # has sd |x_i| sqrt((d/k - 1) / K) = 0.017 |x_i|; we allow 6 sd (the count behind it is
  # the near-Gaussian Binomial(10000, 0.25) of the inclusion test). 1e-6 |x_i| covers the
  # float32 rounding of (d/k) x_i (relative 2^-23). Dropping the d/k scale (a 75% bias)
  # fails by ~40 sd.
  sd = np.abs(x) * math.sqrt((D / K_KEPT - 1) / NUM_DRAWS)
  err = np.abs(mean - x)
  tol = 6 * sd + 1e-6 * np.abs(x)
  assert np.all(err <= tol), (int(np.argmax(err / tol)), float(np.max(err / tol)))
  # Per coordinate that allows a 10% relative bias; a global one is pinned exactly: every
  # draw keeps exactly k indices, so sum_i mean_i / x_i = (d/k) (1/K) sum_i N_i = d with no
  # sampling noise at all (N_i the inclusion counts). Only float rounding remains
  # (relative 2^-23 per value).
  assert float(np.sum(mean / x)) == pytest.approx(D, rel=1e-6)


def exact_error_moments(x, d, k):
  """Mean and variance of e = ||C(x) - x||^2 for rand_k, exactly.

  e = sum_{i not in S} x_i^2 + sum_{i in S} (d/k - 1)^2 x_i^2 = ||x||^2 + c T with
  c = (d/k - 1)^2 - 1 = (d/k)(d/k - 2) and T = sum_{i in S} a_i, a_i = x_i^2. S is a simple
  random sample of k of d without replacement, so E T = k mean(a) and
  Var T = k var(a) (d - k) / (d - 1) with var(a) the population variance
  (1/d) sum (a - mean(a))^2.
  Hence E e = ||x||^2 (1 + (d/k - 2)) = (d/k - 1) ||x||^2, the formula of Stich et al.
  """
  a = x * x
  c = (d / k) * (d / k - 2)
  mean = float(np.sum(a)) * (d / k - 1)
  var = c * c * k * float(np.var(a)) * (d - k) / (d - 1)
  return mean, var


def test_exact_error_moments_by_enumeration():
  # The formula checked against brute force over all C(6, 2) = 15 subsets.
  import itertools
  x = np.array([0.3, -1.0, 2.0, 0.5, -0.2, 1.5])
  d, k = 6, 2
  errs = []
  for subset in itertools.combinations(range(d), k):
    c = np.zeros(d)
    c[list(subset)] = x[list(subset)] * d / k
    errs.append(np.sum((c - x) ** 2))
  mean, var = exact_error_moments(x, d, k)
  assert np.mean(errs) == pytest.approx(mean, rel=1e-12)
  assert np.var(errs) == pytest.approx(var, rel=1e-12)
  assert mean == pytest.approx((d / k - 1) * np.sum(x * x), rel=1e-12)


@pytest.mark.parametrize("bound", [False, True], ids=["unbound", "bound"])
def test_rand_k_variance_is_exactly_d_over_k_minus_one(bound):
  x, draws = rand_k_draws(bound)
  e = np.sum((draws - x) ** 2, axis=1)
  mean, var = exact_error_moments(x, D, K_KEPT)
  # The K per-draw errors e_k are iid with mean exactly (d/k - 1)||x||^2 and the exact
  # variance above, so their average has sd sqrt(var / K) (~0.4% of the mean here); 6 sd.
  # 1e-6 * mean covers the float32 rounding of the decoded values.
  tol = 6 * math.sqrt(var / NUM_DRAWS) + 1e-6 * mean
  assert abs(float(np.mean(e)) - mean) <= tol, (float(np.mean(e)), mean, tol)
  # The sample variance of e checks the pair-inclusion probabilities: the (d-k)/(d-1)
  # factor of sampling without replacement is 0.75 here, while independent inclusions
  # would give var (d-1)/(d-k) = 1.33 var. The sd of the sample variance is
  # sqrt((mu4 - var^2) / K) to first order (delta method), with mu4 the 4th central moment
  # estimated from the same draws (kurtosis ~2.9, so 6 sd is ~8% of var); 6 of those.
  s2 = float(np.var(e, ddof=1))
  mu4 = float(np.mean((e - np.mean(e)) ** 4))
  tol2 = 6 * math.sqrt(max(mu4 - s2 * s2, 0.0) / NUM_DRAWS)
  assert abs(s2 - var) <= tol2, (s2, var, tol2)
  assert abs(s2 - var * (D - 1) / (D - K_KEPT)) > tol2  # independent inclusions fail


def test_rand_k_every_subset_equally_likely():
  # d = 7, k = 3: C(7, 3) = 35 subsets, each with probability 1/35 if the draw is uniform
  # without replacement. With K = 17500 draws each count is Binomial(17500, 1/35): mean
  # 500, sd 22.0; 6 sd per subset (+1) has tail ~5e-9 (near-Gaussian), < 2e-7 over 35.
  # The Pearson statistic is ~chi-square with 34 degrees of freedom: P(> 90) = 5.9e-7
  # (a 10% excess on a single subset adds 1.6 sd to its count, ~2.5 to the statistic).
  d, k, num = 7, 3, 17_500
  c = compressors.rand_k(k)
  x = jnp.arange(1.0, d + 1.0)
  keys = jax.random.split(jax.random.key(77), num)
  pattern = np.asarray(jax.jit(jax.vmap(lambda key: c(key, x)))(keys)) != 0
  assert np.all(pattern.sum(axis=1) == k)
  ids = pattern @ (1 << np.arange(d))
  counts = np.bincount(ids, minlength=1 << d)
  subsets = [m for m in range(1 << d) if bin(m).count("1") == k]
  assert counts[subsets].sum() == num
  expected = num / math.comb(d, k)
  sd = math.sqrt(num * (1 / 35) * (34 / 35))
  assert np.all(np.abs(counts[subsets] - expected) <= 6 * sd + 1), counts[subsets]
  chi2 = float(np.sum((counts[subsets] - expected) ** 2 / expected))
  assert chi2 <= 90.0, chi2


# ----------------------------------------------------------------------------------------
# Large arrays: the selections that do not sort every coordinate.


LARGE = 1 << 17  # above MIN_SIZE of both sparsifiers


def test_top_k_without_sorting_is_lax_top_k():
  # top_indices ranks only the entries above a threshold from a strided sample, and falls
  # back to jax.lax.top_k of everything when they do not hold the top k: either way the
  # same indices in the same order as jax.lax.top_k of the magnitudes. Rows: generic, many ties, sorted, and a pattern the
  # sample never sees (the large entries sit between sampled positions), which takes the
  # fallback; under vmap, so one row's fallback runs beside the others' fast path.
  from jrelu.compressors import _top_k
  k = 300
  rng = np.random.default_rng(7)
  generic = rng.standard_normal(LARGE)  # signed: ranked by magnitude
  hidden = np.zeros(LARGE)  # more large entries than the candidates' slots
  hidden[1 + 2 * rng.choice(LARGE // 2 - 1, 4 * k, replace=False)] = 1.0 + rng.random(4 * k)
  assert _top_k.sample_stride(LARGE) % 2 == 0  # the sample reads even positions only
  # Sparse: 200 nonzeros, about 100 of them sampled, fewer than the sample rank the
  # threshold is read at (150 expected + 5 sd), so the threshold is 0 and the zeros of
  # lowest index fill the last 100 places, from the candidates (no fallback).
  sparse = np.zeros(LARGE)
  sparse[rng.choice(LARGE, 200, replace=False)] = 1.0 + rng.random(200)
  # Crowded: 250 large entries, all at sampled positions, so fewer than k reach the
  # threshold read from the sample (its 216th largest): the fallback.
  crowded = np.zeros(LARGE)
  crowded[2 * rng.choice(LARGE // 2, 250, replace=False)] = 1.0 + rng.random(250)
  rows = np.stack([generic, np.round(4 * generic) / 4, np.sort(generic), hidden, sparse,
                   crowded])
  a = jnp.asarray(rows, jnp.float32)
  program = jax.jit(jax.vmap(lambda v: (_top_k.top_indices(v, k), _top_k.candidates(v, k))))
  got, (fast, missed) = program(a)
  expected = np.asarray(jax.lax.top_k(jnp.abs(a), k)[1])
  np.testing.assert_array_equal(np.asarray(got), expected)
  assert np.asarray(missed).tolist() == [False, False, False, True, False, True]
  np.testing.assert_array_equal(np.asarray(fast)[[0, 1, 2, 4]], expected[[0, 1, 2, 4]])


def test_top_k_sample_spans_the_array():
  # Between MIN_SIZE and 2 * SAMPLE entries the sample is every second entry, not the
  # first SAMPLE: a row whose entries grow 10x past position 65,536 (as a gradient's
  # scale changes from one layer to the next) keeps its threshold among the large ones.
  # A sample of the first 65,536 entries would put it among the small ones, where about
  # 26,000 of the large entries exceed it, far more than the candidates' slots: fallback.
  from jrelu.compressors import _top_k
  d, k = 100_000, 300
  assert _top_k.sample_stride(d) == 2
  row = np.abs(np.random.default_rng(11).standard_normal(d))
  row[:_top_k.SAMPLE] *= 0.1
  a = jnp.asarray(row, jnp.float32)
  fast, missed = jax.jit(lambda v: _top_k.candidates(v, k))(a)
  assert not bool(missed)
  np.testing.assert_array_equal(np.asarray(fast), np.asarray(jax.lax.top_k(a, k)[1]))


def test_top_k_fallback_stays_inside_its_loop():
  # XLA hoists loop-invariant work out of while loops. The fallback's top_k of all of `a`
  # must stay in the body of its loop, which runs zero times when the candidates hold the
  # answer; hoisted, it ran on every call (under vmap, where XLA CPU sorts every row in
  # full, it made a top_k training step 7x slower).
  from jrelu.compressors import _top_k
  program = jax.jit(jax.vmap(lambda v: _top_k.top_indices(v, 300)))
  text = program.lower(jnp.zeros((2, LARGE), jnp.float32)).compile().as_text()
  whole = [line for line in text.splitlines()  # XLA CPU: a sort, or a TopK custom call
           if "/while/body/top_k" in line and (" sort(" in line or '"TopK"' in line)]
  assert whole, "no fallback top_k in the program"
  entry = text[text.index("\nENTRY"):]
  entry = entry[:entry.index("\n}")]
  assert not [line for line in whole if line in entry], whole


def test_rand_k_large_draws_are_uniform_subsets():
  # Above MIN_SIZE the index set is drawn without a sort: k distinct indices in
  # increasing order. A uniform k-subset has P(i in S) = k / d and, for i != j,
  # P(i, j in S) = k (k - 1) / (d (d - 1)). Over 200 fixed keys each index's count is
  # Binomial(200, k / d) (chi-square over all d indices, mean 1, sd sqrt(2 / d)), and
  # the number of adjacent pairs (i, i + 1) both in S is within 6 sd of its mean (the
  # pair indicators are nearly independent; their variance is at most the sum of their
  # means plus the covariances of overlapping pairs, counted in `var` below).
  from jrelu.compressors import _rand_k
  d, k, draws = LARGE, 600, 200
  keys = jax.random.split(jax.random.key(21), draws)
  idx = np.asarray(jax.jit(jax.vmap(lambda key: _rand_k.sample_indices(key, d, k)))(keys))
  assert idx.shape == (draws, k) and np.all(np.diff(idx, axis=1) > 0)
  assert idx.min() >= 0 and idx.max() < d
  p = k / d
  counts = np.bincount(idx.ravel(), minlength=d)
  chi2 = np.mean((counts - draws * p) ** 2 / (draws * p * (1 - p)))
  assert abs(chi2 - 1) <= 6 * math.sqrt(2 / d), chi2
  member = np.zeros((draws, d), bool)
  np.put_along_axis(member, idx, True, axis=1)
  pairs = int(np.sum(member[:, 1:] & member[:, :-1]))
  q = k * (k - 1) / (d * (d - 1))
  mean = draws * (d - 1) * q
  var = mean + 2 * draws * (d - 2) * (k * (k - 1) * (k - 2) / (d * (d - 1) * (d - 2)))
  assert abs(pairs - mean) <= 6 * math.sqrt(var), (pairs, mean)


def test_rand_k_large_draw_repeats_until_its_candidates_fit(monkeypatch):
  # With room for only the expected number of candidates, about half of the draws
  # overflow and are drawn again with fresh bits: the result is still k distinct
  # indices, and the codec decodes to its values at them.
  from jrelu.compressors import _rand_k
  layout = _rand_k._candidate_layout

  def tight(size, k):
    threshold, _ = layout(size, k)
    return threshold, math.ceil(size * threshold / 256)

  monkeypatch.setattr(_rand_k, "_candidate_layout", tight)
  c = compressors.rand_k(500)
  x = jnp.asarray(make_vector((LARGE,), seed=8))
  outs = np.asarray(jax.jit(jax.vmap(lambda key: c.decode(c.encode(key, x))))(
      jax.random.split(jax.random.key(0), 4)))
  for out in outs:
    chosen = np.flatnonzero(out)
    assert len(chosen) == 500
    np.testing.assert_allclose(out[chosen], np.asarray(x)[chosen] * (LARGE / 500),
                               rtol=1e-6)
