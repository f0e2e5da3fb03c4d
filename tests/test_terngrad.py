"""Exact and statistical tests of TernGrad (jrelu.compressors.terngrad).

Wen et al., "TernGrad: Ternary Gradients to Reduce Communication in Distributed Deep
Learning" (arXiv 1705.07878), with the scaler and clipping of the authors' code
(github.com/wenwei202/terngrad), as specified in jrelu/compressors/_terngrad.py.

Each coordinate's output is ``s * sign(g_k) * b_k`` with ``b_k ~ Bernoulli(p_k)``,
``p_k = |g_k| / s``: a two-point distribution, so the mean, the variance and the squared
error of every coordinate have exact formulas and so do their sampling variances. Every
statistical check below uses fixed keys (deterministic) and a 6-sigma tolerance derived
from those exact formulas (two-sided Gaussian tail 2e-9 per check).
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

K = 8_000   # independent draws (keys) per configuration
D = 200


def make_vector(d=D, seed=0):
  """float32 test vector: mixed magnitudes, both signs, a few exact zeros."""
  rng = np.random.default_rng(seed)
  v = rng.standard_normal(d) * rng.choice([0.05, 1.0, 3.0], size=d)
  v[rng.choice(d, size=d // 20, replace=False)] = 0.0
  return v.astype(np.float32)


@functools.lru_cache(maxsize=None)
def _draw_fn(clip_factor):
  """jit(vmap) over keys of the codec's decode(encode(key, x))."""
  c = compressors.terngrad(clip_factor)
  return jax.jit(jax.vmap(lambda k, x: c(k, x), in_axes=(0, None)))


@functools.lru_cache(maxsize=None)
def _quantize_fn(clip_factor):
  """jit(vmap) over keys of dequantize(quantize(key, x, scales)) under given scales."""
  c = compressors.terngrad(clip_factor)

  def one(key, x, scales):
    return c.dequantize(c.quantize(key, x, scales), scales, x.shape, x.dtype)

  return jax.jit(jax.vmap(one, in_axes=(0, None, None)))


@functools.lru_cache(maxsize=None)
def jitted(clip_factor):
  """(encode, decode, scales, quantize) of terngrad(clip_factor), each jitted: one
  compilation per shape instead of one per primitive and shape."""
  c = compressors.terngrad(clip_factor)
  return tuple(jax.jit(f) for f in (c.encode, c.decode, c.scales, c.quantize))


def draws(v, clip_factor=None, shared_scale=None, seed=1):
  """K decoded draws, float64 [K, d]: the codec itself, or quantize under shared_scale."""
  keys = jax.random.split(jax.random.key(seed), K)
  x = jnp.asarray(v)
  if shared_scale is None:
    out = _draw_fn(clip_factor)(keys, x)
  else:
    out = _quantize_fn(clip_factor)(keys, x, jnp.array([shared_scale], jnp.float32))
  return np.asarray(out, np.float64)


def check_two_point_statistics(samples, target, s):
  """Checks K draws of s * sign(target) * Bernoulli(|target| / s), coordinate-wise.

  Args:
    samples: float64 [K, d] draws.
    target: float64 [d], the value each coordinate estimates (|target| <= s).
    s: the scaler.

  For one coordinate with a = |target|, p = a / s and X in {0, s sign(target)}:
    * nonzero indicator ~ Bernoulli(p): mean p, variance p (1 - p);
    * E X = target, Var X = a (s - a) (the ternarization is unbiased);
    * Y = (X - target)^2 is a^2 w.p. 1 - p and (s - a)^2 w.p. p: E Y = a (s - a) and
      Var Y = p (1 - p) ((s - a)^2 - a^2)^2.
  The average of K iid draws of each has standard deviation sqrt(Var / K); we allow 6 of
  those, plus two single events (2 / K times the largest jump: covers the lattice and the
  Poisson-like regime p K small, where sigma can even be 0), plus 1e-6 s of float32
  rounding (of p, of s itself), plus the derived bias of the 16-bit uniforms: P(t != 0)
  is p rounded to a multiple of 2^-16, within B = 2^-17 of it (_terngrad.py), which moves
  the firing rate by at most B, the mean by B s and E Y by B |(s - a)^2 - a^2| <= B s^2.
  """
  bias = 2.0**-17
  a = np.abs(target)
  p = a / s
  assert np.all(p <= 1.0 + 1e-6)
  # Every value is 0 or s * sign(target), exactly.
  assert np.all((samples == 0) | (np.abs(samples - s * np.sign(target)) <= 1e-6 * s))
  assert np.all(samples[:, target == 0] == 0)

  fired = np.mean(samples != 0, axis=0)
  tol = 6.0 * np.sqrt(p * (1 - p) / K) + 2.0 / K + 1e-6 + bias
  assert np.all(np.abs(fired - p) <= tol), np.max(np.abs(fired - p) / tol)

  mean = samples.mean(axis=0)
  var = a * (s - a)
  tol = 6.0 * np.sqrt(var / K) + 2.0 * s / K + 1e-6 * s + bias * s
  assert np.all(np.abs(mean - target) <= tol), np.max(np.abs(mean - target) / tol)

  sq = np.mean((samples - target) ** 2, axis=0)
  var_y = p * (1 - p) * ((s - a) ** 2 - a**2) ** 2
  tol = (6.0 * np.sqrt(var_y / K) + 2.0 * np.maximum(a, s - a) ** 2 / K + 1e-6 * s * s
         + bias * s * s)
  assert np.all(np.abs(sq - var) <= tol), np.max(np.abs(sq - var) / tol)

  # Total squared error, the sum of the per-coordinate variances (independent
  # coordinates): standard deviation sqrt(sum Var Y / K).
  total = float(np.mean(np.sum((samples - target) ** 2, axis=1)))
  exact = float(np.sum(var))
  tol = 6.0 * math.sqrt(float(np.sum(var_y)) / K) + 1e-5 * exact + bias * s * s * a.size
  assert abs(total - exact) <= tol, (total, exact, tol)
  return total, exact


# ----------------------------------------------------------------------------------------
# Stochastic ternarization: probabilities, mean and variance, own and shared scaler.


def test_ternarization_statistics_own_scaler():
  v = make_vector(seed=0)
  s = float(np.max(np.abs(v)))
  c = compressors.terngrad()
  assert float(c.scales(v)[0]) == s
  check_two_point_statistics(draws(v), v.astype(np.float64), s)


@pytest.mark.parametrize("factor", [1.0, 2.5])
def test_ternarization_shared_larger_scaler_stays_unbiased(factor):
  # A shared scaler (the pmax over devices) >= this device's max|g| keeps p = |g| / s <= 1:
  # still unbiased, with the larger variance |g| (s - |g|) of the larger s. factor = 1 is
  # the own scaler through quantize/dequantize (the integer_psum path).
  v = make_vector(seed=1)
  s = float(np.float32(factor * np.max(np.abs(v))))
  check_two_point_statistics(draws(v, shared_scale=s), v.astype(np.float64), s)


def test_shared_scaler_under_clipping_clips_to_the_given_scaler():
  # With clipping each device clips to the shared scaler: coordinates beyond it always
  # fire (p = 1) and estimate clip(g, -s, s).
  v = make_vector(seed=2)
  s = float(np.float32(0.5 * np.max(np.abs(v))))
  target = np.clip(v.astype(np.float64), -s, s)
  check_two_point_statistics(draws(v, clip_factor=2.5, shared_scale=s), target, s)


# ----------------------------------------------------------------------------------------
# Integer sums of levels under a shared scaler.


def test_summed_levels_dequantize_to_the_sum_of_estimates():
  c = compressors.terngrad()
  num_devices = 4
  rng = np.random.default_rng(3)
  vs = (rng.standard_normal((num_devices, D)) * [[0.1], [1.0], [0.5], [0.01]])
  vs = np.clip(vs, -1.9, 1.9).astype(np.float32)
  vs[1, 7] = -2.0  # the pmax of the scalers is 2: s * L is exact in float32 for |L| <= 4
  _, _, scales, quantize = jitted(None)  # one program each for the 4 same-shape calls
  shared = jnp.max(jnp.stack([scales(v) for v in vs]), axis=0)
  assert shared.shape == (1,) and float(shared[0]) == 2.0
  assert c.num_scales((D,)) == 1 and c.max_level == 1 and c.integer_sum

  keys = jax.random.split(jax.random.key(4), num_devices)
  levels = [quantize(k, v, shared) for k, v in zip(keys, vs)]
  for lv in levels:
    assert lv.dtype == jnp.int32 and lv.shape == (D,)
    assert np.all(np.abs(np.asarray(lv)) <= 1)
  total = sum(levels)
  assert np.all(np.abs(np.asarray(total)) <= num_devices)
  summed = np.asarray(c.dequantize(total, shared, (D,), jnp.float32), np.float64)
  separate = sum(np.asarray(c.dequantize(lv, shared, (D,), jnp.float32), np.float64)
                 for lv in levels)
  np.testing.assert_array_equal(summed, separate)
  np.testing.assert_array_equal(summed, 2.0 * np.asarray(total, np.float64))


def test_summed_levels_are_an_unbiased_estimate_of_the_sum():
  # E[s * sum_m t_m] = sum_m g_m and, devices being independent, Var = sum_m |g_m|(s - |g_m|)
  # per coordinate: the mean of K draws is within 6 sqrt(Var / K) (+ 2 s / K lattice slack,
  # + float32 rounding) of the sum.
  c = compressors.terngrad()
  rng = np.random.default_rng(5)
  vs = jnp.asarray((rng.standard_normal((3, D)) * [[0.2], [1.0], [3.0]]).astype(np.float32))
  shared = jnp.max(jax.vmap(c.scales)(vs), axis=0)

  @jax.jit
  def one(key):
    keys = jax.random.split(key, 3)
    total = jnp.sum(jax.vmap(c.quantize, in_axes=(0, 0, None))(keys, vs, shared), axis=0)
    return c.dequantize(total, shared, (D,), jnp.float32)

  samples = np.asarray(jax.vmap(one)(jax.random.split(jax.random.key(6), K)), np.float64)
  s = float(shared[0])
  v64 = np.asarray(vs, np.float64)
  var = np.sum(np.abs(v64) * (s - np.abs(v64)), axis=0)
  # Plus the 16-bit uniforms' bias, at most 2^-17 s per device (_terngrad.py).
  tol = 6.0 * np.sqrt(var / K) + 2.0 * s / K + 1e-6 * s + 3 * 2.0**-17 * s
  err = np.abs(samples.mean(axis=0) - v64.sum(axis=0))
  assert np.all(err <= tol), np.max(err / tol)


# ----------------------------------------------------------------------------------------
# Clipping.


def test_clipping_scale_and_bias():
  # An outlier coordinate beyond c sigma is clipped: it always decodes to +-s (p = 1), a
  # bias of (|g| - s) toward zero; every other coordinate stays unbiased.
  c = compressors.terngrad(clip_factor=2.5)
  assert not c.unbiased
  v = make_vector(seed=7)
  v[3], v[11] = 50.0, -40.0
  sigma = float(np.std(v.astype(np.float64)))  # population std (ddof = 0)
  encode, _, scales, _ = jitted(2.5)
  s = float(scales(v)[0])
  assert s == pytest.approx(2.5 * sigma, rel=1e-5)
  code = encode(jax.random.key(0), v)
  np.testing.assert_array_equal(np.asarray(code.scale), np.asarray(scales(v)))
  v64 = v.astype(np.float64)
  clipped = np.abs(v64) > s
  assert set(np.flatnonzero(clipped)) == {3, 11}

  samples = draws(v, clip_factor=2.5)
  target = np.clip(v64, -s, s)
  clipped_total, clipped_exact = check_two_point_statistics(samples, target, s)
  # The outliers come out as +-s in every draw: the bias is exactly clip(g) - g.
  assert np.all(samples[:, 3] == np.float32(s)) and np.all(samples[:, 11] == -np.float32(s))
  bias = samples.mean(axis=0) - v64
  np.testing.assert_allclose(bias[[3, 11]], [s - 50.0, 40.0 - s], rtol=1e-6)
  assert bias[3] < 0 < bias[11]  # toward zero

  # What clipping buys: a much smaller variance than the unbiased quantizer's,
  # sum |g| (max|g| - |g|), at the price of that bias.
  unclipped = float(np.sum(np.abs(v64) * (50.0 - np.abs(v64))))
  assert clipped_exact < 0.5 * unclipped
  assert clipped_total + float(np.sum(bias[[3, 11]] ** 2)) < unclipped


def test_clipping_scaler_is_c_sigma_even_without_outliers():
  # The reference reading: s = c sigma even when max|g| < c sigma (then nothing is clipped
  # and the quantizer is unbiased, with p = |g| / (c sigma)).
  v = np.linspace(-1.0, 1.0, D).astype(np.float32)
  sigma = float(np.std(v.astype(np.float64)))
  s = float(jitted(2.5)[2](v)[0])  # the scaler of terngrad(clip_factor=2.5)
  assert s == pytest.approx(2.5 * sigma, rel=1e-5) and s > 1.0
  check_two_point_statistics(draws(v, clip_factor=2.5), v.astype(np.float64), s)


def test_constant_array_under_clipping_decodes_to_zero():
  # Documented degenerate case: sigma = 0, so s = 0 and everything is clipped to 0.
  encode, decode, _, _ = jitted(2.5)
  for x in (jnp.full((10,), 3.0), jnp.array([-2.0]), jnp.float32(5.0)):
    code = encode(jax.random.key(0), x)
    assert float(code.scale[0]) == 0.0
    out = np.asarray(decode(code))
    assert out.shape == x.shape and np.all(out == 0)


# ----------------------------------------------------------------------------------------
# One implementation, packing, wire size, zeros.


@pytest.mark.parametrize("clip_factor", [None, 2.5])
@pytest.mark.parametrize("shape", [(), (17,), (7, 13)])
def test_encode_is_quantize_with_own_scale_then_pack(clip_factor, shape):
  c = compressors.terngrad(clip_factor)
  encode, decode, scales, quantize = jitted(clip_factor)
  d = math.prod(shape)
  x = jnp.asarray(make_vector(d, seed=d).reshape(shape))
  for seed in range(2):
    key = jax.random.key(seed)
    code = encode(key, x)
    levels = quantize(key, x, scales(x))
    np.testing.assert_array_equal(np.asarray(code.scale), np.asarray(scales(x)))
    symbols = np.asarray(helpers.unpack(code.words, 2, d))
    assert np.all(symbols <= 2)  # the symbol 3 never occurs
    np.testing.assert_array_equal(symbols.astype(np.int64) - 1, np.asarray(levels))
    np.testing.assert_array_equal(
        np.asarray(decode(code)),
        np.asarray(c.dequantize(levels, scales(x), shape, x.dtype)))


@pytest.mark.parametrize("shape", [(), (1,), (15,), (16,), (17,), (1000,), (7, 13)])
@pytest.mark.parametrize("clip_factor", [None, 2.5])
def test_two_bits_per_coordinate_plus_one_scaler(shape, clip_factor):
  c = compressors.terngrad(clip_factor)
  d = math.prod(shape)
  expected = 32 * math.ceil(2 * d / 32) + 32
  assert c.wire_bits(shape) == expected
  encode = jitted(clip_factor)[0]
  code = encode(jax.random.key(0), jnp.asarray(make_vector(d, seed=1).reshape(shape)))
  assert compressors.payload_bits(code) == expected
  assert code.words.dtype == jnp.uint32 and code.words.shape == (math.ceil(d / 16),)
  assert code.scale.dtype == jnp.float32 and code.scale.shape == (1,)


def test_wire_bits_docstring_example():
  assert compressors.terngrad(clip_factor=2.5).wire_bits((1000,)) == 2048


@pytest.mark.parametrize("clip_factor", [None, 2.5])
def test_zeros_give_zeros(clip_factor):
  encode, decode, _, _ = jitted(clip_factor)
  for shape in [(), (1,), (7, 13)]:
    code = encode(jax.random.key(0), jnp.zeros(shape, jnp.float32))
    assert float(code.scale[0]) == 0.0
    out = np.asarray(decode(code))
    assert out.shape == shape and np.all(out == 0)


def test_bfloat16_input():
  c = compressors.terngrad()
  x = jnp.asarray(make_vector(64, seed=8)).astype(jnp.bfloat16)
  out = jax.jit(c)(jax.random.key(1), x)
  assert out.dtype == jnp.bfloat16 and out.shape == (64,)
  s = float(np.max(np.abs(np.asarray(x, np.float32))))  # exact: max and abs do not round
  vals = np.unique(np.abs(np.asarray(out, np.float32)))
  # |out| in {0, s} with s = max|x| exactly representable (x itself is bfloat16).
  assert set(vals.tolist()) <= {0.0, s}


# ----------------------------------------------------------------------------------------
# Factory.


def _quoted(value):
  """Regex matching repr(value) as a whole token (not inside a longer number or word)."""
  return r"(?<![\w.\-])" + re.escape(repr(value)) + r"(?![\w.])"


@pytest.mark.parametrize("bad", [0, 0.0, -1, -2.5, float("nan"), float("inf"),
                                 float("-inf"), "2.5", True, [2.5]])
def test_factory_rejects_bad_clip_factor(bad):
  with pytest.raises(ValueError, match=_quoted(bad)):
    compressors.terngrad(clip_factor=bad)


def test_factory_and_flags():
  assert compressors.terngrad().unbiased
  assert compressors.terngrad().clip_factor is None
  for good in (3, 2.5, np.float32(2.5), np.int64(1)):
    c = compressors.terngrad(good)
    assert isinstance(c.clip_factor, float) and c.clip_factor == float(good)
    assert not c.unbiased
  c = compressors.terngrad()
  assert c.name == "terngrad" and compressors.REGISTRY["terngrad"] is compressors.terngrad
  assert not c.majority_vote
