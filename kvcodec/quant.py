"""Quantizer: how one tensor (a layer's K or V) is encoded, by a registered encoding's name.

A quantizer turns one layer's K or V for the positions of a chunk, x: [kv_heads, n, head_dim],
into (scales, payload) bytes and back. What the bytes are is the encoding's business
(kvcodec/encodings/: one file per encoding, one registry); the integer encodings go through the
`kernels` dispatcher (Triton on CUDA, vectorized torch on CPU), so the bytes are identical
whichever path runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvwire.kvcodec.encodings import AXES, Encoding, get_encoding
from kvwire.kvcodec.errors import ConfigError

__all__ = ["AXES", "Quantizer"]


@dataclass(frozen=True)
class Quantizer:
    """How one tensor (a layer's K or V) is encoded.

    kind: a registered encoding (kvcodec.encodings.encoding_names(): fp32 | fp16 | bf16 passthrough,
    int8 | int4 | int3 | int2 symmetric, asym4 | asym3 | asym2 asymmetric, `_rot` for their
    Hadamard-rotated forms). axis: "token" — one scale per (head, position, group of `group`
    channels; 0 = the whole head_dim); "channel" — one scale per (head, channel, group of `group`
    positions of a chunk; 0 = all of them; KIVI-style, for keys with outlier channels; not for
    rotated kinds). Every field is checked here, so a Quantizer that exists can be encoded, framed
    and decoded.
    """

    kind: str
    axis: str = "token"
    group: int = 0

    def __post_init__(self):
        encoding = get_encoding(self.kind)  # ConfigError listing the known names
        if self.axis not in AXES:
            raise ConfigError(f"unknown quantization axis {self.axis!r}; known: {', '.join(AXES)}")
        if self.group < 0:
            raise ConfigError(f"group must be >= 0, got {self.group}")
        encoding.check(self.axis, self.group)

    @property
    def encoding(self) -> Encoding:
        return get_encoding(self.kind)

    def check_head_dim(self, head_dim: int) -> None:
        """Raise ConfigError if this encoding cannot pack rows of head_dim values."""
        self.encoding.check_head_dim(self.axis, self.group, head_dim)

    def sizes(self, heads: int, n: int, head_dim: int) -> tuple[int, int]:
        """(scale bytes, payload bytes) of a chunk of n positions: the decoder checks lengths against these."""
        return self.encoding.sizes(self.axis, self.group, heads, n, head_dim)

    def encode(self, x: torch.Tensor) -> tuple[bytes, bytes]:
        """x: [heads, n, head_dim] -> (scales, payload) bytes."""
        return self.encoding.encode(x, self.axis, self.group)

    def decode(self, scales: bytes, payload: bytes, out: torch.Tensor) -> torch.Tensor:
        """Fill out: [heads, n, head_dim] (model dtype) from bytes whose lengths match sizes()."""
        return self.encoding.decode(scales, payload, out, self.axis, self.group)
