"""Smoke test of ``python -m benchmarks.step_throughput``: tiny settings, one JSON line.

Not a timed test: it checks that every section runs end to end (PyTorch peers skipped) and
reports what the benchmark promises, and that bad flags give one line and exit status 2.
The bad-flag table runs in-process through the binary's own flag definitions, parser,
checks and error lines (``define_flags``, ``common.parse_flags``, ``settings_from_flags``);
one of its rows also runs the real binary, to show what reaches a user.
"""

import json
import pathlib

from absl import flags
import pytest

from benchmarks import common
from benchmarks import compressors as compressors_binary
from benchmarks import processes as processes_binary
from benchmarks.real_data import __main__ as real_data_binary
from benchmarks.reproduce import __main__ as reproduce_binary
from benchmarks.step_throughput import __main__ as binary
from benchmarks.step_throughput import settings

import helpers

MODULE = "benchmarks.step_throughput"
# float32 rows only (a QSGD step takes seconds to compile); the scale section runs QSGD.
TINY = ["--quick", "--skip_torch", "--methods=none", "--sweep_method=none",
        "--num_devices=2", "--dim=16",
        "--batch_size=32", "--num_samples=256", "--repeats=1", "--steps_per_chunk=2",
        "--sweep_dims=16", "--sweep_batches=16,32", "--kernel_dims=64",
        "--kernel_compressors=none,qsgd", "--network_dim=16", "--network_hidden=2",
        "--network_batch_size=8", "--network_compressors=none", "--network_repeats=1",
        "--scale_dim=64", "--scale_batch_size=8", "--scale_steps=1"]


def run(*flags, cwd):
  return helpers.run_module(MODULE, *flags, cwd=cwd)


def test_tiny_run_prints_one_json_line_with_every_section(tmp_path):
  out = helpers.run_benchmark(MODULE, *TINY, f"--outdir={tmp_path}", cwd=tmp_path)
  for key in ("jax_version", "backend", "device_count", "cpu_model", "cpu_cores",
              "llc_bytes", "config", "methods", "roofline", "step", "torch", "ratios",
              "targets", "sweep", "kernels", "network", "scale", "plots", "summary_md",
              "runtime_seconds", "section_seconds"):
    assert key in out, key
  assert out["benchmark"] == "step_throughput"
  assert out["keeps_freed_memory"] is True  # the flag's default, applied (glibc's mallopt)
  # --huge_pages (default) started the binary again with malloc asking for huge pages,
  # wherever glibc and the kernel can give them.
  assert out["malloc_huge_pages"] is common.malloc_asks_for_huge_pages(
      {"GLIBC_TUNABLES": common.HUGE_PAGES_TUNABLE})
  assert out["transparent_huge_pages"] == common.transparent_huge_pages()
  assert out["torch"] == {"skipped": "--skip_torch"} and out["ratios"] == []
  assert out["roofline"]["seconds"] > 0 and out["roofline"]["array_bytes"] >= out["llc_bytes"]

  step = out["step"]
  assert {(r["method"], r["num_devices"], r["path"]) for r in step} == {
      ("none", n, p) for n in (1, 2) for p in ("vmap", "pmap")}
  for r in step:
    assert r["steps_per_second"]["median"] > 0 and r["roofline_ratio"] > 0
    # One all-reduce per step for float32 SGD under pmap; vmap runs no collective.
    assert r.get("collectives_per_step") == (
        1 if (r["path"], r["num_devices"]) == ("pmap", 2) else None), r
  assert out["rendezvous"]["num_devices"] == 2
  assert out["rendezvous"]["seconds"]["median"] > 0
  assert out["targets"]["method"] == "qsgd" and out["targets"]["num_devices"] == 2

  sweep = out["sweep"]
  assert [p["dim"] for p in sweep["dim"]] == [16]
  assert [p["batch_size"] for p in sweep["batch"]] == [16, 32]
  assert sweep["method"] == "none" and sweep["dim"][0]["roofline_ratio"] > 0
  assert sweep["batch_exponent"] is not None

  kernels = out["kernels"]["compressors"]
  assert set(kernels) == {"none", "qsgd"}
  assert kernels["qsgd"][0]["dim"] == 64 and kernels["qsgd"][0]["gbytes_per_second"] > 0

  network = out["network"]
  assert [r["method"] for r in network["rows"]] == ["psum", "none"]
  assert network["parameters"] == 2 * 16 + 2 * 2 and network["num_devices"] == 2
  for r in network["rows"]:
    assert r["step_seconds"]["median"] > 0 and r["wire_bits_per_step_per_device"] > 0, r
  assert network["rows"][0]["compression_share"] == 0

  scale = out["scale"]
  assert scale["dim"] == 64 and scale["steps_per_second"]["median"] > 0, scale
  assert scale["method"] == "qsgd" and scale["num_devices"] == 2
  assert scale["peak_rss_bytes"] > 0 and scale["wire_bits_per_step_per_device"] > 0

  summary = pathlib.Path(out["summary_md"]).read_text()
  for heading in ("## jrelu training step", "## Scaling",
                  "## Compressor kernels", "## Training step of the two-layer network",
                  "## Scale"):
    assert heading in summary
  assert {pathlib.Path(p).name for p in out["plots"]} == {
      "steps_per_second.png", "scaling.png", "kernels.png"}
  assert json.loads((tmp_path / "results.json").read_text())["config"] == out["config"]


# (flags, text the one error line must contain). The row in SUBPROCESS also runs the real
# binary.
BAD_FLAGS = [
    (["--sections=step,bogus"], "--sections"),
    (["--sweep_dims=8,x"], "--sweep_dims"),
    (["--kernel_dims=1e3,0"], "--kernel_dims"),
    (["--num_devices=0"], "--num_devices"),
    (["--sweep_method=topk"], "--sweep_method"),
    (["--batch_size=30"], "--batch_size=30: not divisible by --num_devices=8"),
    (["--scale_batch_size=12"], "--scale_batch_size=12: not divisible by --num_devices=8"),
    (["--num_samples=1024"], "--num_samples=1024: smaller than --batch_size=4096"),
    (["--kernel_compressors=qsgd,zip"], "--kernel_compressors"),
    (["--network_compressors=zip"], "--network_compressors"),
    (["--kernel_baseline=/nonexistent"], "--kernel_baseline"),
    (["--methods=qsgd,topk"], "--methods"),
    (["extra"], "unexpected arguments ['extra']"),
]
SUBPROCESS = "--batch_size=30"


@pytest.mark.parametrize("argv, named", BAD_FLAGS, ids=[" ".join(b[0]) for b in BAD_FLAGS])
def test_bad_flag_is_one_line_without_traceback(tmp_path, argv, named):
  status, stderr = helpers.benchmark_flag_error(binary, argv, binary.settings_from_flags)
  assert status == 2
  (line,) = stderr.splitlines()
  assert line.startswith("benchmarks.step_throughput: error: ") and named in line, line
  if argv == [SUBPROCESS]:
    helpers.assert_one_error_line(run(*argv, f"--outdir={tmp_path}", cwd=tmp_path), line)


def test_flags_give_the_settings_of_the_modes():
  tiny = binary.settings_from_flags(helpers.benchmark_flags(binary, *TINY))
  assert tiny.quick and tiny.sections == settings.SECTIONS
  assert (tiny.num_devices, tiny.dim, tiny.batch_size, tiny.num_samples) == (2, 16, 32, 256)
  assert (tiny.sweep_dims, tiny.sweep_batches, tiny.kernel_dims) == ((16,), (16, 32), (64,))
  assert tiny.methods == ("none",) and tiny.kernel_compressors == ("none", "qsgd")
  assert (tiny.network_dim, tiny.network_hidden, tiny.network_compressors) == (16, 2, ("none",))
  assert tiny.kernel_baseline is None
  full = binary.settings_from_flags(helpers.benchmark_flags(binary))
  assert not full.quick and full.repeats == settings.FULL["repeats"]
  assert full.kernel_dims == (1000, 10_000, 100_000, 1_000_000, 10_000_000)
  assert (full.network_dim, full.network_hidden) == (10_000, 1000)  # about 1e7 parameters


def test_the_binaries_import_into_one_process_and_define_flags_only_when_asked():
  # Their flag names overlap (--outdir, --quick, --sections; --seed with jrelu.train).
  for module in (binary, reproduce_binary, compressors_binary, processes_binary,
                 real_data_binary):
    values = helpers.benchmark_flags(module)
    assert values.outdir == f"runs/{module.PROG.split('.')[1]}"
  assert "outdir" not in flags.FLAGS


def test_processes_binary_runs_valid_jrelu_train_flags():
  # benchmarks.processes only launches jrelu.train; its runs' flags parse into a Config.
  from jrelu import train  # pylint: disable=g-import-not-at-top
  values = helpers.benchmark_flags(processes_binary, "--num_steps=10", "--dim=100")
  argv = processes_binary.train_flags(values, "runs/x", 8)
  parsed = flags.FlagValues()
  train.define_config_flags(parsed)
  for name in ("workdir", "checkpoint_every"):
    flags.DEFINE_string(name, None, "", flag_values=parsed)
  flags.DEFINE_bool("fresh", False, "", flag_values=parsed)
  parsed(["jrelu.train", *argv])
  config = train.config_from_flags(parsed)
  assert (config.num_steps, config.dim, config.num_devices) == (10, 100, 8)
  row = {"processes": 2, "devices_per_process": 4, "steps_per_second": 40.0,
         "ms_per_step": 25.0, "wire_bits_per_step_per_device_by_process": [7616.0] * 2,
         "relative_error": 1e-5}
  assert processes_binary.markdown([row]).splitlines()[-1] == (
      "| 2 x 4 | 40 | 25.00 | 7616, 7616 | 1.000e-05 |")
