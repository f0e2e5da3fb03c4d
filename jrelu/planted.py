"""The planted ReLU model: data, loss, metrics and initializations.

Kalan, Soltanolkotabi, Avestimehr, "Fitting ReLUs via SGD and Quantized SGD"
(arXiv 1901.06587): inputs ``x_i ~ N(0, I_d)``, targets ``y_i = ReLU(<w_star, x_i>)``
(optionally plus Gaussian label noise), loss ``L(w) = 1/(2m) sum_i (ReLU(<w, x_i>) - y_i)^2``.

The derivative convention is ``ReLU'(0) = 1/2`` (``relu`` below is a ``custom_jvp``):
``jax.nn.relu`` has derivative 0 at 0, which makes ``w = 0`` a stationary point, whereas with
1/2 the gradient at 0 is ``-(1/(2m)) sum_i y_i x_i``, whose expectation ``-w_star / 4``
points at the planted weights.

Like every jrelu model module (``jrelu.network`` is the other), it follows one convention:
``data = (dataset, truth)`` is what the training loop hands every device (here
``truth = w_star``); ``init_params(key, data, ...)`` starts the parameters;
``metrics_fn(params, data)`` returns the scalars logged after each step, among them
``relative_error``; ``loss(params, x, y[, window])`` is the per-device loss. Mini-batch
samplers live in ``jrelu.sampling``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jrelu import _checks
from jrelu import sampling

INITS = ("zeros", "moment", "random")


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
  _checks.integer("dim", dim)
  w = jax.random.normal(key, (dim,), jnp.float32)
  return w / jnp.linalg.norm(w)


def sample_batch(key, w_star, num_rows: int):
  """Draws ``num_rows`` noiseless planted rows ``x ~ N(0, I)``, ``y = ReLU(<w_star, x>)``.

  The row sampler of ``jrelu.sampling.make_online_batch_fn`` (fresh rows every step) and
  of :func:`sample_dataset`.

  Args:
    key: PRNG key.
    w_star: float ``[dim]`` planted weights.
    num_rows: m >= 1 (a Python int; static under jit).

  Returns:
    ``(x, y)``: ``[m, dim]`` and ``[m]`` in ``w_star``'s dtype.

  Example:
    >>> x, y = sample_batch(jax.random.key(1), w_star, 256)

  References:
    Kalan, Soltanolkotabi, Avestimehr, arXiv 1901.06587 (the planted Gaussian model).
  """
  x = jax.random.normal(key, (num_rows, w_star.shape[0]), w_star.dtype)
  return x, relu(x @ w_star)


def sample_dataset(key, w_star, num_samples: int, noise_std: float = 0.0) -> sampling.Dataset:
  """Draws ``num_samples`` planted examples ``x ~ N(0, I)``, ``y = ReLU(<w_star, x>) + noise``.

  Args:
    key: PRNG key.
    w_star: float32 ``[dim]`` planted weights.
    num_samples: n >= 1.
    noise_std: standard deviation of additive Gaussian label noise (0 = realizable).

  Returns:
    A ``jrelu.sampling.Dataset`` with ``x`` float32 ``[n, dim]`` and ``y`` float32 ``[n]``.

  Raises:
    ValueError: if ``num_samples < 1`` or ``noise_std < 0``.

  Example:
    >>> data = sample_dataset(jax.random.key(1), w_star, 4000)
  """
  _checks.integer("num_samples", num_samples)
  noise_std = _checks.number("noise_std", noise_std, low=0.0)
  x_key, noise_key = jax.random.split(key)
  x, y = sample_batch(x_key, w_star, num_samples)
  if noise_std:
    y = y + noise_std * jax.random.normal(noise_key, y.shape, jnp.float32)
  return sampling.Dataset(x, y)


def _mean_square_loss(w, x, y):
  residual = relu(x @ w) - y
  return 0.5 * jnp.mean(residual * residual)


_windowed_loss = sampling.windowed(_mean_square_loss)


def loss(w, x, y, window: sampling.Window | None = None):
  """Empirical square loss ``(1/(2m)) sum_i (ReLU(<w, x_i>) - y_i)^2``.

  With ``window`` the sum runs over the ``m = window.size`` rows of ``(x, y)`` that the
  window covers, read block by block (``jrelu.sampling.windowed``): value and gradient
  cost one read of the batch from memory.

  Args:
    w: float32 ``[dim]`` weights.
    x: float32 ``[m, dim]`` inputs (with ``window``: the stored rows ``[n, dim]``).
    y: float32 ``[m]`` targets (with ``window``: ``[n]``).
    window: optional ``jrelu.sampling.Window`` into ``x`` and ``y`` (from
      ``jrelu.sampling.make_batch_fn``).

  Returns:
    float32 scalar. Its gradient uses ``ReLU'(0) = 1/2``.

  Example:
    >>> jax.grad(loss)(jnp.zeros(d), data.x, data.y)   # == -(x.T @ y) / (2 m)

  References:
    Kalan, Soltanolkotabi, Avestimehr, arXiv 1901.06587, the loss of Section 2.
  """
  if window is not None:
    return _windowed_loss(w, x, y, window)
  return _mean_square_loss(w, x, y)


def relative_error(w, w_star):
  """``||w - w_star||_2 / ||w_star||_2``, the planted model's accuracy metric.

  Args:
    w: float ``[dim]`` estimate.
    w_star: float ``[dim]`` planted weights (nonzero).

  Returns:
    float32 scalar.

  Example:
    >>> relative_error(jnp.zeros(d), w_star)   # 1.0

  References:
    Kalan, Soltanolkotabi, Avestimehr, arXiv 1901.06587 (convergence to ``w_star``).
  """
  return jnp.linalg.norm(w - w_star) / jnp.linalg.norm(w_star)


def init_params(key, data, init: str = "zeros"):
  """Initial weights for SGD on the planted model.

  Args:
    key: PRNG key (used by ``"random"``).
    data: ``(dataset, w_star)``; ``"moment"`` reads the dataset, the others only the
      dimension.
    init: ``"zeros"`` (works thanks to ``ReLU'(0) = 1/2``), ``"moment"``
      (``(2/n) sum_i y_i x_i``, an unbiased estimate of ``w_star`` since
      ``E[y x] = w_star / 2``) or ``"random"`` (``N(0, I/d)``).

  Returns:
    float32 ``[dim]``.

  Raises:
    ValueError: if ``init`` is unknown.

  Example:
    >>> w0 = init_params(jax.random.key(2), (dataset, w_star), "moment")

  References:
    Kalan, Soltanolkotabi, Avestimehr, arXiv 1901.06587 (SGD from zero).
  """
  _checks.choice("init", init, INITS)
  dataset = data[0]
  n, dim = dataset.x.shape
  if init == "zeros":
    return jnp.zeros((dim,), jnp.float32)
  if init == "moment":
    return 2.0 / n * (dataset.y @ dataset.x)
  return jax.random.normal(key, (dim,), jnp.float32) / jnp.sqrt(dim)  # "random"


def metrics_fn(params, data):
  """``{"relative_error": ...}`` of ``params`` for ``data = (dataset, w_star)``.

  The ``metrics_fn`` of ``jrelu.parallel.make_step``: no collectives, so it adds no wire
  bits to the compiled step.

  Example:
    >>> step = parallel.make_step(loss, sampling.make_batch_fn(1024), tx,
    ...                           metrics_fn=metrics_fn)
  """
  return {"relative_error": relative_error(params, data[1])}
