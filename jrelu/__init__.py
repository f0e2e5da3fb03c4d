"""jrelu: communication-compressed data-parallel SGD in JAX.

Reference problem: Kalan, Soltanolkotabi, Avestimehr, "Fitting ReLUs via SGD and Quantized
SGD" (arXiv 1901.06587). Public names only; the logic lives in the submodules.
"""

from jrelu import aggregation
from jrelu import checkpoint
from jrelu import compressors
from jrelu import easgd
from jrelu import experiment
from jrelu import linesearch
from jrelu import mlp
from jrelu import network
from jrelu import parallel
from jrelu import planted
from jrelu import powersgd
from jrelu import processes
from jrelu import sampling
from jrelu import wire
from jrelu.linesearch import ArmijoState, armijo
from jrelu.transforms import CompressState, ErrorFeedbackState, compress, error_feedback
from jrelu.transforms import WireCostWarning, qsgd, signum

__version__ = "0.1.0"

__all__ = ["ArmijoState", "CompressState", "ErrorFeedbackState", "WireCostWarning", "aggregation",
           "armijo", "checkpoint", "compress", "compressors", "easgd", "error_feedback",
           "experiment", "linesearch", "mlp", "network", "parallel", "planted", "powersgd",
           "processes", "qsgd", "sampling", "signum", "wire"]
