"""The one mapping of our train section onto TRL's argument classes, and resume from the newest checkpoint."""

from __future__ import annotations

import logging
import re
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import pytest

from align.config import ConfigError, PPOStageConfig, SFTStageConfig, load_config
from align.modeling import device_plan
from align.training import final_eval, preference_figures, resume_checkpoint, trl_args


@pytest.mark.parametrize("name", ["SFTConfig", "RewardConfig", "DPOConfig", "GRPOConfig", "RLOOConfig"])
def test_every_trl_config_gets_our_train_section_the_plan_and_the_stages_keys(name, tmp_path):
    import trl

    cfg = load_config(SFTStageConfig, None, ["train.lr=3e-4", "train.max_steps=7", "train.batch_size=8",
                                             "train.eval_steps=3", "train.seed=5", "run.dir=runs/demo",
                                             "run.wandb=disabled"])
    plan = device_plan(cfg.model)
    args = trl_args(getattr(trl, name), cfg.train, plan, cfg.run, "stage", tmp_path, has_eval=True, save_steps=6)
    assert (args.output_dir, args.learning_rate, args.max_steps, args.seed) == (str(tmp_path / "checkpoints"), 3e-4, 7, 5)
    assert args.per_device_train_batch_size == 8 and args.eval_steps == 3 and args.eval_strategy == "steps"
    assert args.save_steps == 6  # the stage's own key wins over the shared one (eval_steps)
    assert args.run_name == "demo/stage" and args.report_to == []
    assert args.bf16 is plan.bf16 and args.gradient_checkpointing is plan.gradient_checkpointing  # not TRL's defaults
    assert not args.bf16 and args.use_cpu  # the plan on this CPU machine
    # Checkpointing by transformers 5's name (its old one warns at every stage), read by TRL under either
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        on = trl_args(getattr(trl, name), cfg.train, replace(plan, gradient_checkpointing=True), cfg.run, "stage",
                      tmp_path, has_eval=True)
    assert on.activation_checkpointing is on.gradient_checkpointing is True
    assert not [str(w.message) for w in caught if "checkpointing" in str(w.message)]


def test_only_sft_keeps_the_checkpoint_picked_on_its_held_out_set(tmp_path):
    """The reward model's and DPO's held-out figures are their verdict (and the PPO gate's): a checkpoint
    picked on those pairs would report its own selection. They keep their last step; sft its best loss."""
    import trl

    cfg = load_config(SFTStageConfig, None, ["train.max_steps=8", "train.eval_steps=2", "run.wandb=disabled"])
    keeps = {stage: trl_args(config, cfg.train, device_plan(cfg.model), cfg.run, stage, tmp_path,
                             has_eval=True).load_best_model_at_end
             for stage, config in (("sft", trl.SFTConfig), ("reward", trl.RewardConfig), ("dpo", trl.DPOConfig))}
    assert keeps == {"sft": True, "reward": False, "dpo": False}


def test_held_out_pairs_are_scored_once_when_no_step_evaluates(tmp_path):
    # eval_steps past the last step: no evaluation during training (transformers would still score the
    # set at the last step, and the stage again after); the stage's own evaluation is the only one.
    cfg = load_config(SFTStageConfig, None, ["train.max_steps=8", "train.eval_steps=100", "run.wandb=disabled"])
    args = trl_args(__import__("trl").DPOConfig, cfg.train, device_plan(cfg.model), cfg.run, "dpo", tmp_path,
                    has_eval=True)
    assert args.eval_strategy == "no" and not args.load_best_model_at_end


def test_final_eval_reuses_the_trainers_evaluation_of_the_model_it_ended_with():
    from types import SimpleNamespace

    calls = []
    history = [{"step": 5, "eval_loss": 0.5, "eval_acc": 0.8, "epoch": 1.0}, {"step": 10, "loss": 0.3},
               {"step": 10, "eval_loss": 0.6, "eval_acc": 0.7, "epoch": 2.0}]

    def trainer(best, best_step, log):
        return SimpleNamespace(args=SimpleNamespace(load_best_model_at_end=best),
                               state=SimpleNamespace(global_step=10, best_global_step=best_step, log_history=log),
                               evaluate=lambda: calls.append(1) or {"eval_loss": 9.0})

    assert final_eval(trainer(True, 5, history)) == {"eval_loss": 0.5, "eval_acc": 0.8}  # the best step's model
    assert final_eval(trainer(False, None, history)) == {"eval_loss": 0.6, "eval_acc": 0.7}  # the last step's
    assert not calls
    assert final_eval(trainer(False, None, history[:2])) == {"eval_loss": 9.0} and calls == [1]  # none logged


def test_dpo_heldout_figures_count_each_pair_once():
    """The quickstart's case: 27 held-out pairs evaluated as batches of 12, 12 and 3, right on 9, 6 and 3 of them.
    TRL's mean of per-batch means says 75.0 % (the last 3 pairs weigh as much as 12); over pairs it is 18/27."""
    right = [True] * 9 + [False] * 3 + [True] * 6 + [False] * 6 + [True] * 3
    # policy log-probs move the chosen answer up by 2 nats where right, down by 1 where wrong; the reference's
    # (the SFT's) margin is 0.5 everywhere
    chosen = [-10.0 + (2.0 if r else -1.0) for r in right]
    rejected = [-10.5] * 27
    ref_chosen, ref_rejected = [-10.0] * 27, [-10.5] * 27
    groups = [f"prompt {i // 5}" for i in range(27)]  # 6 prompts: 5 pairs each, the last 2
    figures = preference_figures(chosen, rejected, ref_chosen, ref_rejected, groups=groups, beta=0.1)
    batch_means = [sum(b) / len(b) for b in (right[:12], right[12:24], right[24:])]
    assert sum(batch_means) / 3 == pytest.approx(0.75)  # what TRL reports
    assert figures["heldout_accuracy"] == pytest.approx(18 / 27)
    assert figures["heldout_reward_margin"] == pytest.approx(0.1 * (18 * 2.0 - 9 * 1.0) / 27)
    assert figures["heldout_logp_margin_sft"] == pytest.approx(0.5)
    assert figures["heldout_logp_margin_dpo"] == pytest.approx(0.5 + (18 * 2.0 - 9 * 1.0) / 27)
    assert (figures["heldout_pairs"], figures["heldout_prompts"], figures["heldout_ties"]) == (27, 6, 0)
    lo, hi = figures["heldout_accuracy_ci"]
    assert 0 < lo < 18 / 27 < hi < 1
    # A tie an export kept has no right answer: in no figure
    tied = preference_figures(chosen, rejected, ref_chosen, ref_rejected, groups=groups, beta=0.1,
                              ties=[i >= 24 for i in range(27)])
    assert tied["heldout_accuracy"] == pytest.approx(15 / 24) and (tied["heldout_pairs"], tied["heldout_ties"]) == (24, 3)
    none = preference_figures(chosen[:2], rejected[:2], ref_chosen[:2], ref_rejected[:2], groups=groups[:2], beta=0.1,
                              ties=[True, True])
    assert none["heldout_accuracy"] is None and none["heldout_ties"] == 2


def test_a_gather_of_rows_of_any_length_keeps_each_processs_rows_once():
    """gathers_of_any_size, as the second of two processes sees it: its 4 rows and the first's 3 (a ranking batch
    keeps rankings whole, so the processes' batches differ). The all-gather needs one shape, so each side is
    padded to 4; the padding must not come back as pairs (7 rows, each process's values, in rank order)."""
    import torch

    from align.training import gathers_of_any_size

    first = torch.tensor([[1.0, 1.5], [2.0, 2.5], [3.0, 3.5]])
    ours = torch.tensor([[4.0, 4.5], [5.0, 5.5], [6.0, 6.5], [7.0, 7.5]])

    class TwoProcesses:  # an all-gather of the first process's tensor (same shape, zero-padded) with ours
        num_processes = 2

        def gather(self, tensor):
            if tensor.dim() == 0:
                return torch.stack([tensor, tensor])
            if tensor.dtype == torch.long and tensor.shape == (1,):  # the lengths
                return torch.cat([torch.tensor([len(first)]), tensor])
            theirs = tensor.new_zeros(tensor.shape)
            theirs[:len(first)] = first
            return torch.cat([theirs, tensor])

    accelerator = TwoProcesses()
    with gathers_of_any_size(accelerator):
        assert torch.equal(accelerator.gather(ours), torch.cat([first, ours]))
        assert accelerator.gather(ours[:3]).tolist() == [*first.tolist(), *ours[:3].tolist()]
        assert accelerator.gather(torch.tensor(2.0)).tolist() == [2.0, 2.0]  # a scalar: the plain gather
    assert "gather" not in accelerator.__dict__  # the class's own again


def test_a_run_resumed_to_train_longer_takes_its_first_step_at_the_new_schedules_rate():
    """Resumed at step 2 with max_steps raised from 2 to 4 (the same train.lr): the Trainer restores the optimizer
    at the old schedule's end (0 after a linear decay to 2 steps); the first resumed step must train at the new
    schedule's rate for step 2, as a fresh 4-step run does (it trained at 0). It logs, evaluates and saves at this
    run's steps, not those of the checkpoint's trainer_state.json."""
    from types import SimpleNamespace

    import torch
    from transformers import TrainerState, get_linear_schedule_with_warmup

    from align.training import ThisRunsSettings

    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([weight], lr=1e-3)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, 4)  # the resumed run's schedule: 4 steps
    fresh = [scheduler.get_last_lr()[0]]
    for _ in range(3):
        optimizer.step()
        scheduler.step()
        fresh.append(scheduler.get_last_lr()[0])
    # As restored from checkpoint-2 of the 2-step run: its schedule's position, and its rate at the end, 0
    scheduler.last_epoch = 2
    optimizer.param_groups[0]["lr"] = 0.0
    args = SimpleNamespace(learning_rate=1e-3, logging_steps=1, eval_steps=3, save_steps=3)
    state = TrainerState(global_step=2, max_steps=4, logging_steps=5, eval_steps=2, save_steps=2)  # the checkpoint's
    ThisRunsSettings().on_train_begin(args, state, None, optimizer=optimizer, lr_scheduler=scheduler)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(fresh[2]) == pytest.approx(5e-4)
    assert (state.logging_steps, state.eval_steps, state.save_steps) == (1, 3, 3)  # this run's, not the checkpoint's


def test_grpo_maps_the_rl_keys(tmp_path):
    from align.recipes.grpo import grpo_args

    cfg = load_config(PPOStageConfig, None, ["algo=rloo", "rl.rollout_prompts=8", "rl.num_generations=4",
                                             "rl.kl_coef=0.02", "rl.save_steps=0", "train.max_steps=6",
                                             "generation.max_new_tokens=20", "run.wandb=disabled"])
    args = grpo_args(cfg, device_plan(cfg.model), tmp_path)
    assert type(args).__name__ == "RLOOConfig"
    assert (args.per_device_train_batch_size, args.num_generations, args.beta) == (8, 4, 0.02)
    assert (args.max_completion_length, args.save_steps, args.gradient_accumulation_steps) == (20, 6, 1)
    assert args.disable_dropout  # as align's PPO: ratios and KL without dropout noise


def test_grpo_with_vllm_on_a_4bit_base_warns_of_trls_weight_sync(tmp_path, caplog):
    """TRL loads the merged policy into a bitsandbytes vLLM engine each step, which its issues report failing with
    shape mismatches: not run here (no GPU), so said at start with the key that avoids it."""
    from dataclasses import replace

    from align.recipes.grpo import grpo_args

    cfg = load_config(PPOStageConfig, None, ["algo=grpo", "generation.backend=vllm", "run.wandb=disabled"])
    for quantize, warned in ((True, True), (False, False)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="align.recipes.grpo"):
            grpo_args(cfg, replace(device_plan(cfg.model), quantize=quantize), tmp_path)
        assert ("set model.quantize=false (LoRA on the bf16 base)" in caplog.text) is warned


def test_grpo_says_which_ppo_settings_it_ignores():
    from align.recipes.grpo import ignored_settings

    quick = load_config(PPOStageConfig, Path(__file__).resolve().parents[1] / "configs/quickstart/ppo.yaml", ["algo=grpo"])
    assert {"rl.whiten_rewards", "rl.score_clip", "rl.kl_control"} <= set(ignored_settings(quick))
    # the cut-answer penalty is on by default under PPO: said as long as it is on, as GRPO and RLOO have none
    assert ignored_settings(load_config(PPOStageConfig, None, ["algo=grpo"])) == ["rl.missing_eos_penalty"]
    assert ignored_settings(load_config(PPOStageConfig, None, ["algo=grpo", "rl.missing_eos_penalty=0"])) == []


def test_grpo_splits_a_steps_completions_between_the_processes_as_ppo_its_prompts(tmp_path, monkeypatch):
    import align.recipes.grpo as grpo

    cfg = load_config(PPOStageConfig, None, ["algo=grpo", "rl.rollout_prompts=8", "rl.num_generations=4",
                                             "run.wandb=disabled"])
    monkeypatch.setattr(grpo, "_world", lambda: 2)  # (WORLD_SIZE=2 would start torch.distributed here)
    grpo.check(cfg)
    assert grpo.grpo_args(cfg, device_plan(cfg.model), tmp_path).per_device_train_batch_size == 4  # 8 in all
    monkeypatch.setattr(grpo, "_world", lambda: 3)
    with pytest.raises(ConfigError, match="rl.rollout_prompts=8: .* split between 3 processes"):
        grpo.check(cfg)


def test_resume_latest_is_the_highest_step_not_the_last_name(tmp_path, caplog):
    assert resume_checkpoint(tmp_path, "latest") is None  # no checkpoints/ yet: from scratch
    for step in (2, 10, 9):
        (tmp_path / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoints" / "checkpoint-99.tmp").mkdir()
    with caplog.at_level(logging.INFO, logger="align.artifacts"):
        assert resume_checkpoint(tmp_path, "latest") == str(tmp_path / "checkpoints" / "checkpoint-10")
    assert "resuming from" in caplog.text and "checkpoint-10" in caplog.text
    assert resume_checkpoint(tmp_path, "/some/checkpoint-3") == "/some/checkpoint-3"
    assert Path(resume_checkpoint(tmp_path, "auto")).name == "checkpoint-10"
    assert resume_checkpoint(tmp_path, None) is None  # from scratch: the earlier run's checkpoints set aside
    assert resume_checkpoint(tmp_path, "latest") is None


@pytest.mark.parametrize("ppo", [False, True])
def test_resume_auto_is_latest_in_every_stage_before_training_too(ppo):
    """resume_checkpoint took auto as latest in every stage, and preflight refused it in all but PPO's loop."""
    from align.preflight import check_checkpoint

    check_checkpoint("train.resume_from_checkpoint", "auto", ppo=ppo)
    with pytest.raises(ConfigError, match="no such checkpoint folder; give one of the stage's checkpoints/"):
        check_checkpoint("train.resume_from_checkpoint", "newest", ppo=ppo)


def test_metrics_of_a_run_killed_mid_line_read_back_and_resume(tmp_path):
    """A kill while a row is written leaves half a line: read_jsonl leaves it out, and a resumed trainer
    keeps the rows up to its checkpoint's step (the cut line and any step after it go)."""
    from types import SimpleNamespace

    from align.tracking import read_jsonl
    from align.training import MetricsJSONL

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.2}\n{"step": 4, "lo')
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]
    MetricsJSONL(tmp_path).on_train_begin(None, SimpleNamespace(is_world_process_zero=True, global_step=2), None)
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]


def test_resuming_from_an_older_checkpoint_sets_the_abandoned_later_ones_aside(tmp_path, capsys):
    """checkpoint-4 chosen over the newest: 6 and 8 (the run abandoned at 4) move aside, so `latest` and the
    pruning by step see this run's checkpoints; `latest` itself moves nothing."""
    folder = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        (folder / f"checkpoint-{step}").mkdir(parents=True)
        (folder / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert resume_checkpoint(tmp_path, "latest").endswith("checkpoint-8")
    assert resume_checkpoint(tmp_path, str(folder / "checkpoint-4")) == str(folder / "checkpoint-4")
    assert sorted(p.name for p in folder.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    (aside,) = folder.glob("abandoned-*")
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint-6", "checkpoint-8"]
    err = capsys.readouterr().err
    assert "the 2 later checkpoints (a run abandoned there) moved to" in err
    assert f"(1 set-aside run(s) there, 0 MiB: `rm -r {folder}/abandoned-*` once you will not resume them)" in err
    assert resume_checkpoint(tmp_path, "latest").endswith("checkpoint-4")


@pytest.mark.parametrize("kind", ["trl", "ppo"])
def test_latest_continues_only_an_unfinished_run_on_the_same_inputs(kind, tmp_path, capsys, caplog):
    """`latest` over a finished run's checkpoints (at train.max_steps) or a run's on other data (a pipeline rerun
    after the data changed) starts from scratch: resumed, it trained nothing and kept the old weights under a
    manifest naming the new data. Training longer, or at another lr, on the same inputs still resumes."""
    import json

    from align.rl import find_checkpoint

    find = find_checkpoint if kind == "ppo" else resume_checkpoint
    prefix = "step" if kind == "ppo" else "checkpoint"
    folder = tmp_path / "checkpoints"

    def saved(*steps):
        for step in steps:
            (folder / f"{prefix}-{step}").mkdir(parents=True)
            (folder / f"{prefix}-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))

    inputs = {"data": "sha-of-the-data", "base_model": "/models/tiny@1234", "sft": None}
    assert find(tmp_path, None, max_steps=8, trained_on=inputs) is None  # a fresh run records what it trains on
    assert json.loads((folder / "trained_on.json").read_text()) == inputs
    saved(4, 8)
    # Killed after its last checkpoint (no align.json yet: the final save, eval or report cut short): it goes on.
    assert str(find(tmp_path, "latest", max_steps=8, trained_on=inputs)).endswith(f"{prefix}-8")
    manifest = tmp_path / "align.json"
    manifest.write_text("{}")  # finished
    assert str(find(tmp_path, "latest", max_steps=12, trained_on=inputs)).endswith(f"{prefix}-8")  # to train longer
    assert not list(folder.glob("abandoned-*")) and not manifest.exists()  # its manifest went as training began

    for max_steps in (8, -1):  # finished at its max_steps, or by its epochs: asked to train again, from scratch
        manifest.write_text("{}")
        assert find(tmp_path, "latest", max_steps=max_steps, trained_on=inputs) is None
        assert f"checkpoints of a finished run ({prefix}-8; to train it longer" in capsys.readouterr().err
        (aside,) = folder.glob("abandoned-*")
        assert sorted(p.name for p in aside.iterdir()) == [f"{prefix}-4", f"{prefix}-8", "trained_on.json"]
        assert json.loads((folder / "trained_on.json").read_text()) == inputs  # this run's own record
        if max_steps == 8:
            shutil.rmtree(aside)
            saved(4, 8)

    saved(2)
    new_data = {**inputs, "data": "sha-of-other-data"}
    assert find(tmp_path, "latest", max_steps=8, trained_on=new_data) is None
    assert "the 1 checkpoints of a run on other inputs (data differ" in capsys.readouterr().err
    assert not list(folder.glob(f"{prefix}-*")) and len(list(folder.glob("abandoned-*"))) == 2

    # Named by its path, a checkpoint of other inputs is resumed as asked, with a warning.
    saved(2)
    with caplog.at_level(logging.WARNING, logger="align.artifacts"):
        assert str(find(tmp_path, str(folder / f"{prefix}-2"), max_steps=8, trained_on=inputs)) == str(
            folder / f"{prefix}-2")
    assert "was trained on other inputs than this one (data differ" in caplog.text


def test_a_local_model_is_identified_by_what_it_holds_and_an_old_record_still_reads(tmp_path, capsys):
    """model_identity: a folder moved or copied with new mtimes is the same model, one saved over it (same sizes)
    or an artifact made again another. A trained_on.json of before (path@mtime fingerprint) reads: the same
    folder unchanged since resumes, a moved or changed one is set aside, no traceback."""
    import json
    import os

    from align.artifacts import model_fingerprint, model_identity

    base, sft = tmp_path / "base", tmp_path / "run" / "sft"
    for folder in (base, sft):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text('{"hidden_size": 8}')
        (folder / "model.safetensors").write_bytes(b"\1" * 3000)
    (sft / "align.json").write_text(json.dumps({"stage": "sft", "created": "2026-01-01T00:00:00+0000"}))
    ids = model_identity(base), model_identity(sft)
    shutil.copytree(tmp_path / "run", tmp_path / "copy")  # new mtimes
    os.utime(base / "model.safetensors", (1, 1))
    assert (model_identity(base), model_identity(tmp_path / "copy" / "sft")) == ids
    (base / "model.safetensors").write_bytes(b"\2" * 3000)  # saved over, the same shapes
    (sft / "align.json").write_text(json.dumps({"stage": "sft", "created": "2026-01-01T00:00:09+0000"}))
    assert model_identity(base) != ids[0] and model_identity(sft) != ids[1]

    folder = tmp_path / "dpo" / "checkpoints"
    (folder / "checkpoint-2").mkdir(parents=True)
    (folder / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    old = {"data": "sha", "sft": f"{sft}@{model_fingerprint(sft)}"}
    (folder / "trained_on.json").write_text(json.dumps(old))
    ours = {"data": "sha", "sft": model_identity(sft)}
    assert resume_checkpoint(tmp_path / "dpo", "latest", max_steps=8, trained_on=ours).endswith("checkpoint-2")
    assert json.loads((folder / "trained_on.json").read_text()) == ours  # recorded the new way from here on
    (folder / "trained_on.json").write_text(json.dumps({**old, "sft": f"{tmp_path / 'gone'}@{'0' * 16}"}))
    assert resume_checkpoint(tmp_path / "dpo", "latest", max_steps=8, trained_on=ours) is None
    assert "a run on other inputs (sft differ" in capsys.readouterr().err


def test_latest_sets_aside_checkpoints_cut_short_by_a_kill(tmp_path, capsys):
    """A kill while checkpoint-N was saved leaves it without trainer_state.json (written last) or with half of
    it: `latest` resumes from the newest complete one and moves those aside (it crashed on them, run after run)."""
    folder = tmp_path / "checkpoints"
    for step, state in ((2, "{}"), (4, "{}"), (6, None), (8, '{"global_st')):
        (folder / f"checkpoint-{step}").mkdir(parents=True)
        (folder / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"weights")
        if state is not None:
            (folder / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert resume_checkpoint(tmp_path, "latest", max_steps=10) == str(folder / "checkpoint-4")
    assert "the 2 checkpoints cut short while being saved" in capsys.readouterr().err
    (aside,) = folder.glob("abandoned-*")
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint-6", "checkpoint-8"]
    assert sorted(p.name for p in folder.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_a_resume_with_other_settings_says_which_and_goes_on(tmp_path, caplog):
    """A checkpoint resumed under settings its run did not have (another lr, LoRA alpha) goes on, and the log says
    which settings changed; a LoRA of another shape (r) does not load from it: refused before anything is touched
    (it failed with torch's size mismatch after the finished artifact lost its align.json and trained_on.json took
    the settings that could not load). The inputs (data, base model) still decide, the settings never do; run.* and
    the length of training are not settings (training longer is what resume is for)."""
    from align.artifacts import settings_of

    cfg = load_config(SFTStageConfig, None, ["run.wandb=disabled"])
    settings = settings_of(cfg)
    assert settings["train.lr"] == cfg.train.lr and settings["lora.r"] == cfg.lora.r
    assert not [k for k in settings if k.startswith("run.") or k in ("train.max_steps", "data.path", "model.name")]

    inputs = {"data": "sha", "base_model": "tiny"}
    assert resume_checkpoint(tmp_path, "latest", max_steps=8, trained_on={**inputs, "settings": settings}) is None
    (tmp_path / "checkpoints" / "checkpoint-4").mkdir()
    (tmp_path / "checkpoints" / "checkpoint-4" / "trainer_state.json").write_text("{}")
    other = settings_of(load_config(SFTStageConfig, None, ["run.wandb=disabled", "train.lr=1e-5", "lora.alpha=8",
                                                           "train.max_steps=20", "run.dir=elsewhere"]))
    reshaped = settings_of(load_config(SFTStageConfig, None, ["run.wandb=disabled", "lora.r=8", "lora.use_dora=true"]))
    recorded = (tmp_path / "checkpoints" / "trained_on.json").read_text()
    for resume in ("latest", str(tmp_path / "checkpoints" / "checkpoint-4")):
        with pytest.raises(ConfigError, match=rf"train.resume_from_checkpoint={re.escape(resume)}: its checkpoints "
                           rf"hold a LoRA of another shape \(lora.r {cfg.lora.r} -> 8; lora.use_dora False -> True\)"):
            resume_checkpoint(tmp_path, resume, max_steps=20, trained_on={**inputs, "settings": reshaped})
        assert (tmp_path / "checkpoints" / "trained_on.json").read_text() == recorded  # untouched
        with caplog.at_level(logging.WARNING, logger="align.artifacts"):
            found = resume_checkpoint(tmp_path, resume, max_steps=20, trained_on={**inputs, "settings": other})
        assert found == str(tmp_path / "checkpoints" / "checkpoint-4")
        assert f"with settings its run did not have: lora.alpha {cfg.lora.alpha} -> 8; train.lr 0.0002 -> 1e-05" \
            in caplog.text
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="align.artifacts"):  # now recorded as this run's
            resume_checkpoint(tmp_path, resume, max_steps=20, trained_on={**inputs, "settings": other})
        assert "settings its run did not have" not in caplog.text
        resume_checkpoint(tmp_path, None, trained_on={**inputs, "settings": settings})  # the record back
        (tmp_path / "checkpoints" / "checkpoint-4").mkdir(exist_ok=True)
        (tmp_path / "checkpoints" / "checkpoint-4" / "trainer_state.json").write_text("{}")


def test_a_constant_schedule_warms_up_when_a_warmup_is_asked_for(tmp_path):
    """transformers' `constant` schedule takes no warm-up and ignores one given: train.warmup_ratio=0.5 gave a flat
    rate from the first step. With a warm-up asked for it is constant_with_warmup, in a Trainer's schedule (as the
    Trainer builds it from trl_args) and in align ppo's own loop; without one the rate stays flat."""
    import torch
    import trl
    from transformers import get_scheduler

    from align.training import lr_scheduler

    def rates(overrides: list[str]) -> list[list[float]]:
        cfg = load_config(SFTStageConfig, None, ["train.max_steps=4", "train.lr=1e-3", "train.scheduler=constant",
                                                 "run.wandb=disabled", *overrides])
        args = trl_args(trl.SFTConfig, cfg.train, device_plan(cfg.model), cfg.run, "sft", tmp_path, has_eval=False)
        schedules = []
        for build in (lambda opt: get_scheduler(args.lr_scheduler_type, opt, args.get_warmup_steps(4), 4),  # Trainer's
                      lambda opt: lr_scheduler(opt, cfg.train)):  # ppo's
            optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
            scheduler, seen = build(optimizer), []
            for _ in range(4):
                seen.append(scheduler.get_last_lr()[0])
                optimizer.step()
                scheduler.step()
            schedules.append(seen)
        return schedules

    assert rates(["train.warmup_ratio=0.5"]) == [[0.0, 5e-4, 1e-3, 1e-3]] * 2
    assert rates(["train.warmup_ratio=0"]) == [[1e-3] * 4] * 2
    # A warm-up shorter than a step is one step in both, as transformers rounds it up (ppo's rounded it away)
    assert rates(["train.warmup_ratio=0.05"]) == [[0.0, 1e-3, 1e-3, 1e-3]] * 2


def test_liger_kernels_patched_into_transformers_modules_are_undone_when_training_ends(tmp_path):
    """Liger rebinds the model's modeling module's names (LlamaRMSNorm, apply_rotary_pos_emb) as training starts:
    in `align pipeline` every later model ran its kernels too, its manifest saying "liger off". train_from puts
    them back when training ends (run here with a trainer whose train() patches as Liger does)."""
    from types import SimpleNamespace

    from transformers.models.llama import modeling_llama

    from align.training import train_from

    rope, norm = modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaRMSNorm

    def train(resume_from_checkpoint=None):
        modeling_llama.apply_rotary_pos_emb = lambda *a, **k: "liger's"
        modeling_llama.LlamaRMSNorm = type("LigerRMSNorm", (), {})
        return SimpleNamespace(global_step=1)

    for liger in (True, False):
        trainer = SimpleNamespace(args=SimpleNamespace(max_steps=1, use_liger_kernel=liger), train=train)
        try:
            train_from(trainer, None)
            undone = modeling_llama.apply_rotary_pos_emb is rope and modeling_llama.LlamaRMSNorm is norm
        finally:
            modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaRMSNorm = rope, norm
        assert undone == liger  # without Liger nothing is touched (nor looked at)
