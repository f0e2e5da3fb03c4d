"""PowerSGD (jrelu.powersgd): one power-iteration step on a matrix, and the optax
transform with warm start and error feedback.

Exact identities are checked exactly (bit for bit where the float32 operations are the
same on both sides, otherwise with a tolerance derived from float32 rounding); the one
statistical test has a closed-form expectation and variance and a 6-sigma tolerance.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jrelu import network
from jrelu import parallel
from jrelu import powersgd as powersgd_lib
from jrelu import sampling
from jrelu import wire

EPS32 = float(np.finfo(np.float32).eps)
DEVICES = 8


def low_rank(rng, n, m, rank):
  """A float32 [n, m] matrix of exactly the given rank (generic factors)."""
  return jnp.asarray(rng.standard_normal((n, rank)) @ rng.standard_normal((rank, m)),
                     jnp.float32)


def with_singular_values(rng, n, m, sigmas):
  """float64 [n, m] = U diag(sigmas) V^T with random orthonormal U, V."""
  k = len(sigmas)
  u, _ = np.linalg.qr(rng.standard_normal((n, k)))
  v, _ = np.linalg.qr(rng.standard_normal((m, k)))
  return (u * np.asarray(sigmas, np.float64)) @ v.T


# ----------------------------------------------------------------------------------------
# One step from a fresh q ~ N(0, 1): the randomized range finder.


def one_step(rank):
  """x -> M_hat of one PowerSGD step from q0 ~ N(0, 1) drawn from the key (one device)."""
  def approx(key, x):
    dims = powersgd_lib.matrix_shape(x.shape, rank)
    if dims is None:
      return x
    q0 = jax.random.normal(key, (dims[1], rank), jnp.float32)
    return powersgd_lib.low_rank_step(x.reshape(dims), q0).m_hat.reshape(x.shape)
  return approx


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", None])
def test_rejects_bad_rank(bad):
  with pytest.raises(ValueError, match="rank must be an integer >= 1, got " + re.escape(repr(bad))):
    powersgd_lib.powersgd(bad, key=jax.random.key(0))
  with pytest.raises(ValueError, match="rank must be an integer >= 1, got " + re.escape(repr(bad))):
    powersgd_lib.wire_bits({"w": jnp.zeros((4, 20))}, bad, 2)


def test_matrix_view_and_pass_through_rule():
  assert powersgd_lib.matrix_shape((64, 3, 3), 2) == (64, 9)   # conv kernel: [out, in*kh*kw]
  assert powersgd_lib.matrix_shape((3, 2), 1) == (3, 2)        # 1 * 5 < 6: compressed
  assert powersgd_lib.matrix_shape((2, 2), 1) is None          # 1 * 4 >= 4: would not shrink
  assert powersgd_lib.matrix_shape((4, 4), 2) is None          # 2 * 8 >= 16
  assert powersgd_lib.matrix_shape((4, 20), 2) == (4, 20)      # 2 * 24 < 80
  assert powersgd_lib.matrix_shape((1, 1000), 2) is None       # rank would exceed min(n, m)
  for shape in [(), (1,), (1000,)]:
    assert powersgd_lib.matrix_shape(shape, 1) is None


def test_wire_bits_formula():
  # A compressed n x m leaf all-reduces P [n, r] and Q [m, r], 32 r (n + m) bits of
  # operand; anything else all-reduces its float32 values. At N = 2 an all-reduce of S
  # bits is charged 2 (N-1)/N S = S, so wire_bits equals the operand bits.
  for rank in (1, 2, 3):
    for shape in [(30, 40), (50, 4, 5), (3, 2), (2, 2), (7, 13), (1000,), (1,), ()]:
      size = math.prod(shape)
      if len(shape) >= 2 and rank * (shape[0] + size // shape[0]) < size:
        expected = 32 * rank * (shape[0] + size // shape[0])
      else:
        expected = 32 * size
      params = {"w": jnp.zeros(shape)}
      assert powersgd_lib.wire_bits(params, rank, 2) == expected, (rank, shape)
      assert powersgd_lib.wire_bits(params, rank, 8) == 2 * 7 / 8 * expected, (rank, shape)
  # Literal values: 32 r (n + m) for matrices, 32 d otherwise.
  assert powersgd_lib.wire_bits({"w": jnp.zeros((30, 40))}, 1, 2) == 2240       # vs 38400
  assert powersgd_lib.wire_bits({"w": jnp.zeros((50, 4, 5))}, 2, 2) == 4480     # [50, 20]
  assert powersgd_lib.wire_bits({"w": jnp.zeros((2, 2))}, 1, 2) == 128          # passed


@pytest.mark.parametrize("n,m,rank,true_rank", [
    (30, 40, 1, 1), (30, 40, 3, 1), (50, 20, 3, 3), (8, 5, 2, 2)])
def test_codec_reproduces_low_rank_matrices(n, m, rank, true_rank):
  # If rank(M) <= r, range(M Q0) = range(M) for generic Q0, so P_hat P_hat^T M = M.
  # Float32 tolerance, per draw: P = M Q0 is computed with a relative error of about
  # eps ||M|| ||Q0||, and range(P) moves by that over sigma_min(P) >= sigma_k(M)
  # s_min(V^T Q0) (V: the k right singular vectors of M). So the relative error is
  # at most c * eps * cond(M) * ||Q0|| / s_min(V^T Q0); measured c <= 1.7 over the 500
  # keys of each case below (worst relative error 8e-4, median ~2e-7), asserted with
  # c = 20. A draw with an unlucky Q0 (small s_min) is allowed a proportionally larger
  # error, so the test is exact in spirit and never flaky.
  rng = np.random.default_rng(n + m + rank)
  matrix = low_rank(rng, n, m, true_rank)
  c = one_step(rank)
  keys = jax.random.split(jax.random.key(1), 500)
  # The step's output and its Q0 (the same normal draw one_step makes from the key).
  out, q0 = jax.jit(jax.vmap(lambda k: (c(k, matrix), jax.random.normal(k, (m, rank)))))(keys)
  out, q0 = np.asarray(out, np.float64), np.asarray(q0, np.float64)
  m64 = np.asarray(matrix, np.float64)
  _, s, vt = np.linalg.svd(m64)
  s_min = np.linalg.svd(np.einsum("mk,bmr->bkr", vt[:true_rank].T, q0),
                        compute_uv=False).min(-1)
  bound = EPS32 * (s[0] / s[true_rank - 1]) * np.linalg.norm(q0, ord=2, axis=(1, 2)) / s_min
  rel = np.linalg.norm(out - m64, axis=(1, 2)) / np.linalg.norm(m64)
  assert np.all(rel <= 20 * bound), (rel.max(), (rel / bound).max())
  assert np.median(rel) < 1e-5


def test_zero_and_rank_deficient_inputs_give_no_nan():
  step = jax.jit(powersgd_lib.low_rank_step)
  q0 = jax.random.normal(jax.random.key(0), (20, 2), jnp.float32)
  out = step(jnp.zeros((30, 20), jnp.float32), q0)
  # QR of P = 0 returns orthonormal unit vectors, not NaN; then Q = M^T P_hat = 0.
  # (P_hat^T P_hat = I to float32 rounding of a 30-term dot product: 1e-6 ~ 8 eps.)
  np.testing.assert_allclose(np.asarray(out.p_hat).T @ np.asarray(out.p_hat), np.eye(2),
                             atol=1e-6)
  assert np.all(np.asarray(out.q) == 0)
  assert np.all(np.asarray(out.m_hat) == 0)
  # A single nonzero entry: rank 1 < r = 2, so P has rank 1; the output is still exact.
  shape = (30, 4, 5)
  spike = jnp.zeros((30, 20), jnp.float32).at[2, 3].set(5.0).reshape(shape)
  out = np.asarray(jax.jit(one_step(2))(jax.random.key(1), spike))
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out, np.asarray(spike), atol=1e-6)


def test_codec_is_an_orthogonal_projection():
  # M_hat = P_hat P_hat^T M exactly, so ||M_hat||^2 + ||M - M_hat||^2 = ||M||^2
  # (Pythagoras) and, by Eckart-Young, ||M - M_hat||^2 >= sum_{j > r} sigma_j^2.
  # Float32 rounding of sums of squares of 1200 terms: relative 1e-5 is ~100x eps.
  rng = np.random.default_rng(3)
  m64 = rng.standard_normal((30, 40))
  matrix = jnp.asarray(m64, jnp.float32)
  m64 = np.asarray(matrix, np.float64)
  sigma = np.linalg.svd(m64, compute_uv=False)
  total = float(np.sum(m64**2))
  for rank in (1, 5):
    c = one_step(rank)
    outs = np.asarray(jax.jit(jax.vmap(lambda k: c(k, matrix)))(
        jax.random.split(jax.random.key(rank), 50)), np.float64)
    kept = np.sum(outs**2, axis=(1, 2))
    lost = np.sum((m64 - outs) ** 2, axis=(1, 2))
    np.testing.assert_allclose(kept + lost, total, rtol=1e-5)
    assert np.all(lost >= np.sum(sigma[rank:] ** 2) * (1 - 1e-5))


def test_rank1_expected_error_is_product_of_singular_values():
  # Exact expectation. For M with singular values s1, s2 (all others 0) and r = 1,
  # P = M g and M_hat = P P^T M / ||P||^2, so with (g1, g2) = V^T g ~ N(0, I_2),
  #   X = ||M - M_hat||^2 = a b (g1^2 + g2^2) / (a g1^2 + b g2^2),  a = s1^2, b = s2^2,
  # which depends only on the angle phi of (g1, g2), uniform on [0, 2 pi):
  #   E[X]   = a b (1/2pi) int dphi / (a cos^2 + b sin^2)   = sqrt(a b) = s1 s2,
  #   E[X^2] = a^2 b^2 (a + b) / (2 (a b)^{3/2})             = (a + b) sqrt(a b) / 2.
  # s1 = 2, s2 = 1: E[X] = 2, Var[X] = 5 - 4 = 1. With K = 20000 draws the mean has
  # sd 1 / sqrt(K) = 0.0071; the 6-sigma tolerance is 0.042 (2 % of E[X]). Measured:
  # mean 1.9991 (-0.13 sigma), sample variance 1.007.
  rng = np.random.default_rng(4)
  m64 = with_singular_values(rng, 30, 20, [2.0, 1.0])
  matrix = jnp.asarray(m64, jnp.float32)
  m64 = np.asarray(matrix, np.float64)
  c = one_step(1)
  num_draws = 20_000
  keys = jax.random.split(jax.random.key(5), num_draws)
  errors = jax.jit(jax.vmap(lambda k: jnp.sum((c(k, matrix) - matrix) ** 2)))(keys)
  errors = np.asarray(errors, np.float64)
  s = np.linalg.svd(m64, compute_uv=False)
  a, b = s[0] ** 2, s[1] ** 2
  expected = math.sqrt(a * b)
  variance = (a + b) * math.sqrt(a * b) / 2 - a * b
  assert abs(errors.mean() - expected) <= 6 * math.sqrt(variance / num_draws), errors.mean()
  # Every draw: 1/X = w1 / b + w2 / a with weights w = (g1^2, g2^2) / (g1^2 + g2^2), a
  # weighted harmonic mean, so b <= X <= a.
  assert errors.min() >= b * (1 - 1e-4) and errors.max() <= a * (1 + 1e-4)


# ----------------------------------------------------------------------------------------
# The transform: helpers.


def scan_updates(tx, grads):
  """Runs ``tx`` over a sequence: ``grads`` leaves are ``[T, ...]`` (one device).

  Returns ``(state0, outputs, states)``: the initial state, and per step the output and
  the state after it, stacked on a leading ``[T]`` axis.
  """
  def run(grads):
    state0 = tx.init(jax.tree_util.tree_map(lambda g: g[0], grads))

    def body(state, g):
      out, state = tx.update(g, state)
      return state, (out, state)

    return state0, jax.lax.scan(body, state0, grads)[1]

  return run(grads)


def run_single(tx, grads):
  state0, (outs, states) = jax.jit(lambda g: scan_updates(tx, g))(grads)
  return state0, outs, states


def run_pmap(tx, grads):
  """``grads`` leaves are ``[N, T, ...]``: device i's gradient sequence."""
  fn = jax.pmap(lambda g: scan_updates(tx, g), axis_name="data",
                devices=jax.devices()[:DEVICES])
  state0, (outs, states) = fn(grads)
  return state0, outs, states


def as64(x):
  return np.asarray(x, np.float64)


def reference_powersgd(grads, q0):
  """Float64 numpy PowerSGD with error feedback on one matrix (one device).

  ``grads``: [T, n, m]; ``q0``: [m, r]. Returns outputs [T, n, m], errors [T, n, m] and
  the warm starts q [T, m, r] after each step.
  """
  error, q = np.zeros(grads.shape[1:]), q0
  outs, errors, qs = [], [], []
  for g in grads:
    m = g + error
    p_hat, _ = np.linalg.qr(m @ q)
    q = m.T @ p_hat
    out = p_hat @ q.T
    error = m - out
    outs.append(out)
    errors.append(error)
    qs.append(q)
  return np.stack(outs), np.stack(errors), np.stack(qs)


# ----------------------------------------------------------------------------------------
# The transform: construction and state.


def test_transform_rejects_bad_arguments():
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="rank must be an integer >= 1, got 0"):
    powersgd_lib.powersgd(0, key=key)
  with pytest.raises(ValueError, match="start_iter must be an integer >= 0, got -1"):
    powersgd_lib.powersgd(1, key=key, start_iter=-1)
  with pytest.raises(ValueError, match="start_iter must be an integer >= 0, got 1.5"):
    powersgd_lib.powersgd(1, key=key, start_iter=1.5)
  with pytest.raises(ValueError, match="key must be a PRNG key"):
    powersgd_lib.powersgd(1, key=0)
  with pytest.raises(ValueError, match="num_devices must be an integer >= 1, got 0"):
    powersgd_lib.wire_bits({"w": jnp.zeros((4, 20))}, 2, 0)
  with pytest.raises(ValueError, match="rank must be an integer >= 1, got -2"):
    powersgd_lib.wire_bits({"w": jnp.zeros((4, 20))}, -2, 8)


def test_init_state():
  key = jax.random.key(11)
  params = {"hidden": jnp.ones((4, 20)), "bias": jnp.ones(4), "kernel": jnp.ones((6, 3, 3)),
            "small": jnp.ones((2, 2), jnp.bfloat16)}
  tx = powersgd_lib.powersgd(2, key=key)
  state = tx.init(params)
  assert isinstance(state, powersgd_lib.PowerSGDState)
  assert int(state.count) == 0
  np.testing.assert_array_equal(jax.random.key_data(state.rng_key), jax.random.key_data(key))
  # Compressed leaves: q float32 [m, r], residual float32 zeros; the rest: None.
  assert state.q["hidden"].shape == (20, 2) and state.q["kernel"].shape == (9, 2)
  assert state.q["bias"] is None and state.q["small"] is None
  assert state.error["bias"] is None and state.error["small"] is None
  for name, shape in (("hidden", (4, 20)), ("kernel", (6, 3, 3))):
    assert state.q[name].dtype == jnp.float32
    assert state.error[name].shape == shape and state.error[name].dtype == jnp.float32
    assert np.all(np.asarray(state.error[name]) == 0)
  # Deterministic in the key (every device that inits with it gets the same q), and the
  # leaves draw independent columns.
  again = powersgd_lib.powersgd(2, key=key).init(params)
  np.testing.assert_array_equal(state.q["hidden"], again.q["hidden"])
  assert not np.array_equal(np.asarray(state.q["hidden"])[:9], np.asarray(state.q["kernel"]))
  other = powersgd_lib.powersgd(2, key=jax.random.key(12)).init(params)
  assert not np.array_equal(np.asarray(state.q["hidden"]), np.asarray(other.q["hidden"]))


# ----------------------------------------------------------------------------------------
# The transform on one device.


def test_rank_r_gradient_is_reproduced_every_step():
  # M = g + e with e = 0 and rank(g) = r: P = g q spans range(g) for the initial q and
  # for every warm start, so the output is g and the residual stays ~0 (float32 level).
  rng = np.random.default_rng(20)
  g = low_rank(rng, 30, 40, 2)
  grads = {"w": jnp.broadcast_to(g, (5, 30, 40))}
  _, outs, states = run_single(powersgd_lib.powersgd(2, key=jax.random.key(0)), grads)
  norm = float(np.linalg.norm(as64(g)))
  for t in range(5):
    assert np.linalg.norm(as64(outs["w"][t]) - as64(g)) <= 1e-5 * norm
    assert np.linalg.norm(as64(states.error["w"][t])) <= 1e-5 * norm
  # The warm start q spans the row space of g: g q q^+ = g.
  q = as64(states.q["w"][-1])
  np.testing.assert_allclose(as64(g) @ q @ np.linalg.pinv(q), as64(g), atol=1e-4 * norm)


@functools.lru_cache(maxsize=None)
def random_gradient_run():
  """One single-device run on 8 steps of random full-rank gradients (shared by tests)."""
  rng = np.random.default_rng(21)
  grads = {"w": jnp.asarray(rng.standard_normal((8, 20, 30)), jnp.float32),
           "b": jnp.asarray(rng.standard_normal((8, 20)), jnp.float32)}
  return (grads,) + run_single(powersgd_lib.powersgd(2, key=jax.random.key(1)), grads)


def test_error_feedback_invariant_is_exact():
  # e_t = (g_t + e_{t-1}) - out_t holds bit for bit: the transform computes exactly these
  # two float32 operations. Summing over steps, sum_t out_t + e_T = sum_t g_t up to one
  # float32 rounding per operation (2 per step, each <= eps * |value|).
  grads, _, outs, states = random_gradient_run()
  g, out, err = (np.asarray(a["w"]) for a in (grads, outs, states.error))
  num_steps = g.shape[0]
  previous = np.zeros_like(err[0])
  for t in range(num_steps):
    np.testing.assert_array_equal(err[t], (g[t] + previous) - out[t])
    previous = err[t]
  scale = np.abs(as64(g)).max() * num_steps
  np.testing.assert_allclose(as64(out).sum(0) + as64(err[-1]), as64(g).sum(0),
                             atol=4 * num_steps * EPS32 * scale)
  # Compression actually happened (rank 2 of a 20 x 30 full-rank gradient).
  assert np.linalg.norm(err[0]) > 0.3 * np.linalg.norm(g[0])
  # Vectors pass through exactly on one device, with no residual.
  np.testing.assert_array_equal(np.asarray(outs["b"]), np.asarray(grads["b"]))
  assert states.error["b"] is None and states.q["b"] is None


def test_bfloat16_gradients_keep_their_dtype_and_feed_back_the_rounding():
  # The output has the gradient's dtype; the float32 residual is taken against the
  # output as applied (after the cast to bfloat16), so that rounding is fed back too:
  # e_t = (float32(g_t) + e_{t-1}) - float32(out_t), bit for bit.
  rng = np.random.default_rng(24)
  grads = {"w": jnp.asarray(rng.standard_normal((3, 12, 16)), jnp.bfloat16),
           "b": jnp.asarray(rng.standard_normal((3, 12)), jnp.bfloat16)}
  _, outs, states = run_single(powersgd_lib.powersgd(2, key=jax.random.key(8)), grads)
  assert outs["w"].dtype == jnp.bfloat16 and outs["b"].dtype == jnp.bfloat16
  assert states.error["w"].dtype == jnp.float32
  previous = np.zeros((12, 16), np.float32)
  for t in range(3):
    g = np.asarray(grads["w"][t], np.float32)
    np.testing.assert_array_equal(np.asarray(states.error["w"][t]),
                                  (g + previous) - np.asarray(outs["w"][t], np.float32))
    previous = np.asarray(states.error["w"][t])


def test_matches_float64_reference_algorithm():
  # Warm start + error feedback over 8 steps (20 x 30, rank 2) against a float64 numpy
  # transcription of the algorithm, from the same initial q. The output is invariant to
  # QR's column signs. Float32 vs float64: each step rounds at ~eps * cond(P) relative
  # accuracy and the rounding carries over through e and q; measured max relative
  # deviation 5e-7 (about 4 eps), asserted 2e-5.
  grads, state0, outs, states = random_gradient_run()
  ref_out, ref_err, _ = reference_powersgd(as64(grads["w"]), as64(state0.q["w"]))
  for t in range(grads["w"].shape[0]):
    scale = np.linalg.norm(ref_out[t]) + np.linalg.norm(ref_err[t])
    assert np.linalg.norm(as64(outs["w"][t]) - ref_out[t]) <= 2e-5 * scale, t
    assert np.linalg.norm(as64(states.error["w"][t]) - ref_err[t]) <= 2e-5 * scale, t


def test_warm_start_makes_power_iteration_converge():
  # Fed the same matrix G again and again, warm-started steps are subspace iteration:
  # range(P) converges to G's top-r left singular space at rate (s3 / s2)^2 = 1/4 per
  # step, so after 25 steps ||G - M_hat||^2 is the Eckart-Young optimum
  # s3^2 + s4^2 + s5^2 = 5.25 (to float32 accuracy, 1e-5 relative). A cold start (a fresh
  # Gaussian q each step) stays well above it.
  rng = np.random.default_rng(23)
  g = jnp.asarray(with_singular_values(rng, 30, 40, [5.0, 4.0, 2.0, 1.0, 0.5]), jnp.float32)
  optimum = 4.0 + 1.0 + 0.25

  @jax.jit
  def warm(q):
    def body(q, _):
      step = powersgd_lib.low_rank_step(g, q)
      return step.q, jnp.sum((g - step.m_hat) ** 2)
    return jax.lax.scan(body, q, None, length=25)[1]

  errors = np.asarray(warm(jax.random.normal(jax.random.key(3), (40, 2))), np.float64)
  np.testing.assert_allclose(errors[-1], optimum, rtol=1e-5)
  assert np.all(np.diff(errors) <= 1e-5 * optimum)  # monotone (up to rounding)
  cold_step = one_step(2)
  cold = jax.jit(jax.vmap(lambda k: jnp.sum((g - cold_step(k, g)) ** 2)))(
      jax.random.split(jax.random.key(4), 25))
  assert np.mean(np.asarray(cold)) > 1.5 * optimum
  assert errors[0] > errors[-1] * (1 + 1e-3)


# ----------------------------------------------------------------------------------------
# The transform on 8 devices.


def test_pmap_equals_single_device_powersgd_of_the_mean_gradient():
  # Exact in real arithmetic: P = mean_i(M_i q) = (mean_i M_i) q and Q likewise, so the
  # output is single-device PowerSGD of mean_i M_i; mean_i e_i then follows the
  # single-device residual recursion, so for all steps the 8-device run fed g_i equals
  # the single-device run fed mean_i g_i (outputs, q and the MEAN residual; the
  # per-device residuals are not shared). In float32 only the order of the sums differs:
  # relative 1e-5 (measured 7e-7).
  rng = np.random.default_rng(30)
  num_steps = 5
  grads = {"w": jnp.asarray(rng.standard_normal((DEVICES, num_steps, 12, 16)), jnp.float32),
           "b": jnp.asarray(rng.standard_normal((DEVICES, num_steps, 12)), jnp.float32)}
  key = jax.random.key(5)
  _, outs, states = run_pmap(powersgd_lib.powersgd(2, key=key, axis_name="data"), grads)
  mean_grads = jax.tree_util.tree_map(lambda g: jnp.mean(g, axis=0), grads)
  _, ref_outs, ref_states = run_single(powersgd_lib.powersgd(2, key=key), mean_grads)
  # Indexed as numpy arrays (a copy, exact): eager indexing of jax arrays compiles a
  # program per index.
  outs, ref_outs = jax.device_get(outs), jax.device_get(ref_outs)
  q, ref_q = np.asarray(states.q["w"]), np.asarray(ref_states.q["w"])
  error, ref_error = np.asarray(states.error["w"]), np.asarray(ref_states.error["w"])
  grads_w = np.asarray(grads["w"])

  for leaf in (outs["w"], outs["b"], q):
    for i in range(1, DEVICES):  # identical on every device, bit for bit
      np.testing.assert_array_equal(leaf[i], leaf[0])

  def close(a, b):
    a, b = as64(a), as64(b)
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)

  for t in range(num_steps):
    close(outs["w"][0, t], ref_outs["w"][t])
    close(outs["b"][0, t], ref_outs["b"][t])      # vectors: the plain mean
    close(q[0, t], ref_q[t])
    close(np.mean(as64(error[:, t]), axis=0), ref_error[t])
    # Each device keeps its own residual e_i = M_i - M_hat, exactly.
    prev = np.zeros((DEVICES, 12, 16), np.float32) if t == 0 else error[:, t - 1]
    np.testing.assert_array_equal(error[:, t], (grads_w[:, t] + prev) - outs["w"][:, t])
  errors = error[:, -1]
  assert not np.allclose(errors[0], errors[1])


def test_pmean_of_p_is_exactly_mean_matrix_times_q():
  # With small integers every float32 product and sum below is exact, and dividing by
  # 8 devices is exact, so the all-reduced P equals (mean_i M_i) q bit for bit.
  rng = np.random.default_rng(31)
  mats = rng.integers(-4, 5, size=(DEVICES, 10, 14)).astype(np.float32)
  q = rng.integers(-3, 4, size=(14, 2)).astype(np.float32)
  steps = jax.pmap(lambda m: powersgd_lib.low_rank_step(m, jnp.asarray(q), "data"),
                   axis_name="data", devices=jax.devices()[:DEVICES])(jnp.asarray(mats))
  expected = (mats.astype(np.float64).mean(0) @ q.astype(np.float64)).astype(np.float32)
  p = np.asarray(steps.p)  # indexed in numpy: eager jax indexing compiles per index
  for i in range(DEVICES):
    np.testing.assert_array_equal(p[i], expected)
  single = jax.jit(powersgd_lib.low_rank_step)(jnp.asarray(mats.mean(0)), jnp.asarray(q))
  np.testing.assert_array_equal(np.asarray(single.p), expected)
  # P is equal bit for bit (above), but QR and P_hat P_hat^T M then run in two programs
  # (pmap vs jit) that may order their 10- and 14-term sums differently: ~(10 + 14) u
  # cond(P) relative on entries of size ~10 (small integer matrices, cond(P) ~ 1-10),
  # ~1e-5 at most; rtol=1e-5 with atol=1e-5 (1e-6 of the entries' scale) covers it.
  np.testing.assert_allclose(np.asarray(steps.m_hat[0]), np.asarray(single.m_hat),
                             rtol=1e-5, atol=1e-5)


def test_zero_columns_of_q_are_redrawn_identically_on_every_device():
  # Step 0: zero gradients, so P = 0, P_hat = unit vectors e_1, e_2 and Q = M^T P_hat = 0.
  # Kept as the warm start, q = 0 would give P = 0 forever, and with rows 0 and 1 of M
  # zero the output would stay 0. The zero columns are redrawn from a shared key, so at
  # step 1 the rank-1 mean gradient is reproduced, and q is the same on every device.
  rng = np.random.default_rng(33)
  u = np.concatenate([np.zeros(2), rng.standard_normal(10)])
  v = rng.standard_normal((DEVICES, 16))
  rank1 = np.einsum("n,im->inm", u, v).astype(np.float32)   # device i: u v_i^T
  grads = {"w": jnp.asarray(np.stack([np.zeros_like(rank1), rank1], axis=1))}
  state0, outs, states = run_pmap(powersgd_lib.powersgd(2, key=jax.random.key(9),
                                                        axis_name="data"), grads)
  q1 = np.asarray(states.q["w"][:, 0])
  assert np.all(np.isfinite(q1)) and np.all(np.any(q1 != 0, axis=1))
  assert not np.array_equal(q1[0], np.asarray(state0.q["w"][0]))
  for i in range(1, DEVICES):
    np.testing.assert_array_equal(q1[i], q1[0])
  assert np.all(np.asarray(outs["w"][:, 0]) == 0)
  mean = as64(rank1).mean(0)
  # Rank 1 reproduced to float32 accuracy: the 8-device mean (9 u) and the rank-1
  # projection (P, QR, Q: 12- and 16-term sums, cond = 1 for a rank-1 P) round by
  # ~(8 + 12 + 16) u ~ 2e-6 of ||mean||; 1e-5 leaves 5x.
  assert np.linalg.norm(as64(outs["w"][0, 1]) - mean) <= 1e-5 * np.linalg.norm(mean)


def test_start_iter_sends_exact_means_first():
  rng = np.random.default_rng(32)
  grads = {"w": jnp.asarray(rng.standard_normal((DEVICES, 4, 12, 16)), jnp.float32)}
  key = jax.random.key(6)
  state0, outs, states = run_pmap(
      powersgd_lib.powersgd(2, key=key, axis_name="data", start_iter=2), grads)
  mean = as64(grads["w"]).mean(0)
  for t in (0, 1):  # exact all-reduce, no residual, q untouched
    # pmean of 8 float32 values vs the float64 mean: |error| <= (8 + 1) u mean_i |g_i|;
    # mean_i |g_i| of N(0, 1) draws is 0.8 +- 0.21, < 1.5 over these 384 entries, so
    # <= 8e-7: the atol alone covers it, even where the mean cancels.
    np.testing.assert_allclose(as64(outs["w"][0, t]), mean[t], rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(states.error["w"][:, t]) == 0)
    np.testing.assert_array_equal(np.asarray(states.q["w"][:, t]), np.asarray(state0.q["w"]))
  # From step 2 on it is PowerSGD of the mean gradient started from the initial state
  # (zero residual, initial q): the float64 reference of the algorithm, to float32
  # accuracy (relative 2e-5, as in test_matches_float64_reference_algorithm).
  ref_out, _, _ = reference_powersgd(mean[2:], as64(state0.q["w"][0]))
  for t in (2, 3):
    np.testing.assert_array_equal(np.asarray(outs["w"][1:, t]),
                                  np.broadcast_to(outs["w"][0, t], (DEVICES - 1, 12, 16)))
    assert np.linalg.norm(as64(outs["w"][0, t]) - ref_out[t - 2]) <= \
        2e-5 * np.linalg.norm(ref_out[t - 2])
  assert np.linalg.norm(as64(outs["w"][0, 2]) - mean[2]) > 0.1 * np.linalg.norm(mean[2])


# ----------------------------------------------------------------------------------------
# Data-parallel training of the planted one-hidden-layer network.

from helpers import network_problem, pmean_transform  # noqa: E402
from helpers import train_network as train  # noqa: E402


def test_measured_hlo_bits_equal_wire_bits():
  # A wider network than the training test's, so that the compression shows.
  num_devices, dim, num_hidden = DEVICES, 200, 32
  devices = jax.devices()[:num_devices]
  _, data, params = network_problem(0, dim, num_hidden, num_samples=64)
  tx = optax.chain(powersgd_lib.powersgd(2, key=jax.random.key(0), axis_name="data"),
                   optax.sgd(0.1))
  step = parallel.make_step(network.loss, sampling.make_batch_fn(64, sampling="replacement"),
                            tx)
  inputs = parallel.replicate(
      (parallel.init_state(params, tx), (data, None), jax.random.key(1)), devices)
  report = wire.measure(parallel.pmapped(step, devices), *inputs)
  expected = powersgd_lib.wire_bits(params, 2, num_devices)
  # P and Q of "hidden" ([K, d]: 2 (K + d) floats) and the two [K] vectors, all-reduced.
  n = num_devices
  assert expected == 2 * (n - 1) / n * 32 * (2 * (num_hidden + dim) + 2 * num_hidden)
  # Exact: both are sums of 2 (N-1)/N * S = 1.75 S with S an integer number of bits, dyadic
  # values far below 2^53, so every float64 partial sum is exact in any order.
  assert report.sent_bits == expected, report.collectives
  assert all(c.op == "all-reduce" and c.group_size == n for c in report.collectives)
  # 6464 parameters against 2 * 232 + 64 = 528 all-reduced floats: 12.2x fewer bits.
  float32 = 2 * (n - 1) / n * 32 * sum(x.size for x in jax.tree_util.tree_leaves(params))
  # Exact: numerator and denominator are exact (1.75 * 32 * integer), and their quotient
  # is 6464 / 528 as a real number, which IEEE division rounds the same way both times.
  assert float32 / report.sent_bits == 6464 / 528


def test_powersgd_rank2_trains_the_network_on_8_devices():
  # The claim: PowerSGD (rank 2, warm start, error feedback) inside
  # optax.chain(powersgd, sgd) trains a pytree of several parameters under pmap about as
  # well as uncompressed data-parallel SGD. Measured in exactly this setting (seed 40,
  # lr 0.4, B = 256 of n = 400, d = 20, K = 4): PowerSGD's training loss is below 1e-5 x
  # its initial value from step 278 (so 600 steps give ~2x margin) and ends at
  # 1.6e-11 x; SGD ends at 1.2e-11 x, a ratio of 1.3, asserted <= 3; held-out relative
  # error 5e-6, asserted < 1e-3. Without error feedback the same rank-2 run ends at
  # 2.8e-5 x (2e6 x SGD's loss, held-out error 7e-3): each assertion would catch it.
  devices = jax.devices()[:DEVICES]
  teacher, data, params = network_problem(40)
  num_steps, learning_rate = 600, 0.4
  compressed = train(optax.chain(
      powersgd_lib.powersgd(2, key=jax.random.key(7), axis_name="data"),
      optax.sgd(learning_rate)), params, data, num_steps, devices)
  baseline = train(optax.chain(pmean_transform(), optax.sgd(learning_rate)),
                   params, data, num_steps, devices)
  for state in (compressed, baseline):  # replicas stay in sync, bit for bit
    for leaf in jax.tree_util.tree_leaves(state.params):
      for i in range(1, DEVICES):
        np.testing.assert_array_equal(np.asarray(leaf[i]), np.asarray(leaf[0]))
  loss = jax.jit(network.loss)
  initial = float(loss(params, data.x, data.y))
  final = float(loss(parallel.unreplicate(compressed.params), data.x, data.y))
  final_sgd = float(loss(parallel.unreplicate(baseline.params), data.x, data.y))
  assert final <= 1e-5 * initial, (initial, final)
  assert final <= 3 * final_sgd, (final, final_sgd)
  # The student has learnt the teacher: small prediction error on fresh inputs.
  held_out = network.sample_dataset(jax.random.key(99), teacher, 2000)
  assert float(network.prediction_error(parallel.unreplicate(compressed.params), held_out)) < 1e-3


def test_pmap_and_shard_map_agree():
  # Same numbers under both wrappers, through the exact phase (start_iter, a lax.cond with
  # collectives in both branches) and the compressed phase, whose warm start q is an
  # all-reduced value carried in a device-split state.
  devices = jax.devices()[:DEVICES]
  _, data, params = network_problem(40)
  tx = optax.chain(powersgd_lib.powersgd(2, key=jax.random.key(7), axis_name="data",
                                         start_iter=5), optax.sgd(0.4))
  by_pmap = train(tx, params, data, 20, devices, wrapper="pmap")
  by_shard_map = train(tx, params, data, 20, devices, wrapper="shard_map")
  for a, b in zip(jax.tree_util.tree_leaves(by_pmap), jax.tree_util.tree_leaves(by_shard_map)):
    # Not a derived rounding bound: the two wrappers compile the same per-device program
    # and measured bit-identical; a reassociated sum would move the O(1) params by about
    # T lr (B/N + N) u ~ 1e-5 per unit of gradient over these 20 steps, so this rtol/atol
    # is at the scale of a one-ulp-per-step drift (see report).
    if jnp.issubdtype(a.dtype, jnp.floating):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
