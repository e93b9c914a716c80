"""The mode registry and the one StreamReceiver every receiver uses."""

from __future__ import annotations

import pytest
import torch

from kvwire.cloud_agent.api import AnswerRequest
from kvwire.kvcodec.errors import ConfigError, FrameError
from kvwire.kvcodec.modes import Mode, get_mode, mode_names, register_mode, streamed_mode_names
from kvwire.kvcodec.pipeline import Cloud, Edge, EdgeRequest
from kvwire.kvcodec.receiver import NothingToAnswerError

CONTEXT = "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy. " * 3
QUESTION = "Who gave their name to Normandy?"


def test_registry_refuses_duplicates_and_names_the_known_modes():
    with pytest.raises(ValueError, match="already registered"):
        register_mode(type(get_mode("kv"))())
    with pytest.raises(ValueError, match="has no name"):
        register_mode(Mode())
    with pytest.raises(ConfigError, match="unknown mode 'auto'; known: " + ", ".join(mode_names())):
        get_mode("auto")


def test_the_api_allows_exactly_the_registered_modes():
    assert AnswerRequest.model_json_schema()["properties"]["mode"]["enum"] == [*mode_names(), "auto"]  # docs/auto.md
    for name in mode_names():
        assert AnswerRequest(question="q", context="c", mode=name).mode == name


@pytest.mark.parametrize("name", streamed_mode_names())
def test_streamed_modes_answer_from_what_the_receiver_returns(tiny_loaded, name):
    edge, cloud = Edge(tiny_loaded), Cloud(tiny_loaded)
    frames = list(edge.stream(EdgeRequest(CONTEXT, QUESTION, name, "q2c", 0.5, "fp32")))
    ans = cloud.answer(cloud.receive(frames), 4)
    assert ans.mode == name and ans.complete and ans.bytes_on_wire == sum(len(f) for f in frames)
    assert ans.kept_positions < ans.prompt_len - 1  # half the context dropped


def test_text_mode_counts_the_utf8_bytes_that_cross_the_link(tiny_loaded):
    ans = Cloud(tiny_loaded).answer_text(CONTEXT + " é", QUESTION, 2)
    assert ans.mode == "text" and ans.bytes_on_wire == len((CONTEXT + " é").encode()) + len(QUESTION.encode())
    with pytest.raises(ConfigError, match="not streamed"):
        get_mode("text").answer(Cloud(tiny_loaded), None, 2)


def test_a_cut_stream_answers_from_the_frames_before_the_cut(tiny_loaded):
    edge, cloud = Edge(tiny_loaded), Cloud(tiny_loaded)
    frames = list(edge.stream(EdgeRequest(CONTEXT, QUESTION, "kv", "q2c", 1.0, "int8", chunk_bytes=600)))
    complete = cloud.receive(frames)

    def cut_after(n: int):
        return cloud.receiver().feed_all(frames, stop=lambda fed, _bytes: fed >= n)

    no_trailer = cut_after(len(frames) - 1).result()  # every chunk arrived, the trailer did not
    assert not no_trailer.complete and torch.equal(no_trailer.positions, complete.positions)
    half = cut_after(len(frames) // 2)
    partial = half.result()
    assert half.was_cut and not partial.complete and 0 < len(partial.positions) < len(complete.positions)
    assert set(partial.positions.tolist()) <= set(complete.positions.tolist()) and partial.missing_fixed == 0
    with pytest.raises(NothingToAnswerError, match="template/question positions arrived"):
        cut_after(1).result()  # the header alone
    with pytest.raises(NothingToAnswerError, match="before the edge sent its header"):
        cut_after(0).result()


def test_the_receiver_refuses_another_mode_and_reports_every_frame(tiny_loaded):
    edge, cloud = Edge(tiny_loaded), Cloud(tiny_loaded)
    frames = list(edge.stream(EdgeRequest(CONTEXT, QUESTION, "scout", "q2c", 0.5)))
    seen, rejected = [], []
    receiver = cloud.receiver("kv", on_frame=lambda kind, n: seen.append((kind, n)), on_reject=rejected.append)
    with pytest.raises(FrameError, match="asked for a kv stream, got a scout stream"):
        receiver.feed(frames[0])
    assert seen == [("rejected", len(frames[0]))] and rejected == ["wrong_mode"]
    seen.clear()
    receiver = cloud.receiver("scout", on_frame=lambda kind, n: seen.append((kind, n)))
    receiver.feed_all(frames).result()
    assert seen == [("header", len(frames[0])), ("trailer", len(frames[1]))]


def test_sparse_scout_prefills_only_the_kept_tokens_and_equals_full_when_all_are_kept(tiny_loaded):
    edge, cloud = Edge(tiny_loaded), Cloud(tiny_loaded)
    everything = cloud.receive(edge.stream(EdgeRequest(CONTEXT, QUESTION, "scout", "q2c", 1.0)))
    sparse, full = (cloud.answer(everything, 6, None, {"scout_prefill": how}) for how in ("sparse", "full"))
    assert sparse.tokens == full.tokens  # all positions kept: the same prefill, run the same way
    assert torch.allclose(sparse.generation.first_logits, full.generation.first_logits, atol=1e-5)
    half = {
        how: cloud.receive(edge.stream(EdgeRequest(CONTEXT, QUESTION, "scout", "q2c", 0.5, scout_prefill=how)))
        for how in ("sparse", "full")
    }
    assert half["sparse"].wire_bytes < half["full"].wire_bytes  # a sparse header carries the kept ids only
    with pytest.raises(ConfigError, match="scout_prefill full needs every prompt id"):
        cloud.answer(half["sparse"], 2, None, {"scout_prefill": "full"})
    sparse, full = (cloud.answer(half[how], 6, None, {"scout_prefill": how}) for how in ("sparse", "full"))
    assert sparse.kept_positions == full.kept_positions < everything.positions.numel()
    # the kept tokens no longer see the dropped ones: other logits, the same positions
    assert not torch.allclose(sparse.generation.first_logits, full.generation.first_logits, atol=1e-5)
    with pytest.raises(ConfigError, match="scout_prefill 'half'"):
        cloud.answer(half["full"], 2, None, {"scout_prefill": "half"})
