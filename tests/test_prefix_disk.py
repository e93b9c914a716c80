"""The prefix cache's disk tier (kvcodec/prefix_disk.py), documents prefilled when put (edge_agent/prefiller.py),
and a document changed or deleted while a stream on it runs.

Every wait here is on an event or hook the code exposes (the disk writer's wait_written, the prefiller's
wait_settled, forward hooks that hold a pass at a layer); nothing depends on how long anything takes.
"""

from __future__ import annotations

import errno
import threading

import pytest
import torch
from edges import running_edge

from kvwire.agent_common.edge_messages import PrefillRequest
from kvwire.agent_common.errors import DocumentNotFoundError
from kvwire.edge_agent.documents import DocumentStore
from kvwire.edge_agent.settings import EdgeSettings
from kvwire.kvcodec import prefix_disk
from kvwire.kvcodec.fingerprint import model_fingerprint
from kvwire.kvcodec.pipeline import Cloud, Edge, EdgeRequest, Timings
from kvwire.kvcodec.prefix_cache import PrefixCache, PrefixEntry, prefix_key
from kvwire.kvcodec.prefix_disk import SUFFIX, DiskTier, decode_entry, encode_entry
from kvwire.kvcodec.selectors import get_selector

DOC = (
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in "
    "France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway who, under "
    "their leader Rollo, agreed to swear fealty to King Charles III of West Francia."
)
OTHER = "The Eiffel Tower is in Paris. It was built in 1889. The river Seine flows through the city."
QUESTION = "Who was the leader of the Norse raiders?"
GIB = 1 << 30


def _tier(folder, loaded, max_bytes=GIB, errors=None) -> DiskTier:
    return DiskTier(folder, max_bytes, model_fingerprint(loaded.model), loaded.dtype, on_error=errors.append)


def _cached_edge(loaded, folder, errors, max_bytes=GIB, events=None) -> Edge:
    disk = _tier(folder, loaded, max_bytes, errors)
    return Edge(loaded, PrefixCache(GIB, on_event=None if events is None else events.append, disk=disk))


def _stored(edge: Edge, context: str = DOC, doc_id=None, doc_version=None) -> tuple[str, PrefixEntry]:
    """Prefill `context` through `edge`'s cache and wait for the disk writer; (key, the entry in memory)."""
    edge.warm_prefix(context, doc_id, doc_version)
    assert edge.prefix_cache.disk.wait_written(60)
    prompt = edge.prompt(EdgeRequest(context, QUESTION))
    key = prefix_key(edge.model_fp, prompt.ids[: prompt.context_end])
    return key, edge.prefix_cache.peek(key)


def _ids(edge: Edge, context: str = DOC):
    prompt = edge.prompt(EdgeRequest(context, QUESTION))
    return prompt.ids[: prompt.context_end]


# --- the file format -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_an_entry_reads_back_bit_identical_at_its_own_dtype(dtype, tmp_path, monkeypatch):
    monkeypatch.setattr(prefix_disk, "FRAME_PAYLOAD", 256)  # several chunk frames per tensor
    torch.manual_seed(0)
    keys = [torch.randn(2, 37, 16).to(dtype) for _ in range(3)]
    values = [torch.randn(2, 37, 16).to(dtype) for _ in range(3)]
    keys[0][0, 0, 0] = float("nan")  # any bit pattern survives, NaN included
    ids = tuple(range(37))
    key = prefix_key("model-fp", ids)
    entry = PrefixEntry(ids, keys, values, 0.25, "doc", 7)
    frames = list(encode_entry(key, "model-fp", entry))
    assert len(frames) > 2 + 2 * 3  # header, more than one chunk per tensor, trailer
    path = tmp_path / "entry"
    path.write_bytes(b"".join(frames))
    with open(path, "rb") as f:
        back = decode_entry(f, key, "model-fp", ids, dtype)
    for a, b in zip(keys + values, back.keys + back.values, strict=True):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert (back.ids, back.doc_id, back.doc_version, back.prefill_s) == (ids, "doc", 7, 0.25)


def test_kv_served_from_disk_is_bit_identical_and_a_question_on_it_answers_as_a_full_prefill(tiny_loaded, tmp_path):
    errors = []
    key, stored = _stored(_cached_edge(tiny_loaded, tmp_path, errors))
    events = []
    restarted = _cached_edge(tiny_loaded, tmp_path, errors, events=events)  # a new process on the same folder
    loaded = restarted.prefix_cache.get(key, _ids(restarted))
    assert loaded is not None and events == ["hit", "disk_hit"]
    for a, b in zip(stored.keys + stored.values, loaded.keys + loaded.values, strict=True):
        assert torch.equal(a, b)
    assert len(restarted.prefix_cache) == 1  # promoted to memory
    cloud, plain = Cloud(tiny_loaded), Edge(tiny_loaded)
    req = EdgeRequest(DOC, QUESTION, "kv", "q2c", 1.0, "fp32")
    timings = Timings()
    got = cloud.answer(cloud.receive(restarted.stream(req, timings)), 8)
    want = cloud.answer(cloud.receive(plain.stream(req)), 8)
    assert got.tokens == want.tokens and "prefill" not in timings.values
    assert float((got.generation.first_logits - want.generation.first_logits).abs().max()) <= 1e-5
    assert errors == []


def test_h2o_rows_inside_the_prefix_are_recomputed_after_a_disk_hit_exactly(tiny_loaded, tmp_path):
    """The attention of rows inside the prefix is not kept on disk: after a disk hit it is computed again
    with the prefix, the same computation as on a miss, so the result is the memory tier's bit for bit."""
    errors = []
    selector = get_selector("h2o")
    first = _cached_edge(tiny_loaded, tmp_path, errors)
    prompt = first.prompt(EdgeRequest(DOC, QUESTION, "kv", "h2o"))
    want = first.prefill(prompt, selector)
    assert first.prefix_cache.disk.wait_written(60)
    restarted = _cached_edge(tiny_loaded, tmp_path, errors)
    timings = Timings()
    got = restarted.prefill(prompt, selector, timings)
    assert torch.equal(want.attention, got.attention) and torch.equal(want.rows, got.rows)
    assert "prefill" in timings.values  # the rows' attention, once; the KV came from disk
    full = Edge(tiny_loaded).prefill(prompt, selector)
    assert float((full.attention - got.attention).abs().max()) <= 1e-5


# --- faults ----------------------------------------------------------------------------------------


def _damage_and_ask(tiny_loaded, tmp_path, damage):
    """Store an entry, damage its file with `damage(path)` after a restarted tier indexed it, and ask again:
    (errors, the entry served, whether it was recomputed, files left)."""
    errors = []
    key, stored = _stored(_cached_edge(tiny_loaded, tmp_path, errors))
    restarted = _cached_edge(tiny_loaded, tmp_path, errors)
    path = tmp_path / f"{key}{SUFFIX}"
    damage(path)
    timings = Timings()
    entry = restarted.prefix_entry(restarted.prompt(EdgeRequest(DOC, QUESTION)), timings)
    for a, b in zip(stored.keys + stored.values, entry.keys + entry.values, strict=True):
        assert torch.allclose(a, b, atol=1e-6)  # recomputed from the model, never the damaged bytes
    return errors, "prefill" in timings.values, restarted


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (_flip_a_byte, "corrupt"),
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "truncated"),
        (lambda p: p.write_bytes(p.read_bytes()[:-40]), "truncated"),  # cut inside the trailer
        (lambda p: p.unlink(), "missing"),
    ],
    ids=["corrupt", "truncated", "trailer-cut", "removed"],
)
def test_a_damaged_disk_entry_is_dropped_counted_and_recomputed(tiny_loaded, tmp_path, damage, reason):
    errors, recomputed, edge = _damage_and_ask(tiny_loaded, tmp_path, damage)
    assert errors == [reason] and recomputed
    assert edge.prefix_cache.disk.wait_written(60)
    (path,) = tmp_path.glob(f"*{SUFFIX}")  # written anew from the recomputed entry
    assert len(edge.prefix_cache.disk) == 1 and edge.prefix_cache.disk.bytes == path.stat().st_size


def test_a_file_damaged_before_start_is_dropped_when_the_tier_opens(tiny_loaded, tmp_path):
    errors = []
    key, _ = _stored(_cached_edge(tiny_loaded, tmp_path, errors))
    (tmp_path / f"{key}{SUFFIX}").write_bytes(b"KVWF not a frame")
    (tmp_path / f".{key}.tmp123").write_bytes(b"a write a crash cut short")
    tier = _tier(tmp_path, tiny_loaded, errors=errors)
    assert errors == ["truncated"] and len(tier) == 0 and list(tmp_path.iterdir()) == []


def test_disk_full_while_writing_serves_from_memory_logs_and_counts(tiny_loaded, tmp_path, monkeypatch, caplog):
    calls = []

    def full_disk(f, data):
        calls.append(len(data))
        if len(calls) > 1:  # the header went, the first chunk does not fit
            raise OSError(errno.ENOSPC, "No space left on device")
        f.write(data)

    monkeypatch.setattr(DiskTier, "_write_bytes", staticmethod(full_disk))
    errors, events = [], []
    edge = _cached_edge(tiny_loaded, tmp_path, errors, events=events)
    with caplog.at_level("WARNING", logger="kvwire.kvcodec"):
        key, entry = _stored(edge)
    assert errors == ["disk_full"] and entry is not None
    assert list(tmp_path.iterdir()) == [] and edge.prefix_cache.disk.bytes == 0  # no file, no tmp file left
    assert any(r.message == "prefix_disk_write_failed" and r.reason == "disk_full" for r in caplog.records)
    timings = Timings()
    edge.prefill(edge.prompt(EdgeRequest(DOC, QUESTION)), None, timings)
    assert "prefill" not in timings.values and events[-1] == "hit"  # served from memory


def test_the_disk_tier_is_an_lru_bounded_in_bytes(tiny_loaded, tmp_path):
    errors = []
    edge = _cached_edge(tiny_loaded, tmp_path, errors)
    key_a, _ = _stored(edge, DOC)
    size = (tmp_path / f"{key_a}{SUFFIX}").stat().st_size
    errors_b = []
    bounded = _cached_edge(tiny_loaded, tmp_path, errors_b, max_bytes=size + size // 2)  # one entry fits
    assert len(bounded.prefix_cache.disk) == 1
    key_b, _ = _stored(bounded, DOC + " Again.")
    assert [p.name for p in tmp_path.glob(f"*{SUFFIX}")] == [f"{key_b}{SUFFIX}"]  # the older file went
    assert bounded.prefix_cache.disk.bytes == (tmp_path / f"{key_b}{SUFFIX}").stat().st_size <= size * 1.5
    assert errors + errors_b == []


def test_an_update_or_delete_removes_the_documents_disk_entries(tiny_loaded, tmp_path):
    errors = []
    edge = _cached_edge(tiny_loaded, tmp_path / "cache", errors)
    cache = edge.prefix_cache
    _stored(edge, DOC, "normans", 1)
    _stored(edge, OTHER, "paris", 2)
    assert cache.holds_document("normans") and len(cache.disk) == 2
    cache.document_changed("normans", 3)  # a put of a new text
    assert not cache.holds_document("normans") and len(cache.disk) == 1 and cache.holds_document("paris")
    assert cache.put("late", PrefixEntry((1,), [torch.zeros(1)], [torch.zeros(1)], 0.0, "normans", 1)) is False
    cache.document_changed("paris", None)  # a delete
    assert len(cache.disk) == 0 and list((tmp_path / "cache").iterdir()) == [] and cache.disk.bytes == 0


def test_a_disk_tier_folder_that_cannot_be_written_stops_the_edge_with_exit_2(tmp_path, capsys):
    """Before any model loads (the model path does not exist): one line naming the folder."""
    from kvwire.edge_agent.main import main

    (tmp_path / "prefix-cache").write_text("a file where the folder belongs")
    argv = ["--model", "/nonexistent/model", "--grpc-port", "0", "--http-port", "0", "--data-dir", str(tmp_path)]
    assert main([*argv, "--prefix-cache-disk-bytes", "1000000"]) == 2
    err = capsys.readouterr().err
    assert f"prefix_cache_disk_bytes: cannot write to {str(tmp_path / 'prefix-cache')!r}" in err
    assert "--prefix-cache-disk-bytes 0" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exited:  # bad settings exit from the parser
        main([*argv, "--prefix-cache-disk-bytes", "1000", "--prefix-cache-bytes", "0"])
    assert exited.value.code == 2
    assert "prefix_cache_disk_bytes needs prefix_cache_bytes > 0" in capsys.readouterr().err


# --- the edge daemon: restart warm, put-time prefill, metrics --------------------------------------


def _store(tiny_loaded, data_dir) -> DocumentStore:
    return DocumentStore(data_dir, lambda text: len(tiny_loaded.tokenizer(text)["input_ids"]))


def _ask(client, doc_id="normans", question=QUESTION):
    req = PrefillRequest(request_id="r", mode="kv", context="", doc_id=doc_id, question=question, retention=0.5)
    return list(client.prefill(req, timeout_s=120))


def _sample(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, labels)


def _edge_that_stored_a_document(tiny_loaded, data_dir: str) -> tuple[EdgeSettings, DocumentStore]:
    """Run an edge with a disk tier, put DOC, wait until it is prefilled and written, and stop the edge;
    (the settings of an edge on the same data_dir that prefills nothing by itself, the store)."""
    settings = EdgeSettings(profile="fp32", data_dir=data_dir, prefix_cache_disk_bytes=GIB)
    store = _store(tiny_loaded, data_dir)
    with running_edge(tiny_loaded, settings, documents=store) as edge:
        store.put("normans", DOC)
        assert edge.servicer.prefiller.wait_settled(120)
        assert edge.servicer.edge.prefix_cache.disk.wait_written(120)
        assert _sample(edge.metrics, "kvwire_prefix_cache_bytes", tier="disk") > 0
    return settings.model_copy(update={"prefill_documents": False}), store


def test_a_restarted_edge_answers_its_first_question_from_disk(tiny_loaded, tmp_path):
    quiet, store = _edge_that_stored_a_document(tiny_loaded, str(tmp_path / "edge"))
    store.close()
    store = _store(tiny_loaded, str(tmp_path / "edge"))  # only the disk can make the question a hit
    with running_edge(tiny_loaded, quiet, documents=store) as edge:
        replies = _ask(edge.client)
        assert "prefill" not in replies[-1].timings_ms and "question_prefill" in replies[-1].timings_ms
        assert _sample(edge.metrics, "kvwire_prefix_cache_hits_total") == 1
        assert _sample(edge.metrics, "kvwire_prefix_cache_disk_hits_total") == 1
        assert _sample(edge.metrics, "kvwire_prefix_cache_misses_total") == 0
        for reason in prefix_disk.ERROR_REASONS:
            assert _sample(edge.metrics, "kvwire_prefix_cache_disk_errors_total", reason=reason) == 0
    store.close()


def test_the_edge_counts_a_corrupt_disk_entry_and_answers_from_a_fresh_prefill(tiny_loaded, tmp_path):
    quiet, store = _edge_that_stored_a_document(tiny_loaded, str(tmp_path / "edge"))
    with running_edge(tiny_loaded, quiet, documents=store) as edge:
        (path,) = edge.servicer.edge.prefix_cache.disk.folder.glob(f"*{SUFFIX}")
        _flip_a_byte(path)  # while the edge runs
        replies = _ask(edge.client)
        assert "prefill" in replies[-1].timings_ms  # recomputed, not served
        assert _sample(edge.metrics, "kvwire_prefix_cache_disk_errors_total", reason="corrupt") == 1
        assert _sample(edge.metrics, "kvwire_prefix_cache_misses_total") == 1
        assert edge.servicer.edge.prefix_cache.disk.wait_written(120)
        assert _sample(edge.metrics, "kvwire_prefix_cache_bytes", tier="disk") == path.stat().st_size  # anew
    store.close()


def test_a_document_changed_while_the_edge_was_down_loses_its_disk_entry_at_start(tiny_loaded, tmp_path):
    quiet, store = _edge_that_stored_a_document(tiny_loaded, str(tmp_path / "edge"))
    store.put("normans", DOC + " Rollo was baptised in 912.")  # no edge is listening
    with running_edge(tiny_loaded, quiet, documents=store) as edge:
        assert len(edge.servicer.edge.prefix_cache.disk) == 0
        assert not edge.servicer.holds_prefix(store.meta("normans"))
    store.close()


def test_a_put_document_is_prefilled_in_the_background_and_the_first_question_hits(tiny_loaded, tmp_path):
    from fastapi.testclient import TestClient

    from kvwire.edge_agent.http import create_app

    store = _store(tiny_loaded, str(tmp_path / "edge"))
    with running_edge(tiny_loaded, EdgeSettings(profile="fp32", data_dir=str(tmp_path / "edge")), store) as edge:
        servicer = edge.servicer
        http = TestClient(create_app(servicer, edge.metrics, "tiny", store, None, cached=servicer.holds_prefix))
        assert http.put("/v1/documents/normans", content=DOC.encode()).status_code == 201
        assert servicer.prefiller.wait_settled(120)
        assert http.get("/v1/documents/normans").json()["cached"] is True
        replies = _ask(edge.client)
        assert "prefill" not in replies[-1].timings_ms  # the put paid the prefill, not the question
        assert _sample(edge.metrics, "kvwire_prefix_cache_hits_total") == 1
        assert _sample(edge.metrics, "kvwire_prefix_cache_misses_total") == 0
        assert _sample(edge.metrics, "kvwire_document_prefills_total", outcome="done") == 1
        assert http.delete("/v1/documents/normans").status_code == 204
        assert servicer.prefiller.wait_settled(120)
        assert len(servicer.edge.prefix_cache) == 0
    store.close()


def test_documents_without_an_entry_are_prefilled_at_start(tiny_loaded, tmp_path):
    data_dir = str(tmp_path / "edge")
    store = _store(tiny_loaded, data_dir)
    store.put("normans", DOC)
    store.put("paris", OTHER)
    with running_edge(tiny_loaded, EdgeSettings(profile="fp32", data_dir=data_dir), store) as edge:
        assert edge.servicer.prefiller.wait_settled(120)
        assert edge.servicer.holds_prefix(store.meta("normans")) and edge.servicer.holds_prefix(store.meta("paris"))
        assert _sample(edge.metrics, "kvwire_document_prefills_total", outcome="done") == 2
    store.close()


# --- held passes: requests first, and a document changed under a running stream --------------------


@pytest.fixture
def held_model(tiny_model_dir):
    """Its own copy of the tiny model whose forward pass, once `arm` is set, stops at layer 1 until
    `release` is set (`entered` says it got there)."""
    from kvwire.kvcodec.models import load_model

    loaded = load_model(tiny_model_dir)
    hold = type("Hold", (), {})()
    hold.arm, hold.entered, hold.release = threading.Event(), threading.Event(), threading.Event()

    def at_layer_1(*_):
        if hold.arm.is_set():
            hold.arm.clear()
            hold.entered.set()
            assert hold.release.wait(120)

    handle = loaded.model.model.layers[1].register_forward_pre_hook(at_layer_1)
    hold.loaded = loaded
    yield hold
    hold.release.set()
    handle.remove()


def _wait(event: threading.Event, what: str) -> None:
    assert event.wait(120), f"never happened: {what}"


def _until(condition, what: str) -> None:
    """Wait for a state the code under test reaches; the limit only stops a broken run from hanging."""
    done = threading.Event()
    for _ in range(12000):
        if condition():
            return
        done.wait(0.01)
    raise AssertionError(f"never happened: {what}")


def test_a_request_takes_the_model_from_a_background_prefill(held_model, tmp_path):
    """The put's prefill is held at layer 1; a question arrives and waits for the model; the background pass
    stops at its next layer and steps aside, the question is served, then the document is prefilled."""
    loaded = held_model.loaded
    store = _store(loaded, str(tmp_path / "edge"))
    store.put("paris", OTHER)
    settings = EdgeSettings(profile="fp32", data_dir=str(tmp_path / "edge"))
    with running_edge(loaded, settings, store) as edge:
        assert edge.servicer.prefiller.wait_settled(120)  # paris, at start
        held_model.arm.set()
        store.put("normans", DOC)
        _wait(held_model.entered, "the background prefill reaches layer 1")
        asked = {}
        asking = threading.Thread(target=lambda: asked.update(r=_ask(edge.client, "paris")))
        asking.start()
        _until(lambda: edge.servicer.gate.waiting > 0, "the question waits for the model")
        held_model.release.set()
        asking.join(120)
        assert "prefill" not in asked["r"][-1].timings_ms
        assert edge.servicer.prefiller.wait_settled(120)
        assert edge.servicer.holds_prefix(store.meta("normans"))  # prefilled after the question
        assert _sample(edge.metrics, "kvwire_document_prefills_total", outcome="done") == 2
    store.close()


@pytest.mark.parametrize("change", ["delete", "update"])
def test_a_stream_finishes_on_its_snapshot_while_its_document_changes(held_model, tmp_path, change):
    loaded = held_model.loaded
    store = _store(loaded, str(tmp_path / "edge"))
    store.put("normans", DOC)
    settings = EdgeSettings(profile="fp32", data_dir=str(tmp_path / "edge"), prefill_documents=False)
    cloud = Cloud(loaded)
    with running_edge(loaded, settings, store) as edge:
        held_model.arm.set()
        result = {}
        streaming = threading.Thread(target=lambda: result.update(r=_ask(edge.client)))
        streaming.start()
        _wait(held_model.entered, "the stream's prefill reaches layer 1")
        new_text = DOC.replace("Rollo", "Hrolfr")
        if change == "delete":
            assert store.delete("normans")
        else:
            store.put("normans", new_text)
        held_model.release.set()
        streaming.join(120)
        frames = [r.frame for r in result["r"] if r.frame is not None]
        want = Edge(loaded).stream(EdgeRequest(DOC, QUESTION, "kv", "q2c", 0.5, "fp32"))
        got_kv, want_kv = cloud.receive(frames), cloud.receive(want)
        assert got_kv.header.prompt_ids == want_kv.header.prompt_ids  # the old text, whole
        assert cloud.answer(got_kv, 6).tokens == cloud.answer(want_kv, 6).tokens
        # the old snapshot's entry was not kept: the cache heard of the change before the stream put it
        assert not edge.servicer.edge.prefix_cache.holds_document("normans")
        if change == "delete":
            with pytest.raises(DocumentNotFoundError, match="normans"):
                _ask(edge.client)
        else:
            replies = _ask(edge.client)
            frames = [r.frame for r in replies if r.frame is not None]
            assert "prefill" in replies[-1].timings_ms  # the new text is prefilled anew
            new = cloud.receive(Edge(loaded).stream(EdgeRequest(new_text, QUESTION, "kv", "q2c", 0.5, "fp32")))
            assert cloud.receive(frames).header.prompt_ids == new.header.prompt_ids
    store.close()


def test_a_background_prefill_is_cancelled_when_its_document_changes(held_model, tmp_path):
    loaded = held_model.loaded
    store = _store(loaded, str(tmp_path / "edge"))
    with running_edge(loaded, EdgeSettings(profile="fp32", data_dir=str(tmp_path / "edge")), store) as edge:
        held_model.arm.set()
        store.put("normans", DOC)
        _wait(held_model.entered, "the background prefill of the first version reaches layer 1")
        new_text = DOC.replace("Rollo", "Hrolfr")
        store.put("normans", new_text)  # the held pass is cancelled; the new version is queued
        held_model.release.set()
        assert edge.servicer.prefiller.wait_settled(120)
        assert _sample(edge.metrics, "kvwire_document_prefills_total", outcome="cancelled") == 1
        assert _sample(edge.metrics, "kvwire_document_prefills_total", outcome="done") == 1
        cache, ids = edge.servicer.edge.prefix_cache, _ids(edge.servicer.edge, new_text)
        assert len(cache) == 1 and cache.peek(prefix_key(edge.servicer.edge.model_fp, ids)).doc_version == 2
    store.close()


def test_a_document_whose_text_was_sent_inline_before_is_reported_cached(tiny_loaded, tmp_path):
    store = _store(tiny_loaded, str(tmp_path / "edge"))
    with running_edge(tiny_loaded, EdgeSettings(profile="fp32", data_dir=str(tmp_path / "edge")), store) as edge:
        req = PrefillRequest(request_id="r", mode="kv", context=DOC, question=QUESTION, retention=0.5)
        list(edge.client.prefill(req, timeout_s=120))  # the inline context's entry, tagged with no document
        store.put("normans", DOC)
        assert edge.servicer.prefiller.wait_settled(120)
        assert _sample(edge.metrics, "kvwire_document_prefills_total", outcome="cached") == 1
        assert edge.servicer.holds_prefix(store.meta("normans"))  # the shared entry is the document's now
        assert "prefill" not in _ask(edge.client)[-1].timings_ms
    store.close()
