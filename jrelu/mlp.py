r"""A softmax classifier with one hidden ReLU layer, for labelled real data.

The model jrelu trains on real data sets (``benchmarks.real_data``: the 8x8 digits):

    logits(x) = ReLU(x W1 + b1) W2 + b2,    p(class | x) = softmax(logits(x)),

trained on the mean cross-entropy ``-(1/m) sum_i log p(y_i | x_i)``. Its parameters are
a pytree of four leaves, ``{"w1": [d, h], "b1": [h], "w2": [h, c], "b2": [c]}``, so a
PowerSGD run compresses the two matrices and passes the biases through, and every
compressor encodes each leaf on its own.

It follows the convention of jrelu's model modules (``jrelu.planted``,
``jrelu.network``): ``data = (train, test)`` is what the training loop hands every
device, two ``jrelu.sampling.Dataset`` whose ``y`` holds class indices ``0 .. c-1`` stored
as float32 (the samplers treat every column alike); ``init_params(key, data, ...)``
starts the model; ``loss(params, x, y[, window])`` is the per-device loss, windowed-capable
(``jrelu.sampling.make_batch_fn``'s default sampler); ``metrics_fn(params, data)`` gives
the training loss on the whole training set and the held-out accuracy. ``ReLU'(0) = 1/2``
as everywhere in jrelu (``jrelu.planted.relu``).

References:
  Bishop, "Pattern Recognition and Machine Learning" (2006), Sections 4.3.4 and 5.2
  (softmax output, cross-entropy error); He, Zhang, Ren, Sun, "Delving Deep into
  Rectifiers", arXiv 1502.01852 (the initialisation scale ``2 / fan_in``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jrelu import _checks
from jrelu import planted
from jrelu import sampling


def init_params(key, data, num_hidden: int = 32, num_classes: int = 10) -> dict:
  """Random parameters: He-scaled Gaussian weights, zero biases.

  Args:
    key: PRNG key.
    data: ``(train, test)``; only the input width ``d`` of ``train.x`` ``[n, d]`` is read.
    num_hidden: h >= 1, hidden units.
    num_classes: c >= 2, classes (labels ``0 .. c-1``).

  Returns:
    ``{"w1": float32 [d, h] ~ N(0, 2/d), "b1": zeros [h], "w2": float32 [h, c] ~
    N(0, 1/h), "b2": zeros [c]}``.

  Raises:
    ValueError: if ``num_hidden`` < 1 or ``num_classes`` < 2, quoting it.

  Example:
    >>> params = init_params(jax.random.key(0), (train, test))   # 64-32-10 on digits

  References:
    He, Zhang, Ren, Sun, arXiv 1502.01852 (variance 2 / fan_in before a ReLU).
  """
  num_hidden = _checks.integer("num_hidden", num_hidden)
  num_classes = _checks.integer("num_classes", num_classes, 2)
  dim = data[0].x.shape[1]
  k1, k2 = jax.random.split(key)
  return {
      "w1": jnp.sqrt(2.0 / dim) * jax.random.normal(k1, (dim, num_hidden), jnp.float32),
      "b1": jnp.zeros((num_hidden,), jnp.float32),
      "w2": jax.random.normal(k2, (num_hidden, num_classes), jnp.float32) / jnp.sqrt(
          num_hidden),
      "b2": jnp.zeros((num_classes,), jnp.float32),
  }


def logits(params: dict, x: jax.Array) -> jax.Array:
  """The class scores ``ReLU(x W1 + b1) W2 + b2``.

  Args:
    params: ``{"w1", "b1", "w2", "b2"}`` (see :func:`init_params`).
    x: float32 ``[m, d]`` inputs.

  Returns:
    float32 ``[m, c]``.

  Example:
    >>> logits(params, test.x).argmax(-1)   # predicted classes
  """
  hidden = planted.relu(x @ params["w1"] + params["b1"])
  return hidden @ params["w2"] + params["b2"]


def _cross_entropy(params, x, y):
  labels = y.astype(jnp.int32)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits(params, x), labels))


_windowed_loss = sampling.windowed(_cross_entropy)


def loss(params: dict, x: jax.Array, y: jax.Array,
         window: sampling.Window | None = None) -> jax.Array:
  """Mean cross-entropy ``-(1/m) sum_i log softmax(logits(x_i))[y_i]``.

  Args:
    params: the model's parameters.
    x: float32 ``[m, d]`` inputs (with ``window``: the stored rows ``[n, d]``).
    y: float32 ``[m]`` class indices (with ``window``: ``[n]``); truncated to int32.
    window: optional ``jrelu.sampling.Window`` into ``x`` and ``y`` (from
      ``jrelu.sampling.make_batch_fn``): the mean runs over the rows it covers.

  Returns:
    float32 scalar (``log c`` for uniform scores); pure and jit-able, the ``loss_fn`` of
    ``jrelu.experiment.make_step``.

  Example:
    >>> jax.grad(loss)(params, train.x, train.y)   # a pytree like params

  References:
    Bishop (2006), Section 4.3.4 (cross-entropy of the softmax).
  """
  if window is not None:
    return _windowed_loss(params, x, y, window)
  return _cross_entropy(params, x, y)


def accuracy(params: dict, dataset: sampling.Dataset) -> jax.Array:
  """Fraction of ``dataset``'s rows whose highest score is their label.

  Args:
    params: the model's parameters.
    dataset: ``x`` float32 ``[m, d]``, ``y`` float32 ``[m]`` class indices.

  Returns:
    float32 scalar in ``[0, 1]`` (ties go to the lowest class index).

  Example:
    >>> accuracy(params, test)
  """
  predicted = jnp.argmax(logits(params, dataset.x), axis=-1)
  return jnp.mean(predicted == dataset.y.astype(jnp.int32))


def metrics_fn(params: dict, data) -> dict:
  """``{"train_loss", "test_accuracy"}`` of ``params`` for ``data = (train, test)``.

  The ``metrics_fn`` of ``jrelu.experiment.make_step``; it reads both sets whole, so it
  costs a forward pass over them (a benchmark calls it between scanned chunks instead).

  Example:
    >>> metrics_fn(params, (train, test))["test_accuracy"]
  """
  train, test = data
  return {"train_loss": loss(params, train.x, train.y),
          "test_accuracy": accuracy(params, test)}
