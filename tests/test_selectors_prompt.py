"""Selection keeps what it must and the right count; attention scores equal eager attention; the
selector contract and registry; attention capture is per call (threads); prompt spans are exact."""

import ast
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from selector_cases import INVALID, PARAMETERS, attention_cases, invalid_cases, selector_cases

from kvwire import kernels
from kvwire.kvcodec.errors import ConfigError, PromptTooLongError
from kvwire.kvcodec.models import load_model
from kvwire.kvcodec.pipeline import Edge
from kvwire.kvcodec.prefill import prefill
from kvwire.kvcodec.prompt import build_prompt
from kvwire.kvcodec.selectors import (
    ScoreInputs,
    Selector,
    get_selector,
    register_selector,
    selector_names,
    selector_parameters,
)
from kvwire.kvcodec.selectors.q2c import Q2CSelector

CONTEXT = (
    "The Normans gave their name to Normandy, a region in France. They were descended from Norse raiders "
    "from Denmark, Iceland and Norway. Their leader was Rollo. The Eiffel Tower is in Paris."
)
QUESTION = "Who was the leader of the Norse raiders?"
SELECTORS_DIR = Path(__file__).resolve().parents[1] / "kvcodec" / "selectors"


@pytest.mark.parametrize("name, params", selector_cases())
@pytest.mark.parametrize("retention", [0.1, 0.25, 0.5, 0.75, 1.0])
def test_selector_keeps_fixed_positions_and_exact_count(tiny_loaded, name, params, retention):
    edge = Edge(tiny_loaded)
    prompt = build_prompt(tiny_loaded.tokenizer, CONTEXT, QUESTION)
    selector = get_selector(name, **params)
    sel = edge.select(prompt, selector, edge.prefill(prompt, selector), retention)
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


@pytest.mark.parametrize("name, params", attention_cases())
def test_attention_scores_equal_eager_reference(tiny_loaded, name, params):
    prompt = build_prompt(tiny_loaded.tokenizer, CONTEXT, QUESTION)
    rows = get_selector(name, **params).query_rows(prompt)
    got = prefill(tiny_loaded.model, prompt, rows).attention
    ref = eager_attention_to_context(tiny_loaded.model, prompt, rows)
    assert got.shape == ref.shape == (tiny_loaded.model.config.num_hidden_layers, prompt.context_len)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_attention_cases_cover_the_attention_selectors():
    assert {c.values[0] for c in attention_cases()} >= {"q2c", "snapkv", "h2o"}


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


@dataclass(frozen=True)
class KeyNormSelector(Selector):
    """A selector that scores from the prefilled keys, not attention: the contract hands it them."""

    name = "test-knorm"

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        start, end = inputs.prompt.context_start, inputs.prompt.context_end
        # k: [kv_heads, stream_len, head_dim]; a low key norm is important (KNorm, Devoto et al. 2024)
        return -torch.stack([k[:, start:end].float().norm(dim=-1).mean(dim=0) for k in inputs.keys]).mean(dim=0)


def test_score_inputs_carry_the_prefilled_kv(tiny_loaded):
    edge, selector = Edge(tiny_loaded), KeyNormSelector()
    prompt = build_prompt(tiny_loaded.tokenizer, CONTEXT, QUESTION)
    pre = edge.prefill(prompt, selector)
    assert pre.attention is None  # it asked for no rows: nothing was captured
    inputs = edge.score_inputs(prompt, selector, pre)
    assert inputs.attention is None and inputs.prompt is prompt
    assert all(torch.equal(a, b) for a, b in zip(inputs.keys + inputs.values, pre.keys + pre.values))
    assert [k.shape for k in inputs.keys] == [(2, prompt.stream_len, 16)] * 4  # [kv_heads, stream_len, head_dim]
    sel = edge.select(prompt, selector, pre, 0.25)
    expected = torch.sort(selector.score(inputs), descending=True, stable=True).indices[: sel.context_kept]
    assert sel.order[-sel.context_kept :].tolist() == (expected + prompt.context_start).tolist()


def test_a_prefill_for_other_rows_is_refused(tiny_loaded):
    edge, prompt = Edge(tiny_loaded), build_prompt(tiny_loaded.tokenizer, CONTEXT, QUESTION)
    pre = edge.prefill(prompt, get_selector("q2c"))
    with pytest.raises(ValueError, match="did not capture the attention rows selector 'h2o' needs"):
        edge.select(prompt, get_selector("h2o"), pre, 0.5)
    assert edge.select(prompt, get_selector("random"), pre, 0.5).context_kept  # rows not needed: any prefill serves


# --- the registry ---------------------------------------------------------------------------------


def test_unknown_selector_lists_known_names():
    assert selector_names()[0] == "q2c" and {"q2c", "snapkv", "h2o", "random"} <= set(selector_names())
    known = ", ".join(selector_names())
    with pytest.raises(ConfigError, match=re.escape(f"unknown selector 'magic'; known: {known}") + "$"):
        get_selector("magic")


def test_parameters_are_validated_and_unknown_ones_named():
    assert get_selector("snapkv", window=8).window == 8 and get_selector("snapkv").window == 32
    assert selector_parameters("snapkv") == {"window": 32, "kernel": 7}
    with pytest.raises(
        ConfigError, match=r"selector 'snapkv' has no parameter 'windw'; its parameters: window, kernel"
    ):
        get_selector("snapkv", windw=8)
    with pytest.raises(ConfigError, match=r"selector 'q2c' has no parameter 'seed'; its parameters: none"):
        get_selector("q2c", seed=1)
    with pytest.raises(AttributeError):
        get_selector("snapkv").window = 3  # frozen: a selector's parameters never change under it


@pytest.mark.parametrize("name, params", invalid_cases())
def test_invalid_parameters_are_config_errors(name, params):
    with pytest.raises(ConfigError, match=f"selector '{name}': {next(iter(params))}"):
        get_selector(name, **params)


def test_matrix_rows_name_registered_selectors_and_parameters():
    for table in (PARAMETERS, INVALID):
        for name, rows in table.items():
            assert name in selector_names(), f"{name} has matrix rows but is not registered"
            assert all(set(row) <= set(selector_parameters(name)) for row in rows)


def test_registry_refuses_duplicates_and_malformed_selectors():
    with pytest.raises(ValueError, match="selector 'q2c' is already registered"):
        register_selector(Q2CSelector)

    class Unfrozen(Selector):
        name = "test-unfrozen"

        def score(self, inputs):
            return torch.zeros(inputs.prompt.context_len)

    with pytest.raises(ValueError, match="must be a @dataclass\\(frozen=True\\)"):
        register_selector(Unfrozen)

    @dataclass(frozen=True)
    class Nameless(Selector):
        def score(self, inputs):
            return torch.zeros(inputs.prompt.context_len)

    with pytest.raises(ValueError, match="has no name"):
        register_selector(Nameless)
    assert "test-unfrozen" not in selector_names()


def test_selector_modules_import_each_other_without_a_cycle():
    """base <- registry <- each selector: no module of the package imports one that imports it back."""
    graph = {}
    for path in SELECTORS_DIR.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kvwire.kvcodec.selectors."):
                imported.add(node.module.rsplit(".", 1)[1])
        graph[path.stem] = imported
    assert graph["base"] == set() and graph["registry"] == {"base"}

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph.get(start, ()))

    assert not [m for m in graph if reaches(m, m)]


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
