"""``python -m benchmarks.real_data``: the quick run end to end, a bad flag, the split.

The quick run goes through the binary's own flags, checks and output
(``run_from_flags``) in this process, so that it shares the suite's JAX start-up and
compile options: rows (fixed and Armijo step sizes, SGD and EASGD), the float32 baseline
in the same run, bits read from the compiled step against the formula (a line search's
trials counted one by one), the table, the plot and the one JSON line.
"""

import json
import pathlib

import numpy as np

from benchmarks.real_data import __main__ as binary
from benchmarks.real_data import data
from benchmarks.real_data import settings

import helpers


def test_quick_run_trains_every_quick_row_and_writes_table_plot_and_json(tmp_path, capsys):
  values = helpers.benchmark_flags(binary, "--quick", f"--outdir={tmp_path}")
  out = binary.run_from_flags(values)
  (line,) = capsys.readouterr().out.splitlines()
  assert json.loads(line)["rows"][0]["key"] == out["rows"][0]["key"]
  assert out["benchmark"] == "real_data" and out["quick"]
  assert (out["train_rows"], out["test_rows"], out["features"]) == (1438, 359, 64)
  assert sorted((r["key"], r["step_size"]) for r in out["rows"]) == sorted(settings.QUICK_ROWS)
  by_key = {(r["key"], r["step_size"]): r for r in out["rows"]}
  baseline = by_key[(settings.BASELINE, "fixed")]
  assert baseline["fewer_bits_than_float32"] == 1.0
  for r in out["rows"]:
    # The bits the compiled step sends are the formula's, exchange for exchange.
    assert r["wire_bits_per_exchange_per_device"] == r[
        "predicted_wire_bits_per_exchange_per_device"]
    history = r["history"]
    steps = settings.QUICK["num_steps"]
    assert history["steps"] == [0, steps // 2, steps]
    assert r["wire_bits_per_linesearch_trial"] == r["predicted_wire_bits_per_linesearch_trial"]
    # Each exchange sends its bits, each line-search trial (Armijo rows only) its own.
    (trials,) = r["linesearch_trials"]
    assert (trials > 0) == (r["step_size"] == "armijo")
    exchanges = -(-steps // r["steps_per_exchange"])
    assert history["cumulative_wire_bits_per_device"][-1] == [
        exchanges * r["wire_bits_per_exchange_per_device"]
        + trials * r["wire_bits_per_linesearch_trial"]]
    assert r["finite"] == [True]
    # Training happened: the loss on the whole training set fell from its start (about
    # log 10 = 2.3 for random weights) and held-out accuracy is far above chance (0.1).
    assert history["train_loss"][-1][0] < history["train_loss"][0][0]
    assert r["test_accuracy"]["mean"] > 0.5
    if r["key"] != settings.BASELINE:
      assert r["fewer_bits_than_float32"] > 1.0
  summary = pathlib.Path(out["summary_md"]).read_text()
  for r in out["rows"]:
    assert f"| {r['method']} | {r['step_size']} |" in summary
  assert [pathlib.Path(p).name for p in out["plots"]] == ["real_data.png"]
  assert pathlib.Path(out["plots"][0]).stat().st_size > 0
  assert json.loads((tmp_path / "results.json").read_text())["seeds"] == [0]


def test_bad_flag_is_one_line_naming_it():
  status, stderr = helpers.benchmark_flag_error(
      binary, ["--num_steps=30", "--num_evals=4"], lambda v: binary.settings_from_flags(v, 8))
  assert status == 2
  assert stderr.splitlines() == ["benchmarks.real_data: error: flag --num_steps=30: not a "
                                 "multiple of --num_evals=4"]


def test_stratified_split_keeps_every_class_share_and_covers_each_row_once():
  labels = np.repeat(np.arange(3), [50, 30, 20])
  train, test = data.stratified_split(labels, 0.2, seed=0)
  assert sorted(np.concatenate([train, test]).tolist()) == list(range(100))
  assert np.bincount(labels[test]).tolist() == [10, 6, 4]
  again = data.stratified_split(labels, 0.2, seed=0)
  assert (again[0] == train).all() and (again[1] == test).all()
