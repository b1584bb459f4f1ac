"""What a training step does on a GPU beyond TRL's defaults: each a config switch with an `auto`.

    model.gradient_checkpointing: auto   on only when the step's activations would not fit in free GPU memory
    train.liger: auto                     Liger's Triton kernels (RMSNorm, SwiGLU, RoPE) with CUDA + liger-kernel
    data.padding_free: auto               SFT batches as one flat sequence (no padding), with a varlen attention
    train.compile: false                  torch.compile of the model (opt-in: minutes of compiling first)

Each `auto` is decided once per stage, logged, and recorded in the stage's manifest (`device_plan`).
On CPU every `auto` is off: align.modeling's CPU parts (speed_up_cpu_training) apply there.
benchmarks/README.md says what each is expected to do and what has been measured.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import replace

import torch

from align.modeling import DevicePlan, _local_gpu, check_liger

log = logging.getLogger(__name__)

# Headroom kept free when deciding checkpointing: the optimizer's states (LoRA: small), the fused LM
# head's chunks, cuBLAS workspaces and the caching allocator's fragmentation.
RESERVE_BYTES = 2 * 2**30
SAFETY = 1.25  # the activation estimate is multiplied by this before comparing with free memory


def activation_bytes_per_token(config, dtype: torch.dtype, lora_dropout: bool = True) -> int:
    """What autograd keeps per token for the backward of one decoder layer (Llama-like, LoRA on every linear).

    Counted from what each op saves for its backward (a frozen weight's matmul keeps no input), in
    units of the hidden size h, the MLP size i and the key/value width kv, at `dtype`'s bytes (b):
    the two RMSNorms (input in fp32, the normalised output: (4 + 2b)h each), the LoRA paths' inputs
    and RoPE'd q, k (~5h + 2kv), SDPA's q, k, v, output (2h + 2kv), the SiLU-gated MLP's gate, up,
    product and down input (4i), and with LoRA dropout a dropped copy and a mask of each linear
    layer's input (7 inputs: 6h + i, at 4 + 1 bytes: peft runs an fp32 adapter's path in fp32).
    tests/test_gpu_training.py checks it against the bytes autograd really saves on a small Llama
    (bf16, with and without autocast and dropout): at or above them, by less than half.
    """
    b = torch.finfo(dtype).bits // 8
    h = config.hidden_size
    i = config.intermediate_size
    heads = config.num_attention_heads
    kv = h // heads * getattr(config, "num_key_value_heads", heads)
    per_layer = 2 * (4 + 2 * b) * h + b * (5 * h + 2 * kv) + b * (2 * h + 2 * kv) + b * 4 * i
    if lora_dropout:
        per_layer += (4 + 1) * (6 * h + i)
    return per_layer * config.num_hidden_layers


def fit_checkpointing(plan: DevicePlan, setting: str, model, tokens_per_step: int, *,
                      taken_later: float = 0.0) -> DevicePlan:
    """`model.gradient_checkpointing: auto` settled once the model is on the GPU: on only if memory needs it.

    Checkpointing recomputes each layer's forward in the backward pass: with a frozen base (LoRA,
    QLoRA) that is a third more matmul work per step (forward 2N + backward 2N + recompute 2N
    FLOPs per token instead of 4N). It is worth it only when the activations of the longest batch
    (`tokens_per_step`: batch × max_length, padded) would not fit in what the loaded model leaves
    free. Sharded setups (FSDP, DeepSpeed) keep it on: the estimate does not know their layout.
    `taken_later`: the share of the GPU's memory something started after this check will hold (GRPO's
    colocated vLLM engine, built with the trainer: `vllm_gpu_memory_utilization` of the whole card).
    """
    if setting != "auto" or plan.device != "cuda":
        return plan
    if sharded():
        return replace(plan, gradient_checkpointing=True)
    free, total = torch.cuda.mem_get_info(_local_gpu())
    free -= taken_later * total
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    # fp16 compute on a 4-bit base keeps the residual stream in fp32 (modeling.prepare_4bit_for_training): counted so
    stream = torch.float32 if plan.quantize and plan.compute_dtype == torch.float16 else plan.compute_dtype
    needed = activation_bytes_per_token(config, stream) * tokens_per_step
    fits = needed * SAFETY + RESERVE_BYTES < free
    log.info("gradient checkpointing auto: the longest batch's activations need ~%.1f GiB without it, %.1f GiB "
             "is free%s: %s", needed / 2**30, free / 2**30, f" (less {taken_later:.0%} of the GPU for vLLM)"
             if taken_later else "", "off (it fits)" if fits else "on (it does not fit)")
    return replace(plan, gradient_checkpointing=not fits)


def sharded() -> bool:
    """Launched by accelerate with FSDP or DeepSpeed: the model's weights are split across the ranks."""
    return any(os.environ.get(f"ACCELERATE_USE_{kind}", "").lower() == "true" for kind in ("FSDP", "DEEPSPEED"))


def one_trainable_dtype(model) -> None:
    """Under FSDP (and DeepSpeed) the trainable weights of a wrapped layer must share one dtype (FSDP2: "FSDP
    expects uniform original parameter dtype"): TRL casts a 4-bit model's LoRA weights to bf16 and leaves
    DoRA's magnitude vectors in fp32, and QLoRA + DoRA under fsdp.yaml stopped at its first step. All are made
    fp32, as accelerate does for a model without 4-bit weights (it skips that upcast for QLoRA): FSDP2 keeps no
    fp32 copy of a bf16 weight, so in bf16 the optimizer's steps under ~1/256 of a weight were lost (DoRA's
    magnitudes near 1 did not move at lr 4e-4, most of DPO's LoRA weights not at 5e-5). The mixed-precision
    policy still computes in bf16."""
    if not sharded():
        return
    from align.cpu import keep_trainable_in

    keep_trainable_in(model, torch.float32)


def without_training_autocast(model) -> None:
    """The model's own forward back, as training found it: accelerate wraps it in the mixed-precision autocast for
    training (Accelerator.prepare_model, under bf16 or fp16) and leaves it so after. A reward model's held-out
    accuracy and probes, which the PPO gate reads, were scored in that autocast while PPO, eval and `align reward
    score` load the saved model (load_reward_model) and score it without: on a bf16 GPU two sets of numbers, and
    near-tied pairs that flip between them. Not under FSDP or DeepSpeed, whose wrapped forward is the sharded one
    (their mixed precision is the wrapper's own policy)."""
    if sharded():
        return
    from accelerate.utils import extract_model_from_parallel

    extract_model_from_parallel(model, keep_fp32_wrapper=False)


@contextmanager
def liger_confined(active: bool):
    """Liger's kernels for this stage's training only. transformers applies them as training starts
    (Trainer.train), to the model and to its architecture's module as well: Liger rebinds transformers' modeling
    module's names (LlamaRMSNorm, LlamaMLP, apply_rotary_pos_emb), so in `align pipeline` every model loaded after
    an SFT under liger=auto ran them too (PPO's loop, eval, a stage set to liger=false), its manifest saying
    "liger off". Those names are put back as they were when training ends; the trained model keeps its own layers'
    kernels (its RoPE is transformers' again: the same values)."""
    if not active:
        yield
        return
    modules = {name: module for name, module in list(sys.modules.items())
               if name.startswith("transformers.models.") and module is not None}
    kept = {name: dict(vars(module)) for name, module in modules.items()}
    try:
        yield
    finally:
        for name, module in modules.items():
            for key, value in kept[name].items():
                if vars(module).get(key) is not value:
                    setattr(module, key, value)


def use_liger(setting: bool | str) -> bool:
    """`train.liger`: true (refused without CUDA or liger-kernel), false, or auto (on when both are there,
    unless the environment has ALIGN_LIGER=off: Liger installed but known not to run on this machine, as
    scripts/gpu_check.sh finds when its preflight fails; an explicit true still runs it).

    Liger's layer kernels only (RMSNorm, SwiGLU, RoPE): trl_args turns its fused linear cross-entropy
    off for every stage. TRL 1.16 does so in its sft, dpo and grpo trainers (its own fused LM head
    keeps the full-vocabulary logits out of memory), not in RewardTrainer, whose classifier has no lm_head.
    """
    if setting == "auto":
        if not torch.cuda.is_available() or os.environ.get("ALIGN_LIGER", "").lower() == "off":
            return False
        import importlib.util

        return importlib.util.find_spec("liger_kernel") is not None and importlib.util.find_spec("triton") is not None
    check_liger(setting)
    return bool(setting)


def use_padding_free(setting: str, plan: DevicePlan, attn_implementation: str | None, truncated: int,
                     packing: bool = False) -> bool:
    """`data.padding_free` for SFT: each batch as one flat sequence, sequences told apart by position_ids.

    The maths is the padded batch's on any attention (tests/test_gpu_training.py): transformers builds
    a block-diagonal causal mask from position_ids when no attention mask is given (masking_utils.
    find_packed_sequence_indices), for sdpa and eager too. But sdpa then attends over the whole flat
    batch with a dense mask, O((batch × length)^2): only a varlen kernel (flash attention) skips the
    masked blocks. So auto is on with CUDA and a flash attention implementation, off otherwise.
    TRL enforces no max_length in this mode, so it needs every example to fit in model.max_length
    (align sft counts the ones that do not). With data.packing, TRL packs padding-free whatever this says
    (its "bfd" strategy) and cuts what overflows: on, so that the plan and align.json say what runs.
    """
    if packing:
        if setting == "off":
            log.warning("data.padding_free=off: with data.packing TRL packs padding-free all the same")
        return True
    if setting == "off":
        return False
    if truncated:
        if setting == "on":
            from align import StageError

            raise StageError(f"data.padding_free=on: {truncated} examples are longer than model.max_length and TRL "
                             "does not truncate in padding-free mode; raise model.max_length, or use "
                             "data.padding_free=off")
        return False
    if setting == "on":
        return True
    from transformers.utils.generic import is_flash_attention_requested

    return plan.device == "cuda" and is_flash_attention_requested(requested_attention_implementation=attn_implementation)


def adapter_name(lora) -> str:
    """What the device plan calls the adapter a stage trains: `lora` is a stage's LoraConfig section or peft's
    own config of an adapter it continues (adapter_settings); None: plain LoRA."""
    if lora is None:
        return "LoRA"
    return ("DoRA" if getattr(lora, "use_dora", False) else "LoRA") + \
        (" with rsLoRA scaling" if getattr(lora, "use_rslora", False) else "")


def adapter_settings(sft, lora):
    """The LoRA settings of the adapter a stage trains: the SFT adapter's own (peft's config in its folder) when
    it continues one (dpo, ppo, grpo from an SFT), else its `lora` section."""
    if sft is None:
        return lora
    from peft import PeftConfig

    return PeftConfig.from_pretrained(str(sft))


def describe_levers(plan: DevicePlan, *, liger: bool, padding_free: bool | None = None, compile: bool = False,
                    lora=None) -> str:
    """One line for the log and the manifest: the device plan (with `lora`, the adapter it trains: DoRA,
    rsLoRA's scaling; adapter_name) and each GPU lever as decided."""
    parts = [plan.describe(adapter_name(lora)), f"liger {'on' if liger else 'off'}"]
    if padding_free is not None:
        parts.append(f"padding-free {'on' if padding_free else 'off'}")
    parts.append(f"torch.compile {'on' if compile else 'off'}")
    return " · ".join(parts)


def new_stage_on_gpu() -> None:
    """A stage's GPU figures its own when the pipeline runs the stages in one process: what the last
    stage left is collected and handed back to the driver (fit_checkpointing reads the free memory)
    and the peak counter restarts (the manifest's gpu_peak_mib), vLLM engines included. Nothing without CUDA."""
    if torch.cuda.is_available():
        if "align.generation" in sys.modules:  # a stage that sampled with vLLM left its engine
            sys.modules["align.generation"].release_vllm_engines()
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gpu_mib() -> float | None:
    """This process's peak GPU memory so far (torch's allocations), for the manifest; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)
