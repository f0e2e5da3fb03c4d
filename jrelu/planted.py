"""The planted ReLU model: data, loss, metrics and initializations.

Kalan, Soltanolkotabi, Avestimehr, "Fitting ReLUs via SGD and Quantized SGD"
(arXiv 1901.06587): inputs ``x_i ~ N(0, I_d)``, targets ``y_i = ReLU(<w_star, x_i>)``
(optionally plus Gaussian label noise), loss ``L(w) = 1/(2m) sum_i (ReLU(<w, x_i>) - y_i)^2``.

The derivative convention is ``ReLU'(0) = 1/2`` (``relu`` below is a ``custom_jvp``):
``jax.nn.relu`` has derivative 0 at 0, which makes ``w = 0`` a stationary point, whereas with
1/2 the gradient at 0 is ``-(1/(2m)) sum_i y_i x_i``, whose expectation ``-w_star / 4``
points at the planted weights.

Mini-batches (``make_batch_fn``) are contiguous windows of the stored data set, read in
cache-sized blocks by :func:`loss` so that a training step streams its batch from memory
once; ``minibatch`` keeps the textbook draw with replacement, and
``make_online_batch_fn`` draws fresh Gaussian inputs every step (no stored data set).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

INITS = ("zeros", "moment", "random")
SAMPLINGS = ("window", "replacement")
# Rows per block of the blocked loss: the largest divisor of a device's window rows whose
# block of float32 rows stays within this many bytes (L2-sized, so that a block gathered
# from memory is still in cache for the backward pass).
BLOCK_BYTES = 1 << 20


class Dataset(NamedTuple):
  """A finite planted data set.

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
  device reads. :func:`loss` reads them in blocks of ``block_rows`` rows.

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


@jax.custom_jvp
def relu(z):
  """``max(z, 0)`` with derivative ``(1 + sign(z)) / 2``, i.e. 1/2 at 0.

  Example:
    >>> jax.grad(relu)(0.0)
    Array(0.5, dtype=float32, weak_type=True)
  """
  return jnp.maximum(z, 0)


@relu.defjvp
def _relu_jvp(primals, tangents):
  (z,), (dz,) = primals, tangents
  return relu(z), dz * (1 + jnp.sign(z)) / 2


def sample_w_star(key, dim: int):
  """Draws planted weights uniformly on the unit sphere of ``R^dim``.

  Args:
    key: PRNG key.
    dim: d >= 1.

  Returns:
    float32 ``[dim]`` with unit l2 norm.

  Raises:
    ValueError: if ``dim < 1``.

  Example:
    >>> w_star = sample_w_star(jax.random.key(0), 1000)
  """
  check_positive_int("dim", dim)
  w = jax.random.normal(key, (dim,), jnp.float32)
  return w / jnp.linalg.norm(w)


def sample_dataset(key, w_star, num_samples: int, noise_std: float = 0.0) -> Dataset:
  """Draws ``num_samples`` planted examples ``x ~ N(0, I)``, ``y = ReLU(<w_star, x>) + noise``.

  Args:
    key: PRNG key.
    w_star: float32 ``[dim]`` planted weights.
    num_samples: n >= 1.
    noise_std: standard deviation of additive Gaussian label noise (0 = realizable).

  Returns:
    A :class:`Dataset` with ``x`` float32 ``[n, dim]`` and ``y`` float32 ``[n]``.

  Raises:
    ValueError: if ``num_samples < 1`` or ``noise_std < 0``.

  Example:
    >>> data = sample_dataset(jax.random.key(1), w_star, 4000)
  """
  check_positive_int("num_samples", num_samples)
  if noise_std < 0:
    raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
  x_key, noise_key = jax.random.split(key)
  x = jax.random.normal(x_key, (num_samples, w_star.shape[0]), jnp.float32)
  y = relu(x @ w_star)
  if noise_std:
    y = y + noise_std * jax.random.normal(noise_key, y.shape, jnp.float32)
  return Dataset(x, y)


def loss(w, x, y, window: Window | None = None):
  """Empirical square loss ``(1/(2m)) sum_i (ReLU(<w, x_i>) - y_i)^2``.

  With ``window`` the sum runs over the ``m = window.size`` rows of ``(x, y)`` that the
  window covers, read in blocks of ``window.block_rows`` rows: each block is sliced
  from ``x`` once and its forward and backward passes run while it is in cache, so the
  value and the gradient together cost one read of the batch from memory, with no
  gather and no copy of the whole batch (a custom VJP computes the gradient during the
  forward pass).

  Args:
    w: float32 ``[dim]`` weights.
    x: float32 ``[m, dim]`` inputs (with ``window``: the stored rows ``[n, dim]``).
    y: float32 ``[m]`` targets (with ``window``: ``[n]``).
    window: optional :class:`Window` into ``x`` and ``y`` (from :func:`make_batch_fn`).

  Returns:
    float32 scalar. Its gradient uses ``ReLU'(0) = 1/2``.

  Example:
    >>> jax.grad(loss)(jnp.zeros(d), data.x, data.y)   # == -(x.T @ y) / (2 m)
  """
  if window is not None:
    return _window_loss(w, x, y, window)
  residual = relu(x @ w) - y
  return 0.5 * jnp.mean(residual * residual)


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


def _window_value_and_grad(w, x, y, window: Window):
  """Loss and gradient over a window, block by block (every block has the same size)."""
  num_blocks = window.rows_per_segment // window.block_rows
  value_and_grad = jax.value_and_grad(loss)

  def add_block(carry, segment_start, block):
    first = (window.offset + block * window.block_rows) % window.segment_length
    value, grad = value_and_grad(w, *_read_block(x, y, segment_start, first, window))
    return carry[0] + value, carry[1] + grad

  total = (jnp.zeros((), w.dtype), jnp.zeros_like(w))
  for k in range(window.num_segments):
    segment_start = window.start + k * window.segment_length
    if num_blocks == 1:
      total = add_block(total, segment_start, 0)
    else:
      total, _ = jax.lax.scan(
          lambda c, b, s=segment_start: (add_block(c, s, b), None), total,
          jnp.arange(num_blocks, dtype=jnp.int32))
  count = window.num_segments * num_blocks  # blocks; each term above is a block mean
  return total[0] / count, total[1] / count


@jax.custom_vjp
def _window_loss(w, x, y, window):
  return _window_value_and_grad(w, x, y, window)[0]


def _window_loss_fwd(w, x, y, window):
  value, grad = _window_value_and_grad(w, x, y, window)
  return value, (grad, w, x, y, window)


def _window_loss_bwd(residuals, cotangent):
  grad, w, x, y, window = residuals
  # Cotangents for the data: exact, but they gather and scatter the batch, so they are
  # only worth computing when asked for (otherwise they are dead code and removed).
  rows = window.indices()
  _, data_vjp = jax.vjp(lambda xb, yb: loss(w, xb, yb), x[rows], y[rows])
  x_rows, y_rows = data_vjp(cotangent)
  x_ct = jnp.zeros_like(x).at[rows].add(x_rows)
  y_ct = jnp.zeros_like(y).at[rows].add(y_rows)
  window_ct = jax.tree_util.tree_map(
      lambda a: np.zeros(a.shape, jax.dtypes.float0), window)
  return cotangent * grad, x_ct, y_ct, window_ct


_window_loss.defvjp(_window_loss_fwd, _window_loss_bwd)


def relative_error(w, w_star):
  """``||w - w_star||_2 / ||w_star||_2``, the planted model's accuracy metric.

  Args:
    w: float ``[dim]`` estimate.
    w_star: float ``[dim]`` planted weights (nonzero).

  Returns:
    float32 scalar.
  """
  return jnp.linalg.norm(w - w_star) / jnp.linalg.norm(w_star)


def init_params(name: str, key, data: Dataset):
  """Initial weights for SGD on the planted model.

  Args:
    name: ``"zeros"`` (works thanks to ``ReLU'(0) = 1/2``), ``"moment"``
      (``(2/n) sum_i y_i x_i``, an unbiased estimate of ``w_star`` since
      ``E[y x] = w_star / 2``) or ``"random"`` (``N(0, I/d)``).
    key: PRNG key (used by ``"random"``).
    data: the data set (``"moment"`` reads it; the others only its dimension).

  Returns:
    float32 ``[dim]``.

  Raises:
    ValueError: if ``name`` is unknown.

  Example:
    >>> w0 = init_params("moment", jax.random.key(2), data)
  """
  n, dim = data.x.shape
  if name == "zeros":
    return jnp.zeros((dim,), jnp.float32)
  if name == "moment":
    return 2.0 / n * (data.y @ data.x)
  if name == "random":
    return jax.random.normal(key, (dim,), jnp.float32) / jnp.sqrt(dim)
  raise ValueError(f"init must be one of {INITS}, got {name!r}")


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
  check_positive_int("num_segments", num_segments)
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
  check_positive_int("batch_size", batch_size)
  segments = num_shards if num_segments is None else num_segments
  check_positive_int("num_segments", segments)
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
  in tests; training reads the same rows lazily through :func:`loss`'s ``window``.

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
  unbiased estimate of the gradient of the loss on those rows. Since ``sample_dataset`` draws rows i.i.d., the
  stored order is already a uniformly random shuffle. What changes against drawing
  rows with replacement: rows that are stored next to each other share batches. What it
  buys: a device reads its rows as contiguous blocks, never gathers them, and
  :func:`loss` computes value and gradient in one pass over them. The N device
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
    ``"window"`` returns ``(x, y, window)`` for :func:`loss` (pass ``loss`` as
    ``loss_fn``), ``"replacement"`` returns ``(x, y)``.

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
  check_positive_int("batch_size", batch_size)
  if sampling not in SAMPLINGS:
    raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
  if num_segments is not None:
    check_positive_int("num_segments", num_segments)
  if block_rows is not None:
    check_positive_int("block_rows", block_rows)

  def batch_fn(key, data, shard_index, num_shards):
    dataset, _ = data
    if sampling == "replacement":
      return minibatch(key, dataset, batch_size, shard_index, num_shards)
    return _window_batch(key, dataset, batch_size, shard_index, num_shards, num_segments,
                         block_rows)
  return batch_fn


def make_online_batch_fn(batch_size: int):
  """A ``batch_fn`` that draws a fresh planted batch every step: no stored data set.

  Device i draws its ``B/N`` inputs ``x ~ N(0, I_d)`` from the step key folded with i,
  and ``y = ReLU(x @ w_star)`` exactly (no label noise). This is SGD on the population
  loss, the streaming setting, and scales to any ``d`` that one device's ``[B/N, d]``
  batch fits in memory (the data set of ``sample_dataset`` would need ``n >~ 3 d``
  rows).

  Args:
    batch_size: global mini-batch size B, divisible by the number of devices.

  Returns:
    ``batch_fn(key, data, shard_index, num_shards) -> (x, y)`` with ``data`` the pair
    ``(anything, w_star)``, for example ``(None, w_star)``; ``metrics_fn`` reads the same
    pair. Use it with the plain :func:`loss`.

  Raises:
    ValueError: if ``batch_size`` is not an integer >= 1 (or, when traced, not divisible
      by the number of devices).

  Example:
    >>> step = parallel.make_step(loss, make_online_batch_fn(256), tx,
    ...                           metrics_fn=metrics_fn)
    >>> run(state, (None, w_star), key)

  References:
    Kalan, Soltanolkotabi, Avestimehr, arXiv 1901.06587 (the planted Gaussian model).
  """
  check_positive_int("batch_size", batch_size)

  def batch_fn(key, data, shard_index, num_shards):
    if batch_size % num_shards:
      raise ValueError(
          f"batch_size={batch_size} is not divisible by num_shards={num_shards}")
    w_star = data[1]
    x = jax.random.normal(jax.random.fold_in(key, shard_index),
                          (batch_size // num_shards, w_star.shape[0]), w_star.dtype)
    return x, relu(x @ w_star)
  return batch_fn


def metrics_fn(params, data):
  """``{"relative_error": ...}`` of ``params`` for ``data = (dataset, w_star)``.

  The ``metrics_fn`` of ``jrelu.parallel.make_step``: no collectives, so it adds no wire
  bits to the compiled step.
  """
  return {"relative_error": relative_error(params, data[1])}


def check_positive_int(name: str, value) -> None:
  """Raises ``ValueError`` quoting ``value`` unless it is an integer >= 1 (not a bool).

  Args:
    name: the argument's name, used in the message.
    value: the value to check (Python or NumPy integer).

  Raises:
    ValueError: e.g. ``"dim must be an integer >= 1, got 0"``.

  Example:
    >>> check_positive_int("dim", 1000)   # returns None
  """
  try:
    ok = not isinstance(value, bool) and operator.index(value) >= 1
  except TypeError:
    ok = False
  if not ok:
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
