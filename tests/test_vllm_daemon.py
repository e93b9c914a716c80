"""A real cloud-agent with `--engine vllm` (its vLLM worker in .venv-vllm; skipped with the reason when that
venv is unavailable) and a real edge-agent on loopback, the embedded model on both: /answer in kv mode gives
the text answer (vLLM's own prefill) token for token, and the OpenAI route streams with KVWire's fields."""

from __future__ import annotations

import httpx
import openai
import pytest
from edges import daemon_env

from kvwire.agent_common.launch import Daemon
from kvwire.cloud_agent.vllm_engine.client import default_python, unavailable_reason

REASON = unavailable_reason(default_python())
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"vLLM venv unavailable: {REASON}")

COMMON = ["--host", "127.0.0.1", "--http-port", "0", "--threads", "1"]
CONTEXT = (
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in France. "
    "They were descended from Norse raiders and pirates from Denmark, Iceland and Norway who, under their leader "
    "Rollo, agreed to swear fealty to King Charles III of West Francia."
)
QUESTION = "Who was the leader of the Norse raiders?"


def _start(name: str, module: str, args: list[str]) -> Daemon:
    return Daemon(name, module, [*COMMON, *args], env=daemon_env())


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    started: list[Daemon] = []
    log = tmp_path_factory.mktemp("vllm_daemon") / "worker.log"
    try:
        edge = _start("edge", "kvwire.edge_agent", ["--grpc-port", "0", "--profile", "fp32"])
        started.append(edge)
        edge.wait_listening()
        cloud = _start(
            "cloud",
            "kvwire.cloud_agent",
            ["--edge", edge.grpc_address, "--engine", "vllm", "--vllm-dtype", "fp32", "--vllm-log-file", str(log)],
        )
        started.append(cloud)
        cloud.wait_listening()
        yield cloud
    finally:
        for d in started:
            d.terminate()
        for d in started:
            d.stop()


def _answer(cloud, **body) -> dict:
    r = httpx.post(cloud.http_url + "/answer", json={"question": QUESTION, "context": CONTEXT, **body}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def test_kv_on_vllm_answers_as_vllms_own_text_prefill(cloud):
    text = _answer(cloud, mode="text", max_new_tokens=20)
    kv = _answer(cloud, mode="kv", selector="q2c", retention=1.0, max_new_tokens=20)
    assert kv["answer"] == text["answer"] and kv["answer"]
    assert kv["bytes_on_wire"] > 0 and kv["kept_positions"] == kv["prompt_tokens"] - 1
    pruned = _answer(cloud, mode="kv", selector="q2c", retention=0.5, max_new_tokens=20)
    assert pruned["kept_positions"] < kv["kept_positions"] and pruned["answer"]
    scout = _answer(cloud, mode="scout", selector="q2c", retention=0.5, max_new_tokens=20)
    assert scout["mode"] == "scout" and scout["answer"]


def test_the_openai_route_streams_on_vllm(cloud):
    messages = [{"role": "user", "content": QUESTION}]
    extra = {"kvwire": {"context": CONTEXT, "mode": "kv"}}
    with openai.OpenAI(base_url=cloud.http_url + "/v1", api_key="unused", max_retries=0, timeout=300) as client:
        plain = client.chat.completions.create(model="any", messages=messages, max_tokens=16, extra_body=extra)
        chunks = list(
            client.chat.completions.create(model="any", messages=messages, max_tokens=16, stream=True, extra_body=extra)
        )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == plain.choices[0].message.content and content
    assert plain.model_extra["kvwire"]["mode"] == "kv" and plain.model_extra["kvwire"]["bytes_on_wire"] > 0
