"""Test set-up: 8 simulated CPU devices, made before any JAX computation.

``jrelu.parallel.setup_devices`` does it, so the tests run with the same CPU client
threads (``NPROC``) that users get from it.
"""
from jrelu import parallel

parallel.setup_devices(8)
