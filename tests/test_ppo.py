"""`align ppo` on a tiny model, through the CLI: reward rises with KL bounded, a killed run resumes to the
same figures, the reward-model gate refuses, the reward model on the policy's base scores as it does alone,
GRPO/RLOO write adapters peft loads; plus the RL pieces (GAE, whitening, KL controller) by hand."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from align import rl as R
from align.cli import main as align
from align.config import PPOStageConfig, load_config
from align.report import glance
from align.tracking import read_jsonl

REPO = Path(__file__).resolve().parents[1]
TOPICS = ["Sync", "Export", "Backup", "Theme", "Share", "Tags", "Password", "Search"]
# Small and fast: no W&B, an unquantized tiny base, short responses, sampled at 0.5 (the tiny SFT
# model is near-uniform at 1.0, so a reward it could reach would never be sampled).
FAST = ["run.wandb=disabled", "model.quantize=false", "generation.max_new_tokens=16", "generation.temperature=0.5"]


def thanks(prompt: str, response: str) -> float:
    """The known reward: 1 when the reply thanks the user (half the SFT answers do), else 0."""
    return float("thanks" in response.lower())


def not_a_number(prompt: str, response: str) -> float:
    return float("nan")


SCORED = {"calls": 0, "until": None}


def thanks_until(prompt: str, response: str) -> float:
    """thanks(), then not a number once SCORED["until"] responses were scored: a run that fails mid-way."""
    SCORED["calls"] += 1
    if SCORED["until"] is not None and SCORED["calls"] > SCORED["until"]:
        return float("nan")
    return thanks(prompt, response)


@pytest.fixture(scope="module")
def sft_dir(tiny_model, tmp_path_factory) -> Path:
    """An SFT policy that answers either "Thanks for asking! Open Settings..." or "Open Settings..."."""
    tmp = tmp_path_factory.mktemp("ppo-sft")
    data = tmp / "sft.jsonl"
    data.write_text("\n".join(json.dumps({
        "instruction": f"Ticket {i}: where is {TOPICS[i % 8]}?", "input": "",
        "output": ("Thanks for asking! " if (i // 8) % 2 else "") + f"Open Settings and tap {TOPICS[i % 8]}."})
        for i in range(32)) + "\n")
    run = tmp / "run"
    assert align(["sft", f"model.name={tiny_model}", f"data.path={data}", f"run.dir={run}", "train.max_steps=40",
                  "train.lr=5e-3", "train.warmup_ratio=0", "run.wandb=disabled", "model.quantize=false",
                  "data.eval_fraction=0", "model.max_length=128"]) == 0
    return run / "sft"


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ppo-prompts") / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"Ticket {i}: where is {TOPICS[i % 8]}?"}) for i in range(16)))
    return path


def ppo(run: Path, sft: Path, prompts: Path, *extra: str) -> int:
    return align(["ppo", f"run.dir={run}", f"sft={sft}", f"prompts={prompts}", "scorer=test_ppo:thanks", *FAST,
                  *extra])


def test_ppo_raises_the_reward_with_kl_bounded(sft_dir, prompts, tmp_path, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert ppo(tmp_path, sft_dir, prompts, "train.max_steps=20", "train.lr=5e-4", "rl.rollout_prompts=16",
               "rl.minibatch_size=8", "rl.kl_coef=0.05", "rl.save_steps=0") == 0
    out = tmp_path / "ppo"
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 21))
    for key in ("reward/mean", "kl", "entropy", "length/mean", "policy/clipfrac", "value/loss", "policy/approx_kl",
                "value/explained_variance", "kl_coef", "eos_fraction", "tokens_per_s"):
        assert key in rows[-1], key
    reward = [r["reward/mean"] for r in rows]
    first, last = sum(reward[:3]) / 3, sum(reward[-5:]) / 5
    assert last > first + 0.25, reward  # measured: 0.10 -> 0.76 (steps 1-3 vs 16-20), KL <= 4.3
    assert rows[0]["kl"] == pytest.approx(0, abs=1e-5)  # step 1 samples from the SFT policy = the reference
    assert max(r["kl"] for r in rows) < 15, [r["kl"] for r in rows]
    assert all(0 < r["time/rollout"] and 0 <= r["time/score"] and r["time/rollout"] + r["time/score"] < r["time/step"]
               for r in rows)  # generation, scoring and the update timed apart

    manifest = json.loads((out / "align.json").read_text())
    assert manifest["stage"] == "ppo" and set(manifest["parents"]) == {"sft"}
    assert manifest["base_model"] == tiny_model and manifest["reference"] == "sft adapter (frozen copy)"
    assert manifest["metrics"]["reward_mean"] == reward[-1] and manifest["metrics"]["reward_mean_first"] == reward[0]
    # A plain peft adapter ("default" only), every LoRA matrix moved from its SFT value.
    assert not (out / "ref").exists() and (out / "value_head.safetensors").is_file()
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(out))
    assert list(policy.peft_config) == ["default"]
    before, after = (load_file(str(d / "adapter_model.safetensors")) for d in (sft_dir, out))
    assert before.keys() == after.keys()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, unchanged
    assert (tmp_path / "report.html").is_file()
    figures = glance("ppo", manifest)  # the report's first screen reads the keys this stage writes
    assert figures[0] == f"mean reward {reward[0]:.3f} → {reward[-1]:.3f}" and figures[1].startswith("KL ")
    assert figures[2].startswith(f"{len(rows)} steps")


def test_the_logged_rate_is_the_one_each_step_trained_at(sft_dir, prompts, tmp_path):
    """A linear schedule over 2 steps trains at lr, then lr/2; the next step's rate (0 after the last) is not it."""
    assert ppo(tmp_path, sft_dir, prompts, "train.max_steps=2", "train.lr=1e-3", "train.scheduler=linear",
               "rl.rollout_prompts=4", "rl.minibatch_size=4", "rl.ppo_epochs=1", "rl.save_steps=0",
               "generation.max_new_tokens=8") == 0
    assert [r["lr"] for r in read_jsonl(tmp_path / "ppo" / "metrics.jsonl")] == pytest.approx([1e-3, 5e-4])


def test_ppo_in_fp16_raises_the_reward_and_resumes_at_its_loss_scale(sft_dir, prompts, tmp_path, monkeypatch):
    """model.compute_dtype=float16 (a T4's or V100's choice), run here on the CPU: the stage learns, logs its loss
    scale and keeps it in each checkpoint. A run that fails at step 9 resumes from step 8 at the scale that
    checkpoint holds (set to 1024 there: on this model no gradient overflows, and it stays at 65536)."""
    args = ["scorer=test_ppo:thanks_until", "model.compute_dtype=float16", "train.max_steps=16", "train.lr=5e-4",
            "rl.rollout_prompts=16", "rl.minibatch_size=8", "rl.kl_coef=0.05", "rl.save_steps=8"]
    monkeypatch.setitem(SCORED, "calls", 0)
    monkeypatch.setitem(SCORED, "until", 8 * 16)  # step 9's rewards are not numbers: the run stops there
    assert ppo(tmp_path, sft_dir, prompts, *args) == 1
    checkpoint = tmp_path / "ppo" / "checkpoints" / "step-8" / "state.pt"
    state = torch.load(checkpoint, weights_only=False)
    assert state["scaler"]["scale"] == 65536
    state["scaler"]["scale"] = 1024.0
    torch.save(state, checkpoint)
    monkeypatch.setitem(SCORED, "until", None)
    assert ppo(tmp_path, sft_dir, prompts, *args, "train.resume_from_checkpoint=latest") == 0

    rows = read_jsonl(tmp_path / "ppo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert [r["loss_scale"] for r in rows] == [65536] * 8 + [1024] * 8
    reward = [r["reward/mean"] for r in rows]
    assert sum(reward[-4:]) / 4 > sum(reward[:3]) / 3 + 0.25, reward  # measured: 0.08 -> 0.92 (steps 1-3 vs 13-16)
    assert "float16 compute" in json.loads((tmp_path / "ppo" / "align.json").read_text())["device_plan"]


def test_fp16_gradients_that_always_overflow_stop_the_run(sft_dir, prompts, tmp_path, monkeypatch, capsys):
    """Gradients that are not finite at every minibatch, from a finite loss: each step is skipped and the scale
    halves. Unchecked, the run went on to its end with no step taken and saved the SFT adapter as trained. It
    stops at the end of the first step that leaves the scale under 1 (8 minibatches a step: 65536 / 2**24 after
    step 3)."""
    policy_loss = R.policy_loss

    def poisoned(logprobs, *args):
        loss, stats = policy_loss(logprobs, *args)
        return loss + (logprobs * 0).sum().clamp(min=0).sqrt(), stats  # + 0, whose gradient is not a number

    monkeypatch.setattr(R, "policy_loss", poisoned)
    assert ppo(tmp_path, sft_dir, prompts, "model.compute_dtype=float16", "train.max_steps=6",
               "rl.rollout_prompts=16", "rl.minibatch_size=8", "rl.ppo_epochs=4", "rl.save_steps=0") == 1
    err = capsys.readouterr().err
    assert "step 3: the loss scale fell to 0.00391 (from 65536" in err and "model.compute_dtype=float32" in err, err
    assert not (tmp_path / "ppo" / "align.json").exists()


def test_killed_run_resumes_to_the_same_figures(sft_dir, prompts, tmp_path):
    """6 steps straight vs. SIGKILL after step 5 (checkpoints at 2 and 4) + resume from "latest"."""
    args = ["train.max_steps=6", "train.lr=5e-4", "rl.rollout_prompts=8", "rl.save_steps=2", "model.quantize=true",
            "rl.kl_control=adaptive", "rl.kl_horizon=100", "train.scheduler=linear"]
    assert ppo(tmp_path / "straight", sft_dir, prompts, *args) == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "ALIGN_PPO_KILL_AFTER_STEP": "5", "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{REPO}"}
    cmd = [sys.executable, "-m", "align.cli", "ppo", f"run.dir={killed}", f"sft={sft_dir}", f"prompts={prompts}",
           "scorer=test_ppo:thanks", *FAST, *args]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILL: no clean-up ran
    assert [r["step"] for r in read_jsonl(killed / "ppo" / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (killed / "ppo" / "checkpoints").glob("step-*")) == ["step-2", "step-4"]
    assert not (killed / "ppo" / "align.json").exists()
    # rerun to fewer steps than its newest checkpoint's: refused (it trained nothing and wrote step 4's weights
    # under a manifest saying 3 steps), the checkpoints kept for the resume below
    assert ppo(killed, sft_dir, prompts, *args, "train.max_steps=3", "train.resume_from_checkpoint=latest") == 2
    assert not (killed / "ppo" / "align.json").exists()
    assert sorted(p.name for p in (killed / "ppo" / "checkpoints").glob("step-*")) == ["step-2", "step-4"]

    assert ppo(killed, sft_dir, prompts, *args, "train.resume_from_checkpoint=latest") == 0
    a, b = (read_jsonl(d / "ppo" / "metrics.jsonl") for d in (tmp_path / "straight", killed))
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]  # step 5 of the killed run was dropped and redone
    for ra, rb in zip(a, b, strict=True):
        for key in ("reward/mean", "kl", "kl_coef", "entropy", "value/loss", "policy/loss", "lr", "length/mean"):
            assert rb[key] == pytest.approx(ra[key], abs=1e-5), (ra["step"], key, ra[key], rb[key])
    assert a[-1]["kl_coef"] != 0.05  # the adaptive controller moved, and its state was restored
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        wa, wb = (load_file(str(d / "ppo" / name)) for d in (tmp_path / "straight", killed))
        assert wa.keys() == wb.keys()
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


def test_a_resumed_run_trains_at_this_runs_fixed_kl_coef(sft_dir, prompts, tmp_path):
    """rl.kl_control=fixed: the checkpoint's coefficient overwrote a changed rl.kl_coef while config.yaml and
    align.json recorded the new one. The resumed steps use the config's, as a resumed train.lr does."""
    args = ["rl.rollout_prompts=4", "rl.save_steps=1", "rl.ppo_epochs=1", "generation.max_new_tokens=8"]
    assert ppo(tmp_path, sft_dir, prompts, *args, "train.max_steps=1", "rl.kl_coef=0.05") == 0
    assert ppo(tmp_path, sft_dir, prompts, *args, "train.max_steps=2", "rl.kl_coef=0.2",
               "train.resume_from_checkpoint=latest") == 0
    rows = read_jsonl(tmp_path / "ppo" / "metrics.jsonl")
    assert [(r["step"], r["kl_coef"]) for r in rows] == [(1, 0.05), (2, 0.2)]
    assert load_config(PPOStageConfig, tmp_path / "ppo" / "config.yaml").rl.kl_coef == 0.2


def test_the_adaptive_kl_coef_resumes_where_it_was_and_says_a_changed_start_is_not_used(caplog):
    moved = R.AdaptiveKL(0.05, target=6.0, horizon=100)
    moved.update(12.0, n_steps=10)
    state = moved.state_dict()
    same = R.AdaptiveKL(0.05, 6.0, 100)
    with caplog.at_level("WARNING", logger="align.rl"):
        same.load_state_dict(state)
    assert same.value == moved.value and not caplog.records
    changed = R.AdaptiveKL(0.2, 6.0, 100)
    with caplog.at_level("WARNING", logger="align.rl"):
        changed.load_state_dict(state)
    assert changed.value == moved.value  # the controller's state, not a restart at 0.2
    assert "rl.kl_coef=0.2 is not the 0.05 this run started from" in caplog.text
    fixed = R.FixedKL(0.2)
    fixed.load_state_dict(state)
    assert fixed.value == 0.2
    old = R.AdaptiveKL(0.2, 6.0, 100)
    old.load_state_dict({"value": 0.07})  # a checkpoint from before "initial" was kept: restored, nothing to say
    assert old.value == 0.07


def make_reward_dir(path: Path, accuracy: float | None) -> Path:
    """A reward folder complete enough for the input checks (weights, tokenizer, base), with a given accuracy."""
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "smollm2-135m"}))
    save_file({"score.weight": torch.zeros(1, 4)}, str(path / "adapter_model.safetensors"))
    (path / "tokenizer_config.json").write_text("{}")
    (path / "align.json").write_text(json.dumps({"stage": "reward", "metrics": {} if accuracy is None else
                                                 {"eval_accuracy": accuracy}}))
    return path


@pytest.mark.parametrize("accuracy, said", [(0.52, "has held-out accuracy 0.520, under"),
                                             (None, "has no held-out accuracy in its manifest")])
def test_gate_refuses_a_weak_reward_model(tmp_path, capsys, accuracy, said):
    rm = make_reward_dir(tmp_path / "rm", accuracy)
    assert align(["ppo", f"run.dir={tmp_path}", "sft=none", f"reward_model={rm}", "run.wandb=disabled"]) == 1
    err = capsys.readouterr().err
    assert said in err and "min_reward_accuracy=0.6" in err
    assert "min_reward_accuracy=0" in err and "align reward" in err


def test_gate_refusal_leaves_no_folder_and_says_nothing_of_it(tmp_path, capsys, caplog):
    rm = make_reward_dir(tmp_path / "rm", 0.52)
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.DEBUG):
        assert align(["ppo", f"run.dir={run_dir}", "sft=none", f"reward_model={rm}", "run.wandb=disabled"]) == 1
    said = capsys.readouterr().err + caplog.text
    assert "under" in said and "failed run left it unfinished" not in said
    assert not run_dir.exists()  # neither ppo/ (its lock only) nor the run directory this command made


def test_gate_passes_at_threshold_or_when_overridden(tmp_path):
    from align.reward_model import gate

    assert gate(make_reward_dir(tmp_path / "good", 0.6), 0.6)["eval_accuracy"] == 0.6
    assert gate(make_reward_dir(tmp_path / "bad", 0.3), 0.0)["eval_accuracy"] == 0.3


@pytest.fixture(scope="module")
def reward_dir(sft_dir, tmp_path_factory) -> Path:
    """A reward model trained on the SFT model (its copy of the SFT adapter in sft_adapter/)."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_reward import write_rankings

    tmp = tmp_path_factory.mktemp("ppo-reward")
    data = write_rankings(tmp / "prefs.jsonl", 20)
    assert align(["reward", f"run.dir={tmp}", f"sft={sft_dir}", f"data.path={data}", "model.quantize=false",
                  "train.max_steps=6", "train.lr=3e-3", "train.batch_size=8", "data.test_fraction=0.2",
                  "run.wandb=disabled", "model.max_length=128"]) == 0
    return tmp / "reward"


def test_reward_model_alone_and_on_the_policy_base_agree(sft_dir, reward_dir, prompts, tmp_path):
    """PPO against a trained reward model, loaded alone and as a third adapter on the policy's base."""
    common = [f"run.dir={tmp_path}", f"sft={sft_dir}", f"reward_model={reward_dir}", f"prompts={prompts}",
              "min_reward_accuracy=0", "max_probe_flip_rate=1", "train.max_steps=1", "rl.rollout_prompts=4", *FAST]
    assert align(["ppo", *common]) == 0
    alone = read_jsonl(tmp_path / "ppo" / "metrics.jsonl")[0]
    assert align(["ppo", *common, "rl.reward_on_policy_base=true"]) == 0
    shared = read_jsonl(tmp_path / "ppo" / "metrics.jsonl")[0]
    # The same rollout (seeded by step); the scores differ only by float rounding (merged vs. LoRA delta).
    assert shared["length/mean"] == alone["length/mean"]
    assert shared["reward/mean"] == pytest.approx(alone["reward/mean"], abs=1e-3)
    assert alone["reward/std"] > 0
    manifest = json.loads((tmp_path / "ppo" / "align.json").read_text())
    assert set(manifest["parents"]) == {"sft", "reward_model"}


def sft_copy(sft: Path, folder: Path, scale: float = 1.0, metadata: dict | None = None) -> Path:
    """The SFT adapter's folder again, its lora_B weights times `scale` (1: the same weights, saved anew)."""
    shutil.copytree(sft, folder, ignore=shutil.ignore_patterns("checkpoints"))
    weights = load_file(str(sft / "adapter_model.safetensors"))
    save_file({k: v * scale if "lora_B" in k else v for k, v in weights.items()},
              str(folder / "adapter_model.safetensors"), metadata=metadata)
    return folder


def test_reward_on_the_policy_base_refuses_a_reward_model_of_another_sft(sft_dir, reward_dir, prompts, tmp_path,
                                                                          capsys):
    """On the policy's base the policy's SFT adapter stands for the reward model's own (sft_adapter/): from
    another SFT adapter (one retrained since), it scored with a reward model that was never trained (the
    reviewer's run reversed its ranking), and said nothing. Refused before any model loads."""
    other = sft_copy(sft_dir, tmp_path / "other-sft", scale=-1.0)
    assert align(["ppo", f"run.dir={tmp_path}", f"sft={other}", f"reward_model={reward_dir}", f"prompts={prompts}",
                  "min_reward_accuracy=0", "max_probe_flip_rate=1", "train.max_steps=1", "rl.rollout_prompts=4",
                  "rl.reward_on_policy_base=true", *FAST]) == 2
    err = capsys.readouterr().err
    assert "rl.reward_on_policy_base=true: the reward model at" in err and "another SFT adapter" in err
    assert "rl.reward_on_policy_base=false" in err
    assert not (tmp_path / "ppo").exists()
    # the reward model (trained unquantized) on the policy's 4-bit base: refused as well, naming both settings
    assert align(["ppo", f"run.dir={tmp_path}", f"sft={sft_dir}", f"reward_model={reward_dir}", f"prompts={prompts}",
                  "min_reward_accuracy=0", "max_probe_flip_rate=1", "train.max_steps=1", "rl.rollout_prompts=4",
                  "rl.reward_on_policy_base=true", *FAST, "model.quantize=true"]) == 2
    err = capsys.readouterr().err
    assert "(model.quantize=false, model.compute_dtype=float32), the policy runs on a 4-bit NF4 base" in err
    assert "set model.quantize=false to run the policy as the reward model was trained" in err
    assert not (tmp_path / "ppo").exists()


def test_which_reward_models_the_policy_base_can_stand_for(sft_dir, reward_dir, tmp_path, tiny_model):
    from align.config import ConfigError, ModelConfig
    from align.reward_model import shared_base_problem, shared_base_reward

    as_trained = ModelConfig(quantize=False)  # reward_dir's: an unquantized base, auto compute
    assert shared_base_problem(reward_dir, sft_dir, tiny_model, as_trained) is None
    # the same weights in a file not byte-identical (saved again, other metadata): the same adapter
    again = sft_copy(sft_dir, tmp_path / "again", metadata={"saved": "again"})
    assert (again / "adapter_model.safetensors").read_bytes() != (sft_dir / "adapter_model.safetensors").read_bytes()
    assert shared_base_problem(reward_dir, again, tiny_model, as_trained) is None
    assert "another SFT adapter" in shared_base_problem(reward_dir, sft_copy(sft_dir, tmp_path / "b", 1.01),
                                                        tiny_model, as_trained)
    assert "has no SFT adapter" in shared_base_problem(reward_dir, None, tiny_model, as_trained)
    assert f"the policy's base is {tmp_path}" in shared_base_problem(reward_dir, sft_dir, str(tmp_path), as_trained)
    # On the policy's 4-bit base (or in another compute dtype) a reward model trained unquantized in fp32 scores
    # otherwise (up to 0.37 apart on the same pairs, measured): the settings to change are named.
    problem = shared_base_problem(reward_dir, sft_dir, tiny_model, ModelConfig(quantize=True), "ppo.")
    assert ("was trained on an unquantized base, float32 compute (model.quantize=false, model.compute_dtype=float32), "
            "the policy runs on a 4-bit NF4 base, float32 compute (model.quantize=true, model.compute_dtype=auto)"
            in problem)
    assert "set ppo.model.quantize=false to run the policy as the reward model was trained" in problem
    assert "ppo.rl.reward_on_policy_base=false" in problem
    problem = shared_base_problem(reward_dir, sft_dir, tiny_model, ModelConfig(quantize=False, compute_dtype="bfloat16"))
    assert "set model.compute_dtype=float32 to run" in problem and "model.quantize=" not in problem.split("; set")[1]
    with pytest.raises(ConfigError, match="another SFT adapter"):  # the function itself refuses, model untouched
        shared_base_reward(None, reward_dir, tmp_path / "b", tiny_model, as_trained)


def test_a_reward_model_computes_in_the_dtype_it_was_trained_in(sft_dir, reward_dir, tiny_model, monkeypatch):
    """reward_dir trained on this CPU with model.compute_dtype=auto: in fp32 (its align.json's plan). On a GPU with
    bf16, auto resolved again to bf16: PPO, GRPO, eval's judge and sample's selection scored it in another dtype
    than its gate read (the quickstart's: held-out accuracy 0.70 in bf16, 0.74 as trained), and the policy's base
    on such a GPU (auto too) was taken for the one it trained on. Its dtype is now read from where it trained."""
    from align.config import ModelConfig
    from align.modeling import device_plan, trained_model_settings
    from align.reward_model import shared_base_problem, trained_model_config

    assert "float32 compute" in json.loads((reward_dir / "align.json").read_text())["device_plan"]
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU with bf16 (the plans only, no model)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert device_plan(ModelConfig(quantize=False)).compute_dtype == torch.bfloat16  # the policy's auto here
    assert device_plan(trained_model_config(reward_dir)).compute_dtype == torch.float32  # load_reward_model's plan
    problem = shared_base_problem(reward_dir, sft_dir, tiny_model, ModelConfig(quantize=False), "ppo.")
    assert problem and "float32 compute" in problem and "bfloat16 compute" in problem
    assert "set ppo.model.compute_dtype=float32 to run the policy as the reward model was trained" in problem
    assert shared_base_problem(reward_dir, sft_dir, tiny_model, ModelConfig(quantize=False, compute_dtype="float32")) is None
    # quantize=true where bitsandbytes was missing ran unquantized, as its plan says: loaded so too
    ran = trained_model_settings({"config": {"model": {"quantize": True, "compute_dtype": "auto"}},
                                  "device_plan": "device cpu · unquantized base + LoRA · float32 compute"})
    assert (ran.quantize, ran.compute_dtype) == (False, "float32")


def test_a_qlora_reward_model_is_rebuilt_on_the_4bit_weights_it_trained_on(sft_dir, reward_dir, tiny_model, tmp_path,
                                                                          monkeypatch):
    """model.double_quant=false gives other 4-bit weights (its constants unquantized): load_reward_model built
    the base with the default (true) and shared_base_problem did not compare it, so PPO, eval and sample's
    selection scored with another model than the one the gate measured."""
    import shutil

    from align import reward_model
    from align.config import ModelConfig

    rm = tmp_path / "reward"
    shutil.copytree(reward_dir, rm, ignore=shutil.ignore_patterns("checkpoints"))
    manifest = json.loads((rm / "align.json").read_text())
    manifest["config"]["model"].update(quantize=True, double_quant=False)
    manifest["device_plan"] = "device cpu · 4-bit NF4 base + LoRA · float32 compute"
    (rm / "align.json").write_text(json.dumps(manifest))
    assert reward_model.trained_model_config(rm).double_quant is False
    problem = reward_model.shared_base_problem(rm, sft_dir, tiny_model, ModelConfig(quantize=True), "ppo.")
    assert problem and "set ppo.model.double_quant=false" in problem
    assert reward_model.shared_base_problem(rm, sft_dir, tiny_model, ModelConfig(quantize=True, double_quant=False)) is None
    built = []

    def reward_base(model_cfg, plan, sft=None, *, training=True):
        built.append(model_cfg)
        raise RuntimeError("built")

    monkeypatch.setattr(reward_model, "reward_base", reward_base)
    with pytest.raises(RuntimeError, match="built"):
        reward_model.load_reward_model(rm)
    assert built[0].double_quant is False


def test_a_scorer_reward_that_is_no_number_is_refused_naming_the_scorer_and_the_prompt():
    """PPO's and GRPO's reward from scorer=: one that returns text (or None, a list) ended in float()'s traceback
    ("could not convert string to float") after the rollout; a StageError now says which scorer, what and where."""
    from align import StageError

    reward, figures, rm = R.make_reward(PPOStageConfig(scorer="known_scorers:returns_text"))
    with pytest.raises(StageError, match=r"^scorer 'known_scorers:returns_text' returned str 'good' for rollout prompt 1 "
                                         r"\('How do I sync\?'\): a scorer returns a number \(int or float\)$"):
        reward(["How do I sync?", "Where is export?"], ["Open Settings.", ""])
    reward, _, _ = R.make_reward(PPOStageConfig(scorer="known_scorers:asks_for_password"))  # a bool is a number
    assert reward(["a", "b"], ["Your password, please.", "Open Settings."]) == [1.0, 0.0]


@pytest.mark.parametrize("algo", ["ppo", "grpo", "rloo"])
def test_nan_reward_stops_naming_the_step(algo, sft_dir, prompts, tmp_path, capsys):
    """GRPO and RLOO (TRL's trainers) took a reward that is not a number as PPO's loop does not: inf made the
    advantages NaN (a zero loss, `reward: inf` in the manifest, exit 0), NaN left the completion out of the mean."""
    assert align(["ppo", f"algo={algo}", f"run.dir={tmp_path}", f"sft={sft_dir}", f"prompts={prompts}",
                  "scorer=test_ppo:not_a_number", "train.max_steps=2", "rl.rollout_prompts=4", "rl.num_generations=4",
                  *FAST]) == 1
    err = capsys.readouterr().err
    assert "step 1: the reward is not finite" in err and "Traceback" not in err
    assert not (tmp_path / algo).exists()  # the failed run's folder (no checkpoint yet) is not left behind


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_grpo_and_rloo_raise_the_reward_and_write_an_adapter_peft_loads(algo, sft_dir, prompts, tmp_path, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert ppo(tmp_path, sft_dir, prompts, f"algo={algo}", "train.max_steps=12", "rl.rollout_prompts=8",
               "rl.num_generations=4", "train.lr=5e-4") == 0
    out = tmp_path / algo
    reward = [r["reward"] for r in read_jsonl(out / "metrics.jsonl") if "reward" in r]
    assert len(reward) == 12 and sum(reward[-5:]) / 5 > sum(reward[:3]) / 3 + 0.25, reward  # measured: 0.25 -> 0.9
    manifest = json.loads((out / "align.json").read_text())
    assert manifest["stage"] == algo and manifest["metrics"]["steps"] == 12 and "reward" in manifest["metrics"]
    assert manifest["reference"] == "sft adapter (frozen copy)"
    figures = glance(algo, manifest)  # the report's first screen reads the keys this stage writes
    assert figures[0].startswith("mean reward ") and figures[-1].startswith("12 steps"), figures
    assert not (out / "ref").exists()
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(out))
    assert list(policy.peft_config) == ["default"]
    before, after = (load_file(str(d / "adapter_model.safetensors")) for d in (sft_dir, out))
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_grpo_samples_with_trls_settings_alone_not_the_model_folders(prompts, tmp_path, tiny_model, monkeypatch):
    """generate() fills each setting a call leaves unset from the model folder's generation_config.json; TRL's
    rollouts leave min_p, typical_p, no_repeat_ngram_size ... unset, so a folder that ships one (some do) sampled
    GRPO's completions from another distribution than the softmax its log-probs and ratios are computed from."""
    from transformers import GenerationConfig, GenerationMixin

    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    GenerationConfig(do_sample=True, no_repeat_ngram_size=1, typical_p=0.5, eos_token_id=0).save_pretrained(base)
    seen = []
    generate = GenerationMixin.generate

    def spy(self, *args, **kwargs):
        effective = self._prepare_generation_config(kwargs.get("generation_config"))[0]
        seen.append((effective.no_repeat_ngram_size, effective.typical_p))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    assert align(["ppo", "algo=grpo", f"run.dir={tmp_path / 'run'}", "sft=none", f"model.name={base}",
                  f"prompts={prompts}", "scorer=test_ppo:thanks", *FAST, "train.max_steps=1", "rl.rollout_prompts=4",
                  "rl.num_generations=4", "lora.r=4"]) == 0
    assert seen and set(seen) == {(0, 1.0)}, seen  # generate()'s own neutral values


def test_grpo_on_a_fresh_lora_over_a_4bit_base_trains_fp32_adapters_as_on_a_gpu(prompts, tmp_path, tiny_model,
                                                                             monkeypatch):
    """On CUDA (bf16 compute, none of the CPU tweaks) TRL casts a 4-bit model's adapter to bf16, where AdamW's
    steps at RL learning rates round away; with no SFT there is no "ref" copy to restore it from."""
    from align.recipes import grpo

    as_on_gpu = grpo.device_plan
    monkeypatch.setattr(grpo, "device_plan", lambda cfg: replace(as_on_gpu(cfg), compute_dtype=torch.bfloat16))
    monkeypatch.setattr(grpo, "speed_up_cpu_training", lambda model: None)
    assert align(["ppo", "algo=grpo", f"run.dir={tmp_path}", "sft=none", f"model.name={tiny_model}",
                  f"prompts={prompts}", "scorer=test_ppo:thanks", *FAST, "model.quantize=true", "train.max_steps=1",
                  "rl.rollout_prompts=4", "rl.num_generations=4", "lora.r=4"]) == 0
    saved = load_file(str(tmp_path / "grpo" / "adapter_model.safetensors"))
    assert saved and {t.dtype for t in saved.values()} == {torch.float32}


@pytest.mark.parametrize("free_gib,checkpointing", [(80, "off"), (0, "on")])
def test_grpo_settles_checkpointing_auto_on_cuda_once_the_model_is_loaded(prompts, tmp_path, tiny_model, monkeypatch,
                                                                          free_gib, checkpointing):
    """device_plan turns model.gradient_checkpointing=auto on with CUDA until the stage knows its batch; sft,
    reward and dpo then call fit_checkpointing, GRPO/RLOO never did: they trained with checkpointing on (a third
    more matmul work per step) however much memory was free, and recorded neither the levers nor the peak memory.
    The CUDA plan is driven on this CPU: placement on the CPU, the GPU's free memory given."""
    from align import gpu_training, modeling
    from align.data import load_prompts
    from align.modeling import load_tokenizer
    from align.recipes import grpo

    planned = grpo.device_plan
    monkeypatch.setattr(grpo, "device_plan", lambda cfg: replace(planned(cfg), device="cuda",
                                                                          gradient_checkpointing=True))
    monkeypatch.setattr(modeling, "_local_gpu", lambda: "cpu")
    monkeypatch.setattr(gpu_training, "_local_gpu", lambda: "cpu")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_gib * 2**30, 80 * 2**30))
    fitted = {}

    def fit(plan, setting, model, tokens_per_step, **kwargs):
        fitted["tokens"] = tokens_per_step
        fitted["plan"] = gpu_training.fit_checkpointing(plan, setting, model, tokens_per_step, **kwargs)
        return fitted["plan"]

    monkeypatch.setattr(grpo, "fit_checkpointing", fit)
    seen = {}

    def on_train_begin(self, args, state, control, **kwargs):
        seen["checkpointing"] = args.activation_checkpointing

    monkeypatch.setattr(grpo.MetricsJSONL, "on_train_begin", on_train_begin)
    assert align(["ppo", "algo=grpo", f"run.dir={tmp_path}", "sft=none", f"model.name={tiny_model}",
                  f"prompts={prompts}", "scorer=test_ppo:thanks", *FAST, "train.max_steps=1", "rl.rollout_prompts=4",
                  "rl.num_generations=2", "lora.r=4"]) == 0
    manifest = json.loads((tmp_path / "grpo" / "align.json").read_text())
    assert manifest["device_plan"] == (f"device cuda · unquantized base + LoRA · float32 compute · gradient "
                                       f"checkpointing {checkpointing} · liger off · torch.compile off")
    assert seen["checkpointing"] is (checkpointing == "on")  # what the trainer ran with
    assert "gpu_peak_mib" in manifest  # None here: no CUDA to measure
    tokenizer = load_tokenizer(tiny_model)
    longest = max(len(tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                              add_generation_prompt=True))["input_ids"])
                  for p in load_prompts(str(prompts)))
    assert fitted["tokens"] == 4 * (longest + 16)  # 4 completions a step, each its prompt and 16 new tokens


def test_grpo_without_a_kl_term_starts_from_the_exact_sft_adapter_over_a_4bit_base(sft_dir, prompts, tmp_path,
                                                                                    monkeypatch):
    """rl.kl_coef=0: TRL makes no "ref" copy to restore the bf16-rounded SFT adapter from; it is read from its
    folder instead. One step at a rate too small to move anything leaves the SFT adapter as it was (the rounding
    moved every weight by up to 0.4 %)."""
    from align.recipes import grpo

    as_on_gpu = grpo.device_plan
    monkeypatch.setattr(grpo, "device_plan", lambda cfg: replace(as_on_gpu(cfg), compute_dtype=torch.bfloat16))
    monkeypatch.setattr(grpo, "speed_up_cpu_training", lambda model: None)
    assert ppo(tmp_path, sft_dir, prompts, "algo=grpo", "rl.kl_coef=0", "model.quantize=true", "train.max_steps=1",
               "rl.rollout_prompts=4", "rl.num_generations=4", "train.lr=1e-12") == 0
    # TRL made no reference (beta 0): the manifest names none, not the SFT adapter's copy
    assert json.loads((tmp_path / "grpo" / "align.json").read_text())["reference"] == "none: kl_coef=0"
    before, after = (load_file(str(d / "adapter_model.safetensors")) for d in (sft_dir, tmp_path / "grpo"))
    assert before.keys() == after.keys()
    for key in before:
        assert after[key].dtype == torch.float32
        assert torch.allclose(after[key], before[key].float(), rtol=1e-6, atol=1e-9), key


def test_whitening_keeps_the_penalty_for_a_cut_response(sft_dir, prompts, tmp_path):
    """rl.whiten_rewards with every response cut at max_new_tokens (the quickstart turns both on): the penalty
    was subtracted from every score and whitening's re-centring added it back, so the update was the one
    without it. Now it comes after the whitening, and the run with it trains on other rewards."""
    rows = {}
    for penalty in ("1.0", "null"):
        assert ppo(tmp_path / penalty, sft_dir, prompts, "generation.max_new_tokens=2", "rl.whiten_rewards=true",
                   f"rl.missing_eos_penalty={penalty}", "train.max_steps=1", "rl.rollout_prompts=4",
                   "rl.save_steps=0") == 0
        rows[penalty] = read_jsonl(tmp_path / penalty / "ppo" / "metrics.jsonl")[0]
    assert rows["1.0"]["eos_fraction"] == 0 and rows["1.0"]["reward/mean"] == rows["null"]["reward/mean"]
    assert rows["null"]["reward/score_used"] == pytest.approx(0, abs=1e-6)  # whitened: mean 0
    assert rows["1.0"]["reward/score_used"] == pytest.approx(-1.0, abs=1e-6)
    assert rows["1.0"]["value/loss"] != pytest.approx(rows["null"]["value/loss"], rel=1e-3)


def test_scores_used_whiten_then_penalise_then_clip():
    rl = replace(PPOStageConfig().rl, whiten_rewards=True, missing_eos_penalty=0.5, score_clip=1.2)
    raw, ended = torch.tensor([3.0, 1.0, 1.0, 3.0]), torch.tensor([True, True, False, False])  # the last two cut
    white = (raw - 2) / raw.std()
    expected = (white - 0.5 * (~ended).float()).clamp(-1.2, 1.2)
    assert torch.allclose(R.scores_used(raw, ended, rl), expected, atol=1e-5)
    # the penalty is the same in every rollout, in units of its spread, whatever the reward model's scale
    assert torch.allclose(R.scores_used(raw * 100 + 7, ended, rl), expected, atol=1e-5)
    # one response: nothing to whiten it against, its score is kept
    assert R.scores_used(torch.tensor([3.0]), torch.tensor([True]), rl).tolist() == [pytest.approx(1.2)]
    # without whitening: the raw score less the penalty
    rl = replace(rl, whiten_rewards=False, score_clip=None)
    assert R.scores_used(raw, ended, rl).tolist() == [3.0, 1.0, 0.5, 2.5]


def test_fresh_lora_without_sft_uses_the_base_as_reference(prompts, tmp_path, tiny_model):
    assert align(["ppo", f"run.dir={tmp_path}", "sft=none", f"model.name={tiny_model}", f"prompts={prompts}",
                  "scorer=test_ppo:thanks", "train.max_steps=2", "rl.rollout_prompts=4", "lora.r=4", *FAST]) == 0
    manifest = json.loads((tmp_path / "ppo" / "align.json").read_text())
    assert manifest["reference"] == "base (adapter disabled)" and manifest["parents"] == {}
    assert read_jsonl(tmp_path / "ppo" / "metrics.jsonl")[0]["kl"] == pytest.approx(0, abs=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (["generation.temperature=0"], "generation.temperature: PPO samples"),
    (["rl.minibatch_size=16", "rl.rollout_prompts=8"], "rl.minibatch_size=16 exceeds"),
    (["algo=grpo", "rl.rollout_prompts=6", "rl.num_generations=4"], "must be a multiple of rl.num_generations"),
    (["algo=rloo", "rl.reward_on_policy_base=true"], "rl.reward_on_policy_base is PPO's"),
    (["algo=grpo", "generation.temperature=0"], "generation.temperature: GRPO samples"),
    (["rl.kl_control=pid"], "rl.kl_control: 'pid' is not allowed"),
    (["scorer=no_such_scorer"], "scorer 'no_such_scorer': not a built-in"),
    (["generation.top_p=0.9"], "generation.top_p=0.9: PPO's log-probs, ratios and KL are the full softmax's"),
])
def test_config_errors_name_the_key(overrides, message, tmp_path, capsys):
    assert align(["ppo", f"run.dir={tmp_path}", "run.wandb=disabled", *overrides]) == 2
    assert message in capsys.readouterr().err


def test_quickstart_yaml_loads():
    path = REPO / "configs/quickstart/ppo.yaml"
    assert path.read_text().splitlines()[0] == "# align ppo --config configs/quickstart/ppo.yaml"
    cfg = load_config(PPOStageConfig, path)
    assert cfg.model.quantize and cfg.train.max_steps <= 16 and cfg.rl.rollout_prompts == 8
    # Its adaptive KL controller can move kl_coef within the run, as its comment says: at kl_horizon 10000 it
    # moved by at most 0.2 % over the 12 steps (0.2 * 8 / 10000 a step).
    assert cfg.rl.kl_control == "adaptive"
    for kl, reach in ((0.0, 0.7), (100.0, 1.4)):  # far under / over kl_target: the error clipped at -0.2 / +0.2
        ctl = R.kl_controller(cfg.rl.kl_control, cfg.rl.kl_coef, cfg.rl.kl_target, cfg.rl.kl_horizon)
        for _ in range(cfg.train.max_steps):
            ctl.update(kl, n_steps=cfg.rl.rollout_prompts)  # n: the step's responses, as train_ppo passes it
        assert (ctl.value <= reach * cfg.rl.kl_coef) if kl < cfg.rl.kl_target else (ctl.value >= reach * cfg.rl.kl_coef)


# ---------------------------------------------------------------------------- a step's log-probs


def policy_and_rollout(sft_dir: Path, monkeypatch, temperature: float = 0.5):
    """The PPO policy built from the SFT adapter (its LoRA dropout 0.05) and one rollout of 8 prompts of
    different lengths (left padding) in one generate() batch, at `temperature`. The tiny SFT policy rarely
    samples its EOS, so a newline ends an answer too (a second stop id, as generation.stop_ids gives Llama 3's
    <|eot_id|>): answers of different lengths, padding after their end. Returns (cfg, model, tokenizer, the
    stop ids, the rollout)."""
    from align.modeling import device_plan, load_tokenizer
    from align.recipes import ppo as P

    tokenizer = load_tokenizer(str(sft_dir))
    stops = sorted({tokenizer.eos_token_id, *tokenizer("\n", add_special_tokens=False)["input_ids"]})
    monkeypatch.setattr(P, "stop_ids", lambda *_: stops)

    cfg = PPOStageConfig(sft=str(sft_dir), scorer="test_ppo:thanks")
    cfg = replace(cfg, model=replace(cfg.model, name=json.loads((sft_dir / "adapter_config.json").read_text())[
                      "base_model_name_or_path"], quantize=False),
                  generation=replace(cfg.generation, temperature=temperature, max_new_tokens=24, batch_size=8),
                  rl=replace(cfg.rl, rollout_prompts=8, minibatch_size=4, ppo_epochs=2))
    model = P.build_policy(cfg, replace(device_plan(cfg.model), gradient_checkpointing=False), sft_dir)
    asked = [f"Ticket {i}: where is {TOPICS[i % 8]}?" + " Please help." * (i % 3) for i in range(8)]
    return cfg, model, tokenizer, stops, P.rollout(model, tokenizer, asked, cfg, step=1)


def test_rollout_log_probs_are_the_sampling_distributions(sft_dir, monkeypatch):
    """The log-probs PPO trains on (forward: logits / temperature, the response's first token read at the prompt's
    last position, prompts left padded) are those generate() sampled each token from: its processed
    scores, log-softmaxed, at the same sampled tokens. Training on logits without / T, or one position off,
    optimises a distribution the rollouts never came from."""
    from align.generation import plain_sampling
    from align.recipes import ppo as P

    cfg, model, tokenizer, stops, roll = policy_and_rollout(sft_dir, monkeypatch)
    mask, context = roll["mask"], roll["context"]
    assert roll["has_eos"].any() and (mask == 0).any()  # answers that ended: EOS kept, padding after it
    assert (roll["attention"][:, :context] == 0).any()  # and prompts left padded
    with torch.no_grad():
        logp, _, _ = P.forward(model, P.ValueHead(model.config.hidden_size), roll["ids"], roll["attention"], context,
                               cfg.generation.temperature, values=False)
        torch.manual_seed(cfg.train.seed * 1_000_003 + 101)  # rollout's seed for step 1's first batch
        with plain_sampling(model):
            out = model.generate(input_ids=roll["ids"][:, :context], attention_mask=roll["attention"][:, :context],
                                 max_new_tokens=24, do_sample=True, temperature=cfg.generation.temperature, top_p=1.0,
                                 top_k=None, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=stops, output_scores=True, return_dict_in_generate=True)
    sampled = out.sequences[:, context:]
    width = sampled.shape[1]
    assert torch.equal(sampled * mask[:, :width].long(), roll["ids"][:, context:context + width] * mask[:, :width].long())
    sampled_from = torch.stack(out.scores, 1).float().log_softmax(-1).gather(-1, sampled[..., None]).squeeze(-1)
    gap = ((sampled_from - logp[:, :width]) * mask[:, :width]).abs().max().item()
    assert gap < 1e-4, gap


def test_log_probs_are_the_responses_under_a_model_that_ignores_logits_to_keep(sft_dir, monkeypatch):
    """forward() asks for the response's logits only (logits_to_keep); a model that returns every position
    anyway must give the same log-probs, not the prompt's."""
    from align.recipes import ppo as P

    cfg, model, _, _, roll = policy_and_rollout(sft_dir, monkeypatch)
    head = P.ValueHead(model.config.hidden_size)
    args = (roll["ids"], roll["attention"], roll["context"], cfg.generation.temperature)
    with torch.no_grad():
        logp, values, _ = P.forward(model, head, *args)
        call = model.forward
        monkeypatch.setattr(model, "forward", lambda *a, logits_to_keep=0, **k: call(*a, **k))
        every, every_values, _ = P.forward(model, head, *args)
    assert torch.allclose(every, logp, atol=1e-5) and torch.equal(every_values, values)


def test_the_first_minibatch_of_a_step_is_on_policy(sft_dir, monkeypatch):
    """On a step's first minibatch nothing has been updated yet: the ratio is exactly 1 (approx-KL 0, nothing
    clipped), which needs the old log-probs from the same function as the loss's (dropout off, the policy adapter,
    the same precision and temperature). The step's KL is 0 too: the reference is the SFT adapter the policy
    starts from. Later minibatches see the updated policy."""
    from align.recipes import ppo as P

    cfg, model, _, _, roll = policy_and_rollout(sft_dir, monkeypatch)
    seen = []
    policy_loss = R.policy_loss

    def spy(logprobs, old_logprobs, advantages, mask, clip_range):
        loss, stats = policy_loss(logprobs, old_logprobs, advantages, mask, clip_range)
        seen.append(((logprobs - old_logprobs).mul(mask).abs().max().item(), stats))
        return loss, stats

    monkeypatch.setattr(R, "policy_loss", spy)
    head = P.ValueHead(model.config.hidden_size)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    figures = P.ppo_step(model, head, optimizer, roll, scores, cfg, R.FixedKL(0.05), 1, has_ref=True)
    gap, first = seen[0]
    assert gap < 1e-6 and first["policy/approx_kl"] == pytest.approx(0, abs=1e-9) and first["policy/clipfrac"] == 0
    assert figures["kl"] == pytest.approx(0, abs=1e-6)
    assert len(seen) == 4 and all(g > 1e-4 for g, _ in seen[1:])  # 2 epochs of 2 minibatches: the update moved it


def test_an_fp16_policys_gradients_are_scaled_back_to_an_fp32_ones(sft_dir, monkeypatch):
    """model.compute_dtype=float16 (GPUs without bf16): the activations are fp16, and a token's share of a large
    minibatch's loss flows back through them under fp16's range. The loss is scaled for the backward pass
    (loss_scaler): the gradients reaching the optimizer are then an fp32 model's. Each token's share is made
    1e-5 of this small minibatch's (as in a real model's minibatch of many tokens); unscaled, the gradients'
    cosine to the fp32 ones was 0.13 (28 % of the entries zero), scaled 0.99999."""
    from align.modeling import device_plan
    from align.recipes import ppo as P

    cfg, _, _, _, roll = policy_and_rollout(sft_dir, monkeypatch)
    cfg = replace(cfg, rl=replace(cfg.rl, minibatch_size=8, ppo_epochs=1))
    for name in ("policy_loss", "value_loss"):
        loss = getattr(R, name)
        monkeypatch.setattr(R, name, lambda *a, loss=loss: (lambda value, stats: (value * 1e-5, stats))(*loss(*a)))

    def first_step_gradients(dtype: str, scaled: bool) -> torch.Tensor:
        run = replace(cfg, model=replace(cfg.model, compute_dtype=dtype))
        plan = replace(device_plan(run.model), gradient_checkpointing=False)
        model = P.build_policy(run, plan, sft_dir)
        torch.manual_seed(1)
        head = P.ValueHead(model.config.hidden_size)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params + list(head.parameters()), lr=0.0)
        seen, step = [], optimizer.step
        monkeypatch.setattr(optimizer, "step", lambda *a, **k: (
            seen.append(torch.cat([p.grad.flatten() for p in params]).double()), step(*a, **k))[1])
        scaler = P.loss_scaler(plan, torch.device("cpu")) if scaled else None
        assert scaler is None or scaler.is_enabled()
        P.ppo_step(model, head, optimizer, roll, torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 0]), run, R.FixedKL(0.05), 1,
                   has_ref=True, scaler=scaler)
        return seen[0]

    fp32 = first_step_gradients("float32", scaled=False)
    assert not P.loss_scaler(device_plan(replace(cfg.model, compute_dtype="float32")), torch.device("cpu")).is_enabled()
    fp16 = {scaled: first_step_gradients("float16", scaled) for scaled in (False, True)}
    cosine = {scaled: torch.nn.functional.cosine_similarity(g, fp32, dim=0).item() for scaled, g in fp16.items()}
    assert cosine[True] > 0.9999 and cosine[False] < 0.5, cosine
    assert fp16[True].norm() / fp32.norm() == pytest.approx(1, abs=1e-3)  # unscaled before the step, once


def test_a_step_whose_every_fp16_update_overflowed_leaves_the_schedule_where_it_was(sft_dir, monkeypatch):
    """fp16's loss scaling skips an update whose gradients overflowed. A PPO step that took none (a first step
    at 65536 on a model whose gradients overflow there) made torch warn that the scheduler stepped before the
    optimizer, and moved the warmup without an update; the schedule now moves with the updates taken, as
    accelerate's does for the Trainer's stages."""
    import warnings

    from align.modeling import device_plan
    from align.recipes import ppo as P

    cfg, _, _, _, roll = policy_and_rollout(sft_dir, monkeypatch)
    cfg = replace(cfg, rl=replace(cfg.rl, minibatch_size=4, ppo_epochs=1))
    plan = replace(device_plan(cfg.model), gradient_checkpointing=False)

    def steps_taken(scaler) -> float:
        model = P.build_policy(cfg, plan, sft_dir)
        head = P.ValueHead(model.config.hidden_size)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad] + list(head.parameters()))
        stats = P.ppo_step(model, head, optimizer, roll, torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 0]), cfg,
                           R.FixedKL(0.05), 1, has_ref=True, scaler=scaler)
        return stats["optimizer_steps"], optimizer

    assert steps_taken(None)[0] == 2  # 8 responses in minibatches of 4, one epoch
    assert steps_taken(torch.amp.GradScaler("cpu"))[0] == 2
    for name in ("policy_loss", "value_loss"):  # losses whose gradients overflow at the scaler's 65536
        loss = getattr(R, name)
        monkeypatch.setattr(R, name, lambda *a, loss=loss: (lambda value, stats: (value * 1e36, stats))(*loss(*a)))
    overflowing = torch.amp.GradScaler("cpu")
    taken, optimizer = steps_taken(overflowing)
    assert taken == 0 and overflowing.get_scale() == 65536 / 4  # both updates skipped, the scale halved twice
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (step + 1) / 10)  # a warmup
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "lr_scheduler.step() before optimizer.step()"
        P.advance_schedule(scheduler, taken)
    assert scheduler.last_epoch == 0
    optimizer.step()  # a later step's update (no gradients: it changes nothing)
    P.advance_schedule(scheduler, 1.0)
    assert scheduler.last_epoch == 1


# ---------------------------------------------------------------------------- the RL pieces by hand


def test_gae_matches_a_hand_computation():
    values = torch.tensor([[0.5, 0.2, 0.1, 9.0]])
    rewards = torch.tensor([[0.0, 0.0, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last position is padding: it must not leak in
    adv, ret = R.gae(values, rewards, mask, gamma=0.9, lam=0.5)
    d2 = 1.0 - 0.1  # delta_t = r_t + gamma V_{t+1} - V_t, V after the end = 0
    d1 = 0.0 + 0.9 * 0.1 - 0.2
    d0 = 0.0 + 0.9 * 0.2 - 0.5
    a2, a1 = d2, d1 + 0.45 * d2
    a0 = d0 + 0.45 * a1
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[a0 + 0.5, a1 + 0.2, a2 + 0.1, 0.0]]), atol=1e-6)


def test_shaped_rewards_penalise_each_real_token_and_score_the_last():
    """-kl_coef * (log pi - log ref) on every response token up to its end, nothing on padding, and the score
    on the last real token (the EOS, or the last one of a cut response), never on a pad after it."""
    logp = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -9.0], [-2.0, -1.0, -0.5, -1.5]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])  # row 0 ends at position 2, row 1 was cut
    rewards, kl = R.shape_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0, 0.0], [1.0, 0.0, -0.5, 0.5]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1, 2.0, 0.0], [-0.1, 0.0, 0.05, -0.05 - 1.0]]))


def test_whitening_and_masked_stats_ignore_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert R.masked_mean(x, mask).item() == pytest.approx(2.0)
    w = R.masked_whiten(x, mask)
    assert w[0, 3] == 0 and R.masked_mean(w, mask).item() == pytest.approx(0, abs=1e-6)
    assert w[mask.bool()].var().item() == pytest.approx(1, abs=1e-4)  # unbiased, as masked_whiten's
    figures = R.rollout_figures(x, x, x, torch.tensor([2.0]), 0.1, mask)  # values = returns: a perfect critic
    assert figures["value/explained_variance"] == pytest.approx(1.0) and figures["entropy"] == pytest.approx(2.0)
    assert math.isnan(R.rollout_figures(x, x, torch.ones_like(x), x[:, 0], 0.1, mask)["value/explained_variance"])


def over_two_processes(work):
    """[work(0, total), work(1, total)] as two processes run it: two threads whose `total` sums a tensor over
    both (Ranks.total's all-reduce, by hand)."""
    import threading

    slots, barrier, out = [None, None], threading.Barrier(2), [None, None]

    def process(rank: int) -> None:
        def total(t: torch.Tensor) -> torch.Tensor:
            slots[rank] = t
            barrier.wait()
            summed = slots[0] + slots[1]
            barrier.wait()
            return summed

        out[rank] = work(rank, total)

    threads = [threading.Thread(target=process, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_advantages_are_whitened_over_the_whole_rollout_under_several_processes():
    """Each process holds a share of the rollout; whitened with its own share's mean, a share of good answers
    pushed its worse ones down. With the statistics summed over processes (Ranks.total, here two threads and an
    all-reduce by hand) each process gets exactly its rows of the one-process result."""
    torch.manual_seed(0)
    x = torch.randn(8, 5) + torch.arange(8.0)[:, None]  # rows 0-3 low, 4-7 high: shares split bad from good
    mask = (torch.rand(8, 5) > 0.3).float()
    whole = R.masked_whiten(x, mask)
    shares = [slice(0, 4), slice(4, 8)]
    out = over_two_processes(lambda rank, total: R.masked_whiten(x[shares[rank]], mask[shares[rank]], total=total))
    assert torch.allclose(torch.cat(out), whole, atol=1e-5)
    alone = R.masked_whiten(x[shares[1]], mask[shares[1]])  # the share by itself: its worst rows go negative
    assert (R.masked_mean(alone[:1], mask[4:5]) < 0) and (R.masked_mean(whole[4:5], mask[4:5]) > 0)


def test_response_mask_keeps_the_first_eos_and_nothing_after():
    mask, has_eos = R.response_mask(torch.tensor([[5, 6, 2, 2, 2], [5, 6, 7, 8, 9]]), 2)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]] and has_eos.tolist() == [True, False]
    # every id that ends an answer (generation.stop_ids): the first of any of them ends it
    mask, has_eos = R.response_mask(torch.tensor([[5, 9, 6, 2, 2], [5, 6, 7, 8, 4]]), [2, 9])
    assert mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]] and has_eos.tolist() == [True, False]


def test_adaptive_kl_controller_follows_ziegler():
    ctl = R.AdaptiveKL(0.1, target=6.0, horizon=100)
    ctl.update(12.0, n_steps=10)  # error clipped to +0.2: 0.1 * (1 + 0.2 * 10 / 100)
    assert ctl.value == pytest.approx(0.1 * 1.02)
    ctl.update(3.0, n_steps=10)  # error -0.2 (clipped from -0.5)
    assert ctl.value == pytest.approx(0.1 * 1.02 * 0.98)
    restored = R.AdaptiveKL(0.5, 6.0, 100)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


def test_a_steps_figures_are_the_whole_rollouts_under_several_processes():
    """Entropy, value/mean and explained variance over the whole step's tokens, as one process computes them, when
    two processes hold shares of uneven token counts: each process's figures averaged gave a mean of ratios (the
    critic's explained variance per share) and token means weighted per process, not per token."""
    torch.manual_seed(3)
    rows, width = 8, 12
    lengths = torch.tensor([12, 11, 12, 10, 2, 1, 3, 2])  # share 0 long responses, share 1 short ones
    mask = (torch.arange(width)[None, :] < lengths[:, None]).float()
    entropy = torch.rand(rows, width) + 3.0 * (torch.arange(rows)[:, None] >= 4)  # the short ones: high entropy
    short = (torch.arange(rows)[:, None] >= 4).float()
    returns = torch.randn(rows, width) * (1 - 0.7 * short) + 2.0 * torch.arange(rows)[:, None] / rows
    values = returns + 0.5 * torch.randn(rows, width) + short  # off on share 1, whose returns spread less
    seq_kl = torch.rand(rows) * 4
    whole = R.rollout_figures(entropy, values, returns, seq_kl, 0.1, mask)
    real = mask.bool()
    r, v = returns[real], values[real]
    assert whole == pytest.approx({
        "kl": seq_kl.mean().item(), "reward/non_score": -0.1 * seq_kl.mean().item(),
        "entropy": entropy[real].mean().item(), "value/mean": v.mean().item(),
        "value/explained_variance": (1 - (r - v).var(unbiased=False) / r.var(unbiased=False)).item()}, abs=1e-5)

    shares = [slice(0, 4), slice(4, 8)]
    out = over_two_processes(lambda rank, total: R.rollout_figures(
        entropy[shares[rank]], values[shares[rank]], returns[shares[rank]], seq_kl[shares[rank]], 0.1,
        mask[shares[rank]], total=total))
    assert out[0] == out[1] and out[0] == pytest.approx(whole, abs=1e-5)
    # each process's own figures, averaged (as before): off on these shares
    alone = [R.rollout_figures(entropy[s], values[s], returns[s], seq_kl[s], 0.1, mask[s]) for s in shares]
    for key in ("entropy", "value/mean", "value/explained_variance"):
        assert abs((alone[0][key] + alone[1][key]) / 2 - whole[key]) > 0.1, key


def test_clipped_losses():
    """PPO's policy and value losses take the max of the clipped and unclipped terms: each side wins somewhere."""
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 (clipped at 1.2) and 0.5 (clipped at 0.8)
    loss, stats = R.policy_loss(new, old, adv, mask, clip_range=0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2) and stats["policy/clipfrac"] == 1.0
    vloss, vstats = R.value_loss(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[1.0]]),
                                 torch.ones(1, 1), clip_range=0.2)
    assert vloss.item() == pytest.approx(0.5 * 0.8 ** 2) and vstats["value/clipfrac"] == 1.0
    # And where the unclipped term is the larger one it must win (the max is pessimistic both ways):
    # advantage +1 at ratio 0.5 gives -0.5 (not the clipped -0.8), advantage -1 at ratio 1.5 gives 1.5 (not 1.2).
    loss, stats = R.policy_loss(torch.log(torch.tensor([[0.5, 1.5]])), old, adv, mask, clip_range=0.2)
    assert loss.item() == pytest.approx((-0.5 + 1.5) / 2) and stats["policy/clipfrac"] == 0.0
    # value 1, old value 0, return -1: unclipped error (1 - -1)^2 = 4 beats the clipped (0.2 - -1)^2 = 1.44.
    vloss, vstats = R.value_loss(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[-1.0]]),
                                 torch.ones(1, 1), clip_range=0.2)
    assert vloss.item() == pytest.approx(0.5 * 4.0) and vstats["value/clipfrac"] == 0.0


def test_resume_trains_at_this_runs_rate_not_the_checkpoints():
    """The instability guard says: resume with a lower train.lr. The optimizer's state dict carries the old
    rate (and the schedule's base rates): restored as is, the new one would be ignored."""
    from transformers import get_scheduler

    def build(lr):
        weight = torch.nn.Parameter(torch.ones(3))
        optimizer = torch.optim.AdamW([weight], lr=lr, weight_decay=0.0)
        return weight, optimizer, get_scheduler("cosine", optimizer, 0, 10)

    weight, optimizer, scheduler = build(1e-3)
    for _ in range(4):
        weight.sum().backward()
        optimizer.step(), scheduler.step(), optimizer.zero_grad()
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    _, optimizer, scheduler = build(1e-4)
    R.restore_optimizer(optimizer, scheduler, state, lr=1e-4, weight_decay=0.01)
    factor = scheduler.lr_lambdas[0](4)  # the cosine's position after 4 of 10 steps is kept
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * factor) and scheduler.last_epoch == 4
    assert scheduler.get_last_lr() == [optimizer.param_groups[0]["lr"]]  # what the resumed step logs as its lr
    assert optimizer.param_groups[0]["weight_decay"] == 0.01 and optimizer.state_dict()["state"]  # moments kept
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * scheduler.lr_lambdas[0](5))


def test_an_fp16_runs_loss_scale_resumes_where_it_was():
    """An fp16 run's loss scale halves at each overflow from 65536: restarted there, a resumed run would skip
    those steps again. save_checkpoint keeps it in state.pt; restore_optimizer puts it back."""
    from transformers import get_scheduler

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=1e-3)
    scheduler = get_scheduler("constant", optimizer, 0, 10)
    scaler = torch.amp.GradScaler("cpu")
    for grad in (float("inf"), float("inf"), 1.0):  # two overflows: two steps skipped, the scale quartered
        scaler.scale(weight.sum()).backward()
        weight.grad.fill_(grad)
        scaler.step(optimizer)
        scaler.update()
    assert scaler.get_scale() == 65536 / 4 and optimizer.state_dict()["state"]
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()}
    resumed = torch.amp.GradScaler("cpu")
    R.restore_optimizer(optimizer, scheduler, state, lr=1e-3, scaler=resumed)
    assert resumed.get_scale() == 65536 / 4


def test_plain_sampling_ignores_the_model_folders_decoding_settings(tiny_model):
    """A folder's generation_config.json may switch on processors (a repetition penalty); PPO's log-probs
    and eval's KL are the plain softmax's, so inside plain_sampling the sampled-from scores are the logits."""
    from transformers import AutoModelForCausalLM

    from align.generation import plain_sampling

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    model.generation_config.repetition_penalty = 1.5
    ids = torch.tensor([[1, 5, 9, 5, 9, 5]])

    def scores_and_logits():
        torch.manual_seed(0)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=True,
                             temperature=1.0, top_p=1.0, top_k=None, output_scores=True, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
        return torch.stack(out.scores), torch.stack(out.logits)

    scores, logits = scores_and_logits()
    assert not torch.allclose(scores, logits)  # the shipped penalty at work
    with plain_sampling(model):
        scores, logits = scores_and_logits()
    assert torch.equal(scores, logits) and model.generation_config.repetition_penalty == 1.5  # put back
