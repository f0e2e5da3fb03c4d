"""Several processes as one data-parallel job, on JAX's own distributed runtime.

One process per host (or per accelerator) joins the others through
``jax.distributed.initialize``: process 0 hosts JAX's coordination service at
``coordinator_address``, every process connects to it, and ``jax.devices()`` then lists
the devices of all processes, which form one data-parallel axis. Collectives between
processes are JAX's: gloo over TCP on CPU (set here), NCCL on GPU. jrelu sends nothing
of its own between processes; the few host values processes must agree on (whether a run
resumes, whether a signal stops it) go through the coordination service's key-value
store.

    from jrelu import processes
    processes.initialize("10.0.0.1:1234", num_processes=2, process_id=0)  # before JAX work
    devices = parallel.setup_devices(8)   # 4 here, 4 in process 1
    ...
    processes.finish()

Failures are bounded by one ``timeout`` (seconds, :data:`DEFAULT_TIMEOUT`):

* joining: a process that cannot reach the coordinator, whose job does not come together
  within ``timeout`` or whose processes were started with different ``num_processes``
  fails with one line (:class:`ProcessError`, or JAX's fatal end of a connection that
  timed out, turned into that line by the stderr filter below);
* a lost process: every process runs a watchdog thread that asks the coordination service
  which processes are alive (their heartbeats, ``heartbeat_timeout_seconds = timeout``).
  When one is lost (``kill -9``, a crashed host), the others print one line naming it and
  exit with :data:`LOST_EXIT_STATUS` within about ``timeout`` seconds, instead of
  waiting forever inside a collective. When process 0 is lost, the coordination service
  goes with it and JAX's runtime itself ends the others at once with a fatal error; a
  small filter on this process's stderr (started by :func:`initialize`) turns that
  message into the same one line.

Process 0 alone writes a run's files (``jrelu.experiment.run`` and ``jrelu.checkpoint``
follow :func:`is_writer`).
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time

import jax

from jrelu import _checks

DEFAULT_TIMEOUT = 60
# Exit status of a process that lost another process of its job: rerunning the same
# command resumes from the last checkpoint.
LOST_EXIT_STATUS = 3
# Blocking waits on other processes (a broadcast value, a barrier) are bounded by the
# watchdog, not by their own timeout: a peer may legitimately take long (process 0
# writing files, a compilation), a lost one is reported by the watchdog.
_WAIT_MS = 7 * 24 * 3600 * 1000


@dataclasses.dataclass
class _State:
  num_processes: int = 1
  process_id: int = 0
  coordinator_address: str | None = None
  timeout: int = DEFAULT_TIMEOUT
  prog: str = "jrelu"
  client: object = None
  stop: threading.Event | None = None
  filtered: bool = False
  sequence: int = 0


_STATE = _State()


class ProcessError(RuntimeError):
  """This process could not join, or agree with, the other processes of its job."""


class ProcessFailed(RuntimeError):
  """Another process of the job failed with an error it told this one about."""


def num_processes() -> int:
  """Processes in the job (1 unless :func:`initialize` joined several)."""
  return _STATE.num_processes


def process_id() -> int:
  """This process's index in ``[0, num_processes())``."""
  return _STATE.process_id


def is_writer() -> bool:
  """Whether this process writes the run's files: process 0 (or the only process)."""
  return _STATE.process_id == 0


def cluster_process_count() -> int | None:
  """The process count of a cluster environment JAX detects (SLURM, Open MPI, ...), or None.

  Reads JAX's own cluster detection (the environment variables of the scheduler); None
  when none is detected. Opt-in methods (mpi4py) are not tried.
  """
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top
    for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
      if not env.opt_in_only_method and env.is_env_present():
        return int(env.get_process_count())
  except Exception:  # pylint: disable=broad-except  # another JAX version: no detection
    return None
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout: int = DEFAULT_TIMEOUT,
               prog: str = "jrelu") -> bool:
  """Joins this process to the others of its job; call it before any JAX computation.

  With none of ``coordinator_address``, ``num_processes``, ``process_id`` given, a
  cluster environment that JAX detects (SLURM's ``srun``, Open MPI's ``mpirun``) supplies
  them when it runs more than one process; otherwise this is one process alone and
  nothing happens.

  Args:
    coordinator_address: ``host:port`` of process 0, where JAX's coordination service
      listens (every process gives the same).
    num_processes: N >= 1.
    process_id: this process's index in ``[0, N)``.
    timeout: seconds (>= 1) to wait for the others to join, and without heartbeats
      before a process counts as lost.
    prog: the program name that starts every error line.

  Returns:
    True when this process is one of several.

  Raises:
    ProcessError: in one line, when the values are inconsistent, the coordinator cannot
      be reached or the others do not join within ``timeout``, or the processes were
      started with different ``num_processes``.
    ValueError: for a ``timeout`` that is not an integer >= 1.
  """
  timeout = _checks.integer("timeout", timeout)
  given = (coordinator_address, num_processes, process_id)
  if all(v is None for v in given):
    count = cluster_process_count()
    if count is None or count <= 1:
      return False
  elif num_processes == 1 and not coordinator_address and process_id in (None, 0):
    return False
  if _STATE.client is not None:
    raise ProcessError("this process has already joined its job")
  if num_processes is not None and (isinstance(num_processes, bool)
                                    or not isinstance(num_processes, int)
                                    or num_processes < 1):
    raise ProcessError(f"num_processes={num_processes!r}: must be an integer >= 1")
  if process_id is not None and num_processes is not None and not (
      isinstance(process_id, int) and 0 <= process_id < num_processes):
    raise ProcessError(f"process_id={process_id!r}: must be in [0, {num_processes}) for "
                       f"num_processes={num_processes}")
  if any(v is None for v in given) and cluster_process_count() is None:
    missing = [n for n, v in zip(("coordinator_address", "num_processes", "process_id"),
                                 given) if v is None]
    raise ProcessError(f"{', '.join(missing)} not given, and no cluster environment "
                       "(SLURM, Open MPI) to read them from: give all three")
  _STATE.prog = prog
  # gloo carries the collectives between processes on CPU (XLA's default CPU collectives
  # only reach devices of one process). Recoverability keeps JAX from aborting every
  # process when one stops sending heartbeats, so that the watchdog can report it.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_enable_recoverability", True)
  # JAX's preemption service takes SIGTERM for itself; jrelu.experiment.run handles it.
  jax.config.update("jax_enable_preemption_service", False)
  where = coordinator_address or "the cluster's coordinator"
  who = f"process {process_id}" if process_id is not None else "this process"
  cannot_join = (f"{who} of {num_processes if num_processes is not None else '?'} could "
                 f"not join the job at {where} within {timeout} s")
  advice = ("start every process with the same --num_processes and --coordinator_address, "
            "and check that process 0 runs and its address is reachable")
  if process_id and coordinator_address:
    # JAX's client aborts the process when the coordinator never answers; a plain TCP
    # connection tells first, in a clean error.
    if not _reachable(coordinator_address, timeout):
      raise ProcessError(f"{cannot_join} (nothing listens at {coordinator_address}); "
                         f"{advice}")
  _start_stderr_filter(f"{cannot_join} ({{status}}); {advice}")
  try:
    jax.distributed.initialize(
        coordinator_address, num_processes, process_id, initialization_timeout=timeout,
        heartbeat_timeout_seconds=timeout, shutdown_timeout_seconds=timeout)
  except Exception as e:  # pylint: disable=broad-except  # JAX raises several kinds
    raise ProcessError(f"{cannot_join} ({_first_line(e)}); {advice}") from None
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  state = distributed.global_state
  _STATE.client = state.client
  _STATE.num_processes = state.num_processes
  _STATE.process_id = state.process_id
  _STATE.coordinator_address = state.coordinator_address
  _STATE.timeout = timeout
  _STATE.stop = threading.Event()
  if _STATE.filtered:  # from here on, a fatal end means a lost process (see _FILTER)
    os.write(2, (f"{_JOINED} {_STATE.process_id} {_STATE.num_processes} "
                 f"{_STATE.coordinator_address}\n").encode())
  # Every process says how many processes it was started with. The job has process 0's
  # count (its coordination service waited for that many); a process started with a
  # larger count still joins it (one with a smaller count makes the others time out).
  key = _key("num_processes")
  _STATE.client.key_value_set(f"{key}/{_STATE.process_id}", str(_STATE.num_processes))
  if is_writer():
    counts = [int(_STATE.client.blocking_key_value_get(f"{key}/{i}", timeout * 1000))
              for i in range(_STATE.num_processes)]
    _STATE.client.key_value_set(f"{key}/all", json.dumps(counts))
  else:
    counts = json.loads(_STATE.client.blocking_key_value_get(f"{key}/all", timeout * 1000))
  _STATE.num_processes = counts[0]
  if len(set(counts)) > 1:
    finish()
    started = ", ".join(f"process {i} with num_processes={c}" for i, c in enumerate(counts))
    raise ProcessError(f"the processes were started with different --num_processes "
                       f"({started}); start every process with the same "
                       "--num_processes")
  threading.Thread(target=_watch, args=(_STATE.stop,), name="jrelu-watchdog",
                   daemon=True).start()
  # At exit (an uncaught exception included) the watchdog stops first: JAX's own exit
  # handler, registered earlier and so run later, then leaves the job.
  atexit.register(_STATE.stop.set)
  return True


def _reachable(address: str, timeout: float) -> bool:
  """Whether a TCP connection to ``host:port`` succeeds within ``timeout`` seconds."""
  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + timeout
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=1):
        return True
    except (OSError, ValueError):
      if time.monotonic() >= deadline:
        return False
      time.sleep(0.2)


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _die(message: str) -> None:
  """Writes one error line and ends this process at once (a collective may be stuck)."""
  line = (f"{_STATE.prog}: error: process {_STATE.process_id} of "
          f"{_STATE.num_processes}: {message}\n")
  os.write(2, line.encode())
  os._exit(LOST_EXIT_STATUS)  # pylint: disable=protected-access


def _watch(stop: threading.Event) -> None:
  """Watchdog thread: ends this process with one line when another process is lost.

  ``get_live_nodes`` returns once every live process has asked (its heartbeats decide who
  is alive), so all watchdogs meet at each poll; a lost process is left out once the
  coordination service has missed its heartbeats for ``timeout`` seconds.
  """
  everyone = list(range(_STATE.num_processes))
  interval = min(2.0, max(0.2, _STATE.timeout / 10))
  while not stop.wait(interval):
    try:
      live = _STATE.client.get_live_nodes(everyone)
    except Exception as e:  # pylint: disable=broad-except
      if stop.is_set():
        return
      _die(f"lost the coordinator, process 0 at {_STATE.coordinator_address} "
           f"({_first_line(e)}); rerun the same command to resume from the last "
           "checkpoint")
    if stop.is_set():
      return
    if _STATE.process_id not in live:
      _die(f"lost contact with the job's coordination service (no heartbeat for "
           f"{_STATE.timeout} s); rerun the same command to resume from the last checkpoint")
    lost = [i for i in everyone if i not in live]
    if lost:
      names = ", ".join(str(i) for i in lost)
      _die(f"lost process {names} (no heartbeat for {_STATE.timeout} s); rerun the same "
           "command to resume from the last checkpoint")


def wait_for_lost_process() -> None:
  """After an error inside a collective, waits up to ``timeout`` seconds to name its cause.

  A collective fails in a surviving process when another process of the job is lost;
  meanwhile the watchdog (or JAX's runtime, for process 0) ends this process with the
  one line that names the lost process. Returns when no process turned out lost, so that
  the caller reports its error; at once with one process.
  """
  if _STATE.client is None:
    return
  _STATE.stop.wait(_STATE.timeout + 5)


def _key(name: str) -> str:
  _STATE.sequence += 1
  return f"jrelu/{_STATE.sequence}/{name}"


def broadcast(value, name: str = "value"):
  """Process 0's ``value`` (JSON-able), returned on every process.

  Every process must call it, in the same order as its other calls of this module.
  """
  if _STATE.client is None:
    return value
  key = _key(name)
  if is_writer():
    _STATE.client.key_value_set(key, json.dumps(value))
    return value
  return json.loads(_STATE.client.blocking_key_value_get(key, _WAIT_MS))


def allgather(value, name: str = "value", timeout_ms: int = _WAIT_MS) -> list:
  """Every process's ``value`` (JSON-able), as a list by process index, on every process.

  Every process must call it, in the same order as its other calls of this module.
  """
  if _STATE.client is None:
    return [value]
  key = _key(name)
  _STATE.client.key_value_set(f"{key}/{_STATE.process_id}", json.dumps(value))
  return [json.loads(_STATE.client.blocking_key_value_get(f"{key}/{i}", timeout_ms))
          for i in range(_STATE.num_processes)]


def barrier(name: str = "barrier") -> None:
  """Returns once every process has called it (a no-op for one process)."""
  if _STATE.client is not None:
    _STATE.client.wait_at_barrier(_key(name), _WAIT_MS)


def finish() -> None:
  """Waits for every process to get here, stops the watchdog, leaves the job.

  Call it at the end of a process's work (also after an error every process shares):
  JAX's shutdown does not wait for the others once a job tolerates lost processes, and
  process 0's coordination service must outlive the others' last calls, so process 0
  leaves last. A process lost meanwhile is reported by the watchdog; the wait is bounded
  by ``timeout``.
  """
  if _STATE.client is None:
    return
  try:
    _STATE.client.wait_at_barrier(_key("finish"), _STATE.timeout * 1000)
  except Exception as e:  # pylint: disable=broad-except
    _die(f"the other processes did not finish within {_STATE.timeout} s "
         f"({_first_line(e)})")
  _STATE.stop.set()
  if is_writer():
    # Process 0's coordination service must outlive the others' disconnection: asked
    # once the others have stopped asking, get_live_nodes returns when they are gone.
    for _ in range(10):
      try:
        if len(_STATE.client.get_live_nodes(list(range(_STATE.num_processes)))) <= 1:
          break
      except Exception:  # pylint: disable=broad-except
        break
  jax.distributed.shutdown()
  _STATE.client = None


def host_array(x):
  """The whole value of a jax array (numpy) on every process; every process must call it.

  A fully addressable array is copied; one spread over processes is all-gathered with
  ``jax.experimental.multihost_utils.process_allgather`` (a collective).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# The stderr filter: JAX's runtime ends a process that cannot reach its coordinator with a
# fatal log (a status and a stack trace, many lines). The filter passes every other line
# through unchanged and turns that message into one line: before this process joined
# (the marker line _JOINED, swallowed, says when), the reason it could not join; after, the
# process it lost.
_JOINED = "\x1ejrelu-joined"
_FILTER = r"""
import os, re, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
prog, marker, cannot_join = sys.argv[1], sys.argv[2].encode(), sys.argv[3]
out = sys.stdout.buffer
joined = None
fatal = []
pending = b""
def emit(line):
  global joined
  if fatal:
    fatal.append(line)
  elif line.startswith(marker):
    joined = line[len(marker):].decode().split()
  elif b"Terminating process because the JAX distributed service" in line:
    fatal.append(line)
  elif b"Polled an error from coordination service" not in line:
    out.write(line)
    out.flush()
while True:
  try:
    chunk = os.read(0, 65536)
  except InterruptedError:
    continue
  if not chunk:
    break
  pending += chunk
  *lines, pending = pending.split(b"\n")
  for line in lines:
    emit(line + b"\n")
if pending:
  emit(pending)
if fatal:
  text = b"".join(fatal).decode(errors="replace")
  status = re.search(r"absl::Status: ([^\n]*)", text)
  status = status.group(1) if status else "no status"
  cut = status.find(". ", 20)
  status = status[:cut] if cut > 0 else status[:200]
  if joined is None:
    line = f"{prog}: error: {cannot_join.replace('{status}', status)}"
  else:
    me, n, coordinator = joined
    unhealthy = re.search(r"unhealthy[^\n]*:\s*\n\s*([0-9][0-9, \n]*)", text)
    if unhealthy:
      what = f"lost process {', '.join(unhealthy.group(1).split())} (no heartbeat)"
    elif "coordination service" in status or "leader" in status:
      what = f"lost the coordinator, process 0 at {coordinator}"
    else:
      what = "JAX's distributed runtime ended this process"
    line = (f"{prog}: error: process {me} of {n}: {what} ({status}); rerun the same "
            "command to resume from the last checkpoint")
  out.write(line.encode() + b"\n")
  out.flush()
"""


def _start_stderr_filter(cannot_join: str) -> None:
  """Routes this process's stderr (fd 2) through :data:`_FILTER` in a small subprocess.

  The subprocess outlives this process by a moment (it ends at the end of its input),
  so it can still report this process's fatal end. ``cannot_join`` is the line for a
  fatal end before joining (``{status}`` stands for JAX's reason). Set
  ``JRELU_RAW_STDERR=1`` to keep stderr as it is; a failure to start the filter keeps it
  too.
  """
  if os.environ.get("JRELU_RAW_STDERR"):
    return
  sys.stderr.flush()
  real_stderr = os.dup(2)
  try:
    filt = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _FILTER, _STATE.prog, _JOINED, cannot_join],
        stdin=subprocess.PIPE, stdout=real_stderr, close_fds=True)
  except OSError:
    return
  finally:
    os.close(real_stderr)
  os.dup2(filt.stdin.fileno(), 2)
  filt.stdin.close()
  _STATE.filtered = True
