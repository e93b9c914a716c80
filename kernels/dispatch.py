"""The kernel backend registry and the public entry points that pick a backend per call.

Backends: "torch" (kernels.reference, runs anywhere) and "triton" (kernels.triton_kernels, CUDA
tensors, or CPU tensors when TRITON_INTERPRET=1 was set before it was imported). Backends load
lazily, so the torch path never imports triton. A caller of select_backend may force one by name;
otherwise KVWIRE_KERNELS=torch|triton does, read by forced_backend() each time a backend is chosen
(every kernel call), never at import time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import layout

ENV_VAR = "KVWIRE_KERNELS"


@dataclass(frozen=True)
class KernelBackend:
    """One implementation of the three kernels, plus which devices it can run on."""

    name: str
    quantize_pack: Callable
    unpack_dequantize: Callable
    q2c_scores: Callable
    runs_on: Callable[[torch.device], bool]


_loaders: dict[str, Callable[[], KernelBackend]] = {}
_loaded: dict[str, KernelBackend] = {}


def register_backend(name: str, loader: Callable[[], KernelBackend]) -> None:
    """Register `loader` (called once, on first use) under `name`; a name may be taken only once."""
    if name in _loaders:
        raise ValueError(f"kernel backend {name!r} is already registered")
    _loaders[name] = loader


def get_backend(name: str) -> KernelBackend:
    """The backend registered as `name`, loading it on first use; ValueError for an unknown name."""
    if name not in _loaders:
        raise ValueError(f"unknown kernel backend {name!r}; known: {', '.join(_loaders)}")
    if name not in _loaded:
        _loaded[name] = _loaders[name]()
    return _loaded[name]


def forced_backend() -> str | None:
    """The backend $KVWIRE_KERNELS names now, or None when it is unset or empty."""
    return os.environ.get(ENV_VAR, "").strip() or None


def select_backend(device: torch.device, forced: str | None = None) -> KernelBackend:
    """The backend for tensors on `device`: `forced` (default forced_backend(), the environment read at
    this call) if it names one, else triton on a usable GPU, else torch."""
    forced = forced or forced_backend()
    if forced:
        backend = get_backend(forced)
        if not backend.runs_on(device):
            raise RuntimeError(
                f"{ENV_VAR}={forced} cannot run on {device} tensors here: the triton backend needs CUDA "
                f"tensors with a GPU, or TRITON_INTERPRET=1 set before kernels.triton_kernels is imported"
            )
        return backend
    if device.type == "cuda" and torch.cuda.is_available():
        return get_backend("triton")
    return get_backend("torch")


def _load_torch() -> KernelBackend:
    from . import reference

    return KernelBackend(
        "torch", reference.quantize_pack, reference.unpack_dequantize, reference.q2c_scores, runs_on=lambda device: True
    )


def _load_triton() -> KernelBackend:
    from . import triton_kernels as tk  # imports triton: only when this backend is first chosen

    return KernelBackend("triton", tk.quantize_pack, tk.unpack_dequantize, tk.q2c_scores, runs_on=tk.runs_on)


register_backend("torch", _load_torch)
register_backend("triton", _load_triton)


def quantize_pack(
    x: torch.Tensor,
    index: torch.Tensor | None,
    bits: int,
    group_size: int,
    asymmetric: bool = False,
    rotate: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather positions `index` (None: all, in order) of x: [H, S, D] and quantize them to `bits`.

    Symmetric: one fp16 scale = absmax / (2**(bits-1) - 1) per (head, position, group of
    `group_size` channels). asymmetric: a fp16 (scale, zero) pair per group, zero = min and scale =
    (max - zero) / (2**bits - 1), unsigned codes. rotate: 0, or a power-of-two block
    (layout.rotation_block) of the normalized Hadamard transform applied to each row before
    quantizing. Codes rounded half to even. Returns (payload uint8 [H, K, packed_row_bytes(bits,
    D)], scales fp16 layout.scale_shape(H, K, D // group_size, asymmetric)), identical on every backend.
    """
    layout.check_quantize_args(x, index, bits, group_size, rotate)
    return select_backend(x.device).quantize_pack(x, index, bits, group_size, asymmetric, rotate)


def unpack_dequantize(
    payload: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    out: torch.Tensor,
    asymmetric: bool = False,
    rotate: int = 0,
) -> torch.Tensor:
    """Write code * scale (+ zero), rotated back if `rotate`, (fp32, then cast) into the preallocated
    out: [H, K, D] and return it.

    payload and scales must have the shapes quantize_pack gives for out's shape; ValueError
    otherwise.
    """
    layout.check_unpack_args(payload, scales, bits, group_size, out, asymmetric, rotate)
    return select_backend(out.device).unpack_dequantize(payload, scales, bits, group_size, out, asymmetric, rotate)


def q2c_scores(
    q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, ctx_start: int, ctx_end: int, scale: float | None = None
) -> torch.Tensor:
    """fp32 [ctx_end - ctx_start]: softmax attention mass of query rows q on keys ctx_start..ctx_end.

    q: [Hq, Lq, D], k: [Hkv, S, D] (after RoPE; GQA: query head h reads kv head h // (Hq // Hkv)),
    q_pos: [Lq] absolute positions (row i sees keys 0..q_pos[i]). Each row's softmax is over all
    keys it sees; the result sums the context columns over rows and query heads. scale defaults
    to 1 / sqrt(D).
    """
    layout.check_q2c_args(q, k, q_pos, ctx_start, ctx_end)
    return select_backend(q.device).q2c_scores(q, k, q_pos, ctx_start, ctx_end, scale)
