"""Selectors: which context positions to keep. One file per selector; each registers itself."""

from kvwire.kvcodec.selectors.base import (
    HEAD_BUDGETS,
    ScoreInputs,
    Selection,
    Selector,
    check_int,
    check_retention,
    context_budget,
    full_selection,
    head_selection,
    top_k_selection,
)
from kvwire.kvcodec.selectors.registry import (
    DEFAULT_SELECTOR,
    discover,
    get_selector,
    register_selector,
    selector_names,
    selector_parameters,
)

discover()

__all__ = [
    "HEAD_BUDGETS",
    "DEFAULT_SELECTOR",
    "ScoreInputs",
    "Selection",
    "Selector",
    "check_int",
    "check_retention",
    "context_budget",
    "full_selection",
    "head_selection",
    "top_k_selection",
    "get_selector",
    "register_selector",
    "selector_names",
    "selector_parameters",
]
