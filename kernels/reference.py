"""Pure-torch, vectorized versions of every kernel: the specification and the CPU runtime path.

The Triton kernels in triton_kernels.py must produce the same packed bytes and scales bit for
bit, so every rounding step here is spelled out (fp32 absmax, IEEE division, fp16 scales,
round half to even). Arguments are assumed to have passed kernels.layout's checks.
"""

from __future__ import annotations

import torch

from .layout import q2c_prologue, qrange

# q2c keeps at most this many fp32 scores (q_heads x rows x keys) alive at once: 16 MiB.
SCORE_BLOCK_ELEMS = 1 << 22
# ... and never more than this many query rows per block, whatever the budget allows.
MAX_ROW_BLOCK = 256


def _quantize(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [H, K, D] -> (q int8 [H, K, D], scales fp16 [H, K, D // group_size])."""
    heads, n, head_dim = x.shape
    lo, hi = qrange(bits)
    xf = x.float().reshape(heads, n, head_dim // group_size, group_size)
    scales = (xf.abs().amax(dim=-1) / hi).to(torch.float16)  # fp32 division, then one rounding to fp16
    s = scales.float().unsqueeze(-1)
    # Where s == 0 the fp16 scale underflowed, so every |x| < hi * 2**-24 and round(x / 1) is 0:
    # dividing by 1 gives the specified q = 0 without producing inf or nan.
    y = xf / torch.where(s > 0, s, torch.ones_like(s))
    # Clamping before rounding equals clamping after it, since the bounds are integers.
    q = y.clamp_(lo, hi).round_().to(torch.int8)  # torch.round is round half to even
    return q.reshape(heads, n, head_dim), scales


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q int8 [H, K, D] -> uint8 [H, K, packed_row_bytes(bits, D)]."""
    heads, n, head_dim = q.shape
    u = q.view(torch.uint8)  # two's complement bytes; the masks below keep the low `bits` bits
    if bits == 8:
        return u
    if bits == 4:
        u = u & 0xF
        return u[..., 0::2] | (u[..., 1::2] << 4)  # even channel in the low nibble
    # bits == 3: eight 3-bit codes c0..c7 make one little-endian 24-bit word (c_j at bit 3j).
    c = (u & 0x7).view(heads, n, head_dim // 8, 8).unbind(-1)
    b0 = c[0] | (c[1] << 3) | ((c[2] & 0x3) << 6)
    b1 = (c[2] >> 2) | (c[3] << 1) | (c[4] << 4) | ((c[5] & 0x1) << 7)
    b2 = (c[5] >> 1) | (c[6] << 2) | (c[7] << 5)
    return torch.stack((b0, b1, b2), dim=-1).reshape(heads, n, head_dim * 3 // 8)


def _unpack(payload: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """uint8 [H, K, row_bytes] -> q int8 [H, K, head_dim] (sign-extended)."""
    heads, n, _ = payload.shape
    if bits == 8:
        return payload.view(torch.int8)
    if bits == 4:
        u = torch.stack((payload & 0xF, payload >> 4), dim=-1).reshape(heads, n, head_dim)
        return (u ^ 0x8).view(torch.int8) - 8  # sign-extend the 4-bit code
    b0, b1, b2 = payload.view(heads, n, head_dim // 8, 3).unbind(-1)
    c = (b0, b0 >> 3, (b0 >> 6) | (b1 << 2), b1 >> 1, b1 >> 4, (b1 >> 7) | (b2 << 1), b2 >> 2, b2 >> 5)
    u = torch.stack(c, dim=-1).reshape(heads, n, head_dim) & 0x7
    return (u ^ 0x4).view(torch.int8) - 4  # sign-extend the 3-bit code


def quantize_pack(
    x: torch.Tensor, index: torch.Tensor | None, bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather positions `index` of x: [H, S, D] and quantize them symmetrically to `bits` bits.

    One scale per (head, position, group of `group_size` channels): fp16(absmax / qmax). Returns
    (payload uint8 [H, K, packed_row_bytes(bits, D)], scales fp16 [H, K, D // group_size]), both
    contiguous. Non-finite inputs give unspecified codes.
    """
    xs = x if index is None else x.index_select(1, index)
    q, scales = _quantize(xs, bits, group_size)
    return _pack(q, bits).contiguous(), scales.contiguous()


def unpack_dequantize(
    payload: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, out: torch.Tensor
) -> torch.Tensor:
    """Decode payload/scales (as made by quantize_pack) into out: [H, K, D]; returns out.

    x_hat = q * scale is computed in fp32 (exactly: an 8-bit code times an fp16 value) and then
    rounded once to out's dtype.
    """
    heads, n, head_dim = out.shape
    q = _unpack(payload, bits, head_dim).float().view(heads, n, head_dim // group_size, group_size)
    x_hat = q * scales.float().unsqueeze(-1)
    return out.copy_(x_hat.view(heads, n, head_dim))


def q2c_scores(
    q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, ctx_start: int, ctx_end: int, scale: float | None = None
) -> torch.Tensor:
    """Attention mass the query rows put on each context key, summed over rows and query heads.

    q: [Hq, Lq, D], k: [Hkv, S, D] (both after RoPE; query head h reads kv head h // (Hq // Hkv)),
    q_pos: [Lq] absolute positions; row i sees keys 0..q_pos[i] (a row with q_pos < 0 sees none).
    Each row's softmax is normalised over every key it sees, then restricted to the context
    columns. Returns fp32 [ctx_end - ctx_start]. Rows are processed in blocks, so at most
    SCORE_BLOCK_ELEMS scores exist at a time.
    """
    q_heads, rows, head_dim = q.shape
    kv_heads, seq, _ = k.shape
    group, scale, out = q2c_prologue(q, k, ctx_start, ctx_end, scale)
    if rows == 0 or ctx_end == ctx_start:
        return out
    pos = q_pos.to(torch.int64)
    seen = pos >= 0  # a row that sees no key contributes nothing: drop it (its softmax would be nan)
    if not bool(seen.all()):
        q, pos = q[:, seen], pos[seen]
        rows = pos.shape[0]
    kf = k.float()
    qf = q.float().reshape(kv_heads, group, rows, head_dim)
    keys = torch.arange(seq, device=q.device)
    block = max(1, min(MAX_ROW_BLOCK, SCORE_BLOCK_ELEMS // (q_heads * seq)))
    for r0 in range(0, rows, block):
        p_blk = pos[r0 : r0 + block]
        hi = min(seq, int(p_blk.max()) + 1)  # keys past every row's position play no part
        if hi <= ctx_start:
            continue
        n = p_blk.shape[0]
        # scores: [Hkv, G * n, hi] -> [Hkv, G, n, hi]
        scores = torch.matmul(
            qf[:, :, r0 : r0 + n].reshape(kv_heads, group * n, head_dim), kf[:, :hi].transpose(1, 2)
        ).view(kv_heads, group, n, hi)
        scores.mul_(scale).masked_fill_(keys[:hi] > p_blk[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        c_hi = min(ctx_end, hi)
        out[: c_hi - ctx_start] += probs[..., ctx_start:c_hi].sum(dim=(0, 1, 2))
    return out
