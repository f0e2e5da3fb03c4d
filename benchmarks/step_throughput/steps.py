"""The jrelu training step timed (``step`` and ``sweep`` sections of step_throughput).

:class:`StepBench` builds and compiles chunks of jrelu training steps on one planted
problem, along the ``vmap``, ``pmap`` and ``pmap_replacement`` paths;
:func:`time_interleaved` times them in interleaved rounds; :func:`step_section`,
:func:`rendezvous_section` and :func:`sweep_section` are the sections' results.
"""

from __future__ import annotations

import math
import time

from absl import logging
import jax
import jax.numpy as jnp

from benchmarks import common
from benchmarks.step_throughput import settings
from jrelu import experiment
from jrelu import parallel
from jrelu import planted
from jrelu import sampling
from jrelu import wire

# Pause before each roofline probe and round, once the thread pools of XLA and OpenBLAS
# stop spinning for more work.
_SETTLE_SECONDS = 0.05


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
    self.dim, self.batch_size, self.steps = dim, batch_size, steps
    self.devices = devices
    w_key, data_key = jax.random.split(jax.random.key(0))
    self.w_star = planted.sample_w_star(w_key, dim)
    self.dataset = planted.sample_dataset(data_key, self.w_star, num_samples)
    self._data = {}

  def _data_for(self, path, n_dev):
    """The ``data`` argument for ``path`` on ``n_dev`` devices (built once, shared)."""
    key = ("vmap" if path == "vmap" else "pmap", n_dev)
    if key not in self._data:
      if path == "vmap":
        self._data[key] = (sampling.split_segments(self.dataset, n_dev), self.w_star)
      else:
        self._data[key] = parallel.replicate((self.dataset, self.w_star),
                                             self.devices[:n_dev])
    return self._data[key]

  def build(self, method: settings.Method, n_dev: int, path: str):
    """Compiles ``steps`` steps of ``method`` on ``n_dev`` devices along ``path``.

    The optimizer is ``jrelu.experiment.make_tx`` of the row's Config.

    Args:
      method: a row of ``METHODS``.
      n_dev: N.
      path: one of ``PATHS``.

    Returns:
      ``(run, state, data, key, compile_seconds)``: the compiled chunk and its inputs.
    """
    tx = experiment.make_tx(method.config(), jax.random.key(2, impl=method.key_impl), n_dev)
    how = "replacement" if path == "pmap_replacement" else "window"
    step = parallel.make_step(planted.loss,
                              sampling.make_batch_fn(self.batch_size, sampling=how), tx,
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
  return {"num_devices": len(devices), "operand": "float32 scalar",
          "seconds": common.stats(times)}


def step_section(bench: StepBench, device_counts, paths, repeats: int, methods=None,
                 probes=()) -> tuple[list[dict], list[dict]]:
  """Steps per second of every settings.METHODS row (or those named) x device count x path.

  Args:
    bench: the problem (d, B, n, steps per call, devices).
    device_counts: the N to time, ascending (the last is the target's).
    paths: the paths to time (of ``PATHS``).
    repeats: timed calls per configuration.
    methods: names of rows to time (None or empty: all).
    probes: :class:`benchmarks.common.RooflineProbe` objects timed in the same rounds.

  Returns:
    ``(rows, roofline)``: one row per timed configuration, and one
    :meth:`~benchmarks.common.RooflineProbe.summary` per probe, timed in the same rounds.
  """
  configs, rows = {}, []
  for n_dev in device_counts:
    for name, method in settings.METHODS.items():
      if methods and name not in methods:
        continue
      for path in paths:
        if method.paths is not None and path not in method.paths:
          continue
        if path == "pmap_replacement" and (n_dev, name) != (device_counts[-1],
                                                            settings.TARGET_METHOD):
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
                  llc, read_gbps, num_samples=None, method=settings.SWEEP_METHOD) -> dict:
  """The ``vmap`` step over d (B fixed) and over B (d fixed), with fitted exponents.

  Args:
    dims: d values at B = ``base_batch``.
    batches: B values at d = ``base_dim`` (those not divisible by ``n_dev`` are skipped).
    base_dim: the fixed d.
    base_batch: the fixed B.
    n_dev: N (simulated in one program).
    repeats: timed calls per point.
    steps: steps per call.
    devices: the devices (for :class:`StepBench`).
    llc: last-level cache bytes (for :func:`default_num_samples`).
    read_gbps: the roofline's read bandwidth (GB/s) or None.
    num_samples: stored n (at least B), or None for :func:`default_num_samples`.
    method: the row of ``METHODS`` timed.

  Returns:
    ``{"method", "num_devices", "path", "fixed_batch_size", "fixed_dim", "dim": [points],
    "batch": [points], "dim_exponent", "batch_exponent", ...}``.
  """
  points = [("dim", d, base_batch) for d in dims] + [("batch", base_dim, b) for b in batches]
  out = {"method": method, "num_devices": n_dev, "path": "vmap",
         "fixed_batch_size": base_batch, "fixed_dim": base_dim, "dim": [], "batch": []}
  for axis, d, b in points:
    if b % n_dev:
      logging.warning("sweep: skipping B=%d, not divisible by %d devices", b, n_dev)
      continue
    n = max(num_samples, b) if num_samples else default_num_samples(d, b, llc)
    bench = StepBench(d, b, n, steps, devices)
    run, state, data, key, _ = bench.build(settings.METHODS[method], n_dev, "vmap")
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

