"""The contract every tensor encoding fulfils, and the byte helpers its families share.

An encoding turns one layer's K or V at a chunk's positions, x: [heads, n, head_dim], into
(scales, payload) bytes and back, for an axis ("token" or "channel") and a channel group that a
Quantizer has already checked with `check()`. A family (passthrough.py, integer.py) writes the
five methods once; each encoding is one instance of a family in its own file, named there with its
wire code, and listed in registry.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

AXES = ("token", "channel")


class Encoding(ABC):
    """One registered tensor encoding.

    name: what profiles and the CLI call it. code: its kind byte in a chunk's tensor head (one
    byte, 1..255; docs/wire-format.md lists them). axes: the axes it accepts, "token" first.
    """

    name: str
    code: int
    axes: ClassVar[tuple[str, ...]]

    @abstractmethod
    def check(self, axis: str, group: int) -> None:
        """Raise ConfigError if this encoding does not take `axis` (one of AXES) with `group` (>= 0)."""

    @abstractmethod
    def check_head_dim(self, axis: str, group: int, head_dim: int) -> None:
        """Raise ConfigError if rows of `head_dim` values cannot be encoded this way."""

    @abstractmethod
    def sizes(self, axis: str, group: int, heads: int, n: int, head_dim: int) -> tuple[int, int]:
        """(scale bytes, payload bytes) of a chunk of n positions: the decoder checks lengths against these."""

    @abstractmethod
    def encode(self, x: torch.Tensor, axis: str, group: int) -> tuple[bytes, bytes]:
        """x: [heads, n, head_dim] -> (scales, payload) bytes."""

    @abstractmethod
    def decode(self, scales: bytes, payload: bytes, out: torch.Tensor, axis: str, group: int) -> torch.Tensor:
        """Fill out: [heads, n, head_dim] (model dtype) from bytes whose lengths match sizes(); returns out."""


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a tensor (any dtype, bf16 included)."""
    return t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


def bytes_tensor(b: bytes | memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of tensor_bytes; the caller has already checked len(b)."""
    return torch.frombuffer(bytearray(b), dtype=torch.uint8).view(dtype).reshape(shape)
