"""``python -m jrelu.train``: a few runs of the real binary, and every bad flag in-process.

The bad-flag table goes through the binary's own flag definitions, parser and error
formatting (``train.define_config_flags``, ``train.config_from_flags``, ``train.as_flags``)
in this process; three of its rows also run as subprocesses, to show that what reaches a
user is one line on stderr and exit status 2, never a traceback.

One test stops the real binary twice, with SIGINT (exit 130, a checkpoint, "interrupted")
and with ``kill -9``, and checks that the resumed run equals a run never stopped.
"""

import json
import signal
import subprocess
import sys
import time

from absl import flags
import jax
import pytest

from jrelu import experiment
from jrelu import train

import helpers

SMALL = ["--dim=50", "--num_samples=400", "--batch_size=128", "--learning_rate=0.4",
         "--num_steps=600"]


def run_binary(*argv, cwd):
  return subprocess.run([sys.executable, "-m", "jrelu.train", *argv], cwd=cwd,
                        env=helpers.subprocess_env(),
                        capture_output=True, text=True, timeout=300)


def error_lines(result):
  return [l for l in result.stderr.splitlines() if l.startswith("jrelu.train: error:")]


def test_small_run_reaches_target_and_writes_files(tmp_path):
  result = run_binary(*SMALL, "--num_levels=2", f"--workdir={tmp_path}", cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert "relative_error" in result.stderr  # progress is logged while it runs
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["status"] == "reached_target"
  assert summary["relative_error"] <= 1e-6
  assert summary["steps_to_target"] <= summary["steps"] <= 600
  assert summary["num_devices"] == 8 and summary["backend"] == "cpu"
  assert (summary["compressor"], summary["num_levels"], summary["norm"],
          summary["aggregation"]) == ("qsgd", 2, "max", "two_phase")  # resolved defaults
  assert summary["wire_bits_per_step_per_device"] == summary[
      "predicted_wire_bits_per_step_per_device"]
  assert summary["float32_wire_bits"] == 2 * 7 / 8 * 32 * 50
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == list(range(100, summary["steps"] + 1, 100))
  assert records[-1]["relative_error"] == summary["relative_error"]
  assert (tmp_path / "relative_error.png").stat().st_size > 0


def test_nan_stops_at_the_step_and_keeps_what_was_written(tmp_path):
  result = run_binary(*SMALL, "--learning_rate=30", "--log_every=1", f"--workdir={tmp_path}",
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


# (flags, text the one error line must contain). Rows marked SUBPROCESS also run the
# real binary.
BAD_INPUTS = [
    (["--num_levels=0"], "--num_levels=0"),
    (["--batch_size=100", "--num_devices=8"], "--batch_size=100"),
    (["--batch_size=64", "--num_samples=32"], "--batch_size=64"),
    (["--compressor=zip"], "--compressor"),
    (["--aggregation=ring"], "--aggregation"),
    (["--parallel=vmap"], "--parallel"),
    (["--init=ones"], "--init"),
    (["--dim=0"], "--dim=0"),
    (["--num_samples=0"], "--num_samples=0"),
    (["--learning_rate=0"], "--learning_rate=0"),
    (["--learning_rate=-1"], "--learning_rate=-1"),
    (["--learning_rate=nan"], "--learning_rate=nan"),
    (["--num_devices=0"], "--num_devices=0"),
    (["--num_devices=100000"], "--num_devices=100000"),
    (["--workdir={file}/sub"], "--workdir="),
    (["--k=10"], "--k=10 has no effect with --compressor='qsgd'"),
    (["--compressor=sign", "--num_levels=2"],
     "--num_levels=2 has no effect with --compressor='sign' (it applies to --compressor='qsgd')"),
    (["--compressor=powersgd", "--aggregation=psum"],
     "--aggregation='psum' has no effect with --compressor='powersgd'"),
    (["--compressor=powersgd", "--error_feedback"],
     "--error_feedback=True has no effect with --compressor='powersgd'"),
    (["--decay_rate=0.3"], "--decay_rate=0.3 has no effect with --lr_schedule='constant'"),
    (["--lr_schedule=inverse_sqrt", "--decay_rate=0.3"],
     "--decay_rate=0.3 has no effect with --lr_schedule='inverse_sqrt'"),
    (["--compressor=top_k", "--k=0"], "--k=0"),
    (["--compressor=rand_k", "--k=5", "--fraction=0.1"], "--k=5 and --fraction=0.1 both"),
    (["--compressor=atomo", "--budget=0"], "--budget=0"),
    (["--compressor=terngrad", "--clip_factor=-1"], "--clip_factor=-1"),
    (["--aggregation=majority_vote"], "--aggregation"),
    (["--compressor=top_k", "--aggregation=integer_psum"], "--aggregation"),
    (["--momentum=1"], "--momentum=1"),
    # EASGD, EAMSGD, DOWNPOUR: their settings with the algorithms that use them.
    (["--tau=4"], "--tau=4 has no effect with --algorithm='sgd' (it applies to "
     "--algorithm='easgd' or 'eamsgd' or 'downpour')"),
    (["--algorithm=downpour", "--alpha=0.1"],
     "--alpha=0.1 has no effect with --algorithm='downpour'"),
    (["--algorithm=easgd", "--momentum=0.9"],
     "--momentum=0.9 has no effect with --algorithm='easgd' (it applies to "
     "--algorithm='sgd' or 'eamsgd')"),
    (["--algorithm=easgd", "--exchange=round_robin"],
     "--compressor='qsgd' does not work with --exchange='round_robin'"),
    (["--algorithm=eamsgd", "--tau=0"], "--tau=0"),
    (["--algorithm=easgd", "--alpha=0"], "--alpha=0"),
    (["--algorithm=adam"], "--algorithm"),
    (["--lr_schedule=cosine"], "--lr_schedule"),
    (["--step_size=line"], "--step_size"),
    (["--armijo_scale=0.25"], "--armijo_scale=0.25 has no effect with --step_size='fixed' "
     "(it applies to --step_size='armijo')"),
    (["--step_size=armijo", "--learning_rate=0.1"], "--learning_rate=0.1 has no effect "
     "with --step_size='armijo' (it applies to --step_size='fixed')"),
    (["--step_size=armijo", "--lr_schedule=exponential"], "--lr_schedule='exponential' has "
     "no effect with --step_size='armijo'"),
    (["--step_size=armijo", "--armijo_slope_rtol=1"], "--armijo_slope_rtol=1.0"),
    (["--step_size=armijo", "--armijo_max_trials=0"], "--armijo_max_trials=0"),
    # Bounded by what the code represents, the reason in the line.
    (["--seed=4294967296"], "--seed=4294967296: must be an integer in [0, 4294967295] "
     "(jax.random.key takes a 32-bit seed)"),
    (["--seed=-1"], "--seed=-1"),
    (["--num_levels=16777217"], "--num_levels=16777217: must be None or an integer in "
     "[1, 16777216] (float32 must represent every level 0..s exactly)"),
    (["--num_levels=1000000000000"], "--num_levels=1000000000000"),
    (["--compressor=atomo", "--budget=2147483648"], "--budget=2147483648"),
    (["--log_every=2147483648"], "--log_every=2147483648"),
    (["--target_relative_error=inf"], "--target_relative_error=inf"),
    (["--learning_rate=1e39"], "--learning_rate=1e+39"),
    (["--compressor=fo_sgd", "--dither_scale=inf"], "--dither_scale=inf"),
    # Memory: refused before allocating, with the estimate and what is available.
    (["--dim=100000000"], "--dim=100000000, --num_samples=4000, --batch_size=1024 on 8 "
     "devices need about"),
]
SUBPROCESS = {"--num_levels=0", "--workdir=", "--k=10 has no effect with --compressor='qsgd'"}


def test_unusable_jax_platforms_gives_one_line(tmp_path):
  # JAX reads JAX_PLATFORMS when it starts, so this needs a process of its own.
  env = helpers.subprocess_env(JAX_PLATFORMS="bogus")
  result = subprocess.run([sys.executable, "-m", "jrelu.train", *SMALL, "--num_steps=1",
                           f"--workdir={tmp_path}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and "Traceback" not in result.stderr
  (line,) = result.stderr.strip().splitlines()
  assert line.startswith("jrelu.train: error: JAX_PLATFORMS='bogus': JAX cannot start"), line


def test_memory_estimate():
  # Each device holds its segment of the data set, 4 bytes x num_samples / N x (dim + 1),
  # its batch twice, a sampler permutation and 9 parameter-sized vectors; the host holds
  # w_star.
  config = experiment.Config(dim=1000, num_samples=4000, batch_size=1024)
  segment = 4 * 500 * 1001
  assert experiment.estimate_memory_bytes(config, 8) == {
      "host_bytes": 4 * 1000,
      "per_device_bytes": segment + 2 * 4 * 128 * 1000 + 4 * 4000 + 9 * 4 * 1000}
  have = experiment.available_memory_bytes()
  assert have["host_bytes"] > 0 and have["device_bytes"] is None


def error_line(argv, tmp_path) -> str:
  """The one line the binary prints for ``argv``, produced in this process."""
  values = flags.FlagValues()
  workdir = flags.DEFINE_string("workdir", str(tmp_path / "run"), "", flag_values=values)
  train.define_config_flags(values)
  try:
    values(["jrelu.train", *argv, "--num_steps=1"])
  except flags.Error as e:
    return str(e).splitlines()[0]
  try:
    experiment.run(train.config_from_flags(values), workdir.value)
  except experiment.ConfigError as e:
    return train.as_flags(str(e))
  raise AssertionError(f"{argv} was accepted")


@pytest.mark.parametrize("argv,named", BAD_INPUTS, ids=[b[1][:40] for b in BAD_INPUTS])
def test_bad_input_gives_one_line_naming_the_flag(tmp_path, argv, named):
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  argv = [f.format(file=a_file) for f in argv]
  line = error_line(argv, tmp_path)
  assert "\n" not in line and named in line, line
  if named in SUBPROCESS:
    if not any(f.startswith("--workdir") for f in argv):
      argv.append(f"--workdir={tmp_path / 'run'}")
    result = run_binary(*argv, "--num_steps=1", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == error_lines(result) == [
        f"jrelu.train: error: {line}"]


def test_every_config_field_is_a_flag_with_its_default():
  values = flags.FlagValues()
  train.define_config_flags(values)
  values(["jrelu.train"])
  assert train.config_from_flags(values) == experiment.Config()


# Long enough (40 chunks, a checkpoint every 5) that a signal lands mid-run.
RESUMABLE = dict(dim=20, num_samples=400, batch_size=64, learning_rate=0.1,
                 num_steps=400, log_every=10, target_relative_error=0.0)


def logged_step(workdir) -> int:
  """The last step in metrics.jsonl (a partly written last line is skipped)."""
  try:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
  except FileNotFoundError:
    return 0
  for line in reversed(lines):
    try:
      return json.loads(line)["step"]
    except ValueError:
      continue
  return 0


def start_binary(workdir):
  argv = [f"--{k}={v}" for k, v in RESUMABLE.items()]
  # The suite's compilation cache: the resumed process compiles what the first one did.
  return subprocess.Popen(
      [sys.executable, "-m", "jrelu.train", *argv, "--checkpoint_every=50",
       f"--workdir={workdir}"], cwd=workdir.parent, env=helpers.subprocess_env(),
      stderr=subprocess.PIPE, text=True)


def signal_at(process, workdir, step, signum):
  """Sends ``signum`` once metrics.jsonl reaches ``step``; returns (exit status, stderr)."""
  deadline = time.monotonic() + 240
  while logged_step(workdir) < step and process.poll() is None:
    assert time.monotonic() < deadline, "the run never reached the step"
    time.sleep(0.05)
  process.send_signal(signum)
  _, stderr = process.communicate(timeout=240)
  return process.returncode, stderr


def test_sigint_then_kill_9_then_resume_ends_bit_identical(tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  workdir.mkdir()
  # SIGINT: the chunk ends, a checkpoint is written, one line, exit 130.
  status, stderr = signal_at(start_binary(workdir), workdir, 50, signal.SIGINT)
  assert status == 130 and "Traceback" not in stderr, stderr
  (line,) = [l for l in stderr.splitlines() if l.startswith("jrelu.train: error:")]
  summary = json.loads((workdir / "summary.json").read_text())
  step = summary["steps"]
  assert summary["status"] == "interrupted" and summary["signal"] == "SIGINT"
  assert summary["checkpoint_step"] == summary["interrupted_at_step"] == step >= 50
  assert f"interrupted by SIGINT at step {step} of 400" in line
  assert logged_step(workdir) == step
  # Resumed, then kill -9 at whatever it is doing (a chunk, a metrics line, a checkpoint).
  status, _ = signal_at(start_binary(workdir), workdir, step + 100, signal.SIGKILL)
  assert status == -signal.SIGKILL
  monkeypatch.setattr(experiment.loop, "_plot", lambda *args: None)  # not compared; ~2 s a run
  # Resumed again, here in process, to the end; and a run never stopped.
  config = experiment.Config(**RESUMABLE)
  devices = jax.devices()[:8]
  experiment.run(config, str(workdir), devices=devices, checkpoint_every=50)
  experiment.run(config, str(tmp_path / "straight"), devices=devices, checkpoint_every=50)
  helpers.assert_same_run(workdir, tmp_path / "straight")
