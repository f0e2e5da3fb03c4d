"""EASGD, EAMSGD and DOWNPOUR (jrelu.easgd): the algebra, a reference, convergence, resume.

Zhang, Choromanska, LeCun, "Deep learning with Elastic Averaging SGD" (arXiv 1412.6651).
The algorithm tests run N simulated workers in one program (``jrelu.parallel.vmapped``,
which computes what pmap computes) on a small least-squares problem, whose programs
compile fast. On the planted ReLU, one test trains compressed EAMSGD through
``jrelu.experiment.run`` on 8 pmapped devices: convergence, resume, bits per exchange.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrelu import checkpoint
from jrelu import compressors
from jrelu import easgd
from jrelu import experiment
from jrelu import parallel
from jrelu import transforms
from jrelu import wire

import helpers

AXES = (parallel.VMAP_STATE_AXES, None, None)
DIM, NUM_SAMPLES, BATCH = 12, 96, 8
KEY = jax.random.key(7)


def normal(seed, *shape):
  """float32 N(0, 1) draws from NumPy (eager jax.random would compile every primitive)."""
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def least_squares():
  """``(x, y)``: 96 rows of a noisy linear model in 12 dimensions."""
  x = normal(0, NUM_SAMPLES, DIM)
  return x, x @ normal(1, DIM) + np.float32(0.1) * normal(2, NUM_SAMPLES)


def loss(w, x, y):
  return 0.5 * jnp.mean(jnp.square(x @ w - y))


def batch_fn(key, data, shard_index, num_shards):
  """Worker i's BATCH consecutive rows, from an offset of its own, anywhere in the data."""
  del num_shards
  x, y = data
  start = jax.random.randint(jax.random.fold_in(key, shard_index), (), 0,
                             NUM_SAMPLES - BATCH + 1)
  return (jax.lax.dynamic_slice_in_dim(x, start, BATCH),
          jax.lax.dynamic_slice_in_dim(y, start, BATCH))


def zero_loss(w, x, y):
  """A loss whose gradient is exactly zero: the steps are the elastic exchange alone."""
  del x, y
  return 0.0 * jnp.sum(w)


def vmapped(step, num_workers, num_steps=1):
  return parallel.vmapped(parallel.scan_steps(step, num_steps), num_workers, in_axes=AXES,
                          out_axes=(parallel.VMAP_STATE_AXES, 0))


def stack(state, num_workers):
  return parallel.stack(state, num_workers, parallel.VMAP_STATE_AXES)


@pytest.mark.parametrize("ef", [False, True], ids=["float32", "top_k_ef"])
def test_synchronous_exchange_conserves_workers_plus_center_and_contracts(ef):
  # p = 4, alpha = 0.9 / 4, exchanges with no gradient step. Each exchange keeps
  # sum_i x_i + x~ (the center counted once); on the p + 1 variables it is I - alpha L
  # (L: the star graph's Laplacian, symmetric), so the deviation from the common value
  # z = (sum_i x_i + x~) / (p + 1) shrinks in l2 by at least
  # max(|1 - alpha|, |1 - (p + 1) alpha|) = 0.775 per exchange.
  # Compressed with error feedback (top-k, all_gather: the mean is the mean of what was
  # sent), what the center has not received stays in the residuals e_i:
  # sum_i x_i + x~ + alpha sum_i e_i is conserved instead.
  p, alpha = 4, 0.9 / 4
  rounds = 3 if ef else 50   # with error feedback the residuals too shrink with rounds
  if ef:
    comm = transforms.error_feedback(compressors.top_k(fraction=0.25), key=jax.random.key(1),
                                     axis_name="data", aggregation="all_gather")
  else:
    comm = easgd.exact_mean()
  step = easgd.make_step(zero_loss, batch_fn, algorithm="easgd", learning_rate=0.1,
                         communicate=comm)
  workers, center = normal(2, p, DIM), normal(3, DIM)
  state = stack(easgd.init_state(center, algorithm="easgd", communicate=comm), p)
  state = state._replace(params=workers,
                         opt_state=state.opt_state._replace(center=np.stack([center] * p)))
  final, _ = vmapped(step, p, rounds)(state, least_squares(), KEY)
  x, c = np.asarray(final.params, np.float64), np.asarray(final.opt_state.center, np.float64)
  np.testing.assert_array_equal(c, c[:1].repeat(p, 0))   # one center on every device
  total = np.asarray(workers.sum(0) + center, np.float64)
  residual = 0.0
  if ef:
    residual = alpha * np.asarray(final.opt_state.communicate.error, np.float64).sum(0)
    assert np.abs(residual).max() > 1e-3   # top-k left something behind
  np.testing.assert_allclose(x.sum(0) + c[0] + residual, total, rtol=0, atol=1e-5)
  if not ef:
    z = total / (p + 1)
    deviation = lambda xs, cs: np.sqrt(((xs - z) ** 2).sum() + ((cs - z) ** 2).sum())
    before = deviation(np.asarray(workers), np.asarray(center))
    assert deviation(x, c[0]) <= 0.775**rounds * before + 1e-5
    assert 0.775**rounds < 1e-5   # so: every x_i and x~ reached z
    # The p-weighted sum is not what the exchange keeps.
    assert np.abs(x.sum(0) + p * c[0] - (workers.sum(0) + p * center)).max() > 0.1


@functools.partial(jax.jit, static_argnums=(3,))
def _gradients(points, step, data, num_workers):
  key = jax.random.fold_in(KEY, step)
  return jax.vmap(lambda w, i: jax.grad(loss)(w, *batch_fn(key, data, i, num_workers)))(
      points, jnp.arange(num_workers))


def gradients(points, step, data):
  """Each worker's gradient at its point (row i: worker i) on its batch of ``step``."""
  points = np.asarray(points, np.float32)
  return np.asarray(_gradients(points, step, data, len(points)), np.float64)


def test_downpour_tau_1_and_the_easgd_consensus_limit_are_minibatch_sgd():
  # DOWNPOUR, tau = 1: the center adds the p pushes -eta/p g_i and every worker pulls it,
  # one SGD step of eta on the mean of the shard gradients (the global batch's gradient).
  # EASGD: z = (sum_i x_i + x~) / (p + 1) moves only by the gradient steps,
  # z <- z - eta / (p + 1) sum_i g_i(x_i); from equal starting points its first step is
  # minibatch SGD's with learning rate eta p / (p + 1), and the exchanges that follow
  # (the consensus limit) only contract everything to z (the test above).
  p, eta, steps = 8, 0.3, 12
  data = least_squares()
  w0 = np.zeros(DIM)
  comm = easgd.exact_mean()
  sgd = [w0]
  for t in range(steps):
    sgd.append(sgd[-1] - eta * gradients(np.stack([sgd[-1]] * p), t, data).mean(0))
  down = easgd.make_step(loss, batch_fn, algorithm="downpour", learning_rate=eta / p,
                         communicate=comm)
  state, _ = vmapped(down, p, steps)(
      stack(easgd.init_state(jnp.zeros(DIM), algorithm="downpour", communicate=comm), p),
      data, KEY)
  np.testing.assert_allclose(state.params, np.stack([sgd[-1]] * p), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.opt_state.center, np.stack([sgd[-1]] * p), rtol=1e-5,
                             atol=1e-6)
  assert np.abs(sgd[-1]).max() > 0.1   # it moved
  elastic = easgd.make_step(loss, batch_fn, algorithm="easgd",
                            learning_rate=eta * (p + 1) / p, communicate=comm)
  state, _ = vmapped(elastic, p)(
      stack(easgd.init_state(jnp.zeros(DIM), algorithm="easgd", communicate=comm), p), data,
      KEY)
  z = (state.params.sum(0) + state.opt_state.center[0]) / (p + 1)
  np.testing.assert_allclose(z, sgd[1], rtol=1e-5, atol=1e-6)




def reference_run(algorithm, exchange, tau, num_steps, p, eta, alpha, delta, data, w0):
  """The authors' per-worker updates (mpiT's optim-eamsgd.lua, optim-downpour.lua), in numpy.

  Worker i, at step t: if t % tau == 0 it meets the center (synchronous: all at the
  center of the step's start; round-robin: one after another, in order), then moves
  locally; EAMSGD's local move is v <- delta v; w <- w + v; g = grad(w); w <- w - eta g;
  v <- v - eta g, and the elastic difference alpha (w - center), taken before the local
  move, is subtracted after it. DOWNPOUR adds -eta g to its push; at an exchange it
  pushes, the center adds it, and the worker takes the center instead of moving.
  """
  x = [np.asarray(w0, np.float64) for _ in range(p)]
  c = np.asarray(w0, np.float64)
  v = [np.zeros_like(c) for _ in range(p)]
  pushes = [np.zeros_like(c) for _ in range(p)]
  for t in range(num_steps):
    sync = t % tau == 0
    if algorithm == "downpour":
      g = gradients(x, t, data)
      for i in range(p):
        pushes[i] = pushes[i] - eta * g[i]
        if not sync:
          x[i] = x[i] - eta * g[i]
      if sync:
        for i in range(p):
          c = c + pushes[i]
          x[i] = c.copy()   # round-robin: the center right after this worker's push
        if exchange == "synchronous":
          x = [c.copy() for _ in range(p)]
        pushes = [np.zeros_like(c) for _ in range(p)]
      continue
    diffs = [np.zeros_like(c)] * p
    if sync:
      start = c.copy()
      for i in range(p):
        seen = c if exchange == "round_robin" else start
        diffs[i] = alpha * (x[i] - seen)
        c = c + diffs[i]
    v = [delta * v[i] for i in range(p)]
    g = gradients([x[i] + v[i] for i in range(p)], t, data)
    for i in range(p):
      w = x[i] + v[i] - eta * g[i]
      v[i] = v[i] - eta * g[i]
      x[i] = w - diffs[i]
  return np.stack(x), c


@pytest.mark.parametrize("algorithm,exchange,tau", [
    ("eamsgd", "synchronous", 3), ("eamsgd", "round_robin", 2),
    ("downpour", "round_robin", 2)])   # synchronous DOWNPOUR: the test above
def test_matches_the_authors_updates(algorithm, exchange, tau):
  p, steps, eta, alpha, delta = 4, 8, 0.1, 0.2, 0.5
  data = least_squares()
  w0 = normal(5, DIM)
  comm = easgd.exact_mean() if exchange == "synchronous" else None
  step = easgd.make_step(loss, batch_fn, algorithm=algorithm, learning_rate=eta, tau=tau,
                         alpha=alpha, momentum=delta, communicate=comm, exchange=exchange)
  state, _ = vmapped(step, p, steps)(
      stack(easgd.init_state(w0, algorithm=algorithm, communicate=comm, exchange=exchange),
            p), data, KEY)
  workers, center = reference_run(algorithm, exchange, tau, steps, p, eta, alpha, delta, data,
                                  w0)
  np.testing.assert_allclose(state.params, workers, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state.opt_state.center, np.stack([center] * p), rtol=1e-5,
                             atol=1e-5)
  assert np.abs(workers - workers[:1]).max() > 1e-2   # the workers did part ways


def test_round_robin_sends_a_float32_all_gather_per_exchange():
  # One compiled step on 8 pmapped devices: the collectives of one exchange (in the
  # branch taken every tau steps), as experiment.predicted_wire_bits says.
  devices = jax.devices()[:8]
  step = easgd.make_step(loss, batch_fn, algorithm="eamsgd", learning_rate=0.1, tau=5,
                         exchange="round_robin")
  state = easgd.init_state(jnp.zeros(DIM), algorithm="eamsgd", communicate=None,
                           exchange="round_robin")
  report = wire.measure(parallel.pmapped(step, devices),
                        *parallel.replicate((state, least_squares(), KEY), devices))
  assert [c.op for c in report.collectives] == ["all-gather"]
  assert report.sent_bits == 7 * 32 * DIM
  config = experiment.Config(algorithm="eamsgd", exchange="round_robin", tau=5,
                             compressor="none")
  assert experiment.predicted_wire_bits(config, jnp.zeros(DIM), 8) == report.sent_bits / 5


def test_compressed_easgd_converges_and_resumes_with_every_worker_and_the_center(
    tmp_path, monkeypatch):
  # experiment.run on 8 pmapped devices, EAMSGD with top-k + error feedback on the
  # elastic differences, tau = 3: the center reaches the planted weights (an
  # interpolation problem: the workers' gradient noise vanishes there). Stopped after
  # step 150 and run again, it ends bit for bit where the run never stopped does: each
  # device's own parameters, the center, momenta and residuals go through the checkpoint
  # (exchanges fall on both sides of its boundaries: 3 does not divide 50). The
  # summary's bits per step are one exchange's (read from the compiled step) over tau,
  # and the cumulative bits count the exchanges made, ceil(step / tau).
  monkeypatch.setattr(experiment.loop, "_plot", lambda *args: None)
  config = experiment.Config(dim=20, num_samples=160, batch_size=64, learning_rate=0.2,
                             num_steps=600, log_every=50, algorithm="eamsgd", tau=3,
                             momentum=0.5, compressor="top_k", error_feedback=True)
  run = lambda workdir, **kw: experiment.run(config, str(workdir), devices=jax.devices()[:8],
                                            checkpoint_every=100, keep_checkpoints=9, **kw)

  def crash(record):
    if record["step"] == 150:
      raise RuntimeError("crash after step 150")

  summary = run(tmp_path / "straight")
  assert summary["status"] == "reached_target" and summary["relative_error"] <= 1e-6
  with pytest.raises(RuntimeError, match="crash"):
    run(tmp_path / "stopped", callbacks=[crash])
  run(tmp_path / "stopped")
  helpers.assert_same_run(tmp_path / "straight", tmp_path / "stopped")
  arrays, _ = checkpoint.restore(str(tmp_path / "straight" / "checkpoints"), None, step=100)
  workers, center = arrays[0], arrays[1]
  assert workers.shape == center.shape == (8, 20)
  assert np.abs(workers - workers[:1]).max() > 1e-6    # each device its own parameters
  np.testing.assert_array_equal(center, center[:1].repeat(8, 0))

  assert (summary["alpha"], summary["tau"], summary["aggregation"]) == (0.9 / 8, 3,
                                                                        "two_phase")
  assert summary["method"] == "eamsgd tau=3 alpha=0.1125 momentum=0.5, top_k fraction=0.1 + EF"
  per_exchange = summary["wire_bits_per_exchange_per_device"]
  assert per_exchange == 2 * 7 * compressors.top_k(fraction=0.1).wire_bits((3,))
  assert (summary["wire_bits_per_step_per_device"]
          == summary["predicted_wire_bits_per_step_per_device"] == per_exchange / 3)
  _, _, lines = helpers.run_outcome(tmp_path / "straight")
  assert [l["cumulative_wire_bits_per_device"] for l in lines] == [
      math.ceil(l["step"] / 3) * per_exchange for l in lines]
