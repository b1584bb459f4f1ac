"""Instruction SFT with QLoRA (4-bit NF4 base + LoRA), plain LoRA or DoRA, on GPU or CPU.

    align sft --config configs/quickstart/sft.yaml
    align sft --config configs/quickstart/sft.yaml lora.use_dora=true model.quantize=false

Writes <run.dir>/sft/: the adapter (peft), tokenizer, config.yaml, metrics.jsonl, align.json.
The saved adapter is the best checkpoint by held-out loss when there is a held-out split.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import set_seed
from trl import SFTConfig, SFTTrainer
from trl.data_utils import common_prefix_length

from align import StageError, report
from align.artifacts import model_identity, print_done, settings_of, shell, stage_dir, write_manifest
from align.config import SFTStageConfig, save_config, to_dict
from align.cpu import keep_trainable_in, speed_up_cpu_training
from align.data import DataError, file_hash, load_sft_dataset, skip_record, split_by_prompt
from align.gpu_training import (
    describe_levers,
    fit_checkpointing,
    one_trainable_dtype,
    peak_gpu_mib,
    sharded,
    use_liger,
    use_padding_free,
)
from align.modeling import (
    device_plan,
    load_base_model,
    load_tokenizer,
    peft_lora_config,
)
from align.preflight import check_stage
from align.tracking import finish_wandb, log_artifact, start_wandb_run, summarize_eval, wandb_hint
from align.training import (
    MetricsJSONL,
    ThisRunsSettings,
    final_eval,
    resume_checkpoint,
    train_from,
    train_loss,
    trl_args,
)

log = logging.getLogger(__name__)


def too_long(dataset, tokenizer, max_length: int) -> tuple[int, list[int]]:
    """(how many examples are longer than max_length, which TRL cuts there without a word; the rows of those whose
    prompt alone reaches it, which have no token of their answer left to train). The prompt ends where TRL's does,
    where it and the whole conversation part (trl's common_prefix_length)."""
    def ids(messages, **kwargs) -> list[int]:
        out = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
        return out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out

    truncated, prompt_fills = 0, []
    for i, row in enumerate(dataset):
        full = ids(row["prompt"] + row["completion"])
        if len(full) > max_length:
            truncated += 1
            if common_prefix_length(ids(row["prompt"], add_generation_prompt=True), full) >= max_length:
                prompt_fills.append(i)
    return truncated, prompt_fills


def template_refused(dataset, tokenizer, report, on_error: str, model: str):
    """The dataset less the examples the model's chat template refuses to render. preflight renders the first
    ones only; a template that insists on alternating turns (Llama-2, Mistral v0.1-0.2, Gemma) may refuse a later
    conversation with two user turns in a row: named by its file and line (DataError), or with data.on_error=skip
    left out, counted among the skipped and warned about, as the reader's own bad records are."""
    from align.embedded import EMBEDDED_NAMES
    from align.preflight import template_refusal

    if model.lower() in EMBEDDED_NAMES:  # align's own template renders every role in any order
        return dataset
    refused = []
    for i, row in enumerate(dataset):
        problem = template_refusal(tokenizer, row["prompt"], row["completion"])
        if problem is None:
            continue
        said = f"{report.wheres[i]}: the chat template of model.name={model} refuses this example's conversation ({problem})"
        if on_error == "raise":
            raise DataError(f"{said}; fix the record, or set data.on_error=skip to leave such examples out")
        refused.append(i)
        skip_record(report, said)
    if refused and len(refused) == len(dataset):
        raise DataError(f"{report.path}: the chat template of model.name={model} refuses every example (the first: "
                        f"{report.problems[-len(refused)]})")
    gone = set(refused)  # the report's per-example lists stay row for row with the dataset (split_by_prompt's groups)
    report.conversations = [c for i, c in enumerate(report.conversations) if i not in gone]
    report.wheres = [w for i, w in enumerate(report.wheres) if i not in gone]
    report.used -= len(refused)
    return without(dataset, refused)


def without(dataset, rows: list[int]):
    """The dataset less those rows, in order."""
    gone = set(rows)
    return dataset.select([i for i in range(len(dataset)) if i not in gone]) if gone else dataset


def sft_args(cfg: SFTStageConfig, plan, out: Path, has_eval: bool, padding_free: bool = False) -> SFTConfig:
    """TRL's SFTConfig from ours: the shared mapping (align.training) plus SFT's own keys."""
    return trl_args(
        SFTConfig, cfg.train, plan, cfg.run, "sft", out, has_eval=has_eval,
        # Padding-free: TRL enforces no max_length there; main() checked that every example fits. Packing
        # needs it (the length it packs to), padding-free or not.
        max_length=None if padding_free and not cfg.data.packing else cfg.model.max_length,
        padding_free=padding_free,
        packing=cfg.data.packing,
        train_sampling_strategy="group_by_length" if cfg.data.group_by_length else "random",
        completion_only_loss=True,
    )


def main(cfg: SFTStageConfig) -> Path:
    # --- resolve inputs ---------------------------------------------------------------------
    check_stage("sft", cfg)  # every input (data, model, paths, the machine) before anything is written
    out = stage_dir(cfg.run.dir, "sft")
    out.mkdir(parents=True, exist_ok=True)
    plan = device_plan(cfg.model)
    log.info(plan.describe())
    set_seed(cfg.train.seed)

    # --- data -------------------------------------------------------------------------------
    # Hashed before it is read: a file edited while this stage trains is not what it trained on (a rerun remakes it)
    data_sha256 = file_hash(cfg.data.path)
    dataset, data_report = load_sft_dataset(
        cfg.data.path, cfg.data.format, system_prompt=cfg.data.system_prompt, on_error=cfg.data.on_error,
        turns=cfg.data.turns)
    tokenizer = load_tokenizer(cfg.model.name)
    dataset = template_refused(dataset, tokenizer, data_report, cfg.data.on_error, cfg.model.name)
    eval_dataset, eval_split = None, "none"
    if data_report.held_out:  # a DatasetDict's own held-out split, as given: no other is cut from train
        eval_dataset, held_out_report = load_sft_dataset(
            cfg.data.path, data_report.format, system_prompt=cfg.data.system_prompt, on_error=cfg.data.on_error,
            turns=cfg.data.turns, split=data_report.held_out)
        eval_dataset = template_refused(eval_dataset, tokenizer, held_out_report, cfg.data.on_error, cfg.model.name)
        data_report.skipped += held_out_report.skipped
        eval_split = data_report.held_out
    if eval_dataset is None and cfg.data.eval_fraction > 0 and len(dataset) >= 10:
        dataset, eval_dataset = split_by_prompt(dataset, cfg.data.eval_fraction, cfg.train.seed,
                                                groups=data_report.conversations)
        eval_split = "by prompt" if eval_dataset is not None else "none"
    truncated, prompt_fills = too_long(dataset, tokenizer, cfg.model.max_length)
    eval_truncated, eval_prompt_fills = too_long(eval_dataset or [], tokenizer, cfg.model.max_length)
    dropped, eval_dropped = len(prompt_fills), len(eval_prompt_fills)
    examples = len(dataset) + (len(eval_dataset) if eval_dataset else 0)
    cut = truncated + eval_truncated - dropped - eval_dropped  # trained, less the end of their answer
    if cut:
        log.warning("%d of %d examples are longer than model.max_length=%d tokens and will be truncated (the end "
                    "of their answer is not trained)", cut, examples, cfg.model.max_length)
    if dropped + eval_dropped:  # TRL leaves them out without a word (packed, it trains them: left out below)
        log.warning("%d of %d examples are dropped: their prompt alone is model.max_length=%d tokens or more, so "
                    "no token of the answer is left to train (left out, packed or not); raise model.max_length to keep "
                    "them", dropped + eval_dropped, examples, cfg.model.max_length)
    if dropped == len(dataset):
        raise StageError(f"every training example's prompt is model.max_length={cfg.model.max_length} tokens or "
                         "longer: no token of an answer is left to train; raise model.max_length")
    if eval_dataset is not None and eval_dropped == len(eval_dataset):  # evaluated on, TRL's empty set would fail
        log.warning("every held-out example is dropped: no held-out loss")
        eval_dataset, eval_split = None, "none"
    truncated += eval_truncated  # what padding-free, which cuts nothing, must not meet
    log.info("train %d examples, held out %d (%s)", len(dataset) - dropped,
             len(eval_dataset) - eval_dropped if eval_dataset else 0,
             eval_split if eval_split in ("none", "by prompt") else f"the data's {eval_split} split")
    if cfg.data.packing:  # TRL drops them only unpacked; packed, each would train as a chunk of its prompt alone,
        # cut at max_length, every label masked: a step of loss 0 (all of them: a run that "succeeds" untrained)
        dataset = without(dataset, prompt_fills)
        eval_dataset = without(eval_dataset, eval_prompt_fills) if eval_dataset is not None else None

    # --- model ------------------------------------------------------------------------------
    model = load_base_model(cfg.model, plan)
    plan = fit_checkpointing(plan, cfg.model.gradient_checkpointing, model,
                             tokens_per_step=cfg.train.batch_size * cfg.model.max_length)
    padding_free = use_padding_free(cfg.data.padding_free, plan, cfg.model.attn_implementation, truncated,
                                    packing=cfg.data.packing)
    levers = describe_levers(plan, liger=use_liger(cfg.train.liger), padding_free=padding_free,
                             compile=cfg.train.compile, lora=cfg.lora)
    log.info(levers)

    # --- trainer ----------------------------------------------------------------------------
    start_wandb_run(cfg.run, "sft")  # before the trainer: its W&B callback logs into this run
    has_eval = eval_dataset is not None
    args = sft_args(cfg, plan, out, has_eval, padding_free)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_lora_config(cfg.lora),
        callbacks=[MetricsJSONL(out), ThisRunsSettings()],
    )
    # What TRL trains and evaluates on: its datasets, less what it dropped (packed, they hold chunks: the examples,
    # less those dropped above).
    counts = {"train": len(dataset) if cfg.data.packing else len(trainer.train_dataset),
              "eval": 0 if not has_eval else len(eval_dataset) if cfg.data.packing else len(trainer.eval_dataset)}
    counts["dropped"] = examples - counts["train"] - counts["eval"]
    # TRL rounds a 4-bit model's adapter to bf16 (the QLoRA paper's recipe), where AdamW loses every update under
    # ~1/256 of a weight: the tail of a decaying schedule, on small LoRA weights, moved ~38 % of them at lr 5e-5.
    # The adapter trains in fp32 on every device, as reward, DPO and PPO's do. Under bf16 compute it costs no
    # activation memory: autocast multiplies in bf16, and peft's 4-bit LoRA layers leave their bf16 input as it is
    # under autocast (peft/tuners/lora/bnb.py); only the adapter's own weights and Adam's state are fp32.
    if not sharded():
        keep_trainable_in(trainer.model, torch.float32)
    one_trainable_dtype(trainer.model)  # sharded: every trainable weight fp32 (FSDP2 keeps no fp32 copy)
    if plan.device == "cpu":
        speed_up_cpu_training(trainer.model)

    # --- train ------------------------------------------------------------------------------
    checkpoint = resume_checkpoint(out, cfg.train.resume_from_checkpoint, max_steps=cfg.train.max_steps,
                                   trained_on={"data": data_sha256, "base_model": model_identity(cfg.model.name),
                                               "settings": settings_of(cfg)})
    result = train_from(trainer, checkpoint)
    metrics = {"global_step": result.global_step, **{k: v for k, v in result.metrics.items() if k.startswith("train_")},
               **train_loss(result, out, checkpoint)}  # the whole run's, also when resumed
    if has_eval:
        metrics.update(final_eval(trainer))  # the trainer's own last evaluation when it made one
        summarize_eval(metrics)  # the kept (best) step's, in W&B as in align.json

    # --- save -------------------------------------------------------------------------------
    trainer.save_model(str(out))  # rank 0 only, inside the trainer
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(out))
    save_config(cfg, out / "config.yaml")
    write_manifest(
        out, stage="sft", config=to_dict(cfg), base_model=cfg.model.name,
        parents={}, metrics=metrics, device_plan=levers, gpu_peak_mib=peak_gpu_mib(),
        # Every later stage prompts this policy with it (system_prompt_of): the system turn every training example
        # opens with (data.system_prompt, records' `system` field or their own system message), else
        # data.system_prompt (some examples kept their own: warned about), else none.
        system_prompt=data_report.system if data_report.system is not None else cfg.data.system_prompt,
        data={"path": str(cfg.data.path), "sha256": data_sha256, "format": data_report.format,
              "used": data_report.used, "skipped": data_report.skipped, "truncated": cut,
              "dropped_prompt_too_long": counts["dropped"], "train": counts["train"], "eval": counts["eval"],
              "eval_split": eval_split},
    )
    log_artifact("sft", out, cfg.run.dir)
    finish_wandb()

    # --- report -----------------------------------------------------------------------------
    html = report.write_report(cfg.run.dir)
    hint = wandb_hint(cfg.run)
    if hint:
        log.info(hint)
    log.info("report: %s", html)
    # Sampling's default prompts are the shipped support data's: after training on other data, the hint names it
    # (unless a sample.yaml beside this --config, which the hint names, says which prompts)
    from align import artifacts
    from align.config import SampleStageConfig

    own = artifacts.config_folder is not None and (artifacts.config_folder / "sample.yaml").is_file()
    shipped = Path(SampleStageConfig.prompts).resolve() == Path(cfg.data.path).resolve()
    print_done("sft", out, f"align sample run.dir={shell(cfg.run.dir)}"
               + ("" if shipped or own else f" prompts={shell(cfg.data.path)}"))
    return out

