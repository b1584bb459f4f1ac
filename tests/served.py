"""Helpers for the `align serve` tests: real peft adapters on the tiny model, a run directory laid out
as the stages lay it out, and an app served from a thread."""

from __future__ import annotations

from pathlib import Path


def random_adapter(tiny_model: str, folder: Path, seed: int, *, stage: str | None = "sft", r: int = 8,
                   base_model: str | None = None, dora: bool = False) -> Path:
    """A LoRA adapter with random A and B (peft's init_lora_weights=False), so it changes the model's
    answers at once, saved with its tokenizer and, when `stage` is given, the manifest a stage writes."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.artifacts import write_manifest

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False,
                                      use_dora=dora, task_type="CAUSAL_LM"))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    if stage:
        write_manifest(folder, stage=stage, config={}, base_model=base_model or tiny_model)
    return folder


def serve_config(run_dir: Path | str, *overrides: str):
    from align.config import ServeStageConfig, load_config

    return load_config(ServeStageConfig, None, [f"run.dir={run_dir}", *overrides])


def load_engine(cfg):
    from align.chat_engine import ChatEngine
    from align.serving import served_models, shared_base

    models = served_models(cfg)
    return ChatEngine.load(models, shared_base(models, cfg), cfg)
