"""Section 4 of ``python -m benchmarks.reproduce``: projected time to 1e-6 on N workers.

A latency-bandwidth (alpha-beta) model over the best runs of the training grid, with the
per-step compute time of one worker measured on one device at the per-worker batch (see
:func:`communication_section`).

References:
  Hockney, "The communication challenge for MPP: Intel Paragon and Meiko CS-2", Parallel
  Computing 20(3), 1994 (the alpha-beta model); Thakur, Rabenseifner, Gropp, "Optimization
  of Collective Communication Operations in MPICH", IJHPCA 19(1), 2005 (ring collectives).
"""

from __future__ import annotations

import dataclasses
import json
import os

from absl import logging
import jax
import numpy as np

from benchmarks.reproduce import settings
from benchmarks.reproduce import training
from jrelu import experiment

# Message rounds per step of each aggregation strategy on N workers (ring / pairwise
# algorithms, the ones behind jrelu.wire's bandwidth-optimal bit counts).
ROUNDS = {
    "psum": lambda n: 2 * (n - 1),           # ring all-reduce: reduce-scatter + all-gather
    "all_gather": lambda n: n - 1,           # ring all-gather
    "two_phase": lambda n: 2 * (n - 1),      # all-to-all (N-1 exchanges) + ring all-gather
    "majority_vote": lambda n: 2 * (n - 1),  # two_phase with the sign codec
    "integer_psum": lambda n: 4 * (n - 1),   # pmax of the scales + integer all-reduce
}
TIMING_LEARNING_RATE = 1e-4  # keeps one-example per-worker batches finite while timed
TIMING_CHUNKS = 10         # timed chunks per timing run (the fastest is reported)
WORKER_COUNTS = tuple(8 * 2 ** i for i in range(8))  # 8, 16, ..., 1024


def predicted_wire_bits(config: experiment.Config, num_devices: int) -> float:
  """Bits one device sends per step on ``num_devices`` workers, by the formulas.

  ``jrelu.experiment.predicted_wire_bits`` (``jrelu.aggregation.wire_bits`` for a codec),
  what the tests check against the HLO count at 2 and 8 devices.

  Args:
    config: the method's config (compressor, aggregation, dim).
    num_devices: N.

  Returns:
    Bits per step per device (float).
  """
  params = jax.ShapeDtypeStruct((config.dim,), np.float32)
  return float(experiment.predicted_wire_bits(config, params, num_devices))


def time_compute(config: experiment.Config, device, steps: int, workdir: str) -> float:
  """Measured compute seconds per step of one worker: a 1-device training run.

  What is timed: ``jrelu.experiment.run`` on the single ``device`` with the method's
  compressor and aggregation and ``config.batch_size`` set to the per-worker batch, i.e.
  drawing the batch, the gradient, the codec (for ``two_phase``: encode, decode, re-encode,
  decode, the same work as on N workers, with one chunk of d instead of N chunks of d/N)
  and the SGD update, with the collectives trivial. ``steps`` steps run in
  ``TIMING_CHUNKS`` calls of one compiled chunk (compilation excluded, host round trip per
  chunk included); the fastest chunk's seconds per step is returned (the least disturbed
  one on a shared machine). The step size is ``TIMING_LEARNING_RATE`` so that even a
  one-example batch stays finite; the arithmetic does not depend on it.

  Args:
    config: the method's config with ``batch_size`` = per-worker batch.
    device: one device.
    steps: steps to time (a multiple of ``TIMING_CHUNKS`` is used).
    workdir: where the timing run writes its files.

  Returns:
    Seconds per step.
  """
  chunk = max(1, steps // TIMING_CHUNKS)
  config = dataclasses.replace(
      config, num_devices=1, num_steps=chunk * TIMING_CHUNKS, log_every=chunk,
      learning_rate=TIMING_LEARNING_RATE, target_relative_error=0.0)
  training.run_training(config, workdir, [device])
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    per_step = [1.0 / json.loads(line)["steps_per_second"] for line in f]
  return min(per_step)


def communication_section(base: experiment.Config, results: dict, devices, outdir: str, *,
                          alpha: float, bandwidths_gbps, timing_steps: int,
                          timed_worker_counts: str) -> dict:
  """Projected time to ``TARGET`` on N workers under a latency-bandwidth (alpha-beta) model.

  ``time(N) = steps_to_target * (compute(N) + rounds(N) * alpha + wire_bits(N) / bandwidth)``

  * ``steps_to_target``: the method's best run of section 2 (at ``len(devices)`` devices),
    assumed independent of N at a fixed global batch (exact for float32 SGD, whose
    averaged gradient does not depend on N; for QSGD the quantization noise changes with
    N, which this model ignores).
  * ``compute(N)``: measured by :func:`time_compute` at the per-worker batch
    ``batch_size / N`` (``timed_worker_counts="first"``: measured at the smallest N only
    and held constant, an overestimate for larger N).
  * ``rounds(N)``: message rounds of the strategy (:data:`ROUNDS`): ring all-reduce
    ``2(N-1)``, all-gather ``N-1``, two-phase (all-to-all + all-gather) ``2(N-1)``.
  * ``wire_bits(N)``: :func:`predicted_wire_bits`, bits one device sends per step.

  Args:
    base: the problem (global batch, dim, seed).
    results: :func:`~benchmarks.reproduce.training.training_grid`'s results (best step
      size and steps per method).
    devices: the devices of section 2; the first one runs the timing runs.
    outdir: timing runs go to ``OUTDIR/timing/NAME_bBATCH/``.
    alpha: seconds of latency per message round.
    bandwidths_gbps: link bandwidths in Gbit/s.
    timing_steps: steps per timing run.
    timed_worker_counts: ``"all"`` or ``"first"`` (see ``compute(N)`` above).

  Returns:
    ``{"model", "alpha_seconds", "bandwidths_gbps", "worker_counts", "assumptions",
    "compute_seconds_per_step": {name: [per N]}, "wire_bits_per_step_per_device": {name:
    [per N]}, "rounds": {name: [per N]}, "seconds_to_target": {bandwidth: {name: [per
    N]}}, "speedup_vs_float32": {bandwidth: {name: [per N]}}, "fastest_method":
    {bandwidth: [name per N]}, "float32_latency_bound_below_dim": {bandwidth: [per N]},
    "labels": {name: label}}``; methods that never reached the target are left out.

  References:
    Hockney, "The communication challenge for MPP", Parallel Computing 1994 (alpha-beta
    model); Thakur, Rabenseifner, Gropp, IJHPCA 2005 (ring collectives);
    Kalan, Soltanolkotabi, Avestimehr, arXiv 1901.06587 (the EC2 timings).
  """
  counts = [n for n in WORKER_COUNTS if base.batch_size % n == 0]
  if not counts:
    logging.warning("communication model: no worker count in %s divides the global batch "
                    "%d", WORKER_COUNTS, base.batch_size)
  compute, bits, rounds = {}, {}, {}
  for name in [n for n, r in results.items() if r["best"] is not None and counts]:
    config = training.method_config(base, name,
                                    learning_rate=results[name]["best"]["learning_rate"])
    strategy = experiment.resolve(config).aggregation
    if strategy not in ROUNDS:
      logging.warning("communication model: skipping %s, no message-round count for "
                      "aggregation %r (add it to ROUNDS)", name, strategy)
      continue
    timed = counts if timed_worker_counts == "all" else counts[:1]
    measured = {}
    for n in timed:
      per_worker = dataclasses.replace(config, batch_size=base.batch_size // n)
      measured[n] = time_compute(per_worker, devices[0], timing_steps,
                                 os.path.join(outdir, "timing", f"{name}_b{base.batch_size // n}"))
      logging.info("compute %s, per-worker batch %d: %.3g ms/step", name,
                   base.batch_size // n, 1e3 * measured[n])
    compute[name] = [measured.get(n, measured[timed[-1]]) for n in counts]
    bits[name] = [predicted_wire_bits(config, n) for n in counts]
    rounds[name] = [ROUNDS[strategy](n) for n in counts]
  names = list(compute)
  seconds, speedup, best = {}, {}, {}
  for bw in bandwidths_gbps:
    key = f"{bw:g}"
    seconds[key] = {
        name: [results[name]["best"]["steps_to_target"]
               * (c + r * alpha + b / (bw * 1e9))
               for c, r, b in zip(compute[name], rounds[name], bits[name])]
        for name in names}
    if settings.BASELINE in seconds[key]:
      speedup[key] = {name: [s0 / s for s0, s in zip(seconds[key][settings.BASELINE], v)]
                      for name, v in seconds[key].items()}
    best[key] = [min(names, key=lambda m: seconds[key][m][i])
                 for i in range(len(counts))] if names else []
  return {
      "model": "seconds_to_target = steps_to_target * (compute_seconds_per_step(N) "
               "+ rounds(N) * alpha + wire_bits(N) / bandwidth)",
      "alpha_seconds": alpha, "bandwidths_gbps": list(bandwidths_gbps),
      "worker_counts": counts, "global_batch_size": base.batch_size,
      "assumptions": [
          "steps_to_target measured at %d devices is independent of N at a fixed global "
          "batch (exact for float32 SGD; ignores the N-dependence of QSGD noise)"
          % len(devices),
          "compute(N): one worker's step measured on one device at batch_size/N ("
          + ("every N" if timed_worker_counts == "all" else
             "only the smallest N, held constant for larger N") + ")",
          "rounds: ring all-reduce 2(N-1), all-gather N-1, two_phase all-to-all + "
          "all-gather 2(N-1); alpha per round",
          "wire_bits(N): jrelu.aggregation.wire_bits, bits one worker sends per step; "
          "links are full duplex and not shared",
      ],
      "timed_worker_counts": timed_worker_counts,
      "labels": {name: results[name]["label"] for name in names},
      "compute_seconds_per_step": compute, "wire_bits_per_step_per_device": bits,
      "rounds": rounds, "seconds_to_target": seconds, "speedup_vs_float32": speedup,
      "fastest_method": best,
      # A float32 ring all-reduce of d coordinates spends as long on transfer as on latency
      # when 2(N-1)/N * 32 d / bandwidth = 2(N-1) * alpha, i.e. d = N * alpha * bandwidth / 32;
      # below that dimension a step is latency-bound and compression cannot shorten it.
      "float32_latency_bound_below_dim": {
          f"{bw:g}": [n * alpha * bw * 1e9 / 32 for n in counts] for bw in bandwidths_gbps},
  }

