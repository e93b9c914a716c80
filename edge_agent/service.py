"""EdgeService.Prefill: build the prompt, prefill, select, encode, and stream the frames."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass

from kvwire.agent_common.edge_messages import DocumentInfo, PrefillReply, PrefillRequest
from kvwire.agent_common.errors import OverloadedError, ShuttingDownError, StartupConfigError
from kvwire.agent_common.grpc_status import status_of
from kvwire.agent_common.logs import clean_request_id, log_event, request_id_var
from kvwire.agent_common.metrics import Metrics
from kvwire.edge_agent.documents import InvalidDocumentIdError
from kvwire.edge_agent.prefiller import DocumentPrefiller, ModelGate
from kvwire.edge_agent.settings import EdgeSettings
from kvwire.kvcodec.errors import ConfigError, PromptTooLongError
from kvwire.kvcodec.models import LoadedModel
from kvwire.kvcodec.pipeline import Edge, EdgeRequest, Timings
from kvwire.kvcodec.prefill import PrefillCancelled, stop_when
from kvwire.kvcodec.prefix_cache import PrefixCache
from kvwire.kvcodec.prefix_disk import DiskTier
from kvwire.kvcodec.profiles import PrecisionProfile, get_profile, profile_names
from kvwire.kvcodec.prompt import user_token_ids
from kvwire.kvcodec.selectors import DEFAULT_SELECTOR, get_selector
from kvwire.kvcodec.wire import peek_stream_id, peek_type
from kvwire.proto import kvwire_pb2, kvwire_pb2_grpc

log = logging.getLogger("kvwire.edge_agent")
RECEIPT_POLL_S = 0.05  # how often a stream waiting for its receipt checks that the caller is still there
LOCK_POLL_S = 0.05  # how often a stream waiting for the model checks that the caller is still there


class _Slot:
    """One of the edge's max_concurrency slots, released once: by the call's end callback (at once when
    the caller cancels, even while its prefill still runs) or by the handler, whichever comes first."""

    def __init__(self, slots: threading.BoundedSemaphore):
        self._slots, self._lock, self._held = slots, threading.Lock(), False

    def acquire(self) -> bool:
        self._held = self._slots.acquire(blocking=False)
        return self._held

    def release(self) -> None:
        with self._lock:
            if self._held:
                self._held = False
                self._slots.release()


@dataclass
class _Receipt:
    """A stream waiting for the cloud's Confirm."""

    event: threading.Event
    frame_bytes: int | None = None


class EdgeServicer(kvwire_pb2_grpc.EdgeServiceServicer):
    """Serves Prefill streams from one loaded model.

    Forward passes run one at a time (the model gate, edge_agent/prefiller.py; background prefills of
    documents take it only while no request waits): concurrent prefills on one model gain nothing
    on a CPU (the attention capture itself is per call, kvcodec/prefill.py, and would allow them). Up to max_concurrency streams may be in
    progress (waiting for the lock or streaming); more are refused at once.
    """

    def __init__(self, loaded: LoadedModel, settings: EdgeSettings, metrics: Metrics, documents=None):
        """documents: the edge's DocumentStore (edge_agent/documents.py); None: requests name no doc_id.

        With a prefix cache and documents, documents are prefilled in the background when put and at start
        (settings.prefill_documents: `self.prefiller`); with prefix_cache_disk_bytes, the cache has a disk
        tier under data_dir. close() stops both."""
        names = [n.strip() for n in settings.document_scores.split(",") if n.strip()]
        self.edge = Edge(loaded, document_selectors=[get_selector(n) for n in names])  # ConfigError at start
        self.edge.prefix_cache = cache = self._prefix_cache(loaded, self.edge.model_fp, settings, metrics)
        self.documents = documents
        self.gate = ModelGate(LOCK_POLL_S)
        self._model_lock = self.gate.lock
        self.prefiller: DocumentPrefiller | None = None
        self._unsubscribe = None
        if documents is not None and cache is not None:
            if cache.disk is not None:  # entries of documents deleted or changed while the edge was down go
                cache.disk.drop_stale({meta.id: meta.version for meta in documents.list()})
            # a changed or deleted document's prefix KV goes at once (a running stream keeps its snapshot)
            self._unsubscribe = documents.subscribe(cache.document_changed)
            if settings.prefill_documents:
                self.prefiller = DocumentPrefiller(
                    self.edge, documents, self.gate, lambda outcome: metrics.document_prefills.labels(outcome).inc()
                )
                budget = max(settings.prefix_cache_bytes, settings.prefix_cache_disk_bytes)
                self.prefiller.enqueue_uncached(budget, self._kv_bytes_per_token(loaded))
        self.settings, self.metrics = settings, metrics
        # the configured profile is read once, and must fit the model: a start-up error, not a per-request one
        self.default_profile: PrecisionProfile = get_profile(settings.profile)
        self.default_profile.resolve(self.edge.geometry["num_layers"], self.edge.geometry["head_dim"])
        self._slots = threading.BoundedSemaphore(settings.max_concurrency)
        self._streams = 0  # Prefill handlers running (a drain waits for them): guarded by _idle
        self._idle = threading.Condition()
        self._model_lock = threading.Lock()
        self._receipts: dict[bytes, _Receipt] = {}  # stream id -> a stream waiting for its receipt
        self._receipts_lock = threading.Lock()
        self.draining = False

    @staticmethod
    def _prefix_cache(loaded: LoadedModel, fp: str, settings: EdgeSettings, metrics: Metrics) -> PrefixCache | None:
        if not settings.prefix_cache_bytes:
            return None
        disk = None
        if settings.prefix_cache_disk_bytes:
            folder = settings.prefix_disk_dir(fp)
            try:
                disk = DiskTier(
                    folder, settings.prefix_cache_disk_bytes, fp, loaded.dtype, on_error=metrics.count_disk_error
                )
            except OSError as exc:  # checked before the model loaded (main.check_prefix_disk); changed since
                raise StartupConfigError(f"prefix cache disk tier: cannot use {str(folder)!r} ({exc})") from None
            log_event(log, "prefix_disk_opened", path=str(disk.folder), entries=len(disk), bytes=disk.bytes)
        cache = PrefixCache(settings.prefix_cache_bytes, disk=disk)
        metrics.watch_prefix_cache(cache)
        return cache

    def _kv_bytes_per_token(self, loaded: LoadedModel) -> int:
        g = self.edge.geometry
        return 2 * g["num_layers"] * g["kv_heads"] * g["head_dim"] * loaded.dtype.itemsize

    def close(self) -> None:
        """Stop the background prefiller and finish the disk tier's queued writes (after a drain)."""
        if self.prefiller is not None:
            self.prefiller.close()
        if self._unsubscribe is not None:
            self._unsubscribe()
        cache = self.edge.prefix_cache
        if cache is not None and cache.disk is not None:
            cache.disk.close()

    def free_slots(self) -> int:
        """Streams this edge would still accept now (max_concurrency minus those holding a slot)."""
        return self._slots._value

    def profile_for(self, name: str) -> PrecisionProfile | str:
        """A request names a built-in profile, the configured one by its name, or none (the configured one).

        Requests never name files: only the operator chooses what the edge reads from disk.
        """
        if not name or name == self.default_profile.name:
            return self.default_profile
        if name in profile_names():
            return name
        allowed = list(dict.fromkeys([*profile_names(), self.default_profile.name]))
        raise ConfigError(f"unknown profile {name!r}; allowed: {', '.join(allowed)}")

    def Prefill(self, request, context):
        req = PrefillRequest.from_pb(request)
        if self.draining:
            raise ShuttingDownError("edge-agent is shutting down; retry against another edge or later")
        slot = _Slot(self._slots)
        if not slot.acquire():
            raise OverloadedError(
                f"edge-agent is at its limit of {self.settings.max_concurrency} concurrent prefill streams"
            )
        if not context.add_callback(slot.release):  # the call already ended
            slot.release()
            return
        with self._idle:
            self._streams += 1
        try:
            yield from self._stream(req, context)
        finally:
            slot.release()
            with self._idle:
                self._streams -= 1
                self._idle.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no Prefill stream runs (True) or `timeout_s` passed (False); a drain calls it while
        new streams are refused, so that the cloud's Confirm still reaches the streams in flight."""
        with self._idle:
            return self._idle.wait_for(lambda: self._streams == 0, timeout_s)

    def document(self, doc_id: str):
        """The registered document `doc_id` (a snapshot: a later put or delete does not change it)."""
        if self.documents is None:
            raise ConfigError("this edge-agent keeps no documents: send the context itself")
        try:
            return self.documents.get(doc_id)  # DocumentNotFoundError -> NOT_FOUND
        except InvalidDocumentIdError as exc:
            raise ConfigError(str(exc)) from None

    def _stream(self, req: PrefillRequest, context):
        started = time.perf_counter()
        profile = self.profile_for(req.profile)
        if bool(req.doc_id) == bool(req.context):
            raise ConfigError("send exactly one of context and doc_id")
        if req.context:
            tokens = len(user_token_ids(self.edge.loaded.tokenizer, req.context))
            if tokens > self.settings.max_context_tokens:
                raise PromptTooLongError(
                    f"the context is {tokens} tokens; this edge-agent accepts at most "
                    f"{self.settings.max_context_tokens} (--max-context-tokens)"
                )
        doc = self.document(req.doc_id) if req.doc_id else None  # a snapshot: the stream finishes on it
        edge_req = EdgeRequest(
            context=doc.text if doc is not None else req.context,
            doc_id=req.doc_id or None,
            doc_version=doc.version if doc is not None else None,
            question=req.question,
            mode=req.mode,
            selector=req.selector or DEFAULT_SELECTOR,
            retention=req.retention,
            profile=profile,
            compress=req.compress,
            chunk_bytes=req.chunk_bytes or self.settings.chunk_bytes,
            template_kv=req.template_kv or "stream",
            question_kv=req.question_kv or "stream",
            scout_prefill=req.scout_prefill or "sparse",
            heads=req.heads,
        )
        timings = Timings()
        frames = self.edge.stream(edge_req, timings)  # validates now (ConfigError); prefills on the first frame
        if not self.gate.acquire(context.is_active):  # the caller gave up while this request waited for the model
            return
        try:
            if not context.is_active():
                return
            # the forward pass and selection run here (chunks are encoded lazily after); a caller that goes
            # away meanwhile stops the pass at the next layer and frees the model for the next request
            with stop_when(lambda: not context.is_active()):
                first = next(frames)
        except PrefillCancelled:
            log_event(log, "prefill_stopped", reason="the caller went away during the forward pass")
            return
        finally:
            self.gate.release()
        stream_id = peek_stream_id(first)
        receipt = self._expect_receipt(stream_id) if req.confirm else None
        try:
            sent = count = 0
            for frame in itertools.chain([first], frames):
                yield PrefillReply(req.request_id, frame=frame).to_pb()
                # counted once gRPC has taken the message (its buffers, not yet the cloud: see Confirm)
                self.metrics.bytes.labels(req.mode, peek_type(frame)).inc(len(frame))
                sent, count = sent + len(frame), count + 1
            timings.add("total", time.perf_counter() - started)
            self.metrics.observe_stages(req.mode, timings.values)
            yield PrefillReply(req.request_id, timings_ms=timings.ms()).to_pb()
            if receipt is not None and not self._await_receipt(receipt, context, sent):
                return  # the caller went away before it had every frame: the interceptor counts it cancelled
            log_event(
                log,
                "prefill",
                mode=req.mode,
                selector=edge_req.selector,
                retention=req.retention,
                profile=profile if isinstance(profile, str) else profile.name,
                frames=count,
                bytes=sent,
                confirmed_bytes=None if receipt is None else receipt.frame_bytes,
                timings_ms=timings.ms(),
            )
        finally:
            if receipt is not None:
                with self._receipts_lock:
                    self._receipts.pop(stream_id, None)

    def _expect_receipt(self, stream_id: bytes) -> _Receipt:
        receipt = _Receipt(threading.Event())
        with self._receipts_lock:
            self._receipts[stream_id] = receipt
        return receipt

    def _await_receipt(self, receipt: _Receipt, context, sent: int) -> bool:
        """Hold the finished stream until the cloud confirms it (True) or the call ends without (False).

        gRPC takes every frame into its buffers within milliseconds whatever the link does, so only
        the receipt says the cloud has them. A receipt that never comes while the call stays open
        (a caller that asked to confirm and does not) releases the stream after --receipt-wait-s.
        """
        waited, limit = 0.0, self.settings.receipt_wait_s
        while not receipt.event.wait(RECEIPT_POLL_S):
            waited += RECEIPT_POLL_S
            if not context.is_active():
                log_event(
                    log,
                    "prefill_unconfirmed",
                    logging.WARNING,
                    bytes=sent,
                    reason="the call ended before the cloud confirmed the stream",
                )
                return False
            if waited >= limit:
                log_event(
                    log,
                    "prefill_unconfirmed",
                    logging.WARNING,
                    bytes=sent,
                    reason=f"no receipt within {limit:g} s of the last frame (--receipt-wait-s)",
                )
                return True
        if receipt.frame_bytes != sent:
            log_event(log, "receipt_mismatch", logging.WARNING, bytes=sent, confirmed_bytes=receipt.frame_bytes)
        return True

    def GetDocument(self, request, context):
        """A document's metadata (and its text when asked): a text-mode answer about it needs the text."""
        request_id_var.set(clean_request_id(request.request_id, fresh_prefix="edge-"))
        try:
            doc = self.document(request.doc_id)
        except Exception as exc:
            code, outcome, message = status_of(exc)
            self.metrics.requests.labels("document", outcome).inc()
            context.abort(code, message)
        self.metrics.requests.labels("document", "ok").inc()
        info = DocumentInfo(doc.id, doc.version, doc.etag, doc.tokens, doc.bytes, self.holds_prefix(doc))
        if request.include_text:
            info.text = doc.text
        return info.to_pb()

    def holds_prefix(self, doc) -> bool:
        """Whether the prefix KV of document `doc` (a Document or its meta) is cached now."""
        return self.edge.prefix_cache is not None and self.edge.prefix_cache.holds_document(doc.id)

    def Confirm(self, request, context):
        """The cloud has every frame of the stream `request.stream_id` (see Prefill's `confirm`).

        An empty stream id is the cloud's readiness probe of its token: answered, nothing logged."""
        if not request.stream_id:
            return kvwire_pb2.ReceiptReply()
        with self._receipts_lock:
            receipt = self._receipts.get(bytes(request.stream_id))
        if receipt is None:  # the stream already ended (cancelled, or released after --receipt-wait-s)
            log_event(log, "receipt_unknown", logging.WARNING, stream_id=bytes(request.stream_id).hex())
        else:
            receipt.frame_bytes = request.frame_bytes
            receipt.event.set()
        return kvwire_pb2.ReceiptReply()
