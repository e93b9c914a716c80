"""Key re-rotation (kvcodec/rerotate.py) against two references: transformers' own RoPE applied at the
target positions, and the model's own layer-0 keys computed at them."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvwire.kvcodec.rerotate import rerotate_keys, rope_inv_freq


def _rope(loaded, x: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """x [heads, n, head_dim] rotated by the model's own rotary embedding at `positions`."""
    cos, sin = loaded.model.model.rotary_emb(x[None], torch.tensor([positions]))
    k, _ = apply_rotary_pos_emb(x[None], x[None], cos, sin)
    return k[0]


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 5e-4), (torch.bfloat16, 3e-2)])
def test_rerotation_matches_rope_applied_at_the_target_positions(tiny_loaded, dtype, atol):
    # fp32: transformers computes the angle at position 4095 in fp32 itself (~4095 x 6e-8 rad off)
    head_dim = tiny_loaded.model.config.hidden_size // tiny_loaded.model.config.num_attention_heads
    raw = torch.randn(2, 6, head_dim, generator=torch.Generator().manual_seed(0))
    src, dst = [0, 3, 4, 17, 900, 4095], [0, 1, 2, 3, 4, 5]
    moved = rerotate_keys(
        _rope(tiny_loaded, raw, src).to(dtype), torch.tensor(src), torch.tensor(dst), rope_inv_freq(tiny_loaded.model)
    )
    assert moved.dtype == dtype
    torch.testing.assert_close(moved.float(), _rope(tiny_loaded, raw, dst), atol=atol, rtol=0)


def test_rerotated_layer0_keys_are_the_models_own_keys_at_contiguous_positions(tiny_loaded):
    """Layer 0's keys before RoPE depend on the tokens alone, so its cache at sparse positions, re-rotated,
    must equal its cache computed at contiguous ones (deeper layers differ: attention saw other positions)."""
    ids = torch.tensor([[5, 9, 11, 3, 7, 2, 8]])
    sparse = [0, 2, 5, 6, 10, 11, 40]
    with torch.no_grad():
        at_sparse = tiny_loaded.model(input_ids=ids, position_ids=torch.tensor([sparse]), use_cache=True).cache
        at_dense = tiny_loaded.model(input_ids=ids, use_cache=True).cache
    k = rerotate_keys(at_sparse.layers[0].keys, torch.tensor(sparse), torch.arange(7), rope_inv_freq(tiny_loaded.model))
    torch.testing.assert_close(k, at_dense.layers[0].keys, atol=2e-5, rtol=0)
    assert not torch.allclose(at_sparse.layers[0].keys, at_dense.layers[0].keys, atol=1e-3)  # the test can fail


def test_same_positions_change_nothing_and_partial_rotary_keeps_the_rest():
    keys = torch.randn(3, 4, 8)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 4, 2).float() / 4))  # rotary dim 4 of head_dim 8
    pos = torch.tensor([1, 5, 9, 20])
    torch.testing.assert_close(rerotate_keys(keys, pos, pos, inv_freq), keys, atol=1e-6, rtol=0)
    moved = rerotate_keys(keys, pos, torch.arange(4), inv_freq)
    assert torch.equal(moved[..., 4:], keys[..., 4:])
    assert not torch.allclose(moved[..., :4], keys[..., :4])


def test_a_model_without_rope_is_refused():
    with pytest.raises(ValueError, match="no rotary embedding"):
        rope_inv_freq(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="rotary dim 16 > head_dim 8"):
        rerotate_keys(torch.zeros(1, 1, 8), torch.zeros(1), torch.zeros(1), torch.ones(8))
