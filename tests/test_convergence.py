"""SGD and QSGD converge geometrically to w_star on a small planted problem (d=50, n=400).

The step size 0.4 and the 600-step budget come from a sweep (every case below reaches
1e-6 within 292 steps there), so the margin is about 2x in steps.
"""

import jax
import numpy as np
import pytest

from jrelu import compressors

import helpers

CASES = [("sgd", None, "psum")] + [
    (f"qsgd_s{s}_{agg}", s, agg)
    for s in (1, 2, 4, 16) for agg in ("psum", "all_gather", "two_phase")]


@pytest.mark.parametrize("name,num_levels,aggregation", CASES, ids=[c[0] for c in CASES])
def test_reaches_1e6_relative_error(name, num_levels, aggregation):
  compressor = None if num_levels is None else compressors.qsgd(num_levels)
  tx = helpers.make_tx(compressor, aggregation)
  _, metrics = helpers.run(tx, jax.devices()[:8], num_steps=600)
  errors = np.asarray(metrics["relative_error"][0])
  assert errors[-1] <= 1e-6, f"{name}: relative error {errors[-1]:.2e} after 600 steps"
  # Geometric: the error falls by >= 1e3 between steps 50 and 250 (a straight line on a
  # log scale), not just eventually.
  assert errors[249] <= 1e-3 * errors[49]
