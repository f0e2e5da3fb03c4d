r"""Elastic averaging SGD (EASGD, EAMSGD) and DOWNPOUR, synchronous or round-robin, compressible.

Zhang, Choromanska, LeCun, "Deep learning with Elastic Averaging SGD", NeurIPS 2015 (arXiv
1412.6651). Each of the p devices is a *worker* with its own parameters ``x_i`` (they are
not replicated: they differ from device to device), and every device also holds a copy
of the *center variable* ``x~``, the same on every device. Every ``tau`` steps the
elastic differences ``alpha (x_i - x~)`` pull each worker towards the center and the
center towards the workers ("elastic symmetry"); in between, each worker takes plain
(EASGD) or Nesterov-momentum (EAMSGD) SGD steps on its own shard of the global batch.
The model the method returns is the center, so metrics are taken on ``x~``.

One step on device i (step counter t, learning rate ``eta_t`` from the schedule,
``alpha`` the moving rate, ``delta`` the momentum; the gradient is always taken at the
worker's point *before* the elastic move, as the authors' ``optim-eamsgd.lua`` does, and
as their Algorithms 1 and 2 do as recalled here: the paper's text itself was not
reachable when this was written):

=========  ==============================================================================
EASGD      ``g = grad f_i(x_i)``; ``x_i <- x_i - eta g``
EAMSGD     ``g = grad f_i(x_i + delta v_i)``; ``v_i <- delta v_i - eta g``; ``x_i <- x_i + v_i``
DOWNPOUR   ``g = grad f_i(x_i)``; ``a_i <- a_i - eta g``; ``x_i <- x_i - eta g``
=========  ==============================================================================

and, when ``t mod tau == 0`` (so step 0 exchanges too, as the authors' code does), with
``x_i`` the worker's point before the step above:

* EASGD / EAMSGD, synchronous: ``d_i = x_i - x~``; ``x_i <- x_i - alpha d_i`` (after the
  local step); ``x~ <- x~ + alpha sum_i d_i``. The sum is the only communication: an
  all-reduce of ``d_i``, written ``x~ + alpha p mean_i(d_i)`` with ``mean_i`` the
  ``communicate`` transform, which may compress (below). For ``tau = 1`` this is the
  paper's synchronous update ``x_i <- x_i - eta g_i(x_i) - alpha (x_i - x~)``,
  ``x~ <- x~ + alpha sum_i (x_i - x~)``, with ``beta = p alpha``; the all-reduce form
  is that of torch-distlearn's ``AllReduceEA`` (each node keeps the center, adds the
  all-reduced sum of the differences).
* DOWNPOUR, synchronous: every worker pushes its accumulated update ``a_i`` (the sum of
  its ``-eta g`` since its last push, this step's included), the center applies all of
  them, ``x~ <- x~ + sum_i a_i``, and every worker pulls it, ``x_i <- x~``, ``a_i <- 0``
  (no local move on that step). The server *adds* each worker's push, as the authors'
  parameter server does (``pserver.lua``: ``p:add(g[crank])``): so DOWNPOUR with
  ``tau = 1`` and learning rate ``eta / p`` is minibatch SGD with learning rate ``eta``
  (tested), and a learning rate tuned for SGD must be divided by p.

The asynchronous variant (``exchange="round_robin"``) is emulated deterministically in
the round-robin order of the paper's stability analysis: at an exchange the workers meet
the center one after another, in device order, each seeing the center as the workers
before it left it. Worker i's elastic difference is ``x_i - x~^{(i)}`` with
``x~^{(0)} = x~`` and ``x~^{(j+1)} = x~^{(j)} + alpha (x_j - x~^{(j)})``; the new center is
``x~^{(p)}``. (DOWNPOUR: ``x~^{(j+1)} = x~^{(j)} + a_j`` and worker i pulls ``x~^{(i+1)}``,
the center right after its own push.) All workers still compute their gradients in
parallel, one per step: the emulation is asynchronous EASGD whose workers run at the same
speed and whose messages reach the master in device order. In the paper's round-robin
scheme only one worker acts per tick; a round of p ticks there is one exchange here, with
the same result. The emulation gathers every worker's parameters (a float32 all-gather,
``(p - 1) 32 d`` bits per device per exchange, read from the compiled program like every
cost here), and each device replays the master's p updates; a real parameter server
would move ``32 d`` up and ``32 d`` down per worker and exchange. It sends float32 only:
a jrelu aggregation returns a mean, and the sweep needs each worker's own difference.
(Choice of this module: the paper's asynchronous schedule is not pinned down beyond
"round-robin"; this is the deterministic order its stability analysis names.)

Compressed EASGD (synchronous): ``communicate`` is any optax transform that maps this
device's array to a mean over the device axis, identical on every device: a float32
``pmean`` (:func:`exact_mean`), ``jrelu.compress(codec, aggregation=...)`` with any jrelu
codec and aggregation, ``jrelu.error_feedback(codec, ...)`` for biased codecs, or
``jrelu.powersgd.powersgd``. The elastic differences ``d_i`` (DOWNPOUR: the pushes
``a_i``) go through it; the center, the same on every device, moves by the compressed
mean, while each worker moves by its own exact ``alpha d_i`` (it knows ``x_i`` and ``x~``
exactly; only the sum crosses the wire). With error feedback the part of ``alpha d_i``
that the center has not received yet stays in the residual ``e_i`` and is sent with a later
exchange; with an aggregation whose mean is the mean of what each device sent (``psum``,
``all_gather``) ``sum_i x_i + x~ + alpha sum_i e_i`` is then exactly conserved by the
exchange (tested). (Choice of this module: the paper has no compression.)

Conservation: with no gradient step, the synchronous exchange keeps ``sum_i x_i + x~``
(workers plus the center, each counted once: the center gains ``alpha sum_i d_i``, the
workers lose it), and contracts every ``x_i`` and ``x~`` to their common value
``z = (sum_i x_i + x~) / (p + 1)``: on the p + 1 variables the exchange is
``I - alpha L`` with L the Laplacian of the star graph, eigenvalues 1 (the conserved
mean), ``1 - alpha`` (p - 1 times) and ``1 - (p + 1) alpha``, so it contracts iff
``0 < alpha < 2 / (p + 1)``; the authors' ``alpha = 0.9 / p`` is inside. (Note that
``sum_i x_i + p x~`` is *not* conserved by these updates.)

Minibatch SGD as a limit: with gradient steps, ``z`` moves only by them,
``z <- z - eta / (p + 1) sum_i g_i(x_i)``, for any ``alpha`` and ``tau``. When the
elastic force is strong enough to hold every worker at the center (the limit of a large
penalty ``rho`` in the paper's objective ``sum_i f(x_i) + rho / 2 sum_i ||x_i - x~||^2``,
where the consensus problem becomes the original one), ``x_i = x~ = z`` and this is
minibatch SGD on the global batch with learning rate ``eta p / (p + 1)``; from equal
starting points it holds exactly for the first step (tested). (The equivalence the thesis
states was not reachable here; this is the one the algebra above gives.)

Communication cost per device: one ``communicate`` per exchange, none in between, so per
step ``1 / tau`` of an exchange. ``jrelu.wire`` reads the collectives inside the exchange
branch once per step it compiles, i.e. the bits of one exchange per step.

References:
  Zhang, Choromanska, LeCun, "Deep learning with Elastic Averaging SGD", NeurIPS 2015,
  arXiv 1412.6651 (synchronous EASGD, Algorithm 1 asynchronous EASGD, Algorithm 2
  EAMSGD, stability in the round-robin scheme); Sixin Zhang, "Distributed stochastic
  optimization for deep learning", PhD thesis, NYU 2016 (arXiv 1605.02216); the
  authors' code github.com/sixin-zh/mpiT (``optim-eamsgd.lua``: the order of gradient,
  momentum and elastic moves; ``optim-downpour.lua`` and ``pserver.lua``: DOWNPOUR's
  accumulated push and the server's sum; ``mlaunch.lua``: ``mva = 0.9 / p``); Dean et
  al., "Large Scale Distributed Deep Networks", NeurIPS 2012 (DOWNPOUR); Twitter's
  torch-distlearn, ``AllReduceEA`` (EASGD as one all-reduce).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jrelu import _checks
from jrelu import parallel

ALGORITHMS = ("easgd", "eamsgd", "downpour")
EXCHANGES = ("synchronous", "round_robin")
# beta = p alpha, the authors' choice (mpiT's mlaunch.lua: "mva = 0.9/6 -- beta/p when p=6").
DEFAULT_BETA = 0.9

_tree_map = jax.tree_util.tree_map


class ElasticState(NamedTuple):
  """What the method keeps besides each worker's parameters (``TrainState.opt_state``).

  Attributes:
    center: the center variable ``x~``, a pytree like the parameters, the same on every
      device.
    velocity: EAMSGD's momentum ``v_i`` of this worker (None for the others).
    accumulated: DOWNPOUR's update ``a_i`` accumulated since this worker's last push
      (None for the others).
    communicate: the state of the ``communicate`` transform (its PRNG key, an
      error-feedback residual), or None for the round-robin exchange.
  """
  center: Any
  velocity: Any
  accumulated: Any
  communicate: Any


def default_alpha(num_devices: int) -> float:
  """The authors' moving rate ``alpha = 0.9 / p`` (``beta = p alpha = 0.9``).

  Example:
    >>> default_alpha(8)
    0.1125
  """
  return DEFAULT_BETA / _checks.integer("num_devices", num_devices)


def exact_mean(axis_name: str = parallel.AXIS_NAME) -> optax.GradientTransformation:
  """The uncompressed ``communicate``: a float32 ``pmean`` over ``axis_name`` (no state).

  Example:
    >>> step = make_step(planted.loss, batch_fn, algorithm="easgd", learning_rate=0.1,
    ...                  communicate=exact_mean())
  """
  return optax.GradientTransformation(
      lambda params: optax.EmptyState(),
      lambda updates, state, params=None: (jax.lax.pmean(updates, axis_name), state))


def _check_setup(algorithm, exchange, communicate):
  _checks.choice("algorithm", algorithm, ALGORITHMS)
  _checks.choice("exchange", exchange, EXCHANGES)
  if exchange == "round_robin" and communicate is not None:
    raise ValueError("exchange='round_robin' sends float32 parameters through an all-gather "
                     "and takes no communicate transform, got one")
  if exchange == "synchronous" and communicate is None:
    raise ValueError("exchange='synchronous' needs a communicate transform (e.g. "
                     "easgd.exact_mean() or jrelu.compress(...)), got None")


def init_state(params, *, algorithm: str, communicate: optax.GradientTransformation | None,
               exchange: str = "synchronous") -> parallel.TrainState:
  """The initial state of one worker: ``x_i = x~ = params``, zero momentum and pushes.

  Args:
    params: the initial parameters (a pytree), the same for every worker and the center,
      as in the paper.
    algorithm: ``"easgd"``, ``"eamsgd"`` or ``"downpour"``.
    communicate: the transform :func:`make_step` was given (None for round-robin).
    exchange: ``"synchronous"`` or ``"round_robin"``.

  Returns:
    A ``jrelu.parallel.TrainState`` whose ``opt_state`` is an :class:`ElasticState`;
    replicate it over the devices (``jrelu.parallel.replicate``): the workers start
    equal and part ways from the first step.

  Raises:
    ValueError: for an unknown ``algorithm`` or ``exchange``, or a ``communicate`` that
      does not fit the exchange.

  Example:
    >>> state = init_state(jnp.zeros(1000), algorithm="eamsgd", communicate=exact_mean())
    >>> state.opt_state.velocity.shape
    (1000,)
  """
  _check_setup(algorithm, exchange, communicate)
  zeros = lambda tree: _tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.result_type(p)), tree)
  state = ElasticState(
      center=_tree_map(jnp.asarray, params),
      velocity=zeros(params) if algorithm == "eamsgd" else None,
      accumulated=zeros(params) if algorithm == "downpour" else None,
      communicate=None if communicate is None else communicate.init(params))
  return parallel.TrainState(params, state, jnp.zeros((), jnp.int32))


def make_step(loss_fn: Callable, batch_fn: Callable, *, algorithm: str,
              learning_rate: float | optax.Schedule, tau: int = 1, alpha: float | None = None,
              momentum: float = 0.99, communicate: optax.GradientTransformation | None = None,
              exchange: str = "synchronous", metrics_fn: Callable | None = None,
              axis_name: str = parallel.AXIS_NAME):
  """Builds one per-device step of EASGD, EAMSGD or DOWNPOUR (see the module docstring).

  Same interface as ``jrelu.parallel.make_step``: wrap it with ``jrelu.parallel.pmapped``
  / ``shard_mapped`` (or ``vmapped``), run it in ``scan_steps``, measure it with
  ``jrelu.wire.measure``, checkpoint its state.

  Args:
    loss_fn: ``loss_fn(params, *batch) -> scalar``, the loss on this device's shard.
    batch_fn: ``batch_fn(key, data, shard_index, num_shards) -> batch``, as for
      ``jrelu.parallel.make_step``: worker i trains on shard i of the global batch.
    algorithm: ``"easgd"``, ``"eamsgd"`` or ``"downpour"``.
    learning_rate: the local step size ``eta > 0``, or an optax schedule of the step.
    tau: communication period, an int >= 1: exchange when ``step % tau == 0``.
    alpha: the moving rate in ``(0, 1]`` (EASGD, EAMSGD); None: ``0.9 / p``
      (:func:`default_alpha`). Ignored by DOWNPOUR.
    momentum: EAMSGD's Nesterov momentum ``delta`` in ``[0, 1)`` (the authors' 0.99);
      ``delta = 0`` is EASGD. Ignored by the others.
    communicate: for ``exchange="synchronous"``, the transform that returns the mean over
      ``axis_name`` of what each device gives it: :func:`exact_mean`, or a compressing
      one (``jrelu.compress``, ``jrelu.error_feedback``, ``jrelu.powersgd.powersgd``)
      built with the same ``axis_name``. None for ``"round_robin"``.
    exchange: ``"synchronous"`` or ``"round_robin"`` (the asynchronous variant, emulated).
    metrics_fn: optional ``metrics_fn(params, data) -> dict`` of scalars, evaluated on the
      center after the step (no collectives).
    axis_name: the device axis.

  Returns:
    ``step(state, data, key) -> (state, metrics)``, ``state`` a ``TrainState`` from
    :func:`init_state` (``params`` is this worker's ``x_i``); ``metrics["loss"]`` is this
    worker's loss on its batch where its gradient is taken (EAMSGD: the look-ahead
    point ``x_i + delta v_i``).

  Raises:
    ValueError: for a bad argument, quoting it.

  Example:
    >>> tx = jrelu.compress(compressors.qsgd(4), key=jax.random.key(0), axis_name="data")
    >>> step = make_step(planted.loss, sampling.make_batch_fn(1024), algorithm="easgd",
    ...                  learning_rate=0.5, tau=4, communicate=tx,
    ...                  metrics_fn=planted.metrics_fn)
    >>> run = parallel.pmapped(parallel.scan_steps(step, 100), devices)
    >>> state = parallel.replicate(init_state(w0, algorithm="easgd", communicate=tx),
    ...                            devices)

  References:
    Zhang, Choromanska, LeCun, arXiv 1412.6651 (Algorithms 1 and 2, the synchronous
    updates); Dean et al., NeurIPS 2012 (DOWNPOUR).
  """
  _check_setup(algorithm, exchange, communicate)
  tau = _checks.integer("tau", tau, 1, _checks.INT32_MAX)
  if alpha is not None:
    alpha = _checks.number("alpha", alpha, low=0.0, high=1.0, low_open=True)
  momentum = _checks.number("momentum", momentum, low=0.0, high=1.0, high_open=True)
  if callable(learning_rate):
    schedule = learning_rate
  else:
    lr = _checks.number("learning_rate", learning_rate, low=0.0, low_open=True)
    schedule = lambda count: lr
  exchange_fn = {"synchronous": _synchronous, "round_robin": _round_robin}[exchange]

  def step(state: parallel.TrainState, data, key):
    p = jax.lax.axis_size(axis_name)
    i = jax.lax.axis_index(axis_name)
    a = DEFAULT_BETA / p if alpha is None else alpha
    x, es = state.params, state.opt_state
    batch = batch_fn(jax.random.fold_in(key, state.step), data, i, p)
    eta = schedule(state.step)
    point = x
    if algorithm == "eamsgd":
      point = _tree_map(lambda w, v: w + momentum * v, x, es.velocity)
    loss, grads = jax.value_and_grad(loss_fn)(point, *batch)
    velocity, accumulated = es.velocity, es.accumulated
    if algorithm == "eamsgd":
      velocity = _tree_map(lambda v, g: momentum * v - eta * g, velocity, grads)
      local = _tree_map(jnp.add, x, velocity)
    else:
      local = _tree_map(lambda w, g: w - eta * g, x, grads)
    if algorithm == "downpour":
      accumulated = _tree_map(lambda s, g: s - eta * g, accumulated, grads)

    def exchange_now(operand):
      return exchange_fn(algorithm, a, communicate, axis_name, i, *operand)

    def no_exchange(operand):
      _, local, center, accumulated, comm = operand
      return local, center, accumulated, comm

    new_x, center, accumulated, comm = jax.lax.cond(
        state.step % tau == 0, exchange_now, no_exchange,
        (x, local, es.center, accumulated, es.communicate))
    metrics = {"loss": loss}
    if metrics_fn is not None:
      metrics.update(metrics_fn(center, data))
    return parallel.TrainState(new_x, ElasticState(center, velocity, accumulated, comm),
                               state.step + 1), metrics

  return step


def _synchronous(algorithm, alpha, communicate, axis_name, index, x, local, center,
                 accumulated, comm):
  """Every worker meets the center at once: one ``communicate`` of the differences."""
  del index
  p = jax.lax.axis_size(axis_name)
  if algorithm == "downpour":
    pushed, comm = communicate.update(accumulated, comm)
    center = _tree_map(lambda c, m: c + p * m.astype(c.dtype), center, pushed)
    return (center, center, _tree_map(jnp.zeros_like, accumulated), comm)
  diff = _tree_map(jnp.subtract, x, center)
  mean, comm = communicate.update(diff, comm)
  new_x = _tree_map(lambda w, d: w - alpha * d, local, diff)
  center = _tree_map(lambda c, m: c + (alpha * p) * m.astype(c.dtype), center, mean)
  return new_x, center, accumulated, comm


def _round_robin(algorithm, alpha, communicate, axis_name, index, x, local, center,
                 accumulated, comm):
  """The workers meet the center one after another, in device order (the emulation)."""
  del communicate
  sent = accumulated if algorithm == "downpour" else x
  gathered = _tree_map(lambda s: jax.lax.all_gather(s, axis_name), sent)

  def meet(c, s):   # the master's update for one worker, and the center that worker sees
    if algorithm == "downpour":
      after = _tree_map(jnp.add, c, s)
      return after, after          # the worker pulls the center right after its push
    return _tree_map(lambda c, w: c + alpha * (w - c), c, s), c

  center, seen = jax.lax.scan(meet, center, gathered)
  mine = _tree_map(lambda s: s[index], seen)
  if algorithm == "downpour":
    return mine, center, _tree_map(jnp.zeros_like, accumulated), comm
  new_x = _tree_map(lambda w, l, c: l - alpha * (w - c), x, local, mine)
  return new_x, center, accumulated, comm


def exchanges(num_steps: int, tau: int) -> int:
  """How many exchanges steps ``0 .. num_steps - 1`` hold: ``ceil(num_steps / tau)``.

  Example:
    >>> exchanges(10, 4)   # at steps 0, 4, 8
    3
  """
  return -(-num_steps // tau)


def round_robin_wire_bits(params, num_devices: int) -> float:
  """Bits one device sends per round-robin exchange: a float32 all-gather, ``(p-1) 32 d``.

  Args:
    params: the parameters (only their sizes are read).
    num_devices: p.
  """
  n = _checks.integer("num_devices", num_devices)
  size = sum(int(jnp.size(leaf)) for leaf in jax.tree_util.tree_leaves(params))
  return (n - 1) * 32 * size
