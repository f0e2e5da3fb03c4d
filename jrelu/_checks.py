"""Argument checks shared by every jrelu factory: one wording for one kind of mistake.

Each check raises ``ValueError`` quoting the bad value and returns the value normalised
(a Python ``int`` or ``float``), so a factory can write ``k = _checks.integer("k", k)``.
"""

from __future__ import annotations

import math
import numbers
import operator


# The largest int32: JAX (without x64) holds counts, sizes and indices as int32.
INT32_MAX = 2**31 - 1
# The largest finite float32: every float setting is used as a float32.
FLOAT32_MAX = 3.4028234663852886e38


def integer(name: str, value, minimum: int = 1, maximum: int | None = None,
            why: str = "") -> int:
  """``value`` as a Python int, or ``ValueError`` unless it is an integer in range.

  Bools are refused (``True`` is not a count). NumPy integers are accepted.

  Args:
    name: the argument's name, used in the message.
    value: the value to check.
    minimum: the smallest allowed value.
    maximum: the largest allowed value, or None for no bound.
    why: the reason for ``maximum``, put in the message (e.g. ``"(int32 index)"``).

  Returns:
    ``int(value)``.

  Raises:
    ValueError: e.g. ``"dim must be an integer >= 1, got 0"``, or ``"seed must be an
      integer in [0, 4294967295] (a 32-bit PRNG seed), got -1"``.

  Example:
    >>> integer("dim", 1000)
    1000
  """
  try:
    v = operator.index(value)
    ok = not isinstance(value, bool) and v >= minimum and (maximum is None or v <= maximum)
  except TypeError:
    ok = False
  if not ok:
    what = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    raise ValueError(f"{name} must be an integer {what}{' ' + why if why else ''}, "
                     f"got {value!r}")
  return operator.index(value)


def optional_integer(name: str, value, minimum: int = 1, maximum: int | None = None,
                     why: str = "") -> int | None:
  """Like :func:`integer`, but ``None`` passes through (a "use the default" marker).

  Example:
    >>> optional_integer("bucket_size", None) is None
    True
  """
  if value is None:
    return None
  try:
    return integer(name, value, minimum, maximum, why)
  except ValueError as e:
    raise ValueError(str(e).replace(" must be ", " must be None or ", 1)) from None


def number(name: str, value, *, low: float = -math.inf, high: float = math.inf,
           low_open: bool = False, high_open: bool = False) -> float:
  """``value`` as a float, or ``ValueError`` unless it is a finite real in the interval.

  Args:
    name: the argument's name, used in the message.
    value: the value to check (bools are refused).
    low, high: the interval's ends.
    low_open, high_open: whether each end is excluded.

  Returns:
    ``float(value)``.

  Raises:
    ValueError: e.g. ``"momentum must be a finite number in [0, 1), got 1.0"``.

  Example:
    >>> number("momentum", 0.9, low=0.0, high=1.0, high_open=True)
    0.9
  """
  interval = (f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")
  if low == -math.inf and high == math.inf:
    what = "a finite number"
  elif high == math.inf:
    what = f"a finite number {'>' if low_open else '>='} {low:g}"
  else:
    what = f"a finite number in {interval}"
  ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
  if ok:
    v = float(value)
    ok = (math.isfinite(v) and (v > low if low_open else v >= low)
          and (v < high if high_open else v <= high))
  if not ok:
    raise ValueError(f"{name} must be {what}, got {value!r}")
  return float(value)


def choice(name: str, value, choices) -> str:
  """``value`` unless it is not one of ``choices`` (then ``ValueError`` listing them).

  Example:
    >>> choice("norm", "max", ("l2", "max"))
    'max'
  """
  if value not in tuple(choices):
    raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
  return value
