"""experiment.run stopped and run again: bit-identical to a run never stopped, in process.

A run is "killed" by an exception at a chosen point: from a callback (after a metrics
line is written, before the checkpoint that follows it), from inside orbax's commit of a
checkpoint (its files written to the temporary directory, not yet renamed), or before
any checkpoint exists. ``run`` is then called again on the same workdir. The final
params and optax state (read from the last checkpoint), summary.json and metrics.jsonl
must equal those of an uninterrupted run, except the timings and the run id (a new run's
id differs by design). The real ``kill -9`` of the binary is in test_train_binary.py.
"""

import errno
import fcntl
import json
import os
import resource
import shutil
import signal
import threading

import jax
import numpy as np
import pytest
from orbax.checkpoint._src.path import atomicity

from jrelu import checkpoint
from jrelu import experiment

import helpers

DEVICES = 8
# Checkpoints at steps 4, 8, 12; chunks of 2 steps.
SMALL = dict(dim=20, num_samples=100, batch_size=16, learning_rate=0.1, num_steps=12,
             log_every=2, target_relative_error=0)
EVERY = 4


class Crash(Exception):
  """The simulated crash that stops a run at a chosen point (not a test)."""


def crash_at(step):
  def callback(record):
    if record["step"] == step:
      raise Crash(step)
  return callback


def crash_in_commit_at(monkeypatch, step):
  """Makes orbax's final rename of the checkpoint of ``step`` raise."""
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def broken(self):
    if self.get_final().name == str(step):
      raise Crash(f"commit of {step}")
    return await finalize(self)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", broken)


@pytest.fixture(autouse=True)
def no_plot(monkeypatch):
  # The plot is no part of the state compared, and matplotlib costs ~1.7 s per run.
  monkeypatch.setattr(experiment.loop, "_plot", lambda *args: None)


def run(config, workdir, **kwargs):
  return experiment.run(config, str(workdir), devices=jax.devices()[:DEVICES],
                        checkpoint_every=EVERY, **kwargs)


# Each method is stopped twice, at different kinds of points, then finished.
CASES = {
    # QSGD: after the metrics line of step 6 (checkpoint 4 is the latest), then inside
    # the commit of checkpoint 8.
    "qsgd": (dict(compressor="qsgd"), [("callback", 6), ("commit", 8)]),
    # Scaled sign + error feedback (per-device residuals): before any checkpoint, then
    # after the metrics line of step 10.
    "sign_ef": (dict(compressor="sign", scaled_sign=True, error_feedback=True),
                [("callback", 2), ("callback", 10)]),
    # PowerSGD (its Q and error buffers): inside the commit of the first checkpoint,
    # then after the last metrics line, before the final checkpoint.
    "powersgd": (dict(compressor="powersgd"), [("commit", 4), ("callback", 12)]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_stopped_and_resumed_run_is_bit_identical(tmp_path, monkeypatch, name):
  overrides, stops = CASES[name]
  config = experiment.Config(**SMALL, **overrides)
  run(config, tmp_path / "straight")
  workdir = tmp_path / "stopped"
  for kind, step in stops:
    with monkeypatch.context() as patch:
      callbacks = []
      if kind == "callback":
        callbacks = [crash_at(step)]
      else:
        crash_in_commit_at(patch, step)
      with pytest.raises(Crash):
        run(config, workdir, callbacks=callbacks)
    assert json.loads((workdir / "summary.json").read_text())["status"] == "failed"
  summary = run(config, workdir)
  assert summary["status"] == "finished" and summary["checkpoint_step"] == 12
  helpers.assert_same_run(tmp_path / "straight", workdir)


def test_other_settings_are_refused_naming_them_and_fresh_deletes(tmp_path, caplog):
  config = experiment.Config(**SMALL)
  saved = dict(experiment.files.identity(config, DEVICES), num_levels=8, seed=3)
  checkpoint.save(str(tmp_path / "checkpoints"), 4, [np.zeros(2)],
                  {"config": saved, "progress": {}, "history": []})
  with pytest.raises(experiment.ConfigError) as info:
    run(config, tmp_path)
  assert info.value.field == "workdir"
  assert "num_levels=8 (now 4), seed=3 (now 0)" in str(info.value)
  (tmp_path / "relative_error.png").write_text("an earlier run's plot")
  caplog.set_level("WARNING")
  summary = run(config, tmp_path, fresh=True)
  assert summary["steps"] == 12 and not (tmp_path / "relative_error.png").exists()
  deleted = [r.getMessage() for r in caplog.records if "deleting" in r.getMessage()]
  assert len(deleted) == 2  # the plot and checkpoints/, each named
  assert checkpoint.latest_step(str(tmp_path / "checkpoints")) == 12


def test_a_checkpoint_from_before_a_setting_existed_has_it_at_its_default(tmp_path):
  identity = experiment.files.identity(experiment.resolve(experiment.Config(**SMALL)),
                                       DEVICES)
  saved = {k: v for k, v in identity.items()
           if k not in ("algorithm", "tau", "alpha", "exchange")}   # added with EASGD
  checkpoint.save(str(tmp_path / "checkpoints"), 4, [np.zeros(2)],
                  {"config": saved, "progress": {}, "history": []})
  assert experiment.files.prepare(str(tmp_path), identity, fresh=False)["config"] == saved
  with pytest.raises(experiment.ConfigError, match=r"algorithm='sgd' \(now 'easgd'\)"):
    experiment.files.prepare(str(tmp_path), dict(identity, algorithm="easgd"), fresh=False)


def test_a_second_run_in_a_locked_workdir_is_refused(tmp_path):
  with open(tmp_path / ".lock", "w") as held:
    held.write("12345")
    held.flush()
    fcntl.flock(held, fcntl.LOCK_EX)  # as another run would
    with pytest.raises(experiment.ConfigError, match=r"in use by another run \(pid 12345\)"):
      run(experiment.Config(**SMALL), tmp_path)
  assert not (tmp_path / "metrics.jsonl").exists()  # the holder's files are untouched


def test_a_failed_append_leaves_no_partial_line(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  experiment.append_line(path, '{"step": 1}')
  size = os.path.getsize(path)
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  # The file may grow 5 bytes: the write of the next 12 is cut short (Python ignores
  # SIGXFSZ), and append_line must cut those 5 bytes back.
  resource.setrlimit(resource.RLIMIT_FSIZE, (size + 5, hard))
  try:
    with pytest.raises(experiment.WriteError, match="cannot write .*metrics.jsonl"):
      experiment.append_line(path, '{"step": 2}')
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
  assert open(path).read() == '{"step": 1}\n'


def test_a_checkpoint_that_cannot_be_written_is_one_error_naming_it(tmp_path, monkeypatch):
  def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(checkpoint, "save", full_disk)
  with pytest.raises(experiment.WriteError) as info:
    run(experiment.Config(**SMALL), tmp_path)
  assert str(info.value) == (f"cannot write {tmp_path / 'checkpoints'}: "
                             "No space left on device")
  assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"



@pytest.mark.parametrize("name", ["checkpoint_every", "keep_checkpoints"])
def test_checkpoint_settings_are_checked(tmp_path, name):
  with pytest.raises(experiment.ConfigError, match=f"{name}=0: must be"):
    experiment.run(experiment.Config(**SMALL), str(tmp_path),
                   devices=jax.devices()[:DEVICES], **{name: 0})


def test_an_unreadable_checkpoint_is_one_error_and_fresh_clears_it(tmp_path):
  config = experiment.Config(**SMALL)
  checkpoint.save(str(tmp_path / "checkpoints"), 4, [np.zeros(2)],
                  {"config": experiment.files.identity(config, DEVICES)})
  shutil.rmtree(tmp_path / "checkpoints" / "4" / "metadata")  # damaged by hand
  with pytest.raises(experiment.ConfigError, match="checkpoint of step 4 cannot be read"):
    run(config, tmp_path)
  experiment.files.delete_run_files(str(tmp_path), "test")
  assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


def test_sigterm_checkpoints_says_interrupted_and_resumes_bit_identically(tmp_path):
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("signal handlers are installed from the main thread only")
  config = experiment.Config(**SMALL, compressor="sign", scaled_sign=True,
                             error_feedback=True)

  def terminate(record):
    if record["step"] == 6:
      os.kill(os.getpid(), signal.SIGTERM)  # handled: the run stops after this chunk

  workdir = tmp_path / "stopped"
  with pytest.raises(experiment.Interrupted) as info:
    run(config, workdir, callbacks=[terminate])
  assert (info.value.signum, info.value.step) == (signal.SIGTERM, 6)
  summary = json.loads((workdir / "summary.json").read_text())
  assert (summary["status"], summary["signal"], summary["interrupted_at_step"],
          summary["checkpoint_step"]) == ("interrupted", "SIGTERM", 6, 6)
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is restored
  run(config, workdir)
  run(config, tmp_path / "straight")
  helpers.assert_same_run(workdir, tmp_path / "straight")
