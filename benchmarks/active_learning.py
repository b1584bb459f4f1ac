"""Reward-model held-out accuracy against the number of labelled tasks: active selection vs random.

    python benchmarks/active_learning.py --run-dir runs/quickstart          # after the quickstart pipeline
    python benchmarks/active_learning.py --policy runs/q0/sft --out runs/al --seeds 10 --real 40,80

What it measures (docs/active.md has the figures): a simulated annotator (`--scorer`, default
support_style, the quickstart's; `--noise` as `align label --simulate`; `--tie-resolution`, default
0.25 as the quickstart's, calls scores that close a tie) ranks K responses per task.
The pool of candidate tasks is `--pool-prompts` (the shipped SFT instructions, which the quickstart
samples from) answered K times by the SFT policy; the test set is fixed: `--test-prompts` (the
shipped held-out prompts, the ones eval uses) answered alike and ranked by the same annotator, every
pair of a task that is not a tie. Both are sampled once and cached in `<out>/cache/` (reruns skip
straight to the curve; the cache is keyed by policy and generation settings).

The curve: each seed draws `--start` tasks at random; then, every `--batch` tasks, each arm picks
the next ones: `random` at random, the others by their acquisition (align/active.py, exactly
what `align sample selection=uncertainty acquisition=...` computes, with `--explore` as its
explore share) under the reward model fitted to the tasks labelled so far. At each of `--at` the
reward model is fitted again and scored on the test pairs.

The reward model in the curve is the cheap one align's uncertainty itself uses: an ensemble of
`--heads` bootstrap Bradley-Terry heads on the frozen features of the reward model's starting
point (the SFT model merged into the base, the hidden state its score head reads), i.e. the
reward model with only its head trained; its accuracy is the ensemble mean's. The pipeline's
reward model also trains a LoRA on the trunk (~2 min a fit on 2 cores: too slow for a curve of
hundreds of fits); `--real N,...` trains it (`align reward`, `--real-config`'s reward section and
`--real-set` overrides) on the tasks each of `--real-arms` had labelled at those N (seeds
0..`--real-seeds`-1) and scores it on the same test pairs, to show how the two relate.

Intervals: 95 % percentile bootstrap over seeds and test prompts together (a test prompt's
pairs are resampled as one), for each arm's mean accuracy and for the paired difference from
random. Writes `<out>/curve.json`, `<out>/curve.png` and `<out>/align.json`, so a run directory
holding `<out>` shows the plot in its report, and logs the same to W&B (offline by default).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from align.active import HeadEnsemble, acquisition, choose, fit_heads, reward_features  # noqa: E402

log = logging.getLogger("active_learning")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/quickstart", help="a run whose sft/ samples the tasks; <run-dir>/active_learning "
                   "is the default --out")
    p.add_argument("--policy", help="the SFT adapter (default <run-dir>/sft)")
    p.add_argument("--out", help="where the curve goes (default <run-dir>/active_learning)")
    p.add_argument("--pool-prompts", default=str(REPO / "data/support/train.jsonl"))
    p.add_argument("--pool-size", type=int, default=320, help="prompts of --pool-prompts (first N)")
    p.add_argument("--test-prompts", default=str(REPO / "data/support/prompts.jsonl"))
    p.add_argument("--test-size", type=int, default=64)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--max-length", type=int, default=256, help="tokens the reward model reads (the quickstart's)")
    p.add_argument("--scorer", default="support_style")
    p.add_argument("--noise", type=float, default=0.0)
    p.add_argument("--tie-resolution", type=float, default=0.25, help="scores this close are a tie, as the "
                   "quickstart's simulated annotator (0: only equal scores; docs/active.md's curve used 0)")
    p.add_argument("--at", default="8,16,24,32,40,60,80", help="labelled tasks at which accuracy is measured")
    p.add_argument("--start", type=int, default=8, help="tasks drawn at random before any selection")
    p.add_argument("--batch", type=int, default=8, help="tasks picked per selection round")
    p.add_argument("--arms", default="random,bald,variance,entropy", help="random and any of bald, variance, entropy")
    p.add_argument("--explore", type=float, default=0.0)
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--l2", type=float, default=0.1, help="the heads' L2 penalty (0.1 measured best of 0.01, 0.1, 1)")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--real", default="", help="N,... at which to train the pipeline's reward model too")
    p.add_argument("--real-seeds", type=int, default=1)
    p.add_argument("--real-arms", default="random,bald", help="the arms --real trains the reward model for")
    p.add_argument("--real-config", default=str(REPO / "configs/quickstart/pipeline.yaml"))
    p.add_argument("--real-set", nargs="*", default=[], help="reward overrides for --real, e.g. train.max_steps=-1")
    p.add_argument("--wandb", default="auto", choices=["auto", "online", "offline", "disabled"])
    args = p.parse_args(argv)
    args.at = sorted({int(x) for x in args.at.split(",")})
    args.arms = args.arms.split(",")
    args.real = [int(x) for x in args.real.split(",") if x]
    args.real_arms = [a for a in args.real_arms.split(",") if a in args.arms]
    bad = [a for a in args.arms if a not in ("random", "bald", "variance", "entropy")]
    if bad or "random" not in args.arms:
        p.error(f"--arms: random and any of bald, variance, entropy (got {args.arms})")
    if args.start < 2 or args.start > args.at[0] or args.batch < 1:
        p.error("--start must be >= 2 and <= the first --at; --batch >= 1")
    if any(n not in args.at for n in args.real):
        p.error("--real: each N must be one of --at")
    return args


# ---------------------------------------------------------------------------- tasks, labels, features


def sampled(path: Path, policy_dir: str, prompts_file: str, size: int, args) -> list[dict]:
    """`size` prompts answered K times by the policy, cached in `path` (JSONL, appended per generation batch)."""
    from align.config import GenerationConfig, ModelConfig
    from align.data import load_prompts
    from align.generation import generate, load_policy
    from align.modeling import device_plan

    prompts = load_prompts(prompts_file)[:size]
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    todo = prompts[len(rows):]
    if todo:
        gen = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=0.95,
                               batch_size=16, seed=0)
        model_cfg = ModelConfig(quantize=False)
        policy = load_policy(policy_dir, model_cfg, device_plan(model_cfg))
        log.info("sampling %d prompts x %d from %s into %s", len(todo), args.k, policy_dir, path)
        for start in range(0, len(todo), gen.batch_size):
            chunk = todo[start:start + gen.batch_size]
            seed = gen.seed + len(rows) + start  # the seed of a batch does not depend on where a rerun resumed
            answers = generate(policy, chunk, replace(gen, seed=seed), k=args.k, desc=None)
            with open(path, "a") as fh:
                for prompt, responses in zip(chunk, answers, strict=True):
                    fh.write(json.dumps({"prompt": prompt, "responses": responses}) + "\n")
            log.info("  %d/%d", min(start + gen.batch_size, len(todo)), len(todo))
        rows = [json.loads(line) for line in path.read_text().splitlines()]
    return rows[:size]


def labelled_pairs(tasks: list[dict], scorer_spec: str, noise: float, seed: int = 0,
                   tie_resolution: float = 0.0) -> list[list[tuple[int, int]]]:
    """Per task, the (chosen, rejected) response indices the simulated annotator's ranking gives (ties dropped;
    scores within `tie_resolution` of each other are ties, as `align label --tie-resolution`)."""
    from align.labeling.export import task_pairs
    from align.labeling.scorers import resolve_scorer
    from align.labeling.simulate import ranks_from_scores

    scorer = resolve_scorer(scorer_spec)
    rng = random.Random(seed)
    out = []
    for task in tasks:
        scores = [float(scorer(task["prompt"], r)) for r in task["responses"]]
        if noise > 0:  # as align.labeling.simulate: Gaussian noise scaled to the task's spread of scores
            spread = (max(scores) - min(scores)) or 1.0
            scores = [s + rng.gauss(0, noise * spread) for s in scores]
        # identical responses never make a pair (align export's rule)
        out.append([(c, r) for c, r, _ in task_pairs([ranks_from_scores(scores, tie_resolution)])
                    if task["responses"][c] != task["responses"][r]])
    return out


def trunk_features(tasks: list[dict], policy_dir: str, max_length: int, path: Path) -> torch.Tensor:
    """[tasks, K, D]: the hidden state a fresh score head on the SFT model reads, per response (cached)."""
    if path.is_file():
        return torch.load(path)
    from align.config import ModelConfig
    from align.modeling import adapter_base_name, device_plan, load_tokenizer
    from align.reward_model import reward_base

    cfg = ModelConfig(name=adapter_base_name(policy_dir), quantize=False)
    model = reward_base(cfg, device_plan(cfg), policy_dir, training=False)
    tokenizer = load_tokenizer(policy_dir)
    tokenizer.model_max_length = max_length
    model.config.pad_token_id = tokenizer.pad_token_id
    k = len(tasks[0]["responses"])
    conversations = [[{"role": "user", "content": t["prompt"]}, {"role": "assistant", "content": r}]
                     for t in tasks for r in t["responses"]]
    started = time.time()
    feats, _ = reward_features(model, tokenizer, conversations, batch_size=16)
    log.info("features of %d responses in %.0f s", len(conversations), time.time() - started)
    feats = feats.view(len(tasks), k, -1)
    torch.save(feats, path)
    return feats


# ---------------------------------------------------------------------------- the curve


def fit(feats: torch.Tensor, pairs: list[list[tuple[int, int]]], tasks: list[int], args, seed: int) -> HeadEnsemble | None:
    rows = [(t, c, r) for t in tasks for c, r in pairs[t]]
    if not rows:
        return None
    t, c, r = (torch.tensor(x) for x in zip(*rows, strict=True))
    return fit_heads(feats[t, c], feats[t, r], t.tolist(), heads=args.heads, l2=args.l2, seed=seed)


def correct_per_prompt(model: HeadEnsemble | None, test_feats: torch.Tensor, test_pairs) -> list[int]:
    """Per test task: how many of its pairs the ensemble's mean orders right (none right without a model)."""
    if model is None:
        return [0 for _ in test_pairs]
    mean = model.scores(test_feats.flatten(0, 1)).mean(0).view(test_feats.shape[:2])
    return [sum(int(mean[i, c] > mean[i, r]) for c, r in pairs) for i, pairs in enumerate(test_pairs)]


def distinct_answers(tasks: list[dict]) -> list[list[int]]:
    """Per task, the responses align sample's task_uncertainty scores: one per distinct non-blank text (a copy's
    pair, always level, scored ln 2 under entropy), the first of each."""
    return [sorted({r.strip(): i for i, r in reversed(list(enumerate(t["responses"]))) if r.strip()}.values())
            for t in tasks]


def run_arm(arm: str, seed: int, feats, pairs, test_feats, test_pairs, args, kept: list[list[int]]) -> dict:
    """One learning curve: the labelled tasks and the test pairs right at each of args.at (`kept`: each pool
    task's distinct answers, distinct_answers)."""
    rng = random.Random(seed)
    labelled = rng.sample(range(len(feats)), args.start)  # the same start for every arm of a seed
    arm_rng = random.Random(f"{seed}:{arm}")
    curve = {}
    for n in args.at:
        while len(labelled) < n:
            take = min(args.batch, n - len(labelled))
            have = set(labelled)
            left = [i for i in range(len(feats)) if i not in have]
            model = None if arm == "random" else fit(feats, pairs, labelled, args, seed)
            if model is None:  # random, or nothing to fit yet (every labelled task a tie): pick at random
                labelled += arm_rng.sample(left, take)
                continue
            scores = model.scores(feats[left].flatten(0, 1)).view(model.weights.shape[0], len(left), -1)
            values = [acquisition(scores[:, j, kept[left[j]]], arm) if len(kept[left[j]]) > 1 else 0.0
                      for j in range(len(left))]
            labelled += [left[j] for j in choose(values, take, explore=args.explore, seed=arm_rng.randrange(2**31))]
        model = fit(feats, pairs, labelled, args, seed)
        curve[n] = {"tasks": list(labelled), "pairs": sum(len(pairs[t]) for t in labelled),
                    "correct": correct_per_prompt(model, test_feats, test_pairs)}
    return curve


def intervals(curves: dict, test_pairs, args) -> dict:
    """Mean accuracy per arm and n with a 95 % bootstrap interval over seeds and test prompts; the same for
    each arm's difference from random (paired: one resample serves every arm)."""
    arms, seeds = args.arms, args.seeds
    totals = torch.tensor([len(p) for p in test_pairs], dtype=torch.float)
    g = torch.Generator().manual_seed(0)
    q = torch.tensor([0.025, 0.975])
    out: dict = {}
    for n in args.at:
        correct = torch.tensor([[curves[arm][s][n]["correct"] for s in range(seeds)] for arm in arms],
                               dtype=torch.float)  # [arms, seeds, test prompts]
        seed_idx = torch.randint(seeds, (args.bootstrap, seeds), generator=g)
        prompt_idx = torch.randint(len(test_pairs), (args.bootstrap, len(test_pairs)), generator=g)
        right = correct[:, :, prompt_idx].sum(-1)  # [arms, seeds, bootstrap]: each seed on each prompt resample
        acc = torch.stack([right[a].T.gather(1, seed_idx).mean(1) for a in range(len(arms))]) \
            / totals[prompt_idx].sum(1)  # [arms, bootstrap]
        point = correct.sum(2).mean(1) / totals.sum()
        row: dict = {}
        for a, arm in enumerate(arms):
            row[arm] = {"accuracy": point[a].item(), "ci": acc[a].quantile(q).tolist(),
                        "per_seed": (correct[a].sum(1) / totals.sum()).tolist(),
                        "pairs": sum(curves[arm][s][n]["pairs"] for s in range(seeds)) / seeds}
            if arm != "random":
                base = arms.index("random")
                row[arm]["delta"] = (point[a] - point[base]).item()
                row[arm]["delta_ci"] = (acc[a] - acc[base]).quantile(q).tolist()
        out[n] = row
    return out


def labels_to_match(table: dict, arm: str, target: float, at: list[int]) -> float | None:
    """The labelled tasks at which `arm`'s mean curve first reaches `target` (linear between points)."""
    prev = None
    for n in at:
        acc = table[n][arm]["accuracy"]
        if acc >= target:
            if prev is None:
                return float(n)
            n0, a0 = prev
            return n0 + (n - n0) * (target - a0) / (acc - a0) if acc > a0 else float(n)
        prev = (n, acc)
    return None


# ---------------------------------------------------------------------------- the real reward model


def real_reward(arm: str, seed: int, n: int, curve: dict, tasks: list[dict], pairs, test_tasks, test_pairs,
                policy_dir: str, out: Path, args) -> dict:
    """`align reward` (the pipeline's settings) on the tasks `arm` had labelled at n; its test-pair accuracy."""
    import yaml
    from datasets import Dataset, DatasetDict

    from align.cli import main as align

    folder = out / "real" / f"{arm}-n{n}-s{seed}"
    done = folder / "run" / "reward" / "align.json"
    # What made it: a fit made with other settings (--real-set, --policy, the annotator, the config) is made again
    made = json.dumps({"cache": args.cache_key, "policy": str(Path(policy_dir).resolve()), "real_set": args.real_set,
                       "config": Path(args.real_config).read_text(), "tasks": curve["tasks"]}, sort_keys=True)
    recorded = folder / "made_by.json"
    if done.is_file() and (not recorded.is_file() or recorded.read_text() != made):  # none: made before it was written
        log.info("%s was fitted with other (or unrecorded) settings: fitting it again", folder)
        shutil.rmtree(folder)
    if not done.is_file():
        def rows(task_list, pair_list, ids):
            return [{"prompt": [{"role": "user", "content": task_list[t]["prompt"]}],
                     "chosen": [{"role": "assistant", "content": task_list[t]["responses"][c]}],
                     "rejected": [{"role": "assistant", "content": task_list[t]["responses"][r]}],
                     "task_id": f"task-{t}"} for t in ids for c, r in pair_list[t]]

        data = DatasetDict({"train": Dataset.from_list(rows(tasks, pairs, curve["tasks"])),
                            "test": Dataset.from_list(rows(test_tasks, test_pairs, range(len(test_tasks))))})
        data.save_to_disk(str(folder / "preferences"))
        section = yaml.safe_load(Path(args.real_config).read_text()).get("reward", {})
        config = folder / "reward.yaml"
        config.write_text(yaml.safe_dump(section))
        started = time.time()
        code = align(["reward", "--config", str(config), f"run.dir={folder / 'run'}", f"sft={policy_dir}",
                      f"data.path={folder / 'preferences'}", "run.wandb=disabled", f"model.max_length={args.max_length}",
                      *args.real_set])
        if code != 0:
            raise SystemExit(f"align reward failed ({code}) for {folder}")
        (folder / "made_by.json").write_text(made)
        log.info("real reward model %s n=%d seed %d: %.0f s", arm, n, seed, time.time() - started)
    metrics = json.loads(done.read_text())["metrics"]
    return {"arm": arm, "seed": seed, "n": n, "accuracy": metrics["eval_accuracy"], "pairs": metrics["eval_pairs"],
            "train_pairs": curve["pairs"], "heads_accuracy": metrics.get("heads_eval_accuracy"),
            "steps": metrics.get("global_step")}


# ---------------------------------------------------------------------------- output


def plot(table: dict, real: list[dict], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colors = {"random": "#888888", "bald": "#d62728", "variance": "#1f77b4", "entropy": "#2ca02c"}
    for arm in args.arms:
        ys = [table[n][arm]["accuracy"] for n in args.at]
        lo = [table[n][arm]["ci"][0] for n in args.at]
        hi = [table[n][arm]["ci"][1] for n in args.at]
        ax.plot(args.at, ys, marker="o", markersize=3, color=colors[arm], label=f"{arm} (head ensemble)")
        ax.fill_between(args.at, lo, hi, color=colors[arm], alpha=0.15)
    for arm in args.arms:
        pts = [(r["n"], r["accuracy"]) for r in real if r["arm"] == arm]
        if pts:
            xs, ys = zip(*sorted(pts), strict=True)
            ax.scatter(xs, ys, marker="s", s=30, color=colors[arm], edgecolor="black", zorder=3,
                       label=f"{arm} (align reward, LoRA)")
    ax.set_xlabel(f"labelled tasks (K={args.k} responses each)")
    ax.set_ylabel("held-out pairwise accuracy")
    ax.set_title(f"Reward model accuracy vs labels: {args.seeds} seeds, 95% bootstrap intervals")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def table_text(table: dict, args, test_n: int) -> str:
    lines = [f"test: {test_n} pairs; accuracy (95% CI) by labelled tasks; delta = arm - random (paired)"]
    head = f"{'tasks':>5} {'random':>22}" + "".join(f" {arm:>22} {'delta':>24} {'ratio':>6}" for arm in args.arms[1:])
    lines.append(head)
    for n in args.at:
        r = table[n]["random"]
        row = f"{n:>5} {r['accuracy']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]"
        for arm in args.arms[1:]:
            a = table[n][arm]
            row += (f"   {a['accuracy']:.3f} [{a['ci'][0]:.3f}, {a['ci'][1]:.3f}] {a['delta']:+.3f} "
                    f"[{a['delta_ci'][0]:+.3f}, {a['delta_ci'][1]:+.3f}] {a['accuracy'] / r['accuracy']:6.3f}")
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="active_learning: %(message)s")
    from align.cli import setup_environment

    setup_environment()
    run_dir = Path(args.run_dir)
    policy = args.policy or str(run_dir / "sft")
    out = Path(args.out) if args.out else run_dir / "active_learning"
    from align.data import file_hash

    # The sampled pool and test set are reused while these are the same, the prompt files' contents included; the
    # annotator's settings are in the labels' key (args.cache_key), which the real reward models check too
    settings = {"policy": str(Path(policy).resolve()), "k": args.k, "max_new_tokens": args.max_new_tokens,
                "temperature": args.temperature, "max_length": args.max_length,
                "pool_prompts": [str(Path(args.pool_prompts).resolve()), file_hash(args.pool_prompts)],
                "test_prompts": [str(Path(args.test_prompts).resolve()), file_hash(args.test_prompts)]}
    cache = out / "cache" / hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "settings.json").write_text(json.dumps(settings, indent=1))
    args.cache_key = hashlib.sha256(json.dumps({**settings, "scorer": args.scorer, "noise": args.noise,
                                                "tie_resolution": args.tie_resolution}, sort_keys=True).encode()
                                    ).hexdigest()[:12]
    started = time.time()

    # --- data: the pool, the fixed test set, the simulated annotator's labels, the features ------
    tasks = sampled(cache / "pool.jsonl", policy, args.pool_prompts, args.pool_size, args)
    test_tasks = sampled(cache / "test.jsonl", policy, args.test_prompts, args.test_size, args)
    pairs = labelled_pairs(tasks, args.scorer, args.noise, tie_resolution=args.tie_resolution)
    test_pairs = labelled_pairs(test_tasks, args.scorer, args.noise, seed=1, tie_resolution=args.tie_resolution)
    feats = trunk_features(tasks, policy, args.max_length, cache / f"pool-features-{len(tasks)}.pt")
    test_feats = trunk_features(test_tasks, policy, args.max_length, cache / f"test-features-{len(test_tasks)}.pt")
    keep = [i for i, p in enumerate(test_pairs) if p]  # a test task of all ties has no pair to score
    test_feats, test_pairs = test_feats[keep], [test_pairs[i] for i in keep]
    test_n = sum(len(p) for p in test_pairs)
    if max(args.at) > len(tasks):
        raise SystemExit(f"--at goes to {max(args.at)} labelled tasks but the pool holds {len(tasks)}")
    log.info("pool %d tasks (%d pairs), test %d pairs on %d prompts", len(tasks), sum(map(len, pairs)), test_n,
             len(test_pairs))

    # --- the curves -------------------------------------------------------------------------
    curves: dict = {arm: {} for arm in args.arms}
    for seed in range(args.seeds):
        for arm in args.arms:
            curves[arm][seed] = run_arm(arm, seed, feats, pairs, test_feats, test_pairs, args, distinct_answers(tasks))
        log.info("seed %d: %s", seed, ", ".join(
            f"{arm} {sum(curves[arm][seed][args.at[-1]]['correct']) / test_n:.3f}" for arm in args.arms))
    table = intervals(curves, test_pairs, args)
    target = table[args.at[-1]]["random"]["accuracy"]
    matched = {arm: labels_to_match(table, arm, target, args.at) for arm in args.arms[1:]}

    # --- the real reward model at a few points ----------------------------------------------
    real = [real_reward(arm, seed, n, curves[arm][seed][n], tasks, pairs, [test_tasks[i] for i in keep], test_pairs,
                        policy, out, args)
            for n in args.real for seed in range(args.real_seeds) for arm in args.real_arms]

    # --- write ------------------------------------------------------------------------------
    text = table_text(table, args, test_n)
    print(text)
    for arm, n in matched.items():
        print(f"{arm} reaches random's accuracy at {args.at[-1]} tasks ({target:.3f}) with "
              + (f"{n:.0f} tasks ({args.at[-1] / n:.2f}x fewer labels)" if n else "no number of tasks measured"))
    for r in real:
        print(f"align reward (LoRA) {r['arm']:>8} n={r['n']:<3} seed {r['seed']}: accuracy {r['accuracy']:.3f} on "
              f"{r['pairs']} pairs ({r['train_pairs']} training pairs, {r['steps']} steps)")
    summary = {"settings": {**settings, **{k: v for k, v in vars(args).items() if k not in ("run_dir", "out")}},
               "pool_tasks": len(tasks), "test_pairs": test_n, "test_prompts": len(test_pairs),
               "curve": {str(n): row for n, row in table.items()},
               "labels_to_match_random": {"target": target, "at": args.at[-1], **matched}, "real": real,
               "seconds": round(time.time() - started)}
    (out / "curve.json").write_text(json.dumps(summary, indent=1))
    plot(table, real, args, out / "curve.png")
    (out / "curve.txt").write_text(text + "\n")
    from align.artifacts import write_manifest

    last = table[args.at[-1]]
    metrics = {f"{arm}/accuracy@{args.at[-1]}": last[arm]["accuracy"] for arm in args.arms}
    metrics.update({f"{arm}/delta@{args.at[-1]}": last[arm]["delta"] for arm in args.arms[1:]})
    write_manifest(out, stage="active_learning", config=summary["settings"], base_model=None,
                   parents={"policy": policy}, metrics=metrics, figure="curve.png")
    _wandb(table, summary, metrics, out, run_dir, args)
    print(f"wrote {out / 'curve.json'}, {out / 'curve.png'}")
    return 0


def _wandb(table: dict, summary: dict, metrics: dict, out: Path, run_dir: Path, args) -> None:
    """The curve as a W&B run of the run directory's group: a step per labelled-task count, the plot, the table."""
    from align.config import RunConfig
    from align.tracking import Tracker

    tracker = Tracker(RunConfig(dir=str(run_dir if out.parent == run_dir else out), wandb=args.wandb),
                      "active_learning", out, summary["settings"])
    for n in args.at:
        row = {}
        for arm in args.arms:
            row[f"{arm}/accuracy"] = table[n][arm]["accuracy"]
            row[f"{arm}/ci_low"], row[f"{arm}/ci_high"] = table[n][arm]["ci"]
            if "delta" in table[n][arm]:
                row[f"{arm}/delta"] = table[n][arm]["delta"]
        tracker.log(row, step=n)
    if tracker.run is not None:
        import wandb

        tracker.run.log({"curve": wandb.Image(str(out / "curve.png"))})
    tracker.table("curve_table", ["tasks", *[f"{a}/{k}" for a in args.arms for k in ("accuracy", "low", "high")]],
                  [[n, *[v for a in args.arms for v in (table[n][a]["accuracy"], *table[n][a]["ci"])]]
                   for n in args.at])
    tracker.finish(metrics)


if __name__ == "__main__":
    sys.exit(main())
