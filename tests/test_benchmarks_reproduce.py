"""Smoke test of ``python -m benchmarks.reproduce``: tiny settings, one JSON line, its fields.

Not a timed test: it only checks that every section runs end to end and reports what the
benchmark promises, plus the one-line errors for bad flags. The bad-flag table runs
in-process through the binary's own flag definitions, parser, checks and error lines
(``define_flags``, ``common.parse_flags``, ``settings_from_flags``); one of its rows also
runs the real binary, to show that what reaches a user is one line and exit status 2.
"""

import json
import pathlib

import pytest

from benchmarks.reproduce import __main__ as binary
from benchmarks.reproduce import settings
from jrelu import experiment

import helpers

MODULE = "benchmarks.reproduce"
TINY = ["--quick", "--phase_dims=6", "--phase_ratios=2,5", "--phase_trials=2",
        "--phase_iters=100", "--dim=20", "--num_samples=160", "--batch_size=32",
        "--num_steps=300", "--methods=sgd,qsgd_s4", "--learning_rates=0.4",
        "--timing_steps=20", "--num_devices=2"]


def run(*flags, cwd):
  return helpers.run_module(MODULE, *flags, cwd=cwd)


def test_tiny_run_prints_one_json_line_with_every_section(tmp_path):
  out = helpers.run_benchmark(MODULE, *TINY, f"--outdir={tmp_path}", cwd=tmp_path)
  for key in ("jax_version", "backend", "device_count", "cpu_model", "cpu_cores",
              "num_devices", "quick", "sections", "seed", "runtime_seconds",
              "section_seconds", "summary_md", "plots", "training"):
    assert key in out, key
  assert out["benchmark"] == "reproduce"
  assert out["sections"] == ["phase_transition", "convergence", "bits_to_accuracy",
                             "communication"]

  phase = out["phase_transition"]
  assert phase["n_over_d"] == [2.0, 5.0]
  for method in ("gd", "sgd"):
    success = phase["success_probability"][method]["6"]
    assert len(success) == 2 and all(0 <= p <= 1 for p in success)
    assert "6" in phase["threshold_n_over_d"][method]

  conv = out["convergence"]["methods"]
  assert set(conv) == {"sgd", "qsgd_s4"}
  for row in conv.values():
    assert row["best_learning_rate"] == 0.4
    assert row["steps_to_target"] is not None
    assert row["grid"][0]["status"] == "reached_target"
    assert (row["grid"][0]["wire_bits_per_step_per_device"]
            == row["grid"][0]["predicted_wire_bits_per_step_per_device"])

  bits = out["bits_to_accuracy"]
  assert bits["methods"]["sgd"]["times_fewer_bits_than_float32"] == 1.0
  assert bits["headline"]["method"] == "qsgd_s4"
  assert bits["headline"]["times_fewer_bits_than_float32"] > 1

  comm = out["communication"]
  assert comm["worker_counts"] == [8, 16, 32]  # those dividing the global batch of 32
  assert set(comm["seconds_to_target"]) == {"1", "10", "100"}
  for bw in comm["seconds_to_target"].values():
    for seconds in bw.values():
      assert len(seconds) == 3 and all(s > 0 for s in seconds)
  assert all(c > 0 for c in comm["compute_seconds_per_step"]["qsgd_s4"])

  summary = pathlib.Path(out["summary_md"]).read_text()
  for heading in ("## Phase transition", "## Convergence and bits to accuracy",
                  "## Projected time to 1e-6"):
    assert heading in summary
  assert {pathlib.Path(p).name for p in out["plots"]} == {
      "phase_transition.png", "convergence.png", "bits_to_accuracy.png",
      "communication_model.png"}
  for p in out["plots"]:
    assert pathlib.Path(p).stat().st_size > 0
  assert json.loads((tmp_path / "results.json").read_text())["seed"] == out["seed"]


def check(values):
  """The binary's checks before any heavy work, at the device count it gets on CPU.

  ``common.setup_devices`` gives ``--num_devices`` devices, or 8 simulated ones.
  """
  return binary.settings_from_flags(values, values.num_devices or 8)


# (flags, text the one error line must contain). The row in SUBPROCESS also runs the real
# binary.
BAD_FLAGS = [
    (["--sections=phase_transition,bogus"], "--sections"),
    (["--phase_ratios=1,x"], "--phase_ratios"),
    (["--phase_dims=0"], "--phase_dims"),
    (["--methods=qsgd_s3"], "--methods"),
    (["--learning_rates=0.5,-1"], "--learning_rates"),
    (["--learning_rate=0.1"], "learning_rate"),  # a jrelu.train flag, not one of its own
    (["--alpha_seconds=-1"], "--alpha_seconds"),
    (["--bandwidths_gbps=10,0"], "--bandwidths_gbps"),
    (["--timing_steps=5"], "--timing_steps"),
    (["--outdir="], "--outdir"),
    (["--batch_size=5000"], "--batch_size"),  # larger than --num_samples
    (["--batch_size=36"], "--batch_size=36: not divisible by --num_devices=8"),
    (["--num_devices=2", "--batch_size=33"], "not divisible by --num_devices=2"),
    (["extra"], "unexpected arguments ['extra']"),
]
SUBPROCESS = "--batch_size=5000"


@pytest.mark.parametrize("argv, named", BAD_FLAGS, ids=[" ".join(b[0]) for b in BAD_FLAGS])
def test_bad_flag_is_one_line_without_traceback(tmp_path, argv, named):
  status, stderr = helpers.benchmark_flag_error(binary, argv, check)
  assert status == 2
  (line,) = stderr.splitlines()
  assert line.startswith("benchmarks.reproduce: error: ") and named in line, line
  if argv == [SUBPROCESS]:
    helpers.assert_one_error_line(run(*argv, f"--outdir={tmp_path}", cwd=tmp_path), line)


def test_flags_give_the_settings_of_the_modes():
  # No training section: a batch that 8 devices do not divide is no error.
  full = binary.settings_from_flags(
      helpers.benchmark_flags(binary, "--batch_size=36", "--sections=phase_transition"), 8)
  assert full.sections == ("phase_transition",) and not full.quick
  assert full.base == experiment.Config(batch_size=36, num_steps=settings.FULL["num_steps"])
  assert (full.phase_dims, full.methods) == (settings.FULL["phase_dims"], tuple(settings.METHODS))
  tiny = binary.settings_from_flags(helpers.benchmark_flags(binary, *TINY), 2)
  assert tiny.quick and tiny.sections == settings.SECTIONS
  assert (tiny.phase_dims, tiny.phase_ratios, tiny.methods) == ((6,), (2.0, 5.0),
                                                                ("sgd", "qsgd_s4"))
  assert tiny.base.num_devices == 2 and tiny.base.num_steps == 300
