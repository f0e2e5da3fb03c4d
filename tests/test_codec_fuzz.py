"""Hypothesis fuzz of every codec: awkward shapes, dtypes and values never break it.

For each drawn (codec, shape, dtype, values): ``decode(encode(key, x))`` keeps ``x``'s
shape and dtype and is finite wherever ``x`` is. Shapes: (), (0,), (1,), odd, 2-D;
dtypes: float16, bfloat16, float32; values: all zero, all equal, or a mix of zero,
ordinary, huge finite and subnormal entries of both signs.

"Huge" is ``finfo(dtype).max / (4 d)`` for ``d`` entries: far beyond ``2^64``, where a
float32 sum of squares overflows (the bug this test guards against), yet small enough
that every codec's estimate is representable. Their outputs are bounded by ``d max|x|``
at most: rand-k rescales by ``d / k <= d``; FO-SGD's decoded coordinates are at most
``sqrt(D) lam <= sqrt(D) sqrt(d) max|x| <= sqrt(2) d max|x|``; ATOMO's ``tau`` and SVD weights
are at most ``sum |x_i|``; the rest at most ``max|x|``.

Compilation is the cost: one jitted round trip per (codec, shape, dtype), cached, run on
a batch of four inputs; a few derandomized examples per codec, so the test is the same
on every run.
"""

import functools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrelu import aggregation
from jrelu import compressors
from jrelu.compressors import base
from test_compressor_contract import COMPRESSORS

FACTORIES = dict(COMPRESSORS)
SHAPES = [(), (0,), (1,), (7,), (3, 5)]
DTYPES = [jnp.float16, jnp.bfloat16, jnp.float32]
MAX_EXAMPLES = 2  # per codec: each example is one compilation


@functools.lru_cache(maxsize=None)
def roundtrip(name, shape, dtype):
  """The jitted round trip of codec ``name`` over a batch of inputs (one key each)."""
  del shape, dtype  # the cache key: jit compiles once per (codec, shape, dtype)
  codec = FACTORIES[name]()
  return jax.jit(jax.vmap(lambda key, x: codec(key, x)))


def huge(dtype, size):
  return float(jnp.finfo(dtype).max) / (4 * max(size, 1))


def special_values(dtype, size):
  return [0.0, 1.0, 0.37, huge(dtype, size), 3 * float(jnp.finfo(dtype).smallest_subnormal)]


def check(name, x):
  """Runs codec ``name`` on the batch ``x`` ``[B, *shape]``; checks shape, dtype, finite."""
  assert bool(jnp.all(jnp.isfinite(x.astype(jnp.float32))))
  keys = jax.random.split(jax.random.key(0), x.shape[0])
  out = roundtrip(name, x.shape[1:], jnp.dtype(x.dtype).name)(keys, x)
  assert out.shape == x.shape and out.dtype == x.dtype, (name, out.shape, out.dtype)
  finite = np.isfinite(np.asarray(out.astype(jnp.float32))).reshape(x.shape[0], -1)
  bad = np.nonzero(~finite.all(axis=1))[0]
  assert not bad.size, (name, x.shape[1:], jnp.dtype(x.dtype).name, np.asarray(x[bad[0]]),
                        np.asarray(out[bad[0]]))


def fixed_rows(dtype, size):
  """The inputs every compiled (codec, shape, dtype) runs: zero, equal, huge, subnormal."""
  rng = np.random.default_rng(size)
  signs = rng.choice([-1.0, 1.0], size)
  big, sub = huge(dtype, size), 3 * float(jnp.finfo(dtype).smallest_subnormal)
  return [np.zeros(size), np.full(size, 0.37), np.full(size, big), signs * big,
          signs * rng.choice([big, 1.0, 0.0, sub], size), signs * sub]


def draw_case(data, index):
  """A batch ``[8, *shape]`` for the codec at ``index``: the fixed rows and two drawn ones.

  The shape and dtype lists are rotated by ``index``: a derandomized run draws the same
  positions for every codec, so the rotation spreads the codecs over all of them.
  """
  shapes = SHAPES[index % len(SHAPES):] + SHAPES[:index % len(SHAPES)]
  dtypes = DTYPES[index % len(DTYPES):] + DTYPES[:index % len(DTYPES)]
  shape = data.draw(st.sampled_from(shapes))
  dtype = data.draw(st.sampled_from(dtypes))
  return batch(shape, dtype, [data.draw(drawn_row(dtype, shape)) for _ in range(2)])


def drawn_row(dtype, shape):
  size = int(np.prod(shape))
  value = st.sampled_from(special_values(dtype, size))
  return st.lists(st.tuples(value, st.sampled_from([1.0, -1.0])).map(lambda p: p[0] * p[1]),
                  min_size=size, max_size=size)


def batch(shape, dtype, drawn):
  size = int(np.prod(shape))
  rows = np.asarray(fixed_rows(dtype, size) + drawn, np.float64)
  return jnp.asarray(rows.reshape((len(rows),) + shape), jnp.float32).astype(dtype)


@pytest.mark.parametrize("name", sorted(FACTORIES))
@hypothesis.settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None,
                     database=None, suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(data=st.data())
def test_shape_dtype_and_finite(name, data):
  check(name, draw_case(data, sorted(FACTORIES).index(name)))


# The codecs with a sum of squares or of magnitudes inside (a norm, a mean, a standard
# deviation): the ones that overflowed for finite inputs.
REDUCING = ["fo_sgd", "qsgd_s1_l2", "qsgd_s4_bucket", "sign_scaled", "terngrad_clip"]


@pytest.mark.parametrize("name", REDUCING)
def test_huge_finite_float32(name):
  # float32 entries of 5.7e36 (huge(float32, 15)) and 1e20: a float32 sum of squares
  # overflows past 1.8e19. The fuzz may not draw float32 for every codec.
  # The scaled sign's mean |x| is representable even at float32's largest value, where
  # its sum overflowed; the others' norms are not (a norm of 15 such entries exceeds it).
  mixed = np.random.default_rng(0).choice([-1.0, 1.0, 1e-3, 0.0], 15)
  top = float(jnp.finfo(jnp.float32).max) if name == "sign_scaled" else 1e20
  check(name, batch((3, 5), jnp.float32, [1e20 * mixed, np.full(15, top)]))


def test_overflow_free_reductions_up_to_float32_max():
  # Eager and tiny: the scaled reductions at the float32 extremes, exact where the true
  # value is representable (the scaling is by a power of two, so no rounding is added).
  top = float(jnp.finfo(jnp.float32).max)
  x = jnp.array([top, -top, 0.0], jnp.float32)
  assert float(base.mean_abs(x)) == np.float32(2 * np.float64(top) / 3)
  assert float(base.std(jnp.array([top, -top]))) == np.float32(top)
  assert float(base.l2_norm(jnp.array([3e30, 4e30]))) == np.float32(5e30)
  assert float(base.l2_norm(jnp.array([top, 0.0]))) == np.float32(top)
  tiny = 3 * float(jnp.finfo(jnp.float32).smallest_subnormal)
  assert np.isfinite(float(base.l2_norm(jnp.array([tiny, -tiny]))))
  assert np.isnan(float(base.l2_norm(jnp.array([1.0, jnp.nan]))))
  assert float(base.l2_norm(jnp.array([1.0, -jnp.inf]))) == np.inf
  assert float(base.l2_norm(jnp.zeros(0))) == 0.0


def test_factories_bound_counts_by_int32():
  # Counts travel as int32 inside the jitted codecs; larger ones overflowed there.
  for factory, bad in ((lambda v: compressors.atomo(v), 2**31),
                       (lambda v: compressors.top_k(v), 2**31),
                       (lambda v: compressors.rand_k(v), 2**31),
                       (lambda v: compressors.qsgd(4, bucket_size=v), 2**31)):
    with pytest.raises(ValueError, match=f"in \\[1, 2147483647\\] .*got {bad}"):
      factory(bad)


def test_none_keeps_float64_under_x64():
  # The uncompressed baseline is exact: a float64 input is not rounded to float32.
  with jax.enable_x64(True):
    x = jnp.array([1 / 3, -2.0, 1e-300], jnp.float64)
    out = compressors.identity()(jax.random.key(0), x)
    assert out.dtype == jnp.float64
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))


def test_integer_psum_level_sums_fit_int32():
  # Sums of N offset levels reach 2 L N; past 2^31 they no longer fit an int32.
  assert aggregation.integer_psum_width(compressors.qsgd(2**24), 63) == 31
  with pytest.raises(ValueError, match="2 \\* 16777216 \\* 64 = 2147483648"):
    aggregation.integer_psum_width(compressors.qsgd(2**24), 64)
