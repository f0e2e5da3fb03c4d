"""Gradient codecs, all following :class:`base.Compressor`.

Each codec lives in one private module ``_NAME.py`` and its factory is re-exported here,
so ``jrelu.compressors.qsgd`` is always the factory (a public module of the same name
would be shadowed by it). ``REGISTRY`` maps codec names to the factories (``jrelu.experiment`` builds them by
name); adding a compressor is one module
plus one line here and one in the contract test suite.
"""

from jrelu.compressors.base import Compressor, code_class, payload_bits
from jrelu.compressors._identity import Identity, identity
from jrelu.compressors._qsgd import QSGD, qsgd
from jrelu.compressors._fo_sgd import FOSGD, fo_sgd
from jrelu.compressors._rand_k import RandK, rand_k
from jrelu.compressors._top_k import TopK, top_k
from jrelu.compressors._sign import Sign, sign
from jrelu.compressors._terngrad import TernGrad, terngrad
from jrelu.compressors._atomo import Atomo, atomo

REGISTRY = {
    "none": identity,
    "qsgd": qsgd,
    "fo_sgd": fo_sgd,
    "rand_k": rand_k,
    "top_k": top_k,
    "sign": sign,
    "terngrad": terngrad,
    "atomo": atomo,
}

__all__ = ["Atomo", "atomo", "FOSGD", "fo_sgd", "Sign", "TernGrad", "sign", "terngrad",
           "Compressor", "Identity", "QSGD", "REGISTRY", "code_class", "identity",
           "payload_bits", "qsgd", "RandK", "rand_k", "TopK", "top_k"]
