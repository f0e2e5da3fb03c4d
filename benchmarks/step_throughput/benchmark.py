"""The run of ``python -m benchmarks.step_throughput``: the selected sections, in order.

:func:`run` takes its :class:`~benchmarks.step_throughput.settings.Settings` and the
devices as arguments (no flags): scale (first, while this process is small), roofline,
step, torch, sweep, kernels, network, then plots, ``summary.md`` and ``results.json``.
"""

from __future__ import annotations

import dataclasses
import os
import time

from absl import logging

from benchmarks import common
from benchmarks.step_throughput import kernels
from benchmarks.step_throughput import network_step
from benchmarks.step_throughput import peers
from benchmarks.step_throughput import report
from benchmarks.step_throughput import scale
from benchmarks.step_throughput import settings
from benchmarks.step_throughput import steps as steps_lib
from jrelu import compressors
from jrelu import experiment


def targets_section(step_rows, ratios, n_dev):
  """The two targets (``settings.TARGETS``) at (``TARGET_METHOD``, N devices), per path.

  Args:
    step_rows: ``steps.step_section``'s rows, with their roofline ratios.
    ratios: ``peers.ratios_section``'s entries.
    n_dev: N.

  Returns:
    ``{"method", "num_devices", "thresholds", "by_path": {path: {...}}}``.
  """
  out = {"method": settings.TARGET_METHOD, "num_devices": n_dev, "thresholds": settings.TARGETS,
         "by_path": {}}
  for r in step_rows:
    if r["method"] != settings.TARGET_METHOD or r["num_devices"] != n_dev:
      continue
    entry = {"roofline_ratio": r.get("roofline_ratio")}
    if entry["roofline_ratio"] is not None:
      entry["roofline_ratio_met"] = entry["roofline_ratio"] >= settings.TARGETS["roofline_ratio"]
    for q in ratios:
      if (q["method"], q["num_devices"], q["path"]) == (settings.TARGET_METHOD, n_dev, r["path"]):
        entry["times_fastest_torch_peer"] = q["times_fastest_peer"]
        entry["times_fastest_torch_peer_met"] = (q["times_fastest_peer"]
                                                 >= settings.TARGETS["times_fastest_torch_peer"])
    out["by_path"][r["path"]] = entry
  return out



def run(s: settings.Settings, devices) -> dict:
  """Runs the selected sections; writes plots, ``summary.md`` and ``results.json``.

  Args:
    s: what to run.
    devices: at least ``s.num_devices`` (simulated CPU) devices.

  Returns:
    The result dict, also written to ``OUTDIR/results.json``: machine facts, ``config``,
    ``methods``, one entry per section that ran, ``ratios``, ``targets``, ``plots``,
    ``summary_md``, ``runtime_seconds``, ``section_seconds``.

  Raises:
    OSError: when an output file cannot be written.
  """
  started = time.perf_counter()
  sections = list(s.sections)
  repeats, steps, n_dev = s.repeats, s.steps_per_chunk, s.num_devices
  dim, batch_size = s.dim, s.batch_size
  info = common.machine_info()
  llc = info["llc_bytes"]
  num_samples = s.num_samples or steps_lib.default_num_samples(dim, batch_size, llc)
  device_counts = sorted({1, n_dev})
  result = {
      "benchmark": "step_throughput", **info, "quick": s.quick, "sections": sections,
      "timing_note": settings.TIMING_NOTE,
      "config": {"dim": dim, "batch_size": batch_size, "num_samples": num_samples,
                 "num_devices": n_dev, "device_counts": device_counts, "repeats": repeats,
                 "steps_per_chunk": steps},
      "methods": {k: dataclasses.asdict(v) for k, v in settings.METHODS.items()},
      "section_seconds": {}}
  if "scale" in sections:  # first, while this process is small (see scale_section)
    t0 = time.perf_counter()
    result["scale"] = scale.scale_in_subprocess(s.outdir, n_dev, s.scale_dim,
                                                s.scale_batch_size, s.scale_steps)
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
    bench = steps_lib.StepBench(dim, batch_size, num_samples, steps, devices)
    probes = []
    try:
      if interleave:  # the roofline, timed in the same rounds as the steps
        try:
          probes = [common.RooflineProbe(batch_size, dim, t, 4 * llc) for t in thread_counts]
        except (RuntimeError, OSError, ValueError) as e:
          by_threads = [{"threads": t, "error": f"{type(e).__name__}: {e}"}
                        for t in thread_counts]
      step_rows, probed = steps_lib.step_section(bench, device_counts, s.step_paths,
                                                 repeats, s.methods, probes)
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
      result["rendezvous"] = steps_lib.rendezvous_section(devices[:n_dev], repeats)
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
    if s.skip_torch:
      torch_out = {"skipped": "--skip_torch"}
    else:
      torch_out = peers.torch_section(
          device_counts, dim, batch_size, num_samples, repeats, info["cpu_cores"],
          torch_steps=s.torch_steps, ddp_steps=s.ddp_steps, ddp_hooks=s.ddp_hooks,
          ddp_worker_counts=s.ddp_worker_counts)
    result["torch"] = torch_out
    result["section_seconds"]["torch"] = time.perf_counter() - t0
  result["torch_version"] = (torch_out or {}).get("torch_version")
  result["ratios"] = peers.ratios_section(step_rows, torch_out)
  if step_rows:
    result["targets"] = targets_section(step_rows, result["ratios"], n_dev)

  if "sweep" in sections:
    t0 = time.perf_counter()
    result["sweep"] = steps_lib.sweep_section(
        list(s.sweep_dims), list(s.sweep_batches), dim, batch_size, n_dev, repeats, steps,
        devices, llc, read_gbps, s.num_samples, s.sweep_method)
    result["section_seconds"]["sweep"] = time.perf_counter() - t0

  if "kernels" in sections:
    t0 = time.perf_counter()
    result["kernels"] = kernels.kernel_section(list(s.kernel_dims), repeats, read_gbps,
                                               s.kernel_compressors, s.kernel_call_seconds,
                                               s.kernel_baseline)
    result["section_seconds"]["kernels"] = time.perf_counter() - t0

  if "network" in sections:
    t0 = time.perf_counter()
    names = s.network_compressors or tuple(compressors.REGISTRY)
    result["network"] = network_step.network_section(
        s.network_dim, s.network_hidden, s.network_batch_size, 1, s.network_repeats,
        devices[:n_dev], names)
    result["section_seconds"]["network"] = time.perf_counter() - t0

  plots = [report.plot_steps(step_rows, torch_out, os.path.join(s.outdir, "steps_per_second.png"))
           if step_rows else None,
           report.plot_sweep(result["sweep"], read_gbps, os.path.join(s.outdir, "scaling.png"))
           if "sweep" in result else None,
           report.plot_kernels(result["kernels"], os.path.join(s.outdir, "kernels.png"))
           if "kernels" in result else None]
  result["plots"] = [p for p in plots if p]
  result["summary_md"] = os.path.join(s.outdir, "summary.md")
  result["results_json"] = os.path.join(s.outdir, "results.json")
  result["runtime_seconds"] = time.perf_counter() - started
  with open(result["summary_md"], "w") as f:
    f.write(report.summary_markdown(result))
  experiment.write_json(result["results_json"], result)
  logging.info("done in %.0f s: %s", result["runtime_seconds"], result["summary_md"])
  return result
