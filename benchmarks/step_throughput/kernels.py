"""The ``kernels`` section of step_throughput: encode + decode throughput of each codec.

Every compressor of ``jrelu.compressors.REGISTRY`` (hyper-parameters from
``settings.KERNEL_KWARGS``), jitted on one device, in GB/s of float32 input.
"""

from __future__ import annotations

import time

from absl import logging
import jax
import jax.numpy as jnp

from benchmarks import common
from benchmarks.step_throughput import settings
from jrelu import compressors


def kernel_section(dims, repeats, read_gbps, names=None, call_seconds: float = 0.2) -> dict:
  """encode + decode GB/s (float32 input) per registry compressor, jitted, one device.

  Args:
    dims: the d values, ascending (a size over a minute per size stops the row).
    repeats: timed calls per size.
    read_gbps: the roofline's read bandwidth (GB/s) or None.
    names: registry names to time (None or empty: all).
    call_seconds: about how long one timed call should take (sets the loop length).

  Returns:
    ``{"read_gbytes_per_second", "kwargs": {name: kwargs}, "compressors": {name: [rows]}}``,
    a row per d with ``seconds``, ``gbytes_per_second``, or an ``error``.
  """
  out = {"read_gbytes_per_second": read_gbps, "kwargs": {}, "compressors": {}}
  for name, factory in compressors.REGISTRY.items():
    if names and name not in names:
      continue
    kwargs = settings.KERNEL_KWARGS.get(name, {})
    out["kwargs"][name] = kwargs
    rows = []
    out["compressors"][name] = rows
    try:
      codec = factory(**kwargs)
    except (TypeError, ValueError) as e:
      rows.append({"error": f"{type(e).__name__}: {e} (add its kwargs to KERNEL_KWARGS)"})
      continue
    per_coordinate = None  # seconds per coordinate at the previous size
    for d in dims:
      # About 0.2 s per timed call: from the previous size's speed, else a guess.
      guess = per_coordinate * d if per_coordinate else d * 5e-9
      iters = max(1, min(100, int(call_seconds / max(guess, 1e-9))))

      def loop(key, x, codec=codec, iters=iters):
        def body(acc, i):
          k = jax.random.fold_in(key, i)
          # x + 0 * acc: the same values, but XLA cannot hoist the codec out of the loop
          # (0 * acc is not 0 for an infinite acc), which it would for a key-free codec.
          out = codec.decode(codec.encode(k, x + 0 * acc))
          return acc + jnp.sum(out) * 1e-30, None
        return jax.lax.scan(body, jnp.zeros((), jnp.float32), jnp.arange(iters))[0]

      try:
        x = jax.random.normal(jax.random.key(1), (d,), jnp.float32)
        fn = jax.jit(loop).lower(jax.random.key(0), x).compile()
        fn(jax.random.key(0), x).block_until_ready()
        times = []
        for r in range(repeats):
          start = time.perf_counter()
          fn(jax.random.key(r), x).block_until_ready()
          times.append((time.perf_counter() - start) / iters)
      except Exception as e:  # a codec that cannot handle this size: record, go on
        rows.append({"dim": d, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        break
      seconds = common.stats(times)
      per_coordinate = seconds["median"] / d
      rows.append({"dim": d, "seconds": seconds,
                   "gbytes_per_second": 4 * d / seconds["median"] / 1e9,
                   "fraction_of_read_bandwidth": (4 * d / seconds["median"] / 1e9 / read_gbps
                                                  if read_gbps else None)})
      logging.info("kernel %s d=%d: %.2f GB/s", name, d, rows[-1]["gbytes_per_second"])
      next_call = max(call_seconds, 10 * seconds["median"])  # d grows ~10x
      if next_call * (repeats + 1) > 60:
        rows.append({"dim": None, "note": "larger d skipped: over a minute per size"})
        break
  return out

