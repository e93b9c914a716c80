"""The vllm engine against a real vLLM (the .venv-vllm `make setup-vllm` builds; skipped with its reason when
that venv is unavailable): KV the cloud received, injected through the KVWire connector, must give vLLM's
own answer token for token. One vLLM engine (fp32, the edge's dtype) serves the whole module."""

from __future__ import annotations

import threading

import pytest
import torch

from kvwire.cloud_agent.vllm_engine.client import WorkerError, default_python, unavailable_reason
from kvwire.kvcodec.generate import Decoding
from kvwire.kvcodec.handoff import Handoff, write_handoff
from kvwire.kvcodec.pipeline import Cloud, Edge, EdgeRequest

REASON = unavailable_reason(default_python())
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"vLLM venv unavailable: {REASON}")

CONTEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after "
    "the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889 as the centerpiece "
    "of the 1889 World's Fair. Locally nicknamed La dame de fer, it was criticised by some of France's leading "
    "artists and intellectuals for its design, but it has become a global cultural icon of France. "
)
QUESTION = "Whose company designed and built the tower?"
OTHER = "Photosynthesis is the process by which green plants use sunlight to make food from carbon dioxide. " * 4
NEW = 24
EOS = [2]


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    from kvwire.cloud_agent.vllm_engine.client import VllmWorker
    from kvwire.kvcodec.models import embedded_model_dir

    log = tmp_path_factory.mktemp("vllm") / "worker.log"
    w = VllmWorker(str(embedded_model_dir()), dtype="fp32", max_model_len=2048, max_num_seqs=8, log_file=log)
    yield w
    w.close()


@pytest.fixture(scope="module")
def engine(worker, embedded_loaded):
    from kvwire.cloud_agent.engines.vllm import VllmEngine

    e = VllmEngine(Cloud(embedded_loaded), worker=worker)
    yield e
    e.close()


def _kv(loaded, ids):
    """HF's KV of ids: keys, values [layers, kv_heads, len, head_dim]."""
    with torch.no_grad():
        cache = loaded.model(input_ids=torch.tensor([ids]), use_cache=True).cache
    return torch.stack([layer.keys[0] for layer in cache.layers]), torch.stack(
        [layer.values[0] for layer in cache.layers]
    )


@pytest.mark.parametrize(
    ("profile", "template_kv", "question_kv"),
    [("fp32", "stream", "stream"), ("bf16", "stream", "stream"), ("fp32", "cloud", "cloud")],
)
def test_full_kv_through_the_connector_gives_vllms_own_answer(
    engine, worker, embedded_loaded, profile, template_kv, question_kv
):
    edge = Edge(embedded_loaded)
    req = EdgeRequest(CONTEXT, QUESTION, "kv", None, 1.0, profile, template_kv=template_kv, question_kv=question_kv)
    ids = list(edge.prompt(req).ids)
    own = worker.generate(ids, NEW, stop=EOS)
    assert own.cached == 0 and len(own.tokens) >= 8
    received = engine.cloud.receive(edge.stream(req))
    ans = engine.answer(received, NEW)
    assert ans.tokens == own.tokens
    # vLLM computed only what the stream left to the cloud: the last token, and the question when it is the cloud's
    computed = len(ids) - len(received.positions) - (len(engine.cloud.templates.ids) if template_kv == "cloud" else 0)
    assert engine.last_cached == (len(ids) - 1 if question_kv == "stream" else len(ids) - computed)
    assert ans.prompt_len == len(ids) and ans.kept_positions == len(ids) - 1 and ans.complete


def test_the_injected_kv_is_what_vllm_attends_to(worker, embedded_loaded, tmp_path):
    """KV of another text under the same ids changes the answer: the test above can fail."""
    edge = Edge(embedded_loaded)
    ids = list(edge.prompt(EdgeRequest(CONTEXT, QUESTION)).ids)
    other = list(edge.prompt(EdgeRequest(OTHER, QUESTION)).ids)[: len(ids) - 1]
    k, v = _kv(embedded_loaded, other)
    write_handoff(tmp_path / "other.safetensors", Handoff(ids[: len(other)], k, v))
    own = worker.generate(ids, NEW, stop=EOS)
    wrong = worker.generate(ids, NEW, kv_path=str(tmp_path / "other.safetensors"), stop=EOS)
    assert wrong.cached == len(other) and wrong.tokens != own.tokens


def test_a_prompt_shorter_than_a_block_and_a_foreign_prefix(worker, embedded_loaded, tmp_path):
    """19 of a 20-token prompt go into a partial block (a sub-block match is not a false hit); a missing file
    fails its request alone; a handoff whose ids part from the prompt's is used only up to where they agree."""
    ids = embedded_loaded.tokenizer(CONTEXT)["input_ids"][:20]
    assert len(ids) == 20
    k, v = _kv(embedded_loaded, ids[:-1])
    write_handoff(tmp_path / "short.safetensors", Handoff(ids[:-1], k, v))
    own = worker.generate(ids, 12, stop=EOS)
    short = worker.generate(ids, 12, kv_path=str(tmp_path / "short.safetensors"), stop=EOS)
    assert short.cached == 19 and short.tokens == own.tokens
    with pytest.raises(WorkerError, match="refused the request: .*No such file"):
        worker.generate(ids, 4, kv_path=str(tmp_path / "missing.safetensors"))
    forked = [*ids[:7], (ids[7] + 1) % 1000, *ids[8:-1]]
    write_handoff(tmp_path / "forked.safetensors", Handoff(forked, k, v))
    assert worker.generate(ids, 4, kv_path=str(tmp_path / "forked.safetensors"), stop=EOS).cached == 7


def test_pruned_kv_is_rerotated_to_contiguous_positions(engine, embedded_loaded):
    edge = Edge(embedded_loaded)
    req = EdgeRequest(CONTEXT, QUESTION, "kv", "q2c", 0.5, "fp32")
    received = engine.cloud.receive(edge.stream(req))
    ans = engine.answer(received, NEW)
    held = len(received.positions)
    assert held < ans.prompt_len - 1
    assert engine.last_cached == held  # vLLM's prompt: the held positions, then the last token
    assert 0 < ans.context_kept < ans.context_tokens and ans.tokens


def test_scout_on_vllm_prefills_the_kept_tokens_as_its_prompt(engine, worker, embedded_loaded):
    edge = Edge(embedded_loaded)
    received = engine.cloud.receive(edge.stream(EdgeRequest(CONTEXT, QUESTION, "scout", "q2c", 0.5)))
    h = received.header
    kept = sorted(received.positions.tolist())
    tail = [p for p in range(h.tail_start, h.n_prompt) if p not in kept]
    ans = engine.answer(received, NEW)
    assert engine.last_cached == 0
    assert ans.tokens == worker.generate(h.ids_at(kept + tail), NEW, stop=EOS).tokens
    with pytest.raises(Exception, match="scout_prefill full is the hf engine's"):
        engine.answer(received, NEW, options={"scout_prefill": "full"})


def test_a_per_head_stream_is_refused_by_the_vllm_engine_and_service(engine, embedded_loaded):
    from kvwire.agent_common.metrics import Metrics
    from kvwire.cloud_agent.api import AnswerRequest
    from kvwire.cloud_agent.service import AnswerService
    from kvwire.cloud_agent.settings import CloudSettings

    edge = Edge(embedded_loaded)
    received = engine.cloud.receive(edge.stream(EdgeRequest(CONTEXT, QUESTION, "kv", "kvzip", 0.5, heads="global")))
    assert received.header.per_head
    with pytest.raises(Exception, match="per-head stream needs the hf engine"):
        engine.answer(received, NEW)
    service = AnswerService(embedded_loaded, CloudSettings(), None, Metrics("cloud"), engine=engine)
    req = AnswerRequest(question=QUESTION, context=CONTEXT, mode="kv", selector="kvzip", retention=0.5, heads="global")
    with pytest.raises(Exception, match="needs --engine hf; this cloud runs vllm"):
        service.shape(req)


def test_tokens_stream_as_they_come_and_a_callback_can_stop(engine):
    seen = []
    ans = engine.answer_text(CONTEXT, QUESTION, NEW, decoding=Decoding(on_token=seen.append))
    assert seen == ans.tokens and ans.mode == "text"
    stopped = []
    cut = engine.answer_text(
        CONTEXT, QUESTION, NEW, decoding=Decoding(on_token=lambda t: stopped.append(t) or len(stopped) < 3)
    )
    assert cut.generation.finish_reason == "cancelled" and stopped == ans.tokens[:3]


def test_concurrent_kv_requests_share_the_engine(engine, embedded_loaded):
    edge = Edge(embedded_loaded)
    streams = [
        list(edge.stream(EdgeRequest(CONTEXT, q, "kv", None, 1.0, "fp32")))
        for q in (QUESTION, "When was the tower built?", "Where is the tower?", "Who criticised it?")
    ]
    results: dict[int, object] = {}

    def ask(i):
        results[i] = engine.answer(engine.cloud.receive(streams[i]), 8)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(streams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert sorted(results) == [0, 1, 2, 3]
    assert all(r.tokens and r.complete for r in results.values())


def test_eval_with_the_vllm_engine_records_the_full_answer_for_full_kv(engine, embedded_loaded, tmp_path):
    """`kvwire eval --engine vllm`: the evaluator answers through the engine; full KV gives the full answer."""
    from kvwire.bench.data import Example
    from kvwire.bench.evaluator import NONE, Evaluator, RecordStore, make_setting

    store = RecordStore(tmp_path / "records.jsonl")
    ev = Evaluator(embedded_loaded, 12, store, engine=engine)
    example = Example("q1", CONTEXT, QUESTION, ("Gustave Eiffel",))
    setting = make_setting(NONE, 1.0, "fp32")
    ev.run_example(example, [setting])
    rec = store.get("q1", setting)
    assert rec["identical"] and rec["tokens"]
    assert "tf_top1" not in rec  # teacher-forced scores are the hf cache's: not recorded for vllm
    store.close()


def test_a_dead_worker_is_named_and_fails_requests_at_once(engine, worker):
    """Last in the module: it stops the shared worker."""
    assert engine.problem() is None
    worker.close()
    assert "the vLLM worker exited with 0" in engine.problem()
    with pytest.raises(WorkerError):
        engine.answer_text(CONTEXT, QUESTION, 4)
