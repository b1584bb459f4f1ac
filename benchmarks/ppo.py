"""Per-update time and tokens/s of `align ppo` on the embedded SmolLM2-135M (run by hand, not in tests).

    python benchmarks/ppo.py                                  # 4-bit base, 6 steps, 8 prompts, 48 tokens
    python benchmarks/ppo.py --steps 10 --sft runs/quickstart/sft --no-quantize

Runs the real stage through `alignment.cli.main` with a programmatic reward (the reply's length
in words, clipped: cheap to score, so the figures are PPO's own) and reads its metrics.jsonl:
the rollout (generation with the KV cache) and the update (old/ref/value forwards + ppo_epochs
of minibatch forward/backward) per step, response tokens per second, and peak RSS. Step 1 is
left out of the medians (it pays one-off costs). Without --sft a fresh LoRA stands in for the
SFT adapter (timings do not depend on its values; the reference is then the adapter-disabled
base, the same forward cost as a "ref" adapter).

Only our figures are printed: TRL removed its PPOTrainer in 1.13, and a comparison with TRL
1.12's experimental one would need a separate virtual environment, which this script does not
build.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def words(prompt: str, response: str) -> float:
    return min(len(response.split()), 40) / 10


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per rollout")
    parser.add_argument("--tokens", type=int, default=48, help="max new tokens")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--minibatch", type=int, default=4)
    parser.add_argument("--sft", default="none")
    parser.add_argument("--no-quantize", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))

    from alignment.cli import main as align
    from alignment.tracking import read_jsonl

    with tempfile.TemporaryDirectory(prefix="align-ppo-bench-") as tmp:
        started = time.perf_counter()
        code = align(["ppo", f"run.dir={tmp}", f"sft={args.sft}", "model.name=smollm2-135m", "scorer=__main__:words",
                      f"model.quantize={str(not args.no_quantize).lower()}", f"train.max_steps={args.steps}",
                      f"rl.rollout_prompts={args.prompts}", f"rl.minibatch_size={args.minibatch}",
                      f"rl.ppo_epochs={args.epochs}", f"generation.max_new_tokens={args.tokens}",
                      f"generation.batch_size={args.prompts}", "rl.save_steps=0", "run.wandb=disabled",
                      "train.lr=1e-5"])
        if code:
            return code
        total = time.perf_counter() - started
        rows = read_jsonl(Path(tmp) / "ppo" / "metrics.jsonl")
    timed = rows[1:] or rows

    def med(key: str) -> float:
        return statistics.median(r[key] for r in timed)

    step, rollout = med("time/step"), med("time/rollout")
    tokens = med("length/mean") * args.prompts
    print(f"\nalign ppo on smollm2-135m ({'unquantized' if args.no_quantize else '4-bit NF4'} base, fp32 compute), "
          f"{args.prompts} prompts x {args.tokens} new tokens, {args.epochs} PPO epochs of minibatch {args.minibatch}")
    print(f"  per step (median of steps 2-{len(rows)}): {step:.2f} s = rollout {rollout:.2f} s + "
          f"score/update {step - rollout:.2f} s")
    print(f"  response tokens per step: {tokens:.0f}; generated tokens/s {tokens / rollout:.1f}; "
          f"processed tokens/s (rollout + {args.epochs} epochs) {med('tokens_per_s'):.1f}")
    print(f"  whole stage {total:.1f} s (model load, {len(rows)} steps, save); peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print("  TRL: no comparison (PPOTrainer left TRL in 1.13; TRL 1.12 in its own venv is not built here)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
