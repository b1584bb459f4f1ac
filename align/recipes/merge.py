"""Merge an adapter into its base and save a plain transformers model, for deployment.

    align merge adapter=runs/quickstart/dpo dtype=bfloat16
    align merge                      # merges <run.dir>/sft into <run.dir>/sft-merged
    align merge base=original        # a QLoRA adapter into the checkpoint's own weights

An adapter learns against the base weights it was trained on. For one trained with QLoRA
(model.quantize=true) those are the 4-bit NF4 weights: the base is quantized as training
quantized it, dequantized to full precision (transformers' `dequantize`), and the adapter folded
into that with peft's `merge_and_unload`, so the merged model gives the outputs the adapter was
trained and evaluated with (logits within 0.001 on the embedded model). Folded into the original
weights instead (base=original) it runs on weights it never saw: a QLoRA SFT adapter on the
embedded model went from a completion loss of 3.41 to 3.21 on its training examples and single
logits moved by up to 24; better or worse, another model than the one trained and evaluated.
Merging into the 4-bit weights themselves would round the adapter away: the merged model is
saved in `dtype` and loads back with `AutoModelForCausalLM.from_pretrained(folder)`. Its
generation_config stops at the tokenizer's EOS, the end of turn the adapter was trained to
write, beside the base's own.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from align import StageError, refuse_several_processes
from align.artifacts import merge_paths, print_done, read_manifest, system_prompt_of, write_manifest
from align.config import MergeStageConfig, ModelConfig, save_config, to_dict
from align.generation import stop_ids
from align.modeling import (
    adapter_base_name,
    device_plan,
    is_adapter_dir,
    load_base_model,
    load_tokenizer,
    resolve_model_path,
    trained_model_settings,
)
from align.preflight import check_stage

log = logging.getLogger(__name__)


def trained_quantization(adapter: str | Path) -> ModelConfig | None:
    """The 4-bit base an adapter was trained on (its stage's model config, compute dtype resolved as it ran),
    or None when its manifest says it trained on an unquantized base, or it has no manifest."""
    if not (Path(adapter) / "align.json").is_file():
        return None
    trained = trained_model_settings(read_manifest(adapter))
    if not trained.quantize:
        return None
    return replace(trained, compute_dtype="float32") if trained.compute_dtype == "auto" else trained


def nf4_base(name: str, quantized: ModelConfig, dtype: torch.dtype):
    """The base as QLoRA training saw it: loaded 4-bit as its plan loaded it (on the GPU, quantized there as
    training quantized it), then on the host each 4-bit layer dequantized to `dtype` (bitsandbytes'
    dequantize_4bit, through transformers' `dequantize`).

    Dequantized on the host, not where it loaded: transformers makes each layer's full-precision copy on the
    device of its 4-bit weights, so dequantized on the GPU the whole base was there in `dtype` before any of it
    moved (Llama-3-8B in fp32: ~30 GiB, more than the 24 GB card docs/scaling.md trains it on with QLoRA). The
    values are the same on either: each is an NF4 code times its block's scale, in fp32 arithmetic."""
    cfg = ModelConfig(name=name, quantize=True, double_quant=quantized.double_quant,
                      compute_dtype=quantized.compute_dtype)
    plan = device_plan(cfg)
    if not plan.quantize:
        raise StageError("merge base=nf4 quantizes the base as QLoRA training did and needs bitsandbytes; "
                         "install it (pip install bitsandbytes) or pass base=original")
    model = load_base_model(cfg, plan, training=False).to("cpu")  # 4-bit (bitsandbytes moves its quantization state)
    return model.dequantize(dtype=dtype).to(dtype=dtype)  # and the layers left unquantized (embeddings, norms)


def merge_adapter(adapter: str | Path, dtype: torch.dtype = torch.float32, base: str = "auto"):
    """(merged model, tokenizer, logical base name, the weights merged into: "nf4" or "original") for an adapter
    folder; `base` as MergeStageConfig.base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_name = adapter_base_name(adapter)
    quantized = trained_quantization(adapter)
    into = base if base != "auto" else ("nf4" if quantized else "original")
    if into == "nf4":
        model = nf4_base(base_name, quantized or ModelConfig(quantize=True, compute_dtype="float32"), dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(base_name), dtype=dtype)
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model, load_tokenizer(str(adapter)), base_name, into


def main(cfg: MergeStageConfig) -> Path:
    # --- resolve inputs ---------------------------------------------------------------------
    refuse_several_processes("merge", "every process would write the same merged folder")
    check_stage("merge", cfg)  # the adapter, its base and the output folder before anything is loaded
    adapter, out = merge_paths(cfg)
    if not is_adapter_dir(adapter):
        raise StageError(f"{adapter} is not an adapter folder (no adapter_config.json); "
                         "pass adapter=<folder written by align sft/dpo/ppo>")

    # --- model → merge → save ---------------------------------------------------------------
    model, tokenizer, base_name, into = merge_adapter(adapter, getattr(torch, cfg.dtype), cfg.base)
    # generate() stops at the folder's generation_config, the base's: for a base without a chat template whose
    # vocabulary has <|im_end|>, load_tokenizer made that the EOS and SFT taught it, but the base's config ends at
    # <|endoftext|> alone, and the merged model talked on past its answer.
    stops = [tokenizer.eos_token_id] + [i for i in stop_ids(tokenizer, model.generation_config)
                                        if i != tokenizer.eos_token_id]
    model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    log.info("merged %s into %s", adapter, "the base's dequantized 4-bit NF4 weights, as it was trained"
             if into == "nf4" else "the base's original weights")
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    save_config(cfg, out / "config.yaml")
    write_manifest(out, stage="merge", config=to_dict(cfg), base_model=base_name,
                   parents={"adapter": adapter}, merged=True, merged_into=into, system_prompt=system_prompt_of(adapter))
    print_done("merge", out, f"python -c \"from transformers import AutoModelForCausalLM; "
                             f"AutoModelForCausalLM.from_pretrained('{out}')\"")
    return out
