"""What ``python -m benchmarks.reproduce`` runs: the methods, the target, the settings.

:data:`METHODS` are the rows compared in sections 2-4 (adding a compressor is one line:
its ``jrelu.experiment.Config`` fields); :class:`Settings` is everything one run of the
benchmark depends on, built from the flags by ``benchmarks.reproduce.__main__`` with
:data:`FULL` or :data:`QUICK` filling in what the flags leave unset.
"""

from __future__ import annotations

import dataclasses

from benchmarks import common
from jrelu import experiment

# The methods compared in sections 2-4: name -> label and jrelu.experiment.Config overrides.
# "sgd" is the float32 baseline every ratio is taken against.
METHODS = {
    "sgd": {"label": "float32 SGD", "config": {"compressor": "none", "aggregation": "psum"}},
    "qsgd_s1": {"label": "QSGD s=1", "config": {"compressor": "qsgd", "num_levels": 1}},
    "qsgd_s2": {"label": "QSGD s=2", "config": {"compressor": "qsgd", "num_levels": 2}},
    "qsgd_s4": {"label": "QSGD s=4", "config": {"compressor": "qsgd", "num_levels": 4}},
    "qsgd_s8": {"label": "QSGD s=8", "config": {"compressor": "qsgd", "num_levels": 8}},
    "qsgd_s16": {"label": "QSGD s=16", "config": {"compressor": "qsgd", "num_levels": 16}},
}
BASELINE = "sgd"
QUICK_METHODS = ("sgd", "qsgd_s4")

SECTIONS = ("phase_transition", "convergence", "bits_to_accuracy", "communication")
TRAINING_SECTIONS = ("convergence", "bits_to_accuracy", "communication")
TARGET = 1e-6              # relative error that counts as recovery, everywhere

# Defaults of the full and the quick (--quick) run, for what the flags leave unset.
FULL = {"phase_dims": (20, 50, 100), "phase_trials": 50, "phase_iters": 5000,
        "methods": tuple(METHODS), "learning_rates": (1.2, 1.0, 0.85, 0.7, 0.5, 0.3, 0.2),
        "num_steps": 3000, "timing_steps": 500, "timed_worker_counts": "all"}
QUICK = {"phase_dims": (20, 50), "phase_trials": 10, "phase_iters": 2000,
         "methods": QUICK_METHODS, "learning_rates": (0.7, 0.5),
         "num_steps": 1500, "timing_steps": 250, "timed_worker_counts": "first"}


@dataclasses.dataclass(frozen=True)
class Settings:
  """One run of the benchmark.

  Attributes:
    outdir: where plots, runs, ``summary.md`` and ``results.json`` go.
    quick: whether the quick defaults were used (recorded in the JSON).
    sections: the sections to run, in :data:`SECTIONS` order.
    base: the training problem of sections 2-4 (dim, samples, global batch, devices,
      seed, cap on steps); each method's row and step size are applied to it.
    phase_dims: dimensions d of the phase transition.
    phase_ratios: sample ratios n/d of the phase transition, sorted.
    phase_trials: trials per (d, n/d) cell.
    phase_iters: iteration budget of GD and SGD per trial.
    phase_dtype: ``"float64"`` or ``"float32"``.
    methods: rows of :data:`METHODS` to train.
    learning_rates: the step size grid of sections 2-4.
    timing_steps: steps per timing run of the communication model.
    timed_worker_counts: ``"all"`` or ``"first"`` (worker counts whose compute is timed).
    alpha_seconds: latency of one message round.
    bandwidths_gbps: link bandwidths of the communication model (Gbit/s).
  """
  outdir: str
  quick: bool
  sections: tuple
  base: experiment.Config
  phase_dims: tuple
  phase_ratios: tuple
  phase_trials: int
  phase_iters: int
  phase_dtype: str
  methods: tuple
  learning_rates: tuple
  timing_steps: int
  timed_worker_counts: str
  alpha_seconds: float
  bandwidths_gbps: tuple

  @classmethod
  def make(cls, quick: bool, **given) -> "Settings":
    """Settings from the given values, :data:`QUICK` or :data:`FULL` filling in the rest.

    Args:
      quick: use :data:`QUICK`'s defaults (else :data:`FULL`'s).
      **given: field values; None (or a missing field) means the mode's default, for the
        fields :data:`FULL` has. ``base`` is required, and its ``num_steps`` of None (not
        a valid Config) takes the mode's ``num_steps``.

    Returns:
      The settings.
    """
    mode = QUICK if quick else FULL
    values = common.mode_defaults(mode, given, {f.name for f in dataclasses.fields(cls)})
    base = given.pop("base")
    if base.num_steps is None:
      base = dataclasses.replace(base, num_steps=mode["num_steps"])
    rest = {k: v for k, v in given.items() if k not in values}
    return cls(quick=quick, base=base, **values, **rest)
