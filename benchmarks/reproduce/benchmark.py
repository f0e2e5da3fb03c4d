"""The run of ``python -m benchmarks.reproduce``: the selected sections, in order.

:func:`run` takes its :class:`~benchmarks.reproduce.settings.Settings` and the devices as
arguments (no flags): sections 1-4, plots, ``summary.md`` and ``results.json``.
"""

from __future__ import annotations

import os
import time

from absl import logging

from benchmarks import common
from benchmarks.reproduce import communication
from benchmarks.reproduce import phase_transition
from benchmarks.reproduce import report
from benchmarks.reproduce import settings as settings_lib
from benchmarks.reproduce import training
from jrelu import experiment


def run(settings: settings_lib.Settings, devices) -> dict:
  """Runs the selected sections; writes plots, ``summary.md`` and ``results.json``.

  Args:
    settings: what to run (``settings.base`` is the training problem).
    devices: the N devices of sections 2-4 (the first one times section 4's compute).

  Returns:
    The result dict, also written to ``OUTDIR/results.json``: machine facts,
    ``section_seconds`` and one entry per section that ran (``phase_transition``,
    ``training``, ``convergence``, ``bits_to_accuracy``, ``communication``), ``plots``,
    ``summary_md``, ``runtime_seconds``.

  Raises:
    jrelu.experiment.ConfigError: when a training run's settings are bad.
    OSError: when an output file cannot be written.
  """
  started = time.perf_counter()
  s, base, outdir, sections = settings, settings.base, settings.outdir, settings.sections
  result = {"benchmark": "reproduce", "paper": "arXiv 1901.06587", **common.machine_info(),
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "num_devices": len(devices), "quick": s.quick, "sections": list(sections),
            "seed": base.seed, "outdir": outdir, "section_seconds": {}}
  plots, rows = [], None

  plt = common.pyplot()
  if plt is None:
    logging.warning("matplotlib is not installed: no plots")

  def plot(fn, name, *args):
    if plt is not None:
      path = os.path.join(outdir, name)
      fn(plt, *args, path=path)
      plots.append(path)

  if "phase_transition" in sections:
    t0 = time.perf_counter()
    phase = phase_transition.phase_transition(
        list(s.phase_dims), list(s.phase_ratios), s.phase_trials, s.phase_iters, base.seed,
        s.phase_dtype)
    result["phase_transition"] = phase
    plot(report.plot_phase_transition, "phase_transition.png", phase)
    result["section_seconds"]["phase_transition"] = time.perf_counter() - t0

  if any(name in sections for name in settings_lib.TRAINING_SECTIONS):
    t0 = time.perf_counter()
    results, curves = training.training_grid(base, list(s.methods), list(s.learning_rates),
                                             devices, outdir)
    experiment.write_json(os.path.join(outdir, "convergence_curves.json"), curves)
    result["training"] = training.training_section(base, results, devices,
                                                   list(s.learning_rates))
    bits = training.bits_section(results)
    rows = training.training_rows(results, bits)
    result["section_seconds"]["training_grid"] = time.perf_counter() - t0
    problem = (f"d={base.dim}, n={base.num_samples}, batch {base.batch_size}, "
               f"{len(devices)} devices")
    if "convergence" in sections:
      result["convergence"] = training.convergence_section(results)
      plot(report.plot_curves, "convergence.png", curves, results, "step", "step",
           f"relative error vs step ({problem})")
    if "bits_to_accuracy" in sections:
      result["bits_to_accuracy"] = bits
      plot(report.plot_curves, "bits_to_accuracy.png", curves, results,
           "cumulative_bits_per_device", "Mbit sent per device (from HLO)",
           f"relative error vs bits sent ({problem})", 1e6)
    if "communication" in sections:
      t0 = time.perf_counter()
      comm = communication.communication_section(
          base, results, devices, outdir, alpha=s.alpha_seconds,
          bandwidths_gbps=list(s.bandwidths_gbps), timing_steps=s.timing_steps,
          timed_worker_counts=s.timed_worker_counts)
      result["communication"] = comm
      if comm["labels"] and comm["worker_counts"]:
        plot(report.plot_communication, "communication_model.png", comm, results)
      result["section_seconds"]["communication"] = time.perf_counter() - t0

  result["plots"] = plots
  result["summary_md"] = os.path.join(outdir, "summary.md")
  result["results_json"] = os.path.join(outdir, "results.json")
  result["runtime_seconds"] = time.perf_counter() - started
  with open(result["summary_md"], "w") as f:
    f.write(report.summary_markdown(result, rows))
  experiment.write_json(result["results_json"], result)
  logging.info("done in %.0f s: %s", result["runtime_seconds"], result["summary_md"])
  return result
