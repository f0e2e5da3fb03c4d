"""Averaging compressed per-device arrays across a mapped axis, named by what crosses the wire.

Every strategy takes one device's array ``x`` (inside ``jax.pmap`` / ``jax.shard_map`` over
``axis_name``) and returns an estimate of the mean of ``x`` over the axis that is identical,
bit for bit, on every device. Under ``jax.shard_map`` the mean is also *typed* as the same
on every device (invariant), so ``out_specs=P()`` accepts it and replicated parameters
stay replicated:

* ``psum``: encode, decode locally, then all-reduce float32 (the honest baseline: the
  compression saves nothing on the wire).
* ``all_gather``: all-gather the packed codes, decode every device's code, average.
  Each device sends ``(N - 1)`` code sizes, which grows with N.
* ``two_phase``: split into N chunks and encode each; all-to-all so device j holds every
  device's code for chunk j; decode and average it; re-encode the average with a fresh
  key; all-gather those codes and decode. About ``2 (N - 1) / N`` code sizes per device,
  flat in N, and unbiased when the codec is (the re-encoding is independent noise).
* ``majority_vote``: ``two_phase`` for the unscaled sign codec, where decoding, averaging
  and re-encoding the N received sign chunks is exactly the majority vote of
  Bernstein et al.: each device votes on its chunk and all-gathers the packed vote.
* ``integer_psum``: for shared-scale integer codecs (``integer_sum``: QSGD, TernGrad).
  Scales are made common with a ``pmax`` (one float each), every device quantizes against
  them, the levels are offset to be non-negative and packed ``32 // w`` to a uint32 word
  with ``w = bits_for(2 L N + 1)`` bits per field, and the words are all-reduced as
  integers: the sum of N fields is at most ``2 L N < 2**w``, so no field overflows into
  its neighbour. Unbiased when the codec is; costs ``2 (N-1)/N`` packed-word sizes.

NaN and Inf are never hidden: if any device's ``x`` holds NaN or Inf, every device's
mean is non-finite under every strategy. The codecs poison their codes (see each codec's
docstring), and ``integer_psum`` sends a non-finite scale as +Inf through its ``pmax``.

A code's leaves (packed words, scales, indices) cross the wire as one uint32 buffer per
collective: a collective is a rendezvous of every device, and on simulated CPU devices
that synchronisation, not the bytes, dominates a step (``two_phase`` went from four
collectives to two, QSGD's step from 2.5 to 2.0 ms at d = 1000 on 8 devices).

Codecs with common randomness (``Compressor.bind``) are bound to a key every device
knows before encoding, so their codes carry no seed.

Every strategy also returns this device's *local* estimate, the decoded value of what it
contributed (for ``two_phase``, its own first-phase chunk codes): error feedback
(``jrelu.transforms.error_feedback``) keeps ``x - local`` as its residual.

``wire_bits`` predicts the bits one device sends per call under the cost model of
``jrelu.wire``; a test checks it against the compiled program.

With ``bucket_size=None`` a QSGD code in ``two_phase`` carries one scale per chunk of
``ceil(d/N)`` coordinates, which lowers its variance compared with one scale for all d.

References:
  Alistarh et al., "QSGD", arXiv 1610.02132 (Algorithm 1: every worker decodes every
  other worker's code, i.e. ``all_gather``); Tang et al., "1-bit Adam: Communication
  Efficient Large-Scale Training with Adam's Convergence Speed", arXiv 2102.02888 (the
  two-phase compressed all-reduce).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jrelu import _checks
from jrelu.compressors import base
from jrelu.compressors import bitpack

STRATEGIES = ("psum", "all_gather", "two_phase", "majority_vote", "integer_psum")


def check_strategy(strategy: str, compressor: base.Compressor | None = None) -> str:
  """Returns ``strategy`` if known (and usable with ``compressor``, when given).

  Raises:
    ValueError: naming the choices for an unknown strategy, or saying why ``compressor``
      cannot use it (``majority_vote`` needs the unscaled sign codec, ``integer_psum`` a
      shared-scale integer codec).
  """
  _checks.choice("aggregation", strategy, STRATEGIES)
  if compressor is not None:
    if strategy == "majority_vote" and not compressor.majority_vote:
      raise ValueError(f"aggregation 'majority_vote' needs a sign codec without scale "
                       f"(compressors.sign()), got {compressor!r}")
    if strategy == "integer_psum" and not compressor.integer_sum:
      raise ValueError(f"aggregation 'integer_psum' needs a shared-scale integer codec "
                       f"(qsgd, terngrad), got {compressor!r}")
  return strategy


def supported(compressor: base.Compressor) -> tuple[str, ...]:
  """The strategies ``compressor`` can be aggregated with, in ``STRATEGIES`` order."""
  ok = []
  for strategy in STRATEGIES:
    try:
      check_strategy(strategy, compressor)
    except ValueError:
      continue
    ok.append(strategy)
  return tuple(ok)


def common_key(step_key):
  """The key every device shares in a step, for codecs with common randomness.

  ``step_key`` is the per-step key *before* the device index is folded in; the salt
  keeps it apart from every per-device key ``fold_in(step_key, axis_index)``.
  """
  return jax.random.fold_in(step_key, 0x7FFFFFFF)


def aggregate(strategy: str, compressor: base.Compressor, key, x, axis_name: str,
              common_key=None):
  """Averages compressed ``x`` over ``axis_name``.

  Args:
    strategy: one of ``STRATEGIES``.
    compressor: the codec applied to this device's ``x``.
    key: this device's PRNG key (callers fold in the device index, so devices draw
      independent noise).
    x: this device's array, any shape, floating dtype.
    axis_name: the mapped axis to average over (must be bound by pmap / shard_map).
    common_key: a key identical on every device, used by codecs with common randomness
      (see :func:`common_key`); None binds nothing (such codecs then send a seed).

  Returns:
    An array of ``x``'s shape and dtype: the compressed mean over devices, identical on
    every device.

  Raises:
    ValueError: if ``strategy`` is unknown or does not fit ``compressor``.

  Example:
    >>> # inside jax.pmap(..., axis_name="data"):
    >>> g_hat = aggregate("two_phase", qsgd(4), key, g, "data")
  """
  return aggregate_with_local(strategy, compressor, key, x, axis_name, common_key)[0]


def aggregate_with_local(strategy: str, compressor: base.Compressor, key, x,
                         axis_name: str, common_key=None):
  """Like :func:`aggregate`, and also returns this device's local estimate.

  Returns:
    ``(mean, local)``, both of ``x``'s shape and dtype: ``mean`` is the compressed mean
    (identical on every device); ``local`` is the decoded value of what this device
    contributed, so ``x - local`` is its compression error (error feedback's residual).
    For ``two_phase`` and ``majority_vote`` that is its first-phase chunk codes; for
    ``integer_psum`` its levels under the shared scales.

  Raises:
    ValueError: if ``strategy`` is unknown or does not fit ``compressor``.
  """
  check_strategy(strategy, compressor)
  mean, local = _STRATEGY_FNS[strategy](compressor, key, x, axis_name, common_key)
  return mean.astype(x.dtype), local.astype(x.dtype)


def _bind(compressor, common_key, phase):
  """``compressor`` bound to the common key of one phase (each phase draws afresh)."""
  if common_key is None:
    return compressor
  return compressor.bind(jax.random.fold_in(common_key, phase))


def _psum(compressor, key, x, axis_name, common_key):
  local = _bind(compressor, common_key, 0)(key, x)
  return jax.lax.pmean(local, axis_name), local


def _all_gather(compressor, key, x, axis_name, common_key):
  compressor = _bind(compressor, common_key, 0)
  code = compressor.encode(key, x)
  codes = _fused(lambda w: _all_gather_identical(w, axis_name), code)
  return jnp.mean(jax.vmap(compressor.decode)(codes), axis=0), compressor.decode(code)


def _two_phase(codec, key, x, axis_name, common_key):
  # The two phases must not share common randomness: re-encoding rand-k's averaged chunk
  # on the same index set would rescale it twice.
  compressor, second = _bind(codec, common_key, 0), _bind(codec, common_key, 1)
  n = jax.lax.axis_size(axis_name)
  flat = jnp.ravel(x)
  d = flat.shape[0]
  chunk = chunk_size(d, n)
  chunks = jnp.pad(flat, (0, n * chunk - d)).reshape(n, chunk)
  scatter_key, gather_key = jax.random.split(key)
  codes = jax.vmap(compressor.encode)(jax.random.split(scatter_key, n), chunks)
  # Row j of the result is device j's code for this device's chunk.
  received = _fused(lambda w: jax.lax.all_to_all(w, axis_name, 0, 0), codes, batched=True)
  mine = jnp.mean(jax.vmap(compressor.decode)(received), axis=0)
  gathered = _fused(lambda w: _all_gather_identical(w, axis_name),
                    second.encode(gather_key, mine))
  mean = jax.vmap(second.decode)(gathered).reshape(-1)[:d].reshape(x.shape)
  local = jax.vmap(compressor.decode)(codes).reshape(-1)[:d].reshape(x.shape)
  return mean, local


def integer_psum_width(compressor: base.Compressor, num_devices: int) -> int:
  """Bits per packed field of ``integer_psum``: ``bits_for(2 L N + 1)``, L = ``max_level``.

  The sum of N devices' offset levels is at most ``2 L N``; it must fit a field of one
  uint32 word and, once the offset ``N L`` is removed, an int32.

  Args:
    compressor: a shared-scale integer codec (``integer_sum``).
    num_devices: N.

  Returns:
    The field width in bits.

  Raises:
    ValueError: if ``2 L N + 1 > 2^31`` (e.g. QSGD with ``num_levels=2**24`` on 128
      devices), saying which product is too large.

  Example:
    >>> integer_psum_width(qsgd(4), 8)   # sums of 8 levels in [-4, 4]: 0..64
    7
  """
  n = _checks.integer("num_devices", num_devices)
  top = compressor.max_level
  if 2 * top * n + 1 > 2**31:
    raise ValueError(f"integer_psum on {n} devices with max_level={top} sums levels up to "
                     f"2 * {top} * {n} = {2 * top * n}, more than an int32 holds; use fewer "
                     "levels or another aggregation")
  return bitpack.bits_for(2 * top * n + 1)


def _integer_psum(compressor, key, x, axis_name, common_key):
  compressor = _bind(compressor, common_key, 0)
  n = jax.lax.axis_size(axis_name)
  top = compressor.max_level
  width = integer_psum_width(compressor, n)
  d = base.num_elements(x.shape)
  # A NaN or Inf input gives a non-finite scale. It is sent as +Inf: XLA's CPU pmax may
  # drop a NaN, never an Inf. Every device then shares scale Inf for that bucket, which
  # dequantizes to NaN (levels are 0 there), so a broken worker is never averaged away,
  # at no extra bits.
  own = compressor.scales(x)
  scales = jax.lax.pmax(jnp.where(jnp.isfinite(own), own, jnp.inf), axis_name)
  levels = compressor.quantize(key, x, scales)
  words = bitpack.pack_aligned(levels + top, width)
  total = bitpack.unpack_aligned(jax.lax.psum(words, axis_name), width, d)
  summed = total.astype(jnp.int32) - n * top
  mean = compressor.dequantize(summed, scales, x.shape, jnp.float32) / n
  return mean, compressor.dequantize(levels, scales, x.shape, jnp.float32)


def varying_axes(x) -> frozenset:
  """Mesh axes along which ``x`` is typed as device-varying (empty outside ``shard_map``).

  ``jax.shard_map`` types every value as *varying* along an axis (it may differ between
  devices) or *invariant* (the same on every device); ``jax.pmap``, ``jax.vmap`` and
  ``shard_map(..., check_vma=False)`` type nothing.

  Args:
    x: an array (a tracer inside a mapped function).

  Returns:
    The axis names, a frozenset of str.

  Example:
    >>> # inside jax.shard_map(f, mesh=mesh, in_specs=P("data"), out_specs=P("data")):
    >>> varying_axes(x)
    frozenset({'data'})
  """
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.9
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(aval, "vma", ()))  # older jax


def _all_gather_identical(w, axis_name):
  """``all_gather`` of ``w``, typed invariant where shard_map types values.

  Every device receives the same gathered array, so the compressed mean decoded from it
  is identical on every device. Saying so (``to="invarying"``) lets ``jax.shard_map``
  return it with ``out_specs=P()`` and keeps replicated parameters replicated. The
  program and its bits are those of a plain all-gather; where nothing is typed (pmap,
  vmap) the plain one is used.
  """
  to = "invarying" if axis_name in varying_axes(w) else "varying"
  return jax.lax.all_gather(w, axis_name, to=to)


def _fused(collective, code, batched=False):
  """Runs ``collective`` once on all of ``code``'s leaves as one uint32 buffer.

  Each collective is a rendezvous of every device, so one per code rather than one per
  leaf (packed words, scales, ...) saves a synchronisation; the bytes sent are the same.
  Leaves are bitcast to uint32 words and concatenated along their last axis; leaves that
  are not 32-bit keep a collective of their own.

  Args:
    collective: maps a ``[..., W]`` array to ``[N, W]`` (all-gather of ``[W]``) or to an
      array of the same shape (all-to-all of ``[N, W]``).
    code: a pytree of arrays, every leaf with a leading axis of size N if ``batched``.
    batched: whether the leaves carry a leading device axis (all-to-all).

  Returns:
    The pytree ``collective`` would return leaf by leaf.
  """
  leaves, treedef = jax.tree_util.tree_flatten(code)
  lead = 1 if batched else 0
  fuse = [jnp.dtype(leaf.dtype).itemsize == 4 for leaf in leaves]
  parts = [jax.lax.bitcast_convert_type(leaf, jnp.uint32).reshape(leaf.shape[:lead] + (-1,))
           for leaf, f in zip(leaves, fuse) if f]
  out = []
  if parts:
    words = collective(jnp.concatenate(parts, axis=-1))
    sizes = [int(np.prod(leaf.shape[lead:])) for leaf, f in zip(leaves, fuse) if f]
    pieces = iter(jnp.split(words, np.cumsum(sizes)[:-1], axis=-1))
  for leaf, f in zip(leaves, fuse):
    if not f:
      out.append(collective(leaf))
      continue
    piece = next(pieces)
    shape = piece.shape[:1] + leaf.shape[lead:]
    out.append(jax.lax.bitcast_convert_type(piece.reshape(shape), leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


_STRATEGY_FNS = {"psum": _psum, "all_gather": _all_gather, "two_phase": _two_phase,
                 "majority_vote": _two_phase, "integer_psum": _integer_psum}


def chunk_size(num_values: int, num_devices: int) -> int:
  """Coordinates per chunk in ``two_phase``: ``ceil(num_values / num_devices)``."""
  return -(-num_values // num_devices)


def wire_bits(strategy: str, compressor: base.Compressor, shape, num_devices: int) -> float:
  """Bits one device sends in one ``aggregate`` call, under ``jrelu.wire``'s cost model.

  Args:
    strategy: one of ``STRATEGIES``.
    compressor: the codec.
    shape: shape of one device's array.
    num_devices: N, the size of the mapped axis.

  Returns:
    ``psum``: ``2 (N-1)/N * 32 d`` (a float32 all-reduce); ``all_gather``:
    ``(N-1) * wire_bits(shape)``; ``two_phase`` and ``majority_vote``:
    ``2 (N-1) * wire_bits((ceil(d/N),))`` (an all-to-all of N chunk codes plus an
    all-gather of one); ``integer_psum``: ``2 (N-1)/N * 32 * (num_scales +
    aligned_words(d, bits_for(2 L N + 1)))`` (a pmax of the scales and an integer
    all-reduce of the packed levels). Codecs with common randomness are counted bound
    (no seed), as ``aggregate`` runs them.

  Raises:
    ValueError: if ``strategy`` is unknown or unfit for ``compressor``, or
      ``num_devices`` is not an integer >= 1.

  Example:
    >>> wire_bits("two_phase", qsgd(1), (1000,), 8)   # vs 56000 for float32 psum
    4032
  """
  n = _checks.integer("num_devices", num_devices)
  d = base.num_elements(shape)
  if strategy == "psum":
    return 2 * (n - 1) / n * 32 * d
  check_strategy(strategy, compressor)
  compressor = compressor.bind(jax.random.key(0))
  if strategy == "all_gather":
    return (n - 1) * compressor.wire_bits(tuple(shape))
  if strategy == "integer_psum":
    width = integer_psum_width(compressor, n)
    words = compressor.num_scales(tuple(shape)) + bitpack.aligned_words(d, width)
    return 2 * (n - 1) / n * 32 * words
  return 2 * (n - 1) * compressor.wire_bits((chunk_size(d, n),))


def float32_allreduce_bits(shape, num_devices: int) -> float:
  """Bits one device sends to all-reduce a float32 array of ``shape``: ``2 (N-1)/N * 32 d``."""
  return wire_bits("psum", None, shape, num_devices)
