"""Load a policy (adapter folder, merged model or model name) and sample from it in batches.

Generation is most of RLHF's wall time, so prompts go through `generate` in batches, left
padded (decoder-only models continue from the right edge), with the KV cache on, and finished
sequences stop at EOS. Seeds are per batch, so two policies sampled with the same settings see
the same random stream: the comparison in `align eval` is paired.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from alignment.config import GenerationConfig, ModelConfig
from alignment.modeling import (
    DevicePlan,
    adapter_base_name,
    is_adapter_dir,
    load_base_model,
    load_tokenizer,
)

log = logging.getLogger(__name__)


@dataclass
class Policy:
    model: torch.nn.Module
    tokenizer: object
    source: str  # the folder or name it came from
    base_model: str  # logical base name (for manifests)


def load_policy(source: str | Path, model_cfg: ModelConfig, plan: DevicePlan) -> Policy:
    """An adapter folder (base + adapter), or anything `from_pretrained` takes, ready to generate."""
    from dataclasses import replace

    source = str(source)
    if is_adapter_dir(source):
        from peft import PeftModel

        base_name = adapter_base_name(source)
        base = load_base_model(replace(model_cfg, name=base_name), plan, training=False)
        model = PeftModel.from_pretrained(base, source)
        if not model_cfg.quantize:
            # Sampling only: fold LoRA into the weights (one matmul per layer instead of three,
            # ~15% faster decoding on CPU). Not into a 4-bit base, where it would round the update.
            model = model.merge_and_unload()
        tokenizer = load_tokenizer(source)
    else:
        base_name = source
        model = load_base_model(replace(model_cfg, name=source), plan, training=False)
        tokenizer = load_tokenizer(source)
    model.eval()
    return Policy(model, tokenizer, source, base_name)


def chat_prompt(tokenizer, prompt: str, system_prompt: str | None = None) -> str:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def generate(policy: Policy, prompts: list[str], gen: GenerationConfig, *, k: int = 1,
             system_prompt: str | None = None, desc: str | None = "sampling") -> list[list[str]]:
    """k responses for each prompt (a list of k strings per prompt), in prompt order.

    ``desc=None`` shows no progress bar (for a caller that keeps its own)."""
    tokenizer, model = policy.tokenizer, policy.model
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    outputs: list[list[str]] = []
    batches = range(0, len(prompts), gen.batch_size)
    for b, start in enumerate(tqdm(batches, desc=desc, unit="batch", disable=desc is None)):
        chunk = prompts[start:start + gen.batch_size]
        texts = [chat_prompt(tokenizer, p, system_prompt) for p in chunk]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        torch.manual_seed(gen.seed + b)
        sample = gen.temperature > 0
        out = model.generate(
            **enc,
            max_new_tokens=gen.max_new_tokens,
            do_sample=sample,
            temperature=gen.temperature if sample else None,
            top_p=gen.top_p if sample else None,
            top_k=None,
            num_return_sequences=k,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
        )
        new = out[:, enc["input_ids"].shape[1]:]
        decoded = tokenizer.batch_decode(new, skip_special_tokens=True)
        for i in range(len(chunk)):
            outputs.append([d.strip() for d in decoded[i * k:(i + 1) * k]])
    return outputs
