"""A planted one-hidden-layer ReLU network: the K > 1 generalisation of the planted ReLU.

Zhang, Yu, Wang, Gu, "Learning One-hidden-layer ReLU Networks via Gradient Descent",
AISTATS 2019 (arXiv 1806.07808): inputs ``x ~ N(0, I_d)``, a teacher with ``K`` hidden
units ``w_1*, ..., w_K*`` and unit output weights,

    y = sum_j ReLU(<w_j*, x>),

and the empirical square loss ``L = 1/(2m) sum_i (f(x_i) - y_i)^2`` of a student

    f(x) = sum_j output_j * ReLU(<hidden_j, x> + bias_j).

The student's parameters are a pytree of three leaves, ``{"hidden": [K, d], "bias": [K],
"output": [K]}``, so a PowerSGD run compresses the matrix and passes the vectors through.
With ``bias = 0`` and ``output = 1`` the student is the teacher's architecture exactly
(:func:`teacher_params`), so the problem is realizable: the loss is 0 at the teacher.

The paper (no label noise here) initialises with a tensor method; this module offers a
plain random initialisation, which is enough for the small problems jrelu trains.
``ReLU'(0) = 1/2`` as everywhere in jrelu (``jrelu.planted.relu``).

It follows the convention of jrelu's model modules: ``data = (dataset, teacher)`` is what
the training loop hands every device, ``init_params(key, data, ...)`` starts the student,
``metrics_fn(params, data)`` gives the logged scalars and ``loss(params, x, y)`` is the
per-device loss; batches come from ``jrelu.sampling`` (``make_batch_fn(B,
sampling="replacement")``, or ``make_online_batch_fn(B, sample_batch)``).

Exact population facts used by the tests (arc-cosine kernel of degree 1, unit rows, angle
``t_jk`` between ``w_j*`` and ``w_k*``): ``E[y] = K / sqrt(2 pi)`` and
``E[y^2] = sum_{j,k} (sin t_jk + (pi - t_jk) cos t_jk) / (2 pi)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jrelu import _checks
from jrelu import planted
from jrelu import sampling


def sample_teacher(key, dim: int, num_hidden: int) -> jax.Array:
  """Draws the teacher's hidden weights, each row uniform on the unit sphere.

  Args:
    key: PRNG key.
    dim: d >= 1, the input dimension.
    num_hidden: K >= 1, the number of hidden units.

  Returns:
    float32 ``[num_hidden, dim]`` with unit-norm rows ``w_j*``.

  Raises:
    ValueError: if ``dim`` or ``num_hidden`` is not an integer >= 1.

  Example:
    >>> teacher = sample_teacher(jax.random.key(0), dim=20, num_hidden=4)

  References:
    Zhang, Yu, Wang, Gu, arXiv 1806.07808 (the teacher network).
  """
  _checks.integer("dim", dim)
  _checks.integer("num_hidden", num_hidden)
  w = jax.random.normal(key, (num_hidden, dim), jnp.float32)
  return w / jnp.linalg.norm(w, axis=1, keepdims=True)


def teacher_params(teacher: jax.Array) -> dict:
  """The student parameters that compute the teacher exactly.

  Args:
    teacher: float32 ``[K, d]`` hidden weights of the teacher.

  Returns:
    ``{"hidden": teacher, "bias": zeros [K], "output": ones [K]}``.

  Example:
    >>> loss(teacher_params(teacher), data.x, data.y)   # 0.0
  References:
    Zhang, Yu, Wang, Gu, "Learning One-hidden-layer ReLU Networks via Gradient Descent",
    AISTATS 2019, arXiv 1806.07808.
  """
  k = teacher.shape[0]
  return {"hidden": teacher, "bias": jnp.zeros((k,), teacher.dtype),
          "output": jnp.ones((k,), teacher.dtype)}


def predict(params: dict, x: jax.Array) -> jax.Array:
  """The network's output ``f(x_i) = sum_j output_j ReLU(<hidden_j, x_i> + bias_j)``.

  Args:
    params: ``{"hidden": [K, d], "bias": [K], "output": [K]}`` (float32).
    x: float32 ``[m, d]`` inputs.

  Returns:
    float32 ``[m]``. Gradients use ``ReLU'(0) = 1/2``.

  Example:
    >>> predict(teacher_params(teacher), jnp.zeros((3, 20)))   # zeros
  References:
    Zhang, Yu, Wang, Gu, "Learning One-hidden-layer ReLU Networks via Gradient Descent",
    AISTATS 2019, arXiv 1806.07808.
  """
  hidden = planted.relu(x @ params["hidden"].T + params["bias"])
  return hidden @ params["output"]


def sample_batch(key, teacher: jax.Array, num_rows: int):
  """Draws ``num_rows`` examples ``x ~ N(0, I_d)``, ``y = sum_j ReLU(<w_j*, x>)``.

  Args:
    key: PRNG key.
    teacher: float32 ``[K, d]`` teacher weights (from :func:`sample_teacher`).
    num_rows: m >= 1 (a Python int; static under jit).

  Returns:
    ``(x, y)``: float32 ``[m, d]`` and ``[m]``.

  Example:
    >>> x, y = sample_batch(jax.random.key(1), teacher, 64)

  References:
    Zhang, Yu, Wang, Gu, arXiv 1806.07808 (noiseless case).
  """
  x = jax.random.normal(key, (num_rows, teacher.shape[1]), jnp.float32)
  return x, predict(teacher_params(teacher), x)


def sample_dataset(key, teacher: jax.Array, num_samples: int) -> sampling.Dataset:
  """Draws a data set of ``num_samples`` rows with :func:`sample_batch`.

  Args:
    key: PRNG key.
    teacher: float32 ``[K, d]`` teacher weights (from :func:`sample_teacher`).
    num_samples: n >= 1.

  Returns:
    A ``jrelu.sampling.Dataset`` with ``x`` float32 ``[n, d]`` and ``y`` float32 ``[n]``.

  Raises:
    ValueError: if ``num_samples`` is not an integer >= 1.

  Example:
    >>> dataset = sample_dataset(jax.random.key(1), teacher, 400)

  References:
    Zhang, Yu, Wang, Gu, arXiv 1806.07808 (noiseless case).
  """
  _checks.integer("num_samples", num_samples)
  return sampling.Dataset(*sample_batch(key, teacher, num_samples))


def init_params(key, data, scale: float = 1.0) -> dict:
  """Random student parameters: Gaussian hidden rows, zero biases, unit output weights.

  The student has the teacher's shape, ``K`` hidden units on ``d`` inputs.

  Args:
    key: PRNG key.
    data: ``(dataset, teacher)``; only the teacher's shape ``[K, d]`` is read.
    scale: the hidden weights are ``N(0, scale^2 / d)``, so each row has expected
      squared norm ``scale^2`` (the teacher's rows have norm 1). Must be >= 0.

  Returns:
    ``{"hidden": float32 [K, d], "bias": zeros float32 [K], "output": ones float32 [K]}``.

  Raises:
    ValueError: if ``scale`` is not a finite number >= 0.

  Example:
    >>> params = init_params(jax.random.key(2), (dataset, teacher), scale=1.0)
  References:
    Zhang, Yu, Wang, Gu, "Learning One-hidden-layer ReLU Networks via Gradient Descent",
    AISTATS 2019, arXiv 1806.07808.
  """
  scale = _checks.number("scale", scale, low=0.0)
  num_hidden, dim = data[1].shape
  hidden = scale / jnp.sqrt(dim) * jax.random.normal(key, (num_hidden, dim), jnp.float32)
  return {"hidden": hidden, "bias": jnp.zeros((num_hidden,), jnp.float32),
          "output": jnp.ones((num_hidden,), jnp.float32)}


def loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  """Empirical square loss ``1/(2m) sum_i (f(x_i) - y_i)^2``.

  Args:
    params: the student's parameters (see :func:`predict`).
    x: float32 ``[m, d]`` inputs.
    y: float32 ``[m]`` targets.

  Returns:
    float32 scalar; pure and jit-able, the ``loss_fn`` of ``jrelu.parallel.make_step``.

  Example:
    >>> jax.grad(loss)(params, data.x, data.y)   # a pytree like params
  References:
    Zhang, Yu, Wang, Gu, "Learning One-hidden-layer ReLU Networks via Gradient Descent",
    AISTATS 2019, arXiv 1806.07808.
  """
  residual = predict(params, x) - y
  return 0.5 * jnp.mean(residual * residual)


def prediction_error(params: dict, dataset: sampling.Dataset) -> jax.Array:
  """Relative prediction error ``||f(x) - y||_2 / ||y||_2`` on a data set.

  Comparing predictions sidesteps the permutation symmetry of the hidden units (so, unlike
  ``jrelu.planted.relative_error``, it is not a distance between parameters); on a
  held-out set it measures how well the student has learnt the teacher.

  Args:
    params: the student's parameters.
    dataset: a ``jrelu.sampling.Dataset`` (for example a held-out sample).

  Returns:
    float32 scalar, 0 at the teacher.

  Example:
    >>> prediction_error(params, sample_dataset(jax.random.key(9), teacher, 2000))

  References:
    Zhang, Yu, Wang, Gu, "Learning One-hidden-layer ReLU Networks via Gradient Descent",
    AISTATS 2019, arXiv 1806.07808.
  """
  return jnp.linalg.norm(predict(params, dataset.x) - dataset.y) / jnp.linalg.norm(dataset.y)


def metrics_fn(params, data):
  """``{"prediction_error": ...}`` of ``params`` on the training set of ``data``.

  The ``metrics_fn`` of ``jrelu.parallel.make_step`` for ``data = (dataset, teacher)``;
  it reads the whole data set, so it costs a forward pass over it per step.

  Example:
    >>> step = parallel.make_step(loss, sampling.make_batch_fn(256, sampling="replacement"),
    ...                           tx, metrics_fn=metrics_fn)
  """
  return {"prediction_error": prediction_error(params, data[0])}
