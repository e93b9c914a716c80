"""The shared matrix of selectors (kvpress's tests/default_presses.py, our way): every registered
selector at its defaults, plus a row per parameter setting worth testing. A new selector is in the
matrix as soon as it is registered; its row here adds parameters and values it must refuse."""

from __future__ import annotations

import pytest

from kvwire.kvcodec.prompt import Prompt
from kvwire.kvcodec.selectors import get_selector, selector_names

# name -> other valid parameters, each run through every matrix test
PARAMETERS: dict[str, list[dict]] = {
    "snapkv": [{"window": 4, "kernel": 3}],
    "random": [{"seed": 7}],
    # chunk 9: a tiny model's context takes several reconstruction passes; a weight: the question's rows too
    "kvzip": [{"chunk": 9, "sink": 0, "reduce": "mean"}, {"question_weight": 1.0}],
}
# name -> parameters __post_init__ must refuse with ConfigError
INVALID: dict[str, list[dict]] = {
    "snapkv": [{"window": 0}, {"kernel": 4}, {"kernel": 2.0}],
    "random": [{"seed": -1}, {"seed": "0"}],
    "kvzip": [{"chunk": 8}, {"sink": -1}, {"reduce": "sum"}, {"question_weight": -1.0}, {"question_weight": True}],
}


def _id(name: str, params: dict) -> str:
    return name + ("(" + ",".join(f"{k}={v!r}" for k, v in params.items()) + ")" if params else "")


def selector_cases() -> list:
    """pytest params (name, params): each registered selector at its defaults, then its PARAMETERS rows."""
    rows = [(name, params) for name in selector_names() for params in [{}, *PARAMETERS.get(name, [])]]
    return [pytest.param(name, params, id=_id(name, params)) for name, params in rows]


def invalid_cases() -> list:
    return [pytest.param(n, p, id=_id(n, p)) for n in selector_names() for p in INVALID.get(n, [])]


def attention_cases() -> list:
    """The cases whose selector asks the prefill for attention rows (checked on a sample prompt)."""
    sample = Prompt(ids=tuple(range(40)), context_start=4, context_end=30)
    return [c for c in selector_cases() if get_selector(c.values[0], **c.values[1]).query_rows(sample) is not None]
