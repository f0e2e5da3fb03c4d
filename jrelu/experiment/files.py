"""The files a run owns in its workdir: atomic writes, the lock, and an earlier run's files.

``summary.json`` and the plot are written through a temporary file and a rename;
``metrics.jsonl`` lines are appended whole or not at all; a run holds ``fcntl.flock`` on
``WORKDIR/.lock``; :func:`prepare` decides whether an earlier run's files are resumed,
deleted (each one logged) or refused. Every write error is a :class:`WriteError` naming
the file.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import math
import os
import shutil
from typing import Callable

from absl import logging
import numpy as np

from jrelu import checkpoint
from jrelu.experiment.config import Config, ConfigError

def json_safe(obj):
  """``obj`` with NaN and infinities replaced by None, so that it is strict JSON.

  NumPy scalars become Python numbers; tuples become lists.

  Example:
    >>> json_safe({"a": float("nan"), "b": np.float32(2.0)})
    {'a': None, 'b': 2.0}
  """
  if isinstance(obj, np.generic):
    obj = obj.item()
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  if isinstance(obj, dict):
    return {k: json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_safe(v) for v in obj]
  return obj


def write_json(path: str, obj) -> None:
  """Writes ``obj`` as strict, indented JSON to ``path`` atomically (temp file + rename).

  Raises:
    OSError: when the file cannot be written (the previous file, if any, is kept).
  """
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(json_safe(obj), f, indent=2, sort_keys=True, allow_nan=False)
    f.write("\n")
  os.replace(tmp, path)


def check_workdir(workdir: str) -> None:
  """Creates ``workdir`` and checks that a file can be written there.

  Raises:
    ConfigError: (field ``workdir``) saying why not.
  """
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError("workdir", f"workdir={workdir!r}: cannot write there "
                      f"({e.strerror or e})") from None


class WriteError(RuntimeError):
  """A file of the run could not be written (full disk, quota, ...); ``path`` names it.

  The message is one line, e.g. ``cannot write runs/x/metrics.jsonl: File too large``.
  """

  def __init__(self, path: str, error: OSError):
    super().__init__(f"cannot write {path}: {error.strerror or error}")
    self.path = path


# The files a run owns in its workdir; a fresh run deletes them, a resumed one rewrites them.
RUN_FILES = ("metrics.jsonl", "summary.json", "relative_error.png")
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = ".lock"


def writing(path: str, write: Callable[[], None]) -> None:
  """Runs ``write()``; an ``OSError`` becomes a :class:`WriteError` naming ``path``."""
  try:
    write()
  except OSError as e:
    raise WriteError(path, e) from None


def append_line(path: str, line: str) -> None:
  """Appends ``line`` and a newline to ``path``: the whole line, or nothing.

  A write that fails part way (full disk, file size limit) is cut back to the previous
  size.

  Raises:
    WriteError: naming ``path`` when the line cannot be written.

  Example:
    >>> append_line("runs/x/metrics.jsonl", json.dumps({"step": 100}))
  """
  data = (line + "\n").encode()

  def write():
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
      size = os.fstat(fd).st_size
      try:
        view = memoryview(data)
        while view:  # a short write is retried: the retry raises the real error
          written = os.write(fd, view)
          if not written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
          view = view[written:]
      except OSError:
        os.ftruncate(fd, size)
        raise
    finally:
      os.close(fd)

  writing(path, write)


def lock(workdir: str):
  """Takes the workdir's exclusive lock (``fcntl.flock``); returns the open lock file.

  Raises:
    ConfigError: (field ``workdir``) when another run holds it.
  """
  path = os.path.join(workdir, LOCK_FILE)
  f = open(path, "a+")
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    f.seek(0)
    holder = f.read().strip() or "unknown"
    f.close()
    raise ConfigError("workdir", f"workdir={workdir!r} is in use by another run (pid "
                      f"{holder}); wait for it to end or use another workdir") from None
  f.truncate(0)
  f.write(str(os.getpid()))
  f.flush()
  return f


def identity(config: Config, num_devices: int) -> dict:
  """What a checkpoint must match to be resumed: every setting, N resolved."""
  return json_safe({**dataclasses.asdict(config), "num_devices": num_devices})


def with_added_defaults(saved: dict) -> dict:
  """Saved settings, plus every :class:`Config` field they lack at its declared default.

  A checkpoint written before a field was added ran as that field's default does (before
  ``algorithm`` existed, every run was ``algorithm='sgd'``), so it still resumes.
  """
  added = {f.name: f.default for f in dataclasses.fields(Config) if f.name not in saved}
  return {**json_safe(added), **saved}


def _differences(saved: dict, now: dict) -> str:
  return ", ".join(f"{k}={saved.get(k)!r} (now {now.get(k)!r})"
                   for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k))


def delete_run_files(workdir: str, why: str) -> None:
  """Deletes the files of an earlier run in ``workdir``, logging each one.

  ``checkpoints/`` goes first, renamed away in one step, so that a process killed while
  deleting never leaves a half-deleted checkpoint that looks complete.
  """
  trash = os.path.join(workdir, "." + CHECKPOINT_DIR + ".deleted")
  for name in (CHECKPOINT_DIR,) + RUN_FILES:
    path = os.path.join(workdir, name)
    if os.path.lexists(path):
      logging.warning("%s: deleting %s", why, path)
      if name == CHECKPOINT_DIR and os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(trash, onerror=_unless_gone)
        os.replace(path, trash)
      else:
        os.remove(path)
  shutil.rmtree(trash, onerror=_unless_gone)


def _unless_gone(function, path, exc_info):
  """``shutil.rmtree``'s onerror: a file already gone is fine (orbax may clean up too)."""
  del function, path
  if not issubclass(exc_info[0], FileNotFoundError):
    raise exc_info[1]


def reading(workdir: str, step: int, read: Callable):
  """Runs ``read()``; any failure to read a checkpoint becomes a ConfigError saying so."""
  try:
    return read()
  except Exception as e:  # pylint: disable=broad-except  # orbax raises many kinds
    raise ConfigError("workdir", f"workdir={workdir!r}: its checkpoint of step {step} "
                      f"cannot be read ({type(e).__name__}: "
                      f"{(str(e).splitlines() or [''])[0]}); run with fresh=True to "
                      "delete it") from None


def prepare(workdir: str, identity: dict, fresh: bool) -> dict | None:
  """Resolves what an earlier run left in ``workdir``; returns the metadata to resume.

  With ``fresh``, the earlier run's files are deleted (each one logged). Otherwise the
  latest checkpoint is resumed if its settings equal ``identity``; files of an earlier run
  without a checkpoint are deleted when their settings match (nothing could be resumed).

  Raises:
    ConfigError: (field ``workdir``) when the earlier run's settings differ, naming them.
  """
  ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
  if fresh:
    delete_run_files(workdir, "fresh=True")
    return None
  step = checkpoint.latest_step(ckpt_dir)
  if step is not None:
    saved = reading(workdir, step, lambda: checkpoint.read_metadata(ckpt_dir, step))
    saved_settings = with_added_defaults(saved["config"])
    if saved_settings == identity:
      return saved
  else:
    try:
      with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
      saved_settings = {k: summary.get(k) for k in identity}
    except (OSError, ValueError, AttributeError):
      saved_settings = None
    if saved_settings is None or saved_settings == identity:
      delete_run_files(workdir, "an earlier run left no checkpoint")
      return None
  raise ConfigError("workdir", f"workdir={workdir!r} holds a run with other settings: "
                    f"{_differences(saved_settings, identity)}; run with fresh=True to "
                    "delete it, or use another workdir")


def write_text(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` atomically (temp file + rename)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)
