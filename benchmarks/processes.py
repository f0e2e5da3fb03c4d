r"""Step time of one job laid out as 1 or 2 processes: 1 x 2, 2 x 1, 1 x 8 and 2 x 4 devices.

Runs ``python -m jrelu.train`` for every layout of ``LAYOUTS`` (processes x devices per
process) on the same problem, one after another in this one invocation: one process
alone (XLA's in-process collectives) or ``python -m jrelu.launch`` (JAX's distributed
runtime, gloo collectives over loopback). Reports the steps per second each run's
``summary.json`` records (compilation excluded), the step time, and the wire bits per
step per device each process read from its compiled program.

    python -m benchmarks.processes --outdir=runs/processes
    python -m benchmarks.processes --num_steps=100 --dim=100   # a quick look

Ends by printing one JSON line; writes ``OUTDIR/summary.md`` (the README's table).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import flags

from benchmarks import common

PROG = "benchmarks.processes"
# (processes, devices per process): the README's table.
LAYOUTS = ((1, 2), (2, 1), (1, 8), (2, 4))


def define_flags(flag_values: flags.FlagValues) -> None:
  """Defines the binary's flags in ``flag_values`` (absl's FLAGS when it runs)."""
  flags.DEFINE_string("outdir", "runs/processes", "Where the runs and summary.md go.",
                      flag_values=flag_values)
  flags.DEFINE_integer("dim", 1000, "d of the planted problem.", lower_bound=1,
                       flag_values=flag_values)
  flags.DEFINE_integer("num_samples", 4000, "n.", lower_bound=1, flag_values=flag_values)
  flags.DEFINE_integer("batch_size", 1024, "Global batch (divisible by 8).", lower_bound=8,
                       flag_values=flag_values)
  flags.DEFINE_integer("num_steps", 400, "Steps of each run.", lower_bound=1,
                       flag_values=flag_values)
  flags.DEFINE_integer("log_every", 100, "Steps per compiled chunk.", lower_bound=1,
                       flag_values=flag_values)


def train_flags(values, workdir: str, num_devices: int) -> list[str]:
  """The jrelu.train flags of one run (QSGD two_phase, the binary's default method)."""
  return [f"--workdir={workdir}", f"--num_devices={num_devices}", f"--dim={values.dim}",
          f"--num_samples={values.num_samples}", f"--batch_size={values.batch_size}",
          f"--num_steps={values.num_steps}", f"--log_every={values.log_every}",
          "--target_relative_error=0", "--fresh", f"--checkpoint_every={10**9}"]


def run_layout(values, num_processes: int, per_process: int) -> dict:
  """Runs one layout; returns its row (steps/s, ms/step, wire bits, wall seconds)."""
  workdir = os.path.join(values.outdir, f"{num_processes}x{per_process}")
  argv = train_flags(values, workdir, num_processes * per_process)
  if num_processes == 1:
    command = [sys.executable, "-m", "jrelu.train", *argv]
  else:
    command = [sys.executable, "-m", "jrelu.launch", f"--num_processes={num_processes}",
               "--", *argv]
  start = time.perf_counter()
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - start
  if result.returncode:
    common.fail(f"{' '.join(command[1:4])} ... failed with status {result.returncode}:\n"
                + result.stdout[-2000:] + result.stderr[-2000:], 1)
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  return {
      "processes": num_processes, "devices_per_process": per_process,
      "steps_per_second": summary["steps_per_second"],
      "ms_per_step": 1000.0 / summary["steps_per_second"],
      "wire_bits_per_step_per_device_by_process":
          summary["wire_bits_per_step_per_device_by_process"],
      "relative_error": summary["relative_error"], "wall_seconds": wall,
  }


def markdown(rows) -> str:
  lines = ["| processes x devices | steps/s | ms/step | wire bits/step/device (each process) "
           "| relative error |", "|---|---|---|---|---|"]
  for r in rows:
    bits = ", ".join(f"{b:.0f}" for b in r["wire_bits_per_step_per_device_by_process"])
    lines.append(f"| {r['processes']} x {r['devices_per_process']} | "
                 f"{r['steps_per_second']:.0f} | {r['ms_per_step']:.2f} | {bits} | "
                 f"{r['relative_error']:.3e} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  values = flags.FLAGS
  if values.batch_size % 8:
    common.fail(f"flag --batch_size={values.batch_size}: must be divisible by 8")
  common.make_outdir(values.outdir)
  rows = [run_layout(values, n, k) for n, k in LAYOUTS]
  table = markdown(rows)
  with open(os.path.join(values.outdir, "summary.md"), "w") as f:
    f.write(table)
  sys.stderr.write(table)
  common.print_json_line({"layouts": rows, "load_average": os.getloadavg(),
                          "cpu_model": common.cpu_model(), "cpu_cores": common.cpu_cores()})


if __name__ == "__main__":
  define_flags(flags.FLAGS)
  common.run_main(main, PROG)
