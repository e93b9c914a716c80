"""Uncertainty of `kvwire eval`'s columns: paired standard errors against the full-KV answers and a
seeded bootstrap interval for "% of full F1".

Every setting answers the same questions as the full-KV reference, so a setting's difference from
full is measured per question and its standard error is that of the per-question differences
(paired): far smaller than the two columns' own errors when they move together.
"""

from __future__ import annotations

import math

import numpy as np

BOOTSTRAP_DRAWS = 2000  # the 2.5/97.5 percentiles move by < 0.5 points of % between seeds at n = 100
BOOTSTRAP_SEED = 0  # fixed: the same resamples for every setting, and a rerun gives the same interval


def paired_se(values: list[float], reference: list[float]) -> float | None:
    """Standard error of mean(values - reference) over pairs; None with fewer than two pairs."""
    n = len(values)
    if n != len(reference):
        raise ValueError(f"paired values: {n} against {len(reference)}")
    if n < 2:
        return None
    d = np.asarray(values, dtype=float) - np.asarray(reference, dtype=float)
    return float(d.std(ddof=1) / math.sqrt(n))


def bootstrap_pct(
    values: list[float], reference: list[float], draws: int = BOOTSTRAP_DRAWS, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float] | None:
    """95% percentile interval of 100 * mean(values) / mean(reference) over questions resampled in pairs.

    Deterministic: a seeded generator, and for a given n the same resamples for every setting. None
    with fewer than two pairs, or when the reference's mean is 0 in most resamples.
    """
    n = len(values)
    if n != len(reference):
        raise ValueError(f"paired values: {n} against {len(reference)}")
    if n < 2:
        return None
    idx = np.random.default_rng(seed).integers(0, n, size=(draws, n))
    num = np.asarray(values, dtype=float)[idx].mean(axis=1)
    den = np.asarray(reference, dtype=float)[idx].mean(axis=1)
    ok = den > 0
    if ok.sum() < draws / 2:
        return None
    pct = 100 * num[ok] / den[ok]
    lo, hi = np.percentile(pct, [2.5, 97.5])
    return round(float(lo), 2), round(float(hi), 2)
