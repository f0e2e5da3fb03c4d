"""Test set-up: 8 simulated CPU devices, made before any JAX computation.

``jrelu.parallel.setup_devices`` does it, so the tests run with the same CPU client
threads (``NPROC``) that users get from it.

Compiled programs go to JAX's persistent compilation cache in ``.jax_cache/`` at the
repository root (git ignores it), shared by the pytest-xdist workers: many tests compile
the same program (the same codec on the same shape, the same training step), and the
cache serves the repeats. A fresh clone starts with an empty cache, so CI pays every
distinct compilation once.
"""
import os

import jax

from jrelu import parallel

jax.config.update("jax_compilation_cache_dir",
                  os.path.join(os.path.dirname(os.path.dirname(__file__)), ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
parallel.setup_devices(8)
