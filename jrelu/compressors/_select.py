"""Selecting positions without sorting the whole array: the sparsifiers' common tool.

top-k, rand-k and ATOMO each choose a small set of coordinates of a large array. Sorting
all ``d`` coordinates (``jax.lax.top_k``, ``jax.random.permutation``, ``argsort``) costs
about 50 ns per coordinate on XLA CPU, far more than reading them. They instead mark the
coordinates that pass a threshold (one pass, the marks packed 32 per word) and collect the
marked positions, in index order, into a fixed number of slots (:func:`set_positions`):
one prefix sum over the words (``d / 32`` of them), then for every slot a binary search
over that prefix sum and a search for the bit inside its word. Only the few collected
candidates are ranked or sorted afterwards.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jrelu.compressors import bitpack


def _popcount(words):
  return jax.lax.population_count(words).astype(jnp.int32)


def select_bit(word: jax.Array, rank: jax.Array) -> jax.Array:
  """Position (0 to 31) of the ``rank``-th (0-based) set bit of each uint32 ``word``.

  Five halvings: the set bits of the low half are counted, and the search goes on in the
  half that holds the wanted bit. Undefined (but in ``[0, 31]``) when ``word`` has
  ``rank`` or fewer set bits.

  Example:
    >>> int(select_bit(jnp.uint32(0b10110), jnp.int32(1)))
    2
  """
  word = jnp.asarray(word, jnp.uint32)
  rank = jnp.asarray(rank, jnp.int32)
  position = jnp.zeros(jnp.broadcast_shapes(word.shape, rank.shape), jnp.int32)
  for width in (16, 8, 4, 2, 1):
    low = word & np.uint32((1 << width) - 1)
    count = _popcount(low)
    high = rank >= count
    rank = jnp.where(high, rank - count, rank)
    word = jnp.where(high, word >> np.uint32(width), low)
    position = position + jnp.where(high, width, 0)
  return position


def set_positions(words: jax.Array, capacity: int):
  """The positions of the first ``capacity`` set bits of a packed bit stream, in order.

  Bit ``i`` of the stream is bit ``i % 32`` of ``words[i // 32]`` (``bitpack.pack``'s
  layout).

  Args:
    words: uint32 ``[W]``.
    capacity: static number of slots.

  Returns:
    ``(positions, count)``: int32 ``[capacity]``, the increasing positions of the set
    bits and -1 past the last one; and int32 ``count``, the number of set bits (which may
    exceed ``capacity``: then the first ``capacity`` are returned).

  Example:
    >>> positions, count = set_positions(jnp.array([0b101, 1 << 31], jnp.uint32), 4)
    >>> positions.tolist(), int(count)
    ([0, 2, 63, -1], 3)
  """
  words = jnp.asarray(words, jnp.uint32)
  if words.shape[0] == 0 or capacity == 0:
    return jnp.full((capacity,), -1, jnp.int32), jnp.zeros((), jnp.int32)
  counts = _popcount(words)
  inclusive = jnp.cumsum(counts)
  slot = jnp.arange(capacity, dtype=jnp.int32)
  # The word holding set bit number `slot`: the first whose inclusive count exceeds it.
  word = jnp.minimum(jnp.searchsorted(inclusive, slot, side="right"), words.shape[0] - 1)
  rank = slot - (inclusive[word] - counts[word])
  position = word.astype(jnp.int32) * bitpack.WORD_BITS + select_bit(words[word], rank)
  count = inclusive[-1]
  return jnp.where(slot < count, position, -1), count
