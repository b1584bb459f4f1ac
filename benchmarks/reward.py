"""`align reward` against a plain TRL RewardTrainer script: same model, pairs, LoRA, batch and steps.

    python benchmarks/reward.py                          # QLoRA on the embedded SmolLM2-135M, 12 steps
    python benchmarks/reward.py --steps 20 --quantize false --model /path/to/model

The pairs are made from the shipped SFT data as K=3 rankings (the answer > its first two
sentences > a rude rewrite), 3 pairs per prompt; the default batch of 6 holds two whole
rankings, so our ranking-grouped batches and TRL's shuffled ones hold the same number of pairs.
Both sides start from the base (from_sft=false) and skip evaluation, so only training is timed.
Each side runs in its own process (peak RSS is its own) and prints tokens/s, peak memory, the
ratio ours/TRL, and achieved GFLOP/s against this machine's measured fp32 matmul peak. FLOPs are
4·N·tokens (forward 2N + backward through the activations 2N, frozen base), N being the
classifier's parameters less the embedding (a lookup: a reward model has no LM head).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import (  # noqa: E402  (benchmarks/, the script's own folder)
    SIZES,
    cuda,
    matmul_peak_gflops,
    memory_label,
    model_kwargs,
    peak_memory_mib,
    sized_model,
    trl_device_args,
)

OPENER = re.compile(r"^(Sorry[^.!]*[.!]\s*|Thanks[^.!]*[.!]\s*|Happy to help[^.!]*[.!]\s*)", re.I)
FLOPS_PER_PARAM = 4  # per token: forward 2N, backward through the activations 2N



def matmul_params(model_name: str) -> int:
    """Parameters that do a matmul per token in the reward model: all but the input embedding."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from alignment.modeling import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(model_name), num_labels=1)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()


def write_pairs(path: Path) -> Path:
    """K=3 rankings per prompt from data/support/train.jsonl, as a pairs JSONL with task ids."""
    rows = []
    for i, line in enumerate((REPO / "data/support/train.jsonl").read_text().splitlines()):
        r = json.loads(line)
        best = r["output"]
        sentences = re.split(r"(?<=[.!?])\s+", best)
        short = " ".join(sentences[:2]) if len(sentences) > 2 else best[: max(20, len(best) // 2)]
        rude = "Ugh, this again. " + OPENER.sub("", best) + " Read the docs next time."
        ranking = [best, short, rude] if short != best else [best, rude]
        for a in range(len(ranking)):
            for b in range(a + 1, len(ranking)):
                rows.append({"prompt": r["instruction"], "chosen": ranking[a], "rejected": ranking[b],
                             "task_id": f"task-{i}", "margin": b - a})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def run_ours(args, out: Path, data: Path) -> dict:
    from alignment.cli import main as align
    from alignment.tracking import read_jsonl

    t = time.perf_counter()
    rc = align(["reward", "--config", str(REPO / "configs/quickstart/reward.yaml"), f"model.name={args.model}",
                "from_sft=false", f"model.quantize={str(args.quantize).lower()}", f"run.dir={out}",
                f"data.path={data}", "data.test_fraction=0", f"train.max_steps={args.steps}",
                f"train.batch_size={args.batch}", f"model.max_length={args.max_length}", "run.wandb=disabled",
                f"train.eval_steps={args.steps + 1}", "train.logging_steps=1"])
    assert rc == 0
    rows = read_jsonl(out / "reward" / "metrics.jsonl")
    end = [r for r in rows if "train_runtime" in r][-1]
    tokens = max(r.get("num_tokens", 0) for r in rows)
    return {"train_runtime": end["train_runtime"], "tokens": tokens, "wall": time.perf_counter() - t}


def run_trl(args, out: Path, data: Path) -> dict:
    """What a TRL user writes: RewardTrainer on a 4-bit classifier with a LoRA that saves `score`."""
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from alignment.modeling import resolve_model_path

    path = resolve_model_path(args.model)
    kwargs = model_kwargs(args.quantize, num_labels=1)
    model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    dataset = load_dataset("json", data_files=str(data), split="train").remove_columns(["margin", "task_id"])
    config = RewardConfig(output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch,
                          learning_rate=1e-4, lr_scheduler_type="cosine", warmup_steps=0.05, logging_steps=1,
                          max_length=args.max_length, **trl_device_args(),
                          report_to=[], save_strategy="no", seed=42)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="SEQ_CLS",
                      modules_to_save=["score"])
    trainer = RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                            peft_config=lora)
    # TRL casts a 4-bit model's trainable weights to bf16 (its GPU recipe); with fp32 compute on CPU
    # the score head then fails (float != BFloat16), so a TRL user on CPU must cast them back.
    for param in trainer.model.parameters():
        if param.requires_grad and not cuda():
            param.data = param.data.float()
    t = time.perf_counter()
    result = trainer.train()
    tokens = max(r.get("num_tokens", 0) for r in trainer.state.log_history)
    return {"train_runtime": result.metrics["train_runtime"], "tokens": tokens, "wall": time.perf_counter() - t}


def child(args) -> None:
    from alignment.cli import setup_environment

    setup_environment()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_pairs(Path(tmp) / "pairs.jsonl")
        result = (run_ours if args.child == "ours" else run_trl)(args, Path(tmp) / "out", data)
    result["peak_mib"] = peak_memory_mib()
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--size", choices=sorted(SIZES), help="a stand-in model of this size built from config "
                        "(random weights, the embedded tokenizer; replaces --model)")
    parser.add_argument("--quantize", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.size:
        args.model = sized_model(args.size)

    # The peak is the best of a measurement before and after: on a shared machine one alone can be low.
    peak = matmul_peak_gflops()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)}
    results = {}
    for side in ("trl", "ours"):
        cmd = [sys.executable, __file__, "--child", side, "--model", args.model, "--quantize", str(args.quantize),
               "--steps", str(args.steps), "--batch", str(args.batch), "--max-length", str(args.max_length)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not line:
            sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
        results[side] = json.loads(line[-1][7:])

    peak = max(peak, matmul_peak_gflops())
    n = matmul_params(args.model)
    mode = "QLoRA (4-bit NF4 base)" if args.quantize else "LoRA (fp32 base)"
    print(f"\nreward · {args.model} · {mode} · batch {args.batch} pairs · {args.steps} steps · "
          f"max_length {args.max_length}")
    print(f"{'':8}{'tokens/s':>10}{'s/step':>9}{memory_label():>14}{'GFLOP/s':>10}{'% of peak':>11}")
    for side, r in results.items():
        r["tokens_per_s"] = r["tokens"] / r["train_runtime"]
        gflops = FLOPS_PER_PARAM * n * r["tokens_per_s"] / 1e9
        print(f"{side:8}{r['tokens_per_s']:>10.1f}{r['train_runtime'] / args.steps:>9.2f}{r['peak_mib']:>14.0f}"
              f"{gflops:>10.1f}{100 * gflops / peak:>10.1f}%")
    ratio = results["ours"]["tokens_per_s"] / results["trl"]["tokens_per_s"]
    print(f"ratio ours/TRL tokens/s: {ratio:.2f}x   ({'bf16' if cuda() else 'fp32'} matmul peak measured now: {peak:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
