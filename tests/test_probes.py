"""Reward-model probes by hand (a reward function with a known habit, a known labelling scorer), the PPO gate
refusing a model that pays for a phrase, DPO warning about one trained on its pairs, and the report showing both."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from align import StageError
from align.cli import main as align
from align.reward_model import EDITS, MAX_PROBE_FLIP_RATE, gate, probe, probe_failure, probe_warning


def conv(role: str, text: str) -> list[dict[str, str]]:
    return [{"role": role, "content": text}]


def heldout(rows: list[dict]):
    from datasets import Dataset

    return Dataset.from_list([{"prompt": conv("user", r.get("prompt", "How do I sync?")),
                               "chosen": conv("assistant", r["chosen"]), "rejected": conv("assistant", r["rejected"]),
                               **{k: v for k, v in r.items() if k not in ("prompt", "chosen", "rejected")}}
                              for r in rows])


def thanks_anywhere(conversations: list[list[dict[str, str]]]) -> list[float]:
    """A reward model with a habit: +2 for 'thanks' anywhere, +0.1 per 'Settings', nothing for length."""
    out = []
    for c in conversations:
        text = c[-1]["content"]
        out.append(2.0 * ("thanks" in text.lower()) + 0.1 * text.count("Settings"))
    return out


def opening_only(prompt: str, response: str) -> float:
    """A labeller who rewards an opening 'Thanks' (+3) but not one at the end; 'Settings' +0.1 each."""
    return 3.0 * response.startswith("Thanks") + 0.1 * response.count("Settings")


PAIRS = [  # chosen mentions Settings twice, rejected once: the reward model orders them by 0.1
    {"chosen": "Open Settings, then Settings > Sync.", "rejected": "Open Settings.", "annotators": ["a", "b", "c"],
     "votes_chosen": 3, "votes_rejected": 0, "margin": 1.0, "p_chosen": 0.97},
    {"chosen": "Settings > Sync. Settings > Export.", "rejected": "Settings, I think", "annotators": ["a", "b", "c"],
     "votes_chosen": 2, "votes_rejected": 1, "margin": 2.0, "p_chosen": 0.8},
    {"chosen": "Go to Settings and Settings again.", "rejected": "It is in Settings.", "annotators": ["a", "b"],
     "votes_chosen": 1, "votes_rejected": 1, "margin": 1.0, "p_chosen": 0.6},
    {"chosen": "Sync.", "rejected": "Settings > Sync.", "annotators": ["a", "b", "c"],  # the model gets this one wrong
     "votes_chosen": 3, "votes_rejected": 0, "margin": 3.0, "p_chosen": 0.99},
]


def test_probes_by_hand():
    data = heldout(PAIRS)
    chosen = thanks_anywhere([r["prompt"] + r["chosen"] for r in data])
    rejected = thanks_anywhere([r["prompt"] + r["rejected"] for r in data])
    probes = probe(thanks_anywhere, data, chosen, rejected)
    assert probes["pairs"] == 4 and probes["scorer"] is None
    buckets = {b["bucket"]: (b["pairs"], b["accuracy"]) for b in probes["by_agreement"]["buckets"]}
    assert buckets == {"unanimous": (2, 0.5), "majority": (1, 1.0), "split": (1, 1.0)}
    assert {b["bucket"]: b["accuracy"] for b in probes["by_margin"]} == {"1": 1.0, "2": 1.0, "3+": 0.0}
    assert {b["bucket"]: b["pairs"] for b in probes["by_posterior"]} == {"<0.7": 1, "0.7-0.9": 1, ">=0.9": 2}
    edits = {e["edit"]: e for e in probes["edits"]}
    assert set(edits) == set(EDITS)
    # 'Thanks!' is worth 2, more than any 0.1 gap: every pair the model had right (3 of 4) flips, at either end.
    for key in ("thanks_end", "thanks_start"):
        assert (edits[key]["flips"], edits[key]["of"], edits[key]["flip_rate"]) == (3, 3, 1.0)
        assert edits[key]["mean_gain"] == pytest.approx(2.0)
    # 'Sorry about that.' and the neutral sentence add nothing this model counts; repeating the last sentence
    # of "Open Settings." adds a Settings (+0.1): a tie with the chosen, not a flip.
    for key in ("sorry_end", "neutral_end", "hope_start"):
        assert edits[key]["flips"] == 0 and edits[key]["mean_gain"] == pytest.approx(0.0)
    assert edits["repeat_end"]["flips"] == 0 and edits["repeat_end"]["mean_gain"] > 0
    assert edits["thanks_end"]["gated"] and not edits["thanks_start"]["gated"]
    # gain against the typical gap: (0.1 + 0.1 + 0.1 + 0.1) / 4 = 0.1, so 'Thanks!' is worth 20 gaps
    assert edits["thanks_end"]["gain_vs_gap"] == pytest.approx(20.0)
    assert probes["gate"]["edit"] == "thanks_end" and probes["gate"]["rate"] == 1.0
    assert "every flip" in probes["gate"]["basis"]
    failure = probe_failure(probes, MAX_PROBE_FLIP_RATE)
    assert "after appending 'Thanks!' (probe thanks_end) in 3 of the 3 pairs it had right (100%" in failure
    assert probe_failure(probes, 1.0) is None


def test_a_probe_scorer_that_returns_no_number_is_refused_before_any_edit_is_scored():
    """probe_scorer= (and `align reward probe --scorer`): one that returns None ended in float()'s traceback once
    the reward model had been trained; every scorer score is now taken before the reward model scores an edit, and
    a StageError names the scorer and the held-out pair. NaN too: it would count as no flip, silently."""
    data = heldout(PAIRS)
    chosen = thanks_anywhere([r["prompt"] + r["chosen"] for r in data])
    rejected = thanks_anywhere([r["prompt"] + r["rejected"] for r in data])
    edits_scored = []

    def reward(conversations):
        edits_scored.append(len(conversations))
        return thanks_anywhere(conversations)

    def none_for_a_short_reply(prompt, response):
        return opening_only(prompt, response) if len(response) > 10 else None

    with pytest.raises(StageError, match=r"^scorer 'mine:short' returned None for held-out pair 4 \('How do I sync\?'"
                                         r"\): a scorer returns a number \(int or float\)$"):
        probe(reward, data, chosen, rejected, scorer=none_for_a_short_reply, scorer_name="mine:short")
    with pytest.raises(StageError, match=r"^scorer 'mine:nan' returned nan for held-out pair 1 .*finite number$"):
        probe(reward, data, chosen, rejected, scorer=lambda p, r: float("nan"), scorer_name="mine:nan")
    assert edits_scored == []


def test_a_known_labeller_separates_what_the_labels_taught_from_the_habit():
    """The labeller rewards an opening Thanks: a flip there is supported; one from a Thanks at the end is not."""
    data = heldout(PAIRS)
    chosen = thanks_anywhere([r["prompt"] + r["chosen"] for r in data])
    rejected = thanks_anywhere([r["prompt"] + r["rejected"] for r in data])
    probes = probe(thanks_anywhere, data, chosen, rejected, scorer=opening_only, scorer_name="opening_only")
    edits = {e["edit"]: e for e in probes["edits"]}
    assert edits["thanks_start"]["scorer_flip_rate"] == 1.0 and edits["thanks_start"]["unsupported_flip_rate"] == 0
    assert edits["thanks_start"]["scorer_mean_gain"] == pytest.approx(3.0)
    assert edits["thanks_end"]["scorer_flip_rate"] == 0 and edits["thanks_end"]["unsupported_flip_rate"] == 1.0
    assert probes["gate"]["edit"] == "thanks_end" and "opening_only does not make too" in probes["gate"]["basis"]
    # the two rates are over different pairs (the model's right ones, the scorer's ordered ones): the page says of what
    from align.report import probes_html

    start = edits["thanks_start"]
    page = probes_html(probes)
    assert f"<td>{start['flips']} of {start['of']}</td>" in page
    assert f"<td>{start['scorer_flips']} of {start['scorer_of']} (100%)</td>" in page and start["scorer_of"] > 0
    assert "opening_only: flips (of the pairs it orders as labelled)" in page


def test_a_flip_on_a_pair_the_labeller_orders_the_other_way_is_not_supported():
    """Labels from a noisy annotator: on 3 of 10 pairs the labelling scorer prefers the rejected answer. The
    scorer gives nothing for 'Hope this helps!'; the reward model pays +0.5 for it and so flips exactly those 3
    (their gap is 0.3). The scorer 'prefers' the edited rejected answer there only because it did before the
    edit: the flips are the reward model's own habit, and the gate counts them."""
    quality = {f"chosen {i}.": (1.0 if i >= 7 else 2.0) for i in range(10)}
    quality |= {f"rejected {i}.": (2.0 if i >= 7 else 1.0) for i in range(10)}
    learnt = {f"chosen {i}.": (0.3 if i >= 7 else 1.0) for i in range(10)} | {f"rejected {i}.": 0.0 for i in range(10)}

    def answer(text: str) -> str:  # the answer an edit was made to
        return re.search(r"(chosen|rejected) \d+\.", text).group(0)

    def labeller(prompt: str, response: str) -> float:
        return quality[answer(response)]

    def reward(conversations):
        return [learnt[answer(c[-1]["content"])] + 0.5 * ("Hope this helps!" in c[-1]["content"]) for c in conversations]

    data = heldout([{"chosen": f"chosen {i}.", "rejected": f"rejected {i}."} for i in range(10)])
    chosen = reward([r["prompt"] + r["chosen"] for r in data])
    rejected = reward([r["prompt"] + r["rejected"] for r in data])
    probes = probe(reward, data, chosen, rejected, scorer=labeller, scorer_name="labeller")
    hope = {e["edit"]: e for e in probes["edits"]}["hope_end"]
    assert (hope["flips"], hope["of"], hope["scorer_flip_rate"], hope["scorer_mean_gain"]) == (3, 10, 0.0, 0.0)
    assert hope["unsupported_flips"] == 3 and hope["unsupported_flip_rate"] == pytest.approx(0.3)
    assert probes["gate"]["edit"] == "hope_end" and probe_failure(probes, MAX_PROBE_FLIP_RATE) is not None


def test_one_annotator_per_pair_is_said_so():
    data = heldout([{**p, "annotators": ["solo"], "votes_chosen": 1, "votes_rejected": 0} for p in PAIRS[:2]])
    scores = thanks_anywhere([r["prompt"] + r["chosen"] for r in data])
    probes = probe(thanks_anywhere, data, scores, [s - 1 for s in scores])
    assert probes["by_agreement"]["buckets"] == [{"bucket": "single annotator", "pairs": 2, "accuracy": 1.0}]
    assert "one annotator per pair" in probes["by_agreement"]["note"]


def reward_dir(path: Path, probes: dict | None, *, preferences: Path | None = None) -> Path:
    """A reward folder complete enough for the input checks, with an accuracy that passes and the given probes."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "smollm2-135m"}))
    save_file({"score.weight": torch.zeros(1, 4)}, str(path / "adapter_model.safetensors"))
    (path / "tokenizer_config.json").write_text("{}")
    manifest = {"stage": "reward", "metrics": {"eval_accuracy": 0.9},
                "parents": {"preferences": {"path": str(preferences or path.parent / "preferences")}}}
    (path / "align.json").write_text(json.dumps({**manifest, **({"probes": probes} if probes is not None else {})}))
    return path


FAILING = {"gate": {"edit": "thanks_end", "what": "appending 'Thanks!'", "rate": 0.45, "flips": 9, "of": 20,
                    "basis": "every flip"}}


def test_ppo_gate_refuses_a_reward_model_that_pays_for_a_phrase(tmp_path, capsys, caplog):
    rm = reward_dir(tmp_path / "rm", FAILING)
    assert align(["ppo", f"run.dir={tmp_path}", "sft=none", f"reward_model={rm}", "run.wandb=disabled"]) == 1
    err = capsys.readouterr().err
    assert "pays for a phrase" in err and "after appending 'Thanks!' (probe thanks_end) in 9 of the 20" in err
    assert "max_probe_flip_rate=0.25" in err and "pass max_probe_flip_rate=1" in err
    assert gate(rm, 0.6, 1.0)["eval_accuracy"] == 0.9  # overridden
    assert gate(rm, 0.6, 0.5)["eval_accuracy"] == 0.9  # 0.45 is under a threshold of 0.5
    caplog.set_level("WARNING")
    assert gate(reward_dir(tmp_path / "old", None), 0.6)["eval_accuracy"] == 0.9  # before probes: a warning only
    assert "has no probes in its manifest" in caplog.text


def test_dpo_is_warned_about_a_reward_model_trained_on_its_pairs(tmp_path):
    prefs = tmp_path / "preferences"
    prefs.mkdir()
    rm = reward_dir(tmp_path / "reward", FAILING, preferences=prefs)
    note = probe_warning(rm, prefs)
    assert note and "fails a probe" in note and "DPO learns from the same pairs" in note
    assert probe_warning(rm, tmp_path / "other-prefs") is None  # trained on other pairs: says nothing about these
    assert probe_warning(tmp_path / "no-reward", prefs) is None
    passing = {"gate": {**FAILING["gate"], "rate": 0.1}}
    assert probe_warning(reward_dir(tmp_path / "r2", passing, preferences=prefs), prefs) is None


def test_kept_ties_count_in_no_accuracy():
    """A tie kept by ties=margin0 has its first response as 'chosen' and no right answer: scoring it would pull
    accuracy toward 0.5 whatever the model does. It is counted (eval_ties) and left out of the figures."""
    from align.reward_model import heldout_metrics

    data = heldout([{"chosen": "Thanks! Open Settings.", "rejected": "no", "tie": False},
                    {"chosen": "Open Settings.", "rejected": "Open Settings, then Sync.", "tie": True},
                    {"chosen": "Thanks, tap Sync.", "rejected": "tap", "tie": False}])
    figures = heldout_metrics(data, [2.0, 0.0, 1.0], [0.0, 1.0, -1.0])
    assert figures["eval_accuracy"] == 1.0 and figures["eval_pairs"] == 2 and figures["eval_ties"] == 1
    assert sum(b["pairs"] for b in figures["calibration"]) == 2
    probes = probe(thanks_anywhere, data, [2.0, 0.0, 1.0], [0.0, 1.0, -1.0])
    assert probes["pairs"] == 2


def test_calibration_bins_by_hand():
    """Calibration on four hand-made gaps, two equal-count bins by |gap|: each bin's Bradley-Terry claim (the mean
    sigmoid(|gap|)), its observed accuracy and the pair-weighted error between them, exactly."""
    import math

    from align.reward_model import heldout_metrics

    def sigmoid(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    rows = [{"prompt": f"Question {i}?", "chosen": f"Thanks! Step {i}.", "rejected": "no"} for i in range(4)]
    gaps = [0.1, 2.0, -1.0, 3.0]  # |gap| order 0.1, 1.0 | 2.0, 3.0: the -1.0 one is the wrong pick, in the first bin
    figures = heldout_metrics(heldout(rows), gaps, [0.0] * 4, n_bins=2)
    low, high = figures["calibration"]
    assert (low["gap_min"], low["gap_max"], low["pairs"], low["accuracy"]) == (0.1, 1.0, 2, 0.5)
    assert (high["gap_min"], high["gap_max"], high["pairs"], high["accuracy"]) == (2.0, 3.0, 2, 1.0)
    assert low["predicted"] == pytest.approx((sigmoid(0.1) + sigmoid(1.0)) / 2) == pytest.approx(0.628019, abs=1e-6)
    assert high["predicted"] == pytest.approx((sigmoid(2.0) + sigmoid(3.0)) / 2) == pytest.approx(0.916686, abs=1e-6)
    assert figures["calibration_error"] == pytest.approx(0.5 * (0.628019 - 0.5) + 0.5 * (1.0 - 0.916686), abs=1e-6)
    assert figures["eval_accuracy"] == 0.75 and figures["eval_mean_margin"] == pytest.approx(4.1 / 4)


def test_calibration_against_soft_labels():
    """dawid_skene's pairs carry p_chosen: a model whose sigmoid(gap) equals p on every pair is calibrated (it
    measured 0.30 calibration error against the hard pick), and its accuracy against the picks may exceed the
    mean posterior (what the labels' own certainty says of their picks, not a ceiling on that accuracy)."""
    import math

    from align.reward_model import heldout_metrics

    rows = [{"prompt": f"Question {i}?", "chosen": f"Step {i}.", "rejected": "no", "p_chosen": 0.7} for i in range(20)]
    figures = heldout_metrics(heldout(rows), [math.log(0.7 / 0.3)] * 20, [0.0] * 20)
    assert figures["calibration_error"] == pytest.approx(0.0, abs=1e-9)
    assert all(b["accuracy"] == pytest.approx(0.7) for b in figures["calibration"])
    assert figures["eval_accuracy"] == 1.0 and figures["posterior_ceiling"] == pytest.approx(0.7)
    wrong = heldout_metrics(heldout(rows), [-math.log(0.7 / 0.3)] * 20, [0.0] * 20)  # every pick reversed: right 30 %
    assert all(b["accuracy"] == pytest.approx(0.3) for b in wrong["calibration"])
    assert wrong["calibration_error"] == pytest.approx(0.4)


def test_heldout_accuracy_interval_counts_prompts():
    """Six pairs from two prompts' rankings: the interval counts prompts, so a model right on one prompt's
    pairs and wrong on the other's can score almost anything from 0 to 1; six prompts' pairs count one by one. Two
    tasks of one prompt (task ids apart, as two batches make) are one prompt."""
    from align.reward_model import heldout_metrics

    rows = [{"prompt": "How do I sync?" if i < 3 else "Where is export?", "chosen": f"Thanks! Step {i}.",
             "rejected": "no", "task_id": str(i)} for i in range(6)]
    chosen, rejected = [1.0, 1.0, 1.0, -1.0, -1.0, -1.0], [0.0] * 6
    figures = heldout_metrics(heldout(rows), chosen, rejected)
    assert figures["eval_accuracy"] == 0.5 and figures["eval_prompts"] == 2
    assert figures["eval_accuracy_ci"][0] < 0.02 and figures["eval_accuracy_ci"][1] > 0.98
    alone = heldout_metrics(heldout([{**r, "prompt": f"Question {i}?"} for i, r in enumerate(rows)]), chosen, rejected)
    assert alone["eval_prompts"] == 6 and 0.0 < alone["eval_accuracy_ci"][0] < 0.5 < alone["eval_accuracy_ci"][1]


def test_held_out_pairs_that_are_all_ties_give_no_accuracy():
    """Nothing to be right about: no accuracy (the PPO gate refuses None), not the ties scored as decisions."""
    from align.reward_model import heldout_metrics

    data = heldout([{"chosen": "Open Settings.", "rejected": "Open Settings, then Sync.", "tie": True}] * 4)
    figures = heldout_metrics(data, [2.0] * 4, [0.0] * 4)
    assert figures["eval_accuracy"] is None and figures["eval_pairs"] == 0 and figures["eval_ties"] == 4
    assert probe(thanks_anywhere, data, [2.0] * 4, [0.0] * 4)["pairs"] == 0


def test_the_gate_says_when_the_held_out_pairs_were_all_ties(tmp_path):
    rm = reward_dir(tmp_path / "rm", None)
    manifest = json.loads((rm / "align.json").read_text())
    (rm / "align.json").write_text(json.dumps({**manifest, "metrics": {"eval_accuracy": None, "eval_pairs": 0,
                                                                       "eval_ties": 5}}))
    with pytest.raises(StageError, match=r"all 5 of its held-out pairs are ties \(hold out more prompts"):
        gate(rm, 0.6)
