"""The reward model: building its base, loading a trained one on its own, scoring, held-out figures.

    model, tokenizer = load_reward_model("runs/quickstart/reward")
    score(model, tokenizer, ["How do I sync?"], ["Open Settings and tap Sync."])   # -> [1.73]

A reward model is a sequence-classification head (`score`, one label) on the base or on the SFT
model, trained with a LoRA adapter. `<run.dir>/reward/` holds the adapter (the trained `score`
head is inside it, peft's modules_to_save), the tokenizer (its model_max_length is the training
max_length), `align.json`, and, when it was trained on the SFT model, a copy of the SFT adapter
in `sft_adapter/`: loading merges that into the base first, exactly as training did, so the
folder needs nothing else but the base model.

For an RL stage: `gate` refuses a reward model whose held-out accuracy is too low to optimise,
and `shared_base_reward` scores with its adapter on the policy's own base (one base in memory).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from alignment import StageError
from alignment.artifacts import read_manifest
from alignment.config import ModelConfig
from alignment.modeling import (
    DevicePlan,
    adapter_base_name,
    device_plan,
    is_adapter_dir,
    load_base_model,
    load_tokenizer,
    resolve_model_path,
)

log = logging.getLogger(__name__)

Reward = Callable[[list[str], list[str]], list[float]]  # (prompts, responses) -> one score each
SFT_ADAPTER = "sft_adapter"  # the SFT adapter's copy inside a reward folder trained from SFT


def reward_base(model_cfg: ModelConfig, plan: DevicePlan, sft: str | Path | None = None, *, training: bool = True):
    """A one-label sequence-classification model on `model_cfg.name`, with the SFT adapter merged in.

    The merge is done in full precision on an unquantized base (folding LoRA into 4-bit weights
    would round it away), saved to a temporary folder and loaded back as a classifier: that one
    `from_pretrained` quantizes it per the plan and swaps the LM head for a fresh `score` head.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    if sft is None:
        with suppress_seqcls_warning():
            return load_base_model(model_cfg, plan, auto_class=AutoModelForSequenceClassification, training=training,
                                   num_labels=1)
    from peft import PeftModel

    causal = AutoModelForCausalLM.from_pretrained(resolve_model_path(model_cfg.name), dtype=plan.compute_dtype)
    merged = PeftModel.from_pretrained(causal, str(sft)).merge_and_unload()
    with tempfile.TemporaryDirectory(prefix="align-sft-merged-") as tmp:
        merged.save_pretrained(tmp)
        del causal, merged
        with suppress_seqcls_warning():
            model = load_base_model(replace(model_cfg, name=tmp), plan, auto_class=AutoModelForSequenceClassification,
                                    training=training, num_labels=1)
    # peft records this as the adapter's base: the real base, not the deleted temporary folder.
    model.name_or_path = model.config.name_or_path = resolve_model_path(model_cfg.name)
    return model


def load_reward_model(path: str | Path, plan: DevicePlan | None = None):
    """(model, tokenizer) from a folder `align reward` wrote; unquantized for scoring unless `plan` says so."""
    from peft import PeftModel

    path = Path(path)
    if not is_adapter_dir(path):
        raise FileNotFoundError(f"{path} is not a reward model folder (no adapter_config.json): run `align reward`")
    plan = plan or device_plan(ModelConfig(quantize=False))
    sft = path / SFT_ADAPTER if is_adapter_dir(path / SFT_ADAPTER) else None
    base = reward_base(ModelConfig(name=adapter_base_name(path), quantize=plan.quantize), plan, sft, training=False)
    tokenizer = load_tokenizer(str(path))
    model = PeftModel.from_pretrained(base, str(path))
    if not plan.quantize:
        model = model.merge_and_unload()  # one plain model: faster to score with
    # The classifier reads the last non-pad token, so it must know the pad id training used.
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------------------- scoring


def encode(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a whole conversation, exactly as TRL's RewardTrainer tokenized training pairs."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    limit = tokenizer.model_max_length
    if limit and len(ids) > limit:
        # Keep the end: the classifier scores the last token, i.e. the end of the response.
        ids = ids[-limit:]
    return list(ids)


@torch.no_grad()
def score_conversations(model, tokenizer, conversations: list[list[dict[str, str]]], batch_size: int = 16) -> list[float]:
    """One reward per conversation (prompt turns + the response turn), right-padded like training."""
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[float] = []
    for i in range(0, len(conversations), batch_size):
        batch = [encode(tokenizer, c) for c in conversations[i:i + batch_size]]
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in batch], device=device)
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch], device=device)
        logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        out += logits[:, 0].float().tolist()
    model.train(was_training)
    return out


def score(model, tokenizer, prompts: list[str], responses: list[str], batch_size: int = 16) -> list[float]:
    """The reward of each response to its prompt (one user turn, one assistant turn)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    conversations = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}]
                     for p, r in zip(prompts, responses, strict=True)]
    return score_conversations(model, tokenizer, conversations, batch_size)


# ---------------------------------------------------------------------------- the loss


def pair_loss(chosen: torch.Tensor, rejected: torch.Tensor, *, margin: torch.Tensor | None = None,
              weight: torch.Tensor | None = None, p_chosen: torch.Tensor | None = None) -> torch.Tensor:
    """The batch's Bradley-Terry loss with per-pair weights w and soft labels p (each 1 when not given):

        mean_i  w_i * ( -p_i log sigmoid(d_i - m_i) - (1 - p_i) log sigmoid(-d_i - m_i) ),  d = r_chosen - r_rejected

    With w = p = 1 it is TRL's RewardTrainer loss, -log sigmoid(d - m) averaged. With p the posterior
    P(chosen beats rejected) of align export's dawid_skene, it is the expected Bradley-Terry
    log-likelihood under that posterior: minimised at d = logit(p) (a pair as sure as 0.73 asks for a gap
    of 1), where a hard label would push the gap on for ever. A weight w = 2p - 1 with a hard label agrees
    with it near d = 0 (the same gradient, p - 1/2) but does not stop there. A margin m (use_margin)
    applies to whichever response wins.
    """
    delta = chosen - rejected
    m = margin if margin is not None else 0.0
    loss = -torch.nn.functional.logsigmoid(delta - m)
    if p_chosen is not None:
        loss = p_chosen * loss - (1 - p_chosen) * torch.nn.functional.logsigmoid(-delta - m)
    if weight is not None:
        loss = weight * loss
    return loss.mean()


# ---------------------------------------------------------------------------- held-out figures


def _pearson(xs: list[float], ys: list[float]) -> float | None:
    try:
        return statistics.correlation(xs, ys)
    except statistics.StatisticsError:  # fewer than two points, or a constant series
        return None


def heldout_metrics(dataset, chosen: list[float], rejected: list[float], n_bins: int = 5) -> dict[str, Any]:
    """Pairwise accuracy, mean margin, calibration by reward gap, length correlation, agreement ceiling.

    Calibration: pairs are binned by |reward gap| (equal-count bins); a Bradley-Terry model
    claims P(its pick is right) = sigmoid(|gap|), so each bin shows that claim beside the observed
    accuracy. Length correlation: Pearson r of reward against response length in characters over
    every held-out response; a high |r| means the model may be rewarding length, not quality.
    """
    gaps = [c - r for c, r in zip(chosen, rejected, strict=True)]
    n = len(gaps)
    rewards = chosen + rejected
    lengths = [len(m[-1]["content"]) for m in dataset["chosen"]] + [len(m[-1]["content"]) for m in dataset["rejected"]]
    bins = []
    order = sorted(range(n), key=lambda i: abs(gaps[i]))
    k = max(1, min(n_bins, n))
    for b in range(k):
        idx = order[b * n // k:(b + 1) * n // k]
        if not idx:
            continue
        bins.append({"gap_min": abs(gaps[idx[0]]), "gap_max": abs(gaps[idx[-1]]), "pairs": len(idx),
                     "accuracy": sum(gaps[i] > 0 for i in idx) / len(idx),
                     "predicted": sum(1 / (1 + math.exp(-abs(gaps[i]))) for i in idx) / len(idx)})
    agreement = [a for a in dataset["agreement"] if a is not None] if "agreement" in dataset.column_names else []
    return {
        "eval_accuracy": sum(g > 0 for g in gaps) / n,
        "eval_mean_margin": sum(gaps) / n,
        "eval_pairs": n,
        "length_correlation": _pearson(rewards, [float(x) for x in lengths]),
        "agreement_ceiling": sum(agreement) / len(agreement) if agreement else None,
        "calibration_error": sum(b["pairs"] / n * abs(b["accuracy"] - b["predicted"]) for b in bins),
        "calibration": bins,
    }


def save_sft_copy(sft: str | Path, out: str | Path) -> Path:
    """Copy the SFT adapter's files (not its checkpoints) into the reward folder, for load_reward_model."""
    target = Path(out) / SFT_ADAPTER
    target.mkdir(parents=True, exist_ok=True)
    for f in Path(sft).iterdir():
        if f.is_file() and (f.name.startswith("adapter_") or f.name == "align.json"):
            shutil.copy2(f, target / f.name)
    return target


# ---------------------------------------------------------------------------- for an RL stage


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


def shared_base_reward(model, rm: Path) -> Reward:
    """The reward model's adapter as a third adapter ("reward") on the policy's base, plus its score head.

    The reward model is the base (+ the SFT adapter when it was trained from SFT) + its LoRA + a
    linear `score` head on the last token. Here the SFT part is the "ref" adapter, activated
    together with "reward": the same weights, except that SFT is a LoRA delta on the quantized base
    rather than merged before quantization (close, not bit-identical; docs/ppo.md).
    """
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

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
