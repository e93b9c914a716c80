"""Token generation from a (possibly pruned) cache with absolute position ids: greedy by default,
sampling (temperature, top-p, seed) on request, each token handed to a callback as it is chosen."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvwire.kvcodec.errors import ConfigError


@dataclass
class Generation:
    tokens: list[int]
    first_logits: torch.Tensor  # logits of the first generated token ([vocab], fp32)
    first_token_s: float
    total_s: float
    steps: int = 0  # forward passes run (the stop token's included): what total_s paid for
    finish_reason: str = "length"  # stop: a stop token; length: max_new_tokens; cancelled: on_token said stop


@dataclass(frozen=True)
class Decoding:
    """How the answer's tokens are chosen and who sees them as they come.

    temperature 0 (the default) is greedy: argmax, bit-identical to a plain greedy loop, no random
    numbers drawn. Above 0 the logits are divided by it and a token is drawn from the smallest set
    whose probability reaches top_p; `seed` makes the draw reproducible (None: a fresh seed).
    on_token(token) is called with every generated token but the stop token; it returns False to
    stop generating (a client that went away, a stop string).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    on_token: Callable[[int], bool] | None = None

    def __post_init__(self):
        if not 0.0 <= self.temperature <= 2.0:
            raise ConfigError(f"temperature={self.temperature} is outside [0, 2]")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p={self.top_p} is outside (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = Decoding()


def eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for src in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(src)
    return ids


def sample(logits: torch.Tensor, decoding: Decoding, generator: torch.Generator) -> int:
    """One token drawn from `logits` ([vocab], fp32) at decoding's temperature, within its top_p nucleus."""
    # shifted first: the largest logit is 0, so a tiny temperature gives 0 and -inf (probability 1 and 0),
    # never inf - inf = nan (schemathesis found temperature=5e-324 a 500)
    probs = torch.softmax((logits.double() - logits.max()) / decoding.temperature, dim=-1)
    if decoding.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep a token while the mass before it is below top_p: the first token always stays
        keep = (sorted_probs.cumsum(-1) - sorted_probs) < decoding.top_p
        sorted_probs = sorted_probs * keep
        return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate(
    model, cache, first_token: int, position: int, max_new_tokens: int, stop: set[int], decoding: Decoding = GREEDY
) -> Generation:
    """Feed `first_token` at absolute `position`, then decode for at most max_new_tokens (greedy unless
    `decoding` samples), calling decoding.on_token with each token.

    The cache may hold fewer entries than `position` (dropped context positions): explicit
    position ids keep RoPE right, which a default based on the cache length would not.
    """
    started = time.perf_counter()
    device = next(model.parameters()).device
    generator = None
    if not decoding.greedy:
        generator = torch.Generator(device=device)
        if decoding.seed is None:
            generator.seed()
        else:
            generator.manual_seed(decoding.seed)
    token, tokens, first_logits, first_s, steps = first_token, [], None, 0.0, 0
    finish = "length"
    for step in range(max_new_tokens):
        steps += 1
        out = model(
            input_ids=torch.tensor([[token]], device=device),
            position_ids=torch.tensor([[position + step]], device=device),
            cache=cache,
            use_cache=True,
        )
        logits = out.logits[0, -1].float()
        if first_logits is None:
            first_logits, first_s = logits.cpu(), time.perf_counter() - started
        token = int(logits.argmax()) if generator is None else sample(logits, decoding, generator)
        if token in stop:
            finish = "stop"
            break
        tokens.append(token)
        if decoding.on_token is not None and decoding.on_token(token) is False:
            finish = "cancelled"
            break
    return Generation(tokens, first_logits, first_s, time.perf_counter() - started, steps, finish)


def greedy(model, cache, first_token: int, position: int, max_new_tokens: int, stop: set[int]) -> Generation:
    """`generate` with argmax decoding and no callback."""
    return generate(model, cache, first_token, position, max_new_tokens, stop)
