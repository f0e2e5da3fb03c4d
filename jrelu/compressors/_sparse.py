"""The ``k`` / ``fraction`` rule shared by the sparsifiers (``_top_k`` and ``_rand_k``).

A sparsifier keeps either a fixed count ``k`` of coordinates of every encoded array, or a
share ``fraction`` of them (``ceil(fraction * size)``, at least one); this module checks
those arguments and computes the kept count, so both codecs read them the same way.
"""

from __future__ import annotations

import fractions
import math

from jrelu import _checks


def validate_k_or_fraction(k, fraction) -> tuple[int | None, float | None]:
  """Checks the ``k`` / ``fraction`` arguments of a sparsifier factory.

  Args:
    k: None, or an integer >= 1 (Python or numpy; not bool): coordinates kept per array.
    fraction: None, or a real number with ``0 < fraction <= 1``: share of coordinates kept.

  Returns:
    ``(k, fraction)`` normalized to ``int`` / ``float`` (the one not given stays None).

  Raises:
    ValueError: unless exactly one of them is given and it is in range; the message
      quotes the bad value.

  Example:
    >>> validate_k_or_fraction(None, 0.25)
    (None, 0.25)
  """
  if (k is None) == (fraction is None):
    raise ValueError(
        f"exactly one of k or fraction must be given, got k={k!r}, fraction={fraction!r}")
  if k is not None:
    return _checks.integer("k", k, maximum=_checks.INT32_MAX, why="(an int32 count)"), None
  return None, _checks.number("fraction", fraction, low=0.0, high=1.0, low_open=True)


def kept_count(k: int | None, fraction: float | None, size: int) -> int:
  """Number of coordinates a sparsifier keeps from an array of ``size`` elements.

  ``min(k, size)`` for the ``k`` form; ``ceil(fraction * size)`` for the ``fraction`` form,
  where ``fraction`` is read as the decimal it prints as, so that binary rounding does not
  add a coordinate (``0.07 * 100`` is ``7.000000000000001`` in floating point, but keeps
  7). Either way at least 1 when ``size >= 1`` and 0 for an empty array.

  Args:
    k: validated ``k`` or None.
    fraction: validated ``fraction`` or None.
    size: number of elements of the (flattened) array.

  Returns:
    The kept count, an int in ``[min(1, size), size]``.

  Example:
    >>> kept_count(None, 0.1, 1000), kept_count(10, None, 1)
    (100, 1)
  """
  if k is not None:
    return min(k, size)
  exact = fractions.Fraction(repr(fraction)) * size
  return min(max(math.ceil(exact), 1), size)
