"""The ``scale`` section of step_throughput: d = 1e6 with online sampling, in a fresh process.

Fresh Gaussian batches drawn on the devices every step (no stored data set) and QSGD for a
few steps: peak memory (``ru_maxrss``) and steps per second.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks import common
from benchmarks.step_throughput import settings
from jrelu import experiment
from jrelu import parallel
from jrelu import planted
from jrelu import sampling
from jrelu import wire


def scale_section(dim, batch_size, steps, n_dev) -> dict:
  """A few QSGD steps at ``dim`` with batches drawn on the devices; peak RSS, steps/s.

  Meant to run in a fresh process (:func:`scale_in_subprocess`), so that the peak RSS is
  the scale run's.

  Args:
    dim: d.
    batch_size: global B (divisible by ``n_dev``).
    steps: timed steps (after one warm-up step).
    n_dev: N.

  Returns:
    ``{"dim", "batch_size", "num_devices", "steps_per_second", "peak_rss_bytes",
    "wire_bits_per_step_per_device", ...}``.
  """
  devices = parallel.setup_devices(n_dev)
  method = settings.METHODS[settings.TARGET_METHOD]
  w_star = planted.sample_w_star(jax.random.key(0), dim)
  # Online SGD with B << d is stable for a step size of order B / d (the gradient noise
  # grows like d / B), so the scale run uses 0.5 B / (B + d): the error then decreases.
  learning_rate = method.learning_rate * batch_size / (batch_size + dim)
  tx = experiment.make_tx(method.config(learning_rate=learning_rate), jax.random.key(2),
                          n_dev)
  batch_fn = sampling.make_online_batch_fn(batch_size, planted.sample_batch)
  step = parallel.make_step(planted.loss, batch_fn, tx, metrics_fn=planted.metrics_fn)
  state = parallel.init_state(jnp.zeros((dim,), jnp.float32), tx)
  state, data, key = parallel.replicate((state, (None, w_star), jax.random.key(3)), devices)
  start = time.perf_counter()
  run = parallel.pmapped(step, devices).lower(state, data, key).compile()
  compile_seconds = time.perf_counter() - start
  bits = wire.parse(run.as_text())
  state, metrics = jax.block_until_ready(run(state, data, key))  # warm-up step
  rates, errors = [], [float(metrics["relative_error"][0])]
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = jax.block_until_ready(run(state, data, key))
    rates.append(1.0 / (time.perf_counter() - start))
    errors.append(float(metrics["relative_error"][0]))
  return {
      "dim": dim, "batch_size": batch_size, "num_devices": n_dev, "path": "pmap",
      "method": settings.TARGET_METHOD,
      "sampling": "online (jrelu.sampling.make_online_batch_fn)",
      "learning_rate": learning_rate,
      "input_bytes_per_step": batch_size * dim * 4,
      "steps_per_second": common.stats(rates), "compile_seconds": compile_seconds,
      "relative_error_after_each_step": errors,
      "wire_bits_per_step_per_device": bits.sent_bits,
      # ru_maxrss survives execve on Linux (it starts at the parent's peak), so the
      # parent starts this process before it allocates much; VmHWM is this process's own.
      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      "vm_hwm_bytes": _vm_hwm_bytes(),
      "machine_memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
  }


def _vm_hwm_bytes():
  """Peak resident set of this process (VmHWM of /proc/self/status), or None."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  return None


def scale_in_subprocess(outdir: str, num_devices: int, dim: int, batch_size: int,
                        steps: int) -> dict:
  """Runs ``python -m benchmarks.step_throughput --sections=scale`` in a fresh process.

  So that ``ru_maxrss`` is the scale run's, not this process's.

  Args:
    outdir: the child's ``--outdir``.
    num_devices: N.
    dim: d.
    batch_size: global B.
    steps: timed steps.

  Returns:
    The child's :func:`scale_section`, or ``{"error": ...}`` when it failed.
  """
  argv = [sys.executable, "-m", "benchmarks.step_throughput", "--sections=scale",
          f"--outdir={outdir}", f"--num_devices={num_devices}", f"--scale_dim={dim}",
          f"--scale_batch_size={batch_size}", f"--scale_steps={steps}"]
  env = dict(os.environ, PYTHONPATH=common.REPO_ROOT + os.pathsep
             + os.environ.get("PYTHONPATH", ""))
  try:
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800,
                          cwd=common.REPO_ROOT)
    return json.loads(proc.stdout.strip().splitlines()[-1])["scale"]
  except (subprocess.SubprocessError, ValueError, IndexError, KeyError) as e:
    err = proc.stderr.strip().splitlines()[-3:] if "proc" in locals() else []
    return {"error": f"{type(e).__name__}: {e} {' '.join(err)}"[:500]}
