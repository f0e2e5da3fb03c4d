"""optax GradientTransformations that compress, communicate and average gradients.

``compress(compressor, key=..., axis_name=...)`` turns any :class:`jrelu.compressors.Compressor`
into an ``optax.GradientTransformation``; ``qsgd(num_levels, ...)`` is the QSGD shortcut.
They compose like any optax transform::

    tx = optax.chain(jrelu.qsgd(4, key=jax.random.key(0), axis_name="data"),
                     optax.sgd(0.1))

Inside ``jax.pmap`` / ``jax.shard_map`` over ``axis_name`` the incoming updates must be
this device's own gradients (not yet summed); the transform encodes them, runs the
aggregation strategy (``jrelu.aggregation``) and returns the compressed mean, identical on
every device. With ``axis_name=None`` it only compresses (single device).

Randomness: the state holds a typed PRNG key; each step uses
``fold_in(fold_in(rng_key, count), axis_index)`` and one split per leaf, so devices and
leaves draw independent noise and a seed reproduces a run bit for bit.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jrelu import aggregation as aggregation_lib
from jrelu import compressors


class CompressState(NamedTuple):
  """State of :func:`compress`.

  Attributes:
    count: int32 scalar, number of updates so far (folded into the key).
    rng_key: typed PRNG key array, the transform's base key (never advanced in place).
  """
  count: jax.Array
  rng_key: jax.Array


def as_typed_key(key) -> jax.Array:
  """Returns ``key`` as a typed PRNG key scalar, accepting legacy ``uint32[2]`` keys.

  Raises:
    ValueError: if ``key`` is neither a typed key scalar nor a raw ``uint32[2]`` key.
  """
  if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape != ():
      raise ValueError(f"key must be a single PRNG key, got a key array of shape {key.shape}")
    return key
  if hasattr(key, "shape") and key.shape == (2,) and key.dtype == jnp.uint32:
    return jax.random.wrap_key_data(key)
  raise ValueError(f"key must be a PRNG key from jax.random.key(seed), got {key!r}")


def compress(compressor: compressors.Compressor, *, key, axis_name: str | None = None,
             aggregation: str = "two_phase") -> optax.GradientTransformation:
  """Compresses each device's gradient and averages the codes across ``axis_name``.

  Args:
    compressor: the codec, e.g. ``jrelu.compressors.qsgd(4)``.
    key: a PRNG key (``jax.random.key(seed)``); the same key gives the same run.
    axis_name: name of the mapped device axis, or None for single-device use (compress
      and decode only, no communication).
    aggregation: one of ``jrelu.aggregation.STRATEGIES`` (``"psum"``, ``"all_gather"``,
      ``"two_phase"``); ignored when ``axis_name`` is None.

  Returns:
    An ``optax.GradientTransformation``. ``update(grads, state, params=None)`` maps a
    pytree of float arrays to the compressed mean pytree of the same structure, shapes
    and dtypes; the state is a :class:`CompressState`.

  Raises:
    ValueError: if ``compressor`` is not a Compressor, ``key`` is not a PRNG key or
      ``aggregation`` is unknown.

  Example:
    >>> tx = optax.chain(compress(compressors.qsgd(4), key=jax.random.key(0),
    ...                           axis_name="data"), optax.sgd(0.5))

  References:
    Alistarh et al., "QSGD", arXiv 1610.02132 (Algorithm 1: encode, exchange, decode,
    average); Kalan, Soltanolkotabi, Avestimehr, "Fitting ReLUs via SGD and Quantized
    SGD", arXiv 1901.06587.
  """
  if not isinstance(compressor, compressors.Compressor):
    raise ValueError(f"compressor must be a jrelu.compressors.Compressor, got {compressor!r}")
  key = as_typed_key(key)
  aggregation_lib.check_strategy(aggregation)

  def init_fn(params):
    del params
    return CompressState(count=jnp.zeros((), jnp.int32), rng_key=key)

  def update_fn(updates, state, params=None):
    del params
    step_key = jax.random.fold_in(state.rng_key, state.count)
    if axis_name is not None:
      step_key = jax.random.fold_in(step_key, jax.lax.axis_index(axis_name))
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    keys = jax.random.split(step_key, max(len(leaves), 1))
    if axis_name is None:
      out = [compressor(k, g) for k, g in zip(keys, leaves)]
    else:
      out = [aggregation_lib.aggregate(aggregation, compressor, k, g, axis_name)
             for k, g in zip(keys, leaves)]
    new_state = CompressState(count=optax.safe_int32_increment(state.count),
                              rng_key=state.rng_key)
    return jax.tree_util.tree_unflatten(treedef, out), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def qsgd(num_levels: int, *, key, axis_name: str | None = None,
         aggregation: str = "two_phase", bucket_size: int | None = None,
         norm: str = "l2") -> optax.GradientTransformation:
  """QSGD-compressed gradient averaging as an optax transform.

  Shortcut for ``compress(compressors.qsgd(num_levels, bucket_size, norm), ...)``.

  Args:
    num_levels: s >= 1, QSGD's number of positive levels.
    key: a PRNG key.
    axis_name: mapped device axis, or None for single-device use.
    aggregation: ``"psum"``, ``"all_gather"`` or ``"two_phase"`` (default).
    bucket_size: coordinates per quantization bucket, or None for one bucket.
    norm: ``"l2"`` or ``"max"``.

  Returns:
    An ``optax.GradientTransformation`` (see :func:`compress`).

  Raises:
    ValueError: for a bad hyper-parameter, quoting it.

  Example:
    >>> tx = optax.chain(qsgd(4, key=jax.random.key(0), axis_name="data"),
    ...                  optax.sgd(0.5))

  References:
    Alistarh et al., arXiv 1610.02132; Kalan, Soltanolkotabi, Avestimehr, arXiv 1901.06587.
  """
  return compress(compressors.qsgd(num_levels, bucket_size, norm), key=key,
                  axis_name=axis_name, aggregation=aggregation)
