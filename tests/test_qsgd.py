"""Statistical and exact tests of the QSGD compressor (jrelu.compressors.qsgd).

Every statistical test uses a FIXED key, so it is deterministic; its tolerance is derived
from the exact variance of the estimator (see the comments at each check) with a 6-sigma
margin, so a correct implementation is never close to the edge while a real bias or a
wrong variance (both of which are many sigmas large here) fails.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrelu import compressors

import helpers

K = 20_000        # number of independent draws (keys) per configuration
CHUNK = 5_000     # draws per jitted vmap call (bounds the memory of the bit expansion)
SEED = 20240611

# (num_levels s, bucket_size, norm, d). Every s in {1, 2, 4, 16} appears both with and
# without buckets and with both norms; d is never a multiple of the bucket size, so the
# last bucket is short (300 = 4 * 64 + 44, 1000 = 15 * 64 + 40).
CONFIGS = [
    (1, None, "l2", 300),
    (1, 64, "max", 300),
    (2, None, "max", 300),
    (2, 64, "l2", 1000),
    (4, None, "l2", 300),
    (4, 64, "max", 300),
    (16, None, "max", 300),
    (16, 64, "l2", 1000),
]
CONFIG_IDS = [f"s{s}-B{b}-{n}-d{d}" for s, b, n, d in CONFIGS]


# ----------------------------------------------------------------------------------------
# Reference quantities, computed independently in float64 numpy.


def bucket_view(v, bucket_size):
  """float64 [num_buckets, B] view of flat v (zero padded) and the true length d."""
  flat = np.asarray(v, np.float64).ravel()
  d = flat.shape[0]
  size = d if bucket_size is None else min(bucket_size, d)
  count = -(-d // size)
  return np.pad(flat, (0, size * count - d)).reshape(count, size), d


def bucket_scales(v, bucket_size, norm):
  b, _ = bucket_view(v, bucket_size)
  if norm == "l2":
    return np.sqrt(np.sum(b * b, axis=1))
  return np.max(np.abs(b), axis=1)


def per_coordinate(v, s, bucket_size, norm):
  """Per coordinate of flat v: its bucket's scale, r_i = s|v_i|/scale, p_i = r_i - floor(r_i)."""
  b, d = bucket_view(v, bucket_size)
  scales = bucket_scales(v, bucket_size, norm)
  safe = np.where(scales > 0, scales, 1.0)
  r = s * np.abs(b) / safe[:, None]
  p = r - np.floor(r)
  scale_per = np.broadcast_to(scales[:, None], b.shape)
  return (scale_per.reshape(-1)[:d], r.reshape(-1)[:d], p.reshape(-1)[:d])


def exact_variance(v, s, bucket_size, norm):
  """E||Q(v) - v||^2 = sum_b (scale_b^2 / s^2) sum_{i in b} p_i (1 - p_i)."""
  scale, _, p = per_coordinate(v, s, bucket_size, norm)
  return float(np.sum((scale / s) ** 2 * p * (1.0 - p)))


def variance_bound(v, s, bucket_size):
  """Lemma 3.1 of Alistarh et al.: min(B / s^2, sqrt(B) / s) * ||v||^2."""
  flat = np.asarray(v, np.float64).ravel()
  bsize = flat.shape[0] if bucket_size is None else min(bucket_size, flat.shape[0])
  return min(bsize / s**2, math.sqrt(bsize) / s) * float(np.sum(flat * flat))


def make_vector(d, seed):
  """A generic float32 test vector: mixed magnitudes, both signs, a few exact zeros."""
  rng = np.random.default_rng(seed)
  v = rng.standard_normal(d) * rng.choice([0.01, 1.0, 10.0], size=d)
  v[rng.choice(d, size=max(1, d // 50), replace=False)] = 0.0
  return v.astype(np.float32)


# ----------------------------------------------------------------------------------------
# Many draws, computed once per configuration and shared by the statistical tests.


@functools.lru_cache(maxsize=None)
def _jit_codec(s, bucket_size, norm):
  """(codec, jitted encode, jitted decode) of one QSGD configuration, shared by the tests.

  Eager calls would compile every primitive separately (dozens of XLA programs per call);
  one jit per function is one program per input shape, reused across tests. The eager
  path is checked for every codec by test_compressor_contract's jit-vs-eager test.
  """
  c = compressors.qsgd(s, bucket_size=bucket_size, norm=norm)
  return c, jax.jit(c.encode), jax.jit(c.decode)


@functools.lru_cache(maxsize=None)
def _jit_roundtrip(s, bucket_size, norm):
  """Jitted (key, x) -> (code, decode(code)): one program per shape instead of two."""
  c = compressors.qsgd(s, bucket_size=bucket_size, norm=norm)

  def roundtrip(key, x):
    code = c.encode(key, x)
    return code, c.decode(code)

  return jax.jit(roundtrip)


@functools.lru_cache(maxsize=None)
def _draw_fn(s, bucket_size, norm):
  c = compressors.qsgd(s, bucket_size=bucket_size, norm=norm)
  return jax.jit(jax.vmap(lambda k, x: c.decode(c.encode(k, x)), in_axes=(0, None)),
                 compiler_options=helpers.RUNTIME_HEAVY)


@functools.lru_cache(maxsize=None)
def draw_stats(s, bucket_size, norm, d):
  """Statistics of K decoded draws of QSGD on make_vector(d), all in float64.

  Returns a dict with v, the mean of the draws, the K per-draw squared errors and the
  first 64 draws (for exact per-draw checks).
  """
  v = make_vector(d, seed=d + 7 * s)
  fn = _draw_fn(s, bucket_size, norm)
  keys = jax.random.split(jax.random.key(SEED), K)
  total = np.zeros(d, np.float64)
  sq_err = []
  first = None
  for start in range(0, K, CHUNK):
    x_hat = np.asarray(fn(keys[start:start + CHUNK], jnp.asarray(v)), np.float64)
    if first is None:
      first = x_hat[:64].copy()
    total += x_hat.sum(axis=0)
    sq_err.append(np.sum((x_hat - v.astype(np.float64)) ** 2, axis=1))
  return {"v": v, "mean": total / K, "sq_err": np.concatenate(sq_err), "first": first}


# ----------------------------------------------------------------------------------------
# Statistical properties.


@pytest.mark.parametrize("s, bucket_size, norm, d", CONFIGS, ids=CONFIG_IDS)
def test_unbiased(s, bucket_size, norm, d):
  st = draw_stats(s, bucket_size, norm, d)
  v = st["v"].astype(np.float64)
  scale, _, p = per_coordinate(v, s, bucket_size, norm)
  # Coordinate i of one draw is (scale/s) * sign(v_i) * (floor(r_i) + Bernoulli(p_i)), so
  # its exact variance is sigma_i^2 = (scale/s)^2 p_i (1 - p_i) and the mean of K
  # independent draws has standard deviation sigma_i / sqrt(K). We allow 6 of those
  # (two-sided Gaussian tail 2e-9 per coordinate, ~2e-5 over all coordinates of all
  # configurations) PLUS two single rounding events, 2 * (scale/s) / K: when p_i K is
  # small the count of round-ups is Poisson-like rather than Gaussian (sigma_i can even be
  # 0, e.g. the max coordinate under norm="max"); then exceeding 6 sigma + 2 events needs
  # >= 3 surplus events, probability <= (p_i K)^3 / 6 + ..., again negligible. Finally
  # 2^-17 * (scale/s) is the derived bias of the 16-bit uniforms (P(round up) is p_i
  # rounded to a multiple of 2^-16, jrelu/compressors/_qsgd.py), and 1e-6 * scale absorbs
  # float32 rounding of r_i and of the decoded values (< 1e-6 relative to scale).
  # A bias of a whole level step times p_i (e.g. always rounding down) is ~1e2 sigma.
  sigma_of_mean = (scale / s) * np.sqrt(p * (1.0 - p)) / math.sqrt(K)
  tol = 6.0 * sigma_of_mean + 2.0 * (scale / s) / K + 2.0**-17 * (scale / s) + 1e-6 * scale
  err = np.abs(st["mean"] - v)
  worst = int(np.argmax(err / tol))
  assert np.all(err <= tol), (
      f"coordinate {worst}: |mean - v| = {err[worst]:.3e} > tol {tol[worst]:.3e} "
      f"(v={v[worst]}, p={p[worst]:.4f}, {np.sum(err > tol)} coordinates out)")


@pytest.mark.parametrize("s, bucket_size, norm, d", CONFIGS, ids=CONFIG_IDS)
def test_variance_matches_exact_formula(s, bucket_size, norm, d):
  st = draw_stats(s, bucket_size, norm, d)
  v = st["v"]
  exact = exact_variance(v, s, bucket_size, norm)
  e = st["sq_err"]
  # The K per-draw squared errors e_k = ||Q_k(v) - v||^2 are iid with mean exactly the
  # formula value, so their average has standard deviation std(e) / sqrt(K); we estimate
  # std(e) by the sample std (K = 20000 makes that estimate accurate to ~1%) and allow 6 of
  # those. 1e-4 * exact absorbs the float32 computation of p_i and of the decoded values
  # (relative errors ~1e-7 per coordinate); the statistical margin is ~1e-2 * exact, so a
  # variance off by a few percent still fails.
  # The 16-bit uniforms move each coordinate's rounding probability by at most 2^-17,
  # hence its squared error by at most (scale/s)^2 2^-17 (1 + 2^-17) (_qsgd.py).
  mse = float(np.mean(e))
  scale, _, _ = per_coordinate(v, s, bucket_size, norm)
  bias = float(np.sum((scale / s) ** 2)) * 2.0**-17 * (1 + 2.0**-17)
  tol = 6.0 * float(np.std(e, ddof=1)) / math.sqrt(K) + 1e-4 * exact + bias
  assert exact > 0
  assert abs(mse - exact) <= tol, (mse, exact, tol)
  # The same empirical MSE also respects Lemma 3.1's bound (one-sided, same margin).
  assert mse <= variance_bound(v, s, bucket_size) + tol


def test_exact_variance_formula_on_a_hand_example():
  # Checks the oracle that test_variance_matches_exact_formula compares jrelu's codec with
  # (that test also checks jrelu's empirical variance against Lemma 3.1's bound).
  # v = (3, 4), l2 norm 5, s = 2: r = (6/5, 8/5), p = (0.2, 0.6),
  # variance = (25 / 4) * (0.2 * 0.8 + 0.6 * 0.4) = 6.25 * 0.4 = 2.5.
  assert exact_variance(np.array([3.0, 4.0]), 2, None, "l2") == pytest.approx(2.5, rel=1e-12)
  # max norm 4, s = 2: r = (1.5, 2), p = (0.5, 0): variance = (16 / 4) * 0.25 = 1.
  assert exact_variance(np.array([3.0, 4.0]), 2, None, "max") == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("s, bucket_size, norm, d", CONFIGS, ids=CONFIG_IDS)
def test_decoded_values_lie_on_the_grid(s, bucket_size, norm, d):
  st = draw_stats(s, bucket_size, norm, d)
  v = st["v"].astype(np.float64)
  scale, r, _ = per_coordinate(v, s, bucket_size, norm)
  safe = np.where(scale > 0, scale, 1.0)
  for x_hat in st["first"]:
    level = x_hat * s / safe  # should be an integer k with |k| <= s
    k = np.round(level)
    np.testing.assert_allclose(level, k, rtol=0, atol=1e-4)
    assert np.all(np.abs(k) <= s)
    # Sign of v_i, or 0 (exact zeros of v must decode to 0).
    assert np.all(k * np.sign(v) >= 0)
    assert np.all(k[v == 0] == 0)
    # Stochastic rounding: |k| is floor(r_i) or floor(r_i) + 1 (float slack on r_i).
    assert np.all(np.abs(k) >= np.floor(r + 1e-5) - (np.abs(r - np.round(r)) < 1e-5))
    assert np.all(np.abs(k) <= np.floor(r) + 1)


@pytest.mark.parametrize("s, bucket_size, norm, d", CONFIGS[:4], ids=CONFIG_IDS[:4])
def test_code_scales_are_bucket_norms(s, bucket_size, norm, d):
  v = make_vector(d, seed=3)
  _, encode, _ = _jit_codec(s, bucket_size, norm)
  code = encode(jax.random.key(1), v)
  assert code.scales.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(code.scales), bucket_scales(v, bucket_size, norm),
                             rtol=1e-5)


# ----------------------------------------------------------------------------------------
# Zeros, keys and wire size.


@pytest.mark.parametrize("norm", ["l2", "max"])
@pytest.mark.parametrize("bucket_size", [None, 64])
@pytest.mark.parametrize("s", [1, 4])
@pytest.mark.parametrize("shape", [(300,), (7, 13), (1,)])
def test_all_zero_input_decodes_to_zeros(shape, s, bucket_size, norm):
  code, out = _jit_roundtrip(s, bucket_size, norm)(jax.random.key(0),
                                                    jnp.zeros(shape, jnp.float32))
  assert np.all(np.asarray(code.scales) == 0)
  out = np.asarray(out)
  assert out.shape == shape
  assert not np.any(np.isnan(out))
  assert np.all(out == 0)


@pytest.mark.parametrize("norm", ["l2", "max"])
def test_one_zero_bucket_among_nonzero_buckets(norm):
  c, encode, _ = _jit_codec(4, 64, norm)
  v = make_vector(300, seed=11)
  v[64:128] = 0.0  # bucket 1 is all zero; bucket 4 (44 entries) is short
  v = v.astype(np.float32)
  keys = jax.random.split(jax.random.key(5), 50)
  outs = np.asarray(jax.jit(jax.vmap(lambda k: c(k, jnp.asarray(v))))(keys))
  assert np.all(np.isfinite(outs))
  assert np.all(outs[:, 64:128] == 0)
  scales = np.asarray(encode(keys[0], v).scales)
  assert scales[1] == 0 and np.all(scales[[0, 2, 3, 4]] > 0)
  # The other buckets are still quantized: across 50 draws their coordinates are not all 0.
  assert np.any(outs[:, :64] != 0) and np.any(outs[:, 256:] != 0)


def test_same_key_same_code_different_keys_different_codes():
  _, encode, _ = _jit_codec(4, 64, "l2")
  v = jnp.asarray(make_vector(300, seed=2))
  a = encode(jax.random.key(42), v)
  b = encode(jax.random.key(42), v)
  np.testing.assert_array_equal(np.asarray(a.words), np.asarray(b.words))
  np.testing.assert_array_equal(np.asarray(a.scales), np.asarray(b.scales))
  # For a generic vector (many p_i strictly between 0 and 1) two keys agree on all 300
  # roundings with negligible probability.
  others = [encode(jax.random.key(k), v) for k in (43, 44, 45)]
  for o in others:
    assert not np.array_equal(np.asarray(o.words), np.asarray(a.words))
  # The scales do not depend on the key.
  for o in others:
    np.testing.assert_array_equal(np.asarray(o.scales), np.asarray(a.scales))


def expected_wire_bits(shape, s, bucket_size):
  d = math.prod(shape)
  symbol_bits = math.ceil(math.log2(2 * s + 1))
  num_buckets = 1 if bucket_size is None else -(-d // bucket_size)
  return 32 * math.ceil(d * symbol_bits / 32) + 32 * num_buckets


@pytest.mark.parametrize("s, symbol_bits", [(1, 2), (2, 3), (4, 4), (7, 4), (8, 5), (16, 6),
                                            (127, 8)])
def test_symbol_width(s, symbol_bits):
  assert compressors.qsgd(s).symbol_bits == symbol_bits


@pytest.mark.parametrize("shape", [(), (1,), (7, 13), (64,), (65,), (300,), (1000,),
                                   (2, 3, 5), (128, 3)])
@pytest.mark.parametrize("s, bucket_size", [(1, None), (2, 64), (4, None), (4, 64),
                                            (16, 7), (16, None)])
def test_wire_bits_formula_and_payload(shape, s, bucket_size):
  c = compressors.qsgd(s, bucket_size=bucket_size)
  expected = expected_wire_bits(shape, s, bucket_size)
  assert c.wire_bits(shape) == expected
  # The payload's shapes are static: tracing encode (no compilation) gives them exactly.
  code = jax.eval_shape(c.encode, jax.random.key(4), jax.ShapeDtypeStruct(shape, jnp.float32))
  assert compressors.payload_bits(code) == expected
  assert code.words.dtype == jnp.uint32 and code.scales.dtype == jnp.float32


def test_wire_bits_docstring_example():
  # 1000 coordinates of 4 bits = 125 words, plus two bucket scales.
  assert compressors.qsgd(4, bucket_size=512).wire_bits((1000,)) == 4064


# ----------------------------------------------------------------------------------------
# Factory validation and dtypes.


def _quoted(value):
  """Regex matching repr(value) as a whole token (not inside a longer number or word)."""
  return r"(?<![\w.\-])" + re.escape(repr(value)) + r"(?![\w.])"


@pytest.mark.parametrize("kwargs, bad", [
    (dict(num_levels=0), 0),
    (dict(num_levels=-1), -1),
    (dict(num_levels=1.5), 1.5),
    (dict(num_levels=True), True),
    (dict(num_levels=4, bucket_size=0), 0),
    (dict(num_levels=4, bucket_size=-5), -5),
    (dict(num_levels=4, bucket_size=2.0), 2.0),
    (dict(num_levels=4, norm="l1"), "l1"),
])
def test_factory_rejects_bad_hyper_parameters(kwargs, bad):
  with pytest.raises(ValueError, match=_quoted(bad)):
    compressors.qsgd(**kwargs)


def test_factory_accepts_numpy_integers():
  c = compressors.qsgd(np.int64(4), bucket_size=np.int32(64))
  assert c.num_levels == 4 and c.bucket_size == 64
  assert isinstance(c, compressors.QSGD) and c.unbiased


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(300,), (7, 13)])
def test_dtype_and_shape_preserved(dtype, shape):
  x = jax.random.normal(jax.random.key(0), shape).astype(dtype)
  code, out = _jit_roundtrip(4, 64, "l2")(jax.random.key(1), x)
  assert out.dtype == dtype
  assert out.shape == shape
  # The decoded values are a coarse but sane estimate: within one level step (largest
  # scale / s) of x, plus rounding of the output to dtype (bfloat16: 2^-8 relative).
  step = float(np.max(np.asarray(code.scales))) / 4
  err = np.abs(np.asarray(out, np.float32) - np.asarray(x, np.float32))
  assert np.max(err) <= step * (1.05 if dtype == jnp.bfloat16 else 1.001)
