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
    ("held", "prompt_len", "want"),
    [
        (167, 168, 167),  # not rounded to blocks: the header has no ids to recompute a remainder from
        (168, 168, 167),  # never the last prompt token: the engine needs its logits
        (300, 20, 19),
        (0, 10, 0),
        (5, 1, 0),
    ],
)
def test_usable_tokens_leave_the_last_prompt_token_to_the_engine(held, prompt_len, want):
    assert usable_tokens(held, prompt_len) == want


def test_matched_prefix_stops_at_the_first_different_id():
    assert matched_prefix([1, 2, 3, 4], [1, 2, 9, 4, 5]) == 2
    assert matched_prefix([1, 2], [1, 2, 3]) == 2
    assert matched_prefix([], [1]) == 0
