r"""Fits a planted ReLU by data-parallel SGD with compressed gradient averaging.

The main job of jrelu: Kalan, Soltanolkotabi, Avestimehr, "Fitting ReLUs via SGD and
Quantized SGD" (arXiv 1901.06587). Each of ``--num_devices`` devices (simulated CPU
devices when there is no accelerator) computes the gradient on its shard of the global
mini-batch, compresses it (``--compressor``), the codes are exchanged and averaged
(``--aggregation``), and every device applies the same SGD update. The run stops early
once ``--target_relative_error`` is reached.

    python -m jrelu.train --workdir=runs/qsgd4
    python -m jrelu.train --compressor=none --workdir=runs/sgd
    python -m jrelu.train --compressor=top_k --fraction=0.1 --error_feedback
    python -m jrelu.train --compressor=sign --aggregation=majority_vote \
        --learning_rate=1e-3 --lr_schedule=exponential --decay_steps=100

Each compressor has its own flags (``--num_levels`` for qsgd, ``--k``/``--fraction`` for
top_k and rand_k, ``--budget`` for atomo, ...); giving one that the chosen compressor does
not use is an error. ``--error_feedback`` wraps any codec in EF-SGD, ``--momentum`` puts a
per-device momentum before the compression (Signum with ``--compressor=sign``), and
``--compressor=powersgd`` runs the stateful PowerSGD transform (warm start and error
feedback; vectors such as the planted weights pass through uncompressed).

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
from jrelu import powersgd
from jrelu import transforms
from jrelu import wire
from jrelu.compressors._qsgd import NORMS

SCHEDULES = ("constant", "exponential", "inverse_sqrt")

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
_SCALED_SIGN = flags.DEFINE_bool(
    "scaled_sign", False, "sign: send (||g||_1 / d) * sign(g) instead of sign(g).")
_CLIP_FACTOR = flags.DEFINE_float(
    "clip_factor", None, "terngrad: clip to clip_factor * std before ternarizing (e.g. 2.5).")
_K = flags.DEFINE_integer("k", None, "top_k / rand_k: coordinates kept per encoded array.")
_FRACTION = flags.DEFINE_float(
    "fraction", None, "top_k / rand_k: fraction of coordinates kept per encoded array "
    "(default 0.1 when --k is not given).")
_DITHER_SCALE = flags.DEFINE_float("dither_scale", None, "fo_sgd: dither range factor.")
_BUDGET = flags.DEFINE_integer(
    "budget", None, "atomo: expected atoms sent per encoded array (default d/(8 N)).")
_RANK = flags.DEFINE_integer("rank", 1, "powersgd: rank of the approximation.", lower_bound=1)
_ERROR_FEEDBACK = flags.DEFINE_bool(
    "error_feedback", False, "Keep each device's compression residual and add it to the "
    "next gradient (EF-SGD).")
_MOMENTUM = flags.DEFINE_float(
    "momentum", 0.0, "Per-device momentum beta in [0, 1) applied before compression "
    "(Signum with --compressor=sign).")
_LR_SCHEDULE = flags.DEFINE_enum(
    "lr_schedule", "constant", list(SCHEDULES),
    "Step size schedule: constant, exponential (x decay_rate every decay_steps) or "
    "inverse_sqrt (lr / sqrt(1 + step / decay_steps)).")
_DECAY_STEPS = flags.DEFINE_integer("decay_steps", 100, "Schedule time scale in steps.",
                                    lower_bound=1)
_DECAY_RATE = flags.DEFINE_float("decay_rate", 0.5, "exponential: factor per decay_steps.")
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
flags.register_validator("momentum", lambda v: 0 <= v < 1, "must be in [0, 1)")
flags.register_validator("decay_rate", lambda v: 0 < v <= 1, "must be in (0, 1]")

# Compressor-specific flags and the compressors that use them.
FLAG_OWNERS = {
    "num_levels": ("qsgd",), "bucket_size": ("qsgd",), "norm": ("qsgd",),
    "scaled_sign": ("sign",), "clip_factor": ("terngrad",), "k": ("top_k", "rand_k"),
    "fraction": ("top_k", "rand_k"), "dither_scale": ("fo_sgd",), "budget": ("atomo",),
    "rank": ("powersgd",),
}


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
  scaled_sign: bool = False
  clip_factor: float | None = None
  k: int | None = None
  fraction: float | None = None
  dither_scale: float | None = None
  budget: int | None = None
  rank: int = 1
  error_feedback: bool = False
  momentum: float = 0.0
  lr_schedule: str = "constant"
  decay_steps: int = 100
  decay_rate: float = 0.5


def make_compressor(config: Config, num_devices: int = 1) -> compressors.Compressor:
  """The codec named by ``config.compressor`` with its hyper-parameters.

  Raises:
    UsageError: when a hyper-parameter is rejected by the codec's factory.
  """
  name = config.compressor
  try:
    if name == "qsgd":
      return compressors.qsgd(config.num_levels, config.bucket_size, config.norm)
    if name == "sign":
      return compressors.sign(scaled=config.scaled_sign)
    if name == "terngrad":
      return compressors.terngrad(config.clip_factor)
    if name in ("top_k", "rand_k"):
      fraction = 0.1 if config.k is None and config.fraction is None else config.fraction
      return compressors.REGISTRY[name](config.k, fraction=fraction)
    if name == "fo_sgd":
      return (compressors.fo_sgd() if config.dither_scale is None
              else compressors.fo_sgd(config.dither_scale))
    if name == "atomo":
      budget = config.budget
      if budget is None:  # an eighth of each two_phase chunk
        budget = max(1, config.dim // (8 * num_devices))
      return compressors.atomo(budget)
    if name == "powersgd":
      return compressors.powersgd(config.rank)
    return compressors.REGISTRY[name]()
  except ValueError as e:
    raise UsageError(f"flag --compressor={name}: {e}") from None


def make_schedule(config: Config) -> optax.Schedule:
  """The step size schedule of ``config`` (an optax schedule)."""
  lr = config.learning_rate
  if config.lr_schedule == "exponential":
    return optax.exponential_decay(lr, config.decay_steps, config.decay_rate)
  if config.lr_schedule == "inverse_sqrt":
    return lambda step: lr / jnp.sqrt(1.0 + step / config.decay_steps)
  return optax.constant_schedule(lr)


def make_tx(config: Config, compressor: compressors.Compressor, key
            ) -> optax.GradientTransformation:
  """Momentum (optional), then compression and averaging, then SGD with the schedule."""
  if config.compressor == "powersgd":
    compression = powersgd.powersgd(config.rank, key=key, axis_name=parallel.AXIS_NAME)
  elif config.error_feedback:
    compression = transforms.error_feedback(
        compressor, key=key, axis_name=parallel.AXIS_NAME, aggregation=config.aggregation)
  else:
    compression = transforms.compress(
        compressor, key=key, axis_name=parallel.AXIS_NAME, aggregation=config.aggregation)
  momentum = [optax.ema(config.momentum, debias=False)] if config.momentum > 0 else []
  return optax.chain(*momentum, compression, optax.sgd(make_schedule(config)))


def describe(config: Config) -> str:
  """A short label of the method, e.g. ``"qsgd s=4 (max)"`` or ``"top_k fraction=0.1 + EF"``."""
  name = config.compressor
  if name == "none":
    label = "float32 SGD"
  elif name == "qsgd":
    label = f"qsgd s={config.num_levels} ({config.norm})"
  else:
    extras = {"sign": "scaled" if config.scaled_sign else "",
              "terngrad": f"clip={config.clip_factor}" if config.clip_factor else "",
              "top_k": f"k={config.k}" if config.k else f"fraction={config.fraction or 0.1}",
              "rand_k": f"k={config.k}" if config.k else f"fraction={config.fraction or 0.1}",
              "atomo": f"budget={config.budget}" if config.budget else "",
              "powersgd": f"rank={config.rank}"}.get(name, "")
    label = f"{name} {extras}".strip()
  if config.momentum:
    label += f" momentum={config.momentum}"
  if config.error_feedback:
    label += " + EF"
  return label


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
  if config.batch_size > config.num_samples:
    raise UsageError(f"flag --batch_size={config.batch_size}: larger than "
                     f"--num_samples={config.num_samples} (a batch holds no row twice)")
  if config.batch_size % n_dev:
    raise UsageError(f"flag --batch_size={config.batch_size}: not divisible by "
                     f"--num_devices={n_dev}")
  check_workdir(config.workdir)
  key = jax.random.key(config.seed)
  w_key, data_key, init_key, tx_key, batch_key = jax.random.split(key, 5)
  w_star = planted.sample_w_star(w_key, config.dim)
  dataset = planted.sample_dataset(data_key, w_star, config.num_samples, config.noise_std)
  params = planted.init_params(config.init, init_key, dataset)
  compressor = make_compressor(config, n_dev)
  if config.compressor != "powersgd":
    try:
      aggregation.check_strategy(config.aggregation, compressor)
    except ValueError as e:
      raise UsageError(f"flag --aggregation={config.aggregation}: {e}") from None
  tx = make_tx(config, compressor, tx_key)
  step = parallel.make_step(planted.loss, planted.make_batch_fn(config.batch_size), tx,
                            metrics_fn=planted.metrics_fn)
  state, data, batch_key = parallel.replicate(
      (parallel.init_state(params, tx), (dataset, w_star), batch_key), devices)

  bits = wire.measure(parallel.wrap(config.parallel, step, devices), state, data, batch_key)
  if config.compressor == "powersgd":
    predicted_bits = powersgd.wire_bits(params, config.rank, n_dev)
  else:
    predicted_bits = aggregation.wire_bits(config.aggregation, compressor, (config.dim,),
                                           n_dev)
  float32_bits = aggregation.float32_allreduce_bits((config.dim,), n_dev)
  initial_error = float(planted.relative_error(params, w_star))
  summary = {
      **dataclasses.asdict(config),
      "status": "running",
      "method": describe(config),
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
  fig.suptitle(f"{summary['method']}, {summary['aggregation']}, {summary['num_devices']} devices, "
               f"d={summary['dim']}", fontsize=10)
  fig.tight_layout()
  fig.savefig(os.path.join(summary["workdir"], "relative_error.png"), dpi=100)
  plt.close(fig)


def config_from_flags() -> Config:
  """Builds a :class:`Config` from the parsed flags.

  Raises:
    UsageError: when a compressor-specific flag is given for a compressor that does not
      use it (see ``FLAG_OWNERS``), or both ``--k`` and ``--fraction`` are given.
  """
  for flag, owners in FLAG_OWNERS.items():
    if flags.FLAGS[flag].present and _COMPRESSOR.value not in owners:
      raise UsageError(f"flag --{flag} applies to --compressor={' or '.join(owners)}, "
                       f"not --compressor={_COMPRESSOR.value}")
  return Config(
      scaled_sign=_SCALED_SIGN.value, clip_factor=_CLIP_FACTOR.value, k=_K.value,
      fraction=_FRACTION.value, dither_scale=_DITHER_SCALE.value, budget=_BUDGET.value,
      rank=_RANK.value, error_feedback=_ERROR_FEEDBACK.value, momentum=_MOMENTUM.value,
      lr_schedule=_LR_SCHEDULE.value, decay_steps=_DECAY_STEPS.value,
      decay_rate=_DECAY_RATE.value,
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
  try:
    config = config_from_flags()
  except UsageError as e:
    _fail(str(e), 2)
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
