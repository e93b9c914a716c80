"""The Prometheus metrics of DESIGN.md, one registry per daemon (no global state between daemons or tests)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Stage latencies span sub-millisecond (select on a short prompt) to minutes (a long CPU prefill).
STAGE_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
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


class Metrics:
    """kvwire_* metrics for one side ("edge" or "cloud").

    edge: kvwire_bytes_sent_total{mode,kind}, kvwire_documents (documents in the edge's store); cloud: kvwire_bytes_received_total{mode,kind},
    kvwire_frames_rejected_total{reason} and kvwire_wire_ratio{mode}; both: kvwire_stage_seconds
    {side,stage,mode}, kvwire_requests_total{mode,outcome}, kvwire_inflight_requests.

    Anytime answers (cloud, docs/anytime.md): kvwire_partial_answers_total{mode} counts answers from a
    stream a deadline cut (still outcome "ok"), kvwire_fallbacks_total{mode,reason} kv/scout requests
    answered in text mode instead (reason: the error outcome label that caused it), and
    kvwire_retention_achieved{mode} the context share each kv/scout answer actually used.
    Prefix cache (edge, docs/documents.md): kvwire_prefix_cache_{hits,misses,evictions}_total and
    kvwire_prefix_cache_bytes{tier}.
    Label values are bounded: modes, stages, frame kinds, and the outcome labels of cloud_agent/errors.py.
    """

    def __init__(self, side: str):
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
                "kvwire_bytes_sent", "Codec frame bytes written to the gRPC stream", ["mode", "kind"], registry=r
            )
            self.prefix_cache_events = {
                kind: Counter(f"kvwire_prefix_cache_{kind}", help_text, registry=r)
                for kind, help_text in (
                    ("hits", "Prompts whose [template][context] KV came from the prefix cache"),
                    ("misses", "Prompts whose [template][context] was prefilled (and then kept)"),
                    ("evictions", "Prefix KV entries dropped to stay within --prefix-cache-bytes"),
                )
            }
            self.prefix_cache_bytes = Gauge(
                "kvwire_prefix_cache_bytes", "Bytes of prefix KV kept, by tier", ["tier"], registry=r
            )
            self.documents = Gauge("kvwire_documents", "Documents in the edge's document store", registry=r)
        else:
            self.bytes = Counter(
                "kvwire_bytes_received", "Codec frame bytes read from the gRPC stream", ["mode", "kind"], registry=r
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
            self.retention_achieved = Histogram(
                "kvwire_retention_achieved",
                "Context positions an answer used / context tokens",
                ["mode"],
                buckets=RETENTION_BUCKETS,
                registry=r,
            )

    def watch_prefix_cache(self, cache) -> None:
        """Count the cache's hits, misses and evictions and report its size (edge only)."""
        plural = {"hit": "hits", "miss": "misses", "eviction": "evictions"}
        cache.on_event = lambda kind: self.prefix_cache_events[plural[kind]].inc()
        self.prefix_cache_bytes.labels("memory").set_function(lambda: cache.bytes)

    def observe_stages(self, mode: str, seconds: dict[str, float]) -> None:
        for stage, value in seconds.items():
            self.stage_seconds.labels(self.side, stage, mode).observe(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
