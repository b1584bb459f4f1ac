"""Eval statistics on hand-made numbers: win-rate, bootstrap intervals, Bradley-Terry, text measures, KL."""

from __future__ import annotations

import math

import pytest
import torch

from alignment import evaluation as ev


def test_win_rate_counts_ties_half():
    assert ev.win_rate([3, 2, 1, 5], [1, 2, 4, 0]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)


def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_data():
    scores, base = [1, 0, 1, 1, 0, 1, 1, 1] * 4, [0] * 32
    lo, hi = ev.bootstrap_ci(scores, base, n=2000)
    assert lo <= ev.win_rate(scores, base) <= hi and 0.5 < lo and hi <= 1.0
    lo2, hi2 = ev.bootstrap_ci(scores * 8, base * 8, n=2000)
    assert hi2 - lo2 < hi - lo
    assert ev.bootstrap_ci([1.0] * 10, [0.0] * 10) == (1.0, 1.0)  # always wins: no spread


def test_grouped_interval_resamples_whole_groups():
    """Pairs of one prompt move together: two prompts, one all right and one all wrong, can only resample to
    0, 1/2 or 1, where the same twelve values taken one by one give a much narrower interval."""
    values, groups = [1.0] * 6 + [0.0] * 6, ["a"] * 6 + ["b"] * 6
    assert ev.grouped_bootstrap_ci(values, groups, n=2000) == (0.0, 1.0)
    lo, hi = ev.grouped_bootstrap_ci(values, n=2000)  # no groups: each value alone
    assert 0.1 < lo < 0.5 < hi < 0.9
    assert ev.grouped_bootstrap_ci([1.0] * 10, ["a", "b"] * 5) == (1.0, 1.0)
    # A group weighs by its pairs: the usual resample (one of each) pools to 9/10, not the group means' 1/2
    assert ev.grouped_bootstrap_ci([1.0] * 9 + [0.0], ["big"] * 9 + ["small"], n=2000, level=0.5) == (0.9, 0.9)


def test_bootstrap_keeps_pairs_together_and_gives_the_95_percent_interval():
    """Each prompt's score and baseline are resampled together: a policy one point above a varying baseline on
    every prompt wins every resample. The interval's level is 95 % unless told: ten prompts, one of them a 1,
    resample to k/10 with k ~ Binomial(10, 0.1), P(k <= 2) = 0.930 and P(k <= 3) = 0.987, so the 97.5th
    percentile is 0.3 and the 75th 0.2 (the 2.5th and 25th are 0: P(k = 0) = 0.349)."""
    assert ev.bootstrap_ci(range(1, 11), range(0, 10)) == (1.0, 1.0)
    assert ev.bootstrap_ci([3.0, 1.0, 7.0, 2.0], [2.0, 0.0, 6.0, 1.0], n=2000, seed=3) == (1.0, 1.0)
    one_in_ten = [0.0] * 9 + [1.0]
    assert ev.bootstrap_ci(one_in_ten, stat="mean", n=2000) == pytest.approx((0.0, 0.3))
    assert ev.bootstrap_ci(one_in_ten, stat="mean", n=2000, level=0.5) == pytest.approx((0.0, 0.2))
    # the same level for a win-rate: nine wins and a loss against a baseline that varies too
    assert ev.bootstrap_ci([2.0] * 9 + [0.0], [1.0] * 9 + [5.0], n=2000) == pytest.approx((0.7, 1.0))


def test_bootstrap_mean_interval():
    lo, hi = ev.bootstrap_ci([0.0, 1.0] * 50, stat="mean", n=2000)
    assert lo < 0.5 < hi and hi - lo < 0.25


def test_bradley_terry_hand_computed():
    # A beats B in 3 of 4 games: the MLE strength ratio is 3, i.e. 400·log10(3) ≈ 190.8 Elo apart.
    games = [("A", "B", 1.0)] * 3 + [("A", "B", 0.0)]
    r = ev.bradley_terry(games, prior=0.0)
    assert r["A"] - r["B"] == pytest.approx(400 * math.log10(3), abs=0.5)
    assert (r["A"] + r["B"]) / 2 == pytest.approx(1000)


def test_bradley_terry_ties_and_transitivity():
    assert ev.bradley_terry([("A", "B", 0.5)] * 4, prior=0.0) == pytest.approx({"A": 1000, "B": 1000})
    r = ev.bradley_terry([("A", "B", 1.0)] * 6 + [("B", "C", 1.0)] * 6 + [("A", "B", 0.0), ("B", "C", 0.0)])
    assert r["A"] > r["B"] > r["C"]
    r = ev.bradley_terry([("A", "B", 1.0)] * 5)  # never loses: the prior keeps it finite
    assert math.isfinite(r["A"]) and r["A"] > r["B"]
    ci = ev.bradley_terry_ci([("A", "B", 1.0)] * 6 + [("A", "B", 0.0)] * 2, n=100)
    assert ci["A"][0] <= ci["A"][1]


def test_bradley_terry_interval_resamples_prompts_not_each_annotators_verdict():
    """10 prompts, A better on 7, five annotators agreeing on each: 50 verdicts that are 10 prompts' worth.
    Resampled one verdict at a time, the interval excludes 1000 (A better for sure); by prompt it is wider."""
    verdicts = [("A", "B", 1.0 if p < 7 else 0.0) for p in range(10) for _ in range(5)]
    prompt = [p for p in range(10) for _ in range(5)]
    loose = ev.bradley_terry_ci(verdicts, n=300)["A"]
    grouped = ev.bradley_terry_ci(verdicts, groups=prompt, n=300)["A"]
    assert loose[0] > 1000 and grouped[0] < 1000 < grouped[1]
    assert grouped[1] - grouped[0] > 1.5 * (loose[1] - loose[0])


def test_distinct_n_and_repetition():
    assert ev.distinct_n(["a b c", "a b d"], 1) == pytest.approx(4 / 6)
    assert ev.distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)
    assert ev.repetition("one two three four five") == 0.0
    assert ev.repetition("a b c d a b c d a b c d") == pytest.approx(1 - 4 / 9)


def test_sequence_kl_matches_the_definition():
    p = torch.tensor([[[math.log(0.5), math.log(0.5)], [math.log(0.9), math.log(0.1)]]])
    q = torch.tensor([[[math.log(0.5), math.log(0.5)], [math.log(0.5), math.log(0.5)]]])
    expected = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    kl = ev.sequence_kl(p, q, torch.tensor([[1.0, 1.0]]))
    assert kl.item() == pytest.approx(expected, abs=1e-6)
    assert ev.sequence_kl(p, q, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-7)
    assert ev.sequence_kl(p, p, torch.ones(1, 2)).item() == pytest.approx(0.0, abs=1e-7)
