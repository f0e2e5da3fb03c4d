"""The optax transforms: validation, keys, state, and use inside optax.chain."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jrelu
from jrelu import compressors
from jrelu import transforms


def test_qsgd_is_compress_of_the_qsgd_codec():
  grads = {"w": jax.random.normal(jax.random.key(0), (300,))}
  a = jrelu.qsgd(2, key=jax.random.key(1), bucket_size=64, norm="max")
  b = jrelu.compress(compressors.qsgd(2, 64, "max"), key=jax.random.key(1))
  # Jitted (eager JAX compiles every primitive on its own); a and b trace to the same
  # program, so their outputs are equal bit for bit.
  out_a, state_a = jax.jit(a.update)(grads, a.init(grads))
  out_b, _ = jax.jit(b.update)(grads, b.init(grads))
  np.testing.assert_array_equal(out_a["w"], out_b["w"])
  assert int(state_a.count) == 1


def test_raw_uint32_key_is_accepted_and_equivalent():
  grads = jnp.linspace(-1, 1, 100)
  typed = jrelu.qsgd(1, key=jax.random.key(7))
  raw = jrelu.qsgd(1, key=jax.random.PRNGKey(7))
  np.testing.assert_array_equal(jax.jit(typed.update)(grads, typed.init(grads))[0],
                                jax.jit(raw.update)(grads, raw.init(grads))[0])


@pytest.mark.parametrize("kwargs,match", [
    ({"num_levels": 0}, "num_levels must be an integer >= 1, got 0"),
    ({"num_levels": 4, "aggregation": "ring"}, "'ring'"),
    ({"num_levels": 4, "norm": "l1"}, "'l1'"),
    ({"num_levels": 4, "bucket_size": -2}, "-2"),
])
def test_bad_hyperparameters_raise_at_construction(kwargs, match):
  with pytest.raises(ValueError, match=match):
    jrelu.qsgd(key=jax.random.key(0), **kwargs)


def test_bad_key_and_compressor_raise():
  with pytest.raises(ValueError, match="key must be a PRNG key"):
    jrelu.qsgd(4, key=3)
  with pytest.raises(ValueError, match="single PRNG key"):
    jrelu.qsgd(4, key=jax.random.split(jax.random.key(0), 2))
  with pytest.raises(ValueError, match="must be a jrelu.compressors.Compressor"):
    jrelu.compress("qsgd", key=jax.random.key(0))


def test_leaves_and_steps_draw_independent_noise():
  grads = {"a": jnp.linspace(-1, 1, 200), "b": jnp.linspace(-1, 1, 200)}
  tx = jrelu.qsgd(1, key=jax.random.key(0))
  state = tx.init(grads)
  update = jax.jit(tx.update)  # one program for both steps
  out1, state = update(grads, state)
  out2, _ = update(grads, state)
  assert not np.array_equal(out1["a"], out1["b"])   # same values, different leaf keys
  assert not np.array_equal(out1["a"], out2["a"])   # same values, different steps


def test_chain_on_8_devices_under_pmap():
  tx = optax.chain(jrelu.qsgd(4, key=jax.random.key(0), axis_name="data"), optax.sgd(1.0))
  grads = jax.random.normal(jax.random.key(1), (8, 64))

  def step(g):
    updates, _ = tx.update(g, tx.init(g))
    return updates

  out = jax.pmap(step, axis_name="data")(grads)
  np.testing.assert_array_equal(out[3], out[0])
  # -1 * compressed mean: close to -mean(grads) (QSGD noise is O(1/sqrt(8)) here).
  assert np.corrcoef(np.asarray(out[0]), -np.asarray(grads.mean(0)))[0, 1] > 0.5


# ----------------------------------------------------------------------------------------
# Error feedback and Signum.


def test_error_feedback_keeps_the_exact_residual_on_one_device():
  """e_{t+1} = (g_t + e_t) - C(g_t + e_t), with C the codec under the step's leaf key."""
  c = compressors.top_k(5)
  key = jax.random.key(2)
  tx = transforms.error_feedback(c, key=key)
  grads = [{"w": jax.random.normal(jax.random.key(i), (40,))} for i in range(3)]
  state = tx.init(grads[0])
  error = np.zeros(40, np.float32)
  update, codec = jax.jit(tx.update), jax.jit(c)  # one program each for the 3 steps
  for t, g in enumerate(grads):
    out, state = update(g, state)
    p = np.asarray(g["w"]) + error
    leaf_key = jax.random.split(jax.random.fold_in(key, t), 1)[0]
    sent = np.asarray(codec(leaf_key, jnp.asarray(p)))
    np.testing.assert_allclose(np.asarray(out["w"]), sent, rtol=1e-6)
    error = p - sent
    np.testing.assert_allclose(np.asarray(state.error["w"]), error, rtol=1e-6, atol=1e-7)
  assert np.count_nonzero(error) == 40 - 5  # top-k sends 5 and keeps the rest


def test_error_feedback_sends_everything_eventually():
  """With a constant gradient the sum of what top-1 sent over T steps is T g minus the
  bounded residual: nothing is lost, only delayed (the point of error feedback)."""
  g = {"w": jnp.array([3.0, -2.0, 1.0, 0.5])}
  tx = transforms.error_feedback(compressors.top_k(1), key=jax.random.key(0))
  state = tx.init(g)
  update = jax.jit(tx.update)
  total = np.zeros(4)
  for _ in range(40):
    out, state = update(g, state)
    total += np.asarray(out["w"])
  np.testing.assert_allclose(total + np.asarray(state.error["w"]), 40 * np.asarray(g["w"]),
                             rtol=1e-5)
  assert np.all(np.abs(np.asarray(state.error["w"])) < 4 * 6.5)  # bounded by d * ||g||_inf


def test_error_feedback_residual_is_per_device_and_output_is_shared():
  """Under pmap each device keeps its own residual (its gradient minus what it sent),
  while every device receives the same averaged update."""
  n = 8
  c = compressors.top_k(fraction=0.25)
  tx = transforms.error_feedback(c, key=jax.random.key(0), axis_name="data",
                                 aggregation="all_gather")
  x = jax.random.normal(jax.random.key(1), (n, 32))

  def step(g):
    state = tx.init(g)
    out, state = tx.update(g, state)
    return out, state.error

  out, error = jax.pmap(step, axis_name="data", devices=jax.devices()[:n])(x)
  out, error, x = np.asarray(out), np.asarray(error), np.asarray(x)
  for i in range(1, n):
    np.testing.assert_array_equal(out[i], out[0])
  sent = x - error  # what each device sent: its own top-8 coordinates
  assert all(np.count_nonzero(sent[i]) == 8 for i in range(n))
  np.testing.assert_allclose(out[0], sent.mean(axis=0), rtol=1e-6, atol=1e-7)
  assert not np.allclose(error[0], error[1])


def test_error_feedback_rejects_bad_input():
  with pytest.raises(ValueError, match="Compressor"):
    transforms.error_feedback("top_k", key=jax.random.key(0))
  with pytest.raises(ValueError, match="majority_vote"):
    transforms.error_feedback(compressors.top_k(3), key=jax.random.key(0), axis_name="data",
                              aggregation="majority_vote")


def test_signum_is_the_sign_of_the_momentum():
  """Single device: Signum's output is sign(m_t), m_t = beta m_{t-1} + (1 - beta) g_t."""
  beta = 0.9
  tx = transforms.signum(beta, key=jax.random.key(0))
  grads = [jax.random.normal(jax.random.key(i), (64,)) for i in range(4)]
  state = tx.init(grads[0])
  m = np.zeros(64, np.float32)
  for g in grads:
    out, state = tx.update(g, state)
    m = beta * m + (1 - beta) * np.asarray(g)
    np.testing.assert_array_equal(np.asarray(out), np.where(m < 0, -1.0, 1.0))
  with pytest.raises(ValueError, match=r"beta must be a finite number in \[0, 1\)"):
    transforms.signum(1.0, key=jax.random.key(0))
