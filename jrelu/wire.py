"""Bits that cross devices, read from a compiled program's HLO.

For every collective in the optimized HLO module this reads its operand size S (elements
times dtype width, one device's operand) and its group size N, and charges the bits one
device sends under the bandwidth-optimal algorithms that communication cost models assume:

==================  ===================
collective          bits one device sends
==================  ===================
all-reduce          2 (N-1)/N * S
all-gather          (N-1) * S
reduce-scatter      (N-1)/N * S
all-to-all          (N-1)/N * S
collective-permute  S
==================  ===================

Asynchronous pairs are charged once (at ``*-start``). A collective inside a ``while`` loop
(its body or condition, or anything they call) runs once per iteration. Where the program
states the loop's trip count (XLA annotates ``known_trip_count`` on the loops of a compiled
program whose count it can prove, such as a ``lax.scan``'s), the collective is charged that
many times (``Collective.count``). Where it does not (a ``lax.while_loop`` that stops on a
value, such as a line search's), the collective is marked ``in_loop``, counted once per
iteration in ``WireReport.loop_bits``, and ``WireReport.bits(iterations)`` charges it per
iteration; in jrelu the only such collective is a line search's trial
(``jrelu.linesearch``), whose iterations its state counts. A program that scans
``num_steps`` identical steps is read per step with ``WireReport.per_step(num_steps)``.

References:
  Thakur, Rabenseifner, Gropp, "Optimization of Collective Communication Operations in
  MPICH", IJHPCA 2005 (ring and recursive algorithms behind the per-collective costs).
"""

from __future__ import annotations

import dataclasses
import re

import jax

_DTYPE_BITS = {
    "pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "f8e4m3fn": 8, "f8e5m2": 8,
    "s16": 16, "u16": 16, "f16": 16, "bf16": 16, "s32": 32, "u32": 32, "f32": 32,
    "s64": 64, "u64": 64, "f64": 64, "c64": 64, "c128": 128,
}
_FACTORS = {
    "all-reduce": lambda n: 2 * (n - 1) / n,
    "all-gather": lambda n: n - 1,
    "reduce-scatter": lambda n: (n - 1) / n,
    "all-to-all": lambda n: (n - 1) / n,
    "collective-permute": lambda n: 1,
}
_SHAPE = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*->.*\{\s*$")
_BODY = re.compile(r"\bbody=%?([\w.\-]+)")
_CONDITION = re.compile(r"\bcondition=%?([\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CALLS = re.compile(r"\b(?:to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction of an HLO module.

  Attributes:
    name: the HLO instruction name.
    op: ``all-reduce``, ``all-gather``, ``reduce-scatter``, ``all-to-all`` or
      ``collective-permute``.
    operand_bits: S, one device's operand size in bits.
    group_size: N, devices in one replica group.
    sent_bits: bits one device sends, ``factor(op, N) * S``, each time it runs.
    in_loop: whether it sits inside a ``while`` loop whose trip count the program does
      not state (it runs once per iteration of that loop).
    count: how many times it runs when the program runs once: the product of the stated
      trip counts of the loops around it (1 outside loops); with ``in_loop``, how many
      times per iteration of the innermost loop without a stated count. A float after
      :meth:`WireReport.per_step`.
  """
  name: str
  op: str
  operand_bits: int
  group_size: int
  sent_bits: float
  in_loop: bool = False
  count: float = 1


@dataclasses.dataclass(frozen=True)
class WireReport:
  """Collectives of one program and the bits one device sends when it runs once.

  Every sum below charges a collective ``count`` times (:class:`Collective`).

  Attributes:
    collectives: every collective found.
    sent_bits: bits one device sends, a loop without a stated trip count taken to run
      once: ``fixed_bits + loop_bits``.
    operand_bits: sum of ``count * operand_bits`` over the collectives.
    fixed_bits: bits sent by the collectives outside loops without a stated trip count.
    loop_bits: bits sent by the collectives inside them: what one more iteration sends.
  """
  collectives: tuple[Collective, ...]

  @property
  def sent_bits(self) -> float:
    return sum(c.count * c.sent_bits for c in self.collectives)

  @property
  def fixed_bits(self) -> float:
    return sum(c.count * c.sent_bits for c in self.collectives if not c.in_loop)

  @property
  def loop_bits(self) -> float:
    return sum(c.count * c.sent_bits for c in self.collectives if c.in_loop)

  def bits(self, iterations: float = 1) -> float:
    """Bits one device sends when the program's loop runs ``iterations`` times.

    ``fixed_bits + iterations * loop_bits``; with no loop, ``sent_bits`` for any value.

    Example:
      >>> report.bits(iterations=3)   # a step whose line search made 3 trials
    """
    return self.fixed_bits + iterations * self.loop_bits

  @property
  def operand_bits(self) -> float:
    return sum(c.count * c.operand_bits for c in self.collectives)

  def per_step(self, num_steps: int) -> WireReport:
    """This report for one step of a program that runs ``num_steps`` identical steps.

    For a ``lax.scan`` of ``num_steps`` steps (jrelu's ``parallel.scan_steps``): every
    collective outside loops without a stated trip count is charged ``count / num_steps``
    times; those inside such loops are charged per iteration already, and stay.

    Args:
      num_steps: positive int, the steps one run of the program makes.

    Returns:
      A :class:`WireReport` whose ``fixed_bits`` are one step's.

    Raises:
      ValueError: if ``num_steps`` is not a positive int, or if ``num_steps > 1`` and the
        program's collectives do not sit in a loop of a stated multiple of ``num_steps``
        iterations (a backend that does not annotate trip counts: read one step's
        program instead).

    Example:
      >>> parse(scan_of_10_steps.as_text()).per_step(10).sent_bits
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
      raise ValueError(f"num_steps={num_steps!r}: must be a positive int")
    counted = [c.count for c in self.collectives if not c.in_loop]
    if num_steps > 1 and self.collectives and (
        not counted or any(count % num_steps for count in counted)):
      raise ValueError(
          f"num_steps={num_steps}: the program states no loop of {num_steps} iterations "
          f"around its collectives (counts {counted}, {len(self.collectives) - len(counted)} "
          "in loops without a stated trip count); measure a one-step program instead")
    return WireReport(tuple(
        c if c.in_loop else dataclasses.replace(c, count=c.count / num_steps)
        for c in self.collectives))


def shape_bits(shape_text: str) -> int:
  """Bits of an HLO shape string such as ``f32[8,3]{1,0}`` or a tuple of them.

  Example:
    >>> shape_bits("(u32[1,3]{1,0}, f32[2]{0})")
    160
  """
  total = 0
  for dtype, dims in _SHAPE.findall(shape_text):
    if dtype not in _DTYPE_BITS:
      continue
    count = 1
    for dim in filter(None, dims.split(",")):
      count *= int(dim)
    total += count * _DTYPE_BITS[dtype]
  return total


def _split_shape(rest: str) -> tuple[str, str]:
  """Splits ``'<shape> <opcode>(...)...'`` into the shape and what follows it."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  shape, _, tail = rest.partition(" ")
  return shape, tail


def _operands(call: str) -> list[str]:
  """Top-level comma-separated operands of ``'opcode(a, b, ...) attrs'``."""
  depth, items, current = 0, [], []
  for ch in call[call.index("("):]:
    if ch in "([{":
      depth += 1
      if depth == 1:
        continue
    elif ch in ")]}":
      depth -= 1
      if depth == 0:
        break
    if ch == "," and depth == 1:
      items.append("".join(current))
      current = []
    else:
      current.append(ch)
  items.append("".join(current))
  items = [re.sub(r"/\*.*?\*/", "", item).strip() for item in items]
  return [item for item in items if item]


def _group_size(attrs: str, default: int) -> int:
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
  if iota:
    return int(iota.group(2))
  listed = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
  if listed:
    return len([x for x in listed.group(1).split(",") if x])
  return default


def parse(hlo_text: str) -> WireReport:
  """Finds every collective of an optimized HLO module (text) and its cost.

  Args:
    hlo_text: ``compiled.as_text()`` of a jitted or pmapped function.

  Returns:
    A :class:`WireReport`.

  Example:
    >>> report = parse(jax.jit(f).lower(x).compile().as_text())
    >>> report.sent_bits
  """
  header = re.search(r"num_partitions=(\d+)", hlo_text)
  replicas = re.search(r"replica_count=(\d+)", hlo_text)
  default_group = max(int(header.group(1)) if header else 1,
                      int(replicas.group(1)) if replicas else 1)
  shapes: dict[str, str] = {}
  found = []
  where = []          # the computation of each collective found
  # computation -> [(caller, runs per run of the caller; None: a loop's, uncounted)]
  callers: dict[str, list] = {}
  computation = ""
  for line in hlo_text.splitlines():
    opening = _COMPUTATION.match(line)
    if opening and not _INSTRUCTION.match(line):
      computation = opening.group(1)
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    trips = _TRIP_COUNT.search(line)
    trips = int(trips.group(1)) if trips else None
    for body in _BODY.findall(line):
      callers.setdefault(body, []).append((computation, trips))
    for condition in _CONDITION.findall(line):   # tested once more than the body runs
      callers.setdefault(condition, []).append(
          (computation, None if trips is None else trips + 1))
    callees = set(_CALLS.findall(line))
    for branches in _BRANCHES.findall(line):
      callees.update(b.strip().lstrip("%") for b in branches.split(",") if b.strip())
    for callee in callees:
      callers.setdefault(callee, []).append((computation, 1))
    name, rest = match.groups()
    shape, call = _split_shape(rest.strip())
    shapes[name] = shape
    opcode = call.split("(", 1)[0].strip()
    op = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
    if op not in _FACTORS:
      continue
    operand_bits = 0
    for operand in _operands(call):
      operand_bits += (shape_bits(operand) if _SHAPE.search(operand)
                       else shape_bits(shapes.get(operand.lstrip("%"), "")))
    n = _group_size(call, default_group)
    found.append(Collective(name, op, operand_bits, n, _FACTORS[op](n) * operand_bits))
    where.append(computation)

  runs: dict[str, tuple] = {}

  def runs_of(computation):
    """``(count, in_loop)`` of a computation, summed over the places that call it (HLO
    calls form a DAG: no computation calls itself, directly or not)."""
    if computation not in runs:
      sites = []
      for caller, times in callers.get(computation, ()):
        count, in_loop = runs_of(caller)
        sites.append((1, True) if times is None else (count * times, in_loop))
      in_loop = any(looped for _, looped in sites)
      runs[computation] = (sum(c for c, looped in sites if looped == in_loop) if sites
                           else 1, in_loop)
    return runs[computation]

  collectives = []
  for c, w in zip(found, where):
    count, in_loop = runs_of(w)
    collectives.append(dataclasses.replace(c, count=count, in_loop=in_loop))
  return WireReport(tuple(collectives))


def measure(fn, *args) -> WireReport:
  """Compiles ``fn`` on ``args`` and reads the collectives of its HLO.

  Args:
    fn: a function running exactly one training step: ``jax.pmap`` or ``jax.jit`` of it
      (e.g. ``jax.jit(jax.shard_map(step, ...))``), or a plain Python function, which is
      measured as ``jax.jit(fn)`` (its collectives then need a ``shard_map`` inside it).
    *args: example arguments (arrays or ``jax.ShapeDtypeStruct``).

  Returns:
    A :class:`WireReport` of the compiled program.

  Example:
    >>> measure(jax.pmap(step, axis_name="data"), params, opt_state, x, y).sent_bits
  """
  if not hasattr(fn, "lower"):
    fn = jax.jit(fn)
  return parse(fn.lower(*args).compile().as_text())
