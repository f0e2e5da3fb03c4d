"""Runs every row of the real-data benchmark and writes its files.

:func:`run` loads the digits (:mod:`.data`), trains each row of ``Settings.rows``
from every seed (:mod:`.training`), and writes ``OUTDIR/results.json``,
``OUTDIR/summary.md`` and ``OUTDIR/real_data.png`` (:mod:`.report`).
"""

from __future__ import annotations

import os
import time

from absl import logging
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.compressors import flags_of
from benchmarks.real_data import data as digits
from benchmarks.real_data import report
from benchmarks.real_data import settings as settings_lib
from benchmarks.real_data import training
from jrelu import experiment
from jrelu import sampling


def row_config(overrides: dict, s: settings_lib.Settings, num_train: int) -> experiment.Config:
  """The ``jrelu.experiment.Config`` of a row: its overrides on the benchmark's problem."""
  return experiment.Config(batch_size=s.batch_size, num_samples=num_train,
                           num_steps=s.num_steps, **overrides)


def run(s: settings_lib.Settings, devices) -> dict:
  """Trains every row of ``s`` on ``devices``; writes the files; returns the result.

  Args:
    s: the settings.
    devices: the N data-parallel devices (8 simulated CPU devices by default).

  Returns:
    The JSON-ready result: machine facts, the problem, one dict per row (final test
    accuracy and training loss as mean, std, min, max over the seeds; bits per step and
    in all, read from the compiled program; the history of scores), the paths written.

  Raises:
    jrelu.experiment.ConfigError: for a row the library rejects.
  """
  start = time.perf_counter()
  train, test = digits.load(settings_lib.TEST_FRACTION, settings_lib.SPLIT_SEED)
  data = tuple(sampling.Dataset(jnp.asarray(d.x), jnp.asarray(d.y)) for d in (train, test))
  rows = []
  for key, rule, label, overrides in s.rows:
    config = row_config(overrides, s, train.x.shape[0])
    result = training.train(config, data, s.seeds, s.num_steps, s.num_evals, devices,
                            settings_lib.NUM_HIDDEN)
    history = result["history"]
    final_accuracy, final_loss = history["test_accuracy"][-1], history["train_loss"][-1]
    rows.append({
        "key": key, "step_size": rule, "method": label, "flags": flags_of(overrides),
        "description": experiment.describe(experiment.resolve(config, len(devices))),
        "test_accuracy": training.spread(final_accuracy),
        "train_loss": training.spread(final_loss),
        # the seeds' mean: a line search's trials differ from seed to seed
        "total_wire_bits_per_device": float(
            np.mean(history["cumulative_wire_bits_per_device"][-1])),
        **result,
    })
    logging.info("%-28s %-6s accuracy %s  loss %s  %.0f bits/step  (%.0f s + %.0f s)", label,
                 rule, final_accuracy, final_loss, result["wire_bits_per_step_per_device"],
                 result["compile_seconds"], result["run_seconds"])
  baseline = next((r for r in rows if r["key"] == settings_lib.BASELINE
                   and r["step_size"] == "fixed"), None)
  for r in rows:
    if baseline is not None and r["total_wire_bits_per_device"]:
      r["fewer_bits_than_float32"] = (baseline["total_wire_bits_per_device"]
                                      / r["total_wire_bits_per_device"])
  os.makedirs(s.outdir, exist_ok=True)
  summary_path = os.path.join(s.outdir, "summary.md")
  problem = {"data_set": "sklearn.datasets.load_digits", "train_rows": int(train.x.shape[0]),
             "test_rows": int(test.x.shape[0]), "features": int(train.x.shape[1]),
             "classes": digits.NUM_CLASSES, "model": f"MLP 64-{settings_lib.NUM_HIDDEN}-10",
             "batch_size": s.batch_size, "num_devices": len(devices),
             "num_steps": s.num_steps, "seeds": list(s.seeds)}
  with open(summary_path, "w") as f:
    f.write(report.markdown(rows, problem))
  plots = report.plot(rows, s.outdir)
  result = {
      "benchmark": "real_data", **common.machine_info(), "quick": s.quick, **problem,
      "rows": rows, "summary_md": summary_path, "plots": plots,
      "wall_seconds": time.perf_counter() - start,
  }
  experiment.write_json(os.path.join(s.outdir, "results.json"), result)
  return result
