"""Which of the support_style scorer's features a reward model learnt, and how much its labels could teach.

    python benchmarks/reward_features.py --data runs/quickstart/preferences --rm runs/quickstart/reward

For preference pairs labelled by the support_style scorer (the quickstart's simulated annotator):

1. features: a Bradley-Terry fit (L2-penalised logistic regression on feature differences, the
   uncertainty heads' fit_heads with one head) on the scorer's own features of the training pairs
   (labeling.scorers.support_style_features: greeting, steps, courtesy, short, too long,
   repetition, cut off, words), scored on the test
   pairs: what the labels teach a model that sees exactly those features. Far above the reward
   model's accuracy, it says the labels are enough and the model's representation is what lacks.
2. with --rm: the reward model's test accuracy split by the features in which a pair's two
   responses differ (a pair counts under each feature it differs in; "none": same features,
   only the length tells them apart).

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
    from alignment.config import PreferenceDataConfig, TrainConfig

    data = PreferenceDataConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="preference pairs with train (and test) splits")
    p.add_argument("--rm", help="a reward model folder (`align reward`'s reward/): its accuracy by feature")
    p.add_argument("--test-fraction", type=float, default=data.test_fraction)
    p.add_argument("--seed", type=int, default=TrainConfig().seed, help="the split's seed (the reward stage's train.seed)")
    p.add_argument("--l2", type=float, default=1e-3)
    p.add_argument("--json", help="append the figures to this file as one JSON line")
    return p.parse_args(argv)


def responses(split) -> tuple[list[str], list[str]]:
    return [r["chosen"][-1]["content"] for r in split], [r["rejected"][-1]["content"] for r in split]


def feature_fit(train, test, l2: float) -> dict:
    """Bradley-Terry on the scorer's features (alignment.active.fit_heads, one head): fitted on
    `train`'s pairs, accuracy on `test`'s; weights per standard deviation of each feature."""
    import torch

    from alignment.active import fit_heads
    from labeling.scorers import support_style_features

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


def by_feature(rm: str, test) -> dict:
    """The reward model's accuracy on `test`, overall and per feature the two responses differ in."""
    from alignment.reward_model import load_reward_model, score_conversations
    from labeling.scorers import support_style_features

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
    from alignment.preferences import load_preferences

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
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
