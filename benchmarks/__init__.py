"""jrelu's benchmark binaries, run from the repository root as modules.

    python -m benchmarks.reproduce --quick        # the paper's claims (arXiv 1901.06587)
    python -m benchmarks.compressors --quick      # every compressor: bits and error
    python -m benchmarks.step_throughput --quick  # steps/s against the roofline and PyTorch

Each binary defines its own flags only, ends by printing one JSON line on stdout and
writes ``OUTDIR/summary.md`` and plots; ``benchmarks.common`` holds what they share. They
train through ``jrelu.experiment`` (``Config``, ``run``, ``make_tx``).
"""
