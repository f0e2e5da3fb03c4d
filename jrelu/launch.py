r"""Starts a job of several processes on this machine, joined on loopback.

    python -m jrelu.launch --num_processes=2 -- --workdir=runs/mp --num_devices=8

runs ``python -m jrelu.train`` (or ``--program``) ``--num_processes`` times, each with
``--coordinator_address=127.0.0.1:PORT`` (a free port), ``--num_processes`` and its own
``--process_id``, plus the flags after ``--``. The processes form one job on JAX's
distributed runtime (``jrelu.processes``): their devices are one data-parallel axis, on
CPU each process simulating ``num_devices / num_processes`` of them. Their output
(stdout and stderr, line by line) is streamed to the launcher's stdout with a ``[pI]``
prefix.

Exit status: 0 when every process exits with 0; otherwise that of the first process to
fail (128 + N for a process killed by signal N), after one line naming it. A process that
loses another exits by itself within ``--process_timeout`` seconds (``jrelu.processes``);
should one still run ``--process_timeout`` + 30 seconds after another failed, the launcher
ends it (SIGTERM, then SIGKILL). SIGINT and SIGTERM sent to the launcher go to every
process once (each stops at the end of its chunk, with a checkpoint).

On a cluster, start the binary itself, one process per host (or accelerator), e.g.
``srun --ntasks=2 python -m jrelu.train ...`` (JAX reads SLURM's environment); see the
README's "Running on several processes or hosts".
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app
from absl import flags

from jrelu import processes

PROG = "jrelu.launch"


def define_flags(flag_values: flags.FlagValues) -> None:
  """Defines the launcher's flags in ``flag_values`` (absl's FLAGS when it runs).

  Only then: importing this module (for :func:`launch`) next to ``jrelu.train``, whose
  ``--num_processes`` and ``--process_timeout`` it shares, defines no flag.
  """
  flags.DEFINE_integer("num_processes", 2, "Processes to start (>= 1).", lower_bound=1,
                       flag_values=flag_values)
  flags.DEFINE_string(
      "program", "jrelu.train", "The Python module (python -m) or .py file each process "
      "runs; it must accept --coordinator_address, --num_processes, --process_id and "
      "--process_timeout.", flag_values=flag_values)
  flags.DEFINE_integer("port", 0, "Coordinator port on 127.0.0.1 (0: a free one).",
                       lower_bound=0, upper_bound=65535, flag_values=flag_values)
  flags.DEFINE_integer(
      "process_timeout", processes.DEFAULT_TIMEOUT, "Passed to every process: seconds to "
      "wait for the others to join, and without a heartbeat before one counts as lost.",
      lower_bound=1, flag_values=flag_values)

# Beyond the processes' own bound, before the launcher ends a process that is left over.
GRACE_SECONDS = 30


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def command(program: str, process_id: int, num_processes: int, port: int, timeout: int,
            flags_after: list[str]) -> list[str]:
  """The command line of process ``process_id``."""
  head = [sys.executable, program] if program.endswith(".py") else [
      sys.executable, "-m", program]
  return head + list(flags_after) + [
      f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
      f"--process_id={process_id}", f"--process_timeout={timeout}"]


def _stream(index: int, pipe, lock: threading.Lock) -> None:
  """Copies a process's output to ours, line by line, with the prefix ``[pI] ``."""
  prefix = f"[p{index}] ".encode()
  for line in iter(pipe.readline, b""):
    with lock:
      sys.stdout.buffer.write(prefix + line if line.endswith(b"\n") else prefix + line + b"\n")
      sys.stdout.buffer.flush()
  pipe.close()


def _describe(status: int) -> str:
  if status < 0:
    return f"was killed by {signal.Signals(-status).name}"
  return f"exited with status {status}"


def launch(program: str, num_processes: int, flags_after: list[str], *, port: int = 0,
           timeout: int = processes.DEFAULT_TIMEOUT) -> int:
  """Runs the job; returns the launcher's exit status (see the module docstring)."""
  port = port or free_port()
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  lock = threading.Lock()
  procs, streams = [], []
  for i in range(num_processes):
    # Own session: a terminal's Ctrl-C reaches the launcher only, which forwards it once.
    # stdout and stderr apart: each is copied by whole lines, never cut into each other.
    proc = subprocess.Popen(
        command(program, i, num_processes, port, timeout, flags_after),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    procs.append(proc)
    with lock:
      sys.stdout.write(f"[{PROG}] process {i} of {num_processes}: pid {proc.pid}\n")
      sys.stdout.flush()
    for pipe in (proc.stdout, proc.stderr):
      thread = threading.Thread(target=_stream, args=(i, pipe, lock), daemon=True)
      thread.start()
      streams.append(thread)

  def forward(signum, frame):
    del frame
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  first_failure, failed_at = None, None
  try:
    while [p.poll() for p in procs].count(None):
      for i, p in enumerate(procs):
        if p.returncode not in (None, 0) and first_failure is None:
          first_failure, failed_at = i, time.monotonic()
      if failed_at is not None and time.monotonic() - failed_at > timeout + GRACE_SECONDS:
        for i, p in enumerate(procs):
          if p.poll() is None:
            with lock:
              sys.stdout.write(f"[{PROG}] process {i} still runs {timeout + GRACE_SECONDS} s "
                               f"after process {first_failure} failed; ending it\n")
              sys.stdout.flush()
            p.terminate()
            try:
              p.wait(5)
            except subprocess.TimeoutExpired:
              p.kill()
      time.sleep(0.1)
  finally:
    for s, handler in old.items():
      signal.signal(s, handler)
  for thread in streams:
    thread.join()
  for i, p in enumerate(procs):
    if p.returncode != 0 and first_failure is None:
      first_failure = i
  if first_failure is None:
    return 0
  status = procs[first_failure].returncode
  others = [f"{i} {_describe(p.returncode)}" for i, p in enumerate(procs)
            if i != first_failure and p.returncode != 0]
  sys.stderr.write(f"{PROG}: error: process {first_failure} of {num_processes} "
                   f"{_describe(status)}"
                   + (f"; then process {', process '.join(others)}" if others else "")
                   + "\n")
  sys.stderr.flush()
  return 128 - status if status < 0 else status


def main(argv):
  flags_after = argv[1:]
  if flags_after and flags_after[0] == "--":
    flags_after = flags_after[1:]
  values = flags.FLAGS
  sys.exit(launch(values.program, values.num_processes, flags_after, port=values.port,
                  timeout=values.process_timeout))


def _parse_flags(argv):
  """Parses the launcher's flags up to ``--``; everything after goes to the processes."""
  if "--" in argv:
    cut = argv.index("--")
    own, rest = argv[:cut], argv[cut + 1:]
  else:
    own, rest = argv, []
  try:
    remaining = flags.FLAGS(own)
  except flags.Error as e:
    sys.stderr.write(f"{PROG}: error: {str(e).splitlines()[0]}\n")
    sys.exit(2)
  if len(remaining) > 1:
    sys.stderr.write(f"{PROG}: error: unexpected arguments {remaining[1:]}; the "
                     "program's flags go after --\n")
    sys.exit(2)
  return remaining + ["--"] + rest


if __name__ == "__main__":
  define_flags(flags.FLAGS)
  app.run(main, flags_parser=_parse_flags)
