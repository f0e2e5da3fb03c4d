"""Exact and statistical tests of ATOMO (jrelu.compressors.atomo) and its water-filling.

Statistical tests draw K codes with FIXED keys (deterministic), and every tolerance is
derived from the estimator's variance (6 standard deviations of the tested statistic,
plus explicit float32 slack), as explained at each check: a correct implementation is
far from the edge, while a wrong probability rule (e.g. capped-proportional), a biased
re-sampling of empty draws or a wrong rescaling is many sigmas away.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrelu import compressors
from jrelu.compressors import _atomo

K = 20_000        # independent draws (keys) per statistical configuration
SEED = 1806_04090


# ----------------------------------------------------------------------------------------
# Reference quantities, computed independently in float64 numpy.


def reference_water_filling(lam, budget):
  """The paper's Algorithm 1, literally (a loop), in float64."""
  a = np.abs(np.asarray(lam, np.float64))
  order = np.argsort(-a, kind="stable")
  a_sorted = a[order]
  s = min(budget, int(np.count_nonzero(a)))
  p_sorted = np.zeros_like(a)
  for i in range(len(a)):
    if s == 0:
      break
    rest = a_sorted[i:].sum()
    if s * a_sorted[i] <= rest:
      p_sorted[i:] = s * a_sorted[i:] / rest
      break
    p_sorted[i] = 1.0
    s -= 1
  p = np.zeros_like(a)
  p[order] = p_sorted
  return p


def extra_variance(lam, p):
  """E||g_hat - g||^2 = sum lambda^2 / p - sum lambda^2 over the nonzero atoms."""
  lam = np.asarray(lam, np.float64)
  p = np.asarray(p, np.float64)
  nz = lam != 0
  return float(np.sum(lam[nz] ** 2 / p[nz]) - np.sum(lam[nz] ** 2))


def capped_proportional(lam, budget):
  """The one-pass rule of the authors' code, min(1, s |lambda| / sum |lambda|)."""
  a = np.abs(np.asarray(lam, np.float64))
  return np.minimum(1.0, budget * a / a.sum())


@functools.partial(jax.jit, static_argnums=1)
def water_filling(lam, budget):
  """_atomo.water_filling under jit (one compilation instead of one per eager op)."""
  return _atomo.water_filling(lam, budget)


def make_vector(d, seed):
  """float32 vector with mixed magnitudes, a few exact zeros and a few huge entries."""
  rng = np.random.default_rng(seed)
  v = rng.standard_normal(d) * rng.choice([0.01, 1.0, 10.0], size=d)
  v[rng.choice(d, size=d // 50, replace=False)] = 0.0
  v[rng.choice(d, size=4, replace=False)] = 1000.0 * rng.choice([-1.0, 1.0], size=4)
  return v.astype(np.float32)


def make_matrix(n, m, sigma, seed):
  """float32 n x m matrix with singular values sigma (random orthonormal U, V)."""
  rng = np.random.default_rng(seed)
  r = len(sigma)
  u, _ = np.linalg.qr(rng.standard_normal((n, r)))
  v, _ = np.linalg.qr(rng.standard_normal((m, r)))
  return ((u * np.asarray(sigma, np.float64)) @ v.T).astype(np.float32)


# ----------------------------------------------------------------------------------------
# Water-filling.


@pytest.mark.parametrize("lam, budget, expected_p, expected_extra", [
    ((4.0, 2.0, 1.0, 1.0), 2, (1.0, 0.5, 0.25, 0.25), 10.0),
    ((10.0, 1.0, 1.0), 2, (1.0, 0.5, 0.5), 2.0),
    ((3.0, 3.0, 3.0, 3.0), 1, (0.25, 0.25, 0.25, 0.25), 108.0),
])
def test_water_filling_worked_examples(lam, budget, expected_p, expected_extra):
  # Worked examples of ATOMO's water-filling (Wang et al., arXiv 1806.04090, Algorithm 1),
  # computed by hand. Every value is a dyadic rational, so float32 is exact.
  p = np.asarray(water_filling(jnp.asarray(lam, jnp.float32), budget))
  np.testing.assert_array_equal(p, np.asarray(expected_p, np.float32))
  assert p.sum() == budget
  assert extra_variance(lam, p) == expected_extra
  np.testing.assert_array_equal(reference_water_filling(lam, budget), expected_p)
  # Permuting the atoms permutes p (the scatter back to the input's order).
  perm = np.arange(len(lam))[::-1]
  p_perm = np.asarray(water_filling(jnp.asarray(lam, jnp.float32)[perm], budget))
  np.testing.assert_array_equal(p_perm, p[perm])


def _random_magnitudes(num, length, seed):
  """num x length magnitudes: gaussian, heavy-tailed, with zeros, with ties, all zero."""
  rng = np.random.default_rng(seed)
  lam = rng.standard_normal((num, length))
  lam[1::5] = rng.standard_cauchy((len(lam[1::5]), length))
  lam[2::5] *= rng.uniform(size=(len(lam[2::5]), length)) < 0.4        # many zeros
  lam[3::5] = rng.choice([1.0, 2.0, 5.0], size=(len(lam[3::5]), length))  # ties
  lam[4::5] = np.exp(3.0 * rng.standard_normal((len(lam[4::5]), length)))
  lam[0] = 0.0
  return lam.astype(np.float32)


@pytest.mark.parametrize("budget", [1, 2, 3, 5, 11, 12, 20])
def test_water_filling_is_the_kkt_optimum(budget):
  lam = _random_magnitudes(400, 12, seed=budget)
  p = np.asarray(jax.jit(jax.vmap(lambda v: _atomo.water_filling(v, budget)))(lam), np.float64)
  a = np.abs(lam.astype(np.float64))
  for row in range(len(lam)):
    ai, pi = a[row], p[row]
    nz = ai > 0
    target = min(budget, int(nz.sum()))
    # Feasibility: p = 0 exactly on zero atoms, 0 < p <= 1 elsewhere, sum p = target
    # (float32 rounding of sum p: 12 terms, relative 1e-6).
    assert np.all(pi[~nz] == 0) and np.all(pi[nz] > 0) and np.all(pi <= 1), (row, pi)
    assert abs(pi.sum() - target) <= 1e-5 * max(target, 1), (row, pi.sum(), target)
    # Same as the literal loop of Algorithm 1 (float64), up to float32 rounding.
    np.testing.assert_allclose(pi, reference_water_filling(ai, budget), rtol=1e-5, atol=1e-6)
    if target == 0:
      continue
    # KKT of the convex problem min sum a^2/p s.t. sum p = s, p <= 1: with multiplier mu,
    # a_i^2 / p_i^2 = mu on unsaturated atoms, i.e. p_i = a_i / tau (tau = sqrt(mu)), and
    # a_i >= tau on saturated ones (p = 1). Sufficient for optimality since the problem
    # is convex. Ties at p = 1 in float32 are treated as saturated.
    unsat = nz & (pi < 1 - 1e-6)
    if unsat.any():
      taus = ai[unsat] / pi[unsat]
      tau = taus.mean()
      np.testing.assert_allclose(taus, tau, rtol=1e-5)
      assert np.all(ai[nz & ~unsat] >= tau * (1 - 1e-5)), (row, ai, pi)
      if row >= 50:
        continue
      # Directly: moving probability eps between two atoms never lowers the objective.
      objective = lambda q: np.sum(ai[nz] ** 2 / q[nz])
      best = objective(pi)
      idx = np.flatnonzero(nz)
      for i in idx:
        for j in idx:
          if i != j and pi[j] < 1 - 1e-3 and pi[i] > 1e-3:
            q = pi.copy()
            eps = 1e-3 * pi[i]
            q[i] -= eps
            q[j] += eps
            assert objective(q) >= best * (1 - 1e-9), (row, i, j)


def test_water_filling_beats_capped_proportional():
  # (10, 1, 1), s = 2: capped-proportional gives (1, 1/6, 1/6), spending only 4/3 of the
  # budget of 2 atoms, with extra variance 100 + 6 + 6 - 102 = 10 against water-filling's
  # 2 (p = (1, 1/2, 1/2)).
  lam = np.array([10.0, 1.0, 1.0])
  capped = capped_proportional(lam, 2)
  np.testing.assert_allclose(capped, [1.0, 1 / 6, 1 / 6])
  assert capped.sum() < 2
  assert extra_variance(lam, capped) == pytest.approx(10.0, rel=1e-12)
  p = np.asarray(water_filling(jnp.asarray(lam, jnp.float32), 2))
  assert extra_variance(lam, p) == pytest.approx(2.0, rel=1e-6)
  # On a generic heavy-tailed vector too, with the same (or smaller) expected atom count.
  lam = np.abs(_random_magnitudes(5, 300, seed=7)[1]).astype(np.float64)
  for budget in (4, 16, 64):
    capped = capped_proportional(lam, budget)
    p = np.asarray(water_filling(jnp.asarray(lam, jnp.float32), budget), np.float64)
    assert capped.sum() <= p.sum() + 1e-3
    assert extra_variance(lam, p) < extra_variance(lam, capped)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_water_filling_rejects_bad_budget(bad):
  with pytest.raises(ValueError, match=_quoted(bad)):
    _atomo.water_filling(jnp.ones(3), bad)


def test_water_filling_rejects_non_vectors():
  with pytest.raises(ValueError, match=r"\(2, 2\)"):
    _atomo.water_filling(jnp.ones((2, 2)), 1)


# ----------------------------------------------------------------------------------------
# Entry-wise atoms.

ENTRY_D, ENTRY_BUDGET = 300, 16


@functools.lru_cache(maxsize=None)
def entry_draws(d, budget, seed):
  """K decoded draws of entry-wise ATOMO on make_vector(d, seed), plus p and tau."""
  x = make_vector(d, seed)
  c = compressors.atomo(budget, atoms="entry")
  fn = jax.jit(jax.vmap(lambda k: c(k, jnp.asarray(x))))
  draws = np.asarray(fn(jax.random.split(jax.random.key(SEED), K)), np.float64)
  p, tau, saturated = (np.asarray(t) for t in
                        jax.jit(_atomo._water_fill, static_argnums=1)(jnp.asarray(x), budget))
  return x, draws, p.astype(np.float64), float(tau), saturated


def test_entry_draws_take_only_the_atomo_values():
  x, draws, p, tau, saturated = entry_draws(ENTRY_D, ENTRY_BUDGET, 0)
  assert saturated.sum() == 4 and np.all(p[saturated] == 1)  # the four 1000s
  np.testing.assert_allclose(p, reference_water_filling(x, ENTRY_BUDGET), rtol=1e-5)
  # Saturated atoms: their exact value in every draw. Zero entries: always 0. Others:
  # 0 or sign(x_i) tau, and tau = |x_i| / p_i.
  np.testing.assert_array_equal(draws[:, saturated], np.broadcast_to(x[saturated], (K, 4)))
  assert np.all(draws[:, x == 0] == 0)
  other = ~saturated & (x != 0)
  sent = draws[:, other] != 0
  np.testing.assert_array_equal(draws[:, other][sent],
                                np.broadcast_to(np.sign(x[other]) * np.float32(tau),
                                                sent.shape)[sent])
  np.testing.assert_allclose(np.abs(x[other]) / p[other], tau, rtol=1e-5)


def test_entry_unbiased():
  x, draws, p, tau, _ = entry_draws(ENTRY_D, ENTRY_BUDGET, 0)
  x64 = x.astype(np.float64)
  # Coordinate i of one draw is x_i t_i / p_i, t_i ~ Bernoulli(p_i): variance
  # x_i^2 (1 - p_i) / p_i, so the mean of K independent draws has standard deviation
  # |x_i| sqrt((1 - p_i) / p_i) / sqrt(K); we allow 6 of those (two-sided Gaussian tail
  # 2e-9 per coordinate) plus two single events 2 tau / K (when K p_i is small the count
  # of hits is Poisson-like, and exceeding 6 sigma + 2 events needs >= 3 surplus events:
  # negligible). 1e-5 tau covers float32 rounding of tau and of p (relative ~1e-6), and
  # 2^-17 tau the derived bias of the 16-bit uniforms (an atom is sent with probability p
  # rounded to a multiple of 2^-16, and decodes to +-tau: threefry.bernoulli16).
  # A wrong rescaling (e.g. x_i / p_i with capped-proportional p) is ~100 sigma off.
  safe = np.where(p > 0, p, 1.0)
  sigma_of_mean = np.abs(x64) * np.sqrt((1 - p) / safe) / math.sqrt(K)
  tol = 6.0 * sigma_of_mean + 2.0 * tau / K + 1e-5 * tau + 2.0**-17 * tau
  err = np.abs(draws.mean(axis=0) - x64)
  worst = int(np.argmax(err / tol))
  assert np.all(err <= tol), (worst, err[worst], tol[worst], x[worst], p[worst])


def test_entry_variance_matches_formula():
  x, draws, p, _, _ = entry_draws(ENTRY_D, ENTRY_BUDGET, 0)
  exact = extra_variance(x, p)  # sum x_i^2 / p_i - ||x||^2 over nonzero x_i
  np.testing.assert_allclose(exact, extra_variance(x, reference_water_filling(x, 16)),
                             rtol=1e-5)
  e = np.sum((draws - x.astype(np.float64)) ** 2, axis=1)
  # The K squared errors are iid with mean exactly `exact`, so their average has standard
  # deviation std(e) / sqrt(K) (the sample std is accurate to a few % at K = 20000); we
  # allow 6 of those, plus 1e-4 * exact for float32 rounding of p and tau (~1e-6 each).
  # Observed: |mean - exact| / exact = 4e-4 against a tolerance of 1e-2.
  # The 16-bit uniforms move each atom's probability by at most 2^-17 (threefry), its
  # expected squared error by at most tau^2 2^-17 (1 + 2^-17).
  tau = float(np.max(np.abs(x) / np.where(p > 0, p, np.inf)))
  bias = x.size * tau**2 * 2.0**-17 * (1 + 2.0**-17)
  tol = 6.0 * float(np.std(e, ddof=1)) / math.sqrt(K) + 1e-4 * exact + bias
  assert abs(float(e.mean()) - exact) <= tol, (float(e.mean()), exact, tol)


def test_entry_expected_atoms_equal_budget():
  x, draws, p, _, _ = entry_draws(ENTRY_D, ENTRY_BUDGET, 0)
  counts = np.count_nonzero(draws, axis=1)
  # Atoms are sent independently with probabilities p (sum = budget, as nnz > budget), so
  # the count has mean sum p = 16 and variance sum p (1 - p); the mean of K counts has
  # standard deviation sqrt(sum p (1 - p) / K): 6 of those (~0.15 atoms here), plus 1e-4
  # for float32 rounding of sum p, plus d 2^-17 for the 16-bit uniforms (threefry).
  assert abs(p.sum() - ENTRY_BUDGET) < 1e-4
  tol = 6.0 * math.sqrt(np.sum(p * (1 - p)) / K) + 1e-4 + x.size * 2.0**-17
  assert abs(counts.mean() - ENTRY_BUDGET) <= tol, (counts.mean(), tol)
  assert counts.min() >= 4  # the saturated atoms are always there
  # And the count varies: independent draws, not a fixed-size sample.
  assert counts.max() > counts.min()


def test_entry_empty_draws_happen_and_decode_to_zeros():
  # 16 entries of equal magnitude with budget 1: p_i = 1/16, no saturated atom, and an
  # empty draw has probability (15/16)^16 = 0.3561. Its frequency over K' = 4000 draws
  # has standard deviation sqrt(P (1 - P) / K') = 0.0076: we allow 6 of those (0.045).
  # Re-drawing empty draws (the authors' code) would make this frequency 0.
  num_draws = 4000
  x = jnp.asarray(np.random.default_rng(3).choice([-2.0, 2.0], size=16), jnp.float32)
  c = compressors.atomo(1)
  encode = jax.jit(jax.vmap(c.encode, in_axes=(0, None)))
  codes = encode(jax.random.split(jax.random.key(SEED), num_draws), x)
  out = np.asarray(jax.jit(jax.vmap(c.decode))(codes))
  empty = np.all(np.asarray(codes.words) == 0, axis=1)
  prob_empty = (15 / 16) ** 16
  tol = 6.0 * math.sqrt(prob_empty * (1 - prob_empty) / num_draws)
  assert abs(empty.mean() - prob_empty) <= tol, (empty.mean(), prob_empty, tol)
  assert not np.any(np.isnan(out))
  assert np.all(out[empty] == 0)
  # Nonempty draws hold +-tau = +-32 (|x_i| / p_i) at the sent coordinates.
  assert np.all(np.isin(out[~empty], [-32.0, 0.0, 32.0]))
  assert np.all(np.asarray(codes.tau) == 32.0)


@pytest.mark.parametrize("budget", [5, 50])
def test_entry_budget_at_least_nonzeros_is_exact(budget):
  # 5 nonzero entries (one repeated, ties at p = 1) among 40: all of them saturate.
  x = np.zeros(40, np.float32)
  x[[1, 7, 8, 20, 39]] = [3.0, -1e-3, 3.0, 250.0, -7.5]
  c = compressors.atomo(budget)
  codes = jax.jit(jax.vmap(c.encode, in_axes=(0, None)))(
      jax.random.split(jax.random.key(0), 5), x)
  out = np.asarray(jax.jit(jax.vmap(c.decode))(codes))
  np.testing.assert_array_equal(out, np.broadcast_to(x, out.shape))
  table = np.asarray(codes.saturated)
  np.testing.assert_array_equal(table[:, :5], np.broadcast_to(x[[1, 7, 8, 20, 39]], (5, 5)))
  assert np.all(table[:, 5:] == 0)


def test_entry_zeros_give_an_all_zero_code():
  c = compressors.atomo(3, atoms="entry")
  code = jax.jit(c.encode)(jax.random.key(0), jnp.zeros((5, 4)))
  for leaf in (code.words, code.tau, code.saturated):
    assert np.all(np.asarray(leaf) == 0)
  assert np.all(np.asarray(jax.jit(c.decode)(code)) == 0)


# ----------------------------------------------------------------------------------------
# Spectral atoms.

SVD_N, SVD_M, SVD_BUDGET = 12, 20, 3
SVD_SIGMA = (10.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.5, 0.25, 0.1, 0.05, 0.0, 0.0)  # rank 10


@pytest.mark.parametrize("sigma, num_samples", [
    (SVD_SIGMA, SVD_BUDGET),
    ((5.0, 5.0, 1.0, 1.0, 1.0, 1.0, 0.0, 3.0), 4),
    ((1.0,) * 7, 2),
])
def test_systematic_sampling_inclusion_probabilities(sigma, num_samples):
  p = water_filling(jnp.asarray(sigma, jnp.float32), num_samples)
  fn = jax.jit(jax.vmap(lambda k: _atomo.systematic_sampling(k, p, num_samples)))
  idx, valid = (np.asarray(t) for t in fn(jax.random.split(jax.random.key(SEED), K)))
  p = np.asarray(p, np.float64)
  # Exactly sum p = num_samples distinct atoms, in increasing order, every draw.
  assert np.all(valid)
  assert np.all(np.diff(idx, axis=1) > 0)
  freq = np.bincount(idx.ravel(), minlength=len(p)) / K
  # Each atom's selection indicator is Bernoulli(p_i) in every draw (the exact inclusion
  # probability of systematic sampling), so its frequency over K independent keys has
  # standard deviation sqrt(p (1 - p) / K); we allow 6 of those plus 1/K (one event, for
  # the Poisson-like regime) plus 1e-6 for float32 rounding of the cumulative sums.
  tol = 6.0 * np.sqrt(p * (1 - p) / K) + 1.0 / K + 1e-6
  assert np.all(np.abs(freq - p) <= tol), (freq, p, tol)
  assert np.all(freq[p == 0] == 0) and np.all(freq[p == 1] == 1)


def test_systematic_sampling_non_integer_total():
  # Sum p = 1.5: slot 1 is valid exactly when U + 1 < 1.5 (probability 1/2); inclusion
  # probabilities are still exactly p (same 6-sigma rule as above).
  p = jnp.asarray([0.5, 0.25, 0.75], jnp.float32)
  fn = jax.jit(jax.vmap(lambda k: _atomo.systematic_sampling(k, p, 2)))
  idx, valid = (np.asarray(t) for t in fn(jax.random.split(jax.random.key(1), K)))
  assert np.all(valid[:, 0])
  counts = np.zeros(3)
  np.add.at(counts, idx[valid], 1)
  tol = 6.0 * np.sqrt(np.asarray(p) * (1 - np.asarray(p)) / K) + 1.0 / K
  assert np.all(np.abs(counts / K - np.asarray(p)) <= tol)
  assert abs(valid[:, 1].mean() - 0.5) <= 6.0 * math.sqrt(0.25 / K)


@functools.lru_cache(maxsize=None)
def svd_draws():
  """K draws of spectral ATOMO on a 12 x 20 matrix of rank 10, budget 3."""
  mat = make_matrix(SVD_N, SVD_M, SVD_SIGMA[:10], seed=5)
  c = compressors.atomo(SVD_BUDGET, atoms="svd")
  encode = jax.jit(jax.vmap(c.encode, in_axes=(0, None)))
  codes = encode(jax.random.split(jax.random.key(SEED), K), jnp.asarray(mat))
  draws = np.asarray(jax.jit(jax.vmap(c.decode))(codes), np.float64)
  u, sigma, _ = np.linalg.svd(mat.astype(np.float64))
  p = reference_water_filling(sigma[:10], SVD_BUDGET)  # sigma[10:] is float32 round-off
  return mat, codes, draws, u[:, :10], sigma[:10], p


def test_svd_selects_exactly_budget_atoms_with_probabilities_p():
  mat, codes, _, u_true, sigma, p = svd_draws()
  weights = np.asarray(codes.weights)
  assert weights.shape == (K, SVD_BUDGET)
  assert np.all(weights > 0)  # exactly s' = 3 atoms in every draw, never an empty one
  # Identify the sent atoms by their left singular vectors (|<u_i, u_sel>| = 1 vs 0).
  overlap = np.abs(np.einsum("na,knj->kaj", u_true, np.asarray(codes.u, np.float64)))
  idx = np.argmax(overlap, axis=1)
  assert np.all(np.max(overlap, axis=1) > 1 - 1e-4)
  assert np.all(np.diff(idx, axis=1) > 0)  # distinct, in index order
  # weight = sigma_i / p_i for the selected atom.
  np.testing.assert_allclose(weights, (sigma / p)[idx], rtol=1e-4)
  # Inclusion frequencies: same derivation as test_systematic_sampling_... (6 sigma of a
  # Bernoulli(p_i) frequency over K draws, plus one event).
  freq = np.bincount(idx.ravel(), minlength=10) / K
  tol = 6.0 * np.sqrt(p * (1 - p) / K) + 1.0 / K + 1e-5
  assert p[0] == 1 and 0 < p[-1] < 1
  assert np.all(np.abs(freq - p) <= tol), (freq, p, tol)


def test_svd_unbiased():
  mat, _, draws, _, sigma, p = svd_draws()
  x64 = mat.astype(np.float64).reshape(-1)
  draws = draws.reshape(K, -1)
  mse = float(np.mean(np.sum((draws - x64) ** 2, axis=1)))
  err = draws.mean(axis=0) - x64
  # Global: for an unbiased estimator, K ||mean - x||^2 / mse is (near-Gaussian, CLT) a
  # sum_i w_i Z_i^2 with weights summing to 1, whose tail above 36 is at most that of one
  # chi-square(1): P < 2e-9 (6 sigma). 1e-9 ||x||^2 absorbs the float32 SVD's bias
  # (relative ~1e-6 per entry, squared).
  assert float(np.sum(err ** 2)) <= 36.0 * mse / K + 1e-9 * float(np.sum(x64 ** 2))
  # Per entry: 6 standard deviations of the mean (sample std over K draws, accurate to a
  # few %), plus 1e-5 * max|x| for the float32 SVD and products.
  tol = 6.0 * draws.std(axis=0, ddof=1) / math.sqrt(K) + 1e-5 * np.max(np.abs(x64))
  assert np.all(np.abs(err) <= tol), np.max(np.abs(err) / tol)


def test_svd_variance_matches_formula():
  mat, _, draws, _, sigma, p = svd_draws()
  exact = extra_variance(sigma, p)  # sum sigma_i^2 / p_i - sum sigma_i^2
  e = np.sum((draws - mat.astype(np.float64)) ** 2, axis=(1, 2))
  # Same derivation as test_entry_variance_matches_formula: 6 standard errors of the mean
  # of K iid squared errors, plus 1e-4 * exact for float32 SVD rounding.
  tol = 6.0 * float(np.std(e, ddof=1)) / math.sqrt(K) + 1e-4 * exact
  assert abs(float(e.mean()) - exact) <= tol, (float(e.mean()), exact, tol)


@pytest.mark.parametrize("shape, rank, budget", [((15, 10), 2, 4), ((6, 2, 4), 3, 3),
                                                 ((9, 9), 1, 1)])
def test_svd_low_rank_inputs_are_reproduced_exactly(shape, rank, budget):
  n, m = shape[0], math.prod(shape[1:])
  mat = make_matrix(n, m, np.linspace(3.0, 1.0, rank), seed=rank).reshape(shape)
  c = compressors.atomo(budget, atoms="svd")
  num_keys = 4
  codes = jax.jit(jax.vmap(c.encode, in_axes=(0, None)))(
      jax.random.split(jax.random.key(0), num_keys), mat)
  out = np.asarray(jax.jit(jax.vmap(c.decode))(codes))
  assert codes.weights.shape == (num_keys, min(budget, n, m))
  # rank <= budget: every nonzero atom has p = 1, the others are left out, so the weights
  # are the singular values and unused slots are zero, whatever the key.
  np.testing.assert_allclose(np.asarray(codes.weights[:, :rank]),
                             np.broadcast_to(np.linspace(3.0, 1.0, rank), (num_keys, rank)),
                             rtol=1e-5)
  assert np.all(np.asarray(codes.weights[:, rank:]) == 0)
  assert np.all(np.asarray(codes.u[..., rank:]) == 0)
  assert np.all(np.asarray(codes.v[..., rank:]) == 0)
  # float32 SVD round trip: a few ulps of the largest singular value (3).
  np.testing.assert_allclose(out, np.broadcast_to(mat, out.shape), rtol=0, atol=3e-5)


def test_svd_zero_matrix():
  c = compressors.atomo(2, atoms="svd")
  code = jax.jit(c.encode)(jax.random.key(0), jnp.zeros((4, 6), jnp.bfloat16))
  for leaf in (code.u, code.v, code.weights):
    assert np.all(np.asarray(leaf) == 0)
  out = jax.jit(c.decode)(code)
  assert out.dtype == jnp.bfloat16 and np.all(np.asarray(out, np.float32) == 0)


# ----------------------------------------------------------------------------------------
# Atom choice and wire size.


@pytest.mark.parametrize("shape, auto_kind", [
    ((), "entry"), ((1,), "entry"), ((1000,), "entry"), ((1, 7), "entry"),
    ((7, 1), "entry"), ((7, 1, 1), "entry"), ((1, 3, 4), "entry"),
    ((7, 13), "svd"), ((2, 3, 5), "svd"), ((13, 7), "svd"), ((2, 2), "svd"),
])
def test_atom_kind_rule(shape, auto_kind):
  assert compressors.atomo(2).atom_kind(shape) == auto_kind
  assert compressors.atomo(2, atoms="svd").atom_kind(shape) == auto_kind
  assert compressors.atomo(2, atoms="entry").atom_kind(shape) == "entry"


def expected_wire_bits(shape, budget, kind):
  if kind == "svd":
    n, m = shape[0], math.prod(shape[1:])
    return 32 * min(budget, n, m) * (n + m + 1)
  d = math.prod(shape)
  return 32 * math.ceil(2 * d / 32) + 32 + 32 * min(budget, d)


@pytest.mark.parametrize("shape", [(), (1,), (16,), (17,), (300,), (1, 7), (7, 13),
                                   (2, 3, 5), (40, 3)])
@pytest.mark.parametrize("budget", [1, 2, 8, 64])
@pytest.mark.parametrize("atoms", ["auto", "entry"])
def test_wire_bits_formula_and_payload(shape, budget, atoms):
  c = compressors.atomo(budget, atoms=atoms)
  expected = expected_wire_bits(shape, budget, c.atom_kind(shape))
  assert c.wire_bits(shape) == expected
  # The payload's shapes and dtypes, traced without running (the contract suite runs
  # encode for real on its shapes).
  code = jax.eval_shape(c.encode, jax.random.key(1), jax.ShapeDtypeStruct(shape, jnp.float32))
  assert compressors.payload_bits(code) == expected
  for leaf in jax.tree_util.tree_leaves(code):
    assert leaf.dtype in (jnp.uint32, jnp.float32)


def test_wire_bits_docstring_examples():
  assert compressors.atomo(8).wire_bits((1000,)) == 63 * 32 + 32 + 8 * 32 == 2304
  assert compressors.atomo(2, atoms="svd").wire_bits((7, 13)) == 2 * 32 * 21 == 1344


# ----------------------------------------------------------------------------------------
# Factory validation.


def _quoted(value):
  """Regex matching repr(value) as a whole token."""
  return r"(?<![\w.\-])" + re.escape(repr(value)) + r"(?![\w.])"


@pytest.mark.parametrize("kwargs, bad", [
    (dict(budget=0), 0),
    (dict(budget=-3), -3),
    (dict(budget=2.0), 2.0),
    (dict(budget=True), True),
    (dict(budget=None), None),
    (dict(budget=2, atoms="fourier"), "fourier"),
    (dict(budget=2, atoms="SVD"), "SVD"),
])
def test_factory_rejects_bad_hyper_parameters(kwargs, bad):
  with pytest.raises(ValueError, match=_quoted(bad)):
    compressors.atomo(**kwargs)


def test_factory_accepts_numpy_integers():
  c = compressors.atomo(np.int64(4), atoms="svd")
  assert c.budget == 4 and type(c.budget) is int and c.atoms == "svd"
  assert isinstance(c, compressors.Atomo) and c.unbiased
  assert c.name == "atomo"


# The small network's leaves cost more than float32 under any strategy (the transform
# warns so); the test is about training, not bits.
@pytest.mark.filterwarnings("ignore::jrelu.transforms.WireCostWarning")
def test_atomo_trains_the_planted_network_inside_optax_chain():
  """ATOMO on a pytree of several parameters: spectral atoms for the [K, d] hidden matrix,
  entry-wise atoms for the bias and output vectors, codes all-gathered across 8 devices
  inside optax.chain(compress(atomo), sgd). Measured in exactly this setting (seed 40,
  budget 3, lr 0.4, 600 steps): the training loss falls to 8e-12 x its initial value and
  the held-out relative error is 3.5e-6 (budget 2 at lr 0.2 only gets to 8e-3 x); the
  asserted 1e-6 x and 1e-3 leave orders of magnitude of margin."""
  import optax
  import helpers
  from jrelu import network, parallel, transforms
  devices = jax.devices()[:8]
  teacher, data, params = helpers.network_problem(40)
  tx = optax.chain(
      transforms.compress(compressors.atomo(3), key=jax.random.key(7), axis_name="data",
                          aggregation="all_gather"),
      optax.sgd(0.4))
  state = helpers.train_network(tx, params, data, 600, devices)
  trained = parallel.unreplicate(state.params)
  loss = jax.jit(network.loss)
  assert float(loss(trained, data.x, data.y)) <= 1e-6 * float(loss(params, data.x, data.y))
  held_out = network.sample_dataset(jax.random.key(99), teacher, 2000)
  assert float(network.prediction_error(trained, held_out)) < 1e-3
  # The hidden matrix really went through spectral atoms (the "auto" rule for [4, 20]).
  assert compressors.atomo(3).atom_kind((4, 20)) == "svd"


# ----------------------------------------------------------------------------------------
# Large arrays: water-filling from the blocks that hold the largest atoms.


@pytest.mark.parametrize("budget", [8, 64])
def test_entry_water_filling_without_a_sort_matches_the_sort(budget):
  # Above TOP_MIN_SIZE entries the codec water-fills from the top `budget` magnitudes
  # (found in the blocks with the largest maxima) and their sum: the same tau (up to the
  # order of float32 sums), the same saturated atoms and the same probabilities.
  n = _atomo.TOP_MIN_SIZE + 77
  rng = np.random.default_rng(budget)
  rows = [rng.standard_normal(n), np.round(rng.standard_normal(n)), np.zeros(n),
          rng.standard_normal(n)]
  rows[2][[3, 77, 5000]] = [1.0, -2.0, 3.0]
  rows[3][rng.choice(n, 5, replace=False)] = 1e4  # saturated spikes
  # Saturated spikes in the partial last block (n is not a multiple of TOP_BLOCK).
  rows.append(rng.standard_normal(n))
  rows[4][-3:] = [3e4, -4e4, 5e4]
  index = jnp.arange(n)
  xs = jnp.asarray(np.stack(rows), jnp.float32)

  def top(x):
    tau, probability, saturated, table = _atomo._water_fill_top(x, budget)
    return tau, probability(x, index), saturated(x, index), table

  both = jax.jit(jax.vmap(lambda x: (_atomo._water_fill(x, budget), top(x))))(xs)
  (p, tau, sat), (tau2, p2, sat2, table) = jax.tree_util.tree_map(np.asarray, both)
  for i, x in enumerate(np.asarray(xs)):
    np.testing.assert_allclose(tau2[i], tau[i], rtol=1e-5)
    np.testing.assert_array_equal(sat2[i], sat[i])
    unsat = ~sat[i]
    np.testing.assert_allclose(p2[i][unsat], p[i][unsat], rtol=1e-5, atol=1e-7)
    saturated = x[sat[i]]  # in coordinate order
    np.testing.assert_array_equal(table[i][:len(saturated)], saturated)
    assert np.all(table[i][len(saturated):] == 0)
