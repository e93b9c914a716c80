"""What a stream carries (wire version 2): only the token ids the cloud needs, and the fixed segments
(template prefix, question + template suffix) streamed or computed on the cloud. With fp32 and
retention 1.0 every variant gives exactly the full-KV answer."""

import itertools
import json
import struct

import pytest
import torch

from kvwire.kvcodec.errors import ConfigError, FrameError, GeometryMismatchError
from kvwire.kvcodec.pipeline import Cloud, Edge, EdgeRequest
from kvwire.kvcodec.prompt import template_prefix_ids
from kvwire.kvcodec.stream import StreamDecoder, decode_header
from kvwire.kvcodec.template_cache import TemplateMismatchError
from kvwire.kvcodec.wire import CRC_SIZE, PREFIX_SIZE, VERSION, crc32c, pack_frame, parse_frame, put_varint

CONTEXT = (
    "The Normans gave their name to Normandy, a region in France. They were descended from Norse raiders "
    "from Denmark, Iceland and Norway. Their leader was Rollo. The Eiffel Tower is in Paris."
)
QUESTION = "Who was the leader of the Norse raiders?"
VARIANTS = list(itertools.product(("stream", "cloud"), repeat=2))  # (template_kv, question_kv)
IDS = [f"template-{t}/question-{q}" for t, q in VARIANTS]


def _varint_len(value: int) -> int:
    out = bytearray()
    put_varint(out, value)
    return len(out)


def _exact(loaded, mode: str, template: str, question: str, max_new: int = 12, scout_prefill: str = "sparse"):
    edge, cloud = Edge(loaded), Cloud(loaded)
    full = cloud.answer_text(CONTEXT, QUESTION, max_new)
    req = EdgeRequest(
        CONTEXT,
        QUESTION,
        mode,
        "q2c",
        1.0,
        "fp32",
        template_kv=template,
        question_kv=question,
        scout_prefill=scout_prefill,
    )
    frames = list(edge.stream(req))
    got = cloud.answer(cloud.receive(frames), max_new, None, {"scout_prefill": scout_prefill})
    assert got.tokens == full.tokens and len(full.tokens) > 0
    assert torch.allclose(got.generation.first_logits, full.generation.first_logits, atol=1e-4)
    assert got.kept_positions == full.prompt_len - 1  # what arrived plus what the cloud computed: every position
    return got, frames


@pytest.mark.parametrize(("template", "question"), VARIANTS, ids=IDS)
def test_kv_fp32_full_retention_is_exact_in_every_variant_tiny(tiny_loaded, template, question):
    got, frames = _exact(tiny_loaded, "kv", template, question)
    h = decode_header(parse_frame(frames[0]))
    prompt = Edge(tiny_loaded).prompt(EdgeRequest(CONTEXT, QUESTION))
    streamed = prompt.context_len + (prompt.context_start if template == "stream" else 0)
    streamed += (prompt.stream_len - prompt.context_end) if question == "stream" else 0
    assert len(h.kept) == streamed and (template, question) == (h.template, h.question)


@pytest.mark.parametrize(("template", "question"), VARIANTS, ids=IDS)
@pytest.mark.parametrize("scout_prefill", ["sparse", "full"])
def test_scout_full_retention_is_exact_in_every_variant_tiny(tiny_loaded, template, question, scout_prefill):
    _exact(tiny_loaded, "scout", template, question, scout_prefill=scout_prefill)


@pytest.mark.parametrize(("template", "question"), VARIANTS[1:], ids=IDS[1:])
def test_kv_fp32_full_retention_is_exact_in_every_variant_embedded(embedded_loaded, template, question):
    _exact(embedded_loaded, "kv", template, question, max_new=8)


def test_the_cloud_computes_its_template_once_and_streams_get_smaller(tiny_loaded):
    edge, cloud = Edge(tiny_loaded), Cloud(tiny_loaded)
    sizes = {}
    for template, question in VARIANTS:
        req = EdgeRequest(CONTEXT, QUESTION, "kv", "q2c", 0.5, "int8", template_kv=template, question_kv=question)
        frames = list(edge.stream(req))
        ans = cloud.answer(cloud.receive(frames), 3)
        sizes[template, question] = ans.bytes_on_wire
    assert cloud.templates.computed == 1
    assert sizes["cloud", "cloud"] < sizes["cloud", "stream"] < sizes["stream", "stream"]
    assert sizes["cloud", "cloud"] < sizes["stream", "cloud"] < sizes["stream", "stream"]


def test_a_header_carries_only_the_ids_the_cloud_needs(tiny_loaded):
    """The header body is exactly 4 + JSON + the kept deltas + the carried ids, and a sparse scout's carried
    ids are the kept positions' and the last token's, not the whole prompt's."""
    edge = Edge(tiny_loaded)
    prompt = edge.prompt(EdgeRequest(CONTEXT, QUESTION))
    ids = prompt.ids
    for mode, how, template, question in [
        ("scout", "sparse", "stream", "stream"),
        ("scout", "full", "cloud", "stream"),
        ("kv", "sparse", "stream", "stream"),
        ("kv", "sparse", "cloud", "cloud"),
    ]:
        req = EdgeRequest(CONTEXT, QUESTION, mode, "q2c", 0.5, "int8", template_kv=template, question_kv=question)
        req.scout_prefill = how
        frame = parse_frame(next(iter(edge.stream(req))))
        h = decode_header(frame)
        (json_len,) = struct.unpack_from("<I", frame.body)
        deltas = [h.kept[0]] + [b - a for a, b in zip(h.kept, h.kept[1:])]
        if mode == "scout" and how == "sparse":
            carried = [*h.kept, len(ids) - 1]
        elif mode == "scout":
            carried = list(range(prompt.context_start, len(ids)))  # every id the cloud prefills after its template
        elif question == "cloud":
            carried = list(range(prompt.context_end, len(ids)))  # the question the cloud prefills, the last token
        else:
            carried = [len(ids) - 1]
        want = 4 + json_len + sum(map(_varint_len, deltas)) + sum(_varint_len(ids[p]) for p in carried)
        assert len(frame.body) == want, (mode, how, template, question)
        assert h.token_ids == {p: ids[p] for p in carried} and h.n_ids == len(carried)
    assert h.prompt_ids is None and h.n_prompt == len(ids)


def test_a_template_the_cloud_does_not_hold_is_refused_before_allocation(tiny_loaded):
    edge, cloud = Edge(tiny_loaded), Cloud(tiny_loaded)
    req = EdgeRequest(CONTEXT, QUESTION, "kv", "q2c", 0.5, "int8", template_kv="cloud")
    frames = list(edge.stream(req))
    body = parse_frame(frames[0]).body
    (n,) = struct.unpack_from("<I", body)
    meta = json.loads(body[4 : 4 + n])
    meta["template_hash"] = "0" * 16
    raw = json.dumps(meta).encode()
    forged = pack_frame(1, parse_frame(frames[0]).stream_id, 0, struct.pack("<I", len(raw)) + raw + body[4 + n :])
    receiver = cloud.receiver()
    with pytest.raises(TemplateMismatchError, match="template prefix .* is not this cloud's"):
        receiver.feed(forged)
    assert isinstance(TemplateMismatchError("x"), GeometryMismatchError)  # the cloud's 409, like other mismatches
    assert receiver.decoder.header is None and not hasattr(receiver.decoder, "_k")
    # the real header names this cloud's template: it is accepted
    assert cloud.templates.digest == decode_header(parse_frame(frames[0])).template_hash
    assert len(template_prefix_ids(tiny_loaded.tokenizer)) == decode_header(parse_frame(frames[0])).context_span[0]


def _rewrite(frame: bytes, edit=None, kept=None) -> bytes:
    body = parse_frame(frame).body
    (n,) = struct.unpack_from("<I", body)
    meta = json.loads(body[4 : 4 + n])
    if edit is not None:
        edit(meta)
    raw = json.dumps(meta).encode()
    return pack_frame(1, parse_frame(frame).stream_id, 0, struct.pack("<I", len(raw)) + raw + body[4 + n :])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(template="edge"), "template='edge' is not one of stream, cloud"),
        (lambda m: m.update(question=None), "question=None is not one of stream, cloud"),
        (lambda m: m.update(ids="tail"), "ids='tail' is not one of kept, all"),
        (lambda m: m.update(template_hash=7), "template_hash 7 is not 16 hex digits"),
        (lambda m: m.update(template="cloud"), "kept positions include template positions the cloud computes"),
        (lambda m: m.update(question="cloud"), "kept positions include question positions the cloud computes"),
    ],
    ids=["template-value", "question-null", "ids-tail-in-scout", "hash-int", "template-kept", "question-kept"],
)
def test_fixed_position_fields_are_checked(tiny_loaded, edit, message):
    frames = list(Edge(tiny_loaded).stream(EdgeRequest(CONTEXT, QUESTION, "scout", "q2c", 0.5)))
    with pytest.raises(FrameError, match="bad_header: " + message.replace("(", r"\(").replace(")", r"\)")):
        StreamDecoder().feed(_rewrite(frames[0], edit))


def test_a_header_that_drops_a_streamed_question_is_refused(tiny_loaded):
    """A header claiming the question is streamed while its kept positions leave it out (the edge computed
    the stream for question_kv=cloud) is refused: the cloud would otherwise answer without the question."""
    frames = list(
        Edge(tiny_loaded).stream(EdgeRequest(CONTEXT, QUESTION, "kv", "q2c", 0.5, "int8", question_kv="cloud"))
    )
    with pytest.raises(FrameError, match="bad_header: kept positions drop question positions"):
        StreamDecoder().feed(_rewrite(frames[0], lambda m: m.update(question="stream")))


def test_another_wire_version_is_refused_with_a_clear_error(tiny_loaded):
    frame = bytearray(next(iter(Edge(tiny_loaded).stream(EdgeRequest(CONTEXT, QUESTION, "scout", "q2c", 0.5)))))
    assert VERSION == 2 and frame[4] == 2
    for version in (1, 3):
        frame[4] = version
        fixed = bytes(frame[:-CRC_SIZE]) + struct.pack("<I", crc32c(bytes(frame[:-CRC_SIZE])))
        with pytest.raises(FrameError, match=f"bad_version: frame version {version}; this decoder reads version 2"):
            StreamDecoder().feed(fixed)
    assert PREFIX_SIZE == 32


def test_bad_fixed_position_options_are_config_errors(tiny_loaded):
    edge = Edge(tiny_loaded)
    with pytest.raises(ConfigError, match="template_kv 'edge': use one of stream, cloud"):
        edge.stream(EdgeRequest(CONTEXT, QUESTION, template_kv="edge"))
    with pytest.raises(ConfigError, match="scout_prefill 'half'"):
        edge.stream(EdgeRequest(CONTEXT, QUESTION, "scout", scout_prefill="half"))
