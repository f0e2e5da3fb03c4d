"""Shared helpers of the benchmark binaries: flags, machine facts, timing statistics, output.

Every binary in ``benchmarks/`` runs through :func:`run_main` (a bad flag is one line
``NAME.py: error: ...`` on stderr and exit status 2, no traceback, as in ``jrelu.train``),
records :func:`machine_info` in its JSON and ends by printing exactly one JSON line
(:func:`print_json_line`). :func:`stats` and :func:`read_roofline` serve the timing
benchmarks.
"""

from __future__ import annotations

import json
import logging as std_logging
import math
import os
import re
import subprocess
import sys
import time

from absl import app
from absl import flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prog_name() -> str:
  """The running binary's file name, e.g. ``reproduce.py``."""
  return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "benchmark"


def fail(message: str, status: int = 2):
  """Prints ``NAME.py: error: message`` on stderr and exits with ``status``; no traceback."""
  sys.stderr.write(f"{prog_name()}: error: {message}\n")
  sys.stderr.flush()
  sys.exit(status)


def _parse_flags(argv):
  """absl flag parsing that reports a bad flag or a stray argument in one line (exit 2)."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e).splitlines()[0])
  if len(rest) > 1:
    fail(f"unexpected arguments {rest[1:]}; every setting is a --flag")
  return rest


def run_main(main) -> None:
  """``absl.app.run(main)`` with one-line flag errors and quiet JAX / matplotlib loggers."""
  for noisy in ("jax._src.xla_bridge", "matplotlib"):
    std_logging.getLogger(noisy).setLevel(std_logging.WARNING)
  app.run(main, flags_parser=_parse_flags)


def foreign_flags_present(module, allowed=()) -> list[str]:
  """Names of flags defined by ``module`` that were given on the command line.

  A benchmark that imports ``jrelu.train`` (for its Config) also gets its flags; this
  lets it reject those it does not use instead of silently ignoring them.

  Args:
    module: the module object that defined the flags (e.g. ``jrelu.train``).
    allowed: flag names the benchmark does use.

  Returns:
    Sorted names of present, not allowed flags (empty when none).
  """
  names = set()
  for flag in flags.FLAGS.get_flags_for_module(module.__name__):
    if flag.present and flag.name not in allowed:
      names.add(flag.name)
  return sorted(names)


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


def machine_info() -> dict:
  """jax version, backend, device count, CPU model, cores and LLC bytes, for every JSON."""
  import jax  # imported here so that torch-only helpers need not import JAX
  return {
      "jax_version": jax.__version__,
      "backend": jax.default_backend(),
      "device_count": jax.device_count(),
      "cpu_model": cpu_model(),
      "cpu_cores": cpu_cores(),
      "llc_bytes": llc_bytes(),
      "python": sys.version.split()[0],
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


def read_roofline(rows: int, dim: int, threads: int, repeats: int, array_bytes: int,
                  matvecs: int = 20, timeout: float = 300.0) -> dict:
  """Times a NumPy float32 matvec over fresh ``[rows, dim]`` slices streamed from memory.

  Runs in a subprocess with ``OPENBLAS_NUM_THREADS=threads`` (the BLAS thread count is
  fixed when NumPy loads). The array holds ``max(array_bytes, 2 rows dim 4)`` bytes,
  ``array_bytes`` being chosen larger than the last-level cache; successive matvecs
  read successive slices, cycling, so that each streams its slice from main memory.

  Args:
    rows: slice rows (the global batch B).
    dim: columns (d).
    threads: BLAS threads.
    repeats: timed repeats; each is the mean over ``matvecs`` matvecs.
    array_bytes: minimum size of the whole array in bytes.
    matvecs: matvecs per repeat.
    timeout: seconds before the subprocess is abandoned.

  Returns:
    ``{"threads", "array_bytes", "slices", "seconds": stats(...), "gbytes_per_second":
    stats(...)}`` (seconds per matvec), or ``{"threads", "error"}``.
  """
  code = (
      "import json, sys, time\n"
      "import numpy as np\n"
      "rows, dim, repeats, total, matvecs = (int(a) for a in sys.argv[1:6])\n"
      "slices = max(2, -(-total // (rows * dim * 4)))\n"
      "x = np.random.default_rng(0).standard_normal((slices * rows, dim), np.float32)\n"
      "w = np.ones(dim, np.float32)\n"
      "out, i = [], 0\n"
      "for r in range(repeats + 1):\n"
      "  start = time.perf_counter()\n"
      "  for _ in range(matvecs):\n"
      "    s = i % slices; i += 1\n"
      "    x[s * rows:(s + 1) * rows] @ w\n"
      "  out.append((time.perf_counter() - start) / matvecs)\n"
      "print(json.dumps({'slices': slices, 'array_bytes': x.nbytes, 'seconds': out[1:]}))\n")
  env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
             MKL_NUM_THREADS=str(threads))
  try:
    proc = subprocess.run(
        [sys.executable, "-c", code, str(rows), str(dim), str(repeats), str(array_bytes),
         str(matvecs)], capture_output=True, text=True, env=env, timeout=timeout)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
  except (subprocess.SubprocessError, ValueError, IndexError, OSError) as e:
    return {"threads": threads, "error": f"{type(e).__name__}: {e}"}
  seconds = result["seconds"]
  return {
      "threads": threads,
      "array_bytes": result["array_bytes"],
      "slices": result["slices"],
      "seconds": stats(seconds),
      "gbytes_per_second": stats([rows * dim * 4 / s / 1e9 for s in seconds]),
  }


def pyplot():
  """matplotlib.pyplot with the Agg backend, or None when matplotlib is missing."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  return plt


def json_safe(obj):
  """``obj`` as strict JSON values: numpy scalars and arrays become Python, NaN/inf None.

  A diverged training run reports a NaN relative error; JSON has no NaN.
  """
  if type(obj).__module__ == "numpy":
    obj = obj.tolist() if hasattr(obj, "tolist") else obj
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  if isinstance(obj, dict):
    return {str(k): json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_safe(v) for v in obj]
  return obj


def make_outdir(path: str) -> str:
  """Creates ``--outdir`` (and parents); a failure is one error line naming the flag."""
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    fail(f"flag --outdir={path}: cannot create it ({e.strerror or e})")
  return path


def setup_devices(num_devices):
  """``jrelu.parallel.setup_devices`` with a bad ``--num_devices`` as one error line."""
  from jrelu import parallel
  try:
    return parallel.setup_devices(num_devices)
  except ValueError as e:
    fail(f"flag --num_devices={num_devices}: {e}")


def write_json(path: str, obj) -> None:
  """Writes ``obj`` as indented strict JSON (see :func:`json_safe`), atomically."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(json_safe(obj), f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def print_json_line(obj) -> None:
  """Prints the binary's one JSON line on stdout (strict JSON, see :func:`json_safe`)."""
  sys.stdout.write(json.dumps(json_safe(obj), sort_keys=True) + "\n")
  sys.stdout.flush()


class Timer:
  """Wall-clock seconds since construction (``elapsed()``)."""

  def __init__(self):
    self._start = time.perf_counter()

  def elapsed(self) -> float:
    return time.perf_counter() - self._start
