"""The small pieces of PPO for language models, as plain functions on (batch, response-token) tensors.

From the PPO paper (Schulman et al., 2017), InstructGPT / Ziegler et al. (2019) for the KL
penalty and its controller, and "The N implementation details of RLHF with PPO" (Huang et al.,
2023) for the details: log-probs of logits divided by the sampling temperature, whitening over
real tokens only, value clipping, GAE over the response only. Every tensor here is
[batch, response_len] with a 0/1 `mask` saying which positions are real response tokens.
"""

from __future__ import annotations

import math

import torch

# ---------------------------------------------------------------------------- masked statistics


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the real positions; padding stays 0 so it cannot leak into sums."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns): 1 is a perfect critic, 0 no better than a constant."""
    var = masked_var(returns, mask, unbiased=False)
    if var.item() == 0:
        return float("nan")
    return (1 - masked_var(returns - values, mask, unbiased=False) / var).item()


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


def response_mask(responses: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask up to and including the first EOS, whether an EOS was produced) per response.

    Not `responses != pad`: many tokenizers pad with their EOS token, and the EOS that ends the
    response is itself an action the policy took.
    """
    is_eos = responses == eos_id
    has_eos = is_eos.any(-1)
    after = (is_eos.cumsum(-1) - is_eos.long()) > 0  # positions after the first EOS
    return (~after).float(), has_eos


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
    """A constant KL coefficient."""

    def __init__(self, value: float):
        self.value = value

    def update(self, kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["value"]


class AdaptiveKL(FixedKL):
    """Ziegler et al. (2019): beta <- beta * (1 + K * e), e = clip(KL / target - 1, -0.2, 0.2), K = n / horizon."""

    def __init__(self, value: float, target: float, horizon: int):
        super().__init__(value)
        self.target, self.horizon = target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon


def kl_controller(kind: str, value: float, target: float, horizon: int) -> FixedKL:
    return AdaptiveKL(value, target, horizon) if kind == "adaptive" else FixedKL(value)


# ---------------------------------------------------------------------------- misc


def is_finite(*numbers: float) -> bool:
    return all(math.isfinite(n) for n in numbers)

