"""Per-(layer, KV head) position sets on the wire (docs/wire-format.md, section 5b): the per-head layout's
bytes, what its decoder refuses, exact answers through it, and the masking of its padding through the wire
path (logits against a reference that attends each head to its own positions only)."""

import struct

import pytest
import test_doc_answers
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_frames_fuzz import decode, recrc
from test_per_head import _REFERENCE, _full_cache, _ref_sets, _ref_stream_len  # registers the reference
from transformers import LlamaForCausalLM

from kvwire.kvcodec.errors import ConfigError, FrameError
from kvwire.kvcodec.generate import generate
from kvwire.kvcodec.modes import get_mode
from kvwire.kvcodec.pipeline import Cloud, Edge, EdgeRequest
from kvwire.kvcodec.receiver import NothingToAnswerError
from kvwire.kvcodec.stream import StreamDecoder
from kvwire.kvcodec.wire import CRC_SIZE, FLAG_HEADS, PREFIX_SIZE, Reader, parse_frame

CONTEXT = (
    "The Normans gave their name to Normandy, a region in France. They were descended from Norse raiders "
    "from Denmark, Iceland and Norway. Their leader was Rollo. The Eiffel Tower is in Paris."
)
QUESTION = "Who was the leader of the Norse raiders?"
hosts = test_doc_answers.hosts  # a real edge servicer (fp16 profile, documents) and cloud service over loopback gRPC
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def request(retention=0.5, profile="int8", heads="global", selector="kvzip", **kw):
    return EdgeRequest(CONTEXT, QUESTION, "kv", selector, retention, profile, heads=heads, **kw)


@pytest.fixture(scope="module")
def edge(tiny_loaded):
    return Edge(tiny_loaded)


@pytest.fixture(scope="module")
def cloud(tiny_loaded):
    return Cloud(tiny_loaded)


@pytest.fixture(scope="module")
def streams(edge):
    return {
        "global": list(edge.stream(request(chunk_bytes=700))),
        "layer": list(edge.stream(request(0.25, "mixed-int4", "layer", chunk_bytes=900))),
        "zcloud": list(edge.stream(request(compress=True, chunk_bytes=600, template_kv="cloud", question_kv="cloud"))),
    }


def test_per_head_frames_carry_the_flag_and_decode_to_each_heads_set(edge, tiny_loaded, streams):
    prompt = edge.prompt(request())
    selector = edge.selector(request())
    sel = edge.select_heads(prompt, selector, edge.prefill(prompt, selector), 0.5, "global")
    frames = streams["global"]
    assert len(frames) > 3
    assert [parse_frame(f).heads for f in frames] == [True] * (len(frames) - 1) + [False]
    got = decode(frames)
    assert got.header.head_counts == sel.head_counts(prompt)
    assert got.positions.tolist() == sel.kept.tolist()
    for layer, slots in enumerate(got.head_slots):
        for head, s in enumerate(slots):
            assert got.positions[s].tolist() == sel.heads[layer][head].tolist()
    assert got.context_kept == sel.context_kept


def test_one_set_streams_keep_their_bytes(edge):
    """A request without `heads` writes today's layout: no flag, no head_layout key, the same frames as before
    the per-head layout existed (the one-set encoder path is the only one it runs)."""
    frames = list(edge.stream(EdgeRequest(CONTEXT, QUESTION, "kv", "q2c", 0.5, "int8", chunk_bytes=700)))
    assert not any(parse_frame(f).heads for f in frames)
    assert b"head_layout" not in parse_frame(frames[0]).body
    assert decode(frames).head_slots is None


def test_heads_payload_is_only_each_heads_rows(edge, streams):
    """The per-head stream's KV bytes are those of the entries the heads keep, not of the union in every head."""
    from kvwire.kvcodec.quant import Quantizer

    got = decode(streams["global"])
    g = got.header.geometry
    row = sum(Quantizer("int8").sizes(1, 1, g["head_dim"]))  # one (head, position) row of K, then of V
    entries = sum(len(s) for layer in got.head_slots for s in layer)
    union = g["num_layers"] * g["kv_heads"] * len(got.positions)
    assert entries < union
    kv = 0
    for f in streams["global"][1:-1]:
        frame = parse_frame(f)
        r = Reader(frame.body, "chunk")
        n = r.varint("n")
        r.deltas(n, signed=True, field="p")
        r.unpack("H", "layers")
        for _ in range(g["num_layers"] * g["kv_heads"]):
            r.deltas(r.varint("m"), signed=False, field="m")
        for _ in range(2 * g["num_layers"]):
            _, _, _, ns, npay = r.unpack("BBHII", "head")
            r.take(ns + npay, "data")
            kv += ns + npay
        r.done()
    assert kv == 2 * entries * row


@pytest.mark.parametrize("name", ["global", "layer", "zcloud"])
def test_per_head_streams_answer_with_their_bytes_and_retention(cloud, name, streams):
    got = decode(streams[name])
    ans = cloud.answer(got, 8)
    assert ans.context_kept == got.context_kept and ans.bytes_on_wire == sum(map(len, streams[name]))
    assert len(ans.tokens) > 0


def test_all_positions_kept_per_head_in_fp32_is_the_full_answer(edge, cloud, tiny_loaded):
    """Retention 1.0 per head, fp32: exactly the full-KV answer (tokens and first logits)."""
    frames = list(edge.stream(request(1.0, "fp32", chunk_bytes=2000)))
    got = decode(frames)
    assert got.header.per_head and len(frames) > 3
    ans = cloud.answer(got, 12)
    full = cloud.answer_text(CONTEXT, QUESTION, 12)
    assert ans.tokens == full.tokens
    torch.testing.assert_close(ans.generation.first_logits, full.generation.first_logits, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def reference_model(tiny_model_dir):
    return LlamaForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=_REFERENCE, dtype=torch.float32).eval()


@pytest.mark.parametrize("budget, retention, template", [("global", 0.5, "stream"), ("layer", 0.25, "cloud")])
def test_wire_per_head_logits_match_the_reference(edge, cloud, reference_model, budget, retention, template):
    """fp32 per-head stream (the template streamed, or the cloud's own): the cloud's logits and tokens equal a
    reference attention that attends each head only to its kept positions on the full, unpadded prefill cache."""
    req = request(retention, "fp32", budget, chunk_bytes=800, template_kv=template)
    prompt = edge.prompt(req)
    selector = edge.selector(req)
    pre = edge.prefill(prompt, selector)
    sel = edge.select_heads(prompt, selector, pre, retention, budget)
    got = decode(list(edge.stream(req)))
    _ref_sets.clear()
    _ref_sets.update({i: list(layer) for i, layer in enumerate(sel.heads)})
    _ref_stream_len[0] = prompt.stream_len
    ans = cloud.answer(got, 10)
    ref = generate(reference_model, _full_cache(pre), prompt.ids[-1], prompt.stream_len, 10, cloud.stop)
    assert ans.tokens == ref.tokens and len(ans.tokens) > 0
    torch.testing.assert_close(ans.generation.first_logits, ref.first_logits, rtol=1e-5, atol=1e-5)
    one = cloud.answer(decode(list(edge.stream(request(retention, "fp32", "")))), 10)
    assert not torch.allclose(one.generation.first_logits, ans.generation.first_logits, atol=1e-4)


def test_cache_refuses_a_per_head_stream(cloud, streams):
    with pytest.raises(ValueError, match="cache_and_padding"):
        get_mode("kv").cache(cloud, decode(streams["global"]))


def test_a_cut_per_head_stream_answers_from_the_entries_that_arrived(edge, cloud):
    """Anytime: template and question rows go first, then entries by score; a stream cut after any chunk
    answers from the entries that arrived, the best-scored ones (global budget: a lower retention's set)."""
    frames = list(edge.stream(request(chunk_bytes=3000)))
    full = decode(frames)
    cuts = []
    for fed in range(2, len(frames) - 1):
        receiver = cloud.receiver().feed_all(frames, stop=lambda n, _, fed=fed: n == fed)
        try:
            cuts.append(receiver.result())
        except NothingToAnswerError:
            assert not cuts  # once the fixed rows arrived, every later cut can answer
    assert len(cuts) >= 2
    scores = {}
    prompt = edge.prompt(request())
    sel = edge.select_heads(prompt, edge.selector(request()), edge.prefill(prompt, edge.selector(request())), 0.5)
    for layer, head, p in sel.entry_order(prompt).tolist():
        scores[layer, head, p] = float(sel.scores[layer, head, p - prompt.context_start])
    held = []
    for got in cuts:
        assert not got.complete and got.missing_fixed == 0
        entries = {
            (layer, head, int(got.positions[i]))
            for layer, slots in enumerate(got.head_slots)
            for head, s in enumerate(slots)
            for i in s.tolist()
            if prompt.context_start <= int(got.positions[i]) < prompt.context_end
        }
        missing = set(scores) - entries
        assert min(scores[e] for e in entries) >= max(scores[e] for e in missing)  # the best ones arrived
        held.append(len(entries))
        assert cloud.answer(got, 4).complete is False
    assert held == sorted(held) and held[-1] < len(scores) and got.context_kept < full.context_kept


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"heads": "uniform"}, "global, layer"),
        ({"heads": "global", "selector": None, "retention": 1.0}, "needs mode kv and a selector"),
    ],
)
def test_edge_refuses_bad_heads_requests(edge, bad, match):
    req = request()
    for k, v in bad.items():
        setattr(req, k, v)
    with pytest.raises(ConfigError, match=match):
        edge.stream(req)


def test_edge_refuses_heads_in_scout_mode(edge):
    with pytest.raises(ConfigError, match="needs mode kv"):
        edge.stream(EdgeRequest(CONTEXT, QUESTION, "scout", "kvzip", 0.5, heads="global"))


# --- what the decoder refuses ------------------------------------------------------------------------


def _rewrite(frame: bytes, body: bytes, flags: int | None = None) -> bytes:
    """The frame with another plain body (and flags), its length and CRC fixed: a hostile sender."""
    head = bytearray(frame[:PREFIX_SIZE])
    if flags is not None:
        head[6:8] = struct.pack("<H", flags)
    head[28:32] = struct.pack("<I", len(body))
    return recrc(bytes(head) + body + bytes(CRC_SIZE))


def test_flag_and_layout_must_agree(edge, streams):
    frames = streams["global"]
    header = parse_frame(frames[0])
    with pytest.raises(FrameError, match="head_layout") as exc:  # the flag cleared: a one-set header naming a layout
        decode([_rewrite(frames[0], header.body, 0), *frames[1:]])
    assert exc.value.reason == "bad_header"
    one = list(edge.stream(EdgeRequest(CONTEXT, QUESTION, "kv", "q2c", 0.5, "int8")))
    with pytest.raises(FrameError) as exc:  # the flag on a one-set header: no layout, no counts
        decode([_rewrite(one[0], parse_frame(one[0]).body, FLAG_HEADS), *one[1:]])
    assert exc.value.reason == "bad_header"
    with pytest.raises(FrameError) as exc:  # a one-set chunk in a per-head stream
        decode([frames[0], _rewrite(frames[1], parse_frame(frames[1]).body, 0), *frames[2:]])
    assert exc.value.reason == "bad_flags"
    with pytest.raises(FrameError) as exc:  # the flag on a trailer
        decode([*frames[:-1], _rewrite(frames[-1], parse_frame(frames[-1]).body, FLAG_HEADS)])
    assert exc.value.reason == "bad_flags"


def test_a_context_entry_twice_for_one_head_is_duplicated(streams):
    frames = streams["global"]
    with pytest.raises(FrameError) as exc:
        decode([frames[0], frames[1], frames[2], frames[2]])
    assert exc.value.reason == "duplicated"  # seq first
    resent = _rewrite(frames[3], parse_frame(frames[2]).body)  # seq 3, chunk 2's entries again
    with pytest.raises(FrameError) as exc:
        decode([frames[0], frames[1], frames[2], resent])
    assert exc.value.reason == "duplicated"


def _stream_with(edge, counts_delta=0, drop_last=0, profile=None, chunk_bytes=700):
    """A per-head stream written by the encoder from a header whose first head's count is off by
    counts_delta, or whose last drop_last entries are never sent (profile: a PrecisionProfile; int8)."""
    from kvwire.kvcodec.profiles import get_profile
    from kvwire.kvcodec.stream import StreamEncoder, StreamHeader

    req = request()
    prompt, selector = edge.prompt(req), edge.selector(req)
    pre = edge.prefill(prompt, selector)
    sel = edge.select_heads(prompt, selector, pre, 0.5, "global")
    counts = sel.head_counts(prompt)
    counts[0][0] += counts_delta
    header = StreamHeader(
        mode="kv",
        prompt_ids=list(prompt.ids),
        context_span=(prompt.context_start, prompt.context_end),
        kept=sel.kept.tolist(),
        geometry=edge.geometry,
        profile=profile or get_profile("int8"),
        retention=0.5,
        head_counts=counts,
    )
    enc = StreamEncoder(header, chunk_bytes=chunk_bytes)
    fixed = sel.order[(sel.order < prompt.context_start) | (sel.order >= prompt.context_end)]
    entries = sel.entry_order(prompt)
    entries = entries[: len(entries) - drop_last]
    return [enc.header_frame(), *enc.head_chunk_frames(pre.keys, pre.values, fixed, entries), enc.trailer_frame()]


def test_the_encoders_own_stream_decodes(edge):
    assert decode(_stream_with(edge)).complete


@pytest.mark.parametrize("chunk_bytes", [400, 1 << 20])
def test_channel_axis_keys_per_head(edge, tiny_loaded, chunk_bytes):
    """KIVI-style keys (one scale per channel over a head's rows of a chunk, groups of 4 positions and a padded
    tail): each head's rows are a tensor of their own, so the lengths check out and the values come back."""
    from kvwire.kvcodec.profiles import PrecisionProfile
    from kvwire.kvcodec.quant import Quantizer

    profile = PrecisionProfile("kivi", (Quantizer("int4", axis="channel", group=4), Quantizer("int8")))
    got = decode(_stream_with(edge, profile=profile, chunk_bytes=chunk_bytes))
    prompt = edge.prompt(request())
    pre = edge.prefill(prompt, edge.selector(request()))
    for layer, slots in enumerate(got.head_slots):
        for head, s in enumerate(slots):
            want = pre.keys[layer][head, got.positions[s]]
            err = (got.keys[layer][0, head, s] - want).abs().max() / want.abs().max()
            assert err < 0.2  # int4 over groups of 4 positions


@pytest.mark.parametrize("delta, drop", [(1, 0), (-1, 0), (0, 1)])
def test_a_trailer_before_every_heads_entries_is_incomplete(edge, delta, drop):
    with pytest.raises(FrameError) as exc:
        decode(_stream_with(edge, delta, drop))
    assert exc.value.reason == "incomplete" if delta >= 0 else exc.value.reason in {"duplicated", "incomplete"}


def test_counts_that_cannot_fit_are_refused_in_the_header(edge):
    frames = _stream_with(edge, counts_delta=10_000)
    dec = StreamDecoder()
    with pytest.raises(FrameError, match="per-head counts") as exc:
        dec.feed(frames[0])
    assert exc.value.reason == "bad_header" and dec.header is None


@FUZZ
@given(data=st.data())
def test_flipped_bits_in_per_head_streams_are_rejected(streams, data):
    frames = list(streams[data.draw(st.sampled_from(sorted(streams)))])
    i = data.draw(st.integers(0, len(frames) - 1))
    pos = data.draw(st.integers(0, len(frames[i]) - 1))
    mutated = bytearray(frames[i])
    mutated[pos] ^= 1 << data.draw(st.integers(0, 7))
    fix_crc = data.draw(st.booleans()) and pos < len(mutated) - CRC_SIZE
    frames[i] = recrc(bytes(mutated)) if fix_crc else bytes(mutated)
    with pytest.raises(FrameError):
        decode(frames)


@FUZZ
@given(data=st.data())
def test_per_head_body_mutations_with_valid_crc_are_rejected_or_harmless(streams, data):
    """Rewrite bytes of a per-head chunk body (plain: the uncompressed streams), fix length and CRC: the
    decoder fails with a FrameError or, when the bytes were KV values only, decodes every head's set."""
    name = data.draw(st.sampled_from(["global", "layer"]))
    frames = list(streams[name])
    i = data.draw(st.integers(1, len(frames) - 2))
    body = bytearray(parse_frame(frames[i]).body)
    op = data.draw(st.sampled_from(["set", "insert", "delete", "cut"]))
    at = data.draw(st.integers(0, len(body) - 1))
    if op == "set":
        body[at] = data.draw(st.integers(0, 255))
    elif op == "insert":
        body[at:at] = data.draw(st.binary(min_size=1, max_size=4))
    elif op == "delete":
        del body[at : at + data.draw(st.integers(1, 4))]
    else:
        body = body[:at]
    frames[i] = _rewrite(frames[i], bytes(body))
    try:
        got = decode(frames)
    except FrameError:
        return
    want = decode(streams[name])  # a surviving stream changed only KV values: the same sets
    assert [[s.tolist() for s in layer] for layer in got.head_slots] == [
        [s.tolist() for s in layer] for layer in want.head_slots
    ]


@FUZZ
@given(data=st.data())
def test_per_head_header_mutations_are_rejected_before_allocation(streams, data):
    """Header counts and kept positions rewritten (lengths fixed): refused, or a stream its chunks then fail."""
    frames = list(streams["global"])
    body = bytearray(parse_frame(frames[0]).body)
    (jlen,) = struct.unpack_from("<I", body)
    at = data.draw(st.integers(4 + jlen, len(body) - 1))  # the varint sections: kept, per-head counts, ids
    body[at] = data.draw(st.integers(0, 255))
    frames[0] = _rewrite(frames[0], bytes(body))
    try:
        decode(frames)
    except FrameError:
        return
    assert bytes(body) == parse_frame(streams["global"][0]).body


# --- through both daemons' code (a real edge servicer over loopback gRPC, the cloud's AnswerService) ----------


def ask(service, **body):
    import asyncio

    from kvwire.cloud_agent.api import AnswerRequest

    body = {"question": QUESTION, "max_new_tokens": 8, "profile": "fp32", **body}
    return asyncio.run(service.answer(AnswerRequest(**body), "t"))


def test_heads_requests_stream_per_head_through_the_daemons(hosts, edge, cloud):
    """/answer with heads: the edge selects per head and streams the per-head layout, the cloud answers on
    the per-head cache; at retention 1.0 in fp32 that is exactly the full answer, and at 0.5 the answer and
    bytes are those of the same stream built in process."""
    store, service, _ = hosts
    full = ask(service, context=CONTEXT, mode="text", profile=None)
    whole = ask(service, context=CONTEXT, mode="kv", selector="kvzip", retention=1.0, heads="global")
    assert whole.answer == full.answer and whole.retention_achieved == 1.0
    half = ask(service, context=CONTEXT, mode="kv", selector="kvzip", retention=0.5, heads="global")
    frames = list(edge.stream(request(0.5, "fp32", "global")))
    local = cloud.answer(decode(frames), 8)
    assert half.answer == local.text and half.bytes_on_wire == sum(map(len, frames))
    assert half.retention_achieved == pytest.approx(local.retention_achieved)
    one = ask(service, context=CONTEXT, mode="kv", selector="kvzip", retention=0.5)
    assert one.bytes_on_wire != half.bytes_on_wire
    store.put("normans", CONTEXT)
    by_doc = ask(service, doc_id="normans", mode="kv", selector="kvzip", retention=0.5, heads="layer")
    by_text = ask(service, context=CONTEXT, mode="kv", selector="kvzip", retention=0.5, heads="layer")
    assert by_doc.answer == by_text.answer and by_doc.bytes_on_wire == by_text.bytes_on_wire


def test_heads_in_scout_mode_is_refused_by_the_edge(hosts):
    from kvwire.cloud_agent.errors import classify

    _, service, _ = hosts
    with pytest.raises(Exception) as exc:
        ask(service, context=CONTEXT, mode="scout", selector="kvzip", retention=0.5, heads="global")
    assert classify(exc.value)[0] == 422 and "needs mode kv" in str(exc.value)


# --- kvzip's scores once per document (kept with its prefix KV) ----------------------------------------------


@pytest.fixture
def passes(monkeypatch):
    """Counts kvzip's reconstruction passes (one per context chunk)."""
    import kvwire.kvcodec.selectors.kvzip as kvzip_module

    calls = []
    real = kvzip_module.head_max_attention
    monkeypatch.setattr(kvzip_module, "head_max_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _sets(decoded):
    return [[decoded.positions[s].tolist() for s in layer] for layer in decoded.head_slots]


def test_kvzip_scores_are_computed_once_per_prefix(tiny_loaded, passes):
    from kvwire.kvcodec.prefix_cache import PrefixCache

    cached, plain = Edge(tiny_loaded, PrefixCache(1 << 30)), Edge(tiny_loaded)
    decode(list(cached.stream(request())))
    once = len(passes)
    assert once >= 1
    other = EdgeRequest(CONTEXT, "Where is the Eiffel Tower?", "kv", "kvzip", 0.25, "int8", heads="global")
    second = decode(list(cached.stream(other)))
    assert len(passes) == once  # a second question on the same prefix runs no reconstruction pass
    assert _sets(second) == _sets(decode(list(plain.stream(other))))  # and selects what a fresh pass selects
    assert len(passes) == 2 * once


def test_document_scores_are_computed_when_a_document_is_prefilled(tiny_loaded, passes):
    from kvwire.kvcodec.prefix_cache import PrefixCache
    from kvwire.kvcodec.selectors import get_selector

    edge = Edge(tiny_loaded, PrefixCache(1 << 30), document_selectors=[get_selector("kvzip")])
    assert edge.warm_prefix(CONTEXT, "normans", 1) is True
    once = len(passes)
    assert once >= 1
    assert edge.warm_prefix(CONTEXT, "normans", 1) is False and len(passes) == once
    req = request(doc_id="normans", doc_version=1)
    assert decode(list(edge.stream(req))).header.per_head and len(passes) == once  # the question pays no pass


def test_the_edge_refuses_an_unknown_document_selector(tiny_loaded):
    from kvwire.agent_common.metrics import Metrics
    from kvwire.edge_agent.service import EdgeServicer
    from kvwire.edge_agent.settings import EdgeSettings

    with pytest.raises(ConfigError, match="unknown selector 'nope'"):
        EdgeServicer(tiny_loaded, EdgeSettings(document_scores="kvzip,nope"), Metrics("edge"))


def test_the_documented_per_head_chunk_is_what_the_encoder_writes(capsys):
    """docs/wire-format.md section 11: its script runs, and its byte-by-byte chunk is the chunk it prints."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "wire-format.md").read_text()
    section = doc[doc.index("## 11. Worked example, per-head layout") :]
    exec(compile(re.search(r"```python\n(.*?)```", section, re.S).group(1), "wire-format.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[[[0, 1, 2, 4, 5], [0, 1, 3, 5]]]"
    chunk = bytes.fromhex(lines[2].split(" ", 1)[1].replace(" ", ""))
    block = section[section.index("**Chunk**") :]
    block = block[block.index("```\n") + 4 :]
    block = block[: block.index("```")]
    documented = {}
    for line in block.splitlines():
        if re.match(r"[0-9a-f]{4}  ", line):
            first = re.search(r"[0-9a-f]{2}", line[6 : 6 + 48]).start()
            assert first // 3 == int(line[:4], 16) % 16, line  # a line's offset is its first byte's
            for col in range(6, min(len(line), 6 + 48), 3):
                if re.fullmatch(r"[0-9a-f]{2}", line[col : col + 2]):
                    documented[int(line[:4], 16) // 16 * 16 + (col - 6) // 3] = int(line[col : col + 2], 16)
    assert documented == dict(enumerate(chunk))


@pytest.mark.parametrize("profile", ["int8", "mixed-int4"])
def test_matched_selection_pays_for_its_positions_in_kv(edge, profile):
    """bench/selection_bench.py's kvzip-matched: the global per-head selection trimmed until its stream is no
    larger than the one-set q2c stream of the same retention and profile. With one encoding in every layer
    that drops a few entries (the position bytes); with mixed-int4 the global budget may also have moved
    entries into the fp16 layer, which costs more (here 18% of the entries go)."""
    from kvwire.bench.selection_bench import _frames, matched_selection
    from kvwire.kvcodec.selectors import get_selector, head_selection, top_k_selection

    prompt = edge.prompt(request())
    kvzip, q2c = get_selector("kvzip"), get_selector("q2c")
    pre = edge.prefill(prompt, q2c)
    scores = kvzip.score(edge.score_inputs(prompt, kvzip, pre))
    one = top_k_selection(prompt, q2c.score(edge.score_inputs(prompt, q2c, pre)), 0.5)
    limit = sum(map(len, _frames(edge, prompt, pre, one, 0.5, profile)))
    full = head_selection(prompt, scores, 0.5, "global")
    matched = matched_selection(edge, prompt, pre, scores, 0.5, profile, limit)
    assert sum(map(len, _frames(edge, prompt, pre, matched, 0.5, profile))) <= limit
    kept = sum(map(sum, matched.head_counts(prompt)))
    share = 0.95 if profile == "int8" else 0.5
    assert share * sum(map(sum, full.head_counts(prompt))) <= kept <= sum(map(sum, full.head_counts(prompt)))
    with pytest.raises(ConfigError, match="needs budget 'global'"):
        head_selection(prompt, scores, 0.5, "layer", entries=10)
