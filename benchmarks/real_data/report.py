"""The real-data benchmark's table (``summary.md``) and plot (``real_data.png``)."""

from __future__ import annotations

import os

from benchmarks import common

PLOT = "real_data.png"


def _mean_std(s: dict, digits: int, percent: bool = False) -> str:
  if s["mean"] is None:
    return "diverged"
  scale = 100.0 if percent else 1.0
  text = f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f}"
  return text


def markdown(rows, problem: dict) -> str:
  """The README table: one line per row, final scores as mean ± std over the seeds.

  Args:
    rows: ``benchmark.run``'s rows.
    problem: the problem's facts (rows, steps, seeds, batch, devices).

  Returns:
    Markdown text.
  """
  seeds = len(problem["seeds"])
  lines = [
      f"Digits ({problem['train_rows']} training, {problem['test_rows']} held-out rows), "
      f"{problem['model']}, {problem['num_devices']} devices, global batch "
      f"{problem['batch_size']}, {problem['num_steps']} steps; mean ± std over {seeds} "
      f"seed(s); bits read from the compiled step's HLO.", "",
      "| method | step size | flags | bits/step/device | Mbit sent per device | fewer bits "
      "than float32 | test accuracy (%) | training loss |",
      "|---|---|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    fewer = f"{r['fewer_bits_than_float32']:.1f}x" if r.get("fewer_bits_than_float32") else "-"
    failed = sum(not ok for ok in r["finite"])
    note = f" ({failed} of {seeds} diverged)" if failed else ""
    lines.append(
        f"| {r['method']} | {r['step_size']} | `{r['flags']}` | "
        f"{r['wire_bits_per_step_per_device']:,.0f} | "
        f"{r['total_wire_bits_per_device'] / 1e6:,.2f} | {fewer} | "
        f"{_mean_std(r['test_accuracy'], 1, percent=True)}{note} | "
        f"{_mean_std(r['train_loss'], 4)} |")
  return "\n".join(lines) + "\n"


def plot(rows, outdir: str) -> list:
  """Final test accuracy and training loss against Mbit sent per device, one point a row.

  Error bars span the seeds' minimum to maximum; the color is the method's family, the
  marker's shape its level, a hollow marker a step-size rule other than the fixed one.
  Writes ``OUTDIR/real_data.png``.

  Args:
    rows: ``benchmark.run``'s rows.
    outdir: the output directory.

  Returns:
    The paths written (none when matplotlib is not installed).
  """
  plt = common.pyplot()
  if plt is None:
    return []
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(13, 8))
  markers = "os^D"
  families, levels = [], {}
  for r in rows:
    family = r["key"].split("_")[0]   # qsgd_s4 -> qsgd, top_k_1 -> top
    if family not in families:
      families.append(family)
    known = levels.setdefault(family, [])
    if r["key"] not in known:
      known.append(r["key"])
    index = 2 * families.index(family)   # tab20's dark shades first, then the light ones
    color = plt.get_cmap("tab20")(index % 20 + index // 20 % 2)
    marker = markers[known.index(r["key"]) % len(markers)]
    x = r["total_wire_bits_per_device"] / 1e6
    face = "none" if r["step_size"] != "fixed" else color
    for ax, name in ((acc_ax, "test_accuracy"), (loss_ax, "train_loss")):
      s = r[name]
      if s["mean"] is None:
        continue
      scale = 100.0 if name == "test_accuracy" else 1.0
      ax.errorbar([x], [scale * s["mean"]],
                  yerr=[[scale * (s["mean"] - s["min"])], [scale * (s["max"] - s["mean"])]],
                  marker=marker, markersize=7, capsize=3, linestyle="none", color=color,
                  markerfacecolor=face, label=r["method"])
  for ax in (acc_ax, loss_ax):
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("Mbit sent per device in the whole run (from HLO)")
    ax.grid(True, which="both", alpha=0.3)
  loss_ax.set_yscale("log")
  acc_ax.set_ylabel("held-out test accuracy (%)")
  loss_ax.set_ylabel("training loss (cross-entropy, whole training set)")
  handles, labels = acc_ax.get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", fontsize=7, ncol=4)
  fig.tight_layout(rect=(0, 0.05 + 0.018 * -(-len(labels) // 4), 1, 1))
  path = os.path.join(outdir, PLOT)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return [path]
