"""Every stage on a CUDA GPU, on the tiny model: skipped without CUDA (`pytest -m gpu` on a GPU machine).

scripts/gpu_check.sh runs these. Each training stage runs through `align.cli.main` in this
process, and asserts: the model it trained and its adapters were on the GPU (seen by the trainer's
callback at the start of training), the loss fell, and the manifest's peak GPU memory is sane for a
tiny model. Then sample, eval (whose KL pass once failed on a GPU) and PPO with a reward model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from align.cli import main as align
from align.tracking import read_jsonl

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

COMMON = ["run.wandb=disabled", "train.logging_steps=1", "train.warmup_ratio=0"]
TOPICS = ["Sync", "Export", "Backup", "Theme", "Share", "Tags", "Password", "Search"]


@pytest.fixture
def seen_by_trainer(monkeypatch) -> dict:
    """What the trainer holds when training starts: devices of every parameter, and of the trainable ones."""
    from align import training

    seen: dict = {}
    original = training.MetricsJSONL.on_train_begin

    def on_train_begin(self, args, state, control, **kwargs):
        model = kwargs["model"]
        seen["devices"] = {p.device.type for p in model.parameters()}
        seen["trainable"] = {(p.device.type, p.dtype) for p in model.parameters() if p.requires_grad}
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(training.MetricsJSONL, "on_train_begin", on_train_begin)
    return seen


def losses(folder: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(folder / "metrics.jsonl") if "loss" in r]


def check_stage(folder: Path, seen: dict, stage: str) -> dict:
    manifest = json.loads((folder / "align.json").read_text())
    assert manifest["device_plan"].startswith("device cuda"), manifest["device_plan"]
    assert seen["devices"] == {"cuda"} and seen["trainable"] and {d for d, _ in seen["trainable"]} == {"cuda"}, seen
    assert 1 < manifest["gpu_peak_mib"] < 4000, manifest["gpu_peak_mib"]  # a tiny model: MiB, not GiB
    seen_losses = losses(folder)
    assert seen_losses[-1] < seen_losses[0], (stage, seen_losses)
    return manifest


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gpu")


@pytest.fixture(scope="module")
def pairs(root) -> Path:
    path = root / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({
        "prompt": f"Ticket {i}: where is {TOPICS[i % 8]}?",
        "chosen": f"Thanks for asking! Open Settings and tap {TOPICS[i % 8]}.", "rejected": "No idea."})
        for i in range(40)) + "\n")
    return path


@pytest.fixture(scope="module")
def sft_run(tiny_model, root) -> Path:
    data = root / "sft.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Ticket {i}: where is {TOPICS[i % 8]}?", "input": "",
                                          "output": f"Thanks for asking! Open Settings and tap {TOPICS[i % 8]}."})
                              for i in range(40)) + "\n")
    assert align(["sft", f"model.name={tiny_model}", f"data.path={data}", f"run.dir={root}", "train.max_steps=20",
                  "train.lr=5e-3", "train.batch_size=8", "data.eval_fraction=0", "model.max_length=96",
                  *COMMON]) == 0
    return root / "sft"


@pytest.mark.parametrize("quantize", ["true", "false"])
def test_sft_on_the_gpu(tiny_model, root, quantize, seen_by_trainer, sft_data):
    run = root / f"sft-{quantize}"
    assert align(["sft", f"model.name={tiny_model}", f"data.path={sft_data}", f"run.dir={run}", "train.max_steps=12",
                  "train.lr=5e-3", "train.batch_size=8", "data.eval_fraction=0", "model.max_length=96",
                  f"model.quantize={quantize}", *COMMON]) == 0
    manifest = check_stage(run / "sft", seen_by_trainer, "sft")
    plan = manifest["device_plan"]
    assert ("4-bit NF4" in plan) == (quantize == "true") and "bfloat16 compute" in plan
    # A tiny model's activations fit: auto turns checkpointing off.
    assert "gradient checkpointing off" in plan


def test_sft_padding_free_and_liger_on_the_gpu(tiny_model, root, seen_by_trainer, sft_data):
    from align.gpu_training import use_liger

    liger = "true" if use_liger("auto") else "false"  # not where ALIGN_LIGER=off says it does not run
    run = root / "sft-levers"
    assert align(["sft", f"model.name={tiny_model}", f"data.path={sft_data}", f"run.dir={run}", "train.max_steps=12",
                  "train.lr=5e-3", "train.batch_size=8", "data.eval_fraction=0", "model.max_length=96",
                  "data.padding_free=on", f"train.liger={liger}", "model.gradient_checkpointing=on", *COMMON]) == 0
    plan = check_stage(run / "sft", seen_by_trainer, "sft")["device_plan"]
    assert "padding-free on" in plan and f"liger {'on' if liger == 'true' else 'off'}" in plan
    assert "gradient checkpointing on" in plan


@pytest.mark.parametrize("quantize", ["true", "false"])
def test_reward_on_the_gpu(sft_run, pairs, root, quantize, seen_by_trainer):
    run = root / f"reward-{quantize}"
    assert align(["reward", f"run.dir={run}", f"sft={sft_run}", f"data.path={pairs}", "data.test_fraction=0.2",
                  "train.max_steps=12", "train.lr=2e-3", "train.batch_size=8", "model.max_length=96",
                  f"model.quantize={quantize}", *COMMON]) == 0
    manifest = check_stage(run / "reward", seen_by_trainer, "reward")
    assert manifest["metrics"]["eval_accuracy"] >= 0.75  # "Thanks ..." over "No idea.": an easy preference


def test_dpo_on_the_gpu(sft_run, pairs, root, seen_by_trainer):
    run = root / "dpo-run"
    assert align(["dpo", f"run.dir={run}", f"sft={sft_run}", f"data.path={pairs}", "data.test_fraction=0.2",
                  "train.max_steps=12", "train.lr=1e-3", "train.batch_size=8", "model.max_length=96",
                  *COMMON]) == 0
    check_stage(run / "dpo", seen_by_trainer, "dpo")


def test_sample_eval_and_ppo_with_a_reward_model_on_the_gpu(sft_run, pairs, root, caplog):
    """The stages with their own loops: sample and eval generate on the GPU, eval's KL pass and judges run
    there, PPO's policy, value head and reward model are on the GPU and the reward rises (steps 1-3 vs 16-20)."""
    import logging

    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"Ticket {i}: where is {TOPICS[i % 8]}?"})
                                 for i in range(16)) + "\n")
    run = root / "loop"
    assert align(["reward", f"run.dir={run}", f"sft={sft_run}", f"data.path={pairs}", "data.test_fraction=0.2",
                  "train.max_steps=12", "train.lr=2e-3", "train.batch_size=8", "model.max_length=96", *COMMON]) == 0
    assert align(["sample", f"run.dir={run}", f"policy={sft_run}", f"prompts={prompts}", "num_prompts=4", "k=2",
                  "generation.max_new_tokens=12", "run.wandb=disabled"]) == 0
    with caplog.at_level(logging.INFO, logger="align.rl"):  # where the reward model says its device
        assert align(["ppo", f"run.dir={run}", f"sft={sft_run}", f"prompts={prompts}", "min_reward_accuracy=0",
                      "max_probe_flip_rate=1",  # a tiny reward model's probes: not what this test is about
                      "train.max_steps=20", "train.lr=5e-4", "rl.rollout_prompts=16", "rl.minibatch_size=8",
                      "generation.max_new_tokens=12", "generation.temperature=0.7", "rl.save_steps=0",
                      "run.wandb=disabled"]) == 0
    assert any("reward model" in r.getMessage() and "on cuda" in r.getMessage() for r in caplog.records)
    ppo = json.loads((run / "ppo" / "align.json").read_text())
    assert ppo["device_plan"].startswith("device cuda") and 1 < ppo["gpu_peak_mib"] < 4000
    assert ppo["reward"]["device"] == "cuda:0"
    rows = read_jsonl(run / "ppo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 21)) and all(r["kl"] < 15 for r in rows)
    # The reward rises, as in tests/test_ppo.py's CPU run. 6 steps of 8 prompts could not show it: on CPU they went
    # -0.14, -1.12, -0.70, -0.19, -0.48, -1.03. These settings on CPU, steps 1-3 vs 16-20: -0.88 -> 0.52; rises of
    # 1.51, 1.32, 0.91 with train.seed 0, 1, 2, against 0.25, -0.01, 0.07 at train.lr=1e-12 (sampling noise alone).
    # Not yet run on a GPU when written (the machine had none).
    reward = [r["reward/mean"] for r in rows]
    assert sum(reward[-5:]) / 5 > sum(reward[:3]) / 3 + 0.5, reward
    assert align(["eval", f"run.dir={run}", f"policies={{sft: {sft_run}, ppo: {run / 'ppo'}}}", f"prompts={prompts}",
                  "num_prompts=8", "generation.max_new_tokens=12", "bootstrap=50", "scorer=known_scorers:says_thanks",
                  "run.wandb=disabled"]) == 0
    row = json.loads((run / "eval" / "align.json").read_text())["policies"]["ppo"]
    assert row["kl"] >= 0 and "reward_model/win_rate" in row


def test_ppo_in_fp16_on_the_gpu(tiny_model, root):
    """model.compute_dtype=float16 (a T4's or V100's choice; the H200 runs it too) on a 4-bit base: the loss is
    scaled on the GPU (torch.amp.GradScaler("cuda")), the scale is logged, and the reward rises. The SFT policy
    thanks the user in half its answers (tests/test_ppo.py's). On CPU these settings went 0.10 -> 0.70 (steps 1-3
    vs 13-16); not yet run on a GPU when written (the machine had none)."""
    data, prompts = root / "sft-half-thanks.jsonl", root / "prompts-fp16.jsonl"
    data.write_text("\n".join(json.dumps({
        "instruction": f"Ticket {i}: where is {TOPICS[i % 8]}?", "input": "",
        "output": ("Thanks for asking! " if (i // 8) % 2 else "") + f"Open Settings and tap {TOPICS[i % 8]}."})
        for i in range(32)) + "\n")
    prompts.write_text("\n".join(json.dumps({"prompt": f"Ticket {i}: where is {TOPICS[i % 8]}?"})
                                 for i in range(16)) + "\n")
    run = root / "ppo-fp16"
    assert align(["sft", f"model.name={tiny_model}", f"data.path={data}", f"run.dir={run}", "train.max_steps=40",
                  "train.lr=5e-3", "train.warmup_ratio=0", "run.wandb=disabled", "model.quantize=false",
                  "data.eval_fraction=0", "model.max_length=128"]) == 0
    assert align(["ppo", f"run.dir={run}", f"sft={run / 'sft'}", f"prompts={prompts}", "scorer=polite",
                  "model.compute_dtype=float16", "train.max_steps=16", "train.lr=5e-4", "rl.rollout_prompts=16",
                  "rl.minibatch_size=8", "rl.kl_coef=0.05", "generation.max_new_tokens=16",
                  "generation.temperature=0.5", "rl.save_steps=0", "run.wandb=disabled"]) == 0
    ppo = json.loads((run / "ppo" / "align.json").read_text())
    assert ppo["device_plan"].startswith("device cuda") and "4-bit NF4" in ppo["device_plan"]
    assert "float16 compute" in ppo["device_plan"]
    rows = read_jsonl(run / "ppo" / "metrics.jsonl")
    assert all(r["loss_scale"] >= 1 for r in rows), [r["loss_scale"] for r in rows]
    reward = [r["reward/mean"] for r in rows]
    assert sum(reward[-4:]) / 4 > sum(reward[:3]) / 3 + 0.25, reward


def test_merge_on_a_gpu_machine(sft_run, root):
    from transformers import AutoModelForCausalLM

    assert align(["merge", f"adapter={sft_run}", f"output={root / 'merged'}", "dtype=bfloat16",
                  "run.wandb=disabled"]) == 0
    model = AutoModelForCausalLM.from_pretrained(str(root / "merged"), device_map={"": 0})
    assert next(model.parameters()).device.type == "cuda"
