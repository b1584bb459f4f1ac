"""What the benchmark scripts share: the device both sides run on, peak memory, the matmul peak,
and larger stand-in models built from config (no Hub needed).

On CUDA both sides get what `align`'s device plan picks there (bf16 compute, gradient
checkpointing, the 4-bit base in bf16 storage) and peak memory is `torch.cuda.max_memory_allocated`;
on CPU, fp32 without checkpointing and the process's peak RSS.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

# Llama-architecture sizes around SmolLM2's family (vocabulary 49152, tied embeddings), for timing:
# random weights do the same FLOPs as trained ones.
SIZES = {
    "0.5b": {"hidden_size": 1152, "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
             "num_key_value_heads": 4},  # ~0.45B parameters
    "1.5b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
             "num_key_value_heads": 8},  # ~1.56B parameters
}


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def compute_dtype():
    import torch

    return torch.bfloat16 if cuda() and torch.cuda.is_bf16_supported() else torch.float32


def trl_device_args() -> dict:
    """TRL config arguments matching align's DevicePlan on this machine."""
    import torch

    return {"use_cpu": not cuda(), "bf16": compute_dtype() == torch.bfloat16, "gradient_checkpointing": cuda()}


def model_kwargs(quantize: bool, **extra) -> dict:
    """from_pretrained arguments for the plain-TRL side: the dtype, and the 4-bit config as align's."""
    import torch
    from transformers import BitsAndBytesConfig

    kwargs = {"dtype": compute_dtype(), **extra}
    if quantize:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(),
            bnb_4bit_quant_storage=compute_dtype() if cuda() else torch.uint8)
    if cuda():
        kwargs["device_map"] = {"": 0}
    return kwargs


def peak_memory_mib() -> float:
    import torch

    if cuda():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_label() -> str:
    return "peak GPU MiB" if cuda() else "peak RSS MiB"


def matmul_peak_gflops(reps: int = 10) -> float:
    """The machine's dense matmul rate in the compute dtype: fp32 2048² on CPU, bf16 8192² on CUDA."""
    import torch

    n = 8192 if cuda() else 2048
    device = "cuda" if cuda() else "cpu"
    a = torch.randn(n, n, device=device, dtype=compute_dtype())
    b = torch.randn(n, n, device=device, dtype=compute_dtype())
    a @ b
    if cuda():
        torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(reps):
        a @ b
    if cuda():
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - began) / 1e9


def n_params(model_name: str) -> int:
    """The model's parameters (the tied embedding once), counted on the meta device: no weights load."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from alignment.modeling import resolve_model_path

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model_path(model_name)))
    return sum(p.numel() for p in model.parameters())


def sized_model(size: str) -> str:
    """A folder with a randomly initialised model of `size` and the embedded model's tokenizer, built once."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from alignment.embedded import embedded_model_dir

    base = embedded_model_dir()
    folder = base.parent / f"bench-{size}"
    if (folder / "config.json").is_file():
        return str(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    small = LlamaConfig.from_pretrained(str(base))
    config = LlamaConfig(**{**small.to_dict(), **SIZES[size], "torch_dtype": "bfloat16"})
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = Path(str(folder) + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    print(f"built {size} stand-in: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters in {folder}")
    return str(folder)
