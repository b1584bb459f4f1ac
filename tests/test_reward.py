"""`align reward` on a tiny model, through the CLI: a known preference is learned, figures are written,
the folder loads back on its own and scores; K-wise batches; QLoRA from the base with margins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from alignment.cli import main as align
from alignment.config import RewardStageConfig, load_config
from alignment.tracking import read_jsonl

REPO = Path(__file__).resolve().parents[1]
TOPICS = ["Sync", "Export", "Backup", "Theme", "Share", "Tags", "Password", "Search", "Trash", "Widgets"]
# Polite beats rude; both kinds have about the same length, so only the manner tells them apart.
POLITE = ["Thanks for asking! Open Settings, then tap {t}.", "Happy to help: go to Settings and choose {t}."]
RUDE = ["Stop asking me. Find {t} in Settings yourself.", "Ugh, obviously. {t} is in Settings, read it."]
FAST = ["run.wandb=disabled", "train.logging_steps=5", "train.warmup_ratio=0", "model.max_length=128"]


def write_rankings(path: Path, n_tasks: int, *, long_wins: bool = False) -> Path:
    """K=4 rankings (2 polite > 2 rude, ties dropped): 4 pairs per task sharing its task_id."""
    rows = []
    for i in range(n_tasks):
        t = TOPICS[i % len(TOPICS)]
        prompt = f"Ticket {i}: where is {t}?"
        good = [p.format(t=t) for p in POLITE]
        bad = [r.format(t=t) for r in RUDE]
        if long_wins:  # the answer is length alone: the reward-hacking signal
            good = [g + " It is under the General tab, near the top of the list." for g in good]
        for c in good:
            for r in bad:
                rows.append({"prompt": prompt, "chosen": c, "rejected": r, "task_id": f"task-{i}", "margin": 1,
                             "agreement": 0.8, "annotators": ["ann", "bob"]})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def sft_dir(tiny_model, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("reward-sft")
    data = tmp / "sft.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Ticket {i}: where is Sync?", "input": "",
                                          "output": POLITE[0].format(t="Sync")}) for i in range(16)) + "\n")
    run = tmp / "run"
    assert align(["sft", f"model.name={tiny_model}", f"data.path={data}", f"run.dir={run}", "train.max_steps=4",
                  "run.wandb=disabled", "model.quantize=false", "data.eval_fraction=0", "model.max_length=128"]) == 0
    return run / "sft"


@pytest.fixture(scope="module")
def reward_run(sft_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reward")
    data = write_rankings(tmp / "prefs.jsonl", 40)
    assert align(["reward", f"run.dir={tmp / 'run'}", f"sft={sft_dir}", f"data.path={data}", "model.quantize=false",
                  "train.max_steps=30", "train.lr=3e-3", "train.batch_size=8", "train.eval_steps=15",
                  "data.test_fraction=0.1", *FAST]) == 0
    return tmp / "run" / "reward", data


def test_reward_model_learns_a_known_preference_and_writes_its_figures(reward_run):
    reward_run, _ = reward_run
    metrics = json.loads((reward_run / "align.json").read_text())["metrics"]
    assert metrics["eval_accuracy"] >= 0.9, metrics
    assert metrics["eval_mean_margin"] > 0
    assert metrics["agreement_ceiling"] == pytest.approx(0.8)
    assert isinstance(metrics["length_correlation"], float)
    bins = metrics["calibration"]
    assert bins and sum(b["pairs"] for b in bins) == metrics["eval_pairs"] == 16  # 4 held-out prompts x 4 pairs
    assert all(0 <= b["accuracy"] <= 1 and 0.5 <= b["predicted"] <= 1 for b in bins)
    last = read_jsonl(reward_run / "metrics.jsonl")[-1]
    assert last["eval_accuracy"] == metrics["eval_accuracy"] and last["calibration"] == bins
    assert any("loss" in r for r in read_jsonl(reward_run / "metrics.jsonl"))


def test_adapter_and_score_head_trained_and_manifest_lineage(reward_run, sft_dir, tiny_model):
    reward_run, _ = reward_run
    weights = load_file(str(reward_run / "adapter_model.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "a LoRA adapter never trained"
    assert any(k.endswith("score.weight") for k in weights), "the score head is not saved with the adapter"
    manifest = json.loads((reward_run / "align.json").read_text())
    assert manifest["base_model"] == tiny_model and manifest["from_sft"] is True
    assert set(manifest["parents"]) == {"sft", "preferences"}
    assert (reward_run / "sft_adapter" / "adapter_config.json").is_file()
    adapter_config = json.loads((reward_run / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS" and adapter_config["base_model_name_or_path"] == tiny_model


def test_loads_on_its_own_and_scores_like_training(reward_run, tmp_path, capsys):
    from alignment.preferences import load_preferences
    from alignment.reward_model import load_reward_model, score, score_conversations

    reward_run, data_path = reward_run
    model, tokenizer = load_reward_model(reward_run)
    good, bad = score(model, tokenizer, ["Ticket 99: where is Widgets?"] * 2,
                      [POLITE[1].format(t="Widgets"), RUDE[0].format(t="Widgets")])
    assert good > bad
    # The same held-out split scored by the loaded model gives the margin training measured:
    # same SFT merge, same chat template, same last-token read.
    data, _ = load_preferences(data_path, test_fraction=0.1, seed=42)  # the recipe's split (train.seed)
    test = data["test"]
    chosen = score_conversations(model, tokenizer, [p + c for p, c in zip(test["prompt"], test["chosen"], strict=True)])
    rejected = score_conversations(model, tokenizer, [p + r for p, r in zip(test["prompt"], test["rejected"],
                                                                            strict=True)])
    margin = sum(c - r for c, r in zip(chosen, rejected, strict=True)) / len(chosen)
    assert margin == pytest.approx(json.loads((reward_run / "align.json").read_text())["metrics"]["eval_mean_margin"],
                                   abs=1e-3)

    capsys.readouterr()
    assert align(["reward", "score", "--model", str(reward_run), "--prompt", "Ticket 98: where is Trash?",
                  "--response", RUDE[1].format(t="Trash"), "--response", POLITE[0].format(t="Trash")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()[-2:]
    rude, polite = (float(line.split("\t")[0]) for line in lines)
    assert polite > rude
    jsonl = tmp_path / "score.jsonl"
    jsonl.write_text(json.dumps({"prompt": "Ticket 97: where is Tags?", "response": POLITE[0].format(t="Tags")}) + "\n")
    assert align(["reward", "score", "--model", str(reward_run), "--jsonl", str(jsonl)]) == 0
    assert "score" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_qlora_from_the_base_with_margins_warns_about_length(tiny_model, tmp_path, caplog):
    data = write_rankings(tmp_path / "prefs.jsonl", 20, long_wins=True)
    caplog.set_level("WARNING")
    assert align(["reward", f"run.dir={tmp_path / 'run'}", f"model.name={tiny_model}", "from_sft=false",
                  f"data.path={data}", "model.quantize=true", "use_margin=true", "center_rewards_coefficient=0.01",
                  "group_by_ranking=false", "train.max_steps=20", "train.lr=3e-3", "train.batch_size=8",
                  "train.eval_steps=20", "data.test_fraction=0.2", *FAST]) == 0
    out = tmp_path / "run" / "reward"
    manifest = json.loads((out / "align.json").read_text())
    assert set(manifest["parents"]) == {"preferences"} and not (out / "sft_adapter").exists()
    assert "4-bit NF4" in manifest["device_plan"]
    assert manifest["config"]["use_margin"] is True
    assert manifest["metrics"]["length_correlation"] > 0.5
    assert "correlates with response length" in caplog.text


def test_group_by_ranking_batches_reach_the_trainer(tiny_model, tmp_path):
    """The override is wired: the trainer's batches are whole rankings, not a shuffle of pairs."""
    from trl import RewardConfig

    from alignment.config import LoraConfig, ModelConfig
    from alignment.modeling import device_plan, load_tokenizer, peft_lora_config
    from alignment.preferences import load_preferences
    from alignment.reward_model import reward_base
    from recipes.reward import RankingRewardTrainer

    # 3 pairs per ranking, batch 4: grouped batches hold 3; shuffled ones would hold 4.
    rows = [json.loads(line) for line in write_rankings(tmp_path / "p.jsonl", 6).read_text().splitlines()]
    rows = [r for i, r in enumerate(rows) if i % 4 != 3]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data, _ = load_preferences(tmp_path / "p.jsonl", test_fraction=0)
    plan = device_plan(ModelConfig(name=tiny_model, quantize=False))
    trainer = RankingRewardTrainer(
        model=reward_base(ModelConfig(name=tiny_model, quantize=False), plan), processing_class=load_tokenizer(tiny_model),
        args=RewardConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=4, use_cpu=True, bf16=False,
                          report_to=[], gradient_checkpointing=False),
        train_dataset=data["train"], peft_config=peft_lora_config(LoraConfig(r=4), "SEQ_CLS", ["score"]))
    sizes = [batch["input_ids"].shape[0] // 2 for batch in trainer.get_train_dataloader()]
    assert sizes == [3] * 6


def test_refuses_without_sft_or_data(tmp_path, capsys):
    assert align(["reward", f"run.dir={tmp_path}", "run.wandb=disabled"]) == 1
    assert "no SFT adapter" in capsys.readouterr().err
    assert align(["reward", f"run.dir={tmp_path}", "from_sft=false", "run.wandb=disabled"]) == 1
    assert "no preference data" in capsys.readouterr().err


def test_quickstart_yaml_loads():
    cfg = load_config(RewardStageConfig, REPO / "configs/quickstart/reward.yaml")
    assert cfg.from_sft and cfg.group_by_ranking
    first = (REPO / "configs/quickstart/reward.yaml").read_text().splitlines()[0]
    assert first.startswith("# align reward --config configs/quickstart/reward.yaml")
