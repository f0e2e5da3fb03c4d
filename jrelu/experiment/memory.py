"""How much memory an experiment needs, how much the machine has, and the refusal."""

from __future__ import annotations

import os

from jrelu import _checks
from jrelu.experiment.config import SGD, Config, ConfigError

def estimate_memory_bytes(config: Config, num_devices: int) -> dict:
  """The memory a run of ``config`` on ``num_devices`` devices needs, estimated in bytes.

  Counts the float32 arrays that live through the run, from their shapes (no
  allocation): ``w_star`` on the host; per device, its segment of the data set (``x``:
  ``num_samples / N x dim`` and ``y``, drawn on the device itself; the whole data set for
  EASGD, EAMSGD and DOWNPOUR, whose workers sample all of it), its batch
  (``batch_size / N x dim``, twice: the rows and the gradient's product with them), a
  sampler permutation of ``num_samples`` int32, and 9 parameter-sized vectors (``w_star``,
  params, gradient, momentum, error-feedback residual, code, decoded mean, update, spare).
  XLA's temporaries and the compiled programs are not counted: the estimate is a lower
  bound meant to refuse a config that cannot fit, before it allocates.

  Args:
    config: the run's settings.
    num_devices: N.

  Returns:
    ``{"host_bytes": ..., "per_device_bytes": ...}``; on CPU the devices share host
    memory, so the total there is ``host_bytes + N * per_device_bytes`` (with several
    processes, each host holds its own devices' share).

  Example:
    >>> estimate_memory_bytes(Config(), 8)["per_device_bytes"]   # 500 rows of d = 1000
    3078000
  """
  n_dev = _checks.integer("num_devices", num_devices)
  d, n = config.dim, config.num_samples
  segment = 4 * (n // n_dev if config.algorithm == SGD else n) * (d + 1)
  per_device = (segment + 2 * 4 * (config.batch_size // n_dev) * d + 4 * n + 9 * 4 * d)
  return {"host_bytes": 4 * d, "per_device_bytes": per_device}


def available_memory_bytes(devices=None) -> dict:
  """Memory that a run can still take: host RAM, and each accelerator's capacity.

  Args:
    devices: the run's devices, or None (then only host memory is read).

  Returns:
    ``{"host_bytes": MemAvailable of /proc/meminfo (or the free physical pages of
    os.sysconf), "device_bytes": the first device's ``bytes_limit`` from
    ``memory_stats()``, or None on CPU or when the backend does not say}``; either is
    None when it cannot be read.

  Example:
    >>> available_memory_bytes()["host_bytes"] > 0
    True
  """
  host = None
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          host = int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  if host is None:
    try:
      host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
      host = None
  device = None
  if devices and devices[0].platform != "cpu":
    try:
      device = (devices[0].memory_stats() or {}).get("bytes_limit")
    except Exception:  # pylint: disable=broad-except  (a backend without memory stats)
      device = None
  return {"host_bytes": host, "device_bytes": device}


def check_memory(config: Config, devices) -> None:
  """Refuses a config whose estimated memory exceeds what is available.

  Args:
    config: the run's settings.
    devices: the devices it runs on (CPU devices share host memory).

  Raises:
    ConfigError: (field ``dim``) in one line giving the estimate
      (:func:`estimate_memory_bytes`) and the available memory
      (:func:`available_memory_bytes`).

  Example:
    >>> check_memory(Config(dim=100_000_000), jax.devices())
    ConfigError: dim=100000000, num_samples=4000, batch_size=1024 on 8 devices need
    about 2.28e+03 GiB host (estimated), but 16.7 GiB is available; lower dim or ...
  """
  need = estimate_memory_bytes(config, len(devices))
  have = available_memory_bytes(devices)
  on_cpu = devices[0].platform == "cpu"
  local = sum(1 for d in devices if d.process_index == devices[0].client.process_index())
  checks = [("host", need["host_bytes"] + (local * need["per_device_bytes"]
                                           if on_cpu else 0), have["host_bytes"])]
  if not on_cpu:
    checks.append(("per device", need["per_device_bytes"], have["device_bytes"]))
  gib = 2.0**30
  for where, bytes_needed, bytes_available in checks:
    if bytes_available is not None and bytes_needed > bytes_available:
      raise ConfigError("dim", f"dim={config.dim}, num_samples={config.num_samples}, "
                        f"batch_size={config.batch_size} on {len(devices)} devices need "
                        f"about {bytes_needed / gib:.3g} GiB {where} (estimated), but "
                        f"{bytes_available / gib:.3g} GiB is available; lower dim or "
                        "num_samples")
