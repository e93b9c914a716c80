"""Prefill once: a question on a cached [template prefix][context] prefills only the question and
suffix, and gets the KV, the captured attention and the answer of a full prefill."""

from __future__ import annotations

import pytest
import torch

from kvwire.kvcodec.pipeline import Cloud, Edge, EdgeRequest, Timings
from kvwire.kvcodec.prefix_cache import PrefixCache, PrefixEntry, prefix_key
from kvwire.kvcodec.selectors import get_selector, selector_names

CONTEXT = (
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region "
    "in France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway who, "
    "under their leader Rollo, agreed to swear fealty to King Charles III of West Francia."
)
QUESTIONS = ("Who was the leader of the Norse raiders?", "Which king did they swear fealty to?")


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return a.shape == b.shape and bool((a.float() - b.float()).abs().max() <= tol)


@pytest.mark.parametrize("name", selector_names())
def test_a_cached_prefix_gives_the_kv_and_attention_of_a_full_prefill(tiny_loaded, name):
    full, cached = Edge(tiny_loaded), Edge(tiny_loaded, PrefixCache(1 << 30))
    selector = get_selector(name)
    for question in QUESTIONS:  # the first question fills the cache, the second one hits it
        req = EdgeRequest(CONTEXT, question, "kv", name, 1.0, "fp32")
        prompt = full.prompt(req)
        want, timings = full.prefill(prompt, selector), Timings()
        got = cached.prefill(prompt, selector, timings)
        for a, b in zip(want.keys + want.values, got.keys + got.values, strict=True):
            assert _close(a, b, 1e-5)
        assert (want.attention is None) == (got.attention is None)
        if want.attention is not None:
            assert _close(want.attention, got.attention, 1e-5) and torch.equal(want.rows, got.rows)
        assert "question_prefill" in timings.values
    assert len(cached.prefix_cache) == 1  # both questions share one prefix


def test_the_second_question_prefills_only_its_own_tokens_and_answers_as_a_full_prefill(tiny_loaded):
    events = []
    edge = Edge(tiny_loaded, PrefixCache(1 << 30, on_event=events.append))
    cloud, plain = Cloud(tiny_loaded), Edge(tiny_loaded)
    for i, question in enumerate(QUESTIONS * 2):
        req = EdgeRequest(CONTEXT, question, "kv", "q2c", 1.0, "fp32")
        timings = Timings()
        got = cloud.answer(cloud.receive(edge.stream(req, timings)), 8)
        want = cloud.answer(cloud.receive(plain.stream(req)), 8)
        assert got.tokens == want.tokens
        assert _close(got.generation.first_logits, want.generation.first_logits, 1e-5)
        assert ("prefill" in timings.values) == (i == 0)  # only the first request prefilled the document
    assert events == ["miss", "hit", "hit", "hit"]


def test_rows_inside_the_prefix_are_scored_once_per_document(tiny_loaded):
    """h2o reads the attention of every row, the context's own included: those rows cannot see the
    question, so their part is computed with the prefix once and reused by every question."""
    edge = Edge(tiny_loaded, PrefixCache(1 << 30))
    selector = get_selector("h2o")
    for question in QUESTIONS:
        timings = Timings()
        edge.prefill(edge.prompt(EdgeRequest(CONTEXT, question, "kv", "h2o")), selector, timings)
        first = question == QUESTIONS[0]
        assert ("prefill" in timings.values) == first  # the prefix and its rows' attention, once
    (entry,) = edge.prefix_cache._entries.values()
    assert len(entry.row_attention) == 1


def test_the_cache_is_bounded_in_bytes_and_drops_a_document_on_change():
    events = []
    cache = PrefixCache(3000, on_event=events.append)

    def entry(doc: str) -> PrefixEntry:
        t = torch.zeros(1, 250, 1)  # 1000 bytes of keys + 1000 of values
        return PrefixEntry((1, 2), [t], [t.clone()], 0.1, doc)

    cache.put("a", entry("doc-a"))
    assert cache.get("a") is not None and cache.bytes == 2000
    cache.put("b", entry("doc-b"))  # over 3000: the least recently used entry goes
    assert cache.get("a") is None and cache.get("b") is not None and cache.bytes == 2000
    assert events == ["hit", "eviction", "miss", "hit"]
    held = cache.get("b")
    assert cache.drop_document("doc-b") == 1 and len(cache) == 0 and cache.bytes == 0
    assert held.keys[0].numel() == 250  # a stream holding the entry keeps its tensors
    cache.put("big", PrefixEntry((1,), [torch.zeros(1000)], [torch.zeros(1000)], 0.1))
    assert len(cache) == 0  # larger than the whole budget: not kept


def test_the_key_is_the_model_and_the_prefix_ids():
    assert prefix_key("m1", (1, 2, 3)) == prefix_key("m1", [1, 2, 3])
    assert prefix_key("m1", (1, 2, 3)) != prefix_key("m2", (1, 2, 3)) != prefix_key("m1", (1, 2, 4))


def test_the_embedded_model_gets_the_same_kv_and_logits_from_a_cached_prefix(embedded_loaded):
    """fp32 sums in another order when the prompt runs in two passes: measured here, KV within 1.5e-5
    and logits (up to ~20 in size) within 2.6e-5, i.e. 1.3e-6 of their scale; probabilities within 1.1e-6."""
    full, cached = Edge(embedded_loaded), Edge(embedded_loaded, PrefixCache(1 << 30))
    cloud = Cloud(embedded_loaded)
    for question in QUESTIONS:
        req = EdgeRequest(CONTEXT, question, "kv", "q2c", 1.0, "fp32")
        want = cloud.answer(cloud.receive(full.stream(req)), 6)
        got = cloud.answer(cloud.receive(cached.stream(req)), 6)
        assert got.tokens == want.tokens
        w, g = want.generation.first_logits, got.generation.first_logits
        assert float((w - g).abs().max()) <= 1e-5 * float(w.abs().max())
        assert _close(w.softmax(-1), g.softmax(-1), 1e-5)


def test_the_edge_daemon_prefills_a_repeated_context_once_and_counts_it(tiny_loaded):
    from edges import running_edge

    from kvwire.agent_common.edge_messages import PrefillRequest
    from kvwire.edge_agent.settings import EdgeSettings

    with running_edge(tiny_loaded, EdgeSettings(profile="int8")) as edge:
        client, metrics = edge.client, edge.metrics
        stages = []
        for question in QUESTIONS:
            req = PrefillRequest(request_id="r", mode="kv", context=CONTEXT, question=question, retention=0.5)
            stages.append(set(list(client.prefill(req, timeout_s=60))[-1].timings_ms))
        assert "prefill" in stages[0] and "prefill" not in stages[1] and "question_prefill" in stages[1]

        def sample(name, **labels):
            return metrics.registry.get_sample_value(name, labels)

        assert sample("kvwire_prefix_cache_hits_total") == sample("kvwire_prefix_cache_misses_total") == 1
        assert sample("kvwire_prefix_cache_bytes", tier="memory") > 0
