"""Align the SFT policy directly on the preference pairs: DPO (or IPO, hinge, robust, ...) with QLoRA.

    align dpo --config configs/quickstart/dpo.yaml
    align dpo run.dir=runs/NAME loss=ipo beta=0.5
    align dpo loss=robust label_smoothing=0.1

One base model in memory (4-bit per the device plan) with the SFT adapter on it twice: as the
trainable policy ("default") and as a frozen copy, the reference ("ref"). The reference is the
SFT policy, not the raw base. TRL's DPOTrainer, handed a PeftModel that already carries an
adapter, makes that frozen "ref" copy itself and uses it for every reference forward (a fresh
`peft_config` instead would make the raw base the reference, silently).

Writes <run.dir>/dpo/: a plain peft adapter (the policy only), loadable with
`PeftModel.from_pretrained(base, dir)` or `AutoPeftModelForCausalLM`, plus tokenizer,
config.yaml, metrics.jsonl and align.json (base model = the SFT's; parents sft + preferences).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from transformers import set_seed
from trl import DPOConfig, DPOTrainer

from alignment import StageError, report
from alignment.artifacts import is_main_process, print_done, stage_dir, write_manifest
from alignment.config import ConfigError, DPOStageConfig, ModelConfig, save_config, to_dict
from alignment.data import file_hash
from alignment.gpu_training import describe_levers, fit_checkpointing, peak_gpu_mib, use_liger
from alignment.modeling import (
    DevicePlan,
    adapter_base_name,
    check_liger,
    device_plan,
    is_adapter_dir,
    load_base_model,
    load_tokenizer,
    speed_up_cpu_training,
)
from alignment.preferences import load_preferences
from alignment.reward_model import trainable_on_cpu
from alignment.tracking import MetricsJSONL, configure_wandb, finish_wandb, log_artifact, report_to

log = logging.getLogger(__name__)

# Losses that read label_smoothing in TRL 1.16 (the flip probability / EXO's epsilon).
SMOOTHED_LOSSES = {"robust", "exo_pair", "aot", "aot_unpaired"}


def check_loss(cfg: DPOStageConfig) -> None:
    """Refuse loss settings TRL would ignore or reject, naming what is allowed."""
    if cfg.beta <= 0:
        raise ConfigError(f"beta: must be > 0, got {cfg.beta}")
    if cfg.label_smoothing and cfg.loss not in SMOOTHED_LOSSES:
        raise ConfigError(f"label_smoothing={cfg.label_smoothing} has no effect with loss={cfg.loss}; it is read by "
                          f"loss {', '.join(sorted(SMOOTHED_LOSSES))} (robust is the cDPO-style noisy-label loss)")
    if cfg.loss == "robust" and not 0 <= cfg.label_smoothing < 0.5:
        raise ConfigError(f"label_smoothing: robust needs a flip probability in [0, 0.5), got {cfg.label_smoothing}")
    if cfg.loss == "exo_pair" and cfg.label_smoothing <= 0:
        raise ConfigError("label_smoothing: exo_pair needs a small epsilon > 0 (the EXO paper uses 1e-3)")


def policy_with_reference(model_cfg: ModelConfig, plan: DevicePlan, sft: Path):
    """The base once, with the SFT adapter as the trainable policy adapter ("default").

    DPOTrainer adds the frozen "ref" copy of it (trl/trainer/dpo_trainer.py: a PeftModel passed
    without peft_config gets `add_adapter("ref", ...)` with the default adapter's weights); TRL
    1.16 has no ref_adapter_name to pass a second loaded copy instead.
    """
    from peft import PeftModel

    base = trainable_on_cpu(load_base_model(model_cfg, plan))  # eval_on_start must not break backward
    return PeftModel.from_pretrained(base, str(sft), is_trainable=True)


def dpo_args(cfg: DPOStageConfig, out: Path, plan: DevicePlan, has_eval: bool) -> DPOConfig:
    return DPOConfig(
        output_dir=str(out / "checkpoints"),
        num_train_epochs=cfg.train.epochs,
        max_steps=cfg.train.max_steps,
        per_device_train_batch_size=cfg.train.batch_size,
        per_device_eval_batch_size=cfg.train.batch_size,
        gradient_accumulation_steps=cfg.train.grad_accum,
        learning_rate=cfg.train.lr,
        lr_scheduler_type=cfg.train.scheduler,
        warmup_steps=cfg.train.warmup_ratio,  # a float < 1 is a fraction of the steps
        weight_decay=cfg.train.weight_decay,
        max_grad_norm=cfg.train.max_grad_norm,
        seed=cfg.train.seed,
        # TRL defaults bf16 and checkpointing on; chosen per device instead (see DevicePlan).
        bf16=plan.bf16,
        fp16=plan.fp16,
        use_cpu=plan.device == "cpu",
        use_liger_kernel=use_liger(cfg.train.liger),
        torch_compile=cfg.train.compile,
        gradient_checkpointing=plan.gradient_checkpointing,
        max_length=cfg.model.max_length,
        loss_type=[cfg.loss],
        beta=cfg.beta,
        label_smoothing=cfg.label_smoothing,
        logging_steps=cfg.train.logging_steps,
        logging_first_step=True,
        # Step 0 on held-out pairs: the SFT policy's log-probs, the "before" of every figure.
        eval_on_start=has_eval and cfg.eval_on_start,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.train.eval_steps,
        save_strategy="steps",
        save_steps=cfg.train.eval_steps,
        save_total_limit=cfg.train.save_total_limit,
        load_best_model_at_end=has_eval,
        metric_for_best_model="eval_loss" if has_eval else None,
        report_to=report_to(cfg.run),
        run_name=f"{Path(cfg.run.dir).name}/dpo",
        dataloader_num_workers=0,
        # Under DDP every trainable (LoRA) weight takes part in each step (the frozen "ref" copy has
        # none); the default search for unused ones costs an extra graph pass per step.
        ddp_find_unused_parameters=False,
    )


def main(cfg: DPOStageConfig) -> Path:
    # --- resolve inputs ---------------------------------------------------------------------
    check_loss(cfg)
    check_liger(cfg.train.liger)  # a machine that cannot, refused before anything else
    out = stage_dir(cfg.run.dir, "dpo")
    sft = Path(cfg.sft) if cfg.sft else stage_dir(cfg.run.dir, "sft")
    if not is_adapter_dir(sft):
        raise StageError(f"no SFT adapter at {sft}: DPO starts from the SFT policy and keeps it as the reference; "
                         f"run `align sft run.dir={cfg.run.dir}` first or pass sft=<adapter folder>")
    data_path = Path(cfg.data.path) if cfg.data.path else stage_dir(cfg.run.dir, "preferences")
    if not data_path.exists():
        raise StageError(f"no preference data at {data_path}: run `align export run.dir={cfg.run.dir}` first, "
                         "or pass data.path=<folder or .jsonl>")
    model_cfg = replace(cfg.model, name=adapter_base_name(sft))  # the SFT's base, from its manifest
    plan = device_plan(model_cfg)
    log.info(plan.describe())
    set_seed(cfg.train.seed)

    # --- data -------------------------------------------------------------------------------
    data, data_report = load_preferences(data_path, test_fraction=cfg.data.test_fraction, seed=cfg.train.seed,
                                         on_error=cfg.data.on_error)
    train, test = data["train"], data.get("test")
    tokenizer = load_tokenizer(str(sft))  # the SFT's chat template and pad token

    # --- model ------------------------------------------------------------------------------
    model = policy_with_reference(model_cfg, plan, sft)
    # A step's backward holds batch_size pairs (chosen + rejected); the reference's forward keeps nothing.
    plan = fit_checkpointing(plan, cfg.model.gradient_checkpointing, model,
                             tokens_per_step=2 * cfg.train.batch_size * cfg.model.max_length)
    levers = describe_levers(plan, liger=use_liger(cfg.train.liger), compile=cfg.train.compile)
    log.info(levers)

    # --- trainer ----------------------------------------------------------------------------
    configure_wandb(cfg.run, "dpo")
    trainer = DPOTrainer(
        model=model,
        args=dpo_args(cfg, out, plan, has_eval=test is not None),
        train_dataset=train,
        eval_dataset=test,
        processing_class=tokenizer,
        callbacks=[MetricsJSONL(out)],
    )
    # Guard the one thing DPO must get right: without "ref" (a TRL change, a peft version without
    # several adapters) TRL falls back to the adapter-disabled raw base as the reference.
    policy = trainer.model
    if "ref" not in policy.peft_config:
        raise StageError("DPOTrainer made no frozen 'ref' copy of the SFT adapter, so the reference would be the raw "
                         "base; refusing (check the installed trl/peft against pyproject.toml)")
    if plan.device == "cpu":
        # TRL rounds a quantized model's trainable adapter to bf16 (the QLoRA GPU recipe). On CPU
        # we train in fp32, so restore the policy from the exact fp32 "ref" copy: step 0 is then
        # exactly the SFT policy, and the adapter stays fp32 (see speed_up_cpu_training).
        for name, param in policy.named_parameters():
            if ".default." in name:
                param.data = policy.get_parameter(name.replace(".default.", ".ref.")).data.to(torch.float32).clone()
        speed_up_cpu_training(policy)

    # --- train ------------------------------------------------------------------------------
    resume = cfg.train.resume_from_checkpoint
    if resume == "latest":
        found = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        resume = str(found[-1]) if found else None
        log.info("resuming from %s", resume or "scratch (no checkpoint found)")
    result = trainer.train(resume_from_checkpoint=resume)
    metrics = {"train_loss": result.training_loss, "global_step": result.global_step, **{
        k: v for k, v in result.metrics.items() if k.startswith("train_")}}
    if test is not None:
        metrics.update(trainer.evaluate())
        # The policy's own log-prob margin (chosen - rejected) on held-out pairs, SFT vs now. The
        # reference is the SFT policy and TRL's rewards are beta * (log pi - log ref), averaged
        # like the log-probs, so the SFT's margin is exactly the policy's minus reward margin / beta.
        margin = metrics["eval_logps/chosen"] - metrics["eval_logps/rejected"]
        metrics["heldout_logp_margin_sft"] = margin - metrics["eval_rewards/margins"] / cfg.beta
        metrics["heldout_logp_margin_dpo"] = margin
        log.info("held-out: implicit reward accuracy %.3f, margin %.3f; policy log-prob margin %.2f (SFT) -> %.2f",
                 metrics.get("eval_rewards/accuracies", float("nan")), metrics.get("eval_rewards/margins", float("nan")),
                 metrics["heldout_logp_margin_sft"], metrics["heldout_logp_margin_dpo"])

    # --- save -------------------------------------------------------------------------------
    # The policy adapter alone, as peft's "default": a plain adapter folder on the SFT's base.
    # Every rank calls save_model: under ZeRO-3 or FSDP the sharded weights are gathered first.
    # It writes each adapter; the frozen "ref" copy is the SFT adapter, already a parent.
    trainer.save_model(str(out))
    if is_main_process():
        shutil.rmtree(out / "ref", ignore_errors=True)
        tokenizer.save_pretrained(str(out))
    cfg = replace(cfg, model=model_cfg)  # what ran: the SFT's base
    save_config(cfg, out / "config.yaml")
    parents = {"sft": sft, "preferences": data_path}
    write_manifest(
        out, stage="dpo", config=to_dict(cfg), base_model=model_cfg.name, parents=parents, metrics=metrics,
        device_plan=levers, gpu_peak_mib=peak_gpu_mib(), reference="sft adapter (frozen copy)", max_length=cfg.model.max_length,
        data={"path": str(data_path), "sha256": file_hash(data_path), "format": data_report.format,
              "split": data_report.split, "train": len(train), "test": len(test) if test else 0,
              "skipped": data_report.skipped},
    )
    log_artifact("dpo", out, cfg.run.dir, parents)
    finish_wandb()

    # --- report -----------------------------------------------------------------------------
    html = report.write_report(cfg.run.dir)
    log.info("report: %s", html)
    print_done("dpo", out, f"align eval run.dir={cfg.run.dir}")
    return out
