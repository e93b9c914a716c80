"""Selection keeps what it must and the right count; q2c equals eager attention; attention capture is
per call (threads); prompt spans are exact."""

import math
import threading

import pytest
import torch

from kvwire import kernels
from kvwire.kvcodec.errors import ConfigError, PromptTooLongError
from kvwire.kvcodec.models import load_model
from kvwire.kvcodec.prefill import prefill
from kvwire.kvcodec.prompt import build_prompt
from kvwire.kvcodec.selectors import get_selector, selector_names

CONTEXT = (
    "The Normans gave their name to Normandy, a region in France. They were descended from Norse raiders "
    "from Denmark, Iceland and Norway. Their leader was Rollo. The Eiffel Tower is in Paris."
)
QUESTION = "Who was the leader of the Norse raiders?"


@pytest.mark.parametrize("name", selector_names())
@pytest.mark.parametrize("retention", [0.1, 0.25, 0.5, 0.75, 1.0])
def test_selector_keeps_fixed_positions_and_exact_count(tiny_loaded, name, retention):
    prompt = build_prompt(tiny_loaded.tokenizer, CONTEXT, QUESTION)
    selector = get_selector(name)
    rows = selector.query_rows(prompt)
    pre = prefill(tiny_loaded.model, prompt, rows)
    sel = selector.select(prompt, pre.attention, retention)
    kept = set(sel.kept.tolist())
    fixed = set(range(prompt.context_start)) | set(range(prompt.context_end, prompt.stream_len))
    assert fixed <= kept
    in_context = [p for p in kept if prompt.context_start <= p < prompt.context_end]
    assert len(in_context) == math.ceil(retention * prompt.context_len) == sel.context_kept
    assert sel.kept.tolist() == sorted(kept) and len(kept) == len(sel.kept)
    assert sorted(sel.order.tolist()) == sel.kept.tolist()
    assert max(kept) < prompt.stream_len  # the last prompt token is fed by the receiver, never streamed


def eager_attention_to_context(model, prompt, rows):
    """Reference: full eager attention matrices, restricted to `rows` and the context columns."""
    eager = type(model).from_pretrained(model.name_or_path, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.inference_mode():
        out = eager(prompt.tensor()[:, :-1], output_attentions=True)
    per_layer = [a[0][:, rows][:, :, prompt.context_start : prompt.context_end].sum(dim=(0, 1)) for a in out.attentions]
    return torch.stack(per_layer)


@pytest.mark.parametrize("name", ["q2c", "snapkv", "h2o"])
def test_attention_scores_equal_eager_reference(tiny_loaded, name):
    prompt = build_prompt(tiny_loaded.tokenizer, CONTEXT, QUESTION)
    rows = get_selector(name).query_rows(prompt)
    got = prefill(tiny_loaded.model, prompt, rows).attention
    ref = eager_attention_to_context(tiny_loaded.model, prompt, rows)
    assert got.shape == ref.shape == (tiny_loaded.model.config.num_hidden_layers, prompt.context_len)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_capture_does_not_change_the_cache(tiny_loaded):
    prompt = build_prompt(tiny_loaded.tokenizer, CONTEXT, QUESTION)
    plain = prefill(tiny_loaded.model, prompt)
    captured = prefill(tiny_loaded.model, prompt, get_selector("q2c").query_rows(prompt))
    for a, b in zip(plain.keys + plain.values, captured.keys + captured.values):
        assert torch.equal(a, b)
    # the installed capture function is plain sdpa when nothing is captured: a model loaded with sdpa
    # and never touched by kvwire gives the same cache and logits, bit for bit
    untouched = (
        type(tiny_loaded.model)
        .from_pretrained(tiny_loaded.model.name_or_path, attn_implementation="sdpa", dtype=torch.float32)
        .eval()
    )
    assert untouched.config._attn_implementation == "sdpa"
    with torch.inference_mode():
        ids = prompt.tensor()
        ref, got = untouched(input_ids=ids, use_cache=True), tiny_loaded.model(input_ids=ids, use_cache=True)
    assert torch.equal(ref.logits, got.logits)
    for a, b in zip(ref.cache.layers, got.cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_two_threads_prefilling_one_model_capture_only_their_own_rows(tiny_loaded, monkeypatch):
    """Capture state is per call: two prefills on one model with different rows, forced to interleave
    layer by layer, each get exactly the attention and KV they get alone."""
    model = tiny_loaded.model
    prompt = build_prompt(tiny_loaded.tokenizer, CONTEXT, QUESTION)
    rows = {"q2c": get_selector("q2c").query_rows(prompt), "h2o": get_selector("h2o").query_rows(prompt)}
    alone = {name: prefill(model, prompt, r) for name, r in rows.items()}
    assert alone["q2c"].attention.shape == alone["h2o"].attention.shape
    assert not torch.allclose(alone["q2c"].attention, alone["h2o"].attention)  # the rows matter: the test can fail

    # every layer's capture waits for the other thread's: both forward passes are in flight at once
    barrier, real = threading.Barrier(2, timeout=60), kernels.q2c_scores

    def lockstep(*args, **kwargs):
        barrier.wait()
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "q2c_scores", lockstep)
    results, errors = {}, []

    def run(name):
        try:
            results[name] = prefill(model, prompt, rows[name])
        except BaseException as exc:  # noqa: B902 - reported by the main thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(name,)) for name in rows]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for name in rows:
        assert torch.equal(results[name].attention, alone[name].attention), name
        assert torch.equal(results[name].rows, alone[name].rows)
        for a, b in zip(results[name].keys + results[name].values, alone[name].keys + alone[name].values):
            assert torch.equal(a, b)


def _decode_spans(tok, prompt):
    ids = list(prompt.ids)
    return (
        tok.decode(ids[: prompt.context_start]),
        tok.decode(ids[prompt.context_start : prompt.context_end]),
        tok.decode(ids[prompt.context_end :]),
    )


def test_prompt_spans_exact_with_chat_template(embedded_loaded):
    tok = embedded_loaded.tokenizer
    prompt = build_prompt(tok, CONTEXT, QUESTION)
    prefix, context, tail = _decode_spans(tok, prompt)
    assert context == CONTEXT
    assert prefix.startswith("<|im_start|>system") and prefix.endswith("Context:\n")
    assert QUESTION in tail and tail.endswith("<|im_start|>assistant\n")


def test_prompt_spans_exact_without_chat_template(tiny_model_dir_no_template):
    loaded = load_model(tiny_model_dir_no_template)
    assert not loaded.tokenizer.chat_template
    prompt = build_prompt(loaded.tokenizer, CONTEXT, QUESTION)
    prefix, context, tail = _decode_spans(loaded.tokenizer, prompt)
    assert context == CONTEXT
    assert prefix.endswith("Context:\n") and tail.endswith("Question: " + QUESTION + "\nAnswer:")


def test_context_that_looks_like_a_template_keeps_exact_spans(embedded_loaded):
    tok = embedded_loaded.tokenizer
    tricky = "Question: Context:\n<|im_start|>user\n" + CONTEXT
    prompt = build_prompt(tok, tricky, QUESTION)
    assert _decode_spans(tok, prompt)[1] == tricky


@pytest.mark.parametrize(
    "context, question, message",
    [("", "q?", "context is empty"), ("   ", "q?", "context is empty"), ("some text", "", "question is empty")],
)
def test_empty_inputs_are_refused(tiny_loaded, context, question, message):
    with pytest.raises(ConfigError, match=message):
        build_prompt(tiny_loaded.tokenizer, context, question)


def test_prompt_longer_than_window_is_refused(tiny_loaded):
    with pytest.raises(PromptTooLongError, match="window is 64 tokens"):
        build_prompt(tiny_loaded.tokenizer, CONTEXT * 3, QUESTION, max_len=64)


def test_unknown_selector_lists_known_names():
    with pytest.raises(ConfigError, match="unknown selector 'magic'; known: q2c, snapkv, h2o, random"):
        get_selector("magic")
