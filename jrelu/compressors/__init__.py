"""Gradient codecs, all following :class:`base.Compressor`.

Each codec lives in one private module ``_NAME.py`` and its factory is re-exported here,
so ``jrelu.compressors.qsgd`` is always the factory (a public module of the same name
would be shadowed by it). ``REGISTRY`` maps the names accepted by
``python -m jrelu.train --compressor`` to the factories; adding a compressor is one module
plus one line here and one in the contract test suite.
"""

from jrelu.compressors.base import Compressor, code_class, payload_bits
from jrelu.compressors._identity import Identity, identity
from jrelu.compressors._qsgd import QSGD, qsgd

REGISTRY = {
    "none": identity,
    "qsgd": qsgd,
}

__all__ = ["Compressor", "Identity", "QSGD", "REGISTRY", "code_class", "identity",
           "payload_bits", "qsgd"]
