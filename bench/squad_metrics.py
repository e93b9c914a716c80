"""SQuAD answer scoring: the official v1.1 normalization, token F1 and exact match.

Follows the official evaluate-v1.1.py: lower-case, drop punctuation, drop the articles a/an/the,
collapse whitespace; F1 is the harmonic mean of token precision and recall; a prediction is scored
against every gold answer and the best score counts.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, remove punctuation and articles, collapse whitespace (official SQuAD order)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def f1_score(prediction: str, gold: str) -> float:
    """Token-overlap F1 of two answers after normalization (0.0 when either side is empty)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)  # both empty counts as a match, as in SQuAD v2
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def best_over_golds(metric, prediction: str, golds: list[str]) -> float:
    """The best score of `prediction` against any gold answer (0.0 when there are none)."""
    return max((metric(prediction, g) for g in golds), default=0.0)
