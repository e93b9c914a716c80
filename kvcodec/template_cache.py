"""The cloud's own KV of the prompt template's prefix: the tokens before the context are the same for
every request of a model, tokenizer and instruction, so the cloud computes their KV once and the edge
need not stream it (a header with template "cloud"; docs/wire-format.md).

The entry is keyed by the cloud's model fingerprint, its tokenizer fingerprint and the digest of the
prefix ids. A stream names the digest of the edge's prefix (its header's template_hash) and must also
match the tokenizer (Cloud.check_compatible): a stream built on another template is refused before
anything is allocated, never answered from the wrong prefix.
"""

from __future__ import annotations

import threading

import torch

from kvwire.kvcodec.errors import GeometryMismatchError
from kvwire.kvcodec.fingerprint import ids_digest, model_fingerprint, tokenizer_fingerprint
from kvwire.kvcodec.prompt import template_prefix_ids


class TemplateMismatchError(GeometryMismatchError):
    """A stream relies on a template prefix the receiving cloud does not hold."""


class TemplateCache:
    """The template prefix KV of one loaded model, computed on first use and kept (a few KB a token)."""

    def __init__(self, loaded):
        self.loaded = loaded
        self.ids = template_prefix_ids(loaded.tokenizer)
        self.key = (model_fingerprint(loaded.model), tokenizer_fingerprint(loaded.tokenizer), ids_digest(self.ids))
        self._kv: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._lock = threading.Lock()
        self.computed = 0  # how many times the prefix was prefilled (once, unless nothing asked for it)

    @property
    def digest(self) -> str:
        return self.key[2]

    def check(self, template_hash: str, template_len: int) -> None:
        """TemplateMismatchError unless a stream's template prefix (digest and length) is this cloud's."""
        if template_hash != self.digest or template_len != len(self.ids):
            raise TemplateMismatchError(
                f"the stream's template prefix ({template_len} tokens, ids digest {template_hash}) is not this "
                f"cloud's ({len(self.ids)} tokens, {self.digest}): edge and cloud build prompts with different "
                "templates or instructions; ask with template_kv=stream"
            )

    def kv(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Keys and values per layer, each [kv_heads, template_len, head_dim], prefilled once."""
        with self._lock:
            if self._kv is None:
                self._kv = self._prefill()
                self.computed += 1
            return self._kv

    @torch.inference_mode()
    def _prefill(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        model = self.loaded.model
        if not self.ids:  # no template prefix: nothing to compute
            return [], []
        cache = model(input_ids=torch.tensor([self.ids], device=model.device), use_cache=True).cache
        return [layer.keys[0] for layer in cache.layers], [layer.values[0] for layer in cache.layers]
