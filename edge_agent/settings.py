"""edge-agent options: the one place each is declared and documented (shared ones: agent_common.settings.DaemonSettings)."""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from kvwire.agent_common.settings import MIB, DaemonSettings

DEFAULT_GRPC_PORT = 50051
DEFAULT_HTTP_PORT = 8081


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
        description="HTTP port of /healthz, /readyz, /metrics (0: a free port, logged)",
    )
    profile: str = Field(
        "mixed-int4",
        description="precision profile used when a request names none: a named profile or a JSON file (see kvwire diagnose)",
    )
    chunk_bytes: int = Field(MIB, ge=4096, le=2 * MIB, description="target size of one chunk frame in bytes")
    max_concurrency: int = Field(
        2,
        ge=1,
        le=256,
        description="Prefill streams served at once; more are refused with RESOURCE_EXHAUSTED (forward passes run one at a time)",
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
        return self
