"""The Compressor contract shared by every jrelu gradient codec.

A compressor is a pure, jit-able array codec:

* ``encode(key, x) -> code``: ``code`` is a pytree of fixed-shape arrays that is exactly
  what crosses the wire (packed integer words plus float32 scales); the original shape
  and dtype ride along as static pytree metadata, so they cost no bits and survive
  ``vmap`` and collectives.
* ``decode(code) -> x_hat``: same shape and dtype as ``x``.
* ``wire_bits(shape) -> int``: the exact bit size of the arrays ``encode`` returns.
* ``unbiased``: ``E[decode(encode(key, x))] == x`` over the key.
* ``commutes_with_sum``: codes may be summed before decoding.

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
    commutes_with_sum: whether codes may be added before decoding.
  """

  name: str = "compressor"
  unbiased: bool = False
  commutes_with_sum: bool = False

  @abc.abstractmethod
  def encode(self, key: jax.Array, x: jax.Array) -> Any:
    """Encodes ``x`` (any shape, floating dtype) into its wire payload."""

  @abc.abstractmethod
  def decode(self, code: Any) -> jax.Array:
    """Decodes a payload back to an array of the original shape and dtype."""

  @abc.abstractmethod
  def wire_bits(self, shape: tuple[int, ...]) -> int:
    """Exact number of payload bits that ``encode`` produces for an input of ``shape``."""

  def __call__(self, key: jax.Array, x: jax.Array) -> jax.Array:
    """``decode(encode(key, x))``: the compressed estimate of ``x`` on one device."""
    return self.decode(self.encode(key, x))

  def __repr__(self) -> str:
    fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
    return f"{type(self).__name__}({fields})"
