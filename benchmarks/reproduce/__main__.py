"""The binary ``python -m benchmarks.reproduce``: flags -> Settings -> the sections.

    python -m benchmarks.reproduce --quick --outdir=runs/reproduce
    python -m benchmarks.reproduce --sections=phase_transition --phase_dims=20,50

See ``benchmarks/reproduce/__init__.py`` for what each section measures. Bad flags print
one line ``benchmarks.reproduce: error: ...`` on stderr and exit with status 2.
"""

from __future__ import annotations

import math

from absl import flags

from benchmarks import common
from benchmarks.reproduce import benchmark
from benchmarks.reproduce import settings
from jrelu import experiment

SECTIONS = settings.SECTIONS
METHODS = settings.METHODS
_DEFAULT = experiment.Config()


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
# The training problem of sections 2-4 (fields of jrelu.experiment.Config).
_DIM = flags.DEFINE_integer("dim", _DEFAULT.dim, "Dimension d of sections 2-4.",
                            lower_bound=1)
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", _DEFAULT.num_samples,
                                    "Training samples n of sections 2-4.", lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", _DEFAULT.batch_size,
                                   "Global mini-batch size of sections 2-4.", lower_bound=1)
_NUM_STEPS = flags.DEFINE_integer(
    "num_steps", None, "Cap on the steps of each training run (default "
    f"{settings.FULL['num_steps']}; quick {settings.QUICK['num_steps']}).", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", _DEFAULT.seed, "Seed of data, initialization and "
                             "compression noise.", lower_bound=0)
_NUM_DEVICES = flags.DEFINE_integer(
    "num_devices", None, "Data-parallel devices of sections 2-4; default: all "
    "accelerators, or 8 simulated CPU devices when there is none.", lower_bound=1)
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
    f"{','.join(settings.QUICK_METHODS)}); include '{settings.BASELINE}' for the ratios to "
    "float32 SGD.")
_LEARNING_RATES = flags.DEFINE_list(
    "learning_rates", None, "Step size grid of sections 2-4 (default "
    "1.2,1,0.85,0.7,0.5,0.3,0.2; quick 0.7,0.5).")
_TIMING_STEPS = flags.DEFINE_integer(
    "timing_steps", None, "Steps per timing run, in 10 chunks (default 500; quick 250).",
    lower_bound=10)
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


def settings_from_flags() -> settings.Settings:
  """The :class:`~benchmarks.reproduce.settings.Settings` of the parsed flags.

  Raises:
    SystemExit: with status 2 after one error line, when the training problem is bad.
  """
  base = experiment.Config(dim=_DIM.value, num_samples=_NUM_SAMPLES.value,
                           batch_size=_BATCH_SIZE.value, num_devices=_NUM_DEVICES.value,
                           seed=_SEED.value, num_steps=_NUM_STEPS.value)
  result = settings.Settings.make(
      _QUICK.value, outdir=_OUTDIR.value, base=base,
      sections=tuple(s for s in SECTIONS if s in _SECTIONS.value),
      phase_dims=_PHASE_DIMS.value and tuple(int(v) for v in _PHASE_DIMS.value),
      phase_ratios=tuple(sorted({float(v) for v in _PHASE_RATIOS.value})),
      phase_trials=_PHASE_TRIALS.value, phase_iters=_PHASE_ITERS.value,
      phase_dtype=_PHASE_DTYPE.value, methods=_METHODS.value and tuple(_METHODS.value),
      learning_rates=(_LEARNING_RATES.value
                      and tuple(float(v) for v in _LEARNING_RATES.value)),
      timing_steps=_TIMING_STEPS.value, alpha_seconds=_ALPHA.value,
      bandwidths_gbps=tuple(float(v) for v in _BANDWIDTHS.value))
  try:
    result.base.validate()
  except experiment.ConfigError as e:
    common.fail(f"flag --{e.field}: {e}")
  return result


def main(argv):
  """absl main: flags -> settings -> :func:`benchmarks.reproduce.benchmark.run`; one JSON line."""
  del argv
  s = settings_from_flags()
  common.make_outdir(s.outdir)
  devices = common.setup_devices(s.base.num_devices)  # None: 8 on CPU
  trains = any(name in s.sections for name in settings.TRAINING_SECTIONS)
  if trains and s.base.batch_size % len(devices):
    common.fail(f"flag --batch_size={s.base.batch_size}: not divisible by "
                f"--num_devices={len(devices)}")
  try:
    result = benchmark.run(s, devices)
  except experiment.ConfigError as e:
    common.fail(str(e))
  common.print_json_line(result)


if __name__ == "__main__":
  common.run_main(main, "benchmarks.reproduce")
