"""The planted ReLU model: the ReLU'(0) = 1/2 convention, exact gradients, inits, batches."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrelu import planted

U = 2.0 ** -24  # float32 unit roundoff


def test_relu_derivative_is_one_half_at_zero():
  grad = jax.jit(jax.grad(planted.relu))  # one program for the three calls
  # Exact: the derivative is (1 + sign(z)) / 2 in {0, 1/2, 1}, all representable.
  assert grad(0.0) == 0.5
  assert grad(2.0) == 1.0
  assert grad(-2.0) == 0.0
  assert jax.grad(jax.nn.relu)(0.0) == 0.0  # why jrelu cannot use jax.nn.relu


def test_gradient_at_zero_is_minus_half_moment():
  w_star = planted.sample_w_star(jax.random.key(0), 30)
  data = planted.sample_dataset(jax.random.key(1), w_star, 200)
  grad = jax.jit(jax.grad(planted.loss))(jnp.zeros(30), data.x, data.y)
  expected = -(data.y @ data.x) / (2 * 200)
  # Both sides are a 200-term float32 dot product per coordinate (plus <= 4 exact-scale
  # roundings of the 1/m, 1/2 factors): |error| <= (200 + 4) u sum_i |y_i x_ij| / 400 each,
  # twice that between them, in any summation order (so jitted as eager). Per coordinate, since sum_i y_i x_ij cancels (a relative
  # bound would not hold); measured <= 0.014 of it.
  x64, y64 = np.asarray(data.x, np.float64), np.asarray(data.y, np.float64)
  bound = 2 * (200 + 4) * U * (np.abs(y64) @ np.abs(x64)) / 400
  error = np.abs(np.asarray(grad, np.float64) - np.asarray(expected, np.float64))
  assert np.all(error <= bound), (error / bound).max()
  # With jax.nn.relu the same loss would be stuck at w = 0.
  stuck = jax.jit(jax.grad(
      lambda w: 0.5 * jnp.mean((jax.nn.relu(data.x @ w) - data.y) ** 2)))(jnp.zeros(30))
  assert np.all(stuck == 0)


def test_loss_zero_at_w_star_and_relative_error():
  w_star = planted.sample_w_star(jax.random.key(0), 20)
  data = planted.sample_dataset(jax.random.key(1), w_star, 100)
  # Exact: y was made by the same eager dot x @ w_star on the same operands, so every
  # residual relu(x @ w_star) - y is 0.0.
  assert planted.loss(w_star, data.x, data.y) == 0
  assert planted.relative_error(w_star, w_star) == 0  # w - w = 0 exactly
  # Exact 1.0: 0 - w = -w and 2w - w = w are exact in float32 (negation; Sterbenz), so the
  # ratio is ||w|| / ||w|| of two identical float32 norms (same reduction, same squares).
  assert planted.relative_error(jnp.zeros(20), w_star) == 1.0
  assert planted.relative_error(2 * w_star, w_star) == 1.0


def test_population_gradient_matches_closed_form():
  """grad L(w) = w/2 - [(pi - theta) w_star + ||w_star|| sin(theta) w/||w||] / (2 pi).

  Monte Carlo with n = 400000 samples; per coordinate the tolerance is 6 standard errors
  of the mean of the per-sample gradients (estimated from the same samples). The mean is
  taken in float64 (numpy's pairwise sum): a float32 400000-term sum could round by up to
  n u = 2.4e-2 relative in the worst case, more than the standard error (~1e-3).
  """
  d, n = 5, 400_000
  w_star = planted.sample_w_star(jax.random.key(0), d)
  data = planted.sample_dataset(jax.random.key(1), w_star, n)
  w = w_star + 0.7 * planted.sample_w_star(jax.random.key(2), d)
  per_sample = jax.jit(jax.vmap(jax.grad(planted.loss), in_axes=(None, 0, 0)))(
      w, data.x[:, None, :], data.y[:, None])
  per_sample = np.asarray(per_sample, np.float64)
  mc = per_sample.mean(0)
  stderr = per_sample.std(0) / np.sqrt(n)
  w, w_star = np.asarray(w, np.float64), np.asarray(w_star, np.float64)
  theta = np.arccos(w @ w_star / (np.linalg.norm(w) * np.linalg.norm(w_star)))
  exact = w / 2 - ((np.pi - theta) * w_star
                   + np.linalg.norm(w_star) * np.sin(theta) * w / np.linalg.norm(w)) / (2 * np.pi)
  assert np.all(np.abs(mc - exact) <= 6 * stderr), (mc, exact, stderr)


def test_first_moment_is_half_w_star():
  """E[y x] = w_star / 2, so the moment init (2/n) sum y_i x_i is unbiased for w_star."""
  d, n = 10, 200_000
  w_star = planted.sample_w_star(jax.random.key(3), d)
  data = planted.sample_dataset(jax.random.key(4), w_star, n)
  # float64 sums (the products themselves are exact float32 products, rounded once: u).
  products = np.asarray(data.y[:, None] * data.x, np.float64)
  stderr = products.std(0) / np.sqrt(n)
  assert np.all(np.abs(products.mean(0) - np.asarray(w_star) / 2) <= 6 * stderr)


def test_inits():
  w_star = planted.sample_w_star(jax.random.key(0), 50)
  data = planted.sample_dataset(jax.random.key(1), w_star, 4000)
  zeros = planted.init_params(jax.random.key(2), (data, w_star), "zeros")
  np.testing.assert_array_equal(zeros, np.zeros(50))
  moment = planted.init_params(jax.random.key(2), (data, w_star), "moment")
  # Bit for bit: init_params computes the same eager dot and the same float32 scaling
  # by the Python float 2/4000 (a 4000-term sum, so a tolerance would have to be ~n u).
  np.testing.assert_array_equal(moment, 2 / 4000 * (data.y @ data.x))
  # E||moment - w_star||^2 ~ 4 d E[y^2 x_j^2] / n ~ 2 d / n = 0.025: error ~ 0.16. The
  # squared error is a sum of d = 50 squared ~Gaussian terms: sd ~ sqrt(2/50) x 0.025 =
  # 0.005, so 0.3^2 = 0.09 is 13 sd above its mean.
  assert planted.relative_error(moment, w_star) < 0.3
  random = planted.init_params(jax.random.key(2), (data, w_star), "random")
  # ||random||^2 ~ chi2_50 / 50: mean 1, sd 0.2, so ||random|| = 1 +- 0.1; the bounds are
  # 5 sd either side.
  assert random.shape == (50,) and 0.5 < float(jnp.linalg.norm(random)) < 1.5
  with pytest.raises(ValueError, match="'ones'"):
    planted.init_params(jax.random.key(2), (data, w_star), "ones")


def test_sampling_shapes_and_validation():
  w_star = planted.sample_w_star(jax.random.key(0), 7)
  # w / ||w|| then ||.|| again over d = 7 terms: each norm rounds by <= (d/2 + 1) u, the
  # division by u per entry: |norm - 1| <= (d + 3) u = 6e-7; 1e-6 leaves 1.7x margin.
  assert float(jnp.linalg.norm(w_star)) == pytest.approx(1.0, rel=1e-6, abs=0)
  data = planted.sample_dataset(jax.random.key(1), w_star, 11)
  assert data.x.shape == (11, 7) and data.y.shape == (11,)
  assert np.all(np.asarray(data.y) >= 0)
  noisy = planted.sample_dataset(jax.random.key(1), w_star, 11, noise_std=0.5)
  assert np.any(np.asarray(noisy.y) != np.asarray(data.y))
  for bad in (0, -3, 2.5):
    with pytest.raises(ValueError, match=repr(bad)):
      planted.sample_w_star(jax.random.key(0), bad)
  with pytest.raises(ValueError, match="num_samples"):
    planted.sample_dataset(jax.random.key(1), w_star, 0)
  with pytest.raises(ValueError, match="-1"):
    planted.sample_dataset(jax.random.key(1), w_star, 5, noise_std=-1.0)


