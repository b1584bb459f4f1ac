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
`PeftModel.from_pretrained(base, dir)` on the base as it trained (4-bit under model.quantize=true;
`AutoPeftModelForCausalLM` loads the base unquantized, another model than a QLoRA one trained:
`align merge` gives the trained model's outputs), plus tokenizer, config.yaml, metrics.jsonl and
align.json (base model = the SFT's; parents sft + preferences).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

from transformers import set_seed
from trl import DPOConfig, DPOTrainer
from trl.data_utils import common_prefix_length

from align import StageError, report
from align.artifacts import (
    eval_command,
    is_main_process,
    model_identity,
    print_done,
    settings_of,
    stage_dir,
    system_prompt_of,
    write_manifest,
)
from align.config import DPOStageConfig, ModelConfig, save_config, to_dict
from align.cpu import restore_policy_from_ref, speed_up_cpu_training
from align.data import file_hash
from align.gpu_training import (
    adapter_settings,
    describe_levers,
    fit_checkpointing,
    one_trainable_dtype,
    peak_gpu_mib,
    use_liger,
)
from align.modeling import (
    DevicePlan,
    adapter_base_name,
    device_plan,
    is_adapter_dir,
    load_base_model,
    load_tokenizer,
    unseen_quantization,
)
from align.preferences import add_system_prompt, load_preferences
from align.preflight import check_stage
from align.reward_model import probe_warning
from align.tracking import finish_wandb, log_artifact, start_wandb_run
from align.training import (
    HeldoutPairs,
    MetricsJSONL,
    ThisRunsSettings,
    UniqueRows,
    distinct_rows_metrics,
    final_eval,
    gathers_of_any_size,
    heldout_preferences,
    ranking_dataloader,
    resume_checkpoint,
    train_from,
    train_loss,
    trl_args,
)

log = logging.getLogger(__name__)


class AlignDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer, each distinct response of a batch run once (policy and reference alike).

    A K-wise ranking's pairs share their responses; with `group_by_ranking` a batch keeps each
    ranking's pairs together, so a batch of 8 pairs (16 rows) from two K=4 rankings holds 8
    distinct responses, and the forward passes that cost the step halve. The loss, its gradients
    and every logged figure are those of running each row (align.training.UniqueRows, which
    expands TRL's per-token outputs back to the rows).

    Each evaluation also records every held-out pair's log-probs (align.training.HeldoutPairs): TRL's
    eval figures are means of per-batch means; the manifest's are over the pairs. In training every pair
    weighs the same whatever the size of its batch (_compute_loss).
    """

    def __init__(self, *args, group_by_ranking: bool = False, **kwargs):
        self.group_by_ranking = group_by_ranking
        self.rows_seen = self.rows_run = 0  # rows of the batches (2 per pair) and distinct ones the model ran
        self.heldout = HeldoutPairs()  # each held-out pair's log-probs, from the last evaluation (TRL's: per batch)
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """TRL's tokenization, then no end of turn after a response cut at the sampler's max_new_tokens."""
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        return drop_cut_ends(dataset, processing_class)

    def get_train_dataloader(self):
        if not self.group_by_ranking:
            return super().get_train_dataloader()
        return ranking_dataloader(self, ["prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps",
                                         "ref_rejected_logps"])

    def evaluate(self, *args, **kwargs):
        with self.heldout.evaluation():
            return super().evaluate(*args, **kwargs)

    def _compute_loss(self, model, inputs, return_outputs):
        peft_model = self.accelerator.unwrap_model(self.model)
        with UniqueRows.patched(peft_model) as unique, \
                self.heldout.batch(peft_model, inputs, self.accelerator.gather_for_metrics), \
                gathers_of_any_size(self.accelerator):  # a ranking batch's size differs between the processes
            result = super()._compute_loss(model, inputs, return_outputs)
        if self.model.training:
            self.rows_seen += unique.rows
            self.rows_run += unique.distinct
            # TRL's loss is its batch's mean per pair, which weighs a pair by 1 / its batch's size; group_by_ranking's
            # batches are short where a ranking did not fit, so a pair would count more for sharing its batch with
            # fewer. Scaled to the sum over the nominal batch size (mean x pairs / batch_size), each pair's share of a
            # step is 1 / (batch_size * grad_accum) wherever it lands, as in the reward stage (the Trainer divides by
            # grad_accum; DDP averages the processes). The value stays TRL's mean, for the log; the gradient is the sum's.
            loss = result[0] if return_outputs else result
            summed = loss * (len(inputs["input_ids"]) // 2) / self.args.per_device_train_batch_size  # rows: [chosen; rejected]
            loss = summed + (loss - summed).detach()
            result = (loss, result[1]) if return_outputs else loss
        return result


def policy_with_reference(model_cfg: ModelConfig, plan: DevicePlan, sft: Path):
    """The base once, with the SFT adapter as the trainable policy adapter ("default").

    DPOTrainer adds the frozen "ref" copy of it (trl/trainer/dpo_trainer.py: a PeftModel passed
    without peft_config gets `add_adapter("ref", ...)` with the default adapter's weights); TRL
    1.16 has no ref_adapter_name to pass a second loaded copy instead.
    """
    from peft import PeftModel

    base = load_base_model(model_cfg, plan)
    return PeftModel.from_pretrained(base, str(sft), is_trainable=True)


def drop_cut_ends(dataset, tokenizer):
    """Each side export marked cut (`chosen_finished` / `rejected_finished` false) without its end of turn.

    A response cut at max_new_tokens never ended; trained with the template's end of turn, DPO would
    teach the policy to stop mid-sentence (a cut chosen) or to avoid stopping there (a cut rejected).
    The side's ids become the conversation's rendered up to the end of the answer's text
    (`continue_final_message`, tokenized as a whole: a BPE merge of the text's last character with an
    end marker written as plain text is undone too), past the prompt tokens TRL kept."""
    sides = [s for s in ("chosen", "rejected") if f"{s}_finished" in dataset.column_names]
    if not sides:
        return dataset

    def strip(row):
        for side in sides:
            if row[f"{side}_finished"] is False:
                ids = tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=True, return_dict=True,
                                                    continue_final_message=True)["input_ids"]
                row[f"{side}_ids"] = ids[len(row["prompt_ids"]):]
        return row

    return dataset.map(strip, desc="No end of turn after cut responses")


def drop_ties(data):
    """(the pairs without the ties `align export ties=margin0` kept, how many ties each split had).

    A tie prefers neither answer, but DPO's loss has no p = 1/2 (the reward stage trains ties so): it would
    train the first answer, `chosen` by the export's order only, as the winner."""
    dropped = {}
    for split in list(data):
        ties = data[split]["tie"] if "tie" in data[split].column_names else []
        dropped[split] = sum(bool(t) for t in ties)
        if dropped[split]:
            data[split] = data[split].filter(lambda row: not row["tie"], desc=f"Dropping ties from {split}")
    return data, dropped


UNSURE_POSTERIOR = 0.75


def posterior_note(train) -> tuple[str | None, dict | None]:
    """(a warning, the manifest's record) for pairs that carry `align export combine=dawid_skene`'s p_chosen:
    DPO's loss has no per-pair certainty (align reward's has), so a pair the annotators' posterior barely
    decided (p 0.50-0.75) is trained as surely as one it is certain of."""
    if "p_chosen" not in train.column_names or not len(train):
        return None, None
    p = [float(x) for x in train["p_chosen"] if x is not None]
    if not p:
        return None, None
    unsure = sum(x < UNSURE_POSTERIOR for x in p)
    record = {"p_chosen_used": False, "mean_p_chosen": round(sum(p) / len(p), 4), "under_0.75": unsure}
    if not unsure:
        return None, record
    return (f"{unsure} of {len(p)} training pairs have p_chosen under {UNSURE_POSTERIOR} (align export "
            f"combine=dawid_skene's posterior; mean {record['mean_p_chosen']:.2f}): DPO trains each pair as a sure "
            f"preference, its loss has no per-pair certainty, so these teach as much as the sure ones. Drop them "
            f"with align export ... min_posterior={UNSURE_POSTERIOR}, or train on them with align reward (which "
            "reads p_chosen as a soft label) and PPO"), record


def count_too_long(pairs, tokenizer, max_length: int) -> tuple[int, int]:
    """(pairs whose prompt + chosen or prompt + rejected is longer than max_length tokens, as TRL tokenizes them;
    of them, those whose prompt alone reaches it, which TRL drops: no token of an answer is left). The prompt ends
    where TRL's does, where it and each side part (trl's common_prefix_length)."""
    def ids(messages, **kwargs) -> list[int]:
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]

    too_long = dropped = 0
    for row in pairs:
        sides = [ids(row["prompt"] + row[side]) for side in ("chosen", "rejected")]
        if max(len(side) for side in sides) > max_length:
            too_long += 1
            prompt = ids(row["prompt"], add_generation_prompt=True)
            dropped += min(common_prefix_length(prompt, side) for side in sides) >= max_length
    return too_long, dropped


def dpo_args(cfg: DPOStageConfig, out: Path, plan: DevicePlan, has_eval: bool) -> DPOConfig:
    """TRL's DPOConfig from ours: the shared mapping (align.training) plus DPO's own keys."""
    return trl_args(
        DPOConfig, cfg.train, plan, cfg.run, "dpo", out, has_eval=has_eval,
        max_length=cfg.model.max_length,
        loss_type=[cfg.loss],
        beta=cfg.beta,
        label_smoothing=cfg.label_smoothing,
        # Step 0 on held-out pairs: the SFT policy's log-probs, the "before" of every figure (main turns it off
        # on a resume).
        eval_on_start=has_eval and cfg.eval_on_start,
    )


def main(cfg: DPOStageConfig) -> Path:
    # --- resolve inputs ---------------------------------------------------------------------
    check_stage("dpo", cfg)  # every input (adapter, data, paths, the machine) before anything is written
    out = stage_dir(cfg.run.dir, "dpo")
    sft = Path(cfg.sft) if cfg.sft else stage_dir(cfg.run.dir, "sft")
    if not is_adapter_dir(sft):
        raise StageError(f"no SFT adapter at {sft}: DPO starts from the SFT policy and keeps it as the reference; "
                         f"run `align sft run.dir={cfg.run.dir}` first or pass sft=<adapter folder>")
    data_path = Path(cfg.data.path) if cfg.data.path else stage_dir(cfg.run.dir, "export")
    if not data_path.exists():
        raise StageError(f"no preference data at {data_path}: run `align export run.dir={cfg.run.dir}` first, "
                         "or pass data.path=<folder or .jsonl>")
    # DPO never runs the reward model, but one trained on these pairs that pays for a phrase says the
    # labels may teach DPO the same habit (align.reward_model.probe).
    probe_note = probe_warning(stage_dir(cfg.run.dir, "reward"), data_path)
    if probe_note:
        log.warning(probe_note)
    model_cfg = replace(cfg.model, name=adapter_base_name(sft))  # the SFT's base, from its manifest
    plan = device_plan(model_cfg)
    log.info(plan.describe())
    if note := unseen_quantization(sft, plan):  # the reference would not be the SFT as trained
        log.warning(note)
    set_seed(cfg.train.seed)

    # --- data -------------------------------------------------------------------------------
    # Hashed before it is read: pairs edited while this stage trains are not what it trained on (a rerun remakes it)
    data_sha256 = file_hash(data_path)
    data, data_report = load_preferences(data_path, test_fraction=cfg.data.test_fraction, seed=cfg.train.seed,
                                         on_error=cfg.data.on_error)
    data, ties = drop_ties(data)
    if ties["train"] == data_report.train:
        raise StageError(f"{data_path}: all {ties['train']} training pairs are ties (tie: true, kept by align export "
                         "ties=margin0), which prefer neither answer: DPO has nothing to learn from them; export "
                         "with ties=drop, or train a reward model on them (align reward trains ties as p_chosen 0.5)")
    if sum(ties.values()):
        log.warning("left out %d tie pairs (%s): a tie prefers neither answer, and DPO would train the first as the "
                 "winner", sum(ties.values()), ", ".join(f"{n} {split}" for split, n in ties.items()))
    posterior_warning, posterior = posterior_note(data["train"])
    if posterior_warning:
        log.warning(posterior_warning)
    system_prompt = system_prompt_of(sft)  # the SFT's: each prompt opens with it, as the policy was trained
    data = add_system_prompt(data, system_prompt)
    train, test = data["train"], data.get("test")
    if test is not None and len(test) == 0:  # held-out pairs that were all ties
        log.warning("every held-out pair is a tie: no held-out figures (hold out more prompts, data.test_fraction)")
        test = None
    tokenizer = load_tokenizer(str(sft))  # the SFT's chat template and pad token
    too_long, dropped = count_too_long(train, tokenizer, cfg.model.max_length)
    test_too_long, test_dropped = count_too_long(test, tokenizer, cfg.model.max_length) if test is not None else (0, 0)
    cut, test_cut = too_long - dropped, test_too_long - test_dropped
    if cut + test_cut:  # TRL cuts each side to max_length on its own, keeping the start: a side loses its end
        log.warning("%d of %d pairs have a side longer than model.max_length=%d tokens (%d train, %d held out): TRL "
                    "cuts it there, so a training side's end and EOS are not trained, and a held-out pair is "
                    "measured on its start only (answers that part later score alike); raise model.max_length to "
                    "keep them whole", cut + test_cut, len(train) + (len(test) if test else 0), cfg.model.max_length,
                    cut, test_cut)
    if dropped + test_dropped:  # TRL leaves them out without a word
        log.warning("%d of %d pairs are dropped (%d train, %d held out): their prompt alone is model.max_length=%d "
                    "tokens or more, so no token of an answer is left to compare (TRL leaves them out); raise "
                    "model.max_length to keep them", dropped + test_dropped, len(train) + (len(test) if test else 0),
                    dropped, test_dropped, cfg.model.max_length)
    if dropped == len(train):
        raise StageError(f"every training pair's prompt is model.max_length={cfg.model.max_length} tokens or longer: "
                         "no token of an answer is left to compare; raise model.max_length")
    test_gone = 0  # held-out pairs all dropped: evaluated on, TRL's empty eval set would fail
    if test is not None and test_dropped == len(test):
        log.warning("every held-out pair is dropped: no held-out figures")
        test, test_gone = None, test_dropped

    # --- model ------------------------------------------------------------------------------
    model = policy_with_reference(model_cfg, plan, sft)
    # A step's backward holds batch_size pairs (chosen + rejected); the reference's forward keeps nothing.
    plan = fit_checkpointing(plan, cfg.model.gradient_checkpointing, model,
                             tokens_per_step=2 * cfg.train.batch_size * cfg.model.max_length)
    levers = describe_levers(plan, liger=use_liger(cfg.train.liger), compile=cfg.train.compile,
                             lora=adapter_settings(sft, None))
    log.info(levers)

    # --- trainer ----------------------------------------------------------------------------
    start_wandb_run(cfg.run, "dpo")  # before the trainer: its W&B callback logs into this run
    trainer = AlignDPOTrainer(
        group_by_ranking=cfg.group_by_ranking,
        model=model,
        args=dpo_args(cfg, out, plan, has_eval=test is not None),
        train_dataset=train,
        eval_dataset=test,
        processing_class=tokenizer,
        callbacks=[MetricsJSONL(out), ThisRunsSettings()],
    )
    # What TRL trains and evaluates on: its datasets, less what it dropped.
    counts = {"train": len(trainer.train_dataset), "test": len(trainer.eval_dataset) if test is not None else 0}
    counts["dropped"] = len(train) - counts["train"] + (len(test) - counts["test"] if test is not None else 0) + test_gone
    # Guard the one thing DPO must get right: without "ref" (a TRL change, a peft version without
    # several adapters) TRL falls back to the adapter-disabled raw base as the reference.
    policy = trainer.model
    if "ref" not in policy.peft_config:
        raise StageError("DPOTrainer made no frozen 'ref' copy of the SFT adapter, so the reference would be the raw "
                         "base; refusing (check the installed trl/peft against pyproject.toml)")
    # Step 0 exactly the SFT policy, its adapter trained in fp32, on every device (align.cpu): TRL
    # rounds a 4-bit model's adapter to bf16, where an update under ~1/256 of a weight is lost.
    restore_policy_from_ref(policy)
    one_trainable_dtype(policy)  # sharded: DoRA's magnitudes too
    if plan.device == "cpu":
        speed_up_cpu_training(policy)

    # --- train ------------------------------------------------------------------------------
    # Once the trainer stands (tokenized, its reference checked): this takes a finished run's align.json away.
    checkpoint = resume_checkpoint(out, cfg.train.resume_from_checkpoint, max_steps=cfg.train.max_steps,
                                   trained_on={"data": data_sha256, "base_model": model_identity(model_cfg.name),
                                               "sft": model_identity(sft), "settings": settings_of(cfg)})
    if checkpoint is not None:  # step 0 once: on a resume it would be the checkpoint's step evaluated again
        trainer.args.eval_on_start = False
    result = train_from(trainer, checkpoint)
    metrics = {"global_step": result.global_step, **{k: v for k, v in result.metrics.items() if k.startswith("train_")},
               **train_loss(result, out, checkpoint)}  # the whole run's, also when resumed
    metrics.update(distinct_rows_metrics(trainer.rows_seen, trainer.rows_run))
    if test is not None:
        # TRL's last evaluation (its loss); its rewards/* and logps/* are means of per-batch means, so the
        # accuracy and margins are measured over the held-out pairs instead (heldout_accuracy, ...)
        metrics.update({k: v for k, v in final_eval(trainer).items() if not k.startswith(("eval_rewards/", "eval_logps/"))})
        metrics.update(heldout_preferences(trainer, cfg.beta))

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
        reward_probe_warning=probe_note, system_prompt=system_prompt,
        data={"path": str(data_path), "sha256": data_sha256, "format": data_report.format,
              "split": data_report.split, "train": counts["train"], "test": counts["test"],
              "skipped": data_report.skipped, "too_long": cut + test_cut, "dropped_prompt_too_long": counts["dropped"],
              "ties_dropped": sum(ties.values()), **({"posterior": posterior} if posterior else {})},
    )
    log_artifact("dpo", out, cfg.run.dir, parents)
    finish_wandb()

    # --- report -----------------------------------------------------------------------------
    html = report.write_report(cfg.run.dir)
    log.info("report: %s", html)
    print_done("dpo", out, eval_command(cfg.run.dir, "dpo", sft))
    return out
