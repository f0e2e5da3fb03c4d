"""Data-parallel training: one per-device step, a scanned loop, and two SPMD wrappers.

The per-device step (``make_step``) draws this device's shard of the global mini-batch,
takes the gradient of its *local* loss, hands that per-device gradient to the optax
transform (which compresses and averages it across ``axis_name``) and applies the update.
``scan_steps`` runs many steps inside one compiled call, so the host is not on the
per-step path.

Both wrappers map the same per-device function over a leading device axis:

* ``pmapped``: ``jax.pmap`` (the design card's default);
* ``shard_mapped``: ``jax.jit(jax.shard_map(...))`` with every argument split along the
  device axis, the path JAX recommends today.

A third, ``vmapped``, simulates N devices inside one program on one device
(``jax.jit(jax.vmap(..., axis_name=...))``): the collectives become array operations, so
nothing synchronizes N device threads and the per-device work is batched. It computes the
same numbers; it is the fast way to study N workers on a CPU with fewer cores than N.
Its program has no collectives, so measure wire bits on ``pmapped``.

Every argument and result carries a leading axis of size N (``replicate`` builds the
inputs). Parameters therefore enter the per-device function as device-varying values,
and ``jax.grad`` returns each device's own gradient under both wrappers. A test fails if
compression ever sees a summed gradient.

In your own ``jax.jit(jax.shard_map(...))`` you can keep the parameters replicated
(``in_specs`` and ``out_specs`` ``P()``): differentiate a device-varying copy,
``jax.grad(loss)(jax.lax.pcast(params, axis_name, to="varying"), ...)``, so that the
compressor gets this device's gradient (differentiating ``params`` itself would give the
gradient already summed over devices). The transforms' compressed mean is typed as
invariant (``jrelu.aggregation``), so the updated parameters and an optax state without
per-device parts (``jrelu.compress``, ``jrelu.qsgd``) return with ``P()``. README's "In
your own optax code" has the complete program.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jrelu import _checks
from jrelu import processes

AXIS_NAME = "data"
WRAPPERS = ("pmap", "shard_map")
DEFAULT_CPU_DEVICES = 8
MAX_CPU_DEVICES = 256


class TrainState(NamedTuple):
  """What one device carries from step to step.

  Attributes:
    params: the model parameters (a pytree).
    opt_state: the optax state of ``tx``.
    step: int32 scalar, steps taken so far (folded into the batch key).
  """
  params: Any
  opt_state: Any
  step: jax.Array


def init_state(params, tx: optax.GradientTransformation) -> TrainState:
  """Returns the initial :class:`TrainState` for ``params`` under ``tx``."""
  return TrainState(params, tx.init(params), jnp.zeros((), jnp.int32))


def make_step(loss_fn: Callable, batch_fn: Callable, tx: optax.GradientTransformation, *,
              metrics_fn: Callable | None = None, axis_name: str | None = AXIS_NAME,
              extra_args: bool = False, opt_metrics_fn: Callable | None = None):
  """Builds one per-device training step.

  Args:
    loss_fn: ``loss_fn(params, *batch) -> scalar``, the loss on this device's shard.
    batch_fn: ``batch_fn(key, data, shard_index, num_shards) -> batch`` (a tuple), this
      device's shard of the global mini-batch for the step ``key``.
    tx: the optax transform; built with the same ``axis_name`` so that it averages the
      compressed gradients across devices.
    metrics_fn: optional ``metrics_fn(params, data) -> dict`` of scalars computed after
      the update (no collectives, so it costs no wire bits).
    axis_name: the device axis, or None for a single-device step.
    extra_args: also pass ``tx.update`` optax's line-search arguments (its
      ``GradientTransformationExtraArgs`` protocol): ``value=`` this device's loss,
      ``grad=`` its gradient, ``value_fn=`` the loss as ``value_fn(params, batch)`` and
      ``batch=`` its shard, all of this device (``jrelu.armijo`` averages what it needs).
    opt_metrics_fn: optional ``opt_metrics_fn(opt_state) -> dict`` of scalars read from
      the updated optax state (e.g. ``jrelu.linesearch.metrics``: step size and trials).

  Returns:
    ``step(state, data, key) -> (state, metrics)`` where ``metrics["loss"]`` is this
    device's loss on its shard before the update.

  Example:
    >>> step = make_step(planted.loss, batch_fn, tx)
    >>> run = pmapped(scan_steps(step, 100), jax.devices())

  References:
    Kalan, Soltanolkotabi, Avestimehr, "Fitting ReLUs via SGD and Quantized SGD",
    arXiv 1901.06587 (mini-batch gradients computed across workers, quantized, averaged);
    Alistarh et al., "QSGD", arXiv 1610.02132, Algorithm 1.
  """

  def step(state: TrainState, data, key):
    if axis_name is None:
      shard_index, num_shards = 0, 1
    else:
      shard_index = jax.lax.axis_index(axis_name)
      num_shards = jax.lax.axis_size(axis_name)
    batch = batch_fn(jax.random.fold_in(key, state.step), data, shard_index, num_shards)
    loss, grads = jax.value_and_grad(loss_fn)(state.params, *batch)
    if extra_args:
      updates, opt_state = tx.update(grads, state.opt_state, state.params, value=loss,
                                     grad=grads, value_fn=_batch_loss(loss_fn), batch=batch)
    else:
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss}
    if opt_metrics_fn is not None:
      metrics.update(opt_metrics_fn(opt_state))
    if metrics_fn is not None:
      metrics.update(metrics_fn(params, data))
    return TrainState(params, opt_state, state.step + 1), metrics

  return step


def _batch_loss(loss_fn: Callable) -> Callable:
  """``value_fn(params, batch) = loss_fn(params, *batch)``: optax reads the name ``batch``."""
  def value_fn(params, batch):
    return loss_fn(params, *batch)
  return value_fn


def scan_steps(step: Callable, num_steps: int):
  """Runs ``step`` ``num_steps`` times inside one ``lax.scan``.

  Returns:
    ``run(state, data, key) -> (state, metrics)`` with every metric stacked to
    ``[num_steps]``.

  Raises:
    ValueError: if ``num_steps < 1``.
  """
  _checks.integer("num_steps", num_steps)

  def run(state, data, key):
    return jax.lax.scan(lambda s, _: step(s, data, key), state, length=num_steps)

  return run


def pmapped(fn: Callable, devices, axis_name: str = AXIS_NAME):
  """``jax.pmap`` of a per-device function over ``devices``.

  Args:
    fn: per-device function, e.g. ``scan_steps(make_step(...), k)``.
    devices: the N devices.
    axis_name: the name collectives inside ``fn`` use.

  Returns:
    A function whose arguments and results carry a leading axis of size N (build the
    inputs with :func:`replicate`).

  With devices of several processes (``jrelu.processes``), ``jax.pmap`` itself takes and
  returns each process's local slices; the function returned here keeps the interface of
  :func:`shard_mapped` instead: global arrays in, global arrays out (each process passes
  and receives the same arrays, and touches the shards of its own devices only).

  Example:
    >>> run = pmapped(scan_steps(step, 100), devices)
    >>> state, metrics = run(*replicate((state, data, key), devices))
  """
  devices = list(devices)
  mapped = jax.pmap(fn, axis_name=axis_name, devices=devices)
  if all(d.process_index == jax.process_index() for d in devices):
    return mapped
  return _GlobalPmap(mapped, devices)


class _GlobalPmap:
  """A ``jax.pmap`` over the devices of several processes, on global arrays.

  Arguments spread over processes become this process's local slices (its devices'
  shards, no copy) before the call; the local results become global arrays again.
  """

  def __init__(self, mapped, devices):
    self._mapped = mapped
    self._local = [d for d in devices if d.process_index == jax.process_index()]
    self._local_sharding = _axis_sharding(self._local)
    self._global_sharding = _axis_sharding(devices)
    self._size = len(devices)

  def _to_local(self, leaf):
    if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable:
      return leaf
    shards = {s.device: s.data for s in leaf.addressable_shards}
    return jax.make_array_from_single_device_arrays(
        (len(self._local),) + leaf.shape[1:], self._local_sharding,
        [shards[d] for d in self._local])

  def _to_global(self, leaf):
    shards = {s.device: s.data for s in leaf.addressable_shards}
    return jax.make_array_from_single_device_arrays(
        (self._size,) + leaf.shape[1:], self._global_sharding,
        [shards[d] for d in self._local])

  def __call__(self, *args):
    out = self._mapped(*jax.tree_util.tree_map(self._to_local, args))
    return jax.tree_util.tree_map(self._to_global, out)

  def lower(self, *args):
    return self._mapped.lower(*jax.tree_util.tree_map(self._to_local, args))


def _axis_sharding(devices) -> NamedSharding:
  """Axis 0 split over ``devices`` in order (the layout of :func:`replicate`)."""
  return NamedSharding(Mesh(np.asarray(list(devices)), ("devices",)),
                       PartitionSpec("devices"))


def shard_mapped(fn: Callable, devices, axis_name: str = AXIS_NAME):
  """``jax.jit(jax.shard_map(fn))`` splitting every argument and result along axis 0.

  Same interface and numbers as :func:`pmapped`: arguments have a leading axis of size N
  and ``fn`` sees one device's slice without that axis.

  Args:
    fn: per-device function.
    devices: the N devices, laid out as a one-axis mesh.
    axis_name: the mesh axis name collectives inside ``fn`` use.

  Returns:
    A jitted function over ``[N, ...]`` arguments sharded along axis 0.

  Example:
    >>> run = shard_mapped(scan_steps(step, 100), devices)
  """
  mesh = Mesh(np.asarray(list(devices)), (axis_name,))
  spec = PartitionSpec(axis_name)

  def per_device(*args):
    out = fn(*jax.tree_util.tree_map(lambda a: a[0], args))
    return jax.tree_util.tree_map(lambda a: a[None], out)

  return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=spec, out_specs=spec))


# ``in_axes`` / ``out_axes`` of a TrainState for ``vmapped``: the step counter is the same on
# every device, so it stays unmapped and whatever depends on it only (the step's batch
# key, the window offset) is computed once, not once per simulated device.
VMAP_STATE_AXES = TrainState(params=0, opt_state=0, step=None)


def vmapped(fn: Callable, num_devices: int, axis_name: str = AXIS_NAME, *, in_axes=0,
            out_axes=0):
  """Simulates ``num_devices`` devices in one jitted program: ``jit(vmap(fn, axis_name))``.

  ``fn`` is the same per-device function ``pmapped`` takes; its collectives over
  ``axis_name`` (``psum``, ``all_gather``, ``all_to_all``, ``axis_index``) act on the
  mapped axis inside one program on one device. There is no rendezvous of N device
  threads per collective and the N devices' work runs as batched array operations, which
  on a CPU with fewer cores than N is several times faster than ``pmapped`` over
  simulated CPU devices. The results are those of ``pmapped`` (up to the order of float
  sums); the compiled program has no collectives, so read wire bits from ``pmapped``.

  Args:
    fn: per-device function, e.g. ``scan_steps(make_step(...), k)``.
    num_devices: N >= 1, the simulated devices.
    axis_name: the name collectives inside ``fn`` use.
    in_axes: ``jax.vmap`` in_axes: 0 maps an argument's leading axis of size N (as
      ``pmapped`` does); None shares one copy between all devices (a replicated data
      set, the batch key). For ``run(state, data, key)`` from :func:`scan_steps`,
      ``(VMAP_STATE_AXES, None, None)`` keeps the step counter shared too.
    out_axes: ``jax.vmap`` out_axes, e.g. ``(VMAP_STATE_AXES, 0)``.

  Returns:
    The jitted function.

  Raises:
    ValueError: if ``num_devices < 1``.

  Example:
    >>> run = vmapped(scan_steps(step, 100), 8, in_axes=(VMAP_STATE_AXES, None, None),
    ...               out_axes=(VMAP_STATE_AXES, 0))
    >>> state, metrics = run(stack(state, 8, VMAP_STATE_AXES), (dataset, w_star), key)
  """
  num_devices = _checks.integer("num_devices", num_devices)
  return jax.jit(jax.vmap(fn, in_axes=in_axes, out_axes=out_axes, axis_name=axis_name,
                          axis_size=num_devices))


def stack(tree, num_devices: int, axes=0):
  """``num_devices`` copies of every leaf of ``tree``, stacked on a new axis 0, one device.

  The input of :func:`vmapped` where :func:`replicate` builds that of :func:`pmapped`.

  Args:
    tree: pytree of arrays.
    num_devices: N.
    axes: a prefix of ``tree`` of 0 (stack) or None (leave as is), e.g.
      ``VMAP_STATE_AXES`` for a TrainState.

  Returns:
    The pytree with stacked leaves of shape ``[N, *leaf.shape]`` where ``axes`` is 0.
  """
  def put(axis, subtree):
    if axis is None:
      return subtree
    return jax.tree_util.tree_map(
        lambda a: jnp.broadcast_to(jnp.asarray(a)[None], (num_devices,) + jnp.shape(a)),
        subtree)
  return jax.tree_util.tree_map(put, axes, tree, is_leaf=lambda x: x is None)


def shard(tree, devices):
  """Places slice i of every leaf of ``tree`` (split along axis 0) on device i.

  For data that each device should hold only its part of, e.g.
  ``jrelu.sampling.split_segments(dataset, N)`` under :func:`pmapped`. With several
  processes, each places the slices of its own devices (the other slices are not read).

  Args:
    tree: pytree of arrays with a leading axis of size N.
    devices: the N devices.

  Returns:
    The pytree with the same shapes, leaf ``[N, ...]`` sharded along axis 0.

  Raises:
    ValueError: if a leaf's leading axis is not N.
  """
  devices = list(devices)
  sharding = NamedSharding(Mesh(np.asarray(devices), ("devices",)), PartitionSpec("devices"))

  def put(leaf):
    leaf = jnp.asarray(leaf)
    if leaf.ndim == 0 or leaf.shape[0] != len(devices):
      raise ValueError(f"shard needs a leading axis of size {len(devices)}, got shape "
                       f"{leaf.shape}")
    shards = [jax.device_put(leaf[i:i + 1], d) for i, d in enumerate(devices)
              if d.process_index == jax.process_index()]
    return jax.make_array_from_single_device_arrays(leaf.shape, sharding, shards)

  return jax.tree_util.tree_map(put, tree)


def wrap(parallel: str, fn: Callable, devices, axis_name: str = AXIS_NAME):
  """Wraps ``fn`` with ``"pmap"`` or ``"shard_map"``.

  Raises:
    ValueError: if ``parallel`` is unknown.
  """
  if _checks.choice("parallel", parallel, WRAPPERS) == "pmap":
    return pmapped(fn, devices, axis_name)
  return shard_mapped(fn, devices, axis_name)


def replicate(tree, devices):
  """Places one copy of every leaf of ``tree`` on each device, stacked on a new axis 0.

  Each device receives its copy directly (no N-fold array is built on one device). With
  several processes (``jrelu.processes``), ``devices`` may be global: each process places
  the copies of its own devices, from its own ``tree`` (the same in every process).

  Args:
    tree: pytree of arrays (typed PRNG keys included).
    devices: the N devices.

  Returns:
    The pytree with leaves of shape ``[N, *leaf.shape]``, sharded along axis 0.
  """
  devices = list(devices)
  sharding = NamedSharding(Mesh(np.asarray(devices), ("devices",)), PartitionSpec("devices"))

  def put(leaf):
    leaf = jnp.asarray(leaf)
    shards = [jax.device_put(leaf[None], d) for d in devices
              if d.process_index == jax.process_index()]
    return jax.make_array_from_single_device_arrays(
        (len(devices),) + leaf.shape, sharding, shards)

  return jax.tree_util.tree_map(put, tree)


def unreplicate(tree):
  """Device 0's copy of every leaf of a replicated pytree.

  Args:
    tree: pytree with leaves of shape ``[N, *shape]`` (from :func:`replicate` or a
      wrapped step).

  Returns:
    The pytree with leaves of shape ``shape``.

  Example:
    >>> params = unreplicate(state.params)
  """
  return jax.tree_util.tree_map(lambda a: a[0], tree)


def _cpu_client_threads() -> int:
  """The thread count XLA's CPU client will give its pools: ``NPROC``, else the cores.

  XLA reads the environment variable ``NPROC`` once, when the CPU client is created; the
  pools get ``max(that, number of CPU devices)`` threads.
  """
  nproc = os.environ.get("NPROC", "")
  return int(nproc) if nproc.isdigit() else (os.cpu_count() or 1)


def _reserve_cpu_client_threads(num_cpu_devices: int) -> None:
  """Gives XLA's CPU client at least ``2 * num_cpu_devices`` threads, before it starts.

  Raises ``NPROC`` to ``2 N`` when it (or, unset, the core count) is smaller. If the
  backend has already started, nothing can change: warns when its CPU pools are smaller
  than ``2 N`` for the ``N`` CPU devices it has.
  """
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    started = xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # another JAX version: assume not started
    started = False
  if not started:
    if _cpu_client_threads() < 2 * num_cpu_devices:
      os.environ["NPROC"] = str(2 * num_cpu_devices)
    return
  if jax.default_backend() != "cpu":
    return
  num_cpu_devices = jax.device_count()
  if _cpu_client_threads() < 2 * num_cpu_devices:
    warnings.warn(
        f"JAX's CPU backend started before jrelu.parallel.setup_devices could give its "
        f"{num_cpu_devices} devices {2 * num_cpu_devices} threads "
        f"(it has {max(_cpu_client_threads(), num_cpu_devices)}); a Python loop of pmap "
        "steps with collectives can then deadlock. Call setup_devices before any JAX "
        f"computation, or start Python with NPROC={2 * num_cpu_devices} or more.",
        RuntimeWarning, stacklevel=3)


def setup_devices(num_devices: int | None = None):
  """Returns the devices to train on, simulating CPU devices where there is no accelerator.

  Call it before any JAX computation: on CPU it sets ``jax_num_cpu_devices`` so that
  ``num_devices`` (default 8) simulated devices exist. With an accelerator present its
  devices are used (default: all of them).

  It also gives XLA's CPU client enough threads for the simulated devices: when the core
  count (or a user's ``NPROC``) is below ``2 N``, it sets the environment variable
  ``NPROC``, which XLA reads once, when the CPU client starts, as the size of its thread
  pools, to ``2 N``.
  Why: XLA runs each device's share of a step on one pool of ``max(cores, N)`` threads.
  A plain Python loop of ``jax.pmap`` steps runs ahead of the devices; the launches of a
  later step then wait on pool threads for a free in-flight slot of their device, while the
  current step's devices wait for each other inside a collective (an all-to-all, an
  all-gather). With cores < N those waiting launches can hold every thread that the last
  devices of the current step need, and the process aborts with XLA's "Termination
  timeout ... Expected 8 threads to join the rendezvous". With ``2 N`` threads one step's
  executions and the next step's launches always fit. ``NPROC`` is only ever raised, so
  on an accelerator it can only grow the host pools.

  Args:
    num_devices: N >= 1, or None for the default.

  Returns:
    A list of N devices.

  Raises:
    ValueError: if ``num_devices < 1``, exceeds the accelerators present, exceeds
      ``MAX_CPU_DEVICES`` simulated devices, or more CPU devices are asked for than JAX was
      started with (backends already initialized).

  Warns:
    RuntimeWarning: if the CPU backend had already started with fewer than ``2 N``
      threads (``NPROC`` unset or smaller); training still works with ``scan_steps`` or
      with a loop that blocks on its results, but a free-running pmap loop may deadlock.

  Example:
    >>> import jrelu
    >>> devices = jrelu.parallel.setup_devices(8)   # first thing, before any JAX work
    >>> run = jrelu.parallel.pmapped(step, devices)
  """
  num_devices = _checks.optional_integer("num_devices", num_devices)
  if num_devices is not None and num_devices > MAX_CPU_DEVICES:
    raise ValueError(f"num_devices must be at most {MAX_CPU_DEVICES} (each simulated "
                     f"device holds a copy of the data), got {num_devices}")
  if processes.num_processes() > 1:
    return _setup_job_devices(num_devices)
  wanted_cpu = num_devices or DEFAULT_CPU_DEVICES
  _reserve_cpu_client_threads(max(wanted_cpu, jax.config.jax_num_cpu_devices))
  try:
    if jax.config.jax_num_cpu_devices < wanted_cpu:
      jax.config.update("jax_num_cpu_devices", wanted_cpu)
  except RuntimeError:
    pass  # backends already started; the count check below explains what to do
  backend = jax.default_backend()
  available = jax.devices(backend)
  wanted = num_devices or (len(available) if backend != "cpu" else DEFAULT_CPU_DEVICES)
  if wanted > len(available):
    raise ValueError(
        f"num_devices={wanted} asked for, but only {len(available)} {backend} device(s) "
        "can be used"
        + ("; set jax_num_cpu_devices before any JAX computation" if backend == "cpu" else ""))
  return available[:wanted]


def _setup_job_devices(num_devices: int | None):
  """:func:`setup_devices` in a job of several processes (``jrelu.processes``).

  Returns every device of every process (``jax.devices()``), which the job trains on. On
  CPU each process simulates ``num_devices / num_processes`` of them (default: 8 in all,
  or 8 // num_processes each when that does not divide).
  """
  count = processes.num_processes()
  per_process = num_devices // count if num_devices else max(1, DEFAULT_CPU_DEVICES // count)
  _reserve_cpu_client_threads(max(per_process, 1))
  try:
    jax.config.update("jax_num_cpu_devices", max(per_process, 1))
  except RuntimeError:
    pass  # backends already started; the count check below explains what to do
  available = jax.devices()
  if num_devices is not None and num_devices != len(available):
    if jax.default_backend() == "cpu" and num_devices % count:
      raise ValueError(f"num_devices={num_devices} is not divisible by the {count} "
                       "processes (each process simulates as many CPU devices)")
    raise ValueError(
        f"num_devices={num_devices} asked for, but the {count} processes have "
        f"{len(available)} {jax.default_backend()} devices together; a job of several "
        "processes trains on all of them")
  return available
