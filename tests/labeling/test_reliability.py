"""Annotator reliability (one-coin Dawid-Skene) by hand, and through simulated annotators with a bad one among
them: the bad one is down-weighted, the exported pairs follow the good ones, the columns reach training."""

from __future__ import annotations

import itertools
import json
import math

import pytest
from sqlalchemy import insert

from align.cli import main as align
from align.labeling import handlers
from align.labeling.agreement import (
    PRIOR_ACCURACY,
    PRIOR_STRENGTH,
    annotator_reliability,
    beta_interval,
    dawid_skene,
    pair_judgements,
    vote_weight,
)
from align.labeling.export import build_pairs
from align.labeling.scorers import support_style
from align.labeling.simulate import parse_profile, profile_ranks, simulate
from align.labeling.store import Store, meta_table
from align.preferences import load_preferences

ALPHA, BETA = PRIOR_ACCURACY * PRIOR_STRENGTH, (1 - PRIOR_ACCURACY) * PRIOR_STRENGTH


def ranking(task_id, annotator, ranks, *, kind="ranking", batch="round-0"):
    return {"task_id": task_id, "annotator": annotator, "ranks": ranks, "kind": kind, "batch": batch}


def test_beta_interval_matches_closed_forms():
    assert beta_interval(1, 1) == pytest.approx((0.025, 0.975), abs=3e-4)  # uniform
    # Beta(2, 2): CDF 3x² - 2x³; its 2.5 % and 97.5 % points solved by hand (0.0943, 0.9057)
    lo, hi = beta_interval(2, 2)
    assert 3 * lo ** 2 - 2 * lo ** 3 == pytest.approx(0.025, abs=5e-4)
    assert 3 * hi ** 2 - 2 * hi ** 3 == pytest.approx(0.975, abs=5e-4)
    # Beta(a, 1): CDF x^a, so the points are 0.025^(1/a) and 0.975^(1/a)
    assert beta_interval(5, 1) == pytest.approx((0.025 ** 0.2, 0.975 ** 0.2), abs=3e-4)


def test_judgements_are_pairs_of_responses_and_ties_say_nothing():
    votes, truth = pair_judgements([ranking(7, "a", [1, 2, 2]), ranking(8, "b", [1, 2], kind="pairwise")],
                                   gold={9: [2, 1]})
    assert votes == {(7, 0, 1): [("a", 1)], (7, 0, 2): [("a", 1)]}  # 1 vs 2 tied: no vote; A/B tasks left out
    assert truth == {(9, 0, 1): -1}


def test_gold_fixes_the_truth_and_the_prior_keeps_few_items_off_0_and_1():
    # Only gold items: the posterior is the gold answer, so one M-step is exact:
    # q = (right + alpha) / (checked + alpha + beta).
    gold = {t: [1, 2] for t in range(5)}
    rows = [ranking(t, "three-of-four", [1, 2] if t < 3 else [2, 1]) for t in range(4)]
    rows += [ranking(4, "one-right", [1, 2]), ranking(4, "one-wrong", [2, 1])]
    rel = annotator_reliability(rows, gold)
    people = rel.annotators
    assert people["three-of-four"]["accuracy"] == pytest.approx((3 + ALPHA) / (4 + ALPHA + BETA))  # 0.725
    assert people["one-right"]["accuracy"] == pytest.approx((1 + ALPHA) / (1 + ALPHA + BETA))  # 0.76, not 1
    assert people["one-wrong"]["accuracy"] == pytest.approx(ALPHA / (1 + ALPHA + BETA))  # 0.56, not 0
    assert people["three-of-four"]["gold"] == people["three-of-four"]["checked"] == 4
    lo, hi = people["three-of-four"]["interval"]
    assert (lo, hi) == pytest.approx(beta_interval(3 + ALPHA, 1 + BETA))
    assert people["three-of-four"]["weight"] == pytest.approx(math.log(0.725 / 0.275))
    assert rel.posterior == {} and rel.converged


def test_adversary_is_found_weighted_zero_and_pulls_no_pair_its_way():
    # Two annotators agree on 30 pairs; a third reverses every one of them.
    rows = []
    for t in range(10):
        rows += [ranking(t, "ann", [1, 2, 3]), ranking(t, "bob", [1, 2, 3]), ranking(t, "eve", [3, 2, 1])]
    rows.append(ranking(99, "eve", [2, 1]))  # a task only eve ranked
    rel = annotator_reliability(rows)
    people = rel.annotators
    assert people["eve"]["accuracy"] < 0.2 and people["eve"]["weight"] == 0
    assert people["ann"]["accuracy"] > 0.85 and people["ann"]["weight"] > 1.5
    assert people["eve"]["checked"] == 30  # her lone task is not evidence about her
    assert rel.posterior[(99, 0, 1)] == 0.5  # eve alone decides nothing
    # The E-step by hand: a pair is the sigmoid of the summed vote weights (eve's is 0).
    w = vote_weight(people["ann"]["accuracy"]) + vote_weight(people["bob"]["accuracy"])
    assert rel.posterior[(0, 0, 1)] == pytest.approx(1 / (1 + math.exp(-w)))


def test_gold_outweighs_a_reversed_majority():
    """Two of three annotators reverse every pair; 2 of 20 tasks are gold. EM started everyone at the prior, so on its
    first step the two outvoted the third and it settled there: the reversed pair were trusted (0.88), the honest one
    weighted 0, every pair came out reversed. It starts from each one's accuracy on gold now."""
    gold = {t: [1, 2, 3, 4] for t in range(2)}
    rows = []
    for t in range(20):
        rows += [ranking(t, "honest", [1, 2, 3, 4]), ranking(t, "rev1", [4, 3, 2, 1]), ranking(t, "rev2", [4, 3, 2, 1])]
    rel = annotator_reliability(rows, gold)
    people = rel.annotators
    assert people["honest"]["accuracy"] > 0.9 and people["honest"]["weight"] > 2
    assert people["rev1"]["accuracy"] < 0.1 and people["rev1"]["weight"] == people["rev2"]["weight"] == 0
    assert all(p > 0.9 for p in rel.posterior.values())  # every non-gold pair ordered as the honest one did
    assert (people["honest"]["gold_accuracy"], people["rev1"]["gold_accuracy"]) == (1.0, 0.0)
    assert people["honest"]["gold"] == 12 and rel.warnings == []


def test_a_gold_miss_outweighed_by_the_prior_alone_is_not_blamed_on_agreement():
    # cat ranked the gold task wrong and 3 tasks no one else ranked: nothing checks cat but the one gold vote, and the
    # prior (0.7, worth 4 judgements) keeps cat above chance. The warning says so, not "follows who agree with cat".
    rows = [ranking(t, "cat", [1, 2, 3]) for t in range(3)] + [ranking(10, "cat", [2, 1])]
    rel = annotator_reliability(rows, {10: [1, 2]})
    cat = rel.annotators["cat"]
    assert 0.5 < cat["accuracy"] < 0.7 and cat["gold_accuracy"] == 0.0 and cat["checked"] == cat["gold"] == 1
    assert len(rel.warnings) == 1 and rel.warnings[0].startswith("cat: estimated accuracy 0.5")
    assert "the prior (an annotator right 70% of the time, worth 4 judgements)" in rel.warnings[0]
    assert "agree with" not in rel.warnings[0]


def test_an_annotator_trusted_against_their_gold_answers_is_warned_about():
    # ann and bob agree on 10 tasks; ann got the one gold pair wrong, which one pair cannot outweigh.
    rows = [ranking(t, name, [1, 2, 3]) for t in range(10) for name in ("ann", "bob")] + [ranking(10, "ann", [2, 1])]
    rel = annotator_reliability(rows, {10: [1, 2]})
    ann = rel.annotators["ann"]
    assert ann["accuracy"] > 0.5 and ann["gold_accuracy"] == 0.0 and rel.annotators["bob"]["gold_accuracy"] is None
    assert len(rel.warnings) == 1 and rel.warnings[0].startswith("ann: estimated accuracy 0.9")
    assert "0.00 on the 1 gold votes" in rel.warnings[0] and rel.summary()["warnings"] == rel.warnings
    from align.report import cautions, reliability_html  # the report says it: in the table, at a glance

    assert "<b>Warning</b>: ann: estimated accuracy" in reliability_html(rel.summary())
    assert cautions("export", {"summary": {"reliability": rel.summary()}}) == rel.warnings


def test_an_annotator_nobody_checks_keeps_the_prior():
    rel = annotator_reliability([ranking(t, "solo", [1, 2, 3]) for t in range(20)])
    solo = rel.annotators["solo"]
    assert solo["accuracy"] == pytest.approx(PRIOR_ACCURACY) and solo["checked"] == 0 and solo["judgements"] == 60
    assert list(rel.posterior.values()) == [pytest.approx(PRIOR_ACCURACY)] * 60  # one unchecked vote: the prior's belief


def test_noisy_annotator_gets_less_weight_than_a_careful_one():
    # careful agrees with gold everywhere; sloppy is wrong on a third of the gold pairs and of the shared ones.
    gold = {t: [1, 2, 3] for t in range(6)}
    rows = []
    for t in range(30):
        rows.append(ranking(t, "careful", [1, 2, 3]))
        rows.append(ranking(t, "sloppy", [2, 1, 3] if t % 3 == 0 else [1, 2, 3]))
        rows.append(ranking(t, "third", [1, 2, 3] if t % 5 else [1, 3, 2]))
    people = annotator_reliability(rows, gold).annotators
    assert people["careful"]["weight"] > people["third"]["weight"] > people["sloppy"]["weight"] > 0
    assert people["sloppy"]["accuracy"] < people["careful"]["accuracy"]


def test_two_equally_trusted_annotators_who_disagree_leave_a_tie_not_a_decision():
    """No gold; good, noisy:0.8 and an adversary rank 40 tasks. Good and noisy end equally reliable (their weights
    some 1e-5 apart: EM's residue at its tolerance), so a pair they disagree on is left at p_chosen 0.500001.
    That is a tie (export.POSTERIOR_TIE), not a decision (with a band of 1e-9 all 25 such pairs were exported,
    every one the wrong way): none is exported now, and ties=margin0 keeps them as ties."""
    import random

    from align.labeling.export import POSTERIOR_TIE

    rng = random.Random(0)
    rows, truth = [], {}
    for t in range(40):
        truth[t] = [rng.random() for _ in range(4)]
        responses = [{"text": f"task {t} answer {i}", "meta": {}} for i in range(4)]
        for name, profile in (("good", "good"), ("noisy", "noisy:0.8"), ("adv", "adversarial")):
            rows.append({**ranking(t, name, profile_ranks(parse_profile(profile), truth[t], rng)), "prompt": f"q {t}",
                         "responses": responses, "source": {}, "flags": [], "is_gold": False})

    def answer(pair, side):
        return int(pair[side][0]["content"].rsplit(" ", 1)[1])

    pairs, summary = build_pairs(rows, combine="dawid_skene", gold={})
    people = summary["reliability"]["annotators"]
    assert people["good"]["weight"] == pytest.approx(people["noisy"]["weight"], abs=1e-3) and people["adv"]["weight"] == 0
    wrong = [p for p in pairs if truth[int(p["task_id"])][answer(p, "chosen")] < truth[int(p["task_id"])][answer(p, "rejected")]]
    assert wrong == [] and summary["dropped_ties"] >= 25  # the 25 disagreements of good and noisy, and real ties
    assert all(abs(p["p_chosen"] - 0.5) >= POSTERIOR_TIE and p["weight"] > 0 for p in pairs)
    kept, summary = build_pairs(rows, combine="dawid_skene", gold={}, ties="margin0")
    ties = [p for p in kept if p["tie"]]
    assert len(ties) == summary["kept_ties"] >= 25 and {(p["p_chosen"], p["weight"]) for p in ties} == {(0.5, 0.0)}


def test_profiles():
    import random

    assert parse_profile("noisy:0.8") == ("noisy", 0.8) and parse_profile("adversarial") == ("adversarial", 0.0)
    for bad in ("noisy:0.3", "noisy", "noisy:x", "lazy", "good:1"):
        with pytest.raises(ValueError, match="profile"):
            parse_profile(bad)
    rng = random.Random(0)
    scores = [3.0, 1.0, 2.0, 0.0]
    assert profile_ranks(("adversarial", 0.0), scores, rng) == [4, 2, 3, 1]
    assert profile_ranks(("good", 1.0), scores, rng) == [1, 3, 2, 4]
    # noisy:0.8 orders about 80 % of the pairs as the scorer does
    right = total = 0
    for _ in range(2000):
        ranks = profile_ranks(("noisy", 0.8), scores, rng)
        for i, j in itertools.combinations(range(4), 2):
            right += (ranks[i] < ranks[j]) == (scores[i] > scores[j])
            total += 1
    assert right / total == pytest.approx(0.8, abs=0.02)


OPENINGS = ["Thanks for asking! ", "I am so sorry about that. ", "", "Hi! "]  # word counts differ: no scorer ties
BODIES = ["Open Settings and tap Sync now.", "Go to Settings > Account > Sync and choose Sync now, then wait a minute.",
          "It syncs by itself when you are online, usually within a minute or two of a change.",
          "no", "Try turning it off and on again and it will probably sort itself out in the end"]


def tasks(n: int) -> list[dict]:
    """K=4 support replies per prompt, mixed from openings and bodies so support_style scores them apart."""
    out = []
    for t in range(n):
        combos = [(o, b) for o in OPENINGS for b in BODIES]
        picks = [combos[(t * 7 + k * 5) % len(combos)] for k in range(4)]
        out.append({"prompt": f"Ticket {t}: my notes do not sync", "responses": [o + b for o, b in picks]})
    return out


def truth_agreement(pairs: list[dict]) -> float:
    """The share of pairs whose chosen the scorer itself prefers."""
    return sum(support_style("", p["chosen"][0]["content"]) > support_style("", p["rejected"][0]["content"])
               for p in pairs) / len(pairs)


@pytest.fixture(scope="module")
def three_annotators(tmp_path_factory):
    """Two good annotators (one noisy) and an adversary rank 40 tasks with overlap 3; 8 more are gold."""
    tmp_path = tmp_path_factory.mktemp("three-annotators")
    store = Store(f"sqlite:///{tmp_path / 'labels.db'}")
    store.add_tasks("round-0", tasks(48), source={"policy": "runs/q/sft"})
    # Which turns are gold is keyed with the store's secret (random per store), and the noisy annotator's noise is
    # drawn in turn order: with a new secret each run, about 1 run in 30 gave the noisy annotator no wrong gold and
    # Dawid-Skene no way to tell the two good ones apart (CI saw good and noisy at 0.9226 both). A fixed secret
    # makes the run the same every time; the assertions below held for 29 of 30 random secrets.
    with store.tx() as conn:
        conn.execute(insert(meta_table).values(key="session_secret", value=b"reliability-test-key-0123456789ab".hex()))
    for task in store.batch_tasks("round-0")[:8]:
        scores = [support_style(task["prompt"], r) for r in task["responses"]]
        store.add_gold(task["task_id"], [sorted(set(scores), reverse=True).index(s) + 1 for s in scores])
    assert align(["label", "--run-dir", str(tmp_path), "--simulate", "support_style", "--profiles",
                  "good,noisy:0.8,adversarial", "--gold-rate", "0.3", "--overlap", "3", "--seed", "3"]) == 0
    return store, tmp_path


def test_bad_annotator_is_down_weighted_and_pairs_follow_the_good_ones(three_annotators):
    store, run = three_annotators
    rows = store.submitted_rankings()
    assert sum(r["is_gold"] for r in rows) >= 12  # every annotator met gold tasks
    # --seed 3: ranks go back to canonical order with the shuffle they were given in (they did not, before)
    majority, _ = build_pairs(rows, gold=store.gold_answers())
    weighted, summary = build_pairs(rows, combine="dawid_skene", gold=store.gold_answers())
    people = summary["reliability"]["annotators"]
    good, noisy, adversary = (people[f"sim-support-style-{i}-{p}"] for i, p in
                              enumerate(["good", "noisy-0-8", "adversarial"]))
    assert adversary["accuracy"] < 0.5 and adversary["weight"] == 0
    assert good["accuracy"] > noisy["accuracy"] > adversary["accuracy"]
    assert good["weight"] > noisy["weight"] > 0 and good["gold"] > 0 and good["gold_accuracy"] == 1.0
    assert summary["reliability"]["used_for_pairs"] and summary["reliability"]["converged"]
    # The pairs follow the good annotators: closer to the scorer's own order than the majority vote.
    assert truth_agreement(weighted) > truth_agreement(majority)
    assert truth_agreement(weighted) > 0.95
    assert all(0.5 < p["p_chosen"] <= 1 and p["weight"] == pytest.approx(2 * p["p_chosen"] - 1) for p in weighted)
    # A vote count per pair: the adversary's vote is the one against, on pairs all three ordered.
    assert any(p["votes_chosen"] == 2 and p["votes_rejected"] == 1 for p in weighted)
    assert all(p["votes_chosen"] + p["votes_rejected"] <= 3 for p in majority)
    sure, sure_summary = build_pairs(rows, combine="dawid_skene", gold=store.gold_answers(), min_posterior=0.99)
    assert sure_summary["dropped_uncertain"] == len(weighted) - len(sure) > 0
    assert min(p["p_chosen"] for p in sure) >= 0.99


def test_align_export_writes_the_columns_the_table_and_training_reads_them(three_annotators):
    store, run = three_annotators
    assert align(["export", f"run.dir={run}", "combine=dawid_skene", "min_posterior=0.6", "run.wandb=disabled"]) == 0
    out = run / "preferences"
    summary = json.loads((out / "summary.json").read_text())
    manifest = json.loads((out / "align.json").read_text())
    assert manifest["summary"]["reliability"]["annotators"] == summary["reliability"]["annotators"]
    assert set(summary["reliability"]["annotators"]) == {r["annotator"] for r in store.submitted_rankings()}
    data, _ = load_preferences(out)
    for column in ("p_chosen", "weight", "votes_chosen", "votes_rejected"):
        assert column in data["train"].column_names, column
    assert min(data["train"]["p_chosen"]) >= 0.6
    from align.report import write_report

    page = write_report(run).read_text()
    assert "<h3>Annotator reliability</h3>" in page and "used to decide the pairs" in page
    assert "sim-support-style-2-adversarial</td><td>0.0" in page  # its estimated accuracy, printed as 0.0xxx
    # A config that asks for a posterior threshold without the model that gives one is refused up front.
    assert align(["export", f"run.dir={run}", "min_posterior=0.6"]) == 2


def test_admin_view_shows_each_annotators_reliability(three_annotators):
    store, _ = three_annotators
    store.add_user("boss", "secret-pw", admin=True)
    stats = handlers.admin_stats(store, handlers.sign_in(store, "boss", "secret-pw"))
    rows = {p["name"]: p for p in stats["per_annotator"]}
    adversary = rows["sim-support-style-2-adversarial"]
    assert adversary["est_accuracy"] < 0.5 and adversary["weight"] == 0
    assert rows["sim-support-style-0-good"]["weight"] > 1
    assert rows["boss"]["est_accuracy"] is None  # ranked nothing: nothing estimated


def test_the_admin_views_gold_accuracy_is_the_reliability_tables(store):
    """The Admin tab's gold_accuracy read every submitted row: a flagged ranking the export drops (flagged=drop), a
    pair the annotator tied counted as a mistake. The reliability estimate beside it (and align export's table)
    read neither, so the two columns disagreed. Now the tab shows the estimate's."""
    from align.labeling.agreement import annotator_reliability, rankings_for_reliability

    store.add_tasks("round-0", [{"prompt": f"Ticket {i}", "responses": ["Open Settings.", "Sync.", "no", "meh"]}
                                for i in range(3)])
    gold_id = store.batch_tasks("round-0")[0]["task_id"]
    store.add_gold(gold_id, [1, 2, 3, 4])
    store.add_user("boss", "secret-pw", admin=True)
    boss = handlers.sign_in(store, "boss", "secret-pw")
    for name, ranks, unsafe in (("tied", [1, 1, 3, 4], False), ("flagged", [1, 2, 3, 4], True)):
        store.add_user(name, "secret-pw")
        person = handlers.sign_in(store, name, "secret-pw")
        task = handlers.next_task(store, person, gold_rate=1.0)
        assert task["task_id"] == gold_id
        handlers.submit(store, person, gold_id, [ranks[i] for i in task["order"]], unsafe=unsafe)
        task = handlers.next_task(store, person, overlap=2)
        handlers.submit(store, person, task["task_id"], [1, 2, 3, 4])
    rows = {p["name"]: p for p in handlers.admin_stats(store, boss, overlap=2, flagged="drop")["per_annotator"]}
    estimate = annotator_reliability(rankings_for_reliability(store.submitted_rankings(), flagged="drop"),
                                     store.gold_answers()).annotators
    assert rows["tied"]["gold_accuracy"] == estimate["tied"]["gold_accuracy"] == 1.0  # the tie is no vote, not 5/6
    assert rows["flagged"]["gold_accuracy"] is None and estimate["flagged"]["gold"] == 0  # dropped, as exported


def test_admin_view_says_who_is_trusted_against_the_gold_answers(store):
    """rev1 and rev2 reverse every pair: the one gold task and the 10 tasks only they ranked; honest ranks the gold
    task and 2 of theirs right. Their agreement outweighs one gold vote each, so they are trusted (0.82) and honest
    is barely above chance (0.56). Reliability.warnings says so, and `align export` logged it, but the admin view
    took only the table: its admin, who can act on it, saw two trusted annotators and no warning."""
    store.add_tasks("round-0", [{"prompt": f"Ticket {i}: how do I sync?", "responses": ["Open Settings > Sync.", "no"]}
                                for i in range(11)])
    gold_id = store.batch_tasks("round-0")[0]["task_id"]
    store.add_gold(gold_id, [1, 2])
    for name, ranks, shared in (("honest", [1, 2], 2), ("rev1", [2, 1], 10), ("rev2", [2, 1], 10)):
        store.add_user(name, "secret-pw")
        person = handlers.sign_in(store, name, "secret-pw")
        first = handlers.next_task(store, person, gold_rate=1.0)
        assert first["task_id"] == gold_id
        handlers.submit(store, person, gold_id, [ranks[i] for i in first["order"]])
        for _ in range(shared):  # the fewest-ranked first: the lowest ids, which honest ranks too
            task = handlers.next_task(store, person, overlap=3)
            handlers.submit(store, person, task["task_id"], [ranks[i] for i in task["order"]])
    store.add_user("boss", "secret-pw", admin=True)
    stats = handlers.admin_stats(store, handlers.sign_in(store, "boss", "secret-pw"))
    rows = {p["name"]: p for p in stats["per_annotator"]}
    assert rows["rev1"]["est_accuracy"] > 0.8 and rows["rev1"]["gold_accuracy"] == 0.0
    assert rows["honest"]["est_accuracy"] < 0.6 and rows["honest"]["gold_accuracy"] == 1.0
    assert [w.split(":")[0] for w in stats["warnings"]] == ["rev1", "rev2"]  # not honest, whom gold backs
    assert "0.00 on the 1 gold votes" in stats["warnings"][0]
    estimate = annotator_reliability(store.submitted_rankings(), store.gold_answers())
    assert stats["warnings"] == estimate.warnings  # the sentences `align export` logs


def test_simulate_refuses_bad_profiles_before_opening_the_store(tmp_path, capsys):
    assert align(["label", "--run-dir", str(tmp_path), "--simulate", "support_style", "--profiles", "good,lazy"]) == 2
    assert "--profiles: profile 'lazy' is not allowed" in capsys.readouterr().err
    assert align(["label", "--run-dir", str(tmp_path), "--simulate", "support_style", "--profiles", "good,good",
                  "--annotators", "3"]) == 2
    assert "one per annotator" in capsys.readouterr().err
    assert not (tmp_path / "labels.db").exists()
    with pytest.raises(ValueError, match="one profile per annotator"):
        simulate(Store(f"sqlite:///{tmp_path / 'x.db'}"), "support_style", annotators=2, profiles=["good"])


def test_dawid_skene_is_deterministic_and_leaves_unvoted_pairs_out():
    votes = {(1, 0, 1): [("a", 1), ("b", 1)], (1, 0, 2): [("a", -1), ("b", 1)]}
    one, two = dawid_skene(votes), dawid_skene(votes)
    assert one.annotators == two.annotators and one.posterior == two.posterior
    assert (1, 1, 2) not in one.posterior
    assert one.posterior[(1, 0, 2)] == pytest.approx(0.5)  # two equally trusted annotators disagree


def test_an_estimate_that_does_not_settle_says_so():
    """Without gold, a good and a noisy annotator the rankings cannot tell apart drift for hundreds of EM
    iterations; stopped there, each pair they disagree on went to whichever was ahead (p ~ 0.50), and only
    summary.json's `converged: false` said so. It is a warning now, which export logs and the admin tab shows."""
    votes = {(t, 0, 1): [("good", 1), ("noisy", 1 if t % 5 else -1), ("adv", -1)] for t in range(40)}
    stopped = dawid_skene(votes, max_iter=2)
    assert not stopped.converged and any("did not settle in 2 iterations" in w for w in stopped.warnings)
    settled = dawid_skene(votes)
    assert settled.converged and not any("did not settle" in w for w in settled.warnings)
