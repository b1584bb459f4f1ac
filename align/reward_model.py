"""The reward model: building its base, loading a trained one on its own, scoring, held-out figures.

    model, tokenizer = load_reward_model("runs/quickstart/reward")
    score(model, tokenizer, ["How do I sync?"], ["Open Settings and tap Sync."])   # -> [1.73]

A reward model is a sequence-classification head (`score`, one label) on the base or on the SFT
model, trained with a LoRA adapter. `<run.dir>/reward/` holds the adapter (the trained `score`
head is inside it, peft's modules_to_save), the tokenizer (its model_max_length is the training
max_length), `align.json`, and, when it was trained on the SFT model, a copy of the SFT adapter
in `sft_adapter/`: loading merges that into the base first, exactly as training did, so the
folder needs nothing else but the base model.

Before an RL stage: `probe` measures, on held-out pairs, the accuracy by annotator agreement and
whether appending a neutral sentence or a polite phrase to the worse answer makes it win; `gate`
refuses a reward model whose held-out accuracy is too low to optimise or whose end-appended probes
flip too many pairs, and `shared_base_reward` scores with its adapter on the policy's own base (one
base in memory).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import re
import shutil
import socket
import statistics
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from align import StageError, process_count
from align.artifacts import HEADS_FILE, MANIFEST, key_prefix, read_manifest, shell, system_prompt_of
from align.config import ModelConfig
from align.cpu import keep_4bit_backward
from align.data import with_system_prompt
from align.embedded import model_key
from align.evaluation import grouped_proportion_ci
from align.modeling import (
    DevicePlan,
    adapter_base_name,
    device_plan,
    is_adapter_dir,
    load_base_model,
    load_tokenizer,
    merges_exactly,
    resolve_model_path,
)

log = logging.getLogger(__name__)

Reward = Callable[[list[str], list[str]], list[float]]  # (prompts, responses) -> one score each
SFT_ADAPTER = "sft_adapter"  # the SFT adapter's copy inside a reward folder trained from SFT


def reward_base(model_cfg: ModelConfig, plan: DevicePlan, sft: str | Path | None = None, *, training: bool = True):
    """A one-label sequence-classification model on `model_cfg.name`, with the SFT adapter merged in.

    The merge is done in full precision on an unquantized base (folding LoRA into 4-bit weights
    would round it away), saved to a temporary folder and loaded back as a classifier: that one
    `from_pretrained` quantizes it per the plan and swaps the LM head for a fresh `score` head. Under several
    processes, once per machine (merged_once).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    if sft is None:
        with suppress_seqcls_warning():
            return load_base_model(model_cfg, plan, auto_class=AutoModelForSequenceClassification, training=training,
                                   num_labels=1)
    def merge(folder: str) -> None:
        from peft import PeftModel

        # merged in fp32 whatever the plan: the merged weights are rounded once, to the plan's dtype, when loaded back
        causal = AutoModelForCausalLM.from_pretrained(resolve_model_path(model_cfg.name), dtype=torch.float32)
        PeftModel.from_pretrained(causal, str(sft)).merge_and_unload().save_pretrained(folder)

    with merged_once(merge, plan) as folder, suppress_seqcls_warning():
        model = load_base_model(replace(model_cfg, name=folder), plan, auto_class=AutoModelForSequenceClassification,
                                training=training, num_labels=1)
    # peft records this as the adapter's base: the real base, not the deleted temporary folder.
    model.name_or_path = model.config.name_or_path = resolve_model_path(model_cfg.name)
    return model


@contextmanager
def merged_once(merge: Callable[[str], None], plan: DevicePlan) -> Iterator[str]:
    """A temporary folder `merge` has written into, removed after the block.

    Under several processes (accelerate launch) the lowest rank on each machine merges and the others wait
    for it and load its folder: merged by each, every process held its own fp32 copy of the base in memory
    and on disk at the same time (8 x 28 GB for a 7B base on 8 GPUs). The processes need the process group
    for that before the trainer opens it: opened here as the trainer opens it (transformers' TrainingArguments:
    accelerate's state, on the CPU where the plan is; the trainer's default timeout), which the trainer then
    finds open and keeps.
    """
    if process_count() == 1:
        with tempfile.TemporaryDirectory(prefix="align-sft-merged-") as tmp:
            merge(tmp)
            yield tmp
        return
    import torch.distributed as dist
    from accelerate import PartialState
    from transformers import TrainingArguments

    if plan.device == "cpu":
        PartialState(cpu=True)
    else:
        PartialState(timeout=datetime.timedelta(seconds=TrainingArguments.ddp_timeout))
    # Ranks from the process group, not from accelerate's state: one opened earlier without cpu=True (PPO's Ranks,
    # on a machine without CUDA) says every process is process 0.
    rank = dist.get_rank()
    machines: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(machines, socket.gethostname())
    first = machines.index(machines[rank]) == rank
    name = [uuid.uuid4().hex if rank == 0 else None]  # one folder name for this launch, on every machine
    dist.broadcast_object_list(name, src=0)
    folder = Path(tempfile.gettempdir()) / f"align-sft-merged-{name[0]}"
    try:
        if first:
            merge(str(folder))
        dist.barrier()  # merged on this machine
        yield str(folder)
        dist.barrier()  # and loaded by every process
    finally:
        if first:
            shutil.rmtree(folder, ignore_errors=True)


def load_reward_model(path: str | Path, plan: DevicePlan | None = None):
    """(model, tokenizer) from a folder `align reward` wrote, on a base quantized as it was trained (unless `plan`
    says otherwise): the 4-bit base a QLoRA reward model learnt on is the model its held-out accuracy and
    probes measured, which the PPO gate reads; unquantized, PPO and eval scored with another one (0.741 held-out
    against the stage's 0.778 on the quickstart's pairs)."""
    from peft import PeftModel

    path = Path(path)
    if not is_adapter_dir(path):
        raise FileNotFoundError(f"{path} is not a reward model folder (no adapter_config.json): run `align reward`")
    trained = trained_model_config(path)
    plan = plan or device_plan(trained)
    sft = path / SFT_ADAPTER if trained_from_sft(path) else None
    base = reward_base(ModelConfig(name=adapter_base_name(path), quantize=plan.quantize,
                                   double_quant=trained.double_quant), plan, sft, training=False)
    tokenizer = load_tokenizer(str(path))
    # The trained score head is saved in fp32 (the stage keeps it so): peft copies the base's head for it, in the
    # base's dtype, and a bf16 or fp16 copy rounded the trained weights as they loaded (never quantized: the last
    # module). fp32 first, and the copy holds them as trained.
    head = getattr(base, "score", None)
    if isinstance(head, torch.nn.Module):
        head.float()
    model = PeftModel.from_pretrained(base, str(path))
    # bitsandbytes' CPU repack (AVX512-BF16) computes the 4-bit layers with another kernel, and other numbers, than
    # the stage measured held-out accuracy and probes with (it trained with the repack off: keep_4bit_backward); the
    # gate read those (a pair flipped of the quickstart's 27 with QLoRA); and DoRA reads repacked weights wrongly.
    keep_4bit_backward(model)
    if merges_exactly(model):
        model = model.merge_and_unload()  # one plain model: faster to score with (not into bf16: it rounds the update)
    else:
        score_head_in_fp32(model)
    # The classifier reads the last non-pad token, so it must know the pad id training used.
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


def trained_model_config(path: str | Path) -> ModelConfig:
    """The model.quantize, double_quant and compute_dtype a reward model folder was trained with, as they resolved
    where it trained (its align.json: modeling.trained_model_settings), so that it scores on the weights and in the
    dtype its held-out accuracy and probes were measured with, which the gate reads; unquantized and auto where it
    records none."""
    from align.modeling import trained_model_settings

    path = Path(path)
    if not (path / "align.json").is_file():
        return ModelConfig(quantize=False)
    trained = trained_model_settings(read_manifest(path))
    return ModelConfig(quantize=trained.quantize, double_quant=trained.double_quant, compute_dtype=trained.compute_dtype)


def score_head_in_fp32(model) -> None:
    """The `score` head of a half-precision reward model computes in fp32 (its weights and input cast up): a
    bf16 output keeps 8 bits of mantissa, and distinct responses tie (147 distinct scores for 248 distinct
    responses, measured on the quickstart's reward model), each tie a coin toss in a win-rate or a comparison.

    Cast up at each call, not once (`head.float()`): under FSDP the head's weight outside a forward is the
    rank's fp32 shard, and the forward gathers it in the mixed-precision policy's bf16 again, which an fp32
    input refused (align reward under fsdp.yaml stopped at its held-out scoring, after all the training)."""
    from functools import partial

    import torch.nn.functional as F

    def fp32_forward(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        bias = None if linear.bias is None else linear.bias.float()
        with torch.autocast(x.device.type, enabled=False):  # fp16 autocast (score_conversations) would cast it back
            return F.linear(x.float(), linear.weight.float(), bias)

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    for linear in inner.score.modules():  # the head, or peft's copies of it (modules_to_save)
        if isinstance(linear, torch.nn.Linear):
            linear.forward = partial(fp32_forward, linear)


# ---------------------------------------------------------------------------- scoring


def encode(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a whole conversation, exactly as TRL's RewardTrainer tokenized training pairs."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    limit = tokenizer.model_max_length
    if limit and len(ids) > limit:
        # Keep the end: the classifier scores the last token, i.e. the end of the response.
        ids = ids[-limit:]
    return list(ids)


def scoring_autocast(model):
    """The autocast a reward model scores under (score_conversations, and active.reward_features, whose rewards and
    features must be its scores'): trained under fp16, the adapter and score head stay fp32 (the GradScaler needs
    them so): fp16 autocast, as in training, or the fp32 adapter would be handed the fp16 base's hidden states."""
    dtypes = {p.dtype for p in model.parameters()}
    device = next(model.parameters()).device
    return torch.autocast(device.type, torch.float16) if {torch.float16, torch.float32} <= dtypes else nullcontext()


@torch.no_grad()
def score_conversations(model, tokenizer, conversations: list[list[dict[str, str]]], batch_size: int = 16) -> list[float]:
    """One reward per conversation (prompt turns + the response turn), right-padded like training.

    Each distinct conversation is scored once (held-out pairs share responses: a K-wise ranking's
    pairs), in batches of similar length, so little of a batch is padding."""
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    mixed = scoring_autocast(model)
    encoded = [tuple(encode(tokenizer, c)) for c in conversations]
    distinct = sorted(set(encoded), key=len)
    reward: dict[tuple[int, ...], float] = {}
    for i in range(0, len(distinct), batch_size):
        batch = distinct[i:i + batch_size]
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([list(ids) + [pad] * (width - len(ids)) for ids in batch], device=device)
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch], device=device)
        with mixed:
            logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        reward.update(zip(batch, logits[:, 0].float().tolist(), strict=True))
    model.train(was_training)
    return [reward[ids] for ids in encoded]


def score(model, tokenizer, prompts: list[str], responses: list[str], batch_size: int = 16, *,
          system_prompt: str | None = None) -> list[float]:
    """The reward of each response to its prompt (one user turn, one assistant turn), after `system_prompt`:
    the one the reward model was trained with (align.artifacts.system_prompt_of of its folder)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    conversations = [with_system_prompt([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                        system_prompt) for p, r in zip(prompts, responses, strict=True)]
    return score_conversations(model, tokenizer, conversations, batch_size)


# ---------------------------------------------------------------------------- the loss


def pair_loss(chosen: torch.Tensor, rejected: torch.Tensor, *, margin: torch.Tensor | None = None,
              weight: torch.Tensor | None = None, p_chosen: torch.Tensor | None = None) -> torch.Tensor:
    """The batch's Bradley-Terry loss with per-pair weights w and soft labels p (each 1 when not given): the mean
    of pair_losses,

        mean_i  w_i * ( -p_i log sigmoid(d_i - m_i) - (1 - p_i) log sigmoid(-d_i - m_i) ),  d = r_chosen - r_rejected

    With w = p = 1 it is TRL's RewardTrainer loss, -log sigmoid(d - m) averaged. With p the posterior
    P(chosen beats rejected) of align export's dawid_skene, it is the expected Bradley-Terry
    log-likelihood under that posterior: minimised at d = logit(p) (a pair as sure as 0.73 asks for a gap
    of 1), where a hard label would push the gap on for ever. A weight w = 2p - 1 with a hard label agrees
    with it near d = 0 (the same gradient, p - 1/2) but does not stop there. A margin m (use_margin)
    applies to whichever response wins.
    """
    return pair_losses(chosen, rejected, margin=margin, weight=weight, p_chosen=p_chosen).mean()


def pair_losses(chosen: torch.Tensor, rejected: torch.Tensor, *, margin: torch.Tensor | None = None,
                weight: torch.Tensor | None = None, p_chosen: torch.Tensor | None = None) -> torch.Tensor:
    """Each pair's term of pair_loss, [pairs]: for a training batch whose mean would weigh its pairs by its size
    (align.recipes.reward.AlignRewardTrainer divides their sum by the nominal batch size instead)."""
    delta = chosen - rejected
    m = margin if margin is not None else 0.0
    loss = -torch.nn.functional.logsigmoid(delta - m)
    if p_chosen is not None:
        loss = p_chosen * loss - (1 - p_chosen) * torch.nn.functional.logsigmoid(-delta - m)
    if weight is not None:
        loss = weight * loss
    return loss


# ---------------------------------------------------------------------------- held-out figures


def _pearson(xs: list[float], ys: list[float]) -> float | None:
    try:
        return statistics.correlation(xs, ys)
    except statistics.StatisticsError:  # fewer than two points, or a constant series
        return None


def without_ties(dataset, chosen: list[float], rejected: list[float]):
    """The pairs and their rewards less the ties an export kept (`tie`, with ties=margin0): a tie has no
    right answer, so it counts in no accuracy. Returns (dataset, chosen, rejected, ties)."""
    ties = [bool(t) for t in dataset["tie"]] if "tie" in dataset.column_names else []
    if not any(ties):
        return dataset, chosen, rejected, 0
    keep = [i for i, t in enumerate(ties) if not t]
    return dataset.select(keep), [chosen[i] for i in keep], [rejected[i] for i in keep], len(ties) - len(keep)


def heldout_metrics(dataset, chosen: list[float], rejected: list[float], n_bins: int = 5) -> dict[str, Any]:
    """Pairwise accuracy, mean margin, calibration by reward gap, length correlation, annotator agreement
    (agreement_ceiling: no ceiling on the accuracy, as a majority of several annotators is right more often than
    two agree), and the mean p_chosen when the pairs carry it (posterior_ceiling). Kept ties count in none of them (eval_ties).

    Calibration: pairs are binned by |reward gap| (equal-count bins); a Bradley-Terry model
    claims P(its pick is right) = sigmoid(|gap|), so each bin shows that claim beside the observed
    accuracy (with soft labels, the expected one: p_chosen where the model picks the chosen, else 1 - p). Length correlation: Pearson r of reward against response length in characters over
    every held-out response; a high |r| means the model may be rewarding length, not quality.
    """
    dataset, chosen, rejected, ties = without_ties(dataset, chosen, rejected)
    gaps = [c - r for c, r in zip(chosen, rejected, strict=True)]
    n = len(gaps)
    if not n:  # every held-out pair a tie: nothing to be right about (the gate refuses a None accuracy)
        return {"eval_accuracy": None, "eval_accuracy_ci": None, "eval_prompts": 0, "eval_mean_margin": None,
                "eval_pairs": 0, "eval_ties": ties, "length_correlation": None, "agreement_ceiling": None,
                "posterior_ceiling": None, "calibration_error": None, "calibration": []}
    rewards = chosen + rejected
    lengths = [len(m[-1]["content"]) for m in dataset["chosen"]] + [len(m[-1]["content"]) for m in dataset["rejected"]]
    # With soft labels (dawid_skene's p_chosen) a pick is right with probability p, not surely: a model whose
    # sigmoid(gap) equals p is calibrated, and is scored so (against the hard pick it was "wrong" 1 - p of the time).
    soft = list(dataset["p_chosen"]) if "p_chosen" in dataset.column_names else [None] * n
    right = [(1.0 if g > 0 else 0.0) if p is None else (p if g > 0 else 1 - p) for g, p in zip(gaps, soft, strict=True)]
    bins = []
    order = sorted(range(n), key=lambda i: abs(gaps[i]))
    k = max(1, min(n_bins, n))
    for b in range(k):
        idx = order[b * n // k:(b + 1) * n // k]
        if not idx:
            continue
        bins.append({"gap_min": abs(gaps[idx[0]]), "gap_max": abs(gaps[idx[-1]]), "pairs": len(idx),
                     "accuracy": sum(right[i] for i in idx) / len(idx),
                     "predicted": sum(1 / (1 + math.exp(-abs(gaps[i]))) for i in idx) / len(idx)})
    agreement = [a for a in dataset["agreement"] if a is not None] if "agreement" in dataset.column_names else []
    # With dawid_skene's soft labels, their own certainty is the better ceiling: an adversary lowers the
    # annotators' agreement without making the (reliability-weighted) labels any worse.
    posterior = [p for p in dataset["p_chosen"] if p is not None] if "p_chosen" in dataset.column_names else []
    # The interval takes prompts, not pairs, as independent: a ranking's pairs share its answers (27 held-out pairs of the
    # quickstart come from 6 prompts), and two tasks of one prompt are one prompt.
    groups = [json.dumps(p, sort_keys=True) for p in dataset["prompt"]]
    return {
        "eval_accuracy": sum(g > 0 for g in gaps) / n,
        "eval_accuracy_ci": list(grouped_proportion_ci([float(g > 0) for g in gaps], groups)),
        "eval_prompts": len(set(groups)),
        "eval_mean_margin": sum(gaps) / n,
        "eval_pairs": n,
        "eval_ties": ties,
        "length_correlation": _pearson(rewards, [float(x) for x in lengths]),
        "agreement_ceiling": sum(agreement) / len(agreement) if agreement else None,
        "posterior_ceiling": sum(posterior) / len(posterior) if posterior else None,
        "calibration_error": sum(b["pairs"] / n * abs(b["accuracy"] - b["predicted"]) for b in bins),
        "calibration": bins,
    }


# ---------------------------------------------------------------------------- probes
#
# Edits that should not make an answer better, applied to the rejected response of every held-out
# pair: does the reward model now prefer it? Length: a neutral, content-free sentence appended, or
# the last sentence repeated. Politeness: a courteous phrase appended, or put in front. A reward
# model that flips pairs for these pays for the token, and PPO will learn to add it.
#
# What the labels supported: a labeller may really prefer some of these edits (the shipped
# support_style scorer rewards an opening acknowledgement, +1, and a courteous word later, +0.25,
# and punishes an answer that stops mid-sentence, which an appended sentence repairs). Where the
# scorer that labelled the data is known (simulated annotators: `probe_scorer`), each edit is also
# scored by it, and a flip counts against the model only when the scorer does not flip that pair
# too. The gate (PPO refuses, DPO warns) reads the end-appended edits only: an opening
# acknowledgement is a style annotators are asked to reward (align/labeling/guidelines.md); a phrase
# tacked on at the end carries nothing.

NEUTRAL_SENTENCE = "That is all there is to it."
POLITE_PHRASES = {"thanks": "Thanks!", "sorry": "Sorry about that.", "hope": "Hope this helps!"}
MAX_PROBE_FLIP_RATE = 0.25  # the gate's default: PPO refuses above it (max_probe_flip_rate), DPO warns


def _last_sentence(text: str) -> str:
    parts = [p for p in re.split(r"(?<=[.!?])\s+", text.strip()) if p]
    return parts[-1] if parts else text


# key -> (kind, where, what it does to the rejected response, edit)
EDITS: dict[str, tuple[str, str, str, Callable[[str], str]]] = {
    "neutral_end": ("length", "end", f"appending {NEUTRAL_SENTENCE!r}", lambda t: f"{t.rstrip()} {NEUTRAL_SENTENCE}"),
    "repeat_end": ("length", "end", "repeating its last sentence", lambda t: f"{t.rstrip()} {_last_sentence(t)}"),
    **{f"{k}_end": ("politeness", "end", f"appending {p!r}", lambda t, p=p: f"{t.rstrip()} {p}")
       for k, p in POLITE_PHRASES.items()},
    **{f"{k}_start": ("politeness", "start", f"putting {p!r} in front", lambda t, p=p: f"{p} {t.lstrip()}")
       for k, p in POLITE_PHRASES.items()},
}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _accuracy_by(labels: list[str], gaps: list[float], order: list[str]) -> list[dict[str, Any]]:
    buckets: dict[str, list[float]] = {}
    for label, gap in zip(labels, gaps, strict=True):
        buckets.setdefault(label, []).append(gap)
    return [{"bucket": b, "pairs": len(buckets[b]), "accuracy": sum(g > 0 for g in buckets[b]) / len(buckets[b])}
            for b in order if b in buckets]


def agreement_bucket(row: dict[str, Any]) -> str:
    """unanimous / majority / split from the pair's votes; `single annotator`; or what the data allows."""
    people, chosen, rejected = row.get("annotators"), row.get("votes_chosen"), row.get("votes_rejected")
    if people is not None and len(people) == 1:
        return "single annotator"
    if people and chosen is not None and rejected is not None:
        return "unanimous" if chosen == len(people) else "majority" if chosen > len(people) / 2 else "split"
    if row.get("agreement") is not None:  # task-level agreement only (data from before votes were counted)
        return "unanimous" if row["agreement"] == 1 else "not unanimous"
    return "unknown"


AGREEMENT_ORDER = ["unanimous", "majority", "split", "not unanimous", "single annotator", "unknown"]


def _margin_bucket(margin: float) -> str:
    # The margin is the mean ranks' difference: 0 is a tie kept by ties=margin0, or a split vote the
    # majority decided (2 to 1 with the ranks evening out), so the bucket is named for what it measures.
    return "0 (equal mean rank)" if margin == 0 else "1" if margin < 1.5 else "2" if margin < 2.5 else "3+"


def _posterior_bucket(p: float) -> str:
    return "<0.7" if p < 0.7 else "0.7-0.9" if p < 0.9 else ">=0.9"


def scorer_views(scorer: Callable[[str, str], float], name: str | None, rows: list[dict]
                 ) -> tuple[list[float], list[float], dict[str, list[float]]]:
    """The probe scorer's scores of held-out `rows` (pairs as dicts): their chosen and rejected answers, and each
    EDITS edit of the rejected. A scorer that returns no number, or NaN, on any of them is a StageError naming the
    pair (not float()'s traceback, nor a NaN counted as no flip): the reward stage asks for them before it trains,
    so such a scorer stops the stage before the training it would otherwise lose."""
    from align.rl import scorer_scores

    prompts = [r["prompt"][-1]["content"] for r in rows]
    texts = [r["rejected"][-1]["content"] for r in rows]

    def by_scorer(answers: list[str]) -> list[float]:
        return scorer_scores(scorer, name or getattr(scorer, "__name__", "scorer"), prompts, answers,
                             what="held-out pair", finite=True)

    return (by_scorer([r["chosen"][-1]["content"] for r in rows]), by_scorer(texts),
            {key: by_scorer([edit(t) for t in texts]) for key, (*_, edit) in EDITS.items()})


def probe(reward: Callable[[list[list[dict[str, str]]]], list[float]], heldout, chosen: list[float],
          rejected: list[float], scorer: Callable[[str, str], float] | None = None,
          scorer_name: str | None = None) -> dict[str, Any]:
    """The probes on held-out pairs: accuracy by annotator agreement, by labelling margin and by posterior
    where the data has them, and each edit of EDITS (flip rate, reward gain; the scorer's view when given).

    `reward(conversations)` scores whole conversations; `chosen` / `rejected` are the pairs' rewards. Each edit
    scores every pair once more, with a bar: on 291 pairs on 2 CPU cores that is 6 minutes, silent until the end.
    """
    heldout, chosen, rejected, _ = without_ties(heldout, chosen, rejected)  # a kept tie has no right answer
    rows = heldout.to_list()
    n = len(rows)
    bar = tqdm(total=len(EDITS), unit="probe", desc=f"probing the reward model on {n} held-out pairs")
    gaps = [c - r for c, r in zip(chosen, rejected, strict=True)]
    out: dict[str, Any] = {"pairs": n, "scorer": scorer_name}
    labels = [agreement_bucket(r) for r in rows]
    out["by_agreement"] = {
        "buckets": _accuracy_by(labels, gaps, AGREEMENT_ORDER),
        "note": ("one annotator per pair: agreement cannot split the accuracy" if set(labels) == {"single annotator"}
                 else "no annotator columns in the data" if set(labels) == {"unknown"} else None)}
    if all(r.get("margin") is not None for r in rows):
        out["by_margin"] = _accuracy_by([_margin_bucket(r["margin"]) for r in rows], gaps, ["0 (equal mean rank)", "1", "2", "3+"])
    if all(r.get("p_chosen") is not None for r in rows):
        out["by_posterior"] = _accuracy_by([_posterior_bucket(r["p_chosen"]) for r in rows], gaps,
                                           ["<0.7", "0.7-0.9", ">=0.9"])
    texts = [r["rejected"][-1]["content"] for r in rows]
    if scorer is not None:
        # Every score the scorer gives, the edited answers' too, before the reward model scores any edit (the reward
        # stage takes them all before training too: scorer_views)
        s_chosen, s_rejected, s_edited = scorer_views(scorer, scorer_name, rows)
    right = [i for i in range(n) if gaps[i] > 0]
    spread = _mean([abs(g) for g in gaps]) or None
    edits = []
    for key, (kind, where, what, edit) in EDITS.items():
        edited = [edit(t) for t in texts]
        new = reward([r["prompt"] + [{"role": "assistant", "content": e}] for r, e in zip(rows, edited, strict=True)])
        bar.update(1)
        flips = [i for i in right if new[i] > chosen[i]]
        gain = _mean([a - b for a, b in zip(new, rejected, strict=True)])
        row = {"edit": key, "kind": kind, "where": where, "what": what, "gated": where == "end",
               "flips": len(flips), "of": len(right), "flip_rate": len(flips) / len(right) if right else None,
               "mean_gain": gain, "gain_vs_gap": gain / spread if spread and gain is not None else None}
        if scorer is not None:
            s_new = s_edited[key]
            ordered = [i for i in range(n) if s_chosen[i] > s_rejected[i]]
            # A flip is supported (the labels could have taught it) only where the scorer orders the pair as
            # labelled and the phrase lifts the worse answer over the better by the scorer too. On a pair it
            # orders the other way it prefers the rejected answer before any edit: its preferring the edited
            # one says nothing of the phrase, and the reward model's flip there is its own.
            supported = {i for i in ordered if s_new[i] > s_chosen[i]}
            unsupported = [i for i in flips if i not in supported]
            scorer_flips = sum(s_new[i] > s_chosen[i] for i in ordered)
            row.update(scorer_flip_rate=scorer_flips / len(ordered) if ordered else None,
                       scorer_flips=scorer_flips, scorer_of=len(ordered),  # over other pairs than the model's rate
                       scorer_mean_gain=_mean([a - b for a, b in zip(s_new, s_rejected, strict=True)]),
                       unsupported_flips=len(unsupported),
                       unsupported_flip_rate=len(unsupported) / len(right) if right else None)
        edits.append(row)
    bar.close()
    out["edits"] = edits
    rate_key = "unsupported_flip_rate" if scorer is not None else "flip_rate"
    gated = [e for e in edits if e["gated"] and e[rate_key] is not None]
    worst = max(gated, key=lambda e: e[rate_key], default=None)
    out["gate"] = None if worst is None else {
        "edit": worst["edit"], "what": worst["what"], "rate": worst[rate_key],
        "flips": worst["unsupported_flips" if scorer is not None else "flips"], "of": worst["of"],
        "basis": (f"flips {scorer_name} does not make too" if scorer is not None else "every flip (the labeller's "
                  "own preferences are not known: set probe_scorer to the scorer that labelled the data, if any)")}
    return out


def probe_failure(probes: dict[str, Any] | None, max_flip_rate: float) -> str | None:
    """A sentence naming the gated probe above `max_flip_rate`, or None when none is."""
    gate = (probes or {}).get("gate")
    if not gate or gate["rate"] <= max_flip_rate:
        return None
    return (f"the reward model prefers the worse answer of a held-out pair after {gate['what']} (probe "
            f"{gate['edit']}) in {gate['flips']} of the {gate['of']} pairs it had right ({gate['rate']:.0%}; counted: "
            f"{gate['basis']}), above max_probe_flip_rate={max_flip_rate}")


def trained_from_sft(rm: str | Path) -> bool:
    """Whether the reward model in `rm` is base + SFT adapter + its own adapter: its manifest's `from_sft`, and
    where a manifest has none (align before it recorded one), whether the folder holds the SFT copy. Not the
    copy alone: a rerun with from_sft=false over a folder trained from SFT kept the old copy, and loaders
    put that SFT under a reward adapter trained without it."""
    recorded = read_manifest(rm).get("from_sft") if (Path(rm) / MANIFEST).is_file() else None
    return recorded if isinstance(recorded, bool) else is_adapter_dir(Path(rm) / SFT_ADAPTER)


def drop_earlier_extras(out: str | Path) -> None:
    """Remove what an earlier run saved in `out` beside its adapter only when trained so (the SFT copy with
    from_sft, the uncertainty heads with heads > 0): this run writes its own only if it is trained so, and an
    earlier one's would be read as this run's. Called as training starts, after its align.json has gone."""
    target = Path(out) / SFT_ADAPTER
    if target.is_dir():
        shutil.rmtree(target)
        log.info("%s: removed the earlier run's %s/ (this run saves its own if it trains from SFT)", out, SFT_ADAPTER)
    if (Path(out) / HEADS_FILE).is_file():
        (Path(out) / HEADS_FILE).unlink()
        log.info("%s: removed the earlier run's %s (this run saves its own with heads > 0)", out, HEADS_FILE)


def save_sft_copy(sft: str | Path, out: str | Path) -> Path:
    """Copy the SFT adapter's files (not its checkpoints) into the reward folder, for load_reward_model."""
    target = Path(out) / SFT_ADAPTER
    target.mkdir(parents=True, exist_ok=True)
    for f in Path(sft).iterdir():
        if f.is_file() and (f.name.startswith("adapter_") or f.name == "align.json"):
            shutil.copy2(f, target / f.name)
    return target


# ---------------------------------------------------------------------------- for an RL stage


def gate(rm: Path, min_accuracy: float, max_probe_flip_rate: float = MAX_PROBE_FLIP_RATE) -> dict:
    """Refuse a reward model whose held-out accuracy is under `min_accuracy` (PPO would optimise its noise), or
    whose end-appended probes flip more than `max_probe_flip_rate` of the pairs (PPO would learn the phrase)."""
    if not is_adapter_dir(rm):
        p = key_prefix("ppo")
        raise StageError(f"no reward model at {rm}: run `align reward run.dir={shell(rm.parent)}` first, pass "
                         f"{p}reward_model=<folder>, or use a programmatic reward with {p}scorer=<name or module:function>")
    manifest = read_manifest(rm)
    if manifest.get("stage") not in (None, "reward"):  # None: a reward model from elsewhere, or an old one
        raise StageError(f"{rm} is the output of `align {manifest['stage']}`, not a reward model: pass "
                         "reward_model=<an `align reward` folder> (run.dir's reward/ by default)")
    metrics = manifest.get("metrics", {})
    accuracy = metrics.get("eval_accuracy")
    if min_accuracy > 0 and (accuracy is None or accuracy < min_accuracy):
        seen = (f"held-out accuracy {accuracy:.3f}, under" if accuracy is not None else
                f"no held-out accuracy: all {metrics['eval_ties']} of its held-out pairs are ties (hold out more "
                "prompts: data.test_fraction), nothing to compare with" if metrics.get("eval_ties") else
                "no held-out accuracy in its manifest (it was trained without held-out pairs) to compare with")
        raise StageError(
            f"the reward model at {rm} has {seen} min_reward_accuracy={min_accuracy}: "
            "PPO would maximise a reward that disagrees with your annotators, and the policy learns its mistakes. "
            "Label more (or cleaner) pairs and retrain it with `align reward`; to run anyway, pass "
            f"{key_prefix('ppo')}min_reward_accuracy=0")
    probes = manifest.get("probes")
    if probes is None and metrics.get("eval_accuracy") is not None:
        log.warning("the reward model at %s has no probes in its manifest (trained before `align reward` measured "
                    "them): nothing says it does not pay for length or a polite phrase; `align reward probe --model %s` "
                    "measures them", rm, rm)
    failure = probe_failure(probes, max_probe_flip_rate)
    if failure:
        raise StageError(
            f"the reward model at {rm} pays for a phrase, not for a better answer: {failure}. PPO would learn to add "
            "it to every answer. See the probes in report.html and docs/reward_dpo.md#probes (label pairs where "
            "the phrase is on both sides or on the worse one, or check the labels for it), retrain with `align "
            f"reward`; to run anyway, pass {key_prefix('ppo')}max_probe_flip_rate=1")
    return metrics


def probe_warning(rm: Path, data_path: str | Path) -> str | None:
    """For DPO, which never runs the reward model: a sentence when the one trained on the same pairs fails a probe."""
    if not (rm / "align.json").is_file():
        return None
    manifest = read_manifest(rm)
    parent = (manifest.get("parents", {}).get("preferences") or {}).get("path")
    if parent is None or Path(parent).resolve() != Path(data_path).resolve():
        return None
    failure = probe_failure(manifest.get("probes"), MAX_PROBE_FLIP_RATE)
    return (f"the reward model trained on these pairs ({rm}) fails a probe: {failure}. DPO learns from the same pairs "
            "and may learn the same habit: compare the policies' answers in the eval report before using it "
            "(docs/reward_dpo.md#probes)") if failure else None


def scored_position(ids: list[int], pad_token_id: int | None) -> int:
    """The token a sequence classifier reads its score at, as transformers' *ForSequenceClassification do:
    the last that is not the pad token. Not always the last: where pad is EOS (load_tokenizer's fallback) and
    the chat template ends a turn with EOS (Llama 3, Mistral), it is the token before that EOS."""
    real = [i for i, t in enumerate(ids) if t != pad_token_id]
    return real[-1] if real else len(ids) - 1


LORA_SHAPE = ("r", "lora_alpha", "use_rslora", "use_dora")  # with the weights, what a LoRA adds to its base


def _same_adapter(a: Path, b: Path) -> bool:
    """The same LoRA: byte-identical weights (save_sft_copy copies the file), else equal tensors (one saved
    again), and the same scaling."""
    import filecmp

    def shape(folder: Path) -> dict:
        config = json.loads((folder / "adapter_config.json").read_text())
        return {k: config.get(k) for k in LORA_SHAPE}

    if shape(a) != shape(b):
        return False
    wa, wb = a / "adapter_model.safetensors", b / "adapter_model.safetensors"
    if not (wa.is_file() and wb.is_file()):
        return False
    if filecmp.cmp(wa, wb, shallow=False):
        return True
    from safetensors.torch import load_file

    ta, tb = load_file(str(wa)), load_file(str(wb))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def shared_base_problem(rm: Path, sft: Path | None, base: str, settings: ModelConfig,
                        prefix: str = "") -> str | None:
    """Why the reward model at `rm` cannot score on the policy's base (rl.reward_on_policy_base), or None; the
    sentence ends with what to do. `settings`: the policy's model.*, `prefix` the keys' as the user gives them.

    There the reward model is rebuilt from the policy's parts: the policy's base, quantized and computing as the
    policy's, and the policy's "ref" adapter standing for the SFT adapter the reward model was trained from (its
    copy in sft_adapter/). That is the reward model only when those parts are its own; an SFT adapter retrained
    since, or another run's, gave other scores, rankings reversed included, with nothing said, and a reward model
    trained on an unquantized base scored on the policy's 4-bit one (the quickstart's reward and PPO settings)
    up to 0.37 apart from its own scores on the same pairs. Refused rather than loaded apart with a warning: the
    setting is there to keep one base in memory, and a second model where the user planned for one may not fit;
    a mismatch is more often a wrong folder or setting than a wish. Known from the folders and the config alone,
    so preflight says it before any model loads.
    """
    alone = f"set {prefix}rl.reward_on_policy_base=false to load the reward model on its own"
    other_sft = f"{alone}, or pass the {prefix}sft= it was trained from"
    rm_base = adapter_base_name(rm)
    if model_key(rm_base) != model_key(base):  # one base however spelled (an embedded name, a folder)
        return (f"the reward model at {rm} was trained on {rm_base}, the policy's base is {base}: its adapter "
                f"on this base is not that reward model; {other_sft}")
    trained = trained_model_config(rm)
    rm_plan, policy_plan = device_plan(trained), device_plan(settings)
    if (rm_plan.quantize, rm_plan.compute_dtype) != (policy_plan.quantize, policy_plan.compute_dtype):
        def described(cfg: ModelConfig, plan: DevicePlan) -> str:
            return (f"{'a 4-bit NF4' if plan.quantize else 'an unquantized'} base, "
                    f"{str(plan.compute_dtype).replace('torch.', '')} compute (model.quantize="
                    f"{str(cfg.quantize).lower()}, model.compute_dtype={cfg.compute_dtype})")

        match = ([f"{prefix}model.quantize={str(trained.quantize).lower()}"] if rm_plan.quantize != policy_plan.quantize
                 else []) + ([f"{prefix}model.compute_dtype={trained.compute_dtype}"]
                             if rm_plan.compute_dtype != policy_plan.compute_dtype else [])
        return (f"the reward model at {rm} was trained on {described(trained, rm_plan)}, the policy runs on "
                f"{described(settings, policy_plan)}: its adapter on the policy's base scores otherwise than the "
                f"reward model its gate measured; set {' and '.join(match)} to run the policy as the reward model "
                f"was trained, retrain the reward model with the policy's settings, or {alone}, as it was trained")
    if rm_plan.quantize and trained.double_quant != settings.double_quant:  # other 4-bit weights (its constants quantized or not)
        return (f"the reward model at {rm} was trained on a 4-bit base with model.double_quant="
                f"{str(trained.double_quant).lower()}, the policy's has {str(settings.double_quant).lower()}: its "
                f"adapter on the policy's base scores otherwise than the reward model its gate measured; set "
                f"{prefix}model.double_quant={str(trained.double_quant).lower()}, or {alone}, as it was trained")
    if not trained_from_sft(rm):
        return None  # trained on the bare base: its adapter alone on the policy's base is the reward model
    if sft is None:
        return (f"the reward model at {rm} was trained on an SFT model (its copy in {rm / SFT_ADAPTER}), but the "
                f"policy has no SFT adapter to stand for it; {other_sft}")
    if not _same_adapter(rm / SFT_ADAPTER, Path(sft)):
        return (f"the reward model at {rm} was trained from another SFT adapter than the policy's {sft} (its copy "
                f"in {rm / SFT_ADAPTER} has other weights): the policy's would stand for it and score with a "
                f"reward model that was never trained; {other_sft}")
    return None


def check_shared_base(rm: Path, sft: Path | None, base: str, settings: ModelConfig, prefix: str = "") -> None:
    """A ConfigError when the reward model cannot score on the policy's base (shared_base_problem)."""
    from align.config import ConfigError

    if problem := shared_base_problem(rm, sft, base, settings, prefix):
        raise ConfigError(f"{prefix}rl.reward_on_policy_base=true: {problem}")


def shared_base_reward(model, rm: Path, sft: Path | None, base: str, settings: ModelConfig) -> Reward:
    """The reward model's adapter as a third adapter ("reward") on the policy's base, plus its score head.

    The reward model is the base (+ the SFT adapter when it was trained from SFT) + its LoRA + a
    linear `score` head on the last token that is not padding (scored_position). Here the SFT part is the
    "ref" adapter (loaded from `sft`), activated together with "reward": the same weights, except that SFT
    is a LoRA delta on the quantized base rather than merged before quantization (close, not bit-identical;
    docs/ppo.md). `base` is the policy's base, `settings` its model.* (quantization, compute dtype); a reward
    model these parts are not is refused (shared_base_problem).
    """
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    check_shared_base(rm, sft, base, settings)
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
    from_sft = trained_from_sft(rm)
    tokenizer = load_tokenizer(str(rm))
    system_prompt = system_prompt_of(rm)  # the one it was trained with, as score() adds it
    active = ["ref", "reward"] if from_sft else ["reward"]

    @torch.no_grad()
    def reward(prompts: list[str], responses: list[str]) -> list[float]:
        model.base_model.set_adapter(active, inference_mode=True)
        try:
            out = []
            for p, r in zip(prompts, responses, strict=True):
                conversation = with_system_prompt([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                                  system_prompt)
                ids = encode(tokenizer, conversation)
                hidden = model(input_ids=torch.tensor([ids], device=device),
                               output_hidden_states=True).hidden_states[-1][0, scored_position(ids, tokenizer.pad_token_id)]
                out.append((hidden.float() @ head.T).item())
            return out
        finally:
            model.set_adapter("default")

    return reward
