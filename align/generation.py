"""Load a policy (adapter folder, merged model or model name) and sample from it in batches.

Generation is most of RLHF's wall time, so prompts go through `generate` in batches, left
padded (decoder-only models continue from the right edge), with the KV cache on, and finished
sequences stop at EOS; `generate_answers` also says of each answer whether it ended (EOS) or was
cut at `max_new_tokens`, which `align sample` records for export and DPO. Seeds are per batch, so two policies sampled with the same settings see
the same random stream: the comparison in `align eval` is paired.

On a GPU with vLLM installed, `generation.backend=vllm` samples with vLLM's engine instead: one
engine per base model, each adapter served through vLLM's LoRA support (a LoRARequest per
adapter folder), prompts tokenized here exactly as for transformers, a seed per prompt.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm
from transformers import (
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from align.artifacts import system_prompt_of
from align.config import GenerationConfig, ModelConfig
from align.cpu import keep_4bit_for_dora
from align.modeling import (
    DevicePlan,
    adapter_base_name,
    is_adapter_dir,
    load_base_model,
    load_tokenizer,
    merges_exactly,
    require_cuda_package,
)

log = logging.getLogger(__name__)


class Answer(NamedTuple):
    text: str
    finished: bool  # ended with EOS; False when cut at max_new_tokens


@dataclass
class Policy:
    model: torch.nn.Module
    tokenizer: object
    source: str  # the folder or name it came from
    base_model: str  # logical base name (for manifests)
    system_prompt: str | None = None  # the one it was trained with (sft.data.system_prompt): every prompt gets it
    # How generation.backend=vllm loads the base: 4-bit as the stage's plan loads it (model.quantize), and in its
    # model.compute_dtype ("auto": vLLM's choice). Else it sampled from the unquantized base, not the 4-bit one the
    # adapter trained on and eval's KL ran on.
    quantize: bool = False
    compute_dtype: str = "auto"
    # generation.backend=vllm: the largest LoRA rank of every adapter this run samples on the same base (eval's
    # policies), so that the engine, built at the first, takes the rest; None: this adapter's own
    max_lora_rank: int | None = None


def stop_ids(tokenizer, generation_config=None) -> list[int]:
    """The token ids that end an answer: the tokenizer's EOS and every EOS of the model's generation config
    (Llama 3's `<|eot_id|>` beside `<|end_of_text|>`, Qwen's `<|im_end|>` beside `<|endoftext|>`), as
    `generate()` and vLLM stop at by default. Stopping at the tokenizer's alone ran an instruct model that
    ends its turns with another of them on to `max_new_tokens`, and counted its finished answers as cut."""
    found = generation_config.eos_token_id if generation_config is not None else None
    ids = [tokenizer.eos_token_id] + (found if isinstance(found, list) else [found])
    return sorted({i for i in ids if i is not None})


def load_policy(source: str | Path, model_cfg: ModelConfig, plan: DevicePlan, *, load_model: bool = True) -> Policy:
    """An adapter folder (base + adapter), or anything `from_pretrained` takes, ready to generate, with the
    system prompt its manifest names (none for a model without one).

    ``load_model=False``: the tokenizer only (vLLM loads the weights itself)."""
    from dataclasses import replace

    source = str(source)
    vllm = {"quantize": plan.quantize, "compute_dtype": model_cfg.compute_dtype}
    if not load_model:
        base_name = adapter_base_name(source) if is_adapter_dir(source) else source
        return Policy(None, load_tokenizer(source), source, base_name, system_prompt_of(source), **vllm)
    if is_adapter_dir(source):
        from peft import PeftModel

        base_name = adapter_base_name(source)
        base = load_base_model(replace(model_cfg, name=base_name), plan, training=False)
        model = PeftModel.from_pretrained(base, source)
        keep_4bit_for_dora(model)  # else on CPU DoRA reads the 4-bit weights wrongly once they are repacked
        if merges_exactly(model):
            # Sampling only: fold LoRA into the weights (one matmul per layer instead of three, ~15% faster
            # decoding on CPU). Only into an fp32 base: into a bf16 or 4-bit one it would round the update away.
            model = model.merge_and_unload()
        tokenizer = load_tokenizer(source)
    else:
        base_name = source
        model = load_base_model(replace(model_cfg, name=source), plan, training=False)
        tokenizer = load_tokenizer(source)
    model.eval()
    return Policy(model, tokenizer, source, base_name, system_prompt_of(source), **vllm)


@contextmanager
def folded(model, adapter: str):
    """`adapter` of a peft model with several, active and, for the block, folded into the base weights
    (peft's merge_adapter), unfolded after: decoding runs one matmul per layer instead of three, ~20 %
    faster on a CPU (eval's answers and KL samples, 2 CPU cores). Only on a float32 base that is not
    quantized (modeling.merges_exactly): unfolding there gives the weights back to float32 rounding, while on a
    bf16 or 4-bit base every fold would leave its rounding in the weights every other adapter (the reference)
    runs on."""
    model.set_adapter(adapter)
    if not merges_exactly(model):
        yield model
        return
    model.merge_adapter([adapter])
    try:
        yield model
    finally:
        model.unmerge_adapter()


@contextmanager
def plain_sampling(model):
    """Within the block, generate() samples from softmax(logits / temperature) with only the knobs a call
    passes: generate() fills every knob a call leaves unset from the model folder's
    generation_config.json (a repetition_penalty, typical_p, min_p, no_repeat_ngram_size ... some models
    ship), which is swapped for a bare one here. For samples whose log-probs are computed from the plain
    softmax: PPO's rollouts, eval's KL; and for the answers of `align sample`, `align eval` and `align serve`,
    which follow their generation settings alone (Qwen2.5's folder adds repetition_penalty 1.05 to every call).
    Callers still pass top_k (None or 0), whose library default is 50.
    """
    from transformers import GenerationConfig

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    shipped = inner.generation_config
    inner.generation_config = GenerationConfig(bos_token_id=shipped.bos_token_id, eos_token_id=shipped.eos_token_id,
                                               pad_token_id=shipped.pad_token_id)
    try:
        yield
    finally:
        inner.generation_config = shipped


class NucleusFilter(TopPLogitsWarper):
    """transformers' top-p filter keeping the same tokens, without sorting the whole vocabulary at every step.

    TopPLogitsWarper sorts every row's logits (49k for the embedded model) at each decoding step: 22 s of
    the quickstart's 100 s of sampling on 2 CPU cores. A nucleus almost always lies among the likeliest few
    hundred tokens, so this ranks only the top `candidates` and keeps each token while the probability
    ranked above it is under top_p (TopPLogitsWarper's rule, counted from the top instead of the bottom);
    a row whose nucleus reaches past them is filtered by TopPLogitsWarper itself. Only a token within
    float rounding of the threshold could land on the other side; the quickstart's samples are byte-identical.
    """

    candidates = 256

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        k = min(self.candidates, scores.shape[-1])
        top, order = scores.softmax(dim=-1).topk(k, dim=-1)
        keep = top.cumsum(dim=-1) - top < self.top_p
        keep[..., :self.min_tokens_to_keep] = True
        remove = torch.ones_like(scores, dtype=torch.bool).scatter_(-1, order, ~keep)
        wide = keep[..., -1].nonzero().squeeze(-1) if k < scores.shape[-1] else []
        if len(wide):  # the nucleus may reach past the candidates: the full sort for those rows
            remove[wide] = super().__call__(input_ids[wide], scores[wide]) == self.filter_value
        return scores.masked_fill(remove, self.filter_value)


def sampling_warpers(gen: GenerationConfig) -> LogitsProcessorList:
    """What generate() would add for `gen`'s temperature and top_p (called with both at 1, so that it adds
    neither), in its order, with top-p as NucleusFilter."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(gen.temperature)])
    if gen.top_p < 1:
        warpers.append(NucleusFilter(gen.top_p))
    return warpers


class DecodingProgress(StoppingCriteria):
    """A progress bar moved by generate() at each decoding step (a token for every sequence of the batch), never
    stopping it. A bar counted in batches sat at 0/1 for the whole of a batch of every prompt: the quickstart's
    eval decodes its 48 prompts in one, 126 s of its 150. `decoding(bar, max_new_tokens)` opens one batch."""

    def __init__(self, bar) -> None:
        self.bar, self.steps, self.none = bar, 0, None

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self.bar.update(1)
        self.steps += 1
        if self.none is None or self.none.shape[0] != input_ids.shape[0]:  # one tensor per batch, not per step
            self.none = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return self.none

    @contextmanager
    def decoding(self, max_new_tokens: int):
        """One generate() call: what it leaves of its max_new_tokens steps (every sequence ended early) is
        counted when it returns, so the bar's total is the batches' steps."""
        self.steps = 0
        yield StoppingCriteriaList([self])
        if self.steps < max_new_tokens:
            self.bar.update(max_new_tokens - self.steps)


def chat_prompt(tokenizer, prompt: str, system_prompt: str | None = None) -> str:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def generate(policy: Policy, prompts: list[str], gen: GenerationConfig, *, k: int = 1,
             system_prompt: str | None = None, desc: str | None = "sampling") -> list[list[str]]:
    """k responses for each prompt (a list of k strings per prompt), in prompt order, each prompt after
    the policy's system prompt (``system_prompt`` overrides it).

    ``desc=None`` shows no progress bar (for a caller that keeps its own)."""
    answers = generate_answers(policy, prompts, gen, k=k, system_prompt=system_prompt, desc=desc)
    return [[a.text for a in row] for row in answers]


@torch.no_grad()
def generate_answers(policy: Policy, prompts: list[str], gen: GenerationConfig, *, k: int = 1,
                     system_prompt: str | None = None, desc: str | None = "sampling") -> list[list[Answer]]:
    """`generate`, each answer with whether it ended (sampled EOS) or was cut at gen.max_new_tokens."""
    system_prompt = system_prompt if system_prompt is not None else policy.system_prompt
    if gen.backend == "vllm":
        return vllm_generate(policy, prompts, gen, k=k, system_prompt=system_prompt, desc=desc)
    tokenizer, model = policy.tokenizer, policy.model
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    eos = stop_ids(tokenizer, model.generation_config)
    outputs: list[list[Answer]] = []
    batches = range(0, len(prompts), gen.batch_size)
    # by decoding step (max_new_tokens a batch): a batch of every prompt moves the bar as it decodes
    bar = tqdm(total=len(batches) * gen.max_new_tokens, desc=desc, unit="token", disable=desc is None)
    progress = DecodingProgress(bar)
    for b, start in enumerate(batches):
        chunk = prompts[start:start + gen.batch_size]
        texts = [chat_prompt(tokenizer, p, system_prompt) for p in chunk]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        torch.manual_seed(gen.seed + b)
        sample = gen.temperature > 0
        with plain_sampling(model), progress.decoding(gen.max_new_tokens) as stopping:
            out = model.generate(
                **enc,
                max_new_tokens=gen.max_new_tokens,
                do_sample=sample,
                # generate()'s own warpers off: sampling_warpers adds them, with top-p as NucleusFilter
                temperature=1.0 if sample else None,
                top_p=1.0 if sample else None,
                logits_processor=sampling_warpers(gen) if sample else None,
                top_k=None,  # passed as None: no top-k (left out, generate() takes 50 or the model folder's)
                num_return_sequences=k,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos,
                stopping_criteria=stopping,
                use_cache=True,
            )
        new = out[:, enc["input_ids"].shape[1]:]
        ended = torch.isin(new, torch.tensor(eos, device=new.device)).any(dim=-1).tolist()  # pad after EOS may be EOS too
        decoded = tokenizer.batch_decode(new, skip_special_tokens=True)
        for i in range(len(chunk)):
            outputs.append([Answer(d.strip(), e) for d, e in zip(decoded[i * k:(i + 1) * k], ended[i * k:(i + 1) * k],
                                                                  strict=True)])
    bar.close()
    return outputs


# ---------------------------------------------------------------------------- vLLM


VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM's LoRA kernels are built for
_engines: dict[str, object] = {}
_adapter_ids: dict[str, int] = {}


def check_backend(gen: GenerationConfig) -> None:
    """`generation.backend` checked against the machine before any model loads: a clear error if it cannot."""
    if gen.backend == "vllm":
        require_cuda_package(
            "vllm",
            no_cuda="generation.backend=vllm needs a CUDA GPU and this machine has none; "
                    "use generation.backend=transformers",
            missing="generation.backend=vllm needs vLLM: pip install vllm (a CUDA machine), "
                    "or use generation.backend=transformers")


def lora_rank(adapter: str | Path) -> int:
    """An adapter folder's LoRA rank (adapter_config.json's r)."""
    import json

    return int(json.loads((Path(adapter) / "adapter_config.json").read_text())["r"])


def vllm_engine(base: str, gen: GenerationConfig, max_lora_rank: int, *, quantize: bool = False,
                dtype: str = "auto"):
    """One vLLM engine per base model folder (and way of loading it), LoRA on, kept for every adapter on that base.

    `quantize`: the base 4-bit as QLoRA trained on it, through vLLM's bitsandbytes in-flight quantization (NF4
    with double quantization), as `align serve` passes --quantization bitsandbytes; `dtype` its compute dtype."""
    from vllm import LLM

    key = f"{base}|{'nf4' if quantize else 'full'}|{dtype}"
    engine = _engines.get(key)
    if engine is None:
        engine = LLM(model=base, enable_lora=True, max_lora_rank=max_lora_rank, max_loras=2, seed=gen.seed,
                     gpu_memory_utilization=gen.vllm_gpu_memory_utilization, dtype=dtype,
                     quantization="bitsandbytes" if quantize else None)
        engine.align_max_lora_rank = max_lora_rank
        _engines[key] = engine
    elif max_lora_rank > engine.align_max_lora_rank:
        from align import StageError

        raise StageError(f"an adapter of rank {max_lora_rank} after one of rank {engine.align_max_lora_rank} on the "
                         "same vLLM engine: sample them in separate runs")
    return engine


def release_vllm_engines() -> None:
    """Drop every vLLM engine (`align pipeline` calls this between stages): each holds
    generation.vllm_gpu_memory_utilization of the GPU, which training stages after sampling need back.
    LLM.shutdown() where the vLLM version has it; otherwise the engine's own teardown when it is collected."""
    for engine in _engines.values():
        if callable(shutdown := getattr(engine, "shutdown", None)):
            shutdown()
    _engines.clear()
    _adapter_ids.clear()


@torch.no_grad()
def vllm_generate(policy: Policy, prompts: list[str], gen: GenerationConfig, *, k: int = 1,
                  system_prompt: str | None = None, desc: str | None = "sampling") -> list[list[Answer]]:
    """`generate_answers` through vLLM: same prompts, token ids and sampling settings; the adapter as a LoRARequest."""

    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from align.modeling import resolve_model_path

    source = policy.source
    adapter = source if is_adapter_dir(source) else None
    rank = 16
    if adapter:
        r = max(lora_rank(adapter), policy.max_lora_rank or 0)
        rank = next((x for x in VLLM_LORA_RANKS if x >= r), r)
    base = resolve_model_path(adapter_base_name(adapter) if adapter else source)
    engine = vllm_engine(base, gen, rank, quantize=policy.quantize, dtype=policy.compute_dtype)
    lora = None
    if adapter:
        key = str(Path(adapter).resolve())
        # Named by its whole path: <run>/dpo and <run>/round-1/dpo are two adapters (vLLM may key on the name).
        lora = LoRARequest(key, _adapter_ids.setdefault(key, len(_adapter_ids) + 1), key)

    from transformers import GenerationConfig as ModelGenerationConfig

    try:
        shipped = ModelGenerationConfig.from_pretrained(base)
    except OSError:  # a model folder without generation_config.json
        shipped = None
    tokenizer = policy.tokenizer
    requests = [{"prompt_token_ids": tokenizer(chat_prompt(tokenizer, p, system_prompt),
                                               add_special_tokens=False)["input_ids"]} for p in prompts]
    sample = gen.temperature > 0
    # A seed per prompt (its index), so two policies sampled with the same settings are paired.
    params = [SamplingParams(n=k, temperature=gen.temperature if sample else 0.0,
                             top_p=gen.top_p if sample else 1.0, max_tokens=gen.max_new_tokens,
                             seed=gen.seed + i, stop_token_ids=stop_ids(tokenizer, shipped),
                             skip_special_tokens=True) for i in range(len(prompts))]
    results = engine.generate(requests, params, lora_request=lora, use_tqdm=desc is not None)
    # finish_reason "stop": EOS (a stop token); "length": cut at max_tokens.
    return [[Answer(c.text.strip(), c.finish_reason == "stop") for c in r.outputs] for r in results]
