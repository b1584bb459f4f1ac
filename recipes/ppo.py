"""Align the SFT policy against the reward model (or a scorer) with PPO; or GRPO / RLOO through TRL.

    align ppo --config configs/quickstart/ppo.yaml
    align ppo run.dir=runs/NAME rl.kl_coef=0.1 rl.kl_control=adaptive
    align ppo scorer=support_style                      # a programmatic reward, no reward model
    align ppo algo=grpo rl.num_generations=4            # TRL's GRPOTrainer (algo=rloo: RLOOTrainer)
    align ppo train.resume_from_checkpoint=latest       # continue a killed run where it stopped

One base model in memory (4-bit per the device plan, fp32 compute on CPU) carrying: the policy
adapter ("default", initialised from the SFT adapter), the reference ("ref", the SFT adapter again,
frozen; without an SFT adapter, the base with the adapter disabled), and a value head on the
policy's last hidden states. The reward is the reward model from `align reward` (its own model,
or with rl.reward_on_policy_base its adapter as a third one on this base), or `scorer=`.

Each step: sample a rollout (batched, left-padded, KV cache), score it, add a per-token KL penalty
against the reference, GAE, then `rl.ppo_epochs` passes of clipped policy + value loss over
minibatches. Rollouts are seeded by (seed, step), so a resumed run repeats an unkilled one.

Under `accelerate launch` with N processes each rank samples and scores its share of the step's
prompts (rl.rollout_prompts / N), the gradients are averaged over the ranks before each optimizer
step (so every rank holds the same weights; checked at the end), and rank 0 writes everything.

Writes <run.dir>/ppo/ (or grpo/, rloo/): a plain peft adapter (the policy, as "default"), the
value head, tokenizer, config.yaml, metrics.jsonl, align.json (parents sft + reward_model), and
checkpoints/step-N/ every rl.save_steps. docs/ppo.md explains every knob.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import get_scheduler, set_seed

from alignment import StageError, report
from alignment import rl as R
from alignment.artifacts import is_main_process, print_done, read_manifest, stage_dir, write_manifest
from alignment.config import ConfigError, PPOStageConfig, save_config, to_dict
from alignment.data import file_hash, load_prompts
from alignment.generation import chat_prompt, check_backend
from alignment.gpu_training import peak_gpu_mib, use_liger
from alignment.modeling import (
    adapter_base_name,
    check_liger,
    device_plan,
    is_adapter_dir,
    keep_trainable_in,
    load_base_model,
    load_tokenizer,
    peft_lora_config,
    speed_up_cpu_training,
)
from alignment.reward_model import trainable_on_cpu
from alignment.tracking import Tracker, read_jsonl

log = logging.getLogger(__name__)

Reward = Callable[[list[str], list[str]], list[float]]
VALUE_HEAD = "value_head.safetensors"
# A testing hook: SIGKILL this process right after the given step (its checkpoint, if any, written),
# so the resume test kills a real run at a known point instead of racing a timer.
KILL_AFTER_STEP = "ALIGN_PPO_KILL_AFTER_STEP"


class Ranks:
    """This process's share of the PPO loop under `accelerate launch`; one process is rank 0 of 1.

    The loop is written here, not by a trainer, so it does its own data split and gradient sync:
    each rank samples rollout_prompts / world prompts, and the LoRA and value-head gradients are
    averaged with one all-reduce (gloo on CPU, NCCL on GPU) before every optimizer step.
    """

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = torch.device("cpu")
        if self.world > 1:
            from accelerate import PartialState

            self.device = PartialState().device  # the process group, from the launcher's environment

    def share(self, items: list) -> list:
        return items[self.rank::self.world]

    # torch.distributed directly, not accelerate.utils.reduce/gather: under the CPU launch config
    # (MULTI_GPU without CUDA) PartialState opens the process group but reports DistributedType.NO,
    # and accelerate's helpers then return this rank's values unreduced.
    def mean(self, values: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return values
        where = values.device
        values = values.detach().to(self.device, copy=True)  # NCCL reduces CUDA tensors only
        torch.distributed.all_reduce(values)
        return (values / self.world).to(where)

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's `values` (same shape on each), concatenated in rank order."""
        if self.world == 1:
            return values
        where, values = values.device, values.detach().to(self.device).contiguous()
        parts = [torch.empty_like(values) for _ in range(self.world)]
        torch.distributed.all_gather(parts, values)
        return torch.cat(parts).to(where)

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.mean(torch.cat([g.reshape(-1) for g in grads]))
        for p, chunk in zip(params, flat.split([g.numel() for g in grads]), strict=True):
            p.grad = chunk.view_as(p).to(p.dtype)

    def check_in_sync(self, params: list[torch.Tensor]) -> None:
        """Stop if the ranks' weights differ: the saved adapter (rank 0's) would not be what all trained."""
        if self.world == 1:
            return
        flat = torch.cat([p.detach().float().reshape(-1) for p in params]).to(self.device)
        spread = flat.clone()
        torch.distributed.all_reduce(spread, op=torch.distributed.ReduceOp.MAX)
        lowest = flat.clone()
        torch.distributed.all_reduce(lowest, op=torch.distributed.ReduceOp.MIN)
        gap = (spread - lowest).abs().max().item()
        if gap > 0:
            raise StageError(f"the {self.world} processes ended with different weights (max difference {gap:.3g}); "
                             "the gradient average did not keep them in sync")


# ---------------------------------------------------------------------------- inputs


def check(cfg: PPOStageConfig) -> None:
    rl, gen = cfg.rl, cfg.generation
    if cfg.algo == "ppo" and gen.backend == "vllm":
        raise ConfigError("generation.backend=vllm: PPO's own loop samples its rollouts with transformers (KV cache, "
                          "batched); vLLM rollouts come with algo=grpo or algo=rloo (TRL's use_vllm)")
    check_backend(gen)
    if gen.temperature <= 0:
        raise ConfigError("generation.temperature: PPO samples its rollouts, so it must be > 0 (1.0 is the usual)")
    if cfg.train.max_steps <= 0:
        raise ConfigError("train.max_steps: PPO counts steps (one rollout each); give a number > 0")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.algo == "ppo" and world > 1 and (rl.rollout_prompts % world or rl.minibatch_size % world):
        raise ConfigError(f"rl.rollout_prompts={rl.rollout_prompts} and rl.minibatch_size={rl.minibatch_size} are "
                          f"split between {world} processes: both must be multiples of {world}")
    if rl.minibatch_size > rl.rollout_prompts:
        raise ConfigError(f"rl.minibatch_size={rl.minibatch_size} exceeds rl.rollout_prompts={rl.rollout_prompts}")
    if cfg.algo != "ppo" and rl.rollout_prompts % rl.num_generations:
        raise ConfigError(f"rl.rollout_prompts={rl.rollout_prompts} (completions per step for {cfg.algo}) must be a "
                          f"multiple of rl.num_generations={rl.num_generations}")


def resolve_sft(cfg: PPOStageConfig) -> Path | None:
    if cfg.sft == "none":
        return None
    sft = Path(cfg.sft) if cfg.sft else stage_dir(cfg.run.dir, "sft")
    if is_adapter_dir(sft):
        return sft
    if cfg.sft:
        raise StageError(f"sft={sft} is not an adapter folder; for a merged SFT model pass model.name={sft} sft=none")
    if not cfg.scorer:
        raise StageError(f"no SFT adapter at {sft}: PPO starts from the SFT policy and keeps it as the reference; "
                         f"run `align sft run.dir={cfg.run.dir}` first, or pass sft=none to start from model.name")
    log.warning("no SFT adapter at %s: a fresh LoRA on %s, the reference is the base (adapter disabled)", sft,
                cfg.model.name)
    return None


def gate(rm: Path, min_accuracy: float) -> dict:
    """Refuse a reward model whose held-out accuracy is under `min_accuracy`: PPO would optimise its noise."""
    if not is_adapter_dir(rm):
        raise StageError(f"no reward model at {rm}: run `align reward run.dir=...` first, pass reward_model=<folder>, "
                         "or use a programmatic reward with scorer=<name or module:function>")
    metrics = read_manifest(rm).get("metrics", {})
    accuracy = metrics.get("eval_accuracy")
    if min_accuracy > 0 and (accuracy is None or accuracy < min_accuracy):
        seen = (f"held-out accuracy {accuracy:.3f}, under" if accuracy is not None else
                "no held-out accuracy in its manifest (it was trained without held-out pairs) to compare with")
        raise StageError(
            f"the reward model at {rm} has {seen} min_reward_accuracy={min_accuracy}: "
            "PPO would maximise a reward that disagrees with your annotators, and the policy learns its mistakes. "
            "Label more (or cleaner) pairs and retrain it with `align reward`; to run anyway, pass "
            "min_reward_accuracy=0")
    return metrics


def make_reward(cfg: PPOStageConfig, policy=None) -> tuple[Reward, dict, Path | None]:
    """(reward(prompts, responses) -> scores, gate figures, the reward model folder or None)."""
    if cfg.scorer:
        fn = resolve_scorer(cfg.scorer)
        return (lambda prompts, responses: [float(fn(p, r)) for p, r in zip(prompts, responses, strict=True)]), {}, None
    rm = Path(cfg.reward_model) if cfg.reward_model else stage_dir(cfg.run.dir, "reward")
    figures = gate(rm, cfg.min_reward_accuracy)
    from alignment.reward_model import load_reward_model, score

    if cfg.rl.reward_on_policy_base:
        return shared_base_reward(policy, rm), {**figures, "device": str(next(policy.parameters()).device)}, rm
    model, tokenizer = load_reward_model(rm)
    figures = {**figures, "device": str(next(model.parameters()).device)}  # the manifest says where it scored
    log.info("reward model %s on %s", rm, figures["device"])
    return (lambda prompts, responses: score(model, tokenizer, prompts, responses,
                                             cfg.generation.batch_size)), figures, rm


def resolve_scorer(spec: str) -> Callable[[str, str], float]:
    from labeling.scorers import resolve_scorer as labeling_resolve  # built-in names and module:function

    try:
        return labeling_resolve(spec)
    except ValueError as err:
        raise ConfigError(str(err)) from None


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

    base = trainable_on_cpu(load_base_model(cfg.model, plan))
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


def shared_base_reward(model, rm: Path) -> Reward:
    """The reward model's adapter as a third adapter ("reward") on the policy's base, plus its score head.

    The reward model is the base (+ the SFT adapter when it was trained from SFT) + its LoRA + a
    linear `score` head on the last token. Here the SFT part is the "ref" adapter, activated
    together with "reward": the same weights, except that SFT is a LoRA delta on the quantized base
    rather than merged before quantization (close, not bit-identical; docs/ppo.md).
    """
    from peft import LoraConfig, set_peft_model_state_dict

    from alignment.reward_model import SFT_ADAPTER, encode

    config = json.loads((rm / "adapter_config.json").read_text())
    config = {k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__}
    config.update(task_type="CAUSAL_LM", modules_to_save=None, inference_mode=True)
    weights = load_file(str(rm / "adapter_model.safetensors"))
    score_key = next(k for k in weights if k.endswith("score.weight"))
    device = next(model.parameters()).device
    head = weights.pop(score_key).float().to(device)
    model.add_adapter("reward", LoraConfig(**config))
    set_peft_model_state_dict(model, weights, adapter_name="reward")
    model.set_adapter("default")
    model.eval()  # the new adapter's dropout layers are created in training mode
    from_sft = is_adapter_dir(rm / SFT_ADAPTER)
    if from_sft and "ref" not in model.peft_config:
        raise StageError("rl.reward_on_policy_base: this reward model was trained on the SFT model, but the policy has "
                         "no SFT adapter to stand for it; set rl.reward_on_policy_base=false")
    tokenizer = load_tokenizer(str(rm))
    active = ["ref", "reward"] if from_sft else ["reward"]

    @torch.no_grad()
    def reward(prompts: list[str], responses: list[str]) -> list[float]:
        model.base_model.set_adapter(active, inference_mode=True)
        try:
            out = []
            for p, r in zip(prompts, responses, strict=True):
                ids = torch.tensor([encode(tokenizer, [{"role": "user", "content": p},
                                                       {"role": "assistant", "content": r}])], device=device)
                hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
                out.append((hidden.float() @ head.T).item())
            return out
        finally:
            model.set_adapter("default")

    return reward


# ---------------------------------------------------------------------------- rollouts


def forward(model, head, input_ids, attention_mask, context: int, temperature: float, *, values: bool = True):
    """(log-probs of the response tokens, values, logits) for one batch; response = ids[:, context:]."""
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: as generate() numbered them
    # Logits for the response positions only: the LM head (a 49k vocabulary on the embedded model)
    # over the prompt would be thrown away.
    keep = input_ids.shape[1] - context + 1
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                output_hidden_states=values, use_cache=False, logits_to_keep=keep)
    logits = out.logits[:, :-1]
    logp = R.logprobs_of(logits, input_ids[:, context:], temperature)
    v = head(out.hidden_states[-1][:, context - 1:-1]) if values else None
    return logp, v, logits


@torch.no_grad()
def rollout(model, tokenizer, prompts: list[str], cfg: PPOStageConfig, step: int, rank: int = 0) -> dict:
    """Sample one response per prompt (seeded by step and rank), batched and left-padded, with the KV cache."""
    gen = cfg.generation
    tokenizer.padding_side = "left"
    texts = [chat_prompt(tokenizer, p) for p in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    device = next(model.parameters()).device
    responses = []
    for i in range(0, len(prompts), gen.batch_size):
        torch.manual_seed(cfg.train.seed * 1_000_003 + step * 101 + i + rank * 7_919)
        out = model.generate(input_ids=enc["input_ids"][i:i + gen.batch_size].to(device),
                             attention_mask=enc["attention_mask"][i:i + gen.batch_size].to(device),
                             max_new_tokens=gen.max_new_tokens, do_sample=True, temperature=gen.temperature,
                             top_p=gen.top_p, top_k=None, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, use_cache=True)
        responses.append(out[:, enc["input_ids"].shape[1]:].cpu())
    width = max(r.shape[1] for r in responses)
    responses = torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1]), value=tokenizer.pad_token_id)
                           for r in responses])
    mask, has_eos = R.response_mask(responses, tokenizer.eos_token_id)
    ids = torch.cat([enc["input_ids"], responses], 1).to(device)
    attention = torch.cat([enc["attention_mask"], mask.long()], 1).to(device)
    text = tokenizer.batch_decode(responses * mask.long() + tokenizer.pad_token_id * (1 - mask.long()),
                                  skip_special_tokens=True)
    return {"ids": ids, "attention": attention, "context": enc["input_ids"].shape[1], "mask": mask.to(device),
            "has_eos": has_eos.to(device), "texts": [t.strip() for t in text]}


# ---------------------------------------------------------------------------- checkpoints


def save_checkpoint(folder: Path, model, head, optimizer, scheduler, kl_ctl, step: int, keep: int) -> None:
    """Everything a resumed run needs to repeat this one exactly, written to a temp folder then renamed."""
    if not is_main_process():
        return
    tmp = folder.parent / f".{folder.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp), selected_adapters=["default"])
    save_file(head.state_dict(), str(tmp / VALUE_HEAD))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}},
               tmp / "state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "kl_ctl": kl_ctl.state_dict()}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    old = sorted(folder.parent.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep] if keep > 0 else []
    for path in old:
        shutil.rmtree(path, ignore_errors=True)


def find_checkpoint(out: Path, resume: str | None) -> Path | None:
    if not resume:
        return None
    if resume in ("latest", "auto"):
        found = sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
        log.info("resuming from %s", found[-1] if found else "scratch (no checkpoint found)")
        return found[-1] if found else None
    if not (Path(resume) / "trainer_state.json").is_file():
        raise StageError(f"train.resume_from_checkpoint={resume} is not a PPO checkpoint (no trainer_state.json)")
    return Path(resume)


def load_checkpoint(folder: Path, model, head, optimizer, scheduler, kl_ctl) -> int:
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")), adapter_name="default")
    keep_trainable_in(model, next(head.parameters()).dtype)
    head.load_state_dict(load_file(str(folder / VALUE_HEAD)))
    state = torch.load(folder / "state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    info = json.loads((folder / "trainer_state.json").read_text())
    kl_ctl.load_state_dict(info["kl_ctl"])
    return info["step"]


# ---------------------------------------------------------------------------- PPO


def ppo_step(model, head, optimizer, roll: dict, scores: torch.Tensor, cfg: PPOStageConfig, kl_ctl, step: int,
             has_ref: bool, ranks: Ranks | None = None) -> dict[str, float]:
    """Score → KL-shaped rewards → GAE → `ppo_epochs` of clipped losses over minibatches.

    The returned figures are this rank's; under several processes the caller averages them."""
    ranks = ranks or Ranks()
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
        advantages = R.masked_whiten(advantages, mask)

    stats: dict[str, list[float]] = {}
    order = torch.Generator().manual_seed(cfg.train.seed * 7919 + step)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    for _ in range(rl.ppo_epochs):
        for batch in torch.randperm(n, generator=order).split(rl.minibatch_size):
            logp, values, _ = forward(model, head, ids[batch], attention[batch], context, temp)
            pg_loss, pg_stats = R.policy_loss(logp, old_logp[batch], advantages[batch], mask[batch], rl.clip_range)
            vf_loss, vf_stats = R.value_loss(values, old_values[batch], returns[batch], mask[batch],
                                             rl.clip_range_value)
            loss = pg_loss + rl.vf_coef * vf_loss
            if not torch.isfinite(loss):
                raise StageError(f"step {step}: the PPO loss is {loss.item()} (policy {pg_loss.item()}, value "
                                 f"{vf_loss.item()}); stopped before it reached the weights. Try a lower train.lr, "
                                 "rl.score_clip, or rl.whiten_rewards=true; resume from the last checkpoint")
            loss.backward()
            ranks.average_gradients(params)
            torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for k, v in {"policy/loss": pg_loss.item(), "value/loss": vf_loss.item(), **pg_stats, **vf_stats}.items():
                stats.setdefault(k, []).append(v)

    seq_kl = kl.sum(-1)
    return {
        "kl": seq_kl.mean().item(),
        "kl_coef": kl_ctl.value,
        "entropy": R.masked_mean(entropy, mask).item(),
        "reward/non_score": (-kl_ctl.value * seq_kl).mean().item(),
        "value/explained_variance": R.explained_variance(old_values, returns, mask),
        "value/mean": R.masked_mean(old_values, mask).item(),
        **{k: sum(v) / len(v) for k, v in stats.items()},
    }


def train_ppo(cfg: PPOStageConfig, plan, sft: Path | None, prompts: list[str], out: Path, tracker_config: dict):
    ranks = Ranks()
    set_seed(cfg.train.seed)
    model = build_policy(cfg, plan, sft)
    tokenizer = load_tokenizer(str(sft) if sft else cfg.model.name)
    head = ValueHead(model.config.hidden_size).to(next(model.parameters()).device)
    reward, gate_figures, rm = make_reward(cfg, model)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = get_scheduler(cfg.train.scheduler, optimizer, int(cfg.train.warmup_ratio * cfg.train.max_steps),
                              cfg.train.max_steps)
    kl_ctl = R.kl_controller(cfg.rl.kl_control, cfg.rl.kl_coef, cfg.rl.kl_target, cfg.rl.kl_horizon)

    start = 0
    checkpoint = find_checkpoint(out, cfg.train.resume_from_checkpoint)
    if checkpoint:
        start = load_checkpoint(checkpoint, model, head, optimizer, scheduler, kl_ctl)
        rows = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("step", 0) <= start]
        if is_main_process():  # drop what the killed run logged after its checkpoint: it is redone
            (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        log.info("resumed at step %d from %s", start, checkpoint)
    tracker = Tracker(cfg.run, cfg.algo, out, tracker_config, resume=checkpoint is not None)

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
        roll = rollout(model, tokenizer, batch, cfg, step, ranks.rank)
        raw = torch.tensor(reward(batch, roll["texts"]), dtype=torch.float32, device=roll["mask"].device)
        if not torch.isfinite(raw).all():
            raise StageError(f"step {step}: the reward is not finite for {int((~torch.isfinite(raw)).sum())} of "
                             f"{len(raw)} responses (first: {roll['texts'][0][:80]!r}); fix the reward model/scorer")
        scores = raw.clone()
        if cfg.rl.missing_eos_penalty is not None:
            scores = scores - cfg.rl.missing_eos_penalty * (~roll["has_eos"]).float()
        if cfg.rl.whiten_rewards and len(scores) * ranks.world > 1:
            every = ranks.gather(scores)  # whitened over the whole step's rollout, not one rank's share
            scores = (scores - every.mean()) / (every.std() + 1e-8)
        if cfg.rl.score_clip is not None:
            scores = scores.clamp(-cfg.rl.score_clip, cfg.rl.score_clip)
        generated = time.perf_counter() - began

        # --- update
        stats = ppo_step(model, head, optimizer, roll, scores, cfg, kl_ctl, step, sft is not None, ranks)
        if ranks.world > 1:  # every figure over the whole step; the KL controller then moves alike everywhere
            keys = sorted(stats)
            stats = dict(zip(keys, ranks.mean(torch.tensor([stats[k] for k in keys], dtype=torch.float64)).tolist(),
                             strict=True))
        scheduler.step()
        kl_ctl.update(stats["kl"], len(batch) * ranks.world)
        rows = [[step, p, t, s] for p, t, s in zip(batch, roll["texts"], raw.tolist(), strict=True)]  # this rank's
        raw, scores = ranks.gather(raw), ranks.gather(scores)
        lengths = ranks.gather(roll["mask"].sum(-1))
        has_eos = ranks.gather(roll["has_eos"].float())
        elapsed = time.perf_counter() - began
        last = {"reward/mean": raw.mean().item(), "reward/std": raw.std().item() if len(raw) > 1 else 0.0,
                "reward/score_used": scores.mean().item(), **stats, "length/mean": lengths.float().mean().item(),
                "eos_fraction": has_eos.mean().item(), "lr": scheduler.get_last_lr()[0],
                "time/step": elapsed, "time/rollout": generated,
                "tokens_per_s": (lengths.sum().item() * (1 + cfg.rl.ppo_epochs)) / elapsed}
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
            save_checkpoint(out / "checkpoints" / f"step-{step}", model, head, optimizer, scheduler, kl_ctl, step,
                            cfg.train.save_total_limit)
        if os.environ.get(KILL_AFTER_STEP) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)

    ranks.check_in_sync(params)
    # --- save: the policy adapter alone, as peft's "default"
    if is_main_process():
        model.save_pretrained(str(out), selected_adapters=["default"])
        save_file(head.state_dict(), str(out / VALUE_HEAD))
        tokenizer.save_pretrained(str(out))
    rows = read_jsonl(out / "metrics.jsonl")
    first = next((r for r in rows if "reward/mean" in r), last)
    metrics = {"steps": cfg.train.max_steps, "reward_mean_first": first.get("reward/mean"),
               **{k.replace("/", "_"): v for k, v in (rows[-1] if rows else last).items() if k != "step"}}
    if tracker.run is not None:
        tracker.run.summary.update(metrics)  # the run itself is finished in main, after its artifact
    return metrics, gate_figures, rm


# ---------------------------------------------------------------------------- GRPO / RLOO (TRL)


def train_trl(cfg: PPOStageConfig, plan, sft: Path | None, prompts: list[str], out: Path):
    """TRL's GRPOTrainer or RLOOTrainer with the same reward, a LoRA policy from the SFT adapter, fp32 on CPU."""
    from datasets import Dataset
    from peft import PeftModel

    from alignment.tracking import MetricsJSONL, configure_wandb, report_to

    if cfg.algo == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer
    reward, gate_figures, rm = make_reward(cfg)

    def reward_fn(prompts, completions, **_) -> list[float]:
        text = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        asked = [p[-1]["content"] if isinstance(p, list) else p for p in prompts]
        return [float(x) for x in reward(asked, text)]

    reward_fn.__name__ = "reward"
    set_seed(cfg.train.seed)
    base = trainable_on_cpu(load_base_model(cfg.model, plan))
    model = PeftModel.from_pretrained(base, str(sft), is_trainable=True) if sft else base
    tokenizer = load_tokenizer(str(sft) if sft else cfg.model.name)
    configure_wandb(cfg.run, cfg.algo)
    args = Config(
        output_dir=str(out / "checkpoints"), max_steps=cfg.train.max_steps, learning_rate=cfg.train.lr,
        lr_scheduler_type=cfg.train.scheduler, warmup_steps=cfg.train.warmup_ratio,
        weight_decay=cfg.train.weight_decay, max_grad_norm=cfg.train.max_grad_norm, seed=cfg.train.seed,
        per_device_train_batch_size=cfg.rl.rollout_prompts, num_generations=cfg.rl.num_generations,
        max_completion_length=cfg.generation.max_new_tokens, temperature=cfg.generation.temperature,
        top_p=cfg.generation.top_p, beta=cfg.rl.kl_coef, epsilon=cfg.rl.clip_range,
        bf16=plan.bf16, fp16=plan.fp16, use_cpu=plan.device == "cpu", gradient_checkpointing=plan.gradient_checkpointing,
        use_liger_kernel=use_liger(cfg.train.liger),
        torch_compile=cfg.train.compile,
        # vLLM in the training process (TRL syncs the policy's weights into it each step).
        use_vllm=cfg.generation.backend == "vllm", vllm_mode="colocate",
        vllm_gpu_memory_utilization=cfg.generation.vllm_gpu_memory_utilization,
        logging_steps=cfg.train.logging_steps, save_strategy="steps", save_steps=cfg.rl.save_steps or cfg.train.max_steps,
        save_total_limit=cfg.train.save_total_limit, report_to=report_to(cfg.run),
        run_name=f"{Path(cfg.run.dir).name}/{cfg.algo}", dataloader_num_workers=0,
    )
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts]})
    trainer = Trainer(model=model, reward_funcs=[reward_fn], args=args, train_dataset=data, processing_class=tokenizer,
                      peft_config=None if sft else peft_lora_config(cfg.lora), callbacks=[MetricsJSONL(out)])
    policy = trainer.model
    if plan.device == "cpu":
        if "ref" in policy.peft_config:  # TRL rounded the adapter to bf16: restore it from the exact fp32 copy
            for name, param in policy.named_parameters():
                if ".default." in name:
                    param.data = policy.get_parameter(name.replace(".default.", ".ref.")).data.float().clone()
        speed_up_cpu_training(policy)
    resume = find_trl_checkpoint(out, cfg.train.resume_from_checkpoint)
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(out))
    if is_main_process():
        shutil.rmtree(out / "ref", ignore_errors=True)
        tokenizer.save_pretrained(str(out))
    logs = [r for r in trainer.state.log_history if "reward" in r]
    metrics = {"steps": result.global_step, "train_loss": result.training_loss,
               "reward_mean_first": logs[0]["reward"] if logs else None,
               **{k.replace("/", "_"): v for k, v in (logs[-1] if logs else {}).items()}}
    return metrics, gate_figures, rm


def find_trl_checkpoint(out: Path, resume: str | None) -> str | None:
    if resume not in ("latest", "auto"):
        return resume
    found = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(found[-1]) if found else None


# ---------------------------------------------------------------------------- main


def main(cfg: PPOStageConfig) -> Path:
    # --- resolve inputs ---------------------------------------------------------------------
    check(cfg)
    out = stage_dir(cfg.run.dir, cfg.algo)
    sft = resolve_sft(cfg)
    if sft:
        cfg = replace(cfg, model=replace(cfg.model, name=adapter_base_name(sft)))  # the SFT's base
    plan = device_plan(cfg.model)
    log.info(plan.describe())
    if cfg.algo == "ppo" and (cfg.train.liger is True or cfg.train.compile):
        key = "train.liger" if cfg.train.liger is True else "train.compile"
        raise StageError(f"{key} applies to TRL's trainers (algo=grpo|rloo, and sft, reward, dpo); "
                         f"align's own PPO loop does not use it: leave {key} at its default")
    check_liger(cfg.train.liger)  # checked before any loading
    if cfg.scorer:
        resolve_scorer(cfg.scorer)  # a wrong name fails now, not after the models load
    else:  # the gate, before any model is loaded
        gate(Path(cfg.reward_model) if cfg.reward_model else stage_dir(cfg.run.dir, "reward"),
             cfg.min_reward_accuracy)

    # --- data -------------------------------------------------------------------------------
    prompts = load_prompts(cfg.prompts)
    if cfg.num_prompts > 0:
        prompts = prompts[:cfg.num_prompts]

    # --- model, train -----------------------------------------------------------------------
    if cfg.algo == "ppo":
        metrics, gate_figures, rm = train_ppo(cfg, plan, sft, prompts, out, to_dict(cfg))
    else:
        metrics, gate_figures, rm = train_trl(cfg, plan, sft, prompts, out)

    # --- save -------------------------------------------------------------------------------
    save_config(cfg, out / "config.yaml")
    parents = {k: v for k, v in {"sft": sft, "reward_model": rm}.items() if v}
    write_manifest(
        out, stage=cfg.algo, config=to_dict(cfg), base_model=cfg.model.name, parents=parents, metrics=metrics,
        device_plan=plan.describe(), gpu_peak_mib=peak_gpu_mib(), algo=cfg.algo, max_length=cfg.model.max_length,
        reference="sft adapter (frozen copy)" if sft else "base (adapter disabled)",
        reward={"scorer": cfg.scorer} if cfg.scorer else {"reward_model": str(rm),
                                                            "eval_accuracy": gate_figures.get("eval_accuracy"),
                                                            "device": gate_figures.get("device")},
        prompts={"path": cfg.prompts, "sha256": file_hash(cfg.prompts), "count": len(prompts)},
    )
    from alignment.tracking import finish_wandb, log_artifact

    log_artifact(cfg.algo, out, cfg.run.dir, parents)
    finish_wandb()

    # --- report -----------------------------------------------------------------------------
    html = report.write_report(cfg.run.dir)
    log.info("report: %s", html)
    print_done(cfg.algo, out, f"align eval run.dir={cfg.run.dir}")
    return out
