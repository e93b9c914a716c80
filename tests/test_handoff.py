"""The KV handoff file a serving engine's connector reads (kvcodec/handoff.py) and its block arithmetic."""

from __future__ import annotations

import pytest
import torch

from kvwire.kvcodec.handoff import (
    Handoff,
    handoff_token_ids,
    matched_prefix,
    read_handoff,
    usable_tokens,
    write_handoff,
)


def test_roundtrip_is_exact_and_the_ids_read_without_the_tensors(tmp_path):
    k, v = torch.randn(3, 2, 5, 8), torch.randn(3, 2, 5, 8).to(torch.bfloat16)
    path = tmp_path / "kv.safetensors"
    write_handoff(path, Handoff([5, 6, 7, 8, 9], k, v.float()))
    back = read_handoff(path)
    assert back.token_ids == [5, 6, 7, 8, 9] and handoff_token_ids(path) == [5, 6, 7, 8, 9]
    assert torch.equal(back.keys, k) and torch.equal(back.values, v.float())
    assert not (tmp_path / "kv.safetensors.tmp").exists()


def test_a_foreign_file_and_inconsistent_shapes_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"keys": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a kvwire-handoff-1 file"):
        handoff_token_ids(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="3 KV positions for 2 token ids"):
        Handoff([1, 2], torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4))
    with pytest.raises(ValueError, match="want equal 4-d"):
        Handoff([1], torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 2))


@pytest.mark.parametrize(
    ("held", "prompt_len", "block", "want"),
    [
        (167, 168, 32, 160),  # whole blocks only
        (168, 168, 32, 160),  # never the last prompt token: the engine needs its logits
        (65, 65, 32, 64),  # 64 + 1: the last token is left to compute, both blocks are whole
        (64, 64, 32, 32),  # 63 usable: one whole block
        (31, 200, 32, 0),  # less than a block: nothing (a partial block would be a false hit)
        (0, 10, 32, 0),
    ],
)
def test_usable_tokens_are_whole_blocks_leaving_a_prompt_token(held, prompt_len, block, want):
    assert usable_tokens(held, prompt_len, block) == want


def test_matched_prefix_stops_at_the_first_different_id():
    assert matched_prefix([1, 2, 3, 4], [1, 2, 9, 4, 5]) == 2
    assert matched_prefix([1, 2], [1, 2, 3]) == 2
    assert matched_prefix([], [1]) == 0
