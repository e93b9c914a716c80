"""The codec carries a cache across the wire so the receiver answers exactly as the sender would."""

import json
from importlib import resources

import pytest
import torch

from kvwire.kvcodec.cache import build_cache
from kvwire.kvcodec.pipeline import Cloud, Edge, EdgeRequest
from kvwire.kvcodec.prefill import prefill
from kvwire.kvcodec.profiles import PrecisionProfile
from kvwire.kvcodec.prompt import build_prompt
from kvwire.kvcodec.stream import StreamDecoder

CONTEXT = (
    "The Normans gave their name to Normandy, a region in France. They were descended from Norse raiders "
    "from Denmark, Iceland and Norway. Their leader was Rollo. The Eiffel Tower is in Paris."
)
QUESTION = "Who was the leader of the Norse raiders?"
FP32 = PrecisionProfile.from_dict({"name": "fp32", "default": {"k": {"kind": "fp32"}, "v": {"kind": "fp32"}}})


def roundtrip_tokens(loaded, profile, retention=1.0, selector="q2c", max_new=12, context=CONTEXT, question=QUESTION):
    edge, cloud = Edge(loaded), Cloud(loaded)
    full = cloud.answer_text(context, question, max_new)
    frames = list(edge.stream(EdgeRequest(context, question, "kv", selector, retention, profile)))
    answer = cloud.answer(cloud.receive(frames), max_new)
    return full, answer, frames


@pytest.mark.parametrize("profile", ["fp16", FP32])
def test_fp16_full_retention_reproduces_greedy_tokens_tiny(tiny_loaded, profile):
    full, answer, _ = roundtrip_tokens(tiny_loaded, profile)
    assert len(full.tokens) == 12
    assert answer.tokens == full.tokens
    assert answer.kept_positions == full.prompt_len - 1


def test_fp16_full_retention_reproduces_greedy_tokens_embedded(embedded_loaded):
    demo = json.loads(resources.files("kvwire.kvcodec").joinpath("data/demo.json").read_text())
    full, answer, frames = roundtrip_tokens(
        embedded_loaded, "fp16", max_new=12, context=demo["context"], question=demo["questions"][0]
    )
    assert answer.tokens == full.tokens
    assert "Rollo" in full.text
    assert answer.bytes_on_wire == sum(len(f) for f in frames)


def test_pruned_cache_logits_match_masked_full_cache(tiny_loaded):
    """Absolute position ids: a pruned cache gives the logits of a full cache whose mask hides the
    dropped positions, for several decode steps."""
    model, tok = tiny_loaded.model, tiny_loaded.tokenizer
    edge, cloud = Edge(tiny_loaded), Cloud(tiny_loaded)
    frames = list(edge.stream(EdgeRequest(CONTEXT, QUESTION, "kv", "q2c", 0.4, FP32)))
    decoded = cloud.receive(frames)
    prompt = build_prompt(tok, CONTEXT, QUESTION)
    kept = decoded.positions
    assert len(kept) < prompt.stream_len  # something was dropped
    pruned, next_pos = build_cache(decoded)
    assert next_pos == len(prompt) - 1
    full = prefill(model, prompt).cache
    mask = torch.zeros(1, prompt.stream_len, dtype=torch.long)
    mask[0, kept] = 1
    tokens = [prompt.ids[-1], 5, 17]
    with torch.inference_mode():
        for step, token in enumerate(tokens):
            pos = torch.tensor([[next_pos + step]])
            ids = torch.tensor([[token]])
            mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], dim=1)
            ref = model(input_ids=ids, position_ids=pos, attention_mask=mask, cache=full).logits[0, -1]
            got = model(input_ids=ids, position_ids=pos, cache=pruned).logits[0, -1]
            assert (ref - got).abs().max() <= 1e-4, f"step {step}"
    # and the wrong position ids (cache length) really do give other logits: the test can fail
    wrong_cache, _ = build_cache(decoded)
    with torch.inference_mode():
        wrong = model(
            input_ids=torch.tensor([[prompt.ids[-1]]]), position_ids=torch.tensor([[len(kept)]]), cache=wrong_cache
        ).logits[0, -1]
        right = model(
            input_ids=torch.tensor([[prompt.ids[-1]]]),
            position_ids=torch.tensor([[next_pos]]),
            cache=build_cache(decoded)[0],
        ).logits[0, -1]
    assert (wrong - right).abs().max() > 1e-3


def test_scout_keeps_the_scouts_positions(tiny_loaded):
    edge, cloud = Edge(tiny_loaded), Cloud(tiny_loaded)
    frames = list(edge.stream(EdgeRequest(CONTEXT, QUESTION, "scout", "q2c", 0.5)))
    assert len(frames) == 2  # header + trailer: no KV travels
    decoded = cloud.receive(frames)
    answer = cloud.answer(decoded, 6)
    assert answer.kept_positions == len(decoded.header.kept) < decoded.header.prompt_len - 1
    assert answer.bytes_on_wire < 2000


def test_chunks_are_importance_ordered_and_bounded(tiny_loaded):
    edge = Edge(tiny_loaded)
    frames = list(edge.stream(EdgeRequest(CONTEXT, QUESTION, "kv", "q2c", 0.5, "int8", chunk_bytes=2000)))
    assert len(frames) > 4
    dec = StreamDecoder()
    dec.feed(frames[0])
    dec.feed(frames[1])
    first = dec.partial()
    h = first.header
    fixed = [p for p in h.kept if not h.context_span[0] <= p < h.context_span[1]]
    # the first chunk carries template and question positions before any context position
    assert set(first.positions.tolist()) <= set(fixed) or set(fixed) <= set(first.positions.tolist())
    assert not first.complete
    for f in frames[2:]:
        dec.feed(f)
    assert dec.result().complete and len(dec.result().positions) == len(h.kept)


def test_decode_into_model_dtype(tiny_loaded):
    frames = list(Edge(tiny_loaded).stream(EdgeRequest(CONTEXT, QUESTION, "kv", "q2c", 1.0, "mixed-int4")))
    dec = StreamDecoder(dtype=torch.bfloat16)
    for f in frames:
        dec.feed(f)
    out = dec.result()
    assert out.keys[0].dtype == torch.bfloat16 and out.keys[0].shape[2] == len(out.header.kept)
