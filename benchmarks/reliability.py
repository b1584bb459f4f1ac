"""Annotator reliability end to end: does weighting annotators give better pairs and a better reward model?

    python benchmarks/reliability.py --from runs/quickstart --out /tmp/reliability
    python benchmarks/reliability.py --from runs/quickstart --out /tmp/reliability --sim-seeds 0 1 2 3 4 --steps 16

Takes the tasks `align sample` wrote in a finished run (--from: its labels.db and sft/), and has three
simulated annotators rank them again in a new store (--profiles, default good,noisy:0.8,adversarial;
overlap 3, --gold tasks marked with the support_style scorer's own order, met at --gold-rate). Then:

1. pairs: `align export` with combine=majority and with combine=dawid_skene, for each simulation
   seed; printed: each annotator's estimated accuracy and weight, and the share of exported pairs
   whose chosen the scorer itself prefers (the truth here; the annotators only see the scorer);
2. reward models (the first seed): `align reward` on the SFT model of --from, on the majority pairs
   (hard labels), on the dawid_skene pairs with their soft labels (use_weights=auto), and on the same
   pairs as hard labels (use_weights=off); each is scored on one truth-labelled held-out set: every
   pair of responses of the held-out prompts (the export's test split, ordered by the scorer) plus
   the eval stage's answers of --from (sft vs dpo, prompts no stage trained on).

Writes stage folders under --out (with W&B offline runs: run.wandb=offline) and --json FILE gets the
figures as one JSON line. Each reward model takes minutes on 2 CPU cores (--steps, default 16).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# reward model variants: (export combine, use_weights)
VARIANTS = {"majority": ("majority", "off"), "dawid_skene_soft": ("dawid_skene", "auto"),
            "dawid_skene_hard": ("dawid_skene", "off")}


def truth_pairs(store, prompts: set[str]) -> list[tuple[str, str, str]]:
    """(prompt, better, worse) for every two responses of the tasks of `prompts` that support_style orders."""
    from align.labeling.scorers import support_style

    out = []
    for task in store.batch_tasks("round-0"):
        if task["prompt"] not in prompts:
            continue
        for a, b in itertools.combinations(dict.fromkeys(task["responses"]), 2):
            sa, sb = support_style(task["prompt"], a), support_style(task["prompt"], b)
            if sa != sb:
                out.append((task["prompt"], a, b) if sa > sb else (task["prompt"], b, a))
    return out


def eval_pairs(source: Path) -> list[tuple[str, str, str]]:
    """(prompt, better, worse) from the eval stage's samples of `source`: its sft and dpo answers, by support_style."""
    from align.labeling.scorers import support_style

    path = source / "eval" / "samples.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        row = json.loads(line)
        a, b = row.get("sft"), row.get("dpo")
        if not a or not b or a.strip() == b.strip():
            continue
        sa, sb = support_style(row["prompt"], a), support_style(row["prompt"], b)
        if sa != sb:
            out.append((row["prompt"], a, b) if sa > sb else (row["prompt"], b, a))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", default="runs/quickstart", help="a finished run (labels.db, sft/)")
    parser.add_argument("--out", required=True, help="a new folder for this benchmark's runs")
    parser.add_argument("--profiles", default="good,noisy:0.8,adversarial")
    parser.add_argument("--gold", type=int, default=8, help="tasks marked gold (the scorer's order)")
    parser.add_argument("--gold-rate", type=float, default=0.2)
    parser.add_argument("--sim-seeds", type=int, nargs="+", default=[0], help="simulations (the first trains)")
    parser.add_argument("--steps", type=int, default=16, help="reward model steps (batch 12)")
    parser.add_argument("--no-reward", action="store_true", help="pairs only")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="which reward models to train (default: all three)")
    parser.add_argument("--json", help="append the figures to this file as one JSON line")
    args = parser.parse_args()

    from align.cli import main as align
    from align.labeling.export import build_pairs
    from align.labeling.scorers import support_style
    from align.labeling.simulate import simulate
    from align.labeling.store import Store

    source, out = Path(args.source), Path(args.out)
    if out.exists():
        parser.error(f"--out {out} exists: give a new folder")
    tasks = Store(f"sqlite:///{source / 'labels.db'}").batch_tasks("round-0")
    figures: dict = {"source": str(source), "profiles": args.profiles, "tasks": len(tasks), "gold": args.gold,
                     "pairs": [], "reward": {}}

    def truth_share(pairs: list[dict]) -> float:
        return sum(support_style("", p["chosen"][-1]["content"]) > support_style("", p["rejected"][-1]["content"])
                   for p in pairs) / max(1, len(pairs))

    for n, seed in enumerate(args.sim_seeds):
        run = out / f"sim-{seed}"
        run.mkdir(parents=True)
        store = Store(f"sqlite:///{run / 'labels.db'}")
        store.add_tasks("round-0", [{"prompt": t["prompt"], "responses": t["responses"]} for t in tasks],
                        source={"copied_from": str(source)})
        for task in store.batch_tasks("round-0")[:args.gold]:
            scores = [support_style(task["prompt"], r) for r in task["responses"]]
            store.add_gold(task["task_id"], [sorted(set(scores), reverse=True).index(s) + 1 for s in scores])
        profiles = args.profiles.split(",")
        simulate(store, "support_style", annotators=len(profiles), profiles=profiles, overlap=len(profiles),
                 gold_rate=args.gold_rate, seed=seed)
        rows, gold = store.submitted_rankings(), store.gold_answers()
        majority, _ = build_pairs(rows, gold=gold)
        weighted, summary = build_pairs(rows, combine="dawid_skene", gold=gold)
        people = summary["reliability"]["annotators"]
        row = {"seed": seed, "majority_pairs": len(majority), "majority_truth": truth_share(majority),
               "dawid_skene_pairs": len(weighted), "dawid_skene_truth": truth_share(weighted),
               "annotators": {a: {"accuracy": round(r["accuracy"], 3), "weight": round(r["weight"], 2),
                                  "checked": r["checked"], "gold": r["gold"]} for a, r in people.items()}}
        figures["pairs"].append(row)
        print(f"seed {seed}: majority {len(majority)} pairs, {row['majority_truth']:.1%} as the scorer orders them; "
              f"dawid_skene {len(weighted)} pairs, {row['dawid_skene_truth']:.1%}")
        for a, r in row["annotators"].items():
            print(f"    {a}: accuracy {r['accuracy']:.3f}, weight {r['weight']:.2f} ({r['checked']} checked, "
                  f"{r['gold']} on gold)")
        if n > 0 or args.no_reward:
            continue

        # --- reward models on the first simulation's pairs -----------------------------------------
        sft = run / "sft"
        shutil.copytree(source / "sft", sft, ignore=shutil.ignore_patterns("checkpoints"))
        common = [f"sft={sft}", "run.wandb=offline", "model.quantize=true", "model.max_length=256",
                  f"train.max_steps={args.steps}", "train.batch_size=12", "train.lr=1e-3", "train.warmup_ratio=0.05",
                  "train.eval_steps=1000", "train.logging_steps=2", "probe_scorer=support_style"]
        for combine in ("majority", "dawid_skene"):
            assert align(["export", f"run.dir={run / combine}", f"store=sqlite:///{run / 'labels.db'}",
                          f"combine={combine}", "test_fraction=0.15", "run.wandb=offline"]) == 0
        from datasets import load_from_disk

        test_prompts = {p[-1]["content"] for p in load_from_disk(str(run / "majority" / "preferences"))["test"]["prompt"]}
        heldout = truth_pairs(store, test_prompts) + eval_pairs(source)
        figures["heldout_pairs"] = len(heldout)
        from align.reward_model import load_reward_model, score

        for name in args.variants:
            combine, use_weights = VARIANTS[name]
            folder = run / name
            started = time.time()
            assert align(["reward", f"run.dir={folder}", f"data.path={run / combine / 'preferences'}",
                          f"use_weights={use_weights}", *common]) == 0
            seconds = time.time() - started
            model, tokenizer = load_reward_model(folder / "reward")
            better = score(model, tokenizer, [p for p, _, _ in heldout], [b for _, b, _ in heldout])
            worse = score(model, tokenizer, [p for p, _, _ in heldout], [w for _, _, w in heldout])
            manifest = json.loads((folder / "reward" / "align.json").read_text())
            gate = (manifest.get("probes") or {}).get("gate") or {}
            accuracy = sum(b > w for b, w in zip(better, worse, strict=True)) / len(heldout)
            figures["reward"][name] = {"truth_accuracy": accuracy, "own_eval_accuracy": manifest["metrics"].get(
                "eval_accuracy"), "weighting": manifest.get("weighting"), "probe_gate": gate.get("edit"),
                "probe_gate_rate": gate.get("rate"), "seconds": round(seconds)}
            print(f"{name}: accuracy on {len(heldout)} truth-ordered held-out pairs {accuracy:.3f} (its own test split: "
                  f"{manifest['metrics'].get('eval_accuracy'):.3f}); worst gated probe {gate.get('edit')} "
                  f"{gate.get('rate', 0):.0%}; {seconds:.0f} s")
            del model
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(figures) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
