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
  matrix product; the shapes are static, so it is jit-, vmap- and grad-able. Because
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


@jax.jit
def _butterflies(x):
  """The log2(D) butterfly stages and the 1/sqrt(D) scaling (jitted: one compilation
  per shape, rather than one dispatch per stage when called eagerly)."""
  size = x.shape[-1]
  lead = x.shape[:-1]
  h = 1
  while h < size:
    view = x.reshape(lead + (size // (2 * h), 2, h))
    a, b = view[..., 0, :], view[..., 1, :]
    x = jnp.stack([a + b, a - b], axis=-2).reshape(lead + (size,))
    h *= 2
  return x * jnp.asarray(1.0 / math.sqrt(size), x.dtype)
