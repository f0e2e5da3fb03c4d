"""Pack small unsigned integers densely into uint32 words, and back.

A field of ``bits`` bits per value is laid out little-endian in a continuous bit stream:
value ``i`` occupies stream bits ``[i * bits, (i + 1) * bits)`` and stream bit ``j`` is bit
``j % 32`` of word ``j // 32``. When ``bits`` divides 32 no value straddles two words and
the packing is a shift-and-or over a ``[words, 32 // bits]`` view; otherwise the values are
first expanded to single bits. Either way ``ceil(num_values * bits / 32)`` words carry
exactly the payload, with at most 31 bits of zero padding in the last word.

A codec that draws random bits for its fields (QSGD, TernGrad, ATOMO, FO-SGD) computes
them a row at a time (``threefry.pack_fields``): it cuts its input into :func:`columns`
and computes each row as one uint32, field ``k`` in bits ``[k bits, (k + 1) bits)``, with
a Threefry block per four fields. When ``bits`` divides 32 a row is a word (``32 / bits``
fields), so XLA fuses the draws, the fields and the packing into one loop that reads the
input once and writes only the words; otherwise a row holds :func:`row_size` fields and
the rows are packed as wider values by :func:`pack_rows`. Either way the words are those
of :func:`pack` of the fields.
"""

from __future__ import annotations

import jax.numpy as jnp

from jrelu import _checks
from jrelu.compressors import base

WORD_BITS = 32


def _check_bits(bits: int) -> int:
  """``bits`` as an int, or ValueError unless it is an integer field width in [1, 32]."""
  bits = _checks.integer("bits", bits)
  if bits > WORD_BITS:
    raise ValueError(f"bits must be an integer <= {WORD_BITS}, got {bits!r}")
  return bits


def packed_words(num_values: int, bits: int) -> int:
  """Number of uint32 words that ``pack`` produces for ``num_values`` fields.

  Args:
    num_values: how many values are packed (>= 0).
    bits: width of one field in bits, 1 to 32.

  Returns:
    ``ceil(num_values * bits / 32)``.

  Raises:
    ValueError: if ``bits`` is outside [1, 32] or ``num_values`` is negative.

  Example:
    >>> packed_words(1000, 2)
    63
  """
  bits = _check_bits(bits)
  num_values = _checks.integer("num_values", num_values, minimum=0)
  return -(-num_values * bits // WORD_BITS)


def pack(values, bits: int):
  """Packs unsigned integers of ``bits`` bits each into uint32 words.

  Args:
    values: integer array of shape ``[n]``; every entry must lie in ``[0, 2**bits)``
      (higher bits are masked off, not checked, so that this stays jit-able).
    bits: field width, 1 to 32.

  Returns:
    uint32 array of shape ``[packed_words(n, bits)]``.

  Raises:
    ValueError: if ``bits`` is outside [1, 32] or ``values`` is not one-dimensional.

  Example:
    >>> pack(jnp.array([1, 2, 3]), 2)   # 0b11_10_01
    Array([57], dtype=uint32)
  """
  _check_bits(bits)
  values = jnp.asarray(values)
  if values.ndim != 1:
    raise ValueError(f"pack expects a 1-D array, got shape {values.shape}")
  n = values.shape[0]
  values = values.astype(jnp.uint32) & _mask(bits)
  if WORD_BITS % bits:
    stream = (values[:, None] >> jnp.arange(bits, dtype=jnp.uint32)) & 1
    return pack(stream.reshape(-1), 1)
  per_word = WORD_BITS // bits
  num_words = packed_words(n, bits)
  values = jnp.pad(values, (0, num_words * per_word - n)).reshape(num_words, per_word)
  shifts = jnp.arange(per_word, dtype=jnp.uint32) * bits
  # Fields occupy disjoint bits, so the sum is the bitwise or.
  return jnp.sum(values << shifts, axis=1, dtype=jnp.uint32)


def columns(values, group: int) -> list:
  """The columns of ``values`` cut into rows of ``group``: column ``k`` is
  ``values[k::group]``, zero padded to ``ceil(n / group)`` rows.

  Args:
    values: array ``[n]``.
    group: values per row (e.g. :func:`row_size`).

  Returns:
    A list of ``group`` arrays ``[ceil(n / group)]`` of ``values``' dtype.

  Example:
    >>> columns(jnp.arange(5), 2)
    [Array([0, 2, 4], dtype=int32), Array([1, 3, 0], dtype=int32)]
  """
  values = jnp.asarray(values)
  n = values.shape[0]
  rows = -(-n // group)
  view = jnp.pad(values, (0, rows * group - n)).reshape(rows, group)
  return [view[:, k] for k in range(group)]


def row_size(bits: int) -> int:
  """Fields per row of :func:`pack_rows`: the largest of 4, 2, 1 whose fields fit one word.

  Four is what one Threefry block's 64 bits give in 16-bit uniforms (``threefry``).

  Example:
    >>> row_size(4), row_size(12), row_size(26)
    (4, 2, 1)
  """
  bits = _check_bits(bits)
  return next(m for m in (4, 2, 1) if m * bits <= WORD_BITS)


def pack_rows(rows, bits: int, row: int, num_values: int):
  """:func:`pack` of ``num_values`` fields given as rows of ``row`` fields each.

  Field ``k`` of ``rows[r]`` (bits ``[k bits, (k + 1) bits)``) is value ``r * row + k`` of
  the stream; fields past ``num_values`` must be 0. In the stream, a row is one value of
  ``row * bits`` bits, so this is ``pack(rows, row * bits)`` cut to
  ``packed_words(num_values, bits)`` words. When ``row * bits`` does not divide 32 the
  rows are written to memory once first: ``pack`` would otherwise compute each row once
  per bit (a row holds a codec's random draws, which are not cheap to repeat).

  Args:
    rows: uint32 ``[ceil(num_values / row)]``.
    bits: field width, ``row * bits <= 32``.
    row: fields per row.
    num_values: number of fields.

  Returns:
    uint32 ``[packed_words(num_values, bits)]``, the same words as ``pack`` of the fields.

  Example:
    >>> pack_rows(jnp.array([1 + (2 << 2) + (3 << 4)], jnp.uint32), 2, 4, 3)   # 1, 2, 3
    Array([57], dtype=uint32)
  """
  width = row * _check_bits(bits)
  if WORD_BITS % width:
    rows = base.materialize(rows)
  return pack(rows, width)[:packed_words(num_values, bits)]


def unpack(words, bits: int, num_values: int):
  """Inverse of :func:`pack`: reads ``num_values`` fields of ``bits`` bits.

  Args:
    words: uint32 array of shape ``[packed_words(num_values, bits)]``.
    bits: field width, 1 to 32.
    num_values: how many fields to read.

  Returns:
    uint32 array of shape ``[num_values]``.

  Raises:
    ValueError: if ``bits`` is outside [1, 32] or ``words`` has the wrong length.

  Example:
    >>> unpack(jnp.array([57], jnp.uint32), 2, 3)
    Array([1, 2, 3], dtype=uint32)
  """
  words = _words(words, packed_words(num_values, bits), "unpack", num_values, bits)
  if WORD_BITS % bits:
    stream = unpack(words, 1, num_values * bits).reshape(num_values, bits)
    return jnp.sum(stream << jnp.arange(bits, dtype=jnp.uint32), axis=1, dtype=jnp.uint32)
  per_word = WORD_BITS // bits
  shifts = jnp.arange(per_word, dtype=jnp.uint32) * bits
  fields = (words[:, None] >> shifts) & _mask(bits)
  return fields.reshape(-1)[:num_values]


def aligned_words(num_values: int, bits: int) -> int:
  """Number of uint32 words that :func:`pack_aligned` produces: ``ceil(n / (32 // bits))``.

  Example:
    >>> aligned_words(1000, 5)   # 6 fields per word, 2 bits of each word unused
    167
  """
  bits = _check_bits(bits)
  num_values = _checks.integer("num_values", num_values, minimum=0)
  return -(-num_values // (WORD_BITS // bits))


def pack_aligned(values, bits: int):
  """Packs ``32 // bits`` fields per uint32 word, none straddling two words.

  Unlike :func:`pack`, every field sits inside one word, so adding packed words as
  integers adds the fields independently as long as no field's sum reaches
  ``2**bits``: this is what makes an integer all-reduce of packed levels exact.

  Args:
    values: integer array ``[n]`` with entries in ``[0, 2**bits)``.
    bits: field width, 1 to 32.

  Returns:
    uint32 array ``[aligned_words(n, bits)]``.

  Raises:
    ValueError: if ``bits`` is outside [1, 32] or ``values`` is not one-dimensional.

  Example:
    >>> pack_aligned(jnp.array([1, 2, 3]), 5)   # 1 + (2 << 5) + (3 << 10): low field first
    Array([3137], dtype=uint32)
  """
  _check_bits(bits)
  values = jnp.asarray(values)
  if values.ndim != 1:
    raise ValueError(f"pack_aligned expects a 1-D array, got shape {values.shape}")
  per_word = WORD_BITS // bits
  num_words = aligned_words(values.shape[0], bits)
  values = values.astype(jnp.uint32) & _mask(bits)
  values = jnp.pad(values, (0, num_words * per_word - values.shape[0]))
  shifts = jnp.arange(per_word, dtype=jnp.uint32) * bits
  return jnp.sum(values.reshape(num_words, per_word) << shifts, axis=1, dtype=jnp.uint32)


def unpack_aligned(words, bits: int, num_values: int):
  """Inverse of :func:`pack_aligned`: reads ``num_values`` fields of ``bits`` bits.

  Args:
    words: uint32 array of shape ``[aligned_words(num_values, bits)]``.
    bits: field width, 1 to 32.
    num_values: how many fields to read.

  Returns:
    uint32 array of shape ``[num_values]``.

  Raises:
    ValueError: if ``bits`` is outside [1, 32] or ``words`` has the wrong length.

  Example:
    >>> unpack_aligned(jnp.array([3137], jnp.uint32), 5, 3)
    Array([1, 2, 3], dtype=uint32)
  """
  words = _words(words, aligned_words(num_values, bits), "unpack_aligned", num_values, bits)
  shifts = jnp.arange(WORD_BITS // bits, dtype=jnp.uint32) * bits
  return ((words[:, None] >> shifts) & _mask(bits)).reshape(-1)[:num_values]


def _words(words, num_words: int, name: str, num_values: int, bits: int):
  """``words`` as uint32 ``[num_words]``; ValueError naming ``name`` if the length is wrong."""
  words = jnp.asarray(words, jnp.uint32)
  if words.shape != (num_words,):
    raise ValueError(
        f"{name} of {num_values} fields of {bits} bits expects {num_words} words, "
        f"got shape {words.shape}")
  return words


def _mask(bits: int):
  return jnp.uint32((1 << bits) - 1) if bits < WORD_BITS else jnp.uint32(0xFFFFFFFF)


def bits_for(num_symbols: int) -> int:
  """Smallest field width that holds ``num_symbols`` distinct values (at least 1 bit).

  Example:
    >>> bits_for(9)   # QSGD with num_levels=4: levels 0..4 and a sign
    4
  """
  num_symbols = _checks.integer("num_symbols", num_symbols)
  return max(1, (num_symbols - 1).bit_length())
