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
    python -m jrelu.train --algorithm=easgd --tau=16 --learning_rate=0.2
    python -m jrelu.train --algorithm=eamsgd --tau=4 --momentum=0.9 --compressor=none
    python -m jrelu.train --algorithm=downpour --tau=4 --learning_rate=0.025
    python -m jrelu.train --compressor=sign --aggregation=majority_vote --step_size=armijo

``--algorithm=easgd|eamsgd|downpour`` (Zhang, Choromanska, LeCun, arXiv 1412.6651; see
``jrelu.easgd``) keeps each device's own parameters and exchanges with a center every
``--tau`` steps, with moving rate ``--alpha`` (default 0.9 / N) and, for EAMSGD,
Nesterov ``--momentum`` (default 0.99); the compressor applies to what is exchanged.

``--step_size=armijo`` (Subramaniam, Magesh, Veeravalli, arXiv 2207.10046; see
``jrelu.linesearch``) replaces ``--learning_rate`` by a backtracking search on the
compressed direction, with a scaled step (``--armijo_*`` flags).

A flag that the chosen compressor, schedule, step size rule or algorithm does not use is an
error (``--num_levels`` with ``--compressor=sign``, ``--decay_rate`` with
``--lr_schedule=constant``, ``--aggregation`` with ``--compressor=powersgd``, ``--tau``
with ``--algorithm=sgd``, ``--learning_rate`` with ``--step_size=armijo``), never silently
ignored.

Several processes form one job with ``--coordinator_address``, ``--num_processes`` and
``--process_id`` (or a cluster's environment, e.g. SLURM's ``srun``; ``python -m
jrelu.launch`` starts them on one machine): their devices are one data-parallel axis, and
process 0 writes the files (``jrelu.processes``; README, "Running on several processes or
hosts").

Writes ``WORKDIR/metrics.jsonl``, ``WORKDIR/summary.json``, ``WORKDIR/checkpoints/`` and,
when matplotlib is installed, ``WORKDIR/relative_error.png``. Running again with the same
``--workdir`` and flags resumes from the latest checkpoint (other flags are refused, naming
them; ``--fresh`` starts over). Exit status: 2 for bad flags, a workdir in use or holding
another run; 1 for NaN or Inf (the step is named) or a file that cannot be written (named);
130 / 143 after SIGINT / SIGTERM, which stop at the end of the current chunk with a
checkpoint and ``"status": "interrupted"``; 3 when another process of the job was lost
(within ``--process_timeout`` seconds). Each failure is one line on stderr.
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
from jrelu import processes

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
# Several processes (jrelu.processes; python -m jrelu.launch starts them on one machine).
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, where JAX's coordination "
    "service listens; the same for every process. With --num_processes and --process_id "
    "(or, all three absent, the cluster's environment: SLURM, Open MPI) the processes "
    "form one job whose devices are one data-parallel axis.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in the job (the same for every process).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index in [0, --num_processes); 0 writes the files.")
_PROCESS_TIMEOUT = flags.DEFINE_integer(
    "process_timeout", processes.DEFAULT_TIMEOUT, "Seconds to wait for the other processes "
    "to join, and without a heartbeat from one before it counts as lost (then every "
    "other process exits with one line naming it).")


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
  return re.sub(rf"(?<![\w-])({names}|workdir|fresh|checkpoint_every|keep_checkpoints"
                r"|coordinator_address|num_processes|process_id|process_timeout)=",
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
  if _PROCESS_TIMEOUT.value < 1:
    _fail(f"flag --process_timeout={_PROCESS_TIMEOUT.value}: must be at least 1", 2)
  try:
    config = config_from_flags()
    processes.initialize(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value,
                         _PROCESS_ID.value, timeout=_PROCESS_TIMEOUT.value, prog=PROG)
  except experiment.ConfigError as e:
    _fail(as_flags(str(e)), 2)
  except processes.ProcessError as e:
    _fail(as_flags(str(e)), 2)
  error = None
  try:
    summary = experiment.run(config, _WORKDIR.value,
                             checkpoint_every=_CHECKPOINT_EVERY.value,
                             keep_checkpoints=_KEEP_CHECKPOINTS.value, fresh=_FRESH.value)
  except experiment.ConfigError as e:
    error = (as_flags(str(e)), 2)
  except (experiment.DivergedError, experiment.WriteError) as e:
    error = (str(e), 1)
  except experiment.Interrupted as e:
    error = (str(e), 128 + e.signum)
  except KeyboardInterrupt:
    error = ("interrupted by a second SIGINT, without a checkpoint of the current chunk",
             130)
  except processes.ProcessFailed as e:
    error = (str(e), 1)
  except Exception:  # pylint: disable=broad-except
    # Inside a job of several processes, a failed collective usually means a lost
    # process: give the watchdog the time to name it instead of a traceback.
    processes.wait_for_lost_process()
    raise
  # Several processes leave together (a bounded wait; a lost one is reported).
  processes.finish()
  if error is not None:
    _fail(*error)
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
