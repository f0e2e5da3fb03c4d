"""An experiment's settings: the frozen :class:`Config`, its rules, and what it builds.

Kalan, Soltanolkotabi, Avestimehr, "Fitting ReLUs via SGD and Quantized SGD" (arXiv
1901.06587): the planted ReLU trained by data-parallel SGD with a compressed all-reduce.
:class:`Config`'s fields are ``jrelu.train``'s flags, one for one. Settings that only some
methods use default to None ("the method's default"); giving one to a method that does not
use it is a :class:`ConfigError`. :func:`resolve` fills the defaults in.

This module is the only place that knows which compressor needs which transform
(:func:`make_codec`, :func:`make_tx`, :func:`make_communication`) and which algorithm
needs which step (:func:`make_step`: data-parallel SGD, or ``jrelu.easgd``'s EASGD,
EAMSGD and DOWNPOUR, whose workers keep their own parameters and exchange with a center
every ``tau`` steps).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import optax

from jrelu import _checks
from jrelu import aggregation
from jrelu import compressors
from jrelu import easgd
from jrelu import linesearch
from jrelu import parallel
from jrelu import planted
from jrelu import powersgd
from jrelu import sampling
from jrelu import transforms

POWERSGD = "powersgd"
COMPRESSORS = tuple(sorted(compressors.REGISTRY)) + (POWERSGD,)
SCHEDULES = ("constant", "exponential", "inverse_sqrt")
STEP_SIZES = ("fixed", "armijo")
NORMS = ("l2", "max")
SGD = "sgd"
ALGORITHMS = (SGD,) + easgd.ALGORITHMS

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
# Settings that only some algorithms use, and which.
ALGORITHM_FIELDS = {"tau": easgd.ALGORITHMS, "exchange": easgd.ALGORITHMS,
                    "alpha": ("easgd", "eamsgd"), "momentum": (SGD, "eamsgd")}
# Settings that only one step-size rule uses, and which.
STEP_SIZE_FIELDS = {
    "learning_rate": ("fixed",), "lr_schedule": ("fixed",), "decay_steps": ("fixed",),
    "decay_rate": ("fixed",), "armijo_scale": ("armijo",),
    "armijo_max_learning_rate": ("armijo",), "armijo_slope_rtol": ("armijo",),
    "armijo_decrease_factor": ("armijo",), "armijo_increase_factor": ("armijo",),
    "armijo_max_trials": ("armijo",),
}
# The defaults that None stands for, where a method uses the setting. A dict maps the
# algorithm to its default; ``alpha`` (0.9 / N) needs the device count (``resolve``).
DEFAULTS = {"num_levels": 4, "norm": "max", "rank": 1, "decay_steps": 100,
            "decay_rate": 0.5, "aggregation": "two_phase", "tau": 1,
            "exchange": "synchronous", "momentum": {SGD: 0.0, "eamsgd": 0.99},
            "learning_rate": 0.5, "lr_schedule": "constant", "armijo_scale": 0.5,
            "armijo_max_learning_rate": 10.0, "armijo_slope_rtol": 0.1,
            "armijo_decrease_factor": 0.9, "armijo_increase_factor": 1.5,
            "armijo_max_trials": 100}


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
  algorithm: str = _field(
      SGD, "sgd: data-parallel SGD (every step, the devices' compressed gradients are "
      "averaged). easgd / eamsgd: elastic averaging SGD (Zhang, Choromanska, LeCun, arXiv "
      "1412.6651), without / with Nesterov momentum: each device is a worker with its own "
      "parameters, and every tau steps the compressed elastic differences move the workers "
      "and a center variable (the model reported). downpour: every tau steps each worker "
      "pushes its accumulated update to the center (the sum is applied) and pulls the "
      "center. These three draw each worker's batch from the whole data set, with "
      "replacement.", ALGORITHMS)
  tau: int | None = _field(
      None, "easgd / eamsgd / downpour: communication period, steps between exchanges "
      "with the center (default 1).")
  alpha: float | None = _field(
      None, "easgd / eamsgd: moving rate in (0, 1] of the elastic force (default 0.9 / N, "
      "the authors' beta = N alpha = 0.9).")
  exchange: str | None = _field(
      None, "easgd / eamsgd / downpour: 'synchronous' (every worker meets the center at "
      "once; default) or 'round_robin' (the asynchronous variant, emulated "
      "deterministically: the workers meet the center one after another, in device "
      "order; float32 only, so compressor='none').", easgd.EXCHANGES)
  num_steps: int = _field(3000, "Maximum SGD steps.")
  step_size: str = _field(
      "fixed", "Step size rule: fixed (--learning_rate, --lr_schedule) or armijo "
      "(backtracking search on the compressed direction with a scaled step, "
      "jrelu.linesearch; its constants are the --armijo_* flags; algorithm=sgd only).",
      STEP_SIZES)
  learning_rate: float | None = _field(
      None, "fixed: SGD step size (> 0; default 0.5); easgd / eamsgd / downpour: each "
      "worker's local step size (downpour's center adds the N workers' pushes: divide an "
      "SGD step size by N).")
  lr_schedule: str | None = _field(
      None, "fixed: step size schedule, constant (default), exponential (x decay_rate "
      "every decay_steps) or inverse_sqrt (lr / sqrt(1 + step / decay_steps)).", SCHEDULES)
  decay_steps: int | None = _field(
      None, "exponential / inverse_sqrt: schedule time scale in steps (default 100).")
  decay_rate: float | None = _field(
      None, "exponential: factor per decay_steps, in (0, 1] (default 0.5).")
  momentum: float | None = _field(
      None, "sgd: per-device momentum beta in [0, 1) applied before compression (Signum "
      "with --compressor=sign; default 0). eamsgd: each worker's Nesterov momentum delta "
      "in [0, 1) (default 0.99, the authors').")
  armijo_scale: float | None = _field(
      None, "armijo: scaling a > 0 of the descent step w -= a eta u (default 0.5; 1 is "
      "the unscaled search).")
  armijo_max_learning_rate: float | None = _field(
      None, "armijo: largest step size eta a search tries (> 0; default 10).")
  armijo_slope_rtol: float | None = _field(
      None, "armijo: Armijo constant sigma in (0, 1) (default 0.1).")
  armijo_decrease_factor: float | None = _field(
      None, "armijo: backtracking factor beta in (0, 1) (default 0.9).")
  armijo_increase_factor: float | None = _field(
      None, "armijo: each search starts at min(this x the last step size, "
      "armijo_max_learning_rate); >= 1 (default 1.5).")
  armijo_max_trials: int | None = _field(
      None, "armijo: most loss evaluations (each a scalar all-reduce) per step; a search "
      "that finds no step size takes no step (default 100).")
  # Compression.
  compressor: str = _field(
      "qsgd", "Gradient codec ('none' = float32); easgd / eamsgd: the codec of the elastic "
      "differences, downpour: of the pushed updates.", COMPRESSORS)
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


def checked(field: str, check: Callable, value, *args, **kwargs):
  """``check(field, value, ...)``, its ValueError turned into ``field=value: must be ...``."""
  try:
    return check(field, value, *args, **kwargs)
  except ValueError as e:
    reason = str(e).rsplit(", got ", 1)[0].removeprefix(f"{field} ")
    raise ConfigError(field, f"{field}={value!r}: {reason}") from None


# The largest seed: jax.random.key takes a 32-bit seed (without x64 a larger Python int
# wraps modulo 2^32, so two seeds would give the same run).
MAX_SEED = 2**32 - 1
INT32_WHY = "(JAX counts and indexes in int32)"


def _validate(config: Config) -> None:
  for name in ("dim", "num_samples", "batch_size", "num_steps", "log_every"):
    checked(name, _checks.integer, getattr(config, name), 1, _checks.INT32_MAX, INT32_WHY)
  for name in ("num_devices", "decay_steps", "bucket_size", "k", "budget", "rank", "tau",
               "armijo_max_trials"):
    checked(name, _checks.optional_integer, getattr(config, name), 1, _checks.INT32_MAX,
            INT32_WHY)
  checked("num_levels", _checks.optional_integer, config.num_levels, 1,
          compressors.QSGD.MAX_LEVELS, "(float32 must represent every level 0..s exactly)")
  checked("seed", _checks.integer, config.seed, 0, MAX_SEED,
          "(jax.random.key takes a 32-bit seed)")
  # Floats are used as float32: finite and at most float32's largest value.
  top = _checks.FLOAT32_MAX
  for name in ("learning_rate", "armijo_scale", "armijo_max_learning_rate"):
    if getattr(config, name) is not None:
      checked(name, _checks.number, getattr(config, name), low=0.0, high=top, low_open=True)
  for name in ("armijo_slope_rtol", "armijo_decrease_factor"):
    if getattr(config, name) is not None:
      checked(name, _checks.number, getattr(config, name), low=0.0, high=1.0, low_open=True,
              high_open=True)
  if config.armijo_increase_factor is not None:
    checked("armijo_increase_factor", _checks.number, config.armijo_increase_factor,
            low=1.0, high=top)
  checked("noise_std", _checks.number, config.noise_std, low=0.0, high=top)
  if config.momentum is not None:
    checked("momentum", _checks.number, config.momentum, low=0.0, high=1.0, high_open=True)
  if config.alpha is not None:
    checked("alpha", _checks.number, config.alpha, low=0.0, high=1.0, low_open=True)
  checked("target_relative_error", _checks.number, config.target_relative_error, low=0.0,
          high=top)
  for name in ("clip_factor", "dither_scale"):
    if getattr(config, name) is not None:
      checked(name, _checks.number, getattr(config, name), low=0.0, high=top, low_open=True)
  if config.fraction is not None:
    checked("fraction", _checks.number, config.fraction, low=0.0, high=1.0, low_open=True)
  if config.decay_rate is not None:
    checked("decay_rate", _checks.number, config.decay_rate, low=0.0, high=1.0,
            low_open=True)
  for f in dataclasses.fields(Config):
    if "choices" in f.metadata and getattr(config, f.name) is not None:
      checked(f.name, _checks.choice, getattr(config, f.name), f.metadata["choices"])
  if config.batch_size > config.num_samples:
    raise ConfigError("batch_size", f"batch_size={config.batch_size} is larger than "
                      f"num_samples={config.num_samples} (a batch holds no row twice)")
  if config.step_size == "armijo" and config.algorithm != SGD:
    raise ConfigError("step_size", f"step_size='armijo' applies to algorithm='sgd', not "
                      f"algorithm={config.algorithm!r} (its workers take local steps)")
  schedule = config.lr_schedule or DEFAULTS["lr_schedule"]
  for selector, table, chosen in (("compressor", COMPRESSOR_FIELDS, config.compressor),
                                  ("step_size", STEP_SIZE_FIELDS, config.step_size),
                                  ("lr_schedule", SCHEDULE_FIELDS, schedule),
                                  ("algorithm", ALGORITHM_FIELDS, config.algorithm)):
    for name, owners in table.items():
      if _is_set(config, name) and chosen not in owners:
        raise ConfigError(name, f"{name}={getattr(config, name)!r} has no effect with "
                          f"{selector}={chosen!r} (it applies to {selector}="
                          f"{' or '.join(repr(o) for o in owners)})")
  if config.k is not None and config.fraction is not None:
    raise ConfigError("k", f"k={config.k} and fraction={config.fraction} both given; "
                      "give one")
  if config.error_feedback and config.compressor == "none":
    raise ConfigError("error_feedback", "error_feedback=True has no effect with "
                      "compressor='none' (float32 leaves no residual)")
  if _round_robin(config):
    if config.compressor != "none":
      raise ConfigError("compressor", f"compressor={config.compressor!r} does not work with "
                        "exchange='round_robin' (its emulation all-gathers the workers' "
                        "float32 parameters; use compressor='none')")
    if config.aggregation is not None:
      raise ConfigError("aggregation", f"aggregation={config.aggregation!r} has no effect "
                        "with exchange='round_robin' (it all-gathers float32 parameters)")
  elif config.compressor == POWERSGD:
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


def _round_robin(config: Config) -> bool:
  return config.algorithm != SGD and config.exchange == "round_robin"


def resolve(config: Config, num_devices: int | None = None) -> Config:
  """``config`` with the method defaults filled in where a used setting is None.

  Settings the method does not use stay None; for PowerSGD and the round-robin exchange
  ``aggregation`` stays None (their collectives are their own), and with
  ``step_size="armijo"`` ``learning_rate`` and ``lr_schedule`` stay None (the search sets
  the step). EASGD's ``alpha`` (``0.9 / N``) is filled in only when ``num_devices`` is
  given.

  Example:
    >>> resolve(Config()).num_levels
    4
    >>> resolve(Config(algorithm="easgd"), num_devices=8).alpha
    0.1125
  """
  schedule = config.lr_schedule or DEFAULTS["lr_schedule"]
  values = {}
  for name, default in DEFAULTS.items():
    if getattr(config, name) is not None:
      continue
    if isinstance(default, dict):
      default = default.get(config.algorithm)
    if config.step_size not in STEP_SIZE_FIELDS.get(name, STEP_SIZES):
      continue
    if name in COMPRESSOR_FIELDS:
      used = config.compressor in COMPRESSOR_FIELDS[name]
    elif name in SCHEDULE_FIELDS:
      used = schedule in SCHEDULE_FIELDS[name]
    elif name in ALGORITHM_FIELDS:
      used = config.algorithm in ALGORITHM_FIELDS[name]
    elif name == "aggregation":
      used = config.compressor != POWERSGD and not _round_robin(config)
    else:
      used = True
    if used:
      values[name] = default
  if (config.alpha is None and config.algorithm in ALGORITHM_FIELDS["alpha"]
      and num_devices is not None):
    values["alpha"] = easgd.default_alpha(num_devices)
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
  """The step-size schedule of ``config`` (an optax schedule).

  Raises:
    ConfigError: with ``step_size="armijo"``, which has no schedule.
  """
  config = resolve(config)
  if config.step_size != "fixed":
    raise ConfigError("step_size", f"step_size={config.step_size!r} has no schedule")
  lr = config.learning_rate
  if config.lr_schedule == "exponential":
    return optax.exponential_decay(lr, config.decay_steps, config.decay_rate)
  if config.lr_schedule == "inverse_sqrt":
    return lambda step: lr / jnp.sqrt(1.0 + step / config.decay_steps)
  return optax.constant_schedule(lr)


def make_communication(config: Config, key, num_devices: int,
                       axis_name: str | None = parallel.AXIS_NAME) -> optax.GradientTransformation:
  """The transform that compresses, exchanges and averages per-device arrays.

  What crosses the wire in every algorithm: SGD's gradients, EASGD's elastic differences,
  DOWNPOUR's pushed updates. ``jrelu.compress`` of the codec, ``jrelu.error_feedback``
  with ``error_feedback``, or ``jrelu.powersgd.powersgd``.

  Args:
    config: the run's settings.
    key: the PRNG key of the compression noise (the same on every device).
    num_devices: N (ATOMO's default budget depends on it).
    axis_name: the device axis the transform averages over.

  Returns:
    An ``optax.GradientTransformation`` whose update is the (compressed) mean over
    ``axis_name``, identical on every device.
  """
  config = resolve(config)
  if config.compressor == POWERSGD:
    return powersgd.powersgd(config.rank, key=key, axis_name=axis_name)
  if config.error_feedback:
    return transforms.error_feedback(
        make_codec(config, num_devices), key=key, axis_name=axis_name,
        aggregation=config.aggregation)
  return transforms.compress(
      make_codec(config, num_devices), key=key, axis_name=axis_name,
      aggregation=config.aggregation)


def make_tx(config: Config, key, num_devices: int, axis_name: str | None = parallel.AXIS_NAME
            ) -> optax.GradientTransformation:
  """SGD's transform: momentum (optional), then compression and averaging, then the step.

  Args:
    config: the run's settings, with ``algorithm='sgd'`` (the others are a
      :func:`make_step` of their own).
    key: the PRNG key of the compression noise (the same on every device).
    num_devices: N (ATOMO's default budget depends on it).
    axis_name: the device axis the transform averages over.

  Returns:
    ``optax.chain([ema(momentum)], make_communication(...), sgd(schedule))``.

  Raises:
    ConfigError: (field ``algorithm``) for an algorithm other than SGD.
  """
  config = resolve(config)
  if config.algorithm != SGD:
    raise ConfigError("algorithm", f"algorithm={config.algorithm!r} is no optax transform "
                      "of the gradient (its workers keep their own parameters); build it "
                      "with make_step")
  compression = make_communication(config, key, num_devices, axis_name)
  momentum = [optax.ema(config.momentum, debias=False)] if config.momentum > 0 else []
  if config.step_size == "armijo":
    step = linesearch.armijo(
        axis_name=axis_name, scale=config.armijo_scale,
        max_learning_rate=config.armijo_max_learning_rate,
        slope_rtol=config.armijo_slope_rtol, decrease_factor=config.armijo_decrease_factor,
        increase_factor=config.armijo_increase_factor, max_trials=config.armijo_max_trials)
  else:
    step = optax.sgd(make_schedule(config))
  return optax.chain(*momentum, compression, step)


def make_step(config: Config, key, num_devices: int, *, loss_fn: Callable,
              metrics_fn: Callable | None = None, axis_name: str = parallel.AXIS_NAME):
  """The per-device training step of ``config``'s algorithm, and its initial state.

  SGD: ``jrelu.parallel.make_step`` with :func:`make_tx` and the window sampler of
  ``jrelu.sampling.make_batch_fn``. EASGD, EAMSGD, DOWNPOUR: ``jrelu.easgd.make_step``
  with :func:`make_communication` (none for the round-robin exchange); each worker draws
  its ``batch_size / N`` rows from the whole data set, with replacement (the paper's
  workers sample the whole training set; the window sampler would confine worker i to
  its ``n / N`` rows, a different problem for methods whose workers drift apart).

  Args:
    config: the run's settings.
    key: the PRNG key of the compression noise.
    num_devices: N.
    loss_fn: the model's per-device loss (``jrelu.planted.loss``), windowed-capable.
    metrics_fn: the model's metrics (SGD: on the parameters; the others: on the center).
    axis_name: the device axis.

  Returns:
    ``(step, init)``: ``step(state, data, key) -> (state, metrics)`` and
    ``init(params) -> TrainState`` (replicate it over the devices).
  """
  config = resolve(config, num_devices)
  if config.algorithm == SGD:
    tx = make_tx(config, key, num_devices, axis_name)
    armijo = config.step_size == "armijo"
    step = parallel.make_step(loss_fn, sampling.make_batch_fn(config.batch_size), tx,
                              metrics_fn=metrics_fn, axis_name=axis_name, extra_args=armijo,
                              opt_metrics_fn=linesearch.metrics if armijo else None)
    return step, lambda params: parallel.init_state(params, tx)
  communicate = (None if _round_robin(config)
                 else make_communication(config, key, num_devices, axis_name))
  step = easgd.make_step(
      loss_fn, sampling.make_batch_fn(config.batch_size, sampling="replacement"),
      algorithm=config.algorithm, learning_rate=make_schedule(config), tau=config.tau,
      alpha=config.alpha, momentum=config.momentum or 0.0, communicate=communicate,
      exchange=config.exchange, metrics_fn=metrics_fn, axis_name=axis_name)
  return step, lambda params: easgd.init_state(
      params, algorithm=config.algorithm, communicate=communicate, exchange=config.exchange)


def steps_per_exchange(config: Config) -> int:
  """``tau``: steps per exchange (default 1); 1 for SGD, which exchanges every step."""
  return resolve(config).tau or 1


def predicted_wire_bits(config: Config, params, num_devices: int, trials: float = 0
                        ) -> float:
  """Bits one device sends per step by the formulas (the compiled program is the truth).

  For EASGD, EAMSGD and DOWNPOUR, one exchange's bits divided by ``tau``: the same
  formula as SGD's gradient (their differences and pushes have the parameters' shapes),
  or a float32 all-gather for the round-robin exchange.

  Args:
    config: the run's settings.
    params: the parameters, an array or a pytree of them (only shapes are read).
    num_devices: N.
    trials: with ``step_size="armijo"``, the step's line-search trials (the search adds
      ``jrelu.linesearch.wire_bits(N, trials)``).
  """
  config = resolve(config)
  if _round_robin(config):
    per_exchange = easgd.round_robin_wire_bits(params, num_devices)
  elif config.compressor == POWERSGD:
    per_exchange = powersgd.wire_bits(params, config.rank, num_devices)
  else:   # the transforms encode every leaf on its own
    codec = make_codec(config, num_devices)
    per_exchange = sum(aggregation.wire_bits(config.aggregation, codec, jnp.shape(leaf),
                                             num_devices)
                       for leaf in jax.tree_util.tree_leaves(params))
  if config.step_size == "armijo":
    per_exchange += linesearch.wire_bits(num_devices, trials)
  return per_exchange / steps_per_exchange(config)


def describe(config: Config) -> str:
  """A short label of the method.

  Examples: ``"qsgd s=4 (max)"``, ``"top_k fraction=0.1 + EF"``, ``"easgd tau=4
  alpha=0.1125, qsgd s=4 (max)"``, ``"downpour tau=1 round-robin, float32"``.
  """
  config = resolve(config)
  name = config.compressor
  if name == "none":
    label = "float32 SGD" if config.algorithm == SGD else "float32"
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
  if config.algorithm == SGD and config.momentum:
    label += f" momentum={config.momentum}"
  if config.error_feedback or name == POWERSGD:
    label += " + EF"
  if config.step_size == "armijo":
    label += (" + Armijo" if config.armijo_scale == DEFAULTS["armijo_scale"]
              else f" + Armijo scale={config.armijo_scale}")
  if config.algorithm == SGD:
    return label
  head = f"{config.algorithm} tau={config.tau}"
  if config.alpha is not None:
    head += f" alpha={config.alpha:g}"
  if config.momentum:
    head += f" momentum={config.momentum}"
  if _round_robin(config):
    head += " round-robin"
  return f"{head}, {label}"
