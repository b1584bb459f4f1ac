"""Each stage's printed `next:` hint, run as printed: from `align sft --config <dir>/sft.yaml` to eval, every
hinted command keeps the config family (the sibling <stage>.yaml), `align label`'s too, and the reward stage
hints a command that runs, not the ppo its gate refuses."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import yaml

from align.cli import main as align


def configs(folder: Path, tiny_model: str, data: Path, run: Path) -> None:
    """A config family like configs/quickstart/, tiny: settings a hinted command without --config would lose."""
    family = {
        "sft": {"model": {"name": tiny_model, "quantize": False, "max_length": 128}, "data": {"path": str(data)},
                "train": {"max_steps": 4, "batch_size": 4, "lr": 5e-3, "eval_steps": 2}},
        "sample": {"prompts": str(data), "num_prompts": 6, "k": 3, "generation": {"max_new_tokens": 8}},
        # no held-out pairs: PPO's gate (min_reward_accuracy) refuses a reward model it cannot measure
        "export": {"test_fraction": 0.0},
        "reward": {"model": {"max_length": 128}, "data": {"test_fraction": 0.0}, "train": {"max_steps": 2, "batch_size": 4}},
        "dpo": {"model": {"max_length": 128}, "train": {"max_steps": 2, "batch_size": 4}},
        "ppo": {"min_reward_accuracy": 0.7},
        "eval": {"prompts": str(data), "num_prompts": 4, "scorer": "support_style", "bootstrap": 50, "kl_samples": 0,
                 "generation": {"max_new_tokens": 8}},
    }
    folder.mkdir()
    for stage, settings in family.items():
        (folder / f"{stage}.yaml").write_text(yaml.safe_dump({**settings, "run": {"dir": str(run), "wandb": "disabled"}}))


def hinted(out: str) -> str:
    """The command a stage's `next:` line says to run: the first one, or the unattended label's."""
    line = next(line for line in out.splitlines() if line.strip().startswith("next: ")).strip().removeprefix("next: ")
    if "(unattended: " in line:
        return line.split("(unattended: ")[1].rstrip(")")
    return line.split("   ")[0]


def test_every_hint_runs_as_printed_with_the_config_family(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Ticket {i}: how do I {t}?", "input": "",
                                        "output": "Thanks for asking! Open Settings." if i % 2 else f"Open Settings, then {t}."})
                            + "\n" for i, t in enumerate(["sync", "export", "share a note", "find tags"] * 3)))
    run, family = tmp_path / "run", tmp_path / "family"
    configs(family, tiny_model, data, run)
    command, ran = f"align sft --config {family / 'sft.yaml'}", []
    while command.startswith("align "):
        ran.append(command)
        assert align(shlex.split(command)[1:]) == 0, command
        out = capsys.readouterr().out
        if command.startswith("align reward"):
            assert ("PPO's gate refuses this reward model at min_reward_accuracy=0.7; to run it anyway: align ppo "
                    f"--config family/ppo.yaml run.dir={run} min_reward_accuracy=0") in out
        command = hinted(out)
    assert [c.split()[1] for c in ran] == ["sft", "sample", "label", "export", "reward", "dpo", "eval"]
    # the label hint names the export.yaml beside the sample's --config relative to here, as a user pastes it
    assert ran[:2] == [f"align sft --config {family / 'sft.yaml'}", f"align sample --config {family / 'sample.yaml'} "
                                                                     f"run.dir={run}"]
    assert all(c.startswith(f"align {c.split()[1]} --config family/{c.split()[1]}.yaml run.dir={run}") for c in ran[3:])
    assert command == f"open {run / 'report.html'}"
    # what each hinted stage ran with is its sibling's, not the built-in defaults
    assert yaml.safe_load((run / "preferences" / "config.yaml").read_text())["test_fraction"] == 0.0
    assert yaml.safe_load((run / "reward" / "config.yaml").read_text())["train"]["max_steps"] == 2
    assert yaml.safe_load((run / "eval" / "config.yaml").read_text())["scorer"] == "support_style"
    sample = json.loads((run / "sample" / "align.json").read_text())
    assert sample["config_file"] == str(family / "sample.yaml")


def test_the_reward_hint_names_every_gate_setting_that_refuses_it(tmp_path, monkeypatch):
    """PPO refuses a reward model a phrase appended to the worse answer flips (its probes): the key it names is the
    one `align ppo` reads, with the value of the ppo.yaml beside this command's --config. When the accuracy gate
    refuses it too, both are named: a hint overriding only one would be refused on the other."""
    from align import artifacts
    from align.recipes.reward import ppo_gate_refuses, run_anyway
    from align.reward_model import gate

    probe = {"edit": "hope_end", "what": "appending 'Hope this helps!'", "rate": 0.35, "flips": 7, "of": 20,
            "basis": "every flip"}
    reward = tmp_path / "reward"
    reward.mkdir()
    (reward / "adapter_config.json").write_text("{}")
    (reward / "align.json").write_text(json.dumps({"stage": "reward", "metrics": {"eval_accuracy": 0.74},
                                                   "probes": {"gate": probe}}))
    monkeypatch.setattr(artifacts, "config_folder", None)
    assert ppo_gate_refuses(reward) == ["max_probe_flip_rate=0.25"]
    (tmp_path / "ppo.yaml").write_text("max_probe_flip_rate: 0.4\nmin_reward_accuracy: 0.8\n")
    monkeypatch.setattr(artifacts, "config_folder", tmp_path)
    assert ppo_gate_refuses(reward) == ["min_reward_accuracy=0.8"]
    (tmp_path / "ppo.yaml").write_text("max_probe_flip_rate: 0.4\n")
    assert ppo_gate_refuses(reward) == []
    (tmp_path / "ppo.yaml").write_text("min_reward_accuracy: 0.8\n")
    assert ppo_gate_refuses(reward) == ["min_reward_accuracy=0.8", "max_probe_flip_rate=0.25"]
    # the hint's `align ppo ... <overrides>` is one the gate lets through
    assert run_anyway(ppo_gate_refuses(reward)) == "min_reward_accuracy=0 max_probe_flip_rate=1"
    gate(reward, 0.0, 1.0)


def test_the_reward_hint_names_the_sft_and_pairs_it_was_trained_from_outside_the_run(tmp_path):
    """`align reward run.dir=R sft=/other/sft data.path=/x/prefs.jsonl` hinted `align dpo run.dir=R` and `align ppo
    run.dir=R`, which failed "no SFT adapter at R/sft": the hint names what is not the run's own, as DPO's does."""
    from align.config import DPOStageConfig, PPOStageConfig, load_config
    from align.recipes.reward import next_hint

    run, sft, prefs = tmp_path / "my run", tmp_path / "other" / "sft", tmp_path / "x" / "prefs.jsonl"
    own = next_hint(run, run / "sft", run / "preferences", [])
    assert own.split("   ")[0] == f"align ppo run.dir={shlex.quote(str(run))}"
    assert next_hint(run, run / "sft", run / "preferences", ["min_reward_accuracy=0.7"]).startswith(
        f"align dpo run.dir={shlex.quote(str(run))}   (PPO's gate refuses")

    ppo = shlex.split(next_hint(run, sft, prefs, []).split("   ")[0])
    assert ppo[:2] == ["align", "ppo"] and load_config(PPOStageConfig, None, ppo[2:]).sft == str(sft)
    hint = next_hint(run, sft, prefs, ["min_reward_accuracy=0.7"])
    dpo = load_config(DPOStageConfig, None, shlex.split(hint.split("   ")[0])[2:])
    assert (dpo.run.dir, dpo.sft, dpo.data.path) == (str(run), str(sft), str(prefs))
    anyway = shlex.split(hint.split("to run it anyway: ")[1].split(";")[0])
    assert anyway[:2] == ["align", "ppo"] and load_config(PPOStageConfig, None, anyway[2:]).sft == str(sft)


def test_the_rl_hint_runs_eval_with_the_scorer_it_trained_against(tiny_model, tmp_path, monkeypatch, capsys):
    """`align ppo scorer=...` in a run with no reward model: the hinted eval carries the scorer (eval's default
    judge, reward/, is not there). With no SFT adapter (a fresh LoRA) eval has no baseline: the hint is no eval
    command that fails but what to do, and what it says runs as printed."""
    import re

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Ticket {i}: how do I {t}?", "input": "",
                                        "output": "Thanks for asking! Open Settings." if i % 2 else f"Open Settings, then {t}."})
                            + "\n" for i, t in enumerate(["sync", "export", "share a note", "find tags"] * 2)))
    family = tmp_path / "family"
    family.mkdir()
    fast = {"run": {"wandb": "disabled"}}
    for stage, settings in {
        "sft": {"model": {"name": tiny_model, "quantize": False, "max_length": 128}, "data": {"path": str(data)},
                "train": {"max_steps": 2, "batch_size": 4}},
        "ppo": {"model": {"name": tiny_model, "quantize": False}, "prompts": str(data), "scorer": "support_style",
                "train": {"max_steps": 1}, "rl": {"rollout_prompts": 4}, "lora": {"r": 4},
                "generation": {"max_new_tokens": 8, "temperature": 0.5}},
        "eval": {"prompts": str(data), "num_prompts": 4, "bootstrap": 50, "kl_samples": 0,
                 "generation": {"max_new_tokens": 8}},  # no scorer: the hint must carry it
    }.items():
        (family / f"{stage}.yaml").write_text(yaml.safe_dump({**settings, **fast}))

    # from an SFT adapter, no reward/: the hint is eval with PPO's scorer
    assert align(["sft", "--config", "family/sft.yaml", "run.dir=acc"]) == 0
    capsys.readouterr()
    assert align(["ppo", "--config", "family/ppo.yaml", "run.dir=acc"]) == 0
    command = hinted(capsys.readouterr().out)
    assert command == "align eval --config family/eval.yaml run.dir=acc scorer=support_style"
    assert align(shlex.split(command)[1:]) == 0, command
    capsys.readouterr()

    # a fresh LoRA: no eval command that fails, but the SFT to train on that base and the eval after it
    assert align(["ppo", "--config", "family/ppo.yaml", "run.dir=fresh"]) == 0
    line = hinted(capsys.readouterr().out)
    assert not line.startswith("align ") and line.startswith(f"ppo started from a fresh LoRA on {tiny_model}")
    sft, then = re.search(r"\((align sft [^)]*)\), then (align eval [^;]*);", line).groups()
    assert sft == f"align sft --config family/sft.yaml run.dir=fresh model.name={tiny_model}"
    assert then == "align eval --config family/eval.yaml run.dir=fresh scorer=support_style"
    for command in (sft, then):
        assert align(shlex.split(command)[1:]) == 0, command


def test_a_stage_missing_its_upstream_names_it_with_the_config_family(tmp_path, capsys):
    """`align sample --config <dir>/sample.yaml` with no SFT said "run `align sft run.dir=...` first": pasted, that ran
    sft with its built-in defaults (max_steps -1), not the family's. The command it names keeps the family now,
    as a next: hint does; without --config it stays bare."""
    folder, run = tmp_path / "family", tmp_path / "run"
    (tmp_path / "data.jsonl").write_text('{"prompt": "How do I sync?"}\n')
    configs(folder, "unused-model", tmp_path / "data.jsonl", run)
    assert align(["sample", "--config", str(folder / "sample.yaml"), f"run.dir={run}"]) == 1
    said = capsys.readouterr().err
    assert f"run `align sft --config {folder / 'sft.yaml'} run.dir={run}` first" in said, said
    assert align(["dpo", "--config", str(folder / "dpo.yaml"), f"run.dir={run}"]) == 1
    assert f"align sft --config {folder / 'sft.yaml'} run.dir={run}" in capsys.readouterr().err
    assert align(["sample", f"run.dir={run}"]) == 1
    assert f"run `align sft run.dir={run}` first" in capsys.readouterr().err
