"""The ``network`` section of step_throughput: the training step a real model pays.

One training step of the planted two-layer network (``jrelu.network``; ``K`` hidden units
on ``d`` inputs, ``K d + 2 K`` parameters, about ``1e7`` by default) on N simulated devices
under ``pmap``, with fresh Gaussian batches drawn on the devices (online sampling): once
with float32 gradients averaged by ``psum`` (the uncompressed baseline), and once per
codec with its default aggregation (``two_phase``) and the kernels section's
hyper-parameters. Each row gives the step time and the compression share of it,
``1 - t_psum / t``: the part of the step the codec adds over the float32 step (negative
when sending fewer bits outweighs the codec's work).
"""

from __future__ import annotations

import time

from absl import logging
import jax

from benchmarks import common
from benchmarks.step_throughput import settings
from jrelu import experiment
from jrelu import network
from jrelu import parallel
from jrelu import sampling
from jrelu import wire

BASELINE = "psum"


def _config(name: str) -> experiment.Config:
  """The Config of a row: the float32 baseline, or a codec with its default aggregation."""
  if name == BASELINE:
    return experiment.Config(compressor="none", aggregation="psum", learning_rate=0.01)
  return experiment.Config(compressor=name, learning_rate=0.01,
                           **settings.NETWORK_KWARGS.get(name, {}))


def network_section(dim: int, hidden: int, batch_size: int, steps: int, repeats: int,
                    devices, names) -> dict:
  """Times ``steps`` pmapped training steps per call of each row, ``repeats`` calls.

  Args:
    dim: d, the network's input dimension.
    hidden: K, its hidden units.
    batch_size: global B (divisible by the number of devices).
    steps: steps per compiled call.
    repeats: timed calls per row (after one warm-up call).
    devices: the simulated devices (N of them).
    names: codec names of ``jrelu.compressors.REGISTRY`` (the baseline always runs).

  Returns:
    ``{"dim", "hidden", "parameters", "batch_size", "num_devices", "aggregation",
    "rows": [...]}``, a row per configuration with ``method``, ``step_seconds`` (stats),
    ``compression_share``, ``wire_bits_per_step_per_device``, ``compile_seconds``, or an
    ``error``.
  """
  n_dev = len(devices)
  teacher = network.sample_teacher(jax.random.key(0), dim, hidden)
  params = network.init_params(jax.random.key(1), (None, teacher))
  batch_fn = sampling.make_online_batch_fn(batch_size, network.sample_batch)
  out = {"dim": dim, "hidden": hidden, "parameters": hidden * dim + 2 * hidden,
         "batch_size": batch_size, "num_devices": n_dev, "steps_per_call": steps,
         "aggregation": {"baseline": "psum", "codecs": "two_phase (the default)"},
         "kwargs": {n: settings.NETWORK_KWARGS.get(n, {}) for n in names}, "rows": []}
  baseline = None
  for name in (BASELINE, *names):
    row = {"method": name}
    out["rows"].append(row)
    try:
      tx = experiment.make_tx(_config(name), jax.random.key(2), n_dev)
      step = parallel.make_step(network.loss, batch_fn, tx)
      state = parallel.init_state(params, tx)
      state, data, key = parallel.replicate((state, (None, teacher), jax.random.key(3)),
                                            devices)
      start = time.perf_counter()
      run = parallel.pmapped(parallel.scan_steps(step, steps), devices)
      run = run.lower(state, data, key).compile()
      row["compile_seconds"] = time.perf_counter() - start
      # wire.parse counts a collective inside the scan once: the bits of one step.
      row["wire_bits_per_step_per_device"] = wire.parse(run.as_text()).sent_bits
      state = jax.block_until_ready(run(state, data, key))[0]
      times = []
      for _ in range(repeats):
        start = time.perf_counter()
        state = jax.block_until_ready(run(state, data, key))[0]
        times.append((time.perf_counter() - start) / steps)
      del run, state
    except Exception as e:  # a row that cannot run at this size: record it, go on
      row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
      continue
    row["step_seconds"] = common.stats(times)
    median = row["step_seconds"]["median"]
    if name == BASELINE:
      baseline = median
    row["compression_share"] = 1.0 - baseline / median if baseline else None
    logging.info("network step %s: %.1f ms (compression share %s)", name, 1e3 * median,
                 row["compression_share"])
  return out
