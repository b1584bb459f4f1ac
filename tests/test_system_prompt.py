"""`sft.data.system_prompt` follows the policy: the SFT manifest records it, each later stage carries it
(dpo, reward) and puts it first in every prompt it builds for that policy (sample, dpo, reward, eval's
answers and KL, serve), each policy with its own; a request or a data row with a system turn of its
own keeps it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from served import load_engine, random_adapter, serve_config

from align import generation
from align.artifacts import system_prompt_of, write_manifest
from align.cli import main as align

SYSTEM = "You are the Lumen Notes support desk."
TURN = f"<|im_start|>system\n{SYSTEM}<|im_end|>"  # the tiny model's ChatML
FAST = ["run.wandb=disabled", "train.logging_steps=1", "train.warmup_ratio=0", "model.max_length=96",
        "model.quantize=false"]
PROMPTS = ["Where is Sync?", "How do I export a note?", "Can I change the theme?"]


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory) -> Path:
    """SFT with a system prompt, then DPO and a reward model from it, in one run directory; the token ids
    each trainer was given, decoded."""
    tmp = tmp_path_factory.mktemp("system-prompt")
    run = tmp / "run"
    sft = tmp / "sft.jsonl"
    sft.write_text("\n".join(json.dumps({"instruction": f"Ticket {i}: where is Sync?", "input": "",
                                         "output": "Thanks for asking! Open Settings, then tap Sync."})
                             for i in range(8)) + "\n")
    assert align(["sft", f"model.name={tiny_model}", f"data.path={sft}", f"run.dir={run}", "train.max_steps=1",
                  "data.eval_fraction=0", f"data.system_prompt={SYSTEM}", *FAST]) == 0
    prefs = tmp / "prefs.jsonl"
    prefs.write_text("\n".join(json.dumps({
        "prompt": f"Ticket {i}: where is Sync?", "chosen": "Thanks for asking! Open Settings, then tap Sync.",
        "rejected": "Find it yourself."}) for i in range(8)) + "\n")
    (tmp / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n")

    from align.recipes import dpo, reward

    seen: dict[str, str] = {}

    def recording(cls, key: str, column: str):
        class Recording(cls):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                seen[key] = kwargs["processing_class"].decode(self.train_dataset[0][column])
        return Recording

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dpo, "AlignDPOTrainer", recording(dpo.AlignDPOTrainer, "dpo", "prompt_ids"))
        mp.setattr(reward, "AlignRewardTrainer",
                   recording(reward.AlignRewardTrainer, "reward", "chosen_ids"))
        assert align(["dpo", f"run.dir={run}", f"data.path={prefs}", "train.max_steps=1", "train.batch_size=4",
                      "data.test_fraction=0", *FAST]) == 0
        assert align(["reward", f"run.dir={run}", f"data.path={prefs}", "train.max_steps=1", "train.batch_size=4",
                      "data.test_fraction=0.25", *FAST]) == 0
    (run / "trained_on.json").write_text(json.dumps(seen))
    return run


def manifest(folder: Path) -> dict:
    return json.loads((folder / "align.json").read_text())


def test_sft_records_its_system_prompt_and_dpo_and_reward_carry_it(run):
    assert manifest(run / "sft")["system_prompt"] == SYSTEM
    assert manifest(run / "dpo")["system_prompt"] == SYSTEM
    assert manifest(run / "reward")["system_prompt"] == SYSTEM
    assert system_prompt_of(run / "dpo") == system_prompt_of(run / "reward") == SYSTEM


def test_lookup_walks_from_a_policy_to_its_sft_parent(tmp_path):
    old_sft, dpo, ppo = tmp_path / "sft", tmp_path / "dpo", tmp_path / "ppo"
    # Manifests written before stages recorded it: the SFT's config says, its children point at it.
    write_manifest(old_sft, stage="sft", config={"data": {"system_prompt": SYSTEM}}, base_model="m")
    write_manifest(dpo, stage="dpo", config={}, base_model="m", parents={"sft": old_sft, "preferences": tmp_path})
    write_manifest(ppo, stage="ppo", config={}, base_model="m", parents={"reward_model": tmp_path, "sft": dpo})
    assert system_prompt_of(dpo) == system_prompt_of(ppo) == SYSTEM
    # A reward model from before recorded nothing and was trained without it: not its SFT parent's.
    write_manifest(tmp_path / "reward", stage="reward", config={}, base_model="m", parents={"sft": old_sft})
    assert system_prompt_of(tmp_path / "reward") is None
    write_manifest(dpo, stage="dpo", config={}, base_model="m", parents={"sft": old_sft}, system_prompt=None)
    assert system_prompt_of(dpo) is None  # its own record wins: a policy trained without one
    write_manifest(old_sft, stage="sft", config={"data": {"system_prompt": None}}, base_model="m")
    assert system_prompt_of(old_sft) is None
    assert system_prompt_of(tmp_path / "no-manifest") is None and system_prompt_of("smollm2-135m") is None
    assert system_prompt_of(None) is None


def test_dpo_and_the_reward_model_train_on_prompts_that_open_with_it(run):
    trained_on = json.loads((run / "trained_on.json").read_text())
    assert trained_on["dpo"].startswith(TURN), trained_on["dpo"]
    assert TURN in trained_on["reward"] and "Ticket" in trained_on["reward"]


def test_sample_prompts_the_policy_with_its_system_prompt(run, monkeypatch):
    from align.labeling.store import Store

    seen: list[str] = []
    real = generation.chat_prompt
    monkeypatch.setattr(generation, "chat_prompt", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    assert align(["sample", f"run.dir={run}", f"prompts={run.parent / 'prompts.jsonl'}", "k=2", "max_resample=0",
                  "num_prompts=2", "generation.max_new_tokens=4", "run.wandb=disabled"]) == 0
    assert len(seen) == 2 and all(text.startswith(TURN) for text in seen), seen
    assert manifest(run / "sample")["system_prompt"] == SYSTEM
    store = Store(f"sqlite:///{run / 'labels.db'}")
    task = store.task(store.batch_tasks("round-0")[0]["task_id"])
    assert task["source"]["system_prompt"] == SYSTEM


def test_eval_answers_and_kl_use_each_policys_own(run, tiny_model, monkeypatch):
    from align.recipes import evaluate

    plain = random_adapter(tiny_model, run.parent / "plain", 5)  # an SFT trained without a system prompt
    seen: dict[str, list[str]] = {"answers": [], "kl": []}
    real = generation.chat_prompt

    def recorder(key):
        return lambda *a, **k: seen[key].append(real(*a, **k)) or seen[key][-1]

    monkeypatch.setattr(generation, "chat_prompt", recorder("answers"))
    monkeypatch.setattr(evaluate, "chat_prompt", recorder("kl"))
    assert align(["eval", f"policies={{sft: {run / 'sft'}, dpo: {run / 'dpo'}, plain: {plain}}}", "baseline=sft",
                  f"prompts={run.parent / 'prompts.jsonl'}", "num_prompts=2", "kl_samples=1", "bootstrap=20",
                  "scorer=known_scorers:says_thanks", "generation.max_new_tokens=4",
                  f"reward_model={run / 'reward'}", f"run.dir={run.parent / 'eval-run'}", "run.wandb=disabled"]) == 0
    # Answers: sft, dpo, plain in that order, 2 prompts each; KL: dpo then plain.
    assert [text.startswith(TURN) for text in seen["answers"]] == [True] * 4 + [False] * 2, seen["answers"]
    assert [text.startswith(TURN) for text in seen["kl"]] == [True, True, False, False], seen["kl"]
    assert not any(SYSTEM in text for text in seen["answers"][4:] + seen["kl"][2:])
    assert manifest(run.parent / "eval-run" / "eval")["system_prompts"] == {"sft": SYSTEM, "dpo": SYSTEM,
                                                                             "plain": None}


def test_serve_adds_it_only_to_a_request_without_a_system_message(run):
    from align.chat_engine import Params

    engine = load_engine(serve_config(run, "limits.max_prompt_tokens=200"))
    tokenizer = engine.tokenizers["sft"]

    def prompt(model: str, messages: list[dict]) -> str:
        return tokenizer.decode(engine.prepare(model, messages, Params(max_tokens=4, temperature=0)).prompt_ids)

    ask = [{"role": "user", "content": "Where is Sync?"}]
    assert prompt("sft", ask).startswith(TURN) and prompt("dpo", ask).startswith(TURN)
    own = prompt("sft", [{"role": "system", "content": "Be brief."}, *ask])
    assert own.startswith("<|im_start|>system\nBe brief.") and SYSTEM not in own
    assert SYSTEM not in prompt("base", ask)


@pytest.mark.parametrize("on_policy_base", ["false", "true"])
def test_ppo_rollouts_and_their_reward_use_it(run, tmp_path, monkeypatch, on_policy_base):
    from align import reward_model
    from align.recipes import ppo

    rollouts: list[str] = []
    scored: list[list[dict]] = []
    real_prompt, real_encode = ppo.chat_prompt, reward_model.encode
    monkeypatch.setattr(ppo, "chat_prompt", lambda *a, **k: rollouts.append(real_prompt(*a, **k)) or rollouts[-1])
    monkeypatch.setattr(reward_model, "encode", lambda tok, messages: scored.append(messages) or real_encode(tok, messages))
    assert align(["ppo", f"run.dir={tmp_path}", f"sft={run / 'sft'}", f"reward_model={run / 'reward'}",
                  f"prompts={run.parent / 'prompts.jsonl'}", "min_reward_accuracy=0", "max_probe_flip_rate=1",
                  "train.max_steps=1", "rl.rollout_prompts=2", "rl.minibatch_size=2", "generation.max_new_tokens=4",
                  f"rl.reward_on_policy_base={on_policy_base}", "run.wandb=disabled", "model.quantize=false"]) == 0
    assert len(rollouts) == 2 and all(text.startswith(TURN) for text in rollouts), rollouts
    assert len(scored) == 2 and all(m[0] == {"role": "system", "content": SYSTEM} for m in scored), scored
    assert manifest(tmp_path / "ppo")["system_prompt"] == SYSTEM


def test_without_data_system_prompt_sft_records_the_system_turn_every_example_opens_with(tiny_model, tmp_path):
    """Records that each carry the same `system` field train after that system turn: align.json records it, so
    sample, DPO, reward, eval and serve prompt the policy with the system turn it was trained with."""
    sft = tmp_path / "sft.jsonl"
    sft.write_text("\n".join(json.dumps({"system": SYSTEM, "instruction": f"Ticket {i}: where is Sync?",
                                         "output": "Open Settings, then tap Sync."}) for i in range(4)) + "\n")
    assert align(["sft", f"model.name={tiny_model}", f"data.path={sft}", f"run.dir={tmp_path / 'run'}",
                  "train.max_steps=1", "data.eval_fraction=0", *FAST]) == 0
    assert system_prompt_of(tmp_path / "run" / "sft") == SYSTEM


def test_data_system_prompt_that_no_example_trained_with_is_not_recorded(tiny_model, tmp_path):
    """Examples that each open with their own system turn keep it (data.system_prompt does not replace it): the
    policy never saw data.system_prompt, so align.json records the turn it trained with, not data.system_prompt."""
    sft = tmp_path / "sft.jsonl"
    sft.write_text("\n".join(json.dumps({"system": SYSTEM, "instruction": f"Ticket {i}: where is Sync?",
                                         "output": "Open Settings, then tap Sync."}) for i in range(4)) + "\n")
    assert align(["sft", f"model.name={tiny_model}", f"data.path={sft}", f"run.dir={tmp_path / 'run'}",
                  "data.system_prompt=You are a pirate.", "train.max_steps=1", "data.eval_fraction=0", *FAST]) == 0
    assert system_prompt_of(tmp_path / "run" / "sft") == SYSTEM
