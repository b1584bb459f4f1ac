"""`align sft` against a plain TRL SFTTrainer script: same model, data, LoRA, batch and steps.

    python benchmarks/sft.py                       # QLoRA on the embedded SmolLM2-135M, 12 steps
    python benchmarks/sft.py --size 1.5b --batch 64 --steps 8        # on a GPU: the 1.5b stand-in
    python benchmarks/sft.py --quantize false --steps 20 --model /path/to/model

Each side runs in its own process (so peak memory is its own), one after the other, and prints
tokens/s (non-pad tokens over steps 2..N, timed alike: benchmarks/_common.py), peak memory, the
ratio ours/TRL, and achieved GFLOP/s against this machine's measured matmul peak. FLOPs are
counted as 4·N per token for the frozen base (forward 2N + the backward pass through
activations 2N; no weight gradients for frozen weights; a checkpointed forward's recompute is
not counted: it is overhead, not work), where N is the base's parameters; LoRA adds under 1 %.

Ours runs as `align sft` decides (its `auto` levers: checkpointing only when memory needs it,
Liger where installed). `--group-by-length` (default true, as the quickstart) applies to both
sides: TRL's gets `train_sampling_strategy="group_by_length"`, the same sampler and seed, so both
train the same batches (each prints its tokens a step). Grouped on one side only, a short run
compared different work: transformers sorts mega-batches of min(n / (4 · batch), 50) batches
longest first, and 2 steps gave ours 1479 tokens a step against TRL's random 1041. Grouping's own
gain is two runs apart (`--group-by-length true` against `false`, per side) or benchmarks/sft_step.py
--group. `--ours KEY=VALUE` passes any align override to our side only (e.g. `--ours
model.gradient_checkpointing=on` for the same memory as TRL).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import (  # noqa: E402  (benchmarks/, the script's own folder)
    BOOL,
    StepClock,
    child_result,
    compare_sides,
    fp32_adapters_on_cpu,
    model_kwargs,
    n_params,
    parse_or_run_child,
    report,
    settings,
    side_by_side_parser,
    trl_device_args,
)


def run_ours(args, out: Path, clock: StepClock) -> None:
    from align.cli import main as align

    clock.watch_align()
    rc = align(["sft", "--config", str(REPO / "configs/quickstart/sft.yaml"), f"model.name={args.model}",
                f"model.quantize={str(args.quantize).lower()}", f"run.dir={out}", f"train.max_steps={args.steps}",
                f"train.batch_size={args.batch}", "data.eval_fraction=0", "run.wandb=disabled",
                f"model.max_length={args.max_length}", f"train.eval_steps={args.steps + 1}",
                "train.logging_steps=1", f"data.group_by_length={str(args.group_by_length).lower()}", *args.ours])
    assert rc == 0, f"align sft exited {rc}"


def run_trl(args, out: Path, clock: StepClock) -> None:
    """What a TRL user writes: SFTTrainer with a peft LoraConfig and a 4-bit base."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from align.data import load_sft_dataset
    from align.modeling import resolve_model_path

    path = resolve_model_path(args.model)
    model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs(args.quantize))
    tokenizer = AutoTokenizer.from_pretrained(path)
    dataset, _ = load_sft_dataset(REPO / "data/support/train.jsonl")
    config = SFTConfig(output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch,
                       learning_rate=3e-4, lr_scheduler_type="cosine", warmup_steps=0.05, logging_steps=1,
                       max_length=args.max_length, **trl_device_args(),
                       train_sampling_strategy="group_by_length" if args.group_by_length else "random",
                       report_to=[], save_strategy="no", seed=42)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora, callbacks=[clock.callback()])
    fp32_adapters_on_cpu(trainer.model)  # TRL cast the 4-bit model's LoRA weights to bf16; ours trains fp32 on CPU
    trainer.train()


def child(args) -> None:
    from align.cli import setup_environment

    setup_environment()
    clock = StepClock()
    with tempfile.TemporaryDirectory() as tmp:
        (run_ours if args.child == "ours" else run_trl)(args, Path(tmp), clock)
    child_result(clock.figures())


def main() -> None:
    parser = side_by_side_parser(__doc__, batch=8)
    parser.add_argument("--group-by-length", default=True, **BOOL,
                        help="both sides: batches of similar length, as the quickstart (default true)")
    if not (args := parse_or_run_child(parser, child)):
        return
    results, peak = compare_sides(__file__, args, "--model", args.model, "--group-by-length", str(args.group_by_length))
    grouped = "both grouped by length" if args.group_by_length else "both shuffled"
    name = args.size or Path(args.model).name
    title = (f"SFT · {name} · batch {args.batch} · {args.steps} steps · max_length {args.max_length} · {grouped} · "
             f"{settings(args)}")
    report("sft", title, results, 4 * n_params(args.model), peak, args.json,
           {"model": name, "quantize": args.quantize, "batch": args.batch, "ours_overrides": args.ours})

if __name__ == "__main__":
    main()
