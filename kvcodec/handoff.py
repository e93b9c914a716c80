"""The KV handoff file: the decoded KV of one request's leading prompt tokens, written by the cloud for a
serving engine in another process (the vLLM worker's KVWire connector reads it; docs/vllm.md).

One safetensors file: `keys` and `values` [layers, kv_heads, tokens, head_dim] (after RoPE, at the
contiguous positions 0..tokens-1) and, in its metadata, the token ids they belong to. Only torch and
safetensors are imported: the file is read in the vLLM venv, which has neither our pins nor our model code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "kvwire-handoff-1"


@dataclass
class Handoff:
    token_ids: list[int]
    keys: torch.Tensor  # [layers, kv_heads, tokens, head_dim]
    values: torch.Tensor  # [layers, kv_heads, tokens, head_dim]

    def __post_init__(self):
        if self.keys.shape != self.values.shape or self.keys.dim() != 4:
            raise ValueError(f"keys {tuple(self.keys.shape)} and values {tuple(self.values.shape)}: want equal 4-d")
        if self.keys.shape[2] != len(self.token_ids):
            raise ValueError(f"{self.keys.shape[2]} KV positions for {len(self.token_ids)} token ids")

    @property
    def tokens(self) -> int:
        return len(self.token_ids)


def write_handoff(path: str | os.PathLike, handoff: Handoff) -> None:
    """Write atomically (a temporary name, then rename): a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tensors = {"keys": handoff.keys.contiguous(), "values": handoff.values.contiguous()}
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "token_ids": json.dumps(handoff.token_ids)})
    tmp.rename(path)


def read_handoff(path: str | os.PathLike) -> Handoff:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file (format {meta.get('format')!r})")
        return Handoff(json.loads(meta["token_ids"]), f.get_tensor("keys"), f.get_tensor("values"))


def handoff_token_ids(path: str | os.PathLike) -> list[int]:
    """The token ids a handoff file holds KV for, without reading its tensors."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file (format {meta.get('format')!r})")
    return json.loads(meta["token_ids"])


def matched_prefix(held: list[int], prompt: list[int]) -> int:
    """How many leading tokens of `prompt` the held token ids cover (they must be the same ids)."""
    n = 0
    for a, b in zip(held, prompt):
        if a != b:
            break
        n += 1
    return n


def usable_tokens(held: int, prompt_len: int) -> int:
    """Tokens an engine can take from `held` injected ones: all of them but never the last prompt token (the
    engine needs that token's logits to start generating). Not rounded down to whole blocks: a kv stream's
    header carries no ids for the positions whose KV it carries (the last block's remainder could not be
    recomputed), and the connector writes a partial last block slot by slot."""
    return max(0, min(held, prompt_len - 1))
