"""jrelu.checkpoint in a user's own optax loop: save, restore, continue bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jrelu
from jrelu import checkpoint
from jrelu import parallel
from jrelu import planted

DEVICES = 8


def test_qsgd_adam_state_restores_and_continues_bit_identically(tmp_path):
  devices = jax.devices()[:DEVICES]
  w_star = planted.sample_w_star(jax.random.key(0), 12)
  data = planted.sample_dataset(jax.random.key(1), w_star, 64)
  xs, ys = data.x.reshape(DEVICES, 8, 12), data.y.reshape(DEVICES, 8)
  tx = optax.chain(jrelu.qsgd(4, key=jax.random.key(2), axis_name="data"), optax.adam(0.1))

  def step(params, opt_state, x, y):
    grads = jax.grad(planted.loss)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  step = jax.pmap(step, axis_name="data", devices=devices)
  fresh = parallel.replicate((jnp.zeros(12), tx.init(jnp.zeros(12))), devices)
  state = fresh
  for _ in range(3):
    state = step(*state, xs, ys)
  checkpoint.save(str(tmp_path), 3, state, {"note": "three steps"}, keep=2)
  uninterrupted = state
  for _ in range(3):
    uninterrupted = step(*uninterrupted, xs, ys)

  restored, metadata = checkpoint.restore(str(tmp_path), like=fresh)
  assert metadata == {"note": "three steps"}
  assert checkpoint.latest_step(str(tmp_path)) == 3
  # The typed key of QSGD's noise comes back typed, with its implementation.
  (key_leaf,) = [l for l in jax.tree_util.tree_leaves(restored)
                 if jax.dtypes.issubdtype(l.dtype, jax.dtypes.prng_key)]
  assert jax.random.key_impl(key_leaf) == jax.random.key_impl(jax.random.key(2))
  for _ in range(3):
    restored = step(*restored, xs, ys)
  for a, b in zip(jax.tree_util.tree_leaves(uninterrupted),
                  jax.tree_util.tree_leaves(restored)):
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit for bit


def test_keep_and_mismatch(tmp_path):
  tree = {"w": np.arange(3, dtype=np.float32), "count": np.int32(0)}
  for step in range(4):
    checkpoint.save(str(tmp_path), step, tree, keep=2)
  assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [2, 3]
  with pytest.raises(ValueError, match="array 1 is float32"):
    checkpoint.restore(str(tmp_path), like={"w": np.zeros(4, np.float32),
                                            "count": np.int32(0)})
  with pytest.raises(FileNotFoundError):
    checkpoint.restore(str(tmp_path / "none"), like=tree)
  with pytest.raises(ValueError, match="keep"):
    checkpoint.save(str(tmp_path), 5, tree, keep=0)
