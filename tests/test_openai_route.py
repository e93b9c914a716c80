"""The OpenAI-compatible routes of a real cloud-agent (subprocess, loopback, tiny model), called with the
real `openai` client: /v1/models, chat completions streamed and not, KVWire's `kvwire` extension,
usage and KVWire figures, and errors in OpenAI's shape."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from edges import daemon_env

from kvwire.agent_common.launch import Daemon
from kvwire.cloud_agent.api import AnswerRequest

COMMON = ["--host", "127.0.0.1", "--http-port", "0", "--threads", "1"]
CONTEXT = (
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in France. "
    "They were descended from Norse raiders and pirates from Denmark, Iceland and Norway."
)
QUESTION = "Who were the Normans?"
KV = {"kvwire": {"context": CONTEXT, "mode": "kv", "selector": "q2c"}}  # retention 1.0: the answer is the text one


def _start(name: str, module: str, args: list[str]) -> Daemon:
    return Daemon(name, module, [*COMMON, *args], env=daemon_env())


@pytest.fixture(scope="module")
def cloud(tiny_model_dir):
    started: list[Daemon] = []
    try:
        edge = _start("edge", "kvwire.edge_agent", ["--model", tiny_model_dir, "--grpc-port", "0", "--profile", "int8"])
        started.append(edge)
        edge.wait_listening()
        cloud = _start("cloud", "kvwire.cloud_agent", ["--model", tiny_model_dir, "--edge", edge.grpc_address])
        started.append(cloud)
        cloud.wait_listening()
        yield cloud
    finally:
        for d in started:
            d.terminate()
        for d in started:
            d.stop()


@pytest.fixture
def client(cloud):
    with openai.OpenAI(base_url=cloud.http_url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def ask(question: str = QUESTION) -> list[dict]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]


def test_models_lists_the_served_model(client, tiny_model_dir):
    models = client.models.list().data
    assert [m.id for m in models] == [tiny_model_dir]


def test_a_kv_chat_completion_carries_usage_and_kvwire_figures(client):
    done = client.chat.completions.create(model="any", messages=ask(), max_tokens=12, extra_body=KV)
    choice = done.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    figures = done.model_extra["kvwire"]
    assert figures["mode"] == "kv" and figures["bytes_on_wire"] > 0 and 0 < figures["wire_ratio"] < 1
    assert done.usage.prompt_tokens == figures["prompt_tokens"]
    assert done.usage.completion_tokens == figures["answer_tokens"] <= 12
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    text = client.chat.completions.create(
        model="any", messages=ask(), max_tokens=12, extra_body={"kvwire": {**KV["kvwire"], "mode": "text"}}
    )
    assert text.choices[0].message.content == choice.message.content  # greedy: kv answers as text does here


def test_a_streamed_chat_completion_adds_up_to_the_plain_one(client):
    plain = client.chat.completions.create(model="any", messages=ask(), max_tokens=24, extra_body=KV)
    sent = time.monotonic()
    chunks, arrivals = [], []
    stream = client.chat.completions.create(
        model="any",
        messages=ask(),
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=KV,
    )
    for chunk in stream:
        chunks.append(chunk)
        arrivals.append(time.monotonic())
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    (finish,) = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish.choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    figures = finish.model_extra["kvwire"]
    assert figures["bytes_on_wire"] == plain.model_extra["kvwire"]["bytes_on_wire"]
    first_text = next(i for i, c in enumerate(chunks) if c.choices and c.choices[0].delta.content)
    t = figures["timings_ms"]
    print(
        f"\n[openai kv stream] first chunk after {(arrivals[0] - sent) * 1000:.1f} ms, first text after "
        f"{(arrivals[first_text] - sent) * 1000:.1f} ms, last after {(arrivals[-1] - sent) * 1000:.1f} ms (client "
        f"clock); server: first token at {t['time_to_first_token']:.1f} ms, total {t['total']:.1f} ms"
    )


def test_a_plain_chat_without_kvwire_is_answered_in_text_mode(client):
    done = client.chat.completions.create(model="any", messages=ask("Say hello."), max_tokens=6)
    assert done.model_extra["kvwire"]["mode"] == "text"
    assert done.usage.completion_tokens <= 6


def test_a_seed_repeats_a_sampled_completion(client):
    runs = [
        client.chat.completions.create(
            model="any", messages=ask(), max_tokens=12, temperature=1.5, top_p=0.9, seed=11, extra_body=KV
        )
        for _ in range(2)
    ]
    assert runs[0].choices[0].message.content == runs[1].choices[0].message.content


def test_a_stop_string_ends_the_completion_before_it(client):
    plain = client.chat.completions.create(model="any", messages=ask(), max_tokens=24, extra_body=KV)
    words = plain.choices[0].message.content.split()
    if len(words) < 2:
        pytest.skip("the tiny model's answer has a single word: nothing to stop at")
    stop = words[1]
    cut = client.chat.completions.create(model="any", messages=ask(), max_tokens=24, stop=[stop], extra_body=KV)
    expected = plain.choices[0].message.content.split(stop)[0].rstrip()
    assert cut.choices[0].message.content == expected
    assert cut.choices[0].finish_reason == "stop"


def test_errors_come_in_openai_shape(client, cloud):
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.chat.completions.create(model="any", messages=ask(), max_tokens=4000)
    assert err.value.body["code"] == "invalid" and "max_new_tokens=4000" in err.value.body["message"]
    assert err.value.body["type"] == "invalid_request_error"
    if "doc_id" in AnswerRequest.model_fields:  # passed through to /answer: this edge keeps no documents
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model="any", messages=ask(), extra_body={"kvwire": {"doc_id": "absent"}})
        assert err.value.status_code in (404, 422) and "document" in err.value.body["message"]
        assert "not supported yet" not in err.value.body["message"]
    else:
        with pytest.raises(openai.UnprocessableEntityError) as err:
            client.chat.completions.create(model="any", messages=ask(), extra_body={"kvwire": {"doc_id": "d1"}})
        assert "doc_id is not supported yet" in err.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.chat.completions.create(
            model="any", messages=ask(), stream=True, extra_body={"kvwire": {"context": CONTEXT, "mode": "nope"}}
        )
    assert err.value.body["message"].startswith("kvwire.mode:")
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.chat.completions.create(model="any", messages=[{"role": "system", "content": "no question"}])
    assert "no user message" in err.value.body["message"]
    r = httpx.post(cloud.http_url + "/v1/chat/completions", content=b"{not json", timeout=30)
    assert r.status_code == 422 and set(r.json()["error"]) == {"message", "type", "param", "code"}
