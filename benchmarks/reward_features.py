"""Which of the support_style scorer's features a reward model learnt, and how much its labels could teach.

    python benchmarks/reward_features.py --data runs/quickstart/preferences --rm runs/quickstart/reward

For preference pairs labelled by the support_style scorer (the quickstart's simulated annotator):

1. features: a Bradley-Terry fit (L2-penalised logistic regression on feature differences, the
   uncertainty heads' fit_heads with one head) on the scorer's own features of the training pairs
   (align.labeling.scorers.support_style_features: greeting, steps, courtesy, short, too long,
   repetition, cut off, words), scored on the test
   pairs: what the labels teach a model that sees exactly those features. Far above the reward
   model's accuracy, it says the labels are enough and the model's representation is what lacks.
2. with --rm: the reward model's test accuracy split by the features in which a pair's two
   responses differ (a pair counts under each feature it differs in; "none": same features,
   only the length tells them apart).
3. with --frozen <sft adapter>: the same labels on the frozen SFT model's hidden states, two ways.
   Each response is pooled three ways and concatenated: the middle layer's mean over the response,
   its mean over the response's first 8 tokens, the last layer's last token.
   a. pairs: a Bradley-Terry head on the pooled states of the training pairs, which is all a
      ranking gives;
   b. tags: one logistic head per yes/no feature of the scorer, fitted on the training responses
      (what a rationale that ticks "greets", "gives steps", ... per response would record), then a
      Bradley-Terry fit of the predicted tags on the training pairs.
   Both are scored on the test pairs. Tags above pairs say that per-response rationale carries
   what the pairs alone do not teach a small model.

--data takes what `align reward` takes (the export's folder or JSONL; without a test split, the
same split by prompt as the reward stage at --test-fraction and --seed).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from align.config import PreferenceDataConfig, TrainConfig

    data = PreferenceDataConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="preference pairs with train (and test) splits")
    p.add_argument("--rm", help="a reward model folder (`align reward`'s reward/): its accuracy by feature")
    p.add_argument("--test-fraction", type=float, default=data.test_fraction)
    p.add_argument("--seed", type=int, default=TrainConfig().seed, help="the split's seed (the reward stage's train.seed)")
    p.add_argument("--frozen", metavar="SFT", help="an SFT adapter folder: pairs against tags on its frozen hidden states")
    p.add_argument("--l2", type=float, default=1e-3)
    p.add_argument("--json", help="append the figures to this file as one JSON line")
    return p.parse_args(argv)


def responses(split) -> tuple[list[str], list[str]]:
    return [r["chosen"][-1]["content"] for r in split], [r["rejected"][-1]["content"] for r in split]


def feature_fit(train, test, l2: float) -> dict:
    """Bradley-Terry on the scorer's features (align.active.fit_heads, one head): fitted on
    `train`'s pairs, accuracy on `test`'s; weights per standard deviation of each feature."""
    import torch

    from align.active import fit_heads
    from align.labeling.scorers import support_style_features

    def features(split) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        sides = [[support_style_features(text) for text in side] for side in responses(split)]
        names = list(sides[0][0])
        return names, *(torch.tensor([[f[k] for k in names] for f in side]) for side in sides)

    names, chosen, rejected = features(train)
    head = fit_heads(chosen, rejected, heads=1, l2=l2, max_iter=500)

    def accuracy(c, r) -> float:
        return (head.scores(c)[0] > head.scores(r)[0]).float().mean().item()

    return {"train_accuracy": accuracy(chosen, rejected), "test_accuracy": accuracy(*features(test)[1:]),
            "weights": {k: round(v, 3) for k, v in zip(names, head.weights[0].tolist(), strict=True)}}


TAGS = ("acknowledge", "steps", "courtesy", "short", "cut_off")  # the scorer's yes/no features
FIRST = 8  # response tokens in the opening's mean (a greeting is there)


def frozen_fit(sft: str, train, test, l2: float) -> dict:
    """Item 3 of the docstring: pairs against tags on the frozen SFT model's pooled hidden states."""
    import torch

    from align.active import fit_heads
    from align.config import ModelConfig
    from align.labeling.scorers import support_style_features
    from align.modeling import adapter_base_name, device_plan, load_tokenizer
    from align.reward_model import encode, reward_base

    cfg = ModelConfig(name=adapter_base_name(sft), quantize=False)
    model = reward_base(cfg, device_plan(cfg), sft, training=False)
    tokenizer = load_tokenizer(sft)
    tokenizer.model_max_length = 0  # whole conversations (encode keeps all): the reply starts where the prompt ends
    pooled: dict[tuple, torch.Tensor] = {}  # conversation ids -> pooled states, each distinct response once

    @torch.no_grad()
    def pool(row: dict, side: str) -> torch.Tensor:
        ids = tuple(encode(tokenizer, row["prompt"] + row[side]))
        if ids not in pooled:
            start = len(tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)["input_ids"])  # the reply's first token
            states = model.model(input_ids=torch.tensor([ids], device=model.device), output_hidden_states=True).hidden_states
            middle = states[len(states) // 2][0]
            pooled[ids] = torch.cat([middle[start:].mean(0), middle[start:start + FIRST].mean(0),
                                     states[-1][0, -1]]).float().cpu()
        return pooled[ids]

    def sides(split) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([pool(r, "chosen") for r in split]), torch.stack([pool(r, "rejected") for r in split])

    def tags(split) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.tensor([[support_style_features(text)[t] for t in TAGS] for text in side])
                     for side in responses(split))

    def accuracy(head, c, r) -> float:
        return (head.scores(c)[0] > head.scores(r)[0]).float().mean().item()

    (train_c, train_r), (test_c, test_r) = sides(train), sides(test)
    pairs = fit_heads(train_c, train_r, heads=1, l2=l2, max_iter=500)
    # Tags: logistic heads on the training responses (each once), standardised states, L2 as above.
    states, labels = torch.cat([train_c, train_r]), torch.cat(tags(train))
    mean, scale = states.mean(0), states.std(0) + 1e-4
    x = torch.cat([(states - mean) / scale, torch.ones(len(states), 1)], 1)
    weights = torch.zeros(x.shape[1], len(TAGS), requires_grad=True)
    opt = torch.optim.LBFGS([weights], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ weights, labels) + l2 * (weights[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)

    def predicted(s: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.sigmoid(torch.cat([(s - mean) / scale, torch.ones(len(s), 1)], 1) @ weights)

    tag_head = fit_heads(predicted(train_c), predicted(train_r), heads=1, l2=l2, max_iter=500)
    test_tags = torch.cat(tags(test))
    right = ((predicted(torch.cat([test_c, test_r])) > 0.5).float() == test_tags).float().mean(0)
    return {"sft": sft, "responses": len(pooled), "pairs_test_accuracy": accuracy(pairs, test_c, test_r),
            "tags_test_accuracy": accuracy(tag_head, predicted(test_c), predicted(test_r)),
            "tag_accuracy": {t: round(v, 3) for t, v in zip(TAGS, right.tolist(), strict=True)},
            "tag_share": {t: round(v, 3) for t, v in zip(TAGS, labels.mean(0).tolist(), strict=True)}}


def by_feature(rm: str, test) -> dict:
    """The reward model's accuracy on `test`, overall and per feature the two responses differ in."""
    from align.labeling.scorers import support_style_features
    from align.reward_model import load_reward_model, score_conversations

    model, tokenizer = load_reward_model(rm)
    # One call: a ranking's responses are chosen in one pair and rejected in another, and are scored once.
    scores = score_conversations(model, tokenizer, [r["prompt"] + r[side] for side in ("chosen", "rejected") for r in test])
    chosen, rejected = scores[:len(test)], scores[len(test):]
    right: dict[str, list[bool]] = collections.defaultdict(list)
    for (c, r), a, b in zip(zip(*responses(test), strict=True), chosen, rejected, strict=True):
        fc, fr = support_style_features(c), support_style_features(r)
        differ = [k for k in fc if k != "words" and fc[k] != fr[k]] or ["none"]
        for k in ["all", *differ]:
            right[k].append(a > b)
    return {k: {"pairs": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(right.items(), key=lambda kv: -len(kv[1]))}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from align.preferences import load_preferences

    data, _ = load_preferences(args.data, test_fraction=args.test_fraction, seed=args.seed)
    if "test" not in data:
        raise SystemExit(f"{args.data}: no test pairs to measure on (raise --test-fraction)")
    out = {"data": args.data, "train_pairs": len(data["train"]), "test_pairs": len(data["test"]),
           "features": feature_fit(data["train"], data["test"], args.l2)}
    fit = out["features"]
    print(f"the scorer's features, Bradley-Terry on {out['train_pairs']} training pairs: test accuracy "
          f"{fit['test_accuracy']:.3f} on {out['test_pairs']} pairs (train {fit['train_accuracy']:.3f})")
    print("  weights: " + ", ".join(f"{k} {v:+.2f}" for k, v in fit["weights"].items()))
    if args.rm:
        out["rm"] = args.rm
        out["by_feature"] = by_feature(args.rm, data["test"])
        print(f"the reward model {args.rm}, test accuracy by the features a pair differs in:")
        for k, v in out["by_feature"].items():
            print(f"  {k:12s} {v['accuracy']:.3f} ({v['pairs']} pairs)")
    if args.frozen:
        out["frozen"] = frozen = frozen_fit(args.frozen, data["train"], data["test"], args.l2)
        print(f"frozen {args.frozen} states ({frozen['responses']} responses), test accuracy: pairs "
              f"{frozen['pairs_test_accuracy']:.3f}, tags {frozen['tags_test_accuracy']:.3f}")
        print("  tags right on test responses (share of training responses with it): " + ", ".join(
            f"{t} {frozen['tag_accuracy'][t]:.2f} ({frozen['tag_share'][t]:.2f})" for t in TAGS))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
