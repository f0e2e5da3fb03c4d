"""Sections 2 and 3 of ``python -m benchmarks.reproduce``: convergence and bits to accuracy.

:func:`training_grid` trains every method of
:data:`~benchmarks.reproduce.settings.METHODS` at every step size of a small grid with
``jrelu.experiment.run`` (8 devices, the ``jrelu.train`` default problem unless changed)
and keeps each method's best run; :func:`convergence_section` and :func:`bits_section` turn
the grid into section 2's and section 3's JSON. Bits are what the compiled step sends per
device, read from its HLO by ``jrelu.experiment.run``.

References:
  Kalan, Soltanolkotabi, Avestimehr, "Fitting ReLUs via SGD and Quantized SGD"
  (arXiv 1901.06587); Alistarh, Grubic, Li, Tomioka, Vojnovic, "QSGD:
  Communication-Efficient SGD via Gradient Quantization and Encoding" (arXiv 1610.02132).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from absl import logging

from benchmarks.reproduce import settings
from jrelu import experiment

LOG_EVERY = 10             # steps between the points of a convergence curve


def method_config(base: experiment.Config, name: str, **overrides) -> experiment.Config:
  """``base`` with the METHODS row ``name`` and then ``overrides`` applied.

  Args:
    base: the problem (``jrelu.experiment.Config``).
    name: a key of :data:`~benchmarks.reproduce.settings.METHODS`.
    **overrides: further ``Config`` fields (step size, steps, ...).

  Returns:
    A new ``jrelu.experiment.Config``.
  """
  return dataclasses.replace(base, **{**settings.METHODS[name]["config"], **overrides})


def run_training(config: experiment.Config, workdir: str, devices) -> dict:
  """Runs ``jrelu.experiment.run`` quietly; returns its summary, also when it diverges.

  Its per-chunk progress lines are silenced (they are in ``WORKDIR/metrics.jsonl``); a
  diverged run returns its summary with ``"status": "diverged"`` instead of raising.

  Args:
    config: the run.
    workdir: where the run writes ``metrics.jsonl`` and ``summary.json``.
    devices: the devices to train on.

  Returns:
    The run's summary dict (``WORKDIR/summary.json``).

  Raises:
    jrelu.experiment.ConfigError: for settings that are bad or do not fit the devices.
  """
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.WARNING)
  try:
    # fresh: a benchmark measures, so a rerun trains again instead of resuming.
    return experiment.run(config, workdir, devices=devices, fresh=True)
  except experiment.DivergedError:
    return summary_of(workdir)
  finally:
    logging.set_verbosity(verbosity)


def read_curve(workdir: str, summary: dict) -> dict:
  """The curve of one run, read back from ``WORKDIR/metrics.jsonl``.

  Args:
    workdir: the run's directory.
    summary: its summary (for the initial relative error, prepended as step 0).

  Returns:
    ``{"step": [...], "relative_error": [...], "cumulative_bits_per_device": [...]}``,
    bits as measured from the HLO, one point every ``LOG_EVERY`` steps.
  """
  steps, errors, bits = [0], [summary["initial_relative_error"]], [0.0]
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        record = json.loads(line)
        steps.append(record["step"])
        errors.append(record["relative_error"])
        bits.append(record["cumulative_wire_bits_per_device"])
  return {"step": steps, "relative_error": errors, "cumulative_bits_per_device": bits}


def _selection_key(record):
  """Best run: fewest steps to target, then fewest bits to target, then larger step size."""
  return (record["steps_to_target"], record["bits_to_target"], -record["learning_rate"])


def training_grid(base: experiment.Config, methods, learning_rates, devices, outdir: str):
  """Trains every method at every step size of the grid and keeps the best run of each.

  Step sizes are tried from the largest down. Once a run has reached ``TARGET`` in S
  steps, later runs of that method stop after S steps (they cannot be better; their
  status is ``"pruned"`` if they did not reach the target by then).

  Args:
    base: the problem (``jrelu.experiment.Config``): dim, samples, global batch, seed, cap on
      steps.
    methods: names of rows of :data:`~benchmarks.reproduce.settings.METHODS`.
    learning_rates: the step size grid.
    devices: the N devices (``jrelu.parallel.setup_devices``).
    outdir: runs go to ``OUTDIR/runs/NAME_lrLR/`` (``metrics.jsonl``, ``summary.json``).

  Returns:
    ``(results, curves)``: ``results[name] = {"label", "config", "grid": [...], "best":
    {...} or None, "best_at_grid_edge": bool}`` and ``curves[name]`` the best run's curve
    (:func:`read_curve`).
  """
  results, curves = {}, {}
  for name in methods:
    grid, best = [], None
    for lr in sorted(learning_rates, reverse=True):
      cap = base.num_steps if best is None else min(base.num_steps, best["steps_to_target"])
      workdir = os.path.join(outdir, "runs", f"{name}_lr{lr:g}")
      config = method_config(base, name, learning_rate=lr, num_steps=cap,
                             log_every=LOG_EVERY, target_relative_error=settings.TARGET)
      start = time.perf_counter()
      summary = run_training(config, workdir, devices)
      status = summary["status"]
      if status == "finished" and cap < base.num_steps:
        status = "pruned"
      steps = summary["steps_to_target"]
      bits = summary["wire_bits_per_step_per_device"]
      record = {
          "learning_rate": lr, "status": status, "steps_to_target": steps,
          "steps": summary["steps"], "relative_error": summary["relative_error"],
          "wire_bits_per_step_per_device": bits,
          "predicted_wire_bits_per_step_per_device":
              summary["predicted_wire_bits_per_step_per_device"],
          "float32_wire_bits": summary["float32_wire_bits"],
          "bits_to_target": None if steps is None else steps * bits,
          "steps_per_second": summary["steps_per_second"],
          "compile_seconds": summary["compile_seconds"],
          "wall_seconds": time.perf_counter() - start, "workdir": workdir,
      }
      grid.append(record)
      logging.info("%s lr=%g: %s, steps to %g: %s, %.0f bits/step/device (%.1f s)",
                   name, lr, status, settings.TARGET, steps, bits, record["wall_seconds"])
      if steps is not None and (best is None or _selection_key(record) < _selection_key(best)):
        best = record
    lrs = [g["learning_rate"] for g in grid]
    results[name] = {"label": settings.METHODS[name]["label"],
                     "config": settings.METHODS[name]["config"],
                     "grid": grid, "best": best,
                     "best_at_grid_edge": best is not None and len(lrs) > 1
                                          and best["learning_rate"] in (max(lrs), min(lrs))}
    if best is not None:
      curves[name] = read_curve(best["workdir"], summary_of(best["workdir"]))
  return results, curves


def summary_of(workdir: str) -> dict:
  """Loads the ``summary.json`` a training run wrote into ``workdir`` (a path)."""
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)


def training_section(base: experiment.Config, results: dict, devices, learning_rates) -> dict:
  """The training grid's settings for the JSON line.

  Args:
    base: the problem.
    results: :func:`training_grid`'s results.
    devices: the devices trained on.
    learning_rates: the step size grid.

  Returns:
    ``{"problem", "learning_rates", "selection", "methods": {name: {"label", "config"}}}``.
  """
  return {
      "problem": {"dim": base.dim, "num_samples": base.num_samples,
                  "batch_size": base.batch_size, "num_devices": len(devices),
                  "init": base.init, "seed": base.seed, "max_steps": base.num_steps,
                  "target_relative_error": settings.TARGET, "log_every": LOG_EVERY,
                  "defaults": "jrelu.experiment.Config (two_phase aggregation, max norm) "
                              "unless a method overrides"},
      "learning_rates": sorted(learning_rates, reverse=True),
      "selection": "per method: fewest steps to target, ties: fewer bits, then larger "
                   "step size; runs after the first success stop at its step count",
      "methods": {name: {"label": r["label"], "config": r["config"]}
                  for name, r in results.items()},
  }


def convergence_section(results: dict) -> dict:
  """Section 2's JSON: each method's best step size, steps to target and full grid.

  Args:
    results: :func:`training_grid`'s results.

  Returns:
    ``{"methods": {name: {"label", "best_learning_rate", "best_at_grid_edge",
    "steps_to_target", "relative_error", "grid": [...]}}, "curves":
    "convergence_curves.json"}``; the curves themselves are in
    ``OUTDIR/convergence_curves.json``. ``best_at_grid_edge`` warns that a wider grid
    might find a better step size.
  """
  methods = {}
  for name, r in results.items():
    best = r["best"] or {}
    methods[name] = {"label": r["label"], "best_learning_rate": best.get("learning_rate"),
                     "best_at_grid_edge": r["best_at_grid_edge"],
                     "steps_to_target": best.get("steps_to_target"),
                     "relative_error": best.get("relative_error"), "grid": r["grid"]}
  return {"methods": methods, "curves": "convergence_curves.json"}


def training_rows(results: dict, bits: dict) -> list:
  """One row per method for summary.md: best step size, steps, bits, ratio to float32.

  Args:
    results: :func:`training_grid`'s results.
    bits: :func:`bits_section`'s output.

  Returns:
    A list of dicts, one per method in ``results`` order.
  """
  return [{"method": name, "learning_rate": r["best"] and r["best"]["learning_rate"],
           "at_grid_edge": r["best_at_grid_edge"], **bits["methods"][name]}
          for name, r in results.items()]


# ---------------------------------------------------------------------------------------
# 3. Bits to accuracy.

def bits_section(results: dict) -> dict:
  """Bits each method sends per device to reach ``TARGET``, and the ratio to float32 SGD.

  ``bits_to_target = steps_to_target * wire_bits_per_step_per_device`` of the method's
  best run, the bits measured from the compiled step's HLO by ``jrelu.experiment.run``.

  Args:
    results: :func:`training_grid`'s results.

  Returns:
    ``{"baseline", "methods": {name: {"wire_bits_per_step_per_device", "steps_to_target",
    "bits_to_target", "times_fewer_bits_than_float32"}}, "headline": {...}}``; the
    headline names the compressed method with the largest saving.
  """
  base = results.get(settings.BASELINE, {}).get("best")
  rows = {}
  for name, r in results.items():
    best = r["best"]
    ratio = None
    if best is not None and base is not None:
      ratio = base["bits_to_target"] / best["bits_to_target"]
    rows[name] = {
        "label": r["label"],
        "wire_bits_per_step_per_device": best and best["wire_bits_per_step_per_device"],
        "steps_to_target": best and best["steps_to_target"],
        "bits_to_target": best and best["bits_to_target"],
        "times_fewer_bits_than_float32": ratio,
    }
  compressed = {k: v for k, v in rows.items()
                if k != settings.BASELINE and v["times_fewer_bits_than_float32"] is not None}
  headline = None
  if compressed:
    name = max(compressed, key=lambda k: compressed[k]["times_fewer_bits_than_float32"])
    headline = {"method": name, "label": rows[name]["label"],
                "times_fewer_bits_than_float32":
                    rows[name]["times_fewer_bits_than_float32"],
                "bits_to_target": rows[name]["bits_to_target"],
                "float32_bits_to_target": base["bits_to_target"]}
  return {"baseline": settings.BASELINE, "target_relative_error": settings.TARGET,
          "methods": rows, "headline": headline}

