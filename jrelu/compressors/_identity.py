"""The identity codec: sends float32 values as they are (the uncompressed SGD baseline)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jrelu.compressors import base


@base.code_class
class Float32Code:
  """Wire payload of :class:`Identity`: the values as float32 (float64 kept as float64).

  Attributes:
    values: float32 array of the input's shape; float64 for a float64 input (x64).
    dtype: the input's dtype (static).
  """
  values: jax.Array
  dtype: np.dtype = dataclasses.field(metadata={"static": True})


class Identity(base.Compressor):
  """No compression: 32 bits per coordinate, exact, and summable.

  Inputs of 32 bits or fewer travel as float32; a float64 input (with ``jax_enable_x64``)
  travels as float64, so the baseline stays exact, at 64 bits per coordinate, which
  ``wire_bits(shape)`` (32 per coordinate; its argument has no dtype) does not count.

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
    x = jnp.asarray(x)
    # float64 (under x64) is sent as it is: the uncompressed baseline must be exact.
    wide = jnp.dtype(x.dtype).itemsize > 4 and jnp.issubdtype(x.dtype, jnp.floating)
    return Float32Code(values=x if wide else x.astype(jnp.float32), dtype=x.dtype)

  def decode(self, code):
    return code.values.astype(code.dtype)

  def wire_bits(self, shape):
    return 32 * base.num_elements(shape)


def identity() -> Identity:
  """Returns the identity codec (see :class:`Identity`)."""
  return Identity()
