"""The edge's HTTP side: /healthz (process alive), /readyz (model loaded, not draining), /metrics."""

from __future__ import annotations

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse

from kvwire.agent_common.metrics import CONTENT_TYPE, Metrics


def create_app(servicer, metrics: Metrics, model_source: str) -> FastAPI:
    app = FastAPI(title="kvwire edge-agent", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz():
        if servicer.draining:
            return JSONResponse({"ready": False, "reason": "shutting down"}, status_code=503)
        return {"ready": True, "model": model_source}

    @app.get("/metrics")
    def metrics_route():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app
