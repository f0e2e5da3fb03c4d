"""The binary ``python -m benchmarks.real_data``: flags -> Settings -> the rows.

    python -m benchmarks.real_data --quick --outdir=runs/real_data
    python -m benchmarks.real_data --methods=float32,qsgd_s1,qsgd_s16 --num_seeds=5

See ``benchmarks/real_data/__init__.py`` for what it measures. Bad flags print one line
``benchmarks.real_data: error: ...`` on stderr and exit with status 2.
"""

from __future__ import annotations

from absl import flags

from benchmarks import common
from benchmarks.real_data import benchmark
from benchmarks.real_data import settings
from jrelu import experiment

PROG = "benchmarks.real_data"


def define_flags(flag_values: flags.FlagValues) -> None:
  """Defines the binary's flags and their validators in ``flag_values``.

  The binary defines them in ``absl.flags.FLAGS`` when it runs; a test defines them in a
  fresh ``flags.FlagValues()`` (the benchmarks' flag names overlap, e.g. ``--outdir``).

  Args:
    flag_values: where to define them, e.g. ``flags.FLAGS``.

  Raises:
    absl.flags.DuplicateFlagError: when ``flag_values`` already holds one of them.

  Example:
    >>> values = flags.FlagValues()
    >>> define_flags(values)
    >>> values(["benchmarks.real_data", "--quick"])
    ['benchmarks.real_data']
    >>> values.quick, values.outdir
    (True, 'runs/real_data')
  """
  fv = flag_values
  flags.DEFINE_string("outdir", "runs/real_data", "Where results.json, summary.md and the "
                      "plot go.", flag_values=fv)
  quick_rows = ", ".join(f"{m} ({r})" for m, r in settings.QUICK_ROWS)
  flags.DEFINE_bool("quick", False, f"Small settings: rows {quick_rows} (unless --methods "
                    f"is given), {settings.QUICK['num_steps']} steps, "
                    f"{settings.QUICK['num_seeds']} seed (well under two minutes on 2 "
                    "cores).", flag_values=fv)
  flags.DEFINE_list("methods", None, f"Rows to train, any of {', '.join(settings.METHODS)} "
                    "(default all; quick: the quick rows).", flag_values=fv)
  flags.DEFINE_list("step_sizes", list(settings.STEP_SIZES), "Step-size rules, any of "
                    f"{', '.join(settings.STEP_SIZES)}; each applies to the rows it fits.",
                    flag_values=fv)
  flags.DEFINE_integer("num_steps", None, "Steps per run (default "
                       f"{settings.FULL['num_steps']}; quick {settings.QUICK['num_steps']}); a "
                       "multiple of --num_evals.", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("num_seeds", None, "Runs per row, seeds --seed, --seed+1, ... "
                       f"(default {settings.FULL['num_seeds']}; quick "
                       f"{settings.QUICK['num_seeds']}).", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("num_evals", None, "Scores per run, taken every num_steps/num_evals "
                       f"steps (default {settings.FULL['num_evals']}; quick "
                       f"{settings.QUICK['num_evals']}).", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("seed", 0, "The first seed (initial parameters, batches, "
                       "compression noise); the split's seed is fixed.", lower_bound=0,
                       flag_values=fv)
  flags.DEFINE_integer("batch_size", settings.BATCH_SIZE, "Global mini-batch size, "
                       "divisible by the devices.", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("num_devices", None, "Data-parallel devices; default: all "
                       "accelerators, or 8 simulated CPU devices when there is none.",
                       lower_bound=1, flag_values=fv)
  for name, choices in (("methods", settings.METHODS), ("step_sizes", settings.STEP_SIZES)):
    flags.register_validator(
        name, lambda v, c=choices: v is None or (bool(v) and set(v) <= set(c)),
        f"must be a comma-separated subset of {', '.join(choices)}", flag_values=fv)
  flags.register_validator("outdir", bool, "must not be empty", flag_values=fv)


def settings_from_flags(flag_values: flags.FlagValues, device_count: int) -> settings.Settings:
  """The checked :class:`~benchmarks.real_data.settings.Settings` of the parsed flags.

  Every check that needs no more than the device count happens here, before the data
  is loaded or anything is compiled.

  Args:
    flag_values: flags defined by :func:`define_flags` and parsed.
    device_count: the devices ``common.setup_devices(--num_devices)`` returned.

  Returns:
    The settings.

  Raises:
    SystemExit: with status 2 after one error line naming the flag (``common.fail``).

  Example:
    >>> values = flags.FlagValues()
    >>> define_flags(values)
    >>> _ = values(["benchmarks.real_data", "--quick"])
    >>> settings_from_flags(values, 8).methods
    ('float32', 'easgd_tau4', 'powersgd_r1')
  """
  fv = flag_values
  mode = settings.QUICK if fv.quick else settings.FULL
  given = {"num_steps": fv.num_steps, "num_seeds": fv.num_seeds, "num_evals": fv.num_evals,
           "methods": fv.methods and tuple(fv.methods)}
  values = common.mode_defaults(mode, given)
  if values["num_steps"] % values["num_evals"]:
    common.fail(f"flag --num_steps={values['num_steps']}: not a multiple of --num_evals="
                f"{values['num_evals']}")
  if fv.batch_size % device_count:
    common.fail(f"flag --batch_size={fv.batch_size}: not divisible by --num_devices="
                f"{device_count}")
  return settings.Settings(
      outdir=fv.outdir, quick=fv.quick, methods=values["methods"],
      step_sizes=tuple(fv.step_sizes), num_steps=values["num_steps"],
      num_seeds=values["num_seeds"], num_evals=values["num_evals"], seed=fv.seed,
      batch_size=fv.batch_size,
      pairs=settings.QUICK_ROWS if fv.quick and fv.methods is None else None)


def run_from_flags(flag_values: flags.FlagValues) -> dict:
  """What ``main`` does with parsed flags: devices, settings, the run; prints one JSON line.

  Returns:
    The result (also printed).
  """
  devices = common.setup_devices(flag_values.num_devices)  # None: 8 on CPU
  s = settings_from_flags(flag_values, len(devices))
  common.make_outdir(s.outdir)
  try:
    result = benchmark.run(s, devices)
  except experiment.ConfigError as e:
    common.fail(str(e))
  except ImportError as e:   # scikit-learn, which holds the data set, is missing
    common.fail(f"{e}; install the bench extra: pip install -e '.[bench]'")
  common.print_json_line(result)
  return result


def main(argv):
  """absl main: :func:`run_from_flags` on ``absl.flags.FLAGS``."""
  del argv
  run_from_flags(flags.FLAGS)


if __name__ == "__main__":
  define_flags(flags.FLAGS)
  common.run_main(main, PROG)
