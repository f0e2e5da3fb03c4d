"""Section 1 of ``python -m benchmarks.reproduce``: the phase transition of GD and SGD.

The probability that full-batch gradient descent and mini-batch SGD started at ``w = 0``
recover a planted ReLU to relative error ``<= 1e-6``, against ``n/d``, for a few ``d``.
Trials run as ``jax.vmap`` over keys of a jitted ``lax.while_loop`` of ``lax.scan`` chunks
on one device, a handful of compilations per ``d`` (see :func:`phase_transition`).

References:
  Kalan, Soltanolkotabi, Avestimehr, "Fitting ReLUs via SGD and Quantized SGD"
  (arXiv 1901.06587); Soltanolkotabi, "Learning ReLUs via Gradient Descent"
  (arXiv 1705.04591).
"""

from __future__ import annotations

import functools
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.reproduce import settings
from jrelu import planted

PHASE_LEARNING_RATE = 0.5  # GD and SGD step size on the loss 1/(2m) sum (ReLU(<w,x>) - y)^2
PHASE_CHUNK = 50           # iterations per scan chunk between early-exit checks


def ratio_groups(ratios, max_spread: float = 1.5):
  """Splits sorted ratios into groups whose largest is at most ``max_spread`` x the smallest.

  One group is one compiled program whose data are padded to the group's largest ``n``, so
  full-batch GD wastes at most ``max_spread``-fold work on padding, while the number of
  compilations stays small.

  Args:
    ratios: the n/d values.
    max_spread: the largest allowed max/min ratio within a group.

  Returns:
    A list of lists of ratios, in increasing order.
  """
  groups = []
  for r in sorted(ratios):
    if groups and r <= max_spread * groups[-1][0]:
      groups[-1].append(r)
    else:
      groups.append([r])
  return groups


@functools.partial(jax.jit, static_argnames=("dim", "num_samples", "dtype"))
def _phase_problems(keys, *, dim, num_samples, dtype):
  """One planted problem per key: ``w_star`` uniform on the sphere, Gaussian rows, targets.

  Returns:
    ``(x, y, w_star)``: ``[T, num_samples, dim]``, ``[T, num_samples]``, ``[T, dim]`` in
    ``dtype``, with ``y = ReLU(x w_star)`` computed in ``dtype``.
  """
  dt = jnp.dtype(dtype)

  def problem(key):
    w_key, x_key = jax.random.split(key)
    w_star = jax.random.normal(w_key, (dim,), dt)
    w_star = w_star / jnp.linalg.norm(w_star)
    x = jax.random.normal(x_key, (num_samples, dim), dt)
    return x, planted.relu(x @ w_star), w_star

  return jax.vmap(problem)(keys)


@functools.partial(jax.jit, static_argnames=("batch_size", "max_iters"))
def _phase_solve(x, y, w_star, ns, batch_keys, *, batch_size, max_iters):
  """GD (``batch_size=None``) or SGD from ``w = 0`` on T planted problems at once.

  Trial t uses the first ``ns[t]`` rows of ``x[t]`` (the rest are padding): GD takes the
  gradient of ``1/(2n) sum_{i<n} (ReLU(<w, x_i>) - y_i)^2``; SGD that of the same loss on
  ``batch_size`` rows drawn with replacement from the first ``n`` with
  ``fold_in(batch_keys[t], iteration)``. Iterations run in ``lax.scan`` chunks of
  ``PHASE_CHUNK`` inside a ``lax.while_loop`` that stops once every trial has reached
  ``TARGET`` or after ``max_iters`` iterations.

  Returns:
    ``(hit, final_error, iterations)``: int32 ``[T]`` first iteration with relative error
    ``<= settings.TARGET`` (-1 if none within ``max_iters``), ``[T]`` relative error at the end,
    and the number of iterations run.
  """
  count, n_max, dim = x.shape
  mask = (jnp.arange(n_max)[None, :] < ns[:, None]).astype(x.dtype)

  def full_batch_loss(w, x, y, mask, n):
    residual = planted.relu(x @ w) - y
    return 0.5 * jnp.sum(mask * residual * residual) / n

  def update(w, i, x, y, mask, n, w_star, batch_key):
    if batch_size is None:
      g = jax.grad(full_batch_loss)(w, x, y, mask, n)
    else:
      idx = jax.random.randint(jax.random.fold_in(batch_key, i), (batch_size,), 0, n)
      g = jax.grad(planted.loss)(w, x[idx], y[idx])
    w = w - PHASE_LEARNING_RATE * g
    return w, planted.relative_error(w, w_star)

  batched = jax.vmap(update, in_axes=(0, None, 0, 0, 0, 0, 0, 0))

  def chunk(carry):
    w, hit, start = carry

    def one(c, i):
      w, hit = c
      w, err = batched(w, i, x, y, mask, ns, w_star, batch_keys)
      return (w, jnp.where((hit < 0) & (err <= settings.TARGET), i + 1, hit)), None

    steps = start + jnp.arange(PHASE_CHUNK, dtype=jnp.int32)
    (w, hit), _ = jax.lax.scan(one, (w, hit), steps)
    return w, hit, start + PHASE_CHUNK

  def not_done(carry):
    _, hit, start = carry
    return (start < max_iters) & jnp.any(hit < 0)

  w, hit, iterations = jax.lax.while_loop(
      not_done, chunk, (jnp.zeros((count, dim), x.dtype), -jnp.ones((count,), jnp.int32),
                        jnp.int32(0)))
  hit = jnp.where(hit > max_iters, -1, hit)  # the last chunk may overshoot the budget
  return hit, jax.vmap(planted.relative_error)(w, w_star), iterations


def phase_transition(dims, ratios, trials: int, max_iters: int, seed: int,
                     dtype: str = "float64") -> dict:
  """Success probability of GD and SGD from ``w = 0`` against ``n/d``.

  Both minimise ``L(w) = 1/(2m) sum_i (ReLU(<w, x_i>) - y_i)^2`` (``ReLU'(0) = 1/2``) with
  step size ``PHASE_LEARNING_RATE = 0.5``: GD on all ``n = round(ratio * d)`` samples;
  SGD on mini-batches of ``b = d`` samples drawn with replacement (the ``jrelu.train``
  default problem has b ~ d too). A trial succeeds if its relative error
  ``||w - w_star|| / ||w_star||`` reaches ``TARGET = 1e-6`` within ``max_iters``
  iterations (in float64 it keeps decreasing once there). In each trial GD and SGD fit
  the same ``w_star`` and data.

  How it is batched: per d, all ``len(ratios) * trials`` problems are drawn by one
  vmapped, jitted program (padded to the largest n). The solvers run them in groups of
  ratios (:func:`ratio_groups`) so that a group whose trials have all converged stops
  early; each group is one ``vmap`` over trials of one jitted ``while_loop`` of ``scan``
  chunks. SGD groups are padded to a common shape, so SGD compiles once per d.

  Args:
    dims: dimensions d.
    ratios: sample ratios n/d.
    trials: independent problems per (d, ratio) cell.
    max_iters: iteration budget.
    seed: base seed.
    dtype: ``"float64"`` (default; in float32 full-batch GD stalls at a relative error of
      a few 1e-7, close enough to 1e-6 to turn successes into failures at d=100) or
      ``"float32"``.

  Returns:
    ``{"settings": ..., "n_over_d": [...], "success_probability": {method: {d: [...]}},
    "median_iterations_to_target": {...}, "median_final_relative_error": {...},
    "threshold_n_over_d": {method: {d: smallest ratio from which every cell succeeds
    with probability >= 0.9, or None}}, "seconds": {...}, "compile_seconds": {...},
    "data_seconds": {d: ...}}`` with ``method`` in ``("gd", "sgd")`` and ``d`` as a
    string; seconds are wall-clock, compilation included.

  References:
    Kalan, Soltanolkotabi, Avestimehr, arXiv 1901.06587 (SGD for fitting a ReLU);
    Soltanolkotabi, "Learning ReLUs via Gradient Descent", arXiv 1705.04591.
  """
  ratios = sorted(ratios)
  out = {
      "settings": {"dims": list(dims), "trials": trials, "max_iterations": max_iters,
                   "learning_rate": PHASE_LEARNING_RATE, "sgd_batch_size": "d",
                   "init": "zeros (ReLU'(0) = 1/2)", "target_relative_error": settings.TARGET,
                   "dtype": dtype, "seed": seed,
                   "loss": "1/(2m) sum_i (ReLU(<w, x_i>) - y_i)^2",
                   "success": f"relative error <= {settings.TARGET:g} within max_iterations"},
      "n_over_d": ratios,
      "data_seconds": {},
  }
  tables = {k: {"gd": {}, "sgd": {}} for k in (
      "success_probability", "median_iterations_to_target", "median_final_relative_error",
      "threshold_n_over_d", "seconds", "compile_seconds")}
  groups = [[ratios.index(r) for r in g] for g in ratio_groups(ratios)]
  width = max(len(g) for g in groups)
  with jax.enable_x64(dtype == "float64"):
    for d in dims:
      ns = np.array([max(1, round(r * d)) for r in ratios], np.int32)
      keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), d),
                              len(ratios) * trials)
      data_keys, batch_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
      start = time.perf_counter()
      x, y, w_star = _phase_problems(data_keys, dim=d, num_samples=int(ns.max()),
                                     dtype=dtype)
      out["data_seconds"][str(d)] = time.perf_counter() - start
      for method in ("gd", "sgd"):
        start = time.perf_counter()
        compile_seconds = 0.0
        hits = np.full(len(ratios) * trials, -1)
        errors = np.zeros(len(ratios) * trials)
        for group in groups:
          # SGD: pad the group to `width` ratios (repeating its last one) so that every
          # group has one shape; GD: keep only the group's largest n rows.
          padded = group + [group[-1]] * (width - len(group)) if method == "sgd" else group
          cells = np.concatenate([np.arange(i * trials, (i + 1) * trials) for i in padded])
          rows = x.shape[1] if method == "sgd" else int(ns[group].max())
          args = (x[cells, :rows], y[cells, :rows], w_star[cells],
                  jnp.asarray(np.repeat(ns[padded], trials)), batch_keys[cells])
          static = dict(batch_size=None if method == "gd" else d, max_iters=max_iters)
          t0 = time.perf_counter()
          compiled = _phase_solve.lower(*args, **static).compile()
          compile_seconds += time.perf_counter() - t0
          hit, err, iterations = jax.device_get(compiled(*args))
          real = slice(0, len(group) * trials)
          hits[cells[real]], errors[cells[real]] = hit[real], err[real]
          logging.info("phase transition %s d=%d n/d=%s: %d iterations, success %s",
                       method, d, [ratios[i] for i in group], int(iterations),
                       [float(np.mean(hit[j * trials:(j + 1) * trials] >= 0))
                        for j in range(len(group))])
        per_ratio = [(hits[i * trials:(i + 1) * trials], errors[i * trials:(i + 1) * trials])
                     for i in range(len(ratios))]
        success = [float(np.mean(h >= 0)) for h, _ in per_ratio]
        key = str(d)
        tables["success_probability"][method][key] = success
        tables["median_iterations_to_target"][method][key] = [
            float(np.median(h[h >= 0])) if np.any(h >= 0) else None for h, _ in per_ratio]
        tables["median_final_relative_error"][method][key] = [
            float(np.median(e)) for _, e in per_ratio]
        tables["threshold_n_over_d"][method][key] = _threshold(ratios, success)
        tables["seconds"][method][key] = time.perf_counter() - start
        tables["compile_seconds"][method][key] = compile_seconds
  out.update(tables)
  return out


def _threshold(ratios, success, level: float = 0.9):
  """Smallest ratio from which every larger ratio succeeds with probability >= level."""
  threshold = None
  for r, p in zip(reversed(ratios), reversed(success)):
    if p < level:
      break
    threshold = r
  return threshold

