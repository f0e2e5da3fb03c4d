"""Random bits for the codecs, computed inside their fused loops: Threefry-2x32, inlined.

A stochastic codec needs a few random bits per coordinate: a coin for signSGD's exact
zeros (1 bit), a rounding decision for QSGD and TernGrad, a dither for FO-SGD. On XLA CPU,
``jax.random.bits`` lowers Threefry-2x32 to a loop of five iterations over whole arrays
(every iteration writes and reads arrays of the full size) and spends one 64-bit Threefry
block per 32-bit word: about 32 M words per second on one core, which made drawing one
uniform per coordinate most of the cost of QSGD, TernGrad and sign at d = 1e7.

This module evaluates the same function, Threefry-2x32 with 20 rounds (Salmon, Moraes,
Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011), the block function
behind ``jax.random``'s default key, written out round by round in ``jax.numpy``: XLA
fuses it into the loop that consumes the bits, and each block's 64 bits are split into
four 16-bit uniforms (or two 32-bit words) instead of being folded into one word. Its
output is bit-identical to ``jax.extend.random.threefry2x32_p`` (tested), so the bits
are as good as ``jax.random``'s: only the counters and the split differ.

Written-out rounds make a program several times larger and slower to compile, which pays
only where the arrays are large. Small inputs (the tests, the planted ReLU at d = 1000)
therefore get the compact form of the same computation: fewer than
``INLINE_MIN_BLOCKS`` blocks bind the primitive itself, and fewer than
``UNROLL_MIN_VALUES`` values are packed on a ``[rows, per_row]`` view at once instead of
one column at a time. Either way a key gives the same words, bit for bit (tested).

Counters: a codec that works on ``rows`` rows of ``group`` coordinates (see
``bitpack.columns``) uses block ``(row, j)`` for its ``j``-th four columns; every
``(row, j)`` is a distinct counter, so every 16-bit lane of a call is a fresh uniform.
The 64-bit Threefry key comes from the codec's JAX key through ``jax.random.bits(key,
(2,))`` (:func:`key_words`), so any key implementation works and the stream of a key is
independent of the streams of its splits and fold-ins, as for any ``jax.random`` draw.

Sixteen bits per decision: ``u = (m + 1/2) 2^-16`` with ``m`` uniform on ``{0, ...,
2^16 - 1}`` takes ``2^16`` equally likely values, and ``P(u < p)`` is ``p`` rounded to
the nearest multiple of ``2^-16`` (:func:`bernoulli16`), within ``2^-17`` of ``p`` for
every ``p`` in ``[0, 1]``; it is exactly 0 for ``p = 0`` and exactly 1 for ``p = 1``.
A codec that rounds up with probability ``p`` therefore has a bias of at most ``2^-17``
of the step it rounds by (float32 uniforms, ``jax.random.uniform``, carry ``2^-24``).
"""

from __future__ import annotations

import math

import jax
from jax.extend.random import threefry2x32_p
import jax.numpy as jnp
import numpy as np

from jrelu.compressors import base
from jrelu.compressors import bitpack

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)
LANE_BITS = 16
LANES_PER_BLOCK = 4  # 64 bits per Threefry-2x32 block, 16 per uniform


def key_words(key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The 64-bit Threefry key of a codec's JAX key: two uint32 scalars.

  Args:
    key: a typed PRNG key (any implementation) or a raw ``uint32[2]`` key.

  Returns:
    ``(k0, k1)``, uint32 scalars: ``jax.random.bits(key, (2,), uint32)``.

  Example:
    >>> k0, k1 = key_words(jax.random.key(0))
  """
  words = jax.random.bits(key, (2,), jnp.uint32)
  return words[0], words[1]


def _rotate_left(x, r):
  return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


# Below this many blocks, :func:`threefry2x32` binds JAX's own Threefry primitive: a
# compact program (on CPU a loop of five iterations over the arrays) that is cheap to
# compile and fast enough at that size. From it on, the rounds are written out so that XLA
# fuses them into the loop that consumes them (about 20x the primitive's rate at d = 1e7
# on the 2-core development VM), at the price of a program several times larger.
INLINE_MIN_BLOCKS = 1 << 14


def threefry2x32(k0, k1, x0, x1):
  """The Threefry-2x32 block function with 20 rounds, fused into its consumer when large.

  Small inputs (fewer than ``INLINE_MIN_BLOCKS`` blocks) bind
  ``jax.extend.random.threefry2x32_p``; larger ones evaluate the rounds written out in
  ``jax.numpy``, which gives the same words bit for bit (tested) in a loop XLA fuses.

  Args:
    k0, k1: uint32 key words (scalars or arrays that broadcast with the counters).
    x0, x1: uint32 counter words (arrays of one shape, or broadcastable).

  Returns:
    ``(y0, y1)``, uint32 of the broadcast shape: the values of
    ``jax.extend.random.threefry2x32_p``.

  Example:
    >>> y0, y1 = threefry2x32(jnp.uint32(0), jnp.uint32(0), jnp.arange(4, dtype=jnp.uint32),
    ...                       jnp.zeros(4, jnp.uint32))

  References:
    Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011.
  """
  words = [jnp.asarray(w, jnp.uint32) for w in (k0, k1, x0, x1)]
  shape = jnp.broadcast_shapes(*(w.shape for w in words))
  if math.prod(shape) >= INLINE_MIN_BLOCKS:
    return _rounds(*words)
  y0, y1 = threefry2x32_p.bind(*(jnp.broadcast_to(w, shape) for w in words))
  return y0, y1


def _rounds(k0, k1, x0, x1):
  """Threefry-2x32's 20 rounds written out (uint32 arrays that broadcast)."""
  keys = (k0, k1, k0 ^ k1 ^ _PARITY)
  x0 = x0 + keys[0]
  x1 = x1 + keys[1]
  for i in range(5):
    for r in _ROTATIONS[i % 2]:
      x0 = x0 + x1
      x1 = _rotate_left(x1, r) ^ x0
    x0 = x0 + keys[(i + 1) % 3]
    x1 = x1 + keys[(i + 2) % 3] + np.uint32(i + 1)
  return x0, x1


def _lanes(y0, y1):
  """The four 16-bit lanes of a block's two words."""
  mask = np.uint32(0xFFFF)
  return [y0 & mask, y0 >> np.uint32(16), y1 & mask, y1 >> np.uint32(16)]


def uniform16_columns(key_pair, rows: int, count: int) -> list[jax.Array]:
  """``count`` columns of independent 16-bit uniforms, each uint32 ``[rows]`` in ``[0, 2^16)``.

  Column ``c`` of row ``r`` is lane ``c % 4`` of block ``(r, c // 4)``: one Threefry block
  per four columns, computed once per row inside the consumer's loop.

  Args:
    key_pair: ``(k0, k1)`` from :func:`key_words`.
    rows: number of rows.
    count: number of columns.

  Returns:
    A list of ``count`` uint32 arrays ``[rows]``.
  """
  k0, k1 = key_pair
  row = jax.lax.iota(jnp.uint32, rows)
  out = []
  for j in range(-(-count // LANES_PER_BLOCK)):
    out += _lanes(*threefry2x32(k0, k1, row, jnp.full((rows,), j, jnp.uint32)))
  return out[:count]


def bernoulli16(u16: jax.Array, p: jax.Array) -> jax.Array:
  """``u < p`` with ``u = (u16 + 1/2) 2^-16``: True with probability ``p`` to within ``2^-17``.

  Exact arithmetic in float32 (``u16 + 1/2`` has 17 significant bits, the scaling is a
  power of two). For ``u16`` uniform on ``{0, ..., 2^16 - 1}``, ``P(True)`` is
  ``round(p 2^16) / 2^16`` (ties to the lower count): 0 for ``p <= 2^-17``, 1 for
  ``p > 1 - 2^-17``, and ``|P(True) - p| <= 2^-17`` for every ``p`` in ``[0, 1]``.

  Args:
    u16: uint32 array of values in ``[0, 2^16)``.
    p: float32 probabilities (NaN gives False).

  Returns:
    bool array of the broadcast shape.
  """
  u = (u16.astype(jnp.float32) + np.float32(0.5)) * np.float32(2.0 ** -LANE_BITS)
  return u < p


# Above this many Threefry blocks per row, a row's uniforms are drawn in a loop of their
# own and written to memory (2 bytes per coordinate) before the fields are computed:
# inlining 8 blocks per row (32 one-bit fields) makes programs slow to compile.
MAX_INLINE_BLOCKS = 4


def _row_layout(bits: int) -> tuple[int, bool]:
  """``(fields per row, aligned)``: a row is one word when ``bits`` divides 32 (aligned),
  else ``bitpack.row_size(bits)`` fields that are packed as one wider value."""
  if 32 % bits == 0:
    return 32 // bits, True
  return bitpack.row_size(bits), False


# From this many values on, :func:`_rows` computes a row's fields one column at a time,
# each column a copy of the field function in the program: the fastest loop at scale
# (QSGD encode + decode at d = 1e7 ran 2.2x faster than the [rows, per_row] form on the
# 2-core development VM), but a program 1.6 to 3.6x larger and slower to compile.
# Below it, aligned fields are computed on a [rows, per_row] view at once. Both give the
# same words, bit for bit (tested).
UNROLL_MIN_VALUES = 1 << 16


def numbered_blocks(key_pair, count: int):
  """Threefry-2x32 output of blocks ``0, 1, ..., count - 1``: counter ``(j, 0)`` for block
  ``j``, the layout of draws made by a loop of their own (sign's coins, and the rows of
  :func:`pack_fields` that need more than ``MAX_INLINE_BLOCKS`` blocks).

  Args:
    key_pair: ``(k0, k1)`` from :func:`key_words`.
    count: number of blocks (static).

  Returns:
    ``(y0, y1)``: uint32 ``[count]`` each, 64 random bits per block.

  Example:
    >>> y0, y1 = numbered_blocks(key_words(jax.random.key(0)), 3)
    >>> y0.shape, y1.dtype
    ((3,), dtype('uint32'))

  References:
    Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011.
  """
  counter = jax.lax.iota(jnp.uint32, count)
  return threefry2x32(key_pair[0], key_pair[1], counter, jnp.zeros_like(counter))


def coin_words(key_pair, num_words: int) -> jax.Array:
  """uint32 ``[num_words]`` of fair, independent coins, 32 per word: the two words of
  block ``j`` of :func:`numbered_blocks` are words ``2 j`` and ``2 j + 1``. Written to
  memory once (``base.materialize``), so a consumer reading each word once per bit does
  not recompute the block function.

  Args:
    key_pair: ``(k0, k1)`` from :func:`key_words`.
    num_words: number of words (static).

  Returns:
    uint32 ``[num_words]``; bit ``b`` of word ``w`` is coin ``32 w + b``.

  Example:
    >>> coin_words(key_words(jax.random.key(0)), 3).shape
    (3,)

  References:
    Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011.
  """
  y0, y1 = numbered_blocks(key_pair, -(-num_words // 2))
  return base.materialize(jnp.stack([y0, y1], axis=1).reshape(-1)[:num_words])


def _uniform_view(key_pair, rows: int, per_row: int) -> jax.Array:
  """The uniforms of :func:`_rows`' columns as one uint32 ``[rows, per_row]`` array."""
  blocks = -(-per_row // LANES_PER_BLOCK)
  if blocks <= MAX_INLINE_BLOCKS:
    row = jax.lax.broadcasted_iota(jnp.uint32, (rows, blocks), 0)
    block = jax.lax.broadcasted_iota(jnp.uint32, (rows, blocks), 1)
    y0, y1 = threefry2x32(key_pair[0], key_pair[1], row, block)
  else:  # the blocks of the separate loop of _rows_by_column
    y0, y1 = (y.reshape(rows, blocks) for y in numbered_blocks(key_pair, rows * blocks))
  lanes = jnp.stack(_lanes(y0, y1), axis=-1).reshape(rows, blocks * LANES_PER_BLOCK)
  return lanes[:, :per_row]


def _rows_at_once(key_pair, values, bits: int, field):
  """:func:`_rows` for aligned fields, computed on a ``[rows, per_row]`` view at once."""
  n = values.shape[0]
  per_row, _ = _row_layout(bits)
  rows = -(-n // per_row)
  view = jnp.pad(values, (0, rows * per_row - n)).reshape(rows, per_row)
  column = jax.lax.broadcasted_iota(jnp.int32, (rows, per_row), 1)
  position = jax.lax.broadcasted_iota(jnp.int32, (rows, per_row), 0) * per_row + column
  f = field(view, _uniform_view(key_pair, rows, per_row), position)
  if n % per_row:
    f = jnp.where(position < n, f, 0)
  f = f << (column.astype(jnp.uint32) * np.uint32(bits))
  return jax.lax.reduce(f, np.uint32(0), jax.lax.bitwise_or, (1,))


def _rows_by_column(key_pair, values, bits: int, field):
  """:func:`_rows` computed one column at a time (each column traced once)."""
  n = values.shape[0]
  per_row, _ = _row_layout(bits)
  rows = -(-n // per_row)
  blocks = -(-per_row // LANES_PER_BLOCK)
  if blocks <= MAX_INLINE_BLOCKS:
    uniforms = uniform16_columns(key_pair, rows, per_row)
  else:  # drawn by one loop over all blocks, written once, read by the field loop
    y0, y1 = (base.materialize(y) for y in numbered_blocks(key_pair, rows * blocks))
    y0, y1 = y0.reshape(rows, blocks), y1.reshape(rows, blocks)
    uniforms = []
    for j in range(blocks):
      uniforms += _lanes(y0[:, j], y1[:, j])
  position = jax.lax.iota(jnp.int32, rows) * per_row
  out = None
  for k, v in enumerate(bitpack.columns(values, per_row)):
    f = field(v, uniforms[k], position + k)
    if n % per_row:
      f = jnp.where(position + k < n, f, 0)
    f = f << (k * bits) if k else f
    out = f if out is None else out | f
  return out


def _rows(key_pair, values, bits: int, field):
  """The rows of :func:`pack_fields`: uint32 ``[rows]``, field ``k`` of row ``r`` in bits
  ``[k bits, (k + 1) bits)``, the field of value ``r m + k`` (0 past the end)."""
  values = jnp.asarray(values)
  if values.shape[0] < UNROLL_MIN_VALUES and _row_layout(bits)[1]:
    return _rows_at_once(key_pair, values, bits, field)
  return _rows_by_column(key_pair, values, bits, field)


def pack_fields(key_pair, values, bits: int, field) -> jax.Array:
  """``bitpack.pack`` of ``field(v, u, i)`` of every value, each with a fresh uniform.

  Value ``i`` of ``values`` gets a 16-bit uniform ``u`` of its own (lane ``k % 4`` of
  Threefry block ``(r, k // 4)``, the value being field ``k`` of row ``r``); the fields are
  computed a row at a time and packed in the same loop (see ``bitpack``), so neither the
  uniforms nor the fields are written to memory when ``bits`` divides 32.

  Args:
    key_pair: ``(k0, k1)`` from :func:`key_words`.
    values: array ``[n]``.
    bits: field width, 1 to 32.
    field: ``field(v, u16, index)`` on arrays ``[rows]`` of a column of ``values``, its
      uint32 uniforms in ``[0, 2^16)`` and its int32 positions in ``values``; returns
      uint32 fields below ``2**bits`` (values past ``n`` are zero padding, and their
      fields are replaced by 0).

  Returns:
    uint32 ``[bitpack.packed_words(n, bits)]``.
  """
  n = jnp.shape(values)[0]
  per_row, aligned = _row_layout(bits)
  rows = _rows(key_pair, values, bits, field)
  if not aligned:
    rows = bitpack.pack_rows(rows, bits, per_row, n)
  # Computed once, in this loop (see base.materialize).
  return base.materialize(rows)


def unpacked_fields(key_pair, values, bits: int, field) -> jax.Array:
  """The fields of :func:`pack_fields` (same key, same uniforms), uint32 ``[n]``."""
  n = jnp.shape(values)[0]
  return bitpack.unpack(pack_fields(key_pair, values, bits, field), bits, n)
