"""Instruction SFT with QLoRA (4-bit NF4 base + LoRA), plain LoRA or DoRA, on GPU or CPU.

    align sft --config configs/quickstart/sft.yaml
    align sft --config configs/quickstart/sft.yaml lora.use_dora=true model.quantize=false

Writes <run.dir>/sft/: the adapter (peft), tokenizer, config.yaml, metrics.jsonl, align.json.
The saved adapter is the best checkpoint by held-out loss when there is a held-out split.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import set_seed
from trl import SFTConfig, SFTTrainer

from alignment import report
from alignment.artifacts import print_done, stage_dir, write_manifest
from alignment.config import SFTStageConfig, save_config, to_dict
from alignment.data import file_hash, load_sft_dataset
from alignment.gpu_training import (
    describe_levers,
    fit_checkpointing,
    peak_gpu_mib,
    use_liger,
    use_padding_free,
)
from alignment.modeling import (
    check_liger,
    device_plan,
    load_base_model,
    load_tokenizer,
    peft_lora_config,
    speed_up_cpu_training,
)
from alignment.tracking import (
    MetricsJSONL,
    configure_wandb,
    finish_wandb,
    log_artifact,
    report_to,
    wandb_hint,
)

log = logging.getLogger(__name__)


def count_truncated(dataset, tokenizer, max_length: int) -> int:
    """How many examples the trainer will cut at max_length (TRL truncates without a word)."""
    n = 0
    for row in dataset:
        ids = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        n += len(ids) > max_length
    return n


def latest_checkpoint(folder: Path) -> str | None:
    found = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(found[-1]) if found else None


def sft_args(cfg: SFTStageConfig, plan, out: Path, has_eval: bool, padding_free: bool = False) -> SFTConfig:
    """TRL's SFTConfig from ours: the device plan's dtype and checkpointing, not TRL's defaults."""
    return SFTConfig(
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
        use_liger_kernel=use_liger(cfg.train.liger),
        torch_compile=cfg.train.compile,
        fp16=plan.fp16,
        use_cpu=plan.device == "cpu",
        gradient_checkpointing=plan.gradient_checkpointing,
        # Padding-free: TRL enforces no max_length there; main() checked that every example fits.
        max_length=None if padding_free else cfg.model.max_length,
        padding_free=padding_free,
        packing=cfg.data.packing,
        train_sampling_strategy="group_by_length" if cfg.data.group_by_length else "random",
        completion_only_loss=True,
        logging_steps=cfg.train.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.train.eval_steps,
        save_strategy="steps",
        save_steps=cfg.train.eval_steps,
        save_total_limit=cfg.train.save_total_limit,
        load_best_model_at_end=has_eval,
        metric_for_best_model="eval_loss" if has_eval else None,
        report_to=report_to(cfg.run),
        run_name=f"{Path(cfg.run.dir).name}/sft",
        dataloader_num_workers=0,
        # Under DDP every trainable (LoRA) weight takes part in each step; the default search for
        # unused ones costs an extra pass over the graph per step when checkpointing is off.
        ddp_find_unused_parameters=False,
    )


def main(cfg: SFTStageConfig) -> Path:
    # --- resolve inputs ---------------------------------------------------------------------
    check_liger(cfg.train.liger)  # a machine that cannot, refused before anything else
    out = stage_dir(cfg.run.dir, "sft")
    out.mkdir(parents=True, exist_ok=True)
    plan = device_plan(cfg.model)
    log.info(plan.describe())
    set_seed(cfg.train.seed)

    # --- data -------------------------------------------------------------------------------
    dataset, data_report = load_sft_dataset(
        cfg.data.path, cfg.data.format, system_prompt=cfg.data.system_prompt, on_error=cfg.data.on_error
    )
    tokenizer = load_tokenizer(cfg.model.name)
    truncated = count_truncated(dataset, tokenizer, cfg.model.max_length)
    if truncated:
        log.warning("%d of %d examples are longer than model.max_length=%d tokens and will be truncated",
                    truncated, len(dataset), cfg.model.max_length)
    eval_dataset = None
    if cfg.data.eval_fraction > 0 and len(dataset) >= 10:
        split = dataset.train_test_split(test_size=cfg.data.eval_fraction, seed=cfg.train.seed)
        dataset, eval_dataset = split["train"], split["test"]
    log.info("train %d examples, held out %d", len(dataset), len(eval_dataset) if eval_dataset else 0)

    # --- model ------------------------------------------------------------------------------
    model = load_base_model(cfg.model, plan)
    plan = fit_checkpointing(plan, cfg.model.gradient_checkpointing, model,
                             tokens_per_step=cfg.train.batch_size * cfg.model.max_length)
    padding_free = use_padding_free(cfg.data.padding_free, plan, cfg.model.attn_implementation, truncated)
    levers = describe_levers(plan, liger=use_liger(cfg.train.liger), padding_free=padding_free,
                             compile=cfg.train.compile)
    log.info(levers)

    # --- trainer ----------------------------------------------------------------------------
    configure_wandb(cfg.run, "sft")
    has_eval = eval_dataset is not None
    args = sft_args(cfg, plan, out, has_eval, padding_free)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_lora_config(cfg.lora),
        callbacks=[MetricsJSONL(out)],
    )
    if plan.device == "cpu":
        speed_up_cpu_training(trainer.model)

    # --- train ------------------------------------------------------------------------------
    resume = cfg.train.resume_from_checkpoint
    if resume == "latest":
        resume = latest_checkpoint(out / "checkpoints")
        log.info("resuming from %s", resume or "scratch (no checkpoint found)")
    result = trainer.train(resume_from_checkpoint=resume)
    metrics = {"train_loss": result.training_loss, "global_step": result.global_step, **{
        k: v for k, v in result.metrics.items() if k.startswith("train_")}}
    if has_eval:
        metrics.update(trainer.evaluate())

    # --- save -------------------------------------------------------------------------------
    trainer.save_model(str(out))  # rank 0 only, inside the trainer
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(out))
    save_config(cfg, out / "config.yaml")
    write_manifest(
        out, stage="sft", config=to_dict(cfg), base_model=cfg.model.name,
        parents={}, metrics=metrics, device_plan=levers, gpu_peak_mib=peak_gpu_mib(),
        data={"path": str(cfg.data.path), "sha256": file_hash(cfg.data.path), "format": data_report.format,
              "used": data_report.used, "skipped": data_report.skipped, "truncated": truncated,
              "train": len(dataset), "eval": len(eval_dataset) if eval_dataset else 0},
    )
    log_artifact("sft", out, cfg.run.dir)
    finish_wandb()

    # --- report -----------------------------------------------------------------------------
    html = report.write_report(cfg.run.dir)
    hint = wandb_hint(cfg.run)
    if hint:
        log.info(hint)
    log.info("report: %s", html)
    print_done("sft", out, f"align sample run.dir={cfg.run.dir}")
    return out

