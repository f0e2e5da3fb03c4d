"""QSGD: stochastic uniform quantization to ``num_levels`` levels per bucket.

Alistarh, Grubic, Li, Tomioka, Vojnovic, "QSGD: Communication-Efficient SGD via Gradient
Quantization and Encoding", NeurIPS 2017 (arXiv 1610.02132), as used by Kalan,
Soltanolkotabi, Avestimehr, "Fitting ReLUs via SGD and Quantized SGD" (arXiv 1901.06587).

For a bucket ``v`` with scale ``||v||`` (l2, or max-abs for ``norm="max"``) and ``s`` levels,
each coordinate becomes ``||v|| * sign(v_i) * xi_i / s`` where ``xi_i`` is ``floor(r_i)`` or
``floor(r_i) + 1`` with ``r_i = s |v_i| / ||v||`` and ``P(round up) = r_i - floor(r_i)``, so
``E[xi_i] = r_i``: the quantizer is unbiased. Exact per-bucket variance:
``E||Q(v) - v||^2 = (||v||^2 / s^2) * sum_i p_i (1 - p_i)`` with ``p_i = r_i - floor(r_i)``,
which is at most ``min(B / s^2, sqrt(B) / s) ||v||^2`` for bucket size ``B`` (Lemma 3.1).

Random bits: each coordinate's rounding draws a 16-bit uniform, four per Threefry-2x32
block (``threefry``; one float32 uniform per coordinate cost more than the rest of the
codec). ``P(round up)`` is ``p_i`` rounded to a multiple of ``2^-16``
(``threefry.bernoulli16``), so ``E[xi_i] - r_i`` is at most ``2^-17`` in magnitude: a bias
of at most ``2^-17`` of a quantization level ``||v|| / s`` per coordinate (float32
uniforms carried ``2^-24``), and the variance formula holds to within
``(||v||^2 / s^2) 2^-17 (1 + 2^-17)`` per coordinate. A coordinate on a level
(``p_i = 0``) is never rounded, zeros stay zeros, and ``max|v|`` stays at level ``s``.

Wire format (fixed length, the "dense" layout rather than Elias coding): per coordinate one
symbol ``2 * level + sign`` of ``ceil(log2(2 s + 1))`` bits, packed densely into uint32
words, plus one float32 scale per bucket. A zero bucket has scale 0 and decodes to zeros.

Non-finite input: a bucket holding NaN or Inf gets scale NaN and levels 0, so it decodes
to NaN (never to finite values that an average would hide). The l2 norm is computed on
the bucket scaled by a power of two (exact), so finite inputs up to the float32 maximum
have finite scales.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jrelu import _checks
from jrelu.compressors import base
from jrelu.compressors import bitpack
from jrelu.compressors import threefry

NORMS = ("l2", "max")
# The largest s: the levels are computed in float32 as floor(s |v_i| / ||v||) plus a coin,
# which is exact only while float32 represents every integer up to s, i.e. s <= 2^24
# (then the symbol 2 level + sign needs 26 bits, within a 32-bit word). At s = 2^25 - 1
# float32 rounds s itself and levels overflow the symbol field.
MAX_LEVELS = 2**24
MAX_LEVELS_WHY = "(float32 must represent every level 0..s exactly)"


@base.code_class
class QSGDCode:
  """Wire payload of :class:`QSGD`.

  Attributes:
    words: uint32 ``[packed_words(d, symbol_bits)]``, the packed ``2 * level + sign`` symbols.
    scales: float32 ``[num_buckets]``, each bucket's norm.
    shape: the input's shape (static, not sent).
    dtype: the input's dtype (static, not sent).
  """
  words: jax.Array
  scales: jax.Array
  shape: tuple = dataclasses.field(metadata={"static": True})
  dtype: np.dtype = dataclasses.field(metadata={"static": True})


class QSGD(base.Compressor):
  """The QSGD quantizer ``Q_s`` with optional bucketing and l2 or max normalization.

  Build it with :func:`qsgd`. ``unbiased`` is True. Codes with per-device scales do not
  commute with sum, but with scales shared across devices (a ``pmax``; ``quantize``
  accepts any scale at least the bucket's own norm and stays unbiased) the integer levels
  do: ``integer_sum`` is True and ``jrelu.aggregation``'s ``integer_psum`` adds them.

  References:
    Alistarh et al., "QSGD: Communication-Efficient SGD via Gradient Quantization and
    Encoding", NeurIPS 2017, arXiv 1610.02132.
  """

  name = "qsgd"
  unbiased = True
  integer_sum = True
  MAX_LEVELS = MAX_LEVELS

  def __init__(self, num_levels: int, bucket_size: int | None = None, norm: str = "max"):
    self.num_levels = _checks.integer("num_levels", num_levels, maximum=MAX_LEVELS,
                                      why=MAX_LEVELS_WHY)
    self.bucket_size = _checks.optional_integer("bucket_size", bucket_size,
                                                maximum=_checks.INT32_MAX,
                                                why="(an int32 size)")
    self.norm = _checks.choice("norm", norm, NORMS)
    self.symbol_bits = bitpack.bits_for(2 * self.num_levels + 1)
    self.max_level = self.num_levels

  def buckets(self, num_values: int) -> tuple[int, int]:
    """Returns ``(bucket_size, num_buckets)`` used for a flat input of ``num_values``."""
    size = num_values if self.bucket_size is None else min(self.bucket_size, num_values)
    size = max(size, 1)
    return size, -(-num_values // size)

  def _buckets_of(self, x):
    flat = jnp.ravel(jnp.asarray(x, jnp.float32))
    size, count = self.buckets(flat.shape[0])
    return jnp.pad(flat, (0, size * count - flat.shape[0])).reshape(count, size)

  def num_scales(self, shape):
    return self.buckets(base.num_elements(shape))[1]

  def scales(self, x):
    """float32 ``[num_buckets]``: each bucket's norm; NaN for a bucket holding NaN or Inf.

    The l2 norm is computed without overflow (``base.l2_norm``), so finite buckets have
    finite scales even when ``|x_i| >= 1e20``.
    """
    v = self._buckets_of(x)
    if self.norm == "max":
      norms = jnp.max(jnp.abs(v), axis=1, initial=0.0)
    else:
      norms = base.l2_norm(v, axis=1)
    # NaN or Inf in a bucket makes its sum of v * 0 NaN (see base.all_finite).
    return base.poison(norms, jnp.isfinite(jnp.sum(v * 0, axis=1)))

  def quantize(self, key, x, scales):
    flat = jnp.ravel(jnp.asarray(x)).astype(jnp.float32)
    symbols = threefry.unpacked_fields(threefry.key_words(key), flat, self.symbol_bits,
                                       self._symbol_fn(flat.shape[0], scales))
    return _signed(symbols)

  def dequantize(self, levels, scales, shape, dtype):
    d = base.num_elements(shape)
    size, count = self.buckets(d)
    signed = jnp.pad(levels.astype(jnp.float32), (0, size * count - d)).reshape(count, size)
    values = signed * (scales[:, None] / self.num_levels)
    return values.reshape(-1)[:d].reshape(shape).astype(dtype)

  def _symbol_fn(self, d, scales):
    """``field(v, u16, index)`` for ``threefry.pack_fields``: the symbol ``2 level + sign``
    of coordinates ``v``, rounded up with probability ``p_i`` to within ``2^-17``."""
    size, count = self.buckets(d)
    safe = jnp.where(scales > 0, scales, 1.0)

    def symbol(v, u16, index):
      # The bucket's scale (index past d is padding: clipped to the last bucket).
      scale = safe[0] if count == 1 else safe[jnp.minimum(index // size, count - 1)]
      r = jnp.minimum(jnp.abs(v) / scale * self.num_levels, self.num_levels)
      # A non-finite bucket (its scale is NaN, or a shared scale is Inf): no NaN is cast
      # to an integer (undefined junk); its NaN scale carries the news.
      r = jnp.where(jnp.isfinite(r), r, 0.0)
      low = jnp.floor(r)
      level = jnp.minimum(low + threefry.bernoulli16(u16, r - low), self.num_levels)
      level = level.astype(jnp.uint32)
      return 2 * level + ((v < 0) & (level > 0)).astype(jnp.uint32)

    return symbol

  def levels(self, key, x):
    """Quantizes ``x`` without packing.

    Args:
      key: a PRNG key.
      x: floating array of any shape.

    Returns:
      ``(signed_levels, scales)``: int32 ``[num_buckets, bucket_size]`` in
      ``[-num_levels, num_levels]`` (zero padded past the input), and float32
      ``[num_buckets]`` norms. ``x_hat = scales[:, None] * signed_levels / num_levels``.
    """
    scales = self.scales(x)
    d = base.num_elements(jnp.shape(x))
    size, count = self.buckets(d)
    signed = self.quantize(key, x, scales)
    return jnp.pad(signed, (0, size * count - d)).reshape(count, size), scales

  def encode(self, key, x):
    x = jnp.asarray(x)
    scales = self.scales(x)
    flat = jnp.ravel(x).astype(jnp.float32)
    words = threefry.pack_fields(threefry.key_words(key), flat, self.symbol_bits,
                                 self._symbol_fn(flat.shape[0], scales))
    return QSGDCode(words=words, scales=scales, shape=tuple(x.shape), dtype=x.dtype)

  def decode(self, code):
    d = base.num_elements(code.shape)
    symbols = bitpack.unpack(code.words, self.symbol_bits, d)
    # |value| = scale * level / s, then the sign bit: one loop over the symbols.
    magnitude = self.dequantize(symbols >> 1, code.scales, (d,), jnp.float32)
    values = base.negate_where(magnitude, symbols & 1)
    return values.reshape(code.shape).astype(code.dtype)

  def wire_bits(self, shape):
    d = base.num_elements(shape)
    return 32 * bitpack.packed_words(d, self.symbol_bits) + 32 * self.buckets(d)[1]


def _signed(symbols):
  """int32 signed levels of the symbols ``2 level + sign`` (uint32)."""
  level = (symbols >> 1).astype(jnp.int32)
  return jnp.where((symbols & 1) == 1, -level, level)


def qsgd(num_levels: int, bucket_size: int | None = None, norm: str = "max") -> QSGD:
  """Builds the QSGD quantizer ``Q_s`` with ``s = num_levels``.

  The defaults (max norm, one bucket) are those of ``jrelu.qsgd`` and of the
  ``jrelu.train`` binary. Max-norm scaling is what the QSGD paper's experiments use
  (its Section 4, "Variants"); the l2 norm of its theory gives a far larger error on
  large arrays. Measured ``||Q(g) - g|| / ||g||`` on a Gaussian g of 10^6 entries, s = 4
  (mean of 3 keys): l2 one bucket 17.4, l2 buckets of 512 1.88, max one bucket 0.48, max
  buckets of 512 0.33 (for 1.6% more bits). The paper's experiments also quantize in
  buckets of 512 at 4 and 8 bits; pass ``bucket_size=512`` for that. One bucket stays the
  default because under the ``two_phase`` aggregation each chunk of ``ceil(d/N)``
  coordinates already has its own scale, and so the binary's measured bits stay as
  documented.

  Args:
    num_levels: s >= 1, the number of positive levels; levels are ``{0, 1/s, ..., 1}``.
      A coordinate costs ``ceil(log2(2 s + 1))`` bits (s=1: 2, s=4: 4, s=16: 6).
    bucket_size: quantize consecutive buckets of this many coordinates, each with its own
      float32 scale; None (default) means one bucket for the whole (flattened) array.
    norm: ``"max"`` (default: max-abs scaling, the paper's experiments) or ``"l2"``
      (its theory: Lemma 3.1's variance bound).

  Returns:
    A :class:`QSGD` compressor.

  Raises:
    ValueError: if ``num_levels`` is not in ``[1, 2^24]`` (float32 represents the levels
      exactly only up to ``2^24``), ``bucket_size`` is not in ``[1, 2^31 - 1]`` or
      ``norm`` is unknown.

  Example:
    >>> c = qsgd(4, bucket_size=512)
    >>> code = c.encode(jax.random.key(0), jnp.ones(1000))
    >>> c.wire_bits((1000,))   # 1000 * 4 bits packed + 2 scales
    4064

  References:
    Alistarh et al., "QSGD: Communication-Efficient SGD via Gradient Quantization and
    Encoding", NeurIPS 2017, arXiv 1610.02132.
  """
  return QSGD(num_levels, bucket_size, norm)
