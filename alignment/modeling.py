"""Base model, tokenizer, 4-bit quantization, LoRA/DoRA, and loading adapters back.

One decision is made here for every stage: the device plan. TRL's configs default to bf16 and
gradient checkpointing on; on a CPU without bf16 instructions that makes a step 10-45x slower,
so the plan picks per device and says in one line what it chose.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from alignment.config import LoraConfig, ModelConfig
from alignment.embedded import CHATML_EOS, EMBEDDED_NAMES, embedded_model_dir

log = logging.getLogger(__name__)

# Used when a tokenizer has no chat template of its own (base models, tiny test models).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def resolve_model_path(name: str) -> str:
    """The embedded default's converted folder for its names; anything else unchanged."""
    if name.lower() in EMBEDDED_NAMES:
        return str(embedded_model_dir())
    return name


@dataclass
class DevicePlan:
    device: str
    quantize: bool
    compute_dtype: torch.dtype
    gradient_checkpointing: bool

    @property
    def bf16(self) -> bool:
        return self.compute_dtype == torch.bfloat16

    @property
    def fp16(self) -> bool:
        return self.compute_dtype == torch.float16

    def describe(self) -> str:
        base = "4-bit NF4 base + LoRA (QLoRA)" if self.quantize else "unquantized base + LoRA"
        dtype = str(self.compute_dtype).replace("torch.", "")
        gc = "on" if self.gradient_checkpointing else "off"
        return f"device {self.device} · {base} · {dtype} compute · gradient checkpointing {gc}"


def device_plan(cfg: ModelConfig) -> DevicePlan:
    cuda = torch.cuda.is_available()
    if cfg.compute_dtype == "auto":
        dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    else:
        dtype = getattr(torch, cfg.compute_dtype)
    quantize = cfg.quantize
    if quantize:
        try:
            import bitsandbytes  # noqa: F401
        except Exception as err:  # pragma: no cover - depends on the install
            log.warning("bitsandbytes unavailable (%s): running LoRA on an unquantized base", err)
            quantize = False
    # auto on CUDA: on until the stage has loaded the model and knows its batch, when
    # alignment.gpu_training.fit_checkpointing turns it off if the activations fit in memory.
    gc = {"on": True, "off": False, "auto": cuda}[cfg.gradient_checkpointing]
    return DevicePlan("cuda" if cuda else "cpu", quantize, dtype, gc)


def require_cuda_package(module: str, *, no_cuda: str, missing: str) -> None:
    """A GPU-only option checked against the machine before anything loads: the message for what is absent."""
    import importlib

    from alignment import StageError

    if not torch.cuda.is_available():
        raise StageError(no_cuda)
    try:
        importlib.import_module(module)
    except ImportError as err:
        raise StageError(missing) from err


def check_liger(liger: bool | str) -> None:
    """`train.liger` (TRL's `use_liger_kernel`) checked against the machine: a clear error if true cannot be.

    auto is never an error: alignment.gpu_training.use_liger turns it on only where it can run."""
    if liger is True:
        require_cuda_package(
            "liger_kernel",
            no_cuda="train.liger=true needs CUDA: Liger's kernels are Triton GPU kernels and this machine "
                    "has no GPU; use train.liger=auto (on where it can run) or false",
            missing="train.liger=true needs the liger-kernel package: pip install 'align[gpu]' "
                    "(or pip install liger-kernel)")


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = CHATML_EOS if CHATML_EOS in tokenizer.get_vocab() else tokenizer.eos_token
    return tokenizer


def bnb_config(plan: DevicePlan, cfg_double_quant: bool = True):
    from transformers import BitsAndBytesConfig

    # On CUDA the packed 4-bit weights are stored in the compute dtype, which FSDP and
    # DeepSpeed ZeRO-3 need to shard them alongside the LoRA weights; on CPU, plain uint8.
    storage = plan.compute_dtype if plan.device == "cuda" else torch.uint8
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=cfg_double_quant,
        bnb_4bit_compute_dtype=plan.compute_dtype,
        bnb_4bit_quant_storage=storage,
    )


def load_base_model(cfg: ModelConfig, plan: DevicePlan, *, auto_class=None, training: bool = True, **kwargs):
    """The base model as the plan says: 4-bit (prepared for k-bit training) or plain."""
    from transformers import AutoModelForCausalLM

    auto_class = auto_class or AutoModelForCausalLM
    path = resolve_model_path(cfg.name)
    extra = dict(kwargs)
    if cfg.attn_implementation:
        extra["attn_implementation"] = cfg.attn_implementation
    if plan.quantize:
        extra["quantization_config"] = bnb_config(plan, cfg.double_quant)
        if plan.device == "cuda":
            # Under accelerate launch the trainer has not pinned this process's GPU yet when the
            # model loads: LOCAL_RANK says which one is ours (0 when launched alone).
            extra["device_map"] = {"": _local_gpu()}
    model = auto_class.from_pretrained(path, dtype=plan.compute_dtype, **extra)
    if plan.quantize and training:
        prepare_4bit_for_training(model, plan)
        # bitsandbytes repacks 4-bit weights for a faster CPU kernel (AVX512-BF16) the first time
        # a layer runs in eval mode, and that kernel has no backward: training after any
        # evaluation would silently lose the gradients through the frozen base. Keep it off.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    if plan.device == "cuda" and not plan.quantize:
        model.to(f"cuda:{_local_gpu()}")
    return model


def prepare_4bit_for_training(model, plan: DevicePlan) -> None:
    """A 4-bit base made ready for LoRA training: every base weight frozen, nothing upcast.

    peft's prepare_model_for_kbit_training also casts every weight that is not 4-bit (embedding,
    norms, the tied LM head) from bf16 to fp32. The embedding's output then starts the residual
    stream in fp32, and it stays fp32 through every layer (a bf16 matmul output added to an fp32
    residual is fp32): twice the bytes for each checkpointed layer input, each norm and each add.
    On the 1.5b stand-in at batch 64 that was align's 7922 MiB against TRL's 4986 (TRL 1.16's own
    QLoRA path does not call it) and a 0.78x step. bf16 has fp32's exponent range, and the norms
    compute in fp32 inside (LlamaRMSNorm), so that cast buys nothing but for fp16, where it stays.
    Gradient checkpointing is left to the trainer (TRL enables the input gradients it needs).
    """
    if plan.compute_dtype == torch.float16:
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return
    for param in model.parameters():
        param.requires_grad = False


def _local_gpu() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def peft_lora_config(cfg: LoraConfig, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        task_type=task_type,
        modules_to_save=modules_to_save,
        bias="none",
    )


def keep_trainable_in(model, dtype: torch.dtype) -> None:
    """Put trainable (adapter) weights back in `dtype`.

    TRL casts a quantized model's trainable weights to bf16 (the QLoRA paper's recipe for GPUs).
    On a CPU without bf16 instructions that makes every step many times slower, and TRL has no
    switch for it, so after building a trainer on CPU we cast them back to the compute dtype.
    """
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)


def speed_up_cpu_training(model) -> None:
    """What a training step on CPU needs beyond TRL's defaults (each measured, see benchmarks/README.md).

    fp32 adapters (keep_trainable_in), a cheaper dropout mask (CPUDropout), and TRL's fused LM
    head scoring only the positions that have a label (fused_head_on_labelled_positions).
    """
    keep_trainable_in(model, torch.float32)
    swapped = use_cpu_dropout(model)
    fused_head_on_labelled_positions()
    log.info("CPU training: fp32 adapters, %d LoRA dropouts as CPUDropout, LM head at labelled positions only",
             swapped)


def fused_head_on_labelled_positions() -> None:
    """TRL's fused LM head scores only positions with a label, on CPU too.

    TRL 1.16 projects through the (49k-vocabulary) LM head, in tiles, only the positions whose
    label is not -100 on Triton devices; elsewhere it scores every position so that tile shapes
    stay fixed for compilers such as Neuron's. On CPU nothing is compiled, so the prompt and
    padding positions are pure waste: on the embedded model a QLoRA SFT step ran 1.23x faster
    with them skipped. The values are the same (tests/test_cpu_training.py checks it).
    """
    from trl.trainer import utils

    original = getattr(utils, "_use_triton", None)
    if original is None or getattr(original, "labelled_only_on_cpu", False):
        return

    def labelled_only(device) -> bool:
        return device.type == "cpu" or original(device)

    labelled_only.labelled_only_on_cpu = True
    utils._use_triton = labelled_only


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base_name(path: str | Path) -> str:
    """The base model an adapter was trained on: our manifest's logical name, else peft's path."""
    manifest = Path(path) / "align.json"
    if manifest.is_file():
        base = json.loads(manifest.read_text()).get("base_model")
        if base:
            return base
    return json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]


def trainable_parameters(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class CPUDropout(torch.nn.Dropout):
    """`nn.Dropout` with a cheaper random mask on CPU; unchanged elsewhere and in eval mode.

    On CPU, torch draws dropout's mask with `bernoulli_`, one generator call per element: on the
    embedded model that was 19 % of a QLoRA SFT step (210 LoRA dropouts, 13.7 ms each, measured
    with torch.profiler). Here one 64-bit draw gives four 16-bit lanes, each kept when its low 15
    bits are at or above p·2^15: the same keep probability (to 1/32768); the draw is ~10x cheaper,
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
