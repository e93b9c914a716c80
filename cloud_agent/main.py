"""`cloud-agent`: load the model once, connect to the edge, serve /answer; drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import dataclass

import grpc

from kvwire.agent_common.daemon import check_ports_free, load_daemon_model, run_daemon, warn_if_exposed
from kvwire.agent_common.errors import StartupConfigError
from kvwire.agent_common.logs import log_event
from kvwire.agent_common.metrics import Metrics
from kvwire.agent_common.security import channel_credentials, check_key_pair, read_token
from kvwire.agent_common.serve import HttpServer
from kvwire.cloud_agent.errors import outcome_labels
from kvwire.cloud_agent.settings import CloudSettings

log = logging.getLogger("kvwire.cloud_agent")

DESCRIPTION = """\
KVWire cloud-agent: POST /answer {question, context, mode: kv|scout|text|auto, ...}. In kv mode it
receives the edge's quantized KV of the kept positions and generates from it; in scout mode it
prefills with its own model and keeps the edge's chosen positions; text mode needs no edge; auto
chooses among them per request from live measurements and --quality-table (docs/auto.md).
HTTP: /answer, /healthz, /readyz (model loaded and edge reachable), /metrics.
HTTPS, a bearer token for /answer, and TLS, mutual TLS and a token towards the edge switch on
with the tls_*, auth_token_file and edge_* options (docs/security.md)."""


@dataclass(frozen=True)
class CloudSecurity:
    """What the security options switched on, read and checked before the model loads."""

    auth_token: str | None  # /answer callers must send it
    edge_credentials: grpc.ChannelCredentials | None  # None: plaintext gRPC to the edge
    edge_token: str | None  # sent to the edge with every Prefill


def check_security(settings: CloudSettings) -> CloudSecurity:
    """Read the TLS files and the token files and check that the port is free, before the model loads;
    SecurityConfigError (exit 2) names the setting at fault."""
    check_ports_free(settings.host, settings.http_port)
    if settings.tls_cert_file:  # uvicorn reads them itself; checked here so a bad pair fails before the model loads
        check_key_pair(settings.tls_cert_file, settings.tls_key_file, "tls_cert_file", "tls_key_file")
    credentials = None
    if settings.edge_ca_file:
        credentials = channel_credentials(settings.edge_ca_file, settings.edge_cert_file, settings.edge_key_file)
    return CloudSecurity(
        auth_token=read_token(settings.auth_token_file, "auth_token_file") if settings.auth_token_file else None,
        edge_credentials=credentials,
        edge_token=read_token(settings.edge_token_file, "edge_token_file") if settings.edge_token_file else None,
    )


def edge_client(settings: CloudSettings, security: CloudSecurity):
    """The EdgeClient these settings describe: plaintext or TLS (mutual with a client certificate), with or without a token."""
    from kvwire.agent_common.edge_client import EdgeClient

    return EdgeClient(
        settings.edge,
        settings.max_message_bytes,
        credentials=security.edge_credentials,
        server_name=settings.edge_server_name,
        token=security.edge_token,
    )


def quality_table(settings: CloudSettings):
    """Mode auto's quality table: --quality-table, else the shipped one for the embedded model, else None
    (auto then answers in text mode). StartupConfigError (exit 2) names a file that cannot serve."""
    from kvwire.cloud_agent.auto import QualityTable, shipped_quality_table
    from kvwire.kvcodec.errors import ConfigError

    if settings.quality_table is None:
        table = shipped_quality_table(settings.model)
        if table is None:
            log_event(log, "no_quality_table", model=settings.model, auto="text only (docs/auto.md)")
        return table
    try:
        return QualityTable.load(settings.quality_table)
    except ConfigError as exc:
        raise StartupConfigError(f"quality_table: {exc}") from None


async def serve(settings: CloudSettings, security: CloudSecurity) -> int:
    from kvwire.cloud_agent.app import create_app
    from kvwire.cloud_agent.service import AnswerService
    from kvwire.cloud_agent.vllm_engine.client import WorkerError
    from kvwire.kvcodec.errors import ConfigError

    warn_if_exposed(
        log,
        settings.auth_token_file,
        "auth_token_file",
        settings.tls_cert_file is not None,
        "the HTTP port is plaintext (no tls_cert_file; fine behind a TLS-terminating proxy): callers' token",
    )
    warn_if_exposed(
        log,
        settings.edge_token_file,
        "edge_token_file",
        security.edge_credentials is not None,
        "the gRPC link to the edge is plaintext (no edge_ca_file): the token sent to the edge",
    )
    table = quality_table(settings)  # a bad file stops the daemon before the model loads
    loaded, seconds = load_daemon_model(settings)
    log_event(log, "model_loaded", model=loaded.source, seconds=seconds)
    metrics = Metrics("cloud", outcomes=outcome_labels())
    edge = edge_client(settings, security)
    try:
        service = AnswerService(loaded, settings, edge, metrics, quality_table=table)  # --engine vllm starts it here
    except (ConfigError, WorkerError) as exc:
        edge.close()
        raise StartupConfigError(f"engine {settings.engine}: {exc}") from None
    log_event(log, "engine_ready", engine=settings.engine)
    log_event(log, "warmed_up", **await asyncio.to_thread(service.warm_up))
    http = HttpServer(
        create_app(service, metrics, settings.max_body_bytes, security.auth_token),
        settings.host,
        settings.http_port,
        settings.grace_seconds,
        settings.tls_cert_file,
        settings.tls_key_file,
    )

    await http.start()
    log_event(
        log,
        "listening",
        host=settings.host,
        http_port=http.port,
        scheme=http.scheme,
        edge=settings.edge,
        edge_tls="off" if not edge.tls else "mutual" if settings.edge_cert_file else "tls",
        token=security.auth_token is not None,
    )
    await http.until_stopped()
    log_event(log, "draining", grace_seconds=settings.grace_seconds, inflight=service.inflight)
    service.draining = True
    await http.shutdown()  # listeners close now; in-flight requests finish within the grace period
    await asyncio.to_thread(service.close)
    edge.close()
    log_event(log, "stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_daemon("cloud-agent", CloudSettings, DESCRIPTION, argv, check_security, serve, log)


if __name__ == "__main__":
    sys.exit(main())
