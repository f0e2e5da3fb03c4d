"""Tests of the fast Walsh-Hadamard transform and of FO-SGD (jrelu.compressors.fo_sgd).

Statistical tests use FIXED keys (deterministic) and tolerances derived from the exact
variance of the estimator (6 sigma, comment at each check), so a correct codec is never
near the edge while a wrong sign pattern, dither law or range rule fails by many sigmas.
Reference quantities are computed independently in float64 numpy with the dense Sylvester
Hadamard matrix.
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
from jrelu.compressors import _fo_sgd
from jrelu.compressors import hadamard

K = 20_000                      # draws per statistical configuration
COMMON_KEY = jax.random.key(11)
# Exact properties: derandomized (same examples every run), few examples because every
# new shape compiles.
PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def sylvester(size):
  """Dense Sylvester Hadamard matrix H_size (entries +-1), built by Kronecker products."""
  h = np.ones((1, 1))
  while h.shape[0] < size:
    h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)
  return h


def gaussian(d, seed):
  return np.random.default_rng(seed).standard_normal(d).astype(np.float32)


def one_sparse(d, seed):
  g = np.zeros(d, np.float32)
  g[seed % d] = -3.0 + seed
  return g


def _quoted(value):
  """Regex matching repr(value) as a whole token."""
  return r"(?<![\w.\-])" + re.escape(repr(value)) + r"(?![\w.])"


# ----------------------------------------------------------------------------------------
# hadamard.next_power_of_two and hadamard.fwht.


def test_next_power_of_two():
  cases = {0: 1, 1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 125: 128, 128: 128, 129: 256,
           1000: 1024, 2**20: 2**20, 2**20 + 1: 2**21, np.int64(100): 128}
  for n, expected in cases.items():
    assert hadamard.next_power_of_two(n) == expected, n
  for bad in (-1, 2.0, True, "8"):
    with pytest.raises(ValueError, match=_quoted(bad)):
      hadamard.next_power_of_two(bad)


@pytest.mark.parametrize("size", [2**m for m in range(9)])
def test_fwht_equals_dense_normalized_sylvester(size):
  h = sylvester(size) / math.sqrt(size)
  # A batch with two leading axes, against x @ H^T in float64: the first block holds the
  # rows of the identity (fwht(e_i) is row i of H), the second random rows. float32
  # rounding of log2(size) stages of additions is < 1e-5 relative to the entries.
  x = np.stack([np.eye(size), np.random.default_rng(size).standard_normal((size, size))])
  y = np.asarray(hadamard.fwht(jnp.asarray(x, jnp.float32)), np.float64)
  np.testing.assert_allclose(y[0], h, atol=1e-6)
  np.testing.assert_allclose(y, x @ h.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_size", [1, 2, 8, 64])
def test_fwht_by_blocks_is_the_same_transform(block_size):
  # Transforms longer than hadamard.BLOCK_SIZE (2^19) run their low stages block by
  # block; the stages are the same additions in the same order, so the result is the
  # same bit for bit, and it is still x @ H^T (float64 reference, as above).
  size = 256
  x = np.random.default_rng(block_size).standard_normal((2, 3, size))
  whole = hadamard._butterflies(jnp.asarray(x, jnp.float32), block_size=size)
  blocked = hadamard._butterflies(jnp.asarray(x, jnp.float32), block_size=block_size)
  np.testing.assert_array_equal(np.asarray(blocked), np.asarray(whole))
  h = sylvester(size) / math.sqrt(size)
  np.testing.assert_allclose(np.asarray(blocked, np.float64), x @ h.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [1, 2, 8, 128, 1024])
def test_fwht_is_orthonormal_and_involutive(size):
  x = jnp.asarray(np.random.default_rng(size + 1).standard_normal((5, size)), jnp.float32)
  y = hadamard.fwht(x)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(y), axis=-1),
                             np.linalg.norm(np.asarray(x), axis=-1), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(hadamard.fwht(y)), np.asarray(x), atol=1e-5)
  # vmap over the batch axis and jit give the same numbers as the batched call.
  np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(hadamard.fwht))(x)),
                             np.asarray(y), rtol=1e-6, atol=1e-6)


def test_fwht_keeps_dtype():
  x = jnp.arange(8, dtype=jnp.bfloat16)
  assert hadamard.fwht(x).dtype == jnp.bfloat16
  assert hadamard.fwht(jnp.arange(8)).dtype == jnp.float32


@pytest.mark.parametrize("size", [0, 3, 6, 100, 1000])
def test_fwht_rejects_lengths_that_are_not_powers_of_two(size):
  with pytest.raises(ValueError, match=_quoted(size)):
    hadamard.fwht(jnp.zeros((2, size)))


def test_fwht_rejects_scalars():
  with pytest.raises(ValueError, match="at least one axis"):
    hadamard.fwht(jnp.float32(1.0))


def all_equations(jaxpr):
  """Equations of a jaxpr and, recursively, of the jaxprs in their params (jit calls)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      inner = getattr(value, "jaxpr", value)
      if hasattr(inner, "eqns"):
        yield from all_equations(inner)


def test_fwht_is_butterflies_not_a_matrix_product():
  size = 1024
  jaxpr = jax.make_jaxpr(hadamard.fwht)(jnp.zeros((3, size))).jaxpr
  eqns = list(all_equations(jaxpr))
  prims = [eqn.primitive.name for eqn in eqns]
  assert "dot_general" not in prims
  # Each of the log2(D) stages adds and subtracts D / 2 pairs (of each of the 3 rows):
  # D log2(D) arithmetic, not D^2, however the stages are grouped into passes.
  def volume(name):
    return sum(math.prod(eqn.outvars[0].aval.shape) for eqn in eqns
               if eqn.primitive.name == name)
  assert volume("add") == volume("sub") == 3 * size // 2 * int(math.log2(size))
  # No operand of any equation has D^2 elements (no dense H is ever built).
  for eqn in eqns:
    for var in eqn.invars + eqn.outvars:
      shape = getattr(var.aval, "shape", ())
      assert math.prod(shape) <= 3 * size, (eqn.primitive.name, shape)


@PROPERTY_SETTINGS
@given(st.integers(0, 7), st.integers(0, 2**31 - 1), st.floats(-4.0, 4.0, width=32))
def test_fwht_linear_and_involutive_property(log_size, seed, scale):
  size = 2**log_size
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, size)).astype(np.float32)
  y = rng.standard_normal((2, size)).astype(np.float32)
  fx, fy = np.asarray(hadamard.fwht(x)), np.asarray(hadamard.fwht(y))
  # Linearity and H H = I; float32 errors are ~1e-6 of the norms involved.
  np.testing.assert_allclose(np.asarray(hadamard.fwht(jnp.asarray(x + scale * y))),
                             fx + scale * fy, atol=1e-4 * (1 + abs(scale)))
  np.testing.assert_allclose(np.asarray(hadamard.fwht(jnp.asarray(fx))), x, atol=1e-5)
  np.testing.assert_allclose(np.sum(fx * fx), np.sum(x * x), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------
# The dithered one-bit quantizer: E[lam q] = u, Var[lam q] = lam^2 - u^2 for |u| <= lam.


def test_dithered_sign_mean_and_variance():
  lam = 1.5
  inside = np.linspace(-lam, lam, 31)           # includes -lam, 0 and +lam
  outside = np.array([-10.0, -1.6, 1.6, 10.0])  # saturated
  u = np.concatenate([inside, outside]).astype(np.float32)
  keys = jax.random.split(jax.random.key(1), K)
  draws = np.asarray(jax.jit(jax.vmap(lambda k: _fo_sgd.dithered_sign(k, u, lam)))(keys),
                     np.float64)
  assert set(np.unique(draws)) <= {-1.0, 1.0}
  q = lam * draws
  u64 = u.astype(np.float64)
  target = np.clip(u64, -lam, lam)
  # q takes the two values +-lam with P(+) = p = (1 + clip(u)/lam) / 2, so
  # E q = clip(u) and Var q = lam^2 - clip(u)^2 = 4 lam^2 p (1 - p).
  var = lam**2 - target**2
  # Mean of K draws: sd sqrt(var / K); 6 sd (Gaussian tail 2e-9 per value). 2^-16 lam is
  # the bias of the 16-bit dithers (P(+) within 2^-17 of p, module docstring), 1e-6 lam
  # float32 rounding. At |u| >= lam, var = 0: the draws must all equal clip(u) exactly,
  # which the tolerance (below 2 lam / K, one differing draw) enforces.
  tol_mean = 6.0 * np.sqrt(var / K) + 2.0**-16 * lam + 1e-6 * lam
  err = np.abs(q.mean(axis=0) - target)
  assert np.all(err <= tol_mean), (u[err > tol_mean], err[err > tol_mean])
  assert np.all(q[:, np.abs(u64) >= lam] == (lam * np.sign(u64))[np.abs(u64) >= lam])
  # Variance lam^2 - clip(u)^2. Every draw has q^2 = lam^2 exactly, so the sample variance
  # is s^2 = K/(K-1) (lam^2 - m^2) with m the sample mean, and
  # |s^2 - var| <= K/(K-1) |m^2 - mu^2| + lam^2/(K-1) <= K/(K-1) delta (2|mu| + delta)
  # + lam^2/(K-1), where delta = |m - mu| <= tol_mean on the event checked just above.
  tol_var = K / (K - 1) * tol_mean * (2 * np.abs(target) + tol_mean) + lam**2 / (K - 1)
  err_var = np.abs(q.var(axis=0, ddof=1) - var)
  assert np.all(err_var <= tol_var), (u[err_var > tol_var], err_var[err_var > tol_var])


def test_dithered_sign_with_zero_range_is_sign():
  u = jnp.array([-2.0, -0.0, 0.0, 3.0])
  np.testing.assert_array_equal(
      np.asarray(_fo_sgd.dithered_sign(jax.random.key(0), u, 0.0)), [-1.0, 1.0, 1.0, 1.0])


# ----------------------------------------------------------------------------------------
# Flattening and the dither range rule.


@pytest.mark.parametrize("d, size", [(1, 1), (5, 8), (100, 128), (128, 128), (129, 256)])
def test_flattening_of_a_one_sparse_vector_is_exact(d, size):
  assert hadamard.next_power_of_two(d) == size
  for position in (0, d // 2, d - 1):
    g = np.zeros(d, np.float32)
    g[position] = -2.5
    for seed in range(3):
      eps = jax.random.rademacher(jax.random.key(seed), (size,), jnp.float32)
      u = np.abs(np.asarray(_fo_sgd.flatten(g, eps), np.float64))
      # u_i = H[i, position] eps[position] g[position] / sqrt(D): every |u_i| equals
      # ||g|| / sqrt(D), the smallest possible max for a given norm (fully flat).
      np.testing.assert_allclose(u, 2.5 / math.sqrt(size), rtol=1e-6)


def test_flatten_matches_dense_and_unflatten_inverts():
  d, size = 100, 128
  g = gaussian(d, 3)
  eps = np.asarray(jax.random.rademacher(jax.random.key(2), (size,), jnp.float32))
  u = np.asarray(_fo_sgd.flatten(g.reshape(4, 25), eps), np.float64)
  expected = sylvester(size) @ (eps * np.pad(g, (0, size - d))) / math.sqrt(size)
  np.testing.assert_allclose(u, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(_fo_sgd.unflatten(u, eps, d)), g, atol=1e-5)


def hoeffding_saturation_bound(size, c):
  """Union-Hoeffding bound on P(max_i |u_i| > lam) for lam = c ||g|| sqrt(2 ln(2D)/D)."""
  return min(1.0, (2.0 * size) ** (1.0 - c * c))


def binomial_quantile(n, p, alpha):
  """Smallest m with P(Binomial(n, p) >= m) <= alpha (exact, float64 sums)."""
  tail, pmf = 1.0, (1.0 - p) ** n      # tail = P(X >= m), pmf = P(X = m)
  for m in range(n + 1):
    if tail <= alpha:
      return m
    tail -= pmf
    pmf *= (n - m) / (m + 1) * p / (1.0 - p)
  return n + 1


@pytest.mark.parametrize("kind", ["gaussian", "two_sparse", "constant", "sixteen_sparse"])
def test_saturation_probability_obeys_the_hoeffding_bound(kind):
  d, size, c, n = 100, 128, 1.5, 4000
  rng = np.random.default_rng(5)
  g = {"gaussian": rng.standard_normal(d),
       "two_sparse": np.pad([1.0, -1.0], (0, d - 2)),
       "constant": np.ones(d),
       "sixteen_sparse": np.pad(np.ones(16), (0, d - 16))}[kind].astype(np.float32)
  codec = compressors.fo_sgd(c)
  lam = codec.range_factor(size) * float(np.linalg.norm(g.astype(np.float64)))
  keys = jax.random.split(jax.random.key(6), n)
  u = jax.vmap(lambda k: _fo_sgd.flatten(g, codec.bind(k).signs(size)))(keys)
  saturated = int(np.sum(np.max(np.abs(np.asarray(u, np.float64)), axis=1) > lam))
  # Each of the n independent sign draws saturates with probability at most
  # p = (2 D)^(1 - c^2) = 256^-1.25 ~ 1e-3 for ANY g, so the count is stochastically below
  # Binomial(n, p); we allow its 1 - 1e-9 quantile (about 18 for a mean of 3.9). A range
  # smaller by sqrt(2) would saturate ~5 % of the draws (~200) for the gaussian g.
  p = hoeffding_saturation_bound(size, c)
  assert saturated < binomial_quantile(n, p, 1e-9), (saturated, p)


@pytest.mark.parametrize("shape", [(3,), (4, 25), (1000,)])
@pytest.mark.parametrize("c", [0.5, 1.0, 40.0])
def test_dither_range_rule(shape, c):
  x = jax.random.normal(jax.random.key(1), shape)
  size = hadamard.next_power_of_two(math.prod(shape))
  codec = compressors.fo_sgd(c)
  factor = min(1.0, c * math.sqrt(2.0 * math.log(2.0 * size) / size))
  assert codec.range_factor(size) == pytest.approx(factor, rel=1e-12)
  lam = float(codec.encode(jax.random.key(2), x).dither_range[0])
  norm = float(np.linalg.norm(np.asarray(x, np.float64)))
  assert lam == pytest.approx(norm * factor, rel=1e-6)
  assert lam <= norm * (1 + 1e-6)


# ----------------------------------------------------------------------------------------
# End-to-end statistics of the codec.


@functools.lru_cache(maxsize=None)
def _draws_fn(codec):
  return jax.jit(jax.vmap(lambda k, x: codec.decode(codec.encode(k, x)), in_axes=(0, None)))


def codec_draws(codec, g):
  """K decoded draws of codec on g (float64 [K, d]); the codec's keys are fixed."""
  keys = jax.random.split(jax.random.key(20240517), K)
  out = np.asarray(_draws_fn(codec)(keys, jnp.asarray(g)), np.float64)
  return out.reshape(K, -1)


def conditional_moments(g, eps, lam, d):
  """Exact E[g_hat | eps], per-coordinate Var[g_hat_j | eps] and E||g_hat - mean||^2.

  q_i = lam sign(u_i + tau_i) has mean clip(u_i) and variance lam^2 - clip(u_i)^2,
  independently over i; g_hat = (eps * H q / sqrt(D))[:d] and every entry of H^2 is 1, so
  each decoded coordinate has variance sum_i (lam^2 - clip_i^2) / D.
  """
  size = eps.shape[0]
  h = sylvester(size) / math.sqrt(size)
  u = h @ (eps * np.pad(g.astype(np.float64).ravel(), (0, size - d)))
  clipped = np.clip(u, -lam, lam)
  mean = (eps * (h @ clipped))[:d]
  coord_var = np.sum(lam**2 - clipped**2) / size
  return u, mean, coord_var, d * coord_var


@pytest.mark.parametrize("kind, shape, c", [
    ("gaussian", (100,), 2.0),      # lam = 0.59 ||g|| >= max |u_i| (checked below)
    ("gaussian", (128,), 2.0),      # d = D: no padding
    ("one_sparse", (4, 25), 1.0),   # default range: |u_i| = ||g|| / sqrt(D) < lam always
])
def test_conditionally_unbiased_with_exact_mse_when_nothing_saturates(kind, shape, c):
  d = math.prod(shape)
  g = (gaussian if kind == "gaussian" else one_sparse)(d, 7).reshape(shape)
  codec = compressors.fo_sgd(c).bind(COMMON_KEY)   # fixed eps: conditional on eps
  size = hadamard.next_power_of_two(d)
  eps = np.asarray(codec.signs(size), np.float64)
  lam = float(codec.encode(jax.random.key(0), g).dither_range[0])
  u, mean, coord_var, mse_exact = conditional_moments(g, eps, lam, d)
  assert np.max(np.abs(u)) < lam, "precondition: no coordinate can saturate"
  np.testing.assert_allclose(mean, g.ravel(), atol=1e-9 * lam)
  draws = codec_draws(codec, g)
  # Unbiasedness: each coordinate's mean over K draws has sd sqrt(coord_var / K) (a sum
  # of D independent bounded terms per draw, then K draws: Gaussian to high accuracy);
  # 6 sd, two-sided tail 2e-9 per coordinate. 1e-5 lam absorbs float32 rounding in the
  # transforms (log2 D stages, values ~ lam), far below the ~4e-2 lam statistical margin.
  tol = 6.0 * math.sqrt(coord_var / K) + 1e-5 * lam
  err = np.abs(draws.mean(axis=0) - g.ravel())
  assert np.all(err <= tol), (np.max(err), tol)
  # Exact MSE: E||g_hat - g||^2 = (d / D) (D lam^2 - ||g||^2). The K per-draw squared
  # errors are iid with that mean; their average has sd std(e) / sqrt(K) (sample std, ~1 %
  # accurate at K = 20000); 6 of those plus 1e-4 relative for float32 rounding.
  g_norm2 = float(np.sum(g.astype(np.float64) ** 2))
  formula = (d / size) * (size * lam**2 - g_norm2)
  assert formula == pytest.approx(mse_exact, rel=1e-6)
  e = np.sum((draws - g.ravel()) ** 2, axis=1)
  assert abs(e.mean() - formula) <= 6.0 * e.std(ddof=1) / math.sqrt(K) + 1e-4 * formula, (
      e.mean(), formula)
  # Decoded values are the +-lam signs mapped back: ||g_hat|| <= sqrt(D) lam, with
  # equality when d = D (H is orthonormal).
  norms = np.linalg.norm(draws, axis=1)
  assert np.all(norms <= math.sqrt(size) * lam * (1 + 1e-5))
  if d == size:
    np.testing.assert_allclose(norms, math.sqrt(size) * lam, rtol=1e-5)


def test_conditional_mean_and_variance_with_saturation():
  # A small range saturates many coordinates: E[g_hat | eps] is the decoded clipped u,
  # which differs from g (the codec is biased, hence unbiased = False).
  d, c = 100, 0.3
  g = gaussian(d, 8)
  codec = compressors.fo_sgd(c).bind(COMMON_KEY)
  assert not codec.unbiased
  size = hadamard.next_power_of_two(d)
  eps = np.asarray(codec.signs(size), np.float64)
  lam = float(codec.encode(jax.random.key(0), g).dither_range[0])
  u, mean, coord_var, mse_exact = conditional_moments(g, eps, lam, d)
  assert np.sum(np.abs(u) > lam) >= 10, "precondition: several coordinates saturate"
  draws = codec_draws(codec, g)
  # Same derivations as in the unsaturated test, around the clipped conditional mean.
  tol = 6.0 * math.sqrt(coord_var / K) + 1e-5 * lam
  err = np.abs(draws.mean(axis=0) - mean)
  assert np.all(err <= tol), (np.max(err), tol)
  e = np.sum((draws - mean) ** 2, axis=1)
  assert abs(e.mean() - mse_exact) <= 6.0 * e.std(ddof=1) / math.sqrt(K) + 1e-4 * mse_exact
  # The bias is real and visible. Around its own mean, K ||mean_K - m||^2 / mse_exact is a
  # weighted chi-square with weights summing to 1 (tail above 36 < 2e-9), so
  # ||mean_K - m||^2 <= r^2 = 36 mse_exact / K. If ||m - g|| > 2 r, the triangle inequality
  # puts ||mean_K - g|| > r: the draws reject "unbiased" at 6 sigma. Here ||m - g||^2 is
  # ~190 r^2 (41 of the 128 coordinates saturate).
  r2 = 36 * mse_exact / K
  assert float(np.sum((mean - g) ** 2)) > 4 * r2
  assert float(np.sum((draws.mean(axis=0) - g) ** 2)) > r2


def test_unbound_codec_is_unbiased_over_the_seed_with_exact_mse():
  # Unbound: the signs come from a seed in the code, drawn from the key, so averaging
  # over keys averages over eps too. With lam = ||g|| (the cap) nothing can saturate for
  # any eps, and Var[g_hat_j | eps] = (D lam^2 - ||g||^2) / D = (D - 1) ||g||^2 / D does not
  # depend on eps: the same 6-sd tolerances as above are exact.
  d = 100
  g = gaussian(d, 9)
  codec = compressors.fo_sgd(1e3)
  size = hadamard.next_power_of_two(d)
  g_norm2 = float(np.sum(g.astype(np.float64) ** 2))
  lam = float(codec.encode(jax.random.key(0), g).dither_range[0])
  assert lam == pytest.approx(math.sqrt(g_norm2), rel=1e-6)
  draws = codec_draws(codec, g)
  coord_var = (size - 1) * g_norm2 / size
  tol = 6.0 * math.sqrt(coord_var / K) + 1e-5 * lam
  assert np.all(np.abs(draws.mean(axis=0) - g) <= tol)
  formula = d * (size - 1) * g_norm2 / size
  e = np.sum((draws - g) ** 2, axis=1)
  assert abs(e.mean() - formula) <= 6.0 * e.std(ddof=1) / math.sqrt(K) + 1e-4 * formula


# ----------------------------------------------------------------------------------------
# Common randomness, wire format, zeros, validation.


def expected_wire_bits(shape, bound):
  size = hadamard.next_power_of_two(math.prod(shape))
  return 32 * math.ceil(size / 32) + 32 + (0 if bound else 32)


@pytest.mark.parametrize("shape", [(), (1,), (31,), (32,), (33,), (125,), (7, 13), (1000,),
                                   (1024,), (3, 5, 7)])
def test_wire_bits_formula(shape):
  unbound = compressors.fo_sgd()
  bound = unbound.bind(jax.random.key(1))
  assert unbound.wire_bits(shape) == expected_wire_bits(shape, bound=False)
  assert bound.wire_bits(shape) == expected_wire_bits(shape, bound=True)
  assert unbound.wire_bits(shape) - bound.wire_bits(shape) == 32


@pytest.mark.parametrize("shape", [(), (125,)])
def test_payload_layout(shape):
  x = jax.random.normal(jax.random.key(0), shape)
  unbound = compressors.fo_sgd()
  bound = unbound.bind(jax.random.key(1))
  size = hadamard.next_power_of_two(math.prod(shape))
  a, b = unbound.encode(jax.random.key(2), x), bound.encode(jax.random.key(2), x)
  assert a.words.dtype == b.words.dtype == jnp.uint32
  assert a.words.shape == b.words.shape == (math.ceil(size / 32),)
  assert a.dither_range.dtype == jnp.float32 and a.dither_range.shape == (1,)
  assert a.seed.dtype == jnp.uint32 and a.seed.shape == (1,)
  assert b.seed is None
  assert compressors.payload_bits(a) == unbound.wire_bits(shape)
  assert compressors.payload_bits(b) == bound.wire_bits(shape)


def test_two_phase_chunk_size_at_8_devices():
  # d = 1000 on 8 devices: chunks of 125 -> D = 128; the bound code is 128 + 32 bits, so a
  # device sends 2 * 7 * 160 = 2240 bits per step against 2 * 7/8 * 32 * 1000 = 56000.
  num_devices, d = 8, 1000
  chunk = -(-d // num_devices)
  codec = compressors.fo_sgd().bind(jax.random.key(3))
  chunks = jax.random.normal(jax.random.key(4), (num_devices, chunk))
  keys = jax.random.split(jax.random.key(5), num_devices)
  codes = jax.jit(jax.vmap(codec.encode))(keys, chunks)
  per_chunk = compressors.payload_bits(codes) // num_devices
  assert per_chunk == codec.wire_bits((chunk,)) == 160
  sent = 2 * (num_devices - 1) * per_chunk
  baseline = 2 * (num_devices - 1) / num_devices * 32 * d
  assert sent == 2240 and baseline / sent == 25.0
  # Every chunk is decoded with the same (common) signs: batched = one chunk at a time.
  decoded = jax.jit(jax.vmap(codec.decode))(codes)
  decode_one = jax.jit(codec.decode)
  for i in (0, num_devices - 1):
    single = decode_one(jax.tree_util.tree_map(lambda leaf: leaf[i], codes))
    np.testing.assert_allclose(np.asarray(decoded[i]), np.asarray(single), atol=1e-6)


def test_bound_instances_with_the_same_common_key_interoperate():
  g = gaussian(100, 10)
  sender = compressors.fo_sgd().bind(jax.random.key(42))
  receiver = compressors.fo_sgd().bind(jax.random.key(42))
  other = compressors.fo_sgd().bind(jax.random.key(43))
  code = sender.encode(jax.random.key(0), g)
  np.testing.assert_array_equal(np.asarray(receiver.decode(code)),
                                np.asarray(sender.decode(code)))
  # The signs matter: a different common key decodes the same bits to something else.
  assert not np.allclose(np.asarray(other.decode(code)), np.asarray(sender.decode(code)))
  # An unbound codec needs nothing but the code: a fresh instance decodes it identically.
  unbound_code = compressors.fo_sgd().encode(jax.random.key(0), g)
  np.testing.assert_array_equal(np.asarray(compressors.fo_sgd().decode(unbound_code)),
                                np.asarray(compressors.fo_sgd().decode(unbound_code)))


def test_bind_returns_a_bound_copy_and_mismatched_codes_are_rejected():
  unbound = compressors.fo_sgd(2.0)
  bound = unbound.bind(jax.random.key(1))
  assert bound is not unbound and bound.bound and not unbound.bound
  assert bound.dither_scale == unbound.dither_scale == 2.0
  assert unbound.common_key is None
  g = gaussian(100, 1)
  with pytest.raises(ValueError, match="seed"):
    unbound.decode(bound.encode(jax.random.key(0), g))
  with pytest.raises(ValueError, match="seed"):
    bound.decode(unbound.encode(jax.random.key(0), g))


def test_bind_inside_jit_with_a_traced_common_key():
  g = gaussian(100, 11)

  @jax.jit
  def roundtrip(common_key, key, x):
    codec = compressors.fo_sgd().bind(common_key)
    return codec.decode(codec.encode(key, x))

  eager = compressors.fo_sgd().bind(jax.random.key(9))(jax.random.key(1), g)
  np.testing.assert_allclose(np.asarray(roundtrip(jax.random.key(9), jax.random.key(1), g)),
                             np.asarray(eager), rtol=1e-6, atol=1e-6)


def test_signs_depend_on_the_key_only_through_the_seed():
  # Unbound codes from different keys use different signs (fresh per step); the code's
  # seed alone reproduces them.
  g = gaussian(100, 12)
  codec = compressors.fo_sgd()
  a = codec.encode(jax.random.key(0), g)
  b = codec.encode(jax.random.key(1), g)
  assert int(a.seed[0]) != int(b.seed[0])
  assert not np.array_equal(np.asarray(codec.signs(128, a.seed)),
                            np.asarray(codec.signs(128, b.seed)))


@pytest.mark.parametrize("bound", [False, True])
@pytest.mark.parametrize("shape", [(), (1,), (100,), (7, 13)])
def test_zero_input_has_zero_range_and_decodes_to_zeros(shape, bound):
  codec = compressors.fo_sgd()
  codec = codec.bind(jax.random.key(0)) if bound else codec
  code = codec.encode(jax.random.key(1), jnp.zeros(shape, jnp.bfloat16))
  assert float(code.dither_range[0]) == 0.0
  out = np.asarray(codec.decode(code), np.float32)
  assert out.shape == shape and codec.decode(code).dtype == jnp.bfloat16
  assert np.all(out == 0) and not np.any(np.isnan(out))


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf"), True, "1", None])
def test_factory_rejects_bad_dither_scale(bad):
  with pytest.raises(ValueError, match="dither_scale") as info:
    compressors.fo_sgd(bad)
  assert repr(bad) in str(info.value)


def test_registry_and_flags():
  c = compressors.REGISTRY["fo_sgd"]()
  assert isinstance(c, compressors.FOSGD) and c.name == "fo_sgd"
  assert not c.unbiased and not c.integer_sum
  assert compressors.fo_sgd(np.float32(1.5)).dither_scale == 1.5


# ----------------------------------------------------------------------------------------
# Exact properties over arbitrary inputs.


@st.composite
def gradients(draw):
  d = draw(st.sampled_from([1, 2, 5, 64, 100]))
  # Magnitudes in [2^-10, 2^10] or exact zeros: power-of-two scalings by up to 2^+-8 then
  # stay far from float32 under/overflow, so they are exact.
  mags = draw(hnp.arrays(np.float32, d, elements=st.one_of(
      st.just(0.0), st.floats(2.0**-10, 2.0**10, width=32))))
  signs = draw(hnp.arrays(np.float32, d, elements=st.sampled_from([-1.0, 1.0])))
  return mags * signs


@PROPERTY_SETTINGS
@given(gradients(), st.integers(-8, 8), st.integers(0, 2**31 - 1), st.booleans())
def test_codec_properties(g, exponent, seed, bound):
  codec = compressors.fo_sgd()
  codec = codec.bind(jax.random.key(seed + 1)) if bound else codec
  key = jax.random.key(seed)
  d = g.shape[0]
  size = hadamard.next_power_of_two(d)
  code = codec.encode(key, g)
  lam = float(code.dither_range[0])
  g_hat = np.asarray(codec.decode(code), np.float64)
  assert np.all(np.isfinite(g_hat))
  # Scale equivariance: x -> 2^e x scales u, the range and the dither by exactly 2^e, so the
  # bits are identical and the range is exactly 2^e times larger.
  scaled = codec.encode(key, g * np.float32(2.0**exponent))
  np.testing.assert_array_equal(np.asarray(scaled.words), np.asarray(code.words))
  assert float(scaled.dither_range[0]) == lam * 2.0**exponent
  # In the flattened basis the decoded vector is lam * (+-1) with the sent bits
  # (exactly recoverable when d = D; otherwise truncation only shrinks the norm).
  assert np.linalg.norm(g_hat) <= math.sqrt(size) * lam * (1 + 1e-5) + 1e-30
  if d == size and lam > 0:
    eps = codec.signs(size, code.seed)
    v = np.asarray(_fo_sgd.flatten(g_hat.astype(np.float32), eps), np.float64)
    bits = np.unpackbits(np.asarray(code.words).view(np.uint8), bitorder="little")[:size]
    np.testing.assert_allclose(v, np.where(bits == 1, lam, -lam), rtol=1e-5, atol=1e-5 * lam)
