"""Random-k sparsification: send k uniformly chosen coordinates, rescaled by d / k.

Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", NeurIPS 2018 (arXiv 1809.07599).

For a flattened input ``x`` of ``d`` coordinates, a set ``S`` of ``k`` distinct indices is
drawn uniformly (every ``k``-subset equally likely) and ``C(x)_i = (d / k) x_i`` for ``i``
in ``S``, 0 elsewhere. Each index is in ``S`` with probability ``k / d``, so ``C`` is
unbiased, and its exact variance is ``E||C(x) - x||^2 = (d / k - 1) ||x||^2``.

Non-finite input: if ``x`` holds NaN or Inf anywhere (chosen or not), every sent value is
NaN, so the code never drops it. The rescaled values ``(d / k) x_i`` exceed the float32
range when ``|x_i| > 3.4e38 k / d``; such an estimate decodes to Inf, not to a wrong
finite value.

The index set is the codec's common randomness (see ``base``): the receiver regenerates it
instead of receiving ``k`` indices. Unbound, the code carries a uint32 ``seed`` drawn from
the encode key and ``S`` comes from ``jax.random.key(seed)``: ``32 k + 32`` bits. Bound to a
``common_key`` that every device knows, ``S`` comes from that key and the code is the
``k`` float32 values alone: ``32 k`` bits.
"""

from __future__ import annotations

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jrelu.compressors import base
from jrelu.compressors._sparse import kept_count, validate_k_or_fraction


def sample_indices(index_key: jax.Array, size: int, k: int) -> jax.Array:
  """Draws ``k`` distinct indices of ``range(size)``, every ``k``-subset equally likely.

  The first ``k`` entries of ``jax.random.permutation(index_key, size)``: a fixed-shape,
  O(size log size) draw (JAX shuffles by sorting on random 32-bit keys, repeated enough
  rounds that ties do not bias the order). Encode and decode both call this function, so
  the same key gives the same indices on both sides.

  Args:
    index_key: a typed PRNG key (a scalar key array).
    size: number of elements to choose from.
    k: how many to choose, ``0 <= k <= size``.

  Returns:
    int32 ``[k]``, distinct, in random order.

  Example:
    >>> sample_indices(jax.random.key(0), 10, 3).shape
    (3,)
  """
  return jax.random.permutation(index_key, size)[:k].astype(jnp.int32)


@base.code_class
class RandKCode:
  """Wire payload of :class:`RandK`.

  Attributes:
    values: float32 ``[k]``, ``(d / k) x_i`` for the chosen indices, in draw order.
    seed: uint32 ``[1]``, the seed of the index set (unbound codec); None for a bound
      codec, whose index set comes from its common key and is not sent.
    shape: the input's shape (static, not sent).
    dtype: the input's dtype (static, not sent).
  """
  values: jax.Array
  seed: jax.Array | None
  shape: tuple = dataclasses.field(metadata={"static": True})
  dtype: np.dtype = dataclasses.field(metadata={"static": True})


class RandK(base.Compressor):
  """Random-k sparsifier with ``d / k`` rescaling (unbiased, variance ``(d/k - 1)||x||^2``).

  Build it with :func:`rand_k`; :meth:`bind` makes the index set common to all devices.

  Unbound: ``unbiased`` is True (over the encode key) and codes do not commute with sum
  (each device draws its own index set). A bound copy takes its index set from the
  common key only, so for that fixed key it is a deterministic linear map of ``x``: its
  ``unbiased`` is False (it is unbiased over the common key, which the aggregation draws
  afresh every step).

  Attributes:
    k: the configured count, or None when ``fraction`` is used.
    fraction: the configured share, or None when ``k`` is used.
    common_key: None (unbound) or the key given to :meth:`bind`.

  References:
    Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", NeurIPS 2018,
    arXiv 1809.07599.
  """

  name = "rand_k"
  unbiased = True

  def __init__(self, k: int | None = None, fraction: float | None = None):
    self.k, self.fraction = validate_k_or_fraction(k, fraction)
    self.common_key = None

  def num_kept(self, shape) -> int:
    """Coordinates kept for an input of ``shape`` (see ``_sparse.kept_count``)."""
    return kept_count(self.k, self.fraction, base.num_elements(shape))

  def bind(self, common_key):
    """Returns a copy whose index set comes from ``common_key``; no seed is sent.

    Args:
      common_key: a typed PRNG key known to every device (for the aggregation, derived
        from the step key before the device index is folded in). Binding a bound codec
        replaces its key.

    Returns:
      A :class:`RandK` with ``common_key`` set and ``unbiased = False`` (see the class
      docstring); ``wire_bits`` is 32 less.

    Example:
      >>> c = rand_k(10).bind(jax.random.key(7))
      >>> c.wire_bits((1000,))
      320
    """
    bound = copy.copy(self)
    bound.common_key = common_key
    bound.unbiased = False
    return bound

  def _index_key(self, seed):
    if self.common_key is not None:
      return self.common_key
    return jax.random.key(seed[0])

  def encode(self, key, x):
    x = jnp.asarray(x)
    size = base.num_elements(x.shape)
    k = self.num_kept(x.shape)
    if self.common_key is None:
      seed = jax.random.bits(key, (1,), jnp.uint32)
    else:
      del key  # the randomness is the common key's
      seed = None
    indices = sample_indices(self._index_key(seed), size, k)
    flat = jnp.ravel(x).astype(jnp.float32)
    # NaN or Inf anywhere, chosen or not, makes every sent value NaN: never dropped.
    values = base.poison(flat[indices] * np.float32(size / max(k, 1)), base.all_finite(flat))
    return RandKCode(values=values, seed=seed, shape=tuple(x.shape), dtype=x.dtype)

  def decode(self, code):
    size = base.num_elements(code.shape)
    k = code.values.shape[0]
    if (code.seed is None) != (self.common_key is not None):
      raise ValueError(
          "rand_k code and codec disagree on binding: a bound codec decodes codes without "
          "a seed and an unbound one codes with a seed")
    indices = sample_indices(self._index_key(code.seed), size, k)
    flat = jnp.zeros((size,), jnp.float32).at[indices].set(code.values, unique_indices=True)
    return flat.reshape(code.shape).astype(code.dtype)

  def wire_bits(self, shape):
    k = self.num_kept(shape)
    return 32 * k + (32 if self.common_key is None else 0)


def rand_k(k: int | None = None, *, fraction: float | None = None) -> RandK:
  """Builds the random-k sparsifier, unbiased thanks to its ``d / k`` rescaling.

  Give exactly one of ``k`` and ``fraction``. The count applies to each array that is
  encoded (under the ``two_phase`` aggregation, to each chunk of ``ceil(d / N)``
  coordinates; ``fraction`` keeps the same share of every chunk).

  Args:
    k: integer >= 1, coordinates kept per encoded array, clamped to the array's size.
    fraction: number in ``(0, 1]``; keeps ``ceil(fraction * size)`` coordinates (at least
      one) of an array of ``size`` elements.

  Returns:
    An unbound :class:`RandK`: ``wire_bits = 32 k + 32`` (the values and a 32-bit seed of
    the index set); after ``.bind(common_key)``, ``32 k``.

  Raises:
    ValueError: if neither or both of ``k`` and ``fraction`` are given, ``k`` is not an
      integer >= 1, or ``fraction`` is not in ``(0, 1]``.

  Example:
    >>> c = rand_k(fraction=0.25)
    >>> x_hat = c(jax.random.key(0), jnp.arange(8.0))   # 2 of 8 entries, times 4
    >>> int(jnp.count_nonzero(x_hat)) <= 2
    True
    >>> c.wire_bits((8,)), c.bind(jax.random.key(1)).wire_bits((8,))
    (96, 64)

  References:
    Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", NeurIPS 2018,
    arXiv 1809.07599.
  """
  return RandK(k, fraction)
