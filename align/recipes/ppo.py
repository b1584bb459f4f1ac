"""Align the SFT policy against the reward model (or a scorer) with PPO, in a loop of our own.

    align ppo --config configs/quickstart/ppo.yaml
    align ppo run.dir=runs/NAME rl.kl_coef=0.1 rl.kl_control=adaptive
    align ppo scorer=support_style                      # a programmatic reward, no reward model
    align ppo train.resume_from_checkpoint=latest       # continue a killed run where it stopped
    align ppo algo=grpo                                 # GRPO / RLOO through TRL: align/recipes/grpo.py

One base model in memory (4-bit per the device plan, fp32 compute on CPU) carrying: the policy
adapter ("default", initialised from the SFT adapter), the reference ("ref", the SFT adapter again,
frozen; without an SFT adapter, the base with the adapter disabled), and a value head on the
policy's last hidden states. The reward is the reward model from `align reward` (its own model,
or with rl.reward_on_policy_base its adapter as a third one on this base), or `scorer=`.

Each step: sample a rollout (batched, left-padded, KV cache), score it, add a per-token KL penalty
against the reference, GAE, then `rl.ppo_epochs` passes of clipped policy + value loss over
minibatches. Rollouts are seeded by (seed, step), so a resumed run repeats an unkilled one. The
maths, the reward and the checkpoints are align.rl's; the split between processes is
align.distributed's.

Under `accelerate launch` with N processes each rank samples and scores its share of the step's
prompts (rl.rollout_prompts / N), the gradients are averaged over the ranks before each optimizer
step (so every rank holds the same weights; checked at the end), and rank 0 writes everything.

Writes <run.dir>/ppo/: a plain peft adapter (the policy, as "default"), the value head, tokenizer,
config.yaml, metrics.jsonl, align.json (parents sft + reward_model), and checkpoints/step-N/
every rl.save_steps. docs/ppo.md explains every knob.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import set_seed

from align import StageError, process_count, report
from align import rl as R
from align.artifacts import (
    eval_command,
    is_main_process,
    print_done,
    stage_dir,
    system_prompt_of,
    write_manifest,
)
from align.config import ConfigError, PPOStageConfig, save_config, to_dict
from align.cpu import keep_trainable_in
from align.data import file_hash, load_prompts
from align.distributed import Ranks
from align.generation import chat_prompt, plain_sampling, stop_ids
from align.gpu_training import adapter_name, adapter_settings, peak_gpu_mib
from align.modeling import (
    adapter_base_name,
    device_plan,
    load_base_model,
    load_tokenizer,
    peft_lora_config,
    unseen_quantization,
)
from align.preflight import check_stage
from align.tracking import Tracker, finish_wandb, log_artifact, read_jsonl
from align.training import lr_scheduler

log = logging.getLogger(__name__)

# A testing hook: SIGKILL this process right after the given step (its checkpoint, if any, written),
# so the resume test kills a real run at a known point instead of racing a timer.
KILL_AFTER_STEP = "ALIGN_PPO_KILL_AFTER_STEP"


# ---------------------------------------------------------------------------- inputs


def check(cfg: PPOStageConfig) -> None:
    """What is left to check once the config's own rules (PPOStageConfig.validate) have passed."""
    rl = cfg.rl
    if cfg.algo != "ppo":
        raise ConfigError(f"algo={cfg.algo} is run by align/recipes/grpo.py (align.artifacts.run_stage routes it)")
    R.check(cfg)
    world = process_count()
    if world > 1 and (rl.rollout_prompts % world or rl.minibatch_size % world):
        raise ConfigError(f"rl.rollout_prompts={rl.rollout_prompts} and rl.minibatch_size={rl.minibatch_size} are "
                          f"split between {world} processes: both must be multiples of {world}")


# ---------------------------------------------------------------------------- model


class ValueHead(torch.nn.Module):
    """V(s_t) from the policy's last hidden state at t: one linear layer, started near zero."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden, 1)
        torch.nn.init.normal_(self.linear.weight, std=1 / (hidden + 1))
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


def build_policy(cfg: PPOStageConfig, plan, sft: Path | None):
    """The base once, with the policy adapter ("default") and, from an SFT adapter, a frozen "ref" copy."""
    from peft import PeftModel, get_peft_model

    base = load_base_model(cfg.model, plan, trainer_places=False)  # its own loop, not a Trainer
    if sft is None:
        model = get_peft_model(base, peft_lora_config(cfg.lora))
    else:
        model = PeftModel.from_pretrained(base, str(sft), is_trainable=True)
        model.load_adapter(str(sft), adapter_name="ref", is_trainable=False)
        model.set_adapter("default")
    # fp32 adapters on every device: this loop has no autocast and no master weights, and Adam's steps at
    # PPO's learning rates (1e-5) are below bf16's resolution for LoRA weights of ~1e-2 (2^-8 relative), so
    # bf16 adapters would silently stop learning. peft runs the LoRA path in fp32 and casts its output back
    # to the base's dtype; the LoRA matmuls are a small part of a step.
    keep_trainable_in(model, torch.float32)
    # No dropout anywhere: the log-probs of a rollout and of its PPO epochs must be the same function.
    model.eval()
    return model


@contextmanager
def reference(model, has_ref: bool):
    if not has_ref:
        with model.disable_adapter():
            yield
        return
    model.set_adapter("ref", inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter("default")  # trainable again, "ref" frozen


# ---------------------------------------------------------------------------- rollouts


def forward(model, head, input_ids, attention_mask, context: int, temperature: float, *, values: bool = True):
    """(log-probs of the response tokens, values, logits) for one batch; response = ids[:, context:]."""
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: as generate() numbered them
    # Logits for the response positions only: the LM head (a 49k vocabulary on the embedded model)
    # over the prompt would be thrown away.
    keep = input_ids.shape[1] - context + 1
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                output_hidden_states=values, use_cache=False, logits_to_keep=keep)
    # Counted from the end: a model whose forward ignores logits_to_keep (remote code taking **kwargs) returns
    # every position, and [:, :-1] of those read the prompt's logits (gather takes a shorter index silently).
    logits = out.logits[:, -keep:-1]
    logp = R.logprobs_of(logits, input_ids[:, context:], temperature)
    v = head(out.hidden_states[-1][:, context - 1:-1]) if values else None
    return logp, v, logits


@torch.no_grad()
def rollout(model, tokenizer, prompts: list[str], cfg: PPOStageConfig, step: int, rank: int = 0,
            system_prompt: str | None = None) -> dict:
    """Sample one response per prompt (seeded by step and rank), batched and left-padded, with the KV cache;
    each prompt after the policy's system prompt."""
    gen = cfg.generation
    tokenizer.padding_side = "left"
    texts = [chat_prompt(tokenizer, p, system_prompt) for p in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    device = next(model.parameters()).device
    eos = stop_ids(tokenizer, model.generation_config)
    responses = []
    for i in range(0, len(prompts), gen.batch_size):
        torch.manual_seed(cfg.train.seed * 1_000_003 + step * 101 + i + rank * 7_919)
        with plain_sampling(model):  # the log-probs below are the plain softmax's: so is the sampling
            out = model.generate(input_ids=enc["input_ids"][i:i + gen.batch_size].to(device),
                                 attention_mask=enc["attention_mask"][i:i + gen.batch_size].to(device),
                                 max_new_tokens=gen.max_new_tokens, do_sample=True, temperature=gen.temperature,
                                 top_p=gen.top_p, top_k=None, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=eos, use_cache=True)
        responses.append(out[:, enc["input_ids"].shape[1]:].cpu())
    width = max(r.shape[1] for r in responses)
    responses = torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1]), value=tokenizer.pad_token_id)
                           for r in responses])
    mask, has_eos = R.response_mask(responses, eos)
    ids = torch.cat([enc["input_ids"], responses], 1).to(device)
    attention = torch.cat([enc["attention_mask"], mask.long()], 1).to(device)
    text = tokenizer.batch_decode(responses * mask.long() + tokenizer.pad_token_id * (1 - mask.long()),
                                  skip_special_tokens=True)
    return {"ids": ids, "attention": attention, "context": enc["input_ids"].shape[1], "mask": mask.to(device),
            "has_eos": has_eos.to(device), "texts": [t.strip() for t in text]}


# ---------------------------------------------------------------------------- PPO


def ppo_step(model, head, optimizer, roll: dict, scores: torch.Tensor, cfg: PPOStageConfig, kl_ctl, step: int,
             has_ref: bool, ranks: Ranks | None = None, scaler: torch.amp.GradScaler | None = None
             ) -> dict[str, float]:
    """Score → KL-shaped rewards → GAE → `ppo_epochs` of clipped losses over minibatches.

    The returned figures are the whole step's, the same in every process: the rollout's summed over the processes
    (rl.rollout_figures), the minibatches' losses and ratios each process's averaged (the mean loss the averaged
    gradients follow). `scaler`: the loss scaling of an fp16 model (see loss_scaler); None for none."""
    ranks = ranks or Ranks()
    scaler = scaler or torch.amp.GradScaler(roll["ids"].device.type, enabled=False)
    rl, temp = cfg.rl, cfg.generation.temperature
    rl = replace(rl, minibatch_size=rl.minibatch_size // ranks.world)  # this rank's part of each minibatch
    ids, attention, context, mask = roll["ids"], roll["attention"], roll["context"], roll["mask"]
    n = len(ids)
    with torch.no_grad():
        old_logp, old_values, entropy = [], [], []
        for i in range(0, n, rl.minibatch_size):
            sl = slice(i, i + rl.minibatch_size)
            logp, values, logits = forward(model, head, ids[sl], attention[sl], context, temp)
            old_logp.append(logp)
            old_values.append(values)
            entropy.append(R.entropy_of(logits, temp))
        old_logp, old_values, entropy = torch.cat(old_logp), torch.cat(old_values), torch.cat(entropy)
        with reference(model, has_ref):
            ref_logp = torch.cat([forward(model, head, ids[i:i + rl.minibatch_size], attention[i:i + rl.minibatch_size],
                                          context, temp, values=False)[0] for i in range(0, n, rl.minibatch_size)])
        rewards, kl = R.shape_rewards(scores, old_logp, ref_logp, mask, kl_ctl.value)
        advantages, returns = R.gae(old_values, rewards, mask, rl.gamma, rl.lam)
        advantages = R.masked_whiten(advantages, mask, total=ranks.total)  # the whole rollout's mean and spread

    stats: dict[str, list[float]] = {}
    order = torch.Generator().manual_seed(cfg.train.seed * 7919 + step)
    params = [p for group in optimizer.param_groups for p in group["params"]]  # what unscale_ and step see
    taken = 0  # optimizer steps: fp16's loss scaling skips one whose gradients overflowed
    for _ in range(rl.ppo_epochs):
        for batch in torch.randperm(n, generator=order).split(rl.minibatch_size):
            logp, values, _ = forward(model, head, ids[batch], attention[batch], context, temp)
            pg_loss, pg_stats = R.policy_loss(logp, old_logp[batch], advantages[batch], mask[batch], rl.clip_range)
            vf_loss, vf_stats = R.value_loss(values, old_values[batch], returns[batch], mask[batch],
                                             rl.clip_range_value)
            loss = pg_loss + rl.vf_coef * vf_loss
            finite = bool(torch.isfinite(loss))
            if ranks.any(not finite):  # every process stops here, or none does
                said = (f"{loss.item()} (policy {pg_loss.item()}, value {vf_loss.item()})" if not finite else
                        "not finite in another process")
                raise StageError(f"step {step}: the PPO loss is {said}; stopped before it reached the weights. Try "
                                 "a lower train.lr, rl.score_clip, or rl.whiten_rewards=true; resume from the last "
                                 "checkpoint")
            scaler.scale(loss).backward()
            ranks.average_gradients(params)  # the same gradients in every process, so the same step below
            scaler.unscale_(optimizer)  # fp16: the true gradients again, and whether any overflowed
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
            scaler.step(optimizer)  # fp16: skipped if a gradient overflowed (the scale then halves)
            scaler.update()
            taken += not scaler.is_enabled() or bool(torch.isfinite(norm))  # what the scaler's skip reads
            optimizer.zero_grad(set_to_none=True)
            for k, v in {"policy/loss": pg_loss.item(), "value/loss": vf_loss.item(), **pg_stats, **vf_stats}.items():
                stats.setdefault(k, []).append(v)

    keys = sorted(stats)  # every rank logs the same keys, in this order
    means = ranks.mean(torch.tensor([sum(stats[k]) / len(stats[k]) for k in keys], dtype=torch.float64)).tolist()
    return {"kl_coef": kl_ctl.value, "optimizer_steps": float(taken),
            **R.rollout_figures(entropy, old_values, returns, kl.sum(-1), kl_ctl.value, mask, total=ranks.total),
            **dict(zip(keys, means, strict=True))}


def advance_schedule(scheduler, optimizer_steps: float) -> None:
    """The learning-rate schedule moves with the updates taken: a PPO step whose every update fp16's loss scaling
    skipped (each minibatch's gradients overflowed) leaves it where it was, as accelerate's scheduler does for the
    Trainer's stages (stepped anyway, the first such step made torch warn of a scheduler stepped before its
    optimizer, and the warmup ran ahead of the updates)."""
    if optimizer_steps:
        scheduler.step()


def loss_scaler(plan, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for an fp16 model (model.compute_dtype=float16, for GPUs without bf16: T4, V100), off for any
    other. The gradients flowing back through fp16 matmuls are each token's share of the minibatch's mean loss:
    the more tokens, the more of them fall among fp16's subnormals (below 6e-5, fewer digits) or under its
    smallest number (6e-8). Measured on the embedded model (benchmarks/fp16_gradients.py), the fp32 adapters'
    gradients' cosine to fp32 compute's: on an unquantized fp16 base 0.9945 at a minibatch's 2k tokens, 0.92 at
    20k, 0.51 at 200k, and 1.0000 at all three with the loss scaled; on a 4-bit base (its embedding, norms and
    head fp32: only the 4-bit matmuls compute in fp16) 0.998 scaled throughout, 0.83 unscaled at 200k. The loss
    is scaled up for the backward pass and the gradients down before the step, which is skipped if one
    overflowed (the scale then halves), as transformers' Trainer scales the other stages' losses under fp16."""
    return torch.amp.GradScaler(device.type, enabled=plan.compute_dtype == torch.float16)


def train_ppo(cfg: PPOStageConfig, plan, sft: Path | None, prompts: list[str], out: Path, tracker_config: dict,
              system_prompt: str | None = None):
    ranks = Ranks()
    set_seed(cfg.train.seed)
    model = build_policy(cfg, plan, sft)
    tokenizer = load_tokenizer(str(sft) if sft else cfg.model.name)
    head = ValueHead(model.config.hidden_size).to(next(model.parameters()).device)
    reward, gate_figures, rm = R.make_reward(cfg, model, sft)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = lr_scheduler(optimizer, cfg.train)
    scaler = loss_scaler(plan, next(model.parameters()).device)
    kl_ctl = R.kl_controller(cfg.rl.kl_control, cfg.rl.kl_coef, cfg.rl.kl_target, cfg.rl.kl_horizon)

    start = 0
    checkpoint = R.find_checkpoint(out, cfg.train.resume_from_checkpoint, max_steps=cfg.train.max_steps,
                                   trained_on=R.trained_on(cfg, sft, rm))
    if checkpoint:
        start = R.load_checkpoint(checkpoint, model, head, optimizer, scheduler, kl_ctl, lr=cfg.train.lr,
                                  weight_decay=cfg.train.weight_decay, scaler=scaler)
        rows = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("step", 0) <= start]
        if is_main_process():  # drop what the killed run logged after its checkpoint: it is redone
            (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        log.info("resumed at step %d from %s", start, checkpoint)
    tracker = Tracker(cfg.run, "ppo", out, tracker_config, resume=checkpoint is not None)

    per_step = min(cfg.rl.rollout_prompts, len(prompts))
    if per_step % ranks.world:
        raise StageError(f"{per_step} prompts a step ({len(prompts)} prompts, rl.rollout_prompts="
                         f"{cfg.rl.rollout_prompts}) do not split evenly between {ranks.world} processes")
    last: dict[str, float] = {}
    for step in range(start + 1, cfg.train.max_steps + 1):
        began = time.perf_counter()
        # --- rollout: the prompts and the sampling stream depend only on (seed, step)
        batch = random.Random(cfg.train.seed * 1_000_033 + step).sample(prompts, min(cfg.rl.rollout_prompts,
                                                                                      len(prompts)))
        batch = ranks.share(batch)  # all of it in one process
        roll = rollout(model, tokenizer, batch, cfg, step, ranks.rank, system_prompt)
        generated = time.perf_counter() - began
        raw = torch.tensor(reward(batch, roll["texts"]), dtype=torch.float32, device=roll["mask"].device)
        broken = (~torch.isfinite(raw)).nonzero().flatten().tolist()
        if ranks.any(bool(broken)):  # every process stops here, or none does
            said = (f"for {len(broken)} of {len(raw)} responses (first: {roll['texts'][broken[0]][:80]!r})"
                    if broken else "for responses of another process")
            raise StageError(f"step {step}: the reward is not finite {said}; fix the reward model/scorer")
        scores = R.scores_used(raw, roll["has_eos"], cfg.rl, ranks.total)  # over the whole step, not a rank's share
        scored = time.perf_counter() - began - generated

        # --- update
        # every figure the whole step's, the same in every process: the KL controller then moves alike everywhere
        stats = ppo_step(model, head, optimizer, roll, scores, cfg, kl_ctl, step, sft is not None, ranks, scaler)
        lr = scheduler.get_last_lr()[0]  # the rate this step trained at (the next one's after scheduler.step)
        advance_schedule(scheduler, stats["optimizer_steps"])
        kl_ctl.update(stats["kl"], len(batch) * ranks.world)
        rows = [[step, p, t, s] for p, t, s in zip(batch, roll["texts"], raw.tolist(), strict=True)]  # this rank's
        raw, scores = ranks.gather(raw), ranks.gather(scores)
        lengths = ranks.gather(roll["mask"].sum(-1))
        has_eos = ranks.gather(roll["has_eos"].float())
        elapsed = time.perf_counter() - began
        last = {"reward/mean": raw.mean().item(), "reward/std": raw.std().item() if len(raw) > 1 else 0.0,
                "reward/score_used": scores.mean().item(), **stats, "length/mean": lengths.float().mean().item(),
                "eos_fraction": has_eos.mean().item(), "lr": lr,
                "time/step": elapsed, "time/rollout": generated, "time/score": scored,
                "tokens_per_s": (lengths.sum().item() * (1 + cfg.rl.ppo_epochs)) / elapsed}
        if scaler.is_enabled():
            last["loss_scale"] = scaler.get_scale()
            if last["loss_scale"] < 1:  # the same in every process: every one stops here
                raise StageError(f"step {step}: the loss scale fell to {last['loss_scale']:.3g} (from 65536, "
                                 "halved at each minibatch whose gradients overflowed, its step skipped): fp16 "
                                 "cannot hold this run's gradients. Set model.compute_dtype=float32 (or bfloat16 "
                                 "where the GPU has it), or try a lower train.lr; resume from the last checkpoint")
        bad = [k for k, v in last.items() if k != "value/explained_variance" and not R.is_finite(v)]
        if bad:
            raise StageError(f"step {step}: {', '.join(bad)} not finite ({last[bad[0]]}); stopped. Try a lower "
                             "train.lr or rl.score_clip; resume from the last checkpoint")
        tracker.log(last, step)
        if (step % max(cfg.train.logging_steps, 1) == 0 or step == 1) and ranks.rank == 0:
            log.info("step %d/%d: reward %.3f, kl %.3f, entropy %.2f, length %.1f, clipfrac %.3f, %.1fs", step,
                     cfg.train.max_steps, last["reward/mean"], last["kl"], last["entropy"], last["length/mean"],
                     last["policy/clipfrac"], elapsed)
            tracker.table("samples", ["step", "prompt", "response", "reward"], rows[:cfg.rl.sample_rows], step)
        if (cfg.rl.save_steps and step % cfg.rl.save_steps == 0) or step == cfg.train.max_steps:
            R.save_checkpoint(out / "checkpoints" / f"step-{step}", model, head, optimizer, scheduler, kl_ctl, step,
                              cfg.train.save_total_limit, cfg.train.max_steps, scaler=scaler)
        if os.environ.get(KILL_AFTER_STEP) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)

    ranks.check_in_sync(params)
    # --- save: the policy adapter alone, as peft's "default"
    if is_main_process():
        model.save_pretrained(str(out), selected_adapters=["default"])
        save_file(head.state_dict(), str(out / R.VALUE_HEAD))
        tokenizer.save_pretrained(str(out))
    rows = read_jsonl(out / "metrics.jsonl")
    first = next((r for r in rows if "reward/mean" in r), last)
    metrics = {"steps": cfg.train.max_steps, "reward_mean_first": first.get("reward/mean"),
               **{k.replace("/", "_"): v for k, v in (rows[-1] if rows else last).items() if k != "step"}}
    if tracker.run is not None:
        tracker.run.summary.update(metrics)  # the run itself is finished in main, after its artifact
    return metrics, gate_figures, rm


# ---------------------------------------------------------------------------- main


def main(cfg: PPOStageConfig) -> Path:
    # --- resolve inputs ---------------------------------------------------------------------
    check_stage("ppo", cfg)  # every input (adapters, reward, prompts, paths, the machine) before any work
    check(cfg)
    out = stage_dir(cfg.run.dir, "ppo")
    sft = R.resolve_sft(cfg)
    if sft:
        cfg = replace(cfg, model=replace(cfg.model, name=adapter_base_name(sft)))  # the SFT's base
    plan = replace(device_plan(cfg.model), gradient_checkpointing=False)  # its own loop recomputes nothing
    log.info(plan.describe())
    if sft and (note := unseen_quantization(sft, plan)):  # the policy and reference would not be the SFT as trained
        log.warning(note)
    R.check_reward(cfg)  # a wrong scorer or a reward model under the gate fails now, before any model loads
    system_prompt = system_prompt_of(sft or cfg.model.name)  # the SFT's (or a merged SFT model's): rollouts open with it

    # --- data -------------------------------------------------------------------------------
    prompts_sha256 = file_hash(cfg.prompts)  # before it is read: edited while this stage trains, it is not what it read
    prompts = load_prompts(cfg.prompts)
    if cfg.num_prompts > 0:
        prompts = prompts[:cfg.num_prompts]

    # --- model, train -----------------------------------------------------------------------
    metrics, gate_figures, rm = train_ppo(cfg, plan, sft, prompts, out, to_dict(cfg), system_prompt)

    # --- save -------------------------------------------------------------------------------
    save_config(cfg, out / "config.yaml")
    parents = {k: v for k, v in {"sft": sft, "reward_model": rm}.items() if v}
    write_manifest(
        out, stage="ppo", config=to_dict(cfg), base_model=cfg.model.name, parents=parents, metrics=metrics,
        device_plan=plan.describe(adapter_name(adapter_settings(sft, cfg.lora))), gpu_peak_mib=peak_gpu_mib(), algo=cfg.algo,
        reference="sft adapter (frozen copy)" if sft else "base (adapter disabled)", system_prompt=system_prompt,
        reward={"scorer": cfg.scorer} if cfg.scorer else {"reward_model": str(rm),
                                                            "eval_accuracy": gate_figures.get("eval_accuracy"),
                                                            "device": gate_figures.get("device")},
        prompts={"path": cfg.prompts, "sha256": prompts_sha256, "count": len(prompts)},
    )
    log_artifact("ppo", out, cfg.run.dir, parents)
    finish_wandb()

    # --- report -----------------------------------------------------------------------------
    html = report.write_report(cfg.run.dir)
    log.info("report: %s", html)
    print_done("ppo", out, eval_command(cfg.run.dir, "ppo", sft, scorer=cfg.scorer, reward_model=rm,
                                          base=cfg.model.name))
    return out
