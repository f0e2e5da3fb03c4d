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
  out_a, state_a = a.update(grads, a.init(grads))
  out_b, _ = b.update(grads, b.init(grads))
  np.testing.assert_array_equal(out_a["w"], out_b["w"])
  assert int(state_a.count) == 1


def test_raw_uint32_key_is_accepted_and_equivalent():
  grads = jnp.linspace(-1, 1, 100)
  typed = jrelu.qsgd(1, key=jax.random.key(7))
  raw = jrelu.qsgd(1, key=jax.random.PRNGKey(7))
  np.testing.assert_array_equal(typed.update(grads, typed.init(grads))[0],
                                raw.update(grads, raw.init(grads))[0])


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
  out1, state = tx.update(grads, state)
  out2, _ = tx.update(grads, state)
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
