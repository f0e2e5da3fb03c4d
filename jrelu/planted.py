"""The planted ReLU model: data, loss, metrics and initializations.

Kalan, Soltanolkotabi, Avestimehr, "Fitting ReLUs via SGD and Quantized SGD"
(arXiv 1901.06587): inputs ``x_i ~ N(0, I_d)``, targets ``y_i = ReLU(<w_star, x_i>)``
(optionally plus Gaussian label noise), loss ``L(w) = 1/(2m) sum_i (ReLU(<w, x_i>) - y_i)^2``.

The derivative convention is ``ReLU'(0) = 1/2`` (``relu`` below is a ``custom_jvp``):
``jax.nn.relu`` has derivative 0 at 0, which makes ``w = 0`` a stationary point, whereas with
1/2 the gradient at 0 is ``-(1/(2m)) sum_i y_i x_i``, whose expectation ``-w_star / 4``
points at the planted weights.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp

INITS = ("zeros", "moment", "random")


class Dataset(NamedTuple):
  """A finite planted data set.

  Attributes:
    x: float32 ``[num_samples, dim]`` inputs.
    y: float32 ``[num_samples]`` targets.
  """
  x: jax.Array
  y: jax.Array


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
  _check_positive("dim", dim)
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
  _check_positive("num_samples", num_samples)
  if noise_std < 0:
    raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
  x_key, noise_key = jax.random.split(key)
  x = jax.random.normal(x_key, (num_samples, w_star.shape[0]), jnp.float32)
  y = relu(x @ w_star)
  if noise_std:
    y = y + noise_std * jax.random.normal(noise_key, y.shape, jnp.float32)
  return Dataset(x, y)


def loss(w, x, y):
  """Empirical square loss ``(1/(2m)) sum_i (ReLU(<w, x_i>) - y_i)^2``.

  Args:
    w: float32 ``[dim]`` weights.
    x: float32 ``[m, dim]`` inputs.
    y: float32 ``[m]`` targets.

  Returns:
    float32 scalar. Its gradient uses ``ReLU'(0) = 1/2``.

  Example:
    >>> jax.grad(loss)(jnp.zeros(d), data.x, data.y)   # == -(x.T @ y) / (2 m)
  """
  residual = relu(x @ w) - y
  return 0.5 * jnp.mean(residual * residual)


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


def make_batch_fn(batch_size: int):
  """Adapts :func:`minibatch` to ``jrelu.parallel.make_step``'s ``batch_fn`` signature.

  Args:
    batch_size: global mini-batch size B.

  Returns:
    ``batch_fn(key, data, shard_index, num_shards) -> (x, y)`` where ``data`` is the
    pair ``(dataset, w_star)`` that the training loop replicates on every device.

  Example:
    >>> step = parallel.make_step(loss, make_batch_fn(1024), tx, metrics_fn=metrics_fn)
  """
  def batch_fn(key, data, shard_index, num_shards):
    dataset, _ = data
    return minibatch(key, dataset, batch_size, shard_index, num_shards)
  return batch_fn


def metrics_fn(params, data):
  """``{"relative_error": ...}`` of ``params`` for ``data = (dataset, w_star)``.

  The ``metrics_fn`` of ``jrelu.parallel.make_step``: no collectives, so it adds no wire
  bits to the compiled step.
  """
  return {"relative_error": relative_error(params, data[1])}


def _check_positive(name, value):
  try:
    ok = not isinstance(value, bool) and operator.index(value) >= 1
  except TypeError:
    ok = False
  if not ok:
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
