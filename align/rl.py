"""What the RL recipes share (align/recipes/ppo.py, and align/recipes/grpo.py for GRPO/RLOO through TRL).

The inputs: the SFT adapter the policy starts from, the reward (a reward model past its gate,
its adapter on the policy's base, or a programmatic scorer) and the checks on `rl.*` they share.
Then PPO's own pieces, as plain functions on (batch, response-token) tensors, and its
checkpoints (everything a killed run needs to repeat an unkilled one).

The maths follows the PPO paper (Schulman et al., 2017), InstructGPT / Ziegler et al. (2019) for the KL
penalty and its controller, and "The N implementation details of RLHF with PPO" (Huang et al.,
2023) for the details: log-probs of logits divided by the sampling temperature, whitening over
real tokens only, value clipping, GAE over the response only. Every tensor here is
[batch, response_len] with a 0/1 `mask` saying which positions are real response tokens.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from align import StageError
from align.artifacts import (
    begin_training,
    is_main_process,
    model_identity,
    settings_of,
    stage_dir,
    system_prompt_of,
)
from align.config import ConfigError, PPOStageConfig, RLConfig
from align.cpu import keep_trainable_in
from align.data import file_hash
from align.generation import check_backend
from align.modeling import is_adapter_dir
from align.reward_model import Reward, gate, load_reward_model, score, shared_base_reward
from align.training import set_rate

log = logging.getLogger(__name__)

VALUE_HEAD = "value_head.safetensors"  # PPO's value head, beside the policy adapter


# ---------------------------------------------------------------------------- inputs


def check(cfg: PPOStageConfig) -> None:
    """What the machine must offer every RL algorithm (the value rules are PPOStageConfig.validate's)."""
    check_backend(cfg.generation)


def resolve_sft(cfg: PPOStageConfig) -> Path | None:
    """The SFT adapter the policy starts from (and the reference is); None for a fresh LoRA on model.name."""
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


def trained_on(cfg: PPOStageConfig, sft: Path | None, rm: Path | None) -> dict[str, str | None]:
    """What an RL run's checkpoints are trained on (align.artifacts.begin_training): the prompts, the model
    and SFT adapter it starts from, and the reward it is trained against."""
    return {"prompts": file_hash(cfg.prompts), "base_model": model_identity(cfg.model.name),
            "sft": model_identity(sft), "reward": f"scorer:{cfg.scorer}" if cfg.scorer else model_identity(rm),
            "settings": settings_of(cfg)}


def check_reward(cfg: PPOStageConfig) -> None:
    """The reward's problems before any model loads: a scorer that does not exist, a reward model under the gate."""
    if cfg.scorer:
        resolve_scorer(cfg.scorer)
    else:
        gate(Path(cfg.reward_model) if cfg.reward_model else stage_dir(cfg.run.dir, "reward"), cfg.min_reward_accuracy,
             cfg.max_probe_flip_rate)


def make_reward(cfg: PPOStageConfig, policy=None, sft: Path | None = None) -> tuple[Reward, dict, Path | None]:
    """(reward(prompts, responses) -> scores, gate figures, the reward model folder or None); `policy` and its
    `sft` adapter for rl.reward_on_policy_base (its base is cfg.model.name)."""
    if cfg.scorer:
        fn = resolve_scorer(cfg.scorer)
        return (lambda prompts, responses: scorer_scores(fn, cfg.scorer, prompts, responses,
                                                         what="rollout prompt")), {}, None
    rm = Path(cfg.reward_model) if cfg.reward_model else stage_dir(cfg.run.dir, "reward")
    figures = gate(rm, cfg.min_reward_accuracy, cfg.max_probe_flip_rate)
    if cfg.rl.reward_on_policy_base:
        reward = shared_base_reward(policy, rm, sft, cfg.model.name, cfg.model)
        return reward, {**figures, "device": str(next(policy.parameters()).device)}, rm
    model, tokenizer = load_reward_model(rm)
    figures = {**figures, "device": str(next(model.parameters()).device)}  # the manifest says where it scored
    log.info("reward model %s on %s", rm, figures["device"])
    system_prompt = system_prompt_of(rm)  # the one it was trained with (the SFT policy's)
    return (lambda prompts, responses: score(model, tokenizer, prompts, responses, cfg.generation.batch_size,
                                             system_prompt=system_prompt)), figures, rm


def resolve_scorer(spec: str) -> Callable[[str, str], float]:
    """A built-in scorer's name or module:function; a wrong one is a config error naming it."""
    from align.labeling.scorers import (
        resolve_scorer as labeling_resolve,  # built-in names and module:function
    )

    try:
        return labeling_resolve(spec)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def scorer_scores(fn: Callable[[str, str], float], spec: str, prompts: list[str], responses: list[str], *,
                  what: str = "prompt", finite: bool = False) -> list[float]:
    """`fn(prompt, response)` for each pair as floats (align.labeling.scorers.score_all); a scorer that raises or
    returns no number (None, text, a list) is a StageError naming `spec`, what it gave and the `what` (prompt 3,
    from 1) with its prompt, rather than float()'s traceback. Non-finite numbers pass unless `finite`: eval and PPO
    refuse them naming the policy or step (the reward model's too)."""
    from align.labeling.scorers import ScorerError, score_all

    try:
        return score_all(fn, spec, prompts, responses, what=what, finite=finite)
    except ScorerError as err:
        raise StageError(str(err)) from err


# ---------------------------------------------------------------------------- masked statistics


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  total: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(x - mean) / std over the real positions; padding stays 0 so it cannot leak into sums.

    `total` sums a tensor over the processes (distributed.Ranks.total): the mean and variance are then
    the whole rollout's, as with one process, not each process's share's (which re-centres every share
    on its own mean: under several processes a good answer among better ones was pushed down)."""
    total = total or (lambda t: t)
    sums = total(torch.stack([(x * mask).sum(), mask.sum()]))
    n = sums[1]
    mean = sums[0] / n.clamp(min=1)
    var = total(((x - mean) ** 2 * mask).sum()) / n.clamp(min=1)
    if n > 1:
        var = var * n / (n - 1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def rollout_figures(entropy: torch.Tensor, values: torch.Tensor, returns: torch.Tensor, seq_kl: torch.Tensor,
                    kl_coef: float, mask: torch.Tensor,
                    total: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """A step's rollout figures: over its real tokens `entropy`, `value/mean` and `value/explained_variance`
    (1 - Var(returns - values) / Var(returns): 1 a perfect critic, 0 no better than a constant, NaN for returns
    without spread), over its responses `kl` (`seq_kl`: nats per response) and `reward/non_score`.

    `total` as for masked_whiten: the sums and moments are then the whole step's, as with one process. Each
    process's figures averaged over the processes were not: its ratio (explained variance) and its token-weighted
    means (entropy, value/mean) over shares of uneven token counts."""
    total = total or (lambda t: t)
    mask, entropy, values, returns = mask.float(), entropy.float(), values.float(), returns.float()
    residual = returns - values
    sums = total(torch.stack([mask.sum(), (entropy * mask).sum(), (values * mask).sum(), (returns * mask).sum(),
                              (residual * mask).sum(), seq_kl.float().sum(), torch.ones_like(seq_kl).float().sum()]))
    tokens, responses = sums[0].clamp(min=1), sums[6].clamp(min=1)
    spread = total(torch.stack([((returns - sums[3] / tokens) ** 2 * mask).sum(),
                                ((residual - sums[4] / tokens) ** 2 * mask).sum()])) / tokens
    kl = (sums[5] / responses).item()
    return {"kl": kl, "reward/non_score": -kl_coef * kl, "entropy": (sums[1] / tokens).item(),
            "value/mean": (sums[2] / tokens).item(),
            "value/explained_variance": float("nan") if spread[0].item() == 0 else (1 - spread[1] / spread[0]).item()}


# ---------------------------------------------------------------------------- log-probs and entropy


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(token) under softmax(logits / temperature): the distribution the tokens were sampled from."""
    logits = logits.float() / temperature
    return torch.gather(logits.log_softmax(-1), -1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_of(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    logits = logits.float() / temperature
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


# ---------------------------------------------------------------------------- rewards, GAE


def response_mask(responses: torch.Tensor, eos_ids: int | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask up to and including the first EOS, whether an EOS was produced) per response; `eos_ids` one id
    or all that end an answer (generation.stop_ids).

    Not `responses != pad`: many tokenizers pad with their EOS token, and the EOS that ends the
    response is itself an action the policy took.
    """
    is_eos = torch.isin(responses, torch.tensor(eos_ids, device=responses.device))
    has_eos = is_eos.any(-1)
    after = (is_eos.cumsum(-1) - is_eos.long()) > 0  # positions after the first EOS
    return (~after).float(), has_eos


def scores_used(raw: torch.Tensor, has_eos: torch.Tensor, rl: RLConfig,
                total: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The scores PPO optimises: whitened over the rollout (rl.whiten_rewards), less rl.missing_eos_penalty
    for a response cut at max_new_tokens, clipped (rl.score_clip). `total` as for masked_whiten.

    The penalty comes after the whitening: subtracted before, re-centring on the mean took it back (every
    response cut: every score down by the penalty and up again, the penalty gone) and in a mixed rollout
    rescaled it by the spread. TRL 0.x kept the mean instead (masked_whiten(shift_mean=False) on its
    per-token rewards), which keeps the penalty but also the reward model's offset, as arbitrary as its
    scale; whitened first, the scores are the rollout's standard deviations from its mean and the penalty
    is in those units, whatever the reward model's scale.
    """
    total = total or (lambda t: t)
    scores = raw.clone()
    if rl.whiten_rewards and total(torch.tensor(float(len(scores)), device=scores.device)).item() > 1:
        scores = masked_whiten(scores, torch.ones_like(scores), total=total)  # the whole step's mean and spread
    if rl.missing_eos_penalty is not None:
        scores = scores - rl.missing_eos_penalty * (~has_eos).float()
    if rl.score_clip is not None:
        scores = scores.clamp(-rl.score_clip, rl.score_clip)
    return scores


def shape_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * (log pi - log ref) at every token, plus the score at the last one.

    Returns (rewards, kl) with kl the per-token k1 estimate log pi - log ref (masked).
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores), device=rewards.device), last] += scores
    return rewards, kl


def gae(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response; the value after the last token is 0.

    A_t = sum_l (gamma*lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t; returns = A + V.
    """
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        running = running * mask[:, t]  # padding: nothing flows back through it
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


# ---------------------------------------------------------------------------- losses


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_range: float) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate, a mean over real tokens; with clip fraction and approx-KL (k3) stats."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "policy/clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
            "policy/approx_kl": masked_mean((ratio - 1) - log_ratio, mask).item(),
        }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss: max of squared errors of the new and the clipped-to-old values, halved."""
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    err, err_clipped = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(err, err_clipped), mask)
    with torch.no_grad():
        stats = {"value/clipfrac": masked_mean((err_clipped > err).float(), mask).item()}
    return loss, stats


# ---------------------------------------------------------------------------- KL controllers


class FixedKL:
    """A constant KL coefficient: rl.kl_coef, a resumed run's included."""

    def __init__(self, value: float):
        self.value = self.initial = value  # initial: rl.kl_coef, what the run started with

    def update(self, kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "initial": self.initial}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """This run's rl.kl_coef, not the checkpoint's: restored, "resume with another kl_coef" silently kept
        the old one while config.yaml and align.json recorded the new (as train.lr: ThisRunsSettings)."""
        if state["value"] != self.value:
            log.info("resumed with rl.kl_coef=%g (the checkpoint's was %g)", self.value, state["value"])


class AdaptiveKL(FixedKL):
    """Ziegler et al. (2019): beta <- beta * (1 + K * e), e = clip(KL / target - 1, -0.2, 0.2), K = n / horizon."""

    def __init__(self, value: float, target: float, horizon: int):
        super().__init__(value)
        self.target, self.horizon = target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon

    def load_state_dict(self, state: dict[str, float]) -> None:
        """The checkpoint's coefficient, where the controller had moved it (a resumed run repeats an unkilled
        one). rl.kl_coef is only its starting point: changed since, it cannot apply without throwing that
        away, so it is said rather than dropped in silence."""
        started = state.get("initial")  # absent in checkpoints from before it was kept
        if started is not None and started != self.initial:
            log.warning("rl.kl_coef=%g is not the %g this run started from: the adaptive controller continues from "
                        "the checkpoint's %g (rl.kl_coef is only its starting point); start from scratch for it to "
                        "apply", self.initial, started, state["value"])
        self.value = state["value"]


def kl_controller(kind: str, value: float, target: float, horizon: int) -> FixedKL:
    return AdaptiveKL(value, target, horizon) if kind == "adaptive" else FixedKL(value)


# ---------------------------------------------------------------------------- misc


def is_finite(*numbers: float) -> bool:
    return all(math.isfinite(n) for n in numbers)


# ---------------------------------------------------------------------------- checkpoints (PPO's own loop)


def save_checkpoint(folder: Path, model, head, optimizer, scheduler, kl_ctl, step: int, keep: int,
                    max_steps: int, *, scaler: torch.amp.GradScaler | None = None) -> None:
    """Everything a resumed run needs to repeat this one exactly, written to a temp folder then renamed."""
    if not is_main_process():
        return
    tmp = folder.parent / f".{folder.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp), selected_adapters=["default"])
    save_file(head.state_dict(), str(tmp / VALUE_HEAD))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                        # sampling on a GPU draws from its own generator
                        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}},
               tmp / "state.pt")
    state = {"step": step, "max_steps": max_steps, "kl_ctl": kl_ctl.state_dict()}
    (tmp / "trainer_state.json").write_text(json.dumps(state))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    old = sorted(folder.parent.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep] if keep > 0 else []
    for path in old:
        shutil.rmtree(path, ignore_errors=True)


def find_checkpoint(out: Path, resume: str | None, *, max_steps: int = -1,
                    trained_on: dict[str, str | None] | None = None) -> Path | None:
    """`train.resume_from_checkpoint`: "latest" is the newest <out>/checkpoints/step-N that can go on into this
    run (align.artifacts.begin_training: not a finished run's, nor one trained on other inputs, nor one past
    `max_steps`); None: from scratch. One at `max_steps` (a run killed after its last checkpoint) finishes the run:
    the loop trains nothing and writes its weights."""
    if resume and resume not in ("latest", "auto") and not (Path(resume) / "trainer_state.json").is_file():
        raise StageError(f"train.resume_from_checkpoint={resume} is not a PPO checkpoint (no trainer_state.json)")
    return begin_training(out, resume, max_steps=max_steps, trained_on=trained_on)


def restore_optimizer(optimizer, scheduler, state: dict, *, lr: float | None = None,
                      weight_decay: float | None = None, scaler: torch.amp.GradScaler | None = None) -> None:
    """The optimizer's and the schedule's state from `state`, at `lr` and `weight_decay` where given; an fp16
    run's loss scale too (it starts at 65536 and halves at each overflow: restarted there, a resumed run would
    skip those steps again)."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and scaler.is_enabled() and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if lr is not None:
        set_rate(optimizer, scheduler, lr)
    if weight_decay is not None:
        for group in optimizer.param_groups:
            group["weight_decay"] = weight_decay


def load_checkpoint(folder: Path, model, head, optimizer, scheduler, kl_ctl, *, lr: float | None = None,
                    weight_decay: float | None = None, scaler: torch.amp.GradScaler | None = None) -> int:
    """Restore what save_checkpoint wrote into the live objects; returns the step to continue after.

    The optimizer's moments and the schedule's position come back; its rate and weight decay are
    this run's (`lr`, `weight_decay`): load_state_dict would restore the checkpoint's, and "resume
    with a lower train.lr" (the instability guard's advice) would silently repeat the old one.
    """
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")), adapter_name="default")
    keep_trainable_in(model, next(head.parameters()).dtype)
    head.load_state_dict(load_file(str(folder / VALUE_HEAD)))
    # Onto the host: the optimizer's moments were saved from rank 0's GPU (torch.load would put them back
    # there on every rank, or fail on a machine without CUDA); load_state_dict moves each to its parameter.
    state = torch.load(folder / "state.pt", weights_only=False, map_location="cpu")
    restore_optimizer(optimizer, scheduler, state, lr=lr, weight_decay=weight_decay, scaler=scaler)
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"].get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    info = json.loads((folder / "trainer_state.json").read_text())
    kl_ctl.load_state_dict(info["kl_ctl"])
    return info["step"]
