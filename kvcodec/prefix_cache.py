"""Prefix KV kept across requests: a prompt's [template prefix][context] is prefilled once, and a question
on it prefills only [question + template suffix] on top (kvcodec/prefill.py `prefill_from`).

An entry is keyed by the model's fingerprint and a hash of the prefix's token ids, so a document asked
about many times, and an inline context sent twice, are both prefilled once. The memory tier is an
LRU bounded in bytes. An entry a stream is using is never freed under it: eviction only drops the
cache's reference, and the stream keeps its own until it ends. Entries can be tagged with the
document they came from, so an update or delete of that document drops them at once.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def prefix_key(model_fingerprint: str, prefix_ids) -> str:
    """The cache key of a prefix: model fingerprint + SHA-256 of its token ids."""
    h = hashlib.sha256(model_fingerprint.encode())
    h.update(torch.tensor(list(prefix_ids), dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


@dataclass
class PrefixEntry:
    """The KV of a prompt's first `len(ids)` positions, and the attention of rows inside it.

    keys/values: per layer [kv_heads, P, head_dim]. row_attention: for a tuple of absolute rows inside
    the prefix, their attention to the context [layers, context_len] (selectors such as h2o read rows
    of the context itself; those rows cannot see the question, so their attention is the prefix's).
    """

    ids: tuple[int, ...]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    prefill_s: float  # what computing it cost: a hit saves this
    doc_id: str | None = None
    row_attention: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


class PrefixCache:
    """A thread-safe LRU of PrefixEntry objects bounded by `max_bytes` (0: keep nothing).

    on_event(kind): called with "hit", "miss" or "eviction" (the edge counts them in Prometheus).
    """

    def __init__(self, max_bytes: int, on_event: Callable[[str], None] | None = None):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.on_event = on_event
        self._entries: OrderedDict[str, PrefixEntry] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0

    def _event(self, kind: str) -> None:
        if self.on_event is not None:
            self.on_event(kind)

    def get(self, key: str) -> PrefixEntry | None:
        """The entry (now the most recently used), or None; counts a hit or a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
        self._event("hit" if entry is not None else "miss")
        return entry

    def put(self, key: str, entry: PrefixEntry) -> None:
        """Keep `entry`, evicting least recently used entries to stay within max_bytes. An entry larger
        than the whole budget is not kept (the request that computed it still uses it)."""
        evicted = 0
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes
            if entry.nbytes > self.max_bytes:
                return
            self._entries[key] = entry
            self.bytes += entry.nbytes
            while self.bytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self.bytes -= dropped.nbytes
                evicted += 1
        for _ in range(evicted):
            self._event("eviction")

    def drop_document(self, doc_id: str) -> int:
        """Forget every entry computed from document `doc_id` (it changed or was deleted); returns how many."""
        with self._lock:
            keys = [k for k, e in self._entries.items() if e.doc_id == doc_id]
            for k in keys:
                self.bytes -= self._entries.pop(k).nbytes
        return len(keys)

    def holds_document(self, doc_id: str) -> bool:
        with self._lock:
            return any(e.doc_id == doc_id for e in self._entries.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
