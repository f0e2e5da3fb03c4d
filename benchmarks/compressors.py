r"""Every compressor on equal terms: bits on the wire and error reached on the planted ReLU.

Four sections, all on the default planted problem of ``python -m jrelu.train`` (d =
1000, n = 4000, global batch 1024):

* ``wire``: bits one device sends per step, read from the compiled training step's HLO
  (``jrelu.wire``), for every compressor in ``METHODS`` and every aggregation it supports,
  at 2, 4 and 8 devices, next to the float32 all-reduce.
* ``convergence``: each row of ``METHODS`` trained with its flags on 8 devices until it
  reaches its threshold (1e-4; 1e-2 for unscaled majority-vote signSGD and Signum): steps,
  bits per step and bits to the threshold.
* ``elastic``: the rows of ``ELASTIC_METHODS`` the same way: EASGD, EAMSGD and DOWNPOUR
  (``jrelu.easgd``), uncompressed and with compressed exchanges, every ``tau`` steps,
  next to float32 and QSGD SGD: bits to relative error 1e-4.
* ``armijo``: each row of ``METHODS`` again, its step size replaced by
  ``--step_size=armijo`` (``jrelu.linesearch``, default constants, no step size anywhere),
  once with the scaled descent step and once unscaled (``--armijo_scale=1``), to 1e-4 or
  3000 steps; and every codec on the planted two-layer network (``jrelu.network``, d = 20,
  K = 4, n = 400, batch 256, 8 devices), scaled and unscaled, 1000 steps.
  Subramaniam, Magesh, Veeravalli, arXiv 2207.10046: claims (a) converges for every
  compressor without tuning, (b) without the scaling can fail to converge.

    python -m benchmarks.compressors --outdir=runs/compressors
    python -m benchmarks.compressors --sections=wire --quick
    python -m benchmarks.compressors --sections=elastic
    python -m benchmarks.compressors --sections=armijo --outdir=runs/armijo

Ends by printing one JSON line; writes ``OUTDIR/summary.md`` (the README's tables),
``OUTDIR/bits_to_threshold.png``, ``OUTDIR/elastic_bits_to_threshold.png`` and
``OUTDIR/armijo.png``. Planted runs train through ``jrelu.experiment.run``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings

from absl import flags
from absl import logging
import jax

import numpy as np

from benchmarks import common
from jrelu import aggregation
from jrelu import easgd
from jrelu import experiment
from jrelu import linesearch
from jrelu import network
from jrelu import parallel
from jrelu import planted
from jrelu import sampling
from jrelu import transforms
from jrelu import wire

SECTIONS = ("wire", "convergence", "elastic", "armijo")

PROG = "benchmarks.compressors"


def define_flags(flag_values: flags.FlagValues) -> None:
  """Defines the binary's flags in ``flag_values``.

  The binary defines them in ``absl.flags.FLAGS`` when it runs, so that importing this
  module (for :data:`METHODS`, say) next to ``jrelu.train`` or another benchmark defines
  no flag (their names overlap, e.g. ``--seed``, ``--outdir``).

  Args:
    flag_values: where to define them, e.g. ``flags.FLAGS``.

  Raises:
    absl.flags.DuplicateFlagError: when ``flag_values`` already holds one of them.

  Example:
    >>> values = flags.FlagValues()
    >>> define_flags(values)
    >>> values(["benchmarks.compressors", "--sections=wire"])
    ['benchmarks.compressors']
    >>> values.sections
    ['wire']
  """
  fv = flag_values
  flags.DEFINE_string("outdir", "runs/compressors", "Where results and plots go.",
                      flag_values=fv)
  flags.DEFINE_multi_enum("sections", list(SECTIONS), list(SECTIONS),
                          "Which sections to run.", flag_values=fv)
  flags.DEFINE_bool("quick", False, "Wire bits at 8 devices only and no training "
                    "(about a minute).", flag_values=fv)
  flags.DEFINE_integer("armijo_steps", 3000, "armijo: step cap of the planted runs.",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("network_steps", 1000, "armijo: steps of the network runs.",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed of data, initialization and compression noise.",
                       lower_bound=0, flag_values=fv)

# (row name, jrelu.experiment.Config overrides, threshold). The flags of each row are what README
# quotes: `python -m jrelu.train --FLAG=VALUE ...`.
METHODS = [
    ("float32 SGD", dict(compressor="none", aggregation="psum", learning_rate=0.5), 1e-4),
    ("QSGD s=4 (max)", dict(compressor="qsgd", num_levels=4, learning_rate=0.5), 1e-4),
    ("QSGD s=4 (max), integer psum", dict(compressor="qsgd", num_levels=4,
                                          aggregation="integer_psum", learning_rate=0.5),
     1e-4),
    ("signSGD, majority vote", dict(compressor="sign", aggregation="majority_vote",
                                    learning_rate=0.004, lr_schedule="exponential",
                                    decay_steps=150), 1e-2),
    ("Signum 0.9, majority vote", dict(compressor="sign", aggregation="majority_vote",
                                       momentum=0.9, learning_rate=0.004,
                                       lr_schedule="exponential", decay_steps=150), 1e-2),
    ("scaled sign + EF", dict(compressor="sign", scaled_sign=True, error_feedback=True,
                              learning_rate=0.5), 1e-4),
    ("TernGrad", dict(compressor="terngrad", learning_rate=0.1), 1e-4),
    ("TernGrad, integer psum", dict(compressor="terngrad", aggregation="integer_psum",
                                    learning_rate=0.1), 1e-4),
    ("top-k 10% + EF", dict(compressor="top_k", fraction=0.1, error_feedback=True,
                            learning_rate=0.5), 1e-4),
    ("rand-k 50%", dict(compressor="rand_k", fraction=0.5, learning_rate=0.2), 1e-4),
    ("FO-SGD (dither 0.35)", dict(compressor="fo_sgd", dither_scale=0.35,
                                  learning_rate=0.3), 1e-4),
    ("ATOMO budget 32", dict(compressor="atomo", budget=32, learning_rate=0.1), 1e-4),
    ("PowerSGD rank 1", dict(compressor="powersgd", rank=1, learning_rate=0.5), 1e-4),
]

# EASGD / EAMSGD / DOWNPOUR rows (the elastic section), their step sizes tuned by hand on
# a few values, each to 1e-4 within 3000 steps. Every worker takes its own 128-row batches
# (1024 / 8), so local steps tolerate a smaller step size than SGD's 1024-row mean: EASGD
# diverged at 0.5 (tau = 1, 4, 16) and did not converge at 0.3 (tau = 4); 0.1 took twice
# the steps of 0.2, which every EASGD row uses. EAMSGD: momentum 0.9 with 0.02 (817
# steps at tau = 16; 0.5 with 0.1: 849). DOWNPOUR's center adds the 8 pushes, so its local
# step is 0.2 / 8; at tau = 16 that diverged, and 0.005 was still at 5e-4 after 3000
# steps. With the biased 1-bit codec (scaled sign + EF) EASGD was still at 4e-3 after 3000
# steps at tau = 16 (the center receives the differences too slowly); tau = 4 is shown.
_F32 = dict(compressor="none", aggregation="psum")
ELASTIC_METHODS = [
    ("float32 SGD", dict(compressor="none", aggregation="psum", learning_rate=0.5), 1e-4),
    ("QSGD s=4 SGD", dict(compressor="qsgd", num_levels=4, learning_rate=0.5), 1e-4),
    ("EASGD tau=1, float32", dict(algorithm="easgd", tau=1, **_F32, learning_rate=0.2), 1e-4),
    ("EASGD tau=16, float32", dict(algorithm="easgd", tau=16, **_F32, learning_rate=0.2),
     1e-4),
    ("EASGD tau=64, float32", dict(algorithm="easgd", tau=64, **_F32, learning_rate=0.2),
     1e-4),
    ("EASGD tau=16, QSGD s=4", dict(algorithm="easgd", tau=16, compressor="qsgd",
                                    num_levels=4, learning_rate=0.2), 1e-4),
    ("EASGD tau=64, QSGD s=4", dict(algorithm="easgd", tau=64, compressor="qsgd",
                                    num_levels=4, learning_rate=0.2), 1e-4),
    ("EASGD tau=4, scaled sign + EF", dict(algorithm="easgd", tau=4, compressor="sign",
                                           scaled_sign=True, error_feedback=True,
                                           learning_rate=0.2), 1e-4),
    ("EASGD tau=16, round-robin, float32", dict(algorithm="easgd", tau=16,
                                                exchange="round_robin", compressor="none",
                                                learning_rate=0.2), 1e-4),
    ("EAMSGD tau=16, float32", dict(algorithm="eamsgd", tau=16, momentum=0.9, **_F32,
                                    learning_rate=0.02), 1e-4),
    ("DOWNPOUR tau=4, float32", dict(algorithm="downpour", tau=4, **_F32,
                                     learning_rate=0.025), 1e-4),
    ("DOWNPOUR tau=4, QSGD s=4", dict(algorithm="downpour", tau=4, compressor="qsgd",
                                      num_levels=4, learning_rate=0.025), 1e-4),
]

# One codec per compressor for the wire table, with the hyper-parameters of METHODS.
WIRE_CODECS = [
    ("none", dict(compressor="none")),
    ("qsgd s=4", dict(compressor="qsgd", num_levels=4)),
    ("sign", dict(compressor="sign")),
    ("sign (scaled)", dict(compressor="sign", scaled_sign=True)),
    ("terngrad", dict(compressor="terngrad")),
    ("top_k 10%", dict(compressor="top_k", fraction=0.1)),
    ("rand_k 50%", dict(compressor="rand_k", fraction=0.5)),
    ("fo_sgd", dict(compressor="fo_sgd")),
    ("atomo budget 32", dict(compressor="atomo", budget=32)),
]


def flags_of(overrides: dict) -> str:
  """The ``jrelu.train`` command-line flags of a METHODS row (its Config overrides).

  Args:
    overrides: ``jrelu.experiment.Config`` fields and values.

  Returns:
    ``"--name=value ..."`` (``--name`` / ``--noname`` for booleans).
  """
  out = []
  for name, value in overrides.items():
    if isinstance(value, bool):
      out.append(f"--{name}" if value else f"--no{name}")
    else:
      out.append(f"--{name}={value}")
  return " ".join(out)


def run_dir(outdir: str, name: str) -> str:
  """The training workdir of the METHODS row ``name``: ``OUTDIR/runs/SLUG``."""
  slug = "".join(c if c.isalnum() or c in "=." else "_" for c in name)
  return os.path.join(outdir, "runs", slug)


def measure_wire(config: experiment.Config, devices) -> float:
  """Bits one device sends per step of ``config``'s training step (from its HLO).

  Args:
    config: the method (compressor, aggregation, dim, batch size, seed).
    devices: the N devices the step is compiled for.

  Returns:
    ``jrelu.wire.measure(...).sent_bits`` of the ``pmap`` step.
  """
  key = jax.random.key(config.seed)
  w_star = planted.sample_w_star(key, config.dim)
  dataset = planted.sample_dataset(key, w_star, config.batch_size)
  tx = experiment.make_tx(config, key, len(devices))
  step = parallel.make_step(planted.loss, sampling.make_batch_fn(config.batch_size), tx,
                            metrics_fn=planted.metrics_fn)
  state = parallel.init_state(planted.init_params(key, (dataset, w_star), "zeros"), tx)
  inputs = parallel.replicate((state, (dataset, w_star), key), devices)
  with warnings.catch_warnings():   # this table shows the pairings costlier than float32
    warnings.simplefilter("ignore", transforms.WireCostWarning)
    return wire.measure(parallel.wrap("pmap", step, devices), *inputs).sent_bits


def wire_section(device_counts, seed: int = 0):
  """Measured bits per step per device for every codec x aggregation x device count.

  Args:
    device_counts: the N to compile the step for (at most ``jax.device_count()``).
    seed: the Config's seed (data and compression key).

  Returns:
    One row per (codec, aggregation): ``{"codec", "aggregation", "bits_N_devices",
    "ratio_N_devices"}`` for each N, the ratio being float32 all-reduce bits / bits.

  Raises:
    RuntimeError: when the HLO count differs from ``jrelu.aggregation.wire_bits``.
  """
  rows = []
  for name, overrides in WIRE_CODECS:
    base = experiment.Config(**overrides, seed=seed)
    for strategy in aggregation.supported(experiment.make_codec(base, 1)):
      row = {"codec": name, "aggregation": strategy}
      for n in device_counts:
        config = dataclasses.replace(base, aggregation=strategy)
        bits = measure_wire(config, jax.devices()[:n])
        predicted = aggregation.wire_bits(strategy, experiment.make_codec(config, n),
                                          (config.dim,), n)
        if abs(bits - predicted) > 1e-6 * max(1.0, predicted):
          raise RuntimeError(f"{name} {strategy} N={n}: HLO {bits} != formula {predicted}")
        row[f"bits_{n}_devices"] = bits
        row[f"ratio_{n}_devices"] = (aggregation.float32_allreduce_bits((config.dim,), n)
                                     / bits)
      logging.info("wire %-16s %-13s %s", name, strategy,
                   {n: row[f"bits_{n}_devices"] for n in device_counts})
      rows.append(row)
  return rows


def convergence_section(outdir: str, seed: int, devices, methods=None):
  """Trains every METHODS row (or every row of ``methods``) to its threshold.

  Each row trains with ``jrelu.experiment.run``. Bits to the threshold are those of the
  exchanges made by then: one per step for SGD, ``ceil(steps / tau)`` for EASGD,
  EAMSGD and DOWNPOUR, each the bits read from the compiled step.

  Args:
    outdir: runs go to :func:`run_dir`.
    seed: the Config's seed.
    devices: the devices to train on.
    methods: rows ``(name, Config overrides, threshold)``, one named "float32 SGD";
      default :data:`METHODS`.

  Returns:
    One result dict per row (steps and bits to the threshold, ratio to float32 SGD).
  """
  rows = []
  for name, overrides, threshold in METHODS if methods is None else methods:
    workdir = run_dir(outdir, name)
    config = experiment.Config(**overrides, num_steps=6000, target_relative_error=threshold,
                               log_every=50, seed=seed)
    start = time.perf_counter()
    try:
      # fresh: a benchmark measures, so a rerun trains again instead of resuming.
      summary = experiment.run(config, workdir, devices=devices, fresh=True)
    except experiment.DivergedError as e:
      summary = {"status": "diverged", "steps_to_target": None, "relative_error": None,
                 "wire_bits_per_step_per_device": None, "compression_ratio": None,
                 "diverged_at_step": e.step}
    steps = summary["steps_to_target"]
    bits = summary["wire_bits_per_step_per_device"]
    sent = (easgd.exchanges(steps, experiment.steps_per_exchange(config))
            * summary["wire_bits_per_exchange_per_device"] if steps and bits else None)
    rows.append({
        "method": name, "flags": flags_of(overrides), "threshold": threshold,
        "status": summary["status"], "steps_to_threshold": steps,
        "relative_error": summary["relative_error"],
        "wire_bits_per_step_per_device": bits,
        "compression_ratio": summary["compression_ratio"],
        "bits_to_threshold_per_device": sent,
        "wall_seconds": time.perf_counter() - start,
        "metrics_path": os.path.join(workdir, "metrics.jsonl"),
    })
    logging.info("%-32s %s: %s steps to %.0e", name, summary["status"], steps, threshold)
  float32 = next(r for r in rows if r["method"] == "float32 SGD")
  for row in rows:
    if row["bits_to_threshold_per_device"] and float32["bits_to_threshold_per_device"]:
      row["fewer_bits_than_float32_sgd"] = (float32["bits_to_threshold_per_device"]
                                            / row["bits_to_threshold_per_device"])
  return rows


# Settings of a fixed step size, replaced by the search in the armijo section.
_FIXED_STEP = ("learning_rate", "lr_schedule", "decay_steps", "decay_rate")
ARMIJO_TARGET = 1e-4
NETWORK_TARGET = 1e-6   # training loss relative to its initial value


def armijo_overrides(overrides: dict, scale: float | None = None) -> dict:
  """A METHODS row's Config overrides with ``step_size="armijo"`` in place of its step size.

  Args:
    overrides: the row's ``jrelu.experiment.Config`` overrides.
    scale: ``armijo_scale`` (None: the default).

  Example:
    >>> armijo_overrides(dict(compressor="terngrad", learning_rate=0.1), 1.0)
    {'compressor': 'terngrad', 'step_size': 'armijo', 'armijo_scale': 1.0}
  """
  out = {k: v for k, v in overrides.items() if k not in _FIXED_STEP}
  out["step_size"] = "armijo"
  if scale is not None:
    out["armijo_scale"] = scale
  return out


def armijo_section(outdir: str, seed: int, devices, num_steps: int = 3000):
  """Every METHODS row with the Armijo search, scaled and unscaled, on the planted ReLU.

  Args:
    outdir: runs go to :func:`run_dir` (``armijo ...``).
    seed: the Config's seed.
    devices: the devices to train on.
    num_steps: the step cap (a run stops at relative error 1e-4).

  Returns:
    One result dict per (row, scaling): steps to 1e-4, final error, bits per step with
    the search's trials, trials per step.
  """
  rows = []
  for name, overrides, _ in METHODS:
    for scaled in (True, False):
      settings = armijo_overrides(overrides, None if scaled else 1.0)
      workdir = run_dir(outdir, f"armijo {name}" + ("" if scaled else " unscaled"))
      config = experiment.Config(**settings, num_steps=num_steps,
                                 target_relative_error=ARMIJO_TARGET, log_every=50,
                                 seed=seed)
      start = time.perf_counter()
      try:
        summary = experiment.run(config, workdir, devices=devices, fresh=True)
      except experiment.DivergedError as e:
        with open(os.path.join(workdir, "summary.json")) as f:
          summary = json.load(f)
        summary["diverged_at_step"] = e.step
      steps = summary["steps_to_target"]
      bits = summary["wire_bits_per_step_per_device"]
      rows.append({
          "method": name, "scaled": scaled, "flags": flags_of(settings),
          "status": summary["status"], "steps_to_threshold": steps,
          "steps": summary["steps"], "relative_error": summary["relative_error"],
          "wire_bits_per_step_per_device": bits,
          "linesearch_trials_per_step": (summary["linesearch_trials"] / summary["steps"]
                                         if summary["steps"] else None),
          "bits_to_threshold_per_device": steps * bits if steps and bits else None,
          "wall_seconds": time.perf_counter() - start,
          "metrics_path": os.path.join(workdir, "metrics.jsonl"),
      })
      logging.info("armijo %-32s %s: %s, %s steps to %.0e, error %.2e", name,
                   "scaled" if scaled else "unscaled", summary["status"], steps,
                   ARMIJO_TARGET, summary["relative_error"])
  return rows


def network_armijo_section(seed: int, devices, num_steps: int = 1000,
                           log_every: int = 50):
  """Every METHODS codec with the Armijo search on the planted two-layer network.

  The network of ``jrelu.network`` (d = 20, K = 4 hidden units, n = 400, global batch 256
  drawn with replacement), data-parallel on ``devices`` under ``jax.pmap``, with the
  transform ``jrelu.experiment.make_tx`` builds for each row, scaled and unscaled.

  Args:
    seed: seed of the teacher, data, initialization and compression noise.
    devices: the devices to train on.
    num_steps: steps per run.
    log_every: steps between recorded training losses.

  Returns:
    One dict per (codec, scaling): the training loss relative to its initial value
    every ``log_every`` steps and at the end, trials per step.
  """
  key = jax.random.key(seed)
  teacher = network.sample_teacher(jax.random.fold_in(key, 0), 20, 4)
  data = network.sample_dataset(jax.random.fold_in(key, 1), teacher, 400)
  params = network.init_params(jax.random.fold_in(key, 2), (data, teacher), scale=1.0)
  loss = jax.jit(lambda p: network.loss(p, data.x, data.y))
  initial = float(loss(params))
  batch_fn = sampling.make_batch_fn(256, sampling="replacement")
  rows = []
  for name, overrides, _ in METHODS:
    codec = {k: v for k, v in overrides.items() if k not in _FIXED_STEP}
    for scaled in (True, False):
      config = experiment.resolve(experiment.Config(
          **armijo_overrides(overrides, None if scaled else 1.0), seed=seed))
      tx = experiment.make_tx(config, jax.random.fold_in(key, 3), len(devices))
      step = parallel.make_step(network.loss, batch_fn, tx, extra_args=True,
                                opt_metrics_fn=linesearch.metrics)
      run = parallel.pmapped(parallel.scan_steps(step, log_every), devices)
      state, inputs = parallel.replicate(
          (parallel.init_state(params, tx), ((data, teacher), jax.random.fold_in(key, 4))),
          devices)
      losses, trials = [], 0
      start = time.perf_counter()
      # Some codecs send more than float32 on the network's tiny leaves, and warn so;
      # this table is about training.
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", transforms.WireCostWarning)
        for _ in range(num_steps // log_every):
          state, metrics = run(state, *inputs)
          trials += int(np.asarray(metrics["linesearch_trials"])[0].sum())
          losses.append(float(loss(parallel.unreplicate(state.params))) / initial)
      rows.append({"method": name, "codec": flags_of(codec),
                   "scaled": scaled, "relative_loss": losses,
                   "final_relative_loss": losses[-1],
                   "linesearch_trials_per_step": trials / num_steps,
                   "wall_seconds": time.perf_counter() - start})
      logging.info("network %-32s %s: relative training loss %.2e", name,
                   "scaled" if scaled else "unscaled", losses[-1])
  return rows


def armijo_markdown(rows, network_rows, convergence_rows=(), network_log_every: int = 50
                    ) -> str:
  """The README tables of the armijo section.

  Args:
    rows: :func:`armijo_section`'s rows.
    network_rows: :func:`network_armijo_section`'s rows.
    convergence_rows: :func:`convergence_section`'s rows (for the tuned fixed step's
      steps), or empty.
    network_log_every: steps between the network rows' recorded losses.

  Returns:
    Markdown text.
  """
  fixed = {r["method"]: r for r in convergence_rows}
  head = ("| method | steps to 1e-4, Armijo | bits/step/device (trials/step) | Mbit to 1e-4 | "
          + ("fixed tuned step: steps to its threshold | " if fixed else "")
          + "unscaled (scale 1): 1e-4 at, or the end |")
  lines = [head, "|---|---:|---:|---:|" + ("---:|" if fixed else "") + "---|"]
  by_method = {}
  for r in rows:
    by_method.setdefault(r["method"], {})[r["scaled"]] = r
  for name, pair in by_method.items():
    a, u = pair.get(True), pair.get(False)
    if a is None or u is None:
      continue
    mbit = (f"{a['bits_to_threshold_per_device'] / 1e6:.2f}"
            if a["bits_to_threshold_per_device"] else "-")
    bits = (f"{a['wire_bits_per_step_per_device']:,.0f} ({a['linesearch_trials_per_step']:.1f})"
            if a["wire_bits_per_step_per_device"] else "-")
    tuned = ""
    if fixed:
      f = fixed.get(name)
      tuned = (f"{f['steps_to_threshold']} to {f['threshold']:.0e} | "
               if f and f["steps_to_threshold"] else "- | ")
    if u["status"] == "diverged":
      unscaled = f"diverged (Inf/NaN) at step {u['steps'] + 1}"
    elif u["steps_to_threshold"]:
      unscaled = f"step {u['steps_to_threshold']}"
    else:
      unscaled = f"error {u['relative_error']:.1e} after {u['steps']} steps"
    lines.append(f"| {name} | {a['steps_to_threshold'] or a['status']} | {bits} | {mbit} "
                 f"| {tuned}{unscaled} |")
  if network_rows:
    lines += ["", "| codec (network) | Armijo: steps to loss 1e-6 x initial | at the end | "
              "unscaled: steps to 1e-6 x | at the end |", "|---|---:|---:|---:|---:|"]
    pairs = {}
    for r in network_rows:
      pairs.setdefault(r["method"], {})[r["scaled"]] = r
    for name, pair in pairs.items():
      cells = []
      for scaled in (True, False):
        r = pair[scaled]
        hit = next((i for i, x in enumerate(r["relative_loss"]) if x <= NETWORK_TARGET), None)
        cells += [str(network_log_every * (hit + 1)) if hit is not None else "-",
                  f"{r['final_relative_loss']:.1e}"]
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def armijo_plot(rows, network_rows, outdir, network_log_every: int = 50):
  """Planted-ReLU error and network loss against step, scaled and unscaled.

  Writes ``OUTDIR/armijo.png``; nothing when matplotlib is not installed.

  Args:
    rows: :func:`armijo_section`'s rows (their metrics files are read).
    network_rows: :func:`network_armijo_section`'s rows.
    outdir: the output directory.
    network_log_every: steps between the network rows' recorded losses.
  """
  plt = common.pyplot()
  if plt is None:
    return
  fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
  names = list(dict.fromkeys([r["method"] for r in rows] + [r["method"] for r in network_rows]))
  cmap = plt.get_cmap("tab20")
  style = {name: (cmap(i % 20), "-" if i % 2 == 0 else "--") for i, name in enumerate(names)}
  for r in rows:
    if not os.path.exists(r["metrics_path"]):
      continue
    with open(r["metrics_path"]) as f:
      records = [json.loads(line) for line in f]
    color, line = style[r["method"]]
    axes[0, 0 if r["scaled"] else 1].semilogy(
        [0] + [x["step"] for x in records],
        [1.0] + [min(x["relative_error"], 1e6) for x in records], line, color=color,
        label=r["method"])
  for r in network_rows:
    color, line = style[r["method"]]
    steps = [network_log_every * (i + 1) for i in range(len(r["relative_loss"]))]
    axes[1, 0 if r["scaled"] else 1].semilogy([0] + steps, [1.0] + r["relative_loss"], line,
                                              color=color, label=r["method"])
  titles = [["planted ReLU (d=1000, 8 devices): Armijo, scale 1/2",
             "planted ReLU: Armijo unscaled (scale 1; clipped at 1e6)"],
            ["two-layer network (d=20, K=4, 8 devices): scale 1/2",
             "two-layer network: unscaled"]]
  for i in range(2):
    for j in range(2):
      axes[i, j].set_title(titles[i][j], fontsize=9)
      axes[i, j].grid(True, which="both", alpha=0.3)
      axes[i, j].set_xlabel("step")
    axes[i, 0].set_ylabel(r"$\|w - w^*\| / \|w^*\|$" if i == 0
                          else "training loss / initial")
  handles, labels = axes[0, 0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=7)
  fig.suptitle("Armijo step sizes (jrelu.armijo, default constants): no step size tuned",
               fontsize=10)
  fig.tight_layout(rect=(0, 0.07, 1, 1))
  fig.savefig(os.path.join(outdir, "armijo.png"), dpi=90)
  plt.close(fig)


def markdown(wire_rows, convergence_rows, device_counts, elastic_rows=()) -> str:
  """The README tables of ``OUTDIR/summary.md``.

  Args:
    wire_rows: :func:`wire_section`'s rows (may be empty).
    convergence_rows: :func:`convergence_section`'s rows (may be empty).
    device_counts: the N of the wire table's columns.
    elastic_rows: :func:`convergence_section`'s rows of ``ELASTIC_METHODS`` (may be
      empty).

  Returns:
    Markdown text.
  """
  lines = []
  if wire_rows:
    head = " | ".join(f"N={n}" for n in device_counts)
    lines += ["Bits sent per device per step, d = 1000, read from the compiled step's HLO "
              "(float32 all-reduce: " + ", ".join(
                  f"{2 * (n - 1) / n * 32 * 1000:,.0f}" for n in device_counts) + "):",
              "", f"| codec | aggregation | {head} | fewer than float32 at N={device_counts[-1]} |",
              "|---|---|" + "---:|" * (len(device_counts) + 1)]
    for r in wire_rows:
      cells = " | ".join(f"{r[f'bits_{n}_devices']:,.0f}" for n in device_counts)
      lines.append(f"| {r['codec']} | {r['aggregation']} | {cells} | "
                   f"{r[f'ratio_{device_counts[-1]}_devices']:.1f}x |")
    lines.append("")
  for rows in (convergence_rows, elastic_rows):
    if not rows:
      continue
    if rows is elastic_rows and convergence_rows:
      lines.append("")
    lines += ["| method | flags | threshold | steps | bits/step/device | Mbit to threshold | "
              "fewer bits than float32 SGD |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
      mbit = (f"{r['bits_to_threshold_per_device'] / 1e6:.2f}"
              if r["bits_to_threshold_per_device"] else "-")
      fewer = (f"{r['fewer_bits_than_float32_sgd']:.1f}x"
               if r.get("fewer_bits_than_float32_sgd") else "-")
      bits = (f"{r['wire_bits_per_step_per_device']:,.0f}"
              if r["wire_bits_per_step_per_device"] else "-")
      lines.append(f"| {r['method']} | `{r['flags']}` | {r['threshold']:.0e} | "
                   f"{r['steps_to_threshold'] or r['status']} | {bits} | {mbit} | {fewer} |")
  return "\n".join(lines) + "\n"


def plot(convergence_rows, outdir, filename="bits_to_threshold.png"):
  """Relative error against Mbit sent per device, one line per METHODS row.

  Writes ``OUTDIR/FILENAME``; nothing when matplotlib is not installed.

  Args:
    convergence_rows: :func:`convergence_section`'s rows.
    outdir: the output directory.
    filename: the plot's file name.
  """
  plt = common.pyplot()
  if plt is None:
    return
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, r in enumerate(convergence_rows):
    if not os.path.exists(r["metrics_path"]):
      continue
    with open(r["metrics_path"]) as f:
      records = [json.loads(line) for line in f]
    ax.loglog([x["cumulative_wire_bits_per_device"] / 1e6 for x in records],
              [x["relative_error"] for x in records], label=r["method"],
              linestyle=("-", "--", ":")[i // 10 % 3])   # the colors repeat after 10
  ax.set_xlabel("Mbit sent per device (from HLO)")
  ax.set_ylabel(r"$\|w - w^*\| / \|w^*\|$")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(outdir, filename), dpi=110)
  plt.close(fig)


def main(argv):
  """absl main: flags -> sections; writes summary.md and prints one JSON line."""
  del argv
  fv = flags.FLAGS
  devices = common.setup_devices(8)
  common.make_outdir(fv.outdir)
  device_counts = (8,) if fv.quick else (2, 4, 8)
  start = time.perf_counter()
  wire_rows = wire_section(device_counts, fv.seed) if "wire" in fv.sections else []
  convergence_rows = []
  if "convergence" in fv.sections and not fv.quick:
    convergence_rows = convergence_section(fv.outdir, fv.seed, devices)
    plot(convergence_rows, fv.outdir)
  elastic_rows = []
  if "elastic" in fv.sections and not fv.quick:
    elastic_rows = convergence_section(os.path.join(fv.outdir, "elastic"), fv.seed, devices,
                                       ELASTIC_METHODS)
    plot(elastic_rows, fv.outdir, "elastic_bits_to_threshold.png")
  armijo_rows, network_rows = [], []
  if "armijo" in fv.sections and not fv.quick:
    armijo_rows = armijo_section(fv.outdir, fv.seed, devices, fv.armijo_steps)
    network_rows = network_armijo_section(fv.seed, devices, fv.network_steps)
    armijo_plot(armijo_rows, network_rows, fv.outdir)
  with open(os.path.join(fv.outdir, "summary.md"), "w") as f:
    f.write(markdown(wire_rows, convergence_rows, device_counts, elastic_rows))
    if armijo_rows:
      f.write("\n" + armijo_markdown(armijo_rows, network_rows, convergence_rows))
  common.print_json_line({
      "benchmark": "compressors", **common.machine_info(),
      "wire": wire_rows, "convergence": convergence_rows, "elastic": elastic_rows,
      "armijo": armijo_rows, "armijo_network": network_rows,
      "wall_seconds": time.perf_counter() - start,
  })


if __name__ == "__main__":
  define_flags(flags.FLAGS)
  common.run_main(main, PROG)
