"""Key re-rotation: move RoPE keys from the positions they were computed at to other positions (the step
kvpress applies after pruning), so a pruned cache can be served by an engine that gives a request's tokens
contiguous positions (vLLM). Values carry no position and are left alone."""

from __future__ import annotations

import torch


def rope_inv_freq(model) -> torch.Tensor:
    """[rotary_dim / 2] fp32 inverse frequencies of the model's rotary embedding (scaling such as linear or
    llama3 already applied to them, as transformers does). A rotation by a position difference uses them
    alone: the attention factor some scalings multiply cos/sin with is already in the keys."""
    for module in model.modules():
        inv_freq = getattr(module, "inv_freq", None)
        if isinstance(inv_freq, torch.Tensor):
            return inv_freq.detach().float().cpu()
    raise ValueError(f"{type(model).__name__} has no rotary embedding (no inv_freq buffer): keys cannot be re-rotated")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rerotate_keys(
    keys: torch.Tensor, from_pos: torch.Tensor, to_pos: torch.Tensor, inv_freq: torch.Tensor
) -> torch.Tensor:
    """Keys [..., n, head_dim] rotated at from_pos [n] -> the same keys rotated at to_pos [n].

    RoPE rotates each channel pair by position x frequency, and rotations compose: R(to) = R(to - from) R(from),
    so one rotation by the difference moves a key. The pairs are (i, i + rotary_dim/2) (transformers'
    rotate_half layout, which vLLM's neox-style rotary uses too); channels past rotary_dim (partial rotary)
    are not rotated. Computed in fp32, returned in the keys' dtype."""
    rot = 2 * inv_freq.shape[0]
    if rot > keys.shape[-1]:
        raise ValueError(f"rotary dim {rot} > head_dim {keys.shape[-1]}")
    delta = (to_pos.to(torch.float64) - from_pos.to(torch.float64)).to(keys.device)
    # angles in fp64 before the cos/sin: position differences up to ~1e5 times frequencies near 1
    angles = delta[:, None] * inv_freq.to(device=keys.device, dtype=torch.float64)[None, :]  # [n, rot/2]
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().float(), emb.sin().float()
    k = keys.float()
    head, rest = k[..., :rot], k[..., rot:]
    head = head * cos + _rotate_half(head) * sin
    return torch.cat((head, rest), dim=-1).to(keys.dtype)
