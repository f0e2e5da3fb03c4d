"""The binary ``python -m benchmarks.step_throughput``: flags -> Settings -> the sections.

    python -m benchmarks.step_throughput --quick --skip_torch --outdir=runs/step_throughput
    python -m benchmarks.step_throughput --sections=step,roofline --skip_torch

See ``benchmarks/step_throughput/__init__.py`` for what each section measures. Bad flags
print one line ``benchmarks.step_throughput: error: ...`` on stderr and exit with status 2.
``--sections=scale`` alone is how the scale section runs itself in a fresh process.
"""

from __future__ import annotations

from absl import flags

from benchmarks import common
from benchmarks.step_throughput import benchmark
from benchmarks.step_throughput import scale
from benchmarks.step_throughput import settings
from jrelu import compressors

_OUTDIR = flags.DEFINE_string("outdir", "runs/step_throughput", "Where results and plots go.")
_QUICK = flags.DEFINE_bool("quick", False, "Fewer repeats, sizes and peers (~2 minutes).")
_SECTIONS = flags.DEFINE_list("sections", ",".join(settings.SECTIONS),
                              f"Comma-separated subset of {', '.join(settings.SECTIONS)}.")
_REPEATS = flags.DEFINE_integer("repeats", None, "Timed repeats per configuration "
                                "(default 7, quick 3).", lower_bound=1)
_SKIP_TORCH = flags.DEFINE_bool("skip_torch", False, "Skip the PyTorch peers.")
_METHODS = flags.DEFINE_list("methods", None, "Rows of settings.METHODS to time (default: all; "
                             "quick: none, qsgd).")
_SWEEP_METHOD = flags.DEFINE_enum("sweep_method", settings.SWEEP_METHOD, list(settings.METHODS),
                                  "Row of settings.METHODS that the sweep times.")
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
  return bool(values) and all(v in settings.SECTIONS for v in values)


flags.register_validator("sections", _check_sections,
                         f"must be a comma-separated subset of {', '.join(settings.SECTIONS)}")
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



def settings_from_flags() -> settings.Settings:
  """The :class:`~benchmarks.step_throughput.settings.Settings` of the parsed flags.

  Raises:
    SystemExit: with status 2 after one error line, for flags that do not fit together.
  """
  n_dev = _NUM_DEVICES.value
  if _BATCH_SIZE.value % n_dev:
    common.fail(f"flag --batch_size={_BATCH_SIZE.value}: not divisible by "
                f"--num_devices={n_dev}")
  if _SCALE_BATCH_SIZE.value % n_dev:
    common.fail(f"flag --scale_batch_size={_SCALE_BATCH_SIZE.value}: not divisible by "
                f"--num_devices={n_dev}")
  unknown = [m for m in (_METHODS.value or []) if m not in settings.METHODS]
  if unknown:
    common.fail(f"flag --methods={','.join(_METHODS.value)}: {unknown[0]!r} is not a row of "
                f"METHODS ({', '.join(settings.METHODS)})")
  unknown = [c for c in (_KERNEL_COMPRESSORS.value or []) if c not in compressors.REGISTRY]
  if unknown:
    common.fail(f"flag --kernel_compressors={','.join(_KERNEL_COMPRESSORS.value)}: "
                f"{unknown[0]!r} is not in jrelu.compressors.REGISTRY "
                f"({', '.join(compressors.REGISTRY)})")
  num_samples = _NUM_SAMPLES.value
  if num_samples is not None and num_samples < _BATCH_SIZE.value:
    common.fail(f"flag --num_samples={num_samples}: smaller than "
                f"--batch_size={_BATCH_SIZE.value}")
  return settings.Settings.make(
      _QUICK.value, outdir=_OUTDIR.value,
      sections=tuple(s for s in settings.SECTIONS if s in _SECTIONS.value),
      skip_torch=_SKIP_TORCH.value, num_devices=n_dev, dim=_DIM.value,
      batch_size=_BATCH_SIZE.value, num_samples=num_samples, repeats=_REPEATS.value,
      steps_per_chunk=_STEPS_PER_CHUNK.value,
      methods=_METHODS.value and tuple(_METHODS.value), sweep_method=_SWEEP_METHOD.value,
      sweep_dims=_SWEEP_DIMS.value, sweep_batches=_SWEEP_BATCHES.value,
      kernel_dims=_KERNEL_DIMS.value,
      kernel_compressors=_KERNEL_COMPRESSORS.value and tuple(_KERNEL_COMPRESSORS.value),
      scale_dim=_SCALE_DIM.value, scale_batch_size=_SCALE_BATCH_SIZE.value,
      scale_steps=_SCALE_STEPS.value)


def main(argv):
  """absl main: flags -> settings -> :func:`benchmark.run` (or the scale child); one JSON line."""
  del argv
  s = settings_from_flags()
  common.make_outdir(s.outdir)
  devices = common.setup_devices(s.num_devices)
  if list(s.sections) == ["scale"]:  # the child of scale.scale_in_subprocess (or a direct call)
    common.print_json_line({
        "benchmark": "step_throughput", **common.machine_info(), "sections": ["scale"],
        "scale": scale.scale_section(s.scale_dim, s.scale_batch_size, s.scale_steps,
                                     s.num_devices)})
    return
  common.print_json_line(benchmark.run(s, devices))


if __name__ == "__main__":
  common.run_main(main, "benchmarks.step_throughput")
