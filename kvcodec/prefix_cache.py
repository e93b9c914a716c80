"""Prefix KV kept across requests: a prompt's [template prefix][context] is prefilled once, and a question
on it prefills only [question + template suffix] on top (kvcodec/prefill.py `prefill_from`).

An entry is keyed by the model's fingerprint and a hash of the prefix's token ids, so a document asked
about many times, and an inline context sent twice, are both prefilled once. The memory tier is an
LRU bounded in bytes. An entry a stream is using is never freed under it: eviction only drops the
cache's reference, and the stream keeps its own until it ends. Entries can be tagged with the
document they came from, so an update or delete of that document drops them at once.

An optional disk tier (kvcodec/prefix_disk.py) sits behind the memory tier: every entry kept in memory
is also written there, a memory miss looks there before it counts as a miss, and a disk hit is promoted
to memory. A document's entries carry its version; once the cache has heard of a newer version (or of a
delete) an entry of an older one is refused, so a stream still running on an old snapshot cannot put
its entry back after the change dropped it.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvwire.kvcodec.prefix_disk import DiskTier

DELETED = float("inf")  # the version recorded for a deleted document: no entry of it is newer


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
    scores: question-agnostic selector scores of the context (kvzip's reconstruction scores, keyed by the
    selector's name and parameters), computed once for the prefix and reused by every question on it.
    """

    ids: tuple[int, ...]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    prefill_s: float  # what computing it cost: a hit saves this
    doc_id: str | None = None
    doc_version: int | None = None  # the document's version the entry was computed from (None: inline text)
    row_attention: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)
    scores: dict[tuple, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


class PrefixCache:
    """A thread-safe LRU of PrefixEntry objects bounded by `max_bytes` (0: keep nothing).

    on_event(kind): called with "hit", "miss" or "eviction" (the edge counts them in Prometheus); a hit
    from the disk tier is a "hit" too, and also a "disk_hit". disk: the optional disk tier.
    """

    def __init__(self, max_bytes: int, on_event: Callable[[str], None] | None = None, disk: DiskTier | None = None):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.on_event = on_event
        self.disk = disk
        self._entries: OrderedDict[str, PrefixEntry] = OrderedDict()
        self._versions: dict[str, float] = {}  # doc id -> the newest version heard of (DELETED after a delete)
        self._lock = threading.Lock()
        self.bytes = 0

    def _event(self, kind: str) -> None:
        if self.on_event is not None:
            self.on_event(kind)

    def get(self, key: str, ids=None) -> PrefixEntry | None:
        """The entry (now the most recently used), or None; counts a hit or a miss. With a disk tier and the
        prefix's `ids`, a memory miss is looked up on disk, and an entry found there is kept in memory."""
        entry, tier = self._lookup(key, ids)
        self._event("hit" if entry is not None else "miss")
        if tier == "disk":
            self._event("disk_hit")
        return entry

    def peek(self, key: str, ids=None) -> PrefixEntry | None:
        """get() without counting anything (background work asking whether an entry exists)."""
        return self._lookup(key, ids)[0]

    def _lookup(self, key: str, ids) -> tuple[PrefixEntry | None, str | None]:
        """(the entry, the tier it came from: "memory" or "disk"), or (None, None)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry, "memory"
        if self.disk is None or ids is None:
            return None, None
        entry = self.disk.load(key, tuple(ids))
        if entry is None:
            return None, None
        self._keep(key, entry, to_disk=False)
        return entry, "disk"

    def put(self, key: str, entry: PrefixEntry) -> bool:
        """Keep `entry` (and write it to the disk tier), evicting least recently used entries to stay within
        max_bytes. An entry larger than the whole budget is not kept in memory (the request that computed
        it still uses it). An entry of a document version older than one the cache has heard of is refused
        (False)."""
        return self._keep(key, entry, to_disk=True)

    def _keep(self, key: str, entry: PrefixEntry, to_disk: bool) -> bool:
        evicted = 0
        with self._lock:
            if entry.doc_id is not None and self._stale(entry):
                return False
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes
            if to_disk and self.disk is not None:
                self.disk.store(key, entry)  # queued: the writer thread writes it
            if entry.nbytes <= self.max_bytes:
                self._entries[key] = entry
                self.bytes += entry.nbytes
            while self.bytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self.bytes -= dropped.nbytes
                evicted += 1
        for _ in range(evicted):
            self._event("eviction")
        return True

    def _stale(self, entry: PrefixEntry) -> bool:
        newest = self._versions.get(entry.doc_id)
        return newest is not None and (entry.doc_version is None or entry.doc_version < newest)

    def document_changed(self, doc_id: str, version: int | None) -> int:
        """Document `doc_id` now has `version` (None: it was deleted): drop its entries in both tiers and
        refuse older ones from now on; returns how many were dropped."""
        with self._lock:  # versions only grow (the store's one counter), and listeners hear them in commit order
            self._versions[doc_id] = DELETED if version is None else version
        return self.drop_document(doc_id)

    def drop_document(self, doc_id: str) -> int:
        """Forget every entry computed from document `doc_id`, in memory and on disk; returns how many were
        dropped (memory entries plus disk files and queued writes)."""
        with self._lock:
            keys = [k for k, e in self._entries.items() if e.doc_id == doc_id]
            for k in keys:
                self.bytes -= self._entries.pop(k).nbytes
            on_disk = self.disk.drop_document(doc_id) if self.disk is not None else 0
        return len(keys) + on_disk

    def holds_document(self, doc_id: str) -> bool:
        """Whether an entry computed from document `doc_id` is kept, in memory or on disk."""
        with self._lock:
            if any(e.doc_id == doc_id for e in self._entries.values()):
                return True
        return self.disk is not None and self.disk.holds_document(doc_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
