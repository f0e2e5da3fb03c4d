"""The report of step_throughput: plots and ``summary.md``.

Plots ``steps_per_second.png``, ``scaling.png`` and ``kernels.png`` (none when matplotlib
is missing).

Each plot function returns the path it wrote, or None.
"""

from __future__ import annotations

from benchmarks import common


def _label(row):
  """The bar label of a step row."""
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
  """Markdown tables of every section (for README): the text of ``OUTDIR/summary.md``.

  Args:
    result: the benchmark's result dict (the JSON line).

  Returns:
    Markdown text.
  """
  m = result
  lines = [
      "# Step throughput",
      "",
      f"Machine: {m['cpu_model']}, {m['cpu_cores']} cores, LLC {m['llc_bytes'] >> 20} MiB, "
      f"JAX {m['jax_version']} {m['backend']}, malloc "
      f"{'keeps' if m.get('keeps_freed_memory') else 'returns'} freed memory and "
      f"{'asks' if m.get('malloc_huge_pages') else 'does not ask'} for huge pages "
      f"(kernel mode: {m.get('transparent_huge_pages')}). "
      f"{m['timing_note']} Steps/s: median "
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
    if kernels.get("read_gbytes_per_second"):
      lines += ["Ratio to the streaming read (encode + decode GB/s / read GB/s):", "",
                "| compressor | " + " | ".join(f"d = {d:.0e}" for d in dims) + " |",
                "|---|" + "---|" * len(dims)]
      for name, rows in kernels["compressors"].items():
        by_dim = {r["dim"]: r for r in rows if r.get("dim")}
        cells = [_fmt(by_dim[d].get("fraction_of_read_bandwidth"), 2) if d in by_dim
                 else "" for d in dims]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
      lines.append("")
    if kernels.get("baseline"):
      lines += [f"Before ({kernels['baseline']}) and after, timed in turn in this run: "
                "encode + decode GB/s (ratio to the streaming read):", "",
                "| compressor | d | before | after | speed-up |", "|---|---|---|---|---|"]
      for name, rows in kernels["compressors"].items():
        for r in rows:
          if not r.get("dim") or "gbytes_per_second" not in r:
            continue
          after = f"{_fmt(r['gbytes_per_second'])} ({_fmt(r.get('fraction_of_read_bandwidth'), 2)})"
          if "baseline_gbytes_per_second" in r:
            before = (f"{_fmt(r['baseline_gbytes_per_second'])} "
                      f"({_fmt(r.get('baseline_fraction_of_read_bandwidth'), 2)})")
            gain = f"{r['gbytes_per_second'] / r['baseline_gbytes_per_second']:.0f}x"
          else:
            before, gain = f"error: {r.get('baseline_error', '')[:60]}", ""
          lines.append(f"| {name} | {r['dim']:.0e} | {before} | {after} | {gain} |")
      lines.append("")
  net = m.get("network")
  if net:
    lines += [f"## Training step of the two-layer network ({net['parameters']:,} parameters,"
              f" K = {net['hidden']}, d = {net['dim']}, global batch {net['batch_size']}, "
              f"{net['num_devices']} devices, pmap, online batches)", "",
              "| method | aggregation | ms/step [min-max] | compression share | bits sent "
              "per device per step |", "|---|---|---|---|---|"]
    for r in net["rows"]:
      how = "psum" if r["method"] == "psum" else "two_phase"
      name = "float32" if r["method"] == "psum" else r["method"]
      if "error" in r:
        lines.append(f"| {name} | {how} | error: {r['error'][:80]} | | |")
        continue
      st = r["step_seconds"]
      lines.append(f"| {name} | {how} | {1e3 * st['median']:.0f} [{1e3 * st['min']:.0f}-"
                   f"{1e3 * st['max']:.0f}] | {_fmt(r.get('compression_share'), 2)} | "
                   f"{r['wire_bits_per_step_per_device']:,.0f} |")
    lines.append("")
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

