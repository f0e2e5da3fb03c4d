"""ATOMO: unbiased atomic sparsification with water-filling probabilities.

Wang, Sievert, Liu, Charles, Papailiopoulos, Wright, "ATOMO: Communication-efficient
Learning via Atomic Sparsification", NeurIPS 2018 (arXiv 1806.04090).

Write a gradient in an orthonormal atomic basis, ``g = sum_a lambda_a a``, keep atom ``a``
with probability ``p_a`` and rescale it by ``1 / p_a``: ``g_hat = sum_a lambda_a (t_a / p_a) a``
with ``t_a ~ Bernoulli(p_a)``. Then ``E[g_hat] = g`` and, the atoms being orthonormal,
``E||g_hat - g||^2 = sum_a lambda_a^2 / p_a - sum_a lambda_a^2``. ATOMO picks the ``p``
that minimizes this variance for an expected number of atoms ``sum_a p_a = s`` (the
sparsity budget), ``0 < p_a <= 1``; the minimizer is the water-filling rule of the paper's
Algorithm 1, :func:`water_filling`. Two atomic bases are implemented:

* **entry-wise** atoms (the standard basis of the flattened array): ``lambda_i = x_i``;
* **spectral** atoms of the array viewed as a matrix ``M`` (``shape[0] x prod(shape[1:])``):
  ``M = sum_i sigma_i u_i v_i^T`` (thin SVD), ``lambda_i = sigma_i``.

Non-finite input (NaN or Inf anywhere): the entry-wise code has every symbol ``+tau``
with ``tau`` NaN, the spectral code NaN weights, so either decodes to all NaN.

Wire formats (fixed shapes, so that codes can cross collectives; the paper counts
``32 + log2(d)`` bits per sent entry, which presumes variable-length messages):

* entry-wise: after water-filling, every unsaturated atom (``p_i < 1``) has the same
  ``|x_i| / p_i = tau``, so a sent unsaturated atom decodes to ``+tau`` or ``-tau``; the
  saturated atoms (``p_i = 1``, at most ``s`` of them) are always sent with their exact
  value. Code: one 2-bit symbol per coordinate (0 not sent, 1 ``+tau``, 2 ``-tau``,
  3 saturated) packed into uint32 words, the float32 ``tau``, and a float32 table of
  ``min(s, d)`` slots holding the saturated values in coordinate order (unused slots 0).
  This is lossless for the ATOMO estimate: ``32 ceil(2 d / 32) + 32 + 32 min(s, d)`` bits.
* spectral: exactly ``s' = min(s, r)`` slots (``r = min(n, m)``), each one atom ``u_i``,
  ``v_i`` and its weight ``sigma_i / p_i`` (all float32; a slot is zero when fewer than
  ``s'`` singular values are nonzero): ``32 s' (n + m + 1)`` bits. The atoms are drawn by
  systematic sampling (:func:`systematic_sampling`) instead of independent Bernoulli draws
  (see :class:`Atomo`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jrelu import _checks
from jrelu.compressors import base
from jrelu.compressors import _select
from jrelu.compressors import bitpack
from jrelu.compressors import threefry

ATOMS = ("auto", "entry", "svd")

# Symbols of the entry-wise code, 2 bits each.
_NOT_SENT, _PLUS_TAU, _MINUS_TAU, _SATURATED = 0, 1, 2, 3
_SYMBOL_BITS = 2


def _water_fill(magnitudes, budget: int):
  """Water-filling on a 1-D array; returns ``(p, tau, saturated)`` in the input's order.

  ``p``: float32 probabilities; ``tau``: float32 scalar, ``|lambda_i| / p_i`` of every
  unsaturated nonzero atom (0 when all atoms are zero); ``saturated``: bool, the atoms kept
  with probability 1 (at most ``min(budget, #nonzero)`` of them).
  """
  a = jnp.abs(jnp.asarray(magnitudes, jnp.float32))
  n = a.shape[0]
  order = jnp.argsort(-a)  # stable: ties keep their index order
  a_sorted = a[order]
  # tail[j] = T_j = sum_{k >= j} a_sorted[k]. A float sum of non-negative terms never
  # falls below any of them, so tail[j] >= a_sorted[j] holds in float32 too.
  tail = jnp.cumsum(a_sorted[::-1])[::-1]
  budget_eff = jnp.minimum(budget, jnp.sum(a > 0)).astype(jnp.float32)
  position = jnp.arange(n)
  # Algorithm 1 walks j = 0, 1, ...: with j atoms saturated, the rest would get
  # p_k = (s - j) a_k / T_j, which is feasible (<= 1) iff its largest one is, i.e.
  # (s - j) a_j <= T_j; otherwise atom j is saturated (p_j = 1) and the walk goes on.
  # The stopping index is therefore the SMALLEST j satisfying the condition, found here
  # at once. It exists and is <= s - 1, where the condition reads a_j <= T_j; when
  # s = 0 (all atoms zero) j = 0, where it reads 0 <= 0.
  feasible = (budget_eff - position) * a_sorted <= tail
  j = jnp.argmax(feasible)
  remaining = budget_eff - j
  tau = jnp.where(remaining > 0, tail[j] / jnp.where(remaining > 0, remaining, 1.0), 0.0)
  safe_tau = jnp.where(tau > 0, tau, 1.0)
  p_sorted = jnp.where(position < j, 1.0, jnp.minimum(a_sorted / safe_tau, 1.0))
  p_sorted = jnp.where(tau > 0, p_sorted, 0.0)
  # Saturated: the walk's first j atoms, plus any later atom whose p reached 1 (only at a
  # tie, e.g. all of s nonzero atoms equal); capped to the first s positions, so the side
  # table of min(budget, n) slots always suffices.
  saturated_sorted = (position < budget_eff) & (p_sorted >= 1.0)
  p = jnp.zeros(n, jnp.float32).at[order].set(p_sorted)
  saturated = jnp.zeros(n, bool).at[order].set(saturated_sorted)
  return p, tau, saturated


# Entry-wise water-filling of an array of at least TOP_MIN_SIZE atoms with a budget of at
# most TOP_MAX_BUDGET uses only its TOP_BLOCK-blocks holding its largest atoms
# (_water_fill_top); smaller problems sort (_water_fill).
TOP_MIN_SIZE = 1 << 16
TOP_MAX_BUDGET = 64
TOP_BLOCK = 1 << 12


def _use_top(n: int, budget: int) -> bool:
  """Whether :func:`_water_fill_top` applies: a large array, a small budget, and the
  budget's blocks a small part of the array."""
  return (n >= TOP_MIN_SIZE and budget <= TOP_MAX_BUDGET
          and 4 * budget * TOP_BLOCK <= n)


def _block_maxima_and_sum(x):
  """The maxima of ``|x|`` over blocks of ``TOP_BLOCK`` entries (the last block may be
  partial) and ``sum |x|``, both from one read of float32 ``x`` ``[n]``, ``n >=
  TOP_BLOCK``. (Reducing a shared ``|x|`` twice made XLA CPU write it out first: 5x
  slower at ``n = 1e7``.)"""
  n = x.shape[0]
  full = n // TOP_BLOCK
  blocks = jnp.abs(x[:full * TOP_BLOCK]).reshape(full, TOP_BLOCK)
  maxima, total = jnp.max(blocks, axis=1), jnp.sum(jnp.sum(blocks, axis=1))
  if n > full * TOP_BLOCK:
    tail = jnp.abs(x[full * TOP_BLOCK:])
    maxima = jnp.concatenate([maxima, jnp.max(tail)[None]])
    total = total + jnp.sum(tail)
  return maxima, total


def _top_s(a, s: int, maxima):
  """``jax.lax.top_k(a, s)`` of non-negative ``a`` (same values, indices and order) for a
  small ``s``, from the ``s`` blocks of ``TOP_BLOCK`` entries with the largest ``maxima``
  (float32 ``[blocks]``, the blocks' maxima: :func:`_block_maxima_and_sum`).

  Order the entries by (value descending, index ascending) and each block by its best
  entry. An entry among the ``s`` best lies in one of the ``s`` best blocks: otherwise
  ``s`` blocks have best entries ahead of its block's, hence ahead of it, all distinct.
  Blocks are ordered by (maximum descending, block index ascending), the order of their
  best entries, which is what ``jax.lax.top_k`` of the block maxima gives; the chosen
  blocks are read in index order, so ties keep breaking toward the lowest index.
  """
  n = a.shape[0]
  chosen = jnp.sort(jax.lax.top_k(maxima, min(s, maxima.shape[0]))[1])
  # The chosen blocks' entries, in index order; -1 past the end of `a`.
  index = (chosen[:, None] * TOP_BLOCK + jnp.arange(TOP_BLOCK)).reshape(-1)
  union = jnp.where(index < n, a[jnp.minimum(index, n - 1)], -1.0)
  values, position = jax.lax.top_k(union, s)
  return values, index[position]


def _water_fill_top(x, budget: int):
  """Water-filling of the entry-wise atoms of ``x`` (float32 ``[n]``) from its top
  ``s = min(budget, n)`` magnitudes and their sum, for :func:`_use_top` sizes.

  The saturated atoms are the first ``j <= s - 1`` of the sorted magnitudes (see
  :func:`_water_fill`), so the walk needs only the top ``s`` and the tail sums
  ``T_j = sum|x| - (sum of the j largest)``.

  Returns:
    ``(tau, probability, saturated, table)``: float32 ``tau``; ``probability(v, index)``
    and ``saturated(v, index)``, functions of a column of coordinates and their indices;
    float32 ``[s]`` the saturated values in coordinate order (0 in unused slots).
  """
  a = jnp.abs(x)
  n = a.shape[0]
  s = min(budget, n)
  maxima, total = _block_maxima_and_sum(x)
  top, top_index = _top_s(a, s, maxima)
  # T_j >= a_j holds for the exact sums; the subtraction may round below it.
  tail = jnp.maximum(total - (jnp.cumsum(top) - top), top)
  budget_eff = jnp.minimum(budget, jnp.sum(top > 0)).astype(jnp.float32)
  position = jnp.arange(s)
  j = jnp.argmax((budget_eff - position) * top <= tail)
  remaining = budget_eff - j
  tau = jnp.where(remaining > 0, tail[j] / jnp.where(remaining > 0, remaining, 1.0), 0.0)
  safe_tau = jnp.where(tau > 0, tau, 1.0)
  p_top = jnp.where(position < j, 1.0, jnp.minimum(top / safe_tau, 1.0))
  p_top = jnp.where(tau > 0, p_top, 0.0)
  # Saturated: a prefix of the sorted top entries (p is non-increasing along it).
  count = jnp.sum((position < budget_eff) & (p_top >= 1.0))
  last = jnp.maximum(count - 1, 0)
  last_value, last_index = top[last], top_index[last]

  def probability(v, index):
    del index
    return jnp.where(tau > 0, jnp.minimum(jnp.abs(v) / safe_tau, 1.0), 0.0)

  def saturated(v, index):
    m = jnp.abs(v)
    return (count > 0) & ((m > last_value) | ((m == last_value) & (index <= last_index)))

  order = jnp.argsort(jnp.where(position < count, top_index, n))  # saturated, by index
  table = jnp.where(position < count, x[top_index[order]], 0.0)
  return tau, probability, saturated, table


def water_filling(magnitudes: jax.Array, budget: int) -> jax.Array:
  """Exact water-filling probabilities of ATOMO (the paper's Algorithm 1).

  Solves ``min_p sum_a lambda_a^2 / p_a`` subject to ``sum_a p_a = min(budget, #nonzero)``
  and ``0 < p_a <= 1`` over the nonzero atoms (``p_a = 0`` for ``lambda_a = 0``). The
  solution saturates the ``j`` largest atoms (``p = 1``) and gives the others
  ``p_a = |lambda_a| / tau`` with ``tau = T_j / (budget - j)``, ``T_j`` the sum of the
  unsaturated magnitudes; ``j`` is the smallest count for which no unsaturated ``p``
  exceeds 1. It is computed without a loop (sort, reverse cumulative sum, first feasible
  ``j``), so it is jit- and vmap-able. When ``budget >= #nonzero`` every nonzero atom gets
  ``p = 1`` (the estimate is exact).

  This is NOT the capped-proportional rule ``min(1, budget |lambda_a| / sum |lambda|)`` of
  the authors' code, which spends less than the budget whenever an atom is capped.

  Args:
    magnitudes: float array ``[num_atoms]``, the atom coefficients ``lambda`` (their
      absolute values are used).
    budget: the sparsity budget ``s``, an integer >= 1: the expected number of atoms kept.

  Returns:
    float32 ``[num_atoms]`` probabilities ``p`` in ``[0, 1]``.

  Raises:
    ValueError: if ``budget`` is not an integer >= 1 or ``magnitudes`` is not 1-D.

  Example:
    >>> water_filling(jnp.array([4.0, 2.0, 1.0, 1.0]), 2)
    Array([1.  , 0.5 , 0.25, 0.25], dtype=float32)

  References:
    Wang et al., "ATOMO: Communication-efficient Learning via Atomic Sparsification",
    NeurIPS 2018, arXiv 1806.04090 (Algorithm 1).
  """
  budget = _checks.integer("budget", budget)
  magnitudes = jnp.asarray(magnitudes)
  if magnitudes.ndim != 1:
    raise ValueError(f"magnitudes must be 1-D, got shape {magnitudes.shape}")
  return _water_fill(magnitudes, budget)[0]


def systematic_sampling(key: jax.Array, probabilities: jax.Array, num_samples: int):
  """Draws atoms with inclusion probabilities ``p`` by systematic sampling.

  Lays the atoms' probabilities end to end on ``[0, sum p)`` (atom ``i`` owns
  ``[c_{i-1}, c_i)``, ``c`` the cumulative sums in index order, no sorting) and takes the
  points ``U + j``, ``j = 0, 1, ...``, with one ``U ~ Uniform[0, 1)``; atom ``i`` is
  selected iff a point falls in its interval. Because every ``p_i <= 1``, an interval
  holds at most one point, so atom ``i`` is selected with probability exactly ``p_i``;
  when ``sum p`` is an integer ``K`` exactly ``K`` distinct atoms are selected, always
  (never an empty or oversized draw). The selections are dependent (unlike independent
  Bernoulli draws), which does not change the mean or, for orthonormal atoms, the
  variance of a ``t_i / p_i`` reweighted estimate.

  Args:
    key: a PRNG key (one uniform is drawn).
    probabilities: float ``[num_atoms]``, each in ``[0, 1]``.
    num_samples: static number of output slots (at least ``ceil(sum p)``).

  Returns:
    ``(indices, valid)``: int32 ``[num_samples]`` atom indices, increasing over the valid
    slots, and bool ``[num_samples]``, False for slots past ``sum p`` (their index is 0).
    A point rounding onto a repeated index is marked invalid (a float32 tie).

  Example:
    >>> idx, valid = systematic_sampling(jax.random.key(0), jnp.array([1., .5, .5]), 2)
    >>> int(idx[0]), bool(valid.all())   # atom 0 (p = 1) is always selected
    (0, True)

  References:
    Madow, "On the theory of systematic sampling, II", Ann. Math. Statist. 20 (1949);
    used here for the spectral atoms of Wang et al., "ATOMO", arXiv 1806.04090.
  """
  p = jnp.asarray(probabilities, jnp.float32)
  cum = jnp.cumsum(p)
  points = jax.random.uniform(key, ()) + jnp.arange(num_samples, dtype=jnp.float32)
  indices = jnp.searchsorted(cum, points, side="right").astype(jnp.int32)
  valid = points < cum[-1]
  repeated = jnp.concatenate([jnp.zeros(1, bool), indices[1:] == indices[:-1]])
  valid = valid & ~repeated & (indices < p.shape[0])
  return jnp.where(valid, indices, 0), valid


@base.code_class
class AtomoEntryCode:
  """Wire payload of entry-wise :class:`Atomo` for an input of ``d`` elements.

  Attributes:
    words: uint32 ``[ceil(2 d / 32)]``, packed 2-bit symbols (0 not sent, 1 ``+tau``,
      2 ``-tau``, 3 saturated).
    tau: float32 ``[]``, the common value ``|x_i| / p_i`` of the unsaturated atoms.
    saturated: float32 ``[min(budget, d)]``, the saturated atoms' values in coordinate
      order, unused slots 0.
    shape: the input's shape (static, not sent).
    dtype: the input's dtype (static, not sent).
  """
  words: jax.Array
  tau: jax.Array
  saturated: jax.Array
  shape: tuple = dataclasses.field(metadata={"static": True})
  dtype: np.dtype = dataclasses.field(metadata={"static": True})


@base.code_class
class AtomoSVDCode:
  """Wire payload of spectral :class:`Atomo` for an ``n x m`` matrix, ``s' = min(budget, r)``.

  Attributes:
    u: float32 ``[n, s']``, left singular vectors of the selected atoms (0 in unused slots).
    v: float32 ``[m, s']``, right singular vectors of the selected atoms.
    weights: float32 ``[s']``, ``sigma_i / p_i`` of the selected atoms (0 in unused slots).
    shape: the input's shape (static, not sent).
    dtype: the input's dtype (static, not sent).
  """
  u: jax.Array
  v: jax.Array
  weights: jax.Array
  shape: tuple = dataclasses.field(metadata={"static": True})
  dtype: np.dtype = dataclasses.field(metadata={"static": True})


class Atomo(base.Compressor):
  """ATOMO sparsification over entry-wise or spectral (SVD) atoms, water-filling ``p``.

  Build it with :func:`atomo`. ``unbiased`` is True; codes do not commute with sum.

  Entry-wise atoms use independent draws ``t_i ~ Bernoulli(p_i)`` as in the paper; a draw
  may keep no atom at all, and then decodes to zeros (it is not re-drawn: re-drawing empty
  draws, as the authors' code does, biases the estimate). Spectral atoms are drawn by
  systematic sampling: exactly ``min(budget, #nonzero sigma)`` atoms, each with inclusion
  probability exactly ``p_i``. This deviation from independent draws gives the code a
  fixed number of atoms (collectives need fixed shapes) without re-sampling; the estimate
  is still unbiased and, the spectral atoms being orthonormal in the Frobenius inner
  product, has the same variance ``sum sigma_i^2 / p_i - sum sigma_i^2`` as with
  independent draws.

  Which atoms an input gets is a function of its static shape (:meth:`atom_kind`): the
  SVD needs a genuine matrix, so inputs with ``ndim < 2`` or a matrix dimension of 1 are
  always entry-wise (under ``two_phase`` aggregation every chunk is a vector, so it is
  entry-wise there). Singular values at or below the numerical-rank tolerance
  ``sigma_max * max(n, m) * eps_float32`` (as in ``numpy.linalg.matrix_rank``) are set to
  0: they are float32 SVD round-off, not signal, so a matrix of rank below the budget is
  sent exactly instead of spending atoms on noise.

  Attributes:
    budget: the sparsity budget ``s`` (expected atoms per encoded array).
    atoms: ``"auto"``, ``"entry"`` or ``"svd"``.

  References:
    Wang et al., "ATOMO: Communication-efficient Learning via Atomic Sparsification",
    NeurIPS 2018, arXiv 1806.04090.
  """

  name = "atomo"
  unbiased = True

  def __init__(self, budget: int, atoms: str = "auto"):
    self.budget = _checks.integer("budget", budget, maximum=_checks.INT32_MAX,
                                  why="(atom counts are int32)")
    self.atoms = _checks.choice("atoms", atoms, ATOMS)

  @staticmethod
  def matrix_shape(shape) -> tuple[int, int]:
    """``(n, m) = (shape[0], prod(shape[1:]))``, the matrix view of a tensor of ``shape``."""
    shape = tuple(shape)
    return (shape[0], base.num_elements(shape[1:])) if shape else (1, 1)

  def atom_kind(self, shape) -> str:
    """``"svd"`` or ``"entry"``: the atoms used for an input of ``shape``.

    ``atoms="entry"`` is always entry-wise. ``"auto"`` and ``"svd"`` use spectral atoms for
    ``ndim >= 2`` with both matrix dimensions >= 2, entry-wise atoms otherwise (vectors,
    scalars, ``1 x m`` or ``n x 1`` matrices, whose SVD has a single atom: the input).
    """
    if self.atoms == "entry" or len(shape) < 2:
      return "entry"
    n, m = self.matrix_shape(shape)
    return "svd" if min(n, m) >= 2 else "entry"

  # --- entry-wise atoms ----------------------------------------------------------------

  def _encode_entry(self, key, x):
    flat = jnp.ravel(x).astype(jnp.float32)
    d = flat.shape[0]
    if d == 0:  # nothing to sample (water-filling needs at least one atom)
      return AtomoEntryCode(words=bitpack.pack(jnp.zeros(0, jnp.uint32), _SYMBOL_BITS),
                            tau=jnp.zeros((), jnp.float32), saturated=jnp.zeros(0),
                            shape=tuple(x.shape), dtype=x.dtype)
    finite = base.all_finite(flat)
    slots = min(self.budget, d)
    if _use_top(d, self.budget):
      tau, probability, saturated, table = _water_fill_top(flat, self.budget)
    else:
      p, tau, saturated_all = _water_fill(jnp.where(finite, flat, 0.0), self.budget)
      probability = lambda v, index: p[index]  # noqa: E731
      saturated = lambda v, index: saturated_all[index]  # noqa: E731
      slot = jnp.where(saturated_all, jnp.cumsum(saturated_all) - 1, slots)  # out of range
      table = jnp.zeros(slots, jnp.float32).at[slot].set(flat, mode="drop")

    def symbol(v, u16, index):
      sat = saturated(v, index) & finite
      # u < p with a 16-bit u (threefry.bernoulli16): never for p = 0 (zero entries),
      # always for p = 1, within 2^-17 of p in between.
      sent = threefry.bernoulli16(u16, probability(v, index)) & ~sat
      out = jnp.where(sat, _SATURATED,
                      jnp.where(sent, jnp.where(v < 0, _MINUS_TAU, _PLUS_TAU), _NOT_SENT))
      # A non-finite input: every symbol "+tau" with tau NaN, so it decodes to all NaN.
      return jnp.where(finite, out, _PLUS_TAU).astype(jnp.uint32)

    words = threefry.pack_fields(threefry.key_words(key), flat, _SYMBOL_BITS, symbol)
    return AtomoEntryCode(words=words, tau=base.poison(tau, finite),
                          saturated=jnp.where(finite, table, 0.0),
                          shape=tuple(x.shape), dtype=x.dtype)

  def _decode_entry(self, code):
    d = base.num_elements(code.shape)
    symbols = bitpack.unpack(code.words, _SYMBOL_BITS, d)
    signed_tau = jnp.where(symbols == _PLUS_TAU, code.tau,
                           jnp.where(symbols == _MINUS_TAU, -code.tau, 0.0))
    # The saturated atoms, in coordinate order: bit 2 k of a word of the 2-bit stream is
    # set in (w & w >> 1) where symbol k is 3 (_SATURATED).
    words = code.words
    marks = words & (words >> 1) & np.uint32(0x55555555)
    slots = code.saturated.shape[0]
    positions, _ = _select.set_positions(marks, slots)
    index = jnp.where(positions >= 0, positions // 2, d)  # d: dropped
    values = signed_tau.at[index].set(code.saturated, mode="drop")
    return values.reshape(code.shape).astype(code.dtype)

  # --- spectral atoms ------------------------------------------------------------------

  def _encode_svd(self, key, x):
    n, m = self.matrix_shape(x.shape)
    slots = min(self.budget, n, m)
    u, sigma, vt = jnp.linalg.svd(x.astype(jnp.float32).reshape(n, m), full_matrices=False)
    tolerance = sigma[0] * max(n, m) * jnp.finfo(jnp.float32).eps
    sigma = jnp.where(sigma > tolerance, sigma, 0.0)
    p = water_filling(sigma, self.budget)
    index, valid = systematic_sampling(key, p, slots)
    # sum p = min(budget, #nonzero sigma) = the number of atoms sent; a float32 excess of
    # sum p could let one more point in, so the count is enforced.
    count = jnp.minimum(self.budget, jnp.sum(sigma > 0))
    valid = valid & (jnp.arange(slots) < count)
    p_sel = p[index]
    weights = jnp.where(valid, sigma[index] / jnp.where(valid, p_sel, 1.0), 0.0)
    # A non-finite input: NaN weights and all slots valid, so it decodes to all NaN.
    finite = base.all_finite(x)
    weights = base.poison(weights, finite)
    valid = valid | ~finite
    return AtomoSVDCode(u=jnp.where(valid, u[:, index], 0.0),
                        v=jnp.where(valid, vt[index, :].T, 0.0),
                        weights=weights, shape=tuple(x.shape), dtype=x.dtype)

  def _decode_svd(self, code):
    values = (code.u * code.weights) @ code.v.T
    return values.reshape(code.shape).astype(code.dtype)

  # --- the Compressor interface --------------------------------------------------------

  def encode(self, key, x):
    """Encodes ``x`` (any shape, float32 or bfloat16) into an ATOMO code.

    Args:
      key: a PRNG key (entry-wise: one uniform per element; spectral: one uniform).
      x: floating array of any shape.

    Returns:
      An :class:`AtomoEntryCode` or :class:`AtomoSVDCode`, per :meth:`atom_kind`.
    """
    x = jnp.asarray(x)
    if self.atom_kind(x.shape) == "svd":
      return self._encode_svd(key, x)
    return self._encode_entry(key, x)

  def decode(self, code):
    """Decodes a code of :meth:`encode` to the estimate, with the input's shape and dtype."""
    if isinstance(code, AtomoSVDCode):
      return self._decode_svd(code)
    return self._decode_entry(code)

  def wire_bits(self, shape):
    """Exact payload bits for an input of ``shape``.

    Entry-wise: ``32 ceil(2 d / 32) + 32 + 32 min(budget, d)``; spectral:
    ``32 s' (n + m + 1)`` with ``s' = min(budget, n, m)``.
    """
    shape = tuple(shape)
    if self.atom_kind(shape) == "svd":
      n, m = self.matrix_shape(shape)
      return 32 * min(self.budget, n, m) * (n + m + 1)
    d = base.num_elements(shape)
    return 32 * bitpack.packed_words(d, _SYMBOL_BITS) + 32 + 32 * min(self.budget, d)


def atomo(budget: int, atoms: str = "auto") -> Atomo:
  """Builds the ATOMO compressor with sparsity budget ``s = budget``.

  Args:
    budget: s >= 1, the expected number of atoms sent per encoded array (a spectral code
      always sends exactly ``min(s, rank)`` atoms; an entry-wise one sends
      ``min(s, #nonzero)`` on average, a random number of them).
    atoms: ``"entry"`` (standard basis of the flattened array), ``"svd"`` (spectral atoms
      of the array viewed as ``shape[0] x prod(shape[1:])``; falls back to entry-wise for
      ``ndim < 2`` or a matrix dimension of 1), or ``"auto"`` (the same rule as ``"svd"``:
      spectral for genuine matrices, entry-wise for vectors and scalars).

  Returns:
    An :class:`Atomo` compressor.

  Raises:
    ValueError: if ``budget`` is not an integer in ``[1, 2^31 - 1]`` (atom counts are
      int32) or ``atoms`` is unknown.

  Example:
    >>> c = atomo(8)
    >>> c.wire_bits((1000,))      # 63 words of 2-bit symbols, tau, 8 table slots
    2304
    >>> atomo(2, atoms="svd").wire_bits((7, 13))   # 2 atoms of 7 + 13 + 1 floats
    1344

  References:
    Wang, Sievert, Liu, Charles, Papailiopoulos, Wright, "ATOMO: Communication-efficient
    Learning via Atomic Sparsification", NeurIPS 2018, arXiv 1806.04090.
  """
  return Atomo(budget, atoms)
