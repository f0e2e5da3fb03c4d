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
(its body or condition, or anything they call) runs once per iteration, a number the
program text does not hold: it is marked ``in_loop`` and counted once, in
``WireReport.loop_bits``, and ``WireReport.bits(iterations)`` charges it per iteration.
So measure a program that runs exactly one step; in a one-step program of jrelu the only
such collective is a line search's trial (``jrelu.linesearch``), whose iterations its
state counts.

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
_LOOP_CALLS = re.compile(r"\b(?:body|condition)=%?([\w.\-]+)")
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
    in_loop: whether it sits inside a ``while`` loop (runs once per iteration).
  """
  name: str
  op: str
  operand_bits: int
  group_size: int
  sent_bits: float
  in_loop: bool = False


@dataclasses.dataclass(frozen=True)
class WireReport:
  """Collectives of one program and the bits one device sends when it runs once.

  Attributes:
    collectives: every collective found.
    sent_bits: sum of ``sent_bits`` over them, each counted once (a loop's collectives
      as if the loop ran once).
    operand_bits: sum of ``operand_bits`` over them.
    fixed_bits: sum of ``sent_bits`` over the collectives outside loops.
    loop_bits: sum of ``sent_bits`` over the collectives inside loops: what one more
      iteration sends.
  """
  collectives: tuple[Collective, ...]

  @property
  def sent_bits(self) -> float:
    return sum(c.sent_bits for c in self.collectives)

  @property
  def fixed_bits(self) -> float:
    return sum(c.sent_bits for c in self.collectives if not c.in_loop)

  @property
  def loop_bits(self) -> float:
    return sum(c.sent_bits for c in self.collectives if c.in_loop)

  def bits(self, iterations: float = 1) -> float:
    """Bits one device sends when the program's loop runs ``iterations`` times.

    ``fixed_bits + iterations * loop_bits``; with no loop, ``sent_bits`` for any value.

    Example:
      >>> report.bits(iterations=3)   # a step whose line search made 3 trials
    """
    return self.fixed_bits + iterations * self.loop_bits

  @property
  def operand_bits(self) -> int:
    return sum(c.operand_bits for c in self.collectives)


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
  calls: dict[str, set] = {}   # computation -> computations its instructions call
  loops: set = set()  # computations run as a while loop's body or condition
  computation = ""
  for line in hlo_text.splitlines():
    opening = _COMPUTATION.match(line)
    if opening and not _INSTRUCTION.match(line):
      computation = opening.group(1)
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    loops.update(_LOOP_CALLS.findall(line))
    callees = calls.setdefault(computation, set())
    callees.update(_LOOP_CALLS.findall(line))
    callees.update(_CALLS.findall(line))
    for branches in _BRANCHES.findall(line):
      callees.update(b.strip().lstrip("%") for b in branches.split(",") if b.strip())
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
  in_loops = set()
  pending = list(loops)
  while pending:   # everything a loop body or condition calls runs inside the loop
    inner = pending.pop()
    if inner not in in_loops:
      in_loops.add(inner)
      pending.extend(calls.get(inner, ()))
  return WireReport(tuple(dataclasses.replace(c, in_loop=w in in_loops)
                          for c, w in zip(found, where)))


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
