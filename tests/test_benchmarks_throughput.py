"""Smoke test of ``python -m benchmarks.step_throughput``: tiny settings, one JSON line.

Not a timed test: it checks that every section runs end to end (PyTorch peers skipped) and
reports what the benchmark promises, and that bad flags give one line and exit status 2.
"""

import json
import pathlib

import pytest

import helpers

MODULE = "benchmarks.step_throughput"
# float32 rows only (a QSGD step takes seconds to compile); the scale section runs QSGD.
TINY = ["--quick", "--skip_torch", "--methods=none", "--sweep_method=none",
        "--num_devices=2", "--dim=16",
        "--batch_size=32", "--num_samples=256", "--repeats=1", "--steps_per_chunk=2",
        "--sweep_dims=16", "--sweep_batches=16,32", "--kernel_dims=64",
        "--kernel_compressors=none,qsgd",
        "--scale_dim=64", "--scale_batch_size=8", "--scale_steps=1"]


def run(*flags, cwd):
  return helpers.run_module(MODULE, *flags, cwd=cwd)


def test_tiny_run_prints_one_json_line_with_every_section(tmp_path):
  out = helpers.run_benchmark(MODULE, *TINY, f"--outdir={tmp_path}", cwd=tmp_path)
  for key in ("jax_version", "backend", "device_count", "cpu_model", "cpu_cores",
              "llc_bytes", "config", "methods", "roofline", "step", "torch", "ratios",
              "targets", "sweep", "kernels", "scale", "plots", "summary_md",
              "runtime_seconds", "section_seconds"):
    assert key in out, key
  assert out["benchmark"] == "step_throughput"
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

  scale = out["scale"]
  assert scale["dim"] == 64 and scale["steps_per_second"]["median"] > 0, scale
  assert scale["method"] == "qsgd" and scale["num_devices"] == 2
  assert scale["peak_rss_bytes"] > 0 and scale["wire_bits_per_step_per_device"] > 0

  summary = pathlib.Path(out["summary_md"]).read_text()
  for heading in ("## jrelu training step", "## Scaling",
                  "## Compressor kernels", "## Scale"):
    assert heading in summary
  assert {pathlib.Path(p).name for p in out["plots"]} == {
      "steps_per_second.png", "scaling.png", "kernels.png"}
  assert json.loads((tmp_path / "results.json").read_text())["config"] == out["config"]


@pytest.mark.parametrize("flag, name", [
    ("--sections=step,bogus", "--sections"),
    ("--sweep_dims=8,x", "--sweep_dims"),
    ("--num_devices=0", "--num_devices"),
    ("--batch_size=30", "--batch_size"),           # not divisible by 8 devices
    ("--kernel_compressors=qsgd,zip", "--kernel_compressors"),
    ("--methods=qsgd,topk", "--methods"),
])
def test_bad_flag_is_one_line_without_traceback(tmp_path, flag, name):
  result = run(flag, f"--outdir={tmp_path}", cwd=tmp_path)
  assert result.returncode == 2, result.stderr
  assert result.stdout == ""
  assert "Traceback" not in result.stderr
  errors = [l for l in result.stderr.splitlines()
            if l.startswith("benchmarks.step_throughput: error:")]
  assert len(errors) == 1 and name in errors[0], result.stderr
