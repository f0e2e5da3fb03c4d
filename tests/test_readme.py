"""Every code block of README.md runs, so the examples cannot rot.

* ``python`` blocks run as written. The pmap loop of "In your own optax code" runs three
  times in a fresh Python, 300 steps each: it is also the deadlock test (below). The other
  blocks run in this process, which already has the 8 CPU devices and the CPU client
  threads that ``jrelu.parallel.setup_devices`` gives (conftest.py calls it), from a
  temporary directory so that files they write do not land in the repository.
* Shell blocks and the flags in README's tables are not run (they train for minutes):
  every ``python -m jrelu.train ...`` command (and the flags after ``--`` of every
  ``python -m jrelu.launch ...``) and every table cell of flags goes through the binary's
  own flag definitions and parser into a validated ``experiment.Config``;
  every ``make`` target exists in the Makefile; every ``python -m`` module exists; every
  ``pip install`` extra exists in pyproject.toml.

The deadlock: a free-running Python loop of pmap steps used to deadlock on machines with
fewer cores than simulated devices: XLA's CPU client ran the devices on ``max(cores, N)``
threads and the launches of a step that waited for an in-flight slot could hold the
threads the previous step's last devices needed inside an all-to-all (XLA aborts after
40 s with "Termination timeout ... Expected 8 threads to join the rendezvous").
``jrelu.parallel.setup_devices`` now gives the client ``2 N`` threads. Those checks run in
a fresh Python (a deadlock aborts the whole process; the CPU client's threads are fixed
when it starts) with ``NPROC`` removed from its environment, so that it is
``setup_devices`` that sizes the client. The deadlock itself is a race: the loop test
shows that the README loop trains and does not hang in these runs, and
``test_setup_devices_sizes_the_cpu_client`` checks deterministically the condition that
rules the race out (the client has at least ``2 N`` threads).
"""
import contextlib
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys

from absl import flags
import pytest

from jrelu import train

import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "README.md")) as _f:
  README = _f.read()

# (language, text) of every fenced block, in order.
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```", README, re.S | re.M)
PYTHON = [text for lang, text in BLOCKS if lang == "python"]
SHELL = [text for lang, text in BLOCKS if lang in ("", "sh", "bash", "shell")]
PMAP_LOOP = [text for text in PYTHON if "jax.pmap(" in text]
IN_PROCESS = [text for text in PYTHON if "jax.pmap(" not in text]


def readme_block() -> str:
  """README's pmap loop ("In your own optax code"), the block the deadlock test runs."""
  (block,) = PMAP_LOOP
  return block


def test_readme_has_the_documented_blocks():
  section = README[README.index("## In your own optax code"):]
  assert section.split("```python\n", 1)[1].split("```", 1)[0] == readme_block()
  assert any("jax.shard_map(" in text for text in IN_PROCESS)   # the jit + shard_map recipe
  assert len(PYTHON) == len(PMAP_LOOP) + len(IN_PROCESS) >= 3


@pytest.mark.parametrize("block", IN_PROCESS, ids=[f"python{i}" for i in range(len(IN_PROCESS))])
def test_python_block_runs(block, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(block, "README.md", "exec"), {"__name__": "__main__"})
  found = re.search(r"relative error (\S+)", out.getvalue())
  if found:   # a training example: from w = 0 (error 1) it fits the planted ReLU
    assert float(found.group(1)) < 1e-3, out.getvalue()


def _commands():
  """(program, argument list) of every command line in README's shell blocks."""
  for text in SHELL:
    for line in text.splitlines():
      line = line.split("#", 1)[0].strip()
      if line.startswith(("make ", "python -m ", "pip ", "pytest")):
        yield shlex.split(line)


def _train_flags():
  """A FlagValues holding ``jrelu.train``'s flags."""
  values = flags.FlagValues()
  flags.DEFINE_string("workdir", "runs/latest", "", flag_values=values)
  train.define_config_flags(values)
  return values


def _train_config(argv):
  """The validated Config ``python -m jrelu.train *argv`` would run, parsed in-process."""
  values = _train_flags()
  values(["jrelu.train", *argv])
  return train.config_from_flags(values)


# Every table cell of README that is a list of jrelu.train flags, e.g.
# `--compressor=top_k --fraction=0.1 --error_feedback --learning_rate=0.5`.
TABLE_FLAGS = [cell for row in re.findall(r"^\|.*$", README, re.M)
               for cell in re.findall(r"`(--[^`]*)`", row)]


def test_shell_commands_and_table_flags_are_valid():
  with open(os.path.join(ROOT, "Makefile")) as f:
    targets = set(re.findall(r"^([\w-]+):", f.read(), re.M))
  with open(os.path.join(ROOT, "pyproject.toml")) as f:   # no tomllib before Python 3.11
    section = f.read().split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
  extras = set(re.findall(r"^(\w+) = \[", section, re.M))
  commands = list(_commands())
  assert ["make", "run"] in commands and ["python", "-m", "jrelu.train",
                                          "--workdir=runs/qsgd"] in commands
  for argv in commands:
    if argv[0] == "make":
      assert set(argv[1:]) <= targets, argv
    elif argv[:3] == ["python", "-m", "jrelu.train"]:
      _train_config(argv[3:])
    elif argv[:3] == ["python", "-m", "jrelu.launch"]:  # its flags, then jrelu.train's
      _train_config(argv[argv.index("--") + 1:])
    elif argv[:2] == ["pip", "install"]:
      for spec in argv[2:]:
        for extra in re.findall(r"\[([\w,]+)\]", spec):
          assert set(extra.split(",")) <= extras, argv
  # Modules named anywhere as `python -m NAME` exist (found, not imported).
  for module in set(re.findall(r"python -m ([\w.]+)", README)):
    assert importlib.util.find_spec(module) is not None, module
  assert len(TABLE_FLAGS) >= 20, TABLE_FLAGS
  names = set(_train_flags()) | {holder.name for holder in (
      train._CHECKPOINT_EVERY, train._KEEP_CHECKPOINTS, train._FRESH,  # run arguments
      train._COORDINATOR_ADDRESS, train._NUM_PROCESSES, train._PROCESS_ID,  # processes
      train._PROCESS_TIMEOUT)}
  for cell in TABLE_FLAGS:
    if re.fullmatch(r"--\w+", cell):  # a flag named in prose, e.g. `--log_every`
      assert cell[2:] in names, cell
    else:
      _train_config(cell.split())


# The README's block, verbatim, run three times in one fresh Python: a free-running loop
# of 300 pmap steps fed from the host, never blocked on: the pattern that deadlocked.
README_LOOP = r"""
import contextlib, io, json, sys
block = sys.stdin.read()
errors = []
for _ in range(3):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(block, "README.md", "exec"), {"__name__": "__main__"})
  errors.append(float(out.getvalue().split()[-1]))
print(json.dumps(errors))
"""

THREADS = r"""
import json, os, warnings
import jrelu
with warnings.catch_warnings():
  warnings.simplefilter("error")
  devices = jrelu.parallel.setup_devices(8)
import jax, jax.numpy as jnp
jax.pmap(lambda x: jax.lax.psum(x, "i"), axis_name="i")(jnp.ones(8)).block_until_ready()
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(json.dumps({"nproc": os.environ.get("NPROC"), "eigen": names.count("tf_XLAEigen")}))
"""

LATE = r"""
import warnings
import jax
jax.config.update("jax_num_cpu_devices", 8)
jax.devices()                                   # the CPU client starts here
import jrelu
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter("always")
  jrelu.parallel.setup_devices(8)
print(sum("deadlock" in str(w.message) for w in caught))
"""


def _run(code, timeout, stdin=None):
  env = {k: v for k, v in helpers.subprocess_env().items() if k != "NPROC"}
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, timeout=timeout,
                        capture_output=True, text=True, input=stdin)
  assert proc.returncode == 0, (
      f"exit code {proc.returncode} (a deadlock aborts with -6)\n{proc.stderr[-3000:]}")
  return proc.stdout.strip().splitlines()[-1]


def test_readme_pmap_loop_trains_without_deadlock():
  # 3 x 300 steps of the README's own block. A deadlock aborts after XLA's 40 s rendezvous
  # timeout (exit -6), or the subprocess timeout fails the test.
  errors = json.loads(_run(README_LOOP, timeout=170, stdin=readme_block()))
  assert len(errors) == 3
  # From w = 0 (relative error 1) QSGD-SGD fits the planted ReLU: measured 300-step error
  # ~1e-6; 1e-3 leaves a wide margin and still fails on any run that did not train.
  assert all(e < 1e-3 for e in errors), errors
  assert errors[0] == errors[1] == errors[2]   # same keys, same program: bit for bit


def test_setup_devices_sizes_the_cpu_client():
  got = json.loads(_run(THREADS, timeout=120))
  assert got["eigen"] >= 16, got          # the CPU client's pools have >= 2 N threads
  if (os.cpu_count() or 1) < 16:
    assert got["nproc"] == "16", got       # set by setup_devices, before the client


@pytest.mark.skipif((os.cpu_count() or 1) >= 16, reason="the cores alone give 2 N threads")
def test_setup_devices_warns_when_the_cpu_client_started_too_small():
  assert _run(LATE, timeout=120) == "1"
