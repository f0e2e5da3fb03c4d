"""Shared helpers of the benchmark binaries: flags, machine facts, timing statistics, output.

Every binary of ``benchmarks`` defines its flags in a ``define_flags(flag_values)``
function (called on ``absl.flags.FLAGS`` only when it runs, so that all of them can be
imported into one process) and runs through :func:`run_main` (a bad flag is one line
``benchmarks.NAME: error: ...`` on stderr and exit status 2, no traceback, as in
``jrelu.train``), records :func:`machine_info` in its JSON and ends by printing exactly one
JSON line (:func:`print_json_line`). :func:`stats` and :func:`read_roofline` serve the
timing benchmarks. Files are written with ``jrelu.experiment.write_json`` (atomic, strict
JSON).
"""

from __future__ import annotations

import ctypes
import json
import logging as std_logging
import math
import os
import re
import select
import subprocess
import sys

from absl import app
from absl import flags
import jax

from jrelu import experiment
from jrelu import parallel

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The name error lines start with, e.g. "benchmarks.reproduce"; set by run_main.
_prog = "benchmarks"


def fail(message: str, status: int = 2):
  """Prints ``PROG: error: message`` on stderr and exits with ``status``; no traceback.

  ``PROG`` is the binary's module name given to :func:`run_main`.

  Raises:
    SystemExit: always, with ``status``.
  """
  sys.stderr.write(f"{_prog}: error: {message}\n")
  sys.stderr.flush()
  sys.exit(status)


def parse_flags(argv, flag_values: flags.FlagValues = flags.FLAGS):
  """absl flag parsing that reports a bad flag or a stray argument in one line (exit 2).

  :func:`run_main` parses ``flags.FLAGS`` with it; a test parses a private
  ``flags.FlagValues()`` holding a binary's ``define_flags``, through the same error lines.

  Args:
    argv: the command line, program name first.
    flag_values: the flags to parse into (default ``absl.flags.FLAGS``).

  Returns:
    The remaining arguments (the program name only).

  Raises:
    SystemExit: with status 2 after one error line, for a bad flag or an argument.

  Example:
    >>> values = flags.FlagValues()
    >>> _ = flags.DEFINE_integer("dim", 10, "d", lower_bound=1, flag_values=values)
    >>> parse_flags(["benchmarks.x", "--dim=0"], values)  # doctest: +SKIP
    (stderr) benchmarks: error: flag --dim=0: 0 is not a positive integer
    SystemExit: 2
  """
  try:
    rest = flag_values(argv)
  except flags.Error as e:
    fail(str(e).splitlines()[0])
  if len(rest) > 1:
    fail(f"unexpected arguments {rest[1:]}; every setting is a --flag")
  return rest


def run_main(main, prog: str) -> None:
  """``absl.app.run(main)`` with one-line flag errors and quiet JAX / matplotlib loggers.

  Args:
    main: the absl main, ``main(argv)``.
    prog: the binary's module name, e.g. ``"benchmarks.reproduce"``, the prefix of
      :func:`fail`'s error lines.
  """
  global _prog
  _prog = prog
  for noisy in ("jax._src.xla_bridge", "matplotlib"):
    std_logging.getLogger(noisy).setLevel(std_logging.WARNING)
  app.run(main, flags_parser=parse_flags)


def int_list(text: str, name: str) -> list[int]:
  """Parses a comma-separated list of positive integers (``1e6`` allowed).

  Raises:
    ValueError: naming the flag and the bad value.
  """
  out = []
  for item in filter(None, (t.strip() for t in text.split(","))):
    try:
      value = float(item)
    except ValueError:
      value = float("nan")
    if not math.isfinite(value) or value < 1 or value != int(value):
      raise ValueError(f"flag --{name}={text}: {item!r} is not a positive integer")
    out.append(int(value))
  if not out:
    raise ValueError(f"flag --{name}={text}: empty list")
  return out


def cpu_model() -> str:
  """The CPU model name from /proc/cpuinfo ("unknown" if unreadable)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return "unknown"


def cpu_cores() -> int:
  """CPU cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _size_bytes(text: str) -> int:
  match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text, re.IGNORECASE)
  if not match:
    return 0
  scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2).upper()]
  return int(match.group(1)) * scale


def llc_bytes() -> int:
  """Size of the last-level cache in bytes (sysfs; then lscpu; 32 MiB if neither works)."""
  best_level, best = -1, 0
  base = "/sys/devices/system/cpu/cpu0/cache"
  try:
    for entry in sorted(os.listdir(base)):
      if not entry.startswith("index"):
        continue
      with open(os.path.join(base, entry, "level")) as f:
        level = int(f.read())
      with open(os.path.join(base, entry, "size")) as f:
        size = _size_bytes(f.read())
      if level > best_level and size:
        best_level, best = level, size
  except (OSError, ValueError):
    pass
  if best:
    return best
  try:
    out = subprocess.run(["lscpu", "-B"], capture_output=True, text=True, timeout=10).stdout
    for line in out.splitlines():
      if line.startswith("L3 cache:"):
        return int(line.split(":", 1)[1].split()[0])
  except (OSError, ValueError, subprocess.SubprocessError):
    pass
  return 32 << 20


# glibc's mallopt parameters (malloc.h) and the largest block kept in the process.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP_BYTES = 1 << 30
_kept_freed_memory = False


def keep_freed_memory() -> bool:
  """Makes glibc's malloc keep freed blocks of up to 1 GiB for reuse, here and in children.

  XLA on CPU allocates every call's outputs and temporaries with ``malloc``. By default
  glibc serves a block over its mmap threshold (at most 32 MiB) with fresh pages from the
  kernel and returns them on ``free``, so each call of a codec on 1e7 float32 coordinates
  faults in its 40 MB output anew: 23 ms on the 2-core development VM, more than signSGD's
  whole decode (2.3 ms once the pages are reused). Raising the mmap and trim thresholds
  (``mallopt``, and the ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``
  environment variables for child processes) lets repeat calls reuse the memory, as a
  training loop's steps would with a caching allocator; the price is that freed memory
  stays in the process (its peak RSS is kept).

  Returns:
    True if applied (glibc), False where the C library has no ``mallopt``; the state is
    recorded by :func:`machine_info` as ``keeps_freed_memory``.

  Example:
    >>> keep_freed_memory()
    True
  """
  global _kept_freed_memory
  try:
    libc = ctypes.CDLL(None)
    applied = (libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES) == 1
               and libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES) == 1)
  except (OSError, AttributeError):
    applied = False
  if applied:
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(_KEEP_BYTES)
    os.environ["MALLOC_TRIM_THRESHOLD_"] = str(_KEEP_BYTES)
  _kept_freed_memory = applied
  return applied


# glibc's tunable (2.35 and later) that makes malloc ask the kernel for transparent huge
# pages (madvise) on the memory it gets, and the kernel's file that says whether it gives
# them ("always", "madvise" or "never").
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
_THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def transparent_huge_pages() -> str | None:
  """The kernel's transparent huge page mode: ``"always"``, ``"madvise"``, ``"never"``,
  or None where the kernel does not say (not Linux, or no THP).

  Example:
    >>> transparent_huge_pages()
    'madvise'
  """
  try:
    with open(_THP_MODE_FILE) as f:
      chosen = re.search(r"\[(\w+)\]", f.read())
  except OSError:
    return None
  return chosen.group(1) if chosen else None


def malloc_asks_for_huge_pages(environ=None) -> bool:
  """Whether malloc asks for transparent huge pages and may get them, in a process with
  the environment ``environ`` (default: this one's): glibc 2.35 or later,
  ``HUGE_PAGES_TUNABLE`` in ``GLIBC_TUNABLES``, and a kernel mode of ``always`` or
  ``madvise``. Recorded by :func:`machine_info` as ``malloc_huge_pages``.

  Example:
    >>> malloc_asks_for_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    True
  """
  environ = os.environ if environ is None else environ
  libc = os.confstr("CS_GNU_LIBC_VERSION") if "CS_GNU_LIBC_VERSION" in os.confstr_names else ""
  version = re.fullmatch(r"glibc (\d+)\.(\d+).*", libc or "")
  return (bool(version) and (int(version.group(1)), int(version.group(2))) >= (2, 35)
          and HUGE_PAGES_TUNABLE in environ.get("GLIBC_TUNABLES", "").split(":")
          and transparent_huge_pages() in ("always", "madvise"))


def rerun_with_huge_pages() -> None:
  """Starts this process again, same command line, with malloc asking for huge pages.

  XLA on CPU allocates its buffers with ``malloc``, which by default gets 4 KiB pages;
  NumPy asks for transparent huge pages (``madvise``) for its large arrays, so the
  roofline's streaming read had them and the codecs' buffers did not. On the 2-core
  development VM (kernel mode ``madvise``) the codecs that stream 40 MB per call ran
  slower without huge pages, by an amount that changed from one process to the next
  (TernGrad at d = 1e7: 0.95 to 1.36 GB/s in three fresh processes), and with the tunable
  sign, TernGrad and QSGD ran 1.4 to 1.6x faster (two benchmark runs each way; FO-SGD
  about the same). TLB misses are the likely cause; they were not measured. Setting ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` must
  happen before the process starts, hence the new start (``os.execve``); children
  inherit it. A training process gains the same way from that environment variable.

  Returns only where it does not start again: the tunable is already set, glibc is older
  than 2.35 or absent, or the kernel gives no huge pages (mode ``never`` or unknown).

  Example:
    >>> rerun_with_huge_pages()   # first thing in a binary's main, before JAX runs
    >>> malloc_asks_for_huge_pages()   # reached in the new process (or where it cannot)
    True
  """
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if HUGE_PAGES_TUNABLE in tunables.split(":"):
    return
  env = dict(os.environ, GLIBC_TUNABLES=":".join(t for t in (tunables, HUGE_PAGES_TUNABLE)
                                                  if t))
  if not malloc_asks_for_huge_pages(env):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)


def machine_info() -> dict:
  """jax version, backend, device count, CPU model, cores and LLC bytes, for every JSON."""
  return {
      "jax_version": jax.__version__,
      "backend": jax.default_backend(),
      "device_count": jax.device_count(),
      "cpu_model": cpu_model(),
      "cpu_cores": cpu_cores(),
      "llc_bytes": llc_bytes(),
      "python": sys.version.split()[0],
      "keeps_freed_memory": _kept_freed_memory,
      "malloc_huge_pages": malloc_asks_for_huge_pages(),
      "transparent_huge_pages": transparent_huge_pages(),
  }


def stats(samples) -> dict:
  """Median, min, max and quartiles of a list of numbers (e.g. steps per second).

  Returns:
    ``{"median", "min", "max", "q25", "q75", "n"}``; values are None for an empty list.
  """
  xs = sorted(float(s) for s in samples)
  if not xs:
    return {"median": None, "min": None, "max": None, "q25": None, "q75": None, "n": 0}

  def quantile(q):
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

  return {"median": quantile(0.5), "min": xs[0], "max": xs[-1], "q25": quantile(0.25),
          "q75": quantile(0.75), "n": len(xs)}


_PROBE_CODE = """
import json, sys, time
import numpy as np
rows, dim, total, matvecs = (int(a) for a in sys.argv[1:5])
slices = max(2, -(-total // (rows * dim * 4)))
x = np.random.default_rng(0).standard_normal((slices * rows, dim), np.float32)
w = np.ones(dim, np.float32)
i = 0
print(json.dumps({"slices": slices, "array_bytes": x.nbytes}), flush=True)
for line in sys.stdin:
  start = time.perf_counter()
  for _ in range(matvecs):
    s = i % slices
    i += 1
    x[s * rows:(s + 1) * rows] @ w
  print((time.perf_counter() - start) / matvecs, flush=True)
"""


class RooflineProbe:
  """A NumPy float32 matvec over fresh ``[rows, dim]`` slices streamed from memory, on call.

  A subprocess with ``OPENBLAS_NUM_THREADS=threads`` (the BLAS thread count is fixed when
  NumPy loads) holds an array of ``max(array_bytes, 2 rows dim 4)`` bytes, ``array_bytes``
  chosen larger than the last-level cache; successive matvecs read successive slices,
  cycling, so each streams its slice from main memory. Each :meth:`measure` runs
  ``matvecs`` of them, so a benchmark can time the roofline in the same rounds as what it
  compares with it (machine speed drifts between minutes).

  Args:
    rows: slice rows (the global batch B).
    dim: columns (d).
    threads: BLAS threads.
    array_bytes: minimum size of the whole array in bytes.
    matvecs: matvecs per measurement.
    timeout: seconds to wait for the subprocess to start or answer.

  Raises:
    RuntimeError: when the subprocess fails to start or to answer.

  Example:
    >>> with RooflineProbe(4096, 1000, 2, 1 << 27) as probe:
    ...   seconds_per_matvec = probe.measure()
  """

  def __init__(self, rows: int, dim: int, threads: int, array_bytes: int,
               matvecs: int = 20, timeout: float = 300.0):
    self.rows, self.dim, self.threads, self.timeout = rows, dim, threads, timeout
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    self._proc = subprocess.Popen(
        [sys.executable, "-c", _PROBE_CODE, str(rows), str(dim), str(array_bytes),
         str(matvecs)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=env)
    header = json.loads(self._read_line())
    self.slices, self.array_bytes = header["slices"], header["array_bytes"]

  def _read_line(self) -> str:
    ready, _, _ = select.select([self._proc.stdout], [], [], self.timeout)
    line = self._proc.stdout.readline() if ready else ""
    if not line:
      self.close()
      raise RuntimeError(f"roofline probe ({self.threads} thread(s)) did not answer: "
                         f"{(self._proc.stderr.read() or 'timeout')[-300:]}")
    return line

  def measure(self) -> float:
    """Seconds per matvec, averaged over one batch of ``matvecs``."""
    self._proc.stdin.write("t\n")
    self._proc.stdin.flush()
    return float(self._read_line())

  def close(self):
    """Stops the subprocess (idempotent)."""
    if self._proc.poll() is None:
      self._proc.kill()
      self._proc.wait()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def summary(self, seconds: list[float]) -> dict:
    """``{"threads", "array_bytes", "slices", "seconds", "gbytes_per_second"}`` (stats)."""
    return {"threads": self.threads, "array_bytes": self.array_bytes, "slices": self.slices,
            "seconds": stats(seconds),
            "gbytes_per_second": stats([self.rows * self.dim * 4 / t / 1e9 for t in seconds])}


def read_roofline(rows: int, dim: int, threads: int, repeats: int, array_bytes: int,
                  matvecs: int = 20, timeout: float = 300.0) -> dict:
  """Times :class:`RooflineProbe` ``repeats`` times after one warm-up measurement.

  Args:
    rows, dim, threads, array_bytes, matvecs, timeout: as for :class:`RooflineProbe`.
    repeats: timed measurements.

  Returns:
    :meth:`RooflineProbe.summary` of the timed measurements (seconds per matvec), or
    ``{"threads", "error"}`` when the probe fails.
  """
  try:
    with RooflineProbe(rows, dim, threads, array_bytes, matvecs, timeout) as probe:
      probe.measure()
      return probe.summary([probe.measure() for _ in range(repeats)])
  except (RuntimeError, OSError, ValueError) as e:
    return {"threads": threads, "error": f"{type(e).__name__}: {e}"}


def pyplot():
  """matplotlib.pyplot with the Agg backend, or None when matplotlib is missing.

  The one place the benchmarks import matplotlib (an optional dependency).
  """
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return plt



def mode_defaults(mode: dict, given: dict, names=None) -> dict:
  """``given``'s values for the keys of ``mode``, ``mode``'s where a value is None or absent.

  Args:
    mode: a benchmark mode's defaults (its ``QUICK`` or ``FULL`` table).
    given: values from flags; None means "the mode's default".
    names: keep only these keys of ``mode`` (default: all).

  Returns:
    A dict over the kept keys of ``mode``.

  Example:
    >>> mode_defaults({"repeats": 7}, {"repeats": None})
    {'repeats': 7}
  """
  return {k: (mode[k] if given.get(k) is None else given[k])
          for k in mode if names is None or k in names}


def make_outdir(path: str) -> str:
  """Creates ``--outdir`` (and parents); a failure is one error line naming the flag.

  Args:
    path: the directory.

  Returns:
    ``path``.

  Raises:
    SystemExit: with status 2 after one error line when it cannot be created.
  """
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    fail(f"flag --outdir={path}: cannot create it ({e.strerror or e})")
  return path


def setup_devices(num_devices):
  """``jrelu.parallel.setup_devices`` with a bad ``--num_devices`` as one error line.

  Args:
    num_devices: N, or None for all accelerators or 8 simulated CPU devices.

  Returns:
    The list of devices.

  Raises:
    SystemExit: with status 2 after one error line naming ``--num_devices``.
  """
  try:
    return parallel.setup_devices(num_devices)
  except ValueError as e:
    fail(f"flag --num_devices={num_devices}: {e}")



def print_json_line(obj) -> None:
  """Prints the binary's one JSON line on stdout (strict JSON: NaN and inf become null).

  Args:
    obj: the result, JSON values (``jrelu.experiment.json_safe`` replaces NaN and inf).

  Raises:
    TypeError: for a value JSON cannot hold (convert NumPy values with ``float``/``int``).
  """
  sys.stdout.write(json.dumps(experiment.json_safe(obj), sort_keys=True, allow_nan=False)
                   + "\n")
  sys.stdout.flush()

