r"""Reproduces the claims of "Fitting ReLUs via SGD and Quantized SGD" with jrelu.

Kalan, Soltanolkotabi, Avestimehr, ISIT 2019 (arXiv 1901.06587): in the planted model
``y = ReLU(<w_star, x>)``, ``x ~ N(0, I_d)``, gradient descent and mini-batch SGD started
at zero recover ``w_star`` once ``n`` is a small multiple of ``d``, they converge
geometrically, and QSGD (Alistarh et al., arXiv 1610.02132) does the same while sending a
fraction of the bits. Sections (``--sections``; all by default):

1. ``phase_transition``: probability that full-batch GD and mini-batch SGD from ``w = 0``
   reach relative error ``<= 1e-6``, against ``n/d``, for a few dimensions. Trials run as
   ``jax.vmap`` over keys of a jitted ``lax.while_loop`` of ``lax.scan`` chunks on one
   device, a handful of compilations per d (see :func:`phase_transition`).
2. ``convergence``: relative error against step for float32 SGD and QSGD at several ``s``
   on the ``jrelu.train`` default problem (d=1000, n=4000, global batch 1024, 8 devices,
   two-phase aggregation, max norm), each at its best step size of a small grid, through
   :func:`jrelu.train.train`.
3. ``bits_to_accuracy``: the same runs against cumulative bits sent per device (read from
   the compiled program's HLO), and how many times fewer bits each method needs than
   float32 SGD to reach ``1e-6``.
4. ``communication``: projected wall time to ``1e-6`` on N = 8 ... 1024 workers and 1, 10,
   100 Gbit/s links under a latency-bandwidth (alpha-beta) model, with per-step compute
   time measured on one device at the per-worker batch.

Sections 3 and 4 reuse the training runs of section 2 (selecting either runs them). Every
run writes ``OUTDIR/summary.md`` (README-ready tables), PNG plots, ``OUTDIR/results.json``
(the result, indented) and ends by printing the same result as one JSON line on stdout.

    PYTHONPATH=. python benchmarks/reproduce.py --quick     # under two minutes, 2 cores
    PYTHONPATH=. python benchmarks/reproduce.py             # full: ~20 min, 2 busy cores

The problem of sections 2-4 can be changed with ``jrelu.train``'s ``--dim``,
``--num_samples``, ``--batch_size`` and ``--num_steps``; ``--seed`` and ``--num_devices``
are shared with it too. Its other flags are set per method in :data:`METHODS` and are
refused here. Methods are the rows of :data:`METHODS`: a new compressor is one line there.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time

from absl import flags
from absl import logging

import jax
import jax.numpy as jnp
import numpy as np

from jrelu import aggregation
from jrelu import planted
from jrelu import train

try:  # `python benchmarks/reproduce.py` puts benchmarks/ itself on sys.path
  from benchmarks import common
except ImportError:
  import common

# ---------------------------------------------------------------------------------------
# The methods compared in sections 2-4: name -> label and jrelu.train.Config overrides.
# Adding a compressor is one line here (its Config fields as jrelu.train names them).
# "sgd" is the float32 baseline every ratio is taken against.
METHODS = {
    "sgd": {"label": "float32 SGD", "config": {"compressor": "none", "aggregation": "psum"}},
    "qsgd_s1": {"label": "QSGD s=1", "config": {"compressor": "qsgd", "num_levels": 1}},
    "qsgd_s2": {"label": "QSGD s=2", "config": {"compressor": "qsgd", "num_levels": 2}},
    "qsgd_s4": {"label": "QSGD s=4", "config": {"compressor": "qsgd", "num_levels": 4}},
    "qsgd_s8": {"label": "QSGD s=8", "config": {"compressor": "qsgd", "num_levels": 8}},
    "qsgd_s16": {"label": "QSGD s=16", "config": {"compressor": "qsgd", "num_levels": 16}},
}
BASELINE = "sgd"
QUICK_METHODS = ("sgd", "qsgd_s4")

# Message rounds per step of each aggregation strategy on N workers (ring / pairwise
# algorithms, the ones behind jrelu.wire's bandwidth-optimal bit counts).
ROUNDS = {
    "psum": lambda n: 2 * (n - 1),           # ring all-reduce: reduce-scatter + all-gather
    "all_gather": lambda n: n - 1,           # ring all-gather
    "two_phase": lambda n: 2 * (n - 1),      # all-to-all (N-1 exchanges) + ring all-gather
    "majority_vote": lambda n: 2 * (n - 1),  # two_phase with the sign codec
    "integer_psum": lambda n: 4 * (n - 1),   # pmax of the scales + integer all-reduce
}

SECTIONS = ("phase_transition", "convergence", "bits_to_accuracy", "communication")
TRAINING_SECTIONS = ("convergence", "bits_to_accuracy", "communication")
TARGET = 1e-6              # relative error that counts as recovery, everywhere
PHASE_LEARNING_RATE = 0.5  # GD and SGD step size on the loss 1/(2m) sum (ReLU(<w,x>) - y)^2
PHASE_CHUNK = 50           # iterations per scan chunk between early-exit checks
LOG_EVERY = 10             # steps between the points of a convergence curve
TIMING_LEARNING_RATE = 1e-4  # keeps one-example per-worker batches finite while timed
TIMING_CHUNKS = 10         # timed chunks per timing run (the fastest is reported)
WORKER_COUNTS = tuple(8 * 2 ** i for i in range(8))  # 8, 16, ..., 1024
# Flags of jrelu.train that this binary uses; setting any other of them is an error.
TRAIN_FLAGS_USED = ("dim", "num_samples", "batch_size", "num_steps", "seed", "num_devices")

FULL = {"phase_dims": (20, 50, 100), "phase_trials": 50, "phase_iters": 5000,
        "methods": tuple(METHODS), "learning_rates": (1.2, 1.0, 0.85, 0.7, 0.5, 0.3, 0.2),
        "num_steps": 3000, "timing_steps": 500, "timed_worker_counts": "all"}
QUICK = {"phase_dims": (20, 50), "phase_trials": 10, "phase_iters": 2000,
         "methods": QUICK_METHODS, "learning_rates": (0.7, 0.5),
         "num_steps": 1500, "timing_steps": 250, "timed_worker_counts": "first"}


def _is_number_list(values, kind=float, positive=True) -> bool:
  try:
    parsed = [kind(v) for v in values]
  except (TypeError, ValueError):
    return False
  return bool(parsed) and all(math.isfinite(v) and (v > 0 or not positive) for v in parsed)


_OUTDIR = flags.DEFINE_string("outdir", "runs/reproduce", "Where plots, runs and summary go.")
_QUICK = flags.DEFINE_bool("quick", False,
                           "Small settings: the whole run in under two minutes on 2 cores.")
_SECTIONS = flags.DEFINE_list("sections", list(SECTIONS),
                              f"Sections to run, any of {', '.join(SECTIONS)}.")
_PHASE_DIMS = flags.DEFINE_list(
    "phase_dims", None, "Phase transition dimensions d (default 20,50,100; quick 20,50).")
_PHASE_RATIOS = flags.DEFINE_list(
    "phase_ratios", ["1", "1.5", "2", "2.5", "3", "4", "5", "6", "8"],
    "Phase transition sample ratios n/d.")
_PHASE_TRIALS = flags.DEFINE_integer(
    "phase_trials", None, "Trials per (d, n/d) cell (default 50; quick 10).", lower_bound=1)
_PHASE_ITERS = flags.DEFINE_integer(
    "phase_iters", None, "Iteration budget of GD and SGD per trial (default 5000; quick "
    "2000).", lower_bound=1)
_PHASE_DTYPE = flags.DEFINE_enum(
    "phase_dtype", "float64", ["float64", "float32"],
    "Arithmetic of the phase transition (float32 stalls near 1e-6 at d=100).")
_METHODS = flags.DEFINE_list(
    "methods", None, f"Rows of METHODS to train (default all; quick "
    f"{','.join(QUICK_METHODS)}); include '{BASELINE}' for the ratios to float32 SGD.")
_LEARNING_RATES = flags.DEFINE_list(
    "learning_rates", None, "Step size grid of sections 2-4 (default "
    "1.2,1,0.85,0.7,0.5,0.3,0.2; quick 0.7,0.5).")
_TIMING_STEPS = flags.DEFINE_integer(
    "timing_steps", None, f"Steps per timing run, in {TIMING_CHUNKS} chunks (default 500; "
    "quick 250).", lower_bound=TIMING_CHUNKS)
_ALPHA = flags.DEFINE_float("alpha_seconds", 50e-6, "Latency of one message round (s).")
_BANDWIDTHS = flags.DEFINE_list("bandwidths_gbps", ["1", "10", "100"],
                                "Link bandwidths of the communication model (Gbit/s).")

flags.register_validator("sections", lambda v: bool(v) and set(v) <= set(SECTIONS),
                         f"must be a comma-separated subset of {', '.join(SECTIONS)}")
flags.register_validator("phase_dims", lambda v: v is None or _is_number_list(v, int),
                         "must be a comma-separated list of integers >= 1")
flags.register_validator("phase_ratios", _is_number_list,
                         "must be a comma-separated list of numbers > 0")
flags.register_validator("methods", lambda v: v is None or (bool(v) and set(v) <= set(METHODS)),
                         f"must be a comma-separated subset of {', '.join(METHODS)}")
flags.register_validator("learning_rates", lambda v: v is None or _is_number_list(v),
                         "must be a comma-separated list of numbers > 0")
flags.register_validator("bandwidths_gbps", _is_number_list,
                         "must be a comma-separated list of numbers > 0")
flags.register_validator("alpha_seconds", lambda v: v >= 0 and math.isfinite(v),
                         "must be a finite number >= 0")
flags.register_validator("outdir", bool, "must not be empty")


# ---------------------------------------------------------------------------------------
# 1. Phase transition.

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
    ``<= TARGET`` (-1 if none within ``max_iters``), ``[T]`` relative error at the end,
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
      return (w, jnp.where((hit < 0) & (err <= TARGET), i + 1, hit)), None

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
                   "init": "zeros (ReLU'(0) = 1/2)", "target_relative_error": TARGET,
                   "dtype": dtype, "seed": seed,
                   "loss": "1/(2m) sum_i (ReLU(<w, x_i>) - y_i)^2",
                   "success": f"relative error <= {TARGET:g} within max_iterations"},
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


# ---------------------------------------------------------------------------------------
# 2. Convergence (the training grid shared by sections 2-4).

def method_config(base: train.Config, name: str, **overrides) -> train.Config:
  """``base`` with the :data:`METHODS` row ``name`` and then ``overrides`` applied.

  Args:
    base: the problem (``jrelu.train.Config``).
    name: a key of :data:`METHODS`.
    **overrides: further ``Config`` fields (step size, workdir, ...).

  Returns:
    A new ``jrelu.train.Config``.
  """
  return dataclasses.replace(base, **{**METHODS[name]["config"], **overrides})


def run_training(config: train.Config, devices) -> dict:
  """Runs :func:`jrelu.train.train` quietly and returns its summary, also when it diverges.

  ``jrelu.train``'s per-chunk progress lines are silenced (they are in
  ``WORKDIR/metrics.jsonl``); a diverged run returns its summary with
  ``"status": "diverged"`` instead of raising.

  Args:
    config: the run.
    devices: the devices to train on.

  Returns:
    The run's summary dict (``WORKDIR/summary.json``).

  Raises:
    jrelu.train.UsageError: for settings that do not fit the devices.
  """
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.WARNING)
  try:
    return train.train(config, devices)
  except train.DivergedError:
    with open(os.path.join(config.workdir, "summary.json")) as f:
      return json.load(f)
  finally:
    logging.set_verbosity(verbosity)


def read_curve(workdir: str, summary: dict) -> dict:
  """The curve of one run, read back from ``WORKDIR/metrics.jsonl``.

  Args:
    workdir: the run's directory.
    summary: its summary (for the initial relative error, prepended as step 0).

  Returns:
    ``{"step": [...], "relative_error": [...], "cumulative_bits_per_device": [...]}``,
    bits as measured from the HLO, one point every ``LOG_EVERY`` steps.
  """
  steps, errors, bits = [0], [summary["initial_relative_error"]], [0.0]
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        record = json.loads(line)
        steps.append(record["step"])
        errors.append(record["relative_error"])
        bits.append(record["cumulative_wire_bits_per_device"])
  return {"step": steps, "relative_error": errors, "cumulative_bits_per_device": bits}


def _selection_key(record):
  """Best run: fewest steps to target, then fewest bits to target, then larger step size."""
  return (record["steps_to_target"], record["bits_to_target"], -record["learning_rate"])


def training_grid(base: train.Config, methods, learning_rates, devices, outdir: str):
  """Trains every method at every step size of the grid and keeps the best run of each.

  Step sizes are tried from the largest down. Once a run has reached ``TARGET`` in S
  steps, later runs of that method stop after S steps (they cannot be better; their
  status is ``"pruned"`` if they did not reach the target by then).

  Args:
    base: the problem (``jrelu.train.Config``): dim, samples, global batch, seed, cap on
      steps.
    methods: names of rows of :data:`METHODS`.
    learning_rates: the step size grid.
    devices: the N devices (``jrelu.parallel.setup_devices``).
    outdir: runs go to ``OUTDIR/runs/NAME_lrLR/`` (``metrics.jsonl``, ``summary.json``).

  Returns:
    ``(results, curves)``: ``results[name] = {"label", "config", "grid": [...], "best":
    {...} or None, "best_at_grid_edge": bool}`` and ``curves[name]`` the best run's curve
    (:func:`read_curve`).
  """
  results, curves = {}, {}
  for name in methods:
    grid, best = [], None
    for lr in sorted(learning_rates, reverse=True):
      cap = base.num_steps if best is None else min(base.num_steps, best["steps_to_target"])
      workdir = os.path.join(outdir, "runs", f"{name}_lr{lr:g}")
      config = method_config(base, name, learning_rate=lr, num_steps=cap, workdir=workdir,
                             log_every=LOG_EVERY, target_relative_error=TARGET)
      start = time.perf_counter()
      summary = run_training(config, devices)
      status = summary["status"]
      if status == "finished" and cap < base.num_steps:
        status = "pruned"
      steps = summary["steps_to_target"]
      bits = summary["wire_bits_per_step_per_device"]
      record = {
          "learning_rate": lr, "status": status, "steps_to_target": steps,
          "steps": summary["steps"], "relative_error": summary["relative_error"],
          "wire_bits_per_step_per_device": bits,
          "predicted_wire_bits_per_step_per_device":
              summary["predicted_wire_bits_per_step_per_device"],
          "float32_wire_bits": summary["float32_wire_bits"],
          "bits_to_target": None if steps is None else steps * bits,
          "steps_per_second": summary["steps_per_second"],
          "compile_seconds": summary["compile_seconds"],
          "wall_seconds": time.perf_counter() - start, "workdir": workdir,
      }
      grid.append(record)
      logging.info("%s lr=%g: %s, steps to %g: %s, %.0f bits/step/device (%.1f s)",
                   name, lr, status, TARGET, steps, bits, record["wall_seconds"])
      if steps is not None and (best is None or _selection_key(record) < _selection_key(best)):
        best = record
    lrs = [g["learning_rate"] for g in grid]
    results[name] = {"label": METHODS[name]["label"], "config": METHODS[name]["config"],
                     "grid": grid, "best": best,
                     "best_at_grid_edge": best is not None and len(lrs) > 1
                                          and best["learning_rate"] in (max(lrs), min(lrs))}
    if best is not None:
      curves[name] = read_curve(best["workdir"], summary_of(best["workdir"]))
  return results, curves


def summary_of(workdir: str) -> dict:
  """Loads the ``summary.json`` a training run wrote into ``workdir`` (a path)."""
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)


def training_section(base: train.Config, results: dict, devices, learning_rates) -> dict:
  """The training grid's settings for the JSON line.

  Args:
    base: the problem.
    results: :func:`training_grid`'s results.
    devices: the devices trained on.
    learning_rates: the step size grid.

  Returns:
    ``{"problem", "learning_rates", "selection", "methods": {name: {"label", "config"}}}``.
  """
  return {
      "problem": {"dim": base.dim, "num_samples": base.num_samples,
                  "batch_size": base.batch_size, "num_devices": len(devices),
                  "init": base.init, "seed": base.seed, "max_steps": base.num_steps,
                  "target_relative_error": TARGET, "log_every": LOG_EVERY,
                  "defaults": "jrelu.train.Config (two_phase aggregation, max norm) "
                              "unless a method overrides"},
      "learning_rates": sorted(learning_rates, reverse=True),
      "selection": "per method: fewest steps to target, ties: fewer bits, then larger "
                   "step size; runs after the first success stop at its step count",
      "methods": {name: {"label": r["label"], "config": r["config"]}
                  for name, r in results.items()},
  }


def convergence_section(results: dict) -> dict:
  """Section 2's JSON: each method's best step size, steps to target and full grid.

  Args:
    results: :func:`training_grid`'s results.

  Returns:
    ``{"methods": {name: {"label", "best_learning_rate", "best_at_grid_edge",
    "steps_to_target", "relative_error", "grid": [...]}}, "curves":
    "convergence_curves.json"}``; the curves themselves are in
    ``OUTDIR/convergence_curves.json``. ``best_at_grid_edge`` warns that a wider grid
    might find a better step size.
  """
  methods = {}
  for name, r in results.items():
    best = r["best"] or {}
    methods[name] = {"label": r["label"], "best_learning_rate": best.get("learning_rate"),
                     "best_at_grid_edge": r["best_at_grid_edge"],
                     "steps_to_target": best.get("steps_to_target"),
                     "relative_error": best.get("relative_error"), "grid": r["grid"]}
  return {"methods": methods, "curves": "convergence_curves.json"}


def training_rows(results: dict, bits: dict) -> list:
  """One row per method for summary.md: best step size, steps, bits, ratio to float32.

  Args:
    results: :func:`training_grid`'s results.
    bits: :func:`bits_section`'s output.

  Returns:
    A list of dicts, one per method in ``results`` order.
  """
  return [{"method": name, "learning_rate": r["best"] and r["best"]["learning_rate"],
           "at_grid_edge": r["best_at_grid_edge"], **bits["methods"][name]}
          for name, r in results.items()]


# ---------------------------------------------------------------------------------------
# 3. Bits to accuracy.

def bits_section(results: dict) -> dict:
  """Bits each method sends per device to reach ``TARGET``, and the ratio to float32 SGD.

  ``bits_to_target = steps_to_target * wire_bits_per_step_per_device`` of the method's
  best run, the bits measured from the compiled step's HLO by ``jrelu.train``.

  Args:
    results: :func:`training_grid`'s results.

  Returns:
    ``{"baseline", "methods": {name: {"wire_bits_per_step_per_device", "steps_to_target",
    "bits_to_target", "times_fewer_bits_than_float32"}}, "headline": {...}}``; the
    headline names the compressed method with the largest saving.
  """
  base = results.get(BASELINE, {}).get("best")
  rows = {}
  for name, r in results.items():
    best = r["best"]
    ratio = None
    if best is not None and base is not None:
      ratio = base["bits_to_target"] / best["bits_to_target"]
    rows[name] = {
        "label": r["label"],
        "wire_bits_per_step_per_device": best and best["wire_bits_per_step_per_device"],
        "steps_to_target": best and best["steps_to_target"],
        "bits_to_target": best and best["bits_to_target"],
        "times_fewer_bits_than_float32": ratio,
    }
  compressed = {k: v for k, v in rows.items()
                if k != BASELINE and v["times_fewer_bits_than_float32"] is not None}
  headline = None
  if compressed:
    name = max(compressed, key=lambda k: compressed[k]["times_fewer_bits_than_float32"])
    headline = {"method": name, "label": rows[name]["label"],
                "times_fewer_bits_than_float32":
                    rows[name]["times_fewer_bits_than_float32"],
                "bits_to_target": rows[name]["bits_to_target"],
                "float32_bits_to_target": base["bits_to_target"]}
  return {"baseline": BASELINE, "target_relative_error": TARGET, "methods": rows,
          "headline": headline}


# ---------------------------------------------------------------------------------------
# 4. Communication model.

def predicted_wire_bits(config: train.Config, num_devices: int) -> float:
  """Bits one device sends per step on ``num_devices`` workers (``jrelu.aggregation``).

  ``jrelu.aggregation.wire_bits`` is what the tests check against the HLO count at 2 and 8
  devices.

  Args:
    config: the method's config (compressor, aggregation, dim).
    num_devices: N.

  Returns:
    Bits per step per device (float).
  """
  compressor = train.make_compressor(config, num_devices)
  return float(aggregation.wire_bits(config.aggregation, compressor, (config.dim,),
                                     num_devices))


def time_compute(config: train.Config, device, steps: int, workdir: str) -> float:
  """Measured compute seconds per step of one worker: a 1-device ``jrelu.train`` run.

  What is timed: ``jrelu.train.train`` on the single ``device`` with the method's
  compressor and aggregation and ``config.batch_size`` set to the per-worker batch, i.e.
  drawing the batch, the gradient, the codec (for ``two_phase``: encode, decode, re-encode,
  decode, the same work as on N workers, with one chunk of d instead of N chunks of d/N)
  and the SGD update, with the collectives trivial. ``steps`` steps run in
  ``TIMING_CHUNKS`` calls of one compiled chunk (compilation excluded, host round trip per
  chunk included); the fastest chunk's seconds per step is returned (the least disturbed
  one on a shared machine). The step size is ``TIMING_LEARNING_RATE`` so that even a
  one-example batch stays finite; the arithmetic does not depend on it.

  Args:
    config: the method's config with ``batch_size`` = per-worker batch.
    device: one device.
    steps: steps to time (a multiple of ``TIMING_CHUNKS`` is used).
    workdir: where the timing run writes its files.

  Returns:
    Seconds per step.
  """
  chunk = max(1, steps // TIMING_CHUNKS)
  config = dataclasses.replace(
      config, num_devices=1, num_steps=chunk * TIMING_CHUNKS, log_every=chunk,
      learning_rate=TIMING_LEARNING_RATE, target_relative_error=0.0, workdir=workdir)
  run_training(config, [device])
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    per_step = [1.0 / json.loads(line)["steps_per_second"] for line in f]
  return min(per_step)


def communication_section(base: train.Config, results: dict, devices, outdir: str, *,
                          alpha: float, bandwidths_gbps, timing_steps: int,
                          timed_worker_counts: str) -> dict:
  """Projected time to ``TARGET`` on N workers under a latency-bandwidth (alpha-beta) model.

  ``time(N) = steps_to_target * (compute(N) + rounds(N) * alpha + wire_bits(N) / bandwidth)``

  * ``steps_to_target``: the method's best run of section 2 (at ``len(devices)`` devices),
    assumed independent of N at a fixed global batch (exact for float32 SGD, whose
    averaged gradient does not depend on N; for QSGD the quantization noise changes with
    N, which this model ignores).
  * ``compute(N)``: measured by :func:`time_compute` at the per-worker batch
    ``batch_size / N`` (``timed_worker_counts="first"``: measured at the smallest N only
    and held constant, an overestimate for larger N).
  * ``rounds(N)``: message rounds of the strategy (:data:`ROUNDS`): ring all-reduce
    ``2(N-1)``, all-gather ``N-1``, two-phase (all-to-all + all-gather) ``2(N-1)``.
  * ``wire_bits(N)``: :func:`predicted_wire_bits`, bits one device sends per step.

  Args:
    base: the problem (global batch, dim, seed).
    results: :func:`training_grid`'s results (best step size and steps per method).
    devices: the devices of section 2; the first one runs the timing runs.
    outdir: timing runs go to ``OUTDIR/timing/NAME_bBATCH/``.
    alpha: seconds of latency per message round.
    bandwidths_gbps: link bandwidths in Gbit/s.
    timing_steps: steps per timing run.
    timed_worker_counts: ``"all"`` or ``"first"`` (see ``compute(N)`` above).

  Returns:
    ``{"model", "alpha_seconds", "bandwidths_gbps", "worker_counts", "assumptions",
    "compute_seconds_per_step": {name: [per N]}, "wire_bits_per_step_per_device": {name:
    [per N]}, "rounds": {name: [per N]}, "seconds_to_target": {bandwidth: {name: [per
    N]}}, "speedup_vs_float32": {bandwidth: {name: [per N]}}, "fastest_method":
    {bandwidth: [name per N]}, "float32_latency_bound_below_dim": {bandwidth: [per N]},
    "labels": {name: label}}``; methods that never reached the target are left out.

  References:
    Hockney, "The communication challenge for MPP", Parallel Computing 1994 (alpha-beta
    model); Thakur, Rabenseifner, Gropp, IJHPCA 2005 (ring collectives);
    Kalan, Soltanolkotabi, Avestimehr, arXiv 1901.06587 (the EC2 timings).
  """
  counts = [n for n in WORKER_COUNTS if base.batch_size % n == 0]
  if not counts:
    logging.warning("communication model: no worker count in %s divides the global batch "
                    "%d", WORKER_COUNTS, base.batch_size)
  compute, bits, rounds = {}, {}, {}
  for name in [n for n, r in results.items() if r["best"] is not None and counts]:
    config = method_config(base, name, learning_rate=results[name]["best"]["learning_rate"])
    if config.aggregation not in ROUNDS:
      logging.warning("communication model: skipping %s, no message-round count for "
                      "aggregation %r (add it to ROUNDS)", name, config.aggregation)
      continue
    timed = counts if timed_worker_counts == "all" else counts[:1]
    measured = {}
    for n in timed:
      per_worker = dataclasses.replace(config, batch_size=base.batch_size // n)
      measured[n] = time_compute(per_worker, devices[0], timing_steps,
                                 os.path.join(outdir, "timing", f"{name}_b{base.batch_size // n}"))
      logging.info("compute %s, per-worker batch %d: %.3g ms/step", name,
                   base.batch_size // n, 1e3 * measured[n])
    compute[name] = [measured.get(n, measured[timed[-1]]) for n in counts]
    bits[name] = [predicted_wire_bits(config, n) for n in counts]
    rounds[name] = [ROUNDS[config.aggregation](n) for n in counts]
  names = list(compute)
  seconds, speedup, best = {}, {}, {}
  for bw in bandwidths_gbps:
    key = f"{bw:g}"
    seconds[key] = {
        name: [results[name]["best"]["steps_to_target"]
               * (c + r * alpha + b / (bw * 1e9))
               for c, r, b in zip(compute[name], rounds[name], bits[name])]
        for name in names}
    if BASELINE in seconds[key]:
      speedup[key] = {name: [s0 / s for s0, s in zip(seconds[key][BASELINE], v)]
                      for name, v in seconds[key].items()}
    best[key] = [min(names, key=lambda m: seconds[key][m][i])
                 for i in range(len(counts))] if names else []
  return {
      "model": "seconds_to_target = steps_to_target * (compute_seconds_per_step(N) "
               "+ rounds(N) * alpha + wire_bits(N) / bandwidth)",
      "alpha_seconds": alpha, "bandwidths_gbps": list(bandwidths_gbps),
      "worker_counts": counts, "global_batch_size": base.batch_size,
      "assumptions": [
          "steps_to_target measured at %d devices is independent of N at a fixed global "
          "batch (exact for float32 SGD; ignores the N-dependence of QSGD noise)"
          % len(devices),
          "compute(N): one worker's step measured on one device at batch_size/N ("
          + ("every N" if timed_worker_counts == "all" else
             "only the smallest N, held constant for larger N") + ")",
          "rounds: ring all-reduce 2(N-1), all-gather N-1, two_phase all-to-all + "
          "all-gather 2(N-1); alpha per round",
          "wire_bits(N): jrelu.aggregation.wire_bits, bits one worker sends per step; "
          "links are full duplex and not shared",
      ],
      "timed_worker_counts": timed_worker_counts,
      "labels": {name: results[name]["label"] for name in names},
      "compute_seconds_per_step": compute, "wire_bits_per_step_per_device": bits,
      "rounds": rounds, "seconds_to_target": seconds, "speedup_vs_float32": speedup,
      "fastest_method": best,
      # A float32 ring all-reduce of d coordinates spends as long on transfer as on latency
      # when 2(N-1)/N * 32 d / bandwidth = 2(N-1) * alpha, i.e. d = N * alpha * bandwidth / 32;
      # below that dimension a step is latency-bound and compression cannot shorten it.
      "float32_latency_bound_below_dim": {
          f"{bw:g}": [n * alpha * bw * 1e9 / 32 for n in counts] for bw in bandwidths_gbps},
  }


# ---------------------------------------------------------------------------------------
# Plots and summary.md.

def plot_phase_transition(plt, phase: dict, path: str) -> None:
  """Plots success probability against n/d, a panel for GD and SGD, a line per d.

  Args:
    plt: ``matplotlib.pyplot`` (Agg backend, ``common.pyplot()``).
    phase: :func:`phase_transition`'s output.
    path: the PNG to write.
  """
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
  for ax, method, title in zip(axes, ("gd", "sgd"), ("gradient descent (full batch)",
                                                     "SGD (batch d, with replacement)")):
    for d, success in phase["success_probability"][method].items():
      ax.plot(phase["n_over_d"], success, "o-", markersize=4, label=f"d = {d}")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("n / d")
    ax.grid(True, alpha=0.3)
  axes[0].set_ylabel(f"P(relative error <= {TARGET:g})")
  axes[0].legend(fontsize=8)
  s = phase["settings"]
  fig.suptitle(f"planted ReLU from w = 0, step size {s['learning_rate']}, "
               f"{s['trials']} trials, {s['max_iterations']} iterations", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_curves(plt, curves: dict, results: dict, x_key: str, xlabel: str, title: str,
                x_scale: float = 1.0, *, path: str) -> None:
  """Plots relative error (log scale) of each method's best run against ``x_key``.

  Args:
    plt: ``matplotlib.pyplot`` (Agg backend, ``common.pyplot()``).
    curves: ``{name: curve}`` from :func:`training_grid`.
    results: its results (labels and step sizes).
    x_key: ``"step"`` or ``"cumulative_bits_per_device"``.
    xlabel: the x axis label.
    title: the plot title.
    x_scale: x values are divided by it (1e6 for Mbit).
    path: the PNG to write.
  """
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, curve in curves.items():
    lr = results[name]["best"]["learning_rate"]
    ax.semilogy([x / x_scale for x in curve[x_key]], curve["relative_error"],
                "-", linewidth=1.4, label=f"{results[name]['label']} (lr {lr:g})")
  ax.axhline(TARGET, color="gray", linestyle=":", linewidth=1)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(r"$\|w - w^*\| / \|w^*\|$")
  ax.set_title(title, fontsize=10)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_communication(plt, comm: dict, results: dict, path: str) -> None:
  """Plots projected seconds to target against N, one panel per bandwidth.

  Args:
    plt: ``matplotlib.pyplot`` (Agg backend, ``common.pyplot()``).
    comm: :func:`communication_section`'s output.
    results: the training results (labels).
    path: the PNG to write.
  """
  bws = list(comm["seconds_to_target"])
  fig, axes = plt.subplots(1, len(bws), figsize=(4 * len(bws), 3.6), sharey=True,
                           squeeze=False)
  for ax, bw in zip(axes[0], bws):
    for name, seconds in comm["seconds_to_target"][bw].items():
      ax.loglog(comm["worker_counts"], seconds, "o-", markersize=3,
                label=results[name]["label"])
    ax.set_xscale("log", base=2)
    ax.set_title(f"{bw} Gbit/s, alpha = {comm['alpha_seconds'] * 1e6:g} us", fontsize=10)
    ax.set_xlabel("workers N")
    ax.grid(True, which="both", alpha=0.3)
  axes[0][0].set_ylabel(f"projected seconds to {TARGET:g}")
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _fmt(x, digits=3):
  if x is None:
    return "-"
  if isinstance(x, float) and not x.is_integer():
    return f"{x:.{digits}g}"
  return f"{int(x):,}"


def _seconds(x):
  if x is None:
    return "-"
  if x >= 1:
    return f"{x:.3g} s"
  return f"{x * 1e3:.3g} ms" if x >= 1e-3 else f"{x * 1e6:.3g} us"


def summary_markdown(result: dict, rows=None) -> str:
  """README-ready markdown: headline numbers and tables of every section that ran.

  Args:
    result: the benchmark's result dict (the JSON line).
    rows: :func:`training_rows` of the training grid, when it ran.

  Returns:
    The markdown text of ``OUTDIR/summary.md``.
  """
  lines = ["# Reproducing Kalan, Soltanolkotabi, Avestimehr (arXiv 1901.06587) with jrelu",
           "",
           f"Machine: {result['cpu_model']}, {result['cpu_cores']} cores, "
           f"{result['backend']} backend with {result['device_count']} devices, "
           f"JAX {result['jax_version']}. Mode: {'quick' if result['quick'] else 'full'}, "
           f"seed {result['seed']}. Generated by `benchmarks/reproduce.py`.", ""]
  phase = result.get("phase_transition")
  if phase:
    s = phase["settings"]
    lines += ["## Phase transition", "",
              f"Probability that gradient descent (full batch) and SGD (batch d, with "
              f"replacement) from w = 0 reach relative error <= {TARGET:g} within "
              f"{s['max_iterations']} iterations; step size {s['learning_rate']} on "
              f"`{s['loss']}`, {s['trials']} trials per cell, {s['dtype']}.", ""]
    header = "| method | d | " + " | ".join(f"n/d={r:g}" for r in phase["n_over_d"]) + " |"
    lines += [header, "|" + "---|" * (len(phase["n_over_d"]) + 2)]
    for method in ("gd", "sgd"):
      for d, success in phase["success_probability"][method].items():
        lines.append(f"| {method.upper()} | {d} | "
                     + " | ".join(f"{p:.2f}" for p in success) + " |")
    lines.append("")
    for method in ("gd", "sgd"):
      th = phase["threshold_n_over_d"][method]
      lines.append(f"- {method.upper()}: success probability >= 0.9 from n/d = "
                   + ", ".join(f"{_fmt(v)} (d={d})" for d, v in th.items()) + ".")
    lines.append("")
  training = result.get("training")
  if training and rows:
    p = training["problem"]
    lines += ["## Convergence and bits to accuracy", "",
              f"d = {p['dim']}, n = {p['num_samples']}, global batch {p['batch_size']} on "
              f"{p['num_devices']} devices, init 0; each method at its best step size of "
              f"{training['learning_rates']} (fewest steps to {TARGET:g}). Bits are what "
              "the compiled step sends per device (read from its HLO).", "",
              "| method | step size | steps to 1e-6 | bits / step / device "
              "| bits to 1e-6 per device | vs float32 |",
              "|---|---|---|---|---|---|"]
    for row in rows:
      ratio = row["times_fewer_bits_than_float32"]
      lines.append(
          f"| {row['label']} | {_fmt(row['learning_rate'])}{'*' if row['at_grid_edge'] else ''} "
          f"| {_fmt(row['steps_to_target'])} "
          f"| {_fmt(row['wire_bits_per_step_per_device'])} | "
          f"{_fmt(row['bits_to_target'] and row['bits_to_target'] / 1e6)} M | "
          + ("1x" if row["method"] == BASELINE else
             "-" if ratio is None else f"**{ratio:.1f}x fewer**") + " |")
    if any(row["at_grid_edge"] for row in rows):
      lines.append("")
      lines.append("\\* best step size at the edge of the grid: a wider grid may do better.")
    lines.append("")
    bits = result.get("bits_to_accuracy")
    if bits and bits["headline"]:
      h = bits["headline"]
      lines += [f"Headline: {h['label']} reaches {TARGET:g} with "
                f"**{h['times_fewer_bits_than_float32']:.1f}x fewer bits** per device than "
                f"float32 SGD ({h['bits_to_target'] / 1e6:.3g} M vs "
                f"{h['float32_bits_to_target'] / 1e6:.3g} M).", ""]
  comm = result.get("communication")
  if comm and comm["labels"] and comm["worker_counts"]:
    lines += _communication_markdown(comm)
  lines += ["Timings (steps/s, compute per step, projected times) depend on the machine; "
            "bit counts and step counts do not.", ""]
  return "\n".join(lines)


def _communication_markdown(comm: dict) -> list:
  """The tables of section 4: projected time per N and bandwidth, and a cost breakdown."""
  labels = comm["labels"]
  names = list(labels)
  counts = comm["worker_counts"]
  lines = ["## Projected time to 1e-6 (alpha-beta model)", "",
           f"`{comm['model']}`, alpha = {comm['alpha_seconds'] * 1e6:g} us per message "
           "round, compute measured on one device at the per-worker batch "
           f"(global batch {comm['global_batch_size']}).", ""]
  for bw, table in comm["seconds_to_target"].items():
    lines += [f"{bw} Gbit/s:", "",
              "| N | " + " | ".join(labels[m] for m in names) + " | fastest |",
              "|" + "---|" * (len(names) + 2)]
    for i, n in enumerate(counts):
      lines.append(f"| {n} | " + " | ".join(_seconds(table[m][i]) for m in names)
                   + f" | {labels[comm['fastest_method'][bw][i]]} |")
    lines.append("")
  bws = list(comm["seconds_to_target"])
  lines += ["Per-step cost: compute (measured), latency (rounds x alpha) and transfer "
            "(bits / bandwidth):", "",
            "| method | N | compute | latency | bits / step / device | "
            + " | ".join(f"transfer at {bw} Gbit/s" for bw in bws) + " |",
            "|" + "---|" * (5 + len(bws))]
  for m in names:
    for i in sorted({0, len(counts) - 1}):
      bits = comm["wire_bits_per_step_per_device"][m][i]
      lines.append(
          f"| {labels[m]} | {counts[i]} | {_seconds(comm['compute_seconds_per_step'][m][i])} "
          f"| {_seconds(comm['rounds'][m][i] * comm['alpha_seconds'])} | {_fmt(bits)} | "
          + " | ".join(_seconds(bits / (float(bw) * 1e9)) for bw in bws) + " |")
  bw0 = bws[0]
  crossover = comm["float32_latency_bound_below_dim"][bw0][0]
  lines += ["", f"A float32 all-reduce is latency-bound (transfer time below rounds x alpha) "
            f"for d < N alpha B / 32: d < {crossover:,.0f} at N = {counts[0]} and {bw0} "
            "Gbit/s, growing with N and B. Below that, fewer bits cannot shorten a step; "
            "only the compute term (which includes the codec) separates the methods.",
            "", "Assumptions: " + "; ".join(comm["assumptions"]) + ".", ""]
  return lines


# ---------------------------------------------------------------------------------------
# main

def _settings(name):
  return (QUICK if _QUICK.value else FULL)[name]


def _base_config(num_steps_default: int) -> train.Config:
  """The training problem: jrelu.train defaults, with its shared flags applied."""
  f = flags.FLAGS
  return train.Config(
      dim=f.dim, num_samples=f.num_samples, batch_size=f.batch_size,
      num_devices=f.num_devices, seed=f.seed,
      num_steps=f.num_steps if f["num_steps"].present else num_steps_default)


def main(argv):
  """absl main: runs the selected sections and prints one JSON line."""
  del argv
  started = time.perf_counter()
  unused = common.foreign_flags_present(train, TRAIN_FLAGS_USED)
  if unused:
    common.fail(f"flag --{unused[0]} is a jrelu.train flag that this benchmark sets per "
                f"method (see METHODS); it only takes --{', --'.join(TRAIN_FLAGS_USED)}")
  sections = [s for s in SECTIONS if s in _SECTIONS.value]
  methods = list(_METHODS.value or _settings("methods"))
  learning_rates = [float(v) for v in (_LEARNING_RATES.value or _settings("learning_rates"))]
  outdir = common.make_outdir(_OUTDIR.value)
  devices = common.setup_devices(flags.FLAGS.num_devices)  # None: 8 on CPU
  base = _base_config(_settings("num_steps"))
  if any(s in sections for s in TRAINING_SECTIONS) and base.batch_size % len(devices):
    common.fail(f"flag --batch_size={base.batch_size}: not divisible by "
                f"--num_devices={len(devices)}")

  result = {"benchmark": "reproduce", "paper": "arXiv 1901.06587", **common.machine_info(),
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "num_devices": len(devices), "quick": _QUICK.value, "sections": sections,
            "seed": base.seed, "outdir": outdir, "section_seconds": {}}
  plots, rows = [], None

  plt = common.pyplot()
  if plt is None:
    logging.warning("matplotlib is not installed: no plots")

  def plot(fn, name, *args):
    if plt is not None:
      path = os.path.join(outdir, name)
      fn(plt, *args, path=path)
      plots.append(path)

  if "phase_transition" in sections:
    t0 = time.perf_counter()
    dims = [int(v) for v in (_PHASE_DIMS.value or _settings("phase_dims"))]
    ratios = sorted({float(v) for v in _PHASE_RATIOS.value})
    phase = phase_transition(dims, ratios, _PHASE_TRIALS.value or _settings("phase_trials"),
                             _PHASE_ITERS.value or _settings("phase_iters"), base.seed,
                             _PHASE_DTYPE.value)
    result["phase_transition"] = phase
    plot(plot_phase_transition, "phase_transition.png", phase)
    result["section_seconds"]["phase_transition"] = time.perf_counter() - t0

  if any(s in sections for s in TRAINING_SECTIONS):
    t0 = time.perf_counter()
    try:
      results, curves = training_grid(base, methods, learning_rates, devices, outdir)
    except train.UsageError as e:
      common.fail(str(e))
    common.write_json(os.path.join(outdir, "convergence_curves.json"), curves)
    result["training"] = training_section(base, results, devices, learning_rates)
    bits = bits_section(results)
    rows = training_rows(results, bits)
    result["section_seconds"]["training_grid"] = time.perf_counter() - t0
    problem = (f"d={base.dim}, n={base.num_samples}, batch {base.batch_size}, "
               f"{len(devices)} devices")
    if "convergence" in sections:
      result["convergence"] = convergence_section(results)
      plot(plot_curves, "convergence.png", curves, results, "step", "step",
           f"relative error vs step ({problem})")
    if "bits_to_accuracy" in sections:
      result["bits_to_accuracy"] = bits
      plot(plot_curves, "bits_to_accuracy.png", curves, results,
           "cumulative_bits_per_device", "Mbit sent per device (from HLO)",
           f"relative error vs bits sent ({problem})", 1e6)
    if "communication" in sections:
      t0 = time.perf_counter()
      comm = communication_section(
          base, results, devices, outdir, alpha=_ALPHA.value,
          bandwidths_gbps=[float(v) for v in _BANDWIDTHS.value],
          timing_steps=_TIMING_STEPS.value or _settings("timing_steps"),
          timed_worker_counts=_settings("timed_worker_counts"))
      result["communication"] = comm
      if comm["labels"] and comm["worker_counts"]:
        plot(plot_communication, "communication_model.png", comm, results)
      result["section_seconds"]["communication"] = time.perf_counter() - t0

  result["plots"] = plots
  result["summary_md"] = os.path.join(outdir, "summary.md")
  result["results_json"] = os.path.join(outdir, "results.json")
  result["runtime_seconds"] = time.perf_counter() - started
  with open(result["summary_md"], "w") as f:
    f.write(summary_markdown(result, rows))
  common.write_json(result["results_json"], result)
  logging.info("done in %.0f s: %s", result["runtime_seconds"], result["summary_md"])
  common.print_json_line(result)


if __name__ == "__main__":
  common.run_main(main)
