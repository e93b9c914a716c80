"""`cloud-agent`: load the model once, connect to the edge, serve /answer; drain on SIGTERM."""
from __future__ import annotations

import asyncio
import logging
import sys
import time

from agent_common.logs import log_event, setup_logging
from agent_common.metrics import Metrics
from agent_common.serve import HttpServer, install_stop_handlers
from agent_common.settings import apply_thread_limit, load_settings
from cloud_agent.settings import CloudSettings
from kvcodec.errors import KVWireError

log = logging.getLogger("cloud_agent")

DESCRIPTION = """\
KVWire cloud-agent: POST /answer {question, context, mode: kv|scout|text, ...}. In kv mode it
receives the edge's quantized KV of the kept positions and generates from it; in scout mode it
prefills with its own model and keeps the edge's chosen positions; text mode needs no edge.
HTTP: /answer, /healthz, /readyz (model loaded and edge reachable), /metrics."""


async def serve(settings: CloudSettings) -> int:
    from transformers.utils import logging as hf_logging

    from cloud_agent.app import create_app
    from cloud_agent.service import AnswerService
    from edge_agent.client import EdgeClient
    from kvcodec.models import load_model

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    loaded = load_model(settings.model, settings.dtype, settings.device)
    log_event(log, "model_loaded", model=loaded.source, seconds=round(time.perf_counter() - started, 2))
    metrics = Metrics("cloud")
    edge = EdgeClient(settings.edge, settings.max_message_bytes)
    service = AnswerService(loaded, settings, edge, metrics)
    http = HttpServer(create_app(service, metrics, settings.max_body_bytes), settings.host, settings.http_port, settings.grace_seconds)

    stop = asyncio.Event()
    install_stop_handlers(stop)
    http_task = asyncio.create_task(http.serve())
    await http.started(http_task)
    log_event(log, "listening", host=settings.host, http_port=http.port, edge=settings.edge)

    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({stopper, http_task}, return_when=asyncio.FIRST_COMPLETED)
    log_event(log, "draining", grace_seconds=settings.grace_seconds, inflight=service.inflight)
    service.draining = True
    http.stop()  # listeners close now; in-flight requests finish within the grace period
    await http_task
    stopper.cancel()
    await asyncio.to_thread(service.close)
    edge.close()
    log_event(log, "stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(CloudSettings, argv, "cloud-agent", DESCRIPTION)
    setup_logging("cloud-agent", settings.log_level)
    apply_thread_limit(settings.threads)
    try:
        return asyncio.run(serve(settings))
    except (KVWireError, OSError, RuntimeError) as exc:
        log_event(log, "startup_failed", logging.ERROR, error=f"{type(exc).__name__}: {exc}")
        print(f"cloud-agent: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
