"""PyTorch peers of jrelu's training step, timed for ``python -m benchmarks.step_throughput``.

A helper, not a benchmark binary: ``benchmarks.step_throughput.peers`` runs it in a subprocess
(``python -m benchmarks._torch_peers CONFIG_JSON``) so that neither JAX nor the parent's
memory is in the way, and reads the one JSON line it prints. It imports only torch and
NumPy.

The problem is jrelu's: the planted ReLU ``y = relu(<w_star, x>)``, ``x ~ N(0, I_d)``, loss
``1/(2m) sum (relu(x w) - y)^2``, plain SGD, the same global batch B split over N workers,
and the same data layout (the data set cut into N segments, worker i reading a window of
B/N consecutive rows of its segment at an offset drawn each step; a slice, no copy).
Peers:

* ``ddp``: ``torch.nn.parallel.DistributedDataParallel`` over Gloo with N processes on
  localhost (spawned; MASTER_ADDR=127.0.0.1, a free port), a ``torch.nn.Linear(d, 1,
  bias=False)`` followed by ``torch.relu``, ``torch.optim.SGD``, and PyTorch's own
  communication hooks: plain all-reduce (no hook), ``fp16_compress_hook``,
  ``quantization_pertensor_hook`` and ``powerSGD_hook``. Each process holds only its
  segment. ``torch.set_num_threads(max(1, cores // N))`` per process, so that N processes
  do not oversubscribe the cores.
* ``loop``: one process simulating N workers the way common PyTorch compressor code does:
  for each worker, forward and backward on its shard, then (``qsgd``) max-norm, stochastic
  rounding against ``torch.rand``, sign, decode; average the N decoded gradients; update.
  ``torch.set_num_threads(cores)``.

Each peer is timed like jrelu: warm-up steps, then ``repeats`` chunks of ``steps`` steps;
steps per second per chunk.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time

import numpy as np

DDP_HOOKS = ("allreduce", "fp16", "quantization", "powersgd")
LOOP_CODECS = ("none", "qsgd")


def _segment(rank: int, length: int, dim: int, seed: int):
  """Worker ``rank``'s segment of the planted data set: x ``[length, dim]``, y, w_star."""
  import torch
  w_star = torch.randn(dim, generator=torch.Generator().manual_seed(seed))
  w_star /= w_star.norm()
  gen = torch.Generator().manual_seed(seed + 1 + rank)
  x = torch.randn(length, dim, generator=gen)
  return x, torch.relu(x @ w_star), w_star


def _offsets(count: int, length: int, rows: int, seed: int):
  """Window offsets, the same on every worker (one per step)."""
  return np.random.default_rng(seed).integers(0, length - rows + 1, size=count).tolist()


def _chunks(step, warmup: int, steps: int, repeats: int, barrier=lambda: None):
  """Runs ``warmup`` steps, then ``repeats`` timed chunks; returns steps/s per chunk."""
  t = 0
  for _ in range(warmup):
    step(t)
    t += 1
  rates = []
  for _ in range(repeats):
    barrier()
    start = time.perf_counter()
    for _ in range(steps):
      step(t)
      t += 1
    barrier()
    rates.append(steps / (time.perf_counter() - start))
  return rates


def _ddp_worker(rank: int, cfg: dict, out_path: str):
  import torch
  import torch.distributed as dist
  from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
  from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook
  from torch.distributed.algorithms.ddp_comm_hooks import quantization_hooks
  from torch.nn.parallel import DistributedDataParallel

  world = cfg["num_workers"]
  os.environ["MASTER_ADDR"] = "127.0.0.1"
  os.environ["MASTER_PORT"] = str(cfg["port"])
  torch.set_num_threads(cfg["threads"])
  dist.init_process_group("gloo", rank=rank, world_size=world)
  rows = cfg["batch_size"] // world
  length = cfg["num_samples"] // world
  x, y, _ = _segment(rank, length, cfg["dim"], cfg["seed"])
  total = cfg["warmup"] + cfg["steps"] * cfg["repeats"]
  offsets = _offsets(total, length, rows, cfg["seed"])
  results = {}
  for hook in cfg["hooks"]:
    torch.manual_seed(cfg["seed"])
    model = torch.nn.Linear(cfg["dim"], 1, bias=False)
    ddp = DistributedDataParallel(model)
    note = None
    if hook == "fp16":
      ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif hook == "quantization":
      ddp.register_comm_hook(None, quantization_hooks.quantization_pertensor_hook)
    elif hook == "powersgd":
      # Rank 1, compression from the 2nd step (the earliest allowed with error feedback
      # and warm start); min_compression_rate keeps its default (2), so for the 1 x d
      # weight, whose rank-1 factors are as big as itself, PowerSGD all-reduces it
      # uncompressed: what a user gets.
      state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=1,
                                          start_powerSGD_iter=2)
      ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
      note = ("min_compression_rate=2 (default): the 1 x d weight is all-reduced "
              "uncompressed, its rank-1 factors being no smaller")
    opt = torch.optim.SGD(ddp.parameters(), lr=cfg["learning_rate"])

    def step(t):
      u = offsets[t]
      xb, yb = x[u:u + rows], y[u:u + rows]
      opt.zero_grad(set_to_none=True)
      residual = torch.relu(ddp(xb).squeeze(1)) - yb
      loss = 0.5 * (residual * residual).mean()
      loss.backward()
      opt.step()

    try:
      rates = _chunks(step, cfg["warmup"], cfg["steps"], cfg["repeats"], dist.barrier)
      results[hook] = {"steps_per_second": rates, "note": note}
    except RuntimeError as e:  # every rank fails the same way at the same step
      message = " ".join(str(e).split()).replace(
          "Got the following error when running the callback: ", "")
      results[hook] = {"steps_per_second": [], "note": note, "error": message[:300]}
      dist.barrier()
  if rank == 0:
    with open(out_path, "w") as f:
      json.dump(results, f)
  dist.barrier()
  dist.destroy_process_group()


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_ddp(cfg: dict) -> dict:
  """Times DDP training over Gloo with ``cfg["num_workers"]`` spawned processes.

  Args:
    cfg: ``num_workers, dim, batch_size, num_samples, learning_rate, seed, warmup, steps,
      repeats, cores, hooks`` (a subset of ``DDP_HOOKS``).

  Returns:
    ``{hook: {"steps_per_second": [...], "note": ...}}``.
  """
  import torch.multiprocessing as mp
  cfg = dict(cfg, port=_free_port(),
             threads=max(1, cfg["cores"] // cfg["num_workers"]))
  with tempfile.TemporaryDirectory() as tmp:
    out_path = os.path.join(tmp, "ddp.json")
    mp.start_processes(_ddp_worker, args=(cfg, out_path), nprocs=cfg["num_workers"],
                       join=True, start_method="spawn")
    with open(out_path) as f:
      results = json.load(f)
  for r in results.values():
    r["threads_per_process"] = cfg["threads"]
  return results


def run_loop(cfg: dict) -> dict:
  """Times the single-process simulation of N workers with per-worker compression.

  Args:
    cfg: ``num_workers, dim, batch_size, num_samples, learning_rate, seed, warmup, steps,
      repeats, cores, num_levels, codecs`` (a subset of ``LOOP_CODECS``).

  Returns:
    ``{codec: {"steps_per_second": [...], "threads": ...}}``.
  """
  import torch
  torch.set_num_threads(cfg["cores"])
  world, dim, s = cfg["num_workers"], cfg["dim"], cfg["num_levels"]
  rows = cfg["batch_size"] // world
  length = cfg["num_samples"] // world
  segments = [_segment(i, length, dim, cfg["seed"])[:2] for i in range(world)]
  total = cfg["warmup"] + cfg["steps"] * cfg["repeats"]
  offsets = _offsets(total, length, rows, cfg["seed"])
  results = {}
  for codec in cfg["codecs"]:
    torch.manual_seed(cfg["seed"])
    w = torch.nn.Parameter(torch.zeros(dim))
    with torch.no_grad():
      w.normal_(0, dim ** -0.5)

    def step(t):
      u = offsets[t]
      total_grad = torch.zeros(dim)
      for x, y in segments:  # one simulated worker at a time
        w.grad = None
        residual = torch.relu(x[u:u + rows] @ w) - y[u:u + rows]
        (0.5 * (residual * residual).mean()).backward()
        g = w.grad
        if codec == "qsgd":  # QSGD, max norm, s levels: encode then decode
          norm = g.abs().max()
          level = g.abs() / norm * s
          low = level.floor()
          level = low + (torch.rand(dim) < level - low).float()
          g = torch.sign(g) * level * (norm / s)
        total_grad += g
      with torch.no_grad():
        w.sub_(cfg["learning_rate"] * total_grad / world)

    rates = _chunks(step, cfg["warmup"], cfg["steps"], cfg["repeats"])
    results[codec] = {"steps_per_second": rates, "threads": cfg["cores"]}
  return results


def main(argv):
  """``python -m benchmarks._torch_peers CONFIG_JSON``: prints one JSON line of results."""
  cfg = json.loads(argv[1])
  import torch
  out = {"torch_version": torch.__version__}
  if cfg.get("loop_codecs"):
    out["loop"] = run_loop(dict(cfg, codecs=cfg["loop_codecs"]))
  if cfg.get("ddp_hooks"):
    out["ddp"] = run_ddp(dict(cfg, hooks=cfg["ddp_hooks"]))
  sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
  main(sys.argv)
