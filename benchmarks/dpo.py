"""`align dpo` against a plain TRL DPOTrainer script: same model, SFT adapter, pairs, batch and steps.

    python benchmarks/dpo.py                             # QLoRA on the embedded SmolLM2-135M, 12 steps
    python benchmarks/dpo.py --size 1.5b --batch 6 --steps 8         # on a GPU: the 1.5b stand-in
    python benchmarks/dpo.py --steps 20 --sft runs/quickstart/sft

Both sides put an SFT adapter on a 4-bit base and hand the PeftModel to DPOTrainer, which
keeps a frozen copy as the reference: the way TRL documents DPO on a pretrained adapter. Without
--sft, a freshly initialised LoRA adapter stands in (timings do not depend on its values), made
once for both sides. The pairs come from the shipped SFT data, read by both sides through align's
loader (the same conversations): by default as K=3 rankings (the answer > its first two sentences >
a rude rewrite; 3 pairs per prompt, as benchmarks/reward.py), which our side batches by ranking
(the quickstart's `group_by_ranking`, each distinct response run once) and TRL shuffles; the
default batch of 6 holds two whole rankings, so both sides train on 6 pairs a step. `--pairs
single` gives one pair per prompt (the answer against the rude rewrite), where there is nothing to
share and both sides see the same batches. Both skip evaluation. Each side runs in its own process and prints tokens/s
(non-pad tokens over steps 2..N: benchmarks/_common.py), peak memory, ours/TRL, and achieved
GFLOP/s against this machine's measured matmul peak. FLOPs are 6·N·tokens: the policy's forward
(2N) and backward through the activations (2N, frozen base) plus the reference's forward (2N), N
being the base's parameters (the tied embedding counted once, as the LM head); tokens are the
chosen and rejected sequences'. `--ours KEY=VALUE` passes align overrides to our side only.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import (  # noqa: E402  (benchmarks/, the script's own folder)
    StepClock,
    child_result,
    compare_sides,
    compute_dtype,
    cuda,
    fp32_adapters_on_cpu,
    model_kwargs,
    n_params,
    parse_or_run_child,
    release,
    report,
    settings,
    side_by_side_parser,
    trl_device_args,
    work_share,
)

OPENER = re.compile(r"^(Sorry[^.!]*[.!]\s*|Thanks[^.!]*[.!]\s*|Happy to help[^.!]*[.!]\s*)", re.I)
FLOPS_PER_PARAM = 6  # per token: policy forward 2N + backward through activations 2N + reference forward 2N




def write_pairs(path: Path, kind: str = "ranking") -> Path:
    if kind == "ranking":
        from reward import write_pairs as ranking_pairs  # benchmarks/reward.py: K=3 rankings with task ids

        return ranking_pairs(path)
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

    from align.modeling import resolve_model_path

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(model_name), dtype=compute_dtype(),
                                                device_map={"": 0} if cuda() else None)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    get_peft_model(base, lora).save_pretrained(str(folder))
    # An align SFT folder carries its tokenizer (align dpo reads the chat template from it).
    AutoTokenizer.from_pretrained(resolve_model_path(model_name)).save_pretrained(str(folder))
    del base
    release()
    return folder


def run_ours(args, out: Path, data: Path, sft: Path, clock: StepClock) -> dict:
    from align.cli import main as align

    clock.watch_align()
    rc = align(["dpo", "--config", str(REPO / "configs/quickstart/dpo.yaml"), f"sft={sft}",
                f"model.quantize={str(args.quantize).lower()}", f"run.dir={out}", f"data.path={data}",
                "data.test_fraction=0", f"train.max_steps={args.steps}", f"train.batch_size={args.batch}",
                f"model.max_length={args.max_length}", "run.wandb=disabled", f"train.eval_steps={args.steps + 1}",
                "train.logging_steps=1", *args.ours])
    assert rc == 0, f"align dpo exited {rc}"
    return work_share(out / "dpo")


def run_trl(args, out: Path, data: Path, sft: Path, clock: StepClock) -> None:
    """What a TRL user writes: a 4-bit base, the SFT adapter on it (trainable), DPOTrainer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from align.modeling import adapter_base_name, resolve_model_path
    from align.preferences import load_preferences

    path = resolve_model_path(adapter_base_name(sft))
    model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs(args.quantize))
    model = PeftModel.from_pretrained(model, str(sft), is_trainable=True)
    tokenizer = AutoTokenizer.from_pretrained(str(sft))
    # The same pairs, in the same chat format and order, as ours reads them.
    dataset = load_preferences(data, test_fraction=0, seed=42)[0]["train"].remove_columns(["task_id"])
    config = DPOConfig(output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch,
                       learning_rate=5e-5, lr_scheduler_type="cosine", warmup_steps=0.1, logging_steps=1,
                       max_length=args.max_length, beta=0.1, **trl_device_args(),
                       report_to=[], save_strategy="no", seed=42)
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[clock.callback()])
    fp32_adapters_on_cpu(trainer.model)  # TRL cast the 4-bit model's LoRA weights to bf16; ours trains fp32 on CPU
    trainer.train()


def child(args) -> None:
    from align.cli import setup_environment

    setup_environment()
    clock = StepClock()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_pairs(Path(tmp) / "pairs.jsonl", args.pairs)
        extra = (run_ours if args.child == "ours" else run_trl)(args, Path(tmp) / "out", data, Path(args.sft), clock)
    child_result({**clock.figures(), **(extra or {})})


def check(parser, args) -> None:
    """What would not compare like with like, refused before a stand-in is built."""
    if args.pairs == "ranking" and args.batch % 3:  # ours takes whole rankings a step, TRL args.batch pairs
        parser.error(f"--batch {args.batch}: our side batches whole K=3 rankings ({args.batch // 3 * 3} pairs a step) "
                     f"and TRL's {args.batch}: give a multiple of 3, or --pairs single")
    if args.sft and args.size:  # both sides train on the adapter's base, whatever --size says
        parser.error(f"--size {args.size} with --sft {args.sft}: both sides train on the base the adapter was made on "
                     "(its adapter_config.json), not on a stand-in; drop --size (or --sft: a fresh adapter on the "
                     "stand-in)")
    elif args.sft and args.model != parser.get_default("model"):
        parser.error(f"--model {args.model} with --sft {args.sft}: both sides train on the base the adapter was made "
                     "on (its adapter_config.json); drop --model (or --sft: a fresh adapter on --model)")


def main() -> None:
    parser = side_by_side_parser(__doc__, batch=6, batch_help="pairs a step (6: two K=3 rankings)",
                                 model_help="the base for the stand-in adapter (without --sft)")
    parser.add_argument("--sft", help="an SFT adapter folder (default: a fresh LoRA on --model)")
    parser.add_argument("--pairs", choices=["ranking", "single"], default="ranking",
                        help="K=3 rankings per prompt (3 pairs sharing responses) or one pair per prompt")
    if not (args := parse_or_run_child(parser, child, check)):
        return

    from align.modeling import adapter_base_name

    with tempfile.TemporaryDirectory(prefix="align-dpo-bench-") as tmp:
        sft = args.sft or str(fresh_adapter(args.model, Path(tmp) / "sft"))
        results, peak = compare_sides(__file__, args, "--sft", sft, "--pairs", args.pairs)
    base = adapter_base_name(args.sft) if args.sft else args.model  # what both sides trained on
    name = args.size or Path(base).name
    title = (f"DPO · {name}{f' + adapter {args.sft}' if args.sft else ''} · batch {args.batch} pairs ({args.pairs}) · "
             f"{args.steps} steps · max_length {args.max_length} · {settings(args)}")
    n = n_params(base)
    report("dpo", title, results, FLOPS_PER_PARAM * n, peak, args.json,
           {"model": name, "quantize": args.quantize, "batch": args.batch, "pairs": args.pairs,
            "ours_overrides": args.ours})


if __name__ == "__main__":
    main()
