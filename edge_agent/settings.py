"""edge-agent options: the one place each is declared and documented."""
from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from agent_common.settings import AgentSettings

DEFAULT_GRPC_PORT = 50051
DEFAULT_HTTP_PORT = 8081
MIB = 1 << 20


class EdgeSettings(AgentSettings):
    model_config = SettingsConfigDict(env_prefix="KVWIRE_EDGE_", extra="forbid")

    model: str = Field("embedded", description="model folder or hub id; 'embedded' is the bundled SmolLM2-135M-Instruct")
    dtype: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="weights and KV dtype")
    device: str = Field("cpu", description="torch device, e.g. cpu, cuda, cuda:1")
    threads: int = Field(0, ge=0, le=1024, description="CPU threads for torch (0: torch's default, one per core; 1 avoids thrashing on a shared host)")
    host: str = Field("127.0.0.1", description="address both ports bind to (0.0.0.0 for every interface)")
    grpc_port: int = Field(DEFAULT_GRPC_PORT, ge=0, le=65535, description="gRPC port of EdgeService and grpc.health.v1 (0: a free port, logged)")
    http_port: int = Field(DEFAULT_HTTP_PORT, ge=0, le=65535, description="HTTP port of /healthz, /readyz, /metrics (0: a free port, logged)")
    profile: str = Field("mixed-int4", description="precision profile used when a request names none: a named profile or a JSON file (see kvwire diagnose)")
    chunk_bytes: int = Field(MIB, ge=4096, le=2 * MIB, description="target size of one chunk frame in bytes")
    max_concurrency: int = Field(2, ge=1, le=256, description="Prefill streams served at once; more are refused with RESOURCE_EXHAUSTED (forward passes run one at a time)")
    max_message_bytes: int = Field(8 * MIB, ge=4 * MIB, le=64 * MIB, description="gRPC message cap in both directions (frames are at most ~1 MiB)")
    grace_seconds: float = Field(30.0, ge=0, description="on SIGTERM/SIGINT, how long in-flight streams may take to finish")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level of the JSON logs on stderr")
