r"""Fits a planted ReLU by data-parallel SGD with compressed gradient averaging.

The main job of jrelu: Kalan, Soltanolkotabi, Avestimehr, "Fitting ReLUs via SGD and
Quantized SGD" (arXiv 1901.06587). A thin absl binary over ``jrelu.experiment``: every
field of ``experiment.Config`` is a flag of the same name (``--help`` lists them), plus
``--workdir``.

    python -m jrelu.train --workdir=runs/qsgd4
    python -m jrelu.train --compressor=none --aggregation=psum --workdir=runs/sgd
    python -m jrelu.train --compressor=top_k --fraction=0.1 --error_feedback
    python -m jrelu.train --compressor=sign --aggregation=majority_vote \
        --learning_rate=1e-3 --lr_schedule=exponential --decay_steps=100
    python -m jrelu.train --compressor=sign --aggregation=majority_vote --step_size=armijo

A flag that the chosen compressor, schedule or step size rule does not use is an error
(``--num_levels`` with ``--compressor=sign``, ``--decay_rate`` with
``--lr_schedule=constant``, ``--aggregation`` with ``--compressor=powersgd``,
``--learning_rate`` with ``--step_size=armijo``), never silently ignored.

Writes ``WORKDIR/metrics.jsonl``, ``WORKDIR/summary.json``, ``WORKDIR/checkpoints/`` and,
when matplotlib is installed, ``WORKDIR/relative_error.png``. Running again with the same
``--workdir`` and flags resumes from the latest checkpoint (other flags are refused, naming
them; ``--fresh`` starts over). Exit status: 2 for bad flags, a workdir in use or holding
another run; 1 for NaN or Inf (the step is named) or a file that cannot be written (named);
130 / 143 after SIGINT / SIGTERM, which stop at the end of the current chunk with a
checkpoint and ``"status": "interrupted"``. Each failure is one line on stderr.
"""

from __future__ import annotations

import dataclasses
import logging as std_logging
import os
import re
import sys
import typing

from absl import app
from absl import flags
from absl import logging

from jrelu import experiment

PROG = "jrelu.train"
_WORKDIR = flags.DEFINE_string("workdir", "runs/latest", "Where metrics and summary go.")
_CHECKPOINT_EVERY = flags.DEFINE_integer(
    "checkpoint_every", 500, "Steps between checkpoints in WORKDIR/checkpoints (rounded up "
    "to a --log_every boundary; one more at the end). Running again with the same flags "
    "resumes from the latest.")
_KEEP_CHECKPOINTS = flags.DEFINE_integer(
    "keep_checkpoints", 3, "How many of the latest checkpoints to keep.")
_FRESH = flags.DEFINE_bool(
    "fresh", False, "Delete an earlier run's files in --workdir (each one is logged) "
    "instead of resuming it.")


def define_config_flags(flag_values=flags.FLAGS) -> None:
  """Defines one absl flag per field of ``experiment.Config`` (name, default, help, choices).

  Args:
    flag_values: the ``FlagValues`` to define them in.
  """
  hints = typing.get_type_hints(experiment.Config)
  for field in dataclasses.fields(experiment.Config):
    kind = hints[field.name]
    base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
    args = (field.name, field.default, field.metadata["help"])
    if "choices" in field.metadata:
      flags.DEFINE_enum(field.name, field.default, list(field.metadata["choices"]),
                        field.metadata["help"], flag_values=flag_values)
    elif base is bool:
      flags.DEFINE_bool(*args, flag_values=flag_values)
    elif base is int:
      flags.DEFINE_integer(*args, flag_values=flag_values)
    elif base is float:
      flags.DEFINE_float(*args, flag_values=flag_values)
    else:
      flags.DEFINE_string(*args, flag_values=flag_values)


define_config_flags()


def config_from_flags(flag_values=flags.FLAGS) -> experiment.Config:
  """The validated ``experiment.Config`` of the parsed flags.

  Raises:
    experiment.ConfigError: for a bad value or a flag the chosen method does not use.
  """
  return experiment.Config(**{f.name: flag_values[f.name].value
                              for f in dataclasses.fields(experiment.Config)}).validate()


def as_flags(message: str) -> str:
  """Rewrites the ``name=value`` settings of a ConfigError message as ``--name=value``."""
  names = "|".join(f.name for f in dataclasses.fields(experiment.Config))
  return re.sub(rf"(?<![\w-])({names}|workdir|fresh|checkpoint_every|keep_checkpoints)=",
                r"--\1=", message)


def _fail(message: str, status: int):
  """Prints one line on stderr and exits; never a traceback."""
  sys.stderr.write(f"{PROG}: error: {message}\n")
  sys.stderr.flush()
  sys.exit(status)


def _parse_flags(argv):
  """absl flag parsing that reports a bad flag in one line (exit status 2)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).splitlines()[0], 2)


def main(argv):
  """flags -> ``experiment.Config`` -> ``experiment.run``; errors become one line."""
  for noisy in ("jax._src.xla_bridge", "matplotlib"):
    std_logging.getLogger(noisy).setLevel(std_logging.WARNING)
  # orbax logs dozens of INFO lines per checkpoint through absl's logger, and a failed
  # write as a traceback from its worker thread. Every failure of a save or restore
  # reaches jrelu as an exception, which the binary reports in one line.
  std_logging.getLogger("absl").addFilter(
      lambda record: record.levelno >= std_logging.CRITICAL or "orbax" not in record.pathname)
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; every setting is a --flag", 2)
  if not _WORKDIR.value:
    _fail("flag --workdir: must not be empty", 2)
  try:
    summary = experiment.run(config_from_flags(), _WORKDIR.value,
                             checkpoint_every=_CHECKPOINT_EVERY.value,
                             keep_checkpoints=_KEEP_CHECKPOINTS.value, fresh=_FRESH.value)
  except experiment.ConfigError as e:
    _fail(as_flags(str(e)), 2)
  except (experiment.DivergedError, experiment.WriteError) as e:
    _fail(str(e), 1)
  except experiment.Interrupted as e:
    _fail(str(e), 128 + e.signum)
  except KeyboardInterrupt:
    _fail("interrupted by a second SIGINT, without a checkpoint of the current chunk", 130)
  logging.info("done: %s after %d steps, relative_error %.3e, %.0f steps/s, summary in %s",
               summary["status"], summary["steps"], summary["relative_error"],
               summary["steps_per_second"] or 0.0,
               os.path.join(_WORKDIR.value, "summary.json"))


def run():
  """Console entry point ``jrelu-train``."""
  try:
    app.run(main, flags_parser=_parse_flags)
  except KeyboardInterrupt:  # SIGINT before experiment.run took over the signal
    _fail("interrupted by SIGINT before training started", 130)


if __name__ == "__main__":
  run()
