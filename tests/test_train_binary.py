"""``python -m jrelu.train`` end to end: a small run, its files, and every bad input."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = ["--dim=50", "--num_samples=400", "--batch_size=128", "--learning_rate=0.4",
         "--num_steps=600"]


def train(*flags, cwd):
  env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-m", "jrelu.train", *flags], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def error_lines(result):
  return [l for l in result.stderr.splitlines() if l.startswith("jrelu.train: error:")]


@pytest.mark.parametrize("compressor_flags", [["--compressor=none"],
                                              ["--compressor=qsgd", "--num_levels=2"]])
def test_small_run_reaches_target_and_writes_files(tmp_path, compressor_flags):
  result = train(*SMALL, *compressor_flags, f"--workdir={tmp_path}", cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert "relative_error" in result.stderr  # progress is logged while it runs
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["status"] == "reached_target"
  assert summary["relative_error"] <= 1e-6
  assert summary["steps_to_target"] is not None
  assert summary["steps_to_target"] <= summary["steps"] <= 600
  assert summary["num_devices"] == 8 and summary["backend"] == "cpu"
  assert summary["wire_bits_per_step_per_device"] == summary[
      "predicted_wire_bits_per_step_per_device"]
  assert summary["float32_wire_bits"] == 2 * 7 / 8 * 32 * 50
  for key in ("compressor_wire_bits", "steps_per_second", "compile_seconds", "seed",
              "jax_version", "aggregation", "parallel", "num_levels", "compressor"):
    assert summary[key] is not None, key
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == list(range(100, summary["steps"] + 1, 100))
  assert records[-1]["relative_error"] == summary["relative_error"]
  assert (tmp_path / "relative_error.png").stat().st_size > 0


def test_nan_stops_at_the_step_and_keeps_what_was_written(tmp_path):
  result = train(*SMALL, "--learning_rate=30", "--log_every=1", f"--workdir={tmp_path}",
                 cwd=tmp_path)
  assert result.returncode == 1
  assert "Traceback" not in result.stderr
  (line,) = error_lines(result)
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["status"] == "diverged"
  step = summary["diverged_at_step"]
  assert f"at step {step}" in line
  records = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(records) == step - 1 > 0


BAD_INPUTS = [
    (["--num_levels=0"], "--num_levels=0"),
    (["--batch_size=100", "--num_devices=8"], "--batch_size=100"),
    (["--batch_size=64", "--num_samples=32"], "--batch_size=64"),
    (["--compressor=zip"], "--compressor=zip"),
    (["--aggregation=ring"], "--aggregation=ring"),
    (["--parallel=vmap"], "--parallel=vmap"),
    (["--init=ones"], "--init=ones"),
    (["--dim=0"], "--dim=0"),
    (["--num_samples=0"], "--num_samples=0"),
    (["--learning_rate=0"], "--learning_rate=0"),
    (["--learning_rate=-1"], "--learning_rate=-1"),
    (["--num_devices=0"], "--num_devices=0"),
    (["--num_devices=100000"], "--num_devices=100000"),
    (["--workdir={file}/sub"], "--workdir="),
    (["--bogus=1"], "bogus"),
    (["--k=10"], "--k applies to --compressor=top_k or rand_k"),
    (["--compressor=sign", "--num_levels=2"], "--num_levels applies to --compressor=qsgd"),
    (["--compressor=top_k", "--k=0"], "--compressor=top_k"),
    (["--compressor=rand_k", "--k=5", "--fraction=0.1"], "--compressor=rand_k"),
    (["--compressor=atomo", "--budget=0"], "--compressor=atomo"),
    (["--compressor=terngrad", "--clip_factor=-1"], "--compressor=terngrad"),
    (["--aggregation=majority_vote"], "--aggregation=majority_vote"),
    (["--compressor=top_k", "--aggregation=integer_psum"], "--aggregation=integer_psum"),
    (["--momentum=1"], "--momentum"),
    (["--lr_schedule=cosine"], "--lr_schedule=cosine"),
]


@pytest.mark.parametrize("flags,named", BAD_INPUTS, ids=[b[1] for b in BAD_INPUTS])
def test_bad_input_prints_one_line_and_exits_nonzero(tmp_path, flags, named):
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  flags = [f.format(file=a_file) for f in flags]
  if not any(f.startswith("--workdir") for f in flags):
    flags.append(f"--workdir={tmp_path / 'run'}")
  result = train(*flags, "--num_steps=1", cwd=tmp_path)
  assert result.returncode == 2
  assert "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == error_lines(result)[0]
  (line,) = error_lines(result)
  assert named in line


def test_last_chunk_may_be_shorter_and_target_zero_never_stops(tmp_path):
  import jax
  from jrelu import train as train_lib
  config = train_lib.Config(dim=20, num_samples=100, batch_size=16, num_steps=25,
                            log_every=10, learning_rate=0.1, target_relative_error=0,
                            workdir=str(tmp_path))
  summary = train_lib.train(config, jax.devices()[:8])
  assert (summary["status"], summary["steps"], summary["steps_to_target"]) == (
      "finished", 25, None)
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [10, 20, 25]
  assert records[-1]["relative_error"] < summary["initial_relative_error"] == 1.0
  assert records[-1]["cumulative_wire_bits_per_device"] == (
      25 * summary["wire_bits_per_step_per_device"])
