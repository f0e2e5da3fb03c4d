"""NaN and Inf are never hidden: one broken device makes every device's aggregate non-finite.

The grid is every codec configuration of the contract suite x every aggregation strategy
it supports (``aggregation.supported``) x {clean, one NaN on one device, one Inf on one
device}. It runs as one jitted program under ``jax.vmap`` with a named axis (the
collectives act on the mapped axis; one compilation for the whole grid), plus
``integer_psum`` under ``jax.pmap`` on the 8 simulated CPU devices, whose ``pmax`` is the
collective that used to drop a NaN, and PowerSGD, which has its own collectives.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jrelu import aggregation
from jrelu import experiment
from jrelu import powersgd
from test_compressor_contract import COMPRESSORS

N = 8
# A matrix, so spectral ATOMO takes its SVD path; two_phase chunks are vectors of 12.
# 91 entries: rand-k's 10 chosen of them miss the broken one (the bug this catches).
SHAPE = (7, 13)
BROKEN_DEVICE, BROKEN_INDEX = 3, (1, 2)
CASES = ("clean", "nan", "inf")

# Under aggregation every codec is bound to the common key, so the contract suite's
# bound and unbound entries are the same program here, and top_k's fraction form differs
# from its k form only in the count: those three are left out to save compilation.
SAME_PROGRAM = {"fo_sgd_bound", "rand_k_bound", "top_k_frac"}
GRID = [(name, make, strategy) for name, make in COMPRESSORS if name not in SAME_PROGRAM
        for strategy in aggregation.supported(make())]


def inputs():
  """float32 ``[3, N, *SHAPE]``: the clean case, then one NaN, then one Inf on one device."""
  x = jax.random.normal(jax.random.key(1), (N,) + SHAPE)
  at = (BROKEN_DEVICE,) + BROKEN_INDEX
  return jnp.stack([x, x.at[at].set(jnp.nan), x.at[at].set(jnp.inf)])


def per_device(make, strategy):
  codec = make()

  def fn(key, x):
    device_key = jax.random.fold_in(key, jax.lax.axis_index("data"))
    return aggregation.aggregate(strategy, codec, device_key, x, "data",
                                 aggregation.common_key(key))
  return fn


def check(name, strategy, out):
  """``out``: ``[3, N, *SHAPE]`` aggregates of the three cases."""
  out = np.asarray(out).reshape(len(CASES), N, -1)
  assert np.isfinite(out[0]).all(), f"{name}/{strategy}: clean input gave non-finite"
  for case in (1, 2):
    visible = ~np.isfinite(out[case]).all(axis=1)
    assert visible.all(), (f"{name}/{strategy}: {CASES[case]} on device {BROKEN_DEVICE} "
                           f"hidden on devices {np.nonzero(~visible)[0].tolist()}")


def test_every_codec_and_strategy_under_vmap():
  fns = [per_device(make, strategy) for _, make, strategy in GRID]

  @jax.jit
  def grid(key, xs):
    # cases x devices; the inner vmap is the device axis the collectives reduce over.
    return [jax.vmap(jax.vmap(fn, in_axes=(None, 0), axis_name="data"),
                     in_axes=(None, 0))(key, xs) for fn in fns]

  outs = grid(jax.random.key(0), inputs())
  for (name, _, strategy), out in zip(GRID, outs):
    check(name, strategy, out)


def test_integer_psum_under_pmap():
  # CPU pmax drops a NaN operand: the path that hid a NaN worker before.
  makes = [(name, make) for name, make, strategy in GRID if strategy == "integer_psum"]
  fns = [per_device(make, "integer_psum") for _, make in makes]
  run = jax.pmap(lambda key, x: [jax.vmap(fn, in_axes=(None, 0))(key, x) for fn in fns],
                 axis_name="data", in_axes=(None, 0), devices=jax.devices()[:N])
  outs = run(jax.random.key(0), jnp.moveaxis(inputs(), 1, 0))
  for (name, _), out in zip(makes, outs):
    check(name, "integer_psum(pmap)", np.moveaxis(np.asarray(out), 0, 1))


def test_grid_covers_every_registry_codec():
  assert {make().name for _, make, _ in GRID} >= set(
      n for n in experiment.COMPRESSORS if n != experiment.POWERSGD)
  assert len(GRID) == 45


def test_powersgd():
  # PowerSGD all-reduces its own factors: a NaN in a matrix leaf (through P and Q) and an
  # Inf in a vector leaf (sent uncompressed) on one device reach every device.
  tx = powersgd.powersgd(1, key=jax.random.key(0), axis_name="data")
  params = {"m": jnp.zeros((6, 5)), "v": jnp.zeros(4)}
  grads = {"m": jax.random.normal(jax.random.key(1), (N, 6, 5)),
           "v": jax.random.normal(jax.random.key(2), (N, 4))}
  cases = {"m": jnp.stack([grads["m"].at[BROKEN_DEVICE, 0, 0].set(jnp.nan), grads["m"]]),
           "v": jnp.stack([grads["v"], grads["v"].at[BROKEN_DEVICE, 0].set(jnp.inf)])}

  def per_device(g):
    return tx.update(g, tx.init(params), params)[0]

  out = jax.jit(jax.vmap(jax.vmap(per_device, axis_name="data")))(cases)
  m, v = (np.asarray(out[k]).reshape(2, N, -1) for k in ("m", "v"))
  assert (~np.isfinite(m[0])).any(axis=1).all() and np.isfinite(m[1]).all()
  assert (~np.isfinite(v[1])).any(axis=1).all() and np.isfinite(v[0]).all()
