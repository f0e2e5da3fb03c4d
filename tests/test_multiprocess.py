"""Jobs of several processes on JAX's distributed runtime, launched for real on loopback.

One job of 2 processes x 4 CPU devices (``python -m jrelu.launch``) runs, in each
process, ``experiment.run`` three times (tests/multiprocess_worker.py): QSGD two_phase
under pmap, sign majority vote under shard_map, PowerSGD under pmap. Inside QSGD both
processes hold at step 6 (after the checkpoint of step 4) and the test kills process 1
with ``kill -9``: process 0 must say so in one line and exit within the bound, and the
launcher must exit non-zero. The same command, run again, resumes QSGD and runs the other
two. Each run is then compared with the same run in this process on 8 devices: bit for
bit (params, optax state, every metrics line, the wire bits) for QSGD two_phase and
majority vote, whose collectives only move data; PowerSGD's ``pmean`` adds 8 float32
numbers in another order under gloo than XLA's in-process all-reduce, so its numbers
agree to float32 rounding (bounded below).

The join failures (a coordinator that never comes up, processes started with different
``--num_processes``) and the loss of process 0 (which hosts JAX's coordination service)
run as short processes at once, with ``--process_timeout=3``.
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jrelu import experiment
from jrelu import launch

import helpers

pytestmark = pytest.mark.xdist_group("multiprocess")

REPO = pathlib.Path(__file__).resolve().parent.parent
WORKER = str(REPO / "tests" / "multiprocess_worker.py")
# test_resume.py's runs (dim 20, 100 samples, batch 16, chunks of 2 steps): the
# in-process references compile what that module compiles.
SMALL = dict(dim=20, num_samples=100, batch_size=16, learning_rate=0.1, num_steps=12,
             log_every=2, target_relative_error=0.0, num_devices=8)
RUNS = {  # the order the worker runs them in: QSGD, the one killed, first
    "qsgd": dict(SMALL, compressor="qsgd"),
    "sign": dict(SMALL, compressor="sign", aggregation="majority_vote",
                 learning_rate=0.01, parallel="shard_map"),
    "powersgd": dict(SMALL, compressor="powersgd"),
}
CHECKPOINT_EVERY = 4
HOLD_STEP = 6
TIMEOUT = 5  # --process_timeout of the job
# Beyond the timeout, what a loaded 2-core machine may add before process 0 is gone.
SLACK = 15


def start(argv):
  """A process of ``argv`` in the repository, the suite's environment, output piped."""
  return subprocess.Popen(argv, cwd=REPO, env=helpers.subprocess_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def launcher(args):
  return start([sys.executable, "-m", "jrelu.launch", *args])


def job_args(outdir, runs):
  return ["--num_processes=2", f"--program={WORKER}",
          f"--process_timeout={TIMEOUT}", "--", f"--outdir={outdir}",
          f"--runs={json.dumps(runs)}", f"--checkpoint_every={CHECKPOINT_EVERY}",
          f"--hold_file={outdir}/hold", "--hold_run=qsgd", f"--hold_step={HOLD_STEP}"]


def pids(lines):
  return {int(m.group(1)): int(m.group(2)) for l in lines
          if (m := re.match(r"\[jrelu.launch\] process (\d+) of \d+: pid (\d+)", l))}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
  """Runs the killed and the resumed job and the in-process references; their records."""
  out = tmp_path_factory.mktemp("job")
  first = launcher(job_args(out / "two", RUNS))
  lines = []
  for line in first.stdout:  # until both processes hold inside QSGD's step 6
    lines.append(line.rstrip("\n"))
    if sum(l.endswith(f"] holding at step {HOLD_STEP}") for l in lines) == 2:
      break
  else:
    pytest.fail("the job ended before holding:\n" + "\n".join(lines[-30:]) + first.stderr.read())
  killed_at = time.monotonic()
  os.kill(pids(lines)[1], signal.SIGKILL)
  rest, first_stderr = first.communicate(timeout=TIMEOUT + SLACK + 60)
  gone_after = time.monotonic() - killed_at
  lines += rest.splitlines()
  # The same command again.
  second = launcher(job_args(out / "two", RUNS))
  # The references, here: 8 devices of one process, XLA's own collectives.
  references = {}
  for name, kwargs in RUNS.items():
    references[name] = out / "ref" / name
    experiment.run(experiment.Config(**kwargs), str(references[name]),
                   devices=jax.devices()[:8], checkpoint_every=10**6)
  resumed_log, resumed_stderr = second.communicate(timeout=600)
  assert second.returncode == 0, resumed_log[-3000:] + resumed_stderr
  return dict(out=out, lines=lines, stderr=first_stderr, status=first.returncode,
              gone_after=gone_after, references=references, resumed_log=resumed_log)


@pytest.fixture(autouse=True, scope="module")
def no_plot():
  # The plot is no part of the records compared, and matplotlib costs ~1.7 s a run.
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(experiment.loop, "_plot", lambda *args: None)
    yield


def outcome(workdir):
  """run_outcome without the fields that name the layout of processes."""
  arrays, summary, lines = helpers.run_outcome(workdir)
  layout = {k: summary.pop(k) for k in ("num_processes",
                                        "wire_bits_per_step_per_device_by_process")}
  return arrays, summary, lines, layout


@pytest.mark.parametrize("name", ["qsgd", "sign"])
def test_two_processes_are_bit_identical_to_one(job, name):
  arrays, summary, lines, layout = outcome(job["out"] / "two" / name)
  ref_arrays, ref_summary, ref_lines, ref_layout = outcome(job["references"][name])
  assert summary == ref_summary and summary["status"] == "finished"
  assert lines == ref_lines  # every step once (process 0 alone wrote), the same numbers
  for x, y in zip(arrays, ref_arrays, strict=True):
    np.testing.assert_array_equal(x, y)
  # The wire bits each process read from its own compiled program: those of one process.
  bits = summary["wire_bits_per_step_per_device"]
  assert layout == {"num_processes": 2, "wire_bits_per_step_per_device_by_process": [bits] * 2}
  assert ref_layout["num_processes"] == 1 and bits > 0
  # Process 0 took the workdir's lock (its pid is in it).
  assert int((job["out"] / "two" / name / ".lock").read_text()) == pids(
      job["resumed_log"].splitlines())[0]


def test_powersgd_differs_only_by_the_order_of_its_float_sums(job):
  arrays, summary, lines, layout = outcome(job["out"] / "two" / "powersgd")
  ref_arrays, ref_summary, ref_lines, _ = outcome(job["references"]["powersgd"])
  assert layout["wire_bits_per_step_per_device_by_process"] == [
      ref_summary["wire_bits_per_step_per_device"]] * 2
  # Each pmean rounds 8 float32 terms summed in another order: a few ulps per step. Over
  # 12 steps of a contracting iteration the trajectories stay within 1e-5 (relative).
  for got, want in zip(lines, ref_lines, strict=True):
    assert got["relative_error"] == pytest.approx(want["relative_error"], rel=1e-5)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
  for x, y in zip(arrays, ref_arrays, strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_kill_9_is_reported_in_one_line_and_the_rerun_resumes(job):
  # Process 0 named the lost process in one line, within the bound, and the launcher
  # exited with its status.
  errors = [l for l in job["lines"] if "error:" in l]
  assert errors == [f"[p0] multiprocess_worker: error: process 0 of 2: lost process 1 (no "
                    f"heartbeat for {TIMEOUT} s); rerun the same command to resume from "
                    "the last checkpoint"], job["lines"][-20:]
  assert job["gone_after"] < TIMEOUT + SLACK
  assert job["status"] == 128 + signal.SIGKILL  # the first process to fail
  assert job["stderr"].splitlines() == [
      "jrelu.launch: error: process 1 of 2 was killed by SIGKILL; then process 0 exited "
      "with status 3"]
  assert "resuming run" in job["resumed_log"] and "from its checkpoint at step 4" in job[
      "resumed_log"]
  # The resumed QSGD equals a run never stopped (bit for bit: test above).
  summary = json.loads((job["out"] / "two" / "qsgd" / "summary.json").read_text())
  assert summary["status"] == "finished" and summary["steps"] == SMALL["num_steps"]


def test_join_failures_and_a_lost_coordinator_are_one_line(tmp_path):
  port = launch.free_port()
  train = [sys.executable, "-m", "jrelu.train", f"--workdir={tmp_path / 'run'}",
           "--process_timeout=3"]
  pair_port, idle_port = launch.free_port(), launch.free_port()
  started = time.monotonic()
  procs = {
      # Nobody listens on the coordinator's port.
      "alone": start(train + [f"--coordinator_address=127.0.0.1:{port}",
                              "--num_processes=2", "--process_id=1"]),
      # Process 1 thinks the job has 3 processes.
      **{f"mismatch{i}": start(
          train + [f"--coordinator_address=127.0.0.1:{pair_port}", f"--num_processes={n}",
                   f"--process_id={i}"]) for i, n in ((0, 2), (1, 3))},
      # Two processes that join and wait: process 0 will be killed.
      **{f"idle{i}": start(
          [sys.executable, WORKER, "--idle", f"--coordinator_address=127.0.0.1:{idle_port}",
           "--num_processes=2", f"--process_id={i}", "--process_timeout=3"])
         for i in (0, 1)},
  }
  for i in (0, 1):
    assert procs[f"idle{i}"].stdout.readline() == f"joined as process {i}\n"
  killed_at = time.monotonic()
  procs["idle0"].kill()
  results = {name: p.communicate(timeout=120) for name, p in procs.items()}
  elapsed = time.monotonic() - started
  for name in ("alone", "mismatch0", "mismatch1"):
    stdout, stderr = results[name]
    assert procs[name].returncode == 2 and stdout == "", (name, stderr)
    lines = [l for l in stderr.splitlines() if "jrelu.train: error:" in l]
    assert len(lines) == 1 and "Traceback" not in stderr, (name, stderr)
    results[name] = lines[0]
  assert results["alone"].startswith(
      f"jrelu.train: error: process 1 of 2 could not join the job at 127.0.0.1:{port} "
      "within 3 s ("), results["alone"]
  for i in (0, 1):
    assert results[f"mismatch{i}"] == (
        "jrelu.train: error: the processes were started with different --num_processes "
        "(process 0 with --num_processes=2, process 1 with --num_processes=3); start every "
        "process with the same --num_processes")
  _, stderr = results["idle1"]
  lost = [l for l in stderr.splitlines() if "error:" in l]
  assert lost == [
      "multiprocess_worker: error: process 1 of 2: lost the coordinator, process 0 at "
      f"127.0.0.1:{idle_port} (UNAVAILABLE: Failed to send RPC to coordination service); "
      "rerun the same command to resume from the last checkpoint"], stderr
  assert "Traceback" not in stderr and procs["idle1"].returncode != 0
  # Every process's own bound is 3 s; the whole test also waits for 5 interpreters to
  # start, which a loaded 2-core machine may stretch well past that.
  assert time.monotonic() - killed_at < 3 + SLACK and elapsed < 90
