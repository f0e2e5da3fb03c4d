"""A program for ``python -m jrelu.launch --program=tests/multiprocess_worker.py``.

Joins the job like ``jrelu.train`` (the same four flags), then either runs
``jrelu.experiment.run`` once per entry of ``--runs`` (a JSON object: workdir name ->
Config keyword arguments) under ``--outdir``, so that one launch compiles and checks
several runs, or, with ``--idle``, waits to be killed (the watchdog's test).
"""

import json
import os
import sys
import time

from absl import app
from absl import flags

from jrelu import experiment
from jrelu import processes

_COORDINATOR_ADDRESS = flags.DEFINE_string("coordinator_address", None, "")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "")
_PROCESS_TIMEOUT = flags.DEFINE_integer("process_timeout", processes.DEFAULT_TIMEOUT, "")
_RUNS = flags.DEFINE_string("runs", "{}", "JSON: workdir name -> Config kwargs.")
_OUTDIR = flags.DEFINE_string("outdir", None, "")
_IDLE = flags.DEFINE_bool("idle", False, "Join, say so, and wait to be killed.")
_CHECKPOINT_EVERY = flags.DEFINE_integer("checkpoint_every", 10**6, "Of --hold_run.")
_HOLD_FILE = flags.DEFINE_string(
    "hold_file", None, "Hold (say so, then wait to be killed) at --hold_step of "
    "--hold_run unless HOLD_FILE.<process id> exists; create it first, so that the same "
    "command run again does not hold.")
_HOLD_RUN = flags.DEFINE_string("hold_run", None, "")
_HOLD_STEP = flags.DEFINE_integer("hold_step", None, "")


def hold(record):
  marker = f"{_HOLD_FILE.value}.{processes.process_id()}"
  if record["step"] == _HOLD_STEP.value and not os.path.exists(marker):
    open(marker, "w").close()
    sys.stdout.write(f"holding at step {record['step']}\n")  # one write: one line
    sys.stdout.flush()
    time.sleep(120)  # killed long before, unless the test went wrong: then end anyway
    os._exit(1)  # pylint: disable=protected-access


def main(argv):
  del argv
  processes.initialize(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value,
                       _PROCESS_ID.value, timeout=_PROCESS_TIMEOUT.value,
                       prog="multiprocess_worker")
  if _IDLE.value:
    sys.stdout.write(f"joined as process {processes.process_id()}\n")
    sys.stdout.flush()
    while True:
      time.sleep(1)
  # The plot is no part of what the tests compare, and matplotlib costs ~1.7 s a run.
  experiment.loop._plot = lambda *args: None  # pylint: disable=protected-access
  for name, kwargs in json.loads(_RUNS.value).items():
    held = name == _HOLD_RUN.value
    callbacks = [hold] if _HOLD_FILE.value and held else []
    # Checkpoints cost time: the held run writes them every --checkpoint_every steps, the
    # others only at the end.
    experiment.run(experiment.Config(**kwargs), os.path.join(_OUTDIR.value, name),
                   checkpoint_every=_CHECKPOINT_EVERY.value if held else 10**6,
                   callbacks=callbacks)
  processes.finish()


if __name__ == "__main__":
  app.run(main)
