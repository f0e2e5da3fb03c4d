r"""How fast is jrelu's training step: against reading the batch once, and against PyTorch.

Sections (``--sections``, default all):

* ``step``: steps per second of jrelu's training step (``jrelu.parallel.scan_steps``
  chunks of ``--steps_per_chunk`` steps, compiled once, one warm-up call, then
  ``--repeats`` timed calls that block on the result, interleaved across configurations
  so that a busy machine slows all alike), for every row of ``METHODS`` on 1 and
  ``--num_devices`` devices, along three paths:

  - ``vmap``: ``jrelu.parallel.vmapped``, the N devices simulated in one program, the
    data set split into one segment per device (``jrelu.planted.split_segments``);
  - ``pmap``: ``jax.pmap`` over N simulated CPU devices with the replicated data set,
    what ``python -m jrelu.train`` runs;
  - ``pmap_replacement``: ``pmap`` with the sampling jrelu used before, rows drawn with
    replacement and gathered (``jrelu.planted.make_batch_fn(sampling="replacement")``).

* ``roofline``: a step must read its ``B x d`` float32 batch from memory at least once.
  With ``step``, timed once per round of the step timings (machine speed drifts), else on
  its own. A NumPy matvec over a fresh ``B x d`` slice of an array of at least 4 x the last-level
  cache (slices cycle, so each streams from memory) with 1 and all cores;
  ``roofline_seconds`` is the faster median, and each step's ``roofline_ratio`` is
  ``roofline_seconds / step seconds`` (1: a step costs no more than reading its batch).
  Each multi-device ``pmap`` row also counts its collectives per step (from the compiled
  HLO), and a loop of scalar all-reduces times one rendezvous of the N devices: on
  simulated CPU devices (one thread each, sharing the cores) the synchronisation, not
  the bytes, is most of a collective's cost, and the JSON gives the step time without it
  as an estimate.
* ``torch``: PyTorch peers at the same global batch and worker count
  (``benchmarks/_torch_peers.py``): DistributedDataParallel over Gloo with N processes and
  PyTorch's communication hooks, and a one-process loop over N simulated workers with QSGD
  as PyTorch compressor code writes it. Needs ``torch==2.13.0`` (``pip install
  '.[bench]'``); skipped with a note when torch is missing or ``--skip_torch``.
* ``sweep``: the ``vmap`` step (``SWEEP_METHOD``, N devices) over d at fixed B and over B
  at fixed d: cost should grow linearly in both (fitted log-log exponents, plot).
* ``kernels``: encode + decode throughput of every compressor in
  ``jrelu.compressors.REGISTRY`` (GB/s of float32 input, jitted, one device) from
  d = 1e3 to 1e7, next to the NumPy read bandwidth.
* ``scale``: d = ``--scale_dim`` (1e6) with online sampling (fresh Gaussian batches drawn on
  the devices every step, no stored data set) and QSGD for a few steps, in a fresh
  process: peak memory (``ru_maxrss``) and steps per second.

    python benchmarks/step_throughput.py                    # full, ~15 min on 2 cores
    python benchmarks/step_throughput.py --quick            # ~2 min
    python benchmarks/step_throughput.py --sections=step,roofline --skip_torch

Prints one JSON line; writes ``OUTDIR/results.json``, ``OUTDIR/summary.md`` (tables for
README) and the plots ``steps_per_second.png``, ``scaling.png``, ``kernels.png``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from benchmarks import common  # noqa: E402

SECTIONS = ("step", "roofline", "torch", "sweep", "kernels", "scale")
PATHS = ("vmap", "pmap", "pmap_replacement")


@dataclasses.dataclass(frozen=True)
class Method:
  """One row of ``METHODS``: a compressor from the registry, its kwargs, the aggregation.

  Attributes:
    compressor: a key of ``jrelu.compressors.REGISTRY``.
    kwargs: keyword arguments of that factory.
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


# The compressors whose training step is timed. Adding one is one line.
METHODS = {
    "none": Method("none", {}, "psum", torch_peers=("ddp_allreduce", "ddp_fp16",
                                                    "loop_none")),
    "qsgd": Method("qsgd", {"num_levels": 4, "norm": "max"}, "two_phase",
                   torch_peers=("ddp_quantization", "ddp_powersgd", "loop_qsgd")),
    # The same step with a Philox key: QSGD's uniform draws dominate its cost on CPU, and
    # Philox draws them about twice as fast as threefry (the numbers differ, not the law).
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
TORCH_DDP_HOOKS = ("allreduce", "fp16", "quantization", "powersgd")
TARGETS = {"roofline_ratio": 0.5, "times_fastest_torch_peer": 3.0}
_SETTLE_SECONDS = 0.05
TIMING_NOTE = ("Absolute speeds of a shared or virtual machine drift between runs (by a "
               "third on the 2-core VM this was written on); the ratios compare timings "
               "taken in the same run, interleaved, and are the numbers to quote.")

FULL = {"repeats": 7, "steps_per_chunk": 50, "sweep_dims": "250,500,1000,2000,4000",
        "kernel_call_seconds": 0.2, "ddp_worker_counts": "all", "scale_steps": 3,
        "sweep_batches": "512,1024,2048,4096,8192", "kernel_dims": "1e3,1e4,1e5,1e6,1e7",
        "torch_steps": 20, "ddp_steps": 10, "ddp_hooks": TORCH_DDP_HOOKS,
        "step_paths": PATHS, "methods": None}
QUICK = {"repeats": 3, "steps_per_chunk": 20, "sweep_dims": "250,4000",
         "sweep_batches": "512,8192", "kernel_call_seconds": 0.05, "ddp_worker_counts": "N",
         "scale_steps": 1, "kernel_dims": "1e3,1e4,1e5",
         "torch_steps": 10, "ddp_steps": 4, "ddp_hooks": ("allreduce",),
         "step_paths": ("vmap", "pmap"), "methods": ("none", "qsgd")}

_OUTDIR = flags.DEFINE_string("outdir", "runs/step_throughput", "Where results and plots go.")
_QUICK = flags.DEFINE_bool("quick", False, "Fewer repeats, sizes and peers (~2 minutes).")
_SECTIONS = flags.DEFINE_list("sections", ",".join(SECTIONS),
                              f"Comma-separated subset of {', '.join(SECTIONS)}.")
_REPEATS = flags.DEFINE_integer("repeats", None, "Timed repeats per configuration "
                                "(default 7, quick 3).", lower_bound=1)
_SKIP_TORCH = flags.DEFINE_bool("skip_torch", False, "Skip the PyTorch peers.")
_METHODS = flags.DEFINE_list("methods", None, "Rows of METHODS to time (default: all; "
                             "quick: none, qsgd).")
_SWEEP_METHOD = flags.DEFINE_enum("sweep_method", SWEEP_METHOD, list(METHODS),
                                  "Row of METHODS that the sweep times.")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 8, "Devices N of the multi-device runs "
                                    "(simulated CPU devices); 1 is always timed too.",
                                    lower_bound=1)
_DIM = flags.DEFINE_integer("dim", 1000, "Dimension d of the timed step.", lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 4096, "Global mini-batch size B.",
                                   lower_bound=1)
_NUM_SAMPLES = flags.DEFINE_integer(
    "num_samples", None, "Stored samples n; default: a multiple of B with n d 4 bytes >= "
    "4 x the last-level cache and n >= 2 B, so that batches stream from memory.",
    lower_bound=1)
_STEPS_PER_CHUNK = flags.DEFINE_integer("steps_per_chunk", None, "Steps per timed compiled "
                                        "call (default 50, quick 20).", lower_bound=1)
_SWEEP_DIMS = flags.DEFINE_string("sweep_dims", None, "d values of the sweep at B = "
                                  "--batch_size (default 250,...,4000).")
_SWEEP_BATCHES = flags.DEFINE_string("sweep_batches", None, "B values of the sweep at d = "
                                     "--dim (default 512,...,8192).")
_KERNEL_DIMS = flags.DEFINE_string("kernel_dims", None, "d values of the kernels section "
                                   "(default 1e3,...,1e7; quick up to 1e5).")
_KERNEL_COMPRESSORS = flags.DEFINE_list(
    "kernel_compressors", None, "Registry names of the kernels section (default: all).")
_SCALE_DIM = flags.DEFINE_integer("scale_dim", 1_000_000, "d of the scale section.",
                                  lower_bound=1)
_SCALE_BATCH_SIZE = flags.DEFINE_integer(
    "scale_batch_size", 256, "Global batch of the scale section (256 over 8 devices at "
    "d = 1e6: 1 GB of float32 inputs drawn per step).", lower_bound=1)
_SCALE_STEPS = flags.DEFINE_integer("scale_steps", None, "Timed steps of the scale section "
                                    "(default 3, quick 1).", lower_bound=1)


def _check_sections(values):
  return bool(values) and all(v in SECTIONS for v in values)


flags.register_validator("sections", _check_sections,
                         f"must be a comma-separated subset of {', '.join(SECTIONS)}")
for _name in ("sweep_dims", "sweep_batches", "kernel_dims"):
  flags.register_validator(
      _name, lambda v, n=_name: v is None or _is_int_list(v, n),
      "must be a comma-separated list of positive integers (1e6 allowed)")


def _is_int_list(text, name):
  try:
    common.int_list(text, name)
  except ValueError:
    return False
  return True


def _setting(name):
  return (QUICK if _QUICK.value else FULL)[name]


# ---------------------------------------------------------------------------------------
# jrelu steps

def default_num_samples(dim: int, batch_size: int, llc: int) -> int:
  """Smallest multiple of B with ``n >= 2 B`` and ``n d 4 >= 4 LLC`` bytes."""
  rows = max(2 * batch_size, -(-4 * llc // (4 * dim)))
  return -(-rows // batch_size) * batch_size


class StepBench:
  """Builds, compiles and times jrelu training steps on one planted problem.

  Args:
    dim: d.
    batch_size: global B.
    num_samples: stored n.
    steps: steps per compiled call.
    devices: the simulated CPU devices (at least the largest N timed).
  """

  def __init__(self, dim, batch_size, num_samples, steps, devices):
    import jax
    from jrelu import planted
    self.dim, self.batch_size, self.steps = dim, batch_size, steps
    self.devices = devices
    w_key, data_key = jax.random.split(jax.random.key(0))
    self.w_star = planted.sample_w_star(w_key, dim)
    self.dataset = planted.sample_dataset(data_key, self.w_star, num_samples)
    self._data = {}

  def _data_for(self, path, n_dev):
    """The ``data`` argument for ``path`` on ``n_dev`` devices (built once, shared)."""
    from jrelu import parallel
    from jrelu import planted
    key = ("vmap" if path == "vmap" else "pmap", n_dev)
    if key not in self._data:
      if path == "vmap":
        self._data[key] = (planted.split_segments(self.dataset, n_dev), self.w_star)
      else:
        self._data[key] = parallel.replicate((self.dataset, self.w_star),
                                             self.devices[:n_dev])
    return self._data[key]

  def build(self, method: Method, n_dev: int, path: str):
    """Compiles ``steps`` steps; returns ``(run, state, data, key, compile_seconds)``."""
    import jax
    import jax.numpy as jnp
    import optax
    from jrelu import compressors
    from jrelu import parallel
    from jrelu import planted
    from jrelu import transforms
    compressor = compressors.REGISTRY[method.compressor](**method.kwargs)
    tx = optax.chain(
        transforms.compress(compressor, key=jax.random.key(2, impl=method.key_impl),
                            axis_name=parallel.AXIS_NAME, aggregation=method.aggregation),
        optax.sgd(method.learning_rate))
    sampling = "replacement" if path == "pmap_replacement" else "window"
    step = parallel.make_step(planted.loss,
                              planted.make_batch_fn(self.batch_size, sampling=sampling), tx,
                              metrics_fn=planted.metrics_fn)
    fn = parallel.scan_steps(step, self.steps)
    state = parallel.init_state(jnp.zeros((self.dim,), jnp.float32), tx)
    key = jax.random.key(3)
    data = self._data_for(path, n_dev)
    start = time.perf_counter()
    if path == "vmap":
      axes = parallel.VMAP_STATE_AXES
      state = parallel.stack(state, n_dev, axes)
      run = parallel.vmapped(fn, n_dev, in_axes=(axes, (0, None), None),
                             out_axes=(axes, 0))
    else:
      devices = self.devices[:n_dev]
      state, key = parallel.replicate((state, key), devices)
      run = parallel.pmapped(fn, devices)
    run = run.lower(state, data, key).compile()
    return run, state, data, key, time.perf_counter() - start


def time_interleaved(configs, repeats: int, steps: int, probes=()) -> tuple[dict, dict]:
  """Times compiled chunks: one warm-up call each, then ``repeats`` rounds over all.

  Args:
    configs: ``{name: (run, state, data, key)}``.
    repeats: timed calls per configuration.
    steps: steps per call.
    probes: :class:`benchmarks.common.RooflineProbe` objects measured once per round too,
      so that the roofline and the steps it is compared with see the same machine speed.
      Each probe and the next round start ``_SETTLE_SECONDS`` after the previous work,
      once the thread pools of XLA and OpenBLAS stop spinning for more work.

  Returns:
    ``({name: [steps per second of each timed call]}, {probe: [seconds per matvec]})``.
  """
  import jax
  states = {}
  for name, (run, state, data, key) in configs.items():
    states[name] = jax.block_until_ready(run(state, data, key))[0]
  for probe in probes:
    probe.measure()
  rates = {name: [] for name in configs}
  reads = {probe: [] for probe in probes}
  for _ in range(repeats):
    for name, (run, _, data, key) in configs.items():
      start = time.perf_counter()
      out = jax.block_until_ready(run(states[name], data, key))
      rates[name].append(steps / (time.perf_counter() - start))
      states[name] = out[0]
    for probe in probes:
      time.sleep(_SETTLE_SECONDS)
      reads[probe].append(probe.measure())
    if probes:
      time.sleep(_SETTLE_SECONDS)
  return rates, reads


def rendezvous_section(devices, repeats: int, steps: int = 200) -> dict:
  """Seconds of one all-reduce of a float32 scalar over ``devices`` inside a compiled loop.

  Every collective is a rendezvous of all devices; on simulated CPU devices (one thread
  each, sharing the cores) that synchronisation, not the bytes, is most of its cost. A
  loop of ``steps`` dependent scalar ``psum`` calls, one warm-up, ``repeats`` timed calls.

  Args:
    devices: the N devices.
    repeats: timed calls.
    steps: all-reduces per call.

  Returns:
    ``{"num_devices", "operand", "seconds": stats(seconds per all-reduce)}``.
  """
  import jax
  import jax.numpy as jnp
  from jrelu import parallel

  def loop(x):
    body = lambda c, _: (jax.lax.psum(c * 0.5, parallel.AXIS_NAME), None)
    return jax.lax.scan(body, x, None, length=steps)[0]

  run = parallel.pmapped(loop, devices)
  x = parallel.replicate(jnp.ones((), jnp.float32), devices)
  jax.block_until_ready(run(x))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(run(x))
    times.append((time.perf_counter() - start) / steps)
  return {"num_devices": len(devices), "operand": "float32 scalar", "seconds": common.stats(times)}


def step_section(bench: StepBench, device_counts, paths, repeats: int, methods=None,
                 probes=()) -> tuple[list[dict], list[dict]]:
  """Steps per second of every METHODS row (or those named) x device count x path.

  Returns:
    ``(rows, roofline)``: one row per timed configuration, and one
    :meth:`~benchmarks.common.RooflineProbe.summary` per probe, timed in the same rounds.
  """
  from jrelu import wire
  configs, rows = {}, []
  for n_dev in device_counts:
    for name, method in METHODS.items():
      if methods and name not in methods:
        continue
      for path in paths:
        if method.paths is not None and path not in method.paths:
          continue
        if path == "pmap_replacement" and (n_dev, name) != (device_counts[-1],
                                                            TARGET_METHOD):
          continue  # the before-number: only at the target configuration
        logging.info("compiling %s on %d device(s), %s", name, n_dev, path)
        run, state, data, key, seconds = bench.build(method, n_dev, path)
        label = f"{name}/{n_dev}/{path}"
        configs[label] = (run, state, data, key)
        rows.append({"method": name, "num_devices": n_dev, "path": path,
                     "compile_seconds": seconds, "label": label})
        if path != "vmap" and n_dev > 1:  # a loop body's collectives appear once: per step
          rows[-1]["collectives_per_step"] = len(wire.parse(run.as_text()).collectives)
  logging.info("timing %d configurations x %d repeats", len(configs), repeats)
  rates, reads = time_interleaved(configs, repeats, bench.steps, probes)
  for row in rows:
    row["steps_per_second"] = common.stats(rates[row.pop("label")])
    row["step_seconds_median"] = 1.0 / row["steps_per_second"]["median"]
  return rows, [probe.summary(reads[probe]) for probe in probes]


def sweep_section(dims, batches, base_dim, base_batch, n_dev, repeats, steps, devices,
                  llc, read_gbps, num_samples=None, method=SWEEP_METHOD) -> dict:
  """The ``vmap`` step over d (B fixed) and over B (d fixed), with fitted exponents."""
  points = [("dim", d, base_batch) for d in dims] + [("batch", base_dim, b) for b in batches]
  out = {"method": method, "num_devices": n_dev, "path": "vmap",
         "fixed_batch_size": base_batch, "fixed_dim": base_dim, "dim": [], "batch": []}
  for axis, d, b in points:
    if b % n_dev:
      logging.warning("sweep: skipping B=%d, not divisible by %d devices", b, n_dev)
      continue
    n = max(num_samples, b) if num_samples else default_num_samples(d, b, llc)
    bench = StepBench(d, b, n, steps, devices)
    run, state, data, key, _ = bench.build(METHODS[method], n_dev, "vmap")
    rates = time_interleaved({"x": (run, state, data, key)}, repeats, steps)[0]["x"]
    seconds = 1.0 / common.stats(rates)["median"]
    point = {"dim": d, "batch_size": b, "steps_per_second": common.stats(rates),
             "step_seconds_median": seconds}
    if read_gbps:
      point["read_seconds"] = b * d * 4 / (read_gbps * 1e9)
      point["roofline_ratio"] = point["read_seconds"] / seconds
    out[axis].append(point)
    logging.info("sweep d=%d B=%d: %.0f steps/s", d, b, 1 / seconds)
  for axis, key in (("dim", "dim"), ("batch", "batch_size")):
    xs = [p[key] for p in out[axis]]
    ys = [p["step_seconds_median"] for p in out[axis]]
    out[f"{axis}_exponent"] = _loglog_slope(xs, ys)
    half = len(xs) // 2
    out[f"{axis}_exponent_upper_half"] = _loglog_slope(xs[half:], ys[half:])
    # Linear growth means t = t0 + k x: the fit's r^2 near 1 (a fixed cost t0, e.g. the
    # compressor's work on d coordinates in the B sweep, lowers the log-log exponent).
    out[f"{axis}_linear_fit"] = _linear_fit(xs, ys)
  return out


def _linear_fit(xs, ys):
  """Least-squares ``y = intercept + slope x``: ``{intercept, slope, r2}`` or None."""
  if len(xs) < 2:
    return None
  mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
  var = sum((x - mx) ** 2 for x in xs)
  if not var:
    return None
  slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var
  intercept = my - slope * mx
  total = sum((y - my) ** 2 for y in ys)
  resid = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
  return {"intercept_seconds": intercept, "slope_seconds": slope,
          "r2": 1 - resid / total if total else 1.0}


def _loglog_slope(xs, ys):
  """Least-squares slope of log y against log x (None for fewer than 2 points)."""
  if len(xs) < 2:
    return None
  lx = [math.log(x) for x in xs]
  ly = [math.log(y) for y in ys]
  mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
  var = sum((a - mx) ** 2 for a in lx)
  return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / var if var else None


# ---------------------------------------------------------------------------------------
# compressor kernels

def kernel_section(dims, repeats, read_gbps, names=None) -> dict:
  """encode + decode GB/s (float32 input) per registry compressor, jitted, one device."""
  import jax
  import jax.numpy as jnp
  from jrelu import compressors
  out = {"read_gbytes_per_second": read_gbps, "kwargs": {}, "compressors": {}}
  for name, factory in compressors.REGISTRY.items():
    if names and name not in names:
      continue
    kwargs = KERNEL_KWARGS.get(name, {})
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
      iters = max(1, min(100, int(_setting("kernel_call_seconds") / max(guess, 1e-9))))

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
      next_call = max(_setting("kernel_call_seconds"), 10 * seconds["median"])  # d grows ~10x
      if next_call * (repeats + 1) > 60:
        rows.append({"dim": None, "note": "larger d skipped: over a minute per size"})
        break
  return out


# ---------------------------------------------------------------------------------------
# PyTorch peers

def torch_section(device_counts, dim, batch_size, num_samples, repeats, cores) -> dict:
  """Runs ``benchmarks/_torch_peers.py`` per worker count; steps/s stats per peer."""
  try:
    import torch  # noqa: F401  (only to know that it is there)
  except ImportError:
    logging.warning("torch is not importable: skipping the PyTorch peers "
                    "(pip install '.[bench]' installs torch==2.13.0)")
    return {"skipped": "torch is not importable (pip install '.[bench]')"}
  out = {"peers": {}, "description": {
      "ddp_allreduce": "DistributedDataParallel, Gloo, N processes, no hook",
      "ddp_fp16": "DDP + fp16_compress_hook",
      "ddp_quantization": "DDP + quantization_pertensor_hook",
      "ddp_powersgd": "DDP + powerSGD_hook (rank 1, from step 2)",
      "loop_none": "one process, loop over N simulated workers, float32",
      "loop_qsgd": "one process, loop over N simulated workers, QSGD s=4 max norm"}}
  for n in device_counts:
    cfg = {"num_workers": n, "dim": dim, "batch_size": batch_size,
           "num_samples": num_samples, "learning_rate": 0.5, "seed": 0, "warmup": 3,
           "steps": _setting("torch_steps"), "repeats": repeats, "cores": cores,
           "num_levels": METHODS[TARGET_METHOD].kwargs.get("num_levels", 4),
           "loop_codecs": ["none", "qsgd"], "ddp_hooks": []}
    results = _run_peers(cfg)
    if _setting("ddp_worker_counts") == "all" or n == device_counts[-1]:
      ddp_cfg = dict(cfg, steps=_setting("ddp_steps"), loop_codecs=[],
                     ddp_hooks=list(_setting("ddp_hooks")))
      results.update(_run_peers(ddp_cfg))
    out["torch_version"] = results.pop("torch_version", None)
    peers = {}
    for group in ("loop", "ddp"):
      if "error" in results.get(group, {}) and len(results[group]) == 1:
        peers[f"{group}_error"] = {"error": results[group]["error"]}
        continue
      for name, r in results.get(group, {}).items():
        entry = {"steps_per_second": common.stats(r["steps_per_second"])}
        entry.update({k: v for k, v in r.items() if k != "steps_per_second"})
        peers[f"{group}_{name}"] = entry
    out["peers"][str(n)] = peers
    for name, p in peers.items():
      med = p.get("steps_per_second", {}).get("median")
      logging.info("torch %s, %d workers: %s steps/s", name, n,
                   f"{med:.1f}" if med else p.get("error", "n/a"))
  return out


def _run_peers(cfg) -> dict:
  env = dict(os.environ, PYTHONPATH=common.REPO_ROOT + os.pathsep
             + os.environ.get("PYTHONPATH", ""))
  timeout = 1800
  try:
    proc = subprocess.run([sys.executable, "-m", "benchmarks._torch_peers", json.dumps(cfg)],
                          cwd=common.REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return json.loads(proc.stdout.strip().splitlines()[-1])
  except (subprocess.SubprocessError, ValueError, IndexError) as e:
    tail = ""
    if isinstance(e, (ValueError, IndexError)):
      tail = " ".join(proc.stderr.strip().splitlines()[-3:])
    group = "ddp" if cfg["ddp_hooks"] else "loop"
    return {group: {"error": f"{type(e).__name__}: {e} {tail}"[:400]}}


def ratios_section(step_rows, torch_out) -> list[dict]:
  """jrelu (fastest path) / fastest PyTorch peer, per method and worker count."""
  out = []
  peers_by_n = torch_out.get("peers", {}) if torch_out else {}
  for row in step_rows:
    if row["path"] == "pmap_replacement":
      continue
    peers = peers_by_n.get(str(row["num_devices"]), {})
    timed = {k: v["steps_per_second"]["median"] for k, v in peers.items()
             if v.get("steps_per_second", {}).get("median")}
    if not timed:
      continue
    fastest = max(timed, key=timed.get)
    same_kind = {k: timed[k] for k in METHODS[row["method"]].torch_peers if k in timed}
    jrelu_med = row["steps_per_second"]["median"]
    entry = {"method": row["method"], "num_devices": row["num_devices"],
             "path": row["path"], "jrelu_steps_per_second": jrelu_med,
             "fastest_peer": fastest, "fastest_peer_steps_per_second": timed[fastest],
             "times_fastest_peer": jrelu_med / timed[fastest],
             # spread: jrelu's slowest repeat against the peer's fastest, and conversely
             "times_fastest_peer_range": [
                 row["steps_per_second"]["min"] / peers[fastest]["steps_per_second"]["max"],
                 row["steps_per_second"]["max"] / peers[fastest]["steps_per_second"]["min"]]}
    if same_kind:
      best = max(same_kind, key=same_kind.get)
      entry.update(fastest_same_kind_peer=best,
                   times_fastest_same_kind_peer=jrelu_med / same_kind[best])
    out.append(entry)
  return out


# ---------------------------------------------------------------------------------------
# scale: d = 1e6 with online sampling, in a fresh process

def scale_section(dim, batch_size, steps, n_dev) -> dict:
  """A few QSGD steps at ``dim`` with batches drawn on the devices; peak RSS, steps/s."""
  import jax
  import jax.numpy as jnp
  import optax
  from jrelu import compressors
  from jrelu import parallel
  from jrelu import planted
  from jrelu import transforms
  from jrelu import wire
  devices = parallel.setup_devices(n_dev)
  method = METHODS[TARGET_METHOD]
  w_star = planted.sample_w_star(jax.random.key(0), dim)
  # Online SGD with B << d is stable for a step size of order B / d (the gradient noise
  # grows like d / B), so the scale run uses 0.5 B / (B + d): the error then decreases.
  learning_rate = method.learning_rate * batch_size / (batch_size + dim)
  tx = optax.chain(
      transforms.compress(compressors.REGISTRY[method.compressor](**method.kwargs),
                          key=jax.random.key(2), axis_name=parallel.AXIS_NAME,
                          aggregation=method.aggregation),
      optax.sgd(learning_rate))
  step = parallel.make_step(planted.loss, planted.make_online_batch_fn(batch_size), tx,
                            metrics_fn=planted.metrics_fn)
  state = parallel.init_state(jnp.zeros((dim,), jnp.float32), tx)
  state, data, key = parallel.replicate((state, (None, w_star), jax.random.key(3)), devices)
  start = time.perf_counter()
  run = parallel.pmapped(step, devices).lower(state, data, key).compile()
  compile_seconds = time.perf_counter() - start
  bits = wire.parse(run.as_text())
  state, metrics = jax.block_until_ready(run(state, data, key))  # warm-up step
  rates, errors = [], [float(metrics["relative_error"][0])]
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = jax.block_until_ready(run(state, data, key))
    rates.append(1.0 / (time.perf_counter() - start))
    errors.append(float(metrics["relative_error"][0]))
  return {
      "dim": dim, "batch_size": batch_size, "num_devices": n_dev, "path": "pmap",
      "method": TARGET_METHOD, "sampling": "online (jrelu.planted.make_online_batch_fn)",
      "learning_rate": learning_rate,
      "input_bytes_per_step": batch_size * dim * 4,
      "steps_per_second": common.stats(rates), "compile_seconds": compile_seconds,
      "relative_error_after_each_step": errors,
      "wire_bits_per_step_per_device": bits.sent_bits,
      # ru_maxrss survives execve on Linux (it starts at the parent's peak), so the
      # parent starts this process before it allocates much; VmHWM is this process's own.
      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      "vm_hwm_bytes": _vm_hwm_bytes(),
      "machine_memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
  }


def _vm_hwm_bytes():
  """Peak resident set of this process (VmHWM of /proc/self/status), or None."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  return None


def _scale_in_subprocess() -> dict:
  """Runs ``--sections=scale`` in a fresh process, so ``ru_maxrss`` is the scale run's."""
  f = flags.FLAGS
  argv = [sys.executable, os.path.abspath(__file__), "--sections=scale",
          f"--outdir={_OUTDIR.value}", f"--num_devices={_NUM_DEVICES.value}",
          f"--scale_dim={_SCALE_DIM.value}", f"--scale_batch_size={_SCALE_BATCH_SIZE.value}",
          f"--scale_steps={_SCALE_STEPS.value or _setting('scale_steps')}"]
  del f
  env = dict(os.environ, PYTHONPATH=common.REPO_ROOT + os.pathsep
             + os.environ.get("PYTHONPATH", ""))
  try:
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800)
    return json.loads(proc.stdout.strip().splitlines()[-1])["scale"]
  except (subprocess.SubprocessError, ValueError, IndexError, KeyError) as e:
    err = proc.stderr.strip().splitlines()[-3:] if "proc" in locals() else []
    return {"error": f"{type(e).__name__}: {e} {' '.join(err)}"[:500]}


# ---------------------------------------------------------------------------------------
# plots and summary

def _label(row):
  return f"jrelu {row['method']} ({row['path']})"


def plot_steps(step_rows, torch_out, path):
  """Horizontal bars: median steps/s (min-max whiskers) of jrelu paths and torch peers."""
  plt = common.pyplot()
  if plt is None:
    return None
  counts = sorted({r["num_devices"] for r in step_rows})
  fig, axes = plt.subplots(1, len(counts), figsize=(6 * len(counts), 4.5), squeeze=False)
  for ax, n in zip(axes[0], counts):
    bars = [(_label(r), r["steps_per_second"], "tab:blue") for r in step_rows
            if r["num_devices"] == n]
    for name, p in (torch_out or {}).get("peers", {}).get(str(n), {}).items():
      if p.get("steps_per_second", {}).get("median"):
        bars.append((f"torch {name}", p["steps_per_second"], "tab:orange"))
    ys = range(len(bars))
    med = [b[1]["median"] for b in bars]
    err = [[m - b[1]["min"] for m, b in zip(med, bars)],
           [b[1]["max"] - m for m, b in zip(med, bars)]]
    ax.barh(list(ys), med, xerr=err, color=[b[2] for b in bars], capsize=3)
    ax.set_yticks(list(ys))
    ax.set_yticklabels([b[0] for b in bars], fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("steps per second (median, min-max)")
    ax.set_title(f"{n} device(s) / worker(s)", fontsize=9)
    ax.grid(True, axis="x", which="both", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_sweep(sweep, read_gbps, path):
  """Log-log: seconds per step against d and against B, with slope-1 and read lines."""
  plt = common.pyplot()
  if plt is None or not (sweep.get("dim") or sweep.get("batch")):
    return None
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, axis, key, fixed in ((axes[0], "dim", "dim", f"B = {sweep['fixed_batch_size']}"),
                               (axes[1], "batch", "batch_size", f"d = {sweep['fixed_dim']}")):
    pts = sweep.get(axis, [])
    if not pts:
      continue
    xs = [p[key] for p in pts]
    ys = [p["step_seconds_median"] for p in pts]
    ax.loglog(xs, ys, "o-", label=f"jrelu {sweep['method']} ({sweep['path']}, "
              f"{sweep['num_devices']} devices)")
    ax.loglog(xs, [ys[-1] * x / xs[-1] for x in xs], "k--", lw=0.8, label="slope 1")
    if read_gbps:
      ax.loglog(xs, [p["batch_size"] * p["dim"] * 4 / (read_gbps * 1e9) for p in pts], ":",
                color="tab:red", label=f"read batch once ({read_gbps:.1f} GB/s)")
    slope = sweep.get(f"{axis}_exponent")
    ax.set_title(f"{fixed}; fitted exponent {slope:.2f}" if slope else fixed, fontsize=9)
    ax.set_xlabel("d" if axis == "dim" else "global batch B")
    ax.set_ylabel("seconds per step (median)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_kernels(kernels, path):
  """GB/s of encode + decode against d per compressor, with the read bandwidth."""
  plt = common.pyplot()
  if plt is None:
    return None
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, rows in kernels["compressors"].items():
    pts = [r for r in rows if r.get("gbytes_per_second")]
    if pts:
      ax.loglog([r["dim"] for r in pts], [r["gbytes_per_second"] for r in pts], "o-",
                label=name, markersize=3)
  if kernels.get("read_gbytes_per_second"):
    ax.axhline(kernels["read_gbytes_per_second"], color="k", ls="--", lw=0.8,
               label="NumPy streaming read")
  ax.set_xlabel("d (float32 coordinates)")
  ax.set_ylabel("encode + decode, GB/s of input")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _fmt(x, digits=3):
  if x is None:
    return "n/a"
  if isinstance(x, float) and (abs(x) >= 1000 or x == int(x)):
    return f"{x:,.0f}"
  return f"{x:.{digits}g}"


def _rate(s):
  return f"{_fmt(s['median'])} [{_fmt(s['min'])}-{_fmt(s['max'])}]"


def summary_markdown(result) -> str:
  """Markdown tables of every section (for README)."""
  m = result
  lines = [
      "# Step throughput",
      "",
      f"Machine: {m['cpu_model']}, {m['cpu_cores']} cores, LLC {m['llc_bytes'] >> 20} MiB, "
      f"JAX {m['jax_version']} {m['backend']}. {m['timing_note']} Steps/s: median "
      f"[min-max] of {m['config']['repeats']} timed chunks of "
      f"{m['config']['steps_per_chunk']} steps.",
      "",
  ]
  cfg = m["config"]
  roof = m.get("roofline") or {}
  if m.get("step"):
    lines += [f"## jrelu training step (d = {cfg['dim']}, global batch {cfg['batch_size']}, "
              f"n = {cfg['num_samples']})", "",
              "| method | devices | path | steps/s | ms/step | roofline ratio | collectives "
              "per step |", "|---|---|---|---|---|---|---|"]
    for r in m["step"]:
      lines.append(f"| {r['method']} | {r['num_devices']} | {r['path']} | "
                   f"{_rate(r['steps_per_second'])} | {1e3 * r['step_seconds_median']:.2f} | "
                   f"{_fmt(r.get('roofline_ratio'))} | "
                   f"{r.get('collectives_per_step', '')} |")
    lines.append("")
    rdv = m.get("rendezvous")
    if rdv:
      per = rdv["seconds"]["median"]
      lines += [f"Rendezvous: one all-reduce of a float32 scalar over {rdv['num_devices']} "
                f"simulated devices takes {1e3 * per:.3f} ms [{1e3 * rdv['seconds']['min']:.3f}"
                f"-{1e3 * rdv['seconds']['max']:.3f}] in a compiled loop."]
      for r in m["step"]:
        rest = r.get("step_seconds_without_rendezvous_estimate")
        if rest is not None and r["method"] == m.get("targets", {}).get("method"):
          lines.append(f"{r['method']} ({r['path']}): {r['collectives_per_step']} collectives "
                       f"x {1e3 * per:.3f} ms = {1e3 * (r['step_seconds_median'] - rest):.2f} "
                       f"ms of its {1e3 * r['step_seconds_median']:.2f} ms; without them "
                       f"(estimate) {1e3 * rest:.2f} ms, roofline ratio "
                       f"{_fmt(r.get('roofline_ratio_without_rendezvous_estimate'))}.")
      lines.append("")
  if roof.get("seconds"):
    lines += [f"Roofline: a NumPy matvec over a fresh {cfg['batch_size']} x {cfg['dim']} "
              f"float32 slice of a {roof['array_bytes'] >> 20} MiB array takes "
              f"{1e3 * roof['seconds']:.2f} ms ({roof['gbytes_per_second']:.1f} GB/s, "
              f"{roof['threads']} BLAS thread(s); fastest of "
              + ", ".join(f"{t['threads']} thread(s): "
                          f"{1e3 * t['seconds']['median']:.2f} ms"
                          for t in roof["by_threads"] if "seconds" in t)
              + "). roofline ratio = that time / step time"
              + (", the matvecs timed in the same rounds as the steps." if roof.get(
                  "interleaved_with_steps") else "."), ""]
  torch_out = m.get("torch") or {}
  if torch_out.get("peers"):
    lines += ["## PyTorch peers (torch " + str(torch_out.get("torch_version")) + ")", "",
              "| peer | workers | steps/s | note |", "|---|---|---|---|"]
    for n, peers in torch_out["peers"].items():
      for name, p in peers.items():
        rate = _rate(p["steps_per_second"]) if p.get("steps_per_second", {}).get(
            "median") else "failed"
        note = p.get("error") or p.get("note") or ""
        lines.append(f"| {name} | {n} | {rate} | {note[:120]} |")
    lines.append("")
  elif torch_out.get("skipped"):
    lines += [f"PyTorch peers skipped: {torch_out['skipped']}.", ""]
  if m.get("ratios"):
    lines += ["## jrelu / fastest PyTorch peer", "",
              "| method | workers | jrelu path | jrelu steps/s | fastest peer | peer steps/s "
              "| ratio [range] |", "|---|---|---|---|---|---|---|"]
    for r in m["ratios"]:
      lo, hi = r["times_fastest_peer_range"]
      lines.append(f"| {r['method']} | {r['num_devices']} | {r['path']} | "
                   f"{_fmt(r['jrelu_steps_per_second'])} | {r['fastest_peer']} | "
                   f"{_fmt(r['fastest_peer_steps_per_second'])} | "
                   f"{r['times_fastest_peer']:.2f}x [{lo:.2f}-{hi:.2f}] |")
    lines.append("")
  if m.get("targets"):
    t = m["targets"]
    lines += [f"## Targets ({t['method']}, d = {cfg['dim']}, B = {cfg['batch_size']}, "
              f"{t['num_devices']} devices; the brief's: 2-core CPU, d = 1000, B = 4096, 8 "
              "devices, QSGD s = 4)", "",
              "| path | roofline ratio (>= 0.5) | x fastest PyTorch peer (>= 3) |",
              "|---|---|---|"]
    for path, v in t["by_path"].items():
      lines.append(f"| {path} | {_fmt(v.get('roofline_ratio'))} "
                   f"{'met' if v.get('roofline_ratio_met') else 'not met'} | "
                   f"{_fmt(v.get('times_fastest_torch_peer'))} "
                   f"{'met' if v.get('times_fastest_torch_peer_met') else 'not met'} |")
    lines.append("")
  sweep = m.get("sweep")
  if sweep and (sweep.get("dim") or sweep.get("batch")):
    lines += [f"## Scaling ({sweep['method']}, {sweep['path']}, {sweep['num_devices']} "
              "devices)", "", "| d | B | steps/s | ms/step | roofline ratio |",
              "|---|---|---|---|---|"]
    for p in sweep.get("dim", []) + sweep.get("batch", []):
      lines.append(f"| {p['dim']} | {p['batch_size']} | {_rate(p['steps_per_second'])} | "
                   f"{1e3 * p['step_seconds_median']:.2f} | {_fmt(p.get('roofline_ratio'))} |")
    lines += ["", f"Fitted exponents (time ~ x^k): d {_fmt(sweep.get('dim_exponent'))} "
              f"(upper half {_fmt(sweep.get('dim_exponent_upper_half'))}), B "
              f"{_fmt(sweep.get('batch_exponent'))} (upper half "
              f"{_fmt(sweep.get('batch_exponent_upper_half'))})."]
    for axis, name in (("dim", "d"), ("batch", "B")):
      fit = sweep.get(f"{axis}_linear_fit")
      if fit:
        lines.append(f"Linear fit t = t0 + k {name}: t0 = {1e3 * fit['intercept_seconds']:.3g} "
                     f"ms, k = {1e6 * fit['slope_seconds']:.3g} us per unit of {name}, "
                     f"r^2 = {fit['r2']:.3f}.")
    lines.append("")
  kernels = m.get("kernels")
  if kernels:
    dims = sorted({r["dim"] for rows in kernels["compressors"].values() for r in rows
                   if r.get("dim")})
    lines += ["## Compressor kernels: encode + decode, GB/s of float32 input", "",
              "| compressor | " + " | ".join(f"d = {d:.0e}" for d in dims) + " |",
              "|---|" + "---|" * len(dims)]
    for name, rows in kernels["compressors"].items():
      by_dim = {r["dim"]: r for r in rows if r.get("dim")}
      cells = [_fmt(by_dim[d]["gbytes_per_second"]) if d in by_dim and "gbytes_per_second"
               in by_dim[d] else ("error" if d in by_dim else "") for d in dims]
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"NumPy streaming read: {_fmt(kernels.get('read_gbytes_per_second'))} GB/s.",
              ""]
  scale = m.get("scale")
  if scale and "steps_per_second" in scale:
    lines += ["## Scale", "",
              f"d = {scale['dim']:,}, online sampling, global batch {scale['batch_size']} over "
              f"{scale['num_devices']} devices ({scale['input_bytes_per_step'] / 1e9:.2f} GB of "
              f"inputs drawn per step), QSGD: {_rate(scale['steps_per_second'])} steps/s, peak "
              f"RSS {scale['peak_rss_bytes'] / 2**30:.2f} GiB of "
              f"{scale['machine_memory_bytes'] / 2**30:.0f} GiB.", ""]
  elif scale:
    lines += ["## Scale", "", f"failed: {scale.get('error')}", ""]
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# main

def _targets(step_rows, ratios, n_dev):
  """The two targets at (TARGET_METHOD, N devices), for every path."""
  out = {"method": TARGET_METHOD, "num_devices": n_dev, "thresholds": TARGETS,
         "by_path": {}}
  for r in step_rows:
    if r["method"] != TARGET_METHOD or r["num_devices"] != n_dev:
      continue
    entry = {"roofline_ratio": r.get("roofline_ratio")}
    if entry["roofline_ratio"] is not None:
      entry["roofline_ratio_met"] = entry["roofline_ratio"] >= TARGETS["roofline_ratio"]
    for q in ratios:
      if (q["method"], q["num_devices"], q["path"]) == (TARGET_METHOD, n_dev, r["path"]):
        entry["times_fastest_torch_peer"] = q["times_fastest_peer"]
        entry["times_fastest_torch_peer_met"] = (q["times_fastest_peer"]
                                                 >= TARGETS["times_fastest_torch_peer"])
    out["by_path"][r["path"]] = entry
  return out


def main(argv):
  """absl main: runs the selected sections and prints one JSON line."""
  del argv
  started = time.perf_counter()
  sections = [s for s in SECTIONS if s in _SECTIONS.value]
  n_dev = _NUM_DEVICES.value
  if _BATCH_SIZE.value % n_dev:
    common.fail(f"flag --batch_size={_BATCH_SIZE.value}: not divisible by "
                f"--num_devices={n_dev}")
  if _SCALE_BATCH_SIZE.value % n_dev:
    common.fail(f"flag --scale_batch_size={_SCALE_BATCH_SIZE.value}: not divisible by "
                f"--num_devices={n_dev}")
  unknown = [m for m in (_METHODS.value or []) if m not in METHODS]
  if unknown:
    common.fail(f"flag --methods={','.join(_METHODS.value)}: {unknown[0]!r} is not a row of "
                f"METHODS ({', '.join(METHODS)})")
  from jrelu import compressors
  unknown = [c for c in (_KERNEL_COMPRESSORS.value or []) if c not in compressors.REGISTRY]
  if unknown:
    common.fail(f"flag --kernel_compressors={','.join(_KERNEL_COMPRESSORS.value)}: "
                f"{unknown[0]!r} is not in jrelu.compressors.REGISTRY "
                f"({', '.join(compressors.REGISTRY)})")
  outdir = common.make_outdir(_OUTDIR.value)
  devices = common.setup_devices(n_dev)
  if sections == ["scale"]:  # the child of _scale_in_subprocess (or a direct call)
    result = {"benchmark": "step_throughput", **common.machine_info(), "sections": sections,
              "scale": scale_section(_SCALE_DIM.value, _SCALE_BATCH_SIZE.value,
                                     _SCALE_STEPS.value or _setting("scale_steps"), n_dev)}
    common.print_json_line(result)
    return

  repeats = _REPEATS.value or _setting("repeats")
  steps = _STEPS_PER_CHUNK.value or _setting("steps_per_chunk")
  dim, batch_size = _DIM.value, _BATCH_SIZE.value
  info = common.machine_info()
  llc = info["llc_bytes"]
  num_samples = _NUM_SAMPLES.value or default_num_samples(dim, batch_size, llc)
  if num_samples < batch_size:
    common.fail(f"flag --num_samples={num_samples}: smaller than --batch_size={batch_size}")
  device_counts = sorted({1, n_dev})
  result = {
      "benchmark": "step_throughput", **info, "quick": _QUICK.value, "sections": sections,
      "timing_note": TIMING_NOTE,
      "config": {"dim": dim, "batch_size": batch_size, "num_samples": num_samples,
                 "num_devices": n_dev, "device_counts": device_counts, "repeats": repeats,
                 "steps_per_chunk": steps},
      "methods": {k: dataclasses.asdict(v) for k, v in METHODS.items()},
      "section_seconds": {}}
  if "scale" in sections:  # first, while this process is small (see scale_section)
    t0 = time.perf_counter()
    result["scale"] = _scale_in_subprocess()
    result["section_seconds"]["scale"] = time.perf_counter() - t0
    logging.info("scale: %s", {k: result["scale"].get(k) for k in (
        "dim", "steps_per_second", "peak_rss_bytes", "error") if k in result["scale"]})

  t0 = time.perf_counter()
  thread_counts = sorted({1, info["cpu_cores"]})
  interleave = "step" in sections and "roofline" in sections
  by_threads = []
  if not interleave and ("roofline" in sections or "kernels" in sections
                         or "sweep" in sections):
    by_threads = [common.read_roofline(batch_size, dim, t, repeats, 4 * llc)
                  for t in thread_counts]
  result["section_seconds"]["roofline"] = time.perf_counter() - t0

  step_rows = []
  if "step" in sections:
    t0 = time.perf_counter()
    bench = StepBench(dim, batch_size, num_samples, steps, devices)
    probes = []
    try:
      if interleave:  # the roofline, timed in the same rounds as the steps
        try:
          probes = [common.RooflineProbe(batch_size, dim, t, 4 * llc) for t in thread_counts]
        except (RuntimeError, OSError, ValueError) as e:
          by_threads = [{"threads": t, "error": f"{type(e).__name__}: {e}"}
                        for t in thread_counts]
      step_rows, probed = step_section(bench, device_counts, _setting("step_paths"),
                                       repeats, _METHODS.value or _setting("methods"),
                                       probes)
      by_threads = by_threads or probed
    finally:
      for probe in probes:
        probe.close()
    del bench
    result["section_seconds"]["step"] = time.perf_counter() - t0

  roof = {}
  if by_threads:
    timed = [t for t in by_threads if "seconds" in t]
    roof = {"by_threads": by_threads, "interleaved_with_steps": interleave}
    if timed:
      best = min(timed, key=lambda t: t["seconds"]["median"])
      roof.update(threads=best["threads"], seconds=best["seconds"]["median"],
                  gbytes_per_second=batch_size * dim * 4 / best["seconds"]["median"] / 1e9,
                  array_bytes=best["array_bytes"], rows=batch_size, dim=dim)
      logging.info("roofline: %.3f ms per %dx%d matvec (%.1f GB/s, %d thread(s))",
                   1e3 * roof["seconds"], batch_size, dim, roof["gbytes_per_second"],
                   roof["threads"])
    result["roofline"] = roof
  read_gbps = roof.get("gbytes_per_second")

  if step_rows:
    for r in step_rows:
      if roof.get("seconds"):
        r["roofline_ratio"] = roof["seconds"] / r["step_seconds_median"]
      logging.info("jrelu %s, %d device(s), %s: %.0f steps/s", r["method"],
                   r["num_devices"], r["path"], r["steps_per_second"]["median"])
    if n_dev > 1:
      result["rendezvous"] = rendezvous_section(devices[:n_dev], repeats)
      per = result["rendezvous"]["seconds"]["median"]
      logging.info("rendezvous: %.3f ms per scalar all-reduce over %d devices", 1e3 * per,
                   n_dev)
      for r in step_rows:
        if r.get("collectives_per_step") is not None:
          # An estimate: the step's time outside its rendezvous, had each collective cost
          # what a scalar all-reduce costs.
          rest = r["step_seconds_median"] - r["collectives_per_step"] * per
          r["step_seconds_without_rendezvous_estimate"] = rest
          if roof.get("seconds") and rest > 0:
            r["roofline_ratio_without_rendezvous_estimate"] = roof["seconds"] / rest
    before = [r for r in step_rows if r["path"] == "pmap_replacement"]
    if before:
      result["before_after"] = {
          "before": "pmap_replacement (rows drawn with replacement, gathered)",
          "before_steps_per_second": before[0]["steps_per_second"]["median"],
          "after": {r["path"]: r["steps_per_second"]["median"] for r in step_rows
                    if (r["method"], r["num_devices"]) == (before[0]["method"],
                                                          before[0]["num_devices"])
                    and r["path"] != "pmap_replacement"}}
    result["step"] = step_rows

  torch_out = None
  if "torch" in sections:
    t0 = time.perf_counter()
    if _SKIP_TORCH.value:
      torch_out = {"skipped": "--skip_torch"}
    else:
      torch_out = torch_section(device_counts, dim, batch_size, num_samples, repeats,
                                info["cpu_cores"])
    result["torch"] = torch_out
    result["section_seconds"]["torch"] = time.perf_counter() - t0
  result["torch_version"] = (torch_out or {}).get("torch_version")
  result["ratios"] = ratios_section(step_rows, torch_out)
  if step_rows:
    result["targets"] = _targets(step_rows, result["ratios"], n_dev)

  if "sweep" in sections:
    t0 = time.perf_counter()
    dims = common.int_list(_SWEEP_DIMS.value or _setting("sweep_dims"), "sweep_dims")
    batches = common.int_list(_SWEEP_BATCHES.value or _setting("sweep_batches"),
                              "sweep_batches")
    result["sweep"] = sweep_section(dims, batches, dim, batch_size, n_dev, repeats, steps,
                                    devices, llc, read_gbps, _NUM_SAMPLES.value,
                                    _SWEEP_METHOD.value)
    result["section_seconds"]["sweep"] = time.perf_counter() - t0

  if "kernels" in sections:
    t0 = time.perf_counter()
    dims = common.int_list(_KERNEL_DIMS.value or _setting("kernel_dims"), "kernel_dims")
    result["kernels"] = kernel_section(dims, repeats, read_gbps, _KERNEL_COMPRESSORS.value)
    result["section_seconds"]["kernels"] = time.perf_counter() - t0

  plots = [plot_steps(step_rows, torch_out, os.path.join(outdir, "steps_per_second.png"))
           if step_rows else None,
           plot_sweep(result["sweep"], read_gbps, os.path.join(outdir, "scaling.png"))
           if "sweep" in result else None,
           plot_kernels(result["kernels"], os.path.join(outdir, "kernels.png"))
           if "kernels" in result else None]
  result["plots"] = [p for p in plots if p]
  result["summary_md"] = os.path.join(outdir, "summary.md")
  result["results_json"] = os.path.join(outdir, "results.json")
  result["runtime_seconds"] = time.perf_counter() - started
  with open(result["summary_md"], "w") as f:
    f.write(summary_markdown(result))
  common.write_json(result["results_json"], result)
  logging.info("done in %.0f s: %s", result["runtime_seconds"], result["summary_md"])
  common.print_json_line(result)


if __name__ == "__main__":
  common.run_main(main)
