"""The binary ``python -m benchmarks.step_throughput``: flags -> Settings -> the sections.

    python -m benchmarks.step_throughput --quick --skip_torch --outdir=runs/step_throughput
    python -m benchmarks.step_throughput --sections=step,roofline --skip_torch

See ``benchmarks/step_throughput/__init__.py`` for what each section measures. Bad flags
print one line ``benchmarks.step_throughput: error: ...`` on stderr and exit with status 2.
``--sections=scale`` alone is how the scale section runs itself in a fresh process.
"""

from __future__ import annotations

import os

from absl import flags

from benchmarks import common
from benchmarks.step_throughput import benchmark
from benchmarks.step_throughput import scale
from benchmarks.step_throughput import settings
from jrelu import compressors

PROG = "benchmarks.step_throughput"


def define_flags(flag_values: flags.FlagValues) -> None:
  """Defines the binary's flags and their validators in ``flag_values``.

  The binary defines them in ``absl.flags.FLAGS`` when it runs; a test defines them in a
  fresh ``flags.FlagValues()``, so that this binary and the other benchmarks can be
  imported into one process (their flag names overlap, e.g. ``--outdir``).

  Args:
    flag_values: where to define them, e.g. ``flags.FLAGS``.

  Raises:
    absl.flags.DuplicateFlagError: when ``flag_values`` already holds one of them.

  Example:
    >>> values = flags.FlagValues()
    >>> define_flags(values)
    >>> values(["benchmarks.step_throughput", "--quick"])
    ['benchmarks.step_throughput']
    >>> values.quick, values.num_devices
    (True, 8)
  """
  fv = flag_values
  flags.DEFINE_string("outdir", "runs/step_throughput", "Where results and plots go.",
                      flag_values=fv)
  flags.DEFINE_bool("quick", False, "Fewer repeats, sizes and peers (~2 minutes).",
                    flag_values=fv)
  flags.DEFINE_list("sections", ",".join(settings.SECTIONS),
                    f"Comma-separated subset of {', '.join(settings.SECTIONS)}.",
                    flag_values=fv)
  flags.DEFINE_integer("repeats", None, "Timed repeats per configuration "
                       "(default 7, quick 3).", lower_bound=1, flag_values=fv)
  flags.DEFINE_bool("skip_torch", False, "Skip the PyTorch peers.", flag_values=fv)
  flags.DEFINE_list("methods", None, "Rows of settings.METHODS to time (default: all; "
                    "quick: none, qsgd).", flag_values=fv)
  flags.DEFINE_enum("sweep_method", settings.SWEEP_METHOD, list(settings.METHODS),
                    "Row of settings.METHODS that the sweep times.", flag_values=fv)
  flags.DEFINE_integer("num_devices", 8, "Devices N of the multi-device runs "
                       "(simulated CPU devices); 1 is always timed too.", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer("dim", 1000, "Dimension d of the timed step.", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer("batch_size", 4096, "Global mini-batch size B.", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer(
      "num_samples", None, "Stored samples n; default: a multiple of B with n d 4 bytes >= "
      "4 x the last-level cache and n >= 2 B, so that batches stream from memory.",
      lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("steps_per_chunk", None, "Steps per timed compiled "
                       "call (default 50, quick 20).", lower_bound=1, flag_values=fv)
  flags.DEFINE_string("sweep_dims", None, "d values of the sweep at B = "
                      "--batch_size (default 250,...,4000).", flag_values=fv)
  flags.DEFINE_string("sweep_batches", None, "B values of the sweep at d = "
                      "--dim (default 512,...,8192).", flag_values=fv)
  flags.DEFINE_string("kernel_dims", None, "d values of the kernels section "
                      "(default 1e3,...,1e7; quick up to 1e5).", flag_values=fv)
  flags.DEFINE_list(
      "kernel_compressors", None, "Registry names of the kernels section (default: all).",
      flag_values=fv)
  flags.DEFINE_string(
      "kernel_baseline", None, "A repository root (e.g. a worktree of the main branch) "
      "whose codecs the kernels section also times, after each of this checkout's, with "
      "the same loop in a fresh process: before/after in one run.", flag_values=fv)
  flags.DEFINE_integer("network_dim", None, "Input dimension d of the network section's "
                       "two-layer network (default 10000, quick 1000).", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer("network_hidden", None, "Hidden units K of that network (default "
                       "1000: about 1e7 parameters; quick 100).", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer("network_batch_size", None, "Global batch of the network section "
                       "(default 64).", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("network_repeats", None, "Timed steps per row of the network "
                       "section (default 3, quick 2).", lower_bound=1, flag_values=fv)
  flags.DEFINE_list(
      "network_compressors", None, "Registry names of the network section (default: all; "
      "the float32 psum row always runs).", flag_values=fv)
  flags.DEFINE_bool(
      "keep_freed_memory", True, "Let malloc keep freed blocks of up to 1 GiB for reuse "
      "(benchmarks.common.keep_freed_memory), so that a call on a large array does not "
      "fault in fresh pages for its outputs; --nokeep_freed_memory keeps glibc's default.",
      flag_values=fv)
  flags.DEFINE_bool(
      "huge_pages", True, "Start again with GLIBC_TUNABLES=glibc.malloc.hugetlb=1, so that "
      "XLA's buffers get transparent huge pages as NumPy's roofline arrays do "
      "(benchmarks.common.rerun_with_huge_pages; no effect where glibc or the kernel "
      "cannot); --nohuge_pages keeps 4 KiB pages.", flag_values=fv)
  flags.DEFINE_integer("scale_dim", 1_000_000, "d of the scale section.", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer(
      "scale_batch_size", 256, "Global batch of the scale section (256 over 8 devices at "
      "d = 1e6: 1 GB of float32 inputs drawn per step).", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("scale_steps", None, "Timed steps of the scale section "
                       "(default 3, quick 1).", lower_bound=1, flag_values=fv)

  flags.register_validator(
      "sections", _check_sections,
      f"must be a comma-separated subset of {', '.join(settings.SECTIONS)}", flag_values=fv)
  for name in ("sweep_dims", "sweep_batches", "kernel_dims"):
    flags.register_validator(
        name, lambda v, n=name: v is None or _is_int_list(v, n),
        "must be a comma-separated list of positive integers (1e6 allowed)", flag_values=fv)


def _check_sections(values):
  return bool(values) and all(v in settings.SECTIONS for v in values)


def _is_int_list(text, name):
  try:
    common.int_list(text, name)
  except ValueError:
    return False
  return True


def settings_from_flags(flag_values: flags.FlagValues) -> settings.Settings:
  """The checked :class:`~benchmarks.step_throughput.settings.Settings` of the parsed flags.

  Every check of flags that do not fit together happens here, before any heavy work, so
  that a test can run it in-process.

  Args:
    flag_values: flags defined by :func:`define_flags` and parsed.

  Returns:
    The settings.

  Raises:
    SystemExit: with status 2 after one error line naming the flag (``common.fail``), for
      flags that do not fit together (a batch not divisible by ``--num_devices``, an
      unknown method or compressor, ``--num_samples`` below ``--batch_size``).

  Example:
    >>> values = flags.FlagValues()
    >>> define_flags(values)
    >>> _ = values(["benchmarks.step_throughput", "--quick"])
    >>> settings_from_flags(values).repeats
    3
  """
  fv = flag_values
  n_dev = fv.num_devices
  if fv.batch_size % n_dev:
    common.fail(f"flag --batch_size={fv.batch_size}: not divisible by "
                f"--num_devices={n_dev}")
  if fv.scale_batch_size % n_dev:
    common.fail(f"flag --scale_batch_size={fv.scale_batch_size}: not divisible by "
                f"--num_devices={n_dev}")
  unknown = [m for m in (fv.methods or []) if m not in settings.METHODS]
  if unknown:
    common.fail(f"flag --methods={','.join(fv.methods)}: {unknown[0]!r} is not a row of "
                f"METHODS ({', '.join(settings.METHODS)})")
  unknown = [c for c in (fv.kernel_compressors or []) if c not in compressors.REGISTRY]
  if unknown:
    common.fail(f"flag --kernel_compressors={','.join(fv.kernel_compressors)}: "
                f"{unknown[0]!r} is not in jrelu.compressors.REGISTRY "
                f"({', '.join(compressors.REGISTRY)})")
  unknown = [c for c in (fv.network_compressors or []) if c not in compressors.REGISTRY]
  if unknown:
    common.fail(f"flag --network_compressors={','.join(fv.network_compressors)}: "
                f"{unknown[0]!r} is not in jrelu.compressors.REGISTRY "
                f"({', '.join(compressors.REGISTRY)})")
  if fv.network_batch_size is not None and fv.network_batch_size % n_dev:
    common.fail(f"flag --network_batch_size={fv.network_batch_size}: not divisible by "
                f"--num_devices={n_dev}")
  if fv.kernel_baseline is not None and not os.path.isdir(
      os.path.join(fv.kernel_baseline, "jrelu")):
    common.fail(f"flag --kernel_baseline={fv.kernel_baseline}: no jrelu package there")
  num_samples = fv.num_samples
  if num_samples is not None and num_samples < fv.batch_size:
    common.fail(f"flag --num_samples={num_samples}: smaller than "
                f"--batch_size={fv.batch_size}")
  return settings.Settings.make(
      fv.quick, outdir=fv.outdir,
      sections=tuple(s for s in settings.SECTIONS if s in fv.sections),
      skip_torch=fv.skip_torch, num_devices=n_dev, dim=fv.dim,
      batch_size=fv.batch_size, num_samples=num_samples, repeats=fv.repeats,
      steps_per_chunk=fv.steps_per_chunk,
      methods=fv.methods and tuple(fv.methods), sweep_method=fv.sweep_method,
      sweep_dims=fv.sweep_dims, sweep_batches=fv.sweep_batches,
      kernel_dims=fv.kernel_dims,
      kernel_compressors=fv.kernel_compressors and tuple(fv.kernel_compressors),
      kernel_baseline=fv.kernel_baseline, network_dim=fv.network_dim, network_hidden=fv.network_hidden,
      network_batch_size=fv.network_batch_size, network_repeats=fv.network_repeats,
      network_compressors=fv.network_compressors and tuple(fv.network_compressors),
      scale_dim=fv.scale_dim, scale_batch_size=fv.scale_batch_size,
      scale_steps=fv.scale_steps)


def main(argv):
  """absl main: flags -> settings -> :func:`benchmark.run` (or the scale child); one JSON line."""
  del argv
  s = settings_from_flags(flags.FLAGS)
  if flags.FLAGS.huge_pages:
    common.rerun_with_huge_pages()  # returns only where it does not start again
  if flags.FLAGS.keep_freed_memory:
    common.keep_freed_memory()
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
  define_flags(flags.FLAGS)
  common.run_main(main, PROG)
