"""Top-k sparsification: send the k largest-magnitude coordinates and their indices.

Aji & Heafield, "Sparse Communication for Distributed Gradient Descent", EMNLP 2017
(arXiv 1704.05021); Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", NeurIPS 2018
(arXiv 1809.07599).

For a flattened input ``x`` of ``d`` coordinates, ``C(x)`` keeps ``x_i`` for the ``k``
indices of largest ``|x_i|`` and zeroes the rest. It is deterministic and biased, and a
``delta = k / d`` contraction: ``||C(x) - x||^2`` is the sum of the ``d - k`` smallest
``x_i^2``, which is at most ``(1 - k / d) ||x||^2`` (the smallest ``d - k`` squares average
no more than all ``d`` do). It is meant to be used with error feedback (memory).

Non-finite input: if ``x`` holds NaN or Inf, every sent value is NaN.

Wire format: the kept values as float32 ``[k]`` and their flat indices, each in a field of
``bits_for(d) = ceil(log2 d)`` bits (at least 1), packed densely into uint32 words.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jrelu.compressors import base
from jrelu.compressors import _select
from jrelu.compressors import bitpack
from jrelu.compressors._sparse import kept_count, validate_k_or_fraction


@base.code_class
class TopKCode:
  """Wire payload of :class:`TopK`.

  Attributes:
    values: float32 ``[k]``, the kept coordinates of ``x`` (largest magnitude first).
    words: uint32 ``[packed_words(k, bits_for(d))]``, their flat indices, packed.
    shape: the input's shape (static, not sent).
    dtype: the input's dtype (static, not sent).
  """
  values: jax.Array
  words: jax.Array
  shape: tuple = dataclasses.field(metadata={"static": True})
  dtype: np.dtype = dataclasses.field(metadata={"static": True})


class TopK(base.Compressor):
  """Top-k sparsifier: keeps the ``k`` coordinates of largest magnitude.

  Build it with :func:`top_k`. Deterministic (the key is ignored), biased (``unbiased``
  is False), a ``k / d`` contraction; codes do not commute with sum (each device keeps
  its own indices). Ties in ``|x|`` are broken towards the lowest flat index, the rule of
  ``jax.lax.top_k``.

  Attributes:
    k: the configured count, or None when ``fraction`` is used.
    fraction: the configured share, or None when ``k`` is used.

  References:
    Aji & Heafield, "Sparse Communication for Distributed Gradient Descent", EMNLP 2017,
    arXiv 1704.05021. Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory",
    NeurIPS 2018, arXiv 1809.07599.
  """

  name = "top_k"
  unbiased = False

  def __init__(self, k: int | None = None, fraction: float | None = None):
    self.k, self.fraction = validate_k_or_fraction(k, fraction)

  def num_kept(self, shape) -> int:
    """Coordinates kept for an input of ``shape`` (see :func:`kept_count`)."""
    return kept_count(self.k, self.fraction, base.num_elements(shape))

  def encode(self, key, x):
    del key  # deterministic
    x = jnp.asarray(x)
    size = base.num_elements(x.shape)
    flat = jnp.ravel(x).astype(jnp.float32)
    indices = top_indices(flat, self.num_kept(x.shape))
    # NaN or Inf anywhere makes every sent value NaN (top_k's order of NaN is not to be
    # relied on to pick it).
    return TopKCode(values=base.poison(flat[indices], base.all_finite(flat)),
                    words=base.materialize(bitpack.pack(indices, _index_bits(size))),
                    shape=tuple(x.shape), dtype=x.dtype)

  def decode(self, code):
    size = base.num_elements(code.shape)
    k = code.values.shape[0]
    indices = bitpack.unpack(code.words, _index_bits(size), k).astype(jnp.int32)
    flat = jnp.zeros((size,), jnp.float32).at[indices].set(code.values, unique_indices=True)
    return flat.reshape(code.shape).astype(code.dtype)

  def wire_bits(self, shape):
    size = base.num_elements(shape)
    k = self.num_kept(shape)
    return 32 * k + 32 * bitpack.packed_words(k, _index_bits(size))


# The threshold of top_indices comes from the largest entries of a strided sample of this
# many coordinates; below MIN_SIZE coordinates, or when more than MAX_SHARE of them are
# kept, jax.lax.top_k on the whole array is as fast.
SAMPLE = 1 << 16
MIN_SIZE = 1 << 16
MAX_SHARE = 1 / 16


def top_indices(x: jax.Array, k: int) -> jax.Array:
  """``jax.lax.top_k(jnp.abs(x), k)[1]`` (the same indices in the same order), without
  sorting ``|x|``.

  The candidates of :func:`candidates` when they hold the answer; otherwise (a sample
  that misrepresents ``|x|``) ``jax.lax.top_k`` of all of ``|x|``, in a loop that runs
  zero times when the candidates suffice (a ``cond`` would run both branches under
  ``vmap``, where XLA CPU sorts each row in full). ``|x|`` is computed where it is read,
  never written out: an array captured by a loop is written to memory first, which cost
  16 ms of a 72 ms top-k call at d = 1e7 on the 2-core development VM.

  Args:
    x: float32 ``[d]``, ranked by magnitude; NaN anywhere makes the indices unspecified
      (:class:`TopK` sends NaN values for such input).
    k: static, ``1 <= k <= d``.

  Returns:
    int32 ``[k]``.
  """
  d = x.shape[0]
  if d < MIN_SIZE or k > MAX_SHARE * d:
    return jax.lax.top_k(jnp.abs(x), k)[1]
  fast, missed = candidates(x, k)

  def fallback(state):
    # The loop's body runs only when `missed` is True, so this is top_k of |x|; reading
    # `missed` keeps XLA from hoisting the top_k out of the loop as loop-invariant work
    # (which would run it, a full sort under vmap, on every call).
    return False, jax.lax.top_k(jnp.where(state[0], jnp.abs(x), -1.0), k)[1]

  return jax.lax.while_loop(lambda state: state[0], fallback, (missed, fast))[1]


def candidates(x: jax.Array, k: int):
  """The top ``k`` of ``a = |x|`` ranked from a few candidates, and whether that failed.

  A threshold ``t`` is taken from a strided sample of at most ``SAMPLE`` entries spread
  over all of ``a`` (every ``sample_stride(d)``-th): the ``k_s``-th largest of them,
  ``k_s`` the sample's expected share of the top ``k`` plus 5 standard deviations. The
  entries ``> t`` (one pass) are collected in index order into ``C`` slots
  (``_select.set_positions``; ``C`` their expected count plus 6 standard deviations) and
  ranked by ``jax.lax.top_k``; the first ``k`` entries ``== t``, in index order, fill the
  places left. That is the answer when at most ``C`` entries exceed ``t`` and at least
  ``k`` reach it: every entry above ``t`` is a candidate, the ties at ``t`` can only fill
  the last places, and ranking the candidates in index order breaks ties toward the
  lowest index as ``jax.lax.top_k`` does. The ties matter for sparse input: when fewer
  than ``k_s`` sampled entries are nonzero, ``t = 0`` and the zeros fill the answer (a
  sum of top-k codes of correlated gradients is such an input).

  Args:
    x: float32 ``[d]`` (no NaN), ``d >= MIN_SIZE``, ranked by magnitude.
    k: static, ``1 <= k <= d``.

  Returns:
    ``(indices, missed)``: int32 ``[k]``, and bool, True when ``indices`` may be wrong
    (too many entries above ``t``, or too few reaching it).
  """
  d = x.shape[0]
  a = jnp.abs(x)  # fused into each pass that reads it; the loops below read x
  sample = a[::sample_stride(d)]
  size = sample.shape[0]
  share = k * size / d  # expected sample entries among the top k
  kept = min(size, math.ceil(share + 5 * math.sqrt(share) + 4))
  capacity = min(d, math.ceil((kept + 6 * math.sqrt(kept)) * d / size) + 64)
  # The barrier keeps XLA from reading only the last value of top_k: it rewrites a
  # top_k whose values are sliced into a full sort of the sample (20x slower on CPU).
  threshold = jax.lax.optimization_barrier(jax.lax.top_k(sample, kept)[0])[-1]
  above, count_above = _select.set_positions(bitpack.pack(a > threshold, 1), capacity)

  def find_ties(state):
    # Runs only when fewer than k entries exceed t (a sparse `a` with t = 0): most calls
    # skip this pass. Reading `state[0]` keeps XLA from hoisting it out of the loop.
    tie = (jnp.abs(x) == threshold) & state[0]
    return (False,) + _select.set_positions(bitpack.pack(tie, 1), k)

  _, ties, count_ties = jax.lax.while_loop(
      lambda state: state[0], find_ties,
      (count_above < k, jnp.full((k,), -1, jnp.int32), jnp.zeros((), jnp.int32)))
  values = jnp.where(above >= 0, a[jnp.maximum(above, 0)], -1.0)
  ranked = above[jax.lax.top_k(values, k)[1]]
  # Past the entries above t (all of them ranked first when fewer than k), the ties.
  place = jnp.arange(k)
  indices = jnp.where(place < count_above, ranked, ties[jnp.maximum(place - count_above, 0)])
  return indices, (count_above > capacity) | (count_above + count_ties < k)


def sample_stride(d: int) -> int:
  """Stride of :func:`top_indices`' sample of ``d`` entries: the smallest that leaves at
  most ``SAMPLE`` of them, so the sample spans the whole array (a prefix would
  misrepresent a gradient whose scale changes along it, as a layer's rows do)."""
  return -(-d // SAMPLE)


def _index_bits(size: int) -> int:
  """Field width of one flat index into ``size`` elements (1 bit for size <= 2)."""
  return bitpack.bits_for(max(size, 1))


def top_k(k: int | None = None, *, fraction: float | None = None) -> TopK:
  """Builds the top-k sparsifier, which keeps the largest-magnitude coordinates.

  Give exactly one of ``k`` and ``fraction``. The count applies to each array that is
  encoded: under the ``two_phase`` aggregation every chunk of ``ceil(d / N)`` coordinates
  is one array, so ``fraction`` (same share per chunk) is usually what is wanted there.

  Args:
    k: integer >= 1, coordinates kept per encoded array, clamped to the array's size.
    fraction: number in ``(0, 1]``; keeps ``ceil(fraction * size)`` coordinates (at least
      one) of an array of ``size`` elements.

  Returns:
    A :class:`TopK` compressor. For an input of ``d`` elements keeping ``k`` of them,
    ``wire_bits = 32 k + 32 * ceil(k * bits_for(d) / 32)``: float32 values plus packed
    ``ceil(log2 d)``-bit indices.

  Raises:
    ValueError: if neither or both of ``k`` and ``fraction`` are given, ``k`` is not an
      integer >= 1, or ``fraction`` is not in ``(0, 1]``.

  Example:
    >>> c = top_k(2)
    >>> c(jax.random.key(0), jnp.array([0.5, -3.0, 1.0, 2.0]))
    Array([ 0., -3.,  0.,  2.], dtype=float32)
    >>> c.wire_bits((1000,))   # 2 float32 values + 2 indices of 10 bits in one word
    96

  References:
    Aji & Heafield, "Sparse Communication for Distributed Gradient Descent", EMNLP 2017,
    arXiv 1704.05021. Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory",
    NeurIPS 2018, arXiv 1809.07599.
  """
  return TopK(k, fraction)
