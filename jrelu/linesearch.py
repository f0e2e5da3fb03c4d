"""Armijo step sizes for compressed SGD: a backtracking search on the compressed direction.

Subramaniam, Magesh, Veeravalli, "Adaptive Step-Size Methods for Compressed SGD"
(arXiv 2207.10046, ICASSP 2023) and "... With Memory Feedback" (IEEE Transactions on
Signal Processing 72, 2024, pp. 2394-2406). What their abstracts state: an Armijo-rule
step-size search for compressed SGD, a *scaling of the descent step*, order-optimal rates
under interpolation (convex and strongly convex smooth objectives) and under a strong
growth condition (non-convex), simulations in which the search *without* the scaling fails
to converge, and (journal version) the search inside compressed SGD with memory (error)
feedback. The body of the papers could not be consulted for this module; every detail
below that the abstracts do not fix is a choice, marked "Chosen", and tested in
``tests/test_linesearch.py``.

One step of :func:`armijo`, on every device of a data-parallel step (N devices, device i
with its shard ``B_i`` of the global mini-batch ``B`` and its gradient ``g_i``)::

    u    = the compressed mean of the g_i       (the transform before this one in the chain:
                                                 jrelu.compress, jrelu.error_feedback, ...)
    f_B  = mean_i f_{B_i}(w),  s = mean_i <g_i, u>        one all-reduce of 2 float32
    if s <= 0: no step                                      (u is not a descent direction)
    eta  = min(increase_factor * eta_prev, max_learning_rate)
    while mean_i f_{B_i}(w - eta u) > f_B - slope_rtol * eta * s:      one all-reduce of
        eta = decrease_factor * eta                                      1 float32 a trial
    w   <- w - scale * eta * u

``s`` is the slope ``<grad f_B(w), u>`` of the global mini-batch loss along ``u``: the mean
of N local scalars, so no device needs the uncompressed mean gradient. Every quantity the
search compares is an all-reduced value, so every device takes the same step and the
parameters stay identical across devices.

Chosen:

* **The search runs on the direction that is applied**, the compressed mean ``u``, against
  the loss of the same global mini-batch whose gradients made ``u``. (Whether the papers
  search on the compressed direction with the global loss, or on each worker's
  uncompressed gradient with its local loss, is not known here.)
* **The criterion is the textbook Armijo condition along u**, with the slope ``s``. The
  stochastic line search of Vaswani et al. (arXiv 1905.09997), which these papers extend,
  writes ``||g||^2`` where the slope is; with ``||u||^2`` in its place the criterion has no
  solution once ``slope_rtol ||u||^2 > s``, which a rescaled unbiased codec produces
  (rand-k multiplies by d/k), and a majority vote's or FO-SGD's direction often does: in
  a trial of that form on the planted ReLU (d = 50, 8 devices) those two never moved.
  The slope form is invariant to rescaling ``u`` (the test shows both).
* **The scaling**: the step is ``scale * eta * u`` with ``scale = 1/2``. Why: along a line
  on which the batch loss is quadratic (a least-squares batch, the planted ReLU near its
  optimum), the Armijo condition holds exactly for ``eta <= 2 (1 - slope_rtol) eta_min``,
  ``eta_min`` the batch's exact line minimizer. Backtracking from a larger first trial
  returns ``eta`` in ``(2 decrease_factor (1 - slope_rtol), 2 (1 - slope_rtol)] eta_min``,
  with the defaults ``(1.62, 1.8] eta_min``: past the minimum, near the mirror point where
  the batch loss is back to its start. The scaled step lands in ``(0.81, 0.9] eta_min``,
  just short of the minimum. Unscaled, the overshoot follows the batch's noise, which
  compressed directions amplify: on the planted ReLU top-k with error feedback, rand-k,
  FO-SGD and ATOMO diverge with ``scale=1`` and converge with ``1/2`` (the tests and
  README, "Armijo step sizes"). The papers' scaling factor is not known here.
* **Where each search starts**: ``min(increase_factor * eta_prev, max_learning_rate)``
  (optax's rule and its default ``increase_factor = 1.5``; the search of Vaswani et al.
  resets to ``eta_prev * 2^(b/n)``, b/n the batch fraction). While the step size is
  stationary a search then makes ``1 + ln(increase_factor) / ln(1 / decrease_factor)``
  trials on average, 4.85 with the defaults. ``max_learning_rate = 10``,
  ``slope_rtol = 0.1`` and ``decrease_factor = 0.9`` are Vaswani et al.'s defaults.
* **No step** when ``s <= 0`` (biased codecs, a majority vote or an error-feedback residual
  can point uphill; a search would spend ``max_trials`` all-reduces to fail), and none
  when no trial met the criterion; then the parameters stay, and the next search grows
  from the last trial's step size (from ``eta_prev`` when no trial ran).
* **Memory feedback** is ``jrelu.error_feedback`` before this transform, unchanged: its
  residual is kept in gradient units (``e <- g + e - C(g + e)``), so a delayed coordinate is
  applied with the step size of the step that sends it. (Whether the journal version keeps
  its memory in gradient or in parameter units is not known here.)

optax: the update takes the arguments of ``optax.scale_by_backtracking_linesearch``
(``value``, ``grad``, ``value_fn`` and the extra arguments ``value_fn`` takes, picked by
name as optax does), tests the same condition and starts each search by the same rule.
Its loop is not reused, for three reasons. (1) It computes the slope as
``<updates, grad>`` from one gradient, which here would be the mean gradient that no
device holds (sending it is what compression avoids); the slope must be the all-reduced
scalar ``s``. (2) Under ``jax.shard_map`` with the optax state split per device (as
``jrelu.parallel.shard_mapped`` passes it) the step size it carries is typed
device-varying while the loop's other carries start as constants (typed invariant), and
``lax.while_loop`` refuses the mix; making the step size invariant would cost one more
all-reduce per step. (3) After a search whose trials were all non-finite it stores step
size 0, from which ``min(increase_factor * 0, ...)`` never grows again, and it cannot
skip a search.

Communication (``jrelu.wire`` reads it from the compiled step): per step one all-reduce of
2 float32 (``f_B`` and ``s``), per trial one all-reduce of 1 float32 inside the search's
``while`` loop, so ``2 (N-1)/N * (64 + 32 * trials)`` bits per device on top of the
gradient codes (:func:`wire_bits`). The compiled program holds the trial's all-reduce
once: ``jrelu.wire`` marks it ``in_loop`` and reports it as ``WireReport.loop_bits``, and
the number of trials of each step is in the state (:func:`metrics`). Each trial also costs
one forward pass of the loss on the device's shard.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jrelu import _checks
from jrelu import aggregation
from jrelu import transforms


_TINY = float(jnp.finfo(jnp.float32).tiny)


class ArmijoState(NamedTuple):
  """State of :func:`armijo`.

  Attributes:
    learning_rate: float32 scalar, ``eta_prev``: the step size of the last search's last
      trial (its accepted one when it succeeded), from which the next search grows;
      ``max_learning_rate`` before the first search.
    step_size: float32 scalar, the step taken at the last update, ``scale * eta`` (0
      when no step was taken).
    trials: int32 scalar, loss evaluations of the last update's search (each one
      all-reduce of one float32 when distributed; 0 when the search was skipped).
  """
  learning_rate: jax.Array
  step_size: jax.Array
  trials: jax.Array


def armijo(*, axis_name: str | None = None, scale: float = 0.5,
           max_learning_rate: float = 10.0, slope_rtol: float = 0.1,
           decrease_factor: float = 0.9, increase_factor: float = 1.5,
           max_trials: int = 100) -> optax.GradientTransformationExtraArgs:
  """Armijo backtracking on the (compressed) update direction, then a scaled descent step.

  Put it last in the chain, in place of ``optax.sgd(learning_rate)``: the updates it
  receives are the direction ``u`` (the compressed mean gradient), and it returns
  ``-scale * eta * u``. See the module docstring for the algorithm and what was chosen.

  Args:
    axis_name: the mapped device axis the loss values and slopes are averaged over (the
      same as the compression transform's), or None on one device.
    scale: the scaling ``a > 0`` of the descent step; 1 is the unscaled search.
    max_learning_rate: ``eta_max > 0``, the largest step size a search tries.
    slope_rtol: ``sigma`` in ``(0, 1)``, the Armijo constant.
    decrease_factor: ``beta`` in ``(0, 1)``, the backtracking factor.
    increase_factor: ``>= 1``; each search starts at ``min(increase_factor * eta_prev,
      max_learning_rate)`` (``math.inf``: always at ``max_learning_rate``).
    max_trials: the most loss evaluations of one search (>= 1); a search that meets
      the criterion at none of them takes no step.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`ArmijoState`. Its
    ``update(updates, state, params, *, value, grad, value_fn, **extra_args)`` takes
    optax's line-search arguments, all of *this device's* shard: ``value`` its loss at
    ``params``, ``grad`` its gradient there (not averaged), ``value_fn(params,
    **extra_args)`` its loss (``extra_args`` carry the batch, e.g. ``batch=...``).
    ``jrelu.parallel.make_step(..., extra_args=True)`` passes them. Under
    ``jax.shard_map`` the state may be replicated (``P()``) or split per device.

  Raises:
    ValueError: for a bad hyper-parameter, quoting it; from ``update``, without
      ``params``.
    NameError: from ``update``, when ``axis_name`` is not bound (see
      ``jrelu.transforms.compress``).

  Example:
    >>> tx = optax.chain(jrelu.qsgd(4, key=jax.random.key(0), axis_name="data"),
    ...                  jrelu.armijo(axis_name="data"))
    >>> step = jrelu.parallel.make_step(planted.loss, batch_fn, tx, extra_args=True)

  References:
    Subramaniam, Magesh, Veeravalli, "Adaptive Step-Size Methods for Compressed SGD",
    arXiv 2207.10046; Vaswani, Mishkin, Laradji, Schmidt, Gidel, Lacoste-Julien,
    "Painless Stochastic Gradient: Interpolation, Line-Search, and Convergence Rates",
    arXiv 1905.09997; Armijo, "Minimization of functions having Lipschitz continuous first
    partial derivatives", Pacific J. Math. 16 (1966).
  """
  scale = _checks.number("scale", scale, low=0.0, low_open=True, high=_checks.FLOAT32_MAX)
  max_learning_rate = _checks.number("max_learning_rate", max_learning_rate, low=0.0,
                                     low_open=True, high=_checks.FLOAT32_MAX)
  slope_rtol = _checks.number("slope_rtol", slope_rtol, low=0.0, high=1.0, low_open=True,
                              high_open=True)
  decrease_factor = _checks.number("decrease_factor", decrease_factor, low=0.0, high=1.0,
                                   low_open=True, high_open=True)
  if increase_factor != math.inf:
    increase_factor = _checks.number("increase_factor", increase_factor, low=1.0,
                                     high=_checks.FLOAT32_MAX)
  max_trials = _checks.integer("max_trials", max_trials, 1, _checks.INT32_MAX)

  def init_fn(params):
    del params
    return ArmijoState(learning_rate=jnp.asarray(max_learning_rate, jnp.float32),
                       step_size=jnp.zeros((), jnp.float32), trials=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params, *, value, grad, value_fn: Callable, **extra_args):
    if params is None:
      raise ValueError("jrelu.armijo needs params: its search evaluates the loss at "
                       "params - eta * updates")
    kwargs = _value_fn_kwargs(value_fn, extra_args)
    local = jnp.stack([jnp.asarray(value, jnp.float32),
                       optax.tree.vdot(updates, grad).astype(jnp.float32)])
    if axis_name is not None:
      transforms.bound_axis_size(axis_name, "jrelu.armijo")
      local = jax.lax.pmean(local, axis_name)
    value, slope = local[0], local[1]
    eta_prev = state.learning_rate
    if increase_factor == math.inf:
      start = jnp.full_like(eta_prev, max_learning_rate, jnp.float32)
    else:
      # Never from 0: a step size that underflowed to 0 would be accepted at once, forever.
      start = jnp.clip(increase_factor * eta_prev, _TINY, max_learning_rate).astype(
          jnp.float32)

    def trial_value(eta):
      trial = jax.tree_util.tree_map(lambda p, u: p - (eta * u).astype(p.dtype), params,
                                     updates)
      v = jnp.asarray(value_fn(trial, **kwargs), jnp.float32)
      return v if axis_name is None else jax.lax.pmean(v, axis_name)

    def keep_going(carry):
      _, trials, found = carry
      return (slope > 0) & ~found & (trials < max_trials)

    def backtrack(carry):
      eta, trials, _ = carry
      eta = jnp.where(trials > 0, decrease_factor * eta, eta)
      # NaN compares False: a non-finite trial is rejected.
      found = trial_value(eta) <= value - slope_rtol * eta * slope
      return eta, trials + 1, found

    carry = (start, jnp.zeros((), jnp.int32), jnp.zeros((), bool))
    eta, trials, found = jax.lax.while_loop(keep_going, backtrack,
                                            _like_axis_type(carry, start, axis_name))
    step_size = jnp.where(found, scale * eta, 0.0).astype(jnp.float32)
    steps = jax.tree_util.tree_map(lambda u: (-step_size * u).astype(u.dtype), updates)
    return steps, ArmijoState(learning_rate=jnp.where(trials > 0, eta, eta_prev),
                              step_size=step_size, trials=trials)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _value_fn_kwargs(value_fn: Callable, extra_args: dict) -> dict:
  """The extra arguments ``value_fn`` takes by name, as optax's line searches pick them.

  Raises:
    TypeError: naming extra arguments ``value_fn`` does not take (optax's rule).
  """
  parameters = inspect.signature(value_fn).parameters
  if any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
    return dict(extra_args)
  unused = sorted(set(extra_args) - set(parameters))
  if unused:
    raise TypeError(f"jrelu.armijo's value_fn takes no argument named {unused}; pass "
                    "only the extra arguments value_fn takes (e.g. batch=...)")
  return dict(extra_args)


def _like_axis_type(tree, like, axis_name):
  """``tree`` cast to device-varying along ``axis_name`` where ``like`` is (shard_map).

  The search's step size comes from the state, which ``jax.shard_map`` types as varying
  when the state is split per device; the loop's other carries start as constants, typed
  invariant, and ``while_loop`` needs carries of one type from start to end.
  """
  if axis_name is None or axis_name not in aggregation.varying_axes(like):
    return tree
  return jax.tree_util.tree_map(
      lambda x: x if axis_name in aggregation.varying_axes(x)
      else jax.lax.pcast(x, axis_name, to="varying"), tree)


def find_state(opt_state) -> ArmijoState | None:
  """The :class:`ArmijoState` inside an optax state (e.g. of an ``optax.chain``), or None."""
  found = [s for s in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda s: isinstance(s, ArmijoState)) if isinstance(s, ArmijoState)]
  return found[0] if found else None


def metrics(opt_state) -> dict:
  """``{"step_size", "linesearch_trials"}`` of the last update, or ``{}`` without a search.

  The ``opt_metrics_fn`` of ``jrelu.parallel.make_step``.
  """
  state = find_state(opt_state)
  if state is None:
    return {}
  return {"step_size": state.step_size, "linesearch_trials": state.trials}


def wire_bits(num_devices: int, trials: float) -> float:
  """Bits one device sends per step for the search, under ``jrelu.wire``'s cost model.

  Args:
    num_devices: N.
    trials: loss evaluations of the step's search (its all-reduces of one float32).

  Returns:
    ``2 (N-1)/N * (64 + 32 * trials)``: the all-reduce of the loss and the slope, and
    one of the loss per trial. 0 on one device.
  """
  num_devices = _checks.integer("num_devices", num_devices)
  return 2 * (num_devices - 1) / num_devices * (64 + 32 * trials)
