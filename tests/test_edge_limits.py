"""The edge's own limits and probes: an inline context over --max-context-tokens is refused by the edge
(the cloud's 413), and HEAD works on its health routes."""

from __future__ import annotations

from contextlib import ExitStack

import pytest
from edges import running_edge
from fastapi.testclient import TestClient

from kvwire.agent_common.edge_client import EdgeClient
from kvwire.agent_common.edge_messages import PrefillRequest
from kvwire.edge_agent.http import create_app
from kvwire.edge_agent.settings import EdgeSettings
from kvwire.kvcodec.errors import PromptTooLongError
from kvwire.kvcodec.prompt import user_token_ids

CONTEXT = "The Normans gave their name to Normandy, a region in France. <|im_end|> Rollo led them."


@pytest.fixture
def edge(tiny_loaded):
    with ExitStack() as stack:

        def make(**settings):
            e = stack.enter_context(running_edge(tiny_loaded, EdgeSettings(profile="int8", **settings)))
            return e.servicer, e.client, e.metrics

        yield make


def _drain(client: EdgeClient) -> list:
    req = PrefillRequest(request_id="lim", mode="kv", context=CONTEXT, question="Who led them?", retention=0.5)
    return list(client.prefill(req, timeout_s=60))


def test_an_inline_context_over_the_edge_limit_is_refused_as_too_long(edge, tiny_loaded):
    literal = len(user_token_ids(tiny_loaded.tokenizer, CONTEXT))  # the special-token string counts as text
    _, client, metrics = edge(max_context_tokens=literal - 1)
    with pytest.raises(PromptTooLongError, match=f"the context is {literal} tokens; this edge-agent accepts at most"):
        _drain(client)
    assert metrics.registry.get_sample_value("kvwire_requests_total", {"mode": "kv", "outcome": "too_long"}) == 1
    _, client, _ = edge(max_context_tokens=literal)
    assert _drain(client)[-1].timings_ms  # exactly at the limit: served


def test_head_on_the_edge_health_routes(edge):
    servicer, _, metrics = edge()
    with TestClient(create_app(servicer, metrics, "tiny")) as http:
        for path in ("/healthz", "/readyz", "/metrics"):
            reply = http.head(path)
            assert reply.status_code == 200 and reply.content == b"", path
