"""TernGrad: stochastic ternarization with one scaler per array.

Wen, Xu, Yan, Wu, Wang, Chen, Li, "TernGrad: Ternary Gradients to Reduce Communication in
Distributed Deep Learning", NeurIPS 2017 (arXiv 1705.07878), with the scaler and the
clipping of the authors' reference code (github.com/wenwei202/terngrad); every rule used is
stated below, so this docstring is the specification.

For an array ``g`` (flattened, ``d`` entries) with scaler ``s``, each coordinate becomes
``s * t_k`` with ``t_k = sign(g_k) * b_k`` and ``b_k ~ Bernoulli(|g_k| / s)`` independent, so
``P(t_k != 0) = |g_k| / s``, ``E[s t_k] = g_k`` and ``Var(s t_k) = |g_k| (s - |g_k|)`` whenever
``|g_k| <= s``.

Random bits: ``b_k`` compares a 16-bit uniform (four per Threefry-2x32 block,
``threefry``) with ``|g_k| / s``, so ``P(b_k = 1)`` is ``|g_k| / s`` rounded to a multiple of
``2^-16`` (``threefry.bernoulli16``): a bias of at most ``2^-17 s`` (``2^-17`` of the level
``s``) per coordinate, and ``Var(s t_k)`` within ``2^-17 s^2`` of ``|g_k| (s - |g_k|)``.
Zeros and coordinates at ``+-s`` are exact.

* Without clipping (``clip_factor=None``): ``s = max_k |g_k|`` (layer-wise: one scaler per
  encoded array) and the codec is unbiased.
* With ``clip_factor = c``: ``sigma`` is the standard deviation of the array's entries
  (population, ``ddof = 0``, as the reference code's moments), ``s = c * sigma`` and ``g``
  is first clipped to ``[-s, s]``. This is the reference code's reading (its scaler is
  ``c * sigma`` even when ``max|g| < c * sigma``; ``min(c * sigma, max|g|)`` would give the
  same mean with less variance but is not what TernGrad does). The codec then estimates
  ``clip(g, -s, s)``: entries beyond ``s`` are shrunk toward zero by ``|g_k| - s``, a bias.
  A constant array (in particular a one-element array) has ``sigma = 0`` and decodes to
  zeros; the reference code sends such small tensors in float instead.

Scaler sharing (``integer_sum = True``): with a shared scaler ``s`` (the ``pmax`` of every
device's ``scales``) each device's ternary levels ``t_k`` are summed as integers and
``s * sum_m t_{m,k}`` is the sum of the devices' estimates. A shared scaler larger than a
device's own keeps ``|g_k| / s <= 1``, so the estimate stays unbiased (with a larger
variance ``|g_k| (s - |g_k|)``); with clipping each device clips to the shared ``s``.

Non-finite input: an array holding NaN or Inf gets scaler NaN (and levels 0), so it
decodes to NaN and no average hides it. The clipped scaler's standard deviation is
computed without overflow (``base.std``) and capped at the largest finite value of the
input's dtype (which clips nothing, as it is at least ``max|g|``).

Wire format: per coordinate the symbol ``t_k + 1`` in ``{0, 1, 2}`` in 2 bits, packed 16
per uint32 word, plus the float32 scaler: ``32 * ceil(2 d / 32) + 32`` bits.
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

SYMBOL_BITS = 2  # t + 1 in {0, 1, 2}


@base.code_class
class TernGradCode:
  """Wire payload of :class:`TernGrad`.

  Attributes:
    words: uint32 ``[ceil(2 d / 32)]``, the packed 2-bit symbols ``t_k + 1``.
    scale: float32 ``[1]``, the scaler ``s``.
    shape: the input's shape (static, not sent).
    dtype: the input's dtype (static, not sent).
  """
  words: jax.Array
  scale: jax.Array
  shape: tuple = dataclasses.field(metadata={"static": True})
  dtype: np.dtype = dataclasses.field(metadata={"static": True})


class TernGrad(base.Compressor):
  """TernGrad's stochastic ternary quantizer ``s * sign(g) * Bernoulli(|g| / s)``.

  Build it with :func:`terngrad`. Supports the shared-scale integer sum
  (``integer_sum = True``, ``max_level = 1``, one scale per array); ``encode`` is
  ``quantize`` under this device's own ``scales`` followed by packing, so the per-device
  codec and the integer-sum aggregation share one implementation.

  Attributes:
    clip_factor: ``c`` of the ``c * sigma`` clipping, or None for no clipping.
    unbiased: True exactly when ``clip_factor`` is None (clipping is biased).

  Example:
    >>> c = terngrad()
    >>> x = jnp.array([0.5, -1.0, 0.0])   # scaler max|x| = 1: values in {-1, 0, 1}
    >>> c(jax.random.key(0), x)            # x_0 survives with probability 1/2
    Array([ 0., -1.,  0.], dtype=float32)

  References:
    Wen, Xu, Yan, Wu, Wang, Chen, Li, "TernGrad: Ternary Gradients to Reduce
    Communication in Distributed Deep Learning", NeurIPS 2017, arXiv 1705.07878.
  """

  name = "terngrad"
  integer_sum = True
  max_level = 1

  def __init__(self, clip_factor: float | None = None):
    if clip_factor is not None:
      clip_factor = _checks.number("clip_factor", clip_factor, low=0.0, low_open=True)
    self.clip_factor = clip_factor

  @property
  def unbiased(self) -> bool:
    """True without clipping: ``E[decode(encode(key, x))] = x``."""
    return self.clip_factor is None

  # --- Shared-scale integer levels -------------------------------------------------------

  def num_scales(self, shape):
    """One scaler per array, whatever its shape."""
    del shape
    return 1

  def scales(self, x):
    """This device's scaler as float32 ``[1]``.

    Args:
      x: float32 or bfloat16 array of any shape.

    Returns:
      ``[max|x|]`` without clipping, ``[clip_factor * std(x)]`` (population std) with it.
    """
    x = jnp.asarray(x)
    flat = jnp.ravel(x).astype(jnp.float32)
    if self.clip_factor is None:
      scale = jnp.max(jnp.abs(flat), initial=0.0)
    elif flat.shape[0] == 0:
      scale = jnp.zeros((), jnp.float32)
    else:
      # std without overflow of its squares; capped at the largest value of x's dtype,
      # which is >= max|x|, so the cap clips nothing and the decoded s * t stays finite.
      top = min(float(jnp.finfo(x.dtype).max), float(jnp.finfo(jnp.float32).max))
      scale = jnp.minimum(self.clip_factor * base.std(flat), top)
    return base.poison(scale, base.all_finite(flat)).reshape(1)

  def quantize(self, key, x, scales):
    """Ternary levels of ``x`` under the given scaler.

    Args:
      key: a PRNG key (a 16-bit uniform per coordinate, four per Threefry block).
      x: float32 or bfloat16 array of any shape, ``d`` elements.
      scales: float32 ``[1]``, the scaler ``s``; may exceed this device's own (a shared
        ``pmax``). Coordinates are clipped to ``[-s, s]`` first, which is a no-op without
        clipping whenever ``s >= max|x|``.

    Returns:
      int32 ``[d]`` levels ``t_k`` in ``{-1, 0, 1}`` with ``P(t_k != 0) = |x_k| / s`` (after
      clipping) to within ``2^-17``; all zero when ``s = 0``.
    """
    flat = jnp.ravel(jnp.asarray(x)).astype(jnp.float32)
    symbols = threefry.unpacked_fields(threefry.key_words(key), flat, SYMBOL_BITS,
                                       _symbol_fn(scales))
    return symbols.astype(jnp.int32) - 1

  def dequantize(self, levels, scales, shape, dtype):
    """``scales[0] * levels`` reshaped to ``shape`` and cast to ``dtype``.

    Args:
      levels: int32 ``[d]``, one device's levels or a sum of several devices' levels.
      scales: float32 ``[1]``, the scaler they were quantized with.
      shape: the output shape (``d`` elements).
      dtype: the output dtype.

    Returns:
      Array of ``shape`` and ``dtype``.
    """
    values = scales[0] * levels.astype(jnp.float32)
    return values.reshape(shape).astype(dtype)

  # --- Codec -----------------------------------------------------------------------------

  def encode(self, key, x):
    """Ternarizes ``x`` under its own scaler and packs the 2-bit symbols.

    Args:
      key: a PRNG key.
      x: float32 or bfloat16 array of any shape.

    Returns:
      A :class:`TernGradCode`.
    """
    x = jnp.asarray(x)
    scale = self.scales(x)
    flat = jnp.ravel(x).astype(jnp.float32)
    words = threefry.pack_fields(threefry.key_words(key), flat, SYMBOL_BITS,
                                 _symbol_fn(scale))
    return TernGradCode(words=words, scale=scale, shape=tuple(x.shape), dtype=x.dtype)

  def decode(self, code):
    """Unpacks the symbols and returns ``scale * t`` in the original shape and dtype."""
    d = base.num_elements(code.shape)
    levels = bitpack.unpack(code.words, SYMBOL_BITS, d).astype(jnp.int32) - 1
    return self.dequantize(levels, code.scale, code.shape, code.dtype)

  def wire_bits(self, shape):
    return 32 * bitpack.packed_words(base.num_elements(shape), SYMBOL_BITS) + 32


def _symbol_fn(scales):
  """``field(v, u16, index)`` for ``threefry.pack_fields``: the symbol ``t + 1`` of each
  coordinate ``v`` under the scaler ``scales[0]``, ``t`` nonzero with probability
  ``min(|v|, s) / s`` to within ``2^-17`` (``threefry.bernoulli16``)."""
  s = scales[0]
  safe = jnp.where(s > 0, s, 1.0)  # s = 0 forces mag = 0, so prob = 0: no NaN

  def symbol(v, u16, index):
    del index
    prob = jnp.minimum(jnp.abs(v), s) / safe
    # A NaN scaler (non-finite input) or an Inf shared one: level 0, the scaler carries it.
    prob = jnp.where(jnp.isfinite(prob), prob, 0.0)
    fire = threefry.bernoulli16(u16, prob)
    return jnp.where(fire, jnp.where(v < 0, 0, 2), 1).astype(jnp.uint32)

  return symbol


def terngrad(clip_factor: float | None = None) -> TernGrad:
  """Builds TernGrad's ternary quantizer with one scaler per array.

  Args:
    clip_factor: None (default) for the unbiased quantizer with scaler ``max|g|``; a
      finite ``c > 0`` (the paper's experiments use 2.5) to clip each array to
      ``[-c sigma, c sigma]`` and use the scaler ``c sigma``, ``sigma`` the population
      standard deviation of the array's entries. Clipping lowers the variance but biases
      entries beyond ``c sigma`` toward zero.

  Returns:
    A :class:`TernGrad` compressor; ``wire_bits((d,))`` is ``32 * ceil(2 d / 32) + 32``.

  Raises:
    ValueError: if ``clip_factor`` is not None and not a finite number > 0.

  Example:
    >>> c = terngrad(clip_factor=2.5)
    >>> c.wire_bits((1000,))   # 63 words of 16 symbols + the scaler
    2048

  References:
    Wen, Xu, Yan, Wu, Wang, Chen, Li, "TernGrad: Ternary Gradients to Reduce
    Communication in Distributed Deep Learning", NeurIPS 2017, arXiv 1705.07878.
  """
  return TernGrad(clip_factor)
