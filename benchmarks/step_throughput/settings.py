"""What ``python -m benchmarks.step_throughput`` times: the methods, targets and settings.

:data:`METHODS` are the rows whose training step is timed (adding a compressor is one
line); :class:`Settings` is everything one run depends on, built from the flags by
``benchmarks.step_throughput.__main__`` with :data:`FULL` or :data:`QUICK` filling in what
the flags leave unset.
"""

from __future__ import annotations

import dataclasses

from benchmarks import common
from jrelu import experiment

SECTIONS = ("step", "roofline", "torch", "sweep", "kernels", "network", "scale")
PATHS = ("vmap", "pmap", "pmap_replacement")


@dataclasses.dataclass(frozen=True)
class Method:
  """One row of ``METHODS``: a compressor, its settings, the aggregation.

  Attributes:
    compressor: a ``jrelu.experiment.Config`` compressor (a key of
      ``jrelu.compressors.REGISTRY``).
    kwargs: its ``Config`` settings (``num_levels``, ``norm``, ...).
    aggregation: a strategy of ``jrelu.aggregation``.
    learning_rate: SGD step size (it does not change the cost of a step).
    torch_peers: names of the PyTorch peers doing the same kind of compression (for the
      per-method ratio; the targets use the fastest peer of all).
    key_impl: PRNG implementation of the compressor's key (None: JAX's default,
      threefry2x32), e.g. "philox4x32".
    paths: the step paths this row is timed on (None: all of the run's).
  """
  compressor: str
  kwargs: dict
  aggregation: str
  learning_rate: float = 0.5
  torch_peers: tuple = ()
  key_impl: str | None = None
  paths: tuple | None = None

  def config(self, **overrides) -> experiment.Config:
    """The row as a ``jrelu.experiment.Config`` (for ``experiment.make_tx``)."""
    fields = {"compressor": self.compressor, "aggregation": self.aggregation,
              "learning_rate": self.learning_rate, **self.kwargs, **overrides}
    return experiment.Config(**fields)


# The compressors whose training step is timed. Adding one is one line.
METHODS = {
    "none": Method("none", {}, "psum", torch_peers=("ddp_allreduce", "ddp_fp16",
                                                    "loop_none")),
    "qsgd": Method("qsgd", {"num_levels": 4, "norm": "max"}, "two_phase",
                   torch_peers=("ddp_quantization", "ddp_powersgd", "loop_qsgd")),
    # The same step with a Philox key. QSGD's uniform draws used to dominate its cost on
    # CPU, and Philox drew them about twice as fast as threefry; the codecs now draw their
    # bits with Threefry inside their own loops (jrelu.compressors.threefry) and the key
    # only seeds them, so the two rows should time alike (the numbers differ, not the law).
    # vmap only: JAX 0.10.2 cannot lower Philox's mulhi inside pmap ("mhlo.unknown").
    "qsgd_philox": Method("qsgd", {"num_levels": 4, "norm": "max"}, "two_phase",
                          torch_peers=("ddp_quantization", "ddp_powersgd", "loop_qsgd"),
                          key_impl="philox4x32", paths=("vmap",)),
}
TARGET_METHOD = "qsgd"
SWEEP_METHOD = "qsgd"
# Hyper-parameters of the kernels section (every other registry entry: factory defaults).
KERNEL_KWARGS = {
    "qsgd": {"num_levels": 4, "norm": "max"},
    "rand_k": {"fraction": 0.01},
    "top_k": {"fraction": 0.01},
    "atomo": {"budget": 8},
}
# Hyper-parameters of the network section's codecs (the kernels section's).
NETWORK_KWARGS = {"qsgd": {"num_levels": 4, "norm": "max"}, "rand_k": {"fraction": 0.01},
                  "top_k": {"fraction": 0.01}, "atomo": {"budget": 8}}
TORCH_DDP_HOOKS = ("allreduce", "fp16", "quantization", "powersgd")
TARGETS = {"roofline_ratio": 0.5, "times_fastest_torch_peer": 3.0}
TIMING_NOTE = ("Absolute speeds of a shared or virtual machine drift between runs (by a "
               "third on the 2-core VM this was written on); the ratios compare timings "
               "taken in the same run, interleaved, and are the numbers to quote.")

# Defaults of the full and the quick (--quick) run, for what the flags leave unset.
FULL = {"repeats": 7, "steps_per_chunk": 50, "sweep_dims": "250,500,1000,2000,4000",
        "kernel_call_seconds": 0.2, "ddp_worker_counts": "all", "scale_steps": 3,
        "sweep_batches": "512,1024,2048,4096,8192", "kernel_dims": "1e3,1e4,1e5,1e6,1e7",
        "torch_steps": 20, "ddp_steps": 10, "ddp_hooks": TORCH_DDP_HOOKS,
        "step_paths": PATHS, "methods": None,
        "network_dim": 10_000, "network_hidden": 1000, "network_batch_size": 64,
        "network_repeats": 3}
QUICK = {"repeats": 3, "steps_per_chunk": 20, "sweep_dims": "250,4000",
         "sweep_batches": "512,8192", "kernel_call_seconds": 0.05, "ddp_worker_counts": "N",
         "scale_steps": 1, "kernel_dims": "1e3,1e4,1e5",
         "torch_steps": 10, "ddp_steps": 4, "ddp_hooks": ("allreduce",),
         "step_paths": ("vmap", "pmap"), "methods": ("none", "qsgd"),
         "network_dim": 1000, "network_hidden": 100, "network_batch_size": 64,
         "network_repeats": 2}


@dataclasses.dataclass(frozen=True)
class Settings:
  """One run of the benchmark (see the flags of ``__main__`` for each field's meaning).

  Attributes:
    outdir: where results, plots and ``summary.md`` go.
    quick: whether the quick defaults were used.
    sections: the sections to run, in :data:`SECTIONS` order.
    skip_torch: skip the PyTorch peers.
    num_devices: N of the multi-device runs (1 is always timed too).
    dim: d of the timed step.
    batch_size: global B.
    num_samples: stored n, or None for ``steps.default_num_samples``.
    repeats: timed repeats per configuration.
    steps_per_chunk: steps per timed compiled call.
    methods: rows of :data:`METHODS` to time, or None for all.
    step_paths: the paths of the step section (of :data:`PATHS`).
    sweep_method: the row of :data:`METHODS` the sweep times.
    sweep_dims: d values of the sweep.
    sweep_batches: B values of the sweep.
    kernel_dims: d values of the kernels section.
    kernel_compressors: registry names of the kernels section, or None for all.
    kernel_call_seconds: target seconds per timed kernel call.
    kernel_baseline: a repository root whose codecs the kernels section times too, or None.
    network_dim: d of the network section's two-layer network.
    network_hidden: its hidden units K (``K d + 2 K`` parameters).
    network_batch_size: its global batch.
    network_repeats: timed calls (of one step each) per row of the network section.
    network_compressors: registry names of the network section, or None for all.
    scale_dim: d of the scale section.
    scale_batch_size: global batch of the scale section.
    scale_steps: timed steps of the scale section.
    torch_steps: steps per timed chunk of the PyTorch loop peers.
    ddp_steps: steps per timed chunk of the DDP peers.
    ddp_hooks: DDP communication hooks timed.
    ddp_worker_counts: ``"all"`` or ``"N"`` (DDP at N workers only).
  """
  outdir: str
  quick: bool
  sections: tuple
  skip_torch: bool
  num_devices: int
  dim: int
  batch_size: int
  num_samples: int | None
  repeats: int
  steps_per_chunk: int
  methods: tuple | None
  step_paths: tuple
  sweep_method: str
  sweep_dims: tuple
  sweep_batches: tuple
  kernel_dims: tuple
  kernel_compressors: tuple | None
  kernel_call_seconds: float
  kernel_baseline: str | None
  network_dim: int
  network_hidden: int
  network_batch_size: int
  network_repeats: int
  network_compressors: tuple | None
  scale_dim: int
  scale_batch_size: int
  scale_steps: int
  torch_steps: int
  ddp_steps: int
  ddp_hooks: tuple
  ddp_worker_counts: str

  @classmethod
  def make(cls, quick: bool, **given) -> "Settings":
    """Settings from the given values, :data:`QUICK` or :data:`FULL` filling in the rest.

    Args:
      quick: use :data:`QUICK`'s defaults (else :data:`FULL`'s).
      **given: field values; None (or a missing field) means the mode's default for the
        fields :data:`FULL` has. ``sweep_dims``, ``sweep_batches`` and ``kernel_dims`` may
        be comma-separated text (``1e6`` allowed).

    Returns:
      The settings.

    Raises:
      ValueError: for a list of integers that does not parse (naming the flag).
    """
    mode = QUICK if quick else FULL
    values = common.mode_defaults(mode, given)
    values.update({k: v for k, v in given.items() if k not in mode})
    for name in ("sweep_dims", "sweep_batches", "kernel_dims"):
      if isinstance(values[name], str):
        values[name] = tuple(common.int_list(values[name], name))
    return cls(quick=quick, **values)

