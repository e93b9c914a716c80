"""The Prometheus metrics of DESIGN.md, one registry per daemon (no global state between daemons or tests)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kvwire.agent_common.grpc_status import STATUS_TABLE as GRPC_STATUS_TABLE
from kvwire.kvcodec.modes import mode_names, streamed_mode_names
from kvwire.kvcodec.prefix_disk import ERROR_REASONS as DISK_ERROR_REASONS
from kvwire.kvcodec.wire import FRAME_TYPES

# Stage latencies span sub-millisecond (select on a short prompt) to minutes (a long CPU prefill); 1-2-5
# steps (3 per decade, 0.5 ms to 300 s) so that a p50 between 1 s and 20 s is read to within a step of
# 25-60%, not interpolated across a 5-10 s bucket (the coarse buckets put every mode's p50 at 7.5 s).
STAGE_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    15.0,
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
# Wire ratios: ~0.07 (INT4 at 25% retention) up to 1.0 (FP16, everything); scout streams sit far below 0.01.
RATIO_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5)
# Achieved retention: requests ask for 0.1-1.0; a deadline cut lands anywhere below what was asked.
RETENTION_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99, 1.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


def request_modes(side: str) -> list[str]:
    """The mode labels a side's kvwire_requests_total uses: the edge counts its streamed modes, "invalid"
    (a mode it does not stream), "unknown" (refused before the request was read) and "document" (GetDocument);
    the cloud counts every mode and "unknown" (refused before a mode was known)."""
    if side == "edge":
        return [*streamed_mode_names(), "invalid", "unknown", "document"]
    return [*mode_names(), "auto", "unknown"]


def request_outcomes(side: str, extra: Iterable[str] = ()) -> list[str]:
    """The outcome labels a side's kvwire_requests_total starts with at 0 (`extra`: the daemon's own table's)."""
    labels = ["ok", "cancelled", "error"]
    if side == "edge":
        labels += [row.outcome for row in GRPC_STATUS_TABLE]
    return list(dict.fromkeys([*labels, *extra]))


DOCUMENT_PREFILL_OUTCOMES = ("done", "cached", "cancelled", "failed")


class Metrics:
    """kvwire_* metrics for one side ("edge" or "cloud").

    edge: kvwire_sent_bytes_total{mode,kind}, kvwire_documents (documents in the edge's store); cloud: kvwire_received_bytes_total{mode,kind},
    kvwire_frames_rejected_total{reason} and kvwire_wire_ratio{mode}; both: kvwire_stage_seconds
    {side,stage,mode}, kvwire_requests_total{mode,outcome}, kvwire_inflight_requests.

    Anytime answers (cloud, docs/anytime.md): kvwire_partial_answers_total{mode} counts answers from a
    stream a deadline cut (still outcome "ok"), kvwire_fallbacks_total{mode,reason} kv/scout requests
    answered in text mode instead (reason: the error outcome label that caused it), and
    kvwire_retention_achieved_ratio{mode} the context share each kv/scout answer actually used.
    Prefix cache (edge, docs/documents.md): kvwire_prefix_cache_{hits,misses,evictions,disk_hits}_total,
    kvwire_prefix_cache_bytes{tier} (memory, disk), kvwire_prefix_cache_disk_errors_total{reason} and
    kvwire_document_prefills_total{outcome} (documents prefilled in the background when put or at start).
    Label values are bounded: modes, stages, frame kinds, and the outcome labels of cloud_agent/errors.py.

    Counters whose label values are known start at 0 for every combination, so a dashboard shows 0, not
    "No data", and rate() has a first sample: kvwire_requests_total for the side's modes (`request_modes`)
    × outcomes ("ok", "cancelled", "error", the edge's gRPC status table, and `outcomes`: the cloud passes
    the labels of its HTTP status table, which this module cannot import), the bytes counters per streamed
    mode × frame kind, and the cloud's partial answers and fallbacks per streamed mode. Frame rejection
    reasons are free-form labels of FrameError, so kvwire_frames_rejected_total starts empty.
    """

    def __init__(self, side: str, outcomes: Iterable[str] = ()):
        if side not in ("edge", "cloud"):
            raise ValueError(f"side must be edge or cloud, not {side!r}")
        self.side = side
        self.registry = CollectorRegistry()
        r = self.registry
        self.stage_seconds = Histogram(
            "kvwire_stage_seconds",
            "Seconds spent per pipeline stage",
            ["side", "stage", "mode"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "kvwire_requests", "Requests finished, by mode and outcome", ["mode", "outcome"], registry=r
        )
        self.inflight = Gauge("kvwire_inflight_requests", "Requests being served now", registry=r)
        if side == "edge":
            self.bytes = Counter(
                "kvwire_sent_bytes", "Codec frame bytes written to the gRPC stream", ["mode", "kind"], registry=r
            )
            self.prefix_cache_events = {
                kind: Counter(f"kvwire_prefix_cache_{kind}", help_text, registry=r)
                for kind, help_text in (
                    ("hits", "Prompts whose [template][context] KV came from the prefix cache"),
                    ("misses", "Prompts whose [template][context] was prefilled (and then kept)"),
                    ("evictions", "Prefix KV entries dropped to stay within --prefix-cache-bytes"),
                    ("disk_hits", "Hits whose entry was read from the disk tier (and promoted to memory)"),
                )
            }
            self.prefix_cache_disk_errors = Counter(
                "kvwire_prefix_cache_disk_errors",
                "Disk-tier files dropped (corrupt, truncated, mismatch, missing, read) or writes failed (disk_full, write)",
                ["reason"],
                registry=r,
            )
            self.document_prefills = Counter(
                "kvwire_document_prefills",
                "Documents prefilled in the background (when put, or at start), by outcome",
                ["outcome"],
                registry=r,
            )
            self.prefix_cache_bytes = Gauge(
                "kvwire_prefix_cache_bytes", "Bytes of prefix KV kept, by tier", ["tier"], registry=r
            )
            self.documents = Gauge("kvwire_documents", "Documents in the edge's document store", registry=r)
        else:
            self.bytes = Counter(
                "kvwire_received_bytes", "Codec frame bytes read from the gRPC stream", ["mode", "kind"], registry=r
            )
            self.frames_rejected = Counter(
                "kvwire_frames_rejected", "Frames or streams the decoder rejected", ["reason"], registry=r
            )
            self.wire_ratio = Histogram(
                "kvwire_wire_ratio",
                "Bytes on the wire / FP16 KV bytes of the full prompt",
                ["mode"],
                buckets=RATIO_BUCKETS,
                registry=r,
            )
            self.partial_answers = Counter(
                "kvwire_partial_answers",
                "Answers from the positions that arrived before a deadline cut the edge stream",
                ["mode"],
                registry=r,
            )
            self.fallbacks = Counter(
                "kvwire_fallbacks",
                "kv/scout requests answered in text mode because the edge stream failed",
                ["mode", "reason"],
                registry=r,
            )
            self.auto_choices = Counter(
                "kvwire_auto_choices", "Mode auto's choices, by the mode chosen", ["mode"], registry=r
            )
            self.auto_prediction_ratio = Histogram(
                "kvwire_auto_prediction_ratio",
                "Mode auto: measured / predicted time to first token of the chosen setting",
                ["mode"],
                buckets=(0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0),
                registry=r,
            )
            self.retention_achieved = Histogram(
                "kvwire_retention_achieved_ratio",
                "Context positions an answer used / context tokens",
                ["mode"],
                buckets=RETENTION_BUCKETS,
                registry=r,
            )

        self.outcomes = request_outcomes(side, outcomes)
        self._start_at_zero()

    def _start_at_zero(self) -> None:
        """Create every series whose label values are known, at 0 (a labelled counter has none until used)."""
        for mode in request_modes(self.side):
            for outcome in self.outcomes:
                self.requests.labels(mode, outcome)
        kinds = [*FRAME_TYPES.values(), "unknown" if self.side == "edge" else "rejected"]
        for mode in streamed_mode_names():
            for kind in kinds:
                self.bytes.labels(mode, kind)
            if self.side == "cloud":
                self.partial_answers.labels(mode)
                for outcome in self.outcomes:
                    if outcome not in ("ok", "cancelled"):  # a fallback's reason is the failure that caused it
                        self.fallbacks.labels(mode, outcome)
        if self.side == "edge":
            for reason in DISK_ERROR_REASONS:
                self.prefix_cache_disk_errors.labels(reason)
            for outcome in DOCUMENT_PREFILL_OUTCOMES:
                self.document_prefills.labels(outcome)

        if self.side == "cloud":
            for mode in mode_names():
                self.auto_choices.labels(mode)

    def watch_prefix_cache(self, cache) -> None:
        """Count the cache's hits, misses and evictions and report its size per tier (edge only); the disk
        tier's errors are counted through its on_error (`count_disk_error`), set when it is built."""
        plural = {"hit": "hits", "miss": "misses", "eviction": "evictions", "disk_hit": "disk_hits"}
        cache.on_event = lambda kind: self.prefix_cache_events[plural[kind]].inc()
        self.prefix_cache_bytes.labels("memory").set_function(lambda: cache.bytes)
        if cache.disk is not None:
            self.prefix_cache_bytes.labels("disk").set_function(lambda: cache.disk.bytes)

    def count_disk_error(self, reason: str) -> None:
        self.prefix_cache_disk_errors.labels(reason).inc()

    def observe_stages(self, mode: str, seconds: dict[str, float]) -> None:
        for stage, value in seconds.items():
            self.stage_seconds.labels(self.side, stage, mode).observe(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
