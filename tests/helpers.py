"""Small planted-ReLU runs shared by the tests, and running the binaries in and out of process."""

import contextlib
import io
import json
import os
import pathlib
import subprocess
import sys

from absl import flags as absl_flags
import jax
import jax.numpy as jnp
import optax
import pytest

from benchmarks import common
from jrelu import compressors
from jrelu import network
from jrelu import parallel
from jrelu import planted
from jrelu import sampling
from jrelu import transforms
from jrelu.compressors import bitpack

DIM, NUM_SAMPLES, BATCH_SIZE = 50, 400, 128

# ``compiler_options`` for the few programs whose running, not compiling, is their test's
# cost (statistical tests that draw a codec tens of thousands of times): XLA's default
# optimization instead of the suite's cheapest code generation (conftest.py). Their
# checks hold for any summation order (bounds derived from the variance, plus a rounding
# allowance), so the other rounding these programs may get does not matter.
RUNTIME_HEAVY = {"xla_backend_optimization_level": 2,
                 "xla_llvm_disable_expensive_passes": False}

# bitpack.unpack compiled once per (n, bits) rather than op by op (eager JAX compiles every
# primitive): the codec tests read packed words with it.
unpack = jax.jit(bitpack.unpack, static_argnums=(1, 2))
pack = jax.jit(bitpack.pack, static_argnums=1)


def problem(dim=DIM, num_samples=NUM_SAMPLES, seed=0):
  w_star = planted.sample_w_star(jax.random.key(seed), dim)
  return planted.sample_dataset(jax.random.key(seed + 1), w_star, num_samples), w_star


def make_tx(compressor=None, aggregation="two_phase", learning_rate=0.4, axis_name="data",
            seed=3):
  compressor = compressors.identity() if compressor is None else compressor
  return optax.chain(
      transforms.compress(compressor, key=jax.random.key(seed), axis_name=axis_name,
                          aggregation=aggregation),
      optax.sgd(learning_rate))


def batch_fn(batch_size=BATCH_SIZE):
  return sampling.make_batch_fn(batch_size)


def replicated_inputs(tx, devices, data=None, dim=DIM):
  data = problem(dim) if data is None else data
  state = parallel.init_state(jnp.zeros((dim,), jnp.float32), tx)
  return parallel.replicate((state, data, jax.random.key(4)), devices)


def run(tx, devices, num_steps, wrapper="pmap", batch_size=BATCH_SIZE, data=None):
  """Runs ``num_steps`` steps on ``devices``; returns (state, metrics) with device axis.

  ``wrapper``: ``"pmap"`` or ``"shard_map"`` over ``devices``, or ``"vmap"``: as many
  devices simulated in one program by ``parallel.vmapped`` (the same results up to the
  order of float sums, test_parallel.test_vmapped_matches_pmapped; no rendezvous of device
  threads per collective, so long runs cost a fraction of pmap's time on few cores).
  """
  step = parallel.make_step(planted.loss, batch_fn(batch_size), tx, metrics_fn=planted.metrics_fn)
  run_steps = parallel.scan_steps(step, num_steps)
  if wrapper == "vmap":
    data = problem() if data is None else data
    state = parallel.init_state(jnp.zeros((DIM,), jnp.float32), tx)
    axes = parallel.VMAP_STATE_AXES
    fn = parallel.vmapped(run_steps, len(devices), in_axes=(axes, None, None),
                          out_axes=(axes, 0))
    return fn(parallel.stack(state, len(devices), axes), data, jax.random.key(4))
  fn = parallel.wrap(wrapper, run_steps, devices)
  return fn(*replicated_inputs(tx, devices, data))


# The planted one-hidden-layer network of jrelu.network (PowerSGD and ATOMO tests).
NET_DIM, NUM_HIDDEN, NET_SAMPLES, NET_BATCH = 20, 4, 400, 256


def pmean_transform(axis_name="data"):
  """Uncompressed data-parallel SGD's aggregation: the float32 mean of the gradients."""
  return optax.GradientTransformation(
      lambda params: optax.EmptyState(),
      lambda updates, state, params=None: (jax.lax.pmean(updates, axis_name), state))


def network_problem(seed, dim=NET_DIM, num_hidden=NUM_HIDDEN, num_samples=NET_SAMPLES):
  """(teacher, dataset, initial params) of a small planted network."""
  teacher = network.sample_teacher(jax.random.key(seed), dim, num_hidden)
  data = network.sample_dataset(jax.random.key(seed + 1), teacher, num_samples)
  params = network.init_params(jax.random.key(seed + 2), (data, teacher), scale=1.0)
  return teacher, data, params


def train_network(tx, params, data, num_steps, devices, wrapper="pmap", seed=0):
  """Data-parallel training of the planted network; returns the final (replicated) state."""
  batch_fn = sampling.make_batch_fn(NET_BATCH, sampling="replacement")
  step = parallel.make_step(network.loss, batch_fn, tx)
  fn = parallel.wrap(wrapper, parallel.scan_steps(step, num_steps), devices)
  inputs = (parallel.init_state(params, tx), (data, None), jax.random.key(seed))
  state, _ = fn(*parallel.replicate(inputs, devices))
  return state


REPO = pathlib.Path(__file__).resolve().parents[1]


def run_script(script, *flags, cwd, timeout=600):
  """Runs ``python SCRIPT FLAGS`` in a subprocess with the repository importable."""
  return _run_python(str(script), *flags, cwd=cwd, timeout=timeout)


def run_module(module, *flags, cwd, timeout=600):
  """Runs ``python -m MODULE FLAGS`` (e.g. ``benchmarks.reproduce``), repository importable."""
  return _run_python("-m", module, *flags, cwd=cwd, timeout=timeout)


def subprocess_env(**overrides):
  """The environment of the suite's subprocesses: this checkout importable, the suite's
  XLA flags (inherited) and its compilation cache, so that a program a test compiled
  here (or in another subprocess) is not compiled again; plus ``overrides``."""
  return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
              JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **overrides)


def _run_python(*args, cwd, timeout):
  env = subprocess_env()
  return subprocess.run([sys.executable, *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


def run_benchmark(module, *flags, cwd, timeout=600):
  """Runs ``python -m MODULE FLAGS``; asserts it succeeded and printed one JSON line; returns it."""
  result = run_module(module, *flags, cwd=cwd, timeout=timeout)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert len(lines) == 1, result.stdout
  return json.loads(lines[0])


def benchmark_flag_error(binary, argv, check):
  """(exit status, stderr) of a benchmark binary's flag checks for ``argv``, in this process.

  Runs what the binary runs before any heavy work, with the same parser and error lines:
  ``binary.define_flags`` into a fresh ``FlagValues``, ``benchmarks.common.parse_flags``,
  then ``check(flag_values)`` (the binary's ``settings_from_flags``), error lines
  prefixed with ``binary.PROG`` as ``common.run_main`` sets it.

  Args:
    binary: the binary's module, e.g. ``benchmarks.reproduce.__main__``.
    argv: the flags, without the program name.
    check: called with the parsed flags.

  Returns:
    (exit status, stderr text).

  Raises:
    pytest.fail.Exception: when ``argv`` is accepted (no SystemExit).
  """
  values = absl_flags.FlagValues()
  binary.define_flags(values)
  stderr = io.StringIO()
  saved_prog, common._prog = common._prog, binary.PROG  # pylint: disable=protected-access
  try:
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_info:
      common.parse_flags([binary.PROG, *argv], values)
      check(values)
  finally:
    common._prog = saved_prog  # pylint: disable=protected-access
  return exit_info.value.code, stderr.getvalue()


def benchmark_flags(binary, *argv):
  """A fresh ``FlagValues`` with ``binary.define_flags``, parsed from ``argv`` (no program name)."""
  values = absl_flags.FlagValues()
  binary.define_flags(values)
  values([binary.PROG, *argv])
  return values


def assert_one_error_line(result, line):
  """Asserts that a finished binary printed just ``line`` on stderr, nothing on stdout, exit 2."""
  assert result.returncode == 2, result.stderr
  assert result.stdout == ""
  assert "Traceback" not in result.stderr
  assert result.stderr.splitlines() == [line], result.stderr


def run_outcome(workdir):
  """(state arrays, summary, metrics lines) of a finished experiment.run workdir.

  The timings, the run id and the workdir are left out: they differ between two runs of
  the same settings by design. Asserts that every line carries the summary's run id.
  """
  from jrelu import checkpoint  # pylint: disable=g-import-not-at-top
  from jrelu import experiment  # pylint: disable=g-import-not-at-top
  workdir = pathlib.Path(workdir)
  arrays, _ = checkpoint.restore(str(workdir / "checkpoints"), like=None)
  summary = json.loads((workdir / "summary.json").read_text())
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  run_ids = {summary.pop("run_id")} | {l.pop("run_id") for l in lines}
  assert len(run_ids) == 1, run_ids  # every line belongs to the one run
  for record in [summary] + lines:
    for name in experiment.TIMING_FIELDS:
      record.pop(name, None)
  summary.pop("workdir")
  return arrays, summary, lines


def assert_same_run(workdir_a, workdir_b):
  """Two finished workdirs hold the same run: state bit for bit, summary, every line once."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  arrays_a, summary_a, lines_a = run_outcome(workdir_a)
  arrays_b, summary_b, lines_b = run_outcome(workdir_b)
  assert summary_a == summary_b
  assert lines_a == lines_b  # every logged step exactly once, same values
  assert len(arrays_a) == len(arrays_b)
  for x, y in zip(arrays_a, arrays_b):
    np.testing.assert_array_equal(x, y)  # bit for bit (typed keys as key data)
