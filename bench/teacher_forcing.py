"""Teacher-forced scores for `kvwire eval` and `kvwire diagnose --budget`: how closely a compressed
cache follows the full cache along the full-KV answer, from one forward pass per cache.

The last prompt token and the full-KV answer's T tokens go through the model in one pass at their
absolute positions (P-1 .. P-1+T), on top of a cache of the prompt's other positions (all of them,
or the kept ones, quantized). The T+1 next-token distributions are the ones greedy decoding met on
its way to the full answer, plus the decision after its last token (stop, or the next token past
the cap). Over those positions, a compressed cache is scored by:
  top-1 agreement  the share of positions where its argmax is the full cache's
  KL               mean KL(full || compressed) in nats per position
One early flipped token costs one position here, not the whole answer as "identical" does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass(frozen=True)
class ForcedScores:
    top1: float  # share of positions whose argmax matches the reference's
    kl: float  # mean KL(reference || this) per position, nats
    positions: int  # T + 1


def fresh_cache(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> DynamicCache:
    """A cache over per-layer tensors [kv_heads, n, head_dim] (or [1, kv_heads, n, head_dim]); a forward
    pass on it concatenates into new tensors, so the given ones are never changed."""
    return DynamicCache(
        [(k if k.dim() == 4 else k[None], v if v.dim() == 4 else v[None]) for k, v in zip(keys, values)]
    )


@torch.inference_mode()
def forced_logprobs(model, cache, prompt_ids: Sequence[int], answer: Sequence[int]) -> torch.Tensor:
    """Log-probabilities [T+1, vocab] (fp32, CPU) of the model fed prompt_ids[-1] and the T answer tokens
    at absolute positions on `cache` (the prompt's positions but the last, possibly pruned; extended
    by the pass, so give it a cache you will not reuse)."""
    device = next(model.parameters()).device
    start = len(prompt_ids) - 1
    ids = torch.tensor([[prompt_ids[-1], *answer]], device=device)
    positions = torch.arange(start, start + ids.shape[1], device=device)[None]
    out = model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True)
    return out.logits[0].float().log_softmax(-1).cpu()


def compare(reference: torch.Tensor, other: torch.Tensor) -> ForcedScores:
    """Scores of `other` against `reference`, both [T+1, vocab] log-probabilities."""
    if reference.shape != other.shape:
        raise ValueError(
            f"teacher-forced log-probabilities differ in shape: {tuple(reference.shape)} vs {tuple(other.shape)}"
        )
    kl = (reference.exp() * (reference - other)).sum(-1).clamp_min(0.0)  # clamp: -1e-7 rounding, never real
    top1 = (reference.argmax(-1) == other.argmax(-1)).float()
    return ForcedScores(float(top1.mean()), float(kl.mean()), reference.shape[0])
