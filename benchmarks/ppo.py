"""Per-update time and tokens/s of `align ppo` on the embedded SmolLM2-135M (run by hand, not in tests).

    python benchmarks/ppo.py                                  # 4-bit base, 6 steps, 8 prompts, 48 tokens
    python benchmarks/ppo.py --steps 10 --sft runs/quickstart/sft --no-quantize
    pip install --no-deps --target /tmp/trl112 trl==1.12.0    # once: TRL 1.12 beside the venv's TRL
    python benchmarks/ppo.py --trl112 /tmp/trl112 --sft runs/quickstart/sft --reward runs/quickstart/reward

Runs the real stage through `align.cli.main` and reads its metrics.jsonl: the rollout
(generation with the KV cache) and the update (old/ref/value forwards + ppo_epochs of minibatch
forward/backward) per step, response tokens per second, and peak RSS. Step 1 is left out of the
medians (it pays one-off costs). The reward is `--reward` (an `align reward` folder) or else a
programmatic one (the reply's length in words, clipped: cheap, so the figures are PPO's own).
Without --sft a fresh LoRA stands in for the SFT adapter (timings do not depend on its values;
the reference is then the adapter-disabled base, the same forward cost as a "ref" adapter).

`--trl112 DIR` then runs TRL 1.12's experimental PPOTrainer (removed from TRL in 1.13) on the
same work in its own process (benchmarks/ppo_trl112.py, DIR first on PYTHONPATH) and prints the
ratio of seconds per update. Both sides then use an unquantized base in the compute dtype (fp32 on
CPU): ppo_trl112.py loads TRL's policy, value and reward models unquantized (its value model trains
every weight, which a 4-bit model cannot), so ours runs the same base. TRL 1.12's PPOTrainer casts
nothing on CPU: `peft_module_casting_to_bf16` runs only for a peft_config it wraps itself, with
args.bf16 and a 4-bit model (trl/experimental/ppo/ppo_trainer.py, 1.12.0, lines 431-433), and it
casts norms to fp32 and the embedding and LM head to bf16, not the LoRA weights. TRL's side is its
design: a full value model and a reward model beside the policy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from _common import cuda, device_name, memory_label, peak_memory_mib  # noqa: E402  (benchmarks/, this folder)


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
    parser.add_argument("--reward", help="an `align reward` folder (default: a programmatic reward)")
    parser.add_argument("--trl112", metavar="DIR", help="TRL 1.12 installed with pip --target DIR: compare")
    parser.add_argument("--json", help="append the figures to this file as one JSON line")
    args = parser.parse_args()
    if args.trl112:
        args.no_quantize = True  # the same work on both sides (see above)
    sys.path.insert(0, str(REPO))

    from align.cli import main as align
    from align.tracking import read_jsonl

    with tempfile.TemporaryDirectory(prefix="align-ppo-bench-") as tmp:
        started = time.perf_counter()
        reward = ([f"reward_model={args.reward}", "min_reward_accuracy=0", "max_probe_flip_rate=1"] if args.reward
                  else ["scorer=__main__:words"])
        code = align(["ppo", f"run.dir={tmp}", f"sft={args.sft}", "model.name=smollm2-135m", *reward,
                      f"model.quantize={str(not args.no_quantize).lower()}", f"train.max_steps={args.steps}",
                      f"rl.rollout_prompts={args.prompts}", f"rl.minibatch_size={args.minibatch}",
                      f"rl.ppo_epochs={args.epochs}", f"generation.max_new_tokens={args.tokens}",
                      f"generation.batch_size={args.prompts}", "generation.top_p=1.0", "rl.save_steps=0",
                      # TRL's side (ppo_trl112.py): temperature 0.8 on the held-out prompts
                      "generation.temperature=0.8", f"prompts={REPO / 'data/support/prompts.jsonl'}",
                      "run.wandb=disabled", "train.lr=1e-5"])
        if code:
            return code
        total = time.perf_counter() - started
        rows = read_jsonl(Path(tmp) / "ppo" / "metrics.jsonl")
    timed = rows[1:] or rows

    def med(key: str) -> float:
        return statistics.median(r[key] for r in timed)

    step, rollout, scoring = med("time/step"), med("time/rollout"), med("time/score")
    tokens = med("length/mean") * args.prompts
    print(f"\nalign ppo on smollm2-135m ({'unquantized' if args.no_quantize else '4-bit NF4'} base, {'bf16' if cuda() else 'fp32'} compute), "
          f"{args.prompts} prompts x {args.tokens} new tokens, {args.epochs} PPO epochs of minibatch {args.minibatch}")
    print(f"  per step (median of steps 2-{len(rows)}): {step:.2f} s = generation {rollout:.2f} s + "
          f"scoring {scoring:.2f} s + update {step - rollout - scoring:.2f} s; mean response "
          f"{med('length/mean'):.1f} tokens")
    print(f"  response tokens per step: {tokens:.0f}; generated tokens/s {tokens / rollout:.1f}; "
          f"processed tokens/s (rollout + {args.epochs} epochs) {med('tokens_per_s'):.1f}")
    print(f"  whole stage {total:.1f} s (model load, {len(rows)} steps, save); {memory_label()} "
          f"{peak_memory_mib():.0f}")
    ours = {"s_per_step": step, "rollout_s": rollout, "score_s": scoring, "tokens_per_s": med("tokens_per_s"),
            "peak_mib": peak_memory_mib()}
    record = {"bench": "ppo", "step": os.environ.get("GPU_CHECK_STEP"), "title": f"PPO · smollm2-135m · {args.prompts} prompts x {args.tokens} tokens · "
              f"{args.epochs} epochs · reward {'model ' + Path(args.reward).name if args.reward else 'programmatic'}",
              "device": device_name(), "reward_model": bool(args.reward), "sides": {"ours": ours}}
    if not args.trl112:
        print("  TRL: no comparison (PPOTrainer left TRL in 1.13; pass --trl112 DIR to run TRL 1.12's)")
        write_json(args.json, record)
        return 0
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": os.pathsep.join([args.trl112, str(REPO)])}
    cmd = [sys.executable, str(REPO / "benchmarks/ppo_trl112.py"), f"--steps={args.steps}",
           f"--prompts={args.prompts}", f"--tokens={args.tokens}", f"--epochs={args.epochs}",
           f"--minibatch={args.minibatch}", f"--sft={args.sft}"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        print(out.stderr[-3000:], file=sys.stderr)
        return out.returncode
    trl = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"TRL {trl['trl']} PPOTrainer, same work: {trl['step_s']:.2f} s per step (median of steps 2-{trl['steps']}; "
          f"step 1 {trl['first_step_s']:.1f} s), {memory_label()} {trl['peak_rss_mib']:.0f}")
    print(f"  ours/TRL speed per update: {trl['step_s'] / step:.2f}x"
          + ("" if args.reward else "  (ours scores with a programmatic reward, TRL with a reward model forward)"))
    record["sides"]["trl"] = {"s_per_step": trl["step_s"], "peak_mib": trl["peak_rss_mib"]}
    record.update(ratio=trl["step_s"] / step, memory_ratio=ours["peak_mib"] / trl["peak_rss_mib"])
    write_json(args.json, record)
    return 0


def write_json(path: str | None, record: dict) -> None:
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    sys.exit(main())
