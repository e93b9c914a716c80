"""Per-(layer, KV head) selection: kvzip's reconstruction scores equal eager attention, the budgets of
select_heads, and a padded per-head cache whose padding gets exactly zero attention (logits and greedy
tokens against a reference that attends each head to its own positions only)."""

import math

import pytest
import torch
from transformers import AttentionInterface, DynamicCache, LlamaForCausalLM
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvwire.kvcodec.cache import build_head_cache, padded_heads
from kvwire.kvcodec.errors import ConfigError
from kvwire.kvcodec.generate import generate
from kvwire.kvcodec.pipeline import Cloud, Edge
from kvwire.kvcodec.prefill import prefill
from kvwire.kvcodec.prompt import Prompt, build_prompt, reconstruction_ids
from kvwire.kvcodec.selectors import ScoreInputs, get_selector
from kvwire.kvcodec.selectors.kvzip import CONTINUE, QUOTED, REPEAT

CONTEXT = (
    "The Normans gave their name to Normandy, a region in France. They were descended from Norse raiders "
    "from Denmark, Iceland and Norway. Their leader was Rollo. The Eiffel Tower is in Paris."
)
QUESTION = "Who was the leader of the Norse raiders?"


@pytest.fixture(scope="module")
def eager(tiny_model_dir):
    return LlamaForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager", dtype=torch.float32).eval()


def reference_kvzip(eager, tokenizer, prompt, chunk, sink):
    """KVzip's scores from full eager attention matrices of [prefix][context][repeat prompt][chunk]: each
    row's weights renormalised over the sink, the chunk and the pass's own columns, max over rows and
    over the query heads of each KV head's group."""
    start, end = prompt.context_start, prompt.context_end
    context = list(prompt.ids[start:end])
    sink = min(sink, start)
    parts = []
    for lo in range(0, len(context), chunk):
        piece = context[lo : lo + chunk]
        ids = (
            reconstruction_ids(tokenizer, REPEAT)
            if lo == 0
            else reconstruction_ids(tokenizer, CONTINUE, context[lo - QUOTED : lo])
        )
        full = list(prompt.ids[:end]) + ids + piece
        with torch.inference_mode():
            out = eager(torch.tensor([full]), output_attentions=True)
        span = torch.arange(start + lo, start + lo + len(piece))
        visible = torch.cat([torch.arange(sink), span, torch.arange(end, len(full))])
        layers = []
        for att in out.attentions:
            a = att[0][:, end:]  # [q_heads, rows, all columns]
            w = a[:, :, span] / a[:, :, visible].sum(dim=-1, keepdim=True)
            kv_heads = eager.config.num_key_value_heads
            layers.append(w.reshape(kv_heads, -1, len(piece)).amax(dim=1))
        parts.append(torch.stack(layers))
    return torch.cat(parts, dim=-1)


@pytest.mark.parametrize("chunk, sink", [(1024, 4), (9, 0), (13, 2)])
def test_kvzip_scores_equal_eager_reference(tiny_loaded, eager, chunk, sink):
    prompt = build_prompt(tiny_loaded.tokenizer, CONTEXT, QUESTION)
    edge = Edge(tiny_loaded)
    selector = get_selector("kvzip", chunk=chunk, sink=sink)
    inputs = edge.score_inputs(prompt, selector, edge.prefill(prompt, selector))
    got = selector.score(inputs)
    cfg = tiny_loaded.model.config
    assert got.shape == (cfg.num_hidden_layers, cfg.num_key_value_heads, prompt.context_len)
    ref = reference_kvzip(eager, tiny_loaded.tokenizer, prompt, chunk, sink)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_kvzip_needs_the_model():
    prompt = Prompt(ids=tuple(range(20)), context_start=3, context_end=15)
    kv = [torch.zeros(2, prompt.stream_len, 4)]
    with pytest.raises(ConfigError, match="reconstruction pass"):
        get_selector("kvzip").score(ScoreInputs(prompt, None, kv, kv))


def _selection(tiny_loaded, name, retention, budget, **params):
    edge = Edge(tiny_loaded)
    prompt = build_prompt(tiny_loaded.tokenizer, CONTEXT, QUESTION)
    selector = get_selector(name, **params)
    pre = edge.prefill(prompt, selector)
    return prompt, selector, pre, edge.select_heads(prompt, selector, pre, retention, budget), edge


@pytest.mark.parametrize("retention", [0.1, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("budget", ["layer", "global"])
def test_select_heads_budget_and_fixed_positions(tiny_loaded, retention, budget):
    prompt, _, _, sel, _ = _selection(tiny_loaded, "kvzip", retention, budget)
    k = math.ceil(retention * prompt.context_len)
    counts = sel.head_counts(prompt)
    layers, kv_heads = len(counts), len(counts[0])
    if budget == "layer":
        assert [sum(c) for c in counts] == [kv_heads * k] * layers
    else:
        assert sum(map(sum, counts)) == layers * kv_heads * k
    fixed = set(prompt.fixed_positions().tolist())
    union = set()
    for layer in sel.heads:
        for pos in layer:
            assert fixed <= set(pos.tolist()) and pos.tolist() == sorted(set(pos.tolist()))
            assert max(pos.tolist()) < prompt.stream_len
            union |= set(pos.tolist())
    assert sel.kept.tolist() == sorted(union) and sorted(sel.order.tolist()) == sel.kept.tolist()
    assert sel.context_kept == k


@pytest.mark.parametrize("budget", ["layer", "global"])
def test_select_heads_keeps_the_highest_scores(tiny_loaded, budget):
    prompt, _, _, sel, _ = _selection(tiny_loaded, "kvzip", 0.25, budget)
    keep = torch.zeros(sel.scores.shape, dtype=torch.bool)
    for i, layer in enumerate(sel.heads):
        for h, pos in enumerate(layer):
            ctx = pos[(pos >= prompt.context_start) & (pos < prompt.context_end)] - prompt.context_start
            keep[i, h, ctx] = True
    groups = [(sel.scores[i], keep[i]) for i in range(len(sel.heads))] if budget == "layer" else [(sel.scores, keep)]
    for scores, kept in groups:
        assert scores[kept].min() >= scores[~kept].max()


@pytest.mark.parametrize("budget", ["layer", "global"])
def test_one_score_per_position_gives_every_head_the_one_set(tiny_loaded, budget):
    prompt, selector, pre, sel, edge = _selection(tiny_loaded, "q2c", 0.25, budget)
    one = edge.select(prompt, selector, pre, 0.25)
    assert one.heads is None
    for layer in sel.heads:
        for pos in layer:
            assert pos.tolist() == one.kept.tolist()


def test_select_heads_refuses_an_unknown_budget(tiny_loaded):
    with pytest.raises(ConfigError, match="global, layer"):
        _selection(tiny_loaded, "kvzip", 0.5, "uniform")


# --- the padded per-head cache against a reference that removes each head's dropped entries ---------

_REFERENCE = "kvwire_test_head_reference"
_ref_sets: dict[int, list[torch.Tensor]] = {}  # layer -> per KV head, the stream positions it keeps
_ref_stream_len = [0]


def _reference_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Each KV head attends (explicit fp32 softmax) to its kept stream positions and to every entry
    appended after the stream, causally; the cache holds the whole stream, so nothing is padded."""
    q_heads, q_len = query.shape[1], query.shape[2]
    kv_heads, k_len = key.shape[1], key.shape[2]
    stream = _ref_stream_len[0]
    out = torch.empty(1, q_len, q_heads, query.shape[3], dtype=query.dtype)
    group = q_heads // kv_heads
    for h in range(kv_heads):
        cols = torch.cat([_ref_sets[module.layer_idx][h], torch.arange(stream, k_len)])
        k, v = key[0, h, cols], value[0, h, cols]  # [cols, D]
        n_kept = len(cols) - (k_len - stream)
        for g in range(group):
            q = query[0, h * group + g]  # [q_len, D]
            logits = (q @ k.T) * module.scaling
            for i in range(q_len):  # row i sees the appended entries up to its own
                logits[i, n_kept + (k_len - stream - q_len) + i + 1 :] = float("-inf")
            out[0, :, h * group + g] = torch.softmax(logits, dim=-1) @ v
    return out, None


AttentionInterface.register(_REFERENCE, _reference_attention)
AttentionMaskInterface.register(_REFERENCE, sdpa_mask)


@pytest.fixture(scope="module")
def reference_model(tiny_model_dir):
    return LlamaForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=_REFERENCE, dtype=torch.float32).eval()


def _random_head_sets(prompt, layers, kv_heads, seed=0):
    """Per layer and head a different random subset of the context (0 to all of it) plus the fixed positions."""
    gen = torch.Generator().manual_seed(seed)
    fixed = prompt.fixed_positions()
    sets = []
    for _ in range(layers):
        heads = []
        for _ in range(kv_heads):
            n = int(torch.randint(0, prompt.context_len + 1, (1,), generator=gen))
            ctx = torch.randperm(prompt.context_len, generator=gen)[:n] + prompt.context_start
            heads.append(torch.sort(torch.cat([fixed, ctx])).values)
        sets.append(tuple(heads))
    return sets


def _full_cache(pre):
    return DynamicCache([(k[None].clone(), v[None].clone()) for k, v in zip(pre.keys, pre.values)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_padded_heads_match_a_reference_without_the_dropped_entries(tiny_loaded, reference_model, seed):
    model = tiny_loaded.model
    prompt = build_prompt(tiny_loaded.tokenizer, CONTEXT, QUESTION)
    pre = prefill(model, prompt)
    cfg = model.config
    sets = _random_head_sets(prompt, cfg.num_hidden_layers, cfg.num_key_value_heads, seed)
    assert len({len(p) for layer in sets for p in layer}) > 1  # heads differ, so there is padding to mask
    _ref_sets.clear()
    _ref_sets.update({i: list(layer) for i, layer in enumerate(sets)})
    _ref_stream_len[0] = prompt.stream_len

    cache, padding = build_head_cache(pre.keys, pre.values, sets)
    assert padding.kept == [[len(p) for p in layer] for layer in sets]
    ref_cache = _full_cache(pre)
    # three tokens in one pass (causal rows on the padded cache), then one at a time
    steps = [[prompt.ids[-1], 5, 9], [17], [3]]
    pos = prompt.stream_len
    with torch.inference_mode():
        for ids in steps:
            positions = torch.arange(pos, pos + len(ids))[None]
            with padded_heads(padding):
                got = model(input_ids=torch.tensor([ids]), position_ids=positions, cache=cache, use_cache=True).logits
            ref = reference_model(
                input_ids=torch.tensor([ids]), position_ids=positions, cache=ref_cache, use_cache=True
            )
            torch.testing.assert_close(got, ref.logits, rtol=1e-5, atol=1e-5)
            pos += len(ids)


def test_padding_changes_logits_without_the_mask(tiny_loaded):
    """The comparison above can fail: the same padded cache read without padded_heads gives other logits."""
    model = tiny_loaded.model
    prompt = build_prompt(tiny_loaded.tokenizer, CONTEXT, QUESTION)
    pre = prefill(model, prompt)
    sets = _random_head_sets(prompt, model.config.num_hidden_layers, model.config.num_key_value_heads)
    ids, positions = torch.tensor([[prompt.ids[-1]]]), torch.tensor([[prompt.stream_len]])
    with torch.inference_mode():
        cache, padding = build_head_cache(pre.keys, pre.values, sets)
        with padded_heads(padding):
            masked = model(input_ids=ids, position_ids=positions, cache=cache).logits
        cache, _ = build_head_cache(pre.keys, pre.values, sets)
        unmasked = model(input_ids=ids, position_ids=positions, cache=cache).logits
    assert (masked - unmasked).abs().max() > 1e-3


def test_per_head_greedy_tokens_match_the_reference(tiny_loaded, reference_model):
    prompt, _, pre, sel, _ = _selection(tiny_loaded, "kvzip", 0.5, "layer")
    _ref_sets.clear()
    _ref_sets.update({i: list(layer) for i, layer in enumerate(sel.heads)})
    _ref_stream_len[0] = prompt.stream_len
    cloud = Cloud(tiny_loaded)
    ans = cloud.answer_heads(prompt, pre, sel, max_new_tokens=12)
    ref = generate(reference_model, _full_cache(pre), prompt.ids[-1], prompt.stream_len, 12, cloud.stop)
    assert ans.tokens == ref.tokens and len(ans.tokens) > 0
    torch.testing.assert_close(ans.generation.first_logits, ref.first_logits, rtol=1e-5, atol=1e-5)
    assert ans.context_kept == sel.context_kept and ans.kept_positions == len(sel.kept)


def test_one_set_per_head_equals_the_one_set_cache(tiny_loaded):
    """Every head keeping the same set: the per-head path gives the logits of today's one-set cache."""
    model = tiny_loaded.model
    prompt, selector, pre, sel, edge = _selection(tiny_loaded, "q2c", 0.25, "layer")
    one = edge.select(prompt, selector, pre, 0.25)
    ids, positions = torch.tensor([[prompt.ids[-1]]]), torch.tensor([[prompt.stream_len]])
    with torch.inference_mode():
        cache, padding = build_head_cache(pre.keys, pre.values, sel.heads)
        with padded_heads(padding):
            per_head = model(input_ids=ids, position_ids=positions, cache=cache).logits
        kept = one.kept
        pruned = DynamicCache([(k[None][:, :, kept], v[None][:, :, kept]) for k, v in zip(pre.keys, pre.values)])
        one_set = model(input_ids=ids, position_ids=positions, cache=pruned).logits
    torch.testing.assert_close(per_head, one_set, rtol=1e-5, atol=1e-5)  # sdpa with and without a mask: float order


def test_answer_heads_refuses_a_one_set_selection(tiny_loaded):
    prompt, selector, pre, _, edge = _selection(tiny_loaded, "q2c", 0.5, "layer")
    with pytest.raises(ValueError, match="per-head selection"):
        Cloud(tiny_loaded).answer_heads(prompt, pre, edge.select(prompt, selector, pre, 0.5), 4)


def test_selection_bench_pairs_each_variant_with_q2c():
    from kvwire.bench.selection_bench import VARIANTS, summarize

    agree = {"q2c": [0.5, 1.0, 0.0], "kvzip-layer": [1.0, 1.0, 0.5]}
    records = [
        {
            "answers": {
                f"{v}@0.5": {"agreement_f1": agree.get(v, agree["q2c"])[i], "identical": i == 1, "f1": 0.0}
                for v in VARIANTS
            }
        }
        for i in range(3)
    ]
    rows = {r["variant"]: r for r in summarize(records, [0.5])}
    assert rows["kvzip-layer"]["agreement_f1"] == pytest.approx(2.5 / 3, abs=1e-4)
    # paired differences 0.5, 0, 0.5: mean 1/3, SE sqrt(var/n) with var = 1/12
    assert rows["kvzip-layer"]["vs_q2c"] == pytest.approx(1 / 3, abs=1e-4)
    assert rows["kvzip-layer"]["vs_q2c_se"] == pytest.approx(math.sqrt((1 / 12) / 3), abs=1e-4)
    assert rows["q2c"]["vs_q2c"] == 0 and rows["q2c"]["identical"] == pytest.approx(1 / 3, abs=1e-4)


def test_selection_bench_wire_rows_pair_bytes_with_q2c_of_the_same_profile():
    from kvwire.bench.selection_bench import WIRE_VARIANTS, summarize, variant_names

    names = variant_names(["fp16"])
    assert names == [f"{v}/fp16" for v in WIRE_VARIANTS]
    sizes = {"q2c": [100, 200], "kvzip-max": [100, 200], "kvzip-global": [110, 190], "kvzip-matched": [99, 200]}
    records = [
        {
            "answers": {
                f"{v}/fp16@0.5": {
                    "agreement_f1": 1.0,
                    "identical": True,
                    "f1": 0.0,
                    "bytes": sizes[v][i],
                    "kv_bytes": sizes[v][i] - 10,
                }
                for v in WIRE_VARIANTS
            }
        }
        for i in range(2)
    ]
    rows = {r["variant"]: r for r in summarize(records, [0.5], names)}
    # paired bytes ratios 1.1 and 0.95: mean 1.025, SE = |1.1 - 0.95| / 2
    assert rows["kvzip-global/fp16"]["bytes_vs_q2c"] == pytest.approx(1.025, abs=1e-4)
    assert rows["kvzip-global/fp16"]["bytes_vs_q2c_se"] == pytest.approx(0.075, abs=1e-4)
    assert rows["q2c/fp16"]["bytes"] == 150 and rows["q2c/fp16"]["non_kv_share"] == pytest.approx((0.1 + 0.05) / 2)
