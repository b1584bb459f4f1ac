"""TRL 1.12's experimental PPOTrainer on the same work as `benchmarks/ppo.py` (run by that script).

    python benchmarks/ppo.py --trl112 /tmp/trl112          # builds nothing: see ppo.py's docstring

Runs in its own process with TRL 1.12 first on the path (``pip install --no-deps --target DIR
trl==1.12.0``; everything else is this project's venv). TRL 1.12's PPO is what its users ran
before it was removed in 1.13: the policy (here the base + the SFT adapter, trainable LoRA), the
reference (the same model with the adapter disabled), a full value model (a sequence classifier
on the base, every weight trained) and a reward model (another classifier on the base, frozen).
The reward model's head is untrained: the timings do not depend on its values.

Prints one JSON line: median seconds per update (steps 2..N), peak RSS (MiB), TRL's version.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from _common import compute_dtype, peak_memory_mib, trl_device_args  # noqa: E402  (benchmarks/, this folder)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--prompts", type=int, required=True)
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--minibatch", type=int, required=True)
    parser.add_argument("--sft", default="none")
    args = parser.parse_args()
    sys.path.insert(1, str(REPO))

    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from align.embedded import embedded_model_dir

    assert trl.__version__.startswith("1.12"), f"expected TRL 1.12 first on the path, got {trl.__version__}"
    base = str(embedded_model_dir())
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base, padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(base, dtype=compute_dtype())
    if args.sft != "none":
        policy = PeftModel.from_pretrained(policy, args.sft, is_trainable=True)
    else:  # the same LoRA shape as align's default
        policy = get_peft_model(policy, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                   target_modules="all-linear", task_type="CAUSAL_LM"))
    value = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=compute_dtype())
    reward = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=compute_dtype())
    for model in (value, reward):
        model.config.pad_token_id = tokenizer.pad_token_id

    prompts = [json.loads(line)["prompt"] for line in (REPO / "data/support/prompts.jsonl").read_text().splitlines()]
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"] for p in prompts]
    dataset = Dataset.from_dict({"input_ids": ids})

    stamps: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory(prefix="trl112-ppo-") as tmp:
        config = PPOConfig(
            output_dir=tmp, per_device_train_batch_size=args.prompts, gradient_accumulation_steps=1,
            num_mini_batches=args.prompts // args.minibatch, num_ppo_epochs=args.epochs,
            total_episodes=args.steps * args.prompts, local_rollout_forward_batch_size=args.prompts,
            response_length=args.tokens, stop_token="eos", missing_eos_penalty=1.0, temperature=0.8,
            kl_coef=0.05, learning_rate=1e-5, num_sample_generations=0, logging_steps=1, save_strategy="no",
            report_to=[], fp16=False, seed=0, dataloader_num_workers=0,
            **{k: v for k, v in trl_device_args().items() if k != "activation_checkpointing"},
        )
        trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=None,
                             reward_model=reward, train_dataset=dataset, value_model=value, callbacks=[Timer()])
        started = time.perf_counter()
        trainer.train()
        stamps.insert(0, started)
    per_step = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    timed = per_step[1:] or per_step
    print(json.dumps({"trl": trl.__version__, "steps": len(per_step), "step_s": statistics.median(timed),
                      "first_step_s": per_step[0], "peak_rss_mib": peak_memory_mib()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
