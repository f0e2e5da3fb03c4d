"""The training loop of an experiment: :func:`run`, checkpointed, resumable, stoppable.

Kalan, Soltanolkotabi, Avestimehr, "Fitting ReLUs via SGD and Quantized SGD" (arXiv
1901.06587): each of N devices takes the gradient of its shard of the global mini-batch,
the gradients are compressed, exchanged and averaged, and every device applies the same
update. With ``algorithm`` EASGD, EAMSGD or DOWNPOUR (``jrelu.easgd``) each device keeps
its own parameters instead, and exchanges with a center every ``tau`` steps. Training
runs in compiled chunks of ``log_every`` steps.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import signal
import threading
import time
import uuid
from typing import Callable, Iterable

from absl import logging
import jax
import numpy as np

from jrelu import _checks
from jrelu import aggregation
from jrelu import checkpoint
from jrelu import easgd
from jrelu import linesearch
from jrelu import parallel
from jrelu import planted
from jrelu import powersgd
from jrelu import processes
from jrelu import sampling
from jrelu import wire
from jrelu.experiment.config import (SGD, Config, ConfigError, INT32_WHY, checked, describe,
                                     make_codec, make_step, predicted_wire_bits, resolve,
                                     steps_per_exchange)
from jrelu.experiment import files
from jrelu.experiment import memory

class DivergedError(RuntimeError):
  """Training produced NaN or Inf; ``step`` is the first step (1-based) where it did."""

  def __init__(self, step: int, workdir: str):
    super().__init__(f"training diverged: non-finite loss or weights at step {step}; "
                     f"metrics up to then are kept in {workdir}")
    self.step = step


class Interrupted(RuntimeError):
  """SIGINT or SIGTERM stopped the run after a checkpoint; ``signum`` and ``step`` say which.

  ``summary.json`` then says ``"status": "interrupted"``; calling :func:`run` again with
  the same settings resumes. ``jrelu.train`` exits with ``128 + signum`` (130, 143).
  """

  def __init__(self, signum: int, step: int, num_steps: int):
    name = signal.Signals(signum).name
    super().__init__(f"interrupted by {name} at step {step} of {num_steps}; checkpoint "
                     "saved, run again with the same settings to resume")
    self.signum = signum
    self.step = step


TIMING_FIELDS = ("steps_per_second", "compile_seconds", "run_seconds", "checkpoint_seconds")


class _StopSignals:
  """While active, SIGINT and SIGTERM only record that a stop was asked for.

  A second signal of the same kind raises ``KeyboardInterrupt`` (the way out of a step
  that never ends). Only installed from the main thread; old handlers are restored.
  """

  def __init__(self, active: bool):
    self.signum = None
    self._active = active and threading.current_thread() is threading.main_thread()
    self._old = {}

  def _handle(self, signum, frame):
    del frame
    if self.signum == signum:
      raise KeyboardInterrupt
    self.signum = signum
    logging.warning("%s: stopping after this chunk of steps, with a checkpoint",
                    signal.Signals(signum).name)

  def __enter__(self):
    if self._active:
      for signum in (signal.SIGINT, signal.SIGTERM):
        self._old[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._old.items():
      signal.signal(signum, handler)


def run(config: Config, workdir: str, *, devices=None,
        callbacks: Iterable[Callable[[dict], None]] = (), checkpoint_every: int = 500,
        keep_checkpoints: int = 3, fresh: bool = False, handle_signals: bool = True
        ) -> dict:
  """Trains the planted ReLU as ``config`` says and writes the run's files to ``workdir``.

  Training runs in compiled chunks of ``config.log_every`` steps (one ``lax.scan`` each)
  and stops early once ``config.target_relative_error`` is reached. After each chunk the
  metrics line is appended to ``metrics.jsonl``, logged, and passed to every callback.
  For EASGD, EAMSGD and DOWNPOUR the ``relative_error`` is the center's, and the summary's
  ``wire_bits_per_step_per_device`` is one exchange's bits (read from the compiled chunk
  over its steps, ``wire_bits_per_exchange_per_device``) over ``tau``;
  ``cumulative_wire_bits_per_device`` counts the exchanges made, ``ceil(step / tau)``.

  One run per workdir: ``run`` holds an exclusive lock on ``workdir/.lock`` while it
  runs. At the first chunk boundary at or after every ``checkpoint_every`` steps, and
  at the end, the whole state (params, the optax state with its PRNG keys, residuals and
  factors, the step; for EASGD, EAMSGD and DOWNPOUR each device's own params, the center,
  momenta and pushes) goes to ``workdir/checkpoints/<step>`` with the settings, the run id
  and the metrics so far. Calling ``run`` again with the same settings resumes from the
  latest checkpoint and ends bit-identical to an uninterrupted run (params, opt state,
  every metric but the timings); ``metrics.jsonl`` is cut back to the checkpoint, so
  each logged step appears exactly once. A checkpoint written under other settings is
  refused, unless ``fresh``, which deletes the earlier run's files (each one logged).

  Args:
    config: the run's settings (validated here).
    workdir: directory for ``metrics.jsonl``, ``summary.json``, the plot and
      ``checkpoints/``.
    devices: the N devices; default ``jrelu.parallel.setup_devices(config.num_devices)``.
    callbacks: functions called with each metrics line (a dict with ``step``,
      ``relative_error``, ``loss``, ``steps_per_second``, ``run_seconds``,
      ``cumulative_wire_bits_per_device``, ``run_id``).
    checkpoint_every: steps between checkpoints (>= 1), rounded up to a chunk boundary.
    keep_checkpoints: how many of the latest checkpoints to keep (>= 1).
    fresh: delete an earlier run's files in ``workdir`` instead of resuming it.
    handle_signals: from the main thread, SIGINT and SIGTERM stop the run at the end
      of the current chunk with a checkpoint and ``"status": "interrupted"`` (then
      :class:`Interrupted` is raised).

  Returns:
    The summary dict also written to ``summary.json``.

  Raises:
    ConfigError: for a bad setting, a batch not divisible by N, a config whose
      estimated memory exceeds what is available (:func:`check_memory`), a
      ``JAX_PLATFORMS`` whose backend cannot start, an unwritable ``workdir``, a
      ``workdir`` in use by another run, or a checkpoint of other settings.
    DivergedError: when a loss or the weights become NaN or Inf (``summary.json`` is
      still written, with ``"status": "diverged"``).
    Interrupted: after SIGINT or SIGTERM (``summary.json`` says ``"interrupted"``).
    files.WriteError: when a file of the run cannot be written, naming it.

  Example:
    >>> summary = run(Config(num_steps=200), "runs/qsgd")
    >>> summary["relative_error"], summary["wire_bits_per_step_per_device"]
  """
  config = resolve(config.validate())
  checkpoint_every = checked("checkpoint_every", _checks.integer, checkpoint_every, 1,
                             _checks.INT32_MAX, INT32_WHY)
  keep_checkpoints = checked("keep_checkpoints", _checks.integer, keep_checkpoints, 1,
                             _checks.INT32_MAX, INT32_WHY)
  if devices is None:
    try:
      devices = parallel.setup_devices(config.num_devices)
    except ValueError as e:
      raise ConfigError("num_devices", f"num_devices={config.num_devices}: {e}") from None
    except (RuntimeError, AssertionError) as e:  # JAX cannot start the asked-for backend
      platforms = os.environ.get("JAX_PLATFORMS", "")
      reason = (str(e).strip().splitlines()
                or ["it is not installed, or has no device on this machine"])[0]
      raise ConfigError("JAX_PLATFORMS", f"JAX_PLATFORMS={platforms!r}: JAX cannot start "
                        f"that backend here ({reason})") from None
  n_dev = len(devices)
  config = resolve(config, n_dev)   # EASGD's alpha = 0.9 / N
  if config.batch_size % n_dev:
    raise ConfigError("batch_size", f"batch_size={config.batch_size} is not divisible by "
                      f"the {n_dev} devices")
  if config.aggregation == "integer_psum":
    try:
      aggregation.integer_psum_width(make_codec(config, n_dev), n_dev)
    except ValueError as e:
      raise ConfigError("num_levels", f"num_levels={config.num_levels}, aggregation="
                        f"'integer_psum': {e}") from None
  memory.check_memory(config, devices)
  lock = _on_writer(lambda: (files.check_workdir(workdir), files.lock(workdir))[1])
  try:
    with _StopSignals(handle_signals) as stop:
      return _run_locked(config, workdir, devices, callbacks, checkpoint_every,
                         keep_checkpoints, fresh, stop)
  finally:
    if lock is not None:
      lock.close()


def _on_writer(work: Callable):
  """``work()`` on the process that writes the run's files; its error on every process.

  With one process this is ``work()``. With several (``jrelu.processes``), process 0
  runs it and tells the others whether it failed, so that every process raises the same
  ConfigError (or stops) instead of waiting for the others in a collective. Returns
  ``work()``'s result on process 0 and None on the others.
  """
  if processes.num_processes() == 1:
    return work()
  result, error = None, None
  if processes.is_writer():
    try:
      result = work()
    except ConfigError as e:
      error = {"field": e.field, "message": str(e)}
      processes.broadcast(error, "error")
      raise
    except Exception as e:  # pylint: disable=broad-except  # told to the others, re-raised
      processes.broadcast({"field": None, "message": f"{type(e).__name__}: {e}"}, "error")
      raise
  error = processes.broadcast(error, "error")
  if error is not None:
    if error["field"] is None:
      raise processes.ProcessFailed(f"process 0 failed: {error['message']}")
    raise ConfigError(error["field"], error["message"])
  return result


def _device_losses(loss) -> np.ndarray:
  """float32 ``[N, steps]``: every device's losses of a chunk, in device order.

  With several processes each reads its devices' rows and the processes exchange them as
  JSON numbers through the coordination service (exact for float32, and no program to
  compile for a few numbers per device).
  """
  if loss.is_fully_addressable:
    return np.asarray(loss)
  mine = {s.index[0].start: np.asarray(s.data)[0].tolist() for s in loss.addressable_shards}
  rows = {}
  for part in processes.allgather({str(k): v for k, v in mine.items()}, "losses"):
    rows.update(part)
  return np.asarray([rows[str(i)] for i in range(loss.shape[0])], np.float32)


def _problem(config: Config, devices):
  """``(w_star, data, params)``: the planted problem, each device holding its segment.

  EASGD, EAMSGD and DOWNPOUR workers sample the whole data set (``jrelu.easgd``), so
  there ``data`` is the whole ``jrelu.sampling.Dataset`` on every device (each process
  draws it, the same rows, and places the copies of its own devices). For SGD the data
  set's rows are drawn on the devices, each device drawing only the rows of its own
  segment (``jrelu.sampling.Segments``, ``n // N`` consecutive rows), so that a process
  never holds more than its devices' rows. JAX's partitionable threefry makes row ``i``
  the same whatever the devices and processes: the segments equal
  ``split_segments(planted.sample_dataset(...), N)`` on one device. The ``moment`` init
  ``(2 / (N L)) sum y_i x_i`` sums the stored ``N L`` rows (``n % N`` are never read by
  the sampler either) in a fixed order: each device's partial sum, gathered, then added on
  the host in device order, so every layout of processes computes the same float32
  numbers.
  """
  key = jax.random.key(config.seed)
  w_key, data_key, init_key, _, _ = jax.random.split(key, 5)
  w_star = planted.sample_w_star(w_key, config.dim)
  n_dev = len(devices)
  if config.algorithm != SGD:
    dataset = planted.sample_dataset(data_key, w_star, config.num_samples, config.noise_std)
    params = planted.init_params(init_key, (dataset, w_star), config.init)
    return w_star, parallel.replicate(dataset, devices), params
  rows = n_dev * (config.num_samples // n_dev)
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(devices), ("devices",)),
                                        jax.sharding.PartitionSpec("devices"))

  def draw(w):
    return sampling.split_segments(
        planted.sample_dataset(data_key, w, rows, config.noise_std), n_dev)

  segments = jax.jit(draw, out_shardings=sampling.Segments(sharding, sharding))(w_star)
  if config.init == "moment":
    partial = jax.jit(lambda s: jax.vmap(lambda x, y: y @ x)(s.x, s.y),
                      out_shardings=sharding)(segments)
    partials = processes.host_array(partial)
    total = partials[0]
    for p in partials[1:]:
      total = total + p
    params = jax.numpy.asarray((np.float32(2.0) / np.float32(rows)) * total)
  else:
    shape = sampling.Dataset(jax.ShapeDtypeStruct((rows, config.dim), np.float32), None)
    params = planted.init_params(init_key, (shape, w_star), config.init)
  return w_star, segments, params


def _run_locked(config, workdir, devices, callbacks, checkpoint_every, keep_checkpoints,
                fresh, stop):
  """:func:`run` once the workdir is locked."""
  n_dev = len(devices)
  writer = processes.is_writer()
  identity = files.identity(config, n_dev)
  resumed = processes.broadcast(
      _on_writer(lambda: files.prepare(workdir, identity, fresh)), "resumed")
  ckpt_dir = os.path.join(workdir, files.CHECKPOINT_DIR)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  summary_path = os.path.join(workdir, "summary.json")

  _, _, _, tx_key, batch_key = jax.random.split(jax.random.key(config.seed), 5)
  w_star, dataset, params = _problem(config, devices)
  step, init_state = make_step(config, tx_key, n_dev, loss_fn=planted.loss,
                               metrics_fn=planted.metrics_fn)
  state, truth, batch_key = parallel.replicate(
      (init_state(params), w_star, batch_key), devices)
  data = (dataset, truth)
  armijo = config.step_size == "armijo"

  programs_depend_on = {k: v for k, v in identity.items()
                        if k not in ("num_steps", "target_relative_error", "log_every")}
  cache_key = (json.dumps(programs_depend_on, sort_keys=True),
               tuple(d.id for d in devices))

  def chunk_program(length):
    """The compiled program of ``length`` steps, and the seconds it took to get."""
    start = time.perf_counter()
    program = _cached(cache_key + (length,), lambda: parallel.wrap(
        config.parallel, parallel.scan_steps(step, length), devices).lower(
            state, data, batch_key).compile())
    return program, time.perf_counter() - start

  def wire_report(program, length):
    """One step's collectives, read from the program of ``length`` steps that runs: its
    bits over ``length`` (XLA states the scan's trip count). A backend that states none
    gets a one-step program compiled only to be read, as :func:`jrelu.wire.measure` does.
    EASGD's collectives sit in the branch that runs every tau steps, so a step's bits are
    one exchange's (over tau in the summary)."""
    try:
      return wire.parse(program.as_text()).per_step(length)
    except ValueError as e:
      logging.info("wire: %s", e)
      return wire.measure(parallel.wrap(config.parallel, step, devices), state, data,
                          batch_key)

  steps_done = resumed["progress"]["steps"] if resumed is not None else 0
  first_length = max(1, min(config.log_every, config.num_steps - steps_done))
  first_program, first_compile_seconds = chunk_program(first_length)
  bits = _cached(cache_key + ("wire",), lambda: wire_report(first_program, first_length))
  tau = steps_per_exchange(config)
  # Every process reads the bits from its own compiled program.
  bits_by_process = [b / tau for b in processes.allgather(bits.sent_bits, "wire_bits")]
  float32_bits = aggregation.float32_allreduce_bits((config.dim,), n_dev)
  # What every step sends; a search's trials (loop_bits each) come on top.
  every_step_bits = bits.fixed_bits if armijo else bits.sent_bits
  codec = make_codec(config, n_dev)
  initial_error = float(planted.relative_error(params, w_star))
  summary = {
      **dataclasses.asdict(config),
      "workdir": workdir,
      "run_id": uuid.uuid4().hex[:16],
      "status": "running",
      "method": describe(config),
      "initial_relative_error": initial_error,
      "relative_error": initial_error,
      "steps": 0,
      "steps_to_target": None,
      "checkpoint_step": None,
      # With a line search: the mean over the steps so far (each trial is an all-reduce
      # inside the search's loop, which the compiled program holds once).
      "wire_bits_per_step_per_device": every_step_bits / tau,
      "wire_bits_per_exchange_per_device": bits.sent_bits,
      "predicted_wire_bits_per_step_per_device": predicted_wire_bits(config, params, n_dev),
      "wire_operand_bits_per_step_per_device": bits.operand_bits / tau,
      "wire_bits_per_linesearch_trial": bits.loop_bits,
      "predicted_wire_bits_per_linesearch_trial": (
          linesearch.wire_bits(n_dev, 1) - linesearch.wire_bits(n_dev, 0) if armijo else 0.0),
      "linesearch_trials": 0,
      "compressor_wire_bits": (codec.wire_bits((config.dim,)) if codec is not None
                               else powersgd.wire_bits(params, config.rank, 2)),
      "float32_wire_bits": float32_bits,
      "compression_ratio": float32_bits * tau / every_step_bits if every_step_bits else None,
      "steps_per_second": None,
      "compile_seconds": 0.0,
      "run_seconds": 0.0,
      "checkpoint_seconds": 0.0,
      "num_devices": n_dev,
      "num_processes": processes.num_processes(),
      "wire_bits_per_step_per_device_by_process": bits_by_process,
      "jax_version": jax.__version__,
      "backend": jax.default_backend(),
  }
  history = []
  if resumed is not None:
    state, _ = files.reading(workdir, resumed["progress"]["checkpoint_step"],
                        lambda: checkpoint.restore(ckpt_dir, like=state))
    history = resumed["history"]
    summary.update(resumed["progress"])
    if summary["status"] == "interrupted":
      summary["status"] = "running"
    summary.pop("interrupted_at_step", None)
    summary.pop("signal", None)
    lines = "".join(json.dumps(r) + "\n" for r in history)
    if writer:
      files.writing(metrics_path, lambda: files.write_text(metrics_path, lines))
    logging.info("resuming run %s from its checkpoint at step %d", summary["run_id"],
                 summary["steps"])
  elif writer:
    files.writing(metrics_path, lambda: files.write_text(metrics_path, ""))
  summary["compile_seconds"] += first_compile_seconds
  if writer:
    files.writing(summary_path, lambda: files.write_json(summary_path, summary))
  if armijo:
    logging.info("wire: %.0f bits per step per device, plus %.0f per line-search trial "
                 "(float32 all-reduce: %.0f)", bits.fixed_bits, bits.loop_bits, float32_bits)
  elif bits.sent_bits:
    logging.info("wire: %.0f bits per step per device (float32 all-reduce: %.0f, %.1fx fewer)%s",
                 summary["wire_bits_per_step_per_device"], float32_bits,
                 summary["compression_ratio"],
                 f", {bits.sent_bits:.0f} per exchange every {tau} steps" if tau > 1 else "")
  else:
    logging.info("wire: no traffic between devices (%d device)", n_dev)

  def save_checkpoint():
    if summary["checkpoint_step"] == summary["steps"]:
      return
    summary["checkpoint_step"] = summary["steps"]
    progress = {k: summary[k] for k in (
        "run_id", "status", "relative_error", "steps", "steps_to_target",
        "checkpoint_step", "compile_seconds", "run_seconds", "checkpoint_seconds",
        "linesearch_trials", "wire_bits_per_step_per_device",
        "predicted_wire_bits_per_step_per_device", "compression_ratio")}
    metadata = {"config": identity, "progress": progress, "history": history}
    start = time.perf_counter()
    files.writing(ckpt_dir, lambda: checkpoint.save(ckpt_dir, summary["steps"], state, metadata,
                                              keep=keep_checkpoints))
    summary["checkpoint_seconds"] += time.perf_counter() - start

  finished = False
  # A stop signal any process received, once every process knows it (they agree at each
  # chunk boundary, so that all of them stop at the same step).
  signum = next((s for s in processes.allgather(stop.signum, "signal") if s), None)
  try:
    while (summary["steps"] < config.num_steps and summary["status"] == "running"
           and signum is None):
      length = min(config.log_every, config.num_steps - summary["steps"])
      program, seconds = chunk_program(length)
      summary["compile_seconds"] += seconds
      start = time.perf_counter()
      new_state, metrics = program(state, data, batch_key)
      # Every device holds the same params, hence the same error; the loss is the mean
      # of every device's (all-gathered when devices of other processes hold some).
      errors = np.asarray(metrics["relative_error"].addressable_shards[0].data)[0]
      losses = _device_losses(metrics["loss"]).mean(axis=0)
      elapsed = time.perf_counter() - start
      summary["run_seconds"] += elapsed
      first = summary["steps"]
      bad = np.nonzero(~(np.isfinite(errors) & np.isfinite(losses)))[0]
      done = int(bad[0]) if bad.size else length  # the chunk's finite steps
      summary["steps"] = first + done
      if armijo:
        trials = np.asarray(metrics["linesearch_trials"].addressable_shards[0].data)[0]
        summary["linesearch_trials"] += int(trials[:done].sum())
      sent = (easgd.exchanges(summary["steps"], tau) * every_step_bits
              + summary["linesearch_trials"] * (bits.loop_bits if armijo else 0.0))
      if armijo and summary["steps"]:
        summary["wire_bits_per_step_per_device"] = sent / summary["steps"]
        summary["predicted_wire_bits_per_step_per_device"] = predicted_wire_bits(
            config, params, n_dev, summary["linesearch_trials"] / summary["steps"])
        summary["compression_ratio"] = (float32_bits / summary["wire_bits_per_step_per_device"]
                                        if sent else None)
      if bad.size:
        summary["status"] = "diverged"
        summary["diverged_at_step"] = first + done + 1
      else:
        state = new_state
      if done:
        # target 0 means "never stop" (the docs of the field), even at an exact 0 error.
        hit = np.nonzero((errors[:done] <= config.target_relative_error)
                         & (config.target_relative_error > 0))[0]
        if hit.size and summary["steps_to_target"] is None:
          summary["steps_to_target"] = first + int(hit[0]) + 1
          if summary["status"] == "running":
            summary["status"] = "reached_target"
        summary["relative_error"] = float(errors[done - 1])
        record = {
            "step": summary["steps"],
            "relative_error": float(errors[done - 1]),
            "loss": float(losses[done - 1]),
            "steps_per_second": length / elapsed,
            "run_seconds": summary["run_seconds"],
            "cumulative_wire_bits_per_device": sent,
            "run_id": summary["run_id"],
        }
        if armijo:
          record["step_size"] = float(
              np.asarray(metrics["step_size"].addressable_shards[0].data)[0][done - 1])
          record["linesearch_trials_per_step"] = float(trials[:done].mean())
        history.append(record)
        if writer:
          files.append_line(metrics_path, json.dumps(record))
        logging.info("step %d/%d  relative_error %.3e  loss %.3e  %.0f steps/s",
                     record["step"], config.num_steps, record["relative_error"],
                     record["loss"], record["steps_per_second"])
        for callback in callbacks:
          callback(record)
      signum = next((s for s in processes.allgather(stop.signum, "signal") if s), None)
      if (summary["status"] != "diverged" and summary["steps"] // checkpoint_every
          > (summary["checkpoint_step"] or 0) // checkpoint_every):
        save_checkpoint()
    if signum is not None and summary["status"] == "running":
      summary["status"] = "interrupted"
      summary["interrupted_at_step"] = summary["steps"]
      summary["signal"] = signal.Signals(signum).name
    elif summary["status"] == "running":
      summary["status"] = "finished"
    if summary["status"] != "diverged":
      save_checkpoint()
    finished = True
  finally:
    if not finished and summary["status"] == "running":
      summary["status"] = "failed"
    if summary["run_seconds"] > 0:
      summary["steps_per_second"] = summary["steps"] / summary["run_seconds"]
    try:
      if writer:
        files.writing(summary_path, lambda: files.write_json(summary_path, summary))
        _plot(history, summary, workdir)
    except files.WriteError as e:
      if finished:
        raise
      # The error that stopped the run propagates; this one (a full disk, likely the
      # same cause) is only logged.
      logging.error("%s", e)
  if summary["status"] == "diverged":
    raise DivergedError(summary["diverged_at_step"], workdir)
  if summary["status"] == "interrupted":
    raise Interrupted(signum, summary["steps"], config.num_steps)
  return summary


# Compiled programs (and wire reports) of recent runs, by settings, devices and chunk
# length: a run again with the same settings in this process (a resume, a benchmark
# repeat) does not trace and compile them again. Same settings, same programs: the
# config determines every constant they hold (keys included).
_PROGRAMS: collections.OrderedDict = collections.OrderedDict()
_PROGRAMS_KEPT = 8


def _cached(key, build: Callable):
  if key in _PROGRAMS:
    _PROGRAMS.move_to_end(key)
  else:
    _PROGRAMS[key] = build()
    while len(_PROGRAMS) > _PROGRAMS_KEPT:
      _PROGRAMS.popitem(last=False)
  return _PROGRAMS[key]


def _plot(history, summary, workdir):
  """Relative error versus step and versus bits sent, if matplotlib is installed."""
  if not history:
    return
  try:
    # The figure alone, drawn by its own Agg canvas: no pyplot (its import and figure
    # manager cost ~0.4 s), and fixed margins instead of tight_layout (~0.5 s a plot).
    from matplotlib import figure  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  steps = [0] + [r["step"] for r in history]
  errors = [summary["initial_relative_error"]] + [r["relative_error"] for r in history]
  megabits = [0.0] + [r["cumulative_wire_bits_per_device"] / 1e6 for r in history]
  fig = figure.Figure(figsize=(9, 3.5))
  by_step, by_bits = fig.subplots(1, 2, sharey=True)
  for ax, x, label in ((by_step, steps, "step"),
                       (by_bits, megabits, "Mbit sent per device (from HLO)")):
    ax.semilogy(x, errors, "o-", markersize=3)
    ax.set_xlabel(label)
    ax.grid(True, which="both", alpha=0.3)
  by_step.set_ylabel(r"$\|w - w^*\| / \|w^*\|$")
  fig.suptitle(f"{summary['method']}, {summary['aggregation'] or 'all-reduce'}, "
               f"{summary['num_devices']} devices, d={summary['dim']}", fontsize=10)
  fig.subplots_adjust(left=0.09, right=0.98, bottom=0.15, top=0.88, wspace=0.06)
  path = os.path.join(workdir, "relative_error.png")

  def write():
    fig.savefig(path + ".tmp", dpi=100, format="png")
    os.replace(path + ".tmp", path)

  files.writing(path, write)
