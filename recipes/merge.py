"""Merge an adapter into its base and save a plain transformers model, for deployment.

    align merge adapter=runs/quickstart/dpo dtype=bfloat16
    align merge                      # merges <run.dir>/sft into <run.dir>/sft-merged

The base is loaded unquantized (merging into 4-bit weights would round the adapter away), the
adapter applied and folded in with peft's `merge_and_unload`, and the result saved with its
tokenizer. Load it back with `AutoModelForCausalLM.from_pretrained(folder)`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from alignment import StageError
from alignment.artifacts import print_done, stage_dir, system_prompt_of, write_manifest
from alignment.config import MergeStageConfig, save_config, to_dict
from alignment.modeling import adapter_base_name, is_adapter_dir, load_tokenizer, resolve_model_path
from alignment.preflight import check_stage

log = logging.getLogger(__name__)


def merge_adapter(adapter: str | Path, dtype: torch.dtype = torch.float32):
    """(merged model, tokenizer, logical base name) for an adapter folder."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_name = adapter_base_name(adapter)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(base_name), dtype=dtype)
    model = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    return model, load_tokenizer(str(adapter)), base_name


def main(cfg: MergeStageConfig) -> Path:
    # --- resolve inputs ---------------------------------------------------------------------
    check_stage("merge", cfg)  # the adapter, its base and the output folder before anything is loaded
    adapter = Path(cfg.adapter) if cfg.adapter else stage_dir(cfg.run.dir, "sft")
    if not is_adapter_dir(adapter):
        raise StageError(f"{adapter} is not an adapter folder (no adapter_config.json); "
                         "pass adapter=<folder written by align sft/dpo/ppo>")
    out = Path(cfg.output) if cfg.output else adapter.with_name(adapter.name + "-merged")

    # --- model → merge → save ---------------------------------------------------------------
    model, tokenizer, base_name = merge_adapter(adapter, getattr(torch, cfg.dtype))
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    save_config(cfg, out / "config.yaml")
    write_manifest(out, stage="merge", config=to_dict(cfg), base_model=base_name,
                   parents={"adapter": adapter}, merged=True, system_prompt=system_prompt_of(adapter))
    print_done("merge", out, f"python -c \"from transformers import AutoModelForCausalLM; "
                             f"AutoModelForCausalLM.from_pretrained('{out}')\"")
    return out
