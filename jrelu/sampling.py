"""Mini-batch samplers for data-parallel training on a stored or streamed data set.

Model-agnostic: a model module (``jrelu.planted``, ``jrelu.network``) supplies the loss and
the data, and every sampler here returns a ``batch_fn(key, data, shard_index, num_shards)``
for ``jrelu.parallel.make_step``. By jrelu's convention ``data`` is the pair
``(dataset, truth)`` that the training loop passes to every device, ``dataset`` a
:class:`Dataset` (or, per device, its :class:`Segments`) and ``truth`` the planted
parameters the metrics compare against; samplers read ``dataset`` only, except the online
sampler, which draws fresh rows from ``truth``.

Three schemes:

* windows (``make_batch_fn(B)``, the default): a random window of consecutive rows in each
  device's segment of the stored data set, read in cache-sized blocks by a loss wrapped
  with :func:`windowed`, so a step streams its batch from memory once;
* with replacement (``make_batch_fn(B, sampling="replacement")``, :func:`minibatch`): the
  textbook draw, rows gathered;
* online (:func:`make_online_batch_fn`): fresh rows every step from a sampler the model
  supplies, no stored data set (for large ``d``).

References:
  Bottou, "Curiously fast convergence of some stochastic gradient descent algorithms"
  (2009); Mishchenko, Khaled, Richtarik, "Random Reshuffling: Simple Analysis with Vast
  Improvements", arXiv 2006.05988 (sampling without replacement from a stored order).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jrelu import _checks

SAMPLINGS = ("window", "replacement")
# Rows per block of a windowed loss: the largest divisor of a device's window rows whose
# block of float32 rows stays within this many bytes (L2-sized, so that a block gathered
# from memory is still in cache for the backward pass).
BLOCK_BYTES = 1 << 20


class Dataset(NamedTuple):
  """A finite data set (rows of inputs and targets).

  Attributes:
    x: float32 ``[num_samples, dim]`` inputs.
    y: float32 ``[num_samples]`` targets.
  """
  x: jax.Array
  y: jax.Array


class Segments(NamedTuple):
  """A data set cut into equal segments along a leading axis, one or more per device.

  Built by :func:`split_segments`. Mapped over devices (``jax.pmap``, or
  ``jrelu.parallel.vmapped``), each device holds only its own segment, and
  :func:`make_batch_fn` reads its window from it.

  Attributes:
    x: float32 ``[num_segments, segment_length, dim]`` (per device: ``[segment_length,
      dim]``).
    y: float32 ``[num_segments, segment_length]`` (per device: ``[segment_length]``).
  """
  x: jax.Array
  y: jax.Array


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["start", "offset"],
                   meta_fields=["segment_length", "num_segments", "rows_per_segment",
                                "block_rows"])
@dataclasses.dataclass(frozen=True)
class Window:
  """The rows of a stored data set that one device's mini-batch covers, not yet read.

  The rows are ``start + k * segment_length + (offset + j) % segment_length`` for segment
  ``k < num_segments`` and ``j < rows_per_segment``: a cyclic window of
  ``rows_per_segment`` consecutive rows at the same ``offset`` in each segment this
  device reads. A :func:`windowed` loss reads them in blocks of ``block_rows`` rows.

  Attributes:
    start: int32 scalar, first row of this device's first segment.
    offset: int32 scalar in ``[0, segment_length)``, the window's start in each segment
      (the same on every device).
    segment_length: rows per segment (static).
    num_segments: segments this device reads (static; 1 when segments = devices).
    rows_per_segment: window length in rows (static).
    block_rows: rows per block; divides ``rows_per_segment`` (static).
  """
  start: jax.Array
  offset: jax.Array
  segment_length: int
  num_segments: int
  rows_per_segment: int
  block_rows: int

  @property
  def size(self) -> int:
    """Number of rows the window covers, ``num_segments * rows_per_segment``."""
    return self.num_segments * self.rows_per_segment

  def indices(self):
    """int32 ``[size]``: the row indices the window covers, segment by segment."""
    j = jnp.arange(self.rows_per_segment, dtype=jnp.int32)
    k = jnp.arange(self.num_segments, dtype=jnp.int32)[:, None]
    rows = self.start + k * self.segment_length + (self.offset + j) % self.segment_length
    return rows.reshape(-1)


def windowed(loss_fn: Callable) -> Callable:
  """The loss ``loss_fn`` over the rows a :class:`Window` covers, read block by block.

  Each block of ``window.block_rows`` rows is sliced from the stored ``x`` once, and its
  forward and backward passes run while it is in cache, so the value and the gradient
  together cost one read of the batch from memory, with no gather and no copy of the
  whole batch (a custom VJP computes the gradient during the forward pass). The value is
  the mean of the block values, which equals ``loss_fn`` on the whole window for a loss
  that is a mean over rows (every block has the same size).

  Args:
    loss_fn: ``loss_fn(params, x, y) -> scalar``, a mean over the rows of ``x`` and ``y``.

  Returns:
    ``loss(params, x, y, window) -> scalar`` where ``x`` float32 ``[n, dim]`` and ``y``
    ``[n]`` are the stored rows and ``window`` comes from :func:`make_batch_fn`.

  Example:
    >>> loss = windowed(lambda w, x, y: 0.5 * jnp.mean((x @ w - y) ** 2))
    >>> step = parallel.make_step(loss, make_batch_fn(1024), tx)
  """
  return functools.partial(_window_loss, loss_fn)


def _read_block(x, y, segment_start, first, window: Window):
  """Rows ``segment_start + (first + j) % L``, ``j < block_rows``, of ``x`` and ``y``.

  One contiguous slice when the block does not pass the segment's end. Otherwise (at most
  one block per segment and step) the rows come as a set, in another order: the end of
  the segment's last ``block_rows`` rows and the start of its first ``block_rows`` rows.
  """
  size, length = window.block_rows, window.segment_length

  def contiguous():
    return (jax.lax.dynamic_slice_in_dim(x, segment_start + first, size),
            jax.lax.dynamic_slice_in_dim(y, segment_start + first, size))

  def wrapped():
    keep_tail = jnp.arange(size) >= size - (length - first)
    tail_start = segment_start + length - size
    pick = lambda a, shape: jnp.where(
        keep_tail.reshape(shape), jax.lax.dynamic_slice_in_dim(a, tail_start, size),
        jax.lax.dynamic_slice_in_dim(a, segment_start, size))
    return pick(x, (size, 1)), pick(y, (size,))

  if size == length:  # the window is the whole segment
    return (jax.lax.dynamic_slice_in_dim(x, segment_start, size),
            jax.lax.dynamic_slice_in_dim(y, segment_start, size))
  return jax.lax.cond(first + size <= length, contiguous, wrapped)


def _window_value_and_grad(loss_fn, w, x, y, window: Window):
  """Loss and gradient over a window, block by block (every block has the same size)."""
  num_blocks = window.rows_per_segment // window.block_rows
  value_and_grad = jax.value_and_grad(loss_fn)
  tree_add = functools.partial(jax.tree_util.tree_map, jnp.add)

  def add_block(carry, segment_start, block):
    first = (window.offset + block * window.block_rows) % window.segment_length
    value, grad = value_and_grad(w, *_read_block(x, y, segment_start, first, window))
    return carry[0] + value, tree_add(carry[1], grad)

  total = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, w))
  for k in range(window.num_segments):
    segment_start = window.start + k * window.segment_length
    if num_blocks == 1:
      total = add_block(total, segment_start, 0)
    else:
      total, _ = jax.lax.scan(
          lambda c, b, s=segment_start: (add_block(c, s, b), None), total,
          jnp.arange(num_blocks, dtype=jnp.int32))
  count = window.num_segments * num_blocks  # blocks; each term above is a block mean
  return total[0] / count, jax.tree_util.tree_map(lambda g: g / count, total[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _window_loss(loss_fn, w, x, y, window):
  return _window_value_and_grad(loss_fn, w, x, y, window)[0]


def _window_loss_fwd(loss_fn, w, x, y, window):
  value, grad = _window_value_and_grad(loss_fn, w, x, y, window)
  return value, (grad, w, x, y, window)


def _window_loss_bwd(loss_fn, residuals, cotangent):
  grad, w, x, y, window = residuals
  # Cotangents for the data: exact, but they gather and scatter the batch, so they are
  # only worth computing when asked for (otherwise they are dead code and removed).
  rows = window.indices()
  _, data_vjp = jax.vjp(lambda xb, yb: loss_fn(w, xb, yb), x[rows], y[rows])
  x_rows, y_rows = data_vjp(cotangent)
  x_ct = jnp.zeros_like(x).at[rows].add(x_rows)
  y_ct = jnp.zeros_like(y).at[rows].add(y_rows)
  window_ct = jax.tree_util.tree_map(
      lambda a: np.zeros(a.shape, jax.dtypes.float0), window)
  return (jax.tree_util.tree_map(lambda g: cotangent * g, grad), x_ct, y_ct, window_ct)


_window_loss.defvjp(_window_loss_fwd, _window_loss_bwd)



def minibatch(key, data: Dataset, batch_size: int, shard_index=0, num_shards: int = 1):
  """One device's shard of a global mini-batch drawn uniformly with replacement.

  All devices draw the same ``batch_size`` indices from ``key``; shard ``i`` keeps
  positions ``[i * b, (i + 1) * b)`` with ``b = batch_size / num_shards``, so N devices
  together see exactly the batch a single device would.

  Args:
    key: PRNG key, the same on every device.
    data: the full data set (replicated on every device).
    batch_size: global mini-batch size B, divisible by ``num_shards``.
    shard_index: this device's index (an int or a traced scalar).
    num_shards: N.

  Returns:
    ``(x, y)``: float32 ``[B/N, dim]`` and ``[B/N]``.

  Raises:
    ValueError: if ``batch_size`` is not divisible by ``num_shards``.
  """
  if batch_size % num_shards:
    raise ValueError(
        f"batch_size={batch_size} is not divisible by num_shards={num_shards}")
  local = batch_size // num_shards
  idx = jax.random.randint(key, (batch_size,), 0, data.x.shape[0])
  idx = jax.lax.dynamic_slice_in_dim(idx, shard_index * local, local)
  return data.x[idx], data.y[idx]


def split_segments(dataset: Dataset, num_segments: int) -> Segments:
  """Cuts a data set into ``num_segments`` equal consecutive segments (a free reshape).

  Pass the result, mapped over devices, where a :func:`make_batch_fn` ``batch_fn`` expects
  its data: each device then holds only its own segment (``jax.pmap`` over the
  ``Segments``, or ``jrelu.parallel.vmapped`` with ``in_axes`` 0 for it) and reads the same
  rows it would read from the whole, replicated data set.

  Args:
    dataset: the data set, ``x`` of shape ``[n, dim]``.
    num_segments: S >= 1, usually the number of devices; the last ``n % S`` rows are
      dropped (the window sampler of :func:`make_batch_fn` never reads them either).

  Returns:
    :class:`Segments` with ``x`` of shape ``[S, n // S, dim]`` and ``y`` ``[S, n // S]``.

  Raises:
    ValueError: if ``num_segments`` is not an integer in ``[1, n]``.

  Example:
    >>> segments = split_segments(dataset, 8)   # x: [8, n // 8, d]
  """
  _checks.integer("num_segments", num_segments)
  n = dataset.x.shape[0]
  if num_segments > n:
    raise ValueError(f"num_segments={num_segments} exceeds the {n} samples")
  length = n // num_segments
  used = num_segments * length
  return Segments(dataset.x[:used].reshape(num_segments, length, -1),
                  dataset.y[:used].reshape(num_segments, length))


def default_block_rows(rows: int, dim: int) -> int:
  """Largest divisor of ``rows`` whose float32 ``[block, dim]`` block fits ``BLOCK_BYTES``.

  Args:
    rows: the window length of one device (rows per segment).
    dim: d.

  Returns:
    An integer in ``[1, rows]`` that divides ``rows``.
  """
  limit = max(1, BLOCK_BYTES // (4 * max(dim, 1)))
  return max(r for r in range(1, min(rows, limit) + 1) if rows % r == 0)


def _window_batch(key, data, batch_size, shard_index, num_shards, num_segments,
                  block_rows):
  """``(x, y, window)``: this device's window into ``data`` (see :func:`make_batch_fn`)."""
  _checks.integer("batch_size", batch_size)
  segments = num_shards if num_segments is None else num_segments
  _checks.integer("num_segments", segments)
  if segments % num_shards or batch_size % segments:
    raise ValueError(
        f"batch_size={batch_size} must be divisible by num_segments={segments}, itself "
        f"a multiple of num_shards={num_shards}")
  per_device = segments // num_shards
  x, y = data
  if isinstance(data, Segments) and x.ndim == 2:  # this device's own segment
    if per_device != 1:
      raise ValueError(f"a device holding one segment needs num_segments == num_shards, "
                       f"got {segments} and {num_shards}")
    length, start = x.shape[0], jnp.zeros((), jnp.int32)
  else:
    if isinstance(data, Segments):  # all segments, unmapped
      if x.shape[0] != segments:
        raise ValueError(f"data has {x.shape[0]} segments, num_segments={segments}")
      length = x.shape[1]
      x, y = x.reshape(segments * length, -1), y.reshape(-1)
    else:
      length = x.shape[0] // segments
    start = jnp.asarray(shard_index, jnp.int32) * (per_device * length)
  rows = batch_size // segments
  if not 1 <= rows <= length:
    raise ValueError(f"batch_size={batch_size} needs {rows} rows from each of "
                     f"{segments} segments, but a segment has {length} rows")
  if block_rows is None:
    block_rows = default_block_rows(rows, x.shape[-1])
  elif rows % block_rows:
    raise ValueError(f"block_rows={block_rows} must divide the {rows} rows per segment")
  offset = jax.random.randint(key, (), 0, length, jnp.int32)
  return x, y, Window(start, offset, length, per_device, rows, block_rows)


def window_minibatch(key, data, batch_size: int, shard_index=0, num_shards: int = 1,
                     num_segments: int | None = None):
  """One device's shard of a global window mini-batch, as arrays (the rows gathered).

  The sampling scheme of :func:`make_batch_fn`, materialized: useful as a reference and
  in tests; training reads the same rows lazily through a :func:`windowed` loss.

  Args:
    key: PRNG key, the same on every device.
    data: a :class:`Dataset` (replicated) or :class:`Segments`.
    batch_size: global mini-batch size B.
    shard_index: this device's index.
    num_shards: N.
    num_segments: S, a multiple of N dividing B (default N).

  Returns:
    ``(x, y)``: float32 ``[B/N, dim]`` and ``[B/N]``, rows in segment order.

  Raises:
    ValueError: for sizes that do not divide as required.
  """
  x, y, window = _window_batch(key, data, batch_size, shard_index, num_shards,
                               num_segments, None)
  rows = window.indices()
  return x[rows], y[rows]


def make_batch_fn(batch_size: int, *, sampling: str = "window",
                  num_segments: int | None = None, block_rows: int | None = None):
  """A ``batch_fn`` for ``jrelu.parallel.make_step`` over a stored data set.

  ``sampling="window"`` (default): the data set is cut into S equal segments of
  ``L = n // S`` rows (S = ``num_segments``, default N, the number of devices; device i
  reads segments ``i S/N ... (i+1) S/N - 1``). Each step draws one offset ``u`` uniform
  in ``[0, L)`` from the step key, the same on every device, and the global batch is the
  ``B/S`` consecutive rows starting at ``u`` in every segment, wrapping around at the
  segment's end. So every stored row (but the ``n % S`` left over) is in a step's batch
  with probability exactly ``B/(S L)`` (``= B/n`` when S divides n), a batch holds no
  row twice, successive steps are independent, and the mini-batch gradient is an
  unbiased estimate of the gradient of the loss on those rows. When the data set's rows
  are i.i.d. (as the models' ``sample_dataset`` draw them), the
  stored order is already a uniformly random shuffle. What changes against drawing
  rows with replacement: rows that are stored next to each other share batches. What it
  buys: a device reads its rows as contiguous blocks, never gathers them, and
  a :func:`windowed` loss computes value and gradient in one pass over them. The N device
  shards concatenate to the batch one device reads with ``num_segments=N``.

  ``sampling="replacement"``: :func:`minibatch`, B rows drawn uniformly with
  replacement and gathered (the textbook scheme; a gather of ``B x d`` floats and a
  copy of the batch per step).

  Args:
    batch_size: global mini-batch size B.
    sampling: ``"window"`` or ``"replacement"``.
    num_segments: S for ``"window"``: a multiple of N that divides B; default N.
    block_rows: rows per block of the blocked loss; default
      :func:`default_block_rows`.

  Returns:
    ``batch_fn(key, data, shard_index, num_shards) -> batch`` where ``data`` is the pair
    ``(dataset, w_star)`` that the training loop passes to every device, ``dataset`` a
    :class:`Dataset` or, per device, its :class:`Segments` (:func:`split_segments`).
    ``"window"`` returns ``(x, y, window)`` for a :func:`windowed` loss, ``"replacement"`` returns ``(x, y)``.

  Raises:
    ValueError: if ``sampling`` is unknown or ``batch_size`` is not an integer >= 1;
      sizes that do not divide raise when the step is traced.

  Example:
    >>> step = parallel.make_step(loss, make_batch_fn(1024), tx, metrics_fn=metrics_fn)

  References:
    Bottou, "Curiously fast convergence of some stochastic gradient descent
    algorithms" (2009) and Mishchenko, Khaled, Richtarik, "Random Reshuffling: Simple
    Analysis with Vast Improvements", arXiv 2006.05988 (sampling without replacement
    from a stored order).
  """
  _checks.integer("batch_size", batch_size)
  if sampling not in SAMPLINGS:
    raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
  if num_segments is not None:
    _checks.integer("num_segments", num_segments)
  if block_rows is not None:
    _checks.integer("block_rows", block_rows)

  def batch_fn(key, data, shard_index, num_shards):
    dataset, _ = data
    if sampling == "replacement":
      return minibatch(key, dataset, batch_size, shard_index, num_shards)
    return _window_batch(key, dataset, batch_size, shard_index, num_shards, num_segments,
                         block_rows)
  return batch_fn


def make_online_batch_fn(batch_size: int, sample_batch: Callable):
  """A ``batch_fn`` that draws a fresh batch every step: no stored data set.

  Device i draws its ``B/N`` rows with ``sample_batch`` from the step key folded with i.
  This is SGD on the population loss, the streaming setting, and scales to any ``d`` that
  one device's ``[B/N, d]`` batch fits in memory.

  Args:
    batch_size: global mini-batch size B, divisible by the number of devices.
    sample_batch: ``sample_batch(key, truth, num_rows) -> (x, y)``, the model's sampler
      (for example ``jrelu.planted.sample_batch``).

  Returns:
    ``batch_fn(key, data, shard_index, num_shards) -> (x, y)`` with ``data`` the pair
    ``(anything, truth)``, for example ``(None, w_star)``. Use it with the model's plain
    (not windowed) loss.

  Raises:
    ValueError: if ``batch_size`` is not an integer >= 1 (or, when traced, not divisible
      by the number of devices).

  Example:
    >>> batch_fn = make_online_batch_fn(256, planted.sample_batch)
    >>> step = parallel.make_step(planted.loss, batch_fn, tx, metrics_fn=planted.metrics_fn)
    >>> run(state, (None, w_star), key)
  """
  _checks.integer("batch_size", batch_size)

  def batch_fn(key, data, shard_index, num_shards):
    if batch_size % num_shards:
      raise ValueError(
          f"batch_size={batch_size} is not divisible by num_shards={num_shards}")
    return sample_batch(jax.random.fold_in(key, shard_index), data[1],
                        batch_size // num_shards)
  return batch_fn
