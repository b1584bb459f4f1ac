"""`align sft` against a plain TRL SFTTrainer script: same model, data, LoRA, batch and steps.

    python benchmarks/sft.py                       # QLoRA on the embedded SmolLM2-135M, 12 steps
    python benchmarks/sft.py --quantize false --steps 20 --model /path/to/model

Each side runs in its own process (so peak RSS is its own), one after the other, and prints
tokens/s, peak memory, the ratio ours/TRL, and achieved GFLOP/s against this machine's measured
fp32 matmul peak. FLOPs are counted as 4·N·tokens for the frozen base (forward 2N + the
backward pass through activations 2N; no weight gradients for frozen weights), where N is the
number of base parameters; the LoRA weights add under 1 %.
"""

from __future__ import annotations

import argparse
import json
import os
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
    n_params,
    peak_memory_mib,
    sized_model,
    trl_device_args,
)


def run_ours(args, out: Path) -> dict:
    from alignment.cli import main as align
    from alignment.tracking import read_jsonl

    t = time.perf_counter()
    rc = align(["sft", "--config", str(REPO / "configs/quickstart/sft.yaml"), f"model.name={args.model}",
                f"model.quantize={str(args.quantize).lower()}", f"run.dir={out}", f"train.max_steps={args.steps}",
                f"train.batch_size={args.batch}", "data.eval_fraction=0", "run.wandb=disabled",
                f"model.max_length={args.max_length}", f"train.eval_steps={args.steps + 1}",
                "train.logging_steps=1", f"data.group_by_length={str(args.group_by_length).lower()}"])
    assert rc == 0
    rows = read_jsonl(out / "sft" / "metrics.jsonl")
    end = [r for r in rows if "train_runtime" in r][-1]
    tokens = max(r.get("num_tokens", 0) for r in rows)
    return {"train_runtime": end["train_runtime"], "tokens": tokens, "wall": time.perf_counter() - t}


def run_trl(args, out: Path) -> dict:
    """What a TRL user writes: SFTTrainer with a peft LoraConfig and a 4-bit base."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from alignment.data import load_sft_dataset
    from alignment.modeling import resolve_model_path

    path = resolve_model_path(args.model)
    kwargs = model_kwargs(args.quantize)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    dataset, _ = load_sft_dataset(REPO / "data/support/train.jsonl")
    config = SFTConfig(output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch,
                       learning_rate=3e-4, lr_scheduler_type="cosine", warmup_steps=0.05, logging_steps=1,
                       max_length=args.max_length, **trl_device_args(),
                       report_to=[], save_strategy="no", seed=42)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora)
    t = time.perf_counter()
    result = trainer.train()
    tokens = max(r.get("num_tokens", 0) for r in trainer.state.log_history)
    return {"train_runtime": result.metrics["train_runtime"], "tokens": tokens, "wall": time.perf_counter() - t}


def child(args) -> None:
    from alignment.cli import setup_environment

    setup_environment()
    with tempfile.TemporaryDirectory() as tmp:
        result = (run_ours if args.child == "ours" else run_trl)(args, Path(tmp))
    result["peak_mib"] = peak_memory_mib()
    print("RESULT " + json.dumps(result))



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--size", choices=sorted(SIZES), help="a stand-in model of this size built from config "
                        "(random weights, the embedded tokenizer; replaces --model)")
    parser.add_argument("--quantize", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--group-by-length", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                        help="ours only: batches of similar length, as the quickstart (default true)")
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
               "--steps", str(args.steps), "--batch", str(args.batch), "--max-length", str(args.max_length),
               "--group-by-length", str(args.group_by_length)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not line:
            sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
        results[side] = json.loads(line[-1][7:])

    peak = max(peak, matmul_peak_gflops())
    n = n_params(args.model)
    mode = "QLoRA (4-bit NF4 base)" if args.quantize else "LoRA (fp32 base)"
    grouped = "ours grouped by length" if args.group_by_length else "both shuffled"
    print(f"\nSFT · {args.model} · {mode} · batch {args.batch} · {args.steps} steps · max_length {args.max_length}"
          f" · {grouped}")
    print(f"{'':8}{'tokens/s':>10}{memory_label():>14}{'GFLOP/s':>10}{'% of peak':>11}")
    for side, r in results.items():
        tps = r["tokens"] / r["train_runtime"]
        gflops = 4 * n * tps / 1e9
        r["tokens_per_s"] = tps
        print(f"{side:8}{tps:>10.1f}{r['peak_mib']:>14.0f}{gflops:>10.1f}{100 * gflops / peak:>10.1f}%")
    ratio = results["ours"]["tokens_per_s"] / results["trl"]["tokens_per_s"]
    print(f"ratio ours/TRL tokens/s: {ratio:.2f}x   ({'bf16' if cuda() else 'fp32'} matmul peak measured now: {peak:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
