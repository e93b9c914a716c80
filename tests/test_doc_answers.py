"""/answer with a doc_id: the document lives on the edge; kv and scout stream from its cached prefix,
text fetches the text (and counts its bytes as crossing the link); an unknown id is a 404."""

from __future__ import annotations

import asyncio

import pytest
from edges import running_edge
from pydantic import ValidationError

from kvwire.agent_common.errors import DocumentNotFoundError
from kvwire.agent_common.metrics import Metrics
from kvwire.cloud_agent.api import AnswerRequest
from kvwire.cloud_agent.errors import classify
from kvwire.cloud_agent.service import AnswerService
from kvwire.cloud_agent.settings import CloudSettings
from kvwire.edge_agent.documents import DocumentStore
from kvwire.edge_agent.settings import EdgeSettings

DOC = (
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in "
    "France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway who, under "
    "their leader Rollo, agreed to swear fealty to King Charles III of West Francia."
)
QUESTION = "Who was the leader of the Norse raiders?"


@pytest.fixture
def hosts(tiny_loaded, tiny_model_dir, tmp_path):
    """A real edge (with a document store) and a real cloud service talking over loopback gRPC."""
    # prefill_documents off: these tests are about the request path (test_prefix_disk.py covers put-time prefill)
    settings = EdgeSettings(profile="fp16", data_dir=str(tmp_path / "edge-data"), prefill_documents=False)
    store = DocumentStore(settings.data_dir, count_tokens=lambda text: len(tiny_loaded.tokenizer(text)["input_ids"]))
    with running_edge(tiny_loaded, settings, documents=store) as edge:
        service = AnswerService(tiny_loaded, CloudSettings(model=tiny_model_dir), edge.client, Metrics("cloud"))
        yield store, service, edge.metrics
        service.close()
    store.close()


def ask(service: AnswerService, **body):
    return asyncio.run(service.answer(AnswerRequest(question=QUESTION, max_new_tokens=6, **body), "t"))


def test_a_document_answers_as_its_text_in_every_mode(hosts):
    store, service, edge_metrics = hosts
    store.put("normans", DOC)
    for mode in ("kv", "scout"):
        by_doc, by_text = ask(service, doc_id="normans", mode=mode), ask(service, context=DOC, mode=mode)
        assert by_doc.answer == by_text.answer and by_doc.kept_positions == by_text.kept_positions
        assert by_doc.prompt_tokens == by_text.prompt_tokens
    text = ask(service, doc_id="normans", mode="text")
    assert text.answer == ask(service, context=DOC, mode="text").answer
    assert text.bytes_on_wire == len(DOC.encode()) + len(QUESTION.encode())  # the text crossed the link
    # one prefix for the document and the identical inline context: prefilled once
    assert edge_metrics.registry.get_sample_value("kvwire_prefix_cache_misses_total") == 1


def test_the_second_question_on_a_document_skips_the_edge_prefill(hosts):
    store, service, _ = hosts
    store.put("normans", DOC)
    first, second = ask(service, doc_id="normans"), ask(service, doc_id="normans")
    assert first.timings_ms.edge_prefill > first.timings_ms.edge_question_prefill > 0
    assert second.timings_ms.edge_prefill == second.timings_ms.edge_question_prefill > 0


def test_an_updated_document_is_answered_from_its_new_text(hosts):
    store, service, _ = hosts
    store.put("doc", DOC)
    ask(service, doc_id="doc")
    store.put("doc", DOC.replace("Rollo", "Hrolfr"))
    after = ask(service, doc_id="doc", mode="kv")
    assert after.timings_ms.edge_prefill > after.timings_ms.edge_question_prefill  # prefilled anew
    assert after.answer == ask(service, context=DOC.replace("Rollo", "Hrolfr"), mode="kv").answer


def test_an_unknown_document_is_a_404_naming_it(hosts):
    _, service, _ = hosts
    for mode in ("kv", "scout", "text"):
        with pytest.raises(DocumentNotFoundError, match="no document 'nope'") as info:
            ask(service, doc_id="nope", mode=mode)
        assert classify(info.value) == (404, "not_found")


def test_exactly_one_of_context_and_doc_id():
    with pytest.raises(ValidationError, match="exactly one of context and doc_id"):
        AnswerRequest(question="q", context="c", doc_id="d")
    with pytest.raises(ValidationError, match="exactly one of context and doc_id"):
        AnswerRequest(question="q")
