"""The Compressor contract (jrelu/compressors/base.py), checked for every compressor.

Adding a compressor to the suite is one line in ``COMPRESSORS``; a name in
``jrelu.compressors.REGISTRY`` that no entry covers fails ``test_registry_is_covered``.
"""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jrelu import compressors
from jrelu import transforms

# (test id, zero-argument factory). One line per compressor configuration.
COMPRESSORS = [
    ("none", lambda: compressors.identity()),
    ("qsgd_s1_l2", lambda: compressors.qsgd(1, norm="l2")),
    ("qsgd_s4_bucket", lambda: compressors.qsgd(4, bucket_size=64)),
    ("qsgd_s16_max", lambda: compressors.qsgd(16, norm="max")),
    ("fo_sgd", lambda: compressors.fo_sgd()),
    ("fo_sgd_bound", lambda: compressors.fo_sgd().bind(jax.random.key(5))),
    ("top_k_10", lambda: compressors.top_k(10)),
    ("top_k_frac", lambda: compressors.top_k(fraction=0.1)),
    ("rand_k_10", lambda: compressors.rand_k(10)),
    ("rand_k_bound", lambda: compressors.rand_k(fraction=0.25).bind(jax.random.key(7))),
    ("sign", lambda: compressors.sign()),
    ("sign_scaled", lambda: compressors.sign(scaled=True)),
    ("terngrad", lambda: compressors.terngrad()),
    ("terngrad_clip", lambda: compressors.terngrad(clip_factor=2.5)),
    ("atomo_entry_8", lambda: compressors.atomo(8)),
    ("atomo_svd_2", lambda: compressors.atomo(2, atoms="svd")),
]

# Shapes: a matrix (spectral ATOMO takes its matrix path, QSGD's 64-bucket
# codec has two buckets, the packed words end mid-word) and one element (every count is
# clamped). The wire-bit formula also gets a long vector, where rounding of word and bucket
# counts is most varied.
SHAPES = [(7, 13), (1,)]
WIRE_SHAPES = [(1000,), (7, 13), (1,)]

params_compressors = pytest.mark.parametrize(
    "make", [factory for _, factory in COMPRESSORS], ids=[name for name, _ in COMPRESSORS])
shape_ids = lambda s: "x".join(map(str, s))  # noqa: E731
params_shapes = pytest.mark.parametrize("shape", SHAPES, ids=shape_ids)

# Unit roundoff of float32 and bfloat16: one rounding has relative error at most u.
U32 = 2.0 ** -24
UBF16 = 2.0 ** -9
# A bound on the chain of dependent float32 reductions between an input and any code leaf
# or decoded value, over all codecs: spectral ATOMO's SVD (the Gram products and
# orthonormalizations inside it), its water-filling tail sum and the decoding product
# U diag(w) V^T; every other codec has one (a norm, a mean, a water-filling tail sum) or
# none. (4 was derived for a codec with four chained products; it stays as a margin.)
MAX_REDUCTION_DEPTH = 4


def reorder_bound(num_terms, x, value):
  """Largest |jit - eager| (or |vmap - single|) a float leaf or output ``value`` may show.

  XLA may sum in another order under jit or vmap. A float32 sum of n terms is, in any
  order, within (n - 1) u sum_i |t_i| of the exact sum (Higham, "Accuracy and Stability of
  Numerical Algorithms", 2nd ed., eq. (4.4), to first order), so two orders differ by at
  most 2 (n - 1) u sum_i |t_i|. No reduction here has more than ``num_terms`` (the input's
  size) terms, and at most MAX_REDUCTION_DEPTH are chained, each passing its error on.
  sum_i |t_i| is at most max(max|value|, ||x||_2, 1): a same-sign sum (mean |x|, a
  water-filling tail) is bounded by the value it produces, and a norm's square root halves
  the relative error of its sum of squares, leaving (n - 1) u ||x||_2; and a product with
  orthonormal columns (ATOMO's U diag(w) V^T) is bounded by Cauchy-Schwarz by ||x||_2
  (times the weights, which are the leaf).
  """
  scale = max(float(np.max(np.abs(np.asarray(value, np.float32)), initial=0.0)),
              float(jnp.linalg.norm(jnp.asarray(x, jnp.float32))), 1.0)
  return MAX_REDUCTION_DEPTH * 2 * (num_terms - 1) * U32 * scale


def assert_close_after_reordering(actual, expected, x):
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  bound = reorder_bound(np.size(x), x, expected)
  np.testing.assert_allclose(actual, expected, rtol=0, atol=bound)


def generic(shape, seed=0, dtype=jnp.float32):
  """A generic input: normal values, mixed magnitudes, no exact zeros needed."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape) * rng.choice([0.1, 1.0, 5.0], size=shape)
  return jnp.asarray(x, jnp.float32).astype(dtype)


def assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def is_stochastic(c):
  """Whether the codec's output depends on its key (checked on a generic vector)."""
  x = generic((200,), seed=9)
  return not np.array_equal(np.asarray(c(jax.random.key(1), x)),
                            np.asarray(c(jax.random.key(2), x)))


# ----------------------------------------------------------------------------------------
# The suite covers the registry.


def test_ids_are_unique():
  names = [name for name, _ in COMPRESSORS]
  assert len(names) == len(set(names))


def test_registry_is_covered():
  covered = {factory().name for _, factory in COMPRESSORS}
  missing = set(compressors.REGISTRY) - covered
  assert not missing, f"REGISTRY names without a contract-test entry: {sorted(missing)}"


@params_compressors
def test_entry_is_a_compressor(make):
  c = make()
  assert isinstance(c, compressors.Compressor)
  assert isinstance(c.unbiased, bool)
  assert c.name in compressors.REGISTRY


# ----------------------------------------------------------------------------------------
# encode / decode / wire_bits.


def maps_zeros_to_zeros(c):
  """All codecs but the unscaled sign: one bit has no zero symbol, so sign(0) is a fair
  coin from the key (jrelu/compressors/_sign.py) and zeros decode to +-1."""
  return not (c.name == "sign" and not c.scaled)


@params_compressors
@pytest.mark.parametrize("shape,dtype", [((7, 13), jnp.bfloat16), ((1,), jnp.float32)],
                         ids=["7x13-bf16", "1-f32"])
def test_roundtrip_keeps_shape_and_dtype_and_is_a_function_of_the_key(make, shape, dtype):
  c = make()
  x = generic(shape, dtype=dtype)
  code = c.encode(jax.random.key(7), x)
  out = c.decode(code)
  assert out.shape == shape
  assert out.dtype == dtype
  assert np.all(np.isfinite(np.asarray(out, np.float32)))
  # Same key, same code and output; __call__ is decode(encode(...)).
  assert_trees_equal(c.encode(jax.random.key(7), x), code)
  assert_trees_equal(c(jax.random.key(7), x), out)


@params_compressors
@params_shapes
def test_zeros_give_zeros(make, shape):
  c = make()
  out = np.asarray(c(jax.random.key(0), jnp.zeros(shape, jnp.float32)))
  assert out.shape == shape
  assert np.all(np.isfinite(out))
  if maps_zeros_to_zeros(c):
    assert np.all(out == 0)
  else:
    assert set(np.unique(out).tolist()) <= {-1.0, 1.0}
    if out.size >= 91:
      # d fair coins all equal: probability 2^(1 - d) <= 2^-90 (fixed key: deterministic).
      assert set(np.unique(out).tolist()) == {-1.0, 1.0}


@params_compressors
@pytest.mark.parametrize("shape", WIRE_SHAPES, ids=shape_ids)
def test_wire_bits_equals_payload_bits(make, shape):
  c = make()
  # Code shapes are static (fixed-shape payloads), so tracing encode gives exactly the
  # payload a call produces, without compiling it.
  code = jax.eval_shape(c.encode, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))
  bits = c.wire_bits(shape)
  assert isinstance(bits, int)
  assert bits == compressors.payload_bits(code)
  assert bits > 0


@params_compressors
def test_encode_decode_under_jit(make):
  c = make()
  x = generic((7, 13), seed=2)
  key = jax.random.key(3)
  eager_code = c.encode(key, x)
  jit_code = jax.jit(c.encode)(key, x)
  assert jax.tree_util.tree_structure(jit_code) == jax.tree_util.tree_structure(eager_code)
  for a, b in zip(jax.tree_util.tree_leaves(jit_code), jax.tree_util.tree_leaves(eager_code)):
    assert a.shape == b.shape and a.dtype == b.dtype
    if jnp.issubdtype(a.dtype, jnp.integer):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same random draws
    else:
      assert_close_after_reordering(a, b, x)
  out = jax.jit(c.decode)(jit_code)
  assert out.shape == x.shape and out.dtype == x.dtype
  assert_close_after_reordering(out, c.decode(eager_code), x)


@params_compressors
def test_encode_decode_under_vmap(make):
  c = make()
  n = 5
  xs = generic((n, 40), seed=4)
  keys = jax.random.split(jax.random.key(5), n)
  codes = jax.vmap(c.encode)(keys, xs)
  outs = jax.vmap(c.decode)(codes)
  assert outs.shape == xs.shape and outs.dtype == xs.dtype
  single_fn = jax.jit(c.__call__)  # one compilation for the n single calls
  for i in range(n):
    single = single_fn(keys[i], xs[i])
    assert_close_after_reordering(outs[i], single, xs[i])
    # Each batch element's code has exactly the unbatched payload size.
    code_i = jax.tree_util.tree_map(lambda leaf: leaf[i], codes)
    assert compressors.payload_bits(code_i) == c.wire_bits((40,))


@params_compressors
def test_unbiased_mean(make):
  c = make()
  if not c.unbiased:
    pytest.skip("compressor does not claim to be unbiased")
  num_draws, d = 4000, 200
  x = generic((d,), seed=6)
  keys = jax.random.split(jax.random.key(8), num_draws)
  draws = np.asarray(jax.jit(jax.vmap(lambda k: c(k, x)))(keys), np.float64)
  x64 = np.asarray(x, np.float64)
  mse = float(np.mean(np.sum((draws - x64) ** 2, axis=1)))  # estimates E||C(x) - x||^2
  mean_err = float(np.sum((draws.mean(axis=0) - x64) ** 2))
  # If C is unbiased, mean - x has covariance Cov(C(x)) / K, so
  # E||mean - x||^2 = E||C(x) - x||^2 / K = mse / K. Near-Gaussian (CLT over K draws),
  # K ||mean - x||^2 / mse is sum_i w_i Z_i^2 with weights summing to 1, whose tail above
  # 36 is at most that of one chi-square(1) (P < 2e-9): the 6-sigma bound. mse itself is
  # known to a few percent at K = 4000. The last term is float32 rounding, the same in
  # every draw and so not averaged away: a decoded coordinate is x_i times factors
  # computed with one reduction over the d inputs (a norm or tail sum, relative error at
  # most (d - 1) u) and a few roundings more (scaling, division, cast: at most 4 u), so
  # the rounding bias is at most (d + 3) u |x_i| per coordinate.
  tol = 36.0 * mse / num_draws + ((d + 3) * U32) ** 2 * float(np.sum(x64**2))
  assert mean_err <= tol, (mean_err, tol)


# ----------------------------------------------------------------------------------------
# Inside optax.


def _leaf_keys(key, count, num_leaves):
  """The documented key schedule of transforms.compress with axis_name=None."""
  return jax.random.split(jax.random.fold_in(key, count), num_leaves)


@params_compressors
def test_in_optax_chain_under_jit(make):
  c = make()
  key = jax.random.key(0)
  tx = optax.chain(transforms.compress(c, key=key), optax.sgd(0.1))
  params = {"w": jnp.zeros((50,), jnp.float32), "b": jnp.zeros((3,), jnp.bfloat16)}
  state = tx.init(params)
  traces = []

  @jax.jit
  def step(grads, state, params):
    traces.append(1)  # Python side effect: runs once per trace, not per call
    return tx.update(grads, state, params)

  # Mixed dtypes: each leaf keeps its own.
  g1 = {"w": generic((50,), seed=10), "b": generic((3,), seed=11, dtype=jnp.bfloat16)}
  g2 = {"w": generic((50,), seed=12), "b": generic((3,), seed=13, dtype=jnp.bfloat16)}
  state0 = state
  u1, state = step(g1, state, params)
  state1 = state
  u2, state = step(g2, state, params)
  # The step count changes the noise: g1 again at count 1 differs from g1 at count 0
  # exactly when the codec is stochastic; the same state gives the same output.
  again = step(g1, state1, params)[0]
  assert_trees_equal(step(g1, state0, params)[0], u1)
  same = np.array_equal(np.asarray(again["w"]), np.asarray(u1["w"]))
  if is_stochastic(c):
    assert not same, "step 0 and step 1 drew the same noise"
  else:
    assert same, "a deterministic codec gave different outputs at different steps"

  assert len(traces) == 1, "later calls with the same shapes re-traced"
  if hasattr(step, "_cache_size"):  # private jax API (present in 0.10.2): one compilation
    assert step._cache_size() == 1
  for grads, updates, count in ((g1, u1, 0), (g2, u2, 1)):
    assert jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(grads)
    for name in grads:
      assert updates[name].shape == grads[name].shape
      assert updates[name].dtype == grads[name].dtype
    # updates = -0.1 * compressor(leaf key, grad), leaves in tree_flatten order (b, w).
    leaf_keys = _leaf_keys(key, count, 2)
    for k, name in zip(leaf_keys, sorted(grads)):
      eager = np.asarray(c(k, grads[name]), np.float32)
      # The jitted codec is within reorder_bound of the eager one in float32; a bfloat16
      # output may then round to the neighbouring bfloat16 value (2 u apart, relative).
      # optax multiplies by -0.1 in the leaf's dtype (one rounding, u of that dtype), and
      # 0.1 itself is rounded to float32 (U32).
      u = UBF16 if grads[name].dtype == jnp.bfloat16 else 0.0
      bound = 0.1 * (reorder_bound(grads[name].size, grads[name], eager)
                     + np.abs(eager) * (3 * u + 2 * U32))
      np.testing.assert_array_less(
          np.abs(np.asarray(updates[name], np.float32) - (-0.1) * eager), bound + 1e-30)
  assert int(state[0].count) == 2


def test_qsgd_step_noise_differs():
  # The stochastic case without relying on is_stochastic(): QSGD must differ across steps.
  tx = transforms.compress(compressors.qsgd(4, norm="l2"), key=jax.random.key(3), axis_name=None)
  grads = {"w": generic((50,), seed=20)}
  state0 = tx.init(grads)
  u0, state1 = tx.update(grads, state0)
  u1, _ = tx.update(grads, state1)
  assert not np.array_equal(np.asarray(u0["w"]), np.asarray(u1["w"]))
  # And both are unbiased-style estimates on the QSGD grid, not garbage.
  scale = float(jnp.linalg.norm(grads["w"]))
  for u in (u0, u1):
    k = np.asarray(u["w"]) * 4 / scale
    np.testing.assert_allclose(k, np.round(k), atol=1e-4)
