"""`align reward` on a tiny model, through the CLI: a known preference is learned, figures are written,
the folder loads back on its own and scores; K-wise batches; QLoRA from the base with margins."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.cli import main as align
from align.config import RewardStageConfig, load_config
from align.tracking import read_jsonl

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


def test_reward_features_names_what_the_labels_teach_and_what_the_model_learnt(reward_run, sft_dir, tmp_path):
    """benchmarks/reward_features.py on the fixture's pairs: every pair differs in its opening (a thanks
    or "happy to help" against none), so a fit on the scorer's features orders them all, and the reward
    model's accuracy under "acknowledge" is its held-out accuracy, on the same 16 pairs the stage held out.
    On the frozen SFT states, the one tag that varies (the greeting, in the reply's first tokens) is read
    right on every held-out response, and the tags order every held-out pair."""
    import importlib.util

    from align.labeling.scorers import support_style, support_style_features

    spec = importlib.util.spec_from_file_location("reward_features", REPO / "benchmarks" / "reward_features.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    reward_run, data = reward_run
    out = tmp_path / "figures.jsonl"
    assert bench.main(["--data", str(data), "--rm", str(reward_run), "--frozen", str(sft_dir), "--test-fraction", "0.1",
                       "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    metrics = json.loads((reward_run / "align.json").read_text())["metrics"]
    assert figures["test_pairs"] == metrics["eval_pairs"] == 16
    assert figures["features"]["test_accuracy"] == 1.0 and figures["features"]["weights"]["acknowledge"] > 0
    by = figures["by_feature"]
    assert by["all"]["pairs"] == by["acknowledge"]["pairs"] == 16
    assert by["all"]["accuracy"] == by["acknowledge"]["accuracy"] == pytest.approx(metrics["eval_accuracy"])
    frozen = figures["frozen"]
    assert frozen["responses"] == 40 * 4  # each distinct reply pooled once: 2 polite and 2 rude a task
    assert frozen["tag_share"] == {"acknowledge": 0.5, "steps": 1.0, "courtesy": 0.0, "short": 0.0, "cut_off": 0.0}
    assert frozen["tag_accuracy"]["acknowledge"] == 1.0 and frozen["tags_test_accuracy"] == 1.0
    # The features are the scorer's own terms: no closing stop is cut off; a greeting earns 1 (less its word's 0.004).
    f = support_style_features("Thanks! Open Settings and tap Sync")
    assert (f["acknowledge"], f["steps"], f["cut_off"], f["words"]) == (1.0, 1.0, 1.0, 6.0)
    assert support_style("q", "Thanks! Open Settings and tap Sync.") - support_style("q", "Open Settings and tap Sync.") \
        == pytest.approx(1.0 - 0.004)


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
    # The probes: every edit scored on the 16 held-out pairs; agreement known per task only (0.8, no vote counts).
    probes = json.loads((reward_run / "align.json").read_text())["probes"]
    assert probes["pairs"] == 16 and probes["scorer"] is None
    assert probes["by_agreement"]["buckets"] == [{"bucket": "not unanimous", "pairs": 16,
                                                  "accuracy": metrics["eval_accuracy"]}]
    assert [b["bucket"] for b in probes["by_margin"]] == ["1"]  # write_rankings gives every pair margin 1
    edits = {e["edit"]: e for e in probes["edits"]}
    assert set(edits) == {"neutral_end", "repeat_end", "thanks_end", "sorry_end", "hope_end", "thanks_start",
                          "sorry_start", "hope_start"}
    for e in edits.values():
        assert e["of"] == round(metrics["eval_accuracy"] * 16) and 0 <= e["flips"] <= e["of"]
        assert isinstance(e["mean_gain"], float) and e["gated"] == e["edit"].endswith("_end")
    assert probes["gate"]["edit"].endswith("_end")
    assert metrics["probe_gate_rate"] == probes["gate"]["rate"] == max(edits[k]["flip_rate"] for k in edits
                                                                       if k.endswith("_end"))
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
    from align.preferences import load_preferences
    from align.reward_model import load_reward_model, score, score_conversations

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
    # `align reward probe`: the same probes from the folder alone (the split from its manifest).
    capsys.readouterr()
    assert align(["reward", "probe", "--model", str(reward_run), "--scorer", "support_style"]) == 0
    captured = capsys.readouterr()
    probed = json.loads(captured.out)
    # a bar of the probes, each a pass over every pair (minutes on a few hundred pairs), not silence until the end
    from align.reward_model import EDITS
    assert "probing the reward model on 16 held-out pairs: 100%" in captured.err.replace("\r", "\n")
    assert f"{len(EDITS)}/{len(EDITS)}" in captured.err
    trained = json.loads((reward_run / "align.json").read_text())["probes"]
    assert probed["pairs"] == trained["pairs"] == 16 and probed["scorer"] == "support_style"
    for mine, theirs in zip(probed["edits"], trained["edits"], strict=True):
        assert mine["edit"] == theirs["edit"] and mine["mean_gain"] == pytest.approx(theirs["mean_gain"], abs=1e-3)
        assert "unsupported_flip_rate" in mine
    assert align(["reward", "probe", "--model", str(reward_run), "--scorer", "nonsense"]) == 2
    # a model trained with probe_scorer= is probed with it by default (its gate, as PPO reads it), none on request
    labelled = tmp_path / "labelled-by-a-scorer"
    shutil.copytree(reward_run, labelled)
    manifest = json.loads((labelled / "align.json").read_text())
    manifest["config"]["probe_scorer"] = "support_style"
    (labelled / "align.json").write_text(json.dumps(manifest))
    for given, expected in (([], "support_style"), (["--scorer", "none"], None)):
        capsys.readouterr()
        assert align(["reward", "probe", "--model", str(labelled), *given]) == 0
        assert json.loads(capsys.readouterr().out)["scorer"] == expected
    # data changed since training: re-split, its "held-out" pairs would include trained ones
    moved = tmp_path / "reward-copy"
    shutil.copytree(reward_run, moved)
    manifest = json.loads((moved / "align.json").read_text())
    (moved / "align.json").write_text(json.dumps({**manifest, "data": {**manifest["data"], "sha256": "0" * 64}}))
    capsys.readouterr()
    assert align(["reward", "probe", "--model", str(moved)]) == 2
    assert "has changed since the model was trained on it" in capsys.readouterr().err
    # trained with data.on_error=skip on data with a bad line: probed reading it the same way, not refused for it
    from align.data import file_hash

    skipping = tmp_path / "prefs-with-a-bad-line.jsonl"
    skipping.write_text(Path(manifest["data"]["path"]).read_text() + "not json\n")
    config = {**manifest["config"], "data": {**manifest["config"]["data"], "on_error": "skip"}}
    (moved / "align.json").write_text(json.dumps({**manifest, "config": config, "data": {
        **manifest["data"], "path": str(skipping), "sha256": file_hash(skipping)}}))
    capsys.readouterr()
    assert align(["reward", "probe", "--model", str(moved)]) == 0
    assert json.loads(capsys.readouterr().out)["pairs"] == trained["pairs"]
    jsonl = tmp_path / "score.jsonl"  # as the training data may be: a BOM, CRLF, a U+2028 inside a string
    row = {"prompt": "Ticket 97: where is Tags?", "response": POLITE[0].format(t="Tags") + "\u2028"}
    jsonl.write_bytes(b"\xef\xbb\xbf" + json.dumps(row, ensure_ascii=False).encode() + b"\r\n")
    assert align(["reward", "score", "--model", str(reward_run), "--jsonl", str(jsonl)]) == 0
    assert "score" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # /dev/stdin a pipe, no suffix: this process's stdin (fd 0) made the read end of one for the call
    read, write = os.pipe()
    os.write(write, (json.dumps(row) + "\n").encode())
    os.close(write)
    stdin = os.dup(0)
    os.dup2(read, 0)
    os.close(read)
    try:
        piped = align(["reward", "score", "--model", str(reward_run), "--jsonl", "/dev/stdin"])
    finally:
        os.dup2(stdin, 0)
        os.close(stdin)
    assert piped == 0 and "score" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    listed = tmp_path / "score.json"  # a JSON list, as the data loaders take it
    listed.write_text(json.dumps([row, row]))
    capsys.readouterr()
    assert align(["reward", "score", "--model", str(reward_run), "--jsonl", str(listed)]) == 0
    assert len([line for line in capsys.readouterr().out.splitlines() if '"score"' in line]) == 2
    for text, message in ((json.dumps({"prompt": None, "response": 5}), "score.jsonl:1: needs a JSON object with string"),
                          ("", "no lines to score (empty)")):
        jsonl.write_text(text)
        assert align(["reward", "score", "--model", str(reward_run), "--jsonl", str(jsonl)]) == 2
        assert message in capsys.readouterr().err


def test_probe_finds_the_training_data_of_a_moved_run(reward_run, tmp_path, capsys):
    """`align reward probe` read the data.path its manifest records as it is: with the project moved (or the run
    folder moved and renamed) it failed, and told the user to "pass data.path=...", an option it does not have.
    It looks for the data as the report and eval look for a moved parent now, and words the hint as --data."""
    reward_run, data = reward_run
    manifest = json.loads((reward_run / "align.json").read_text())
    trained = manifest["probes"]["pairs"]
    gone = "/gone/project"  # where the run was made: the manifest's paths under it, none of them there any more

    def place(run: Path, data_name: str) -> Path:
        shutil.copytree(reward_run, run / "reward", ignore=shutil.ignore_patterns("checkpoints"))
        shutil.copy(data, run / data_name)
        (run / "reward" / "align.json").write_text(json.dumps({
            **manifest, "cwd": gone, "data": {**manifest["data"], "path": f"{gone}/runs/q/{data_name}"},
            "parents": {**manifest["parents"], "preferences": {**manifest["parents"]["preferences"],
                                                               "path": f"{gone}/runs/q/{data_name}"}}}))
        return run / "reward"

    for run in (tmp_path / "moved" / "runs" / "q", tmp_path / "renamed"):  # the project moved; the run folder too
        capsys.readouterr()
        assert align(["reward", "probe", "--model", str(place(run, "prefs.jsonl"))]) == 0, capsys.readouterr().err
        assert json.loads(capsys.readouterr().out)["pairs"] == trained
    (tmp_path / "renamed" / "prefs.jsonl").unlink()
    assert align(["reward", "probe", "--model", str(tmp_path / "renamed" / "reward")]) == 2
    err = capsys.readouterr().err
    assert "the preference data the model was trained on, is not there any more" in err
    assert "pass --data" in err and "data.path" not in err
    assert align(["reward", "probe", "--model", str(reward_run), "--data", str(tmp_path / "nope.jsonl")]) == 2
    assert f"--data {tmp_path / 'nope.jsonl'}: no such file or folder" in capsys.readouterr().err


def test_probe_with_data_probes_every_pair_or_the_files_own_test_split(reward_run, tmp_path, capsys):
    """`align reward probe --data FILE` split FILE again by the model's test_fraction and probed the test tenth:
    40 unseen pairs gave "pairs": 4. It probes every pair of a file, or the test split of one that has its own."""
    from datasets import Dataset, DatasetDict

    reward_run, _ = reward_run
    unseen = write_rankings(tmp_path / "unseen.jsonl", 10)  # 10 prompts, 40 pairs
    capsys.readouterr()
    assert align(["reward", "probe", "--model", str(reward_run), "--data", str(unseen)]) == 0
    assert json.loads(capsys.readouterr().out)["pairs"] == 40
    rows = [json.loads(line) for line in unseen.read_text().splitlines()]
    DatasetDict({"train": Dataset.from_list(rows[:28]), "test": Dataset.from_list(rows[28:])}).save_to_disk(
        str(tmp_path / "export"))
    assert align(["reward", "probe", "--model", str(reward_run), "--data", str(tmp_path / "export")]) == 0
    assert json.loads(capsys.readouterr().out)["pairs"] == 12


def test_a_probe_scorer_that_returns_no_number_stops_before_training_and_probe_says_it(reward_run, sft_dir, tmp_path,
                                                                                       capsys, monkeypatch):
    """probe_scorer= returning None ended in float()'s traceback at the probes, once the model had trained; every
    score it gives the probes (each held-out answer and each edit of it) is taken before any model loads. `align
    reward probe --scorer` says it in one line too."""
    from align.recipes import reward as reward_recipe

    def no_model(*args, **kwargs):
        raise AssertionError("the reward model was built")

    monkeypatch.setattr(reward_recipe, "reward_base", no_model)
    data = write_rankings(tmp_path / "prefs.jsonl", 20)
    said = "scorer 'known_scorers:returns_none' returned None for held-out pair 1 ('Ticket "
    assert align(["reward", f"run.dir={tmp_path / 'run'}", f"sft={sft_dir}", f"data.path={data}", "model.quantize=false",
                  "train.max_steps=2", "data.test_fraction=0.2", "probe_scorer=known_scorers:returns_none",
                  *FAST]) == 1
    err = capsys.readouterr().err
    assert f"align reward: {said}" in err and "a scorer returns a number (int or float)" in err
    assert not (tmp_path / "run" / "reward").exists()
    assert align(["reward", f"run.dir={tmp_path / 'run'}", f"sft={sft_dir}", f"data.path={data}", "model.quantize=false",
                  "train.max_steps=2", "data.test_fraction=0.2", "probe_scorer=known_scorers:none_on_an_edit",
                  *FAST]) == 1  # only on an edited answer: found before training all the same
    assert "scorer 'known_scorers:none_on_an_edit' returned None for held-out pair 1" in capsys.readouterr().err
    assert not (tmp_path / "run" / "reward").exists()
    run, _ = reward_run
    assert align(["reward", "probe", "--model", str(run), "--scorer", "known_scorers:returns_none"]) == 1
    err = capsys.readouterr().err
    assert f"align reward probe: {said}" in err and "Traceback" not in err


def test_qlora_from_the_base_with_margins_warns_about_length(tiny_model, tmp_path, caplog):
    data = write_rankings(tmp_path / "prefs.jsonl", 20, long_wins=True)
    caplog.set_level("WARNING")
    assert align(["reward", f"run.dir={tmp_path / 'run'}", f"model.name={tiny_model}", "from_sft=false",
                  f"data.path={data}", "model.quantize=true", "use_margin=true", "center_rewards_coefficient=0.01",
                  "group_by_ranking=false", "train.max_steps=20", "train.lr=3e-3", "train.batch_size=8",
                  "train.eval_steps=20", "data.test_fraction=0.2", "probe_scorer=support_style", *FAST]) == 0
    out = tmp_path / "run" / "reward"
    manifest = json.loads((out / "align.json").read_text())
    # With the labelling scorer named, each edit says what it thought of it too; the gate counts the rest.
    edits = {e["edit"]: e for e in manifest["probes"]["edits"]}
    assert manifest["probes"]["scorer"] == "support_style"
    assert edits["thanks_start"]["scorer_mean_gain"] > 0.5  # an opening acknowledgement: support_style pays +1
    assert edits["neutral_end"]["scorer_flip_rate"] == 0  # 7 more words, a few thousandths less
    assert all(e["unsupported_flips"] <= e["flips"] for e in edits.values())
    page = (tmp_path / "run" / "report.html").read_text()
    assert "<h3>Probes</h3>" in page and "support_style: flips (of the pairs it orders as labelled)" in page and "putting &#x27;Thanks!&#x27; in front" in page
    assert set(manifest["parents"]) == {"preferences"} and not (out / "sft_adapter").exists()
    assert "4-bit NF4" in manifest["device_plan"]
    assert manifest["config"]["use_margin"] is True
    assert manifest["metrics"]["length_correlation"] > 0.5
    assert "correlates with response length" in caplog.text
    # Loaded for PPO, eval and `align reward probe`: on the 4-bit base it learnt on, so it scores the held-out
    # pairs as the stage measured them (the gate's figures); on an unquantized base it was another model.
    from align.preferences import load_preferences
    from align.reward_model import load_reward_model, score_conversations

    model, tokenizer = load_reward_model(out)
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    # with bitsandbytes' CPU repack off, as the stage measured (another kernel, other scores: at this tiny
    # size it does not engage, at SmolLM2's it flipped a held-out pair)
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in model.modules())
    test = load_preferences(data, test_fraction=0.2, seed=42)[0]["test"]
    chosen, rejected = (score_conversations(model, tokenizer, [p + c for p, c in zip(test["prompt"], test[side],
                                                                                       strict=True)])
                        for side in ("chosen", "rejected"))
    margin = sum(c - r for c, r in zip(chosen, rejected, strict=True)) / len(chosen)
    assert margin == pytest.approx(manifest["metrics"]["eval_mean_margin"], rel=1e-3)  # 4-bit kernels: batch sizes


def test_group_by_ranking_batches_reach_the_trainer(tiny_model, tmp_path):
    """The override is wired: the trainer's batches are whole rankings, not a shuffle of pairs."""
    from trl import RewardConfig

    from align.config import LoraConfig, ModelConfig
    from align.modeling import device_plan, load_tokenizer, peft_lora_config
    from align.preferences import load_preferences
    from align.recipes.reward import AlignRewardTrainer
    from align.reward_model import reward_base

    # 3 pairs per ranking, batch 4: grouped batches hold 3; shuffled ones would hold 4.
    rows = [json.loads(line) for line in write_rankings(tmp_path / "p.jsonl", 6).read_text().splitlines()]
    rows = [r for i, r in enumerate(rows) if i % 4 != 3]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data, _ = load_preferences(tmp_path / "p.jsonl", test_fraction=0)
    plan = device_plan(ModelConfig(name=tiny_model, quantize=False))
    trainer = AlignRewardTrainer(
        model=reward_base(ModelConfig(name=tiny_model, quantize=False), plan), processing_class=load_tokenizer(tiny_model),
        args=RewardConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=4, use_cpu=True, bf16=False,
                          report_to=[], activation_checkpointing=False),
        train_dataset=data["train"], peft_config=peft_lora_config(LoraConfig(r=4), "SEQ_CLS", ["score"]))
    sizes = [batch["input_ids"].shape[0] // 2 for batch in trainer.get_train_dataloader()]
    assert sizes == [3] * 6


def test_a_training_loss_gone_nan_is_refused_not_saved(tiny_model, tmp_path, monkeypatch, capsys):
    """A NaN loss (an infinite weight once let through, a too-high train.lr) left NaN weights that were saved
    with rc 0 and a manifest: PPO and eval would take them for a finished reward model."""
    from align.recipes.reward import AlignRewardTrainer

    compute_loss = AlignRewardTrainer.compute_loss

    def nan_loss(self, *args, **kwargs):
        loss = compute_loss(self, *args, **kwargs)
        return loss * float("nan") if isinstance(loss, torch.Tensor) else (loss[0] * float("nan"), loss[1])

    monkeypatch.setattr(AlignRewardTrainer, "compute_loss", nan_loss)
    data = write_rankings(tmp_path / "prefs.jsonl", 4)
    assert align(["reward", f"run.dir={tmp_path / 'run'}", f"model.name={tiny_model}", "from_sft=false",
                  f"data.path={data}", "model.quantize=false", "train.max_steps=2", "train.batch_size=4",
                  "data.test_fraction=0", *FAST]) == 1
    assert "training went non-finite by step 2 (base_model.model.model.layers.0" in capsys.readouterr().err
    assert not (tmp_path / "run" / "reward" / "align.json").exists()
    assert not (tmp_path / "run" / "reward" / "adapter_model.safetensors").exists()


def test_non_finite_weights_are_seen_in_a_zero3_shard():
    """Under DeepSpeed ZeRO-3 a parameter's own tensor is an empty placeholder (finite whatever the weights are)
    and its values are this process's `ds_tensor`: NaN weights there were saved as a finished reward model."""
    from align import StageError
    from align.recipes.reward import refuse_non_finite

    model = torch.nn.Linear(2, 1)
    model.weight.data = torch.empty(0)  # as ZeRO-3 partitions it
    model.weight.ds_tensor = torch.tensor([0.5, float("nan")])
    with pytest.raises(StageError, match=r"non-finite by step 3 \(weight holds NaN/inf\)"):
        refuse_non_finite(model, 0.5, 3)
    model.weight.ds_tensor = torch.tensor([0.5, 0.25])
    refuse_non_finite(model, 0.5, 3)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_lora_dropout_is_applied_as_configured(tiny_model, tmp_path, monkeypatch, dropout):
    """TRL's RewardConfig turns every dropout off after peft wraps the model: lora.dropout=0.05 (the default then)
    was recorded in config.yaml and adapter_config.json and never applied. The default is none now, and a
    dropout asked for is the one training runs with."""
    from align.recipes.reward import AlignRewardTrainer

    compute_loss, seen = AlignRewardTrainer.compute_loss, set()

    def recording(self, model, *args, **kwargs):
        seen.update(m.p for name, m in model.named_modules() if "lora_dropout" in name and hasattr(m, "p"))
        assert model.training
        return compute_loss(self, model, *args, **kwargs)

    monkeypatch.setattr(AlignRewardTrainer, "compute_loss", recording)
    data = write_rankings(tmp_path / "prefs.jsonl", 4)
    assert align(["reward", f"run.dir={tmp_path / 'run'}", f"model.name={tiny_model}", "from_sft=false",
                  f"data.path={data}", "model.quantize=false", "train.max_steps=1", "train.batch_size=4",
                  "data.test_fraction=0", *(["lora.dropout=0.2"] if dropout else []), *FAST]) == 0
    assert seen == ({dropout} if dropout else set())  # none: peft puts an Identity where the dropout would be


def test_pairs_longer_than_max_length_are_counted_out_and_all_of_them_refused(tiny_model, tmp_path, caplog, capsys):
    """TRL's RewardTrainer leaves out a pair with a side longer than max_length. align.json counted them as
    trained (data.train), and with every training pair left out the stage trained 0 steps, then saved the fresh
    score head as a finished reward model (rc 0, held-out figures, a hint to run PPO). SFT and DPO refuse that."""
    data = write_rankings(tmp_path / "prefs.jsonl", 4)  # 4 tasks of 4 pairs
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for row in rows[:4]:  # the first task's pairs: a chosen far beyond 128 tokens
        row["chosen"] += " Open Settings, then General, then Sync." * 20
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run = [f"model.name={tiny_model}", "from_sft=false", f"data.path={data}", "model.quantize=false",
           "train.max_steps=1", "train.batch_size=4", "data.test_fraction=0", *FAST]
    with caplog.at_level("WARNING"):
        assert align(["reward", f"run.dir={tmp_path / 'some'}", *run]) == 0
    assert "4 of 16 training pairs are longer than model.max_length=128 tokens and are left out" in caplog.text
    manifest = json.loads((tmp_path / "some" / "reward" / "align.json").read_text())
    assert (manifest["data"]["train"], manifest["data"]["too_long"], manifest["data"]["too_long_heldout"]) == (12, 4, 0)
    # held out, they are measured (on their last max_length tokens, as PPO scores a long answer) and counted
    from align.config import RewardStageConfig
    from align.preferences import load_preferences

    held = {json.dumps(p) for p in load_preferences(write_rankings(tmp_path / "plain.jsonl", 4), test_fraction=0.25,
                                                    seed=RewardStageConfig().train.seed)[0]["test"]["prompt"]}
    rows = [json.loads(line) for line in (tmp_path / "plain.jsonl").read_text().splitlines()]
    for row in rows:
        if json.dumps(row["prompt"] if isinstance(row["prompt"], list) else
                      [{"role": "user", "content": row["prompt"]}]) in held:
            row["chosen"] += " Open Settings, then General, then Sync." * 20
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert align(["reward", f"run.dir={tmp_path / 'held'}", *run, "data.test_fraction=0.25"]) == 0
    manifest = json.loads((tmp_path / "held" / "reward" / "align.json").read_text())
    assert (manifest["data"]["test"], manifest["data"]["too_long"], manifest["data"]["too_long_heldout"]) == (4, 0, 4)
    assert "4 of 4 held-out pairs have a side longer than model.max_length=128 tokens" in caplog.text

    capsys.readouterr()
    assert align(["reward", f"run.dir={tmp_path / 'all'}", *run, "model.max_length=16"]) == 1
    out, err = capsys.readouterr()
    assert "all 16 training pairs have a side longer than model.max_length=16 tokens" in err
    assert "reward finished" not in out
    assert not (tmp_path / "all" / "reward" / "align.json").exists()
    assert not (tmp_path / "all" / "reward" / "adapter_model.safetensors").exists()


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


def test_pair_loss_by_hand():
    import math

    from align.reward_model import pair_loss

    def log_sigmoid(x: float) -> float:
        return -math.log(1 + math.exp(-x))

    chosen, rejected = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.5, -1.0])
    weight, p = torch.tensor([1.0, 0.5, 0.0]), torch.tensor([0.9, 0.6, 1.0])
    by_hand = (1.0 * (-0.9 * log_sigmoid(1.0) - 0.1 * log_sigmoid(-1.0))
               + 0.5 * (-0.6 * log_sigmoid(-0.5) - 0.4 * log_sigmoid(0.5)) + 0.0) / 3
    assert pair_loss(chosen, rejected, weight=weight, p_chosen=p).item() == pytest.approx(by_hand, rel=1e-6)
    # A margin applies to whichever response wins: the d - m and -d - m terms.
    margin = torch.tensor([1.0, 0.0, 0.0])
    by_hand = (-0.9 * log_sigmoid(0.0) - 0.1 * log_sigmoid(-2.0) - 0.6 * log_sigmoid(-0.5)
               - 0.4 * log_sigmoid(0.5) - log_sigmoid(3.0)) / 3
    assert pair_loss(chosen, rejected, margin=margin, p_chosen=p).item() == pytest.approx(by_hand, rel=1e-6)
    # The soft label's loss is least where the reward gap is logit(p): it does not push past the posterior.
    gaps = torch.linspace(-1, 4, 501, requires_grad=False)
    losses = [pair_loss(g.reshape(1), torch.zeros(1), p_chosen=torch.tensor([0.8])).item() for g in gaps]
    assert gaps[losses.index(min(losses))].item() == pytest.approx(math.log(0.8 / 0.2), abs=0.01)


def test_weighted_loss_in_the_trainer_is_trls_with_weights_1_and_the_hand_value_otherwise(tiny_model, tmp_path):
    from trl import RewardConfig, RewardTrainer

    from align.config import LoraConfig, ModelConfig
    from align.modeling import device_plan, load_tokenizer, peft_lora_config
    from align.preferences import load_preferences
    from align.recipes.reward import AlignRewardTrainer
    from align.reward_model import reward_base

    rows = [json.loads(line) for line in write_rankings(tmp_path / "p.jsonl", 3).read_text().splitlines()]
    soft = [0.9, 0.6, 0.75, 1.0] * 3
    (tmp_path / "w.jsonl").write_text("\n".join(json.dumps({**r, "weight": 1.0, "p_chosen": 1.0}) for r in rows))
    (tmp_path / "s.jsonl").write_text("\n".join(json.dumps({**r, "weight": 1.0, "p_chosen": p})
                                                for r, p in zip(rows, soft, strict=True)))
    plan = device_plan(ModelConfig(name=tiny_model, quantize=False))

    def first_batch(path: Path):
        data, _ = load_preferences(path, test_fraction=0)
        trainer = AlignRewardTrainer(
            model=reward_base(ModelConfig(name=tiny_model, quantize=False), plan),
            processing_class=load_tokenizer(tiny_model),
            args=RewardConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=12, use_cpu=True, bf16=False,
                              report_to=[], activation_checkpointing=False),
            train_dataset=data["train"].remove_columns(["margin"]),
            peft_config=peft_lora_config(LoraConfig(r=4, dropout=0.0), "SEQ_CLS", ["score"]))
        trainer.model.eval()
        return trainer, next(iter(trainer.get_train_dataloader()))

    trainer, batch = first_batch(tmp_path / "w.jsonl")
    assert batch["weight"].tolist() == [1.0] * 12 and batch["p_chosen"].tolist() == [1.0] * 12
    with torch.no_grad():
        ours = trainer.compute_loss(trainer.model, dict(batch))
        trls = RewardTrainer.compute_loss(trainer, trainer.model, {k: v for k, v in batch.items()
                                                                   if k not in ("weight", "p_chosen")})
    assert ours.item() == pytest.approx(trls.item(), rel=1e-6)

    trainer, batch = first_batch(tmp_path / "s.jsonl")
    with torch.no_grad():
        ours = trainer.compute_loss(trainer.model, dict(batch)).item()
        rewards = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    gaps = (rewards[:12] - rewards[12:]).tolist()
    p = batch["p_chosen"].tolist()
    assert sorted(p) == pytest.approx(sorted(soft))  # the soft labels reached the batch (in the sampler's order)
    log_sigmoid = torch.nn.functional.logsigmoid
    by_hand = sum(-pi * log_sigmoid(torch.tensor(g)).item() - (1 - pi) * log_sigmoid(torch.tensor(-g)).item()
                  for g, pi in zip(gaps, p, strict=True)) / 12
    assert ours == pytest.approx(by_hand, rel=1e-5)


def three_rankings_trainer(tiny_model, tmp_path, **args):
    """align's reward trainer on three K=4 rankings (write_rankings), a LoRA on the tiny model with weights as if
    trained a little (LoRA's B starts at 0: no gradient would reach A), RewardConfig's `args` on the CPU."""
    from trl import RewardConfig

    from align.config import LoraConfig, ModelConfig
    from align.modeling import device_plan, load_tokenizer, peft_lora_config
    from align.preferences import load_preferences
    from align.recipes.reward import AlignRewardTrainer
    from align.reward_model import reward_base

    data, _ = load_preferences(write_rankings(tmp_path / "p.jsonl", 3), test_fraction=0)
    cfg = ModelConfig(name=tiny_model, quantize=False)
    trainer = AlignRewardTrainer(
        model=reward_base(cfg, device_plan(cfg)), processing_class=load_tokenizer(tiny_model),
        args=RewardConfig(output_dir=str(tmp_path / "o"), use_cpu=True, bf16=False, report_to=[],
                          activation_checkpointing=False, **args),
        train_dataset=data["train"].remove_columns(["margin"]),
        peft_config=peft_lora_config(LoraConfig(r=4, dropout=0.0), "SEQ_CLS", ["score"]))
    for param in trainer.model.parameters():
        if param.requires_grad:
            torch.nn.init.normal_(param, std=0.05)
    return trainer


def test_each_distinct_response_runs_once_with_the_same_loss_and_gradients(tiny_model, tmp_path):
    # A K=4 ranking's 4 pairs hold 8 rows but 4 distinct responses: the model runs those 4 (align.training.UniqueRows),
    # and the loss and every LoRA gradient are what running all 8 rows gives.
    from trl import RewardTrainer

    trainer = three_rankings_trainer(tiny_model, tmp_path, per_device_train_batch_size=12)
    model = trainer.model
    model.train()  # the trainer counts training rows (LoRA dropout is 0 here, and the tiny base has none)
    batch = next(iter(trainer.get_train_dataloader()))
    rows_per_call = []

    def counted(**kwargs):
        rows_per_call.append(len(kwargs["input_ids"]))
        return model(**kwargs)

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute(dict(batch))
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ours, our_grads = loss_and_grads(lambda b: trainer.compute_loss(counted, b))
    trls, trl_grads = loss_and_grads(lambda b: RewardTrainer.compute_loss(trainer, model, b))
    assert rows_per_call == [12] and len(batch["input_ids"]) == 24  # 3 rankings: 24 rows, 12 distinct
    assert (trainer.rows_seen, trainer.rows_run) == (24, 12)
    assert ours == pytest.approx(trls, rel=1e-6) and ours != pytest.approx(0.6931, abs=1e-3)  # not the untrained ln 2
    assert our_grads.keys() == trl_grads.keys() and len(our_grads) > 2
    for name, grad in our_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, trl_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_every_pair_weighs_the_same_whatever_the_size_of_its_batch(tiny_model, tmp_path):
    """Three rankings of 4 pairs at batch_size 8: group_by_ranking packs them into a batch of 8 and one of 4. A mean
    per batch would give a pair of the short batch twice the weight of one in the full batch; each pair's share of
    a step is 1 / (batch_size * grad_accum) wherever it lands. The loss the Trainer logs stays each batch's mean."""
    from trl import RewardTrainer

    trainer = three_rankings_trainer(tiny_model, tmp_path, per_device_train_batch_size=8, gradient_accumulation_steps=2)
    model = trainer.model
    model.train()
    batches = {len(b["input_ids"]) // 2: b for b in trainer.get_train_dataloader()}
    assert sorted(batches) == [4, 8]

    def loss_and_grads(compute, batch):
        model.zero_grad()
        loss = compute(dict(batch))
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    means, mean_grads = {}, {}
    for pairs in (8, 4):
        ours, our_grads = loss_and_grads(lambda b: trainer.compute_loss(model, b), batches[pairs])
        means[pairs], mean_grads[pairs] = loss_and_grads(lambda b: RewardTrainer.compute_loss(trainer, model, b),
                                                         batches[pairs])
        assert ours == pytest.approx(means[pairs], rel=1e-6)  # logged: the batch's mean per pair
        for name, grad in our_grads.items():  # the gradient: the batch's sum over the nominal 8 pairs
            # float32 kernels differ by batch shape: atol at 1e-6 of gradients up to ~0.15 (1.1e-7 apart on an AMD
            # EPYC); a pair weighed by its batch's size is off by a factor of 2
            torch.testing.assert_close(grad, mean_grads[pairs][name] * pairs / 8, rtol=1e-4, atol=1e-6, msg=name)
    # Through the Trainer's step, which divides by grad_accum (no labels, so no num_items_in_batch to divide by)
    trainer.current_gradient_accumulation_steps = 2
    model.zero_grad()
    logged = trainer.training_step(model, dict(batches[4])).item()
    assert logged == pytest.approx(means[4] / 2, rel=1e-6)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, mean_grads[4][name] * 4 / 16, rtol=1e-4, atol=1e-6, msg=name)


def test_reliability_weights_beat_the_labels_they_distrust(sft_dir, tmp_path, capsys):
    """Most training pairs say rude beats polite, but only a distrusted annotator said so (p_chosen 0.52, weight
    0.04); the held-out pairs are the truth. Trained with the weights, the model learns polite > rude; without, rude.
    Its uncertainty heads fit the same labels as its loss, so they learn what it learns."""
    from datasets import Dataset, DatasetDict

    def pairs(first: int, n: int, *, reversed_: bool, p: float) -> list[dict]:
        out = []
        for i in range(first, first + n):
            t = TOPICS[i % len(TOPICS)]
            for c in POLITE:
                for r in RUDE:
                    good, bad = c.format(t=t), r.format(t=t)
                    chosen, rejected = (bad, good) if reversed_ else (good, bad)
                    out.append({"prompt": [{"role": "user", "content": f"Ticket {i}: where is {t}?"}],
                                "chosen": [{"role": "assistant", "content": chosen}],
                                "rejected": [{"role": "assistant", "content": rejected}],
                                "task_id": f"task-{i}", "p_chosen": p, "weight": 2 * p - 1})
        return out

    train = pairs(0, 12, reversed_=False, p=0.97) + pairs(12, 20, reversed_=True, p=0.52)
    DatasetDict({"train": Dataset.from_list(train),
                 "test": Dataset.from_list(pairs(40, 4, reversed_=False, p=0.97))}).save_to_disk(str(tmp_path / "prefs"))
    accuracy, heads = {}, {}
    for mode in ("auto", "off"):
        run = tmp_path / mode
        assert align(["reward", f"run.dir={run}", f"sft={sft_dir}", f"data.path={tmp_path / 'prefs'}",
                      f"use_weights={mode}", "model.quantize=false", "train.max_steps=30", "train.lr=3e-3",
                      "train.batch_size=8", "train.eval_steps=30", "heads=2", *FAST]) == 0
        manifest = json.loads((run / "reward" / "align.json").read_text())
        accuracy[mode], heads[mode] = manifest["metrics"]["eval_accuracy"], manifest["metrics"]["heads_eval_accuracy"]
        assert manifest["weighting"] == {"auto": "soft", "off": "off"}[mode]
        assert manifest["metrics"]["posterior_ceiling"] == pytest.approx(0.97)  # the held-out pairs' p_chosen
    assert accuracy["auto"] >= 0.9 and accuracy["off"] <= 0.1, accuracy
    assert heads["auto"] >= 0.9 and heads["off"] < 0.5, heads  # soft's heads fitted as hard wins: 0.25
    # Asked for a column the data does not have: named, before any model loads.
    plain = write_rankings(tmp_path / "plain.jsonl", 4)
    assert align(["reward", f"run.dir={tmp_path / 'x'}", f"sft={sft_dir}", f"data.path={plain}", "use_weights=soft",
                  *FAST]) == 2
    assert "use_weights=soft needs a 'p_chosen' on every pair" in capsys.readouterr().err


def test_scores_after_fp16_training_where_the_head_stayed_fp32(tiny_model):
    """Under compute_dtype=float16 the stage keeps the adapter and score head in fp32 for the GradScaler
    (align/recipes/reward.py); scoring after training must not hand the fp16 base's hidden states to the fp32 head."""
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    from align.config import LoraConfig
    from align.cpu import keep_trainable_in
    from align.modeling import load_tokenizer, peft_lora_config
    from align.reward_model import score

    tokenizer = load_tokenizer(tiny_model)
    prompts, replies = ["How do I sync?", "Where is export?"], ["Open Settings and tap Sync now.", "File > Export."]
    scores = {}
    for dtype in (torch.float32, torch.float16):
        torch.manual_seed(0)
        base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1, dtype=dtype)
        base.config.pad_token_id = tokenizer.pad_token_id
        model = get_peft_model(base, peft_lora_config(LoraConfig(r=4), "SEQ_CLS", modules_to_save=["score"]))
        keep_trainable_in(model, torch.float32)
        assert {p.dtype for p in model.parameters()} == {dtype, torch.float32}  # fp16: the trained weights fp32
        scores[dtype] = score(model, tokenizer, prompts, replies)
    assert scores[torch.float16] == pytest.approx(scores[torch.float32], abs=0.02)


def test_a_half_precision_reward_model_with_heads_and_no_held_out_pairs_saves_and_loads_its_head_as_trained(
        sft_dir, tmp_path):
    """bf16 (a GPU's auto; fp16 the same), here on the CPU, with uncertainty heads and no held-out split: the heads
    were fitted on features the fp32 score head was handed in bf16, only made fp32-ready for the held-out scoring:
    "expected m1 and m2 to have the same dtype", after all the training, nothing saved. And load_reward_model
    copied the saved fp32 head into the bf16 base's head: PPO and eval scored with rounded weights."""
    from safetensors.torch import load_file

    from align.reward_model import load_reward_model

    data = write_rankings(tmp_path / "prefs.jsonl", 8)
    assert align(["reward", f"run.dir={tmp_path / 'run'}", f"sft={sft_dir}", f"data.path={data}",
                  "model.quantize=false", "model.compute_dtype=bfloat16", "train.max_steps=4", "train.lr=3e-3",
                  "train.batch_size=8", "data.test_fraction=0", "heads=2", *FAST]) == 0
    out = tmp_path / "run" / "reward"
    saved = {k: v for k, v in load_file(str(out / "adapter_model.safetensors")).items() if ".score." in k}
    assert saved and all(v.dtype == torch.float32 for v in saved.values())
    model, _ = load_reward_model(out)
    loaded = {n.replace("modules_to_save.default.", ""): p.detach() for n, p in model.named_parameters()
              if ".score.modules_to_save." in n}
    assert loaded.keys() == saved.keys()
    assert all(loaded[k].dtype == torch.float32 and torch.equal(loaded[k], saved[k]) for k in saved)


def test_an_fp16_run_whose_loss_scale_collapsed_is_refused_before_it_saves():
    """accelerate's GradScaler (CUDA, fp16) skips every step whose gradients overflow and halves its scale; the
    logged loss leaves those steps out and the weights stay finite, so a run that never stepped looked trained."""
    from types import SimpleNamespace

    from align import StageError
    from align.training import train_from

    def trainer(scaler):
        return SimpleNamespace(args=SimpleNamespace(max_steps=12), accelerator=SimpleNamespace(scaler=scaler),
                               train=lambda resume_from_checkpoint: SimpleNamespace(global_step=12))

    assert train_from(trainer(None), None).global_step == 12  # fp32, bf16: no scaler
    healthy = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    assert train_from(trainer(healthy), None).global_step == 12
    collapsed = torch.amp.GradScaler("cpu", init_scale=0.5)
    with pytest.raises(StageError, match=r"training under fp16 to step 12: the loss scale fell to 0.5 .*nothing is "
                                         r"saved. Set model.compute_dtype=float32"):
        train_from(trainer(collapsed), None)


def test_the_fp32_score_head_stays_fp32_under_fp16_autocast(tiny_model):
    """score_conversations runs an fp16 model with an fp32 adapter under fp16 autocast; inside it the head's
    F.linear on fp32 inputs was cast back to fp16, and distinct answers tied again (score_head_in_fp32)."""
    from transformers import AutoModelForSequenceClassification

    from align.reward_model import score_head_in_fp32

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1, dtype=torch.float16)
    score_head_in_fp32(model)
    seen = []
    model.score.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    with torch.no_grad(), torch.autocast("cpu", torch.float16):
        model(input_ids=torch.tensor([[1, 2, 3]]))
    assert seen == [torch.float32]


def test_the_fp32_score_head_scores_a_model_fsdp_sharded_in_bf16(tiny_model, tmp_path):
    """After training under fsdp.yaml with bf16, the reward stage scores its held-out pairs with the head in fp32
    (score_head_in_fp32). The weights are then sharded: FSDP2 on a one-rank gloo mesh on the CPU, with the
    mixed-precision policy accelerate builds for bf16, each layer wrapped as fsdp.yaml does, after a step's
    backward (which leaves them sharded, as trainer.train() does). Casting the head once changed only the fp32
    shard; the forward gathered it in bf16 again and refused the fp32 input ("expected m1 and m2 to have the same
    dtype")."""
    import torch.distributed as dist
    from peft import get_peft_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForSequenceClassification

    from align.config import LoraConfig
    from align.cpu import keep_trainable_in
    from align.modeling import load_tokenizer, peft_lora_config
    from align.reward_model import score_conversations, score_head_in_fp32

    tokenizer = load_tokenizer(tiny_model)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1, dtype=torch.bfloat16)
    base.config.pad_token_id = tokenizer.pad_token_id
    model = get_peft_model(base, peft_lora_config(LoraConfig(r=4), "SEQ_CLS", modules_to_save=["score"]))
    keep_trainable_in(model, torch.float32)  # gpu_training.one_trainable_dtype, under FSDP
    conversations = [[{"role": "user", "content": "How do I sync?"}, {"role": "assistant", "content": c}]
                     for c in ("Open Settings and tap Sync.", "No.")]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
        for layer in model.get_base_model().model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        model(input_ids=torch.tensor([[1, 2, 3]])).logits.float().sum().backward()
        head = model.get_base_model().score.modules_to_save["default"]
        assert type(head.weight).__name__ == "DTensor"  # sharded, as at the end of training
        in_bf16 = score_conversations(model, tokenizer, conversations)
        model(input_ids=torch.tensor([[1, 2, 3]])).logits.float().sum().backward()  # sharded again

        score_head_in_fp32(model)
        seen = []
        head.register_forward_hook(lambda module, args, out: seen.append((args[0].dtype, module.weight.dtype, out.dtype)))
        in_fp32 = score_conversations(model, tokenizer, conversations)
    finally:
        dist.destroy_process_group()
    assert seen == [(torch.bfloat16, torch.bfloat16, torch.float32)]  # handed and gathered in bf16, computed in fp32
    assert in_fp32 == pytest.approx(in_bf16, abs=0.02)  # the same head, its output no longer rounded to bf16


def test_a_kept_tie_is_trained_as_half_not_as_a_win_for_its_first_answer(tmp_path):
    """export ties=margin0 keeps a tie with its first answer as 'chosen': trained as a hard label, that answer
    would be taught to win. It goes to the loss as p_chosen 1/2; decided pairs stay hard (1)."""
    from datasets import Dataset, DatasetDict

    from align.config import RewardStageConfig
    from align.recipes.reward import loss_columns

    rows = [{"prompt": [{"role": "user", "content": f"Q{i}?"}], "chosen": [{"role": "assistant", "content": "a"}],
             "rejected": [{"role": "assistant", "content": "b"}], "margin": 0.0 if i % 2 else 1.0, "tie": bool(i % 2),
             "weight": None, "p_chosen": None} for i in range(6)]
    data = DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:2])})
    out, weighting = loss_columns(data, RewardStageConfig(), tmp_path / "prefs")
    assert weighting == "off" and out["train"]["p_chosen"] == [1.0, 0.5] * 3 and out["test"]["p_chosen"] == [1.0, 0.5]
    assert "weight" not in out["train"].column_names


def test_a_column_some_pairs_carry_is_read_in_every_split_whichever_pairs_land_where(tmp_path, caplog):
    """Each split's columns came from its own rows: with `tie` on some records only and none of them held out,
    `loss_columns` raised KeyError 'tie'; one pair without a `weight` crashed the stage (None / mean) when it
    was held out and switched weighting off without a word when it was in train."""
    import logging

    from align.config import RewardStageConfig
    from align.preferences import load_preferences
    from align.recipes.reward import loss_columns

    rows = [{"prompt": f"Q{i}?", "chosen": f"good {i}", "rejected": f"bad {i}",
             **({"tie": i == 0} if i < 5 else {}), **({"weight": 2.0} if i != 9 else {})} for i in range(10)]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for seed in range(8):  # the tie-less and the weight-less pairs land in train for some seeds, in test for others
        data, _ = load_preferences(path, test_fraction=0.2, seed=seed)
        assert data["train"].column_names == data["test"].column_names
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="align.recipes.reward"):
            out, weighting = loss_columns(data, RewardStageConfig(), path)
        assert weighting == "off" and "9 of the 10 pairs have a 'weight'" in caplog.text
        ties = {row["prompt"][0]["content"]: row["p_chosen"] for split in out.values() for row in split}
        assert ties == {f"Q{i}?": 0.5 if i == 0 else 1.0 for i in range(10)}


def test_the_policy_base_reward_reads_the_token_the_classifier_reads(tiny_model):
    """rl.reward_on_policy_base scores with the hidden state the reward model's own score head was trained on:
    the last token that is not padding. Where pad is EOS and the chat template ends a turn with it (Llama 3's
    <|eot_id|>, Mistral's </s>), that is the token before the EOS, not the EOS itself."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from align.modeling import load_tokenizer
    from align.reward_model import scored_position

    tokenizer = load_tokenizer(tiny_model)
    torch.manual_seed(0)
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1).eval()
    classifier.config.pad_token_id = tokenizer.pad_token_id
    causal = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    causal.model.load_state_dict(classifier.model.state_dict())
    text = tokenizer("Open Settings and tap Sync.", add_special_tokens=False)["input_ids"]
    for ids in (text, text + [tokenizer.pad_token_id]):  # a turn ending in EOS = pad
        with torch.no_grad():
            theirs = classifier(input_ids=torch.tensor([ids])).logits[0, 0]
            hidden = causal(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
        ours = hidden[scored_position(ids, tokenizer.pad_token_id)] @ classifier.score.weight[0]
        assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)
    assert scored_position(text + [tokenizer.pad_token_id], tokenizer.pad_token_id) == len(text) - 1


def test_a_dora_reward_model_on_a_4bit_base_scores_as_trained(tiny_model, tmp_path):
    """A QLoRA+DoRA reward model loaded for scoring (PPO, eval, probes) keeps bitsandbytes' CPU repack off, as
    training did: with it, DoRA reads the repacked 4-bit weights wrongly and the scores are another model's
    (align.cpu.keep_4bit_for_dora)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from align.config import ModelConfig
    from align.modeling import device_plan, load_tokenizer
    from align.reward_model import load_reward_model, reward_base

    torch.manual_seed(4)
    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False,
                                      use_dora=True, task_type="SEQ_CLS"))
    model.save_pretrained(tmp_path / "reward")
    load_tokenizer(tiny_model).save_pretrained(tmp_path / "reward")
    cfg = ModelConfig(name=tiny_model, quantize=True)
    plan = device_plan(cfg)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])
    trained = PeftModel.from_pretrained(reward_base(cfg, plan), str(tmp_path / "reward")).eval()  # repack off
    loaded, _ = load_reward_model(tmp_path / "reward", plan)
    # Only CPUs with AVX512-BF16 repack (the scores below match elsewhere either way): the switch, on any machine
    flags = [m.support_avx512bf16_for_cpu for m in loaded.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert flags and not any(flags)
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        scores = [loaded(input_ids=ids).logits for _ in range(2)]
    assert [round((s - expected).abs().max().item(), 4) for s in scores] == [0, 0]


def test_a_rerun_over_a_finished_folder_leaves_none_of_the_earlier_runs_extras(reward_run, tiny_model, tmp_path):
    """Trained again over a finished reward model that had an SFT copy and heads, with from_sft=false and no heads:
    both go as training starts. They stayed, and loaders took them for the new model's: base + the old SFT under
    a reward adapter trained without it, and heads that passed the uncertainty selection's check."""
    from align.active import HeadEnsemble
    from align.artifacts import HEADS_FILE
    from align.reward_model import load_reward_model, score

    reward_dir, data = reward_run
    run = tmp_path / "run"
    shutil.copytree(reward_dir, run / "reward", ignore=shutil.ignore_patterns("checkpoints"))
    HeadEnsemble(torch.zeros(2, 4), torch.zeros(4), torch.ones(4)).save(run / "reward")
    assert (run / "reward" / "sft_adapter").is_dir()
    assert align(["reward", f"run.dir={run}", f"model.name={tiny_model}", "from_sft=false", f"data.path={data}",
                  "model.quantize=false", "train.max_steps=2", "train.eval_steps=2", *FAST]) == 0
    assert not (run / "reward" / "sft_adapter").exists() and not (run / "reward" / HEADS_FILE).exists()
    model, tokenizer = load_reward_model(run / "reward")
    assert len(score(model, tokenizer, ["Where is Sync?"], ["In Settings."])) == 1


def test_a_reward_model_is_loaded_and_selected_by_what_its_manifest_says(reward_run, tmp_path, monkeypatch):
    """An SFT copy or a heads file in the folder that its align.json says this model was not trained with is an
    earlier run's: not loaded under it (from_sft=false), not taken for its heads (heads=0). A manifest from
    before it recorded them goes by the files, as then."""
    from align import reward_model
    from align.active import HeadEnsemble
    from align.config import ConfigError
    from align.preflight import check_selection_model

    rm = tmp_path / "reward"
    shutil.copytree(reward_run[0], rm, ignore=shutil.ignore_patterns("checkpoints"))
    HeadEnsemble(torch.zeros(2, 4), torch.zeros(4), torch.ones(4)).save(rm)
    manifest = json.loads((rm / "align.json").read_text())
    built = []

    def reward_base(model_cfg, plan, sft=None, *, training=True):
        built.append(sft)
        raise RuntimeError("built")

    monkeypatch.setattr(reward_model, "reward_base", reward_base)
    for recorded, sft in ((False, None), (True, rm / "sft_adapter"), ("absent", rm / "sft_adapter")):
        m = {**manifest, "from_sft": recorded, "config": {**manifest["config"], "heads": 0 if recorded is False else 8}}
        if recorded == "absent":
            del m["from_sft"], m["config"]["heads"]
        (rm / "align.json").write_text(json.dumps(m))
        with pytest.raises(RuntimeError, match="built"):
            reward_model.load_reward_model(rm)
        assert built[-1] == sft, recorded
        assert reward_model.trained_from_sft(rm) is (sft is not None)
        if recorded is False:
            with pytest.raises(ConfigError, match="its align.json says heads=0"):
                check_selection_model("selection_reward_model", str(rm), str(tmp_path))
        else:
            check_selection_model("selection_reward_model", str(rm), str(tmp_path))


def test_trls_held_out_figures_are_logged_as_batch_means_not_as_the_accuracy_over_pairs(reward_run):
    """eval_steps=15 < max_steps=30: TRL evaluates twice in training and logged eval_accuracy (a mean of its
    per-batch means) under the name of the stage's own accuracy over the held-out pairs; metrics.jsonl and W&B
    held both under one key. TRL's are eval_*_batch_mean; eval_accuracy is align's alone."""
    reward_run, _ = reward_run
    rows = read_jsonl(reward_run / "metrics.jsonl")
    ours = [r for r in rows if "eval_accuracy" in r]
    assert len(ours) == 1 and ours[0]["eval_pairs"] == 16, ours
    trls = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in trls] == [15, 30]
    assert all({"eval_accuracy_batch_mean", "eval_margin_batch_mean", "eval_mean_reward_batch_mean"} <= set(r)
               and "eval_margin" not in r for r in trls), trls
