"""cloud-agent options: the one place each is declared and documented."""
from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from agent_common.settings import AgentSettings

MIB = 1 << 20


class CloudSettings(AgentSettings):
    model_config = SettingsConfigDict(env_prefix="KVWIRE_CLOUD_", extra="forbid")

    model: str = Field("embedded", description="model folder or hub id; 'embedded' is the bundled SmolLM2-135M-Instruct")
    dtype: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="weights and KV dtype")
    device: str = Field("cpu", description="torch device, e.g. cpu, cuda, cuda:1")
    threads: int = Field(0, ge=0, le=1024, description="CPU threads for torch (0: torch's default, one per core; 1 avoids thrashing on a shared host)")
    host: str = Field("127.0.0.1", description="address the HTTP port binds to (0.0.0.0 for every interface)")
    http_port: int = Field(8080, ge=0, le=65535, description="HTTP port of /answer, /healthz, /readyz, /metrics (0: a free port, logged)")
    edge: str = Field("127.0.0.1:50051", description="HOST:PORT of the edge-agent's gRPC port")
    max_concurrency: int = Field(4, ge=1, le=256, description="/answer requests served at once; more get HTTP 429 at once (forward passes run one at a time)")
    max_context_tokens: int = Field(4096, ge=1, description="longest context accepted, in tokens of this model's tokenizer (longer: HTTP 413)")
    max_new_tokens: int = Field(256, ge=1, le=4096, description="largest max_new_tokens a request may ask for")
    default_deadline_ms: int = Field(120_000, ge=1, description="deadline of a kv/scout request that sets no deadline_ms")
    deadline_reserve_ms: int | None = Field(None, ge=0, description="time kept free before a request's deadline to inject and generate: the edge stream is cut this long before it (anytime answer from the positions that arrived); none: estimated from this cloud's measured generation speed")
    readyz_timeout_s: float = Field(1.0, gt=0, description="how long /readyz waits for the edge's health check")
    max_body_bytes: int = Field(4 * MIB, ge=1024, description="largest /answer request body (larger: HTTP 413)")
    max_message_bytes: int = Field(8 * MIB, ge=4 * MIB, le=64 * MIB, description="gRPC message cap in both directions (frames are at most ~1 MiB)")
    grace_seconds: float = Field(30.0, ge=0, description="on SIGTERM/SIGINT, how long in-flight requests may take to finish")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level of the JSON logs on stderr")
