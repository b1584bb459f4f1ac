"""A reward model on the preference data: Bradley-Terry loss, QLoRA, held-out calibration.

    align reward --config configs/quickstart/reward.yaml
    align reward run.dir=runs/NAME use_margin=true from_sft=false
    align reward score --prompt "How do I sync?" --response "Open Settings." --response "No."

A one-label sequence classifier (`score` head) on the SFT model (its adapter merged into the
base) or the raw base, with a fresh LoRA; TRL's RewardTrainer. Pairs of one K-wise ranking stay
in one batch (group_by_ranking). Writes <run.dir>/reward/: the adapter with the score head,
tokenizer, the SFT adapter it was built on, config.yaml, metrics.jsonl, align.json with the
held-out accuracy (the PPO gate reads it), margin, calibration and length correlation, and
`heads` bootstrap heads on its own features (reward_heads.safetensors: the uncertainty that
`align sample selection=uncertainty` picks tasks by; align/active.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from datasets import DatasetDict
from transformers import set_seed
from trl import RewardConfig, RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference

from align import StageError, artifacts, report
from align.artifacts import (
    is_main_process,
    model_identity,
    print_done,
    recorded_path,
    settings_of,
    shell,
    stage_command,
    stage_dir,
    system_prompt_of,
    write_manifest,
)
from align.config import ConfigError, PPOStageConfig, RewardStageConfig, load_config, save_config, to_dict
from align.cpu import keep_trainable_in, speed_up_cpu_training
from align.data import DataError, file_hash
from align.distributed import Ranks
from align.gpu_training import (
    describe_levers,
    fit_checkpointing,
    one_trainable_dtype,
    peak_gpu_mib,
    use_liger,
    without_training_autocast,
)
from align.labeling.scorers import resolve_scorer
from align.modeling import (
    adapter_base_name,
    device_plan,
    is_adapter_dir,
    load_tokenizer,
    peft_lora_config,
)
from align.preferences import add_system_prompt, load_preferences
from align.preflight import check_adapter, check_stage
from align.reward_model import (
    MAX_PROBE_FLIP_RATE,
    drop_earlier_extras,
    gate,
    heldout_metrics,
    load_reward_model,
    pair_losses,
    probe,
    probe_failure,
    reward_base,
    save_sft_copy,
    score,
    score_conversations,
    score_head_in_fp32,
    scorer_views,
)
from align.tracking import append_jsonl, finish_wandb, log_artifact, scalars, start_wandb_run
from align.training import (
    MetricsJSONL,
    ThisRunsSettings,
    UniqueRows,
    distinct_rows_metrics,
    gathers_of_any_size,
    ranking_dataloader,
    resume_checkpoint,
    train_from,
    train_loss,
    trl_args,
)

log = logging.getLogger(__name__)

LENGTH_WARNING = 0.5  # |Pearson r| of reward vs length above which the stage warns
PAIR_COLUMNS = ("weight", "p_chosen")  # per-pair columns the loss reads (align export combine=dawid_skene)


class WeightedPreferenceCollator(DataCollatorForPreference):
    """TRL's preference collator, passing each pair's `weight` and `p_chosen` on as tensors (it keeps only margin)."""

    def torch_call(self, examples: list[dict]) -> dict:
        batch = super().torch_call(examples)
        for key in PAIR_COLUMNS:
            if key in examples[0]:
                batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.float)
        return batch


class AlignRewardTrainer(RewardTrainer):
    """TRL's RewardTrainer plus the things it has no hook for, each a small override:

    - batches that keep each K-wise ranking's pairs together (`group_by_ranking`): transformers only
      takes per-index samplers, and a batch sampler is needed so a ranking never straddles two batches;
    - per-pair weights and soft labels in the loss (`weight`, `p_chosen` columns): TRL's loss reads a
      margin only. compute_loss lets TRL run the model and log its figures, then replaces the loss
      with align.reward_model's (TRL's own loss in evaluation when a batch has neither column);
    - in training, every pair weighing the same whatever the size of its batch (compute_loss);
    - TRL's held-out figures logged as what they are (log).
    """

    def __init__(self, *args, group_by_ranking: bool = True, **kwargs):
        self.group_by_ranking = group_by_ranking
        self.rows_seen = self.rows_run = 0  # training rows (2 per pair) and the distinct ones the model ran
        super().__init__(*args, **kwargs)
        if isinstance(self.data_collator, DataCollatorForPreference):  # TRL's, made with its pad token
            self.data_collator = WeightedPreferenceCollator(pad_token_id=self.data_collator.pad_token_id,
                                                            pad_to_multiple_of=self.data_collator.pad_to_multiple_of)

    def _set_signature_columns_if_needed(self):
        # The columns a batch keeps (TRL's: the token ids and margin), plus ours.
        if self._signature_columns is None:
            self._signature_columns = ["chosen_ids", "rejected_ids", "margin", *PAIR_COLUMNS]

    def get_train_dataloader(self):
        if not self.group_by_ranking:
            return super().get_train_dataloader()
        return ranking_dataloader(self, ["chosen_ids", "rejected_ids", "margin", *PAIR_COLUMNS])

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pair = {k: inputs.pop(k) for k in PAIR_COLUMNS if k in inputs}
        # Each distinct response once: a ranking's pairs share them (align.training.UniqueRows).
        unique = UniqueRows(model)
        # A ranking batch's size differs between the processes; TRL gathers the per-row rewards for its log.
        with gathers_of_any_size(self.accelerator):
            loss, outputs = super().compute_loss(unique, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
        if self.model.training:  # training batches only, for the log
            self.rows_seen += unique.rows
            self.rows_run += unique.distinct
        if pair or self.model.training:
            chosen, rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
            losses = pair_losses(chosen, rejected, margin=inputs.get("margin"), **pair)
            if self.args.center_rewards_coefficient is not None:  # as TRL adds it (its mean: each pair's share)
                losses = losses + self.args.center_rewards_coefficient * (chosen + rejected) ** 2
            loss = losses.mean()
            if self.model.training:
                # A batch's mean weighs each pair by 1 / its batch's size, and group_by_ranking's batches are
                # short where a ranking did not fit (5 to 12 pairs at the quickstart's batch_size 12): a pair
                # would count more for sharing its batch with fewer. Summed over the nominal batch size instead,
                # each pair's share of a step is 1 / (batch_size * grad_accum) wherever it lands (the Trainer
                # divides by grad_accum, having no labels to count; DDP averages the processes). The value stays
                # the batch's mean per pair, for the logged loss; the gradient is the sum's.
                summed = losses.sum() / self.args.per_device_train_batch_size
                loss = summed + (loss - summed).detach()
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """TRL's evaluation figures (accuracy, margin, rewards) are means of its per-batch means, logged as
        eval_accuracy, ...: the name of the stage's own held-out accuracy over pairs (heldout_metrics), which
        metrics.jsonl, W&B and the report then held two figures under. Here they are eval_*_batch_mean."""
        if not self.model.training:  # an evaluation's log: TRL adds its averages, prefixed eval_, to `logs`
            figures = self._metrics["eval"]
            for key in [k for k in figures if k != "num_tokens" and not k.endswith("_batch_mean")]:
                figures[f"{key}_batch_mean"] = figures.pop(key)
        super().log(logs, start_time)


def loss_columns(data: DatasetDict, cfg: RewardStageConfig, data_path: Path) -> tuple[DatasetDict, str]:
    """The splits with only the per-pair columns the loss should read (it reads margin, weight and p_chosen
    whenever they are there), and the weighting that makes: soft, weighted or off (pair_weighting)."""
    train = data["train"]
    if cfg.use_margin and not all("margin" in split.column_names and None not in split["margin"]
                                  for split in data.values()):
        raise DataError(f"{data_path}: use_margin=true needs a 'margin' on every pair (align export writes one)")
    weighting = pair_weighting(cfg.use_weights, data, data_path)
    drop = {"soft": {"weight"}, "weighted": {"p_chosen"}}.get(weighting, set(PAIR_COLUMNS))
    drop |= set() if cfg.use_margin else {"margin"}
    data = DatasetDict({k: split.remove_columns([c for c in split.column_names if c in drop]) for k, split in data.items()})
    if weighting != "soft" and any(train["tie"] if "tie" in train.column_names else []):
        # A tie kept by the export (ties=margin0) names neither answer the better: p_chosen 1/2, whose loss pulls
        # the two rewards together. A hard label would train its first answer as the winner.
        data = data.map(lambda row: {"p_chosen": 0.5 if row["tie"] else 1.0})
        log.info("%d kept ties trained as p_chosen = 0.5", sum(bool(t) for t in data["train"]["tie"]))
    if weighting == "weighted":  # mean weight 1 over the training pairs: train.lr means what it means unweighted
        mean = sum(data["train"]["weight"]) / len(data["train"])
        if mean <= 0:
            raise DataError(f"{data_path}: every training pair has weight 0: nothing to learn from")
        data = data.map(lambda row: {"weight": row["weight"] / mean})
    log.info("pair weighting: %s", {"soft": "soft labels p_chosen (expected Bradley-Terry loss under the posterior)",
                                    "weighted": "per-pair weights (normalised to mean 1)",
                                    "off": "none: every pair counts as fully sure"}[weighting])
    return data, weighting


def own_shard(param: torch.Tensor) -> torch.Tensor:
    """The values of `param` this process holds: DeepSpeed ZeRO-3's shard (its `.data` is an empty placeholder,
    finite whatever the weights are), FSDP2's local one, else the whole parameter."""
    if getattr(param, "ds_tensor", None) is not None:
        return param.ds_tensor
    return param.to_local() if hasattr(param, "to_local") else param


def refuse_non_finite(model, loss: float, step: int) -> None:
    """A StageError when training went NaN or infinite: saved, such a reward model scores every answer NaN,
    and PPO and eval would read that as a finished model (its manifest, rc 0)."""
    bad = next((name for name, p in model.named_parameters() if p.requires_grad
                and not torch.isfinite(own_shard(p)).all()), None)
    # each process checks its own shard (ZeRO-3, FSDP2): decided together, or the one that found a NaN raises
    # alone while the others wait in the save's collectives until the process group times out
    elsewhere = Ranks().any(bad is not None) and bad is None
    if math.isfinite(loss) and bad is None and not elsewhere:
        return
    # transformers logs a non-finite step's loss as the mean of the finite ones (logging_nan_inf_filter), so
    # train_loss can look fine over weights that are NaN: the weights decide.
    what = f"{bad} holds NaN/inf" if bad else "a weight of another process's shard holds NaN/inf" if elsewhere else \
        f"train_loss is {loss}"
    raise StageError(f"training went non-finite by step {step} ({what}): nothing is saved. Lower train.lr, or "
                     "check the data's weight, margin and p_chosen columns")


def pair_weighting(use_weights: str, data: DatasetDict, data_path: Path) -> str:
    """What `use_weights` means for this data: soft (p_chosen), weighted (weight) or off.

    auto: soft where every pair (of every split) has a p_chosen (align export combine=dawid_skene), else
    weighted where every pair has a weight, else off, with a warning where some pairs had one. on: the
    same, but data without either column is an error.
    """
    def count(column: str) -> int:
        return sum(sum(v is not None for v in split[column]) for split in data.values() if column in split.column_names)

    pairs = sum(len(split) for split in data.values())
    have = {c: count(c) for c in PAIR_COLUMNS}
    complete = {c: have[c] == pairs for c in PAIR_COLUMNS}
    if use_weights in ("auto", "on"):
        found = "soft" if complete["p_chosen"] else "weighted" if complete["weight"] else "off"
        if found == "off" and use_weights == "on":
            raise DataError(f"{data_path}: use_weights=on needs a 'p_chosen' or a 'weight' on every pair "
                            "(align export combine=dawid_skene writes both)")
        partial = [f"{have[c]} of the {pairs} pairs have a {c!r}" for c in PAIR_COLUMNS
                   if 0 < have[c] < pairs and not (found == "soft" and c == "weight")]
        if partial and found != "soft":
            log.warning("%s: %s: every pair needs one for it to count, so the pairs are weighted %s (use_weights="
                        "auto); give every pair one, or use_weights=off to say so", data_path, "; ".join(partial),
                        "by 'weight' alone" if found == "weighted" else "alike")
        return found
    need = {"soft": "p_chosen", "weighted": "weight"}.get(use_weights)
    if need and not complete[need]:
        raise DataError(f"{data_path}: use_weights={use_weights} needs a {need!r} on every pair "
                        "(align export combine=dawid_skene writes one)")
    return use_weights


def main(cfg: RewardStageConfig) -> Path:
    # --- resolve inputs ---------------------------------------------------------------------
    check_stage("reward", cfg)  # every input (adapter, data, paths, the machine) before anything is written
    out = stage_dir(cfg.run.dir, "reward")
    sft = Path(cfg.sft) if cfg.sft else stage_dir(cfg.run.dir, "sft")
    if cfg.from_sft and not is_adapter_dir(sft):
        raise StageError(f"no SFT adapter at {sft}: run `align sft run.dir={cfg.run.dir}` first, pass sft=<folder>, "
                         "or from_sft=false to build the reward model on the raw base")
    data_path = Path(cfg.data.path) if cfg.data.path else stage_dir(cfg.run.dir, "export")
    if not data_path.exists():
        raise StageError(f"no preference data at {data_path}: run `align export run.dir={cfg.run.dir}` first, "
                         "or pass data.path=<folder or .jsonl>")
    # Built on the SFT model, the base is the SFT's (its manifest says which); else model.name.
    model_cfg = replace(cfg.model, name=adapter_base_name(sft)) if cfg.from_sft else cfg.model
    plan = device_plan(model_cfg)
    log.info(plan.describe())
    set_seed(cfg.train.seed)

    # --- data -------------------------------------------------------------------------------
    # Hashed before it is read: pairs edited while this stage trains are not what it trained on (a rerun remakes it)
    data_sha256 = file_hash(data_path)
    data, data_report = load_preferences(data_path, test_fraction=cfg.data.test_fraction, seed=cfg.train.seed,
                                         on_error=cfg.data.on_error)
    # The SFT policy's system prompt (from_sft or not: it is the policy PPO samples and this model scores), on
    # every conversation it trains on and is measured on; recorded, so scoring adds the same (system_prompt_of).
    system_prompt = system_prompt_of(sft)
    data = add_system_prompt(data, system_prompt)
    probe_pairs = data.get("test")  # with every column, for the probes
    if cfg.probe_scorer and probe_pairs is not None and len(probe_pairs):
        # Every probe-scorer score now, before training (a few hundred calls): one that returns no number, raises or
        # gives NaN on any held-out answer or edit stops here rather than at the probes, losing the trained model
        scorer_views(resolve_scorer(cfg.probe_scorer), cfg.probe_scorer, probe_pairs.to_list())
    data, weighting = loss_columns(data, cfg, data_path)
    train, test = data["train"], data.get("test")
    tokenizer = load_tokenizer(str(sft) if cfg.from_sft else model_cfg.name)  # the SFT's chat template
    tokenizer.model_max_length = cfg.model.max_length  # saved with it: score() truncates alike

    # --- model ------------------------------------------------------------------------------
    model = reward_base(model_cfg, plan, sft if cfg.from_sft else None)
    # A step holds batch_size pairs: a chosen and a rejected sequence each.
    plan = fit_checkpointing(plan, cfg.model.gradient_checkpointing, model,
                             tokens_per_step=2 * cfg.train.batch_size * cfg.model.max_length)
    levers = describe_levers(plan, liger=use_liger(cfg.train.liger), compile=cfg.train.compile, lora=cfg.lora)
    log.info(levers)

    # --- trainer ----------------------------------------------------------------------------
    start_wandb_run(cfg.run, "reward")  # before the trainer: its W&B callback logs into this run
    has_eval = test is not None
    args = trl_args(RewardConfig, cfg.train, plan, cfg.run, "reward", out, has_eval=has_eval,
                    max_length=cfg.model.max_length,  # longer pairs are dropped (TRL filters, we count)
                    center_rewards_coefficient=cfg.center_rewards_coefficient)
    trainer = AlignRewardTrainer(
        model=model,
        group_by_ranking=cfg.group_by_ranking,
        args=args,
        train_dataset=train,
        eval_dataset=test,
        processing_class=tokenizer,
        # A fresh LoRA; the new score head is trained in full and saved with it.
        peft_config=peft_lora_config(cfg.lora, "SEQ_CLS", modules_to_save=["score"]),
        callbacks=[MetricsJSONL(out), ThisRunsSettings()],
    )
    # TRL's RewardConfig (disable_dropout) sets every dropout's p to 0 once peft has wrapped the model: the base
    # model's stay off (GPT-2's, OPT's...), LoRA's are given back the lora.dropout asked for (else recorded, not run)
    for name, module in trainer.model.named_modules():
        if isinstance(module, torch.nn.Dropout) and ".lora_dropout." in f"{name}.":
            module.p = cfg.lora.dropout
    # fp32 adapter and score head, as DPO's and PPO's: TRL rounds a 4-bit model's trainable weights to bf16, the
    # fresh score head too, where an optimizer step under ~1/256 of a weight is lost (the head's weights ~0.02 at
    # lr 1e-4 are at that edge; gpu_training.one_trainable_dtype); peft leaves the score head in fp16 under fp16
    # compute (a T4 or V100), whose grads the GradScaler refuses. Autocast still computes in bf16 or fp16.
    keep_trainable_in(trainer.model, torch.float32)
    one_trainable_dtype(trainer.model)  # sharded: a fp32 score head or DoRA magnitudes beside bf16 LoRA weights
    if plan.device == "cpu":
        speed_up_cpu_training(trainer.model)
    dropped = len(train) - len(trainer.train_dataset)
    if dropped == len(train):  # else 0 steps, and the fresh score head saved as a finished reward model
        raise StageError(f"all {len(train)} training pairs have a side longer than model.max_length="
                         f"{cfg.model.max_length} tokens, and TRL leaves such pairs out: nothing to train on; raise "
                         "model.max_length")
    if dropped:
        log.warning("%d of %d training pairs are longer than model.max_length=%d tokens and are left out",
                    dropped, len(train), cfg.model.max_length)
    # Held-out pairs are all measured (align's scoring, not TRL's filter), a side past max_length on its last
    # max_length tokens, as PPO's and eval's scoring reads a long answer: counted, not left out
    long_heldout = sum(max(len(tokenizer.apply_chat_template(p + a, tokenize=True, return_dict=True)["input_ids"])
                           for a in (c, r)) > cfg.model.max_length
                       for p, c, r in zip(test["prompt"], test["chosen"], test["rejected"], strict=True)) if has_eval else 0
    if long_heldout:
        log.warning("%d of %d held-out pairs have a side longer than model.max_length=%d tokens: scored on its last "
                    "%d tokens (the start of the conversation cut), as PPO's scoring reads a long answer",
                    long_heldout, len(test), cfg.model.max_length, cfg.model.max_length)

    # --- train ------------------------------------------------------------------------------
    checkpoint = resume_checkpoint(out, cfg.train.resume_from_checkpoint, max_steps=cfg.train.max_steps,
                                   trained_on={"data": data_sha256, "base_model": model_identity(model_cfg.name),
                                               "sft": model_identity(sft) if cfg.from_sft else None,
                                               "settings": settings_of(cfg)})
    if is_main_process():  # its align.json gone (begin_training): an earlier run's SFT copy and heads go too
        drop_earlier_extras(out)
    result = train_from(trainer, checkpoint)
    metrics = {"global_step": result.global_step, **{k: v for k, v in result.metrics.items() if k.startswith("train_")},
               **train_loss(result, out, checkpoint)}  # the whole run's, also when resumed
    metrics.update(distinct_rows_metrics(trainer.rows_seen, trainer.rows_run))
    refuse_non_finite(trainer.model, metrics["train_loss"], result.global_step)

    # --- evaluate on held-out pairs ---------------------------------------------------------
    without_training_autocast(trainer.model)  # scored (here, the probes, the heads) as load_reward_model scores
    if plan.compute_dtype != torch.float32:  # scored as load_reward_model scores: a bf16 head ties answers. Before
        score_head_in_fp32(trainer.model)  # the heads too: they fed the fp32 head bf16 features (a dtype error)
    if has_eval:
        n = len(test)
        rewards = score_conversations(trainer.model, tokenizer, [p + c for p, c in zip(test["prompt"], test["chosen"], strict=True)]
                                      + [p + r for p, r in zip(test["prompt"], test["rejected"], strict=True)],
                                      cfg.train.batch_size)  # together: each distinct response is scored once
        chosen, rejected = rewards[:n], rewards[n:]
        heldout = heldout_metrics(probe_pairs, chosen, rejected)  # every column: agreement, p_chosen
        metrics.update(heldout)
        ceiling = heldout["agreement_ceiling"]
        if heldout["eval_accuracy"] is None:
            log.warning("held-out: all %d pairs are ties (export ties=margin0): no accuracy to measure; hold out more "
                        "prompts (data.test_fraction)", heldout["eval_ties"])
        else:
            log.info("held-out: accuracy %.3f [%.3f, %.3f] over %d pairs from %d prompts%s, mean margin %.3f, "
                     "calibration error %.3f", heldout["eval_accuracy"], *heldout["eval_accuracy_ci"],
                     heldout["eval_pairs"], heldout["eval_prompts"],
                     f" (annotator agreement {ceiling:.3f})" if ceiling is not None else "",
                     heldout["eval_mean_margin"], heldout["calibration_error"])
        r = heldout["length_correlation"]
        if r is not None and abs(r) > LENGTH_WARNING:
            log.warning("reward correlates with response length (Pearson r = %.2f on held-out responses): the "
                        "model may be rewarding %s answers rather than better ones, which PPO will exploit", r,
                        "longer" if r > 0 else "shorter")
        # --- probes: accuracy by agreement, and edits that must not win (align.reward_model) ---
        probes = probe(lambda convs: score_conversations(trainer.model, tokenizer, convs, cfg.train.batch_size),
                       probe_pairs, chosen, rejected, scorer=resolve_scorer(cfg.probe_scorer) if cfg.probe_scorer
                       else None, scorer_name=cfg.probe_scorer)
        metrics["probe_gate_rate"] = probes["gate"]["rate"] if probes["gate"] else None
        _log_probes(probes)
        if is_main_process():
            append_jsonl(out / "metrics.jsonl", {"step": result.global_step, **heldout})
            _wandb_summary(scalars(heldout), probes)  # the interval too, as eval_accuracy_ci_low and _high
    else:
        probes = None
        log.warning("no held-out pairs: eval_accuracy is not measured and the PPO gate will refuse this model")

    # --- uncertainty heads (align sample selection=uncertainty) ------------------------------
    if cfg.heads:  # every rank runs the model (a sharded forward is collective); rank 0 saves
        metrics.update(save_uncertainty_heads(trainer.model, tokenizer, train, test, out, cfg, weighting))

    # --- save -------------------------------------------------------------------------------
    trainer.save_model(str(out))  # rank 0 only, inside the trainer
    if is_main_process():
        tokenizer.save_pretrained(str(out))
        if cfg.from_sft:
            save_sft_copy(sft, out)
    cfg = replace(cfg, model=model_cfg)  # what ran: with from_sft, the SFT's base
    save_config(cfg, out / "config.yaml")
    parents = {"sft": sft, "preferences": data_path} if cfg.from_sft else {"preferences": data_path}
    write_manifest(
        out, stage="reward", config=to_dict(cfg), base_model=model_cfg.name, parents=parents, metrics=metrics,
        device_plan=levers, gpu_peak_mib=peak_gpu_mib(), from_sft=cfg.from_sft, max_length=cfg.model.max_length,
        weighting=weighting, probes=probes, system_prompt=system_prompt,
        lora_dropout_applied=True,  # before this key, TRL ran every reward model without (align pipeline reads it)
        data={"path": str(data_path), "sha256": data_sha256, "format": data_report.format,
              "split": data_report.split, "train": len(trainer.train_dataset), "test": len(test) if test else 0,
              "skipped": data_report.skipped, "too_long": dropped, "too_long_heldout": long_heldout},
    )
    log_artifact("reward", out, cfg.run.dir, parents)
    finish_wandb()

    # --- report -----------------------------------------------------------------------------
    html = report.write_report(cfg.run.dir)
    log.info("report: %s", html)
    # The main process wrote align.json, which the gate reads; the others print nothing (print_done).
    print_done("reward", out, next_hint(cfg.run.dir, sft, data_path, ppo_gate_refuses(out) if is_main_process() else []))
    return out


def next_hint(run_dir: str | Path, sft: Path, data_path: Path, refused: list[str]) -> str:
    """PPO on this reward model, or DPO where PPO's gate refuses it (`refused`: a command that runs, not the ppo its
    gate would refuse at once); each names the SFT adapter and (DPO) the pairs this model was trained from where
    they are not the run's own, as the next stage would not find them by run.dir alone (stage_command)."""
    ppo = stage_command("ppo", run_dir, sft=sft)
    by_hand = f"score by hand: align reward score --run-dir {shell(run_dir)} --prompt ... --response ..."
    if refused:
        return (f"{stage_command('dpo', run_dir, sft=sft, data=data_path)}   (PPO's gate refuses this reward model "
                f"at {', '.join(refused)}; to run it anyway: {ppo} {run_anyway(refused)}; {by_hand})")
    return f"{ppo}   ({by_hand})"


def ppo_gate_refuses(out: Path) -> list[str]:
    """Every setting of PPO's gate (align.reward_model.gate) that refuses the reward model in `out`, each as
    `key=value`, with the values `align ppo` would run with next (the sibling ppo.yaml of this command's
    --config, else its defaults); empty when the gate lets it through. Each is checked with the other off, so a
    hint that overrides them all is one the gate lets through."""
    sibling = artifacts.config_folder / "ppo.yaml" if artifacts.config_folder else None
    try:
        ppo = load_config(PPOStageConfig, sibling if sibling and sibling.is_file() else None)
    except ConfigError:
        ppo = PPOStageConfig()
    refused = []
    for key, accuracy, flips in (("min_reward_accuracy", ppo.min_reward_accuracy, 1.0),
                                 ("max_probe_flip_rate", 0.0, ppo.max_probe_flip_rate)):
        try:
            gate(out, accuracy, flips)
        except StageError:
            refused.append(f"{key}={getattr(ppo, key)}")
    return refused


def run_anyway(refused: list[str]) -> str:
    """The overrides that turn off each refusing gate setting of ppo_gate_refuses, for `align ppo`."""
    return " ".join(f"{k.split('=')[0]}={1 if k.startswith('max') else 0}" for k in refused)


def _log_probes(probes: dict) -> None:
    for b in probes["by_agreement"]["buckets"]:
        log.info("held-out accuracy, %s pairs: %.3f (%d)", b["bucket"], b["accuracy"], b["pairs"])
    for e in probes["edits"]:
        scorer = (f"; {probes['scorer']}: flips {e['scorer_flip_rate']:.0%}, gain {e['scorer_mean_gain']:+.3f}, "
                  f"flips it does not make {e['unsupported_flip_rate']:.0%}"
                  if probes["scorer"] and e["flip_rate"] is not None and e["scorer_flip_rate"] is not None else "")
        log.info("probe %s (%s): flips %s of %d pairs, mean reward gain %+.3f%s", e["edit"], e["what"], e["flips"],
                 e["of"], e["mean_gain"], scorer)
    failure = probe_failure(probes, MAX_PROBE_FLIP_RATE)
    if failure:
        log.warning("%s: PPO will refuse this reward model unless max_probe_flip_rate is raised, and DPO on the same "
                    "pairs may learn the same habit (docs/reward_dpo.md#probes)", failure)


def save_uncertainty_heads(model, tokenizer, train, test, out: Path, cfg: RewardStageConfig, weighting: str) -> dict:
    """Bootstrap heads on the trained model's features of its own training pairs, with the labels its loss read
    (`weighting`: soft labels, weights or neither), saved beside it."""
    from align.active import fit_reward_heads

    started = time.perf_counter()
    figures = fit_reward_heads(model, tokenizer, train, test, out, heads=cfg.heads, seed=cfg.train.seed,
                               weighting=weighting, batch_size=cfg.train.batch_size, save=is_main_process())
    figures["heads_seconds"] = round(time.perf_counter() - started, 1)
    log.info("uncertainty heads: %d on %d pairs in %.1f s%s", cfg.heads, figures["heads_pairs"],
             figures["heads_seconds"], f", their held-out accuracy {figures['heads_eval_accuracy']:.3f}"
             if "heads_eval_accuracy" in figures else "")
    return figures


def _wandb_summary(figures: dict, probes: dict) -> None:
    try:
        import wandb
    except ImportError:  # pragma: no cover
        return
    if wandb.run is not None:
        wandb.run.log({f"heldout/{k}": v for k, v in figures.items() if v is not None})
        columns = ["edit", "what", "gated", "flips", "of", "flip_rate", "mean_gain", "gain_vs_gap", "scorer_flip_rate",
                   "scorer_mean_gain", "unsupported_flip_rate"]
        wandb.run.log({"probes": wandb.Table(columns=columns, data=[[e.get(c) for c in columns]
                                                                   for e in probes["edits"]])})
        flat = {f"probe/{e['edit']}/{k}": e[k] for e in probes["edits"] for k in
                ("flip_rate", "mean_gain", "unsupported_flip_rate") if e.get(k) is not None}
        flat.update({f"probe/accuracy/{b['bucket']}": b["accuracy"] for b in probes["by_agreement"]["buckets"]})
        if probes["gate"]:
            flat["probe/gate_rate"] = probes["gate"]["rate"]
        wandb.run.summary.update({**figures, **flat})


def score_main(argv: list[str]) -> int:
    """`align reward score`: print the reward of each response (or each line of a JSONL file)."""
    parser = argparse.ArgumentParser(prog="align reward score", description=score_main.__doc__)
    parser.add_argument("--model", help="a reward model folder (default <run-dir>/reward)")
    parser.add_argument("--run-dir", default="runs/quickstart")
    parser.add_argument("--prompt")
    parser.add_argument("--response", action="append", default=[], help="repeat to rank several responses")
    parser.add_argument("--jsonl", help='a file of {"prompt": ..., "response": ...} lines')
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    if bool(args.jsonl) == bool(args.prompt or args.response):
        parser.error("give --prompt with one or more --response, or --jsonl FILE")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    folder = Path(args.model) if args.model else stage_dir(args.run_dir, "reward")
    try:
        check_adapter("--model", folder, tokenizer=True)  # named before any model loads
    except ConfigError as err:
        print(f"align reward score: {err}", file=sys.stderr)
        return 2
    if args.jsonl:
        import codecs

        from align.data import SUFFIXES, DataError, iter_records, json_kind, json_lines

        rows = []
        try:  # the loaders' reader (a JSON list, a BOM, CRLF, a U+2028 in a string); by lines for /dev/stdin, a .txt
            path = Path(args.jsonl)
            if path.is_file() and path.suffix.lower() in SUFFIXES:
                records = iter_records(path)
            else:
                try:
                    records = json_lines(args.jsonl, path.read_bytes().removeprefix(codecs.BOM_UTF8))
                except OSError as err:
                    raise DataError(f"{args.jsonl}: cannot read it ({err.strerror or err})") from None
            for where, row in records:
                if isinstance(row, DataError):
                    raise row
                fields = [row.get(k) if isinstance(row, dict) else None for k in ("prompt", "response")]
                if not all(isinstance(f, str) for f in fields):
                    raise DataError(f"{where}: needs a JSON object with string fields 'prompt' and 'response', "
                                    f"got {json_kind(row) if not isinstance(row, dict) else sorted(row)}")
                rows.append((fields[0], fields[1]))
            if not rows:
                raise DataError(f"{args.jsonl}: no lines to score (empty)")
        except DataError as err:
            print(f"align reward score: --jsonl {err}", file=sys.stderr)
            return 2
    elif not (args.prompt and args.response):
        parser.error("--prompt needs at least one --response")
    else:
        rows = [(args.prompt, r) for r in args.response]
    try:
        model, tokenizer = load_reward_model(folder)
    except FileNotFoundError as err:
        print(f"align reward score: {err}", file=sys.stderr)
        return 2
    scores = score(model, tokenizer, [p for p, _ in rows], [r for _, r in rows], args.batch_size,
                   system_prompt=system_prompt_of(folder))
    for (prompt, response), value in zip(rows, scores, strict=True):
        if args.jsonl:
            print(json.dumps({"prompt": prompt, "response": response, "score": round(value, 4)}))
        else:
            print(f"{value:+.4f}\t{response}")
    return 0


def trained_data(folder: Path, manifest: dict) -> Path:
    """Where the preference data a reward model's manifest records is now: read as the stage read it
    (recorded_path: relative to the directory it ran in, or moved with the project), or the folder of its name
    beside the model (the run folder moved and renamed); the first of them there with the sha256 the manifest
    records, else the first there (the caller's check refuses it as changed), else the recorded place."""
    given = (manifest.get("data") or {}).get("path") or ((manifest.get("parents") or {}).get("preferences")
                                                          or {}).get("path")
    if not given:
        raise ValueError(f"{folder / 'align.json'} records no preference data: pass --data")
    places = list(dict.fromkeys([recorded_path(given, folder, manifest), folder.parent / Path(given).name]))
    there = [p for p in places if p.exists()]
    sha256 = (manifest.get("data") or {}).get("sha256")
    return next((p for p in there if sha256 and file_hash(p) == sha256), there[0] if there else places[0])


def probe_main(argv: list[str]) -> int:
    """`align reward probe`: run the probes on a trained reward model's held-out pairs and print them as JSON.

    For a reward model trained before the probes existed (the PPO gate then only warns), or to see
    one with another labelling scorer, or on other pairs (--data); nothing is written into the model's folder.
    """
    parser = argparse.ArgumentParser(prog="align reward probe", description=probe_main.__doc__)
    parser.add_argument("--model", help="a reward model folder (default <run-dir>/reward)")
    parser.add_argument("--run-dir", default="runs/quickstart")
    parser.add_argument("--data", help="preference data to probe: its own test split if it has one (an align export "
                        "folder), else every pair (default: the held-out split of what the model was trained on)")
    parser.add_argument("--scorer", help="the scorer that labelled the data, if one did (as probe_scorer=; default: "
                        "the model's own probe_scorer on its own held-out pairs, none on --data; 'none' for none)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    if args.batch_size < 1:  # else a traceback once the model has loaded (a KeyError below 0)
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    folder = Path(args.model) if args.model else stage_dir(args.run_dir, "reward")
    try:
        check_adapter("--model", folder, tokenizer=True)
        manifest = json.loads((folder / "align.json").read_text())
        # Its own held-out pairs were labelled as its training pairs were: by its probe_scorer, if it had one (the
        # gate PPO reads was counted with it; without, every flip counted and the gate could differ)
        spec = args.scorer if args.scorer is not None else None if args.data else \
            (manifest.get("config") or {}).get("probe_scorer")
        spec = None if spec in ("none", "") else spec
        scorer = resolve_scorer(spec) if spec else None
        if spec and args.scorer is None:
            log.info("probe scorer %s, the model's probe_scorer (--scorer none for none)", spec)
        data_path = Path(args.data) if args.data else trained_data(folder, manifest)
        if not data_path.exists():  # said here: load_preferences' hint names the stages' data.path, not --data
            raise ValueError(f"--data {data_path}: no such file or folder" if args.data else
                             f"{data_path}, the preference data the model was trained on, is not there any more "
                             "(nor beside the model): pass --data with where it is now, or pairs the model never saw")
        recorded = manifest.get("data", {}).get("sha256")
        if not args.data and recorded and data_path.exists() and file_hash(data_path) != recorded:
            # Re-split, other data puts pairs the model trained on among the "held-out" ones.
            raise ValueError(f"{data_path} has changed since the model was trained on it (sha256), so its held-out "
                             "split is not the one the model never saw; pass --data with pairs it never saw")
        recorded_data = manifest["config"]["data"]
        test_fraction, seed = recorded_data["test_fraction"], manifest["config"]["train"]["seed"]
        # The training data is split as training split it, for the pairs the model never saw. --data is not split
        # again (it did: 40 unseen pairs were probed on 4): its own test split where it has one, else every pair.
        # Read as training read it: records it skipped (data.on_error=skip) skipped again, not a failure.
        data = load_preferences(data_path, test_fraction=0.0 if args.data else test_fraction, seed=seed,
                                on_error=recorded_data.get("on_error", "raise"))[0]
        pairs = data.get("test")
        if args.data and pairs is None:
            pairs = data["train"]
            log.info("probing every pair of %s (%d; it has no test split of its own)", data_path, len(pairs))
        pairs = add_system_prompt(pairs, system_prompt_of(folder)) if pairs is not None else None  # as trained
    except (ConfigError, DataError, ValueError, KeyError, OSError) as err:
        print(f"align reward probe: {err}", file=sys.stderr)
        return 2
    if pairs is None:
        print(f"align reward probe: {data_path} has no held-out pairs to probe", file=sys.stderr)
        return 2
    model, tokenizer = load_reward_model(folder)
    chosen, rejected = (score_conversations(model, tokenizer, [p + c for p, c in zip(pairs["prompt"], pairs[side],
                                                                                    strict=True)], args.batch_size)
                        for side in ("chosen", "rejected"))
    try:
        probes = probe(lambda convs: score_conversations(model, tokenizer, convs, args.batch_size), pairs, chosen,
                       rejected, scorer=scorer, scorer_name=spec)
    except StageError as err:  # a --scorer that returns no number
        print(f"align reward probe: {err}", file=sys.stderr)
        return 1
    _log_probes(probes)
    print(json.dumps(probes, indent=2))
    return 0


SUBCOMMANDS = {"score": score_main, "probe": probe_main}
