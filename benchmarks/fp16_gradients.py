"""What fp16 compute does to LoRA gradients, with and without loss scaling (why `align ppo` scales its loss
under model.compute_dtype=float16: align/recipes/ppo.py loss_scaler).

    python benchmarks/fp16_gradients.py                      # the embedded model, unquantized base
    python benchmarks/fp16_gradients.py --quantize           # a 4-bit NF4 base, align ppo's default
    python benchmarks/fp16_gradients.py --model path/or/hub-id --factors 1 0.1 0.01

The base is loaded as `align ppo` loads it (align.modeling.load_base_model: on CUDA where there is one; a
4-bit base prepared for training, its embedding, norms and head in fp32 under fp16 compute), with fp32 LoRA
adapters on every linear layer. One batch (8 sequences, 200 tokens) and a PPO-like policy-gradient loss (the
tokens' log-probs times fixed random advantages, the mean over the tokens, times --factors: at 0.1 each token
has the share of the loss it has in a minibatch of 10x the tokens) are backpropagated three ways: fp32 compute,
fp16 compute, and fp16 compute with the loss multiplied by 65536 and the gradients divided back (GradScaler's
start). Printed: each fp16 side's gradient cosine to the fp32 side's, overall and for the first layer, and the
share of fp32-nonzero entries that came out zero.

Measured on the 2-core CPU (2026-12-05, the embedded SmolLM2-135M, LoRA r=16), fp16 / fp16 scaled:

    factor (tokens)     1 (200)         0.1 (2k)        0.01 (20k)      0.001 (200k)
    unquantized base    0.9997 / 1.0000 0.9945 / 1.0000 0.9193 / 1.0000 0.5064 / 1.0000
    4-bit base          0.9976 / 0.9976 0.9977 / 0.9976 0.9950 / 0.9976 0.8262 / 0.9976
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SCALE = 65536.0  # torch.amp.GradScaler's init_scale


def lora_gradients(path: str, batch: dict, advantages, dtype: str, factor: float, scale: float,
                   quantize: bool) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from align.config import ModelConfig
    from align.cpu import keep_trainable_in
    from align.modeling import device_plan, load_base_model

    cfg = ModelConfig(name=path, quantize=quantize, compute_dtype=dtype)
    plan = device_plan(cfg)
    base = load_base_model(cfg, plan, trainer_places=False)  # as align ppo loads it (4-bit: prepared for training)
    torch.manual_seed(0)  # the same LoRA weights on every side (init_lora_weights=False: B nonzero, gradients flow)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                            init_lora_weights=False))
    keep_trainable_in(model, torch.float32)  # fp32 adapters, as align ppo trains them
    out = model(**batch)
    tokens = batch["input_ids"][:, 1:]
    logp = out.logits[:, :-1].float().log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    mask = batch["attention_mask"][:, 1:].float()
    loss = -(logp * advantages[:, 1:] * mask).sum() / mask.sum() * factor
    (loss * scale).backward()
    return {n: p.grad.float() / scale for n, p in model.named_parameters() if p.requires_grad}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="a model folder or Hub id (default: the embedded one)")
    parser.add_argument("--factors", type=float, nargs="+", default=[1.0, 0.1, 0.01, 0.001])
    parser.add_argument("--quantize", action="store_true", help="a 4-bit NF4 base (align ppo's default)")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from align.modeling import resolve_model_path

    path = resolve_model_path(args.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where device_plan puts the model
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = [f"Question {i}: how do I export my notes to a PDF file on my phone? Answer: open Settings, then "
             "Export." for i in range(8)]
    batch = {k: v.to(device) for k, v in tokenizer(texts, return_tensors="pt", padding=True).items()}
    tokens = int(batch["attention_mask"][:, 1:].sum())
    advantages = torch.randn(batch["input_ids"].shape, generator=torch.Generator().manual_seed(0)).to(device)

    def cosine(a: dict, b: dict, names: list[str]) -> float:
        x, y = (torch.cat([g[n].flatten() for n in names]).double() for g in (a, b))
        return torch.nn.functional.cosine_similarity(x, y, dim=0).item()

    base = "a 4-bit NF4 base" if args.quantize else "an unquantized base"
    print(f"model {path} on {device}, {base}: LoRA gradients of fp16 sides against fp32; {tokens} tokens")
    print(f"{'factor':>8} {'side':<16} {'cosine':>8} {'layer 0':>8} {'zeroed':>8}")
    for factor in args.factors:
        ref = lora_gradients(path, batch, advantages, "float32", factor, 1.0, args.quantize)
        names = list(ref)
        first = [n for n in names if ".layers.0." in n]
        nonzero = sum(int((ref[n] != 0).sum()) for n in names)
        for label, scale in (("fp16", 1.0), (f"fp16 x{SCALE:.0f}", SCALE)):
            grads = lora_gradients(path, batch, advantages, "float16", factor, scale, args.quantize)
            zeroed = sum(int(((grads[n] == 0) & (ref[n] != 0)).sum()) for n in names) / nonzero
            print(f"{factor:>8g} {label:<16} {cosine(grads, ref, names):>8.4f} {cosine(grads, ref, first):>8.4f} "
                  f"{zeroed:>8.2%}", flush=True)


if __name__ == "__main__":
    main()
