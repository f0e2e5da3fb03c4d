"""One experiment: a config in, a trained planted ReLU and its records out. No flags.

The library entry point behind ``python -m jrelu.train`` and the benchmarks: Kalan,
Soltanolkotabi, Avestimehr, "Fitting ReLUs via SGD and Quantized SGD" (arXiv 1901.06587),
where each of N devices takes the gradient of its shard of the global mini-batch, the
gradients are compressed, exchanged and averaged, and every device applies the same
update.

    config = experiment.Config(compressor="sign", scaled_sign=True, error_feedback=True)
    summary = experiment.run(config, "runs/ef_sign")

:class:`Config` is frozen and typed; its fields are the binary's flags, one for one.
Settings that only some methods use (``num_levels`` for QSGD, ``rank`` for PowerSGD,
``decay_rate`` for the exponential schedule, ``learning_rate`` for a fixed step size,
the ``armijo_*`` constants for ``step_size="armijo"``, ...) default to None, meaning "the method's
default"; giving one to a method that does not use it is a :class:`ConfigError`, never
ignored. :func:`resolve` fills the defaults in, and the summary records the resolved
values.

This module is the only place that knows which compressor needs which transform:
:func:`make_communication` builds ``jrelu.compress`` or ``jrelu.error_feedback`` around a
codec of ``jrelu.compressors``, or ``jrelu.powersgd.powersgd``, whose state and
collectives are its own; :func:`make_tx` puts it between SGD's momentum and step. It
also knows which algorithm needs which step (:func:`make_step`): ``algorithm="sgd"``
(the default) averages compressed gradients every step; ``"easgd"``, ``"eamsgd"`` and
``"downpour"`` (``jrelu.easgd``) keep each device's own parameters and send compressed
elastic differences (or pushed updates) to a center every ``tau`` steps.

:func:`run` writes into ``workdir``: ``metrics.jsonl`` (one JSON object per logged chunk),
``summary.json`` (the resolved config, wire bits read from the compiled program, status,
timings), ``checkpoints/`` (``jrelu.checkpoint``) and ``relative_error.png`` when
matplotlib is installed. It holds a lock on the workdir, resumes the run a checkpoint of
the same settings holds (bit-identically) and refuses one of other settings; every file
carries the run's id, and every write is atomic.

Modules: ``config`` (:class:`Config`, its rules, the transform it builds), ``loop``
(:func:`run`), ``files`` (the workdir's files, lock and atomic writes), ``memory`` (the
estimate that refuses a config that cannot fit). The public names are re-exported here.
"""

from jrelu.experiment.config import ALGORITHM_FIELDS, ALGORITHMS, COMPRESSOR_FIELDS
from jrelu.experiment.config import COMPRESSORS, Config, ConfigError, DEFAULTS, MAX_SEED, NORMS, POWERSGD
from jrelu.experiment.config import SCHEDULE_FIELDS, SCHEDULES, STEP_SIZE_FIELDS, STEP_SIZES
from jrelu.experiment.config import describe, make_codec
from jrelu.experiment.config import make_communication, make_schedule, make_step, make_tx
from jrelu.experiment.config import predicted_wire_bits, resolve, steps_per_exchange
from jrelu.experiment.files import CHECKPOINT_DIR, RUN_FILES, WriteError, append_line
from jrelu.experiment.files import check_workdir, json_safe, write_json
from jrelu.experiment.loop import TIMING_FIELDS, DivergedError, Interrupted, run
from jrelu.experiment.memory import available_memory_bytes, check_memory
from jrelu.experiment.memory import estimate_memory_bytes

__all__ = ["ALGORITHMS", "ALGORITHM_FIELDS", "CHECKPOINT_DIR", "COMPRESSORS",
           "COMPRESSOR_FIELDS", "Config", "ConfigError", "DEFAULTS", "DivergedError",
           "Interrupted", "MAX_SEED", "NORMS", "POWERSGD", "RUN_FILES", "SCHEDULES",
           "SCHEDULE_FIELDS", "STEP_SIZES", "STEP_SIZE_FIELDS", "TIMING_FIELDS", "WriteError",
           "append_line", "available_memory_bytes", "check_memory", "check_workdir", "describe",
           "estimate_memory_bytes", "json_safe", "make_codec", "make_communication",
           "make_schedule", "make_step", "make_tx", "predicted_wire_bits", "resolve", "run",
           "steps_per_exchange", "write_json"]
