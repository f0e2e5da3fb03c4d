"""The Compressor contract shared by every jrelu gradient codec.

A compressor is a pure, jit-able array codec:

* ``encode(key, x) -> code``: ``code`` is a pytree of fixed-shape arrays that is exactly
  what crosses the wire (packed integer words plus float32 scales); the original shape
  and dtype ride along as static pytree metadata, so they cost no bits and survive
  ``vmap`` and collectives.
* ``decode(code) -> x_hat``: same shape and dtype as ``x``.
* ``wire_bits(shape) -> int``: the exact bit size of the arrays ``encode`` returns.
* ``unbiased``: ``E[decode(encode(key, x))] == x`` over the key.

Two optional capabilities, used by the aggregation strategies of ``jrelu.aggregation``:

* **Common randomness** (``bind``). Some codecs draw randomness that the receiver must
  reproduce (FO-SGD's random signs, rand-k's index set). Unbound, such a codec puts a
  32-bit ``seed`` in its code. ``bind(common_key)`` returns a copy that takes that
  randomness from ``common_key`` instead, a key every device knows (the aggregation
  strategies derive it from the step key before the device index is folded in), so the
  seed is not sent. Codecs without common randomness return ``self``.
* **Shared-scale integer levels** (``integer_sum = True``). The codec is ``scale * level /
  max_level`` with integer ``level`` in ``[-max_level, max_level]``. When every device
  uses the same scales (a ``pmax`` of ``scales(x)``), levels from different devices can
  be added as integers before decoding: the ``integer_psum`` aggregation.

A new compressor is one module ``jrelu/compressors/_NAME.py`` that subclasses
:class:`Compressor`, plus one line in ``jrelu.compressors.REGISTRY`` and one in the test
suite's list.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any

import jax
import numpy as np


def code_class(cls):
  """Makes a dataclass a pytree node whose ``static`` fields are metadata.

  Fields declared with ``dataclasses.field(metadata={"static": True})`` (for example the
  original shape and dtype) are part of the tree structure, not leaves: they are not
  sent, not traced and not vmapped.

  Example:
    >>> @code_class
    ... class MyCode:
    ...   words: jax.Array
    ...   shape: tuple = dataclasses.field(metadata={"static": True})
  """
  cls = dataclasses.dataclass(frozen=True)(cls)
  return jax.tree_util.register_dataclass(cls)


def payload_bits(code: Any) -> int:
  """Total bits of all array leaves of ``code`` (element count times dtype width).

  This is what ``Compressor.wire_bits`` must equal for the code's shape; static metadata
  does not count.

  Example:
    >>> payload_bits({"words": jnp.zeros(3, jnp.uint32)})
    96
  """
  return sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize * 8
             for leaf in jax.tree_util.tree_leaves(code))


def num_elements(shape) -> int:
  """Number of elements of an array of ``shape`` (1 for a scalar)."""
  return math.prod(shape)


class Compressor(abc.ABC):
  """Base class of jrelu's gradient codecs (see the module docstring for the contract).

  Subclasses validate their hyper-parameters in ``__init__`` (raising ``ValueError``
  that quotes the bad value) and implement ``encode``, ``decode`` and ``wire_bits``.

  Attributes:
    name: short registry name, e.g. ``"qsgd"``.
    unbiased: whether ``E[decode(encode(key, x))] == x``.
  """

  name: str = "compressor"
  unbiased: bool = False
  # True for codecs of the form scale * level / max_level that implement ``scales``,
  # ``quantize`` and ``dequantize`` (see the module docstring).
  integer_sum: bool = False
  # True when re-encoding the mean of decoded codes is a majority vote (unscaled sign).
  majority_vote: bool = False

  @abc.abstractmethod
  def encode(self, key: jax.Array, x: jax.Array) -> Any:
    """Encodes ``x`` (any shape, floating dtype) into its wire payload."""

  @abc.abstractmethod
  def decode(self, code: Any) -> jax.Array:
    """Decodes a payload back to an array of the original shape and dtype."""

  @abc.abstractmethod
  def wire_bits(self, shape: tuple[int, ...]) -> int:
    """Exact number of payload bits that ``encode`` produces for an input of ``shape``."""

  def bind(self, common_key: jax.Array) -> "Compressor":
    """Returns a copy whose common randomness comes from ``common_key`` (see module doc).

    The default (a codec without common randomness) returns ``self``.
    """
    del common_key
    return self

  # --- Shared-scale integer levels (only when ``integer_sum``) ---------------------------

  max_level: int = 0

  def scales(self, x: jax.Array) -> jax.Array:
    """float32 ``[num_scales(x.shape)]``: this device's scales (shared = their ``pmax``)."""
    raise NotImplementedError(f"{self.name} does not support integer summation")

  def num_scales(self, shape: tuple[int, ...]) -> int:
    """Length of ``scales(x)`` for an input of ``shape``."""
    raise NotImplementedError(f"{self.name} does not support integer summation")

  def quantize(self, key: jax.Array, x: jax.Array, scales: jax.Array) -> jax.Array:
    """int32 ``[size]`` levels in ``[-max_level, max_level]`` of ``x`` (flattened) under
    ``scales`` (which may exceed this device's own); ``E[dequantize(...)] = x``."""
    raise NotImplementedError(f"{self.name} does not support integer summation")

  def dequantize(self, levels: jax.Array, scales: jax.Array, shape, dtype) -> jax.Array:
    """Values ``scale * levels / max_level`` reshaped to ``shape``; ``levels`` (int32
    ``[size]``) may be a sum of several devices' levels."""
    raise NotImplementedError(f"{self.name} does not support integer summation")

  def __call__(self, key: jax.Array, x: jax.Array) -> jax.Array:
    """``decode(encode(key, x))``: the compressed estimate of ``x`` on one device."""
    return self.decode(self.encode(key, x))

  def __repr__(self) -> str:
    fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
    return f"{type(self).__name__}({fields})"
