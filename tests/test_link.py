"""The real daemons on a shaped link between two network namespaces: edge-agent on the edge host,
cloud-agent on the cloud host, requests answered across the veth (and through the fault relay).

Needs root and iproute2 (skips otherwise, see docs/network-tests.md); uses the tiny offline model.
"""

from __future__ import annotations

import pytest

from kvwire.bench.netlab import LinkSpec, netlab_fixture
from kvwire.bench.netlab.daemons import answer, edge_grpc_target, launch_cloud, launch_edge, ready, start_relay

RATE = "20mbit"
RELAY_DELAY_MS = 20
QUESTION = "Who was the leader?"
CONTEXT = (
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in "
    "France. They were descended from Norse raiders under their leader Rollo."
)

lab = netlab_fixture(LinkSpec(rate=RATE), scope="module", name="lab")


@pytest.fixture(scope="module")
def hosts(lab, tiny_model_dir):
    """edge-agent in the edge namespace; one cloud-agent on the bare link, one through a delaying relay.
    All start at once (the cloud connects to the edge per request), which overlaps their model loads."""
    target = edge_grpc_target(lab)
    relay = start_relay(lab, target, delay_ms=RELAY_DELAY_MS)
    procs = {
        "edge": launch_edge(lab, tiny_model_dir, grace_seconds=2),
        "direct": launch_cloud(lab, tiny_model_dir, target, grace_seconds=2),
        "relayed": launch_cloud(lab, tiny_model_dir, relay.target, grace_seconds=2),
    }
    return {"relay": relay, **{k: ready(p) for k, p in procs.items()}}


def _request(mode: str) -> dict:
    return {"question": QUESTION, "context": CONTEXT, "mode": mode, "max_new_tokens": 8}


@pytest.mark.parametrize("mode", ["kv", "text"])
def test_one_request_across_the_shaped_link(lab, hosts, mode):
    res = answer(lab, hosts["direct"], _request(mode))
    assert res["status"] == 200, res
    body = res["body"]
    assert body["mode"] == mode and isinstance(body["answer"], str)
    if mode == "kv":
        assert body["bytes_on_wire"] > 0 and 0 < body["kept_positions"] <= body["prompt_tokens"]
    else:  # the text crosses the link
        assert body["bytes_on_wire"] == len(CONTEXT.encode()) + len(QUESTION.encode())


def test_kv_through_the_relay_gives_the_same_answer_later(lab, hosts):
    direct = answer(lab, hosts["direct"], _request("kv"))
    relayed = answer(lab, hosts["relayed"], _request("kv"))
    assert direct["status"] == relayed["status"] == 200, (direct, relayed)
    assert relayed["body"]["answer"] == direct["body"]["answer"]  # a byte relay changes nothing
    assert relayed["body"]["bytes_on_wire"] == direct["body"]["bytes_on_wire"]
    # One gRPC stream needs at least one round trip through 2 x RELAY_DELAY_MS.
    assert relayed["body"]["timings_ms"]["total"] >= 2 * RELAY_DELAY_MS * 0.99
    opened = [r for r in hosts["relay"].proc.json_lines() if r.get("event") == "open"]
    assert opened, "the relayed cloud-agent did not connect through the relay"
