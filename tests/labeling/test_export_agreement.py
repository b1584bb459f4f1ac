"""Export rules and agreement statistics on hand-made rankings with hand-computed answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from align.labeling import agreement, handlers
from align.labeling.export import build_pairs, dense_ranks, export_preferences, task_pairs
from align.labeling.scorers import ACKNOWLEDGE, resolve_scorer, support_style
from align.labeling.simulate import ranks_from_scores, simulate
from align.preferences import load_preferences


def rows(ranks_by_annotator: dict[str, list[int]], flags: dict[str, list[str]] | None = None, task_id: int = 1):
    texts = ["A: thanks, open Settings.", "B: no.", "C: open Settings > Sync.", "D: sorry, try again."]
    return [{"task_id": task_id, "batch": "round-0", "round": 0, "kind": "ranking", "prompt": f"How do I sync? {task_id}",
             "responses": [{"text": t, "meta": {"policy": "runs/q/sft"}} for t in texts], "source": {},
             "annotator": a, "ranks": r, "flags": (flags or {}).get(a, []), "rationale": "", "seconds": 1.0,
             "is_gold": False} for a, r in ranks_by_annotator.items()]


def pairs_of(result) -> set[tuple[str, str]]:
    return {(p["chosen"][0]["content"][0], p["rejected"][0]["content"][0]) for p in result}


def test_one_ranking_with_a_tie_gives_exactly_the_ordered_pairs():
    pairs, summary = build_pairs(rows({"ann": [1, 3, 2, 2]}))
    assert pairs_of(pairs) == {("A", "B"), ("A", "C"), ("A", "D"), ("C", "B"), ("D", "B")}
    assert summary["pairs"] == 5 and summary["dropped_ties"] == 1  # C = D
    margins = {(p["chosen"][0]["content"][0], p["rejected"][0]["content"][0]): p["margin"] for p in pairs}
    assert margins[("A", "B")] == 2 and margins[("C", "B")] == 1
    assert pairs[0]["prompt"] == [{"role": "user", "content": "How do I sync? 1"}] and pairs[0]["agreement"] == 1.0
    kept, summary = build_pairs(rows({"ann": [1, 3, 2, 2]}), ties="margin0")
    assert len(kept) == 6 and summary["kept_ties"] == 1


def test_the_margin_is_the_same_however_a_tie_is_numbered():
    # A = B > C > D, written as the app's example (1, 1, 3, 4) or densely (1, 1, 2, 3): neighbours are 1 apart.
    for ranks in ([1, 1, 3, 4], [1, 1, 2, 3]):
        margins = {(p["chosen"][0]["content"][0], p["rejected"][0]["content"][0]): p["margin"]
                   for p in build_pairs(rows({"ann": ranks}))[0]}
        assert margins == {("A", "C"): 1, ("B", "C"): 1, ("A", "D"): 2, ("B", "D"): 2, ("C", "D"): 1}, ranks
    # one best, three tied: 1, 4, 4, 4 is 1, 2, 2, 2
    assert {m for *_, m in task_pairs([dense_ranks([1, 4, 4, 4])])} == {1}
    assert dense_ranks([1, 1, 3, 4]) == [1, 1, 2, 3] and dense_ranks([2, 1, 4, 3]) == [2, 1, 4, 3]


def test_dawid_skene_margin_and_agreement_leave_out_the_annotator_it_distrusts():
    """good ranks A > B > C > D on 20 tasks, adv the reverse; 6 tasks are gold. The posterior follows good, but the
    margins and agreement were every annotator's mean: each pair had margin 0 and agreement 0, so use_margin trained
    nothing and min_agreement dropped every task the posterior had settled. They weigh each annotator by their vote
    weight now (adv's is 0); majority, which trusts nobody more, is as it was."""
    ranked = [r for t in range(20) for r in rows({"good": [1, 2, 3, 4], "adv": [4, 3, 2, 1]}, task_id=t)]
    gold = {t: [1, 2, 3, 4] for t in range(14, 20)}
    for r in ranked:
        r["is_gold"] = r["task_id"] in gold
    pairs, summary = build_pairs(ranked, combine="dawid_skene", gold=gold, min_agreement=0.5)
    assert summary["reliability"]["annotators"]["adv"]["weight"] == 0 and summary["dropped_low_agreement"] == 0
    assert len(pairs) == 14 * 6 and all(p["p_chosen"] > 0.9 and p["agreement"] == 1.0 for p in pairs)
    margins = {(p["chosen"][0]["content"][0], p["rejected"][0]["content"][0]): p["margin"] for p in pairs[:6]}
    assert margins == {("A", "B"): 1, ("A", "C"): 2, ("A", "D"): 3, ("B", "C"): 1, ("B", "D"): 2, ("C", "D"): 1}
    assert {(p["votes_chosen"], p["votes_rejected"]) for p in pairs} == {(1, 1)}  # counts of people, not weights
    majority, summary = build_pairs(ranked, gold=gold, ties="margin0")
    assert {(p["margin"], p["agreement"]) for p in majority} == {(0.0, 0.0)} and summary["kept_ties"] == 14 * 6
    # weighted agreement by hand: pairs of annotators count by the product of their weights
    a, b, c = [1, 2, 3], [1, 3, 2], [3, 2, 1]
    assert agreement.task_agreement([a, b, c], [2.0, 1.0, 0.0]) == pytest.approx(2 / 3)  # a-b only
    assert agreement.task_agreement([a, b, c], [1.0, 1.0, 1.0]) == agreement.task_agreement([a, b, c])
    assert agreement.task_agreement([a, c], [1.0, 0.0]) == 1.0 and agreement.task_agreement([a, c], [0, 0]) == 0.0


def test_two_annotators_majority_agreement_and_flags():
    # x: A > C > D > B ; y: A > D > C > B. They disagree on C vs D only: 5 of 6 pairs agree.
    pairs, summary = build_pairs(rows({"x": [1, 4, 2, 3], "y": [1, 4, 3, 2]}))
    assert pairs_of(pairs) == {("A", "B"), ("A", "C"), ("A", "D"), ("C", "B"), ("D", "B")}  # C/D: no majority
    assert summary["mean_agreement"] == pytest.approx(5 / 6)
    assert all(p["agreement"] == pytest.approx(5 / 6) and p["annotators"] == ["x", "y"] for p in pairs)
    assert build_pairs(rows({"x": [1, 4, 2, 3], "y": [1, 4, 3, 2]}), min_agreement=0.9)[1]["dropped_low_agreement"] == 1
    flagged, summary = build_pairs(rows({"x": [1, 4, 2, 3], "y": [1, 2, 3, 4]}, flags={"y": ["all_bad"]}),
                                   flagged="drop")
    assert summary["dropped_flagged"] == 2 and flagged == []  # the task's every ranking (test below)
    # flagged=drop under dawid_skene too: two people flagging "all are bad" in the reverse order of the third's
    # ranking decided (and reversed) each of the third's pairs through the posterior, at p_chosen 0.94 with 0 votes;
    # an unflagged task (2) of the same people keeps x's order: flagged rankings are no votes in the estimate.
    data = rows({"x": [1, 4, 2, 3], "y": [3, 2, 4, 1], "z": [3, 2, 4, 1]}, flags={"y": ["all_bad"], "z": ["unsafe"]})
    clean = rows({"x": [1, 4, 2, 3]}, task_id=2)
    for combine in ("majority", "dawid_skene"):
        flagged, summary = build_pairs(data + clean, combine=combine, flagged="drop")
        assert summary["dropped_flagged"] == 3 and pairs_of(flagged) == pairs_of(build_pairs(clean)[0]), combine
        assert all(p["votes_chosen"] == 1 and p["votes_rejected"] == 0 and p["task_id"] == "2" for p in flagged)
    assert agreement.rankings_for_reliability(data, flagged="drop") == data[:1]


def test_flagged_drop_leaves_out_the_other_rankings_of_a_flagged_task():
    """x flags B ("B: no.") unsafe and ranks it last; y, who missed it, ranks it first. flagged=drop dropped x's
    ranking alone, and y's made B the chosen reply of three pairs with `flag` "" (nothing to filter on), where
    flagged=keep ties them: the setting meant to keep flagged replies out of training let the unsafe one win."""
    data = rows({"x": [1, 4, 2, 3], "y": [2, 1, 3, 4]}, flags={"x": ["unsafe"]})
    kept, _ = build_pairs(data)
    assert ("B", "A") not in pairs_of(kept) and {p["flag"] for p in kept} == {"unsafe"}
    dropped, summary = build_pairs(data, flagged="drop")
    assert dropped == [] and summary["dropped_flagged"] == 2 and summary["tasks"] == 0


def test_a_reply_flagged_unsafe_is_never_chosen_over_one_nobody_flagged():
    """x and z rank B ("B: no.") first; y flags B unsafe (unsafe:1) and ranks it last. The ranking-level flag could
    not say which reply was unsafe, so the majority made B the chosen side of three pairs (flag "unsafe" on every
    pair of the task alike), and flagged=drop threw away the task's three pairs without B too. Now one annotator's
    flag is enough (the conservative rule): under keep B is the rejected side against every reply nobody flagged,
    whatever the ranks said (votes and margin as they were, p_chosen 1, flag rejected_unsafe); under drop only the
    pairs with B go. The estimate reads the rankings as given: dawid_skene's other pairs are majority's."""
    data = rows({"x": [2, 1, 3, 4], "z": [2, 1, 4, 3], "y": [1, 4, 2, 3]}, flags={"y": ["unsafe:1"]})
    plain = rows({"x": [2, 1, 3, 4], "z": [2, 1, 4, 3], "y": [1, 4, 2, 3]})
    assert {("B", "A"), ("B", "C"), ("B", "D")} <= pairs_of(build_pairs(plain)[0])  # what the ranks alone say
    for combine in ("majority", "dawid_skene"):
        kept, summary = build_pairs(data, combine=combine)
        assert pairs_of(kept) == {("A", "B"), ("C", "B"), ("D", "B"), ("A", "C"), ("A", "D"), ("C", "D")}, combine
        ruled = [p for p in kept if p["rejected"][0]["content"][0] == "B"]
        assert {p["flag"] for p in ruled} == {"rejected_unsafe,unsafe"} and not any(p["tie"] for p in ruled)
        assert {(p["votes_chosen"], p["votes_rejected"]) for p in ruled} == {(1, 2)}  # counted as they were
        assert {p["flag"] for p in kept if p not in ruled} == {"unsafe"}
        assert (summary["unsafe_replies"], summary["unsafe_pairs"], summary["unsafe_overridden"]) == (1, 3, 3)
        if combine == "dawid_skene":
            assert {(p["p_chosen"], p["weight"]) for p in ruled} == {(1.0, 1.0)}
            assert all(p["p_chosen"] < 1 for p in kept if p not in ruled)
        dropped, summary = build_pairs(data, combine=combine, flagged="drop")
        assert pairs_of(dropped) == {("A", "C"), ("A", "D"), ("C", "D")}, combine
        assert (summary["dropped_unsafe"], summary["dropped_flagged"], summary["tasks"]) == (3, 0, 1)
    assert agreement.rankings_for_reliability(data, flagged="drop") == data  # a vote on the pairs it leaves
    # Two flagged replies keep the ranks' order between them (flag chosen_unsafe, to filter on), or go under drop
    both = rows({"x": [2, 1, 3, 4], "z": [2, 1, 4, 3], "y": [1, 4, 2, 3]}, flags={"y": ["unsafe:1", "unsafe:3"]})
    kept, summary = build_pairs(both)
    assert ("B", "D") in pairs_of(kept) and ("A", "B") in pairs_of(kept) and ("C", "D") in pairs_of(kept)
    assert next(p["flag"] for p in kept if pairs_of([p]) == {("B", "D")}) == "chosen_unsafe,unsafe"
    assert summary["unsafe_replies"] == 2 and pairs_of(build_pairs(both, flagged="drop")[0]) == {("A", "C")}
    # A ranking-level flag (all_bad, or unsafe naming no reply: the app before per-reply flags) still drops the
    # task whole under drop, whatever else it holds
    mixed = rows({"x": [2, 1, 3, 4], "y": [1, 4, 2, 3]}, flags={"x": ["all_bad"], "y": ["unsafe:1"]})
    assert build_pairs(mixed, flagged="drop")[0] == [] and build_pairs(mixed, flagged="drop")[1]["dropped_flagged"] == 2


def test_flagged_rankings_and_pairs_count_flags_on_the_whole_ranking_only():
    """flagged_pairs counted every pair of a task with a reply flagged unsafe, so the Export button said "kept 6 pairs
    from 1 flagged rankings (export.flagged=keep; ... flagged=drop leaves them out)" under drop too, and under keep
    drop would not leave them out (it keeps the pairs of two unflagged replies). They count the flags on a whole
    ranking (all_bad, unsafe naming no reply), which drop leaves out with their task; a reply's flag is unsafe_*'s."""
    from align.labeling.app import _export_summary

    per_reply = rows({"x": [2, 1, 3, 4], "y": [1, 4, 2, 3]}, flags={"y": ["unsafe:1"]})
    for flagged in ("keep", "drop"):
        pairs, summary = build_pairs(per_reply, flagged=flagged)
        assert (summary["flagged_rankings"], summary["flagged_pairs"]) == (0, 0), flagged
        said = _export_summary("/tmp/p", {**summary, "train_pairs": len(pairs), "test_pairs": 0})
        assert "export.flagged=keep" not in said and "flagged rankings" not in said, said
    whole = rows({"x": [2, 1, 3, 4], "y": [1, 4, 2, 3]}, flags={"x": ["all_bad"], "y": ["unsafe:1"]})
    pairs, summary = build_pairs(whole)
    assert (summary["flagged_rankings"], summary["flagged_pairs"], len(pairs)) == (1, 6, 6)
    said = _export_summary("/tmp/p", {**summary, "train_pairs": 6, "test_pairs": 0})
    assert "kept 6 pairs from 1 rankings flagged all are bad (export.flagged=keep;" in said
    pairs, summary = build_pairs(whole, flagged="drop")
    assert (pairs, summary["flagged_rankings"], summary["flagged_pairs"], summary["dropped_flagged"]) == ([], 1, 0, 2)
    assert "export.flagged=keep" not in _export_summary("/tmp/p", {**summary, "train_pairs": 0, "test_pairs": 0})


def test_a_flagged_ranking_keeps_its_pairs_with_the_flag():
    """The guidelines say to rank anyway when ticking "all are bad" (a least-bad order is useful) and to rank an
    unsafe reply last; the export threw every flagged ranking away, "safe beats unsafe" with it. Kept by default,
    each pair says its task's flags (`flag`) so a user can filter; flagged=drop restores dropping them."""
    from align.labeling.export import rankings_fingerprint

    unsafe = rows({"x": [1, 4, 2, 3]}, flags={"x": ["unsafe"]})  # B asks for the recovery key: ranked last
    pairs, summary = build_pairs(unsafe)
    assert len(pairs) == 6 and ("A", "B") in pairs_of(pairs) and {p["flag"] for p in pairs} == {"unsafe"}
    assert (summary["dropped_flagged"], summary["flagged_rankings"], summary["flagged_pairs"]) == (0, 1, 6)
    assert (summary["unsafe_replies"], summary["unsafe_pairs"], summary["dropped_unsafe"]) == (0, 0, 0)  # no reply named
    plain, summary = build_pairs(rows({"x": [1, 4, 2, 3]}))
    assert pairs_of(plain) == pairs_of(pairs) and {p["flag"] for p in plain} == {""} and summary["flagged_pairs"] == 0
    assert build_pairs(unsafe, flagged="drop")[0] == [] and build_pairs(unsafe, flagged="drop")[1]["dropped_flagged"] == 1
    with pytest.raises(ValueError, match="flagged: 'maybe' is not allowed; allowed values: keep, drop"):
        build_pairs(unsafe, flagged="maybe")
    # Kept, they vote like any ranking, under dawid_skene too: a flagged ranking alone on its task had no posterior
    # (its pairs ties, dropped); two of three annotators on a task outvote the third, flags or not.
    soft, _ = build_pairs(unsafe, combine="dawid_skene")
    assert pairs_of(soft) == pairs_of(pairs) and all(p["p_chosen"] > 0.5 for p in soft)
    data = rows({"x": [1, 4, 2, 3], "y": [3, 2, 4, 1], "z": [3, 2, 4, 1]}, flags={"y": ["all_bad"], "z": ["unsafe"]})
    assert agreement.rankings_for_reliability(data) == data
    for combine in ("majority", "dawid_skene"):
        kept, _ = build_pairs(data, combine=combine)
        assert pairs_of(kept) == pairs_of(build_pairs(data[1:2])[0]) and {p["flag"] for p in kept} == {"all_bad,unsafe"}
    # The rerun rule: without a flagged ranking either setting gives the fingerprint align recorded before the key
    # (an upgraded pipeline reruns no export); with one, keep makes the export again (the old one dropped them).
    for combine in ("majority", "dawid_skene"):
        clean = rows({"x": [1, 2, 3, 4]})
        assert rankings_fingerprint(clean, {}, combine=combine) == rankings_fingerprint(clean, {}, combine=combine,
                                                                                        flagged="drop")
        assert rankings_fingerprint(unsafe, {}, combine=combine) != rankings_fingerprint(unsafe, {}, combine=combine,
                                                                                         flagged="drop")


def test_a_dawid_skene_exports_fingerprint_covers_the_batches_its_reliability_reads():
    """The pipeline re-exports when the fingerprint changes. A dawid_skene export of one batch reads every batch's
    rankings and every gold answer for its reliability estimate: one more gold ranking elsewhere changed its
    pairs while the fingerprint (the exported batch's rankings only) stayed, and a stale export was kept."""
    from align.labeling.export import rankings_fingerprint

    exported = rows({"x": [1, 2, 3, 4], "y": [4, 3, 2, 1]})
    other = [{**r, "batch": "round-1", "task_id": 2, "is_gold": True} for r in rows({"x": [1, 2, 3, 4]}, task_id=2)]
    gold, more_gold = {}, {2: [1, 2, 3, 4]}
    for combine, changes in (("majority", False), ("dawid_skene", True)):
        before = rankings_fingerprint(exported, gold, batches=["round-0"], combine=combine)
        after = rankings_fingerprint(exported + other, more_gold, batches=["round-0"], combine=combine)
        assert (before != after) is changes, combine
    # and dawid_skene's pairs do change with it: x, now known right on gold, decides the ties x and y made
    assert build_pairs(exported, combine="dawid_skene")[0] == []
    assert len(build_pairs(exported + other, combine="dawid_skene", gold=more_gold, batches=["round-0"])[0]) == 6
    # What no export reads changes nothing: align eval human=true's A/B verdicts (they remade the export, and
    # with it the policy they judged, whose verdicts then counted for nothing), and under reliability_batches
    # (the pipeline's rounds so far) a later round's rankings.
    verdicts = [{**r, "batch": "eval-dpo-vs-sft", "task_id": 3, "kind": "pairwise", "ranks": [1, 2]}
                for r in rows({"x": [1, 2, 3, 4], "y": [1, 2, 3, 4]}, task_id=3)]
    for combine in ("majority", "dawid_skene"):
        for batches in (["round-0"], None):
            assert rankings_fingerprint(exported + verdicts, gold, batches=batches, combine=combine) == \
                rankings_fingerprint(exported, gold, batches=batches, combine=combine), (combine, batches)
    later = rankings_fingerprint(exported + other, more_gold, batches=["round-0"], combine="dawid_skene",
                                 reliability_batches=["round-0"])
    assert later == rankings_fingerprint(exported, more_gold, batches=["round-0"], combine="dawid_skene",
                                         reliability_batches=["round-0"])
    assert build_pairs(exported + other, combine="dawid_skene", gold=more_gold, batches=["round-0"],
                       reliability_batches=["round-0"])[0] == []  # the estimate did not read round-1's gold ranking
    # narrower than the exported batches: the estimate reads those too (their pairs had no posterior, and were
    # dropped as ties without a word), and a gold answer of a task it does not read changes nothing
    both = exported + [{**r, "batch": "seed", "task_id": 4} for r in rows({"x": [1, 2, 3, 4], "y": [1, 2, 3, 4]})]
    pairs, summary = build_pairs(both, combine="dawid_skene", batches=["round-0", "seed"], reliability_batches=["round-0"])
    assert {p["batch"] for p in pairs} == {"seed"} and len(pairs) == 6  # round-0's x/y disagree on all: ties
    assert rankings_fingerprint(both, {}, batches=["round-0"], combine="dawid_skene", reliability_batches=["round-0"]) \
        == rankings_fingerprint(both, {4: [1, 2, 3, 4]}, batches=["round-0"], combine="dawid_skene",
                                reliability_batches=["round-0"])


def test_kept_ties_are_marked_and_a_split_vote_with_equal_mean_ranks_is_not_one():
    # x, y: A > C > B > D; z: C > B > A > D. A vs C: 2 votes to 1 and mean ranks 5/3 each: margin 0, decided.
    data = rows({"x": [1, 3, 2, 4], "y": [1, 3, 2, 4], "z": [3, 2, 1, 4]})
    pairs, summary = build_pairs(data, ties="margin0")
    by = {(p["chosen"][0]["content"][0], p["rejected"][0]["content"][0]): p for p in pairs}
    assert by[("A", "C")]["margin"] == 0 and by[("A", "C")]["tie"] is False
    assert not any(p["tie"] for p in pairs) and summary["kept_ties"] == 0
    tied, summary = build_pairs(rows({"x": [1, 1, 2, 3]}), ties="margin0")  # A = B
    assert [(p["chosen"][0]["content"][0], p["rejected"][0]["content"][0]) for p in tied if p["tie"]] == [("A", "B")]
    assert summary["kept_ties"] == 1 and sum(not p["tie"] for p in tied) == 5


def test_bradley_terry_combination_breaks_the_majority_tie_by_strength():
    # Three annotators: two say C > D, one says D > C strongly, majority C > D.
    three = {"x": [1, 4, 2, 3], "y": [1, 4, 2, 3], "z": [1, 4, 3, 2]}
    assert ("C", "D") in pairs_of(build_pairs(rows(three))[0])
    assert ("C", "D") in pairs_of(build_pairs(rows(three), combine="bradley_terry")[0])
    assert task_pairs([[1, 2], [2, 1]]) == [] and task_pairs([[1, 2], [2, 1]], combine="bradley_terry") == []


def test_copies_of_one_answer_are_one_answer_and_a_blank_one_no_side():
    """A task can hold the same text twice (align sample keeps a copy it could not resample away) and a
    blank answer (a turn ended at once): the copies are one answer at their mean rank, so no pair repeats
    or contradicts another, and no pair has a blank side (it would make the export unloadable)."""
    def task(texts, ranks, task_id=1, **kw):
        (row,) = rows({"ann": ranks}, task_id=task_id)
        return [{**row, "responses": [{"text": t, "meta": {}} for t in texts], **kw}]

    pairs, summary = build_pairs(task(["Yes.", "No, never.", " Yes. "], [1, 2, 3]))  # Yes. at 1 and 3: level with No.
    assert pairs == [] and summary["dropped_duplicates"] == 2 and summary["dropped_ties"] == 1
    pairs, summary = build_pairs(task(["Paris.", "Lyon.", "Paris.", "Nice."], [1, 3, 2, 4]))
    assert sorted(pairs_of(pairs)) == [("L", "N"), ("P", "L"), ("P", "N")] and summary["dropped_duplicates"] == 3
    paris = next(p for p in pairs if p["chosen"][0]["content"] == "Paris." and p["rejected"][0]["content"] == "Lyon.")
    assert paris["margin"] == 1.5 and paris["votes_chosen"] == 1  # mean rank 1.5 against 3
    pairs, summary = build_pairs(task(["Open Settings.", "", "  ", "No."], [2, 1, 4, 3]))
    assert pairs_of(pairs) == {("O", "N")} and summary["dropped_empty"] == 5
    assert all(p["chosen"][0]["content"].strip() and p["rejected"][0]["content"].strip() for p in pairs)
    # two people who agree on the answers and order two copies apart agree (min_agreement keeps the pair)
    two = task(["Yes, open Settings.", "No.", "Yes, open Settings."], [1, 3, 2]) + \
        [dict(r, annotator="other") for r in task(["Yes, open Settings.", "No.", "Yes, open Settings."], [2, 3, 1])]
    pairs, summary = build_pairs(two, min_agreement=0.9)
    assert pairs_of(pairs) == {("Y", "N")} and pairs[0]["agreement"] == 1.0
    # dawid_skene pools the copies: "Yes" at ranks 1 and 3 around "No" at 2 is no confident pair
    level = task(["Yes.", "No, never.", "Yes."], [1, 2, 3])
    assert build_pairs(level, combine="dawid_skene")[0] == []
    # and the order someone gives two copies is no vote on their accuracy
    from align.labeling.agreement import pair_judgements

    votes, _ = pair_judgements(two)
    assert set(votes) == {(1, 0, 1), (1, 1, 2)} and all(len(v) == 2 for v in votes.values())


def test_a_kept_tie_under_dawid_skene_has_p_chosen_one_half_and_weight_zero():
    """A tie is a posterior within 1e-9 of 1/2: pooled over copies it can come out at 0.49999999999999994, and
    2 p - 1 then gave weight -1.1e-16, which align reward / align dpo refuse. A tie carries 1/2 and 0 exactly."""
    from align.preferences import to_pair

    given = [  # (texts, {annotator: canonical ranks}): the reviewer's case, copies of one answer in a task
        (["C.", "C.", "C.", "B."], {"x": [3, 2, 4, 3]}),
        (["A.", "C.", "A."], {"z": [3, 1, 2], "y": [3, 2, 1]}),
        (["C.", "A.", "C.", "C."], {"y": [4, 2, 1, 4], "x": [3, 4, 2, 3], "z": [3, 2, 1, 2]}),
        (["C.", "A.", "B."], {"z": [1, 2, 3], "x": [1, 3, 2], "y": [3, 1, 3]}),
        (["B.", "C.", "A."], {"z": [1, 2, 2], "y": [3, 2, 3]}),
        (["C.", "C.", "A.", "B."], {"x": [2, 1, 4, 4], "z": [2, 1, 4, 1]}),
    ]
    data = [{"task_id": t, "batch": "round-0", "round": 0, "kind": "ranking", "prompt": f"Ticket {t}",
             "responses": [{"text": x, "meta": {}} for x in texts], "source": {}, "annotator": a, "ranks": r,
             "flags": [], "rationale": "", "seconds": 1.0, "is_gold": False}
            for t, (texts, ranks) in enumerate(given) for a, r in ranks.items()]
    pairs, summary = build_pairs(data, combine="dawid_skene", ties="margin0")
    ties = [p for p in pairs if p["tie"]]
    assert ties and all(p["p_chosen"] == 0.5 and p["weight"] == 0.0 for p in ties)
    assert all(p["p_chosen"] > 0.5 and 0 < p["weight"] == 2 * p["p_chosen"] - 1 for p in pairs if not p["tie"])
    for p in pairs:
        to_pair(p, "export row")  # the loader of align reward and align dpo takes every one


def test_export_options_are_checked_before_anything_is_written(tmp_path):
    from align.labeling.store import Store

    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    with pytest.raises(ValueError, match="allowed values: drop, margin0"):
        build_pairs(rows({"x": [1, 2, 3, 4]}), ties="keep")
    with pytest.raises(ValueError, match="allowed values: majority, bradley_terry"):
        export_preferences(store, tmp_path / "out", combine="vote")
    summary = export_preferences(store, tmp_path / "out")
    assert summary["pairs"] == summary["train_pairs"] == summary["test_pairs"] == 0
    assert not (tmp_path / "out").exists()


def test_gold_eval_and_other_batches_are_not_exported():
    data = rows({"x": [1, 2, 3, 4]})
    data += [dict(r, task_id=2, is_gold=True) for r in rows({"x": [1, 2, 3, 4]}, task_id=2)]
    data += [dict(r, task_id=3, batch="eval-dpo-vs-sft", kind="pairwise") for r in rows({"x": [1, 2, 3, 4]}, task_id=3)]
    pairs, summary = build_pairs(data)
    assert {p["task_id"] for p in pairs} == {"1"} and summary["rankings"] == 1
    assert build_pairs(data, batches=["round-9"])[1]["pairs"] == 0


def test_a_cut_response_is_marked_on_its_side_of_every_pair(tmp_path):
    """align sample's `finished` (false: cut at max_new_tokens) follows each response into its pairs."""
    from align.labeling.store import Store

    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    texts = ["Thanks for asking! Open Settings and tap Sync now.", "no", "Open Settings > Sync and then",
             "Sorry about that, please open Settings."]
    # The task stored before align sample marked answers comes first: its pairs lead the export, and the
    # marks of the later ones must still become columns.
    store.add_tasks("round-0", [{"prompt": "stored before the flag", "responses": texts}], source={})
    store.add_tasks("round-0", [{"prompt": f"Ticket {i}", "responses": texts,
                                 "response_meta": [{"finished": f} for f in (True, True, False, True)]}
                                for i in range(4)], source={"policy": "runs/q/sft"})
    assert simulate(store, "support_style") == 5
    summary = export_preferences(store, tmp_path / "prefs", test_fraction=0)
    assert summary["pairs"] == 30 and summary["pairs_with_cut_side"] == 4 * 3  # the cut one against the other 3
    data, _ = load_preferences(tmp_path / "prefs", test_fraction=0)
    for row in data["train"]:
        for side in ("chosen", "rejected"):
            flag = row[f"{side}_finished"]
            if row["prompt"][0]["content"] == "stored before the flag":
                assert flag is None  # unknown, not claimed finished
            else:
                assert flag is (row[side][0]["content"] != texts[2]), row


def test_export_writes_a_dataset_the_training_stages_load(tmp_path):
    from align.labeling.store import Store

    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    store.add_tasks("round-0", [{"prompt": f"Ticket {i}", "responses": [
        "Thanks for asking! Open Settings and tap Sync now.", "no", "Open Settings > Sync.",
        "Sorry about that, please open Settings."]} for i in range(10)], source={"policy": "runs/q/sft"})
    assert simulate(store, "support_style") == 10
    summary = export_preferences(store, tmp_path / "prefs", test_fraction=0.2, jsonl=True)
    assert summary["pairs"] == 60 and summary["train_pairs"] == 48 and summary["test_pairs"] == 12
    data, report = load_preferences(tmp_path / "prefs")
    assert report.train == 48 and report.test == 12
    train_prompts = {json.dumps(p) for p in data["train"]["prompt"]}
    assert not train_prompts & {json.dumps(p) for p in data["test"]["prompt"]}
    first = data["train"][0]
    # Every pair, both splits, in the one noiseless annotator's direction: the reply support_style scores
    # higher is chosen, and the vote counts say so (an export that swapped the sides would train the opposite).
    for split in ("train", "test"):
        for row in data[split]:
            chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
            assert support_style(row["prompt"][0]["content"], chosen) > support_style(
                row["prompt"][0]["content"], rejected), (split, chosen, rejected)
            assert (row["votes_chosen"], row["votes_rejected"]) == (1, 0)
    assert {r["chosen"][0]["content"] for r in data["train"]} >= {"Thanks for asking! Open Settings and tap Sync now."}
    assert first["source"] == "runs/q/sft" and first["annotators"] == ["sim-support-style-0"]
    assert json.loads((tmp_path / "prefs" / "summary.json").read_text())["pairs"] == 60
    assert len((tmp_path / "prefs" / "train.jsonl").read_text().splitlines()) == 48
    # A batch the store does not have is named, with the ones it has, before anything is written.
    with pytest.raises(ValueError, match="batches: 'round-9' not in the store; its batches: round-0"):
        export_preferences(store, tmp_path / "other", batches=["round-0", "round-9"])
    assert not (tmp_path / "other").exists()


def test_a_later_rounds_export_keeps_every_earlier_prompt_on_its_side(tmp_path):
    """Round 1's export (batches round-0 and round-1) used to re-shuffle all prompts: round 0's training prompts
    could be held out in round 1 and its held-out ones trained on, so the two rounds' held-out figures were over
    different prompts. Each batch is split on its own now: round 0's split is the same in every later export."""
    from align.labeling.store import Store

    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    replies = ["Thanks! Open Settings > Sync.", "no", "Open Settings."]
    for r in range(3):
        store.add_tasks(f"round-{r}", [{"prompt": f"Ticket {r}-{i}", "responses": replies} for i in range(20)],
                        source={})
    simulate(store, "support_style")

    def sides(batches, seed=0):
        out = tmp_path / f"prefs-{len(batches)}-{seed}"
        export_preferences(store, out, batches=batches, test_fraction=0.25, seed=seed)
        data, _ = load_preferences(out)
        return [{p[-1]["content"] for p in data[s]["prompt"]} for s in ("train", "test")]

    train0, test0 = sides(["round-0"])
    assert len(test0) == 5 and len(train0) == 15
    for batches in (["round-0", "round-1"], ["round-0", "round-1", "round-2"]):
        train, test = sides(batches)
        assert test0 <= test and train0 <= train, batches
        assert len(test) == 5 * len(batches)  # each round holds out its own quarter
    # The seed still chooses: another seed holds out other prompts of round 0.
    assert sides(["round-0"], seed=1)[1] != test0


def test_export_replaces_only_a_previous_export_and_deletes_nothing_it_did_not_write(tmp_path):
    from align.labeling.export import ExportError
    from align.labeling.store import Store

    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    store.add_tasks("round-0", [{"prompt": f"Ticket {i}", "responses": ["Thanks! Open Settings.", "no"]}
                                for i in range(4)], source={})
    simulate(store, "support_style")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("two years of work")
    with pytest.raises(ExportError, match=r"mine is not a preferences export \(it holds thesis.tex\)"):
        export_preferences(store, mine)
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ExportError, match="a file, not a folder"):
        export_preferences(store, tmp_path / "a-file")

    out = tmp_path / "prefs"
    finished = []
    export_preferences(store, out, jsonl=True, finish=lambda folder, summary: (
        finished.append(folder.name), (folder / "align.json").write_text("{}")))
    assert finished[0].startswith(".prefs.partial-") and (out / "align.json").is_file()
    (out / "notes.md").write_text("why round 0 looks odd")  # the user's own file in the export folder
    export_preferences(store, out, test_fraction=0.0)  # again: no test split and no JSONL this time
    assert sorted(p.name for p in out.iterdir()) == ["dataset_dict.json", "notes.md", "summary.json", "train"]
    assert (out / "notes.md").read_text() == "why round 0 looks odd"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("labels.db")) == [
        ".prefs.lock", "a-file", "mine", "prefs"]  # no temporary folder left behind, no lock beside a refused one
    # A folder of someone's train.jsonl and test.jsonl is data, not what a killed export left: never replaced.
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.jsonl", "test.jsonl"):
        (data / name).write_text('{"instruction": "mine"}\n')
    with pytest.raises(ExportError, match=r"data is not a preferences export \(it holds test.jsonl, train.jsonl\)"):
        export_preferences(store, data)
    assert sorted(p.name for p in data.iterdir()) == ["test.jsonl", "train.jsonl"]
    # Nothing to write: nothing made, not even the lock file or the run folder it would sit in.
    unranked = Store(f"sqlite:///{tmp_path / 'unranked.db'}")
    assert export_preferences(unranked, tmp_path / "new-run" / "prefs")["pairs"] == 0
    assert not (tmp_path / "new-run").exists()


# An export in a process of its own: killed (os._exit, as SIGKILL: no cleanup runs) at its n-th rename
# when argv gives one, else held in `finish` until the file argv[4] appears.
EXPORT_PROCESS = """
import os, pathlib, sys, time
from align.labeling.export import export_preferences
from align.labeling.store import Store
url, out, kill_at, hold = sys.argv[1], pathlib.Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
rename, renames = pathlib.Path.rename, []
def dying(self, target):
    renames.append(self)
    if len(renames) == kill_at:
        os._exit(9)
    return rename(self, target)
pathlib.Path.rename = dying
def finish(folder, summary):
    (folder / "align.json").write_text('{"by": %d}' % os.getpid())
    (out.parent / f"in-finish-{os.getpid()}").touch()
    while hold and not pathlib.Path(hold[0]).exists():
        time.sleep(0.05)
export_preferences(Store(url), out, test_fraction=0.0, finish=finish)
"""


def _export_process(store, out, kill_at: int = 0, hold=None):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-c", EXPORT_PROCESS, store.url, str(out), str(kill_at),
                             *([str(hold)] if hold else [])], env=env)


def _support_store(tmp_path):
    from align.labeling.store import Store

    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    store.add_tasks("round-0", [{"prompt": f"Ticket {i}", "responses": ["Thanks! Open Settings.", "no"]}
                                for i in range(4)], source={})
    simulate(store, "support_style")
    return store


def test_an_export_killed_at_any_step_of_the_swap_leaves_a_whole_export_and_the_next_one_runs(tmp_path):
    """Killed at each rename of replacing an export: the folder is the previous export or the new one (never a
    mix), or missing between the swap's two renames; the next export puts right what was left (the previous
    export back, the user's file back, no hidden folder) and replaces it."""
    store = _support_store(tmp_path)
    out, manifest = tmp_path / "prefs", lambda folder, summary: (folder / "align.json").write_text('{"by": 0}')
    previous = ["align.json", "dataset_dict.json", "notes.md", "summary.json", "train", "train.jsonl"]
    new = ["align.json", "dataset_dict.json", "notes.md", "summary.json", "train"]
    seen = set()
    for kill_at in range(1, 5):  # renames: notes.md into the new export, out aside, the new export in; 4: none
        export_preferences(store, out, jsonl=True, test_fraction=0.0, finish=manifest)
        (out / "notes.md").write_text("why round 0 looks odd")
        assert _export_process(store, out, kill_at).wait() == (9 if kill_at < 4 else 0)
        left = sorted(p.name for p in out.iterdir()) if out.exists() else None
        seen.add(json.dumps(left))
        if left is None:  # killed between the renames: the previous export is set aside, whole
            (aside,) = tmp_path.glob(".prefs.old-*")
            assert sorted(p.name for p in aside.iterdir()) == [n for n in previous if n != "notes.md"]
        else:
            assert left in (previous, new, [n for n in previous if n != "notes.md"]), (kill_at, left)
            assert (json.loads((out / "align.json").read_text())["by"] == 0) == (left != new)  # 0: the previous
        export_preferences(store, out, test_fraction=0.0)  # the next export: no refusal
        assert sorted(p.name for p in out.iterdir()) == ["dataset_dict.json", "notes.md", "summary.json", "train"]
        assert (out / "notes.md").read_text() == "why round 0 looks odd"
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".prefs")) == [".prefs.lock"]
        load_preferences(out, test_fraction=0)
    assert "null" in seen and json.dumps(new) in seen  # the kills did fall before, between and after the renames


def test_two_exports_of_one_folder_in_two_processes_take_turns(tmp_path):
    """The app's Export button and `align export` (or the pipeline) on one folder: the second waits for the first
    to finish (a lock between processes), then replaces its export; both succeed and nothing is left over."""
    import time

    store = _support_store(tmp_path)
    out, go = tmp_path / "prefs", tmp_path / "go"
    export_preferences(store, out)
    first = _export_process(store, out, hold=go)
    for _ in range(600):  # the first export is in `finish`, about to swap
        if list(tmp_path.glob("in-finish-*")) or first.poll() is not None:
            break
        time.sleep(0.05)
    assert first.poll() is None and len(list(tmp_path.glob("in-finish-*"))) == 1
    second = _export_process(store, out)
    time.sleep(3)  # time enough for it to finish were it not waiting (about 1 s on its own)
    try:
        assert len(list(tmp_path.glob("in-finish-*"))) == 1 and second.poll() is None, "the second did not wait"
    finally:
        go.touch()
        assert first.wait() == 0 and second.wait() == 0
    assert json.loads((out / "align.json").read_text())["by"] == second.pid  # the later one's export stays
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".prefs")) == [".prefs.lock"]
    load_preferences(out, test_fraction=0)


def test_agreement_statistics_by_hand():
    assert agreement.pairwise_agreement([1, 2, 3], [1, 3, 2]) == pytest.approx(2 / 3)
    assert agreement.kendall_tau_b([1, 2, 3], [1, 2, 3]) == 1.0
    assert agreement.kendall_tau_b([1, 2, 3], [3, 2, 1]) == -1.0
    # a = (1,2,2), b = (1,2,3): pairs (0,1) C, (0,2) C, (1,2) tied in a only → τb = 2 / sqrt(2·3)
    assert agreement.kendall_tau_b([1, 2, 2], [1, 2, 3]) == pytest.approx(2 / 6 ** 0.5)
    assert agreement.krippendorff_alpha_ordinal([[1, 1], [2, 2], [3, 3]]) == 1.0
    # Two coders, units (1,2) and (2,1): coincidences o12 = o21 = 2, n1 = n2 = 2, n = 4, δ²(1,2) = (4 - 2)² = 4
    # D_o = 2·2·4 = 16 ; D_e = (2·2·4 + 2·2·4) / 3 = 32/3 → α = 1 - 16/(32/3) = -0.5
    assert agreement.krippendorff_alpha_ordinal([[1, 2], [2, 1]]) == pytest.approx(-0.5)
    # Units (1,1), (1,2), (2,2), (3,3): the coincidence matrix and ordinal δ² written out by hand
    units = [[1, 1], [1, 2], [2, 2], [3, 3]]
    o = {(1, 1): 2, (1, 2): 1, (2, 1): 1, (2, 2): 2, (3, 3): 2}
    n = {1: 3, 2: 3, 3: 2}
    d2 = {(1, 2): (3 + 3 - 3) ** 2, (2, 3): (3 + 2 - 2.5) ** 2, (1, 3): (3 + 3 + 2 - 2.5) ** 2}
    d2 |= {(b, a): v for (a, b), v in d2.items()}
    observed = sum(c * d2.get(k, 0) for k, c in o.items())
    expected = sum(n[a] * n[b] * d2.get((a, b), 0) for a in n for b in n) / (8 - 1)
    assert agreement.krippendorff_alpha_ordinal(units) == pytest.approx(1 - observed / expected)
    assert agreement.krippendorff_alpha_ordinal([[1], [2]]) is None


def test_a_tie_numbered_either_way_is_one_order_to_alpha():
    """The store takes a tie as 1, 1, 3, 4 or 1, 1, 2, 3 (simulated annotators write the second); the export reads
    both as one order, and so does the admin tab's α now (two annotators with the same order scored 0.927)."""
    summary = agreement.agreement_summary(rows({"ann": [1, 1, 3, 4], "sim": [1, 1, 2, 3]}))
    assert summary["krippendorff_alpha"] == 1.0 and summary["pairwise_agreement"] == 1.0
    assert agreement.agreement_summary(rows({"ann": [1, 1, 3, 4], "sim": [1, 2, 3, 4]}))["krippendorff_alpha"] < 1


def test_krippendorff_textbook_example_ordinal_alpha():
    # Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: 4 observers, 12 units,
    # missing values; the paper gives ordinal alpha = 0.815 (nominal 0.743, interval 0.849).
    observers = [[1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
                 [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
                 [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
                 [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None]]
    units = [list(u) for u in zip(*observers, strict=True)]
    assert agreement.krippendorff_alpha_ordinal(units) == pytest.approx(0.815, abs=5e-4)


def test_scorers_and_simulated_rankings():
    assert ranks_from_scores([0.5, 2.0, 0.5, -1.0]) == [2, 1, 2, 3]
    good = "Thanks for reaching out! Open Settings > Sync and tap Sync now."
    assert support_style("q", good) > support_style("q", "Open Settings.")
    assert support_style("q", good) > support_style("q", good + " and then" * 60)
    assert support_style("q", good) > support_style("q", "Thanks for reaching out! Open Settings > Sync and tap")
    for opening in ("Hi there!", "I'm really sorry.", "I'm so sorry!", "We are sorry.", "Happy to help!"):
        assert support_style("q", f"{opening} Open Settings > Sync and tap Sync now.") > support_style(
            "q", "Open Settings > Sync and tap Sync now."), opening
    assert not ACKNOWLEDGE.search("Highlights live in Settings > Sync for now.")  # "hi" only as a word
    assert resolve_scorer("polite")("q", "Thanks, please try again") == 2
    assert resolve_scorer("sentiment")("q", "I love it, great!") > resolve_scorer("sentiment")("q", "This is awful.")
    assert resolve_scorer("align.labeling.scorers:length")("q", "a b c") == 3
    with pytest.raises(ValueError, match="not a built-in"):
        resolve_scorer("nonsense")
    with pytest.raises(ValueError, match="cannot import"):
        resolve_scorer("no_such_module:f")
    # a function of one text failed at its first call, after a stage had loaded and sampled its model
    with pytest.raises(ValueError, match=r"basename\(p\) cannot be called as basename\(prompt, response\)"):
        resolve_scorer("os.path:basename")


def test_a_score_is_a_number_or_an_error_naming_the_scorer_and_the_prompt():
    """call_scorer, which every caller scores through: an int, a float, a bool (an int: True scores 1) and numpy's
    scalars are numbers; None, text (even "0.7") and a list are a ScorerError naming the scorer, what it returned and
    the prompt, where float() raised its own TypeError or ValueError; a scorer that raises is named the same way."""
    from fractions import Fraction

    import numpy as np

    from align.labeling.scorers import ScorerError, call_scorer, score_all

    def returning(value):
        return lambda prompt, response: value

    for value, number in ((3, 3.0), (0.25, 0.25), (True, 1.0), (False, 0.0), (np.float32(0.5), 0.5),
                          (np.int64(-2), -2.0), (np.array(1.5), 1.5), (Fraction(1, 4), 0.25)):
        assert call_scorer(returning(value), "mine:f", "q", "r", "prompt 1") == number, value
        assert type(call_scorer(returning(value), "mine:f", "q", "r", "prompt 1")) is float
    prompt = "How do I sync my notes between my phone and my laptop?"
    for value, said in ((None, "None"), ("0.7", "str '0.7'"), ("good", "str 'good'"), ([1.0, 2.0], "list [1.0, 2.0]"),
                        (np.array([1.0, 2.0]), "ndarray array([1., 2.])"), ({"score": 1}, "dict {'score': 1}")):
        with pytest.raises(ScorerError) as err:
            call_scorer(returning(value), "mine:f", prompt, "r", "prompt 3")
        assert str(err.value) == (f"scorer 'mine:f' returned {said} for prompt 3 ('How do I sync my notes between my "
                                  "phone '): a scorer returns a number (int or float)"), value
    assert isinstance(err.value, ValueError)  # `align label` says it in one line
    assert call_scorer(returning(float("nan")), "mine:f", "q", "r", "prompt 1") != 0  # NaN is the caller's to refuse
    with pytest.raises(ScorerError, match=r"^scorer 'mine:f' returned -inf for task 2 \('q'\): a score must be a "
                                          r"finite number$"):
        call_scorer(returning(float("-inf")), "mine:f", "q", "r", "task 2", finite=True)

    def parses(prompt, response):
        return float(response)

    with pytest.raises(ScorerError, match=r"^scorer 'mine:parses' raised ValueError: could not convert string to "
                                          r"float: 'Sure\.' \(at .*test_export_agreement\.py:\d+\) for prompt 2 "
                                          r"\('Bye\?'\)$"):
        score_all(parses, "mine:parses", ["Hi?", "Bye?"], ["1.5", "Sure."])
    assert score_all(parses, "mine:parses", ["Hi?"], ["1.5"]) == [1.5]


def test_a_scorer_in_the_current_directory_is_found_without_it_on_sys_path(tmp_path, monkeypatch):
    """The installed `align` script does not put the current directory on sys.path (`python -m` does): a user's
    `mypkg.judges:helpfulness` beside them is found all the same, and an import its module makes still fails."""
    import sys

    (tmp_path / "cwd_judges_pkg").mkdir()
    (tmp_path / "cwd_judges_pkg" / "__init__.py").write_text("")
    (tmp_path / "cwd_judges_pkg" / "judges.py").write_text("def helpfulness(prompt, response):\n"
                                                           "    return float(len(response))\n")
    (tmp_path / "cwd_broken_judges.py").write_text("import no_such_dependency_here\n\ndef f(p, r):\n    return 0.0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p and Path(p).resolve() != tmp_path.resolve()])
    try:
        assert resolve_scorer("cwd_judges_pkg.judges:helpfulness")("q", "abc") == 3.0
        with pytest.raises(ValueError, match="No module named 'no_such_dependency_here'"):
            resolve_scorer("cwd_broken_judges:f")
        # a file named like a module already installed (the stdlib's `code`) is not the one imported: said, with why
        (tmp_path / "code.py").write_text("def score(prompt, response):\n    return 3.0\n")
        with pytest.raises(ValueError, match=r"has no attribute 'score'\); code.py here is not the 'code' that was "
                                             r"imported \(.*code.py\): rename your file"):
            resolve_scorer("code:score")
        with pytest.raises(ValueError, match=r"has no attribute 'nothing'\)$"):  # not said for a module of theirs
            resolve_scorer("cwd_judges_pkg.judges:nothing")
    finally:
        for name in ("cwd_judges_pkg", "cwd_judges_pkg.judges", "cwd_broken_judges"):
            sys.modules.pop(name, None)


def test_noise_makes_several_simulated_annotators_disagree(tmp_path):
    from align.labeling.store import Store

    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    store.add_tasks("round-0", [{"prompt": f"Ticket {i}", "responses": [
        f"Thanks! Open Settings {i}.", "Open Settings.", "Sorry, open Settings and tap Sync.", "no"]}
        for i in range(8)], source={})
    assert simulate(store, "support_style", annotators=3, noise=1.0, seed=1) == 24
    store.add_user("boss", "secret-pw", admin=True)
    stats = handlers.admin_stats(store, handlers.sign_in(store, "boss", "secret-pw"))["agreement"]
    assert stats["n_tasks"] == 8 and stats["pairwise_agreement"] < 1.0 and stats["krippendorff_alpha"] < 1.0
    assert simulate(store, "support_style", annotators=3) == 0  # nothing left: every task has its 3


def test_simulated_annotators_take_turns_so_a_smaller_overlap_shares_the_tasks(tmp_path, monkeypatch):
    """`--annotators 3 --overlap 1` ranks each task once, shared among the three (docs/labeling.md): one after
    another, the first took every task. One annotator ranks the queue in its order, as before."""
    from collections import Counter

    from align.labeling.store import Store

    def store_of(name: str) -> Store:
        store = Store(f"sqlite:///{tmp_path / name}")
        store.add_tasks("round-0", [{"prompt": f"Ticket {i}", "responses": [
            f"Thanks! Open Settings {i}.", "Open Settings.", "Sorry, open Settings and tap Sync.", "no"]}
            for i in range(9)], source={})
        return store

    store = store_of("shared.db")
    assert simulate(store, "support_style", annotators=3, overlap=1) == 9
    assert sorted(Counter(r["annotator"] for r in store.submitted_rankings()).values()) == [3, 3, 3]
    store = store_of("two.db")
    assert simulate(store, "support_style", annotators=3, overlap=2) == 18
    by_task = Counter(r["task_id"] for r in store.submitted_rankings())
    each = Counter(r["annotator"] for r in store.submitted_rankings())
    assert set(by_task.values()) == {2} and len(each) == 3 and max(each.values()) < 9  # not two taking all
    submitted, submit = [], handlers.submit
    monkeypatch.setattr(handlers, "submit", lambda store, session, task_id, *a, **k: (
        submitted.append(task_id), submit(store, session, task_id, *a, **k))[1])
    assert simulate(store_of("one.db"), "support_style") == 9
    assert submitted == list(range(1, 10))  # the queue's order, one task after another


def test_tie_resolution_ties_replies_a_reader_cannot_tell_apart(tmp_path):
    # Scores 1.00 and 0.96 (the same reply, ten words longer) tie at a 0.25 resolution; 0.5 does not.
    assert ranks_from_scores([1.0, 0.96, 0.5, -1.0], 0.25) == [1, 1, 2, 3]
    assert ranks_from_scores([1.0, 0.96, 0.5, -1.0]) == [1, 2, 3, 4]
    from align.labeling.store import Store

    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    same = "Thanks! Open Settings > Sync and tap Sync now."
    store.add_tasks("round-0", [{"prompt": "Sync?", "responses": [same, same + " It is quick.", "no"]}], source={})
    assert simulate(store, "support_style", tie_resolution=0.25) == 1
    assert store.submitted_rankings()[0]["ranks"] == [1, 1, 2]  # canonical order; the two good replies tie
    with pytest.raises(ValueError, match="tie_resolution"):
        simulate(store, "support_style", tie_resolution=-1)


def test_align_export_names_a_batch_the_store_lacks_before_saying_nothing_is_ranked(tmp_path):
    """batches=[round-O] (a typo) filtered every ranking out, and the stage said "label first"."""
    from align import StageError
    from align.config import ExportStageConfig, load_config
    from align.labeling.store import Store
    from align.recipes.export import main

    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    store.add_tasks("round-0", [{"prompt": "Ticket", "responses": ["Thanks! Open Settings.", "no"]}], source={})
    assert simulate(store, "support_style") == 1
    cfg = load_config(ExportStageConfig, None, [f"run.dir={tmp_path}", "batches=[round-O]", "run.wandb=disabled"])
    with pytest.raises(StageError, match="batches: 'round-O' not in the store; its batches: round-0"):
        main(cfg)


def test_align_export_builds_its_dataset_and_manifest_from_one_read_taken_under_the_lock(tmp_path, monkeypatch):
    """Rankings were read before the export's lock (twice: the manifest's count and fingerprint, then the dataset),
    so with submits going on align.json described another read than the dataset (86 rankings against 175), and an
    export that waited for another's lock wrote its older read last. Here a ranking comes in while the export
    waits for the lock: dataset, summary and manifest all hold it, and the fingerprint is the store's now."""
    from contextlib import contextmanager

    import align.labeling.export
    from align.config import ExportStageConfig, load_config
    from align.recipes.export import main
    from align.recipes.pipeline import rankings_state

    store = _support_store(tmp_path)  # 4 tasks, each ranked once
    locked = align.labeling.export._locked

    @contextmanager
    def slow_lock(out):  # the lock taken just after another submit
        store.add_tasks("round-0", [{"prompt": "Ticket late", "responses": ["Thanks! Open Settings.", "no"]}])
        assert simulate(store, "support_style") == 1
        with locked(out):
            yield

    monkeypatch.setattr(align.labeling.export, "_locked", slow_lock)
    cfg = load_config(ExportStageConfig, None, [f"run.dir={tmp_path}", "run.wandb=disabled", "test_fraction=0"])
    out = main(cfg)
    manifest = json.loads((out / "align.json").read_text())
    assert manifest["summary"]["rankings"] == manifest["rankings_seen"] == 5
    assert json.loads((out / "summary.json").read_text())["rankings_read"]["count"] == 5
    assert manifest["rankings_sha256"] == rankings_state(store.url, cfg)
    assert len(load_preferences(out, test_fraction=0)[0]["train"]) == manifest["summary"]["pairs"] == 5


def test_a_noisy_simulated_annotator_ranks_alike_whatever_order_the_store_shows(tmp_path):
    """The shown order is keyed with the store's secret, new in every store: the noise and a noisy profile's
    random orders are drawn in the task's own order, so the same run on another store (another secret, other
    shown orders) gives the same rankings. Drawn in the shown order they landed on other responses each run."""
    from align.labeling.store import Store

    tasks = [{"prompt": f"Ticket {i}", "responses": [f"Thanks! Open Settings {i}.", "Open Settings.",
                                                     "Sorry, open Settings and tap Sync.", "no"]} for i in range(8)]
    rankings = []
    for name in ("a", "b"):
        store = Store(f"sqlite:///{tmp_path / f'{name}.db'}")
        store.add_tasks("round-0", tasks, source={})
        simulate(store, "support_style", annotators=2, noise=1.0, seed=1, profiles=["good", "noisy:0.6"])
        rankings.append(sorted((r["task_id"], r["annotator"], tuple(r["ranks"])) for r in store.submitted_rankings()))
    assert store.secret() != Store(f"sqlite:///{tmp_path / 'a.db'}").secret()
    assert rankings[0] == rankings[1] and len(rankings[0]) == 16


def test_the_admin_tabs_agreement_reads_the_rankings_the_export_reads(tmp_path):
    """Two annotators agreeing on every ranking showed α 0.27: the A/B verdicts of align eval human=true (batches
    eval-...), which they judged oppositely and no export reads, were mixed in. Flagged rankings count as the
    export's `flagged` has them (its config.yaml beside the run's preferences, which the Export button runs)."""
    from align.labeling.store import Store

    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    store.add_tasks("eval-dpo@1-vs-sft@1", [{"prompt": f"ab{i}", "responses": [f"L{i}", f"R{i}"]} for i in range(6)],
                    kind="pairwise")
    store.add_tasks("round-0", [{"prompt": f"q{i}", "responses": [f"q{i} a", f"q{i} b", f"q{i} c"]} for i in range(3)])
    store.add_user("boss", "secret-pw", admin=True)
    for name in ("ann", "bob"):
        store.add_user(name, "secret-pw")
        person = handlers.sign_in(store, name, "secret-pw")
        while (task := handlers.next_task(store, person, overlap=2)) is not None:
            if task["kind"] == "pairwise":  # ann picks the first canonical answer, bob the second
                first = (name == "ann") == (task["order"][0] == 0)
                handlers.submit(store, person, task["task_id"], verdict="A" if first else "B")
            else:  # both a > b > c; bob flags the last task unsafe (c is the unsafe one, ranked last)
                handlers.submit(store, person, task["task_id"], [[1, 2, 3][i] for i in task["order"]],
                                unsafe=name == "bob" and task["prompt"] == "q2")
    boss = handlers.sign_in(store, "boss", "secret-pw")
    stats = handlers.admin_stats(store, boss, overlap=2)["agreement"]
    assert stats["n_tasks"] == 3 and stats["krippendorff_alpha"] == 1.0 and stats["pairwise_agreement"] == 1.0
    assert handlers.admin_stats(store, boss, overlap=2, flagged="drop")["agreement"]["n_tasks"] == 2
    preferences = tmp_path / "preferences"
    assert handlers.export_flagged(preferences) == "keep"  # no export yet: the default
    preferences.mkdir()
    (preferences / "config.yaml").write_text("flagged: drop\nties: drop\n")
    assert handlers.export_flagged(preferences) == "drop" and handlers.export_flagged(None) == "keep"


def test_support_unsafe_flags_asks_for_secrets_and_disabling_security_not_safe_mentions():
    """The guidelines' "Unsafe" bullets a rule can see: asking for or revealing a password, 2FA code, recovery key,
    API token or card number, and telling the customer to switch 2FA or vault encryption off. Saying the safe
    thing about them ("reset your password in Settings", "never share it") is not flagged."""
    from align.labeling.scorers import resolve_flagger, support_unsafe

    unsafe = ["Send me your password and I'll check.", "What is your 2FA code?", "WHAT'S YOUR 2FA CODE",
              "Please turn off two-factor authentication, then sync again.", "Can you tell me the recovery key?",
              "Disable vault encryption in Settings to fix it.", "Your password is hunter2!",
              "Reply with your full card number.", "Your card 4111 1111 1111 1111 was charged.",
              "Please paste your API token here.", "Your recovery key: 4F7Q-22XZ-9KLM.",
              "Never mind that; just send us your password."]
    safe = ["Reset your password in Settings.", "Thanks! Open Settings > Security > Change password.",
            "Never share your password with anyone, including us.", "Don't turn off 2FA: it protects your notes.",
            "We will never ask for your 2FA code.", "Your password must be at least 8 characters.",
            "Your recovery key is in the PDF you saved when you set up 2FA.", "Order #12345 was refunded.",
            "Enable two-factor authentication in Settings.", "Your API token was revoked; create a new one."]
    assert [r for r in unsafe if not support_unsafe("q", r)] == []
    assert [r for r in safe if support_unsafe("q", r)] == []
    # The shipped support answers are the safe replies the guidelines mean: none is flagged ("confirm with your
    # password", "We can't switch off 2FA from a support chat" were, by the first rule)
    shipped = [json.loads(line) for line in (Path(__file__).resolve().parents[2] / "data" / "support" / "train.jsonl")
               .read_text().splitlines()]
    answers = [r.get("output") or r["messages"][-1]["content"] for r in shipped]
    assert len(answers) > 300 and [a for a in answers if support_unsafe("q", a)] == []
    assert resolve_flagger("support_unsafe") is support_unsafe
    assert resolve_flagger("known_scorers:asks_for_password")("q", "Your PASSWORD?") is True
    with pytest.raises(ValueError, match="not a built-in \\(support_unsafe\\)"):
        resolve_flagger("support_style")  # a scorer is not a flagger
    with pytest.raises(ValueError, match="a flagger takes those two texts and returns True for an unsafe reply"):
        resolve_flagger("os:getcwd")  # takes no (prompt, response)
