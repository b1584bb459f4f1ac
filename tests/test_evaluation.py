"""Eval statistics on hand-made numbers: win-rate, its interval and a grouped one, Bradley-Terry, text measures, KL."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from align import evaluation as ev


def test_win_rate_counts_ties_half():
    assert ev.win_rate([3, 2, 1, 5], [1, 2, 4, 0]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert ev.win_counts([3, 2, 1, 5], [1, 2, 4, 0]) == {"wins": 2, "ties": 1, "losses": 1}


def test_win_rate_interval_is_wilsons_and_never_a_point():
    """8 wins of 8 is not [100 %, 100 %] (the percentile bootstrap's: every resample wins 8 of 8) but Wilson's
    [67.6 %, 100 %]; a tie counts half, as in the win-rate; more prompts, a narrower interval."""
    assert ev.win_rate_ci([1.0] * 8, [0.0] * 8) == pytest.approx((0.6756, 1.0), abs=1e-4)
    assert ev.win_rate_ci([0.0] * 8, [1.0] * 8) == pytest.approx((0.0, 0.3244), abs=1e-4)
    # 6 wins and 2 ties of 8 is a rate of 7/8: Wilson's 95 % for 7 of 8 is [0.529, 0.978]
    assert ev.win_rate_ci([1.0] * 6 + [0.0] * 2, [0.0] * 6 + [0.0] * 2) == pytest.approx((0.5291, 0.9776), abs=1e-4)
    scores, base = [1, 0, 1, 1, 0, 1, 1, 1] * 4, [0] * 32
    lo, hi = ev.win_rate_ci(scores, base)
    assert lo <= ev.win_rate(scores, base) <= hi and 0.5 < lo and hi < 1.0
    lo2, hi2 = ev.win_rate_ci(scores * 8, base * 8)
    assert hi2 - lo2 < hi - lo


def test_a_verdict_needs_the_sign_test_too():
    """By Wilson's interval alone, two equal policies (each prompt a fair coin, no ties) "differ" 12.5 % of the
    time at 4 prompts, 7.7 % at 16 and 5.9 % at 48; with the exact sign test under 0.05 as well, under 5 %."""
    assert ev.sign_test(4, 0) == ev.sign_test(0, 4) == pytest.approx(0.125)
    assert ev.sign_test(38, 9) == pytest.approx(2.49e-5, rel=1e-2) and ev.sign_test(24, 24) == 1.0
    assert ev.sign_test(0, 0) == 1.0
    for n, wilson_alone in ((4, 0.125), (16, 0.0768), (48, 0.0595)):
        chance = [math.comb(n, w) / 2 ** n for w in range(n + 1)]
        cis = [ev.wilson_interval(w / n, n) for w in range(n + 1)]
        assert sum(c for c, (lo, hi) in zip(chance, cis, strict=True) if lo > 0.5 or hi < 0.5) \
            == pytest.approx(wilson_alone, abs=1e-4)
        said = [ev.verdict(ci, ev.sign_test(w, n - w)) for w, ci in enumerate(cis)]
        assert sum(c for c, v in zip(chance, said, strict=True) if v != "is not distinguishable from") < 0.05
    assert ev.verdict((0.51, 1.0), 0.125) == "is not distinguishable from"
    assert (ev.verdict((0.67, 0.89), 0.001), ev.verdict((0.1, 0.3), 0.001)) == ("beats", "loses to")
    # without counts, the worst p over the ties the win-rate allows: 7/8 of 8 is 7 wins and a loss (p 0.070), or
    # 6 wins and 2 ties (p 0.031)
    assert ev.sign_test_bound(7 / 8, 8) == pytest.approx(ev.sign_test(7, 1)) == pytest.approx(0.0703, abs=1e-4)
    assert ev.sign_test_bound(0.5, 4) == 1.0


def test_student_t_quantiles():
    for df, t in ((1, 12.7062), (2, 4.3027), (5, 2.5706), (10, 2.2281), (30, 2.0423)):
        assert ev._t_quantile(0.95, df) == pytest.approx(t, abs=1e-4)
    assert ev._t_quantile(0.90, 4) == pytest.approx(2.1318, abs=1e-4)


def test_grouped_interval_counts_prompts_not_pairs():
    """Pairs of one prompt move together: two prompts, one all right and one all wrong, say almost nothing (the
    interval spans nearly 0 to 1), where the same twelve values taken one by one give a much narrower interval."""
    values, groups = [1.0] * 6 + [0.0] * 6, ["a"] * 6 + ["b"] * 6
    lo, hi = ev.grouped_proportion_ci(values, groups)
    assert lo < 0.02 and hi > 0.98
    assert ev.grouped_proportion_ci(values) == pytest.approx(ev.wilson_interval(0.5, 12))  # each value alone: Wilson's
    assert 0.2 < ev.grouped_proportion_ci(values)[0] < 0.5
    assert ev.grouped_proportion_ci([1.0], ["a"]) == (0.0, 1.0)  # one prompt: nothing known of the next
    # All right is not a point: at 0 or 1 there is no spread to measure, so each prompt counts as one trial (the
    # largest design effect), never narrower than a score one pair short of it on the same prompts
    lo, hi = ev.grouped_proportion_ci([1.0] * 10, ["a", "b"] * 5)
    assert (lo, hi) == pytest.approx(ev.wilson_interval(1.0, 2)) and hi == 1.0
    prompts = [f"p{i}" for i in range(6) for _ in range(5)][:27]  # 27 held-out pairs from 6 prompts
    perfect = ev.grouped_proportion_ci([1.0] * 27, prompts)
    two_wrong = ev.grouped_proportion_ci([0.0, 0.0] + [1.0] * 25, prompts)  # both on the first prompt
    assert perfect == pytest.approx(ev.wilson_interval(1.0, 6)) and perfect[0] >= two_wrong[0]
    assert ev.grouped_proportion_ci([0.0] * 27, prompts) == pytest.approx(ev.wilson_interval(0.0, 6))
    # A group weighs by its pairs: the estimate inside is 9/10, not the group means' 1/2
    lo, hi = ev.grouped_proportion_ci([1.0] * 9 + [0.0], ["big"] * 9 + ["small"], level=0.5)
    assert lo < 0.9 < hi


def test_grouped_interval_covers_at_the_reward_models_sizes():
    """6 prompts of 4-5 pairs, each prompt's accuracy drawn from Beta(3, 1) (mean 0.75): the 95 % interval holds
    0.75 in at least 93 % of 400 draws (the percentile bootstrap that it replaced: 85 %)."""
    rng = np.random.default_rng(123)
    hits = 0
    for _ in range(400):
        values, groups = [], []
        for g, (k, a) in enumerate(zip(rng.choice([4, 5], 6), rng.beta(3, 1, 6), strict=True)):
            values += list((rng.random(k) < a).astype(float))
            groups += [g] * k
        lo, hi = ev.grouped_proportion_ci(values, groups)
        hits += lo <= 0.75 <= hi
    assert hits / 400 >= 0.93


def test_grouped_interval_covers_where_a_prompts_pairs_go_together():
    """12 prompts of 6 pairs, a prompt's pairs all right (probability 0.9) or all wrong: every prompt right in 28 %
    of draws, where the pairs counted as independent put the interval above 0.9 (coverage 0.72)."""
    rng = np.random.default_rng(7)
    groups = [g for g in range(12) for _ in range(6)]
    hits = 0
    for _ in range(400):
        right = rng.random(12) < 0.9
        lo, hi = ev.grouped_proportion_ci([float(right[g]) for g in groups], groups)
        hits += lo <= 0.9 <= hi
    assert hits / 400 >= 0.93, hits


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


def test_bradley_terry_interval_is_anchored_to_the_baseline():
    """Ratings put the baseline at 1000, in the estimate and in every resample: two verdicts on a third policy
    (absent from many resamples) leave dpo's rating and interval where its own verdicts put them. Centred on
    the mean of the players each resample held, dpo's 1060 [1000, 1120] became 902 [802, 1081]."""
    rng = np.random.default_rng(0)
    two = [("dpo", "sft", float(rng.random() < 0.7)) for _ in range(30)]
    groups = [f"p{i}" for i in range(30)]
    three, groups3 = two + [("ppo", "sft", 1.0)] * 2, groups + ["q0", "q1"]
    alone, ci = ev.bradley_terry(two, anchor="sft"), ev.bradley_terry_ci(two, groups=groups, n=400, anchor="sft")
    more, ci3 = ev.bradley_terry(three, anchor="sft"), ev.bradley_terry_ci(three, groups=groups3, n=400, anchor="sft")
    assert alone["sft"] == more["sft"] == 1000 and ci["sft"] == ci3["sft"] == (1000, 1000)
    assert more["dpo"] == pytest.approx(alone["dpo"], abs=5)
    assert ci3["dpo"] == pytest.approx(ci["dpo"], abs=15)
    assert ci["dpo"][0] <= alone["dpo"] <= ci["dpo"][1] and ci3["ppo"][0] > 1000
    # the same differences as the mean-centred ratings; without the anchor among the players, centred as before
    plain = ev.bradley_terry(two)
    assert alone["dpo"] - alone["sft"] == pytest.approx(plain["dpo"] - plain["sft"])
    assert ev.bradley_terry(two, anchor="grpo") == pytest.approx(plain)


def test_distinct_n_and_repetition():
    assert ev.distinct_n(["a b c", "a b d"], 1) == pytest.approx(4 / 6)
    assert ev.distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)  # 3 distinct of 4 bigrams (of 6 words)
    assert ev.distinct_n(["a b"], 2) == 1.0  # no bigram repeats: 1 (Li et al.'s words denominator: 1/2)
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
    # a vocabulary entry both models mask with -inf adds nothing (0 * (-inf - -inf) was NaN)
    masked = torch.full((1, 2, 1), -math.inf)
    assert ev.sequence_kl(torch.cat([p, masked], -1), torch.cat([q, masked], -1),
                          torch.ones(1, 2)).item() == pytest.approx(expected, abs=1e-6)
