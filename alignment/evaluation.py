"""Statistics for `align eval`: win-rates with bootstrap intervals, Bradley-Terry ratings,
KL from the reference, and the text measures that catch degenerate policies.

All pure functions on plain lists/tensors, so each is checked against hand-computed values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def win_rate(scores: Sequence[float], baseline: Sequence[float]) -> float:
    """Fraction of prompts where the policy's score beats the baseline's; a tie counts half."""
    a, b = np.asarray(scores, float), np.asarray(baseline, float)
    return float(np.mean((a > b) + 0.5 * (a == b)))


def bootstrap_ci(scores: Sequence[float], baseline: Sequence[float] | None = None, *, n: int = 1000,
                 seed: int = 0, level: float = 0.95, stat: str = "win_rate") -> tuple[float, float]:
    """Percentile interval over prompts resampled with replacement (pairs kept together).

    stat="win_rate" needs a baseline; stat="mean" is the mean of `scores`.
    """
    rng = np.random.default_rng(seed)
    a = np.asarray(scores, float)
    b = np.asarray(baseline, float) if baseline is not None else None
    idx = rng.integers(0, len(a), size=(n, len(a)))
    if stat == "win_rate":
        wins = (a[idx] > b[idx]) + 0.5 * (a[idx] == b[idx])
        values = wins.mean(axis=1)
    else:
        values = a[idx].mean(axis=1)
    lo, hi = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def grouped_bootstrap_ci(values: Sequence[float], groups: Sequence[object] | None = None, *, n: int = 1000,
                         seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of `values`, resampling whole groups with replacement.

    A reward model's held-out pairs are not independent: a ranking of K answers to one prompt gives
    K(K-1)/2 pairs that share those answers, so an interval over pairs is too narrow. Each group (a
    prompt) is resampled with all its pairs; without `groups`, each value is its own group.
    """
    labels = list(range(len(values))) if groups is None else list(groups)
    index = {g: i for i, g in enumerate(dict.fromkeys(labels))}
    sums, counts = np.zeros(len(index)), np.zeros(len(index))
    for value, label in zip(values, labels, strict=True):
        sums[index[label]] += value
        counts[index[label]] += 1
    idx = np.random.default_rng(seed).integers(0, len(index), size=(n, len(index)))
    means = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def bradley_terry(comparisons: Sequence[tuple[str, str, float]], *, iters: int = 200,
                  prior: float = 0.1) -> dict[str, float]:
    """Bradley-Terry strengths from (a, b, outcome) with outcome 1 = a wins, 0 = b wins, 0.5 = tie.

    Minorisation-maximisation (Hunter 2004) with a small symmetric prior (`prior` virtual ties
    against every other player) so a player who never loses still has a finite rating.
    Returned as Elo-like ratings: 400·log10(strength) centred to mean 1000.
    """
    players = sorted({p for a, b, _ in comparisons for p in (a, b)})
    if not players:
        return {}
    pos = {p: i for i, p in enumerate(players)}
    k = len(players)
    wins = np.full((k, k), prior / 2)  # wins[i, j]: (fractional) wins of i over j
    np.fill_diagonal(wins, 0)
    for a, b, outcome in comparisons:
        wins[pos[a], pos[b]] += outcome
        wins[pos[b], pos[a]] += 1 - outcome
    games = wins + wins.T
    strength = np.ones(k)
    for _ in range(iters):
        denom = (games / (strength[:, None] + strength[None, :])).sum(axis=1)
        strength = wins.sum(axis=1) / denom
        strength /= np.exp(np.mean(np.log(strength)))
    ratings = 400 * np.log10(strength)
    ratings += 1000 - ratings.mean()
    return {p: float(ratings[pos[p]]) for p in players}


def bradley_terry_ci(comparisons: Sequence[tuple[str, str, float]], *, groups: Sequence[Any] | None = None,
                     n: int = 200, seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of the Bradley-Terry ratings. With `groups` (a key per comparison, such
    as its prompt) whole groups are resampled, as grouped_bootstrap_ci does: several annotators' verdicts on
    one A/B task, or one prompt's tasks, are not independent comparisons."""
    rng = np.random.default_rng(seed)
    comparisons = list(comparisons)
    units: dict[Any, list[int]] = {}
    for i, key in enumerate(groups if groups is not None else range(len(comparisons))):
        units.setdefault(key, []).append(i)
    members = list(units.values())
    samples: dict[str, list[float]] = {}
    for _ in range(n):
        pick = rng.integers(0, len(members), len(members))
        for p, r in bradley_terry([comparisons[i] for u in pick for i in members[u]]).items():
            samples.setdefault(p, []).append(r)
    q = [(1 - level) / 2, 1 - (1 - level) / 2]
    return {p: tuple(float(x) for x in np.quantile(v, q)) for p, v in samples.items()}


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams / all n-grams over every response of a policy (Li et al. 2016)."""
    grams = [tuple(words[i:i + n]) for t in texts for words in [t.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition(text: str, n: int = 4) -> float:
    """Share of a response's n-grams that repeat an earlier one: 0 for none, → 1 for loops."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def sequence_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(policy ‖ ref) of the next-token distributions, summed over each response's tokens.

    Computed from the full distributions at every position of the response (not the single-sample
    log-ratio): exact along those prefixes, with far less variance. It estimates the sequence KL
    without bias only when the responses are the policy's own samples at temperature 1 with no
    top-p or top-k (recipes/evaluate.sampled_kl); along a greedy answer it is one fixed path's
    figure. Shapes: logits [B, T, V], mask [B, T].
    """
    logp = torch.log_softmax(policy_logits.float(), dim=-1)
    logq = torch.log_softmax(ref_logits.float(), dim=-1)
    per_token = (logp.exp() * (logp - logq)).sum(-1)
    return (per_token * mask).sum(-1)


def mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan
