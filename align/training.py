"""What the stages that train with a TRL trainer share: TRL's arguments from our config, resume, the final
held-out evaluation (and DPO's over its pairs) and the metrics.jsonl callback.

    args = trl_args(DPOConfig, cfg.train, plan, cfg.run, "dpo", out, has_eval=True, beta=cfg.beta, ...)
    checkpoint = resume_checkpoint(out, cfg.train.resume_from_checkpoint, max_steps=cfg.train.max_steps,
                                   trained_on={...})
    result = train_from(trainer, checkpoint)  # trainer.train, never a step past max_steps

One mapping of our `train` section, the device plan and the run onto TRL's argument classes
(SFTConfig, RewardConfig, DPOConfig, GRPOConfig, RLOOConfig: all transformers'
TrainingArguments underneath); each stage adds its own keys (max_length, loss_type, ...) as
keyword arguments, which win over the shared ones.
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import TrainerCallback

from align import StageError
from align.artifacts import begin_training
from align.config import RunConfig, TrainConfig
from align.evaluation import grouped_proportion_ci
from align.gpu_training import liger_confined, use_liger
from align.modeling import DevicePlan
from align.tracking import append_jsonl, read_jsonl, report_to, scalars

log = logging.getLogger(__name__)

Args = TypeVar("Args")


def trl_args(config_class: type[Args], train: TrainConfig, plan: DevicePlan, run: RunConfig, stage: str, out: Path,
             *, has_eval: bool, **stage_keys: Any) -> Args:
    """`config_class` from our train section, the device plan and the run, plus the stage's own keys."""
    # Held-out evaluation during training needs a step to happen at. With eval_steps at or past the last
    # step there is none: the stage scores its held-out set once, after training (else transformers scores
    # it at the last step and the stage again: a DPO pass over the held-out pairs twice, ~40 s on 2 cores).
    during = has_eval and not (train.max_steps > 0 and train.eval_steps >= train.max_steps)
    # The checkpoint with the lowest held-out loss is kept for sft only. The reward model's and DPO's
    # held-out figures are the verdict (the PPO gate reads the reward model's): picked on those same pairs,
    # a checkpoint would report its own selection, optimistic on a few dozen pairs. They keep their last step.
    keep_best = during and stage == "sft"
    liger = use_liger(train.liger)
    shared: dict[str, Any] = dict(
        output_dir=str(Path(out) / "checkpoints"),
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.lr,
        lr_scheduler_type=lr_schedule(train),
        warmup_steps=train.warmup_ratio,  # a float < 1 is a fraction of the steps
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        seed=train.seed,
        # TRL defaults bf16 and checkpointing on; chosen per device instead (see DevicePlan).
        bf16=plan.bf16,
        fp16=plan.fp16,
        use_cpu=plan.device == "cpu",
        activation_checkpointing=plan.gradient_checkpointing,  # transformers 5: gradient_checkpointing is its deprecated alias
        use_liger_kernel=liger,  # auto: on where CUDA and liger-kernel are
        # Liger's layer kernels only. Its fused linear cross-entropy swaps in a causal LM's forward,
        # which calls lm_head: TRL's sft, dpo and grpo trainers turn it off, its reward trainer does
        # not, and a sequence-classification model has no lm_head (the first reward step failed).
        liger_kernel_config={"fused_linear_cross_entropy": False} if liger else None,
        torch_compile=train.compile,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if during else "no",
        eval_steps=train.eval_steps,
        save_strategy="steps",
        save_steps=train.eval_steps,  # every evaluation has its checkpoint (sft: the best one is kept)
        save_total_limit=train.save_total_limit,
        load_best_model_at_end=keep_best,
        metric_for_best_model="eval_loss" if keep_best else None,
        report_to=report_to(run),
        run_name=f"{Path(run.dir).name}/{stage}",
        dataloader_num_workers=0,
        # Under DDP every trainable (LoRA) weight takes part in each step (a frozen "ref" copy has
        # none); the default search for unused ones costs an extra graph pass per step.
        ddp_find_unused_parameters=False,
    )
    return one_gpu_a_process(config_class(**{**shared, **stage_keys}), plan)


def one_gpu_a_process(args: Args, plan: DevicePlan) -> Args:
    """`args` training on one GPU in this process. One process that sees several GPUs is told by transformers to
    use them all (n_gpu = torch.cuda.device_count()): it multiplies the batch by that count, past the batch the
    device plan sized memory for, and wraps an unquantized model in nn.DataParallel, whose replicas run the
    instance forwards align and TRL patch in (DPO's unique rows, TRL's fused head) on cuda:0's module with another
    GPU's inputs: DPO failed with "Expected all tensors to be on the same device". Several GPUs are `accelerate
    launch`'s (docs/scaling.md), one process each."""
    if plan.device == "cuda" and args.n_gpu > 1:  # n_gpu opens the device state (the Trainer would, at once)
        log.info("%d GPUs visible to one process: training on cuda:0 alone (accelerate launch, one process a GPU, "
                 "trains on them all: docs/scaling.md)", args.n_gpu)
        args._n_gpu = 1  # what transformers sets itself under a launcher
    return args


def lr_schedule(train: TrainConfig) -> str:
    """transformers' name for the schedule `train` asks for: `constant` with a warm-up is `constant_with_warmup`.

    transformers' `constant` takes no warm-up and drops the one it is given without a word: train.warmup_ratio
    (0.05 unless set) did nothing under scheduler=constant, the rate flat from the first step. A warm-up asked
    for is one wanted (warmup_ratio=0 keeps the flat rate), so it is applied rather than refused."""
    if train.scheduler == "constant" and train.warmup_ratio > 0:
        log.info("train.scheduler=constant with train.warmup_ratio=%g: the rate warms up over that fraction of the "
                 "steps, then stays constant (transformers' constant_with_warmup; warmup_ratio=0 for none)",
                 train.warmup_ratio)
        return "constant_with_warmup"
    return train.scheduler


def lr_scheduler(optimizer, train: TrainConfig):
    """The schedule of a loop that is not a Trainer (align ppo's), as trl_args gives a Trainer: train.scheduler,
    warmed up over train.warmup_ratio of train.max_steps."""
    from transformers import get_scheduler

    # Rounded up, as transformers' TrainingArguments.get_warmup_steps does: 5 % of 10 steps warms up over one.
    warmup = math.ceil(train.warmup_ratio * train.max_steps)
    return get_scheduler(lr_schedule(train), optimizer, warmup, train.max_steps)


def final_eval(trainer: Any) -> dict[str, float]:
    """The held-out metrics of the model training ended with, evaluated once.

    transformers evaluates at the last step when it evaluates during training, and with
    load_best_model_at_end the model it ends with is the best step's: that step's logged evaluation
    is the answer. Only when none was logged (no evaluation during training) is the set scored here.
    """
    state = trainer.state
    step = state.best_global_step if trainer.args.load_best_model_at_end and state.best_global_step else state.global_step
    for entry in reversed(state.log_history):
        if entry.get("step") == step and "eval_loss" in entry:
            return {k: v for k, v in entry.items() if k.startswith("eval_")}
    return trainer.evaluate()


def heldout_preferences(trainer: Any, beta: float) -> dict[str, Any]:
    """DPO's held-out figures over the pairs, not TRL's: accuracy of the implicit reward with an interval over
    prompts, the reward margin, and the policy's and the reference's (the SFT's) log-prob margins.

    TRL's eval_rewards/* and eval_logps/* are means of its per-batch means: 27 pairs in batches of 12, 12 and 3
    weigh the last 3 as much as 12 (the quickstart's 18 right of 27, 66.7 %, was reported as 75.0 %). Here each
    pair counts once, from the log-probs the trainer's last evaluation (final_eval's) recorded (HeldoutPairs).
    Every rank has every pair; W&B's summary gets the figures as heldout/* (the interval as
    heldout/accuracy_ci_low and _high), and TRL's eval/rewards/* and eval/logps/* there become *_batch_mean.
    """
    if trainer.heldout.last is None:  # no evaluation in this process (a resume from a checkpoint with no step left)
        trainer.evaluate()
    logps, dataset = trainer.heldout.last, trainer.eval_dataset
    if logps is None or len(logps[0]) != len(dataset):
        raise RuntimeError(f"the last evaluation recorded {0 if logps is None else len(logps[0])} held-out pairs of "
                           f"{len(dataset)}: TRL's DPO evaluation no longer runs as HeldoutPairs expects")
    groups = [json.dumps(p, sort_keys=True) for p in dataset["prompt"]]
    ties = [bool(t) for t in dataset["tie"]] if "tie" in dataset.column_names else None
    figures = preference_figures(*logps, groups=groups, beta=beta, ties=ties)
    if figures["heldout_accuracy"] is not None:
        log.info("held-out, %d pairs from %d prompts: implicit reward accuracy %.1f%% [%.1f%%, %.1f%%], margin %.3f; "
                 "policy log-prob margin %.2f (SFT) -> %.2f", figures["heldout_pairs"], figures["heldout_prompts"],
                 100 * figures["heldout_accuracy"], *(100 * x for x in figures["heldout_accuracy_ci"]),
                 figures["heldout_reward_margin"], figures["heldout_logp_margin_sft"], figures["heldout_logp_margin_dpo"])
    try:
        import wandb
    except ImportError:  # pragma: no cover
        return figures
    if wandb.run is not None and trainer.accelerator.is_main_process:
        summary = {f"heldout/{k.removeprefix('heldout_')}": v for k, v in scalars(figures).items()}
        # W&B's summary keeps each logged key's last value: TRL's last evaluation's eval/rewards/accuracies (0.75
        # on the quickstart) stood beside heldout/accuracy (0.667) as if it were the held-out accuracy. Renamed
        # there with _batch_mean, what it is; its charts keep TRL's names.
        last = next((e for e in reversed(trainer.state.log_history) if "eval_rewards/accuracies" in e), {})
        for key, value in last.items():
            if key.startswith(("eval_rewards/", "eval_logps/")):
                del wandb.run.summary[f"eval/{key.removeprefix('eval_')}"]
                summary[f"eval/{key.removeprefix('eval_')}_batch_mean"] = value
        wandb.run.summary.update(summary)
    return figures


class HeldoutPairs:
    """Each held-out pair's log p(chosen) and log p(rejected) under the policy and the reference, recorded during
    TRL's own DPO evaluation (no pass of its own: that would score the held-out pairs twice).

        with heldout.evaluation():                          # around DPOTrainer.evaluate
            with heldout.batch(peft_model, inputs, accelerator.gather_for_metrics): ...   # around _compute_loss

    TRL's _compute_loss calls the model on the batch's rows ([chosen; rejected]) with `fused_lm_head=True` and
    labels, once as the policy and once under the frozen "ref" adapter (the SFT's copy). A forward hook on the
    peft model sees both calls (however wrapped: DDP, DeepSpeed, FSDP call it), tells them apart by the adapter
    active, and sums each row's per-token log-probs as TRL does (0 off the completion). Per pair the four
    figures are gathered with gather_for_metrics: under several processes each rank scores its share of the
    eval set and every rank gets every pair, in the set's order (the eval dataloader is sequential, sharded
    by accelerate), without the repeats that even out the last batch. `last` is the last complete
    evaluation's: (chosen, rejected, ref_chosen, ref_rejected), lists in the eval set's order.
    """

    def __init__(self) -> None:
        self.last: tuple[list[float], list[float], list[float], list[float]] | None = None
        self._rows: list[torch.Tensor] | None = None  # during an evaluation: a [pairs, 4] tensor per batch

    @contextmanager
    def evaluation(self):
        self._rows = []
        try:
            yield
            table = torch.cat(self._rows) if self._rows else torch.zeros(0, 4)
            self.last = tuple(table[:, i].tolist() for i in range(4))
        finally:
            self._rows = None

    @contextmanager
    def batch(self, module, inputs: dict[str, Any], gather):
        if self._rows is None:  # training, or an evaluation outside `evaluation()`
            yield
            return
        calls: list[tuple[bool, torch.Tensor]] = []

        def seen(mod, args, kwargs, outputs):
            labels = kwargs.get("labels")
            if kwargs.get("fused_lm_head") and labels is not None:  # TRL's log-prob forwards
                calls.append((getattr(mod, "active_adapter", None) == "ref",
                              outputs.log_probs[:, -(labels.size(1) - 1):].detach().sum(dim=1)))

        handle = module.register_forward_hook(seen, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
        policy = [logps for is_ref, logps in calls if not is_ref]
        ref = [logps for is_ref, logps in calls if is_ref]
        if "ref_chosen_logps" in inputs:  # precompute_ref_log_probs: TRL put the reference's in the batch
            ref = [torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])]
        if len(policy) != 1 or len(ref) != 1:
            raise RuntimeError(f"a DPO evaluation batch ran {len(policy)} policy and {len(ref)} reference forwards "
                               "with log-probs, not one each: TRL's DPO evaluation changed (align.training)")
        chosen, rejected = policy[0].float().chunk(2)
        ref_chosen, ref_rejected = ref[0].float().to(chosen.device).chunk(2)
        self._rows.append(gather(torch.stack([chosen, rejected, ref_chosen, ref_rejected], dim=1)).cpu())


def preference_figures(chosen: list[float], rejected: list[float], ref_chosen: list[float], ref_rejected: list[float],
                       *, groups: list[Any], beta: float, ties: list[bool] | None = None) -> dict[str, Any]:
    """The held-out figures from each pair's log-probs (policy, then reference): each pair counts once.

    A pair's implicit reward gap is beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r))), as TRL's
    rewards/margins has it; the pair is right when the gap is > 0. The accuracy's 95 % interval counts prompts,
    not pairs, as independent (a ranking's pairs share their answers: evaluation.grouped_proportion_ci). The
    log-prob margins are log p(chosen) - log p(rejected) under the policy (`_dpo`) and the reference, which is
    the SFT policy (`_sft`). A tie an export kept (`tie`) has no right answer and counts in none of them.
    """
    keep = [i for i in range(len(chosen)) if not (ties and ties[i])]
    if not keep:
        return {"heldout_accuracy": None, "heldout_accuracy_ci": None, "heldout_reward_margin": None,
                "heldout_logp_margin_sft": None, "heldout_logp_margin_dpo": None, "heldout_pairs": 0,
                "heldout_prompts": 0, "heldout_ties": len(chosen)}
    gaps = [beta * ((chosen[i] - ref_chosen[i]) - (rejected[i] - ref_rejected[i])) for i in keep]
    right = [float(g > 0) for g in gaps]
    kept_groups = [groups[i] for i in keep]
    n = len(keep)
    return {"heldout_accuracy": sum(right) / n,
            "heldout_accuracy_ci": list(grouped_proportion_ci(right, kept_groups)),
            "heldout_reward_margin": sum(gaps) / n,
            "heldout_logp_margin_sft": sum(ref_chosen[i] - ref_rejected[i] for i in keep) / n,
            "heldout_logp_margin_dpo": sum(chosen[i] - rejected[i] for i in keep) / n,
            "heldout_pairs": n, "heldout_prompts": len(set(kept_groups)), "heldout_ties": len(chosen) - n}


def resume_checkpoint(out: Path, resume: str | None, *, max_steps: int = -1,
                      trained_on: dict[str, Any] | None = None) -> str | None:
    """`train.resume_from_checkpoint` for a TRL trainer: "latest" is the newest <out>/checkpoints/checkpoint-N
    that can go on into this run (align.artifacts.begin_training: not a finished run's unless trained longer
    to `max_steps`, nor one trained on other inputs than `trained_on`); one past `max_steps` is refused (it would
    train nothing under a manifest giving `max_steps`), one at it finishes the run (train_from).

    "latest" with no such checkpoint starts from scratch (so a pipeline can always pass it); any
    other value is a checkpoint folder, passed on as it is.
    """
    found = begin_training(out, resume, max_steps=max_steps, trained_on=trained_on)
    return str(found) if found else None


def train_from(trainer: Any, checkpoint: str | None) -> Any:
    """trainer.train(resume_from_checkpoint=checkpoint), training no step past train.max_steps.

    A run killed after its last step (while it evaluated, saved or wrote its manifest) leaves checkpoint-<max_steps>.
    Resumed from it, transformers' loop fast-forwards into the epoch and trains one more batch before it checks
    max_steps (a run of 2 steps ended at step 3). From a checkpoint at max_steps, the epoch pass is left out: the
    Trainer loads the checkpoint (weights, state, the best step so far), trains nothing and finishes as usual
    (its train_* figures, the best checkpoint loaded back when load_best_model_at_end)."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text()) if checkpoint else {}
    if not 0 < trainer.args.max_steps <= state.get("global_step", 0):
        with liger_confined(getattr(trainer.args, "use_liger_kernel", False)):
            result = trainer.train(resume_from_checkpoint=checkpoint)
        refuse_lost_fp16_steps(trainer, result.global_step)
        return result
    if not callable(getattr(trainer, "_run_epoch", None)):  # another transformers: a step past max_steps, not silently
        raise RuntimeError("this transformers' Trainer has no _run_epoch: align.training.train_from cannot "
                           f"finish the run at {checkpoint} without training a step past train.max_steps")

    def no_steps_left(**_kwargs) -> None:
        trainer.control.should_training_stop = True

    trainer._run_epoch = no_steps_left  # this instance only, for this call
    try:
        with liger_confined(getattr(trainer.args, "use_liger_kernel", False)):
            return trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        del trainer._run_epoch


def refuse_lost_fp16_steps(trainer: Any, step: int) -> None:
    """A StageError, before anything is saved, when an fp16 run's loss scale fell under 1: accelerate's GradScaler
    (on CUDA under model.compute_dtype=float16) skips each step whose gradients overflowed and halves the scale
    from 65536, and transformers leaves those steps' losses out of the logged loss (logging_nan_inf_filter); the
    weights never moved are finite. A run whose every step overflowed saved its untrained adapter as finished."""
    scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return
    scale = scaler.get_scale()
    log.info("fp16 loss scale at the end: %g", scale)
    if scale < 1:
        raise StageError(f"training under fp16 to step {step}: the loss scale fell to {scale:.3g} (from 65536, "
                         "halved at each step whose gradients overflowed, the step skipped): fp16 cannot hold this "
                         "run's gradients, and nothing is saved. Set model.compute_dtype=float32 (or bfloat16 where "
                         "the GPU has it), or a lower train.lr")


def set_rate(optimizer, scheduler, lr: float) -> None:
    """Train at `lr` from here on, at the schedule's current position: a restored optimizer and LambdaLR
    schedule carry the rate they were saved with, and would go on at that one."""
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"], group["lr"] = lr, lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # get_last_lr(): what the next step uses


class ThisRunsSettings(TrainerCallback):
    """A run resumed from a checkpoint trains at this run's `train.lr`, and logs, evaluates and saves at this run's
    steps (train.logging_steps, train.eval_steps; save_steps): the Trainer restores the checkpoint's optimizer and
    schedule, rate included, and its trainer_state.json, whose logging, eval and save steps are the ones it then
    steps by. "Resume with a lower train.lr" silently kept the old rate, and a run resumed with train.eval_steps=
    50000 still evaluated every 2 steps, while config.yaml and align.json recorded the new. The schedule's
    position (warm-up, decay) is kept."""

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if state.global_step:
            was = {kind: getattr(state, f"{kind}_steps") for kind in ("logging", "eval", "save")}
            state.compute_steps(args, state.max_steps)  # as the Trainer set them before it loaded the checkpoint's
            moved = [f"{kind}_steps {n} -> {getattr(state, f'{kind}_steps')}" for kind, n in was.items()
                     if getattr(state, f"{kind}_steps") != n]
            if moved:
                log.info("resumed at step %d with this run's %s", state.global_step, ", ".join(moved))
        if not state.global_step or optimizer is None or not hasattr(lr_scheduler, "lr_lambdas"):
            return
        if any(g.get("initial_lr", args.learning_rate) != args.learning_rate for g in optimizer.param_groups):
            log.info("resumed at step %d with train.lr=%g (the checkpoint's rate was %g)", state.global_step,
                     args.learning_rate, optimizer.param_groups[0].get("initial_lr"))
        # Always: the restored optimizer holds the rate the checkpoint's schedule had reached, and a run resumed
        # to train longer (a higher max_steps, the same lr) took its first step at the old schedule's end (0 after
        # a cosine decay) before the new schedule's next step set it.
        set_rate(optimizer, lr_scheduler, args.learning_rate)


def train_loss(result: Any, out: str | Path, checkpoint: str | None) -> dict[str, float]:
    """`train_loss` of the whole run. The Trainer's averages the steps this process trained: after a resume
    from `checkpoint` (checkpoint-R), only steps R+1..N (a run resumed near its end recorded a loss ~100x lower
    than the same run unbroken). Resumed, steps 1..R come from metrics.jsonl's logged losses, each weighted by
    the steps it averages (steps after the last log before R at that log's loss), steps R+1..N from the
    Trainer's figure, which is also kept as `train_loss_since_resume`."""
    if not checkpoint:
        return {"train_loss": result.training_loss}
    since = {"train_loss_since_resume": result.training_loss}
    resumed_at = Path(checkpoint).name.rpartition("-")[2]
    before = [(r["step"], r["loss"]) for r in read_jsonl(Path(out) / "metrics.jsonl")
              if isinstance(r.get("loss"), (int, float)) and isinstance(r.get("step"), int)
              and resumed_at.isdigit() and r["step"] <= int(resumed_at)]
    if not before or not result.global_step:
        return {"train_loss": result.training_loss, **since}  # nothing known of the steps before: these only
    total, previous = 0.0, 0
    for step, loss in before:
        total += (step - previous) * loss
        previous = step
    total += (int(resumed_at) - previous) * before[-1][1]
    total += (result.global_step - int(resumed_at)) * result.training_loss
    return {"train_loss": total / result.global_step, **since}


class MetricsJSONL(TrainerCallback):
    """Every Trainer log line (train and eval) appended to `<out>/metrics.jsonl`, rank 0 only."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / "metrics.jsonl"

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A fresh run starts the file; a resumed one keeps the rows up to its checkpoint's step and appends:
        # the steps the interrupted run logged after it are logged again from here, once.
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= state.global_step] if state.global_step else []
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))  # (read_jsonl drops a half-written line)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            append_jsonl(self.path, {"step": state.global_step, "epoch": state.epoch, **logs})


class UniqueRows:
    """`model` called on the distinct rows of a batch only, every per-row output expanded back to every row.

    The pairs of one K-wise ranking share their responses: a batch that keeps a ranking together
    (`group_by_ranking`) holds each response in several pairs, as chosen in one and rejected in
    another; K=4 gives 6 pairs, 12 rows, 4 distinct. Each distinct row (same tokens, mask and
    labels) runs once, and the gradient of every pair that uses it flows back through the gather:
    the same loss and gradients as running each row (up to dropout, which then draws one mask per
    distinct row). Outputs with one entry per row (a reward model's `logits`, TRL's per-token
    `log_probs`, `entropy`, ...) are expanded; batch-wide ones (a scalar `loss`) are the distinct rows'.

        loss, outputs = super().compute_loss(UniqueRows(model), inputs, return_outputs=True)
        with UniqueRows.patched(peft_model): ...   # every call of peft_model in the block (DPO's policy and reference)
    """

    def __init__(self, model):
        self.model = model
        self.rows = self.distinct = 0  # summed over calls, for the log

    def __call__(self, *args, input_ids=None, attention_mask=None, **kwargs):
        if args or input_ids is None or attention_mask is None or input_ids.dim() != 2:  # packed (padding-free), or
            return self.model(*args, input_ids=input_ids, attention_mask=attention_mask, **kwargs)  # not ids: as is
        key = input_ids.masked_fill(attention_mask == 0, -1)
        per_row = {k: v for k, v in kwargs.items() if torch.is_tensor(v) and v.dim() and len(v) == len(key)}
        if per_row:
            key = torch.cat([key, *(v.reshape(len(key), -1).to(key.dtype) for v in per_row.values())], dim=1)
        distinct, inverse = torch.unique(key, dim=0, return_inverse=True)
        self.rows += len(key)
        self.distinct += len(distinct)
        if len(distinct) == len(key):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        first = torch.empty(len(distinct), dtype=torch.long, device=key.device)  # any row of each group: they are equal
        first.scatter_(0, inverse, torch.arange(len(key), device=key.device))
        outputs = self.model(input_ids=input_ids[first], attention_mask=attention_mask[first],
                             **{**kwargs, **{k: v[first] for k, v in per_row.items()}})
        for name, value in list(outputs.items()):
            if torch.is_tensor(value) and value.dim() and len(value) == len(distinct):
                outputs[name] = value[inverse]
        return outputs

    @classmethod
    @contextmanager
    def patched(cls, module):
        """Within the block, every call of `module` (however wrapped: DDP, DeepSpeed) runs distinct rows only."""
        own = module.__dict__.get("forward")
        unique = cls(module.forward)
        module.forward = unique
        try:
            yield unique
        finally:
            if own is None:
                del module.forward
            else:
                module.forward = own


def distinct_rows_metrics(rows: int, distinct: int) -> dict[str, float]:
    """The manifest's `train_distinct_rows` (the share of training rows the model ran) and its log line."""
    if not distinct:
        return {}
    log.info("training ran %d distinct responses for the %d rows of its pairs (%.2fx fewer forwards)",
             distinct, rows, rows / distinct)
    return {"train_distinct_rows": distinct / rows}


def ranking_dataloader(trainer: Any, columns: list[str]):
    """`trainer`'s training loader with each K-wise ranking's pairs in one batch (align.preferences.ranking_batches),
    keeping only `columns` (those the dataset has) for its collator; a Trainer's get_train_dataloader."""
    from torch.utils.data import DataLoader

    from align.preferences import RankingBatchSampler

    data = trainer.train_dataset
    sampler = RankingBatchSampler(data["task_id"], trainer.args.per_device_train_batch_size, seed=trainer.args.seed)
    loader = DataLoader(data.select_columns([c for c in columns if c in data.column_names]), batch_sampler=sampler,
                        collate_fn=trainer.data_collator, num_workers=trainer.args.dataloader_num_workers)
    return trainer.accelerator.prepare(loader)


@contextmanager
def gathers_of_any_size(accelerator):
    """Within the block, `accelerator.gather` takes a tensor of any length from each process.

    A ranking batch (ranking_dataloader) keeps its rankings whole, so in one step the processes'
    batches hold different numbers of pairs; TRL's compute_loss gathers per-pair figures (the
    reward trainer's rewards, DPO's rewards, margins and log-probs) with `accelerator.gather`, an
    all-gather that needs one shape everywhere: a gloo size error, or undefined under NCCL. Here
    each process's rows are padded to the longest and the padding cut off after the gather, so
    every pair is counted once. The loss is untouched: each process's own pairs' (DDP averages).
    Scalars (TRL's gather_for_metrics of sums and means) gather as before.
    """
    if accelerator.num_processes == 1:
        yield
        return
    own = accelerator.__dict__.get("gather")
    plain = accelerator.gather

    def gather(tensor):
        if not torch.is_tensor(tensor) or tensor.dim() == 0:
            return plain(tensor)
        lengths = plain(torch.tensor([len(tensor)], device=tensor.device)).tolist()
        longest = max(lengths)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[:len(tensor)] = tensor
        rows = plain(padded).split(longest)
        return torch.cat([part[:n] for part, n in zip(rows, lengths, strict=True)])

    accelerator.gather = gather
    try:
        yield
    finally:
        if own is None:
            del accelerator.gather
        else:
            accelerator.gather = own
