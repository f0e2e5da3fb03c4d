"""The planted one-hidden-layer ReLU network (jrelu.network).

Exact formulas are checked against float64 numpy; the one statistical test (the output's
moments against the arc-cosine kernel) uses a fixed key and 6-sigma tolerances derived
from the output's variance.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrelu import network
from jrelu import sampling

U = 2.0 ** -24  # float32 unit roundoff


def numpy_forward(params, x):
  """float64 reference: z = x W^T + b, a = ReLU(z), f = a @ output."""
  w, b, o = (np.asarray(params[k], np.float64) for k in ("hidden", "bias", "output"))
  z = np.asarray(x, np.float64) @ w.T + b
  return z, np.maximum(z, 0) @ o


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, None])
def test_factories_reject_bad_sizes(bad):
  key = jax.random.key(0)
  quoted = re.escape(repr(bad))
  with pytest.raises(ValueError, match="dim must be an integer >= 1, got " + quoted):
    network.sample_teacher(key, bad, 4)
  with pytest.raises(ValueError, match="num_hidden must be an integer >= 1, got " + quoted):
    network.sample_teacher(key, 20, bad)
  with pytest.raises(ValueError, match="num_samples must be an integer >= 1, got " + quoted):
    network.sample_dataset(key, jnp.ones((4, 20)), bad)


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_init_rejects_bad_scale(bad):
  teacher = network.sample_teacher(jax.random.key(0), 20, 4)
  with pytest.raises(ValueError, match="scale must be a finite number >= 0, got " + re.escape(repr(bad))):
    network.init_params(jax.random.key(0), (None, teacher), scale=bad)


def test_sample_teacher():
  teacher = network.sample_teacher(jax.random.key(1), 20, 4)
  assert teacher.shape == (4, 20) and teacher.dtype == jnp.float32
  # Rows w / ||w|| in float32 (d = 20), measured in float64: the float32 norm rounds by
  # <= (d/2 + 1) u and the division by u, so | ||row|| - 1 | <= (d/2 + 2) u = 7e-7;
  # 1e-6 leaves 1.4x margin.
  np.testing.assert_allclose(np.linalg.norm(np.asarray(teacher, np.float64), axis=1), 1.0,
                             rtol=1e-6, atol=0)
  np.testing.assert_array_equal(teacher, network.sample_teacher(jax.random.key(1), 20, 4))
  assert not np.allclose(teacher[0], teacher[1])


def test_sample_dataset_is_the_teacher_network():
  teacher = network.sample_teacher(jax.random.key(2), 20, 4)
  data = network.sample_dataset(jax.random.key(3), teacher, 300)
  assert isinstance(data, sampling.Dataset)
  assert data.x.shape == (300, 20) and data.y.shape == (300,)
  assert data.x.dtype == jnp.float32 and data.y.dtype == jnp.float32
  expected = np.maximum(np.asarray(data.x, np.float64) @ np.asarray(teacher, np.float64).T,
                        0).sum(1)
  # y_i = sum_k ReLU(<w_k, x_i>) in float32: d = 20-term dots, then K = 4 terms summed, so
  # |error_i| <= (d + K) u sum_k |w_k| |x_i| (was rtol=1e-5, atol=1e-6: no derivation).
  x64 = np.asarray(data.x, np.float64)
  bound = (20 + 4) * U * (np.abs(x64) @ np.abs(np.asarray(teacher, np.float64)).T).sum(1)
  error = np.abs(np.asarray(data.y, np.float64) - expected)
  assert np.all(error <= bound), (error / bound).max()
  # Realizable: the teacher's own parameters fit it with zero loss. Exactly 0: y was made
  # by predict(teacher_params(teacher), x), the same eager ops on the same operands.
  params = network.teacher_params(teacher)
  assert float(network.loss(params, data.x, data.y)) == 0.0
  assert float(network.prediction_error(params, data)) == 0.0
  assert network.metrics_fn(params, (data, teacher)) == {"prediction_error": 0.0}


def test_output_moments_match_arc_cosine_kernel():
  # For unit rows with pairwise angles t_jk and x ~ N(0, I):
  #   E[ReLU(<w_j, x>) ReLU(<w_k, x>)] = (sin t_jk + (pi - t_jk) cos t_jk) / (2 pi),
  # (t_jj = 0 gives 1/2), and E[ReLU(<w, x>)] = 1/sqrt(2 pi). So with y = sum_j ReLU:
  #   E[y] = K / sqrt(2 pi),  E[y^2] = sum_{j,k} kernel(t_jk),  Var[y] = E[y^2] - E[y]^2.
  # Tolerances, 6 sigma over n samples: |mean - E[y]| <= 6 sqrt(Var[y] / n) with the exact
  # Var[y]; for the second moment 6 sqrt(Var[y^2] / n) with Var[y^2] estimated from the
  # sample itself (n = 200000 pins it to about 1 %, far inside the 6-sigma margin).
  num_samples, dim, num_hidden = 200_000, 20, 4
  teacher = network.sample_teacher(jax.random.key(4), dim, num_hidden)
  y = np.asarray(network.sample_dataset(jax.random.key(5), teacher, num_samples).y,
                 np.float64)
  w = np.asarray(teacher, np.float64)
  angles = np.arccos(np.clip(w @ w.T, -1.0, 1.0))
  kernel = (np.sin(angles) + (np.pi - angles) * np.cos(angles)) / (2 * np.pi)
  mean, second = num_hidden / math.sqrt(2 * math.pi), float(kernel.sum())
  variance = second - mean**2
  assert abs(y.mean() - mean) <= 6 * math.sqrt(variance / num_samples), (y.mean(), mean)
  y2 = y * y
  assert abs(y2.mean() - second) <= 6 * math.sqrt(y2.var() / num_samples), (y2.mean(), second)
  # The exact variance against the sample's: a sample variance has relative sd
  # sqrt((kurtosis - 1) / n) = 0.0037 here (sample kurtosis 3.7); 6 sigma = 0.022.
  centred = y - y.mean()
  kurtosis = np.mean(centred**4) / np.mean(centred**2) ** 2
  np.testing.assert_allclose(y.var(), variance, rtol=6 * math.sqrt((kurtosis - 1) / num_samples))


def test_loss_and_gradients_match_hand_formulas():
  # r_i = f(x_i) - y_i, a_ij = ReLU(z_ij), s_ij = ReLU'(z_ij) (1/2 at 0):
  #   L = 1/(2m) sum r^2;  dL/do_j = 1/m sum_i r_i a_ij;  dL/db_j = 1/m sum_i r_i o_j s_ij;
  #   dL/dW_j = 1/m sum_i r_i o_j s_ij x_i.
  rng = np.random.default_rng(6)
  m, dim, num_hidden = 64, 10, 3
  params = {"hidden": jnp.asarray(rng.standard_normal((num_hidden, dim)), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal(num_hidden), jnp.float32),
            "output": jnp.asarray(rng.standard_normal(num_hidden), jnp.float32)}
  x = jnp.asarray(rng.standard_normal((m, dim)), jnp.float32)
  y = jnp.asarray(rng.standard_normal(m), jnp.float32)
  loss, grads = jax.jit(jax.value_and_grad(network.loss))(params, x, y)
  z, f = numpy_forward(params, x)
  r = f - np.asarray(y, np.float64)
  o = np.asarray(params["output"], np.float64)
  s = (1 + np.sign(z)) / 2
  # Float32 (jit) against float64, first-order rounding bounds per entry (no cancellation
  # assumed, so they hold on coordinates whose sums cancel, where rtol alone would not):
  # z = x W^T + b is a (d + 1)-term sum, |dz| <= (d + 1) u c with c = |x| |W|^T + |b|;
  # f = a o a K-term sum, r = f - y one more rounding:
  # |dr| <= u [(d + 1) c |o| + (K + 1) (|a| |o| + |y|)]. The sums over the m rows round by
  # <= (m + 4) u (terms, the 1/m, 1/2 and o_j factors).
  x64, a = np.asarray(x, np.float64), np.maximum(z, 0)
  c = np.abs(x64) @ np.abs(np.asarray(params["hidden"], np.float64)).T + np.abs(
      np.asarray(params["bias"], np.float64))
  dr = U * ((dim + 1) * c @ np.abs(o) + (num_hidden + 1) * (a @ np.abs(o) + np.abs(
      np.asarray(y, np.float64))))
  dz = (dim + 1) * U * c
  ar = np.abs(r)

  def check(actual, expected, bound):
    error = np.abs(np.asarray(actual, np.float64) - expected)
    assert np.all(error <= bound), (error / bound).max()

  check(loss, 0.5 * np.mean(r * r), np.mean(ar * dr) + (m + 4) * U * 0.5 * np.mean(r * r))
  check(grads["output"], r @ a / m, (dr @ a + ar @ dz + (m + 4) * U * ar @ a) / m)
  check(grads["bias"], o * (r @ s) / m, np.abs(o) * (dr @ s + (m + 4) * U * ar @ s) / m)
  check(grads["hidden"], o[:, None] * ((s * r[:, None]).T @ x64) / m,
        np.abs(o)[:, None] * ((s * dr[:, None]).T @ np.abs(x64)
                              + (m + 4) * U * (s * ar[:, None]).T @ np.abs(x64)) / m)


def test_relu_derivative_is_half_at_zero():
  # From hidden = 0, bias = 0, every unit sits at ReLU's kink: with ReLU'(0) = 1/2 the
  # gradient of row j is -(1/(2m)) x^T y, not 0 (jax.nn.relu would give 0, a stuck start).
  teacher = network.sample_teacher(jax.random.key(7), 10, 3)
  data = network.sample_dataset(jax.random.key(8), teacher, 128)
  params = network.init_params(jax.random.key(9), (data, teacher), scale=0.0)
  assert np.all(np.asarray(params["hidden"]) == 0)
  grads = jax.jit(jax.grad(network.loss))(params, data.x, data.y)
  hidden = np.asarray(grads["hidden"], np.float64)  # indexed in numpy below: no compiles
  expected = -(np.asarray(data.x, np.float64).T @ np.asarray(data.y, np.float64)) / (2 * 128)
  # At z = 0 the residual is -y exactly, so row j is a 128-term float32 dot product (plus
  # the 1/m, 1/2, o_j = 1 factors): |error| <= (128 + 4) u sum_i |x_i| |y_i| / 256 per
  # entry (was rtol=1e-5, atol=1e-7, tighter than that on cancelling entries). The bound
  # holds for any summation order, so for the jitted gradient as for the eager one.
  bound = (128 + 4) * U * (np.abs(np.asarray(data.x, np.float64)).T
                           @ np.abs(np.asarray(data.y, np.float64))) / (2 * 128)
  for j in range(3):
    error = np.abs(hidden[j] - expected)
    assert np.all(error <= bound), (j, (error / bound).max())


def test_init_params():
  teacher = jnp.zeros((500, 40))   # only its shape [K, d] is read
  params = network.init_params(jax.random.key(10), (None, teacher), scale=2.0)
  assert set(params) == {"hidden", "bias", "output"}
  assert params["hidden"].shape == (500, 40) and params["hidden"].dtype == jnp.float32
  assert np.all(np.asarray(params["bias"]) == 0) and np.all(np.asarray(params["output"]) == 1)
  # Entries are N(0, scale^2 / d): the mean of their squares over 20000 entries has
  # relative sd sqrt(2 / 20000) = 0.01 (Var[z^2] = 2 sigma^4); 6 sigma = 0.06.
  mean_square = float(np.mean(np.asarray(params["hidden"], np.float64) ** 2))
  assert abs(mean_square / (4.0 / 40) - 1) <= 6 * math.sqrt(2 / 20000)
  again = network.init_params(jax.random.key(10), (None, teacher), scale=2.0)
  np.testing.assert_array_equal(params["hidden"], again["hidden"])


def test_batch_shards_tile_the_global_batch():
  teacher = network.sample_teacher(jax.random.key(11), 5, 2)
  data = network.sample_dataset(jax.random.key(12), teacher, 100)
  # Jitted with the shard index traced (as under pmap): one program for the 8 shards. The
  # shards are gathered rows, so the comparisons stay bit for bit.
  batch_fn = jax.jit(sampling.make_batch_fn(64, sampling="replacement"), static_argnums=3)
  key = jax.random.key(13)
  whole_x, whole_y = batch_fn(key, (data, teacher), 0, 1)
  shards = [batch_fn(key, (data, teacher), i, 8) for i in range(8)]
  assert shards[0][0].shape == (8, 5) and shards[0][1].shape == (8,)
  np.testing.assert_array_equal(np.concatenate([s[0] for s in shards]), whole_x)
  np.testing.assert_array_equal(np.concatenate([s[1] for s in shards]), whole_y)


def test_gradient_descent_fits_the_teacher():
  # Realizable problem: full-batch GD from a random start drives the training loss to
  # ~0 and the student predicts the teacher on fresh inputs. Seed 40, lr 0.4, d = 20,
  # K = 4, n = 400 (the setting of tests/test_powersgd.py), measured: the loss is below
  # 1e-5 x its initial value from step 310 (1e-11 x at step 600), so 600 steps give ~2x
  # margin; held-out relative error 4e-6 (asserted < 1e-2).
  teacher = network.sample_teacher(jax.random.key(40), 20, 4)
  data = network.sample_dataset(jax.random.key(41), teacher, 400)
  params = network.init_params(jax.random.key(42), (data, teacher), scale=1.0)

  @jax.jit
  def descend(params):
    def body(params, _):
      grads = jax.grad(network.loss)(params, data.x, data.y)
      return jax.tree_util.tree_map(lambda p, g: p - 0.4 * g, params, grads), None
    return jax.lax.scan(body, params, None, length=600)[0]

  final = descend(params)
  loss = jax.jit(network.loss)  # one program for both calls
  initial_loss = float(loss(params, data.x, data.y))
  assert float(loss(final, data.x, data.y)) <= 1e-5 * initial_loss
  held_out = network.sample_dataset(jax.random.key(43), teacher, 2000)
  assert float(jax.jit(network.prediction_error)(final, held_out)) < 1e-2
