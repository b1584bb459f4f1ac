"""What `align serve` serves: the adapters of a run on their one base, and vLLM's command for them.

    models = served_models(cfg)          # {"sft": Path(...), "dpo": ..., "round-1/dpo": ...}
    base = shared_base(models, cfg)      # the base model they were all trained on, or a named error

A request's `model` is a name from `served_models`, or `base` (the base model with every adapter
disabled). The run's own adapters are found through the stage registry: each finished policy
stage (align.artifacts.stages_of_kind("policy"): sft, dpo, ppo, grpo, rloo) by its name, a
later round's as `round-<r>/<stage>`; `adapters={name: folder}` adds others. A stage folder
without align.json is unfinished (still training, or stopped) and is left out with a warning.

No torch here: the CLI's checks (align.preflight) read these before anything heavy is
imported. The model side is align.chat_engine, the HTTP side align.openai_api.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

from align import StageError
from align.artifacts import MANIFEST, later_rounds, stage_dir, stages_of_kind
from align.config import ConfigError
from align.embedded import model_key

log = logging.getLogger(__name__)

BASE = "base"  # the name of the base model with the adapters disabled
API_KEY_ENV = "ALIGN_SERVE_API_KEY"
# A model name travels in JSON and shows in the Playground's dropdowns: letters, digits and ._/- only.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,63}")


def served_models(cfg: Any, *, warn: bool = True) -> dict[str, Path]:
    """name -> adapter folder: the run's finished policy adapters (if cfg.discover), then cfg.adapters."""
    found: dict[str, Path] = {}
    if cfg.discover and Path(cfg.run.dir).is_dir():
        roots = [("", Path(cfg.run.dir))] + [(f"{r.name}/", r) for r in later_rounds(cfg.run.dir)]
        for prefix, root in roots:
            for stage in stages_of_kind("policy"):
                folder = stage_dir(root, stage)
                if not (folder / "adapter_config.json").is_file():
                    continue
                if not (folder / MANIFEST).is_file():
                    if warn:
                        log.warning("left out %s: unfinished (no %s; still training, or stopped)", folder, MANIFEST)
                    continue
                found[prefix + stage] = folder
    for name, folder in (cfg.adapters or {}).items():
        if not NAME.fullmatch(name):
            raise ConfigError(f"adapters.{name}: a model name is 1-64 letters, digits and . _ / - (starting with a "
                             "letter or digit)")
        if name == BASE:
            raise ConfigError(f"adapters.{name}: `{BASE}` is the base model with the adapters disabled; choose "
                             "another name")
        if name in found:
            raise ConfigError(f"adapters.{name}: the run already serves {found[name]} as {name!r}; choose another "
                             "name (or discover=false)")
        found[name] = Path(folder)
    return found


def adapter_base(folder: str | Path) -> str:
    """The base model an adapter was trained on: its align.json's logical name, else peft's path."""
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        base = json.loads((folder / MANIFEST).read_text()).get("base_model")
        if base:
            return base
    return json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""


def shared_base(models: dict[str, Path], cfg: Any) -> str:
    """The base every served adapter was trained on (as they name it). A ConfigError when they differ or
    model.name is another model; a StageError when there is nothing to serve (an adapter to train first)."""
    if not models:
        if cfg.model.name != "auto":
            return cfg.model.name  # the base alone, as `base`
        where = f"in {cfg.run.dir}" if cfg.discover else "(discover=false)"
        raise StageError(f"no finished adapter {where} to serve: train one (`align sft run.dir={cfg.run.dir}`), "
                         "pass adapters={name: folder}, or model.name=<model> to serve a base model alone")
    bases = {name: adapter_base(folder) for name, folder in models.items()}
    groups: dict[str, list[str]] = {}
    for name, base in bases.items():
        groups.setdefault(model_key(base), []).append(name)
    if len(groups) > 1:
        listed = "; ".join(f"{', '.join(names)} on {bases[names[0]]}" for names in groups.values())
        raise ConfigError(f"the adapters are on different base models ({listed}): one server holds one base; serve "
                         "each base's adapters with its own `align serve` (adapters={...}, discover=false)")
    base = next(iter(bases.values()))
    if cfg.model.name != "auto" and model_key(cfg.model.name) != next(iter(groups)):
        raise ConfigError(f"model.name={cfg.model.name}: the adapters were trained on {base}; leave model.name=auto "
                         "(their base) or serve adapters of that model")
    return base


def is_loopback(host: str) -> bool:
    """Only this machine can reach an address that is loopback: `localhost`, 127.0.0.0/8, ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost: it may resolve to anything


def api_key(cfg: Any) -> str | None:
    """The key clients must send: `api_key` in the config, else $ALIGN_SERVE_API_KEY, else none.

    Without the spaces or newline a pasted key may carry: a client's header loses them on the way (HTTP
    strips a header value), so a key kept with them would refuse everyone. Blank stays "" (too short)."""
    key = cfg.api_key or os.environ.get(API_KEY_ENV)
    return key.strip() if key else None


def url_host(host: str) -> str:
    """The host as a client puts it in a URL: a wildcard address is reached through loopback on this machine."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


# ---------------------------------------------------------------------------- vLLM

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM's LoRA kernels are built for


def vllm_command(models: dict[str, Path], base: str, cfg: Any, port: int) -> list[str]:
    """`vllm serve` for one base with every adapter as a LoRA module: the same names as the transformers
    backend (`base` and the adapters'), the same limits where vLLM has them.

    The API key is not on it (argv is visible to every user of the machine): vLLM reads VLLM_API_KEY,
    which align/recipes/serve.py sets in the child's environment.
    """
    from align.modeling import resolve_model_path

    # as the transformers backend loads it: `~/models/x` expanded (vLLM took it for a Hub id), the embedded names
    path = resolve_model_path(base)
    ranks = [json.loads((Path(f) / "adapter_config.json").read_text()).get("r", 8) for f in models.values()]
    rank = max(ranks, default=8)
    rank = next((r for r in VLLM_LORA_RANKS if r >= rank), rank)
    context = cfg.limits.max_prompt_tokens + cfg.limits.max_tokens
    positions = _max_positions(path)
    warn_past_context(cfg.limits, positions, base)
    command = [sys.executable, "-P", "-m", "vllm.entrypoints.cli.main", "serve", path,  # -P: no ./vllm/ in its way
               "--served-model-name", BASE, "--host", cfg.host, "--port", str(port),
               "--max-model-len", str(min(context, positions) if positions else context),
               "--gpu-memory-utilization", str(cfg.generation.vllm_gpu_memory_utilization),
               # A request's defaults are serve's generation section, as on the transformers backend, not the
               # sampling settings a model folder's generation_config.json may carry. vLLM takes max_new_tokens
               # as a ceiling of every request's max_tokens (vllm/entrypoints/utils.py get_max_tokens), not a
               # default: limits.max_tokens, the ceiling the transformers backend enforces too.
               "--generation-config", "vllm", "--override-generation-config", json.dumps(
                   {"temperature": cfg.generation.temperature, "top_p": cfg.generation.top_p,
                    "max_new_tokens": cfg.limits.max_tokens}),
               # No cross-site page may call it (vLLM's CORS default allows every origin)
               "--allowed-origins", "[]"]
    if models:
        # The first adapter's tokenizer: align's stages save it beside each adapter with the chat template the
        # adapter was trained with (a base without one gets ChatML), as the transformers backend uses.
        command += ["--tokenizer", str(Path(next(iter(models.values()))).resolve()),
                    "--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(len(models)),
                    "--lora-modules", *(json.dumps({"name": name, "path": str(Path(folder).resolve()),
                                                    "base_model_name": BASE})
                                        for name, folder in models.items())]
    if cfg.model.quantize:
        command += ["--quantization", "bitsandbytes"]
    if cfg.model.compute_dtype != "auto":
        command += ["--dtype", cfg.model.compute_dtype]
    return command


def warn_past_context(limits: Any, positions: int | None, base: str) -> None:
    """A warning at start (not an error: the limits are only ceilings) when a request within
    limits.max_prompt_tokens and limits.max_tokens can still be longer than the base's context."""
    if positions and limits.max_prompt_tokens + limits.max_tokens > positions:
        log.warning("limits.max_prompt_tokens=%d + limits.max_tokens=%d is more than the %d positions of %s: a "
                    "request for both is refused (a 400), one that leaves out max_tokens "
                    "gets what the context leaves; set the two to %d or less in all for limits that say so",
                    limits.max_prompt_tokens, limits.max_tokens, positions, base, positions)


def _max_positions(model_path: str) -> int | None:
    """The base's positions, from its folder's config.json or, for a Hub id, the config.json vLLM will read
    (from the Hugging Face cache, downloaded when online: vLLM downloads the model then anyway). Without it
    vLLM would be handed limits' context, which it refuses past the model's own unless told otherwise."""
    from align.preflight import model_config

    values = model_config(model_path, download=True)
    if values is None:
        log.warning("the positions of %s are unknown (no config.json in a folder, the Hugging Face cache or, "
                    "online, the Hub): vLLM gets --max-model-len limits.max_prompt_tokens + limits.max_tokens "
                    "and refuses it if the model has fewer", model_path)
        return None
    for section in (values, values.get("text_config") or {}):  # text_config: a multimodal model's language part
        value = section.get("max_position_embeddings", section.get("n_positions"))  # n_positions: GPT-2's name
        if isinstance(value, int):
            return value
    return None
