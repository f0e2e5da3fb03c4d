"""The optax transforms: validation, keys, state, and use inside optax.chain."""

import inspect
import warnings

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
    ({"num_levels": 0}, r"num_levels must be an integer in \[1, 16777216\] \(float32 must "
     r"represent every level 0\.\.s exactly\), got 0"),
    ({"num_levels": 2**24 + 1}, "got 16777217"),  # float32 rounds larger levels
    ({"num_levels": 10**12}, "got 1000000000000"),
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


# all_gather on purpose (each device's own top-k reaches the others): it costs more than
# float32 at this size, which the transform rightly warns about.
@pytest.mark.filterwarnings("ignore::jrelu.transforms.WireCostWarning")
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


# ----------------------------------------------------------------------------------------
# Using the transforms in your own code (issue 14): leaves that are not float gradients,
# pairings that send more than float32, the wrong context.

FLOAT0 = np.zeros((3,), jax.dtypes.float0)   # what jax.grad(allow_int=True) gives an int


def test_empty_and_float0_leaves_pass_through_and_send_nothing():
  # TernGrad (and ATOMO) used to fail on empty leaves with reduction errors naming no
  # leaf; the transform now keeps such leaves away from every codec.
  tx = jrelu.compress(compressors.terngrad(), key=jax.random.key(0), axis_name="data")

  def step(g):
    grads = {"empty": jnp.zeros((0, 4)), "steps": FLOAT0, "w": g}
    return tx.update(grads, tx.init(grads))[0]

  g = jax.random.normal(jax.random.key(1), (8, 16))
  compiled = jax.pmap(step, axis_name="data").lower(g).compile()
  updates = compiled(g)
  assert updates["empty"].shape == (8, 0, 4)
  assert updates["steps"].dtype == jax.dtypes.float0
  np.testing.assert_array_equal(updates["w"][3], updates["w"][0])
  # The program sends exactly what the "w" aggregation sends: nothing for the others.
  expected = jrelu.aggregation.wire_bits("two_phase", compressors.terngrad(), (16,), 8)
  assert jrelu.wire.parse(compiled.as_text()).sent_bits == expected


def test_error_feedback_residual_of_a_passed_through_leaf_stays_zero():
  tx = jrelu.error_feedback(compressors.top_k(2), key=jax.random.key(0))
  grads = {"empty": jnp.zeros((0,)), "steps": FLOAT0, "w": jnp.arange(1.0, 9.0)}
  params = {"empty": jnp.zeros((0,)), "steps": jnp.zeros((3,), jnp.int32),
            "w": jnp.zeros(8)}
  out, state = jax.jit(tx.update)(grads, tx.init(params))
  assert out["steps"].dtype == jax.dtypes.float0 and out["empty"].shape == (0,)
  np.testing.assert_array_equal(state.error["steps"], 0)
  np.testing.assert_array_equal(out["w"], [0, 0, 0, 0, 0, 0, 7, 8])   # top-2 of w


@pytest.mark.parametrize("make", [
    lambda: jrelu.qsgd(4, key=jax.random.key(0)),
    lambda: jrelu.error_feedback(compressors.top_k(1), key=jax.random.key(0))])
def test_integer_leaf_raises_naming_its_path(make):
  tx = make()
  grads = {"layer": {"count": jnp.arange(3), "w": jnp.ones(4)}}
  with pytest.raises(TypeError, match=r"int32 leaf at updates\['layer'\]\['count'\]"):
    tx.update(grads, tx.init(grads))


def test_pairing_that_sends_more_than_float32_warns_naming_the_cheaper_strategy():
  # ATOMO (budget 64) on a 64 x 10 leaf under all_gather: 168,000 bits per device at
  # N = 8 against 35,840 for the float32 all-reduce; two_phase sends 31,360.
  g = jnp.ones((8, 64, 10))

  def lower(tx):   # tracing is enough: the warning comes from the trace
    return jax.eval_shape(jax.pmap(lambda x: tx.update(x, tx.init(x))[0], axis_name="data"), g)

  atomo = jrelu.compress(compressors.atomo(64), key=jax.random.key(0), axis_name="data",
                         aggregation="all_gather")
  with pytest.warns(jrelu.WireCostWarning,
                    match=r"'all_gather' sends 168,000 bits .* float32 all-reduce \(35,840\); "
                          r"aggregation='two_phase' sends 31,360"):
    lower(atomo)
  with warnings.catch_warnings():
    warnings.simplefilter("error", jrelu.WireCostWarning)
    lower(jrelu.qsgd(4, key=jax.random.key(0), axis_name="data"))   # 7.4x fewer: silent


def test_compress_of_an_optax_transform_points_to_optax_chain():
  with pytest.raises(ValueError, match=r"GradientTransformation.*optax\.chain directly"):
    jrelu.compress(jrelu.powersgd.powersgd(2, key=jax.random.key(0)), key=jax.random.key(0))


@pytest.mark.parametrize("make", [
    lambda: jrelu.qsgd(4, key=jax.random.key(0), axis_name="data"),
    lambda: jrelu.powersgd.powersgd(1, key=jax.random.key(0), axis_name="data")])
def test_axis_name_outside_a_mapped_axis_says_what_to_do(make):
  tx = make()
  grads = jnp.ones((4, 4))
  with pytest.raises(NameError, match=r"inside jax\.pmap\(\.\.\., axis_name='data'\) or "
                                      r"jax\.shard_map.*axis_name=None"):
    tx.update(grads, tx.init(grads))


def test_library_and_binary_share_the_qsgd_defaults():
  codec = compressors.qsgd(4)
  binary = jrelu.experiment.make_codec(jrelu.experiment.Config(), 8)
  assert (codec.norm, codec.bucket_size) == (binary.norm, binary.bucket_size) == ("max", None)
  defaults = inspect.signature(jrelu.qsgd).parameters
  assert (defaults["norm"].default, defaults["bucket_size"].default) == ("max", None)
