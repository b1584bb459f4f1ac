"""Active selection: the acquisition functions on hand-made heads, the bootstrap heads, the features they
read, and `align sample selection=uncertainty` on a tiny model with a tiny reward model (the store's
queue then hands out the most uncertain task first)."""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from align.active import HeadEnsemble, acquisition, choose, fit_heads, pair_probabilities, reward_features
from align.cli import main as align

REPO = Path(__file__).resolve().parents[1]
FAST = ["run.wandb=disabled", "model.max_length=128"]


# ---------------------------------------------------------------------------- acquisition on hand-made heads


def test_the_task_whose_heads_disagree_ranks_first():
    agree = torch.tensor([[2.0, 1.0, 0.0, -1.0]] * 4)  # every head: the same confident order
    disagree = torch.tensor([[2.0, 1.0, 0.0, -1.0], [-1.0, 0.0, 1.0, 2.0]] * 2)  # half the heads reverse it
    tie = torch.zeros(4, 4)  # every head: all four equal, 50/50 on each pair
    values = {name: [acquisition(s, name) for s in (agree, disagree, tie)] for name in ("bald", "variance")}
    for name, (a, d, t) in values.items():
        assert d > a and d > t, name
        assert choose([a, d, t], 1) == [1]
    # BALD: confident heads that agree teach nothing, and neither does a 50/50 all heads share (a near-tie);
    # the entropy of the mean alone cannot tell that tie from the disagreement.
    assert values["bald"][0] == pytest.approx(0, abs=1e-6) and values["bald"][2] == pytest.approx(0, abs=1e-6)
    assert acquisition(tie, "entropy") == pytest.approx(math.log(2))
    # entropy reads the reward model's own scores (small margins), not the heads
    assert acquisition(disagree, "entropy", single=torch.tensor([5.0, 0.0, -5.0, -10.0])) < 0.05
    with pytest.raises(ValueError, match="allowed values: bald, variance, entropy"):
        acquisition(agree, "margin")


def test_pair_probabilities_cover_every_pair_once():
    p = pair_probabilities(torch.tensor([0.0, 1.0, 3.0]))
    expected = [1 / (1 + math.exp(1)), 1 / (1 + math.exp(3)), 1 / (1 + math.exp(2))]  # (0,1), (0,2), (1,2)
    assert p.tolist() == pytest.approx(expected)


def test_choose_keeps_an_exploration_share_drawn_from_the_rest():
    values = [0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4]
    assert choose(values, 3) == [0, 2, 4]
    picked = choose(values, 4, explore=0.5, seed=1)
    assert picked[:2] == [0, 2] and len(set(picked)) == 4 and not {0, 2} & set(picked[2:])
    assert picked == choose(values, 4, explore=0.5, seed=1)  # seeded
    assert len(choose(values, 20)) == 8
    # In the app's queue (highest first) the random picks sit among the chosen, not after them all (their own
    # values are below every top pick's, so an annotator who stopped early left exactly them unlabelled)
    from align.active import queue_priorities

    assert queue_priorities(values, [0, 2, 4], seed=1) == [0.9, 0.8, 0.7]
    priority = queue_priorities(values, picked, explore=0.5, seed=1)
    assert priority[:2] == [0.9, 0.8] and set(priority[2:]) <= {0.9, 0.8}
    assert queue_priorities(values, [1, 3], explore=1.0) == [0.1, 0.2]  # all at random: nothing to place them by


# ---------------------------------------------------------------------------- the bootstrap heads


def _pairs(n: int, dim: int = 6, seed: int = 0):
    """Pairs whose preference is feature 0 (chosen has more of it); the other features are noise."""
    g = torch.Generator().manual_seed(seed)
    chosen, rejected = torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)
    swap = chosen[:, 0] < rejected[:, 0]
    chosen[swap], rejected[swap] = rejected[swap].clone(), chosen[swap].clone()
    return chosen, rejected


def test_heads_learn_the_preference_and_resample_by_task(tmp_path):
    chosen, rejected = _pairs(60)
    heads = fit_heads(chosen, rejected, [i // 3 for i in range(60)], heads=6, seed=0)
    test_c, test_r = _pairs(200, seed=1)
    assert ((heads.scores(test_c).mean(0) - heads.scores(test_r).mean(0)) > 0).float().mean() > 0.9
    assert heads.weights[:, 0].min() > heads.weights[:, 1:].abs().max()  # every head found feature 0
    assert not torch.allclose(heads.weights[1], heads.weights[2])  # different resamples, different heads
    # head 0 is the fit on every pair: the ensemble of one
    assert torch.allclose(fit_heads(chosen, rejected, heads=1).weights[0], heads.weights[0], atol=1e-3)
    # one task only: every resample of tasks is that task, so the heads cannot disagree
    same = fit_heads(chosen, rejected, ["one"] * 60, heads=4, seed=0)
    assert torch.allclose(same.weights[1], same.weights[3], atol=1e-4)
    assert acquisition(same.scores(test_c[:4]), "bald") == pytest.approx(0, abs=1e-4)
    # saved and loaded, they score alike
    heads.save(tmp_path)
    again = HeadEnsemble.load(tmp_path)
    assert torch.allclose(again.scores(test_c), heads.scores(test_c)) and again.meta["groups"] == 20
    with pytest.raises(FileNotFoundError, match=r"no reward_heads.safetensors.*align reward run.dir=.* heads=8"):
        HeadEnsemble.load(tmp_path / "elsewhere")


def test_heads_fit_soft_labels_and_weights_as_the_reward_model_does():
    """12 tasks say feature 0 wins, sure (p 0.97); 20 say the reverse, decided by a distrusted annotator (p 0.52).
    As hard wins the reverse outvotes; as soft labels or weights 2p - 1 (what the reward model trains on), the
    sure ones win. A tie is p 1/2: pairs that are all ties pull every gap to 0."""
    from datasets import Dataset

    from align.active import head_labels

    sure, doubted = _pairs(36, seed=2), _pairs(60, seed=3)
    chosen, rejected = torch.cat([sure[0], doubted[1]]), torch.cat([sure[1], doubted[0]])  # doubted: reversed
    groups = [i // 3 for i in range(96)]
    p = torch.tensor([0.97] * 36 + [0.52] * 60)
    hard = fit_heads(chosen, rejected, groups, heads=3)
    soft = fit_heads(chosen, rejected, groups, p_chosen=p, heads=3)
    weighted = fit_heads(chosen, rejected, groups, weight=2 * p - 1, heads=3)
    assert hard.weights[:, 0].max() < 0 < soft.weights[:, 0].min() and weighted.weights[:, 0].min() > 0
    # the weights' scale does not matter (normalised per resample), and weight 1 is no weight
    assert torch.allclose(fit_heads(chosen, rejected, groups, weight=10 * (2 * p - 1), heads=3).weights,
                          weighted.weights, atol=1e-3)  # L-BFGS stops within its tolerance
    assert torch.allclose(fit_heads(chosen, rejected, groups, weight=torch.ones(96), heads=3).weights, hard.weights,
                          atol=1e-3)
    tied = fit_heads(chosen, rejected, groups, p_chosen=torch.full((96,), 0.5), heads=2)
    assert tied.weights.abs().max() < 1e-4
    # what the reward stage's weighting makes of a split: soft reads p_chosen, weighted reads weight, a kept tie
    # is 1/2 in every mode
    split = Dataset.from_list([{"p_chosen": 0.9, "weight": 0.8, "tie": False}, {"p_chosen": 0.5, "weight": 0.0, "tie": True}])
    assert [None if x is None else x.tolist() for x in head_labels(split, "soft")] == [pytest.approx([0.9, 0.5]), None]
    assert [None if x is None else x.tolist() for x in head_labels(split, "weighted")] == [[1.0, 0.5],
                                                                                           pytest.approx([0.8, 0.0])]
    assert head_labels(split, "off")[0].tolist() == [1.0, 0.5] and head_labels(split, "off")[1] is None
    assert head_labels(split.remove_columns(["tie"]), "off") == (None, None)


def test_features_are_what_the_score_head_reads(tiny_model):
    """The hook's features times the head's weights give the model's own reward, plain and under peft."""
    from peft import get_peft_model

    from align.config import LoraConfig, ModelConfig
    from align.modeling import device_plan, load_tokenizer, peft_lora_config
    from align.reward_model import reward_base, score_conversations

    cfg = ModelConfig(name=tiny_model, quantize=False)
    model = reward_base(cfg, device_plan(cfg), training=False)
    tokenizer = load_tokenizer(tiny_model)
    model.config.pad_token_id = tokenizer.pad_token_id
    conversations = [[{"role": "user", "content": "Where is Sync?"}, {"role": "assistant", "content": text}]
                     for text in ["Open Settings.", "Thanks for asking! Open Settings, then tap Sync now.", "No."]]
    feats, rewards = reward_features(model, tokenizer, conversations, batch_size=2)  # padded batches
    assert feats.shape == (3, model.config.hidden_size)
    assert (feats @ model.score.weight[0]).tolist() == pytest.approx(rewards, abs=1e-4)
    assert rewards == pytest.approx(score_conversations(model, tokenizer, conversations), abs=1e-5)
    wrapped = get_peft_model(model, peft_lora_config(LoraConfig(), "SEQ_CLS", modules_to_save=["score"]))
    _, again = reward_features(wrapped, tokenizer, conversations)
    assert again == pytest.approx(rewards, abs=1e-4)  # a fresh LoRA changes nothing yet


# ---------------------------------------------------------------------------- align sample selection=uncertainty


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory) -> Path:
    """An SFT adapter and a reward model with its heads in one run directory, plus 8 prompts."""
    tmp = tmp_path_factory.mktemp("active")
    run = tmp / "run"
    sft = tmp / "sft.jsonl"
    sft.write_text("\n".join(json.dumps({"instruction": f"Ticket {i}: where is Sync?", "input": "",
                                         "output": "Thanks for asking! Open Settings, then tap Sync."})
                             for i in range(16)) + "\n")
    assert align(["sft", f"model.name={tiny_model}", f"data.path={sft}", f"run.dir={run}", "train.max_steps=2",
                  "model.quantize=false", "data.eval_fraction=0", *FAST]) == 0
    prefs = tmp / "prefs.jsonl"
    prefs.write_text("\n".join(json.dumps({
        "prompt": f"Ticket {i}: where is Sync?", "chosen": "Thanks for asking! Open Settings, then tap Sync.",
        "rejected": r, "task_id": f"t{i}"}) for i in range(12) for r in ("Find it yourself.", "No.")) + "\n")
    assert align(["reward", f"run.dir={run}", f"data.path={prefs}", "model.quantize=false", "train.max_steps=4",
                  "train.batch_size=4", "train.lr=3e-3", "data.test_fraction=0.25", "heads=4", *FAST]) == 0
    (tmp / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in [
        "Where is Sync?", "How do I export a note?", "Can I change the theme?", "Why was I logged out?",
        "Where did my tags go?", "How do I share a notebook?", "Is there a dark mode?", "How do I get a refund?"]))
    return run


def sample_args(run: Path, *extra: str) -> list[str]:
    return ["sample", f"run.dir={run}", f"prompts={run.parent / 'prompts.jsonl'}", "k=3",
            "generation.max_new_tokens=10", "generation.batch_size=4", "run.wandb=disabled", *extra]


def test_reward_saves_its_heads_with_their_figures(run):
    manifest = json.loads((run / "reward" / "align.json").read_text())
    heads = HeadEnsemble.load(run / "reward")
    assert heads.weights.shape[0] == 4 and heads.meta["pairs"] == manifest["metrics"]["heads_pairs"] == 18
    assert heads.meta["groups"] == 9  # resampled by task: 9 training tasks of 2 pairs
    assert 0 <= manifest["metrics"]["heads_eval_accuracy"] <= 1


def test_uncertainty_puts_the_least_sure_tasks_first_in_the_queue(run):
    from align.active import load_selector, task_uncertainty
    from align.labeling import handlers
    from align.labeling.store import Store

    store = Store(f"sqlite:///{run / 'labels.db'}")  # a prompt some other batch has (labelled by hand, say)
    store.add_tasks("by-hand", [{"prompt": "Where is Sync?", "responses": ["Open Settings.", "No."]}])
    assert align(sample_args(run, "selection=uncertainty", "num_prompts=3", "pool_factor=2", "batch=active",
                             "run.wandb=offline")) == 0
    tasks = store.batch_tasks("active")
    candidates = [json.loads(line) for line in (run / "sample" / "candidates.jsonl").read_text().splitlines()]
    assert len(candidates) == 6 and len(tasks) == 3  # 3 of the first 6 prompts no other batch has
    # not a task of another batch (only earlier rounds' were left out: a labelled prompt came back for being
    # uncertain, to be labelled again)
    assert "Where is Sync?" not in {c["prompt"] for c in candidates}
    chosen = sorted((c for c in candidates if c["chosen"]), key=lambda c: -c["acquisition"])
    assert [c["prompt"] for c in chosen] == [c["prompt"] for c in sorted(candidates, key=lambda c: -c["acquisition"])[:3]]
    # each stored task's priority is its own uncertainty, computed again here from its responses
    model, tokenizer, heads = load_selector(run / "reward")
    again = task_uncertainty(model, tokenizer, heads, tasks, "bald")
    assert [t["priority"] for t in tasks] == pytest.approx(again, rel=1e-4, abs=1e-7)
    assert {t["prompt"]: t["priority"] for t in tasks} == pytest.approx({c["prompt"]: c["acquisition"] for c in chosen})
    # a copy of an answer and a blank one count for nothing: export makes no pair of them
    prompt, (a, b, *_) = tasks[0]["prompt"], tasks[0]["responses"]
    for method in ("bald", "entropy", "variance"):
        plain = task_uncertainty(model, tokenizer, heads, [{"prompt": prompt, "responses": [a, b]}], method)
        padded = task_uncertainty(model, tokenizer, heads, [{"prompt": prompt, "responses": [a, b, f" {a} ", ""]},
                                                            {"prompt": prompt, "responses": [a, a, " "]}], method)
        # float32 scores of a batch of 2 against one of 4 (kernels choose by shape): BALD, a difference of
        # entropies near 0.7, keeps their absolute rounding (2e-4 relative to its 5.6e-4 on an AMD EPYC)
        assert padded == pytest.approx([plain[0], 0.0], rel=1e-4, abs=1e-6), method
    # the queue (the app's and a simulated annotator's) hands them out most uncertain first
    store.add_user("ann", "pw-for-ann")
    ann = handlers.sign_in(store, "ann", "pw-for-ann")
    order = []
    while (task := handlers.next_task(store, ann, batch="active")) is not None:
        order.append(task["prompt"])
        handlers.submit(store, ann, task["task_id"], [1, 2, 3])
    assert order == [c["prompt"] for c in chosen]
    manifest = json.loads((run / "sample" / "align.json").read_text())
    selection = manifest["selection"]
    assert selection["chosen"] == 3 and selection["candidates"] == 6 and selection["acquisition"] == "bald"
    assert selection["mean_acquisition_chosen"] >= selection["mean_acquisition_candidates"]
    assert manifest["parents"]["selection_reward_model"]["path"] == str(run / "reward")
    assert manifest["metrics"]["selection/mean_acquisition_chosen"] == selection["mean_acquisition_chosen"]
    # the same figures in the stage's W&B run (offline), with the reward model among the sample's parents
    (folder,) = (run / "wandb").glob("offline-run-*")
    info = json.loads(subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json",
                                      str(folder)], capture_output=True, text=True, check=True).stdout)
    assert info["summary"]["selection/mean_acquisition_chosen"] == pytest.approx(selection["mean_acquisition_chosen"])
    assert info["summary"]["selection/candidates"] == 6
    assert info["config"]["lineage"]["parents"] == {"policy": "run-sft", "selection_reward_model": "run-reward"}
    # the same command again adds nothing: the batch already holds its 3 tasks of this pool
    assert align(sample_args(run, "selection=uncertainty", "num_prompts=3", "pool_factor=2", "batch=active")) == 0
    assert len(store.batch_tasks("active")) == 3
    again = json.loads((run / "sample" / "align.json").read_text())  # nothing sampled: still the policy's base
    assert again["base_model"] == manifest["base_model"] is not None
    assert again["selection"] == selection  # and still the record of how the batch's tasks were chosen


def test_random_selection_draws_from_the_pool_at_priority_0(run):
    from align.labeling.store import Store

    taken = set().union(*(Store(f"sqlite:///{run / 'labels.db'}").task_prompts(b)
                          for b in Store(f"sqlite:///{run / 'labels.db'}").batches()))  # by the module's other tests
    assert align(sample_args(run, "num_prompts=2", "pool_factor=4", "batch=random", "generation.seed=3")) == 0
    tasks = Store(f"sqlite:///{run / 'labels.db'}").batch_tasks("random")
    assert len(tasks) == 2 and {t["priority"] for t in tasks} == {0.0} and not taken & {t["prompt"] for t in tasks}
    manifest = json.loads((run / "sample" / "align.json").read_text())
    assert manifest["selection"] == {"selection": "random", "pool": 8 - len(taken), "pool_factor": 4.0}
    assert not (run / "sample" / "candidates.jsonl").exists()
    # each response says whether it ended or was cut at max_new_tokens (10 tokens here), and the stage counts the cut
    store = Store(f"sqlite:///{run / 'labels.db'}")
    flags = [r["meta"]["finished"] for t in tasks for r in store.task(t["task_id"])["responses"]]
    assert len(flags) == 6 and all(isinstance(f, bool) for f in flags)
    assert manifest["metrics"]["responses_cut"] == flags.count(False) and manifest["metrics"]["responses_sampled"] == 6
    # the same command again samples nothing; its manifest still says what the batch holds, which export reads
    assert align(sample_args(run, "num_prompts=2", "pool_factor=4", "batch=random", "generation.seed=3")) == 0
    again = json.loads((run / "sample" / "align.json").read_text())["metrics"]
    assert again["responses_sampled"] == 0 and again["tasks_in_batch"] == 2
    assert again["answers_in_batch"] == 6 and again["cut_in_batch"] == flags.count(False)


def test_a_sample_stopped_and_resumed_gives_the_tasks_of_one_uninterrupted(run, tmp_path, monkeypatch):
    """A call after one stopped on the way samples the rest of the same draw with the seeds it had there: it drew
    again from what was left, and seeded the first of those with the stopped call's first seed."""
    import align.recipes.sample as sample
    from align.labeling.store import Store

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"Ticket {i}: how do I sync?"}) for i in range(6)) + "\n")
    args = ["sample", f"run.dir={run}", f"prompts={prompts}", "k=2", "num_prompts=4", "pool_factor=1.5",
            "generation.max_new_tokens=8", "generation.batch_size=2", "generation.seed=5", "run.wandb=disabled"]

    def tasks(url: str) -> dict[str, list[str]]:
        return {t["prompt"]: t["responses"] for t in Store(url).batch_tasks("round-0")}

    whole, resumed = f"sqlite:///{tmp_path / 'whole.db'}", f"sqlite:///{tmp_path / 'resumed.db'}"
    assert align([*args, f"store={whole}"]) == 0
    generate, calls = sample.generate_answers, []

    def stopped(*a, **k):  # the second generation batch never ends
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return generate(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(sample, "generate_answers", stopped)
        assert align([*args, f"store={resumed}"]) != 0
    assert len(tasks(resumed)) == 2
    assert align([*args, f"store={resumed}"]) == 0
    assert len(tasks(whole)) == 4 and tasks(resumed) == tasks(whole)


def test_an_uncertainty_sample_stopped_after_storing_its_tasks_keeps_their_selection_record(run, tmp_path,
                                                                                                monkeypatch):
    """The chosen tasks go into the store in one transaction; a call stopped after it (before its manifest) lost
    its sample folder, and the call run again, with nothing left to sample, wrote a manifest whose `selection`
    named neither the reward model nor a chosen task, and no candidates.jsonl."""
    import align.recipes.sample as sample
    from align.labeling.store import Store

    def call(name: str) -> list[str]:
        return [*sample_args(run, "selection=uncertainty", "num_prompts=2", "pool_factor=2", f"policy={run / 'sft'}",
                             f"selection_reward_model={run / 'reward'}"), f"run.dir={tmp_path / name}"]

    def selection(name: str) -> dict:
        return json.loads((tmp_path / name / "sample" / "align.json").read_text())["selection"]

    def candidates(name: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / name / "sample" / "candidates.jsonl").read_text().splitlines()]

    assert align(call("whole")) == 0
    with monkeypatch.context() as m:  # stopped once the tasks are in the store, before the manifest
        m.setattr(sample, "save_config", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        assert align(call("resumed")) != 0
    assert len(Store(f"sqlite:///{tmp_path / 'resumed' / 'labels.db'}").task_prompts("round-0")) == 2
    assert not (tmp_path / "resumed" / "sample" / "align.json").exists()
    assert align(call("resumed")) == 0  # nothing left to sample
    resumed = selection("resumed")
    assert resumed["chosen"] == 2 and resumed["candidates"] == 4 and resumed["reward_model"] == str(run / "reward")
    assert resumed == selection("whole")  # the figures of the call that chose them
    assert candidates("resumed") == candidates("whole")
    chosen = {c["prompt"] for c in candidates("resumed") if c["chosen"]}
    assert chosen == Store(f"sqlite:///{tmp_path / 'resumed' / 'labels.db'}").task_prompts("round-0")


def test_a_batch_named_by_hand_leaves_out_every_rounds_prompts_and_keeps_its_own(run):
    """A batch named by hand (round 0 by default) took the prompts of round-1 and later as "later rounds" of its
    own and picked them again; and a batch's own prompts that another batch holds too were left out of its pool,
    so the same command again sampled new ones."""
    from align.labeling.store import Store

    store = Store(f"sqlite:///{run / 'labels.db'}")
    prompts = [json.loads(line)["prompt"] for line in (run.parent / "prompts.jsonl").read_text().splitlines()]
    store.add_tasks("round-1", [{"prompt": prompts[-1], "responses": ["a", "b"]}])
    store.add_tasks("mine", [{"prompt": prompts[0], "responses": ["a", "b"]}])
    store.add_tasks("copy", [{"prompt": prompts[0], "responses": ["c", "d"]}])  # another batch holds it too
    for _ in range(2):  # the same command twice: the batch keeps its one task, and adds nothing
        assert align(sample_args(run, "num_prompts=1", "batch=mine")) == 0
        assert store.task_prompts("mine") == {prompts[0]}
    taken = set().union(*(store.task_prompts(b) for b in store.batches() if b != "b2"))
    assert align(sample_args(run, "num_prompts=8", "batch=b2")) == 0
    assert store.task_prompts("b2") and not store.task_prompts("b2") & taken  # round-1's prompt among those left out


def test_pipeline_round_1_picks_by_round_0s_reward_model(tiny_model, tmp_path, monkeypatch, capsys):
    from align.labeling.store import Store

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Ticket {i}: how do I {t}?", "input": "",
                                          "output": "Thanks for asking! Open Settings." if i % 2 else f"Open {t}."})
                              for i, t in enumerate(["sync", "export", "share a note", "find tags"] * 4)) + "\n")
    run = tmp_path / "run"
    args = ["pipeline", f"run.dir={run}", "run.wandb=disabled", "stages=[sft,sample,label,export,reward,dpo]",
            "rounds=2", "scorer=support_style", f"sft.model.name={tiny_model}", f"sft.data.path={data}",
            "sft.train.max_steps=2", "sft.model.quantize=false", "sft.data.eval_fraction=0",
            f"sample.prompts={data}", "sample.num_prompts=4", "sample.k=3", "sample.generation.max_new_tokens=8",
            "sample.selection=uncertainty", "sample.pool_factor=2", "export.test_fraction=0.25",
            "reward.train.max_steps=2", "reward.model.quantize=false",
            "reward.model.max_length=96", "dpo.train.max_steps=1", "dpo.model.quantize=false",
            "dpo.model.max_length=96"]
    assert align(args) == 0
    out = capsys.readouterr().out  # the stages' own "next:" hints are off: the pipeline runs the next stage
    assert out.count("next: ") == 1 and "next: open " in out and "round-1, the last of 2 rounds" in out
    first, second = (json.loads((r / "sample" / "align.json").read_text()) for r in (run, run / "round-1"))
    assert first["selection"]["selection"] == "random" and first["selection"]["pool"] == 4  # no reward model yet
    assert second["selection"]["selection"] == "uncertainty" and second["selection"]["candidates"] == 8
    assert second["selection"]["reward_model"] == str(run / "reward")  # round 0's
    # round 0's reward model got the heads round 1 picks by; the last round's has no next round to serve
    assert HeadEnsemble.load(run / "reward").weights.shape[0] == 8
    assert not (run / "round-1" / "reward" / "reward_heads.safetensors").exists()
    store = Store(f"sqlite:///{run / 'labels.db'}")
    assert {t["priority"] for t in store.batch_tasks("round-0")} == {0.0}
    values = {json.loads(line)["prompt"]: json.loads(line)["acquisition"]
              for line in (run / "round-1" / "sample" / "candidates.jsonl").read_text().splitlines()}
    tasks = store.batch_tasks("round-1")
    assert len(tasks) == 4 and all(t["priority"] == pytest.approx(values[t["prompt"]]) for t in tasks)
    assert min(t["priority"] for t in tasks) >= sorted(values.values())[-4]  # the 4 most uncertain of 8
    assert len(store.submitted_rankings("round-1")) == 4  # labelled, in queue order, by the simulated annotator
    assert store.task_prompts("round-0").isdisjoint(store.task_prompts("round-1"))  # new prompts each round
    # Each round exports its batch and the earlier ones; a rerun remakes nothing (round 1's labels once
    # counted as new for round 0's export, which then retrained round 0's policies on them).
    seen = [json.loads((r / "preferences" / "align.json").read_text())["rankings_seen"] for r in (run, run / "round-1")]
    assert seen == [4, 8]
    import align.recipes.pipeline as pipeline

    ran = []
    monkeypatch.setattr(pipeline, "run_stage", lambda name, cfg: ran.append(name) or Path(cfg.run.dir) / name)
    assert align(args) == 0 and ran == []


# ---------------------------------------------------------------------------- benchmarks/active_learning.py


def _benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location("active_learning", REPO / "benchmarks" / "active_learning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmarks_annotator_calls_close_scores_a_tie_as_the_quickstarts_does():
    bench = _benchmark()
    task = {"prompt": "Where is Sync?", "responses": ["Open Settings and tap Sync to sync your notes now.",
                                                      "Open Settings and tap Sync to sync all your notes now.",
                                                      "Hi! Open Settings and tap Sync to sync your notes now."]}
    # support_style: one word more costs 0.004, a greeting earns 1: within 0.25 only the first two tie
    assert sorted(bench.labelled_pairs([task], "support_style", 0.0)[0]) == [(0, 1), (2, 0), (2, 1)]
    assert sorted(bench.labelled_pairs([task], "support_style", 0.0, tie_resolution=0.25)[0]) == [(2, 0), (2, 1)]
    assert bench.parse_args([]).tie_resolution == 0.25  # the quickstart's (configs/quickstart/pipeline.yaml)


def test_an_arm_with_only_ties_labelled_so_far_picks_at_random_instead_of_failing():
    bench = _benchmark()
    args = bench.parse_args(["--start", "2", "--at", "4,6", "--batch", "2", "--heads", "2"])
    feats = torch.randn(8, 3, 4)
    pairs = [[(0, 1)], [(2, 0)]] + [[] for _ in range(6)]  # tasks 2-7 all ties: seed 0's start (6, 7) has nothing to fit
    assert random.Random(0).sample(range(8), 2) == [6, 7]  # run_arm's start for seed 0
    curve = bench.run_arm("bald", 0, feats, pairs, feats[:2], [[(0, 1)], [(1, 2)]], args, [[0, 1, 2]] * 8)
    assert [len(curve[n]["tasks"]) for n in (4, 6)] == [4, 6] and len(set(curve[6]["tasks"])) == 6


def test_the_benchmark_runs_end_to_end_on_a_tiny_setting(run, tmp_path, monkeypatch):
    bench = _benchmark()
    pool = tmp_path / "pool.jsonl"
    pool.write_text("\n".join(json.dumps({"prompt": f"Ticket {i}: where is {t}?"})
                              for i, t in enumerate(["Sync", "Export", "Tags", "Trash"] * 3)) + "\n")
    out = tmp_path / "bench"
    argv = ["--policy", str(run / "sft"), "--out", str(out), "--pool-prompts", str(pool), "--pool-size", "12",
            "--test-prompts", str(run.parent / "prompts.jsonl"), "--test-size", "8", "--k", "3",
            "--max-new-tokens", "8", "--max-length", "96", "--at", "4,8", "--start", "2", "--batch", "2",
            "--seeds", "2", "--heads", "3", "--bootstrap", "50", "--tie-resolution", "0", "--real", "8",
            "--real-set", "train.max_steps=2", "model.quantize=false", "--wandb", "offline"]
    assert bench.main(argv) == 0
    curve = json.loads((out / "curve.json").read_text())
    assert curve["pool_tasks"] == 12 and curve["test_pairs"] > 0 and set(curve["curve"]) == {"4", "8"}
    for row in curve["curve"].values():
        for arm in ("random", "bald"):
            lo, hi = row[arm]["ci"]
            assert 0 <= lo <= row[arm]["accuracy"] <= hi <= 1 and len(row[arm]["per_seed"]) == 2
        assert row["bald"]["delta"] == pytest.approx(row["bald"]["accuracy"] - row["random"]["accuracy"])
    assert [(r["arm"], r["n"]) for r in curve["real"]] == [("random", 8), ("bald", 8)]
    assert all(0 <= r["accuracy"] <= 1 and r["pairs"] == curve["test_pairs"] for r in curve["real"])
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "align.json").read_text())["stage"] == "active_learning"
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))  # the W&B run, offline
    # the report of a run directory holding the output embeds the plot
    from align.report import write_report

    shutil.copytree(out, run / "active_learning", ignore=shutil.ignore_patterns("cache", "real", "wandb"))
    page = write_report(run).read_text()
    assert "alt='active learning curve'" in page and "random" in page

    # the bald arm's first pick: the tasks the heads fitted on the start disagree on most
    args = bench.parse_args(argv)
    cache = next((out / "cache").iterdir())
    tasks = [json.loads(line) for line in (cache / "pool.jsonl").read_text().splitlines()]
    pairs = bench.labelled_pairs(tasks, "support_style", 0.0)
    feats = torch.load(next(cache.glob("pool-features-*.pt")))
    start = random.Random(0).sample(range(12), 2)
    model = bench.fit(feats, pairs, start, args, 0)
    left = [i for i in range(12) if i not in start]
    kept = bench.distinct_answers(tasks)  # as align sample scores a task: a copy or a blank answer left out
    assert bench.distinct_answers([{"responses": ["a", " ", "b", "a "]}]) == [[0, 2]]
    values = [acquisition(model.scores(feats[i])[:, kept[i]], "bald") if len(kept[i]) > 1 else 0.0 for i in left]
    picked = bench.run_arm("bald", 0, feats, pairs, feats[:1], [[]], args, kept)[4]["tasks"]
    assert picked[:2] == start and picked[2:] == [left[j] for j in choose(values, 2)]

    # a rerun reads the cache: no policy or trunk is loaded again
    from align import generation, reward_model

    def refuse(*a, **k):
        raise AssertionError("loaded a model on a rerun")

    monkeypatch.setattr(generation, "load_policy", refuse)
    monkeypatch.setattr(reward_model, "reward_base", refuse)
    assert bench.main([*argv[:argv.index("--real")], "--wandb", "disabled"]) == 0
    monkeypatch.undo()
    # a real reward model fitted with other settings is fitted again, not read back (a 48-step run returned the
    # 16-step one's accuracy); another pool file is sampled again (its cached answers were of the first file's)
    fitted = []
    from align.recipes import reward

    main = reward.main
    monkeypatch.setattr(reward, "main", lambda cfg: fitted.append(cfg.train.max_steps) or main(cfg))
    assert bench.main([*argv[:-2], "--wandb", "disabled"]) == 0 and fitted == []  # the same settings: read back
    more = [*argv[:argv.index("--real-set") + 1], "train.max_steps=3", *argv[argv.index("--real-set") + 2:-2]]
    assert bench.main([*more, "--wandb", "disabled"]) == 0 and fitted == [3, 3]
    assert all(r["steps"] == 3 for r in json.loads((out / "curve.json").read_text())["real"])
    other = tmp_path / "other.jsonl"
    other.write_text(pool.read_text().replace("where is", "how do I find"))
    caches = set((out / "cache").iterdir())
    assert bench.main([*argv[:argv.index("--real")], "--pool-prompts", str(other), "--wandb", "disabled"]) == 0
    (new,) = set((out / "cache").iterdir()) - caches
    assert all("how do I find" in json.loads(line)["prompt"] for line in (new / "pool.jsonl").read_text().splitlines())
