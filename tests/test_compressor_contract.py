"""The Compressor contract (jrelu/compressors/base.py), checked for every compressor.

Adding a compressor to the suite is one line in ``COMPRESSORS``; a name in
``jrelu.compressors.REGISTRY`` that no entry covers fails ``test_registry_is_covered``.
"""


import functools

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

# The wire-bit formula gets a long vector, where rounding of word and bucket counts is
# most varied, besides the probe's shapes (below).
WIRE_SHAPES = [(1000,), (7, 13), (1,)]

NAMES = [name for name, _ in COMPRESSORS]
FACTORIES = dict(COMPRESSORS)
# Each codec's tests go to one pytest-xdist worker (``--dist loadgroup``), which compiles
# its probe (below) once.
params_compressors = pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.xdist_group(f"contract.{name}")) for name in NAMES])
shape_ids = lambda s: "x".join(map(str, s))  # noqa: E731

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


# The inputs the probe encodes, by test id: a matrix in bfloat16 and in float32 (spectral
# ATOMO takes its matrix path, QSGD's 64-bucket codec has two buckets, the packed words end
# mid-word), one element (every count is clamped), and zeros of both shapes.
PROBE_INPUTS = {
    "7x13-bf16": generic((7, 13), dtype=jnp.bfloat16),
    "7x13-f32": generic((7, 13), seed=2),
    "1-f32": generic((1,)),
    "zeros-7x13": jnp.zeros((7, 13), jnp.float32),
    "zeros-1": jnp.zeros((1,), jnp.float32),
}
VMAP_SIZE, VMAP_DIM = 5, 40
VMAP_INPUTS = generic((VMAP_SIZE, VMAP_DIM), seed=4)
PROBE_SEED = 7
PROBE_KEY = jax.random.key(PROBE_SEED)


@functools.cache
def _probe_program(name):
  """The compiled program :func:`probe` runs for one codec (one compilation per codec)."""
  c = FACTORIES[name]()

  @jax.jit
  def run(key):
    out = {}
    for input_id, x in PROBE_INPUTS.items():
      code = c.encode(key, x)
      out[input_id] = (code, c.decode(code))
    out["called"] = c(key, PROBE_INPUTS["7x13-f32"])
    keys = jax.random.split(jax.random.fold_in(key, 1), VMAP_SIZE)
    codes = jax.vmap(c.encode)(keys, VMAP_INPUTS)
    singles = jax.lax.map(lambda kx: c(*kx), (keys, VMAP_INPUTS))
    out["vmap"] = (codes, jax.vmap(c.decode)(codes), singles)
    return out

  return run


@functools.cache
def probe(name, seed=PROBE_SEED):
  """What the contract tests read of one codec, computed by one compiled program.

  Compiling every property's call separately (or running them eagerly, which compiles each
  primitive on its own) was most of this file's time. Returns a dict: for each input id,
  ``(code, decode(code))`` with ``key = jax.random.key(seed)``; ``"called"``: the codec
  called on the float32 matrix; and
  ``"vmap"``: ``(codes, outs, singles)`` of ``VMAP_SIZE`` inputs of ``VMAP_DIM`` encoded
  under ``jax.vmap`` and, one at a time, under ``jax.lax.map`` (a loop whose body is the
  unbatched codec).
  """
  return jax.device_get(_probe_program(name)(jax.random.key(seed)))


def is_stochastic(name):
  """Whether the codec's output depends on its key (checked on the generic vectors)."""
  a, b = (probe(name, seed)["vmap"][2] for seed in (PROBE_SEED, PROBE_SEED + 1))
  return not np.array_equal(a, b)


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
def test_entry_is_a_compressor(name):
  c = FACTORIES[name]()
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
@pytest.mark.parametrize("input_id", ["7x13-bf16", "7x13-f32", "1-f32"])
def test_roundtrip_keeps_shape_and_dtype(name, input_id):
  x = PROBE_INPUTS[input_id]
  code, out = probe(name)[input_id]
  assert out.shape == x.shape
  assert out.dtype == x.dtype
  assert np.all(np.isfinite(np.asarray(out, np.float32)))
  # That the code is a function of the key alone (the same draws in another program) is
  # test_encode_decode_under_jit's integer-leaf check.


@params_compressors
def test_call_is_decode_of_encode(name):
  _, out = probe(name)["7x13-f32"]
  # Up to the order XLA sums in when it fuses the two differently.
  assert_close_after_reordering(probe(name)["called"], out, PROBE_INPUTS["7x13-f32"])


@params_compressors
@pytest.mark.parametrize("input_id", ["zeros-7x13", "zeros-1"])
def test_zeros_give_zeros(name, input_id):
  c = FACTORIES[name]()
  out = np.asarray(probe(name)[input_id][1])
  assert out.shape == PROBE_INPUTS[input_id].shape
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
def test_wire_bits_equals_payload_bits(name, shape):
  c = FACTORIES[name]()
  # Code shapes are static (fixed-shape payloads), so tracing encode gives exactly the
  # payload a call produces, without compiling it.
  code = jax.eval_shape(c.encode, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))
  bits = c.wire_bits(shape)
  assert isinstance(bits, int)
  assert bits == compressors.payload_bits(code)
  assert bits > 0


@params_compressors
def test_encode_decode_under_jit(name):
  # Eager (op by op) against the probe's compiled program.
  c = FACTORIES[name]()
  x = PROBE_INPUTS["7x13-f32"]
  jit_code, jit_out = probe(name)["7x13-f32"]
  eager_code = c.encode(PROBE_KEY, x)
  assert jax.tree_util.tree_structure(jit_code) == jax.tree_util.tree_structure(eager_code)
  for a, b in zip(jax.tree_util.tree_leaves(jit_code), jax.tree_util.tree_leaves(eager_code)):
    assert a.shape == b.shape and a.dtype == b.dtype
    if jnp.issubdtype(a.dtype, jnp.integer):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same random draws
    else:
      assert_close_after_reordering(a, b, x)
  assert jit_out.shape == x.shape and jit_out.dtype == x.dtype
  assert_close_after_reordering(jit_out, c.decode(eager_code), x)


@params_compressors
def test_encode_decode_under_vmap(name):
  c = FACTORIES[name]()
  codes, outs, singles = probe(name)["vmap"]
  assert outs.shape == VMAP_INPUTS.shape and outs.dtype == VMAP_INPUTS.dtype
  for i in range(VMAP_SIZE):
    assert_close_after_reordering(outs[i], singles[i], VMAP_INPUTS[i])
    # Each batch element's code has exactly the unbatched payload size.
    code_i = jax.tree_util.tree_map(lambda leaf: leaf[i], codes)
    assert compressors.payload_bits(code_i) == c.wire_bits((VMAP_DIM,))


@params_compressors
def test_unbiased_mean(name):
  c = FACTORIES[name]()
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
def test_in_optax_chain_under_jit(name):
  c = FACTORIES[name]()
  key = jax.random.key(0)
  tx = optax.chain(transforms.compress(c, key=key), optax.sgd(0.1))
  params = {"w": jnp.zeros((50,), jnp.float32), "b": jnp.zeros((3,), jnp.bfloat16)}
  state = tx.init(params)
  traces = []

  @jax.jit
  def step(grads, state, params):
    """The update, and what the documented key schedule says it is, in one program."""
    traces.append(1)  # Python side effect: runs once per trace, not per call
    # updates = -0.1 * compressor(leaf key, grad), leaves in tree_flatten order (b, w).
    leaf_keys = _leaf_keys(key, state[0].count, 2)
    expected = {leaf: c(k, grads[leaf]) for k, leaf in zip(leaf_keys, sorted(grads))}
    return tx.update(grads, state, params) + (expected,)

  # Mixed dtypes: each leaf keeps its own.
  g1 = {"w": generic((50,), seed=10), "b": generic((3,), seed=11, dtype=jnp.bfloat16)}
  g2 = {"w": generic((50,), seed=12), "b": generic((3,), seed=13, dtype=jnp.bfloat16)}
  state0 = state
  u1, state, e1 = step(g1, state, params)
  state1 = state
  u2, state, e2 = step(g2, state, params)
  # The step count changes the noise: g1 again at count 1 differs from g1 at count 0
  # exactly when the codec is stochastic; the same state gives the same output.
  again = step(g1, state1, params)[0]
  assert_trees_equal(step(g1, state0, params)[0], u1)
  same = np.array_equal(np.asarray(again["w"]), np.asarray(u1["w"]))
  if is_stochastic(name):
    assert not same, "step 0 and step 1 drew the same noise"
  else:
    assert same, "a deterministic codec gave different outputs at different steps"

  assert len(traces) == 1, "later calls with the same shapes re-traced"
  if hasattr(step, "_cache_size"):  # private jax API (present in 0.10.2): one compilation
    assert step._cache_size() == 1
  for grads, updates, expected in ((g1, u1, e1), (g2, u2, e2)):
    assert jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(grads)
    for leaf in grads:
      assert updates[leaf].shape == grads[leaf].shape
      assert updates[leaf].dtype == grads[leaf].dtype
      codec_out = np.asarray(expected[leaf], np.float32)
      # The codec inside the transform and beside it may sum in other orders (within
      # reorder_bound in float32); a bfloat16 output may then round to the neighbouring
      # bfloat16 value (2 u apart, relative). optax multiplies by -0.1 in the leaf's dtype
      # (one rounding, u of that dtype), and 0.1 itself is rounded to float32 (U32).
      u = UBF16 if grads[leaf].dtype == jnp.bfloat16 else 0.0
      bound = 0.1 * (reorder_bound(grads[leaf].size, grads[leaf], codec_out)
                     + np.abs(codec_out) * (3 * u + 2 * U32))
      np.testing.assert_array_less(
          np.abs(np.asarray(updates[leaf], np.float32) - (-0.1) * codec_out), bound + 1e-30)
  assert int(state[0].count) == 2


def test_qsgd_step_noise_differs():
  # The stochastic case without relying on is_stochastic(): QSGD must differ across steps.
  tx = transforms.compress(compressors.qsgd(4, norm="l2"), key=jax.random.key(3), axis_name=None)
  grads = {"w": generic((50,), seed=20)}
  state0 = tx.init(grads)
  update = jax.jit(tx.update)  # one program (eagerly, each primitive compiles on its own)
  u0, state1 = update(grads, state0)
  u1, _ = update(grads, state1)
  assert not np.array_equal(np.asarray(u0["w"]), np.asarray(u1["w"]))
  # And both are unbiased-style estimates on the QSGD grid, not garbage.
  scale = float(jnp.linalg.norm(grads["w"]))
  for u in (u0, u1):
    k = np.asarray(u["w"]) * 4 / scale
    np.testing.assert_allclose(k, np.round(k), atol=1e-4)
