"""The edge's model gate (requests first) and its background document prefiller.

`ModelGate` is the one lock around the edge model's forward passes. Requests wait for it as before;
background work takes it only while no request waits, and its forward pass stops at the next layer as
soon as one does (kvcodec/prefill.py `stop_when`), so a put never delays a question by more than one
layer's time.

`DocumentPrefiller` is one worker thread that prefills `[template prefix][document]` into the prefix
cache when a document is put (and, at start, documents without a cached entry: newest first, as many as
the cache can hold). A put or delete of the document it is prefilling cancels that pass; a newer put
queues the document again. `wait_settled()` is the hook tests (and anyone) wait on: it returns once the
queue is empty and nothing runs.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable

from kvwire.agent_common.logs import log_event
from kvwire.edge_agent.documents import DocumentNotFoundError
from kvwire.kvcodec.errors import ConfigError
from kvwire.kvcodec.prefill import PrefillCancelled, stop_when

log = logging.getLogger("kvwire.edge_agent")


class ModelGate:
    """The model lock with requests first. Requests: `acquire(still_wanted)` / `release()`. Background
    work: `background()` returns a context manager that holds the lock while no request waits, and a
    `yield_to_requests()` callable that turns true once one does."""

    def __init__(self, poll_s: float):
        self.lock = threading.Lock()
        self._cond = threading.Condition()
        self._poll_s = poll_s
        self.waiting = 0  # requests waiting for or holding the model

    def acquire(self, still_wanted: Callable[[], bool]) -> bool:
        """Take the model for a request (True), or give up once `still_wanted()` is false (False)."""
        with self._cond:
            self.waiting += 1
        while not self.lock.acquire(timeout=self._poll_s):
            if not still_wanted():
                self._done_waiting()
                return False
        return True

    def release(self) -> None:
        self.lock.release()
        self._done_waiting()

    def _done_waiting(self) -> None:
        with self._cond:
            self.waiting -= 1
            self._cond.notify_all()

    def acquire_background(self, stop: Callable[[], bool]) -> bool:
        """Take the model when no request waits for it (True); False once `stop()` is true."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self.waiting == 0 or stop(), self._poll_s)
                if stop():
                    return False
                if self.waiting == 0 and self.lock.acquire(blocking=False):
                    return True

    def release_background(self) -> None:
        self.lock.release()
        with self._cond:
            self._cond.notify_all()

    def requests_waiting(self) -> bool:
        return self.waiting > 0


class _Job:
    def __init__(self, doc_id: str):
        self.doc_id = doc_id
        self.cancelled = False


class DocumentPrefiller:
    """One background worker that keeps documents' prefixes cached (see the module docstring).

    edge: the kvwire.kvcodec.pipeline.Edge with a prefix cache; store: the DocumentStore; gate: the
    servicer's ModelGate; on_outcome(outcome): "done", "cached" (already held), "cancelled" or "failed".
    """

    def __init__(self, edge, store, gate: ModelGate, on_outcome: Callable[[str], None] | None = None):
        self.edge, self.store, self.gate, self.on_outcome = edge, store, gate, on_outcome
        self._queue: OrderedDict[str, None] = OrderedDict()
        self._running: _Job | None = None
        self._cond = threading.Condition()
        self._stopped = False
        self._unsubscribe = store.subscribe(self._changed)
        self._thread = threading.Thread(target=self._loop, name="document-prefiller", daemon=True)
        self._thread.start()

    def enqueue(self, doc_id: str) -> None:
        with self._cond:
            if not self._stopped:
                self._queue[doc_id] = None
                self._cond.notify_all()

    def enqueue_uncached(self, budget_bytes: int, bytes_per_token: int) -> list[str]:
        """At start: queue the documents without a cached entry, newest first, while their KV fits in
        `budget_bytes` (more would evict what was prefilled before it); returns the ids queued."""
        queued, total = [], 0
        for meta in sorted(self.store.list(), key=lambda m: m.updated_at, reverse=True):
            total += meta.tokens * bytes_per_token
            if total > budget_bytes:
                break
            if not self.edge.prefix_cache.holds_document(meta.id):
                self.enqueue(meta.id)
            queued.append(meta.id)
        return queued

    def _changed(self, doc_id: str, version: int | None) -> None:
        """The store's listener (its lock held: quick). A put queues the document; a put or a delete cancels
        a pass on it that is running."""
        with self._cond:
            if self._running is not None and self._running.doc_id == doc_id:
                self._running.cancelled = True
            if version is None:
                self._queue.pop(doc_id, None)
            elif not self._stopped:
                self._queue[doc_id] = None
            self._cond.notify_all()

    def wait_settled(self, timeout_s: float | None = None) -> bool:
        """Wait until nothing is queued or running (True), or `timeout_s` passed (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and self._running is None, timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop: the pass running stops at its next layer; queued documents are left."""
        self._unsubscribe()
        with self._cond:
            self._stopped = True
            self._queue.clear()
            if self._running is not None:
                self._running.cancelled = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._stopped)
                if self._stopped:
                    return
                doc_id, _ = self._queue.popitem(last=False)
                job = self._running = _Job(doc_id)
            try:
                outcome = self._prefill(job)
            except Exception:  # a bad document must not stop the worker
                log.exception("document_prefill_failed", extra={"doc_id": doc_id})
                outcome = "failed"
            with self._cond:
                self._running = None
                self._cond.notify_all()
            if self.on_outcome is not None and outcome is not None:
                self.on_outcome(outcome)

    def _prefill(self, job: _Job) -> str | None:
        try:
            doc = self.store.get(job.doc_id)  # a snapshot: a later put cancels this job and queues another
        except DocumentNotFoundError:
            return None
        if job.cancelled:
            return None  # a newer version is queued (or it was deleted)
        if not self.gate.acquire_background(lambda: job.cancelled or self._stopped):
            return "cancelled"
        try:
            with stop_when(lambda: job.cancelled or self._stopped or self.gate.requests_waiting()):
                computed = self.edge.warm_prefix(doc.text, doc.id, doc.version)
        except PrefillCancelled:
            if job.cancelled or self._stopped:
                return "cancelled"
            self.enqueue_first(job.doc_id)  # it stepped aside for a request: try again once they are served
            return None
        except ConfigError as exc:  # e.g. a document longer than the model's window: its questions say so too
            log_event(log, "document_prefill_failed", logging.WARNING, doc_id=doc.id, reason=str(exc))
            return "failed"
        finally:
            self.gate.release_background()
        log_event(log, "document_prefilled", doc_id=doc.id, version=doc.version, computed=computed)
        return "done" if computed else "cached"

    def enqueue_first(self, doc_id: str) -> None:
        with self._cond:
            if not self._stopped:
                self._queue[doc_id] = None
                self._queue.move_to_end(doc_id, last=False)
                self._cond.notify_all()
