"""The identity codec: sends float32 values as they are (the uncompressed SGD baseline)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jrelu.compressors import base


@base.code_class
class Float32Code:
  """Wire payload of :class:`Identity`: the values as float32.

  Attributes:
    values: float32 array, the input's shape.
    dtype: the input's dtype (static).
  """
  values: jax.Array
  dtype: np.dtype = dataclasses.field(metadata={"static": True})


class Identity(base.Compressor):
  """No compression: 32 bits per coordinate, exact, and summable.

  Plain mini-batch SGD of Kalan, Soltanolkotabi and Avestimehr, "Fitting ReLUs via SGD and
  Quantized SGD" (arXiv 1901.06587) is data-parallel SGD with this codec.

  Example:
    >>> c = identity()
    >>> c.wire_bits((1000,))
    32000
  """

  name = "none"
  unbiased = True

  def encode(self, key, x):
    del key  # deterministic
    return Float32Code(values=jnp.asarray(x, jnp.float32), dtype=jnp.asarray(x).dtype)

  def decode(self, code):
    return code.values.astype(code.dtype)

  def wire_bits(self, shape):
    return 32 * base.num_elements(shape)


def identity() -> Identity:
  """Returns the identity codec (see :class:`Identity`)."""
  return Identity()
