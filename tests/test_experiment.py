"""jrelu.experiment: the config's rules, the pieces it builds, and run() end to end."""

import collections
import json
import re

import jax
import optax
import pytest

from jrelu import experiment
from jrelu import linesearch
from jrelu import powersgd
from jrelu import transforms
from jrelu import wire

DEVICES = 8
TINY = dict(dim=20, num_samples=100, batch_size=16, learning_rate=0.1)


def test_resolve_fills_only_the_defaults_the_method_uses():
  config = experiment.resolve(experiment.Config())
  assert (config.num_levels, config.norm, config.aggregation) == (4, "max", "two_phase")
  assert (config.rank, config.decay_steps, config.decay_rate) == (None, None, None)
  power = experiment.resolve(experiment.Config(compressor="powersgd",
                                               lr_schedule="inverse_sqrt"))
  assert (power.rank, power.aggregation, power.num_levels) == (1, None, None)
  assert (power.decay_steps, power.decay_rate) == (100, None)
  assert (config.learning_rate, config.lr_schedule, config.armijo_scale) == (0.5, "constant",
                                                                            None)
  armijo = experiment.resolve(experiment.Config(step_size="armijo"))
  assert (armijo.learning_rate, armijo.lr_schedule, armijo.decay_steps) == (None, None, None)
  assert (armijo.armijo_scale, armijo.armijo_max_learning_rate, armijo.armijo_slope_rtol,
          armijo.armijo_decrease_factor, armijo.armijo_increase_factor,
          armijo.armijo_max_trials) == (0.5, 10.0, 0.1, 0.9, 1.5, 100)
  explicit = experiment.Config(num_levels=8, aggregation="psum")
  assert experiment.resolve(explicit).num_levels == 8
  assert experiment.resolve(explicit).aggregation == "psum"
  assert (config.momentum, config.tau, config.alpha, config.exchange) == (0.0, None, None, None)
  eamsgd = experiment.resolve(experiment.Config(algorithm="eamsgd"), num_devices=6)
  assert (eamsgd.momentum, eamsgd.tau, eamsgd.alpha, eamsgd.exchange) == (
      0.99, 1, 0.15, "synchronous")
  assert experiment.resolve(experiment.Config(algorithm="downpour"), 6).alpha is None
  robin = experiment.resolve(experiment.Config(algorithm="easgd", exchange="round_robin",
                                               compressor="none"))
  assert (robin.aggregation, robin.alpha) == (None, None)


@pytest.mark.parametrize("overrides, field", [
    (dict(num_levels=8, compressor="sign"), "num_levels"),
    (dict(rank=2), "rank"),
    (dict(scaled_sign=True), "scaled_sign"),
    (dict(compressor="powersgd", aggregation="two_phase"), "aggregation"),
    (dict(compressor="powersgd", error_feedback=True), "error_feedback"),
    (dict(compressor="none", error_feedback=True), "error_feedback"),
    (dict(decay_rate=0.5), "decay_rate"),
    (dict(decay_steps=100), "decay_steps"),
    (dict(compressor="top_k", k=3, fraction=0.5), "k"),
    (dict(aggregation="majority_vote"), "aggregation"),
    (dict(batch_size=10, num_samples=5), "batch_size"),
    (dict(seed=-1), "seed"),
    (dict(dim=True), "dim"),
    (dict(tau=2), "tau"),
    (dict(algorithm="downpour", alpha=0.1), "alpha"),
    (dict(algorithm="downpour", momentum=0.9), "momentum"),
    (dict(algorithm="eamsgd", alpha=1.5), "alpha"),
    (dict(algorithm="easgd", exchange="round_robin"), "compressor"),
    (dict(algorithm="easgd", exchange="round_robin", compressor="none",
          aggregation="psum"), "aggregation"),
    (dict(armijo_scale=0.5), "armijo_scale"),
    (dict(step_size="armijo", learning_rate=0.1), "learning_rate"),
    (dict(step_size="armijo", lr_schedule="exponential"), "lr_schedule"),
    (dict(step_size="armijo", decay_steps=10), "decay_steps"),
    (dict(step_size="armijo", armijo_slope_rtol=1.0), "armijo_slope_rtol"),
    (dict(step_size="armijo", armijo_increase_factor=0.5), "armijo_increase_factor"),
    (dict(step_size="armijo", armijo_max_trials=0), "armijo_max_trials"),
])
def test_a_setting_the_method_does_not_use_or_a_bad_value_is_an_error(overrides, field):
  with pytest.raises(experiment.ConfigError) as info:
    experiment.Config(**overrides).validate()
  assert info.value.field == field
  assert f"{field}=" in str(info.value)


def test_the_transform_follows_the_compressor():
  key = jax.random.key(0)
  params = jax.numpy.zeros(12)
  ef = experiment.make_tx(experiment.Config(compressor="top_k", error_feedback=True), key, 2)
  assert isinstance(ef.init(params)[0], transforms.ErrorFeedbackState)
  plain = experiment.make_tx(experiment.Config(), key, 2)
  assert isinstance(plain.init(params)[0], transforms.CompressState)
  power = experiment.make_tx(experiment.Config(compressor="powersgd"), key, 2)
  assert isinstance(power.init(params)[0], powersgd.PowerSGDState)
  momentum = experiment.make_tx(experiment.Config(momentum=0.9), key, 2)
  assert isinstance(momentum.init(params)[0], optax.EmaState)
  armijo = experiment.make_tx(experiment.Config(step_size="armijo", armijo_scale=0.25), key, 2)
  assert isinstance(armijo.init(params)[-1], linesearch.ArmijoState)
  assert experiment.make_codec(experiment.Config(compressor="atomo", dim=1000), 8).budget == 15
  with pytest.raises(experiment.ConfigError, match="algorithm='easgd' is no optax"):
    experiment.make_tx(experiment.Config(algorithm="easgd"), key, 2)


def test_last_chunk_may_be_shorter_and_target_zero_never_stops(tmp_path):
  seen = []
  config = experiment.Config(**TINY, num_steps=25, log_every=10, target_relative_error=0)
  summary = experiment.run(config, str(tmp_path), devices=jax.devices()[:DEVICES],
                           callbacks=[seen.append])
  assert (summary["status"], summary["steps"], summary["steps_to_target"]) == (
      "finished", 25, None)
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert records == seen  # every callback sees exactly the lines written
  assert [r["step"] for r in records] == [10, 20, 25]
  # Exactly 1.0: the init is zeros, and ||0 - w|| / ||w|| divides two identical float32
  # norms (negation is exact). The JSON round trip of a float is exact (repr).
  assert records[-1]["relative_error"] < summary["initial_relative_error"] == 1.0
  # Exact: run() writes steps * sent_bits, the same float64 product as below.
  assert records[-1]["cumulative_wire_bits_per_device"] == (
      25 * summary["wire_bits_per_step_per_device"])
  on_disk = json.loads((tmp_path / "summary.json").read_text())
  assert on_disk["num_levels"] == 4 and on_disk["workdir"] == str(tmp_path)



def test_bits_come_from_the_running_chunk_or_without_stated_trip_counts_from_one_step(
    tmp_path, monkeypatch):
  # Each run reads its bits from the compiled chunk of 5 steps (no one-step program):
  # they equal the formula. Then a backend that states no trip counts (simulated by
  # removing XLA's annotations from the text): one step's program is compiled and read,
  # and the bits are the same.
  config = experiment.Config(**TINY, num_steps=10, log_every=5)
  monkeypatch.setattr(experiment.loop, "_PROGRAMS", collections.OrderedDict())
  measured = []
  measure = wire.measure
  monkeypatch.setattr(wire, "measure", lambda *args: measured.append(1) or measure(*args))
  summary = experiment.run(config, str(tmp_path / "stated"), devices=jax.devices()[:DEVICES])
  # Exact: both are 2 (N-1)/N or (N-1) times whole numbers of bits, dyadic products.
  assert (summary["wire_bits_per_step_per_device"]
          == summary["predicted_wire_bits_per_step_per_device"] > 0)
  assert not measured
  parse = wire.parse
  monkeypatch.setattr(wire, "parse", lambda text: parse(
      re.sub(r'"known_trip_count":\{"n":"\d+"\}', "", text)))
  monkeypatch.setattr(experiment.loop, "_PROGRAMS", collections.OrderedDict())
  unstated = experiment.run(config, str(tmp_path / "unstated"),
                            devices=jax.devices()[:DEVICES])
  assert measured == [1]
  for field in ("wire_bits_per_step_per_device", "wire_operand_bits_per_step_per_device",
                "relative_error"):
    assert unstated[field] == summary[field], field

def test_divergence_raises_keeps_the_summary_and_the_chunks_finite_steps(tmp_path):
  config = experiment.Config(**dict(TINY, learning_rate=1e4), num_steps=20, log_every=4)
  with pytest.raises(experiment.DivergedError) as info:
    experiment.run(config, str(tmp_path), devices=jax.devices()[:DEVICES])
  bad = info.value.step
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["status"] == "diverged" and summary["diverged_at_step"] == bad
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert bad % 4 != 1  # inside a chunk, not at its first step
  # The chunk's steps before the bad one are logged; the run's error is the last of them.
  assert lines[-1]["step"] == summary["steps"] == bad - 1
  assert summary["relative_error"] == lines[-1]["relative_error"]


def test_powersgd_summary_records_no_aggregation(tmp_path):
  config = experiment.Config(**TINY, compressor="powersgd", num_steps=2, log_every=2)
  summary = experiment.run(config, str(tmp_path), devices=jax.devices()[:DEVICES])
  assert summary["aggregation"] is None and summary["rank"] == 1
  # A vector passes through: PowerSGD's all-reduce of the float32 gradient. Exact: both
  # are 2 (N-1)/N * 32 d = 1.75 * 640 bits, a dyadic product with no rounding.
  assert summary["wire_bits_per_step_per_device"] == summary["float32_wire_bits"]


def test_write_json_is_strict(tmp_path):
  path = str(tmp_path / "x.json")
  experiment.write_json(path, {"a": float("nan"), "b": [1.0, float("inf")]})
  assert json.loads(open(path).read()) == {"a": None, "b": [1.0, None]}
