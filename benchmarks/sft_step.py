"""Where a QLoRA SFT step goes on CPU: the same 4 batches timed with each CPU speed-up on or off.

    python benchmarks/sft_step.py                       # every speed-up (what align sft does on CPU)
    python benchmarks/sft_step.py --off dropout head    # without CPUDropout and the labelled-only head
    python benchmarks/sft_step.py --off fp32            # the LoRA weights left in TRL's bf16
    python benchmarks/sft_step.py --group --profile     # batches grouped by length; torch.profiler table

Builds TRL's SFTTrainer on the embedded model and shipped data as `align sft` does (4-bit NF4
base, fp32 adapters, LoRA r=16 all-linear with dropout 0.05, batch 8, max_length 384), then times
`training_step` on batches 2-4 (batch 1 warms up). Prints tokens/s over those steps; with
--profile, torch.profiler's table for one step. The parts (align/cpu.py):
  fp32     the LoRA weights cast back to fp32 (keep_trainable_in; TRL casts them to bf16)
  dropout  CPUDropout for LoRA's dropout (a cheaper mask than torch's bernoulli_)
  head     TRL's fused LM head over labelled positions only (fused_head_on_labelled_positions)
  --group  data.group_by_length (transformers' LengthGroupedSampler)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--off", nargs="*", default=[], choices=["fp32", "dropout", "head"])
    parser.add_argument("--group", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--quantize", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    args = parser.parse_args()

    from align.cli import setup_environment

    setup_environment()
    import torch
    from trl import SFTTrainer

    from align.config import SFTStageConfig, load_config
    from align.cpu import fused_head_on_labelled_positions, keep_trainable_in, use_cpu_dropout
    from align.data import load_sft_dataset
    from align.modeling import device_plan, load_base_model, load_tokenizer, peft_lora_config
    from align.recipes.sft import sft_args

    cfg = load_config(SFTStageConfig, REPO / "configs/quickstart/sft.yaml", [
        f"model.quantize={str(args.quantize).lower()}", f"data.group_by_length={str(args.group).lower()}",
        "run.wandb=disabled", "data.eval_fraction=0"])
    plan = device_plan(cfg.model)
    dataset, _ = load_sft_dataset(REPO / cfg.data.path)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = SFTTrainer(model=load_base_model(cfg.model, plan), args=sft_args(cfg, plan, Path(tmp), False),
                             train_dataset=dataset, processing_class=load_tokenizer(cfg.model.name),
                             peft_config=peft_lora_config(cfg.lora))
    if "fp32" not in args.off:
        keep_trainable_in(trainer.model, torch.float32)
    if "dropout" not in args.off:
        use_cpu_dropout(trainer.model)
    if "head" not in args.off:
        fused_head_on_labelled_positions()

    batches = iter(trainer.get_train_dataloader())
    batches = [trainer._prepare_inputs(next(batches)) for _ in range(4)]
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    tokens = seconds = 0.0
    for i, batch in enumerate(batches):
        began = time.perf_counter()
        trainer.training_step(trainer.model, batch)
        took = time.perf_counter() - began
        real, padded = int(batch["attention_mask"].sum()), batch["input_ids"].numel()
        print(f"batch {i + 1}: {took:6.2f} s · {real} tokens ({padded} with padding)")
        if i:
            tokens, seconds = tokens + real, seconds + took
    on = [p for p in ("fp32", "dropout", "head") if p not in args.off] + (["group"] if args.group else [])
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in trainer.model.parameters() if p.requires_grad})
    print(f"speed-ups on: {', '.join(on) or 'none'} · LoRA weights in {', '.join(dtypes)} · "
          f"{tokens / seconds:.1f} tokens/s over batches 2-4")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.training_step(trainer.model, batches[1])
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
