"""cloud-agent options: the one place each is declared and documented (shared ones: agent_common.settings.DaemonSettings)."""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from kvwire.agent_common.settings import MIB, DaemonSettings

# HOST:PORT (a name, an IPv4 address or a bracketed IPv6 one), or a gRPC target with its scheme (dns:, unix:, ...)
_EDGE_ADDRESS = re.compile(r"(?:[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]):(\d{1,5})")
_GRPC_SCHEMES = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:")


class CloudSettings(DaemonSettings):
    model_config = SettingsConfigDict(env_prefix="KVWIRE_CLOUD_", extra="forbid")

    tls_cert_file: str | None = Field(
        None, description="PEM certificate (chain) of the HTTP port; with tls_key_file the port serves HTTPS only"
    )
    http_port: int = Field(
        8080, ge=0, le=65535, description="HTTP port of /answer, /healthz, /readyz, /metrics (0: a free port, logged)"
    )
    edge: str = Field(
        "127.0.0.1:50051",
        description="HOST:PORT of the edge-agent's gRPC port (or a gRPC target such as dns:///edge:50051)",
    )
    max_concurrency: int = Field(
        4,
        ge=1,
        le=256,
        description="/answer requests served at once; more get HTTP 429 at once (engine hf: forward passes run one at a "
        "time; engine vllm: they share one batch, and this is also vLLM's max_num_seqs)",
    )
    max_context_tokens: int = Field(
        4096, ge=1, description="longest context accepted, in tokens of this model's tokenizer (longer: HTTP 413)"
    )
    max_new_tokens: int = Field(256, ge=1, le=4096, description="largest max_new_tokens a request may ask for")
    default_deadline_ms: int = Field(
        120_000, ge=1, description="deadline of a kv/scout request that sets no deadline_ms"
    )
    deadline_reserve_ms: int | None = Field(
        None,
        ge=0,
        description="time kept free before a request's deadline to inject and generate: the edge stream is cut this long before it (anytime answer from the positions that arrived); none: estimated from this cloud's measured generation speed",
    )
    quality_table: str | None = Field(
        None,
        description="mode auto's quality table (JSON written by `kvwire eval --quality-table`, docs/auto.md); "
        "none: the shipped table when the model is the embedded default, else auto answers in text mode only",
    )
    readyz_timeout_s: float = Field(1.0, gt=0, description="how long /readyz waits for the edge's health check")
    max_body_bytes: int = Field(4 * MIB, ge=1024, description="largest /answer request body (larger: HTTP 413)")
    edge_ca_file: str | None = Field(
        None, description="PEM CA bundle that signed the edge-agent's certificate; switches TLS to the edge on"
    )
    edge_cert_file: str | None = Field(
        None,
        description="PEM client certificate presented to the edge-agent (mutual TLS); needs edge_key_file and edge_ca_file",
    )
    edge_key_file: str | None = Field(None, description="unencrypted PEM private key of edge_cert_file")
    edge_server_name: str | None = Field(
        None,
        description="name checked in the edge-agent's certificate instead of the host in --edge "
        "(e.g. when --edge is an IP address the certificate does not list)",
    )
    edge_token_file: str | None = Field(
        None,
        description="file holding the bearer token sent to the edge-agent (its auth_token_file; may be the same file as ours)",
    )

    engine: str = Field(
        "hf",
        description="what generates the answers: hf (transformers in this process, one request at a time) or vllm "
        "(a vLLM engine in a worker process of the .venv-vllm venv `make setup-vllm` builds, docs/vllm.md)",
    )
    vllm_python: str | None = Field(
        None, description="engine vllm: the vLLM venv's python (none: .venv-vllm/bin/python of this checkout)"
    )
    vllm_dtype: str = Field(
        "bf16", description="engine vllm: the dtype vLLM runs the model and its KV cache in (fp32, bf16, fp16)"
    )
    vllm_block_size: int = Field(32, ge=1, le=1024, description="engine vllm: tokens per paged KV block")
    vllm_tensor_parallel_size: int = Field(
        1, ge=1, le=64, description="engine vllm: GPUs the model is split across (tensor parallel; GPU hosts only)"
    )
    vllm_log_file: str | None = Field(None, description="engine vllm: file the vLLM worker's output is appended to")

    @field_validator("engine")
    @classmethod
    def _engine_known(cls, value: str) -> str:
        from kvwire.cloud_agent.engines.registry import get_engine

        get_engine(value)  # ValueError listing the engines
        return value

    @field_validator("vllm_dtype")
    @classmethod
    def _vllm_dtype(cls, value: str) -> str:
        from kvwire.cloud_agent.vllm_engine.client import VLLM_DTYPES

        if value not in VLLM_DTYPES:
            raise ValueError(f"{value!r}: use one of {', '.join(VLLM_DTYPES)}")
        return value

    @field_validator("edge")
    @classmethod
    def _edge_address(cls, value: str) -> str:
        if value.startswith(_GRPC_SCHEMES):
            return value
        match = _EDGE_ADDRESS.fullmatch(value)
        if match is None or not 1 <= int(match.group(1)) <= 65535:
            raise ValueError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:50051, edge.example:50051, [::1]:50051)")
        return value

    @model_validator(mode="after")
    def _edge_tls(self):
        self.require_together("edge_cert_file", "edge_key_file")
        self.require_for("edge_ca_file", "edge_cert_file", "edge_key_file", "edge_server_name")
        return self
