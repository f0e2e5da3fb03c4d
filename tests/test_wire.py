"""Bits read from programs' HLO, lowered or compiled, equal each aggregation's formula.

The full codec x strategy grid measures the aggregation alone (a pmap of
``aggregation.aggregate`` over one gradient): that is where every collective is. The grid
reads the HLO as lowered, before XLA's passes, which is what the aggregation asks the
compiler to send; one codec per strategy checks that compiling keeps every collective
as lowered (XLA's CPU passes neither add, drop, combine nor resize them here), and a few
whole compiled training steps check that the rest of a step adds no collective.
"""

import jax
import jax.numpy as jnp
import pytest

from jrelu import aggregation
from jrelu import compressors
from jrelu import parallel
from jrelu import planted
from jrelu import wire

import helpers

CODECS = {
    "none": compressors.identity,
    "qsgd_s1": lambda: compressors.qsgd(1),
    "qsgd_s4_bucket128": lambda: compressors.qsgd(4, bucket_size=128),
    "sign": compressors.sign,
    "sign_scaled": lambda: compressors.sign(scaled=True),
    "terngrad": compressors.terngrad,
    "top_k": lambda: compressors.top_k(fraction=0.1),
    "rand_k": lambda: compressors.rand_k(fraction=0.1),
    "fo_sgd": compressors.fo_sgd,
    "atomo": lambda: compressors.atomo(16),
}
# Codecs measured at 2 devices too (all of them at 8).
AT_TWO_DEVICES = ("none", "qsgd_s1", "qsgd_s4_bucket128", "rand_k", "terngrad")
DIM = 1000


def aggregation_bits(compressor, strategy, num_devices, shape=(DIM,), compiled=False):
  """Wire report of one ``aggregate`` call, pmapped over ``num_devices`` devices.

  Every device gets the same step key (so the common key of codecs with common randomness
  is shared, as in ``jrelu.transforms``) and folds in its index for its own noise. Read
  from the lowered HLO, or with ``compiled`` from the compiled program (``wire.measure``).
  """
  def one_device(step_key, g):
    key = jax.random.fold_in(step_key, jax.lax.axis_index("data"))
    return aggregation.aggregate(strategy, compressor, key, g, "data",
                                 common_key=aggregation.common_key(step_key))

  devices = jax.devices()[:num_devices]
  fn = jax.pmap(one_device, axis_name="data", devices=devices)
  keys = jnp.stack([jax.random.key(0)] * num_devices)
  grads = jnp.zeros((num_devices,) + tuple(shape), jnp.float32)
  if compiled:
    return wire.measure(fn, keys, grads)
  return wire.parse(fn.lower(keys, grads).as_text(dialect="hlo"))


def step_bits(compressor, strategy, num_devices, wrapper="pmap"):
  """Wire report of one whole training step (planted ReLU, dimension DIM)."""
  devices = jax.devices()[:num_devices]
  tx = helpers.make_tx(compressor, strategy)
  data = helpers.problem(DIM, num_samples=64)
  step = parallel.make_step(planted.loss, helpers.batch_fn(64), tx,
                            metrics_fn=planted.metrics_fn)
  inputs = helpers.replicated_inputs(tx, devices, data, DIM)
  return wire.measure(parallel.wrap(wrapper, step, devices), *inputs)


CASES = [(codec, strategy) for codec in sorted(CODECS)
         for strategy in aggregation.supported(CODECS[codec]())]
CASES = [(c, s, n) for c, s in CASES for n in (2, 8) if n == 8 or c in AT_TWO_DEVICES]
# Collectives per call: a code crosses the wire as one buffer per phase (every collective
# is a rendezvous of all devices, which dominates a step on simulated CPU devices).
PHASES = {"psum": 1, "all_gather": 1, "two_phase": 2, "majority_vote": 2,
          "integer_psum": 2}


def check_report(report, strategy, compressor, num_devices):
  expected = aggregation.wire_bits(strategy, compressor, (DIM,), num_devices)
  # Both sides are sums of a few products of integers and (N - 1) / N: equal up to float64
  # rounding, relative 1e-15 per operation.
  assert report.sent_bits == pytest.approx(expected, rel=1e-12, abs=0), report.collectives
  assert all(c.group_size == num_devices for c in report.collectives)
  assert len(report.collectives) == PHASES[strategy], report.collectives


@pytest.mark.parametrize("codec,strategy,num_devices", CASES)
def test_aggregation_bits_equal_formula(codec, strategy, num_devices):
  compressor = CODECS[codec]()
  check_report(aggregation_bits(compressor, strategy, num_devices), strategy, compressor,
               num_devices)


# One codec per strategy, each strategy's collectives as they are laid out in the grid.
COMPILED_CASES = [("sign_scaled", "psum"), ("qsgd_s4_bucket128", "all_gather"),
                  ("terngrad", "two_phase"), ("sign", "majority_vote"),
                  ("qsgd_s1", "integer_psum")]


def test_compiled_cases_cover_every_strategy():
  assert {strategy for _, strategy in COMPILED_CASES} == set(PHASES)
  assert all((codec, strategy, 8) in CASES for codec, strategy in COMPILED_CASES)


@pytest.mark.parametrize("codec,strategy", COMPILED_CASES)
def test_compiling_keeps_the_lowered_collectives(codec, strategy):
  compressor = CODECS[codec]()
  lowered = aggregation_bits(compressor, strategy, 8)
  compiled = aggregation_bits(compressor, strategy, 8, compiled=True)
  key = lambda r: sorted((c.op, c.operand_bits, c.group_size) for c in r.collectives)  # noqa: E731
  assert key(compiled) == key(lowered) and compiled.sent_bits == lowered.sent_bits
  check_report(compiled, strategy, compressor, 8)


@pytest.mark.parametrize("codec,strategy", [("qsgd_s1", "two_phase"),
                                            ("sign", "majority_vote"),
                                            ("terngrad", "integer_psum")])
def test_whole_step_sends_only_the_aggregation(codec, strategy):
  compressor = CODECS[codec]()
  check_report(step_bits(compressor, strategy, 8), strategy, compressor, 8)


def test_whole_step_bits_same_under_shard_map():
  compressor = compressors.qsgd(4)
  by_pmap = step_bits(compressor, "two_phase", 8, wrapper="pmap")
  by_shard_map = step_bits(compressor, "two_phase", 8, wrapper="shard_map")
  assert by_pmap.sent_bits == by_shard_map.sent_bits


def test_qsgd_two_phase_sends_at_least_12x_fewer_bits_than_float32():
  qsgd1 = compressors.qsgd(1)
  two_phase = aggregation_bits(qsgd1, "two_phase", 8).sent_bits
  gathered = aggregation_bits(qsgd1, "all_gather", 8).sent_bits
  float32 = aggregation_bits(compressors.identity(), "psum", 8).sent_bits
  assert float32 == 2 * 7 / 8 * 32 * DIM
  assert float32 / two_phase >= 12  # 56000 / 4032 = 13.9
  assert two_phase < gathered


def test_headline_ratios_at_8_devices_and_dim_1000():
  """Majority vote >= 25x, TernGrad >= 12x, FO-SGD >= 25x fewer bits than the float32
  all-reduce (measured from the compiled aggregation)."""
  float32 = 2 * 7 / 8 * 32 * DIM
  ratios = {name: float32 / aggregation_bits(make(), strategy, 8).sent_bits
            for name, make, strategy in [("sign", compressors.sign, "majority_vote"),
                                         ("terngrad", compressors.terngrad, "two_phase"),
                                         ("fo_sgd", compressors.fo_sgd, "two_phase")]}
  assert ratios["sign"] >= 25 and ratios["fo_sgd"] >= 25 and ratios["terngrad"] >= 12, ratios


def test_two_phase_per_device_bits_stay_flat_while_all_gather_grows():
  qsgd4 = compressors.qsgd(4)
  flat = [aggregation.wire_bits("two_phase", qsgd4, (10**6,), n) for n in (8, 64, 1024)]
  grow = [aggregation.wire_bits("all_gather", qsgd4, (10**6,), n) for n in (8, 64, 1024)]
  assert max(flat) / min(flat) < 1.2
  assert grow[2] / grow[0] > 100


SYNTHETIC_HLO = """HloModule jit_step, entry_computation_layout={()}, num_partitions=4

ENTRY %main (p0: f32[10], p1: u32[2,3]) -> f32[10] {
  %p0 = f32[10]{0} parameter(0)
  %p1 = u32[2,3]{1,0} parameter(1)
  %ar = f32[10]{0} all-reduce(%p0), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add
  %ag = u32[8,3]{1,0} all-gather(%p1), channel_id=2, replica_groups=[1,4]<=[4], dimensions={0}
  %ags = (u32[2,3]{1,0}, u32[8,3]{1,0}) all-gather-start(%p1), replica_groups={{0,1},{2,3}}, dimensions={0}
  %agd = u32[8,3]{1,0} all-gather-done(%ags)
  %a2a = (u32[1,3]{1,0}, u32[1,3]{1,0}) all-to-all(u32[1,3]{1,0} %x, u32[1,3]{1,0} %y), replica_groups={}
  ROOT %cp = f32[10]{0} collective-permute(%ar), source_target_pairs={{0,1},{1,2}}
}
"""


def test_parse_synthetic_hlo():
  report = wire.parse(SYNTHETIC_HLO)
  got = {c.name: (c.op, c.operand_bits, c.group_size) for c in report.collectives}
  assert got == {
      "ar": ("all-reduce", 320, 4),
      "ag": ("all-gather", 192, 4),
      "ags": ("all-gather", 192, 2),       # async pair charged once, at the start
      "a2a": ("all-to-all", 192, 4),       # empty groups: all partitions
      "cp": ("collective-permute", 320, 4),
  }
  expected = 2 * 3 / 4 * 320 + 3 * 192 + 1 * 192 + 3 / 4 * 192 + 320
  assert report.sent_bits == pytest.approx(expected)
  assert report.operand_bits == 320 + 192 + 192 + 192 + 320


# A search's loop (as jrelu.armijo compiles it): the trial's all-reduce in the while body,
# a second one in a computation the body calls, and one in a conditional branch outside
# any loop.
LOOP_HLO = """HloModule jit_step, entry_computation_layout={()}, num_partitions=8

%sum (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%inner (q: f32[2]) -> f32[2] {
  %q = f32[2]{0} parameter(0)
  ROOT %deep = f32[2]{0} all-reduce(%q), replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%sum
}

%body (t: (f32[], s32[])) -> (f32[], s32[]) {
  %t = (f32[], s32[]) parameter(0)
  %v = f32[] get-tuple-element(%t), index=0
  %trial = f32[] all-reduce(%v), replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%sum
  %c = f32[2]{0} call(%w), to_apply=%inner
  ROOT %r = (f32[], s32[]) tuple(%trial, %i)
}

%cond (t: (f32[], s32[])) -> pred[] {
  %t = (f32[], s32[]) parameter(0)
  ROOT %p = pred[] constant(true)
}

%branch (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  ROOT %once = f32[4]{0} all-reduce(%x), replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%sum
}

ENTRY %main (p0: f32[4], p1: (f32[], s32[])) -> f32[4] {
  %p0 = f32[4]{0} parameter(0)
  %p1 = (f32[], s32[]) parameter(1)
  %loop = (f32[], s32[]) while(%p1), condition=%cond, body=%body
  ROOT %k = f32[4]{0} conditional(%pr, %p0, %p0), branch_computations={%branch, %branch}
}
"""


def test_parse_marks_the_collectives_of_a_loop():
  report = wire.parse(LOOP_HLO)
  assert {c.name: c.in_loop for c in report.collectives} == {
      "deep": True, "trial": True, "once": False}
  per = 2 * 7 / 8
  assert report.loop_bits == per * (32 + 64)
  assert report.fixed_bits == per * 128
  assert report.bits(3) == per * 128 + 3 * per * (32 + 64)
  assert report.sent_bits == report.bits(1)   # each counted once



# The same search inside a scan of 5 steps, as XLA compiles ``parallel.scan_steps``: the
# scan's loop states its trip count, the search's does not. Each step all-reduces its
# gradient once; the exchange branch sits inside the scan too.
SCAN_HLO = LOOP_HLO.replace("ENTRY %main", "%step").replace(
    "ROOT %k = f32[4]{0} conditional", "%grad = f32[4]{0} all-reduce(%p0), "
    "replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%sum\n  ROOT %k = f32[4]{0} conditional"
) + """
%scan_cond (u: f32[4]) -> pred[] {
  %u = f32[4]{0} parameter(0)
  ROOT %go = pred[] constant(true)
}

ENTRY %main (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  ROOT %scan = f32[4]{0} while(%x), condition=%scan_cond, body=%step, backend_config={"known_trip_count":{"n":"5"}}
}
"""
UNSTATED_SCAN_HLO = SCAN_HLO.replace('backend_config={"known_trip_count":{"n":"5"}}', "")


def test_parse_charges_a_stated_trip_count_and_reads_a_scan_per_step():
  report = wire.parse(SCAN_HLO)
  assert {c.name: (c.in_loop, c.count) for c in report.collectives} == {
      "deep": (True, 1), "trial": (True, 1), "once": (False, 5), "grad": (False, 5)}
  per = 2 * 7 / 8
  # Exact: every term is a dyadic rational times a small integer.
  assert report.fixed_bits == 5 * per * (128 + 128)
  assert report.loop_bits == per * (32 + 64)        # per trial, whatever the step
  step = report.per_step(5)
  assert step.fixed_bits == per * (128 + 128) == wire.parse(
      UNSTATED_SCAN_HLO.replace("while(%x), condition=%scan_cond, body=%step",
                                "call(%x), to_apply=%step")
  ).fixed_bits                                      # the step called once, no loop
  assert step.loop_bits == report.loop_bits
  assert step.operand_bits == 128 + 128 + 32 + 64
  for bad in (0, 2.5, True):
    with pytest.raises(ValueError, match=f"num_steps={bad!r}"):
      report.per_step(bad)
  # A scan whose trip count the program does not state cannot be read per step.
  with pytest.raises(ValueError, match="states no loop of 5 iterations"):
    wire.parse(UNSTATED_SCAN_HLO).per_step(5)
  with pytest.raises(ValueError, match="states no loop of 3 iterations"):
    report.per_step(3)

def test_shape_bits():
  assert wire.shape_bits("f32[8,3]{1,0}") == 768
  assert wire.shape_bits("(bf16[4]{0}, pred[2]{0}, s8[])") == 64 + 16 + 8


def test_measure_jits_a_plain_function():
  # A plain function has no .lower (it used to raise AttributeError): measure jits it.
  mesh = jax.sharding.Mesh(jax.devices()[:8], ("data",))

  def total(x):
    return jax.shard_map(lambda v: jax.lax.psum(v, "data"), mesh=mesh,
                         in_specs=jax.sharding.PartitionSpec("data"),
                         out_specs=jax.sharding.PartitionSpec())(x)

  # One all-reduce of one float32 per device: 2 (N-1)/N * 32 bits.
  assert wire.measure(total, jnp.ones(8)).sent_bits == 2 * 7 / 8 * 32
