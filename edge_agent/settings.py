"""edge-agent options: the one place each is declared and documented (shared ones: agent_common.settings.DaemonSettings)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from kvwire.agent_common.settings import MIB, DaemonSettings
from kvwire.edge_agent.documents import DocumentLimits, default_data_dir

DEFAULT_GRPC_PORT = 50051
DEFAULT_HTTP_PORT = 8081

# the precision profile of requests that name none: the cheapest on SQuAD's teacher-forced frontier that keeps the
# full cache's next token at >= 95% of positions with the fixed positions streamed (KIVI's split at 4 bits: top-1
# 0.962 at 0.30 of FP16, where mixed-int4 held 0.863 at 0.29; SQuAD n = 300, docs/results.md, "The frontier")
DEFAULT_PROFILE = "kivi-4"


class EdgeSettings(DaemonSettings):
    model_config = SettingsConfigDict(env_prefix="KVWIRE_EDGE_", extra="forbid")

    tls_cert_file: str | None = Field(
        None,
        description="PEM certificate (chain) of the gRPC port; with tls_key_file it switches TLS on "
        "(the HTTP port of /healthz, /readyz, /metrics stays plain)",
    )
    grpc_port: int = Field(
        DEFAULT_GRPC_PORT,
        ge=0,
        le=65535,
        description="gRPC port of EdgeService and grpc.health.v1 (0: a free port, logged)",
    )
    http_port: int = Field(
        DEFAULT_HTTP_PORT,
        ge=0,
        le=65535,
        description="HTTP port of /healthz, /readyz, /metrics and the documents API /v1/documents (0: a free port, logged)",
    )
    profile: str = Field(
        DEFAULT_PROFILE,
        description="precision profile used when a request names none: a named profile or a JSON file (see kvwire diagnose)",
    )
    chunk_bytes: int = Field(MIB, ge=4096, le=2 * MIB, description="target size of one chunk frame in bytes")
    max_concurrency: int = Field(
        2,
        ge=1,
        le=256,
        description="Prefill streams served at once; more are refused with RESOURCE_EXHAUSTED (forward passes run one at a time)",
    )
    max_context_tokens: int = Field(
        32768,
        ge=1,
        description="longest inline context a Prefill may carry, in tokens of this model's tokenizer, "
        "special-token strings counted as text (longer: OUT_OF_RANGE, the cloud's 413); documents have max_document_tokens",
    )
    prefix_cache_bytes: int = Field(
        1024 * MIB,
        ge=0,
        description="memory for prefix KV kept across requests (a document's or a repeated context's "
        "[template][context] prefilled once; least recently used dropped first; 0: prefill every prompt whole)",
    )
    prefix_cache_disk_bytes: int = Field(
        0,
        ge=0,
        description="disk for prefix KV under data_dir/prefix-cache (the model's own precision, checksummed "
        "frames; least recently used dropped first), so a restarted edge starts warm; 0: off. Needs prefix_cache_bytes",
    )
    prefill_documents: bool = Field(
        True,
        description="prefill a document's [template][document] in the background when it is put, and at start "
        "those without a cached entry (newest first, as many as the prefix cache holds); requests always go first",
    )
    document_scores: str = Field(
        "",
        description="comma list of selectors (e.g. kvzip) whose context-only scores are computed with a "
        "document's prefix KV when it is prefilled in the background and kept with it, so no question on it pays "
        "for them; empty: computed by the first question that needs them (and kept too)",
    )
    data_dir: str | None = Field(
        None,
        description="folder of the edge's persistent data (documents.sqlite3, the document store); "
        "none: $XDG_DATA_HOME/kvwire-edge, else ~/.local/share/kvwire-edge",
    )
    max_document_bytes: int = Field(
        4 * MIB,
        ge=1,
        le=1 << 30,
        description="largest document in UTF-8 bytes, and the largest PUT /v1/documents body (larger: HTTP 413)",
    )
    max_document_tokens: int = Field(
        32768, ge=1, description="largest document in tokens of the edge's tokenizer (larger: HTTP 413)"
    )
    max_documents: int = Field(1000, ge=1, description="documents the store holds at most (one more: HTTP 507)")
    max_documents_total_bytes: int = Field(
        256 * MIB, ge=1, description="UTF-8 bytes of all documents together at most (past it: HTTP 507)"
    )
    receipt_wait_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="how long a finished stream waits for the cloud's Confirm before it is released (logged prefill_unconfirmed)",
    )
    tls_client_ca_file: str | None = Field(
        None,
        description="PEM CA bundle that signs cloud-agents' client certificates; switches mutual TLS on "
        "(a cloud-agent without such a certificate cannot connect); needs tls_cert_file",
    )

    @model_validator(mode="after")
    def _mutual_tls_needs_tls(self):
        self.require_for("tls_cert_file", "tls_client_ca_file")
        if self.prefix_cache_disk_bytes and not self.prefix_cache_bytes:
            raise ValueError(
                "prefix_cache_disk_bytes needs prefix_cache_bytes > 0 (the disk tier backs the memory tier)"
            )
        return self

    def documents_dir(self) -> Path:
        """data_dir, or the XDG default when it is not set (the environment is read here, never at import)."""
        return Path(self.data_dir).expanduser() if self.data_dir else default_data_dir()

    def prefix_disk_dir(self, model_fp: str) -> Path:
        """The disk tier's folder for one model (another model's entries sit beside it, untouched); "": the
        folder of all models' folders."""
        return self.documents_dir() / "prefix-cache" / model_fp[:16]

    def document_limits(self) -> DocumentLimits:
        return DocumentLimits(
            max_document_bytes=self.max_document_bytes,
            max_document_tokens=self.max_document_tokens,
            max_documents=self.max_documents,
            max_total_bytes=self.max_documents_total_bytes,
        )
