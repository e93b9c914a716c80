"""Shared fixtures: tiny models built from a config and a tokenizer trained offline — never downloaded."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One torch thread in the test process and the daemons it starts: the suite's models are tiny, where a second
# thread costs more in synchronisation than it gains (test_per_head + test_modes: 8.7 s with 1 thread, 22.8 s
# with 2, on an idle 2-core host), and on a host loaded by other work the gap grows.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

CORPUS = (
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in France. "
    "They were descended from Norse raiders and pirates from Denmark, Iceland and Norway who, under their leader Rollo, "
    "agreed to swear fealty to King Charles III of West Francia. Question: Who was the leader? Answer: Rollo. "
    "Context: The Eiffel Tower is in Paris. It was built in 1889. The river Seine flows through the city. "
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()-\n"
) * 4
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tokenizer(chat_template: bool):
    """A byte-level BPE tokenizer trained on CORPUS; ChatML specials, optionally a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([CORPUS], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    if chat_template:
        fast.chat_template = CHATML
    return fast


def make_model(tokenizer, layers=4, heads=4, kv_heads=2, head_dim=16, seed=0):
    """A random Llama small enough to run in milliseconds. initializer_range 0.2 makes its logits
    peaked enough that greedy tokens are stable under FP16 rounding of the KV cache."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=heads * head_dim,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=1024,
        initializer_range=0.2,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def _save(path, chat_template=True, **geometry):
    tok = make_tokenizer(chat_template)
    model = make_model(tok, **geometry)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session", autouse=True)
def edge_data_home(tmp_path_factory):
    """XDG_DATA_HOME in a temporary folder for the whole session: an edge-agent a test starts without
    --data-dir keeps its documents there, never in the home folder of whoever runs the tests."""
    before = os.environ.get("XDG_DATA_HOME")
    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("xdg_data"))
    yield os.environ["XDG_DATA_HOME"]
    if before is None:
        os.environ.pop("XDG_DATA_HOME", None)
    else:
        os.environ["XDG_DATA_HOME"] = before


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny Llama (4 layers, 2 KV heads, head_dim 16) with a ChatML chat template."""
    return _save(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_model_dir_no_template(tmp_path_factory) -> str:
    """The same kind of tiny model whose tokenizer has no chat template."""
    return _save(tmp_path_factory.mktemp("tiny_plain"), chat_template=False)


@pytest.fixture(scope="session")
def tiny_other_geometry_dir(tmp_path_factory) -> str:
    """Same tokenizer as tiny_model_dir, different KV geometry (3 layers, 1 KV head, head_dim 32):
    scout mode works with it, kv mode must be refused."""
    return _save(tmp_path_factory.mktemp("tiny_other"), layers=3, heads=2, kv_heads=1, head_dim=32, seed=1)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    from kvwire.kvcodec.models import load_model

    return load_model(tiny_model_dir)


@pytest.fixture(scope="session")
def embedded_loaded():
    """The embedded SmolLM2-135M-Instruct (converted once into the kvwire cache)."""
    from kvwire.kvcodec.models import load_model

    return load_model()
