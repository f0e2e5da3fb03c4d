r"""Fits a planted ReLU by data-parallel SGD with compressed gradient averaging.

The main job of jrelu: Kalan, Soltanolkotabi, Avestimehr, "Fitting ReLUs via SGD and
Quantized SGD" (arXiv 1901.06587). Each of ``--num_devices`` devices (simulated CPU
devices when there is no accelerator) computes the gradient on its shard of the global
mini-batch, compresses it (``--compressor``), the codes are exchanged and averaged
(``--aggregation``), and every device applies the same SGD update. The run stops early
once ``--target_relative_error`` is reached.

    python -m jrelu.train --workdir=runs/qsgd4
    python -m jrelu.train --compressor=none --workdir=runs/sgd

Writes ``WORKDIR/metrics.jsonl`` (one JSON object per logged step), ``WORKDIR/summary.json``
and, when matplotlib is installed, ``WORKDIR/relative_error.png``. Bad flags print one
line on stderr and exit with status 2; a run that produces NaN or Inf stops, says at
which step, keeps what it wrote and exits with status 1.
"""

from __future__ import annotations

import dataclasses
import json
import logging as std_logging
import math
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jrelu import aggregation
from jrelu import compressors
from jrelu import parallel
from jrelu import planted
from jrelu import transforms
from jrelu import wire
from jrelu.compressors._qsgd import NORMS

_DIM = flags.DEFINE_integer("dim", 1000, "Dimension d of the planted weights.", lower_bound=1)
_NUM_SAMPLES = flags.DEFINE_integer(
    "num_samples", 4000, "Number n of training samples (n/d >= 3 recovers w_star).",
    lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 1024, "Global mini-batch size, split evenly across devices.", lower_bound=1)
_NUM_DEVICES = flags.DEFINE_integer(
    "num_devices", None, "Data-parallel devices; default: all accelerators, or 8 simulated "
    "CPU devices when there is none.", lower_bound=1)
_NUM_STEPS = flags.DEFINE_integer("num_steps", 3000, "Maximum SGD steps.", lower_bound=1)
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 0.5, "SGD step size (> 0).")
_COMPRESSOR = flags.DEFINE_enum(
    "compressor", "qsgd", sorted(compressors.REGISTRY), "Gradient codec ('none' = float32).")
_NUM_LEVELS = flags.DEFINE_integer(
    "num_levels", 4, "QSGD levels s (>= 1); ceil(log2(2s+1)) bits per coordinate.",
    lower_bound=1)
_BUCKET_SIZE = flags.DEFINE_integer(
    "bucket_size", None, "QSGD bucket size; default one bucket per (chunk of the) gradient.",
    lower_bound=1)
_NORM = flags.DEFINE_enum("norm", "max", list(NORMS),
                          "QSGD scaling: 'max' (default here) or 'l2' (the paper's theory).")
_AGGREGATION = flags.DEFINE_enum(
    "aggregation", "two_phase", list(aggregation.STRATEGIES),
    "How codes are averaged across devices (see jrelu.aggregation).")
_PARALLEL = flags.DEFINE_enum("parallel", "pmap", list(parallel.WRAPPERS),
                              "SPMD wrapper of the per-device step.")
_INIT = flags.DEFINE_enum("init", "zeros", list(planted.INITS), "Initial weights.")
_NOISE_STD = flags.DEFINE_float("noise_std", 0.0, "Label noise standard deviation (>= 0).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of data, initialization and compression noise.")
_TARGET = flags.DEFINE_float(
    "target_relative_error", 1e-6, "Stop once ||w - w_star|| / ||w_star|| <= this (0: never).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/latest", "Where metrics and summary go.")
_LOG_EVERY = flags.DEFINE_integer(
    "log_every", 100, "Steps per compiled chunk; metrics are logged after each.",
    lower_bound=1)

flags.register_validator("learning_rate", lambda v: v > 0 and math.isfinite(v),
                         "must be a finite number > 0")
flags.register_validator("noise_std", lambda v: v >= 0 and math.isfinite(v),
                         "must be a finite number >= 0")
flags.register_validator("target_relative_error", lambda v: v >= 0, "must be >= 0")
flags.register_validator("workdir", bool, "must not be empty")


class UsageError(ValueError):
  """A bad flag value; its message names the flag and the value."""


class DivergedError(RuntimeError):
  """Training produced NaN or Inf; ``step`` is the first step (1-based) where it did."""

  def __init__(self, step: int, workdir: str):
    super().__init__(f"training diverged: non-finite loss or weights at step {step}; "
                     f"metrics up to then are kept in {workdir}")
    self.step = step


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a training run depends on (the binary's flags, validated)."""
  dim: int = 1000
  num_samples: int = 4000
  batch_size: int = 1024
  num_devices: int | None = None
  num_steps: int = 3000
  learning_rate: float = 0.5
  compressor: str = "qsgd"
  num_levels: int = 4
  bucket_size: int | None = None
  norm: str = "max"
  aggregation: str = "two_phase"
  parallel: str = "pmap"
  init: str = "zeros"
  noise_std: float = 0.0
  seed: int = 0
  target_relative_error: float = 1e-6
  workdir: str = "runs/latest"
  log_every: int = 100


def make_compressor(config: Config) -> compressors.Compressor:
  """The codec named by ``config.compressor`` with its hyper-parameters."""
  if config.compressor == "qsgd":
    return compressors.qsgd(config.num_levels, config.bucket_size, config.norm)
  return compressors.REGISTRY[config.compressor]()


def check_workdir(workdir: str) -> None:
  """Creates ``workdir`` and checks that a file can be written there.

  Raises:
    UsageError: naming the flag and the reason.
  """
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise UsageError(f"flag --workdir={workdir}: cannot write there "
                     f"({e.strerror or e})") from None


def train(config: Config, devices) -> dict:
  """Runs one training job and writes its metrics and summary into ``config.workdir``.

  Args:
    config: the run's settings.
    devices: the N devices to train on (``jrelu.parallel.setup_devices``).

  Returns:
    The summary dict also written to ``summary.json``.

  Raises:
    UsageError: for a setting that does not fit the devices (batch size not divisible).
    DivergedError: when a loss or the weights become NaN or Inf (``summary.json`` is
      still written, with ``"status": "diverged"``).
  """
  n_dev = len(devices)
  if config.batch_size % n_dev:
    raise UsageError(f"flag --batch_size={config.batch_size}: not divisible by "
                     f"--num_devices={n_dev}")
  check_workdir(config.workdir)
  key = jax.random.key(config.seed)
  w_key, data_key, init_key, tx_key, batch_key = jax.random.split(key, 5)
  w_star = planted.sample_w_star(w_key, config.dim)
  dataset = planted.sample_dataset(data_key, w_star, config.num_samples, config.noise_std)
  params = planted.init_params(config.init, init_key, dataset)
  compressor = make_compressor(config)
  tx = optax.chain(
      transforms.compress(compressor, key=tx_key, axis_name=parallel.AXIS_NAME,
                          aggregation=config.aggregation),
      optax.sgd(config.learning_rate))
  step = parallel.make_step(planted.loss, planted.make_batch_fn(config.batch_size), tx,
                            metrics_fn=planted.metrics_fn)
  state, data, batch_key = parallel.replicate(
      (parallel.init_state(params, tx), (dataset, w_star), batch_key), devices)

  bits = wire.measure(parallel.wrap(config.parallel, step, devices), state, data, batch_key)
  predicted_bits = aggregation.wire_bits(config.aggregation, compressor, (config.dim,), n_dev)
  float32_bits = aggregation.float32_allreduce_bits((config.dim,), n_dev)
  initial_error = float(planted.relative_error(params, w_star))
  summary = {
      **dataclasses.asdict(config),
      "status": "running",
      "initial_relative_error": initial_error,
      "relative_error": initial_error,
      "steps": 0,
      "steps_to_target": None,
      "wire_bits_per_step_per_device": bits.sent_bits,
      "predicted_wire_bits_per_step_per_device": predicted_bits,
      "wire_operand_bits_per_step_per_device": bits.operand_bits,
      "compressor_wire_bits": compressor.wire_bits((config.dim,)),
      "float32_wire_bits": float32_bits,
      "compression_ratio": float32_bits / bits.sent_bits if bits.sent_bits else None,
      "steps_per_second": None,
      "compile_seconds": 0.0,
      "run_seconds": 0.0,
      "num_devices": n_dev,
      "jax_version": jax.__version__,
      "backend": jax.default_backend(),
  }
  if bits.sent_bits:
    logging.info("wire: %.0f bits per step per device (float32 all-reduce: %.0f, %.1fx fewer)",
                 bits.sent_bits, float32_bits, summary["compression_ratio"])
  else:
    logging.info("wire: no traffic between devices (%d device)", n_dev)

  programs = {}
  metrics_path = os.path.join(config.workdir, "metrics.jsonl")
  history = []
  try:
    with open(metrics_path, "w") as metrics_file:
      while summary["steps"] < config.num_steps and summary["status"] == "running":
        length = min(config.log_every, config.num_steps - summary["steps"])
        if length not in programs:
          start = time.perf_counter()
          run = parallel.wrap(config.parallel, parallel.scan_steps(step, length), devices)
          programs[length] = run.lower(state, data, batch_key).compile()
          summary["compile_seconds"] += time.perf_counter() - start
        start = time.perf_counter()
        state, metrics = programs[length](state, data, batch_key)
        errors = np.asarray(metrics["relative_error"][0])
        losses = np.asarray(metrics["loss"]).mean(axis=0)
        elapsed = time.perf_counter() - start
        summary["run_seconds"] += elapsed
        first = summary["steps"]
        summary["steps"] += length
        bad = np.nonzero(~(np.isfinite(errors) & np.isfinite(losses)))[0]
        if bad.size:
          summary["status"] = "diverged"
          summary["diverged_at_step"] = first + int(bad[0]) + 1
          summary["steps"] = first + int(bad[0])
          break
        hit = np.nonzero(errors <= config.target_relative_error)[0]
        if hit.size and summary["steps_to_target"] is None:
          summary["steps_to_target"] = first + int(hit[0]) + 1
          summary["status"] = "reached_target"
        summary["relative_error"] = float(errors[-1])
        record = {
            "step": summary["steps"],
            "relative_error": float(errors[-1]),
            "loss": float(losses[-1]),
            "steps_per_second": length / elapsed,
            "run_seconds": summary["run_seconds"],
            "cumulative_wire_bits_per_device": summary["steps"] * bits.sent_bits,
        }
        history.append(record)
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        logging.info("step %d/%d  relative_error %.3e  loss %.3e  %.0f steps/s",
                     record["step"], config.num_steps, record["relative_error"],
                     record["loss"], record["steps_per_second"])
  finally:
    if summary["status"] == "running":
      summary["status"] = "finished"
    if summary["run_seconds"] > 0:
      summary["steps_per_second"] = summary["steps"] / summary["run_seconds"]
    _write_json(os.path.join(config.workdir, "summary.json"), summary)
    _plot(history, summary)
  if summary["status"] == "diverged":
    raise DivergedError(summary["diverged_at_step"], config.workdir)
  return summary


def _write_json(path, obj):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def _plot(history, summary):
  """Relative error versus step and versus bits sent, if matplotlib is installed."""
  if not history:
    return
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return
  steps = [0] + [r["step"] for r in history]
  errors = [summary["initial_relative_error"]] + [r["relative_error"] for r in history]
  megabits = [0.0] + [r["cumulative_wire_bits_per_device"] / 1e6 for r in history]
  fig, (by_step, by_bits) = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
  for ax, x, label in ((by_step, steps, "step"),
                       (by_bits, megabits, "Mbit sent per device (from HLO)")):
    ax.semilogy(x, errors, "o-", markersize=3)
    ax.set_xlabel(label)
    ax.grid(True, which="both", alpha=0.3)
  by_step.set_ylabel(r"$\|w - w^*\| / \|w^*\|$")
  codec = ("float32 SGD" if summary["compressor"] == "none" else
           f"{summary['compressor']} s={summary['num_levels']} ({summary['norm']})")
  fig.suptitle(f"{codec}, {summary['aggregation']}, {summary['num_devices']} devices, "
               f"d={summary['dim']}", fontsize=10)
  fig.tight_layout()
  fig.savefig(os.path.join(summary["workdir"], "relative_error.png"), dpi=100)
  plt.close(fig)


def config_from_flags() -> Config:
  """Builds a :class:`Config` from the parsed flags."""
  return Config(
      dim=_DIM.value, num_samples=_NUM_SAMPLES.value, batch_size=_BATCH_SIZE.value,
      num_devices=_NUM_DEVICES.value, num_steps=_NUM_STEPS.value,
      learning_rate=_LEARNING_RATE.value, compressor=_COMPRESSOR.value,
      num_levels=_NUM_LEVELS.value, bucket_size=_BUCKET_SIZE.value, norm=_NORM.value,
      aggregation=_AGGREGATION.value, parallel=_PARALLEL.value, init=_INIT.value,
      noise_std=_NOISE_STD.value, seed=_SEED.value,
      target_relative_error=_TARGET.value, workdir=_WORKDIR.value,
      log_every=_LOG_EVERY.value)


def _fail(message: str, status: int):
  """Prints one line on stderr and exits; never a traceback."""
  sys.stderr.write(f"jrelu.train: error: {message}\n")
  sys.stderr.flush()
  sys.exit(status)


def _parse_flags(argv):
  """absl flag parsing that reports a bad flag in one line (exit status 2)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).splitlines()[0], 2)


def main(argv):
  """absl main: flags -> devices -> :func:`train`; errors become one line and an exit status."""
  for noisy in ("jax._src.xla_bridge", "matplotlib"):
    std_logging.getLogger(noisy).setLevel(std_logging.WARNING)
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; every setting is a --flag", 2)
  config = config_from_flags()
  try:
    devices = parallel.setup_devices(config.num_devices)
  except ValueError as e:
    _fail(f"flag --num_devices={config.num_devices}: {e}", 2)
  try:
    summary = train(config, devices)
  except UsageError as e:
    _fail(str(e), 2)
  except DivergedError as e:
    _fail(str(e), 1)
  logging.info("done: %s after %d steps, relative_error %.3e, %.0f steps/s, summary in %s",
               summary["status"], summary["steps"], summary["relative_error"],
               summary["steps_per_second"] or 0.0,
               os.path.join(config.workdir, "summary.json"))


def run():
  """Console entry point ``jrelu-train``."""
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
