"""`align reward` against a plain TRL RewardTrainer script: same model, pairs, LoRA, batch and steps.

    python benchmarks/reward.py                          # QLoRA on the embedded SmolLM2-135M, 12 steps
    python benchmarks/reward.py --size 1.5b --batch 30 --steps 8     # on a GPU: the 1.5b stand-in
    python benchmarks/reward.py --steps 20 --quantize false --model /path/to/model

The pairs are made from the shipped SFT data as K=3 rankings (the answer > its first two
sentences > a rude rewrite), 3 pairs per prompt; the default batch of 6 holds two whole
rankings, so our ranking-grouped batches and TRL's shuffled ones hold the same number of pairs.
Both sides read the pairs through align's loader (the same chat-formatted conversations, so the
same tokens), start from the base (from_sft=false) and skip evaluation, so only training is
timed. Each side runs in its own process and prints tokens/s (non-pad tokens over steps 2..N:
benchmarks/_common.py), peak memory, the ratio ours/TRL, and achieved GFLOP/s against this
machine's measured matmul peak. FLOPs are 4·N·tokens (forward 2N + backward through the
activations 2N, frozen base), N being the classifier's parameters less the embedding (a lookup:
a reward model has no LM head). `--ours KEY=VALUE` passes align overrides to our side only.
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
    fp32_adapters_on_cpu,
    model_kwargs,
    parse_or_run_child,
    report,
    settings,
    side_by_side_parser,
    trl_device_args,
    work_share,
)

OPENER = re.compile(r"^(Sorry[^.!]*[.!]\s*|Thanks[^.!]*[.!]\s*|Happy to help[^.!]*[.!]\s*)", re.I)
FLOPS_PER_PARAM = 4  # per token: forward 2N, backward through the activations 2N



def matmul_params(model_name: str) -> int:
    """Parameters that do a matmul per token in the reward model: all but the input embedding."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from align.modeling import resolve_model_path

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


def run_ours(args, out: Path, data: Path, clock: StepClock) -> dict:
    from align.cli import main as align

    clock.watch_align()
    rc = align(["reward", "--config", str(REPO / "configs/quickstart/reward.yaml"), f"model.name={args.model}",
                "from_sft=false", f"model.quantize={str(args.quantize).lower()}", f"run.dir={out}",
                f"data.path={data}", "data.test_fraction=0", f"train.max_steps={args.steps}",
                f"train.batch_size={args.batch}", f"model.max_length={args.max_length}", "run.wandb=disabled",
                f"train.eval_steps={args.steps + 1}", "train.logging_steps=1", *args.ours])
    assert rc == 0, f"align reward exited {rc}"
    return work_share(out / "reward")


def run_trl(args, out: Path, data: Path, clock: StepClock) -> None:
    """What a TRL user writes: RewardTrainer on a 4-bit classifier with a LoRA that saves `score`."""
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from align.modeling import resolve_model_path
    from align.preferences import load_preferences

    path = resolve_model_path(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(path, **model_kwargs(args.quantize, num_labels=1))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.config.pad_token_id = tokenizer.pad_token_id
    # The same pairs, in the same chat format, as ours reads them.
    dataset = load_preferences(data, test_fraction=0, seed=42)[0]["train"].remove_columns(["task_id"])
    config = RewardConfig(output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch,
                          learning_rate=1e-4, lr_scheduler_type="cosine", warmup_steps=0.05, logging_steps=1,
                          max_length=args.max_length, **trl_device_args(),
                          report_to=[], save_strategy="no", seed=42)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="SEQ_CLS",
                      modules_to_save=["score"])
    trainer = RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                            peft_config=lora, callbacks=[clock.callback()])
    # TRL casts a 4-bit model's trainable weights to bf16 (its GPU recipe); with fp32 compute on CPU
    # the score head then fails (float != BFloat16), so a TRL user on CPU must cast them back.
    fp32_adapters_on_cpu(trainer.model)
    trainer.train()


def child(args) -> None:
    from align.cli import setup_environment

    setup_environment()
    clock = StepClock()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_pairs(Path(tmp) / "pairs.jsonl")
        extra = (run_ours if args.child == "ours" else run_trl)(args, Path(tmp) / "out", data, clock)
    child_result({**clock.figures(), **(extra or {})})


def check(parser, args) -> None:
    """Refused before a stand-in is built."""
    if args.batch % 3:  # ours takes whole rankings a step, TRL args.batch pairs
        parser.error(f"--batch {args.batch}: our side batches whole K=3 rankings ({args.batch // 3 * 3} pairs a step) "
                     f"and TRL's {args.batch}: give a multiple of 3")


def main() -> None:
    parser = side_by_side_parser(__doc__, batch=6)
    if not (args := parse_or_run_child(parser, child, check)):
        return
    results, peak = compare_sides(__file__, args, "--model", args.model)
    name = args.size or Path(args.model).name
    title = (f"reward · {name} · batch {args.batch} pairs · {args.steps} steps · max_length {args.max_length} · "
             f"{settings(args)}")
    report("reward", title, results, FLOPS_PER_PARAM * matmul_params(args.model), peak, args.json,
           {"model": name, "quantize": args.quantize, "batch": args.batch, "ours_overrides": args.ours})

if __name__ == "__main__":
    main()
