"""Tests of jrelu.compressors.bitpack: dense packing of small unsigned ints into uint32."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jrelu.compressors import bitpack

import helpers

# JAX compiles each new (n, bits) shape, so examples are slow-ish: keep the count modest
# and switch the per-example deadline off. derandomize makes every run draw the same
# examples (a deterministic test suite); the properties are exact, so no example is flaky.
# Every width 1..32 is also checked explicitly below, so the drawn examples add variety in
# n and values rather than coverage of widths.
PROPERTY_SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
# pack / unpack compiled once per (n, bits) rather than op by op (eager JAX compiles every
# primitive); test_compressor_contract's jit-vs-eager test runs them eagerly in the codecs.
_pack = jax.jit(bitpack.pack, static_argnums=1)


@st.composite
def bits_and_values(draw, max_n=300):
  """A field width in [1, 32] and a uint32 array of n in [0, max_n] values < 2**bits."""
  bits = draw(st.integers(1, 32))
  n = draw(st.integers(0, max_n))
  values = draw(hnp.arrays(np.uint32, n, elements=st.integers(0, 2**bits - 1)))
  return bits, values


def reference_pack(values, bits):
  """The documented layout, written with Python big integers (an independent oracle).

  Value i occupies stream bits [i * bits, (i + 1) * bits); stream bit j is bit j % 32 of
  word j // 32; the word count is ceil(n * bits / 32).
  """
  stream = 0
  for i, v in enumerate(values):
    stream |= int(v) << (i * bits)
  num_words = (len(values) * bits + 31) // 32
  return np.array([(stream >> (32 * w)) & 0xFFFFFFFF for w in range(num_words)],
                  dtype=np.uint32)


def check_layout_and_roundtrip(bits, values):
  words = _pack(values, bits)
  words_np = np.asarray(words)
  assert words_np.dtype == np.uint32
  assert words_np.shape == (bitpack.packed_words(values.shape[0], bits),)
  np.testing.assert_array_equal(words_np, reference_pack(values, bits))
  out = np.asarray(helpers.unpack(words, bits, values.shape[0]))
  assert out.dtype == np.uint32
  np.testing.assert_array_equal(out, values)


@PROPERTY_SETTINGS
@given(bits_and_values())
def test_pack_layout_and_unpack_roundtrip(case):
  # One test for both properties: each example costs a JAX compilation per shape.
  check_layout_and_roundtrip(*case)


def test_every_width_with_fields_across_word_boundaries():
  # n = 67 fields of every width: 67 * bits is a multiple of 32 only for bits = 32, so
  # every other width has fields straddling words and a partial last word; values are
  # drawn over the whole range [0, 2**bits), extremes included.
  rng = np.random.default_rng(0)
  for bits in range(1, 33):
    values = rng.integers(0, 2**bits, size=67, dtype=np.uint64).astype(np.uint32)
    values[:2] = [0, 2**bits - 1]
    check_layout_and_roundtrip(bits, values)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.integers(0, 10**7), st.integers(1, 32))
def test_packed_words_is_ceil_of_total_bits_over_32(n, bits):
  # Exact integer ceiling, independent of the library's expression.
  expected = n * bits // 32 + (1 if n * bits % 32 else 0)
  assert bitpack.packed_words(n, bits) == expected


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 7, 8, 13, 16, 31, 32])
@pytest.mark.parametrize("n", [0, 1, 31, 32, 33, 100, 257])
def test_pack_shape_and_dtype(n, bits):
  # Shapes and dtypes are static: tracing pack (no compilation) gives them exactly; the
  # values are checked by the layout tests above.
  words = jax.eval_shape(lambda v: bitpack.pack(v, bits), jax.ShapeDtypeStruct((n,), np.uint32))
  assert words.dtype == np.uint32
  assert words.shape == (-(-n * bits // 32),)


def test_tiny_exact_example():
  # Fields of 2 bits, first value in the lowest bits: 0b11_10_01.
  np.testing.assert_array_equal(
      np.asarray(_pack(np.array([1, 2, 3], np.uint32), 2)),
      np.array([0b111001], np.uint32))
  np.testing.assert_array_equal(
      np.asarray(helpers.unpack(np.array([0b111001], np.uint32), 2, 3)),
      np.array([1, 2, 3], np.uint32))


def test_value_straddling_two_words():
  # 3-bit fields: the value 0b101 at index 10 occupies stream bits 30..32, i.e. bits 30
  # and 31 of word 0 (values 1 and 0) and bit 0 of word 1 (value 1).
  values = np.zeros(11, np.uint32)
  values[10] = 0b101
  words = np.asarray(_pack(values, 3))
  np.testing.assert_array_equal(words, np.array([1 << 30, 1], np.uint32))
  np.testing.assert_array_equal(np.asarray(helpers.unpack(words, 3, 11)), values)


def test_full_width_values_survive():
  values = np.array([0xFFFFFFFF, 0, 2**31, 2**31 - 1, 12345], np.uint32)
  words = _pack(values, 32)
  np.testing.assert_array_equal(np.asarray(words), values)
  np.testing.assert_array_equal(np.asarray(helpers.unpack(words, 32, 5)), values)


@pytest.mark.parametrize("bits", [1, 3, 4, 7, 16, 31])
def test_bits_above_the_field_are_masked(bits):
  # Documented: higher bits are masked off rather than checked.
  rng = np.random.default_rng(bits)
  values = rng.integers(0, 2**bits, size=50, dtype=np.uint64).astype(np.uint32)
  dirty = values | np.uint32(1 << bits)
  np.testing.assert_array_equal(np.asarray(_pack(dirty, bits)),
                                np.asarray(_pack(values, bits)))


@pytest.mark.parametrize("num_symbols, expected",
                         [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (9, 4), (16, 4), (17, 5),
                          (33, 6), (2**32, 32)])
def test_bits_for(num_symbols, expected):
  assert bitpack.bits_for(num_symbols) == expected


@pytest.mark.parametrize("num_symbols", [0, -1])
def test_bits_for_rejects_nonpositive(num_symbols):
  with pytest.raises(ValueError, match=str(num_symbols)):
    bitpack.bits_for(num_symbols)


@pytest.mark.parametrize("bits", [0, 33, -1])
def test_bad_bits_raise(bits):
  values = np.zeros(4, np.uint32)
  with pytest.raises(ValueError, match=str(bits)):
    bitpack.pack(values, bits)
  with pytest.raises(ValueError, match=str(bits)):
    bitpack.unpack(np.zeros(1, np.uint32), bits, 4)
  with pytest.raises(ValueError, match=str(bits)):
    bitpack.packed_words(4, bits)


def test_negative_num_values_raises():
  with pytest.raises(ValueError, match="-3"):
    bitpack.packed_words(-3, 4)


def test_pack_rejects_non_1d():
  with pytest.raises(ValueError):
    bitpack.pack(np.zeros((2, 3), np.uint32), 4)


def test_unpack_rejects_wrong_word_count():
  words = np.zeros(3, np.uint32)  # 10 fields of 4 bits need 2 words
  with pytest.raises(ValueError):
    bitpack.unpack(words, 4, 10)
