"""Test set-up: 8 simulated CPU devices, made before any JAX computation.

``jrelu.parallel.setup_devices`` does it, so the tests run with the same CPU client
threads (``NPROC``) that users get from it.

Compiled programs go to JAX's persistent compilation cache in ``.jax_cache/`` at the
repository root (git ignores it), shared by the pytest-xdist workers: many tests compile
the same program (the same codec on the same shape, the same training step), and the
cache serves the repeats. A fresh clone starts with an empty cache, so CI pays every
distinct compilation once.

Most of the suite's time is XLA compiling small programs, so the tests ask XLA's CPU
backend for its cheapest code generation: LLVM at -O0 with no expensive passes (about 40%
less wall time measured on 2 cores), the classic elemental emitters instead of the MLIR
fusion emitters, and one LLVM module per program instead of parallel codegen splits
(together about 45% less compile CPU again, measured on codec programs and a training
step). No fast-math is enabled, but these flags can change float rounding: the classic
and the MLIR fusion emitters may order a reduction's additions differently (a 400-step
training loss of the real-data benchmark, which compiles with the same options, differed
in its 4th significant digit). So every comparison in the suite is between programs built
under these flags (subprocesses inherit ``XLA_FLAGS``) or against a bound derived for any
summation order. Speed is measured in ``benchmarks/``, which leave the flags alone. The
few programs whose running is their test's cost ask for XLA's default optimization with
``compiler_options=helpers.RUNTIME_HEAVY``; their checks are statistical, with bounds that
hold for any summation order.
"""
import os
import warnings

os.environ["XLA_FLAGS"] = " ".join(filter(None, [
    os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true", "--xla_cpu_use_fusion_emitters=false",
    "--xla_cpu_parallel_codegen_split_count=1"]))

import jax
import pytest

from jrelu import parallel

jax.config.update("jax_compilation_cache_dir",
                  os.path.join(os.path.dirname(os.path.dirname(__file__)), ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
parallel.setup_devices(8)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
  """Warns when ``--dist loadgroup`` cannot group: tests marked ``xdist_group`` share a
  compiled program or a run (memoized per process) and are sent to one worker for that.

  pytest-xdist groups them by appending ``@group`` to their node ids, which pytest 9
  ignores (its node ids are read-only): the suite still passes, but each worker compiles
  and runs what the group shares (about 30 s more on 2 cores). The ``test`` extra pins
  ``pytest<9`` for this reason.
  """
  if not config.getoption("loadgroup", False):
    return
  grouped = [item for item in items if item.get_closest_marker("xdist_group")]
  if grouped and not any("@" in item.nodeid for item in grouped):
    warnings.warn(pytest.PytestWarning(
        f"--dist loadgroup: pytest {pytest.__version__} ignored pytest-xdist's groups, so "
        "tests that share a compiled program run on both workers; install 'pytest<9'"))
