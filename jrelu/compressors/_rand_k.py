"""Random-k sparsification: send k uniformly chosen coordinates, rescaled by d / k.

Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", NeurIPS 2018 (arXiv 1809.07599).

For a flattened input ``x`` of ``d`` coordinates, a set ``S`` of ``k`` distinct indices is
drawn uniformly (every ``k``-subset equally likely) and ``C(x)_i = (d / k) x_i`` for ``i``
in ``S``, 0 elsewhere. Each index is in ``S`` with probability ``k / d``, so ``C`` is
unbiased, and its exact variance is ``E||C(x) - x||^2 = (d / k - 1) ||x||^2``. The set is
drawn without sorting the ``d`` coordinates for large arrays (:func:`sample_indices`:
random candidates, then the ``k`` with the smallest random keys), and as the first ``k``
of a random permutation for small ones.

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
import math

import jax
import jax.numpy as jnp
import numpy as np

from jrelu.compressors import _select
from jrelu.compressors import base
from jrelu.compressors import bitpack
from jrelu.compressors import threefry
from jrelu.compressors._sparse import kept_count, validate_k_or_fraction


# Below MIN_SIZE coordinates, or when more than MAX_SHARE of them are kept, the index set
# is the first k entries of a random permutation (a sort of all the coordinates).
MIN_SIZE = 1 << 16
MAX_SHARE = 1 / 16
# Candidates pass with probability p = THRESHOLD / 256, an 8-bit lane per coordinate.
_LANE_BITS = 8
_LANES = 256


def _candidate_layout(size: int, k: int) -> tuple[int, int]:
  """``(threshold, capacity)``: the smallest ``p = threshold / 256`` whose ``Binomial(size,
  p)`` count of candidates is at least ``k`` but with probability below ``1e-9`` (6
  standard deviations), and room for that count plus 7 standard deviations."""
  threshold = 1
  while True:
    mean = size * threshold / _LANES
    sd = math.sqrt(mean * (1 - threshold / _LANES))
    if mean - 6 * sd >= k or threshold == _LANES:
      break
    threshold += 1
  return threshold, min(size, math.ceil(mean + 7 * sd) + 64)


def _candidate_words(key_pair, size: int, threshold: int, attempt):
  """uint32 ``[ceil(size / 32)]``: bit ``i`` set with probability ``threshold / 256``,
  independently for every coordinate ``i`` (byte ``i % 8`` of Threefry block
  ``(i // 32, 4 attempt + (i % 32) // 8)``), 0 past ``size``."""
  k0, k1 = key_pair
  rows = -(-size // 32)
  row = jax.lax.iota(jnp.uint32, rows)
  words = None
  for j in range(4):
    column = jnp.full((rows,), 4 * attempt + j, jnp.uint32)
    y0, y1 = threefry.threefry2x32(k0, k1, row, column)
    for b in range(8):
      byte = ((y0 if b < 4 else y1) >> np.uint32(8 * (b % 4))) & np.uint32(0xFF)
      bit = (byte < threshold).astype(jnp.uint32) << np.uint32(8 * j + b)
      words = bit if words is None else words | bit
  if size % 32:  # no candidates past the end
    words = words & jnp.where(row == rows - 1, np.uint32((1 << (size % 32)) - 1),
                              np.uint32(0xFFFFFFFF))
  return base.materialize(words)


def _smallest_keys(key_pair, candidates, valid, k: int):
  """bool mask of the ``k`` candidates with the smallest 64-bit keys (Threefry block
  ``(position, 2^32 - 1)`` of each, distinct because the block function is a bijection of
  the counter): a uniformly random ``k``-subset of the valid candidates, found by a
  binary search for the ``k``-th smallest key, 64 counting passes over the candidates."""
  y0, y1 = threefry.threefry2x32(key_pair[0], key_pair[1],
                                 jnp.maximum(candidates, 0).astype(jnp.uint32),
                                 jnp.full(candidates.shape, 0xFFFFFFFF, jnp.uint32))
  top = np.uint32(0xFFFFFFFF)
  y0, y1 = jnp.where(valid, y0, top), jnp.where(valid, y1, top)

  def below(t0, t1):  # number of keys (y0, y1) < (t0, t1), lexicographically
    return jnp.sum(((y0 < t0) | ((y0 == t0) & (y1 < t1))).astype(jnp.int32))

  def step(b, bound):  # the largest (t0, t1) with fewer than k keys below it
    t0, t1 = bound
    hi = b < 32
    bit = jnp.left_shift(np.uint32(1), (31 - b % 32).astype(jnp.uint32))
    c0 = jnp.where(hi, t0 | bit, t0)
    c1 = jnp.where(hi, t1, t1 | bit)
    take = below(c0, c1) < k
    return jnp.where(take, c0, t0), jnp.where(take, c1, t1)

  t0, t1 = jax.lax.fori_loop(0, 64, step, (jnp.uint32(0), jnp.uint32(0)))
  return (y0 < t0) | ((y0 == t0) & (y1 <= t1))


def sample_indices(index_key: jax.Array, size: int, k: int) -> jax.Array:
  """Draws ``k`` distinct indices of ``range(size)``, every ``k``-subset equally likely.

  Encode and decode both call this function, so the same key gives the same indices on
  both sides.

  * Below ``MIN_SIZE`` coordinates, or for ``k > MAX_SHARE * size``: the first ``k``
    entries of ``jax.random.permutation(index_key, size)``, in random order (a sort of
    ``size`` random keys).
  * Otherwise, in increasing order, without sorting: every coordinate becomes a
    candidate independently with probability ``p = t / 256`` (one byte of Threefry output
    per coordinate, ``_candidate_words``), ``p`` chosen so that fewer than ``k``
    candidates is a 6-sigma event; the candidates are collected into a fixed number of
    slots (``_select.set_positions``); if there are fewer than ``k``, or more than the
    slots, the draw is repeated with fresh bits (a loop that runs zero times otherwise).
    Given ``n`` candidates, they are a uniform ``n``-subset (independent, equal
    probabilities), so ``k`` of them chosen uniformly are a uniform ``k``-subset: the
    ``k`` with the smallest 64-bit Threefry keys (``_smallest_keys``; the keys of
    distinct coordinates are distinct). Each index is in the set with probability
    exactly ``k / size`` (for ideal random bits, as for the permutation).

  Args:
    index_key: a typed PRNG key (a scalar key array).
    size: number of elements to choose from.
    k: how many to choose, ``0 <= k <= size``.

  Returns:
    int32 ``[k]``, distinct.

  Example:
    >>> sample_indices(jax.random.key(0), 10, 3).shape
    (3,)
  """
  if size < MIN_SIZE or k > MAX_SHARE * size or k == 0:
    return jax.random.permutation(index_key, size)[:k].astype(jnp.int32)
  key_pair = threefry.key_words(index_key)
  threshold, capacity = _candidate_layout(size, k)

  def draw(attempt):
    words = _candidate_words(key_pair, size, threshold, attempt)
    positions, count = _select.set_positions(words, capacity)
    return attempt, positions, count

  def missed(state):
    _, _, count = state
    return (count < k) | (count > capacity)

  _, candidates, count = jax.lax.while_loop(missed, lambda state: draw(state[0] + 1),
                                            draw(jnp.uint32(0)))
  chosen = _smallest_keys(key_pair, candidates, candidates >= 0, k)
  slots, _ = _select.set_positions(bitpack.pack(chosen, 1), k)
  return candidates[slots]


@base.code_class
class RandKCode:
  """Wire payload of :class:`RandK`.

  Attributes:
    values: float32 ``[k]``, ``(d / k) x_i`` for the chosen indices, in the order
      ``sample_indices`` returns them (increasing for large arrays).
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
