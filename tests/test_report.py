"""The run report's first screen: each stage's outcome in one row, and what to look at before using the result.

Manifests written by hand with the keys each stage writes; tests/test_pipeline.py checks the same table on a
real pipeline's manifests in a browser."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from align.artifacts import MANIFEST
from align.report import cautions, glance, glance_text, write_report

SFT = {"stage": "sft", "seconds": 130.4, "metrics": {"eval_loss": 3.3521, "eval_mean_token_accuracy": 0.3468, "global_step": 10,
                                   "train_runtime": 101.1}}
SAMPLE = {"stage": "sample", "metrics": {"new_tasks": 40, "responses_sampled": 160, "responses_cut": 104}}
EXPORT = {"stage": "export", "metrics": {"pairs": 184, "rankings": 40, "train_pairs": 157, "test_pairs": 27,
                                         "dropped_ties": 56, "dropped_flagged": 0}}
GATE = {"edit": "hope_end", "what": "appending 'Hope this helps!'", "rate": 0.35, "flips": 7, "of": 20,
        "basis": "every flip"}
REWARD = {"stage": "reward", "seconds": 59.6, "metrics": {"eval_accuracy": 0.7407, "eval_pairs": 27, "eval_prompts": 6,
                                                          "eval_accuracy_ci": [0.5186, 0.9259], "length_correlation": -0.53,
                                         "global_step": 16, "train_runtime": 65.1},
          "probes": {"gate": GATE, "by_agreement": {"buckets": []}, "edits": []}}
DPO = {"stage": "dpo", "metrics": {"heldout_accuracy": 0.6667, "heldout_accuracy_ci": [0.45, 0.83], "heldout_pairs": 27,
                                   "heldout_prompts": 6, "heldout_reward_margin": 0.1189, "global_step": 10},
       "reward_probe_warning": "the reward model trained on these pairs fails a probe"}
EVAL = {"stage": "eval", "baseline": "sft", "prompts": 48, "prompts_seen_in_training": {"sft": 0, "dpo": 0},
        "policies": {"sft": {"length": 34.1, "reward_model/mean": 0.78},
                     "dpo": {"length": 16.6, "kl": 3.222, "reward_model/mean": 0.96, "reward_model/win_rate": 0.5,
                             "reward_model/win_rate_ci": [0.354, 0.625], "scorer:support_style/win_rate": 0.8021,
                             "scorer:support_style/win_rate_ci": [0.698, 0.896], "reward_model/wins": 24,
                             "reward_model/ties": 0, "reward_model/losses": 24, "scorer:support_style/wins": 38,
                             "scorer:support_style/ties": 1, "scorer:support_style/losses": 9}},
        "metrics": {"dpo/kl": 3.222}}


def test_each_stage_says_its_outcome_in_figures():
    assert glance("sft", SFT) == ["held-out loss 3.352 (next-token accuracy 34.7%)", "10 steps in 101 s"]
    resumed = {**SFT, "metrics": {**SFT["metrics"], "train_loss_since_resume": 2.0}}  # the time is the last process's
    assert glance("sft", resumed)[1] == "10 steps, resumed from a checkpoint (101 s since)"
    assert glance("sample", SAMPLE) == ["160 answers to 40 prompts", "104 (65%) cut at max_new_tokens"]
    chosen = {"metrics": {**SAMPLE["metrics"], "selection/candidates": 80, "responses_sampled": 320}}
    assert glance("sample", chosen)[0] == "40 prompts chosen from 80 candidates (320 answers sampled)"
    assert glance("export", EXPORT) == ["184 pairs from 40 rankings: 157 to train, 27 held out", "dropped: 56 ties"]
    assert glance("reward", REWARD) == ["held-out accuracy 74.1% [51.9%, 92.6%] on 27 pairs from 6 prompts",
                                        "worst probe hope_end: 35% of the 20 pairs it had right flip", "16 steps in 65 s"]
    assert glance("dpo", DPO) == ["held-out preference accuracy 66.7% [45.0%, 83.0%] on 27 pairs from 6 prompts "
                                  "(implicit reward margin 0.119)", "10 steps"]
    # TRL's figure, a mean of per-batch means (27 pairs as 12, 12 and 3: 75.0 % for 18 of 27), is said to be that
    old = {"metrics": {"eval_rewards/accuracies": 0.75, "eval_rewards/margins": 0.2265, "global_step": 10}}
    assert glance("dpo", old)[0] == "held-out preference accuracy 75.0% (TRL's mean of per-batch means, not over pairs)"
    assert glance("eval", EVAL) == ["dpo vs sft over 48 prompts: 50.0% [35.4%, 62.5%] by reward_model (0 ties), "
                                    "80.2% [69.8%, 89.6%] by scorer:support_style (1 tie), KL 3.22 nats per answer"]
    ppo = {"metrics": {"reward_mean_first": -0.5, "reward_mean": 0.25, "kl": 1.5, "steps": 20}}
    assert glance("ppo", ppo) == ["mean reward -0.500 → 0.250", "KL 1.5 nats per response (k1, summed over the response)",
                                  "20 steps"]
    grpo = {"metrics": {"reward_mean_first": 0.1, "reward": 0.4, "steps": 8}}
    assert glance("grpo", grpo) == ["mean reward 0.100 → 0.400", "8 steps"]


def test_each_rl_stage_says_what_its_kl_is():
    """PPO logs k1 summed over a response, TRL's GRPO k3 and RLOO k1 averaged over tokens: one key, "KL", for
    figures about a response's length apart. Each says its own."""
    kl = {"reward_mean_first": 0.1, "reward": 0.4, "reward_mean": 0.4, "kl": 0.0123, "steps": 8}
    assert glance("ppo", {"metrics": kl})[1] == "KL 0.0123 nats per response (k1, summed over the response)"
    assert glance("grpo", {"metrics": kl})[1] == "KL 0.0123 nats per token (k3, TRL's mean over tokens)"
    assert glance("rloo", {"metrics": kl})[1] == "KL 0.0123 nats per token (k1, TRL's mean over tokens)"
    from align.report import PLOTS

    titles = {stage: next(t for t, _, keys in PLOTS[stage] if "kl" in keys) for stage in ("ppo", "grpo", "rloo")}
    assert titles == {"ppo": "KL from reference, nats per response (k1 sum)",
                      "grpo": "KL from reference, nats per token (k3 mean)",
                      "rloo": "KL from reference, nats per token (k1 mean)"}
    # PPO's KL coefficient is no KL: plotted on a nats axis, beta ~0.05 is a flat line at its floor
    for stage in ("ppo", "grpo", "rloo"):
        for title, _, keys in PLOTS[stage]:
            assert "nats" not in title or keys == ["kl"], (stage, title, keys)
    assert ("KL coefficient β (reward per nat)", "β (reward per nat)", ["kl_coef"]) in PLOTS["ppo"]
    assert glance("merge", {"metrics": {}}) == [] and glance("sft", {}) == []


def test_cautions_name_only_what_crosses_its_line():
    assert cautions("sample", SAMPLE) == ["65% of the sampled answers were cut at max_new_tokens: raise "
                                          "sample.generation.max_new_tokens for answers a person can judge whole, with another run.dir "
                                          "(or, for align sample, another batch=): a batch keeps the answers it has"]
    assert cautions("sample", {"metrics": {"responses_sampled": 160, "responses_cut": 64}}) == []
    # sampled again after `align sft` made the policy anew: the batch kept its answers, said in a log line only
    kept = {"metrics": {"responses_sampled": 0}, "batch": "round-0",
            "sampled_otherwise": {"tasks": 10, "differ": ["policy_created"]}}
    assert cautions("sample", kept) == [
        "10 tasks of batch round-0 keep answers sampled otherwise than this run's (policy_created differ: an earlier "
        "policy or settings): the labels, and what trains on them, are of those answers; to sample from this "
        "policy, use another batch= (or another run.dir)"]
    found = cautions("reward", REWARD)
    assert len(found) == 2 and "r = -0.53: shorter scores higher" in found[0]
    assert found[1] == ("the reward model prefers the worse answer of a held-out pair after appending 'Hope this "
                        "helps!' (probe hope_end) in 7 of the 20 pairs it had right (35%; counted: every flip), above "
                        "max_probe_flip_rate=0.25: PPO refuses it at that setting")
    calm = {"metrics": {"length_correlation": 0.3}, "probes": {"gate": {**GATE, "rate": 0.2}}}
    assert cautions("reward", calm) == []
    # an accuracy whose interval holds 50% (a reward model's, DPO's): said, as its glance figure reads as "worked"
    chance = {"metrics": {"eval_accuracy": 0.636, "eval_accuracy_ci": [0.491, 0.760]}}
    assert cautions("reward", chance) == ["its held-out accuracy is 63.6% [49.1%, 76.0%], which does not rule out "
                                          "chance (50%): more labelled pairs (more held-out prompts for a narrower "
                                          "interval) or more training steps"]
    assert cautions("dpo", DPO) == ["its held-out preference accuracy is 66.7% [45.0%, 83.0%], which does not rule "
                                    "out chance (50%): more labelled pairs (more held-out prompts for a narrower "
                                    "interval) or more training steps"]
    # below chance is not "does not rule out chance": the interval rules it out, the wrong way round
    worse = {"metrics": {"eval_accuracy": 0.3, "eval_accuracy_ci": [0.2, 0.4]}}
    assert cautions("reward", worse)[0].startswith("its held-out accuracy is 30.0% [20.0%, 40.0%], below chance")
    assert cautions("reward", {"metrics": {"eval_accuracy": 0.3, "eval_accuracy_ci": [None, None]}}) == []
    assert cautions("dpo", {"metrics": {**DPO["metrics"], "heldout_accuracy_ci": [0.51, 0.83]}}) == []
    # a DPO that moved no closer to the preferred answers: a held-out margin at 0 or below, or (no held-out pairs)
    # a sigmoid loss that stayed at ln 2, its step-0 value; neither is said of a DPO that moved
    still = {"metrics": {**DPO["metrics"], "heldout_accuracy_ci": [0.51, 0.83], "heldout_reward_margin": -0.004,
                         "heldout_logp_margin_sft": 1.25, "heldout_logp_margin_dpo": 1.21}}
    assert cautions("dpo", still) == ["its held-out implicit reward margin is -0.004 (log-prob margin 1.25 for SFT, "
                                      "1.21 after): on pairs it did not train on, the policy moved no closer to the "
                                      "preferred answers than the SFT: raise train.lr or train.max_steps (or beta), "
                                      "and check that the labels prefer what they should"]
    flat = {"metrics": {"train_loss": 0.6925, "global_step": 10}, "config": {"loss": "sigmoid"}}
    assert cautions("dpo", flat)[0].startswith("its training loss averaged 0.6925, DPO's value at step 0 (ln 2 = 0.6931)")
    assert cautions("dpo", {"metrics": {"train_loss": 0.64, "global_step": 10}}) == []
    assert cautions("dpo", {**flat, "config": {"loss": "hinge"}}) == []  # another loss starts elsewhere
    assert cautions("eval", EVAL) == []
    seen = {**EVAL, "prompts_seen_in_training": {"sft": 48, "dpo": 0}}
    assert cautions("eval", seen) == ["sft was trained on 48 of the 48 eval prompts"]
    # one policy's answers cut at max_new_tokens far more often than the other's: a judge of cut answers is biased
    cut = {**EVAL, "policies": {"sft": {**EVAL["policies"]["sft"], "cut": 0.21},
                                "dpo": {**EVAL["policies"]["dpo"], "cut": 0.04}}}
    assert cautions("eval", cut) == ["answers cut at max_new_tokens: sft's 21%, dpo's 4%; a judge that marks a cut "
                                     "answer down favours the policy cut less often: raise "
                                     "eval's generation.max_new_tokens to judge them whole"]
    near = {**EVAL, "policies": {"sft": {**EVAL["policies"]["sft"], "cut": 0.12},
                                 "dpo": {**EVAL["policies"]["dpo"], "cut": 0.05}}}
    assert cautions("eval", near) == []
    ten = {**EVAL, "policies": {"sft": {"cut": 0.3}, "dpo": {"cut": 0.2}}}  # 0.3 - 0.2 < 0.1 in floats: 10 points
    assert len(cautions("eval", ten)) == 1
    odd = {**EVAL, "policies": {"sft": "n/a", "dpo": [1, 2]}}  # another shape: no caution, no failure
    assert cautions("eval", odd) == []


def test_a_human_board_of_ties_says_so_rather_than_a_point_interval():
    """Two policies that answered alike: every A/B verdict a tie, both rated 1000 [1000, 1000], which read as
    certainty; the line says they were all ties."""
    from align.report import human_lines

    board = {"comparisons": 3, "stale_comparisons": 0, "ties": 3,
             "leaderboard": [{"policy": "dpo", "rating": 1000.0, "ci": [1000.0, 1000.0]},
                             {"policy": "sft", "rating": 1000.0, "ci": [1000.0, 1000.0]}]}
    assert human_lines({"baseline": "sft", "human": board}) == [
        "human A/B (3 verdicts, all ties: no preference either way): dpo 1000 [1000, 1000] (Bradley-Terry, sft = 1000)"]
    assert "(8 verdicts, 2 ties)" in human_lines({"baseline": "sft", "human": {**board, "comparisons": 8, "ties": 2}})[0]
    assert "(8 verdicts)" in human_lines({"baseline": "sft", "human": {**board, "comparisons": 8, "ties": None}})[0]


def write(run: Path, folder: str, manifest: dict) -> None:
    (run / folder).mkdir(parents=True)
    (run / folder / MANIFEST).write_text(json.dumps(manifest))


def test_the_report_opens_with_the_runs_outcome_and_cautions(tmp_path):
    run = tmp_path / "run"
    for folder, manifest in [("sft", SFT), ("sample", SAMPLE), ("preferences", EXPORT), ("reward", REWARD),
                             ("dpo", DPO), ("eval", EVAL)]:
        write(run, folder, manifest)
    (run / "sft" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.4}) + "\n")
    page = write_report(run).read_text()
    assert "<title>align · run</title>" in page  # the browser tab's name (an f-string without its f showed code)
    glance_table = page[page.index("<table class='glance'>"):page.index("</table>", page.index("class='glance'"))]
    rows = glance_table.split("<tr>")[2:]
    assert [r.split("'")[1] for r in rows] == ["#sft", "#sample", "#preferences", "#reward", "#dpo", "#eval"]
    assert "held-out accuracy 74.1% [51.9%, 92.6%] on 27 pairs from 6 prompts" in rows[3]
    assert page.index("class='glance'") < page.index("<section")  # the first screen, after the headline
    assert page.count("<div class='cautions'>") == 1 and "sample: 65% of the sampled answers" in page
    assert "<p class='caution'>the reward model trained on these pairs fails a probe</p>" in page  # dpo's warning
    # eval: a row per figure, a column per policy, win-rates first with their interval
    assert "<tr><th>figure</th><th>sft</th><th>dpo</th></tr><tr><td>reward_model/win_rate</td><td></td>" \
           "<td><b>50.0%</b> [35.4%, 62.5%] · 24 won, 0 tied, 24 lost</td></tr>" in page
    # raw numbers folded under a section's plots; a section with nothing else shows them open
    sft = page[page.index("<section id='sft'>"):page.index("</section>", page.index("<section id='sft'>"))]
    assert "<details><summary>all metrics</summary><table class='kv'>" in sft
    sample = page[page.index("<section id='sample'>"):page.index("</section>", page.index("<section id='sample'>"))]
    assert "<details>" not in sample and "<table class='kv'>" in sample
    # the same first screen is what `align pipeline` prints when it ends
    assert glance_text(run).splitlines() == [
        "- sft (2:10): held-out loss 3.352 (next-token accuracy 34.7%) · 10 steps in 101 s",
        "- sample: 160 answers to 40 prompts · 104 (65%) cut at max_new_tokens",
        "- preferences: 184 pairs from 40 rankings: 157 to train, 27 held out · dropped: 56 ties",
        "- reward (1:00): held-out accuracy 74.1% [51.9%, 92.6%] on 27 pairs from 6 prompts · worst probe hope_end: "
        "35% of the 20 pairs it had right flip · 16 steps in 65 s",
        "- dpo: held-out preference accuracy 66.7% [45.0%, 83.0%] on 27 pairs from 6 prompts (implicit reward margin 0.119) "
        "· 10 steps",
        "- eval: dpo vs sft over 48 prompts: 50.0% [35.4%, 62.5%] by reward_model (0 ties), 80.2% [69.8%, 89.6%] by "
        "scorer:support_style (1 tie), KL 3.22 nats per answer",
        "", "Look at before using the result:", *[f"- sample: {c}" for c in cautions("sample", SAMPLE)],
        *[f"- reward: {c}" for c in cautions("reward", REWARD)], *[f"- dpo: {c}" for c in cautions("dpo", DPO)]]
    md = (run / "report.md").read_text()
    assert "- reward (1:00): held-out accuracy 74.1% [51.9%, 92.6%] on 27 pairs from 6 prompts · worst probe" in md
    assert "<td><a href='#sft'>sft</a></td><td>2:10</td>" in page and "<td><a href='#sample'>sample</a></td><td></td>" \
        in page  # a manifest without its wall time (written before align recorded it) leaves the cell empty
    assert "- dpo beats sft judged by scorer:support_style: win-rate 80.2% [69.8%, 89.6%] (95% interval) over " \
           "48 prompts (1 tie) · KL 3.22 nats per answer\n" in md
    assert "<meta name='viewport' content='width=device-width,initial-scale=1'>" in page  # a phone lays it out to fit
    # eval with kl_samples=0 measured no KL: said by leaving it out, not as "KL nan"
    (run / "eval" / MANIFEST).write_text(json.dumps({**EVAL, "policies": {
        k: {f: v for f, v in row.items() if f != "kl"} for k, row in EVAL["policies"].items()}}))
    page = write_report(run).read_text()
    assert "nan" not in page.split("<section")[0] and "win-rate <b>80.2%</b> [69.8%, 89.6%] (95% interval) over 48 prompts (1 tie)</li>" in page


def test_names_in_the_first_screen_are_text(tmp_path):
    """A policy's name reaches the page from eval's manifest (an adapter folder a user named): text, not markup."""
    name = "<img src=x onerror=alert(1)>"
    write(tmp_path, "eval", {**EVAL, "policies": {name: EVAL["policies"]["dpo"]},
                             "prompts_seen_in_training": {name: 3}})
    page = write_report(tmp_path).read_text()
    assert "<img src=x" not in page
    assert "&lt;img src=x onerror=alert(1)&gt; vs sft over 48 prompts: 50.0% [35.4%, 62.5%] by reward_model" in page
    assert "&lt;img src=x onerror=alert(1)&gt; was trained on 3 of the 48 eval prompts" in page


def test_a_name_matplotlib_would_read_as_math_is_drawn_as_text(tmp_path):
    """"$\\foo$" is math to matplotlib, which fails on it: the eval section must not be lost to a name."""
    name = "dpo_$\\foo$"
    write(tmp_path, "eval", {**EVAL, "policies": {"sft": EVAL["policies"]["sft"], name: EVAL["policies"]["dpo"]},
                             "prompts_seen_in_training": {}})
    page = write_report(tmp_path).read_text()
    assert "alt='win-rate: " in page and "could not be drawn" not in page
    assert "dpo_$\\foo$ · reward_model (0 ties) 50.0%" in page  # in its alt text as it is named


def test_example_pairs_come_from_different_prompts(tmp_path):
    from datasets import Dataset, DatasetDict

    def pair(prompt: str, chosen: str) -> dict:
        return {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": "no"}]}

    pairs = [pair("how do I sync", f"a{i}") for i in range(3)] + [pair("how do I export", "b"), pair("hi", "c")]
    DatasetDict({"train": Dataset.from_list(pairs)}).save_to_disk(str(tmp_path / "preferences"))
    (tmp_path / "preferences" / MANIFEST).write_text(json.dumps(EXPORT))
    page = write_report(tmp_path).read_text()
    examples = page[page.index("<h3>Example pairs</h3>"):]
    assert examples.count("how do I sync") == 1 and "how do I export" in examples and ">hi<" in examples
    assert ">a0<" in examples and ">a1<" not in examples


def test_a_manifest_of_another_shape_costs_its_row_not_the_report(tmp_path):
    """A stage writes the report when it ends: a folder whose manifest lacks what the first screen reads (one
    written by another version of align) gets a dash there, and the report is still written."""
    write(tmp_path, "reward", {"stage": "reward", "metrics": {}, "probes": {"gate": {"rate": 0.5}}})
    write(tmp_path, "sft", SFT)
    page = write_report(tmp_path).read_text()
    assert "<td><a href='#reward'>reward</a></td><td></td><td>—</td>" in page and "held-out loss 3.352" in page
    assert "Its figures could not be drawn from its manifest (KeyError(&#x27;by_agreement&#x27;))" in page


def test_with_rounds_the_answer_on_top_is_the_last_rounds_and_says_so(tmp_path):
    run = tmp_path / "run"
    write(run, "eval", EVAL)
    later = {**EVAL, "policies": {**EVAL["policies"], "dpo": {**EVAL["policies"]["dpo"],
                                                              "scorer:support_style/win_rate": 0.9}}}
    write(run / "round-1", "eval", later)
    write_report(run / "round-1")
    page = write_report(run).read_text()
    top = page[:page.index("<table class='glance'>")]
    assert top.index("round-1, the last round:") < top.index("win-rate <b>90.0%</b>") \
        < top.index("round 0 (this folder):") < top.index("win-rate <b>80.2%</b>")
    assert page.count("win-rate <b>90.0%</b>") == 1  # said once: the list of rounds points at it
    assert "<p class='meta'>its verdict is the first on this page</p>" in page


def test_a_verdict_by_a_reward_model_near_chance_and_rounds_by_different_ones_say_so(tmp_path):
    """Round 1's "beats" (86.5%) came from its own reward model, itself at 63.6% [49.1%, 76.0%] on held-out pairs,
    and round 0's 50% from another: both lines said only "judged by reward_model". The verdict says the judge
    is near chance, and that the rounds' reward_model verdicts do not compare; by the scorer they share, they do."""
    run = tmp_path / "run"
    weak = {**REWARD, "metrics": {**REWARD["metrics"], "eval_accuracy": 0.636, "eval_accuracy_ci": [0.491, 0.760]}}
    write(run, "reward", REWARD)
    write(run / "round-1", "reward", weak)
    for where in (run, run / "round-1"):
        write(where, "eval", {**EVAL, "parents": {"reward_model": {"path": str(where / "reward"), "stage": "reward"}}})
    write_report(run / "round-1")
    page = write_report(run).read_text()
    top = page[:page.index("<h2 id='glance'>")]
    last, first = top.split("round 0 (this folder):")
    assert "caution</b>: the reward model judging it (round-1/reward) ranks held-out pairs at 63.6% [49.1%, 76.0%], " \
           "which does not rule out chance (50%): its win-rates say little" in last
    assert "caution" not in first.split("<div class='cautions'>")[0]  # round 0's judge: 74.1% [51.9%, 92.6%]
    assert ("The rounds&#x27; reward_model verdicts come from different reward models (run/reward and round-1/reward): "
            "they are not comparable with each other; compare the rounds by scorer:support_style, the judge both "
            "share.") in first
    assert "Stages at a glance (round 0, this folder)" in page
    md = (run / "report.md").read_text()
    assert "they are not comparable with each other" in md and "## Stages at a glance (round 0, this folder)" in md
    # the same reward model judging both rounds: nothing to say
    write_report(run / "round-1")
    (run / "round-1" / "eval" / MANIFEST).write_text(json.dumps(
        {**EVAL, "parents": {"reward_model": {"path": str(run / "reward"), "stage": "reward"}}}))
    assert "not comparable" not in write_report(run).read_text()


def test_a_scorer_that_ranked_the_labels_is_said_to_judge_the_rule_not_the_answers(tmp_path):
    """The quickstart's simulated annotator ranks by support_style, and eval judges by support_style: its
    "beats" says the policy learnt the labelling rule. Said, unless a person's labels are among them."""
    run = tmp_path / "run"
    export = {**EXPORT, "summary": {"annotators": {"sim-support-style-0": 40}}}
    write(run, "preferences", export)
    write(run, "dpo", {**DPO, "parents": {"preferences": {"path": str(run / "preferences"), "stage": "export"}}})
    write(run, "eval", {**EVAL, "parents": {"dpo": {"path": str(run / "dpo"), "stage": "dpo"}}})
    write_report(run)
    found = cautions("eval", json.loads((run / "eval" / MANIFEST).read_text()), run / "eval")
    assert found == ["scorer:support_style is the rule the training labels were ranked by (simulated annotators "
                     "sim-support-style-0): its win-rate says how well a policy learnt that rule, not how good its "
                     "answers are beyond it; a judge the labels did not come from (people: eval human=true) says that"]
    assert "eval: scorer:support_style is the rule the training labels were ranked by" in (run / "report.md").read_text()
    (run / "preferences" / MANIFEST).write_text(json.dumps(
        {**export, "summary": {"annotators": {"sim-support-style-0": 30, "ann": 10}}}))  # a person among them
    assert cautions("eval", json.loads((run / "eval" / MANIFEST).read_text()), run / "eval") == []
    # a scorer whose name starts the annotators' scorer's (support, support_style) is not that rule
    (run / "preferences" / MANIFEST).write_text(json.dumps(
        {**export, "summary": {"annotators": {"sim-support-style-0": 30, "sim-support-style-1-noisy-0-8": 10}}}))
    prefix = {**EVAL, "parents": {"dpo": {"path": str(run / "dpo"), "stage": "dpo"}},
              "policies": {"sft": {}, "dpo": {"scorer:support/win_rate": 0.7, "scorer:support_style/win_rate": 0.8}}}
    said = cautions("eval", prefix, run / "eval")
    assert len(said) == 1 and said[0].startswith("scorer:support_style is the rule"), said


def test_a_ppo_policy_is_traced_to_its_labels_through_its_reward_model_and_to_a_scorer_it_trained_on(tmp_path):
    """A PPO policy's labels are its reward model's (two levels up, not one: it had no caution); one trained on
    a scorer directly (ppo scorer=support_style) and judged by it was told nothing either: the judge is its reward."""
    run = tmp_path / "run"
    write(run, "preferences", {**EXPORT, "summary": {"annotators": {"sim-support-style-0": 40}}})
    write(run, "reward", {**REWARD, "parents": {"preferences": {"path": str(run / "preferences"), "stage": "export"}}})
    write(run, "ppo", {"stage": "ppo", "metrics": {"steps": 4}, "config": {"scorer": None},
                       "parents": {"reward_model": {"path": str(run / "reward"), "stage": "reward"}}})
    judged = {**EVAL, "parents": {"ppo": {"path": str(run / "ppo"), "stage": "ppo"}},
              "policies": {"sft": {}, "ppo": {"scorer:support_style/win_rate": 0.8}}}
    said = cautions("eval", judged, run / "eval")
    assert len(said) == 1 and said[0].startswith("scorer:support_style is the rule the training labels"), said
    (run / "ppo" / MANIFEST).write_text(json.dumps(
        {"stage": "ppo", "metrics": {"steps": 4}, "config": {"scorer": "support_style"}, "parents": {}}))
    said = cautions("eval", judged, run / "eval")
    assert len(said) == 1 and said[0].startswith("scorer:support_style is the reward a policy here was trained on"), said
    (run / "ppo" / MANIFEST).write_text(json.dumps(
        {"stage": "ppo", "metrics": {"steps": 4}, "config": {"scorer": "support"}, "parents": {}}))
    assert cautions("eval", judged, run / "eval") == []  # another scorer's reward: this judge is independent of it


def test_one_annotators_agreement_and_unchecked_accuracy_are_not_read_as_measured(tmp_path):
    """With one annotator the export's mean_agreement is 1 and the reliability table's accuracy is the prior
    (nobody checked it): both read as "perfect" or "measured" without a word."""
    run = tmp_path / "run"
    reliability = {"model": "dawid_skene", "prior": {"accuracy": 0.7, "strength": 4}, "used_for_pairs": False,
                   "annotators": {"sim-a-0": {"accuracy": 0.7, "interval": [0.24, 0.98], "weight": 0.85,
                                              "judgements": 184, "checked": 0, "gold": 0, "gold_accuracy": None}}}
    write(run, "preferences", {**EXPORT, "summary": {"annotators": {"sim-a-0": 40}, "reliability": reliability}})
    page = write_report(run).read_text()
    assert "One annotator: agreement between annotators is not measured here" in page
    assert "<td>0.70 (the prior: unchecked)</td>" in page
    checked = {**reliability, "annotators": {"ann": {**reliability["annotators"]["sim-a-0"], "checked": 12},
                                             "bob": {**reliability["annotators"]["sim-a-0"], "checked": 12}}}
    (run / "preferences" / MANIFEST).write_text(json.dumps(
        {**EXPORT, "summary": {"annotators": {"ann": 20, "bob": 20}, "reliability": checked}}))
    page = write_report(run).read_text()
    assert "One annotator" not in page and "the prior: unchecked" not in page


def test_an_eval_of_a_policy_whose_sft_was_made_again_says_so(tmp_path):
    """sft made again after dpo trained from it, then eval: both are eval's as they are, so eval's own parents
    are current, and the headline read "dpo beats sft" with no word that dpo started from another sft."""
    run = tmp_path / "run"
    write(run, "sft", {**SFT, "created": "2026-12-02T09:00:00+0000"})
    write(run, "dpo", {**DPO, "created": "2026-12-02T08:00:00+0000",
                       "parents": {"sft": {"path": str(run / "sft"), "created": "2026-12-02T07:00:00+0000"}}})
    evaluated = {**EVAL, "parents": {"dpo": {"path": str(run / "dpo"), "created": "2026-12-02T08:00:00+0000"},
                                     "sft": {"path": str(run / "sft"), "created": "2026-12-02T09:00:00+0000"}}}
    assert cautions("eval", evaluated, run / "eval") == [
        f"dpo was trained on sft as it was at 2026-12-02T07:00:00+0000; {run / 'sft'} was made again at "
        "2026-12-02T09:00:00+0000: eval measured dpo against what it was not built on; train dpo again"]
    (run / "dpo" / MANIFEST).write_text(json.dumps({**DPO, "created": "2026-12-02T08:00:00+0000", "parents": {
        "sft": {"path": str(run / "sft"), "created": "2026-12-02T09:00:00+0000"}}}))
    assert cautions("eval", evaluated, run / "eval") == []


def test_an_eval_of_a_policy_made_again_since_says_so(tmp_path):
    run = tmp_path / "run"
    write(run, "dpo", {**DPO, "created": "2026-12-02T09:00:00+0000"})
    evaluated = {**EVAL, "parents": {"dpo": {"path": str(run / "dpo"), "created": "2026-12-02T08:00:00+0000"},
                                     "sft": {"path": str(run / "sft"), "created": "2026-12-02T07:00:00+0000"}}}
    found = cautions("eval", evaluated)
    assert any(f"eval measured dpo as it was at 2026-12-02T08:00:00+0000; {run / 'dpo'} was made again at "
               "2026-12-02T09:00:00+0000" in c for c in found)
    assert any(f"{run / 'sft'} is gone" in c for c in found)
    evaluated["parents"]["dpo"]["created"] = "2026-12-02T09:00:00+0000"
    assert not any("dpo" in c for c in cautions("eval", evaluated))


def test_relative_parent_paths_are_read_where_the_run_was_made(tmp_path, monkeypatch):
    """A manifest from before parents were recorded absolute holds them as the stage was given them
    (runs/quickstart/sft, relative to where it ran): a report built from elsewhere found them "gone"."""
    run = tmp_path / "work" / "runs" / "quickstart"
    for folder, manifest in [("sft", SFT), ("dpo", DPO)]:
        write(run, folder, {**manifest, "created": f"2026-12-02T0{len(folder)}:00:00+0000"})
    parents = {"sft": {"path": "runs/quickstart/sft", "created": "2026-12-02T03:00:00+0000"},
               "dpo": {"path": "runs/quickstart/dpo", "created": "2026-12-02T03:00:00+0000"}}
    write(run, "eval", {**EVAL, "parents": parents})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert "gone" not in write_report(run).read_text() and "gone" not in (run / "report.md").read_text()
    import shutil

    shutil.rmtree(run / "dpo")  # one that is gone is said to be, where it was
    assert f"{run / 'dpo'} is gone" in glance_text(run)
    # a manifest that records the directory its stage ran in is read from there
    write(tmp_path / "other" / "runs" / "quickstart", "dpo", {**DPO, "created": "2026-12-02T03:00:00+0000"})
    (run / "eval" / MANIFEST).write_text(json.dumps({**EVAL, "parents": parents, "cwd": str(tmp_path / "other")}))
    assert "dpo" not in glance_text(run).split("Look at")[-1]
    # and `python -m align.report .` from inside the run is titled by the run's name, not ""
    monkeypatch.chdir(run)
    page = write_report(".").read_text()
    assert "<h1>align run: quickstart</h1>" in page and (run / "report.md").read_text().startswith("# align run: quickstart\n")


def test_new_manifests_record_their_parents_absolute(tmp_path, monkeypatch):
    from align.artifacts import parent_path, write_manifest

    monkeypatch.chdir(tmp_path)
    write(tmp_path / "runs" / "x", "sft", SFT)
    write_manifest("runs/x/dpo", stage="dpo", config={}, base_model=None,
                   parents={"sft": "runs/x/sft", "store": "sqlite:///runs/x/labels.db"})
    m = json.loads((tmp_path / "runs" / "x" / "dpo" / MANIFEST).read_text())
    assert m["parents"]["sft"]["path"] == str(tmp_path / "runs" / "x" / "sft") and m["cwd"] == str(tmp_path)
    assert m["parents"]["store"]["path"] == "sqlite:///runs/x/labels.db"  # a URL as given
    # the forms parent_path reads: absolute, recorded cwd, the run folder's own path, a folder beside it
    folder = Path("/abs/runs/x/eval")
    assert parent_path("/a/sft", folder) == Path("/a/sft")
    assert parent_path("runs/x/sft", folder, {"cwd": "/made/here"}) == Path("/made/here/runs/x/sft")
    assert parent_path("runs/x/sft", folder) == Path("/abs/runs/x/sft")
    assert parent_path("x/sft", folder) == Path("/abs/runs/x/sft")
    assert parent_path("sft", tmp_path / "runs" / "x" / "dpo") == tmp_path / "runs" / "x" / "sft"


def test_absolute_parents_are_found_after_the_project_moved(tmp_path, monkeypatch):
    """New manifests record parents absolute: once the project (or the run folder) was moved, the rebuilt report
    said its live parents "are gone" and marked later rounds stale."""
    import shutil

    from align.artifacts import parent_path, write_manifest

    old = tmp_path / "A" / "proj"
    old.mkdir(parents=True)
    monkeypatch.chdir(old)
    write_manifest("runs/q/sft", stage="sft", config={}, base_model=None)
    write_manifest("runs/q/dpo", stage="dpo", config={}, base_model=None, parents={"sft": "runs/q/sft"})
    write_manifest("runs/q/eval", stage="eval", config={}, base_model=None,
                   parents={"sft": "runs/q/sft", "dpo": "runs/q/dpo"}, baseline="sft",
                   policies={"sft": {}, "dpo": {"scorer/win_rate": 0.8, "scorer/win_rate_ci": [0.7, 0.9]}})
    monkeypatch.chdir(tmp_path)
    shutil.move(str(tmp_path / "A"), str(tmp_path / "B"))
    run = tmp_path / "B" / "proj" / "runs" / "q"
    manifest = json.loads((run / "eval" / MANIFEST).read_text())
    assert parent_path(manifest["parents"]["sft"]["path"], run / "eval", manifest) == run / "sft"
    assert parent_path(str(old / "runs" / "q" / "sft"), run / "dpo") == run / "sft"  # no cwd recorded
    write_report(run)
    assert "gone" not in glance_text(run) and "gone" not in (run / "report.md").read_text()
    shutil.move(str(run), str(tmp_path / "q"))  # the run folder alone, out of the project
    assert "gone" not in glance_text(tmp_path / "q")
    assert parent_path("/nowhere/runs/z/sft", tmp_path / "q" / "eval") == Path("/nowhere/runs/z/sft")  # as recorded


def test_a_rerun_stopped_in_training_rebuilds_the_report_and_says_how_to_resume(tmp_path, caplog, monkeypatch):
    """A finished dpo trained again loses its align.json as training starts; stopped there, its folder stays for
    its checkpoints. The report showed the old dpo section and eval's verdict on it; a rebuilt one said "is gone"."""
    from align import report
    from align.artifacts import discard_unfinished

    run = tmp_path / "run"
    write(run, "sft", {**SFT, "created": "2026-12-02T07:00:00+0000"})
    write(run, "dpo", {**DPO, "created": "2026-12-02T08:00:00+0000"})
    write(run, "eval", {**EVAL, "parents": {"dpo": {"path": str(run / "dpo"), "created": "2026-12-02T08:00:00+0000"},
                                            "sft": {"path": str(run / "sft"), "created": "2026-12-02T07:00:00+0000"}}})
    assert "<section id='dpo'>" in write_report(run).read_text()
    with pytest.raises(KeyboardInterrupt), discard_unfinished(run, command="dpo"):
        (run / "dpo" / MANIFEST).unlink()  # begin_training
        (run / "dpo" / "checkpoints" / "checkpoint-70").mkdir(parents=True)
        raise KeyboardInterrupt
    page, md = (run / "report.html").read_text(), (run / "report.md").read_text()
    assert "<section id='dpo'>" not in page and "gone" not in md
    resume = ("dpo: unfinished (no align.json; checkpoints to step 70): resume with align dpo ... "
              "train.resume_from_checkpoint=latest (align pipeline ... dpo.train.resume_from_checkpoint=latest)")
    assert f"- {resume}" in md.splitlines() and f"- {resume}" in glance_text(run).splitlines()
    assert ("- dpo beats sft judged by scorer:support_style: win-rate 80.2% [69.8%, 89.6%] (95% interval) over 48 "
            "prompts (1 tie) · KL 3.22 nats per answer · caution: "
            "eval measured an earlier dpo; its folder is unfinished (no align.json: a rerun stopped, or still running)") in md
    assert f"{run / 'dpo'} is unfinished (no align.json: a rerun stopped, or still running)" in md
    # a report that cannot be built costs a line, never the failure's own error
    (run / "dpo" / MANIFEST).write_text(json.dumps({**DPO, "created": "2026-12-02T09:00:00+0000"}))

    def broken(run_dir):
        raise OSError("disk full")

    monkeypatch.setattr(report, "write_report", broken)
    with pytest.raises(MemoryError, match="at step 3"), discard_unfinished(run, command="dpo"):
        (run / "dpo" / MANIFEST).unlink()
        raise MemoryError("at step 3")
    assert f"{run / 'report.html'} not rebuilt after the failure (disk full)" in caplog.text


def test_a_stage_training_in_another_process_is_running_not_to_resume(tmp_path):
    """reward finishes (and rebuilds the report) while dpo trains beside it in another process: its folder has
    checkpoints and no align.json yet, and the report told the user to resume the live run."""
    import fcntl
    import os

    from align.artifacts import LOCK

    run = tmp_path / "run"
    write(run, "sft", SFT)
    write(run, "reward", REWARD)
    (run / "dpo" / "checkpoints" / "checkpoint-20").mkdir(parents=True)
    (run / "dpo" / LOCK).touch()
    fd = os.open(run / "dpo" / LOCK, os.O_RDWR)  # another open file: to flock, another process
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        write_report(run)
        said = "- dpo: running (another process holds it; no align.json yet, checkpoints to step 20)"
        assert said in (run / "report.md").read_text().splitlines() and said in glance_text(run).splitlines()
        assert "resume" not in glance_text(run)
    finally:
        os.close(fd)
    assert "dpo: unfinished (no align.json; checkpoints to step 20): resume with" in glance_text(run)


def test_a_round_built_on_a_round_0_since_remade_is_stale_not_the_last_round(tmp_path):
    """A rounds=2 pipeline, then rounds=1 with another dpo setting: round 0's dpo and eval are remade and
    round-1/ is left as it was. Its answer is not this run's; the report opened with it as "the last round"."""
    run = tmp_path / "run"
    write(run, "dpo", {**DPO, "created": "2026-12-02T09:00:00+0000"})
    write(run, "eval", EVAL)
    write(run / "round-1", "sample", {**SAMPLE, "parents": {
        "policy": {"path": str(run / "dpo"), "stage": "dpo", "created": "2026-12-02T08:00:00+0000"}}})
    later = {**EVAL, "policies": {**EVAL["policies"], "dpo": {**EVAL["policies"]["dpo"],
                                                              "scorer:support_style/win_rate": 0.9}}}
    write(run / "round-1", "eval", later)
    write(run / "round-2", "eval", later)
    for r in ("round-1", "round-2"):
        write_report(run / r)
    page, md = write_report(run).read_text(), (run / "report.md").read_text()
    assert "the last round" not in page and "win-rate <b>90.0%</b>" not in page
    why = ("round-1 is stale: its sample was built on the round-0 dpo of 2026-12-02T08:00:00+0000, which was made "
           "again at 2026-12-02T09:00:00+0000")
    assert f"- [round-1](round-1/report.md): {why}" in md
    assert "- [round-2](round-2/report.md): round-2 follows round-1, which is stale" in md
    assert (run / "round-1" / "report.md").read_text().startswith(f"# align run: round-1\n\n{why}\n")
    # the same round on the dpo it was built on is the run's last round
    (run / "dpo" / MANIFEST).write_text(json.dumps({**DPO, "created": "2026-12-02T08:00:00+0000"}))
    page = write_report(run).read_text()
    assert "round-2, the last round:" in page and "stale" not in page


def test_the_same_sample_run_again_shows_the_batch_it_left(tmp_path):
    """`align sample` run again adds nothing to a batch that holds every prompt: its manifest's counts are that
    call's (0), while export, reward and dpo train on the batch's 8 tasks and 24 answers, all cut."""
    again = {"stage": "sample", "batch": "round-0", "metrics": {
        "new_tasks": 0, "responses_sampled": 0, "responses_cut": 0, "tasks_in_batch": 8, "answers_in_batch": 24,
        "cut_in_batch": 24}}
    assert glance("sample", again) == ["no new answers", "batch round-0 holds 8 tasks, 24 answers, 100% cut"]
    assert cautions("sample", again) == ["100% of the answers in batch round-0 were cut at max_new_tokens: raise "
                                         "sample.generation.max_new_tokens for answers a person can judge whole, with another run.dir "
                                          "(or, for align sample, another batch=): a batch keeps the answers it has"]
    more = {**again, "metrics": {**again["metrics"], "new_tasks": 2, "responses_sampled": 6, "responses_cut": 1,
                                 "tasks_in_batch": 10, "answers_in_batch": 30, "cut_in_batch": 25}}
    assert glance("sample", more) == ["6 answers to 2 prompts", "1 (17%) cut at max_new_tokens",
                                      "batch round-0 holds 10 tasks, 30 answers, 83% cut"]
    first = {**again, "metrics": {**again["metrics"], "new_tasks": 8, "responses_sampled": 24, "responses_cut": 24}}
    assert glance("sample", first) == ["24 answers to 8 prompts", "24 (100%) cut at max_new_tokens"]


def test_the_win_rate_chart_names_the_interval_its_eval_made(monkeypatch):
    """Win-rate intervals were a bootstrap before they were Wilson's: a report rebuilt from an older eval titled
    its bootstrap intervals "Wilson". Eval records its method (`interval`); one from before it did (ca3f2c8 to
    1e36e2c) made Wilson intervals without saying so, and was then titled "bootstrap": a manifest without the
    key is Wilson's where its intervals are Wilson's for its win-rates and `prompts`, else no method is named."""
    from align import report
    from align.evaluation import wilson_interval

    titles = []

    def drawn(fig):
        titles.append(fig.axes[0].get_title())
        import matplotlib.pyplot as plt

        plt.close(fig)
        return ""

    monkeypatch.setattr(report, "_figure_png", drawn)
    report.eval_section(Path("/nowhere"), EVAL)
    report.eval_section(Path("/nowhere"), {**EVAL, "interval": "wilson"})
    dpo = {**EVAL["policies"]["dpo"], "reward_model/win_rate_ci": list(wilson_interval(0.5, 48)),
           "scorer:support_style/win_rate_ci": list(wilson_interval(0.8021, 48))}
    report.eval_section(Path("/nowhere"), {**EVAL, "policies": {**EVAL["policies"], "dpo": dpo}})
    assert titles == ["Win-rate against sft over 48 prompts (95% interval)",
                      "Win-rate against sft over 48 prompts (95% Wilson interval)",
                      "Win-rate against sft over 48 prompts (95% Wilson interval)"]
    assert report.interval_method({**EVAL, "interval": "bootstrap"}) == "bootstrap"


def test_a_win_rate_says_what_it_is_over_and_beats_only_past_a_sign_test(tmp_path, monkeypatch):
    """A 4-prompt eval read "dpo beats sft judged by ...: win-rate 100.0% [51.0%, 100.0%]", laid out as the
    48-prompt verdict is: 4 wins of 4 have sign-test p 0.125, and by Wilson's interval alone equal policies
    "differ" 12.5 % of the time at 4 prompts. The headline, the first screen and the chart say how many prompts
    (and ties) a win-rate is over, and "beats" / "loses to" also need the exact sign test under 0.05."""
    from align import report
    from align.evaluation import wilson_interval

    def policies(wins: int, ties: int, losses: int) -> dict:
        n = wins + ties + losses
        rate = (wins + ties / 2) / n
        return {"sft": {"length": 30.0}, "dpo": {"scorer:support_style/win_rate": rate,
                                                 "scorer:support_style/win_rate_ci": list(wilson_interval(rate, n)),
                                                 "scorer:support_style/wins": wins, "scorer:support_style/ties": ties,
                                                 "scorer:support_style/losses": losses}}

    small = {"stage": "eval", "baseline": "sft", "prompts": 4, "policies": policies(4, 0, 0)}
    write(tmp_path, "eval", small)
    titles = []
    monkeypatch.setattr(report, "_figure_png", lambda fig: titles.append(
        (fig.axes[0].get_title(), [t.get_text() for t in fig.axes[0].get_yticklabels()])) or "")
    write_report(tmp_path)
    assert "- dpo is not distinguishable from sft judged by scorer:support_style: win-rate 100.0% [51.0%, 100.0%] " \
           "(95% Wilson interval) over 4 prompts (0 ties), sign test p = 0.125\n" in (tmp_path / "report.md").read_text()
    assert glance("eval", small) == ["dpo vs sft over 4 prompts: 100.0% [51.0%, 100.0%] by scorer:support_style (0 ties)"]
    assert titles == [("Win-rate against sft over 4 prompts (95% Wilson interval)", ["dpo · scorer:support_style (0 ties)"])]

    def headline_of(manifest: dict) -> str:
        (tmp_path / "eval" / MANIFEST).write_text(json.dumps(manifest))
        return report._headline_md(tmp_path).strip()

    # the quickstart's: 38 wins, 1 tie and 9 losses of 48 beat sft; the mirror image loses to it
    assert headline_of({**small, "prompts": 48, "policies": policies(38, 1, 9)}).startswith(
        "- dpo beats sft judged by scorer:support_style: win-rate 80.2% [66.9%, 89.0%] (95% Wilson interval) over 48 "
        "prompts (1 tie)")
    assert headline_of({**small, "prompts": 48, "policies": policies(9, 1, 38)}).startswith("- dpo loses to sft")
    # 13 of 16: the interval is clear of 1/2 ([57.0%, 93.4%]), the sign test (p 0.021) too
    assert headline_of({**small, "prompts": 16, "policies": policies(13, 0, 3)}).startswith("- dpo beats sft")
    # An eval from before it counted: over its prompts, with the largest p its win-rate and prompts allow
    uncounted = {k: v for k, v in policies(4, 0, 0)["dpo"].items() if not k.endswith(("wins", "ties", "losses"))}
    assert headline_of({**small, "policies": {"dpo": uncounted}}) == (
        "- dpo is not distinguishable from sft judged by scorer:support_style: win-rate 100.0% [51.0%, 100.0%] (95% "
        "Wilson interval) over 4 prompts, sign test p = 0.125")
    uncounted = {k: v for k, v in EVAL["policies"]["dpo"].items() if not k.endswith(("wins", "ties", "losses"))}
    assert "- dpo beats sft judged by scorer:support_style: win-rate 80.2% [69.8%, 89.6%] (95% interval) over 48 prompts · KL" \
        in headline_of({**EVAL, "policies": {"dpo": uncounted}})


def test_a_human_only_eval_says_its_board(tmp_path):
    """An eval judged by people alone (human=true, no reward model, no scorer) read "eval: —" at a glance, had
    no headline, and report.md had no board at all: each now gives the ratings with their verdict count."""
    board = {"tasks_added": 0, "comparisons": 6, "stale_comparisons": 2,
             "leaderboard": [{"policy": "dpo", "rating": 1043.2, "ci": [990.1, 1100.4]},
                             {"policy": "sft", "rating": 1000.0, "ci": [1000.0, 1000.0]}]}
    human = {"stage": "eval", "baseline": "sft", "prompts": 6, "human": board, "metrics": {"dpo/length": 9.7},
             "policies": {"sft": {"length": 9.2}, "dpo": {"length": 9.7}}}
    line = "human A/B (6 verdicts, 2 on earlier versions not counted): dpo 1043 [990, 1100] (Bradley-Terry, sft = 1000)"
    assert glance("eval", human) == [line]
    write(tmp_path, "eval", human)
    page = write_report(tmp_path).read_text()
    md = (tmp_path / "report.md").read_text()
    assert md.startswith(f"# align run: {tmp_path.name}\n\n## Verdict: did the policy beat its baseline?\n\n"
                         "- dpo vs sft judged by people (blind A/B, "
                         "6 verdicts, 2 on earlier versions not counted): Bradley-Terry rating 1043 [990, 1100] against "
                         "sft's 1000\n")
    assert f"\n- eval: {line}\n" in md  # its section too, as the page has it: the board as a table
    assert md.endswith("### Human arena (Bradley-Terry; sft = 1000; 6 verdicts, 2 on earlier versions not counted)\n\n"
                       "| policy | rating | 95% interval |\n|---|---|---|\n| dpo | 1043 | [990, 1100] |\n"
                       "| sft | 1000 | [1000, 1000] |\n\n")
    assert "<div class='headline'><ul><li><b>dpo</b> vs <b>sft</b> judged by people" in page
    assert "<h3>Human arena (Bradley-Terry; sft = 1000; 6 verdicts, 2 on earlier versions not counted)</h3>" in page
    waiting = {**human, "human": {"tasks_added": 6, "comparisons": 0, "stale_comparisons": 0}}  # none judged yet
    assert glance("eval", waiting) == ["human A/B (0 verdicts): no ratings yet; annotators judge the A/B tasks in "
                                       "align label"]


def test_one_annotator_per_pair_gives_no_agreement_ceiling():
    """Single-annotator data read "(annotator agreement, the ceiling: 100.0%)" right above the probes' "one
    annotator per pair: agreement cannot split the accuracy": one annotator agrees with itself."""
    from align.report import reward_section

    single = {"buckets": [{"bucket": "single annotator", "pairs": 27, "accuracy": 0.7407}],
              "note": "one annotator per pair: agreement cannot split the accuracy"}
    alone = {**REWARD, "metrics": {**REWARD["metrics"], "agreement_ceiling": 1.0},
             "probes": {**REWARD["probes"], "by_agreement": single}}
    page = reward_section(Path("/nowhere"), alone)
    assert "ceiling" not in page and "one annotator per pair: agreement cannot split the accuracy" in page
    assert "from 6 prompts (the interval counts prompts, not pairs, as independent)</li>" in page
    # dawid_skene's posterior is reported with one annotator too (what the labels say of their own picks)
    posterior = {**alone, "metrics": {**alone["metrics"], "posterior_ceiling": 0.97}}
    assert ("as independent) against the labels' picks (their mean posterior, how often a pick is itself right: 97.0%)</li>"
            in reward_section(Path("/nowhere"), posterior))
    several = {"buckets": [{"bucket": "unanimous", "pairs": 20, "accuracy": 0.8},
                           {"bucket": "majority", "pairs": 7, "accuracy": 0.57}], "note": None}
    shared = {**alone, "metrics": {**alone["metrics"], "agreement_ceiling": 0.9},
              "probes": {**REWARD["probes"], "by_agreement": several}}
    # Several annotators: their agreement, not called a ceiling (their majority picks are right more often than two of
    # them agree: 3 simulated annotators agreed 0.705 of the time and the true order matched 0.842 of the picks)
    page = reward_section(Path("/nowhere"), shared)
    assert "as independent) (annotator agreement: 90.0%; not a ceiling" in page and "the ceiling" not in page


def test_every_figure_says_its_unit_and_basis(tmp_path, monkeypatch):
    """A plot had no y-axis label; a loss or accuracy drew training batches and the held-out set as two bare keys
    on one axis; eval's kl and length rows had no unit."""
    from align import report

    drawn = []

    def png(fig):
        import matplotlib.pyplot as plt

        for ax in fig.axes:
            drawn.append((ax.get_title(), ax.get_ylabel() or ax.get_xlabel(),
                          [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]))
        plt.close(fig)
        return ""

    monkeypatch.setattr(report, "_figure_png", png)
    assert all(ylabel for stage in report.PLOTS.values() for _, ylabel, _ in stage)
    write(tmp_path, "sft", SFT)
    (tmp_path / "sft" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "loss": 3.4, "learning_rate": 1e-4}, {"step": 2, "eval_loss": 3.3}]))
    write(tmp_path, "eval", EVAL)
    page = write_report(tmp_path).read_text()
    assert ("Loss", "cross-entropy, nats per token", ["training batches", "held-out set"]) in drawn
    assert ("Win-rate against sft over 48 prompts (95% interval)", "win-rate: share of prompts won (a tie counts half)"
            "; dashed: 0.5, no difference", []) in drawn
    assert all(label for _, label, _ in drawn)
    assert "<tr><td>KL (nats/answer, sampled T=1)</td><td></td><td>3.222</td></tr>" in page
    assert "<tr><td>length (words)</td><td>34.1</td><td>16.6</td></tr>" in page


def test_the_report_command_has_help_and_refuses_a_folder_that_is_no_run(tmp_path, capsys):
    """`python -m align.report --help` and `... runs/typo` failed with a traceback (FileNotFoundError
    '--help/report.html'); an empty folder got a report of nothing."""
    from align.report import main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "run directory" in capsys.readouterr().out
    assert main([str(tmp_path / "typo")]) == 2
    assert capsys.readouterr().err == f"no run directory {tmp_path / 'typo'} (a run directory holds sft/, dpo/, ...)\n"
    assert main([str(tmp_path)]) == 2 and "no stage folder in" in capsys.readouterr().err
    assert not (tmp_path / "report.html").exists()
    write(tmp_path, "sft", SFT)
    assert main([str(tmp_path)]) == 0 and capsys.readouterr().out.strip() == str(tmp_path / "report.html")


def test_a_copied_runs_parents_are_read_in_the_copy_and_a_rounds_in_its_roots(tmp_path):
    """A copy of a run (the original still there) reads its stages' parents in the copy, a later round's stage its
    root's folders too (sft/, round 0's dpo/); a parent outside the run stays where it was."""
    import shutil

    from align.artifacts import in_this_run, parent_path, write_manifest

    run, outside = tmp_path / "run", tmp_path / "elsewhere" / "rm"
    outside.mkdir(parents=True)
    write_manifest(run / "sft", stage="sft", config={"run": {"dir": str(run)}}, base_model=None)
    write_manifest(run / "dpo", stage="dpo", config={"run": {"dir": str(run)}}, base_model=None,
                   parents={"sft": run / "sft"})
    write_manifest(run / "round-1" / "sample", stage="sample", config={"run": {"dir": str(run / "round-1")}},
                   base_model=None, parents={"policy": run / "dpo", "selection_reward_model": outside})
    shutil.copytree(run, tmp_path / "copy")
    copy = tmp_path / "copy"
    for folder, key, found in ((copy / "dpo", "sft", copy / "sft"), (copy / "round-1" / "sample", "policy", copy / "dpo"),
                               (copy / "round-1" / "sample", "selection_reward_model", outside)):
        m = json.loads((folder / MANIFEST).read_text())
        assert parent_path(m["parents"][key]["path"], folder, m) == found, (folder, key)
    m = json.loads((run / "dpo" / MANIFEST).read_text())  # in place: as recorded
    assert parent_path(m["parents"]["sft"]["path"], run / "dpo", m) == run / "sft"
    assert in_this_run(run / "data.jsonl", copy / "dpo", m) == copy / "data.jsonl"


def test_the_reward_accuracy_over_pairs_is_aligns_alone(tmp_path, monkeypatch):
    """TRL's evaluations during training (eval_steps < max_steps) logged eval_accuracy, a mean of per-batch means,
    under the name of align's held-out accuracy over pairs: one line, "over pairs", drew both. A log from before
    TRL's were renamed *_batch_mean (its rows without eval_pairs) is drawn as a new one is."""
    from align import report

    drawn = {}

    def png(fig):
        import matplotlib.pyplot as plt

        for ax in fig.axes:
            for line in ax.get_lines():
                if not line.get_label().startswith("_"):
                    drawn[(ax.get_title(), line.get_label())] = list(zip(line.get_xdata(), line.get_ydata(), strict=True))
        plt.close(fig)
        return ""

    monkeypatch.setattr(report, "_figure_png", png)
    ours = {"step": 40, "eval_accuracy": 0.4, "eval_pairs": 59, "eval_accuracy_ci": [0.27, 0.55]}
    for trls in ("eval_accuracy", "eval_accuracy_batch_mean"):
        drawn.clear()
        report._line_plot.cache_clear()
        shutil.rmtree(tmp_path / "reward", ignore_errors=True)
        write(tmp_path, "reward", REWARD)
        (tmp_path / "reward" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
            {"step": 20, "accuracy": 0.6}, {"step": 20, trls: 0.37}, {"step": 40, trls: 0.41}, ours]))
        write_report(tmp_path)
        assert drawn[("Accuracy", "held-out set (over pairs)")] == [(40, 0.4)], trls
        assert drawn[("Accuracy", "held-out set (TRL: mean of per-batch means)")] == [(20, 0.37), (40, 0.41)]


def test_sample_and_export_rewrite_the_report_and_a_stage_on_a_remade_input_says_so(tiny_model, tmp_path):
    """Every stage rewrites the run's report as it ends; sample and export did not, so after them report.html
    and report.md still showed the run before them. A stage built on an input made again since (a reward model
    on an earlier export, a sample of an earlier sft) was cautioned about for eval alone."""
    from align.cli import main as align

    run, data, prompts = tmp_path / "run", tmp_path / "sft.jsonl", tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Ticket {i}: where is Sync?", "input": "",
                                        "output": "Thanks! Open Settings."}) + "\n" for i in range(8)))
    prompts.write_text("".join(json.dumps({"prompt": f"Where is setting {i}?"}) + "\n" for i in range(3)))
    assert align(["sft", f"model.name={tiny_model}", f"data.path={data}", f"run.dir={run}", "train.max_steps=1",
                  "data.eval_fraction=0", "model.quantize=false", "model.max_length=64", "run.wandb=disabled"]) == 0
    assert align(["sample", f"run.dir={run}", f"prompts={prompts}", "k=2", "max_resample=0", "num_prompts=3",
                  "generation.max_new_tokens=4", "run.wandb=disabled"]) == 0
    assert "## sample" in (run / "report.md").read_text() and "<section id='sample'>" in (run / "report.html").read_text()
    assert align(["label", "--run-dir", str(run), "--simulate", "support_style"]) == 0
    assert align(["export", f"run.dir={run}", "run.wandb=disabled", "test_fraction=0"]) == 0
    assert "## preferences" in (run / "report.md").read_text()
    # the sft made again: the sample (its answers were the old policy's) says so on the first screen
    sample = json.loads((run / "sample" / MANIFEST).read_text())
    manifest = json.loads((run / "sft" / MANIFEST).read_text())
    (run / "sft" / MANIFEST).write_text(json.dumps({**manifest, "created": "2099-01-01T00:00:00+0000"}))
    assert cautions("sample", sample, run / "sample")[-1:] == [  # after the answers cut at 4 tokens
        f"built on policy as it was at {sample['parents']['policy']['created']}; {run / 'sft'} was made again at "
        "2099-01-01T00:00:00+0000: its answers are not the policy's there now: sample from it into another batch= "
        "(or another run.dir)"]  # align sample again keeps the batch's answers: no command that would not help
    assert "- sample: built on policy as it was at" in glance_text(run)
    ppo = {"stage": "grpo", "parents": {"sft": {"path": str(run / "gone"), "created": "2026-01-01T00:00:00+0000"}}}
    assert cautions("grpo", ppo, run / "grpo")[-1].endswith(f"{run / 'gone'} is gone: it is not built on the sft there "
                                                            "now until align ppo algo=grpo runs again")
    made = {"stage": "active_learning", "parents": {"sft": {"path": str(run / "gone"), "created": "2026-01-01"}}}
    assert cautions("active_learning", made, run / "al")[-1].endswith("now until it is made again")  # no align command


def test_report_md_shows_names_as_text_never_as_html(tmp_path):
    """report.md took the headline's text unescaped and the first screen, cautions, paths, metric keys and the
    human board as they were: a run, folder, policy or annotator named `<script>...` was HTML there."""
    import re

    bad, folder = "<script>alert('x')</script>&", "<img src=x onerror=alert(1)>&"  # a folder's name: no /
    run = tmp_path / f"run{folder}"
    board = {"leaderboard": [{"policy": bad, "rating": 1010.0, "ci": [990.0, 1030.0]},
                             {"policy": "sft", "rating": 1000.0, "ci": [1000.0, 1000.0]}], "comparisons": 5}
    write(run, "eval", {**EVAL, "policies": {"sft": EVAL["policies"]["sft"], bad: EVAL["policies"]["dpo"]},
                        "prompts_seen_in_training": {bad: 3}, "human": board})
    write(run, "preferences", {**EXPORT, "metrics": {**EXPORT["metrics"], bad: 1},
                               "summary": {"annotators": {bad: 4}, "reliability": {"warnings": [f"{bad} disagrees"]}}})
    write(run, f"x{folder}", {"stage": "merge", "metrics": {"k": bad}})
    write_report(run)
    md = (run / "report.md").read_text()
    own = re.compile(r"</?(details|summary)>|<br>")  # the tags report.md writes itself (a fold; a line in a cell)
    assert not re.search(r"<[A-Za-z/!?]", own.sub("", md)), [line for line in md.splitlines()
                                                            if re.search(r"<[A-Za-z/!?]", own.sub("", line))]
    shown, folder = "&lt;script&gt;alert('x')&lt;/script&gt;&amp;", "&lt;img src=x onerror=alert(1)&gt;&amp;"
    assert f"# align run: run{folder}" in md and f"- {shown} is not distinguishable from sft judged by" in md
    assert f"- eval: {shown} was trained on 3 of the 48 eval prompts" in md and f"- preferences: {shown} disagrees" in md
    assert f"- {shown}: 1" in md and f"## x{folder}" in md and f"- k: {shown}" in md
    # its folder: a link, its text escaped text, its address percent-quoted
    assert "[x&lt;img src=x onerror=alert\\(1\\)&gt;&amp;/](x%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E%26/)\n" in md
    assert f"human A/B (5 verdicts): {shown} 1010 [990, 1030]" in md


def test_no_field_of_a_manifest_from_elsewhere_runs_loads_or_leaks_in_either_report(tmp_path):
    """A run folder from someone else, rebuilt with python -m align.report: fields align writes as numbers went into
    report.html unescaped (a <script> in the reward model's eval_pairs, the gate's flips, the prior of the
    reliability model, an active-learning curve's test_pairs ran in the page); a W&B URL with a ">" and an offline
    folder with a backtick in report.md ended their autolink and code span, the rest read as HTML; a name written as
    a Markdown image made a viewer fetch it; and an active-learning manifest's figure of "../secret" embedded that
    file in the page."""
    import re

    evil = "<script>alert(1)</script><img src=http://127.0.0.1:9/x.png>"
    run = tmp_path / "run"
    write(run, "reward", {**REWARD, "metrics": {**REWARD["metrics"], "eval_pairs": evil, "eval_prompts": evil},
                          "probes": {**REWARD["probes"], "gate": {**GATE, "flips": evil, "of": evil}},
                          "wandb": {"url": "https://wandb.ai/a><img src=http://127.0.0.1:9/md.png>"}})
    write(run, "preferences", {**EXPORT, "summary": {"reliability": {"prior": {"accuracy": evil, "strength": evil},
                                                                     "annotators": {}, "warnings": ["![x](http://127.0.0.1:9/md.png) disagrees"]}}})
    write(run, "sft", {**SFT, "wandb": {"mode": "offline", "folder": str(run / "wandb" / "offline-run-`<img src=x>`")}})
    (tmp_path / "secret.txt").write_text("TOP-SECRET-TOKEN")
    write(run, "curve", {"stage": "active_learning", "figure": "../../secret.txt"})
    (run / "curve" / "curve.json").write_text(json.dumps({"test_pairs": evil, "settings": {"seeds": evil},
                                                          "curve": {"40": {"random": {"accuracy": 0.7, "ci": [0.6, 0.8]}}}}))
    page = write_report(run).read_text()
    assert "<script>alert" not in page and "<img src=http" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "VE9QLVNFQ1JFVC1UT0tFTg" not in page  # base64 of the secret
    md = (run / "report.md").read_text()
    # no tag outside a code span (inside one, a viewer shows it as text) and no autolink but the W&B one
    text = re.sub(r"(`+)(?!`).*?(?<!`)\1(?!`)", "", md)
    text = re.sub(r"</?(details|summary)>|<br>", "", text)  # the tags report.md writes itself
    assert not re.search(r"<[A-Za-z/!?]", text), [line for line in text.splitlines() if re.search(r"<[A-Za-z/!?]", line)]
    assert "](http://127.0.0.1:9/md.png)" not in md and "]\\(http://127.0.0.1:9/md.png)" in md
    assert "``wandb sync " in md  # a fence longer than the folder's backticks


def test_report_md_has_the_pages_tables_and_answers_with_model_text_kept_as_text(tmp_path):
    """report.md listed eval's figures as raw fractions (`dpo/reward_model/win_rate_ci_low: 0.354`) and had none of
    the page's tables: no win-rate table, no answers side by side (which a caution tells the reader to compare),
    no probes, annotators or example pairs. They are there now, as Markdown tables; an answer is text in its cell
    whatever it holds (a bar, a newline, an image, a formula, HTML)."""
    run = tmp_path / "run"
    write(run, "reward", REWARD)
    write(run, "eval", {**EVAL, "policies": {"sft": {**EVAL["policies"]["sft"], "cut": 0.31},
                                             "dpo": {**EVAL["policies"]["dpo"], "cut": 0.08}}})
    answer = "a | b\n# not a heading\n![x](http://127.0.0.1:9/i.png) <script>alert(1)</script> costs $60 or $5 `x"
    (run / "eval" / "samples.jsonl").write_text(json.dumps({"prompt": "Where is Sync?", "sft": "Here.", "dpo": answer}))
    write_report(run)
    md = (run / "report.md").read_text()
    assert "| figure | sft | dpo |\n|---|---|---|\n| reward_model/win_rate |  | **50.0%** [35.4%, 62.5%] · 24 won, 0 " \
           "tied, 24 lost |" in md
    assert "| answers cut at max_new_tokens (share) | 31% | 8% |" in md
    row = next(line for line in md.splitlines() if line.startswith("| Where is Sync?"))
    assert row == ("| Where is Sync? | Here. | a \\| b<br># not a heading<br>![x]\\(http&#58;//127.0.0.1:9/i.png) "
                   "&lt;script&gt;alert(1)&lt;/script&gt; costs \\$60 or \\$5 \\`x |")
    assert row.count(" | ") == 2  # three cells: the answer's bar does not split it
    # an answer with code: its backticks are text (a span showed `&lt;b&gt;` as typed), and no address a link
    (run / "eval" / "samples.jsonl").write_text(json.dumps(
        {"prompt": "Bold?", "sft": "Use `<b>` \\ see www.x.org or a@b.co", "dpo": "```py\nx = 1\n```"}))
    write_report(run)
    row = next(line for line in (run / "report.md").read_text().splitlines() if line.startswith("| Bold?"))
    assert row == ("| Bold? | Use \\`&lt;b&gt;\\` \\\\ see www&#46;x.org or a&#64;b.co | "
                   "\\`\\`\\`py<br>x = 1<br>\\`\\`\\` |")
    assert "Gate (PPO refuses above max_probe_flip_rate" in md and "| probe | edit of the rejected answer |" in md
    assert "- figure: win-rate: Win-rate against sft over 48 prompts" in md
    assert "<details><summary>all metrics</summary>\n\n- eval_accuracy: 0.7407\n" in md  # reward's, folded as on the page
    assert "win_rate_ci_low" not in md
    # a line of samples.jsonl that cannot be read loses the answers, not the win-rates
    (run / "eval" / "samples.jsonl").write_text('{"prompt": "Where')
    page = write_report(run).read_text()
    assert "samples.jsonl cannot be read" in page and "<b>50.0%</b>" in page


def test_a_wandb_folder_recorded_as_a_scheme_is_a_path_not_a_link_that_runs(tmp_path):
    """A manifest's relative W&B folder went into the link as written: "javascript:alert(1)" was a link that ran."""
    run = tmp_path / "run"
    write(run, "sft", {**SFT, "wandb": {"mode": "offline", "folder": "javascript:alert(document.domain)"}})
    page = write_report(run).read_text()
    assert "href='javascript:" not in page and "href='javascript%3Aalert%28document.domain%29'" in page
    write(run, "dpo", {**DPO, "metrics": None})  # a hand-edited manifest: its figures are missing, not the report
    assert "<section id='dpo'>" in write_report(run).read_text()


def test_round_0_without_an_eval_is_not_an_empty_label_in_report_md(tmp_path):
    run = tmp_path / "run"
    write(run, "sft", SFT)
    write(run / "round-1", "eval", EVAL)
    write_report(run / "round-1")
    write_report(run)
    md = (run / "report.md").read_text()
    assert "round-1, the last round:" in md and "round 0" not in md.split("## Stages at a glance")[0]


def test_a_spoilt_field_or_log_line_costs_its_figure_not_the_report(tmp_path):
    """Each of these failed write_report, and so the stage that wrote it: an eval manifest without its win-rate
    intervals or with null ones (the headline unpacked them), a metrics.jsonl line spoilt in the middle (only a
    last line cut short was forgiven), a null `created` or a null answer in eval's samples (html.escape(None))."""
    no_ci = {k: v for k, v in EVAL["policies"]["dpo"].items() if not k.endswith("_ci")}
    null_ci = {k: None if k.endswith("_ci") else v for k, v in EVAL["policies"]["dpo"].items()}
    for name, row in (("missing", no_ci), ("null", null_ci)):
        run = tmp_path / name
        write(run, "eval", {**EVAL, "created": None, "policies": {"sft": EVAL["policies"]["sft"], "dpo": row}})
        (run / "eval" / "samples.jsonl").write_text(json.dumps({"prompt": "Where is Sync?", "sft": "Here.", "dpo": None}))
        write(run, "sft", SFT)
        (run / "sft" / "metrics.jsonl").write_text('{"step": 1, "loss": 3.4}\n{"step": 2, "lo\n{"step": 3, "loss": 3.1}\n'
                                                   '\n"a string"\n{"step": 4, "loss": 3.0}\n{"step": 5, "lo')
        page = write_report(run).read_text()
        assert "<li><b>dpo</b> vs <b>sft</b> judged by scorer:support_style: win-rate <b>80.2%</b> over 48 prompts " \
               "(1 tie) · KL 3.22 nats per answer</li>" in page, name  # no interval: no verdict, the rest as it is
        assert "metrics.jsonl: lines 2, 5 cannot be read, left out of the plots" in page  # the cut last line: unsaid
        assert "metrics.jsonl: lines 2, 5 cannot be read" in (run / "report.md").read_text()
        assert "could not be drawn" not in page and "<td>Here.</td><td></td>" in page


def test_a_failed_eval_rerun_says_so_and_the_page_reads_on_a_phone(tmp_path):
    """An eval rerun that failed (its align.json goes first) vanished from the report: no headline, no row, as if
    eval had never run; stages without checkpoints (sample, export, eval) were listed only with a manifest. Also:
    report.md left out DPO's probe caution, export's line said "base None", a token count read 1.07e+04, and
    every plot was 178 px wide on a 390 px phone."""
    from align.report import write_report

    run = tmp_path / "run"
    write(run, "sft", {**SFT, "metrics": {**SFT["metrics"], "eval_num_tokens": 10700.0}})
    write(run, "preferences", {**EXPORT, "base_model": None})
    write(run, "dpo", DPO)
    (run / "eval").mkdir()
    (run / "eval" / "samples.jsonl").write_text("{}\n")  # what the failed rerun left, without its manifest
    page, md = write_report(run).read_text(), (run / "report.md").read_text()
    said = "unfinished or failed (no align.json: its last run stopped or failed): run align eval again"
    assert f"- eval: {said}" in md.splitlines() and said in page
    assert "No verdict: eval/ has no align.json" in page and "No verdict: eval/ has no align.json" in md
    assert DPO["reward_probe_warning"] in md
    assert "base None" not in page and "10,700" in page and "1.07e+04" not in page and "- eval_num_tokens: 10,700" in md
    assert "@media (max-width:700px){.plots img{max-width:100%" in page


def test_a_stages_wandb_run_is_linked_online_and_named_offline_and_nothing_else_becomes_a_link(tmp_path):
    from align.report import wandb_where

    online = wandb_where({"wandb": {"mode": "online", "id": "ab12", "url": "https://wandb.ai/me/align/runs/ab12",
                                    "folder": str(tmp_path / "wandb" / "run-x-ab12")}}, tmp_path)
    assert "<a href='https://wandb.ai/me/align/runs/ab12'>W&amp;B run</a>" in online[0]
    assert online[1] == "- W&B run: <https://wandb.ai/me/align/runs/ab12>"
    elsewhere = wandb_where({"wandb": {"mode": "offline", "url": None, "folder": "/data/w b/offline-run-1-cd"}},
                            tmp_path)
    assert "href='file:///data/w%20b/offline-run-1-cd'" in elsewhere[0]
    assert elsewhere[1] == "- W&B run (offline): `wandb sync '/data/w b/offline-run-1-cd'`"
    # A URL of another scheme is no link (nor is a folder named like markup)
    odd = wandb_where({"wandb": {"url": "javascript:alert(1)", "folder": str(tmp_path / "<b>x")}}, tmp_path)
    assert "javascript" not in odd[0] and "<b>" not in odd[0] and "&lt;b&gt;x" in odd[0]
    assert wandb_where({}, tmp_path) == ("", "") and wandb_where({"wandb": None}, tmp_path) == ("", "")
    # a run copied elsewhere: its own wandb/ folder, not the original's (which may still be there)
    original = tmp_path / "original" / "wandb" / "offline-run-2-ef"
    original.mkdir(parents=True)
    copy = tmp_path / "copy"
    (copy / "wandb" / original.name).mkdir(parents=True)
    copied = wandb_where({"wandb": {"mode": "offline", "folder": str(original)}}, copy)
    assert f"href='wandb/{original.name}'" in copied[0] and str(copy / "wandb" / original.name) in copied[1]
    (copy / "round-1").mkdir()  # a later round's W&B runs are in its root run's wandb/
    (copy / "sft").mkdir()  # (a round-<r> folder is one below a run directory: round 0's stage folders)
    in_round = wandb_where({"wandb": {"mode": "offline", "folder": str(original)}}, copy / "round-1")
    assert str(copy / "wandb" / original.name) in in_round[1] and str(original) not in in_round[1]


def test_each_chart_says_in_words_what_it_draws(tmp_path):
    """Every chart was an image named 'sft plot' (or 'calibration', 'win-rate') to a screen reader, and report.md,
    read on GitHub, had no trace of them: each now says its figures in its alt text and in report.md."""
    import html as html_lib
    import re

    write(tmp_path, "sft", SFT)
    (tmp_path / "sft" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "loss": 3.456}, {"step": 6, "loss": 3.749}, {"step": 10, "loss": 3.375, "eval_loss": 3.352}]))
    calibration = [{"gap_min": 0.05, "gap_max": 0.14, "pairs": 5, "accuracy": 0.2, "predicted": 0.52}]
    write(tmp_path, "reward", {**REWARD, "metrics": {**REWARD["metrics"], "calibration": calibration}})
    write(tmp_path, "eval", EVAL)
    page, md = write_report(tmp_path).read_text(), (tmp_path / "report.md").read_text()
    alts = [html_lib.unescape(a) for a in re.findall(r"<img alt='([^']*)'", page)]
    said = ("Loss (cross-entropy, nats per token) by step: training batches 3.456 at step 1 to 3.375 at step 10 "
            "(highest 3.749 at step 6); held-out set 3.352 at step 10")
    assert f"sft plot: {said}" in alts and f"- plot: {said}" in md.splitlines()
    assert any(a.startswith("calibration: ") and "gap 0.05–0.14 (5 pairs): 20% ranked right, 52% predicted" in a
               for a in alts), alts
    assert any(a.startswith("win-rate: Win-rate against sft over 48 prompts") and
               "dpo · scorer:support_style (1 tie) 80.2% [69.8%, 89.6%]" in a for a in alts), alts


def test_a_charts_lines_differ_in_more_than_colour(monkeypatch):
    """Past 11 points a plot's lines lost their markers: training batches and the held-out set, on one axis,
    were told apart by colour alone (blue and orange), not at all in grey or by some colour-blind readers."""
    from align import report

    styles = []

    def png(fig):
        import matplotlib.pyplot as plt

        styles.extend((line.get_linestyle(), line.get_marker()) for line in fig.axes[0].get_lines())
        plt.close(fig)
        return ""

    monkeypatch.setattr(report, "_figure_png", png)
    rows = [{"step": s, "loss": 1.0 / s, "eval_loss": 1.1 / s} for s in range(1, 40)]
    report.plot_series("Loss (lines test)", rows, ["loss", "eval_loss"], "nats per token")
    assert len(styles) == 2 and len({s for s, _ in styles}) == 2 and len({m for _, m in styles}) == 2, styles
    assert all(m not in (None, "None", "") for _, m in styles)


def test_the_verdict_has_a_heading_and_a_run_without_one_says_so(tmp_path):
    """The verdict opened the page with no heading (a screen reader's list of headings went from the run's name
    to its first stage), and a run with no eval yet opened on its stages' table, saying nothing of a verdict."""
    import re

    write(tmp_path, "sft", SFT)
    write(tmp_path, "sample", SAMPLE)
    page, md = write_report(tmp_path).read_text(), (tmp_path / "report.md").read_text()
    headings = re.findall(r"<h(\d)[^>]*>([^<]*)", page)
    assert headings[:3] == [("1", f"align run: {tmp_path.name}"), ("2", "Verdict: did the policy beat its baseline?"),
                            ("2", "Stages at a glance")]
    assert "No verdict yet: this run has no eval" in page and page.index("No verdict yet") < page.index("class='glance'")
    assert md.startswith(f"# align run: {tmp_path.name}\n\n## Verdict: did the policy beat its baseline?\n\n"
                         "No verdict yet: this run has no eval")
    assert "\n## Stages at a glance\n\n- sft (2:10): held-out loss 3.352" in md
    write(tmp_path, "eval", EVAL)
    page = write_report(tmp_path).read_text()
    assert "No verdict yet" not in page
    assert page.index("<h2 id='verdict'>") < page.index("<div class='headline'>") < page.index("<h2 id='glance'>")


def test_the_pages_text_colours_are_readable(tmp_path):
    """The grey of every stage's folder line, date and device (.meta, #777 on white) was 4.48:1, under WCAG's
    4.5:1 for text: each text colour in the page's CSS against each background it uses."""
    import re

    from align.report import CSS

    def luminance(colour: str) -> float:
        colour = colour.lstrip("#")
        if len(colour) == 3:
            colour = "".join(c * 2 for c in colour)
        channels = [int(colour[i:i + 2], 16) / 255 for i in (0, 2, 4)]
        r, g, b = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    texts = re.findall(r"(?<![-\w])color:(#[0-9a-fA-F]{3,6})", CSS)
    backgrounds = ["#fff", *re.findall(r"background:(#[0-9a-fA-F]{3,6})", CSS)]
    assert "#222" in texts and len(backgrounds) >= 3
    for text in texts:
        for background in backgrounds:
            hi, lo = sorted([luminance(text), luminance(background)], reverse=True)
            assert (hi + 0.05) / (lo + 0.05) >= 4.5, (text, background)


def test_each_stage_links_its_folder_relative_to_the_report(tmp_path):
    """report.md named each stage's folder by the path the report was built at (`/home/me/runs/q/sft`), no link:
    wrong on any other machine once the run was copied or pushed to GitHub; the page showed that path too."""
    run = tmp_path / "run"
    write(run, "sft", SFT)
    write(run, "q_1 [x]", {"stage": "merge", "metrics": {}})
    page, md = write_report(run).read_text(), (run / "report.md").read_text()
    assert "\n[sft/](sft/)\n" in md and "\n[q\\_1 \\[x\\]/](q_1%20%5Bx%5D/)\n" in md
    assert str(tmp_path) not in md and str(tmp_path) not in page
    assert "<a href='sft/'>sft/</a>" in page


def test_the_length_warning_says_a_policy_can_exploit_it_not_that_it_will(tmp_path):
    """The reward section said a length-tracking reward model is one 'which a policy will exploit', a claim no
    figure in the run supports (DPO never reads the reward model); the cautions say 'can', as here now."""
    write(tmp_path, "reward", REWARD)
    page = write_report(tmp_path).read_text()
    assert "Pearson r = -0.53 (the model may reward shorter answers, which a policy can exploit)" in page
    assert "will exploit" not in page
