"""The report of ``python -m benchmarks.reproduce``: plots and ``summary.md``.

Plot functions take ``matplotlib.pyplot`` (from ``benchmarks.common.pyplot()``, None when
matplotlib is missing) and a path; :func:`summary_markdown` renders the README-ready tables
of every section that ran.
"""

from __future__ import annotations

from benchmarks.reproduce import settings


def plot_phase_transition(plt, phase: dict, path: str) -> None:
  """Plots success probability against n/d, a panel for GD and SGD, a line per d.

  Args:
    plt: ``matplotlib.pyplot`` (Agg backend, ``common.pyplot()``).
    phase: :func:`~benchmarks.reproduce.phase_transition.phase_transition`'s
      output.
    path: the PNG to write.
  """
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
  for ax, method, title in zip(axes, ("gd", "sgd"), ("gradient descent (full batch)",
                                                     "SGD (batch d, with replacement)")):
    for d, success in phase["success_probability"][method].items():
      ax.plot(phase["n_over_d"], success, "o-", markersize=4, label=f"d = {d}")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("n / d")
    ax.grid(True, alpha=0.3)
  axes[0].set_ylabel(f"P(relative error <= {settings.TARGET:g})")
  axes[0].legend(fontsize=8)
  s = phase["settings"]
  fig.suptitle(f"planted ReLU from w = 0, step size {s['learning_rate']}, "
               f"{s['trials']} trials, {s['max_iterations']} iterations", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_curves(plt, curves: dict, results: dict, x_key: str, xlabel: str, title: str,
                x_scale: float = 1.0, *, path: str) -> None:
  """Plots relative error (log scale) of each method's best run against ``x_key``.

  Args:
    plt: ``matplotlib.pyplot`` (Agg backend, ``common.pyplot()``).
    curves: ``{name: curve}`` from
      :func:`~benchmarks.reproduce.training.training_grid`.
    results: its results (labels and step sizes).
    x_key: ``"step"`` or ``"cumulative_bits_per_device"``.
    xlabel: the x axis label.
    title: the plot title.
    x_scale: x values are divided by it (1e6 for Mbit).
    path: the PNG to write.
  """
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, curve in curves.items():
    lr = results[name]["best"]["learning_rate"]
    ax.semilogy([x / x_scale for x in curve[x_key]], curve["relative_error"],
                "-", linewidth=1.4, label=f"{results[name]['label']} (lr {lr:g})")
  ax.axhline(settings.TARGET, color="gray", linestyle=":", linewidth=1)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(r"$\|w - w^*\| / \|w^*\|$")
  ax.set_title(title, fontsize=10)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_communication(plt, comm: dict, results: dict, path: str) -> None:
  """Plots projected seconds to target against N, one panel per bandwidth.

  Args:
    plt: ``matplotlib.pyplot`` (Agg backend, ``common.pyplot()``).
    comm: :func:`~benchmarks.reproduce.communication.communication_section`'s
      output.
    results: the training results (labels).
    path: the PNG to write.
  """
  bws = list(comm["seconds_to_target"])
  fig, axes = plt.subplots(1, len(bws), figsize=(4 * len(bws), 3.6), sharey=True,
                           squeeze=False)
  for ax, bw in zip(axes[0], bws):
    for name, seconds in comm["seconds_to_target"][bw].items():
      ax.loglog(comm["worker_counts"], seconds, "o-", markersize=3,
                label=results[name]["label"])
    ax.set_xscale("log", base=2)
    ax.set_title(f"{bw} Gbit/s, alpha = {comm['alpha_seconds'] * 1e6:g} us", fontsize=10)
    ax.set_xlabel("workers N")
    ax.grid(True, which="both", alpha=0.3)
  axes[0][0].set_ylabel(f"projected seconds to {settings.TARGET:g}")
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _fmt(x, digits=3):
  if x is None:
    return "-"
  if isinstance(x, float) and not x.is_integer():
    return f"{x:.{digits}g}"
  return f"{int(x):,}"


def _seconds(x):
  if x is None:
    return "-"
  if x >= 1:
    return f"{x:.3g} s"
  return f"{x * 1e3:.3g} ms" if x >= 1e-3 else f"{x * 1e6:.3g} us"


def summary_markdown(result: dict, rows=None) -> str:
  """README-ready markdown: headline numbers and tables of every section that ran.

  Args:
    result: the benchmark's result dict (the JSON line).
    rows: :func:`~benchmarks.reproduce.training.training_rows` of the training
      grid, when it ran.

  Returns:
    The markdown text of ``OUTDIR/summary.md``.
  """
  lines = ["# Reproducing Kalan, Soltanolkotabi, Avestimehr (arXiv 1901.06587) with jrelu",
           "",
           f"Machine: {result['cpu_model']}, {result['cpu_cores']} cores, "
           f"{result['backend']} backend with {result['device_count']} devices, "
           f"JAX {result['jax_version']}. Mode: {'quick' if result['quick'] else 'full'}, "
           f"seed {result['seed']}. Generated by `python -m benchmarks.reproduce`.", ""]
  phase = result.get("phase_transition")
  if phase:
    s = phase["settings"]
    lines += ["## Phase transition", "",
              f"Probability that gradient descent (full batch) and SGD (batch d, with "
              f"replacement) from w = 0 reach relative error <= {settings.TARGET:g} within "
              f"{s['max_iterations']} iterations; step size {s['learning_rate']} on "
              f"`{s['loss']}`, {s['trials']} trials per cell, {s['dtype']}.", ""]
    header = "| method | d | " + " | ".join(f"n/d={r:g}" for r in phase["n_over_d"]) + " |"
    lines += [header, "|" + "---|" * (len(phase["n_over_d"]) + 2)]
    for method in ("gd", "sgd"):
      for d, success in phase["success_probability"][method].items():
        lines.append(f"| {method.upper()} | {d} | "
                     + " | ".join(f"{p:.2f}" for p in success) + " |")
    lines.append("")
    for method in ("gd", "sgd"):
      th = phase["threshold_n_over_d"][method]
      lines.append(f"- {method.upper()}: success probability >= 0.9 from n/d = "
                   + ", ".join(f"{_fmt(v)} (d={d})" for d, v in th.items()) + ".")
    lines.append("")
  training = result.get("training")
  if training and rows:
    p = training["problem"]
    lines += ["## Convergence and bits to accuracy", "",
              f"d = {p['dim']}, n = {p['num_samples']}, global batch {p['batch_size']} on "
              f"{p['num_devices']} devices, init 0; each method at its best step size of "
              f"{training['learning_rates']} (fewest steps to {settings.TARGET:g}). Bits are what "
              "the compiled step sends per device (read from its HLO).", "",
              "| method | step size | steps to 1e-6 | bits / step / device "
              "| bits to 1e-6 per device | vs float32 |",
              "|---|---|---|---|---|---|"]
    for row in rows:
      ratio = row["times_fewer_bits_than_float32"]
      lines.append(
          f"| {row['label']} | {_fmt(row['learning_rate'])}{'*' if row['at_grid_edge'] else ''} "
          f"| {_fmt(row['steps_to_target'])} "
          f"| {_fmt(row['wire_bits_per_step_per_device'])} | "
          f"{_fmt(row['bits_to_target'] and row['bits_to_target'] / 1e6)} M | "
          + ("1x" if row["method"] == settings.BASELINE else
             "-" if ratio is None else f"**{ratio:.1f}x fewer**") + " |")
    if any(row["at_grid_edge"] for row in rows):
      lines.append("")
      lines.append("\\* best step size at the edge of the grid: a wider grid may do better.")
    lines.append("")
    bits = result.get("bits_to_accuracy")
    if bits and bits["headline"]:
      h = bits["headline"]
      lines += [f"Headline: {h['label']} reaches {settings.TARGET:g} with "
                f"**{h['times_fewer_bits_than_float32']:.1f}x fewer bits** per device than "
                f"float32 SGD ({h['bits_to_target'] / 1e6:.3g} M vs "
                f"{h['float32_bits_to_target'] / 1e6:.3g} M).", ""]
  comm = result.get("communication")
  if comm and comm["labels"] and comm["worker_counts"]:
    lines += _communication_markdown(comm)
  lines += ["Timings (steps/s, compute per step, projected times) depend on the machine; "
            "bit counts and step counts do not.", ""]
  return "\n".join(lines)


def _communication_markdown(comm: dict) -> list:
  """The tables of section 4: projected time per N and bandwidth, and a cost breakdown."""
  labels = comm["labels"]
  names = list(labels)
  counts = comm["worker_counts"]
  lines = ["## Projected time to 1e-6 (alpha-beta model)", "",
           f"`{comm['model']}`, alpha = {comm['alpha_seconds'] * 1e6:g} us per message "
           "round, compute measured on one device at the per-worker batch "
           f"(global batch {comm['global_batch_size']}).", ""]
  for bw, table in comm["seconds_to_target"].items():
    lines += [f"{bw} Gbit/s:", "",
              "| N | " + " | ".join(labels[m] for m in names) + " | fastest |",
              "|" + "---|" * (len(names) + 2)]
    for i, n in enumerate(counts):
      lines.append(f"| {n} | " + " | ".join(_seconds(table[m][i]) for m in names)
                   + f" | {labels[comm['fastest_method'][bw][i]]} |")
    lines.append("")
  bws = list(comm["seconds_to_target"])
  lines += ["Per-step cost: compute (measured), latency (rounds x alpha) and transfer "
            "(bits / bandwidth):", "",
            "| method | N | compute | latency | bits / step / device | "
            + " | ".join(f"transfer at {bw} Gbit/s" for bw in bws) + " |",
            "|" + "---|" * (5 + len(bws))]
  for m in names:
    for i in sorted({0, len(counts) - 1}):
      bits = comm["wire_bits_per_step_per_device"][m][i]
      lines.append(
          f"| {labels[m]} | {counts[i]} | {_seconds(comm['compute_seconds_per_step'][m][i])} "
          f"| {_seconds(comm['rounds'][m][i] * comm['alpha_seconds'])} | {_fmt(bits)} | "
          + " | ".join(_seconds(bits / (float(bw) * 1e9)) for bw in bws) + " |")
  bw0 = bws[0]
  crossover = comm["float32_latency_bound_below_dim"][bw0][0]
  lines += ["", f"A float32 all-reduce is latency-bound (transfer time below rounds x alpha) "
            f"for d < N alpha B / 32: d < {crossover:,.0f} at N = {counts[0]} and {bw0} "
            "Gbit/s, growing with N and B. Below that, fewer bits cannot shorten a step; "
            "only the compute term (which includes the codec) separates the methods.",
            "", "Assumptions: " + "; ".join(comm["assumptions"]) + ".", ""]
  return lines

