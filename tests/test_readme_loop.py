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

# The README's step, with the planted ReLU model, fed a fresh host batch every step and
# never blocked on inside the loop: the pattern that deadlocked.
README_LOOP = r"""
import json, sys, time
import jrelu
devices = jrelu.parallel.setup_devices(8)
import jax, jax.numpy as jnp, numpy as np, optax
from jrelu import planted

dim, batch, steps, repeats = 50, 64, 300, 3
w_star = planted.sample_w_star(jax.random.key(0), dim)
data = planted.sample_dataset(jax.random.key(1), w_star, 4 * 8 * batch)
xs = np.asarray(data.x).reshape(4, 8, batch, dim)
ys = np.asarray(data.y).reshape(4, 8, batch)

def loss(params, batch):
  return planted.loss(params, *batch)

tx = optax.chain(
    jrelu.qsgd(4, key=jax.random.key(0), axis_name="data", aggregation="two_phase"),
    optax.sgd(0.5))

def step(params, opt_state, batch):            # runs on each device
  grads = jax.grad(loss)(params, batch)        # this device's gradient, not yet summed
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state

step = jax.pmap(step, axis_name="data")
mean_loss = jax.jit(lambda w: loss(w, (data.x, data.y)))
runs = []
for _ in range(repeats):
  w0 = jnp.full((dim,), 0.01)
  params = jrelu.parallel.replicate(w0, devices)
  opt_state = jrelu.parallel.replicate(tx.init(w0), devices)
  start = time.perf_counter()
  for i in range(steps):
    params, opt_state = step(params, opt_state, (xs[i % 4], ys[i % 4]))
  final = float(mean_loss(params[0]))
  runs.append({"initial": float(mean_loss(w0)), "final": final,
               "seconds": time.perf_counter() - start})
print(json.dumps(runs))
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


def _run(code, timeout):
  env = {k: v for k, v in os.environ.items() if k != "NPROC"}
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, timeout=timeout,
                        capture_output=True, text=True)
  assert proc.returncode == 0, (
      f"exit code {proc.returncode} (a deadlock aborts with -6)\n{proc.stderr[-3000:]}")
  return proc.stdout.strip().splitlines()[-1]


def test_readme_pmap_loop_trains_without_deadlock():
  # 3 x 300 steps; each took about 5 s on an idle 2-core machine. A deadlock aborts after
  # XLA's 40 s rendezvous timeout, or the subprocess timeout fails the test.
  runs = json.loads(_run(README_LOOP, timeout=170))
  assert len(runs) == 3
  for run in runs:
    # the planted ReLU is fitted to round-off: the loss falls by far more than 1e6
    assert run["final"] < 1e-6 * run["initial"], run
  assert runs[0]["final"] == runs[1]["final"] == runs[2]["final"]   # deterministic


def test_setup_devices_sizes_the_cpu_client():
  got = json.loads(_run(THREADS, timeout=120))
  assert got["eigen"] >= 16, got          # the CPU client's pools have >= 2 N threads
  if (os.cpu_count() or 1) < 16:
    assert got["nproc"] == "16", got       # set by setup_devices, before the client


@pytest.mark.skipif((os.cpu_count() or 1) >= 16, reason="the cores alone give 2 N threads")
def test_setup_devices_warns_when_the_cpu_client_started_too_small():
  assert _run(LATE, timeout=120) == "1"
