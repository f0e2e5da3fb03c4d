"""The normalized fast Walsh-Hadamard transform (FWHT) in JAX.

The Sylvester-Hadamard matrix of order ``D = 2**m`` is ``H_1 = [1]`` and
``H_{2n} = [[H_n, H_n], [H_n, -H_n]]``, so ``H_D[i, j] = (-1)**popcount(i & j)``. Its
normalized form ``H_D / sqrt(D)`` is orthonormal, symmetric, and therefore its own
inverse. :func:`fwht` applies it in ``O(D log D)`` additions, one butterfly stage per bit of
the index, without ever forming the ``D x D`` matrix.

Together with random signs, ``x -> H_D diag(eps) x`` "flattens" a vector: every output
coordinate is a Rademacher sum of the inputs divided by ``sqrt(D)``, so its magnitude is
of order ``||x||_2 / sqrt(D)`` whatever the shape of ``x`` (even 1-sparse). FO-SGD
(``jrelu.compressors.fo_sgd``) quantizes in that flattened basis.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jrelu import _checks


def next_power_of_two(n: int) -> int:
  """Smallest power of two that is ``>= n`` (and at least 1).

  Args:
    n: a non-negative integer, e.g. the number of coordinates to transform.

  Returns:
    ``2**ceil(log2(n))`` as a Python int; 1 for ``n`` in ``{0, 1}``.

  Raises:
    ValueError: if ``n`` is not an integer or is negative.

  Example:
    >>> next_power_of_two(125), next_power_of_two(128), next_power_of_two(129)
    (128, 128, 256)
  """
  n = _checks.integer("n", n, minimum=0)
  return 1 if n <= 1 else 1 << (n - 1).bit_length()


def is_power_of_two(n: int) -> bool:
  """Whether ``n`` is a positive integer power of two (1, 2, 4, ...).

  Example:
    >>> is_power_of_two(64), is_power_of_two(96), is_power_of_two(0)
    (True, False, False)
  """
  try:
    n = _checks.integer("n", n)
  except ValueError:
    return False
  return n & (n - 1) == 0


def fwht(x: jax.Array) -> jax.Array:
  """Normalized Walsh-Hadamard transform ``x @ H_D / sqrt(D)`` along the last axis.

  ``H_D`` is the Sylvester-ordered (natural-ordered) Hadamard matrix described in the
  module docstring. The transform is computed with ``log2(D)`` butterfly stages: at stage
  ``h = 1, 2, 4, ..., D/2`` the last axis is viewed as ``[D / (2h), 2, h]`` and the two
  halves ``(a, b)`` become ``(a + b, a - b)``. That is ``D log2(D)`` additions and no
  matrix product; the shapes are static, so it is jit-, vmap- and grad-able. Three
  stages share one pass over memory (``STAGES_PER_PASS``), and above ``BLOCK_SIZE``
  entries the low stages run block by block in cache. Because
  ``H_D / sqrt(D)`` is symmetric and orthonormal, ``fwht(fwht(x)) == x`` and
  ``||fwht(x)|| == ||x||`` (up to float rounding, about ``log2(D)`` ulps).

  Args:
    x: array of shape ``[..., D]`` with ``D`` a power of two (1 is allowed: the identity).
      Floating dtypes are kept; integer inputs are computed in float32.

  Returns:
    Array of the same shape and (floating) dtype as ``x``.

  Raises:
    ValueError: if ``x`` is a scalar or its last axis length is not a power of two.

  Example:
    >>> fwht(jnp.array([1.0, 0.0, 0.0, 0.0]))   # first column of H_4 / 2
    Array([0.5, 0.5, 0.5, 0.5], dtype=float32)
    >>> fwht(jnp.array([1.0, 1.0]))
    Array([1.4142135, 0.       ], dtype=float32)

  References:
    Fino & Algazi, "Unified Matrix Treatment of the Fast Walsh-Hadamard Transform", IEEE
    Transactions on Computers C-25(11), 1976 (no arXiv id).
    Ailon & Chazelle, "The Fast Johnson-Lindenstrauss Transform and Approximate Nearest
    Neighbors", SIAM J. Computing 39(1), 2009 (STOC 2006; no arXiv id): randomized
    Hadamard flattening ``H diag(eps)``.
  """
  x = jnp.asarray(x)
  if x.ndim == 0:
    raise ValueError(f"fwht needs an array with at least one axis, got shape {x.shape}")
  size = x.shape[-1]
  if not is_power_of_two(size):
    raise ValueError(
        f"fwht needs a last axis whose length is a power of two, got {size!r} "
        f"(shape {x.shape}); pad with zeros to next_power_of_two({size})")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  return _butterflies(x)


# Butterfly stages per pass over memory: a pass reads 2^r slices of the array, applies
# the r stages that combine them, and writes the 2^r results, in one loop fused by XLA.
# 3 stages (8 slices) is the most XLA's CPU backend fuses: it does not fuse a
# concatenation of more than 8 arrays.
STAGES_PER_PASS = 3

# Longer transforms run their first log2(BLOCK_SIZE) stages block by block, in a loop
# over blocks of BLOCK_SIZE consecutive entries (2 MiB of float32), so that those passes
# read and write a cached block instead of the whole array. At D = 2^24 (64 MiB, twice
# the last-level cache of the 2-core development VM) that took one transform from about
# 490 ms to about 215 ms; below the cache's size the loop gains nothing. The stages and
# their order are the same, so the result is the same, bit for bit.
BLOCK_SIZE = 1 << 19


@functools.partial(jax.jit, static_argnames="block_size")
def _butterflies(x, block_size: int = BLOCK_SIZE):
  """The log2(D) butterfly stages, ``STAGES_PER_PASS`` per pass, and the 1/sqrt(D) scaling
  (jitted: one compilation per shape, rather than one dispatch per stage when called
  eagerly).

  The stages of the Walsh-Hadamard transform commute (each acts on one bit of the
  index), so they are grouped freely: a pass over strides ``h, 2h, ..., 2^(r-1) h``
  views the last axis as ``[D / (2^r h), 2^r, h]``, runs ``r`` radix-2 stages on the
  ``2^r`` slices (``a + b``, ``a - b``) and stacks the results. Each pass reads and writes
  the array once; a D of ``2^24`` takes 8 passes instead of 24. For D over
  ``block_size`` (a power of two) the stages of strides below it run block by block.
  """
  size = x.shape[-1]
  h = 1
  if size > block_size:
    # A loop over blocks of the flattened array, each transformed and written back in
    # place. (A lax.map over a [blocks, block_size] view is no faster, and under vmap
    # it makes XLA transpose the whole batch twice, to put the blocks axis first.)
    flat = x.reshape(-1)

    def transform_block(i, flat):
      start = i * block_size
      block = jax.lax.dynamic_slice(flat, (start,), (block_size,))
      return jax.lax.dynamic_update_slice(flat, _passes(block, 1, block_size), (start,))

    flat = jax.lax.fori_loop(0, flat.shape[0] // block_size, transform_block, flat)
    x = flat.reshape(x.shape)
    h = block_size
  x = _passes(x, h, size)
  return x * jnp.asarray(1.0 / math.sqrt(size), x.dtype)


def _passes(x, h, stop):
  """The stages of strides ``h, 2h, ..., stop / 2`` along the last axis, in passes."""
  size = x.shape[-1]
  lead = x.shape[:-1]
  while h < stop:
    r = min(STAGES_PER_PASS, (stop // h).bit_length() - 1)
    group = 1 << r
    view = x.reshape(lead + (size // (group * h), group, h))
    parts = [view[..., i, :] for i in range(group)]
    step = 1
    while step < group:  # radix-2 stages on the slices: pairs (i, i + step)
      for i in range(group):
        if i & step == 0:
          a, b = parts[i], parts[i + step]
          parts[i], parts[i + step] = a + b, a - b
      step *= 2
    x = jnp.stack(parts, axis=-2).reshape(lead + (size,))
    h *= group
  return x
