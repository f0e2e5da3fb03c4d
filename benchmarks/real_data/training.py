"""One row of the real-data benchmark: a method trained from several seeds at once.

A row is a ``jrelu.experiment.Config`` (compressor, level, algorithm, step size). Its
per-device step comes from ``jrelu.experiment.make_step`` with ``jrelu.mlp``'s loss, so
SGD with every compressor and EASGD / EAMSGD / DOWNPOUR train through the library's own
code. The N devices are simulated inside one program (``jrelu.parallel.vmapped``) and the
seeds are one more ``jax.vmap`` around it, so a row is one compiled program whatever the
number of seeds; between its chunks of scanned steps the model (device 0's parameters for
SGD, the center for the elastic methods) is scored on the whole training set and the
held-out set. The bits come from the compiled program of one ``jax.pmap`` step over N
devices (``jrelu.wire``), next to the formula's prediction.

Both programs are compiled with :data:`FAST_COMPILE`: this benchmark reports accuracy and
bits, not speed, and most of its time would otherwise go to XLA optimizing small programs.
"""

from __future__ import annotations

import math
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jrelu import easgd
from jrelu import experiment
from jrelu import linesearch
from jrelu import mlp
from jrelu import parallel
from jrelu import transforms
from jrelu import wire

# XLA options of this benchmark's programs: LLVM at -O0 without its expensive passes, the
# classic CPU emitters, one codegen module. Measured on 2 cores: a QSGD row compiles in
# about 7 s instead of 46 s and its pmap step in 4 s instead of 38 s; its steps run about
# 1.5x slower. They do not change what is computed, up to the order of float sums.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                "xla_cpu_use_fusion_emitters": False,
                "xla_cpu_parallel_codegen_split_count": 1}


def model_params(state: parallel.TrainState):
  """The model a run reports: SGD's parameters, or the elastic methods' center.

  Args:
    state: a TrainState whose leaves carry the seed and device axes, ``[S, N, ...]``.

  Returns:
    The parameters of device 0 (the devices hold the same SGD parameters and the same
    center), leaves ``[S, ...]``.
  """
  elastic = isinstance(state.opt_state, easgd.ElasticState)
  tree = state.opt_state.center if elastic else state.params
  return jax.tree_util.tree_map(lambda a: a[:, 0], tree)


def _seed_keys(seed: int):
  """(init, compression, batch) keys of one seed."""
  return jax.random.split(jax.random.key(seed), 3)


# The scores of every seed's model at once (compiled once per process).
_evaluate = jax.jit(jax.vmap(mlp.metrics_fn, in_axes=(0, None)))


def train(config: experiment.Config, data, seeds, num_steps: int, num_evals: int,
          devices, num_hidden: int = 32) -> dict:
  """Trains ``config`` from every seed of ``seeds`` and scores it ``num_evals`` times.

  Args:
    config: the row's settings (``batch_size`` global, divisible by N).
    data: ``(train, test)`` ``jrelu.sampling.Dataset`` of jax arrays (``jrelu.mlp``).
    seeds: the seeds (each: initial parameters, compression noise, batches).
    num_steps: steps per run, a multiple of ``num_evals``.
    num_evals: scores taken after every ``num_steps / num_evals`` steps (and at step 0).
    devices: the N devices; the bits are read from a ``jax.pmap`` step over them.
    num_hidden: hidden units of the MLP.

  Returns:
    ``{"history": {"steps": [E+1], "train_loss": [E+1][S], "test_accuracy": [E+1][S],
    "cumulative_wire_bits_per_device": [E+1][S]}, "wire_bits_per_exchange_per_device",
    "predicted_wire_bits_per_exchange_per_device", "steps_per_exchange",
    "wire_bits_per_linesearch_trial", "predicted_wire_bits_per_linesearch_trial",
    "linesearch_trials": [S], "wire_bits_per_step_per_device" (the seeds' mean),
    "finite": [S], "compile_seconds", "run_seconds"}``. An exchange's bits exclude a line
    search's (``step_size="armijo"``: one all-reduce per trial, counted per seed). A seed
    whose loss became NaN or infinite has ``finite`` False and its scores after that as
    None.

  Raises:
    ValueError: if ``num_steps`` is not a multiple of ``num_evals``.
  """
  if num_steps % num_evals:
    raise ValueError(f"num_steps={num_steps} is not a multiple of num_evals={num_evals}")
  n = len(devices)
  config = experiment.resolve(config.validate(), n)
  start = time.perf_counter()
  states, batch_keys = [], []
  for seed in seeds:
    init_key, tx_key, batch_key = _seed_keys(seed)
    # The compression key lives in the optax state, so one step serves every seed.
    step, init = experiment.make_step(config, tx_key, n, loss_fn=mlp.loss)
    params = mlp.init_params(init_key, data, num_hidden)
    states.append(init(params))
    batch_keys.append(batch_key)
  stacked = jax.tree_util.tree_map(
      lambda *leaves: jnp.stack(leaves),
      *[parallel.stack(s, n, parallel.VMAP_STATE_AXES) for s in states])
  keys = jnp.stack(batch_keys)
  chunk = parallel.vmapped(parallel.scan_steps(step, num_steps // num_evals), n,
                           in_axes=(parallel.VMAP_STATE_AXES, None, None),
                           out_axes=(parallel.VMAP_STATE_AXES, 0))
  run = jax.jit(jax.vmap(chunk, in_axes=(0, None, 0)))
  with warnings.catch_warnings():   # a pairing costlier than float32 is still a row
    warnings.simplefilter("ignore", transforms.WireCostWarning)
    compiled = run.lower(stacked, data, keys).compile(compiler_options=FAST_COMPILE)
    one_step = parallel.pmapped(step, devices).lower(
        *parallel.replicate((states[0], data, batch_keys[0]), devices))
    report = wire.parse(one_step.compile(compiler_options=FAST_COMPILE).as_text())
  compile_seconds = time.perf_counter() - start
  # A line search's all-reduces sit in a while loop the program holds once: each step
  # sends the bits outside it, plus the loop's bits once per trial.
  exchange_bits, trial_bits = report.fixed_bits, report.loop_bits

  tau = experiment.steps_per_exchange(config)
  finite = np.ones(len(seeds), bool)
  trials = np.zeros(len(seeds))   # line-search trials so far, per seed
  history = {"steps": [], "train_loss": [], "test_accuracy": [],
             "cumulative_wire_bits_per_device": []}

  def record(steps, state):
    scores = jax.device_get(_evaluate(model_params(state), data))
    history["steps"].append(steps)
    for name in ("train_loss", "test_accuracy"):
      history[name].append([float(v) if ok else None for v, ok in zip(scores[name], finite)])
    history["cumulative_wire_bits_per_device"].append(
        [easgd.exchanges(steps, tau) * exchange_bits + t * trial_bits for t in trials])

  start = time.perf_counter()
  state = stacked
  record(0, state)
  for e in range(1, num_evals + 1):
    state, metrics = compiled(state, data, keys)
    losses = np.asarray(metrics["loss"])   # [S, N, steps]
    finite &= np.isfinite(losses).all(axis=(1, 2))
    if "linesearch_trials" in metrics:   # the same on every device: device 0's
      trials += np.asarray(metrics["linesearch_trials"])[:, 0].sum(axis=-1)
    record(e * num_steps // num_evals, state)
  jax.block_until_ready(state)
  sent = np.mean(history["cumulative_wire_bits_per_device"][-1])
  return {
      "history": history,
      "finite": finite.tolist(),
      "steps_per_exchange": tau,
      "wire_bits_per_exchange_per_device": exchange_bits,
      "predicted_wire_bits_per_exchange_per_device":
          experiment.predicted_wire_bits(config, states[0].params, n) * tau,
      "wire_bits_per_linesearch_trial": trial_bits,
      "predicted_wire_bits_per_linesearch_trial":
          linesearch.wire_bits(n, 1) - linesearch.wire_bits(n, 0) if trial_bits else 0.0,
      "linesearch_trials": trials.tolist(),
      "wire_bits_per_step_per_device": float(sent) / num_steps,
      "compile_seconds": compile_seconds,
      "run_seconds": time.perf_counter() - start,
  }


def spread(values) -> dict:
  """``{"mean", "std", "min", "max", "n"}`` of the finite numbers among ``values``.

  ``std`` is the sample standard deviation (``ddof=1``; 0 for one value); every field but
  ``n`` is None when no value is finite.

  Example:
    >>> spread([0.9, 0.95, None])["n"]
    2
  """
  xs = np.array([v for v in values if v is not None and math.isfinite(v)], np.float64)
  if not xs.size:
    return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
  return {"mean": float(xs.mean()), "std": float(xs.std(ddof=1)) if xs.size > 1 else 0.0,
          "min": float(xs.min()), "max": float(xs.max()), "n": int(xs.size)}
