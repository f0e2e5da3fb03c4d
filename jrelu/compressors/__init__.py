"""Gradient codecs: one module per family, all following :class:`base.Compressor`.

``REGISTRY`` maps the names accepted by ``python -m jrelu.train --compressor`` to the
factories; adding a compressor is one module plus one line here.
"""

from jrelu.compressors.base import Compressor, code_class, payload_bits
from jrelu.compressors.identity import Identity, identity
from jrelu.compressors.qsgd import QSGD, qsgd

REGISTRY = {
    "none": identity,
    "qsgd": qsgd,
}

__all__ = ["Compressor", "Identity", "QSGD", "REGISTRY", "code_class", "identity",
           "payload_bits", "qsgd"]
