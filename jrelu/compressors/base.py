"""The Compressor contract shared by every jrelu gradient codec.

A compressor is a pure, jit-able array codec:

* ``encode(key, x) -> code``: ``code`` is a pytree of fixed-shape arrays that is exactly
  what crosses the wire (packed integer words plus float32 scales); the original shape
  and dtype ride along as static pytree metadata, so they cost no bits and survive
  ``vmap`` and collectives.
* ``decode(code) -> x_hat``: same shape and dtype as ``x``.
* ``wire_bits(shape) -> int``: the exact bit size of the arrays ``encode`` returns.
* ``unbiased``: ``E[decode(encode(key, x))] == x`` over the key.

Two optional capabilities, used by the aggregation strategies of ``jrelu.aggregation``:

* **Common randomness** (``bind``). Some codecs draw randomness that the receiver must
  reproduce (FO-SGD's random signs, rand-k's index set). Unbound, such a codec puts a
  32-bit ``seed`` in its code. ``bind(common_key)`` returns a copy that takes that
  randomness from ``common_key`` instead, a key every device knows (the aggregation
  strategies derive it from the step key before the device index is folded in), so the
  seed is not sent. Codecs without common randomness return ``self``.
* **Shared-scale integer levels** (``integer_sum = True``). The codec is ``scale * level /
  max_level`` with integer ``level`` in ``[-max_level, max_level]``. When every device
  uses the same scales (a ``pmax`` of ``scales(x)``), levels from different devices can
  be added as integers before decoding: the ``integer_psum`` aggregation.

A new compressor is one module ``jrelu/compressors/_NAME.py`` that subclasses
:class:`Compressor`, plus one line in ``jrelu.compressors.REGISTRY`` and one in the test
suite's list.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def code_class(cls):
  """Makes a dataclass a pytree node whose ``static`` fields are metadata.

  Fields declared with ``dataclasses.field(metadata={"static": True})`` (for example the
  original shape and dtype) are part of the tree structure, not leaves: they are not
  sent, not traced and not vmapped.

  Example:
    >>> @code_class
    ... class MyCode:
    ...   words: jax.Array
    ...   shape: tuple = dataclasses.field(metadata={"static": True})
  """
  cls = dataclasses.dataclass(frozen=True)(cls)
  return jax.tree_util.register_dataclass(cls)


def payload_bits(code: Any) -> int:
  """Total bits of all array leaves of ``code`` (element count times dtype width).

  This is what ``Compressor.wire_bits`` must equal for the code's shape; static metadata
  does not count.

  Example:
    >>> payload_bits({"words": jnp.zeros(3, jnp.uint32)})
    96
  """
  return sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize * 8
             for leaf in jax.tree_util.tree_leaves(code))


def num_elements(shape) -> int:
  """Number of elements of an array of ``shape`` (1 for a scalar)."""
  return math.prod(shape)


def all_finite(x: jax.Array) -> jax.Array:
  """bool ``[]``: whether every entry of ``x`` is finite (True for an empty array).

  Codecs use it to make a non-finite input visible in their code (see
  :func:`poison`): a NaN or Inf on one device must never be averaged or voted away.

  Computed as ``sum(x * 0)``, which is ``+-0`` when every entry is finite and NaN as soon
  as one is NaN or Inf (``Inf * 0`` is NaN), and cannot overflow: on XLA CPU a float sum
  of an elementwise expression is one fused pass over ``x`` (a boolean reduction of
  ``isfinite`` writes a mask of ``x``'s size first, and a ``max`` is not used because
  XLA CPU's fused ``max`` may drop NaN operands of large arrays).

  Example:
    >>> bool(all_finite(jnp.array([1.0, jnp.inf])))
    False
  """
  return jnp.isfinite(jnp.sum(jnp.asarray(x, jnp.float32) * 0))


def materialize(x: jax.Array) -> jax.Array:
  """``x`` unchanged, but computed once and written to memory, not fused into its users.

  A codec computes its packed words in one loop over the words; its decoder reads each
  word once per field. When both are in one program (a round trip, a kernel benchmark,
  ``transforms.compress`` without a device axis) XLA on CPU would fuse the words into
  the decoder's loop and compute every word, random draws included, once per field (8
  to 32 times). ``jax.lax.optimization_barrier`` does not prevent that (XLA CPU removes
  barriers before fusion); a scatter does: XLA never fuses a scatter into its users, and
  a scatter of a few elements is done in place. The scatter here is ``x[0] = max(x[0],
  lowest)``, twice (with a single index XLA rewrites it into a fusible
  dynamic-update-slice), which changes no value (NaN included).

  Args:
    x: a 1-D array.

  Returns:
    ``x``.

  Example:
    >>> materialize(jnp.arange(3, dtype=jnp.uint32))
    Array([0, 1, 2], dtype=uint32)
  """
  x = jnp.asarray(x)
  if x.ndim != 1 or x.shape[0] == 0:
    return x
  if jnp.issubdtype(x.dtype, jnp.floating):
    lowest = -jnp.inf
  else:
    lowest = jnp.iinfo(x.dtype).min
  return x.at[jnp.zeros(2, jnp.int32)].max(jnp.asarray(lowest, x.dtype))


def poison(values: jax.Array, finite: jax.Array) -> jax.Array:
  """``values`` where ``finite`` is True, else NaN of the same shape and dtype.

  Every codec routes the result of :func:`all_finite` of its input through this into a
  float leaf of its code, so decoding a code of a non-finite input gives NaN, and every
  aggregate that includes it is non-finite.

  Example:
    >>> poison(jnp.array([1.0, 2.0]), jnp.array(False))
    Array([nan, nan], dtype=float32)
  """
  return jnp.where(finite, values, jnp.asarray(jnp.nan, values.dtype))


def negate_where(magnitude: jax.Array, negative: jax.Array) -> jax.Array:
  """``-magnitude`` where ``negative`` is 1, else ``magnitude``: a decoder's signed values.

  Sets the IEEE sign bit, which negates exactly (NaN stays NaN). A codec's decode loop
  writes one float32 per coordinate from a few packed bits; on XLA CPU a ``where`` there
  made QSGD's decode loop at d = 1e7 take 11 ms against 5 ms for this bitwise form
  (profiled on the 2-core development VM), which XLA vectorizes like the multiply
  beside it.

  Args:
    magnitude: float32 array of non-negative values (or NaN); ``-0.0`` results where a
      zero is marked negative.
    negative: uint32 array of 0 or 1, broadcastable to ``magnitude``.

  Returns:
    float32 array of ``magnitude``'s shape.

  Example:
    >>> negate_where(jnp.array([1.5, 2.0]), jnp.array([0, 1], jnp.uint32))
    Array([ 1.5, -2. ], dtype=float32)
  """
  bits = jax.lax.bitcast_convert_type(jnp.asarray(magnitude, jnp.float32), jnp.uint32)
  bits = bits | (jnp.asarray(negative, jnp.uint32) << np.uint32(31))
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def overflow_free(reduce, v: jax.Array, axis=None) -> jax.Array:
  """``reduce(v, axis)`` computed on ``v / 2^e`` and scaled back by ``2^e``.

  For a homogeneous reduction (a norm, a mean of ``|v|``, a standard deviation:
  ``reduce(c v) = |c| reduce(v)``) of float32 ``v``, squaring or summing huge finite
  entries overflows (``||v||_2`` is ``inf`` once ``|v_i| >= 2^64``, about ``1.8e19``).
  With ``2^e`` the largest power of two not above ``max|v|`` (per slice along ``axis``;
  at most ``2^126``, whose reciprocal is still a normal float32) the scaled entries are
  at most 4 in magnitude and nothing overflows; a power-of-two scaling is exact,
  so the result is bit-identical to ``reduce(v)`` wherever that does not overflow (up to
  entries below ``2^-126 max|v|``, which the scaling flushes to zero as subnormals).
  Slices whose maximum is 0, subnormal (below ``finfo(float32).tiny``) or non-finite
  are not scaled, so NaN and Inf pass through.

  Args:
    reduce: ``reduce(array, axis=..., keepdims=True)``, e.g. ``jnp.linalg.norm``-like
      ``lambda a, axis, keepdims: jnp.sqrt(jnp.sum(a * a, axis, keepdims=keepdims))``.
    v: float32 array.
    axis: the reduced axis (None: all).

  Returns:
    ``reduce(v, axis)`` without the reduced axis, float32.

  Example:
    >>> overflow_free(lambda a, axis, keepdims: jnp.sqrt(jnp.sum(a * a, axis, keepdims=keepdims)),
    ...               jnp.array([3e30, 4e30]))
    Array(5.e+30, dtype=float32)
  """
  v = jnp.asarray(v, jnp.float32)
  top = jnp.max(jnp.abs(v), axis=axis, keepdims=True, initial=0.0)
  _, exponent = jnp.frexp(top)  # top = m 2^exponent with m in [0.5, 1)
  usable = jnp.isfinite(top) & (top >= jnp.finfo(jnp.float32).tiny)
  # 2^(exponent - 1) is in (top / 2, top]. Capped at 2^126: XLA divides by multiplying
  # with the reciprocal, and 2^-127 is subnormal (flushed to 0 on CPU); 2^-126 is not.
  power = jnp.minimum(exponent - 1, 126)
  scale = jnp.where(usable, jnp.ldexp(jnp.ones_like(top), power), 1.0)
  return jnp.squeeze(reduce(v / scale, axis=axis, keepdims=True) * scale, axis=axis)


def l2_norm(v: jax.Array, axis=None) -> jax.Array:
  """Euclidean norm of float32 ``v`` along ``axis``, without overflow (see
  :func:`overflow_free`); NaN or Inf in a slice gives a non-finite norm.

  Example:
    >>> l2_norm(jnp.array([3e30, 4e30]))
    Array(5.e+30, dtype=float32)
  """
  return overflow_free(
      lambda a, axis, keepdims: jnp.sqrt(jnp.sum(a * a, axis=axis, keepdims=keepdims)),
      v, axis)


def mean_abs(v: jax.Array, axis=None) -> jax.Array:
  """``mean(|v|)`` of float32 ``v`` along ``axis``, without overflow of the sum.

  Never above ``max|v|``, as the exact mean: a float32 mean can round up past it (15
  copies of float32's largest value scaled by ``2^-126`` average to exactly 4, which
  scales back to Inf), so it is clamped there. NaN and Inf pass through.

  Example:
    >>> mean_abs(jnp.array([3e38, -3e38]))
    Array(3.e+38, dtype=float32)
  """
  return _at_most_max(overflow_free(
      lambda a, axis, keepdims: jnp.mean(jnp.abs(a), axis=axis, keepdims=keepdims),
      v, axis), v, axis)


def std(v: jax.Array, axis=None) -> jax.Array:
  """Population standard deviation of float32 ``v`` along ``axis``, without overflow.

  Never above ``max|v|`` (the exact one is not: ``std^2 <= mean(v^2) <= max|v|^2``), like
  :func:`mean_abs`.

  Example:
    >>> std(jnp.array([1e30, -1e30]))
    Array(1.e+30, dtype=float32)
  """
  return _at_most_max(overflow_free(
      lambda a, axis, keepdims: jnp.std(a, axis=axis, keepdims=keepdims), v, axis), v, axis)


def _at_most_max(value, v, axis):
  """``value`` clamped to ``max|v|`` along ``axis`` where that is finite (NaN stays NaN)."""
  top = jnp.max(jnp.abs(jnp.asarray(v, jnp.float32)), axis=axis, initial=0.0)
  return jnp.where(jnp.isfinite(top) & (value > top), top, value)


class Compressor(abc.ABC):
  """Base class of jrelu's gradient codecs (see the module docstring for the contract).

  Subclasses validate their hyper-parameters in ``__init__`` (raising ``ValueError``
  that quotes the bad value) and implement ``encode``, ``decode`` and ``wire_bits``.

  Attributes:
    name: short registry name, e.g. ``"qsgd"``.
    unbiased: whether ``E[decode(encode(key, x))] == x``.
  """

  name: str = "compressor"
  unbiased: bool = False
  # True for codecs of the form scale * level / max_level that implement ``scales``,
  # ``quantize`` and ``dequantize`` (see the module docstring).
  integer_sum: bool = False
  # True when re-encoding the mean of decoded codes is a majority vote (unscaled sign).
  majority_vote: bool = False

  @abc.abstractmethod
  def encode(self, key: jax.Array, x: jax.Array) -> Any:
    """Encodes ``x`` (any shape, floating dtype) into its wire payload."""

  @abc.abstractmethod
  def decode(self, code: Any) -> jax.Array:
    """Decodes a payload back to an array of the original shape and dtype."""

  @abc.abstractmethod
  def wire_bits(self, shape: tuple[int, ...]) -> int:
    """Exact number of payload bits that ``encode`` produces for an input of ``shape``."""

  def bind(self, common_key: jax.Array) -> "Compressor":
    """Returns a copy whose common randomness comes from ``common_key`` (see module doc).

    The default (a codec without common randomness) returns ``self``.
    """
    del common_key
    return self

  # --- Shared-scale integer levels (only when ``integer_sum``) ---------------------------

  max_level: int = 0

  def scales(self, x: jax.Array) -> jax.Array:
    """float32 ``[num_scales(x.shape)]``: this device's scales (shared = their ``pmax``)."""
    raise NotImplementedError(f"{self.name} does not support integer summation")

  def num_scales(self, shape: tuple[int, ...]) -> int:
    """Length of ``scales(x)`` for an input of ``shape``."""
    raise NotImplementedError(f"{self.name} does not support integer summation")

  def quantize(self, key: jax.Array, x: jax.Array, scales: jax.Array) -> jax.Array:
    """int32 ``[size]`` levels in ``[-max_level, max_level]`` of ``x`` (flattened) under
    ``scales`` (which may exceed this device's own); ``E[dequantize(...)] = x``."""
    raise NotImplementedError(f"{self.name} does not support integer summation")

  def dequantize(self, levels: jax.Array, scales: jax.Array, shape, dtype) -> jax.Array:
    """Values ``scale * levels / max_level`` reshaped to ``shape``; ``levels`` (int32
    ``[size]``) may be a sum of several devices' levels."""
    raise NotImplementedError(f"{self.name} does not support integer summation")

  def __call__(self, key: jax.Array, x: jax.Array) -> jax.Array:
    """``decode(encode(key, x))``: the compressed estimate of ``x`` on one device."""
    return self.decode(self.encode(key, x))

  def __repr__(self) -> str:
    fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
    return f"{type(self).__name__}({fields})"
