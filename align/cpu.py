"""Every CPU-only workaround in one place: what each does, why, and what it was measured to save.

The device plan (align.modeling.device_plan) already picks fp32 compute and no gradient
checkpointing on CPU (TRL's bf16 default made a step 10-45x slower on a CPU without bf16
matmuls). What is left is below, each a plain function a stage calls after building its trainer
(`speed_up_cpu_training`), or that loading calls for it. Measured on the 2-core AVX-512 box this
project is built on, embedded SmolLM2-135M, QLoRA SFT (benchmarks/README.md, benchmarks/sft_step.py):

- `keep_trainable_in(model, torch.float32)`: TRL casts a quantized model's trainable (LoRA)
  weights to bf16, the QLoRA paper's recipe for GPUs, and has no switch for it; they are cast
  back to fp32. Not for speed on this box (it has AVX512-BF16): `sft_step.py` against
  `sft_step.py --off fp32` gave 56.7, 54.9 and 59.5 tokens/s in fp32 against 49.7, 67.8 and 72.5
  in bf16 (2026-12-01, load average 1-6: no difference the noise lets one see). For exactness:
  the trainer updates the weights in their own dtype, and a bf16 weight drops an update smaller
  than ~1/256 of itself (PPO's lr 1e-5 on LoRA weights of ~1e-2); fp32 compute on fp32 weights is
  also what the device plan promises. PPO calls it for its own adapters too, and SFT on every device since
  2026-12-05 (a bf16 adapter under bf16 compute moved ~38 % of its weights over 20 AdamW steps at lr 5e-5, the
  tail of a decaying schedule; under autocast peft's 4-bit LoRA layers keep their bf16 input, so fp32 weights
  cost no activation memory).
- `restore_policy_from_ref(policy)`: DPO and GRPO/RLOO copy the SFT adapter into a frozen "ref"
  adapter before TRL's bf16 cast reaches the trainable one, so the policy is restored from that
  exact fp32 copy: step 0 is then exactly the SFT policy (a rounded one would move the implicit
  rewards off zero) and the adapter trains in fp32. Not CPU-only: DPO and GRPO/RLOO call it on a
  GPU too, sharded (FSDP, DeepSpeed) or not (align/recipes/dpo.py, then `one_trainable_dtype`).
- `CPUDropout` (through `use_cpu_dropout`): torch draws dropout's mask with `bernoulli_`, one
  generator call per element: 19 % of a QLoRA SFT step (210 LoRA dropouts, 13.7 ms each, by
  torch.profiler). Four 16-bit lanes from one 64-bit draw: the mask 2-2.5x cheaper, the step
  1.10x faster.
- `fused_head_on_labelled_positions()`: TRL 1.16's fused LM head scores only labelled positions
  on Triton devices and every position elsewhere (fixed tile shapes for compilers such as
  Neuron's). On CPU nothing is compiled, so the prompt and padding positions were pure waste:
  a step 1.23x faster without them, the same values (tests/test_cpu_training.py). It patches a
  private TRL function, so it says in the log whether it applied, and that it did not when
  TRL's internals changed.
- `keep_4bit_backward(model)` (called by align.modeling.load_base_model for every 4-bit
  model it loads to train): bitsandbytes repacks a 4-bit layer's weights for a faster CPU kernel
  (AVX512-BF16) the first time the layer runs in eval mode without gradients, and that kernel
  has no backward: training after any evaluation (DPO's eval_on_start, a mid-run eval) would
  silently lose every gradient through the frozen base. Not a speed-up: correctness; the repack
  stays off.
- `keep_4bit_for_dora(model)` (called by every stage that loads adapters onto a 4-bit base to
  generate or score: sample, eval, serve, a reward model): the same repack left on for inference,
  where it is 1.8x faster decoding (plain LoRA on the 4-bit embedded model, 4 prompts x 48 tokens:
  36.3 against 19.7 tokens/s), except under a DoRA adapter: peft's DoRA dequantizes the base
  weight for its weight norm on every forward and reads the repacked layout as if it were the
  plain one, so the model it runs is not the one trained (a QLoRA+DoRA SFT adapter's loss 8.75
  against 4.59; `align sample` wrote 'I helpful\n\nhelpful...'). With DoRA the repack stays off.

Outside this module: `OMP_WAIT_POLICY=PASSIVE` (align.cli.setup_environment, set before torch
loads: with OpenMP's spin-waiting a CPU step went from 0.09 s to 2-4 s whenever another process
used a core), and 4-bit weights stored as uint8 on CPU (align.modeling.bnb_config).
"""

from __future__ import annotations

import logging
import types

import torch

log = logging.getLogger(__name__)


def keep_trainable_in(model, dtype: torch.dtype) -> None:
    """Put trainable (adapter) weights back in `dtype` (fp32 on CPU; see the module docstring)."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)


def restore_policy_from_ref(policy) -> None:
    """The trainable "default" adapter set to the frozen "ref" copy TRL made of it, in fp32.

    TRL copies the adapter into "ref" before it rounds the trainable one to bf16; the
    policy then starts exactly at the SFT policy and trains in fp32.
    """
    for name, param in policy.named_parameters():
        if ".default." in name:
            param.data = policy.get_parameter(name.replace(".default.", ".ref.")).data.to(torch.float32).clone()


def speed_up_cpu_training(model) -> None:
    """What a training step on CPU needs beyond TRL's defaults: fp32 adapters, CPUDropout, the labelled-only head."""
    keep_trainable_in(model, torch.float32)
    swapped = use_cpu_dropout(model)
    head = ("LM head at labelled positions only" if fused_head_on_labelled_positions()
            else "LM head at every position (TRL's internals changed; see the warning above)")
    log.info("CPU training: fp32 adapters, %d LoRA dropouts as CPUDropout, %s", swapped, head)


def keep_4bit_backward(model) -> int:
    """Turn off bitsandbytes' eval-mode CPU repack on every 4-bit layer (its kernel has no backward)."""
    switched = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched


def keep_4bit_for_dora(model) -> bool:
    """The repack turned off on a model that carries a DoRA adapter (see the module docstring); True if it does.

    Call it after loading the adapters and before the first forward: the repack happens on that forward."""
    dora = any(len(getattr(m, "lora_magnitude_vector", None) or ()) for m in model.modules())
    if dora:
        keep_4bit_backward(model)
    return dora


# ---------------------------------------------------------------------------- the fused LM head


def fused_head_on_labelled_positions() -> bool:
    """TRL's fused LM head scores only positions with a label, on CPU too; True when that is in effect.

    TRL decides per call with `trl.trainer.utils._use_triton(device)` (imported there from
    trl.kernels.chunked_logprob); this wraps it to answer True on CPU. When TRL no longer has
    that function, or its fused head no longer calls it, nothing is patched and a warning says
    so: the stage runs as TRL does (same values, slower).
    """
    from trl.trainer import utils

    original = getattr(utils, "_use_triton", None)
    if getattr(original, "labelled_only_on_cpu", False):
        return True
    head = getattr(utils, "add_fused_lm_head", None)
    if original is None or head is None or not _refers_to(head, "_use_triton"):
        log.warning("CPU: TRL's fused LM head is not where align patches it (trl.trainer.utils._use_triton as "
                    "used by add_fused_lm_head; TRL's internals changed): it scores every position, not only "
                    "labelled ones, so CPU steps are slower (same values)")
        return False

    def labelled_only(device) -> bool:
        return device.type == "cpu" or original(device)

    labelled_only.labelled_only_on_cpu = True
    utils._use_triton = labelled_only
    log.info("CPU: TRL's fused LM head patched to score labelled positions only")
    return True


def _refers_to(function, name: str) -> bool:
    """Whether `function` or a function defined inside it looks up the global `name`."""
    codes = [function.__code__]
    while codes:
        code = codes.pop()
        if name in code.co_names:
            return True
        codes += [c for c in code.co_consts if isinstance(c, types.CodeType)]
    return False


# ---------------------------------------------------------------------------- dropout


class CPUDropout(torch.nn.Dropout):
    """`nn.Dropout` with a cheaper random mask on CPU; unchanged elsewhere and in eval mode.

    One 64-bit draw gives four 16-bit lanes, each kept when its low 15 bits are at or above
    p·2^15: the same keep probability (to 1/32768); the draw is ~10x cheaper than `bernoulli_`,
    the whole dropout 2-2.5x.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        n = x.numel()
        lanes = torch.empty((n + 3) // 4, dtype=torch.int64).random_().view(torch.int16)[:n]
        keep = (lanes & 0x7FFF) >= round(self.p * 32768)
        return x * keep.view(x.shape).to(x.dtype).mul_(1 / (1 - self.p))


def use_cpu_dropout(model) -> int:
    """Swap every LoRA dropout in `model` for `CPUDropout` (same p); returns how many were swapped."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, layer in dropouts.items():
            if type(layer) is torch.nn.Dropout:
                dropouts[name] = CPUDropout(layer.p)
                dropouts[name].train(layer.training)
                swapped += 1
    return swapped
