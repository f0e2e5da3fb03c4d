r"""Reproduces the claims of "Fitting ReLUs via SGD and Quantized SGD" with jrelu.

Kalan, Soltanolkotabi, Avestimehr, ISIT 2019 (arXiv 1901.06587): in the planted model
``y = ReLU(<w_star, x>)``, ``x ~ N(0, I_d)``, gradient descent and mini-batch SGD started
at zero recover ``w_star`` once ``n`` is a small multiple of ``d``, they converge
geometrically, and QSGD (Alistarh, Grubic, Li, Tomioka, Vojnovic, arXiv 1610.02132) does
the same while sending a fraction of the bits. Sections (``--sections``; all by default):

1. ``phase_transition`` (:mod:`.phase_transition`): probability that full-batch GD and
   mini-batch SGD from ``w = 0`` reach relative error ``<= 1e-6``, against ``n/d``, for a
   few dimensions.
2. ``convergence`` (:mod:`.training`): relative error against step for float32 SGD and
   QSGD at several ``s`` on the ``jrelu.train`` default problem (d=1000, n=4000, global
   batch 1024, 8 devices, two-phase aggregation, max norm), each at its best step size of a
   small grid, through ``jrelu.experiment.run``.
3. ``bits_to_accuracy`` (:mod:`.training`): the same runs against cumulative bits sent per
   device (read from the compiled program's HLO), and how many times fewer bits each method
   needs than float32 SGD to reach ``1e-6``.
4. ``communication`` (:mod:`.communication`): projected wall time to ``1e-6`` on N = 8 ...
   1024 workers and 1, 10, 100 Gbit/s links under a latency-bandwidth (alpha-beta) model,
   with per-step compute time measured on one device at the per-worker batch.

Sections 3 and 4 reuse the training runs of section 2 (selecting either runs them). Every
run writes ``OUTDIR/summary.md`` (README-ready tables, :mod:`.report`), PNG plots,
``OUTDIR/results.json`` (the result, indented) and ends by printing the same result as one
JSON line on stdout.

    python -m benchmarks.reproduce --quick     # under two minutes, 2 cores
    python -m benchmarks.reproduce             # full: ~20 min, 2 busy cores

The problem of sections 2-4 is set by ``--dim``, ``--num_samples``, ``--batch_size`` and
``--num_steps`` (defaults: those of ``jrelu.experiment.Config``, steps 3000, quick 1500),
``--seed`` and ``--num_devices``. Methods are the rows of ``settings.METHODS``: a new
compressor is one line there. The binary is ``__main__.py`` (flags -> ``Settings``);
:func:`benchmarks.reproduce.benchmark.run` runs the sections.
"""
