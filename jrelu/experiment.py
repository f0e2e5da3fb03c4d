"""One experiment: a config in, a trained planted ReLU and its records out. No flags.

The library entry point behind ``python -m jrelu.train`` and the benchmarks: Kalan,
Soltanolkotabi, Avestimehr, "Fitting ReLUs via SGD and Quantized SGD" (arXiv 1901.06587),
where each of N devices takes the gradient of its shard of the global mini-batch, the
gradients are compressed, exchanged and averaged, and every device applies the same
update.

    config = experiment.Config(compressor="sign", scaled_sign=True, error_feedback=True)
    summary = experiment.run(config, "runs/ef_sign")

:class:`Config` is frozen and typed; its fields are the binary's flags, one for one.
Settings that only some methods use (``num_levels`` for QSGD, ``rank`` for PowerSGD,
``decay_rate`` for the exponential schedule, ...) default to None, meaning "the method's
default"; giving one to a method that does not use it is a :class:`ConfigError`, never
ignored. :func:`resolve` fills the defaults in, and the summary records the resolved
values.

This module is the only place that knows which compressor needs which transform:
:func:`make_tx` builds ``jrelu.compress`` or ``jrelu.error_feedback`` around a codec of
``jrelu.compressors``, or ``jrelu.powersgd.powersgd``, whose state and collectives are its
own.

:func:`run` writes into ``workdir``: ``metrics.jsonl`` (one JSON object per logged chunk),
``summary.json`` (the resolved config, wire bits read from the compiled program, status,
timings), ``checkpoints/`` (``jrelu.checkpoint``) and ``relative_error.png`` when
matplotlib is installed. It holds a lock on the workdir, resumes the run a checkpoint of
the same settings holds (bit-identically) and refuses one of other settings; every file
carries the run's id, and every write is atomic.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import fcntl
import json
import math
import os
import shutil
import signal
import threading
import time
import uuid
from typing import Callable, Iterable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jrelu import _checks
from jrelu import aggregation
from jrelu import checkpoint
from jrelu import compressors
from jrelu import parallel
from jrelu import planted
from jrelu import powersgd
from jrelu import sampling
from jrelu import transforms
from jrelu import wire

POWERSGD = "powersgd"
COMPRESSORS = tuple(sorted(compressors.REGISTRY)) + (POWERSGD,)
SCHEDULES = ("constant", "exponential", "inverse_sqrt")
NORMS = ("l2", "max")

# Settings that only some compressors use, and which.
COMPRESSOR_FIELDS = {
    "num_levels": ("qsgd",), "bucket_size": ("qsgd",), "norm": ("qsgd",),
    "scaled_sign": ("sign",), "clip_factor": ("terngrad",), "k": ("top_k", "rand_k"),
    "fraction": ("top_k", "rand_k"), "dither_scale": ("fo_sgd",), "budget": ("atomo",),
    "rank": (POWERSGD,),
}
# Settings that only some step-size schedules use, and which.
SCHEDULE_FIELDS = {"decay_steps": ("exponential", "inverse_sqrt"),
                   "decay_rate": ("exponential",)}
# The defaults that None stands for, where a method uses the setting.
DEFAULTS = {"num_levels": 4, "norm": "max", "rank": 1, "decay_steps": 100,
            "decay_rate": 0.5, "aggregation": "two_phase"}


def _field(default, help_text: str, choices: Iterable[str] | None = None):
  metadata = {"help": help_text}
  if choices is not None:
    metadata["choices"] = tuple(choices)
  return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything one training run depends on; each field is a flag of ``jrelu.train``.

  Build it with keyword arguments and check it with :meth:`validate` (``run`` does). None
  means "the method's default" for settings that only some methods use (see the module
  docstring); :func:`resolve` fills them in.

  Example:
    >>> Config(compressor="top_k", fraction=0.1, error_feedback=True).validate()

  References:
    Kalan, Soltanolkotabi, Avestimehr, arXiv 1901.06587 (the problem and the defaults
    d = 1000, n = 4d, QSGD with s = 4 levels).
  """
  # The planted problem.
  dim: int = _field(1000, "Dimension d of the planted weights.")
  num_samples: int = _field(4000, "Number n of training samples (n/d >= 3 recovers w_star).")
  noise_std: float = _field(0.0, "Label noise standard deviation (>= 0).")
  init: str = _field("zeros", "Initial weights.", planted.INITS)
  seed: int = _field(0, "Seed of data, initialization and compression noise.")
  # Data parallelism.
  batch_size: int = _field(1024, "Global mini-batch size, split evenly across devices.")
  num_devices: int | None = _field(
      None, "Data-parallel devices; default: all accelerators, or 8 simulated CPU devices "
      "when there is none.")
  parallel: str = _field("pmap", "SPMD wrapper of the per-device step.", parallel.WRAPPERS)
  # Optimization.
  num_steps: int = _field(3000, "Maximum SGD steps.")
  learning_rate: float = _field(0.5, "SGD step size (> 0).")
  lr_schedule: str = _field(
      "constant", "Step size schedule: constant, exponential (x decay_rate every "
      "decay_steps) or inverse_sqrt (lr / sqrt(1 + step / decay_steps)).", SCHEDULES)
  decay_steps: int | None = _field(
      None, "exponential / inverse_sqrt: schedule time scale in steps (default 100).")
  decay_rate: float | None = _field(
      None, "exponential: factor per decay_steps, in (0, 1] (default 0.5).")
  momentum: float = _field(
      0.0, "Per-device momentum beta in [0, 1) applied before compression (Signum with "
      "--compressor=sign).")
  # Compression.
  compressor: str = _field("qsgd", "Gradient codec ('none' = float32).", COMPRESSORS)
  aggregation: str | None = _field(
      None, "How codes are averaged across devices (see jrelu.aggregation; default "
      "two_phase). Not with powersgd, which all-reduces its factors.",
      aggregation.STRATEGIES)
  error_feedback: bool = _field(
      False, "Keep each device's compression residual and add it to the next gradient "
      "(EF-SGD). PowerSGD has it built in.")
  num_levels: int | None = _field(
      None, "qsgd: levels s (>= 1), ceil(log2(2s+1)) bits per coordinate (default 4).")
  bucket_size: int | None = _field(
      None, "qsgd: bucket size; default one bucket per (chunk of the) gradient.")
  norm: str | None = _field(
      None, "qsgd: scaling, 'max' (the QSGD paper's experiments; default) or 'l2' (its "
      "theory).", NORMS)
  scaled_sign: bool = _field(
      False, "sign: send (||g||_1 / d) * sign(g) instead of sign(g).")
  clip_factor: float | None = _field(
      None, "terngrad: clip to clip_factor * std before ternarizing (e.g. 2.5).")
  k: int | None = _field(None, "top_k / rand_k: coordinates kept per encoded array.")
  fraction: float | None = _field(
      None, "top_k / rand_k: fraction of coordinates kept per encoded array (default 0.1 "
      "when --k is not given).")
  dither_scale: float | None = _field(None, "fo_sgd: dither range factor (default 1).")
  budget: int | None = _field(
      None, "atomo: expected atoms sent per encoded array (default d/(8 N)).")
  rank: int | None = _field(None, "powersgd: rank of the approximation (default 1).")
  # Stopping and logging.
  target_relative_error: float = _field(
      1e-6, "Stop once ||w - w_star|| / ||w_star|| <= this (0: never).")
  log_every: int = _field(100, "Steps per compiled chunk; metrics are logged after each.")

  def validate(self) -> "Config":
    """Checks every field and every combination; returns ``self``.

    Raises:
      ConfigError: naming the field (and, for a setting the chosen method does not
        use, the field that chose the method) and quoting the bad value.
    """
    _validate(self)
    return self


class ConfigError(ValueError):
  """A bad :class:`Config`; ``field`` is the field at fault, the message says why.

  The message writes settings as ``name=value`` (``jrelu.train`` shows them as flags).
  """

  def __init__(self, field: str, message: str):
    super().__init__(message)
    self.field = field


class DivergedError(RuntimeError):
  """Training produced NaN or Inf; ``step`` is the first step (1-based) where it did."""

  def __init__(self, step: int, workdir: str):
    super().__init__(f"training diverged: non-finite loss or weights at step {step}; "
                     f"metrics up to then are kept in {workdir}")
    self.step = step


def _check(field: str, check: Callable, value, *args, **kwargs):
  """``check(field, value, ...)``, its ValueError turned into ``field=value: must be ...``."""
  try:
    return check(field, value, *args, **kwargs)
  except ValueError as e:
    reason = str(e).rsplit(", got ", 1)[0].removeprefix(f"{field} ")
    raise ConfigError(field, f"{field}={value!r}: {reason}") from None


# The largest seed: jax.random.key takes a 32-bit seed (without x64 a larger Python int
# wraps modulo 2^32, so two seeds would give the same run).
MAX_SEED = 2**32 - 1
_INT32_WHY = "(JAX counts and indexes in int32)"


def _validate(config: Config) -> None:
  for name in ("dim", "num_samples", "batch_size", "num_steps", "log_every"):
    _check(name, _checks.integer, getattr(config, name), 1, _checks.INT32_MAX, _INT32_WHY)
  for name in ("num_devices", "decay_steps", "bucket_size", "k", "budget", "rank"):
    _check(name, _checks.optional_integer, getattr(config, name), 1, _checks.INT32_MAX,
           _INT32_WHY)
  _check("num_levels", _checks.optional_integer, config.num_levels, 1,
         compressors.QSGD.MAX_LEVELS, "(float32 must represent every level 0..s exactly)")
  _check("seed", _checks.integer, config.seed, 0, MAX_SEED,
         "(jax.random.key takes a 32-bit seed)")
  # Floats are used as float32: finite and at most float32's largest value.
  top = _checks.FLOAT32_MAX
  _check("learning_rate", _checks.number, config.learning_rate, low=0.0, high=top,
         low_open=True)
  _check("noise_std", _checks.number, config.noise_std, low=0.0, high=top)
  _check("momentum", _checks.number, config.momentum, low=0.0, high=1.0, high_open=True)
  _check("target_relative_error", _checks.number, config.target_relative_error, low=0.0,
         high=top)
  for name in ("clip_factor", "dither_scale"):
    if getattr(config, name) is not None:
      _check(name, _checks.number, getattr(config, name), low=0.0, high=top, low_open=True)
  if config.fraction is not None:
    _check("fraction", _checks.number, config.fraction, low=0.0, high=1.0, low_open=True)
  if config.decay_rate is not None:
    _check("decay_rate", _checks.number, config.decay_rate, low=0.0, high=1.0,
           low_open=True)
  for f in dataclasses.fields(Config):
    if "choices" in f.metadata and getattr(config, f.name) is not None:
      _check(f.name, _checks.choice, getattr(config, f.name), f.metadata["choices"])
  if config.batch_size > config.num_samples:
    raise ConfigError("batch_size", f"batch_size={config.batch_size} is larger than "
                      f"num_samples={config.num_samples} (a batch holds no row twice)")
  for name, owners in COMPRESSOR_FIELDS.items():
    if _is_set(config, name) and config.compressor not in owners:
      raise ConfigError(name, f"{name}={getattr(config, name)!r} has no effect with "
                        f"compressor={config.compressor!r} (it applies to compressor="
                        f"{' or '.join(repr(o) for o in owners)})")
  for name, owners in SCHEDULE_FIELDS.items():
    if _is_set(config, name) and config.lr_schedule not in owners:
      raise ConfigError(name, f"{name}={getattr(config, name)!r} has no effect with "
                        f"lr_schedule={config.lr_schedule!r} (it applies to lr_schedule="
                        f"{' or '.join(repr(o) for o in owners)})")
  if config.k is not None and config.fraction is not None:
    raise ConfigError("k", f"k={config.k} and fraction={config.fraction} both given; "
                      "give one")
  if config.error_feedback and config.compressor == "none":
    raise ConfigError("error_feedback", "error_feedback=True has no effect with "
                      "compressor='none' (float32 leaves no residual)")
  if config.compressor == POWERSGD:
    if config.aggregation is not None:
      raise ConfigError("aggregation", f"aggregation={config.aggregation!r} has no effect "
                        "with compressor='powersgd' (it all-reduces its factors P and Q)")
    if config.error_feedback:
      raise ConfigError("error_feedback", "error_feedback=True has no effect with "
                        "compressor='powersgd' (its error feedback is built in)")
  else:
    codec = make_codec(config, 1)
    strategy = resolve(config).aggregation
    if strategy not in aggregation.supported(codec):
      raise ConfigError("aggregation", f"aggregation={strategy!r} does not work with "
                        f"compressor={config.compressor!r} (these do: "
                        f"{', '.join(aggregation.supported(codec))})")


def _is_set(config: Config, name: str) -> bool:
  """Whether ``name`` differs from its default (None, False or the declared default)."""
  default = next(f.default for f in dataclasses.fields(Config) if f.name == name)
  return getattr(config, name) != default


def resolve(config: Config) -> Config:
  """``config`` with the method defaults filled in where a used setting is None.

  Settings the method does not use stay None; for PowerSGD ``aggregation`` stays None
  (its collectives are its own).

  Example:
    >>> resolve(Config()).num_levels
    4
  """
  values = {}
  for name, default in DEFAULTS.items():
    if getattr(config, name) is not None:
      continue
    owners = COMPRESSOR_FIELDS.get(name) or ()
    schedules = SCHEDULE_FIELDS.get(name) or ()
    if (config.compressor in owners or config.lr_schedule in schedules
        or (name == "aggregation" and config.compressor != POWERSGD)):
      values[name] = default
  return dataclasses.replace(config, **values)


def make_codec(config: Config, num_devices: int) -> compressors.Compressor | None:
  """The ``jrelu.compressors`` codec of ``config`` (None for PowerSGD).

  Args:
    config: the run's settings.
    num_devices: N, for ATOMO's default budget ``d / (8 N)`` (an eighth of a chunk).

  Raises:
    ConfigError: when the codec's factory rejects a hyper-parameter.
  """
  config = resolve(config)
  name = config.compressor
  try:
    if name == POWERSGD:
      return None
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
      if budget is None:
        budget = max(1, config.dim // (8 * num_devices))
      return compressors.atomo(budget)
    return compressors.REGISTRY[name]()
  except ValueError as e:
    raise ConfigError("compressor", f"compressor={name!r}: {e}") from None


def make_schedule(config: Config) -> optax.Schedule:
  """The step-size schedule of ``config`` (an optax schedule)."""
  config = resolve(config)
  lr = config.learning_rate
  if config.lr_schedule == "exponential":
    return optax.exponential_decay(lr, config.decay_steps, config.decay_rate)
  if config.lr_schedule == "inverse_sqrt":
    return lambda step: lr / jnp.sqrt(1.0 + step / config.decay_steps)
  return optax.constant_schedule(lr)


def make_tx(config: Config, key, num_devices: int, axis_name: str | None = parallel.AXIS_NAME
            ) -> optax.GradientTransformation:
  """Momentum (optional), then compression and averaging, then SGD with the schedule.

  Args:
    config: the run's settings.
    key: the PRNG key of the compression noise (the same on every device).
    num_devices: N (ATOMO's default budget depends on it).
    axis_name: the device axis the transform averages over.

  Returns:
    ``optax.chain([ema(momentum)], compression, sgd(schedule))``.
  """
  config = resolve(config)
  if config.compressor == POWERSGD:
    compression = powersgd.powersgd(config.rank, key=key, axis_name=axis_name)
  elif config.error_feedback:
    compression = transforms.error_feedback(
        make_codec(config, num_devices), key=key, axis_name=axis_name,
        aggregation=config.aggregation)
  else:
    compression = transforms.compress(
        make_codec(config, num_devices), key=key, axis_name=axis_name,
        aggregation=config.aggregation)
  momentum = [optax.ema(config.momentum, debias=False)] if config.momentum > 0 else []
  return optax.chain(*momentum, compression, optax.sgd(make_schedule(config)))


def predicted_wire_bits(config: Config, params, num_devices: int) -> float:
  """Bits one device sends per step by the formulas (the compiled program is the truth).

  Args:
    config: the run's settings.
    params: the parameters (only shapes are read).
    num_devices: N.
  """
  config = resolve(config)
  if config.compressor == POWERSGD:
    return powersgd.wire_bits(params, config.rank, num_devices)
  return aggregation.wire_bits(config.aggregation, make_codec(config, num_devices),
                               jnp.shape(params), num_devices)


def describe(config: Config) -> str:
  """A short label of the method, e.g. ``"qsgd s=4 (max)"`` or ``"top_k fraction=0.1 + EF"``."""
  config = resolve(config)
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
              POWERSGD: f"rank={config.rank}"}.get(name, "")
    label = f"{name} {extras}".strip()
  if config.momentum:
    label += f" momentum={config.momentum}"
  if config.error_feedback or name == POWERSGD:
    label += " + EF"
  return label


def json_safe(obj):
  """``obj`` with NaN and infinities replaced by None, so that it is strict JSON.

  NumPy scalars become Python numbers; tuples become lists.

  Example:
    >>> json_safe({"a": float("nan"), "b": np.float32(2.0)})
    {'a': None, 'b': 2.0}
  """
  if isinstance(obj, np.generic):
    obj = obj.item()
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  if isinstance(obj, dict):
    return {k: json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_safe(v) for v in obj]
  return obj


def write_json(path: str, obj) -> None:
  """Writes ``obj`` as strict, indented JSON to ``path`` atomically (temp file + rename).

  Raises:
    OSError: when the file cannot be written (the previous file, if any, is kept).
  """
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(json_safe(obj), f, indent=2, sort_keys=True, allow_nan=False)
    f.write("\n")
  os.replace(tmp, path)


def estimate_memory_bytes(config: Config, num_devices: int) -> dict:
  """The memory a run of ``config`` on ``num_devices`` devices needs, estimated in bytes.

  Counts the float32 arrays that live through the run, from their shapes (no
  allocation): the data set (``x``: ``num_samples x dim``, ``y`` and ``w_star``), which is
  sampled once on the host and copied to every device; per device, its batch
  (``batch_size / N x dim``, twice: the rows and the gradient's product with them), a
  sampler permutation of ``num_samples`` int32, and 8 parameter-sized vectors (params,
  gradient, momentum, error-feedback residual, code, decoded mean, update, spare). XLA's
  temporaries and the compiled programs are not counted: the estimate is a lower bound
  meant to refuse a config that cannot fit, before it allocates.

  Args:
    config: the run's settings.
    num_devices: N.

  Returns:
    ``{"host_bytes": ..., "per_device_bytes": ...}``; on CPU the devices share host
    memory, so the total there is ``host_bytes + N * per_device_bytes``.

  Example:
    >>> estimate_memory_bytes(Config(), 8)["per_device_bytes"]   # 4000 x 1000 data set
    16120000
  """
  n_dev = _checks.integer("num_devices", num_devices)
  d, n = config.dim, config.num_samples
  dataset = 4 * (n * (d + 1) + d)
  per_device = dataset + 2 * 4 * (config.batch_size // n_dev) * d + 4 * n + 8 * 4 * d
  return {"host_bytes": dataset, "per_device_bytes": per_device}


def available_memory_bytes(devices=None) -> dict:
  """Memory that a run can still take: host RAM, and each accelerator's capacity.

  Args:
    devices: the run's devices, or None (then only host memory is read).

  Returns:
    ``{"host_bytes": MemAvailable of /proc/meminfo (or the free physical pages of
    os.sysconf), "device_bytes": the first device's ``bytes_limit`` from
    ``memory_stats()``, or None on CPU or when the backend does not say}``; either is
    None when it cannot be read.

  Example:
    >>> available_memory_bytes()["host_bytes"] > 0
    True
  """
  host = None
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          host = int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  if host is None:
    try:
      host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
      host = None
  device = None
  if devices and devices[0].platform != "cpu":
    try:
      device = (devices[0].memory_stats() or {}).get("bytes_limit")
    except Exception:  # pylint: disable=broad-except  (a backend without memory stats)
      device = None
  return {"host_bytes": host, "device_bytes": device}


def check_memory(config: Config, devices) -> None:
  """Refuses a config whose estimated memory exceeds what is available.

  Args:
    config: the run's settings.
    devices: the devices it runs on (CPU devices share host memory).

  Raises:
    ConfigError: (field ``dim``) in one line giving the estimate
      (:func:`estimate_memory_bytes`) and the available memory
      (:func:`available_memory_bytes`).

  Example:
    >>> check_memory(Config(dim=100_000_000), jax.devices())
    ConfigError: dim=100000000, num_samples=4000, batch_size=1024 on 8 devices need
    about 1.42e+04 GiB host (estimated), but 16.7 GiB is available; lower dim or ...
  """
  need = estimate_memory_bytes(config, len(devices))
  have = available_memory_bytes(devices)
  on_cpu = devices[0].platform == "cpu"
  checks = [("host", need["host_bytes"] + (len(devices) * need["per_device_bytes"]
                                           if on_cpu else 0), have["host_bytes"])]
  if not on_cpu:
    checks.append(("per device", need["per_device_bytes"], have["device_bytes"]))
  gib = 2.0**30
  for where, bytes_needed, bytes_available in checks:
    if bytes_available is not None and bytes_needed > bytes_available:
      raise ConfigError("dim", f"dim={config.dim}, num_samples={config.num_samples}, "
                        f"batch_size={config.batch_size} on {len(devices)} devices need "
                        f"about {bytes_needed / gib:.3g} GiB {where} (estimated), but "
                        f"{bytes_available / gib:.3g} GiB is available; lower dim or "
                        "num_samples")


def check_workdir(workdir: str) -> None:
  """Creates ``workdir`` and checks that a file can be written there.

  Raises:
    ConfigError: (field ``workdir``) saying why not.
  """
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError("workdir", f"workdir={workdir!r}: cannot write there "
                      f"({e.strerror or e})") from None


class WriteError(RuntimeError):
  """A file of the run could not be written (full disk, quota, ...); ``path`` names it.

  The message is one line, e.g. ``cannot write runs/x/metrics.jsonl: File too large``.
  """

  def __init__(self, path: str, error: OSError):
    super().__init__(f"cannot write {path}: {error.strerror or error}")
    self.path = path


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


# The files a run owns in its workdir; a fresh run deletes them, a resumed one rewrites them.
RUN_FILES = ("metrics.jsonl", "summary.json", "relative_error.png")
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = ".lock"
TIMING_FIELDS = ("steps_per_second", "compile_seconds", "run_seconds", "checkpoint_seconds")


def _writing(path: str, write: Callable[[], None]) -> None:
  """Runs ``write()``; an ``OSError`` becomes a :class:`WriteError` naming ``path``."""
  try:
    write()
  except OSError as e:
    raise WriteError(path, e) from None


def append_line(path: str, line: str) -> None:
  """Appends ``line`` and a newline to ``path``: the whole line, or nothing.

  A write that fails part way (full disk, file size limit) is cut back to the previous
  size.

  Raises:
    WriteError: naming ``path`` when the line cannot be written.

  Example:
    >>> append_line("runs/x/metrics.jsonl", json.dumps({"step": 100}))
  """
  data = (line + "\n").encode()

  def write():
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
      size = os.fstat(fd).st_size
      try:
        view = memoryview(data)
        while view:  # a short write is retried: the retry raises the real error
          written = os.write(fd, view)
          if not written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
          view = view[written:]
      except OSError:
        os.ftruncate(fd, size)
        raise
    finally:
      os.close(fd)

  _writing(path, write)


def _lock(workdir: str):
  """Takes the workdir's exclusive lock (``fcntl.flock``); returns the open lock file.

  Raises:
    ConfigError: (field ``workdir``) when another run holds it.
  """
  path = os.path.join(workdir, LOCK_FILE)
  f = open(path, "a+")
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    f.seek(0)
    holder = f.read().strip() or "unknown"
    f.close()
    raise ConfigError("workdir", f"workdir={workdir!r} is in use by another run (pid "
                      f"{holder}); wait for it to end or use another workdir") from None
  f.truncate(0)
  f.write(str(os.getpid()))
  f.flush()
  return f


def _identity(config: Config, num_devices: int) -> dict:
  """What a checkpoint must match to be resumed: every setting, N resolved."""
  return json_safe({**dataclasses.asdict(config), "num_devices": num_devices})


def _differences(saved: dict, now: dict) -> str:
  return ", ".join(f"{k}={saved.get(k)!r} (now {now.get(k)!r})"
                   for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k))


def _delete_run_files(workdir: str, why: str) -> None:
  """Deletes the files of an earlier run in ``workdir``, logging each one.

  ``checkpoints/`` goes first, renamed away in one step, so that a process killed while
  deleting never leaves a half-deleted checkpoint that looks complete.
  """
  trash = os.path.join(workdir, "." + CHECKPOINT_DIR + ".deleted")
  for name in (CHECKPOINT_DIR,) + RUN_FILES:
    path = os.path.join(workdir, name)
    if os.path.lexists(path):
      logging.warning("%s: deleting %s", why, path)
      if name == CHECKPOINT_DIR and os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(trash, onerror=_unless_gone)
        os.replace(path, trash)
      else:
        os.remove(path)
  shutil.rmtree(trash, onerror=_unless_gone)


def _unless_gone(function, path, exc_info):
  """``shutil.rmtree``'s onerror: a file already gone is fine (orbax may clean up too)."""
  del function, path
  if not issubclass(exc_info[0], FileNotFoundError):
    raise exc_info[1]


def _reading(workdir: str, step: int, read: Callable):
  """Runs ``read()``; any failure to read a checkpoint becomes a ConfigError saying so."""
  try:
    return read()
  except Exception as e:  # pylint: disable=broad-except  # orbax raises many kinds
    raise ConfigError("workdir", f"workdir={workdir!r}: its checkpoint of step {step} "
                      f"cannot be read ({type(e).__name__}: "
                      f"{(str(e).splitlines() or [''])[0]}); run with fresh=True to "
                      "delete it") from None


def _prepare_workdir(workdir: str, identity: dict, fresh: bool) -> dict | None:
  """Resolves what an earlier run left in ``workdir``; returns the metadata to resume.

  With ``fresh``, the earlier run's files are deleted (each one logged). Otherwise the
  latest checkpoint is resumed if its settings equal ``identity``; files of an earlier run
  without a checkpoint are deleted when their settings match (nothing could be resumed).

  Raises:
    ConfigError: (field ``workdir``) when the earlier run's settings differ, naming them.
  """
  ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
  if fresh:
    _delete_run_files(workdir, "fresh=True")
    return None
  step = checkpoint.latest_step(ckpt_dir)
  if step is not None:
    saved = _reading(workdir, step, lambda: checkpoint.read_metadata(ckpt_dir, step))
    if saved["config"] == identity:
      return saved
    saved_settings = saved["config"]
  else:
    try:
      with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
      saved_settings = {k: summary.get(k) for k in identity}
    except (OSError, ValueError, AttributeError):
      saved_settings = None
    if saved_settings is None or saved_settings == identity:
      _delete_run_files(workdir, "an earlier run left no checkpoint")
      return None
  raise ConfigError("workdir", f"workdir={workdir!r} holds a run with other settings: "
                    f"{_differences(saved_settings, identity)}; run with fresh=True to "
                    "delete it, or use another workdir")


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

  One run per workdir: ``run`` holds an exclusive lock on ``workdir/.lock`` while it
  runs. At the first chunk boundary at or after every ``checkpoint_every`` steps, and
  at the end, the whole state (params, the optax state with its PRNG keys, residuals and
  factors, the step) goes to ``workdir/checkpoints/<step>`` with the settings, the run id
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
    WriteError: when a file of the run cannot be written, naming it.

  Example:
    >>> summary = run(Config(num_steps=200), "runs/qsgd")
    >>> summary["relative_error"], summary["wire_bits_per_step_per_device"]
  """
  config = resolve(config.validate())
  checkpoint_every = _check("checkpoint_every", _checks.integer, checkpoint_every, 1,
                            _checks.INT32_MAX, _INT32_WHY)
  keep_checkpoints = _check("keep_checkpoints", _checks.integer, keep_checkpoints, 1,
                            _checks.INT32_MAX, _INT32_WHY)
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
  if config.batch_size % n_dev:
    raise ConfigError("batch_size", f"batch_size={config.batch_size} is not divisible by "
                      f"the {n_dev} devices")
  if config.aggregation == "integer_psum":
    try:
      aggregation.integer_psum_width(make_codec(config, n_dev), n_dev)
    except ValueError as e:
      raise ConfigError("num_levels", f"num_levels={config.num_levels}, aggregation="
                        f"'integer_psum': {e}") from None
  check_memory(config, devices)
  check_workdir(workdir)
  lock = _lock(workdir)
  try:
    with _StopSignals(handle_signals) as stop:
      return _run_locked(config, workdir, devices, callbacks, checkpoint_every,
                         keep_checkpoints, fresh, stop)
  finally:
    lock.close()


def _run_locked(config, workdir, devices, callbacks, checkpoint_every, keep_checkpoints,
                fresh, stop):
  """:func:`run` once the workdir is locked."""
  n_dev = len(devices)
  identity = _identity(config, n_dev)
  resumed = _prepare_workdir(workdir, identity, fresh)
  ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  summary_path = os.path.join(workdir, "summary.json")

  key = jax.random.key(config.seed)
  w_key, data_key, init_key, tx_key, batch_key = jax.random.split(key, 5)
  w_star = planted.sample_w_star(w_key, config.dim)
  dataset = planted.sample_dataset(data_key, w_star, config.num_samples, config.noise_std)
  params = planted.init_params(init_key, (dataset, w_star), config.init)
  tx = make_tx(config, tx_key, n_dev)
  step = parallel.make_step(planted.loss, sampling.make_batch_fn(config.batch_size), tx,
                            metrics_fn=planted.metrics_fn)
  state, data, batch_key = parallel.replicate(
      (parallel.init_state(params, tx), (dataset, w_star), batch_key), devices)

  programs_depend_on = {k: v for k, v in identity.items()
                        if k not in ("num_steps", "target_relative_error", "log_every")}
  cache_key = (json.dumps(programs_depend_on, sort_keys=True),
               tuple(d.id for d in devices))
  bits = _cached(cache_key + ("wire",), lambda: wire.measure(
      parallel.wrap(config.parallel, step, devices), state, data, batch_key))
  float32_bits = aggregation.float32_allreduce_bits((config.dim,), n_dev)
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
      "wire_bits_per_step_per_device": bits.sent_bits,
      "predicted_wire_bits_per_step_per_device": predicted_wire_bits(config, params, n_dev),
      "wire_operand_bits_per_step_per_device": bits.operand_bits,
      "compressor_wire_bits": (codec.wire_bits((config.dim,)) if codec is not None
                               else powersgd.wire_bits(params, config.rank, 2)),
      "float32_wire_bits": float32_bits,
      "compression_ratio": float32_bits / bits.sent_bits if bits.sent_bits else None,
      "steps_per_second": None,
      "compile_seconds": 0.0,
      "run_seconds": 0.0,
      "checkpoint_seconds": 0.0,
      "num_devices": n_dev,
      "jax_version": jax.__version__,
      "backend": jax.default_backend(),
  }
  history = []
  if resumed is not None:
    state, _ = _reading(workdir, resumed["progress"]["checkpoint_step"],
                        lambda: checkpoint.restore(ckpt_dir, like=state))
    history = resumed["history"]
    summary.update(resumed["progress"])
    if summary["status"] == "interrupted":
      summary["status"] = "running"
    summary.pop("interrupted_at_step", None)
    summary.pop("signal", None)
    lines = "".join(json.dumps(r) + "\n" for r in history)
    _writing(metrics_path, lambda: _write_text(metrics_path, lines))
    logging.info("resuming run %s from its checkpoint at step %d", summary["run_id"],
                 summary["steps"])
  else:
    _writing(metrics_path, lambda: _write_text(metrics_path, ""))
  _writing(summary_path, lambda: write_json(summary_path, summary))
  if bits.sent_bits:
    logging.info("wire: %.0f bits per step per device (float32 all-reduce: %.0f, %.1fx fewer)",
                 bits.sent_bits, float32_bits, summary["compression_ratio"])
  else:
    logging.info("wire: no traffic between devices (%d device)", n_dev)

  def save_checkpoint():
    if summary["checkpoint_step"] == summary["steps"]:
      return
    summary["checkpoint_step"] = summary["steps"]
    progress = {k: summary[k] for k in (
        "run_id", "status", "relative_error", "steps", "steps_to_target",
        "checkpoint_step", "compile_seconds", "run_seconds", "checkpoint_seconds")}
    metadata = {"config": identity, "progress": progress, "history": history}
    start = time.perf_counter()
    _writing(ckpt_dir, lambda: checkpoint.save(ckpt_dir, summary["steps"], state, metadata,
                                              keep=keep_checkpoints))
    summary["checkpoint_seconds"] += time.perf_counter() - start

  finished = False
  try:
    while (summary["steps"] < config.num_steps and summary["status"] == "running"
           and stop.signum is None):
      length = min(config.log_every, config.num_steps - summary["steps"])
      start = time.perf_counter()
      program = _cached(cache_key + (length,), lambda: parallel.wrap(
          config.parallel, parallel.scan_steps(step, length), devices).lower(
              state, data, batch_key).compile())
      summary["compile_seconds"] += time.perf_counter() - start
      start = time.perf_counter()
      new_state, metrics = program(state, data, batch_key)
      errors = np.asarray(metrics["relative_error"][0])
      losses = np.asarray(metrics["loss"]).mean(axis=0)
      elapsed = time.perf_counter() - start
      summary["run_seconds"] += elapsed
      first = summary["steps"]
      bad = np.nonzero(~(np.isfinite(errors) & np.isfinite(losses)))[0]
      done = int(bad[0]) if bad.size else length  # the chunk's finite steps
      summary["steps"] = first + done
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
            "cumulative_wire_bits_per_device": summary["steps"] * bits.sent_bits,
            "run_id": summary["run_id"],
        }
        history.append(record)
        append_line(metrics_path, json.dumps(record))
        logging.info("step %d/%d  relative_error %.3e  loss %.3e  %.0f steps/s",
                     record["step"], config.num_steps, record["relative_error"],
                     record["loss"], record["steps_per_second"])
        for callback in callbacks:
          callback(record)
      if (summary["status"] != "diverged" and summary["steps"] // checkpoint_every
          > (summary["checkpoint_step"] or 0) // checkpoint_every):
        save_checkpoint()
    if stop.signum is not None and summary["status"] == "running":
      summary["status"] = "interrupted"
      summary["interrupted_at_step"] = summary["steps"]
      summary["signal"] = signal.Signals(stop.signum).name
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
      _writing(summary_path, lambda: write_json(summary_path, summary))
      _plot(history, summary, workdir)
    except WriteError as e:
      if finished:
        raise
      # The error that stopped the run propagates; this one (a full disk, likely the
      # same cause) is only logged.
      logging.error("%s", e)
  if summary["status"] == "diverged":
    raise DivergedError(summary["diverged_at_step"], workdir)
  if summary["status"] == "interrupted":
    raise Interrupted(stop.signum, summary["steps"], config.num_steps)
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


def _write_text(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` atomically (temp file + rename)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def _plot(history, summary, workdir):
  """Relative error versus step and versus bits sent, if matplotlib is installed."""
  if not history:
    return
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
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
  fig.suptitle(f"{summary['method']}, {summary['aggregation'] or 'all-reduce'}, "
               f"{summary['num_devices']} devices, d={summary['dim']}", fontsize=10)
  fig.tight_layout()
  path = os.path.join(workdir, "relative_error.png")

  def write():
    fig.savefig(path + ".tmp", dpi=100, format="png")
    os.replace(path + ".tmp", path)

  try:
    _writing(path, write)
  finally:
    plt.close(fig)
