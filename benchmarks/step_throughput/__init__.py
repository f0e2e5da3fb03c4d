r"""How fast is jrelu's training step: against reading the batch once, and against PyTorch.

Sections (``--sections``, default all):

* ``step``: steps per second of jrelu's training step (``jrelu.parallel.scan_steps``
  chunks of ``--steps_per_chunk`` steps, compiled once, one warm-up call, then
  ``--repeats`` timed calls that block on the result, interleaved across configurations
  so that a busy machine slows all alike), for every row of ``METHODS`` on 1 and
  ``--num_devices`` devices, along three paths:

  - ``vmap``: ``jrelu.parallel.vmapped``, the N devices simulated in one program, the
    data set split into one segment per device (``jrelu.sampling.split_segments``);
  - ``pmap``: ``jax.pmap`` over N simulated CPU devices with the replicated data set,
    what ``python -m jrelu.train`` runs;
  - ``pmap_replacement``: ``pmap`` with the sampling jrelu used before, rows drawn with
    replacement and gathered (``jrelu.sampling.make_batch_fn(B, sampling="replacement")``).

* ``roofline``: a step must read its ``B x d`` float32 batch from memory at least once.
  With ``step``, timed once per round of the step timings (machine speed drifts), else on
  its own. A NumPy matvec over a fresh ``B x d`` slice of an array of at least 4 x the last-level
  cache (slices cycle, so each streams from memory) with 1 and all cores;
  ``roofline_seconds`` is the faster median, and each step's ``roofline_ratio`` is
  ``roofline_seconds / step seconds`` (1: a step costs no more than reading its batch).
  Each multi-device ``pmap`` row also counts its collectives per step (from the compiled
  HLO), and a loop of scalar all-reduces times one rendezvous of the N devices: on
  simulated CPU devices (one thread each, sharing the cores) the synchronisation, not
  the bytes, is most of a collective's cost, and the JSON gives the step time without it
  as an estimate.
* ``torch``: PyTorch peers at the same global batch and worker count
  (``benchmarks._torch_peers``): DistributedDataParallel over Gloo with N processes and
  PyTorch's communication hooks, and a one-process loop over N simulated workers with QSGD
  as PyTorch compressor code writes it. Needs ``torch==2.13.0`` (``pip install
  '.[bench]'``); skipped with a note when torch is missing or ``--skip_torch``.
* ``sweep``: the ``vmap`` step (``SWEEP_METHOD``, N devices) over d at fixed B and over B
  at fixed d: cost should grow linearly in both (fitted log-log exponents, plot).
* ``kernels``: encode + decode throughput of every compressor in
  ``jrelu.compressors.REGISTRY`` (GB/s of float32 input, jitted, one device, the input
  read from memory as a gradient is) from d = 1e3 to 1e7, next to the NumPy read
  bandwidth, with each codec's ratio to it.
* ``network``: one ``pmap`` training step of the planted two-layer network
  (``jrelu.network``, ``--network_hidden`` x ``--network_dim``: about 1e7 parameters) on
  N devices with online batches, float32 ``psum`` against every codec with its default
  aggregation: the step time and the compression share of it
  (``benchmarks.step_throughput.network_step``).
* ``scale``: d = ``--scale_dim`` (1e6) with online sampling (fresh Gaussian batches drawn on
  the devices every step, no stored data set) and QSGD for a few steps, in a fresh
  process: peak memory (``ru_maxrss``) and steps per second.

    python -m benchmarks.step_throughput                    # full, ~15 min on 2 cores
    python -m benchmarks.step_throughput --quick            # ~2 min
    python -m benchmarks.step_throughput --sections=step,roofline --skip_torch

Prints one JSON line; writes ``OUTDIR/results.json``, ``OUTDIR/summary.md`` (tables for
README) and the plots ``steps_per_second.png``, ``scaling.png``, ``kernels.png``.

Modules: ``settings`` (the timed rows, ``Settings``), ``steps`` (step, rendezvous and
sweep), ``kernels``, ``network_step``, ``peers`` (PyTorch), ``scale``, ``report`` (plots,
summary.md),
``benchmark`` (``run(settings, devices)``) and ``__main__`` (the flags).
"""

from __future__ import annotations

