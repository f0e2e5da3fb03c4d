"""Test set-up: 8 simulated CPU devices, made before any JAX computation."""
import jax

jax.config.update("jax_num_cpu_devices", 8)
