"""Tensor encodings: how one layer's K or V becomes bytes; one file per encoding, one registry."""

from kvwire.kvcodec.encodings.base import AXES, Encoding
from kvwire.kvcodec.encodings.integer import AsymmetricInt, SymmetricInt
from kvwire.kvcodec.encodings.passthrough import Passthrough
from kvwire.kvcodec.encodings.registry import encoding_names, encodings, get_encoding, register_encoding

__all__ = [
    "AXES",
    "AsymmetricInt",
    "Encoding",
    "Passthrough",
    "SymmetricInt",
    "encoding_names",
    "encodings",
    "get_encoding",
    "register_encoding",
]
