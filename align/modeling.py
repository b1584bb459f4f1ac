"""Base model, tokenizer, 4-bit quantization, LoRA/DoRA, and loading adapters back.

One decision is made here for every stage: the device plan. TRL's configs default to bf16 and
gradient checkpointing on; on a CPU without bf16 instructions that makes a step 10-45x slower,
so the plan picks per device and says in one line what it chose. The CPU workarounds beyond the
plan are in align.cpu.
"""

from __future__ import annotations

import json
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from align.config import LoraConfig, ModelConfig
from align.cpu import keep_4bit_backward
from align.embedded import CHATML_EOS, EMBEDDED_NAMES, embedded_model_dir

log = logging.getLogger(__name__)

# Used when a tokenizer has no chat template of its own (base models, tiny test models).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The same for a vocabulary without a <|im_end|> token (GPT-2, Pythia, a Llama base): each turn ends
# with the tokenizer's own EOS, the token every stage stops generating at, so SFT teaches it.
CHATML_EOS_TEMPLATE = CHATML_TEMPLATE.replace("'<|im_end|>'", "eos_token")


def resolve_model_path(name: str) -> str:
    """The embedded default's converted folder for its names; a local folder as an absolute path; anything else (a
    Hub id) unchanged. peft records the path a base was loaded from as an adapter's base_model_name_or_path:
    `model.name=tiny` kept as typed, AutoPeftModelForCausalLM run from another directory looked for "tiny" on
    the Hub."""
    if name.lower() in EMBEDDED_NAMES:
        return str(embedded_model_dir())
    if Path(name).expanduser().is_dir():
        return os.path.abspath(os.path.expanduser(name))
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

    def describe(self, adapter: str = "LoRA") -> str:
        base = f"4-bit NF4 base + {adapter} (QLoRA)" if self.quantize else f"unquantized base + {adapter}"
        dtype = str(self.compute_dtype).replace("torch.", "")
        gc = "on" if self.gradient_checkpointing else "off"
        return f"device {self.device} · {base} · {dtype} compute · gradient checkpointing {gc}"


def device_plan(cfg: ModelConfig) -> DevicePlan:
    cuda = torch.cuda.is_available()
    if cuda and "LOCAL_RANK" in os.environ:
        # Under accelerate launch: this process's GPU before anything asks CUDA (the bf16 check below, the
        # peak-memory reset): else each process opens a context on GPU 0 too, ~0.5 GB of it per process.
        torch.cuda.set_device(_local_gpu())
    if cfg.compute_dtype == "auto":  # bf16 where the GPU has it in hardware (Ampere on); T4/V100 only emulate it
        dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported(including_emulation=False) else torch.float32
    else:
        dtype = getattr(torch, cfg.compute_dtype)
    quantize = cfg.quantize
    if quantize:
        try:
            import bitsandbytes  # noqa: F401
        except Exception as err:  # pragma: no cover - depends on the install
            log.warning("bitsandbytes unavailable (%s): running LoRA on an unquantized base", err)
            quantize = False
        else:
            if cuda and (problem := bitsandbytes_cuda_problem()):
                log.warning("%s: QLoRA cannot run here, running LoRA on an unquantized base", problem)
                quantize = False
    # auto on CUDA: on until the stage has loaded the model and knows its batch, when
    # align.gpu_training.fit_checkpointing turns it off if the activations fit in memory.
    gc = {"on": True, "off": False, "auto": cuda}[cfg.gradient_checkpointing]
    return DevicePlan("cuda" if cuda else "cpu", quantize, dtype, gc)


def trained_model_settings(manifest: dict) -> ModelConfig:
    """model.quantize, double_quant and compute_dtype as a stage ran with them, from its align.json: its config's,
    as its device plan (`describe`, in the manifest's device_plan) resolved them on the machine that trained.
    compute_dtype auto is the dtype it computed in there (fp32 on a CPU, bf16 on a bf16 GPU): resolved again
    on the loading machine it may be another (a reward model trained on a CPU scored in bf16 on a GPU: 0.70
    held-out accuracy where its gate read 0.74). quantize is off where the plan ran unquantized (no
    bitsandbytes). With no plan recorded, the config's settings, auto included."""
    model = (manifest.get("config") or {}).get("model") or {}
    plan = manifest.get("device_plan") or ""
    dtype = model.get("compute_dtype", "auto")
    if dtype == "auto" and (found := re.search(r"(\w+) compute", plan)) and found[1] in ("float32", "bfloat16",
                                                                                         "float16"):
        dtype = found[1]
    return ModelConfig(quantize=bool(model.get("quantize", False)) and (not plan or "4-bit" in plan),
                       double_quant=bool(model.get("double_quant", True)), compute_dtype=dtype)


def unseen_quantization(adapter: str | Path, plan: DevicePlan) -> str | None:
    """A warning when `adapter` (an align stage's, by its align.json) trained on an unquantized base and `plan`
    puts it on a 4-bit one: the stage then starts from it plus rounding it never trained with, not from it as
    trained (a DPO reference "= the SFT" 1.4 nats of log-prob from the SFT on a tiny model). None otherwise: the
    other way (a QLoRA adapter on the unquantized base, as the quickstart runs DPO) adds no error to its base, and
    an adapter without a manifest that says how it trained is not second-guessed."""
    manifest = Path(adapter) / "align.json"
    if not plan.quantize or not manifest.is_file():
        return None
    recorded = json.loads(manifest.read_text())
    if "quantize" not in ((recorded.get("config") or {}).get("model") or {}):
        return None
    if trained_model_settings(recorded).quantize:
        return None
    return (f"{adapter} was trained on an unquantized base and this stage puts it on a 4-bit one (model.quantize="
            "true, the default): it starts from that adapter plus 4-bit rounding it never trained with, not as it "
            "trained (its log-probs differ, and so does a reference that is to be the adapter); pass model.quantize=false to run it on the "
            "base it trained on")


def bitsandbytes_cuda_problem() -> str | None:
    """Why bitsandbytes cannot run its 4-bit layers on this machine's CUDA GPU; None when it can (or without CUDA).

    bitsandbytes does not fail its import when its CUDA library does not load (no build for torch's CUDA version
    among the ones installed, a CUDA runtime library missing): it logs an error and puts in a stand-in whose
    every call raises, so a QLoRA stage failed at its first 4-bit layer. A bitsandbytes laid out otherwise than
    0.50's `cextension` is not second-guessed."""
    if not torch.cuda.is_available() or torch.version.hip:
        return None
    import importlib.metadata

    from bitsandbytes import cextension

    loaded = getattr(cextension, "CudaBNBNativeLibrary", None)
    if loaded is None or isinstance(getattr(cextension, "lib", None), loaded):
        return None
    builds = getattr(cextension, "get_available_cuda_binary_versions", list)()
    error = str(vars(cextension.lib).get("error_msg", "")).strip().splitlines()
    return (f"bitsandbytes {importlib.metadata.version('bitsandbytes')} loaded no CUDA library for torch's CUDA "
            f"{torch.version.cuda} (its builds: {', '.join(builds) or 'none'}"
            f"{'; ' + error[0] if error else ''}); install one with a build for it (pip install bitsandbytes: "
            "the wheel carries every CUDA build)")


def require_cuda_package(module: str, *, no_cuda: str, missing: str) -> None:
    """A GPU-only option checked against the machine before anything loads: the message for what is absent."""
    import importlib

    from align import StageError

    if not torch.cuda.is_available():
        raise StageError(no_cuda)
    try:
        importlib.import_module(module)
    except ImportError as err:
        raise StageError(missing) from err


def check_liger(liger: bool | str) -> None:
    """`train.liger` (TRL's `use_liger_kernel`) checked against the machine: a clear error if true cannot be.

    auto is never an error: align.gpu_training.use_liger turns it on only where it can run."""
    if liger is True:
        require_cuda_package(
            "liger_kernel",
            no_cuda="train.liger=true needs CUDA: Liger's kernels are Triton GPU kernels and this machine "
                    "has no GPU; use train.liger=auto (on where it can run) or false",
            missing="train.liger=true needs the liger-kernel package: pip install 'align-rlhf[gpu]' "
                    "(or pip install liger-kernel)")


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if not tokenizer.chat_template:
        # A turn's end must be the EOS every stage stops at (tokenizer.eos_token_id): else SFT never trains
        # the token that ends an answer, and the policy never stops.
        if CHATML_EOS in tokenizer.get_vocab():
            tokenizer.chat_template, tokenizer.eos_token = CHATML_TEMPLATE, CHATML_EOS
        elif tokenizer.eos_token is not None:
            tokenizer.chat_template = CHATML_EOS_TEMPLATE
        else:
            raise ValueError(f"{name_or_path}: its tokenizer has no chat template and no EOS token, so no answer "
                             "could be taught to end; use a model with either")
        # Every stage tokenizes the rendered conversation without the tokenizer's own specials: a base model
        # pretrained with a BOS first (Llama 2, Mistral v0.1) gets it from the template, as real templates give it.
        probe = tokenizer("x")["input_ids"]
        if tokenizer.bos_token is not None and probe and probe[0] == tokenizer.bos_token_id:
            tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    turn_end = template_turn_end(tokenizer)
    if turn_end is not None and turn_end != tokenizer.eos_token:
        # A template whose turns end with a special token that is not the EOS (Qwen2.5's base models: ChatML's
        # <|im_end|>, EOS <|endoftext|>; Gemma's <end_of_turn>): SFT teaches that token as the answer's end, so it
        # is the EOS every stage stops at (as TRL's SFTConfig.eos_token would set it). Else a policy trained here
        # never stopped: every answer ran to max_new_tokens and counted as cut, and DPO trained that.
        log.info("%s: its chat template ends a turn with %s, not its EOS %s: stopping there", name_or_path, turn_end,
                 tokenizer.eos_token)
        if tokenizer.pad_token is None:  # (the EOS it had pads, as before)
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.eos_token = turn_end
    if tokenizer.pad_token is None:
        tokenizer.pad_token = CHATML_EOS if CHATML_EOS in tokenizer.get_vocab() else tokenizer.eos_token
    return tokenizer


def template_turn_end(tokenizer) -> str | None:
    """The special token the chat template puts right after an assistant's answer (<|im_end|>, <|eot_id|>,
    <end_of_turn>, </s>), or None where it puts none or the template cannot say (it refuses the conversation)."""
    marker = "\uE000align-answer-end\uE000"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}],
                                             tokenize=False)
    except Exception:  # a template's own raise_exception (roles it refuses) or a Jinja error: nothing to learn
        return None
    if not isinstance(text, str) or marker not in text:
        return None
    after = tokenizer(text.split(marker, 1)[1], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    if not after or after[0] not in special:
        return None
    return tokenizer.convert_ids_to_tokens(after[0])


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


def load_base_model(cfg: ModelConfig, plan: DevicePlan, *, auto_class=None, training: bool = True,
                    trainer_places: bool | None = None, **kwargs):
    """The base model as the plan says: 4-bit (prepared for k-bit training) or plain.

    `trainer_places` (default: `training`): a Trainer will place the model. Under FSDP or DeepSpeed
    it shards an unquantized model from the host (FSDP2's fully_shard moves each shard to the GPU),
    so it is left there: moved whole to every GPU first, a base that only fits sharded would not fit.
    `align ppo`'s own loop is not a Trainer and says False."""
    from transformers import AutoModelForCausalLM

    auto_class = auto_class or AutoModelForCausalLM
    path = resolve_model_path(cfg.name)
    extra = dict(kwargs)
    if cfg.attn_implementation:
        extra["attn_implementation"] = cfg.attn_implementation
    if plan.quantize:
        extra["quantization_config"] = bnb_config(plan, cfg.double_quant)
    if plan.device == "cuda":
        from align.gpu_training import sharded

        if plan.quantize or not sharded():
            # Loaded straight onto this process's GPU, with no copy in host RAM first (a 7B model in bf16 is 14 GB).
            # Under accelerate launch the trainer has not pinned this process's GPU yet when the model loads:
            # LOCAL_RANK says which one is ours (0 when launched alone). An unquantized model under FSDP or
            # DeepSpeed loads as they expect, without a device map (ZeRO-3 refuses one), on the host.
            extra["device_map"] = {"": _local_gpu()}
    placed_here = not (training if trainer_places is None else trainer_places)
    with _whole_on_every_rank(placed_here):
        model = auto_class.from_pretrained(path, dtype=plan.compute_dtype, **extra)
    # (A Trainer's FSDP fills such weights from the first rank: only a model it will not wrap is checked.)
    on_meta = placed_here and next((name for name, p in model.named_parameters() if p.device.type == "meta"), None)
    if on_meta:
        raise RuntimeError(f"{cfg.name}: {on_meta} was left on the meta device when it loaded (no weights); with "
                           "FSDP's cpu_ram_efficient_loading the ranks but the first load nothing until FSDP "
                           "wraps the model")
    if plan.quantize and training:
        prepare_4bit_for_training(model, plan)
        keep_4bit_backward(model)  # an evaluation must not switch the 4-bit layers to a kernel without backward
    elif plan.quantize and plan.compute_dtype == torch.float16:
        upcast_beside_4bit(model)  # as prepare_4bit_for_training's fp16 path: scored and sampled as trained
    if plan.device == "cuda" and "device_map" not in extra and placed_here:
        model.to(f"cuda:{_local_gpu()}")  # sharded, and no Trainer to place it: whole on this process's GPU
    return model


@contextmanager
def _whole_on_every_rank(whole: bool):
    """Loads within it give every rank the whole model when `whole` (no Trainer will wrap it: a reward model
    scoring for GRPO, eval's policies). Under FSDP with cpu_ram_efficient_loading (accelerate's
    FSDP_CPU_RAM_EFFICIENT_LOADING, fsdp.yaml's) transformers loads the weights on the first rank of each
    machine only, for FSDP to send the others; with no FSDP to come, a weight the checkpoint lacks (a
    classifier's fresh score head) stayed on the meta device on the other ranks, and the first use failed."""
    key = "FSDP_CPU_RAM_EFFICIENT_LOADING"
    before = os.environ.get(key)
    if whole and before is not None:
        os.environ[key] = "false"
    try:
        yield
    finally:
        if whole and before is not None:
            os.environ[key] = before


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


def upcast_beside_4bit(model) -> None:
    """Every fp16 weight of a 4-bit model that is not 4-bit (embedding, norms, LM or score head) in fp32, as peft's
    prepare_model_for_kbit_training casts them for training under fp16 compute: the residual stream then runs in
    fp32 and only the 4-bit matmuls in fp16. Loaded for inference without it (a reward model scoring for PPO or
    eval, a policy sampling), the same weights computed otherwise than they trained, in fp16 throughout, and a
    base with large activations could overflow fp16's 65504 there only."""
    for param in model.parameters():
        if param.dtype == torch.float16 and param.__class__.__name__ != "Params4bit":
            param.data = param.data.float()


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


def merges_exactly(model) -> bool:
    """Whether folding LoRA into this peft model's base weights keeps the update: every adapted layer's base is a
    plain float32 tensor. Into a bf16 base most of an update's entries round away (76 % of an SFT adapter's,
    measured on the embedded model) and into a 4-bit one it is re-quantized; a 4-bit base on CUDA with fp32
    compute stores its packed weights as float32 (bnb_config), known by bitsandbytes' quantization state."""
    bases = [m.base_layer.weight for m in model.modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")]
    return bool(bases) and all(w.dtype == torch.float32 and not hasattr(w, "quant_state") for w in bases)


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
