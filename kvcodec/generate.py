"""Greedy generation from a (possibly pruned) cache with absolute position ids."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class Generation:
    tokens: list[int]
    first_logits: torch.Tensor  # logits of the first generated token ([vocab], fp32)
    first_token_s: float
    total_s: float
    steps: int = 0  # forward passes run (the stop token's included): what total_s paid for


def eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for src in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(src)
    return ids


@torch.inference_mode()
def greedy(model, cache, first_token: int, position: int, max_new_tokens: int, stop: set[int]) -> Generation:
    """Feed `first_token` at absolute `position`, then decode greedily for at most max_new_tokens.

    The cache may hold fewer entries than `position` (dropped context positions): explicit
    position ids keep RoPE right, which a default based on the cache length would not.
    """
    started = time.perf_counter()
    device = next(model.parameters()).device
    token, tokens, first_logits, first_s, steps = first_token, [], None, 0.0, 0
    for step in range(max_new_tokens):
        steps += 1
        out = model(
            input_ids=torch.tensor([[token]], device=device),
            position_ids=torch.tensor([[position + step]], device=device),
            cache=cache,
            use_cache=True,
        )
        logits = out.logits[0, -1].float()
        if first_logits is None:
            first_logits, first_s = logits.cpu(), time.perf_counter() - started
        token = int(logits.argmax())
        if token in stop:
            break
        tokens.append(token)
    return Generation(tokens, first_logits, first_s, time.perf_counter() - started, steps)
