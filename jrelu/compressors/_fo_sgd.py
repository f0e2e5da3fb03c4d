"""FO-SGD: flattened one-bit quantization with a uniform dither.

Stollenwerk & Jacques, "Flattened one-bit stochastic gradient descent: compressed
distributed optimization with controlled variance", arXiv 2405.11095 (2024). The codec
follows the scheme the paper's abstract describes (randomized Hadamard flattening, then
dithered one-bit quantization); the details it leaves open are chosen as stated below
(marked "our choice"), so this docstring is the specification.

For a gradient ``g`` with ``d`` coordinates (flattened), ``D = next_power_of_two(d)``:

1. Flatten: ``u = H_D diag(eps) [g; 0]``, with ``eps`` uniform random signs (Rademacher)
   and ``H_D`` the orthonormal Walsh-Hadamard matrix (``jrelu.compressors.hadamard``), so
   ``||u||_2 = ||g||_2`` and, by Hoeffding's inequality over ``eps`` and a union bound,
   ``P(max_i |u_i| > t) <= 2 D exp(-D t^2 / (2 ||g||_2^2))``.
2. Dithered one bit: ``q_i = sign(u_i + tau_i)`` with ``tau_i ~ U[-lam, lam]`` i.i.d.
   When ``|u_i| <= lam``: ``E[lam q_i] = u_i`` and ``Var[lam q_i] = lam^2 - u_i^2``. When
   ``|u_i| > lam`` the bit is always ``sign(u_i)`` (saturation): ``E[lam q_i] = clip(u_i,
   -lam, lam)``, a bias.
3. Send the ``D`` bits and ``lam`` (float32). Decode ``g_hat = (diag(eps) H_D lam q)[:d]``.

Consequences (exact, conditional on ``eps``; derived here): ``E[g_hat | eps] =
(diag(eps) H_D clip(u, -lam, lam))[:d]``, which is ``g`` when nothing saturates, and
``E[||g_hat - E[g_hat | eps]||^2 | eps] = (d / D) sum_i (lam^2 - clip(u_i, -lam, lam)^2)``
(each decoded coordinate gets ``1/D`` of every ``H_D`` row's variance), which without
saturation is ``(d / D) (D lam^2 - ||g||_2^2)``.

Choices where the paper's abstract is silent (our choice, the standard reading):

* ``lam = ||g||_2 * min(1, dither_scale * sqrt(2 ln(2 D) / D))``: proportional to
  ``||g||_2 / sqrt(D)``, the flattened magnitude, with the logarithmic factor of the
  Hoeffding bound. For ``dither_scale = c`` the chance that any coordinate saturates is at
  most ``(2 D)^(1 - c^2)`` for EVERY ``g`` (vacuous at ``c = 1``; ``c = 1.5`` and ``D =
  128`` give ``1e-3``); for a spread-out ``g`` (``u`` nearly Gaussian) the expected number
  of saturated coordinates is about ``(2 D)^(1 - c^2) / (c sqrt(4 pi ln(2 D)))``, 0.12 at
  ``c = 1``, ``D = 128``, and they exceed ``lam`` by a small fraction of it, so the bias is
  small. Capping at ``||g||_2`` is free: ``|u_i| <= ||u||_2 = ||g||_2`` always, so a larger
  range only adds variance. The range is data dependent and sent as one float32.
* The dithers ``tau`` come from the encoder's private ``key`` and are not subtracted at
  the decoder (the decoder needs only the bits and ``lam``); a dither seed shared with
  the decoder would only matter for subtractive dithering, which this codec does not do.
* Random bits: each dither is ``tau_i = lam U_i`` with ``U_i = (m + 1/2) 2^-15 - 1``, ``m`` a
  16-bit uniform (four per Threefry-2x32 block, ``threefry``): ``U_i`` takes ``2^16`` equally
  spaced values of ``[-1, 1)``, so ``P(q_i = +1)`` is within ``2^-17`` of ``(1 + u_i / lam) /
  2`` and ``E[lam q_i]`` within ``2^-16 lam`` of ``clip(u_i, -lam, lam)``: at most ``2^-17``
  of the quantization step ``2 lam``. Exact at ``|u_i| >= lam`` (saturation) and ``lam =
  0``. The signs ``eps`` are single Threefry bits (fair and independent).
* The signs ``eps`` are common randomness (see ``base.Compressor.bind``). Unbound, the code
  carries a uint32 seed drawn from ``key`` and ``eps`` is regenerated from
  ``jax.random.key(seed)``; bound, ``eps`` comes from the common key and is not sent.
* Non-finite input: ``lam`` is NaN when ``g`` holds NaN or Inf, so the code decodes to
  NaN. ``||g||_2`` is computed on ``g`` scaled by a power of two, so it does not overflow
  for finite ``g``.
* Zero padding up to ``D``, and truncation of the decoded vector back to ``d``.
* The server-side re-quantization of the paper's parameter-server loop is the ``two_phase``
  aggregation of ``jrelu.aggregation`` (re-encode of the averaged chunk).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jrelu import _checks
from jrelu.compressors import base
from jrelu.compressors import bitpack
from jrelu.compressors import hadamard
from jrelu.compressors import threefry


@base.code_class
class FOSGDCode:
  """Wire payload of :class:`FOSGD`.

  Attributes:
    words: uint32 ``[ceil(D / 32)]``, the ``D`` dithered sign bits (1 = ``+lam``), packed
      one bit each by ``bitpack.pack``.
    dither_range: float32 ``[1]``, the dither range ``lam`` (0 for a zero input).
    shape: the input's shape (static, not sent).
    dtype: the input's dtype (static, not sent).
    seed: uint32 ``[1]`` from which the random signs are regenerated (unbound codec), or
      None when the codec is bound to a common key (then nothing is sent for the signs).
  """
  words: jax.Array
  dither_range: jax.Array
  shape: tuple = dataclasses.field(metadata={"static": True})
  dtype: np.dtype = dataclasses.field(metadata={"static": True})
  seed: jax.Array | None = None


def flatten(x: jax.Array, signs: jax.Array) -> jax.Array:
  """The randomized Hadamard flattening ``u = H_D diag(signs) [x; 0]``.

  Args:
    x: floating array of any shape with ``d <= D`` elements; it is flattened, cast to
      float32 and zero padded to ``D``.
    signs: float32 ``[D]`` of ``+-1``, ``D`` a power of two.

  Returns:
    float32 ``[D]``. ``||u||_2 = ||x||_2``, and ``|u_i| = ||x||_2 / sqrt(D)`` for every
    ``i`` when ``x`` is 1-sparse.

  Raises:
    ValueError: if ``D`` is not a power of two or is smaller than ``x.size``.

  Example:
    >>> flatten(jnp.array([3.0, 0.0, 0.0]), jnp.ones(4))
    Array([1.5, 1.5, 1.5, 1.5], dtype=float32)

  References:
    Ailon & Chazelle, "The Fast Johnson-Lindenstrauss Transform and Approximate Nearest
    Neighbors", SIAM J. Computing 39(1), 2009 (no arXiv id).
  """
  flat = jnp.ravel(jnp.asarray(x)).astype(jnp.float32)
  size = signs.shape[-1]
  if flat.shape[0] > size:
    raise ValueError(f"flatten needs len(signs) >= x.size, got {size!r} < {flat.shape[0]}")
  return hadamard.fwht(signs * jnp.pad(flat, (0, size - flat.shape[0])))


def unflatten(u: jax.Array, signs: jax.Array, size: int) -> jax.Array:
  """Inverse of :func:`flatten`: ``(diag(signs) H_D u)[:size]`` (float32 ``[size]``).

  Args:
    u: float32 ``[D]``, ``D`` a power of two.
    signs: float32 ``[D]`` of ``+-1``, the signs used by :func:`flatten`.
    size: number of leading coordinates to keep (the unpadded ``d``).

  Returns:
    float32 ``[size]``; ``unflatten(flatten(x, s), s, x.size) == ravel(x)`` up to rounding.

  Raises:
    ValueError: if ``D`` is not a power of two.

  Example:
    >>> unflatten(jnp.array([1.5, 1.5, 1.5, 1.5]), jnp.ones(4), 3)
    Array([3., 0., 0.], dtype=float32)
  """
  return (signs * hadamard.fwht(jnp.asarray(u, jnp.float32)))[:size]


def dithered_sign(key: jax.Array, u: jax.Array, dither_range: jax.Array) -> jax.Array:
  """One-bit quantizer with uniform dither: ``sign(u + tau)``, ``tau ~ U[-lam, lam]``.

  With ``lam = dither_range``: ``P(+1) = (1 + u / lam) / 2`` for ``|u| <= lam`` (to within
  ``2^-17``: ``tau`` is ``lam`` times one of ``2^16`` equally spaced points of ``[-1, 1)``, see
  the module docstring), so ``E[lam * sign(u + tau)] = u`` (to within ``2^-16 lam``) and
  ``Var[lam * sign(u + tau)] = lam^2 - u^2``; for
  ``|u| > lam`` the output is always ``sign(u)`` (saturation). A tie ``u + tau == 0``
  (probability zero unless ``lam = 0``) gives ``+1``; with ``lam = 0`` the output is
  ``sign(u)`` with ``+1`` at ``u = 0``.

  Args:
    key: PRNG key of the dithers (private to the encoder).
    u: float32 array of any shape.
    dither_range: non-negative float32 scalar (or broadcastable to ``u``), ``lam``.

  Returns:
    float32 array of ``+-1`` with the shape of ``u``.

  Example:
    >>> q = dithered_sign(jax.random.key(0), jnp.full(100_000, 0.25), 1.0)
    >>> float(q.mean())   # ~0.25

  References:
    Roberts, "Picture coding using pseudo-random noise", IRE Trans. Information Theory
    8(2), 1962 (dithered quantization; no arXiv id); Stollenwerk & Jacques, arXiv
    2405.11095.
  """
  u = jnp.asarray(u, jnp.float32)
  bits = threefry.unpacked_fields(threefry.key_words(key), jnp.ravel(u), 1,
                                  _dither_fn(dither_range))
  return (2.0 * bits.astype(jnp.float32) - 1.0).reshape(u.shape)


def _dither_fn(dither_range):
  """``field(u, u16, index)`` for ``threefry.pack_fields``: the bit ``u + tau >= 0`` with
  ``tau = lam U``, ``U = (u16 + 1/2) 2^-15 - 1`` uniform on ``2^16`` points of ``[-1, 1)``."""
  lam = jnp.asarray(dither_range, jnp.float32)

  def bit(u, u16, index):
    del index
    dither = (u16.astype(jnp.float32) + np.float32(0.5)) * np.float32(2.0 ** -15) - 1.0
    return (u + lam * dither >= 0).astype(jnp.uint32)

  return bit


class FOSGD(base.Compressor):
  """Flattened one-bit SGD codec: Hadamard flattening, then dithered one-bit signs.

  Build it with :func:`fo_sgd`; see the module docstring for the algorithm, the exact
  conditional mean and variance, and which details are reconstructed. ``unbiased`` is
  False (saturated coordinates are clipped to ``+-lam``; without saturation the codec is
  exactly unbiased). The random signs are common randomness: :meth:`bind` moves them from
  a per-code seed to a key shared by all devices, which saves the 32-bit seed.

  Attributes:
    dither_scale: the factor ``c`` of the dither range rule.
    common_key: the bound common key, or None for an unbound codec.

  References:
    Stollenwerk & Jacques, "Flattened one-bit stochastic gradient descent: compressed
    distributed optimization with controlled variance", arXiv 2405.11095 (2024).
  """

  name = "fo_sgd"
  unbiased = False

  def __init__(self, dither_scale: float = 1.0, common_key: jax.Array | None = None):
    dither_scale = _checks.number("dither_scale", dither_scale, low=0.0, low_open=True)
    if common_key is not None and not isinstance(common_key, jax.Array):
      raise ValueError(f"common_key must be a JAX PRNG key array, got {common_key!r}")
    self.dither_scale = float(dither_scale)
    self.common_key = common_key

  @property
  def bound(self) -> bool:
    """Whether the random signs come from a common key (no seed in the code)."""
    return self.common_key is not None

  def bind(self, common_key: jax.Array) -> "FOSGD":
    """Returns a copy that draws the random signs from ``common_key`` (no seed sent).

    Args:
      common_key: a PRNG key that every device (sender and receivers) holds; it may be a
        tracer inside a jitted step. The same signs are used for every code the bound
        copy makes, including every chunk of a ``vmap`` over chunks.

    Returns:
      A new :class:`FOSGD` with the same ``dither_scale``; ``self`` is unchanged.

    Example:
      >>> c = fo_sgd().bind(jax.random.key(5))
      >>> c.wire_bits((125,))   # 128 bits + float32 lam
      160
    """
    return FOSGD(self.dither_scale, common_key=common_key)

  def range_factor(self, padded_size: int) -> float:
    """The dither range per unit gradient norm, ``lam / ||g||_2``.

    Args:
      padded_size: ``D``, the power of two the gradient is padded to.

    Returns:
      ``min(1, dither_scale * sqrt(2 ln(2 D) / D))`` as a Python float (our choice of rule, see the
      module docstring).

    Example:
      >>> round(fo_sgd().range_factor(128), 4)
      0.2944
    """
    return min(1.0, self.dither_scale * math.sqrt(2.0 * math.log(2.0 * padded_size)
                                                  / padded_size))

  def signs(self, padded_size: int, seed: jax.Array | None = None) -> jax.Array:
    """The random signs ``eps`` of the flattening, as sender and receiver both draw them.

    Args:
      padded_size: ``D``.
      seed: uint32 ``[1]`` from an unbound code (the signs are Rademacher draws under
        ``jax.random.key(seed[0])``); must be None for a bound codec, whose signs are
        Rademacher draws under ``common_key``.

    Returns:
      float32 ``[padded_size]`` of ``+-1``.

    Raises:
      ValueError: if ``seed`` is given to a bound codec or missing for an unbound one.

    Example:
      >>> c = fo_sgd()
      >>> code = c.encode(jax.random.key(0), jnp.ones(100))
      >>> eps = c.signs(128, code.seed)   # what decode uses
    """
    if self.bound:
      if seed is not None:
        raise ValueError("a bound fo_sgd draws its signs from the common key; got a code "
                         "with a seed (made by an unbound fo_sgd)")
      key = self.common_key
    else:
      if seed is None:
        raise ValueError("an unbound fo_sgd needs the code's seed; got a code without one "
                         "(made by a bound fo_sgd: decode it with that bound codec)")
      key = jax.random.key(seed[0])
    # Coin i (bit i % 32 of word i // 32): a fair, independent sign per coordinate.
    words = threefry.coin_words(threefry.key_words(key), -(-padded_size // 32))
    bit = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    return 1.0 - 2.0 * bit.reshape(-1)[:padded_size].astype(jnp.float32)

  def encode(self, key, x):
    x = jnp.asarray(x)
    size = base.num_elements(x.shape)
    padded = hadamard.next_power_of_two(size)
    flat = jnp.ravel(x).astype(jnp.float32)
    seed_key, dither_key = jax.random.split(key)
    seed = None if self.bound else jax.random.bits(seed_key, (1,), jnp.uint32)
    u = flatten(flat, self.signs(padded, seed))
    # ||g||_2 without overflow of the squares; NaN for a non-finite g, so it decodes to NaN.
    lam = base.l2_norm(flat) * jnp.float32(self.range_factor(padded))
    lam = base.poison(lam, base.all_finite(flat))
    # The dithered signs (dithered_sign's bits), packed as they are drawn.
    words = threefry.pack_fields(threefry.key_words(dither_key), u, 1, _dither_fn(lam))
    return FOSGDCode(words=words, dither_range=lam.reshape(1),
                     shape=tuple(x.shape), dtype=x.dtype, seed=seed)

  def decode(self, code):
    size = base.num_elements(code.shape)
    padded = hadamard.next_power_of_two(size)
    bits = bitpack.unpack(code.words, 1, padded)
    lam = code.dither_range[0]
    v = jnp.where(bits == 1, lam, -lam)
    g_hat = unflatten(v, self.signs(padded, code.seed), size)
    return g_hat.reshape(code.shape).astype(code.dtype)

  def wire_bits(self, shape):
    padded = hadamard.next_power_of_two(base.num_elements(shape))
    return 32 * bitpack.packed_words(padded, 1) + 32 + (0 if self.bound else 32)


def fo_sgd(dither_scale: float = 1.0) -> FOSGD:
  """Builds the FO-SGD codec (flattened, dithered one-bit), unbound.

  A gradient of ``d`` coordinates costs ``D = next_power_of_two(d)`` bits, one float32
  dither range and, unless the codec is bound to a common key with ``.bind(key)``, one
  uint32 seed for the random signs: ``32 ceil(D / 32) + 32 (+ 32)`` bits.

  Args:
    dither_scale: ``c > 0`` in the dither range rule ``lam = ||g||_2 min(1, c sqrt(2 ln(2
      D) / D))`` (our choice, see the module docstring). Larger ``c`` makes saturation (bias)
      rarer, at most ``(2 D)^(1 - c^2)`` likely, and raises the variance
      ``(d / D)(D lam^2 - ||g||^2) = (d / D)(2 c^2 ln(2 D) - 1) ||g||^2``. The default
      1.0 puts ``lam`` at the typical maximum of ``|u_i|``: about 0.1 saturated coordinates
      per code for a spread-out gradient, and a variance of ``(2 ln(2 D) - 1) ||g||^2``
      when ``d = D`` (10.1 ``||g||^2`` for ``D = 128``).

  Returns:
    An unbound :class:`FOSGD` (call ``.bind(common_key)`` to share the signs).

  Raises:
    ValueError: if ``dither_scale`` is not a finite number > 0.

  Example:
    >>> c = fo_sgd()
    >>> code = c.encode(jax.random.key(0), jnp.ones(1000))
    >>> c.wire_bits((1000,))   # 1024 sign bits + lam + seed
    1088
    >>> c.bind(jax.random.key(1)).wire_bits((1000,))
    1056

  References:
    Stollenwerk & Jacques, "Flattened one-bit stochastic gradient descent: compressed
    distributed optimization with controlled variance", arXiv 2405.11095 (2024).
  """
  return FOSGD(dither_scale)
