"""`align dpo` against a plain TRL DPOTrainer script: same model, SFT adapter, pairs, batch and steps.

    python benchmarks/dpo.py                             # QLoRA on the embedded SmolLM2-135M, 12 steps
    python benchmarks/dpo.py --steps 20 --sft runs/quickstart/sft

Both sides put an SFT adapter on a 4-bit base and hand the PeftModel to DPOTrainer, which
keeps a frozen copy as the reference: the way TRL documents DPO on a pretrained adapter. Without
--sft, a freshly initialised LoRA adapter stands in (timings do not depend on its values). The
pairs come from the shipped SFT data (the answer against a rude rewrite of it). Both skip
evaluation. Each side runs in its own process and prints tokens/s, peak RSS, ours/TRL, and
achieved GFLOP/s against this machine's measured fp32 matmul peak. FLOPs are 6·N·tokens: the
policy's forward (2N) and backward through the activations (2N, frozen base) plus the
reference's forward (2N), N being the base's parameters (the tied embedding counted once, as
the LM head); tokens are the chosen and rejected sequences'.
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
    n_params,
    peak_memory_mib,
    sized_model,
    trl_device_args,
)

OPENER = re.compile(r"^(Sorry[^.!]*[.!]\s*|Thanks[^.!]*[.!]\s*|Happy to help[^.!]*[.!]\s*)", re.I)
FLOPS_PER_PARAM = 6  # per token: policy forward 2N + backward through activations 2N + reference forward 2N




def write_pairs(path: Path) -> Path:
    rows = []
    for line in (REPO / "data/support/train.jsonl").read_text().splitlines():
        r = json.loads(line)
        rude = "Ugh, this again. " + OPENER.sub("", r["output"]) + " Read the docs next time."
        rows.append({"prompt": r["instruction"], "chosen": r["output"], "rejected": rude})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def fresh_adapter(model_name: str, folder: Path) -> Path:
    """An untrained LoRA (r=16, all-linear) saved as an adapter folder, standing in for SFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignment.modeling import resolve_model_path

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(model_name))
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    get_peft_model(base, lora).save_pretrained(str(folder))
    # An align SFT folder carries its tokenizer (align dpo reads the chat template from it).
    AutoTokenizer.from_pretrained(resolve_model_path(model_name)).save_pretrained(str(folder))
    return folder


def run_ours(args, out: Path, data: Path, sft: Path) -> dict:
    from alignment.cli import main as align
    from alignment.tracking import read_jsonl

    t = time.perf_counter()
    rc = align(["dpo", "--config", str(REPO / "configs/quickstart/dpo.yaml"), f"sft={sft}",
                f"model.quantize={str(args.quantize).lower()}", f"run.dir={out}", f"data.path={data}",
                "data.test_fraction=0", f"train.max_steps={args.steps}", f"train.batch_size={args.batch}",
                f"model.max_length={args.max_length}", "run.wandb=disabled", f"train.eval_steps={args.steps + 1}",
                "train.logging_steps=1"])
    assert rc == 0
    rows = read_jsonl(out / "dpo" / "metrics.jsonl")
    end = [r for r in rows if "train_runtime" in r][-1]
    tokens = max(r.get("num_tokens", 0) for r in rows)
    return {"train_runtime": end["train_runtime"], "tokens": tokens, "wall": time.perf_counter() - t}


def run_trl(args, out: Path, data: Path, sft: Path) -> dict:
    """What a TRL user writes: a 4-bit base, the SFT adapter on it (trainable), DPOTrainer."""
    from datasets import load_dataset
    from peft import PeftModel, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from alignment.modeling import adapter_base_name, resolve_model_path

    path = resolve_model_path(adapter_base_name(sft))
    kwargs = model_kwargs(args.quantize)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if args.quantize:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = PeftModel.from_pretrained(model, str(sft), is_trainable=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    dataset = load_dataset("json", data_files=str(data), split="train")
    config = DPOConfig(output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch,
                       learning_rate=5e-5, lr_scheduler_type="cosine", warmup_steps=0.1, logging_steps=1,
                       max_length=args.max_length, beta=0.1, **trl_device_args(),
                       report_to=[], save_strategy="no", seed=42)
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    t = time.perf_counter()
    result = trainer.train()
    tokens = max(r.get("num_tokens", 0) for r in trainer.state.log_history)
    return {"train_runtime": result.metrics["train_runtime"], "tokens": tokens, "wall": time.perf_counter() - t}


def child(args) -> None:
    from alignment.cli import setup_environment

    setup_environment()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_pairs(Path(tmp) / "pairs.jsonl")
        sft = Path(args.sft) if args.sft else fresh_adapter(args.model, Path(tmp) / "sft")
        result = (run_ours if args.child == "ours" else run_trl)(args, Path(tmp) / "out", data, sft)
    result["peak_mib"] = peak_memory_mib()
    print("RESULT " + json.dumps(result))


def _base_of(sft: str) -> str:
    from alignment.modeling import adapter_base_name

    return adapter_base_name(sft)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="the base for the stand-in adapter (without --sft)")
    parser.add_argument("--size", choices=sorted(SIZES), help="a stand-in model of this size built from config "
                        "(random weights, the embedded tokenizer; replaces --model)")
    parser.add_argument("--sft", help="an SFT adapter folder (default: a fresh LoRA on --model)")
    parser.add_argument("--quantize", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
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
        if args.sft:
            cmd += ["--sft", args.sft]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not line:
            sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
        results[side] = json.loads(line[-1][7:])

    peak = max(peak, matmul_peak_gflops())
    n = n_params(args.model if not args.sft else _base_of(args.sft))
    mode = "QLoRA (4-bit NF4 base)" if args.quantize else "LoRA (fp32 base)"
    print(f"\nDPO · {args.sft or args.model} · {mode} · batch {args.batch} pairs · {args.steps} steps · "
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
