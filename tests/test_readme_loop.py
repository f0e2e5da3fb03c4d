"""The README's pmap loop ("In your own optax code") on 8 simulated CPU devices.

A free-running Python loop of pmap steps used to deadlock on machines with fewer cores
than simulated devices: XLA's CPU client ran the devices on ``max(cores, N)`` threads and
the launches of a step that waited for an in-flight slot could hold the threads the
previous step's last devices needed inside an all-to-all (XLA aborts after 40 s with
"Termination timeout ... Expected 8 threads to join the rendezvous").
``jrelu.parallel.setup_devices`` now gives the client ``2 N`` threads.

Each check runs in a fresh Python (a deadlock aborts the whole process; the CPU client's
threads are fixed when it starts) with ``NPROC`` removed from its environment, so that it
is ``setup_devices`` that sizes the client. The deadlock itself is a race: the loop test
shows that the README loop trains and does not hang in these runs, and
``test_setup_devices_sizes_the_cpu_client`` checks deterministically the condition that
rules the race out (the client has at least ``2 N`` threads).
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_block() -> str:
  """The first ``python`` code block of README.md's "In your own optax code" section."""
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  section = readme[readme.index("## In your own optax code"):]
  return section.split("```python\n", 1)[1].split("```", 1)[0]


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
  env = {k: v for k, v in os.environ.items() if k != "NPROC"}
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
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
