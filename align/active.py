"""Which tasks are worth an annotator's minute: an ensemble of reward heads and how unsure it is.

    heads = fit_heads(chosen, rejected, groups=task_ids)      # features [pairs, D] -> HeadEnsemble
    scores = heads.scores(features_of_one_task)               # [heads, K]
    acquisition(scores, "bald")                               # what ranking this task would teach

A reward model scores a response with a linear `score` head on one hidden state (the last
token's, after the final norm). The uncertainty estimate is an ensemble of more such heads on the
same features: each a Bradley-Terry logistic regression fitted to a bootstrap resample of the
labelled tasks (a ranking's pairs are drawn together, as they are not independent), on the labels
the model's loss read (soft labels p_chosen or weights, per the stage's weighting). Where the
labels pin a direction down the heads agree; where they do not, they disagree, and a ranking of a
task they disagree on is the one that teaches most. It costs no training pass through the trunk:
`align reward` fits the heads on the hidden states of its own training pairs after training (one
forward pass, under a second of fitting) and saves them beside the adapter (`HEADS_FILE`); `align
sample selection=uncertainty` reads each candidate response's hidden state once and scores every
head on it. LoRA seeds (several reward models) would cost a training run each, too slow on CPU.

Acquisition, for a task of K responses, averages over its K(K-1)/2 pairs:
  bald      the mutual information between a pair's outcome and the head (BALD, Houlsby et al.
            2011): the entropy of the heads' mean probability minus the mean of their entropies.
            High only where heads are each confident and disagree, not where all say 50/50
            (a near-tie no model will learn, e.g. two answers a word apart).
  variance  the variance of the pair probability across heads.
  entropy   the entropy of the single reward model's own pair probability: small margins.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import torch

from align.artifacts import HEADS_FILE, shell

METHODS = ("bald", "variance", "entropy")


@dataclass
class HeadEnsemble:
    """B linear heads over standardised features: score_b(x) = ((x - mean) / scale) · weights[b]."""

    weights: torch.Tensor  # [B, D]
    mean: torch.Tensor  # [D]
    scale: torch.Tensor  # [D]
    meta: dict[str, Any] = field(default_factory=dict)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """[B, N] scores of N responses' features [N, D]."""
        x = (features.float() - self.mean) / self.scale
        return self.weights @ x.T

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(folder) / HEADS_FILE
        save_file({"weights": self.weights.contiguous(), "mean": self.mean.contiguous(),
                   "scale": self.scale.contiguous()}, str(path), metadata={"meta": json.dumps(self.meta)})
        return path

    @classmethod
    def load(cls, folder: str | Path) -> HeadEnsemble:
        from safetensors import safe_open

        path = Path(folder) / HEADS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no {HEADS_FILE} (the reward heads align sample's uncertainty "
                                    f"reads): train it again with `align reward run.dir={shell(Path(folder).parent)} "
                                    "heads=8`" + ("" if Path(folder).name == "reward" else
                                                  f", which writes {shell(Path(folder).parent / 'reward')}"))
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
            tensors = {k: f.get_tensor(k) for k in ("weights", "mean", "scale")}
        return cls(tensors["weights"], tensors["mean"], tensors["scale"], meta)


def fit_heads(chosen: torch.Tensor, rejected: torch.Tensor, groups: list | None = None, *,
              p_chosen: torch.Tensor | None = None, weight: torch.Tensor | None = None, heads: int = 8,
              l2: float = 0.1, seed: int = 0, max_iter: int = 100) -> HeadEnsemble:
    """`heads` Bradley-Terry heads on pair features (chosen and rejected: [P, D]), one per bootstrap resample.

    Resamples are of `groups` (a task id per pair: a ranking's pairs go together), or of pairs.
    Features are standardised over the responses seen; each head minimises the weighted mean of its
    resample's pair losses plus `l2` * |w|^2 (the heads are independent, so one L-BFGS run over
    their sum fits each). A pair's loss is the reward model's (align.reward_model.pair_loss):
    p * softplus(-s) + (1 - p) * softplus(s) for s the head's gap, with `p_chosen` (soft labels; 1,
    a hard win, when not given) and `weight` (1 when not given; a resample's weights are normalised
    to sum 1, so `l2` means what it means unweighted). Head 0 is fitted to every pair, not a
    resample: with heads=1 it is the plain fit, and the mean of the ensemble stays near it.
    """
    chosen, rejected = chosen.float(), rejected.float()
    pairs, dim = chosen.shape
    if pairs == 0:
        raise ValueError("no labelled pairs to fit reward heads on")
    both = torch.cat([chosen, rejected])
    mean, scale = both.mean(0), both.std(0, unbiased=False) + 1e-4
    diff = (chosen - rejected) / scale
    keys = list(dict.fromkeys(groups)) if groups is not None else list(range(pairs))
    index = {key: i for i, key in enumerate(keys)}
    member = torch.tensor([index[g] for g in groups] if groups is not None else list(range(pairs)))
    rng = random.Random(seed)
    counts = torch.ones(heads, pairs)
    for b in range(1, heads):
        drawn = torch.zeros(len(keys))
        for _ in keys:
            drawn[rng.randrange(len(keys))] += 1
        counts[b] = drawn[member]
    if weight is not None:
        counts = counts * weight.float()
    counts = counts / counts.sum(1, keepdim=True).clamp_min(1e-12)  # a resample of weight-0 pairs only: l2 alone
    p = p_chosen.float() if p_chosen is not None else None
    weights = torch.zeros(heads, dim, requires_grad=True)
    opt = torch.optim.LBFGS([weights], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        gap = weights @ diff.T
        pair = torch.nn.functional.softplus(-gap)
        if p is not None:
            pair = p * pair + (1 - p) * torch.nn.functional.softplus(gap)
        loss = (counts * pair).sum() + l2 * (weights ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    meta = {"heads": heads, "l2": l2, "seed": seed, "pairs": pairs, "groups": len(keys), "dim": dim}
    return HeadEnsemble(weights.detach(), mean, scale, meta)


# ---------------------------------------------------------------------------- acquisition


def _entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-7, 1 - 1e-7)
    return -(p * p.log() + (1 - p) * (1 - p).log())


def pair_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """P(i beats j) = sigmoid(s_i - s_j) for every pair i < j of a task's K responses: [..., K(K-1)/2]."""
    k = scores.shape[-1]
    i, j = zip(*combinations(range(k), 2), strict=True)
    return torch.sigmoid(scores[..., list(i)] - scores[..., list(j)])


def acquisition(scores: torch.Tensor, method: str = "bald", single: torch.Tensor | None = None) -> float:
    """How much ranking one task would teach: heads' scores [B, K] (and, for entropy, the model's own [K])."""
    if method not in METHODS:
        raise ValueError(f"acquisition {method!r}: allowed values: {', '.join(METHODS)}")
    if method == "entropy":
        own = single if single is not None else scores.float().mean(0)
        return float(_entropy(pair_probabilities(own.float())).mean())
    p = pair_probabilities(scores.float())  # [B, pairs]
    if method == "variance":
        return float(p.var(0, unbiased=False).mean())
    return float((_entropy(p.mean(0)) - _entropy(p).mean(0)).mean())


def choose(values: list[float], n: int, *, explore: float = 0.0, seed: int = 0) -> list[int]:
    """Indices of the `n` tasks to label: the highest `values` first; a share `explore` of them drawn
    at random from the others instead (exploration: a sample of what the model thinks it knows)."""
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    n = min(n, len(order))
    n_random = _explored(n, explore)
    top, rest = order[:n - n_random], order[n - n_random:]
    return top + random.Random(seed).sample(rest, n_random)


def _explored(n: int, explore: float) -> int:
    """How many of `n` chosen tasks `choose` draws at random (the last ones it returns)."""
    return min(round(n * explore), n)


def queue_priorities(values: list[float], chosen: list[int], *, explore: float = 0.0, seed: int = 0) -> list[float]:
    """The priority of each of `chosen` (as `choose` returned them) in the app's queue, which hands out the highest
    first: its value, but an exploration pick (the last `explore` share) takes the value of a top pick drawn at
    random, so the picks at random are spread through the queue. By their own values they all came last, and an
    annotator who stopped early left exactly the exploration share unlabelled."""
    n_random = _explored(len(chosen), explore)
    top = chosen[:len(chosen) - n_random]
    out = [values[i] for i in chosen]
    if top and n_random:
        rng = random.Random(seed + 1)
        out[len(top):] = [values[rng.choice(top)] for _ in range(n_random)]
    return out


# ---------------------------------------------------------------------------- on a reward model


def _score_module(model) -> torch.nn.Module:
    """The reward model's `score` head (peft's modules_to_save wrapper around it when there is one)."""
    for name, module in model.named_modules():
        if name.split(".")[-1] == "score":
            return module
    raise ValueError("not a reward model: it has no `score` head")


@torch.no_grad()
def reward_features(model, tokenizer, conversations: list[list[dict[str, str]]],
                    batch_size: int = 16) -> tuple[torch.Tensor, list[float]]:
    """(features [N, D], rewards [N]): the hidden state the score head reads for each conversation, and its score.

    Read by a hook on the score head, at the token the classifier pools (the rightmost non-pad
    token, transformers' rule), from the same right-padded batches as align.reward_model.score.
    """
    from align.reward_model import encode, scoring_autocast

    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    head = _score_module(model)
    seen: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    was_training = model.training
    model.eval()
    features, rewards = [], []
    try:
        for i in range(0, len(conversations), batch_size):
            batch = [encode(tokenizer, c) for c in conversations[i:i + batch_size]]
            width = max(len(ids) for ids in batch)
            input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in batch], device=device)
            mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch], device=device)
            seen.clear()
            with scoring_autocast(model):
                logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
            hidden = seen[0]
            last = ((torch.arange(width, device=device) * (input_ids != pad)).argmax(-1)
                    if pad is not None else torch.full((len(batch),), width - 1, device=device))
            features.append(hidden[torch.arange(len(batch), device=device), last].float().cpu())
            rewards += logits[:, 0].float().tolist()
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(features), rewards


def _pair_features(model, tokenizer, rows, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) features [pairs, D] of preference rows, each distinct conversation run once.

    A K-wise ranking's K(K-1)/2 pairs share its K responses (6 pairs, 4 responses for K=4): one
    forward pass per response instead of two per pair.
    """
    sides = [[p + c for p, c in zip(rows["prompt"], rows["chosen"], strict=True)],
             [p + r for p, r in zip(rows["prompt"], rows["rejected"], strict=True)]]
    index: dict[str, int] = {}
    unique = []
    for conversation in sides[0] + sides[1]:
        key = json.dumps(conversation, sort_keys=True)
        if key not in index:
            index[key] = len(unique)
            unique.append(conversation)
    feats, _ = reward_features(model, tokenizer, unique, batch_size)
    return tuple(feats[[index[json.dumps(c, sort_keys=True)] for c in side]] for side in sides)


def head_labels(train, weighting: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(p_chosen, weight) per training pair as the reward stage's loss read them under `weighting`
    (align.recipes.reward.pair_weighting: soft, weighted or off), each None where that loss has none.

    soft: the pairs' p_chosen; weighted: their weight; a kept tie (export ties=margin0) is p 1/2 in
    every mode, as the stage trains it (align.recipes.reward.loss_columns): its loss pulls the gap to 0.
    """
    columns = train.column_names
    ties = [bool(t) for t in train["tie"]] if "tie" in columns else []
    if weighting == "soft":
        p = torch.tensor(train["p_chosen"], dtype=torch.float)
    elif any(ties):
        p = torch.tensor([0.5 if t else 1.0 for t in ties])
    else:
        p = None
    weight = torch.tensor(train["weight"], dtype=torch.float) if weighting == "weighted" else None
    return p, weight


def fit_reward_heads(model, tokenizer, train, test, out: str | Path, *, heads: int, seed: int,
                     weighting: str = "off", batch_size: int = 16, save: bool = True) -> dict[str, Any]:
    """Fit and save the uncertainty heads of a trained reward model on its training pairs; their figures.

    Under several processes every rank calls it (the forwards of a sharded model are collective:
    FSDP and ZeRO-3 gather each layer's weights from all ranks) and one saves (`save`).

    `train`/`test` are the reward stage's preference splits (prompt/chosen/rejected conversations,
    `task_id` when align export wrote them). The heads fit the labels the model trained on: soft
    labels or weights per the stage's `weighting` (head_labels); hard wins would have them learn
    what a distrusted annotator decided, which the model was taught to doubt. Returns the heads'
    own held-out accuracy (their mean), so the manifest shows whether they are a fair stand-in for
    the model's score head.
    """
    if test is not None and "tie" in test.column_names:  # a kept tie has no winner to be right about
        test = test.filter(lambda row: not row["tie"])
    chosen, rejected = _pair_features(model, tokenizer, train, batch_size)
    groups = list(train["task_id"]) if "task_id" in train.column_names else None
    p_chosen, weight = head_labels(train, weighting)
    ensemble = fit_heads(chosen, rejected, groups, p_chosen=p_chosen, weight=weight, heads=heads, seed=seed)
    ensemble.meta["weighting"] = weighting
    figures: dict[str, Any] = {"heads": heads, "heads_pairs": len(chosen)}
    if test is not None and len(test):
        chosen, rejected = _pair_features(model, tokenizer, test, batch_size)
        gap = ensemble.scores(chosen).mean(0) - ensemble.scores(rejected).mean(0)
        figures["heads_eval_accuracy"] = float((gap > 0).float().mean())
    ensemble.meta.update({k: v for k, v in figures.items() if k != "heads"})
    if save:
        ensemble.save(out)
    return figures


def load_selector(folder: str | Path):
    """(model, tokenizer, heads) of a reward model folder, for task_uncertainty."""
    from align.reward_model import load_reward_model

    heads = HeadEnsemble.load(folder)  # first: a folder without heads fails before the model loads
    model, tokenizer = load_reward_model(folder)
    return model, tokenizer, heads


def task_uncertainty(model, tokenizer, ensemble: HeadEnsemble, tasks: list[dict[str, Any]], method: str,
                     batch_size: int = 16, system_prompt: str | None = None) -> list[float]:
    """The acquisition value of each task ({prompt, responses}) under a reward model and its heads, each
    conversation after `system_prompt` (the reward model's, system_prompt_of: as it was trained)."""
    from align.data import with_system_prompt

    conversations = [with_system_prompt([{"role": "user", "content": t["prompt"]}, {"role": "assistant", "content": r}],
                                        system_prompt) for t in tasks for r in t["responses"]]
    feats, rewards = reward_features(model, tokenizer, conversations, batch_size)
    scores, own = ensemble.scores(feats), torch.tensor(rewards)
    out, start = [], 0
    for t in tasks:
        # The pairs align export will make of the task: one answer per distinct text, none blank (a copy's
        # pair, always level, scored ln 2 under entropy and 0 under bald). Fewer than two: nothing to learn.
        first = {r.strip(): start + i for i, r in reversed(list(enumerate(t["responses"]))) if r.strip()}
        kept = sorted(first.values())
        out.append(acquisition(scores[:, kept], method, single=own[kept]) if len(kept) > 1 else 0.0)
        start += len(t["responses"])
    return out

