"""The ``torch`` section of step_throughput: PyTorch peers at the same problem.

Runs ``python -m benchmarks._torch_peers`` in subprocesses (torch is an optional extra,
``pip install '.[bench]'``; imported here only to know that it is there) and compares
jrelu's steps per second with the fastest peer (:func:`ratios_section`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import logging

from benchmarks import common
from benchmarks.step_throughput import settings


def torch_section(device_counts, dim, batch_size, num_samples, repeats, cores, *,
                  torch_steps: int, ddp_steps: int, ddp_hooks, ddp_worker_counts: str) -> dict:
  """Runs ``benchmarks._torch_peers`` per worker count; steps/s stats per peer.

  Args:
    device_counts: worker counts N, ascending.
    dim: d.
    batch_size: global B.
    num_samples: stored n.
    repeats: timed chunks per peer.
    cores: CPU cores the peers may use.
    torch_steps: steps per chunk of the one-process loop peers.
    ddp_steps: steps per chunk of the DistributedDataParallel peers.
    ddp_hooks: DDP communication hooks to time.
    ddp_worker_counts: ``"all"`` (DDP at every N) or ``"N"`` (at the largest only).

  Returns:
    ``{"peers": {N: {peer: {"steps_per_second": stats, ...}}}, "description",
    "torch_version"}``, or ``{"skipped": why}`` when torch is not importable.
  """
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
  target = settings.METHODS[settings.TARGET_METHOD]
  for n in device_counts:
    cfg = {"num_workers": n, "dim": dim, "batch_size": batch_size,
           "num_samples": num_samples, "learning_rate": 0.5, "seed": 0, "warmup": 3,
           "steps": torch_steps, "repeats": repeats, "cores": cores,
           "num_levels": target.kwargs.get("num_levels", 4),
           "loop_codecs": ["none", "qsgd"], "ddp_hooks": []}
    results = _run_peers(cfg)
    if ddp_worker_counts == "all" or n == device_counts[-1]:
      ddp_cfg = dict(cfg, steps=ddp_steps, loop_codecs=[], ddp_hooks=list(ddp_hooks))
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
  """``python -m benchmarks._torch_peers CFG`` in a subprocess; its JSON or an error entry."""
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
  """jrelu / fastest PyTorch peer, per step row (method, worker count, path).

  Args:
    step_rows: ``steps.step_section``'s rows.
    torch_out: :func:`torch_section`'s output, or None.

  Returns:
    One entry per row with timed peers at its N: ``times_fastest_peer`` and its range,
    and the fastest peer of the same kind of compression when there is one.
  """
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
    same_kind = {k: timed[k] for k in settings.METHODS[row["method"]].torch_peers
                 if k in timed}
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

