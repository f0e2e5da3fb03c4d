"""The codecs' random bits (jrelu.compressors.threefry) and their selection tools
(jrelu.compressors._select): exact where they are deterministic, statistical (fixed keys,
6-sigma tolerances) where they are random.
"""

import math

import jax
import jax.numpy as jnp
from jax.extend.random import threefry2x32_p
import numpy as np

from jrelu import compressors
from jrelu.compressors import _select
from jrelu.compressors import base
from jrelu.compressors import bitpack
from jrelu.compressors import threefry

import helpers


def test_threefry_is_jax_block_function():
  # Bit-identical to the primitive behind jax.random's default key, on random keys and
  # counters, below INLINE_MIN_BLOCKS (the primitive bound) and at it (the rounds written
  # out: they change where XLA computes the function, not what).
  rng = np.random.default_rng(0)
  for size in (500, threefry.INLINE_MIN_BLOCKS):
    k = rng.integers(0, 2**32, 2, dtype=np.uint32)
    x = rng.integers(0, 2**32, (2, size), dtype=np.uint32)
    expected = threefry2x32_p.bind(jnp.uint32(k[0]), jnp.uint32(k[1]), jnp.asarray(x[0]),
                                   jnp.asarray(x[1]))
    for form in (threefry.threefry2x32, threefry._rounds):  # as dispatched; written out
      got = jax.jit(form)(*(jnp.asarray(w) for w in (k[0], k[1], x[0], x[1])))
      for e, g in zip(expected, got):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(e))


def test_rows_at_once_and_by_column_are_the_same_words():
  # pack_fields computes aligned fields of small inputs on a [rows, per_row] view, and
  # large inputs one column at a time: the same uniforms and fields, the same words.
  # Widths 1 (8 blocks a row: the separately drawn uniforms) to 32, full and partial rows.
  key_pair = threefry.key_words(jax.random.key(2))
  cases = [(1, 33), (1, 96), (2, 37), (4, 40), (8, 13), (16, 6), (32, 3)]

  def field_of(bits):
    def field(v, u16, index):
      mask = np.uint32((1 << bits) - 1)
      return (v.astype(jnp.uint32) * np.uint32(40503) + u16 + index.astype(jnp.uint32)) & mask
    return field

  @jax.jit
  def run():
    out = []
    for bits, n in cases:
      values = jnp.arange(n, dtype=jnp.float32) * 3
      out.append((threefry._rows_at_once(key_pair, values, bits, field_of(bits)),
                  threefry._rows_by_column(key_pair, values, bits, field_of(bits))))
    return out

  for (bits, n), (at_once, by_column) in zip(cases, run()):
    assert at_once.shape == by_column.shape == (-(-n // (32 // bits)),), (bits, n)
    np.testing.assert_array_equal(np.asarray(at_once), np.asarray(by_column))


def test_bernoulli16_is_p_rounded_to_sixteen_bits():
  # Over all 2^16 values of u16 the fraction that fires is exactly round(p 2^16) / 2^16
  # (a tie rounds down), so |P - p| <= 2^-17: the bias bound the codecs' docstrings state.
  u16 = jnp.arange(2**16, dtype=jnp.uint32)
  ps = np.array([0.0, 2.0**-18, 2.0**-17, 3 * 2.0**-17, 0.1, 1 / 3, 0.5, 0.7071,
                 1 - 2.0**-17, 1 - 2.0**-18, 1.0], np.float32)
  fired = np.asarray(jax.jit(jax.vmap(lambda p: jnp.sum(threefry.bernoulli16(u16, p))))(
      jnp.asarray(ps)))
  for p, n in zip(ps.astype(np.float64), fired):
    scaled = p * 2**16
    assert n == math.ceil(scaled - 0.5), (p, n)
    assert abs(n / 2**16 - p) <= 2.0**-17
  assert fired[0] == 0 and fired[-1] == 2**16


def test_uniform_lanes_are_uniform_and_uncorrelated():
  # 4096 rows x 8 columns of 16-bit uniforms under 16 keys: 524,288 values. Each of the
  # 16 values of the top 4 bits has frequency 1/16 (binomial sd sqrt(p(1-p)/n)), and
  # the sample correlation between neighbours (same row: lanes of one block and of two
  # blocks; the next row; the same cell under the next key) has sd 1/sqrt(n): 6 sd each.
  rows, columns, keys = 4096, 8, 16

  def draw(key):
    return jnp.stack(threefry.uniform16_columns(threefry.key_words(key), rows, columns),
                     axis=1)

  u = np.asarray(jax.jit(jax.vmap(draw))(jax.random.split(jax.random.key(3), keys)))
  assert u.shape == (keys, rows, columns) and u.max() < 2**16
  n = u.size
  freq = np.bincount((u >> 12).ravel(), minlength=16) / n
  assert np.all(np.abs(freq - 1 / 16) <= 6 * math.sqrt((1 / 16) * (15 / 16) / n)), freq
  z = (u.astype(np.float64) + 0.5) / 2**16 - 0.5
  for a, b in ((z[:, :, 0], z[:, :, 1]), (z[:, :, 3], z[:, :, 4]),
               (z[:, :-1, :], z[:, 1:, :]), (z[:-1], z[1:])):
    corr = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    assert abs(corr) <= 6 / math.sqrt(a.size), corr


def test_pack_fields_is_pack_of_its_fields():
  # Aligned widths pack a row per word, the others rows of bitpack.row_size fields; both
  # give bitpack.pack's layout, with zero padding. (One program for all five cases.)
  cases = [(2, 37), (4, 40), (3, 70), (1, 33), (6, 17)]
  key_pair = threefry.key_words(jax.random.key(1))

  def field_of(bits):
    def field(v, u16, index):  # depends on the value, the uniform and the position
      mask = (1 << bits) - 1
      return (v.astype(jnp.uint32) + (u16 >> 8) + index.astype(jnp.uint32)) & mask
    return field

  @jax.jit
  def run():
    out = []
    for bits, n in cases:
      values = jnp.arange(n, dtype=jnp.float32)
      out.append((threefry.pack_fields(key_pair, values, bits, field_of(bits)),
                  threefry.unpacked_fields(key_pair, values, bits, field_of(bits))))
    return out

  for (bits, n), (words, fields) in zip(cases, run()):
    assert words.shape == (bitpack.packed_words(n, bits),)
    np.testing.assert_array_equal(np.asarray(words),
                                  np.asarray(helpers.pack(fields, bits)))


def test_a_round_trip_computes_each_word_once():
  # base.materialize keeps the packed words out of the decoder's loop: the compiled round
  # trip of QSGD holds the words as a buffer of their own (a scatter), instead of one
  # loop that recomputes a word, random draws included, for each of its 8 fields.
  c = compressors.qsgd(4)
  hlo = jax.jit(lambda k, x: c.decode(c.encode(k, x))).lower(
      jax.random.key(0), jnp.ones(4096)).compile().as_text()
  assert "scatter" in hlo
  words = 4096 // 8
  assert f"u32[{words}]" in hlo
  np.testing.assert_array_equal(np.asarray(base.materialize(jnp.arange(5.0))),
                                np.arange(5.0))


def test_select_bit_and_set_positions_match_numpy():
  rng = np.random.default_rng(4)
  words = rng.integers(0, 2**32, 64, dtype=np.uint32)
  words[:3] = [0xFFFFFFFF, 1 << 31, 1]
  bits = (words[:, None] >> np.arange(32, dtype=np.uint32)) & 1
  ranks = np.array([rng.integers(0, max(int(b.sum()), 1)) for b in bits], np.int32)
  got = np.asarray(jax.jit(_select.select_bit)(words, ranks))
  for w, (b, r) in enumerate(zip(bits, ranks)):
    if b.sum():
      assert got[w] == np.flatnonzero(b)[r]
  for density in (0.0, 0.02, 0.5, 1.0):
    mask = rng.random(1000) < density
    stream = bitpack.pack(jnp.asarray(mask), 1)
    for capacity in (1, 25, 1100):
      positions, count = jax.jit(_select.set_positions, static_argnums=1)(stream, capacity)
      expected = np.flatnonzero(mask)[:capacity]
      assert int(count) == mask.sum()
      np.testing.assert_array_equal(np.asarray(positions)[:len(expected)], expected)
      assert np.all(np.asarray(positions)[len(expected):] == -1)
