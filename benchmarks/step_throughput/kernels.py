"""The ``kernels`` section of step_throughput: encode + decode throughput of each codec.

Every compressor of ``jrelu.compressors.REGISTRY`` (hyper-parameters from
``settings.KERNEL_KWARGS``), jitted on one device, in GB/s of float32 input.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import logging
import jax
import jax.numpy as jnp

from benchmarks import common
from benchmarks.step_throughput import settings
from jrelu import compressors


def _loop(codec, iters, key, x):
  """``iters`` encode + decode calls of ``codec`` on ``x`` in one compiled loop.

  ``x`` is carried by the loop, and after each call its first entry is updated in place
  by ``0 * (sum of the decoded output)``: the values stay the same, but XLA cannot hoist
  the codec out of the loop (``0 * s`` is not 0 for an infinite ``s``), which it would for
  a key-free codec, and the codec reads ``x`` from memory, as a training step's codec
  reads a gradient. (An earlier version passed ``x + 0 * acc`` to the codec, which made
  every codec pay for up to two copies of ``x`` per call that a training step does not
  make.)

  Returns:
    float32 scalar: the sum of every decoded output, times ``1e-30``.
  """
  def body(carry, i):
    acc, x = carry
    out = codec.decode(codec.encode(jax.random.fold_in(key, i), x))
    total = jnp.sum(out) * 1e-30
    return (acc + total, x.at[0].add(0 * total)), None

  return jax.lax.scan(body, (jnp.zeros((), jnp.float32), x), jnp.arange(iters))[0][0]


def time_codec(name: str, d: int, repeats: int, iters: int | None = None,
               call_seconds: float = 0.2, budget_seconds: float = 120.0) -> dict:
  """Seconds per encode + decode call of registry codec ``name`` at ``d`` (``_loop``).

  Args:
    name: a key of ``jrelu.compressors.REGISTRY`` (hyper-parameters: ``KERNEL_KWARGS``).
    d: the input size.
    repeats: timed calls of the loop.
    iters: codec calls per loop; None: one call is timed first, then about
      ``call_seconds`` per loop (a codec slower than ``budget_seconds / repeats`` per
      call is timed once, by that first call).
    call_seconds: see ``iters``.
    budget_seconds: see ``iters``.

  Returns:
    ``{"seconds": stats, "iters"}`` or ``{"error": ...}``.
  """
  try:
    codec = compressors.REGISTRY[name](**settings.KERNEL_KWARGS.get(name, {}))
    x = jax.random.normal(jax.random.key(1), (d,), jnp.float32)

    def compiled(n):
      fn = jax.jit(functools.partial(_loop, codec, n)).lower(jax.random.key(0), x).compile()
      fn(jax.random.key(0), x).block_until_ready()
      return fn

    if iters is None:
      fn = compiled(1)
      start = time.perf_counter()
      fn(jax.random.key(0), x).block_until_ready()
      first = time.perf_counter() - start
      if first * repeats > budget_seconds:
        return {"seconds": common.stats([first]), "iters": 1}
      iters = max(1, min(100, int(call_seconds / max(first, 1e-9))))
      if iters > 1:
        fn = compiled(iters)
    else:
      fn = compiled(iters)
    times = []
    for r in range(repeats):
      start = time.perf_counter()
      fn(jax.random.key(r), x).block_until_ready()
      times.append((time.perf_counter() - start) / iters)
  except Exception as e:  # a codec that cannot handle this size: recorded
    return {"error": f"{type(e).__name__}: {str(e)[:200]}"}
  return {"seconds": common.stats(times), "iters": iters}


def time_baseline(baseline: str, name: str, d: int, repeats: int,
                  call_seconds: float) -> dict:
  """:func:`time_codec` with the ``jrelu`` package of another checkout (``baseline``, a
  repository root), in a fresh process, with this checkout's harness.

  Returns:
    ``{"seconds": stats}`` or ``{"error": ...}``.
  """
  with tempfile.TemporaryDirectory() as place:
    os.symlink(os.path.join(os.path.abspath(baseline), "jrelu"), os.path.join(place, "jrelu"))
    code = ("import json, sys; from benchmarks import common; common.setup_devices(1); "
            "from benchmarks.step_throughput import kernels; "
            f"print(json.dumps(kernels.time_codec({name!r}, {d}, {repeats}, None, "
            f"{call_seconds})))")
    env = dict(os.environ, PYTHONPATH=common.REPO_ROOT)
    try:  # the current directory comes first on sys.path: jrelu is the baseline's
      proc = subprocess.run([sys.executable, "-c", code], cwd=place, env=env, timeout=1800,
                            capture_output=True, text=True)
      return json.loads(proc.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as e:
      err = proc.stderr.strip().splitlines()[-1:] if "proc" in locals() else []
      return {"error": f"{type(e).__name__}: {e} {' '.join(err)}"[:300]}


def kernel_section(dims, repeats, read_gbps, names=None, call_seconds: float = 0.2,
                   baseline: str | None = None) -> dict:
  """encode + decode GB/s (float32 input) per registry compressor, jitted, one device.

  Args:
    dims: the d values, ascending (a size over a minute per size stops the row).
    repeats: timed calls per size.
    read_gbps: the roofline's read bandwidth (GB/s) or None.
    names: registry names to time (None or empty: all).
    call_seconds: about how long one timed call should take (sets the loop length).
    baseline: a repository root (e.g. a checkout of the main branch) whose codecs are
      timed too, right after each of this checkout's, with the same loop, in a fresh
      process: a before/after comparison under the same machine conditions.

  Returns:
    ``{"read_gbytes_per_second", "kwargs": {name: kwargs}, "compressors": {name: [rows]}}``,
    a row per d with ``seconds``, ``gbytes_per_second``, ``fraction_of_read_bandwidth``
    (and with ``baseline``: ``baseline_seconds``, ``baseline_gbytes_per_second``,
    ``baseline_fraction_of_read_bandwidth``, or ``baseline_error``), or an ``error``.
  """
  out = {"read_gbytes_per_second": read_gbps, "kwargs": {}, "compressors": {},
         "baseline": baseline}

  def rates(seconds):
    gbps = 4 * d / seconds["median"] / 1e9
    return gbps, (gbps / read_gbps if read_gbps else None)

  for name, factory in compressors.REGISTRY.items():
    if names and name not in names:
      continue
    kwargs = settings.KERNEL_KWARGS.get(name, {})
    out["kwargs"][name] = kwargs
    rows = []
    out["compressors"][name] = rows
    try:
      factory(**kwargs)
    except (TypeError, ValueError) as e:
      rows.append({"error": f"{type(e).__name__}: {e} (add its kwargs to KERNEL_KWARGS)"})
      continue
    per_coordinate = None  # seconds per coordinate at the previous size
    for d in dims:
      # About 0.2 s per timed call: from the previous size's speed, else a guess.
      guess = per_coordinate * d if per_coordinate else d * 5e-9
      iters = max(1, min(100, int(call_seconds / max(guess, 1e-9))))
      timed = time_codec(name, d, repeats, iters)
      if "error" in timed:
        rows.append({"dim": d, "error": timed["error"]})
        break
      seconds = timed["seconds"]
      per_coordinate = seconds["median"] / d
      gbps, fraction = rates(seconds)
      rows.append({"dim": d, "seconds": seconds, "gbytes_per_second": gbps,
                   "fraction_of_read_bandwidth": fraction})
      logging.info("kernel %s d=%d: %.2f GB/s", name, d, gbps)
      if baseline:
        before = time_baseline(baseline, name, d, repeats, call_seconds)
        if "error" in before:
          rows[-1]["baseline_error"] = before["error"]
        else:
          gbps, fraction = rates(before["seconds"])
          rows[-1].update(baseline_seconds=before["seconds"],
                          baseline_gbytes_per_second=gbps,
                          baseline_fraction_of_read_bandwidth=fraction)
          logging.info("kernel %s d=%d, baseline: %.3f GB/s", name, d, gbps)
      next_call = max(call_seconds, 10 * seconds["median"])  # d grows ~10x
      if next_call * (repeats + 1) > 60:
        rows.append({"dim": None, "note": "larger d skipped: over a minute per size"})
        break
  return out
