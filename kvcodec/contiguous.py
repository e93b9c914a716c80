"""What an engine that numbers a request's tokens 0..n-1 (vLLM) is given for a received stream: a prompt of
the held positions followed by the ones the cloud computes, and the KV of the held ones moved to their new,
contiguous positions (kvcodec/rerotate.py). With every position held (retention 1.0) nothing moves and the
engine sees the original prompt; with positions dropped the kept ones close ranks, where the hf engine keeps
their absolute position ids instead (docs/vllm.md compares the two)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvwire.kvcodec.handoff import Handoff
from kvwire.kvcodec.modes.registry import get_mode
from kvwire.kvcodec.rerotate import rerotate_keys
from kvwire.kvcodec.stream import DecodedKV

# The id given to a position whose KV is injected but whose id the stream does not carry (a kv header holds
# ids for the cloud's tail only). The engine never computes such a position: its KV is loaded.
PLACEHOLDER_ID = 0


@dataclass
class Template:
    """The cloud's own template prefix: its ids and, per layer, keys and values [kv_heads, len, head_dim]."""

    ids: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


@dataclass
class ContiguousPrompt:
    ids: list[int]  # the engine's prompt, at positions 0..len-1
    source: list[int]  # each prompt token's position in the original prompt
    handoff: Handoff | None  # KV of ids[: handoff.tokens]; None: the engine computes every position
    moved: bool  # keys were re-rotated (some position changed)


def contiguous_prompt(
    received: DecodedKV,
    template: Template | None = None,
    inv_freq: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> ContiguousPrompt:
    """The engine's prompt for `received`: the cloud's template (when the header leaves it to the cloud), the
    received positions in ascending order, then the positions the cloud computes (its question, the last
    prompt token). A stream that carries KV hands over the KV of everything before the computed tail (keys
    re-rotated with inv_freq, needed only when a position moves); a scout stream hands over none, its kept
    tokens are simply the prompt. dtype: of the handoff's tensors (default: the received ones')."""
    h = received.header
    order = torch.argsort(received.positions)
    positions = received.positions[order].tolist()
    use_template = h.template == "cloud" and template is not None and template.ids
    head = list(range(len(template.ids))) if use_template else []
    held = set(positions)
    tail = [p for p in range(h.tail_start, h.n_prompt) if p not in held]
    if held and tail and min(tail) <= max(held):
        raise ValueError(f"computed position {min(tail)} precedes held position {max(held)}")
    carries_kv = get_mode(h.mode).carries_kv
    body = [h.token_ids.get(p, PLACEHOLDER_ID) if carries_kv else h.ids_at([p])[0] for p in positions]
    ids = (list(template.ids) if use_template else []) + body + h.ids_at(tail)
    source = head + positions + tail
    if not carries_kv:
        return ContiguousPrompt(ids, source, None, False)
    keys, values = [], []
    for layer, (k, v) in enumerate(zip(received.keys, received.values)):
        k, v = k[0][:, order], v[0][:, order]  # [kv_heads, n, head_dim]
        if use_template:
            k = torch.cat([template.keys[layer].to(k), k], dim=1)
            v = torch.cat([template.values[layer].to(v), v], dim=1)
        keys.append(k)
        values.append(v)
    n = len(head) + len(positions)
    moved = source[:n] != list(range(n))
    k_all, v_all = torch.stack(keys), torch.stack(values)  # [layers, kv_heads, n, head_dim]
    if moved:
        if inv_freq is None:
            raise ValueError("positions move (a pruned or cut stream): re-rotating the keys needs the model's inv_freq")
        k_all = rerotate_keys(k_all, torch.tensor(source[:n]), torch.arange(n), inv_freq)
    if dtype is not None:
        k_all, v_all = k_all.to(dtype), v_all.to(dtype)
    return ContiguousPrompt(ids, source, Handoff(ids[:n], k_all, v_all), moved)
