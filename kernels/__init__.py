"""Quantize/pack, unpack/dequantize and q2c-score kernels: Triton on GPU, vectorized torch elsewhere.

Only the dispatcher and the layout helpers load here; kernels.triton_kernels (and triton itself)
is imported the first time the triton backend is chosen.
"""

from .dispatch import q2c_scores, quantize_pack, unpack_dequantize
from .layout import SUPPORTED_BITS, packed_row_bytes, rotation_block, unit_values
from .reference import hadamard

__all__ = [
    "SUPPORTED_BITS",
    "hadamard",
    "packed_row_bytes",
    "q2c_scores",
    "quantize_pack",
    "rotation_block",
    "unit_values",
    "unpack_dequantize",
]
