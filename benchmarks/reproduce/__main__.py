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
PROG = "benchmarks.reproduce"
_DEFAULT = experiment.Config()


def _is_number_list(values, kind=float, positive=True) -> bool:
  try:
    parsed = [kind(v) for v in values]
  except (TypeError, ValueError):
    return False
  return bool(parsed) and all(math.isfinite(v) and (v > 0 or not positive) for v in parsed)


def define_flags(flag_values: flags.FlagValues) -> None:
  """Defines the binary's flags and their validators in ``flag_values``.

  The binary defines them in ``absl.flags.FLAGS`` when it runs; a test defines them in a
  fresh ``flags.FlagValues()``, so that this binary and the other benchmarks can be
  imported into one process (their flag names overlap, e.g. ``--outdir``).

  Args:
    flag_values: where to define them, e.g. ``flags.FLAGS``.

  Raises:
    absl.flags.DuplicateFlagError: when ``flag_values`` already holds one of them.

  Example:
    >>> values = flags.FlagValues()
    >>> define_flags(values)
    >>> values(["benchmarks.reproduce", "--quick"])
    ['benchmarks.reproduce']
    >>> values.quick, values.outdir
    (True, 'runs/reproduce')
  """
  fv = flag_values
  flags.DEFINE_string("outdir", "runs/reproduce", "Where plots, runs and summary go.",
                      flag_values=fv)
  flags.DEFINE_bool("quick", False,
                    "Small settings: the whole run in under two minutes on 2 cores.",
                    flag_values=fv)
  flags.DEFINE_list("sections", list(SECTIONS),
                    f"Sections to run, any of {', '.join(SECTIONS)}.", flag_values=fv)
  # The training problem of sections 2-4 (fields of jrelu.experiment.Config).
  flags.DEFINE_integer("dim", _DEFAULT.dim, "Dimension d of sections 2-4.", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer("num_samples", _DEFAULT.num_samples,
                       "Training samples n of sections 2-4.", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("batch_size", _DEFAULT.batch_size,
                       "Global mini-batch size of sections 2-4.", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer(
      "num_steps", None, "Cap on the steps of each training run (default "
      f"{settings.FULL['num_steps']}; quick {settings.QUICK['num_steps']}).", lower_bound=1,
      flag_values=fv)
  flags.DEFINE_integer("seed", _DEFAULT.seed, "Seed of data, initialization and "
                       "compression noise.", lower_bound=0, flag_values=fv)
  flags.DEFINE_integer(
      "num_devices", None, "Data-parallel devices of sections 2-4; default: all "
      "accelerators, or 8 simulated CPU devices when there is none.", lower_bound=1,
      flag_values=fv)
  flags.DEFINE_list(
      "phase_dims", None, "Phase transition dimensions d (default 20,50,100; quick 20,50).",
      flag_values=fv)
  flags.DEFINE_list(
      "phase_ratios", ["1", "1.5", "2", "2.5", "3", "4", "5", "6", "8"],
      "Phase transition sample ratios n/d.", flag_values=fv)
  flags.DEFINE_integer(
      "phase_trials", None, "Trials per (d, n/d) cell (default 50; quick 10).",
      lower_bound=1, flag_values=fv)
  flags.DEFINE_integer(
      "phase_iters", None, "Iteration budget of GD and SGD per trial (default 5000; quick "
      "2000).", lower_bound=1, flag_values=fv)
  flags.DEFINE_enum(
      "phase_dtype", "float64", ["float64", "float32"],
      "Arithmetic of the phase transition (float32 stalls near 1e-6 at d=100).",
      flag_values=fv)
  flags.DEFINE_list(
      "methods", None, f"Rows of METHODS to train (default all; quick "
      f"{','.join(settings.QUICK_METHODS)}); include '{settings.BASELINE}' for the ratios to "
      "float32 SGD.", flag_values=fv)
  flags.DEFINE_list(
      "learning_rates", None, "Step size grid of sections 2-4 (default "
      "1.2,1,0.85,0.7,0.5,0.3,0.2; quick 0.7,0.5).", flag_values=fv)
  flags.DEFINE_integer(
      "timing_steps", None, "Steps per timing run, in 10 chunks (default 500; quick 250).",
      lower_bound=10, flag_values=fv)
  flags.DEFINE_float("alpha_seconds", 50e-6, "Latency of one message round (s).",
                     flag_values=fv)
  flags.DEFINE_list("bandwidths_gbps", ["1", "10", "100"],
                    "Link bandwidths of the communication model (Gbit/s).", flag_values=fv)

  for name, check, message in [
      ("sections", lambda v: bool(v) and set(v) <= set(SECTIONS),
       f"must be a comma-separated subset of {', '.join(SECTIONS)}"),
      ("phase_dims", lambda v: v is None or _is_number_list(v, int),
       "must be a comma-separated list of integers >= 1"),
      ("phase_ratios", _is_number_list, "must be a comma-separated list of numbers > 0"),
      ("methods", lambda v: v is None or (bool(v) and set(v) <= set(METHODS)),
       f"must be a comma-separated subset of {', '.join(METHODS)}"),
      ("learning_rates", lambda v: v is None or _is_number_list(v),
       "must be a comma-separated list of numbers > 0"),
      ("bandwidths_gbps", _is_number_list, "must be a comma-separated list of numbers > 0"),
      ("alpha_seconds", lambda v: v >= 0 and math.isfinite(v), "must be a finite number >= 0"),
      ("outdir", bool, "must not be empty"),
  ]:
    flags.register_validator(name, check, message, flag_values=fv)


def settings_from_flags(flag_values: flags.FlagValues,
                        device_count: int) -> settings.Settings:
  """The checked :class:`~benchmarks.reproduce.settings.Settings` of the parsed flags.

  Every check of the flags that needs no more than the device count happens here, before
  any heavy work, so that a test can run it in-process.

  Args:
    flag_values: flags defined by :func:`define_flags` and parsed.
    device_count: the data-parallel devices the training sections will run on (what
      ``common.setup_devices(--num_devices)`` returned).

  Returns:
    The settings.

  Raises:
    SystemExit: with status 2 after one error line naming the flag (``common.fail``), when
      the training problem is bad or ``--batch_size`` is not divisible by
      ``device_count`` while a training section is selected.

  Example:
    >>> values = flags.FlagValues()
    >>> define_flags(values)
    >>> _ = values(["benchmarks.reproduce", "--quick"])
    >>> settings_from_flags(values, 8).base.num_steps
    1500
  """
  fv = flag_values
  base = experiment.Config(dim=fv.dim, num_samples=fv.num_samples, batch_size=fv.batch_size,
                           num_devices=fv.num_devices, seed=fv.seed, num_steps=fv.num_steps)
  result = settings.Settings.make(
      fv.quick, outdir=fv.outdir, base=base,
      sections=tuple(s for s in SECTIONS if s in fv.sections),
      phase_dims=fv.phase_dims and tuple(int(v) for v in fv.phase_dims),
      phase_ratios=tuple(sorted({float(v) for v in fv.phase_ratios})),
      phase_trials=fv.phase_trials, phase_iters=fv.phase_iters,
      phase_dtype=fv.phase_dtype, methods=fv.methods and tuple(fv.methods),
      learning_rates=fv.learning_rates and tuple(float(v) for v in fv.learning_rates),
      timing_steps=fv.timing_steps, alpha_seconds=fv.alpha_seconds,
      bandwidths_gbps=tuple(float(v) for v in fv.bandwidths_gbps))
  try:
    result.base.validate()
  except experiment.ConfigError as e:
    common.fail(f"flag --{e.field}: {e}")
  trains = any(name in result.sections for name in settings.TRAINING_SECTIONS)
  if trains and result.base.batch_size % device_count:
    common.fail(f"flag --batch_size={result.base.batch_size}: not divisible by "
                f"--num_devices={device_count}")
  return result


def main(argv):
  """absl main: flags -> settings -> :func:`benchmarks.reproduce.benchmark.run`; one JSON line."""
  del argv
  devices = common.setup_devices(flags.FLAGS.num_devices)  # None: 8 on CPU
  s = settings_from_flags(flags.FLAGS, len(devices))
  common.make_outdir(s.outdir)
  try:
    result = benchmark.run(s, devices)
  except experiment.ConfigError as e:
    common.fail(str(e))
  common.print_json_line(result)


if __name__ == "__main__":
  define_flags(flags.FLAGS)
  common.run_main(main, PROG)
