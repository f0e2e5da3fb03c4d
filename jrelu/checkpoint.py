"""Checkpoints of a training state with orbax-checkpoint: save, restore, latest step.

A checkpoint holds any pytree of arrays (``params``, the full optax state, the step
counter, typed PRNG keys included) plus a JSON-able ``metadata`` dict, in
``DIRECTORY/<step>/``. orbax writes each checkpoint into a temporary directory and
renames it when complete, so a process killed mid-write leaves no half checkpoint that a
later :func:`restore` could read; the last ``keep`` checkpoints are kept.

Typed PRNG keys (``jax.random.key``) are stored as their raw ``key_data`` and rewrapped
on restore with the implementation of the matching leaf of ``like``, so a restored state
continues bit for bit: the same keys, residuals, momenta and factors as the saved one.

    state = (params, opt_state)
    checkpoint.save("ckpt", 100, state, {"note": "anything JSON"})
    state, metadata = checkpoint.restore("ckpt", like=state)

Used by ``jrelu.experiment.run`` (one checkpoint every ``checkpoint_every`` steps) and
usable in any optax loop. The problem the library trains is that of Kalan,
Soltanolkotabi, Avestimehr, "Fitting ReLUs via SGD and Quantized SGD" (arXiv 1901.06587).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from jrelu import _checks
from jrelu import processes


def _manager(directory: str, keep: int = 1, *, collective: bool = False):
  """An orbax CheckpointManager of ``directory``.

  With several processes (``jrelu.processes``), a ``collective`` manager spans all of
  them (every process must make it and call it; process 0 writes); any other manager
  reads for this process alone, so that reading needs no other process.
  """
  # Imported here: orbax takes about 1.3 s to import, which ``import jrelu`` need not pay.
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  if processes.num_processes() > 1 and not collective:
    me = processes.process_id()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=False, enable_async_checkpointing=False,
        cleanup_tmp_directories=False,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}))
  else:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=False,
        cleanup_tmp_directories=True)
  return ocp, ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _is_key(leaf) -> bool:
  return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def save(directory: str, step: int, tree, metadata: dict | None = None, *,
         keep: int = 3) -> None:
  """Writes ``tree`` and ``metadata`` as the checkpoint of ``step`` under ``directory``.

  Args:
    directory: where checkpoints go (created if missing); one subdirectory per step.
    step: int >= 0, the checkpoint's step number. Saving a step that already exists
      does nothing (the checkpoint of a step never changes).
    tree: pytree of arrays (numpy or jax, typed PRNG keys included), e.g.
      ``(params, opt_state)``; sharded jax arrays are gathered to the host. With several
      processes (``jrelu.processes``) every process calls ``save`` with its part of the
      same global arrays; they are all-gathered and process 0 alone writes them
      (orbax's multi-process save of host arrays).
    metadata: JSON-able dict stored next to it (default ``{}``).
    keep: int >= 1, how many of the latest checkpoints to keep; older ones are deleted.

  Raises:
    ValueError: for a bad ``step`` or ``keep``.
    OSError: when the checkpoint cannot be written (the earlier ones are kept).

  Example:
    >>> save("runs/x/checkpoints", 500, (params, opt_state), {"seed": 0})
  """
  _checks.integer("step", step, 0)
  _checks.integer("keep", keep)
  ocp, manager = _manager(directory, keep, collective=True)
  try:
    if step in manager.all_steps():
      return
    leaves = jax.tree_util.tree_leaves(tree)
    arrays = {str(i): processes.host_array(
        jax.random.key_data(leaf) if _is_key(leaf) else leaf)
              for i, leaf in enumerate(leaves)}
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(arrays), metadata=ocp.args.JsonSave(metadata or {})))
    manager.wait_until_finished()
  finally:
    manager.close()


def latest_step(directory: str) -> int | None:
  """The step of the newest complete checkpoint under ``directory``, or None if none.

  Example:
    >>> latest_step("runs/x/checkpoints")
    500
  """
  if not os.path.isdir(directory):
    return None
  _, manager = _manager(directory)
  try:
    return manager.latest_step()
  finally:
    manager.close()


def restore(directory: str, like, step: int | None = None):
  """Reads a checkpoint of :func:`save` back into the structure of ``like``.

  Args:
    directory: the directory given to :func:`save`.
    like: a pytree with the saved structure, shapes and dtypes (e.g. a freshly
      initialized state); its jax-array leaves give each restored leaf its sharding, its
      typed-key leaves the PRNG implementation. None: return the saved leaves as a list
      of numpy arrays (typed keys as their key data), in ``tree_leaves`` order.
    step: which checkpoint; default the latest.

  Returns:
    ``(tree, metadata)``: the saved tree in the structure of ``like`` (jax arrays placed
    like ``like``'s, numpy arrays elsewhere) and the saved metadata dict.

  Raises:
    FileNotFoundError: when ``directory`` holds no complete checkpoint (of ``step``).
    ValueError: when the checkpoint's leaves do not match ``like`` (count, shape or
      dtype), naming the first leaf that differs.

  Example:
    >>> (params, opt_state), meta = restore("runs/x/checkpoints", like=(params, opt_state))
  """
  step, restored = _read(directory, step, state=True)
  arrays = restored["state"]
  if like is None:
    return [np.asarray(arrays[str(i)]) for i in range(len(arrays))], dict(
        restored["metadata"])
  leaves, treedef = jax.tree_util.tree_flatten(like)
  if len(arrays) != len(leaves):
    raise ValueError(f"checkpoint {step} in {directory} holds {len(arrays)} arrays, the "
                     f"state has {len(leaves)}")
  out = []
  for i, leaf in enumerate(leaves):
    value = np.asarray(arrays[str(i)])
    expected = (jax.eval_shape(jax.random.key_data, leaf) if _is_key(leaf)
                else np.asarray(leaf) if not isinstance(leaf, jax.Array) else leaf)
    if value.shape != expected.shape or value.dtype != expected.dtype:
      raise ValueError(f"checkpoint {step} in {directory}: array {i} is {value.dtype}"
                       f"{list(value.shape)}, the state's is {expected.dtype}"
                       f"{list(expected.shape)}")
    spread = isinstance(leaf, jax.Array) and not leaf.is_fully_addressable
    if spread:  # over several processes: each places the shards of its own devices
      value = jax.make_array_from_callback(value.shape, leaf.sharding,
                                           lambda index, v=value: v[index])
    if _is_key(leaf):
      value = jax.random.wrap_key_data(value, impl=jax.random.key_impl(leaf))
    if isinstance(leaf, jax.Array) and not spread:
      value = jax.device_put(value, leaf.sharding)
    out.append(value)
  return jax.tree_util.tree_unflatten(treedef, out), dict(restored["metadata"])


def read_metadata(directory: str, step: int | None = None) -> dict:
  """The metadata dict saved with the checkpoint of ``step`` (default the latest).

  Cheaper than :func:`restore` and needs no ``like``: for checking what a checkpoint is
  before restoring it.

  Raises:
    FileNotFoundError: when ``directory`` holds no complete checkpoint (of ``step``).

  Example:
    >>> read_metadata("runs/x/checkpoints")["config"]["seed"]
    0
  """
  return dict(_read(directory, step, state=False)[1]["metadata"])


def _read(directory: str, step: int | None, state: bool):
  """``(step, items)``: the metadata (and with ``state`` the arrays) of checkpoint ``step``.

  Raises:
    FileNotFoundError: when ``directory`` holds no complete checkpoint (of ``step``).
  """
  if step is None:
    step = latest_step(directory)
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {directory}")
  ocp, manager = _manager(directory)
  try:
    if step not in manager.all_steps():
      raise FileNotFoundError(f"no checkpoint of step {step} in {directory}")
    items = {"metadata": ocp.args.JsonRestore()}
    if state:
      items["state"] = ocp.args.PyTreeRestore()
    return step, manager.restore(step, args=ocp.args.Composite(**items))
  finally:
    manager.close()
