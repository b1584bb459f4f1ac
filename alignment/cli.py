"""`align <stage> --config F.yaml key.sub=value ...`: the one place that knows every stage.

    align sft --config configs/quickstart/sft.yaml train.max_steps=20
    align label users add alice --admin
    align --help
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import logging
import os
import socket
import sys
import typing
from pathlib import Path

# stage -> (recipe module, config class in alignment.config, one-line help). A None module is a
# stage that is planned but not built yet: it says so and exits non-zero instead of pretending.
STAGES: dict[str, tuple[str | None, str | None, str]] = {
    "sft": ("recipes.sft", "SFTStageConfig", "instruction SFT with QLoRA (4-bit base + LoRA), LoRA or DoRA"),
    "sample": ("recipes.sample", "SampleStageConfig", "sample K responses per prompt into the labelling store"),
    "label": ("labeling.cli", None, "the labelling app (Gradio), accounts, simulated annotators"),
    "export": ("recipes.export", "ExportStageConfig", "rankings -> preference dataset (prompt/chosen/rejected)"),
    "reward": ("recipes.reward", "RewardStageConfig", "train a reward model on the preferences (Bradley-Terry)"),
    "dpo": ("recipes.dpo", "DPOStageConfig", "align the policy directly on the preferences (DPO, IPO, ...)"),
    "ppo": ("recipes.ppo", "PPOStageConfig", "align the policy against the reward model (PPO; GRPO/RLOO)"),
    "eval": ("recipes.evaluate", "EvalStageConfig", "win-rate, reward and KL of aligned policies against SFT"),
    "pipeline": ("recipes.pipeline", "PipelineConfig", "run every stage in one run directory, resumable"),
    "merge": ("recipes.merge", "MergeStageConfig", "merge an adapter into its base for deployment"),
}

USAGE = """usage: align <stage> [--config FILE.yaml] [section.key=value ...]
       align <stage> --help      the stage's config keys and defaults

stages:
{stages}

Run directory: every stage writes to <run.dir>/<stage>/ (default runs/quickstart) and reads its
input from the upstream stage's folder there, so `run.dir=runs/NAME` is the only path you need.
"""


def setup_environment() -> None:
    """Settings a user should not have to know, applied before torch is imported."""
    # With OpenMP's default spin-waiting a CPU step went from 0.09 s to 2-4 s whenever another
    # process used a core; passive waiting costs nothing measurable when the machine is idle.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "HF_HUB_OFFLINE" not in os.environ and not _hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"
    # bitsandbytes (>= 0.49), on a CPU with AVX512-BF16, tries on import to fetch a faster 4-bit
    # matmul from the Hub through the `kernels` package, and warns when it cannot: align does not
    # install `kernels`, usually runs offline, and never uses that kernel (it serves bitsandbytes'
    # inference path, which training turns off; bitsandbytes falls back to its own). That one
    # message is dropped; every other bitsandbytes warning still shows.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_no_kernels_hub_notice)


def _no_kernels_hub_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


def _hub_reachable(timeout: float = 1.5) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def describe_config(cls: type, prefix: str = "") -> list[str]:
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            lines.extend(describe_config(kind, f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        from alignment.config import describe_field

        lines.append(f"  {prefix}{f.name} = {default!r}    {describe_field(f, kind)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        stages = "\n".join(f"  {name:<9} {text}" for name, (_, _, text) in STAGES.items())
        print(USAGE.format(stages=stages))
        return 0 if argv else 2
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"align: unknown stage {stage!r}; stages: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    setup_environment()
    logging.basicConfig(level=logging.INFO, format="align: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    module_name, config_name, _ = STAGES[stage]
    # The recipe (torch, transformers, peft: seconds to import) is imported only to run it: its help
    # and a config that fails its checks need none of it.
    spec = importlib.util.find_spec(module_name) if module_name else None
    if spec is None:
        print(f"align {stage}: not built yet in this version.", file=sys.stderr)
        return 3
    if config_name is None:  # a stage with its own argument parser (the labelling app)
        return importlib.import_module(module_name).main(rest)
    # A recipe may offer plain subcommands beside training, e.g. `align reward score ...`.
    if rest and not rest[0].startswith("-") and "=" not in rest[0]:
        subcommands = getattr(importlib.import_module(module_name), "SUBCOMMANDS", {})
        if rest[0] in subcommands:
            return subcommands[rest[0]](rest[1:])

    from alignment import config as config_module

    cls = getattr(config_module, config_name)
    if "-h" in rest or "--help" in rest:
        doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8"))) if spec.origin else None
        print(f"usage: align {stage} [--config FILE.yaml] [section.key=value ...]\n\n{doc or ''}\n")
        print("config keys (defaults):")
        print("\n".join(describe_config(cls)))
        return 0
    config_path, overrides = None, []
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg in ("--config", "-c"):
            if i + 1 >= len(rest):
                print("align: --config needs a file", file=sys.stderr)
                return 2
            config_path, i = rest[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            print(f"align {stage}: unknown option {arg}; use section.key=value overrides", file=sys.stderr)
            return 2
        else:
            overrides.append(arg)
        i += 1

    from alignment import StageError
    from alignment.artifacts import discard_unfinished
    from alignment.config import ConfigError, load_config
    from alignment.data import DataError
    from alignment.preflight import check_stage

    try:
        cfg = load_config(cls, config_path, overrides)
        check_stage(stage, cfg)  # every input, before anything is imported, loaded or written
        module = importlib.import_module(module_name)
        with discard_unfinished(cfg.run.dir, *_outputs(stage, cfg)):
            module.main(cfg)
    except (ConfigError, DataError) as err:
        print(f"align {stage}: error: {err}", file=sys.stderr)
        return 2
    except StageError as err:
        print(f"align {stage}: {err}", file=sys.stderr)
        return 1
    except Exception as err:
        from labeling.store import StoreError  # the labelling store's own: a URL it cannot open

        if not isinstance(err, StoreError):
            raise
        print(f"align {stage}: {err}", file=sys.stderr)
        return 1
    return 0


def _outputs(stage: str, cfg) -> list[str]:
    """Folders a stage may write outside its run directory (see discard_unfinished)."""
    if stage == "merge" and cfg.adapter and not cfg.output:
        return [str(cfg.adapter).rstrip("/") + "-merged"]
    return [cfg.output] if getattr(cfg, "output", None) else []


if __name__ == "__main__":
    sys.exit(main())
