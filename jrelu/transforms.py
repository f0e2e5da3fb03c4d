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
leaves draw independent noise and a seed reproduces a run bit for bit. Codecs with common
randomness (FO-SGD's rotation, rand-k's indices) are bound to
``aggregation.common_key(fold_in(rng_key, count))`` split per leaf, which every device
shares, so their codes carry no seed.

``error_feedback(compressor, ...)`` adds the per-device residual of EF-SGD, and
``signum(...)`` is momentum before the sign with a majority vote.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jrelu import _checks
from jrelu import aggregation as aggregation_lib
from jrelu import compressors


class ErrorFeedbackState(NamedTuple):
  """State of :func:`error_feedback`.

  Attributes:
    count: int32 scalar, number of updates so far.
    rng_key: typed PRNG key array, the transform's base key.
    error: pytree like the updates (float32), this device's residual ``e``.
  """
  count: jax.Array
  rng_key: jax.Array
  error: optax.Updates


class CompressState(NamedTuple):
  """State of :func:`compress`.

  Attributes:
    count: int32 scalar, number of updates so far (folded into the key).
    rng_key: typed PRNG key array, the transform's base key (never advanced in place).
  """
  count: jax.Array
  rng_key: jax.Array


class WireCostWarning(UserWarning):
  """A codec and aggregation that send more bits than a float32 all-reduce would.

  Raised (as a warning) once per trace of a transform's ``update``, when the shapes and
  the device count are known. Filter it with ``warnings.simplefilter("ignore",
  jrelu.WireCostWarning)`` or make it an error with ``"error"``.

  Example:
    >>> warnings.simplefilter("error", jrelu.WireCostWarning)   # fail instead of warn
  """


def bound_axis_size(axis_name: str, what: str) -> int:
  """The size of the mapped axis ``axis_name``, which ``what`` needs to be inside.

  Args:
    axis_name: the axis a transform was built with.
    what: the transform, for the message (e.g. ``"jrelu.compress(QSGD(...))"``).

  Returns:
    N, the number of devices along ``axis_name`` (a Python int).

  Raises:
    NameError: if no ``jax.pmap`` / ``jax.shard_map`` / ``jax.vmap`` binds
      ``axis_name`` here (JAX's own "unbound axis name"), saying what to do instead.

  Example:
    >>> jax.pmap(lambda x: x * bound_axis_size("data", "f"), axis_name="data")(xs)
  """
  try:
    return jax.lax.axis_size(axis_name)
  except NameError as e:
    raise NameError(
        f"{what} was built with axis_name={axis_name!r} but runs outside a mapped axis "
        f"of that name. Call it inside jax.pmap(..., axis_name={axis_name!r}) or "
        f"jax.shard_map over a mesh with an axis {axis_name!r} (see README, \"In your own "
        "optax code\"), or build it with axis_name=None to compress on one device "
        "without communication.") from e


def _dtype(leaf):
  return jnp.dtype(leaf.dtype) if hasattr(leaf, "dtype") else jnp.result_type(leaf)


def _passes_through(leaf) -> bool:
  """Leaves with nothing to send: empty arrays and float0 (``jax.grad(allow_int=True)``)."""
  return _dtype(leaf) == jax.dtypes.float0 or jnp.size(leaf) == 0


def _check_leaves(updates, what: str) -> None:
  """Raises TypeError naming the first leaf that is neither floating nor passed through."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(updates)[0]:
    dtype = _dtype(leaf)
    if _passes_through(leaf) or jnp.issubdtype(dtype, jnp.floating):
      continue
    raise TypeError(
        f"{what} got a {dtype} leaf at updates{jax.tree_util.keystr(path)} (shape "
        f"{jnp.shape(leaf)}); it compresses float gradients only. Differentiate with "
        "respect to the float parameters only, or use jax.grad(..., allow_int=True), whose "
        "float0 zeros for integer parameters pass through uncompressed.")


def _warn_if_costlier(compressor, aggregation, shapes, num_devices, what):
  """Warns when ``aggregation`` of these shapes sends more than float32 all-reduces."""
  def total(strategy):
    try:
      return sum(aggregation_lib.wire_bits(strategy, compressor, shape, num_devices)
                 for shape in shapes)
    except ValueError:   # a shape the strategy's formula does not cover: no advice
      return float("inf")
  sent = total(aggregation)
  baseline = sum(aggregation_lib.float32_allreduce_bits(shape, num_devices)
                 for shape in shapes)
  if not baseline < sent < float("inf"):
    return
  best = min(aggregation_lib.supported(compressor), key=total)
  advice = (f"aggregation={best!r} sends {total(best):,.0f}" if total(best) < baseline
            else "no strategy of this codec sends fewer (use the float32 psum)")
  warnings.warn(
      f"{what} with aggregation={aggregation!r} sends {sent:,.0f} bits per step per device "
      f"for these {len(shapes)} leaves on {num_devices} devices, more than a float32 "
      f"all-reduce ({baseline:,.0f}); {advice}.", WireCostWarning, stacklevel=2)


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
    aggregation: one of ``jrelu.aggregation.STRATEGIES`` that fits the codec (``"psum"``,
      ``"all_gather"``, ``"two_phase"``, ``"majority_vote"`` for the sign codec,
      ``"integer_psum"`` for shared-scale integer codecs); ignored when ``axis_name`` is
      None.

  Returns:
    An ``optax.GradientTransformation``. ``update(grads, state, params=None)`` maps a
    pytree of float arrays to the compressed mean pytree of the same structure, shapes
    and dtypes; the state is a :class:`CompressState`. Empty leaves and float0 leaves
    (``jax.grad(..., allow_int=True)``'s zeros for integer parameters) pass through
    unchanged, and nothing is sent for them.

  Raises:
    ValueError: if ``compressor`` is not a Compressor (an optax transform such as
      ``jrelu.powersgd.powersgd`` goes into ``optax.chain`` directly), ``key`` is not a
      PRNG key or ``aggregation`` is unknown.
    TypeError: from ``update``, for an integer or bool leaf, naming its pytree path.
    NameError: from ``update``, when ``axis_name`` is not bound (called outside
      ``jax.pmap`` / ``jax.shard_map`` over it), saying what to do instead.

  Warns:
    WireCostWarning: from ``update`` (once per trace), when ``aggregation`` sends more
      bits for these shapes and devices than a float32 all-reduce, naming the cheapest
      strategy of the codec (e.g. ATOMO under ``all_gather``: use ``two_phase``).

  Example:
    >>> tx = optax.chain(compress(compressors.qsgd(4), key=jax.random.key(0),
    ...                           axis_name="data"), optax.sgd(0.5))

  References:
    Alistarh et al., "QSGD", arXiv 1610.02132 (Algorithm 1: encode, exchange, decode,
    average); Kalan, Soltanolkotabi, Avestimehr, "Fitting ReLUs via SGD and Quantized
    SGD", arXiv 1901.06587.
  """
  _check_codec("compressor", compressor)
  key = as_typed_key(key)
  aggregation_lib.check_strategy(aggregation, compressor if axis_name is not None else None)
  what = f"jrelu.compress({compressor!r})"

  def init_fn(params):
    del params
    return CompressState(count=jnp.zeros((), jnp.int32), rng_key=key)

  def update_fn(updates, state, params=None):
    del params
    _check_leaves(updates, what)
    means, _ = _compressed_mean(compressor, aggregation, axis_name, state, updates, what)
    return means, CompressState(count=optax.safe_int32_increment(state.count),
                                rng_key=state.rng_key)

  return optax.GradientTransformation(init_fn, update_fn)


def _check_codec(name, compressor):
  """Raises ValueError unless ``compressor`` is a codec (saying so for optax transforms)."""
  if isinstance(compressor, optax.GradientTransformation):
    raise ValueError(
        f"{name} must be a jrelu.compressors.Compressor, got an optax "
        "GradientTransformation; transforms such as jrelu.powersgd.powersgd(rank, ...) "
        "do their own communication: put them in optax.chain directly, without "
        "jrelu.compress")
  if not isinstance(compressor, compressors.Compressor):
    raise ValueError(f"{name} must be a jrelu.compressors.Compressor, got {compressor!r}")


def _compressed_mean(compressor, aggregation, axis_name, state, updates, what):
  """Per-leaf compressed means and local estimates under the documented key schedule.

  Empty and float0 leaves pass through unchanged (nothing is sent for them); the caller
  has checked that every other leaf is floating.
  """
  leaves, treedef = jax.tree_util.tree_flatten(updates)
  sent = [not _passes_through(g) for g in leaves]
  shared_key = jax.random.fold_in(state.rng_key, state.count)
  step_key = shared_key
  if axis_name is not None:
    num_devices = bound_axis_size(axis_name, what)
    _warn_if_costlier(compressor, aggregation,
                      [jnp.shape(g) for g, s in zip(leaves, sent) if s], num_devices, what)
    step_key = jax.random.fold_in(shared_key, jax.lax.axis_index(axis_name))
  num_keys = max(len(leaves), 1)
  keys = jax.random.split(step_key, num_keys)
  common = jax.random.split(aggregation_lib.common_key(shared_key), num_keys)
  pairs = []
  for k, g, c, s in zip(keys, leaves, common, sent):
    if not s:
      pairs.append((g, g))
    elif axis_name is None:
      y = compressor(k, g)
      pairs.append((y, y))
    else:
      pairs.append(aggregation_lib.aggregate_with_local(aggregation, compressor, k, g,
                                                        axis_name, c))
  means = jax.tree_util.tree_unflatten(treedef, [m for m, _ in pairs])
  local = jax.tree_util.tree_unflatten(treedef, [l for _, l in pairs])
  return means, local


def error_feedback(inner: compressors.Compressor, *, key, axis_name: str | None = None,
                   aggregation: str = "two_phase") -> optax.GradientTransformation:
  """Error-feedback compression (EF-SGD): compresses ``g + e`` and keeps ``e``'s residual.

  Each device keeps its own residual ``e`` (zeros at first). With ``p = g + e`` it sends
  ``C(p)`` through the aggregation, returns the compressed mean, and keeps
  ``e <- p - C_local(p)``, where ``C_local(p)`` is the decoded value of what this device
  sent (see ``jrelu.aggregation.aggregate_with_local``). With a constant step size
  ``lr`` (``optax.sgd(lr)`` after this transform) this is Karimireddy et al.'s
  ``p_t = lr g_t + e_t`` up to the factor ``lr``; with a schedule the residual is kept in
  gradient units. Under ``two_phase`` only the first (device) compression is fed back;
  the re-encoding of the averaged chunk is not (its error is independent across steps for
  unbiased codecs, and small for the others).

  Works with any codec; it is what biased ones (top-k, scaled sign, PowerSGD-like
  low-rank codecs) need to converge at SGD's rate.

  Args:
    inner: the codec ``C``, e.g. ``jrelu.compressors.top_k(fraction=0.1)``.
    key: a PRNG key.
    axis_name: mapped device axis, or None for single-device use.
    aggregation: one of ``jrelu.aggregation.STRATEGIES`` that fits ``inner``.

  Returns:
    An ``optax.GradientTransformation`` with :class:`ErrorFeedbackState`. Empty and
    float0 leaves pass through as in :func:`compress` (their residual stays zero).

  Raises:
    ValueError: if ``inner`` is not a Compressor, ``key`` is not a PRNG key or the
      aggregation is unknown or unfit.
    TypeError, NameError: from ``update``, as in :func:`compress`.

  Warns:
    WireCostWarning: as in :func:`compress`.

  Example:
    >>> tx = optax.chain(
    ...     error_feedback(compressors.top_k(fraction=0.1), key=jax.random.key(0),
    ...                    axis_name="data"),
    ...     optax.sgd(0.5))

  References:
    Karimireddy, Rebjock, Stich, Jaggi, "Error Feedback Fixes SignSGD and other Gradient
    Compression Schemes", ICML 2019, arXiv 1901.09847; Stich, Cordonnier, Jaggi,
    "Sparsified SGD with Memory", NeurIPS 2018, arXiv 1809.07599.
  """
  _check_codec("inner", inner)
  key = as_typed_key(key)
  if axis_name is not None:
    aggregation_lib.check_strategy(aggregation, inner)
  what = f"jrelu.error_feedback({inner!r})"

  def init_fn(params):
    error = jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    return ErrorFeedbackState(count=jnp.zeros((), jnp.int32), rng_key=key, error=error)

  def update_fn(updates, state, params=None):
    del params
    _check_leaves(updates, what)
    corrected = jax.tree_util.tree_map(
        lambda g, e: g if _passes_through(g) else g.astype(jnp.float32) + e, updates,
        state.error)
    means, local = _compressed_mean(inner, aggregation, axis_name, state, corrected, what)
    error = jax.tree_util.tree_map(
        lambda g, p, c, e: e if _passes_through(g) else p - c.astype(jnp.float32),
        updates, corrected, local, state.error)
    means = jax.tree_util.tree_map(
        lambda m, g: m if _passes_through(g) else m.astype(g.dtype), means, updates)
    return means, ErrorFeedbackState(count=optax.safe_int32_increment(state.count),
                                     rng_key=state.rng_key, error=error)

  return optax.GradientTransformation(init_fn, update_fn)


def signum(beta: float = 0.9, *, key, axis_name: str | None = None,
           aggregation: str = "majority_vote") -> optax.GradientTransformation:
  """Signum with majority vote: momentum on each device, then the sign, then the vote.

  ``m <- beta m + (1 - beta) g`` on each device (``optax.ema`` without debiasing), then
  :func:`compress` with the unscaled sign codec. Follow it with ``optax.sgd(lr)`` (the
  sign step ``-lr * sign(vote)``), ideally with a decaying schedule.

  Args:
    beta: momentum in ``[0, 1)``; 0 is signSGD.
    key: a PRNG key, for the sign codec's coin flips at exact zeros (and the tied
      votes that majority_vote re-encodes as zeros).
    axis_name: mapped device axis, or None for single-device Signum.
    aggregation: ``"majority_vote"`` (default), or any strategy that fits the sign codec.

  Returns:
    An ``optax.GradientTransformation``.

  Raises:
    ValueError: if ``beta`` is not a finite number in ``[0, 1)``.

  Example:
    >>> tx = optax.chain(signum(0.9, key=jax.random.key(0), axis_name="data"),
    ...                  optax.sgd(optax.exponential_decay(1e-3, 100, 0.5)))

  References:
    Bernstein, Wang, Azizzadenesheli, Anandkumar, "signSGD: Compressed Optimisation for
    Non-Convex Problems", ICML 2018, arXiv 1802.04434; Bernstein, Zhao, Azizzadenesheli,
    Anandkumar, "signSGD with Majority Vote is Communication Efficient and Fault
    Tolerant", ICLR 2019, arXiv 1810.05291.
  """
  beta = _checks.number("beta", beta, low=0.0, high=1.0, high_open=True)
  return optax.chain(
      optax.ema(beta, debias=False),
      compress(compressors.sign(), key=key, axis_name=axis_name, aggregation=aggregation))


def qsgd(num_levels: int, *, key, axis_name: str | None = None,
         aggregation: str = "two_phase", bucket_size: int | None = None,
         norm: str = "max") -> optax.GradientTransformation:
  """QSGD-compressed gradient averaging as an optax transform.

  Shortcut for ``compress(compressors.qsgd(num_levels, bucket_size, norm), ...)``, with
  the defaults of ``jrelu.compressors.qsgd`` and of the ``jrelu.train`` binary: max-norm
  scaling, one bucket per leaf (per chunk of ``ceil(d/N)`` under ``two_phase``).

  Args:
    num_levels: s >= 1, QSGD's number of positive levels.
    key: a PRNG key.
    axis_name: mapped device axis, or None for single-device use.
    aggregation: ``"psum"``, ``"all_gather"``, ``"two_phase"`` (default) or
      ``"integer_psum"``.
    bucket_size: coordinates per quantization bucket, or None (default) for one bucket.
    norm: ``"max"`` (default, the QSGD paper's experiments) or ``"l2"`` (its theory).

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
