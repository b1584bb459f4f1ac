"""`align <stage> --config F.yaml key.sub=value ...`: the command line over the stage registry.

The stages themselves (recipe, config class, folder, ...) are listed once, in
`align.artifacts.STAGES`; this module parses the command line and runs the one asked for.

    align sft --config configs/quickstart/sft.yaml train.max_steps=20
    align label users add alice --admin
    align --help
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import errno
import importlib
import importlib.util
import logging
import os
import re
import signal
import sys
import threading
import typing
import warnings
from contextlib import nullcontext
from pathlib import Path

from align import artifacts, process_rank
from align.artifacts import STAGES, commands, merge_paths, run_stage, shell, stage_dir, store_url

USAGE = """usage: align <stage> [--config FILE.yaml] [section.key=value ...]
       align <stage> --help      the stage's config keys and defaults

stages:
{stages}
{variants}

Run directory: every stage writes to its folder in <run.dir> (default runs/quickstart; <stage>/,
export: preferences/) and reads its input from the upstream stage's folder there, so
`run.dir=runs/NAME` is the only path you need.
"""


def setup_environment() -> None:
    """Settings a user should not have to know, applied before torch is imported."""
    # With OpenMP's default spin-waiting a CPU step went from 0.09 s to 2-4 s whenever another
    # process used a core; passive waiting costs nothing measurable when the machine is idle.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    # vLLM (generation.backend=vllm, align serve's server) sends usage statistics (the machine, GPU, model
    # architecture) to stats.vllm.ai from every engine it starts unless told not to: off like the two above.
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers (>= 5.25, with the `kernels` package it requires) swaps layers of every model it loads on CUDA
    # for kernels it downloads from the Hub (kernels-community/rotary, ...): code fetched and run at load time,
    # whose version can change between two runs of one config, and offline (HF_HUB_OFFLINE, an air-gapped
    # cluster) a ValueError before the first step (every stage failed so on the lent H200). Off unless the user
    # asks for them (USE_HUB_KERNELS=YES); on CPU nothing was swapped (the same logits either way).
    os.environ.setdefault("USE_HUB_KERNELS", "NO")
    if "HF_HUB_OFFLINE" not in os.environ and not _hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"
    # bitsandbytes (>= 0.49), on a CPU with AVX512-BF16, tries on import to fetch a faster 4-bit
    # matmul from the Hub through the `kernels` package (installed since transformers 5.25 requires
    # it), and warns when it cannot; offline, `kernels` first warns that it skips the publisher check
    # of that repository. bitsandbytes falls back to its own kernel (it serves only its inference
    # path, which training turns off). Those two messages are dropped; every other warning of
    # bitsandbytes and `kernels` still shows.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_no_kernels_hub_notice)
    logging.getLogger("kernels._internals.hf_hub").addFilter(_no_kernels_hub_notice)
    # peft reads transformers 5's deprecated `is_gradient_checkpointing` whenever it wraps a model, a
    # FutureWarning in every stage that nothing in a user's config can change. That one is dropped too.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # accelerate's gather_for_metrics, at the end of a loader without a length (the reward stage's: its
    # RankingBatchSampler's batches are of several sizes, so accelerate reads no batch_size), says it cannot
    # drop the last batch's padding; the reward stage's own figures do not depend on it. That one is dropped.
    logging.getLogger("accelerate.accelerator").addFilter(_no_dataset_length_notice)


BNB_KERNEL_REPO = "kernels-community/quantization-bitsandbytes"  # the one bitsandbytes asks `kernels` for


def _no_kernels_hub_notice(record: logging.LogRecord) -> bool:
    message = str(record.msg)
    return not (message.startswith("Failed to load CPU gemm_4bit_forward from kernels-community")
                or message.startswith(f"Skipping publisher trust check for '{BNB_KERNEL_REPO}'"))


def _no_dataset_length_notice(record: logging.LogRecord) -> bool:
    return "The used dataset had no length, returning gathered tensors" not in str(record.msg)


def _hub_reachable(timeout: float = 1.5) -> bool:
    """Whether the Hub huggingface_hub would ask takes a connection: HF_ENDPOINT's (a mirror, a company's own Hub),
    else huggingface.co. Through a proxy (HTTPS_PROXY, ...), as huggingface_hub would go: taken as reachable, not
    asked. Only huggingface.co:443 was tried, directly: behind a proxy, or with a mirror on a cluster that cannot
    reach huggingface.co, every command went offline and a Hub id not yet cached was refused as unreachable.
    At most `timeout` seconds, the name's lookup included (tracking.server_reachable)."""
    from urllib.parse import urlsplit

    from align.tracking import server_reachable

    url = urlsplit((os.environ.get("HF_ENDPOINT") or "https://huggingface.co").strip())
    scheme = url.scheme or "https"
    try:
        port = url.port or (80 if scheme == "http" else 443)
    except ValueError:  # a port that is not a number: huggingface_hub fails on it with its own message
        return True
    return server_reachable(scheme, url.hostname or "huggingface.co", port, timeout)


def describe_config(cls: type, prefix: str = "", defaults=None, hidden: frozenset[str] = frozenset()) -> list[str]:
    """`key = default    (type, range)` per key; a section's defaults are the stage's own (e.g. serve's
    model.name=auto), not the section class's. A key the stage refuses (its `unread_keys`: model.max_length where
    nothing reads it) is left out: listed with its default, it read as a setting of the stage."""
    from align.config import describe_field

    defaults = cls() if defaults is None else defaults
    hidden = hidden | set(getattr(cls, "unread_keys", ()))
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if f.name in hidden:
            continue
        if dataclasses.is_dataclass(kind):
            within = frozenset(k.split(".", 1)[1] for k in hidden if k.startswith(f"{f.name}."))
            lines.extend(describe_config(kind, f"{prefix}{f.name}.", getattr(defaults, f.name), within))
            continue
        lines.append(f"  {prefix}{f.name} = {getattr(defaults, f.name)!r}    {describe_field(f, kind)}")
    return lines


def export_for_label_app(store: str, run_dir: str) -> dict:
    """The labelling app's Export button (align/labeling/ cannot import the recipe, so `align label` hands this in):
    `align export` into <run_dir>/preferences with the settings of the export already there (its
    config.yaml) or the defaults; returns its summary. It runs in a process of its own, so the app
    never loads torch or W&B; a refusal comes back as a ValueError with the stage's own message."""
    import json
    import subprocess
    import tempfile

    import yaml

    from align.labeling.export import check_target

    out = stage_dir(run_dir, "export")
    check_target(out)  # a folder it must not replace: say so now, not after starting a process
    settings = yaml.safe_load((out / "config.yaml").read_text()) if (out / "config.yaml").is_file() else {}
    # Every batch: the batch filter of an earlier `align export batches=[...]` would leave each new batch out
    # of every later export, without a word in the summary.
    settings = {**(settings or {}), "store": store, "output": None, "batches": None}
    settings["run"] = {**(settings.get("run") or {}), "dir": str(run_dir)}
    # A file, not `store=URL` in argv: the URL may hold a password and argv is visible to every user.
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="align-export-") as config:  # mode 0600
        yaml.safe_dump(settings, config)
        config.flush()
        # -P: not the working directory first on sys.path, where a user's own align/ folder would stand in
        # for the installed one
        done = subprocess.run([sys.executable, "-P", "-m", "align.cli", "export", "--config", config.name],
                              capture_output=True, text=True)
    if done.returncode != 0:
        said = [line for line in done.stderr.splitlines() if line.startswith("align export:")]
        raise ValueError((said or done.stderr.strip().splitlines() or ["align export failed"])[-1]
                         .removeprefix("align export:").strip())
    return json.loads((out / "summary.json").read_text())


def export_command(run_dir: str, store: str | None) -> str:
    """`align label`'s next step: `align export` for `run_dir` (and `store`), with the export.yaml beside the
    --config its sample ran with (its manifest's config_file), as every stage's own hint keeps the config family:
    without it, each hinted command after the labels ran on the built-in defaults."""
    command = f"align export run.dir={shell(run_dir)}" + (f" store={shell(store)}" if store else "")
    config = artifacts.sibling_config(stage_dir(run_dir, "sample"), "export")
    return command.replace("align export ", f"align export --config {shell(config)} ", 1) if config else command


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        stages = "\n".join(f"  {s.name:<9} {s.help}" for s in commands())
        variants = "\n".join(f"  {s.name:<9} {s.help}: {s.command}" for s in STAGES.values() if s.runs_as)
        print(USAGE.format(stages=stages, variants=variants))
        return 0 if argv else 2
    stage, rest = argv[0], argv[1:]
    if stage in STAGES and STAGES[stage].runs_as:
        runs_as = STAGES[stage].runs_as[0]
        asked = "-h" in rest or "--help" in rest  # `align <stage> --help`, as README says of every stage listed
        print(f"align: {stage} runs as `{STAGES[stage].command}` (same config, reward and gate)"
              + (f"; `align {runs_as} --help` lists its keys" if asked else ""), file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    if stage not in STAGES:
        variants = ", ".join(f"{s.name} (`{s.command}`)" for s in STAGES.values() if s.runs_as)
        print(f"align: unknown stage {stage!r}; stages: {', '.join(s.name for s in commands())}"
              + (f"; and {variants}" if variants else ""), file=sys.stderr)
        return 2
    setup_environment()
    # Under accelerate launch every process runs this: the main one says what happens, the others only what goes
    # wrong on them (their held-out, probe and progress lines were each printed once per process)
    rank = process_rank()
    logging.basicConfig(level=logging.WARNING if rank else logging.INFO,
                        format=f"align[rank {rank}]: %(message)s" if rank else "align: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    spec = STAGES[stage]
    # The recipe (torch, transformers, peft: seconds to import) is imported only to run it: its help
    # and a config that fails its checks need none of it.
    found = importlib.util.find_spec(spec.recipe)
    if found is None:
        print(f"align {stage}: not built yet in this version.", file=sys.stderr)
        return 3
    if spec.config is None:  # the labelling app parses its own arguments; the run layout is handed to it
        return importlib.import_module(spec.recipe).main(
            rest, store_url=store_url, export_dir=lambda run_dir: stage_dir(run_dir, "export"),
            export=export_for_label_app, export_command=export_command)
    # A recipe may offer plain subcommands beside training, e.g. `align reward score ...`.
    if rest and not rest[0].startswith("-") and "=" not in rest[0]:
        subcommands = getattr(importlib.import_module(spec.recipe), "SUBCOMMANDS", {})
        if rest[0] in subcommands:
            return subcommands[rest[0]](rest[1:])

    from align import config as config_module

    cls = getattr(config_module, spec.config)
    if "-h" in rest or "--help" in rest:
        doc = ast.get_docstring(ast.parse(Path(found.origin).read_text(encoding="utf-8"))) if found.origin else None
        print(f"usage: align {stage} [--config FILE.yaml] [section.key=value ...]\n\n{doc or ''}\n")
        print("config keys (defaults):")
        print("\n".join(describe_config(cls)))
        return 0
    config_path, overrides = None, []
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg in ("--config", "-c") or arg.startswith("--config="):
            if arg.startswith("--config="):
                given, i = arg.split("=", 1)[1], i + 1
                if not given.strip():  # `--config=` read as the folder "." ("a folder, not a config file")
                    print("align: --config needs a file", file=sys.stderr)
                    return 2
            elif i + 1 >= len(rest):
                print("align: --config needs a file", file=sys.stderr)
                return 2
            else:
                given, i = rest[i + 1], i + 2
            if config_path is not None:  # the second replaced the first without a word
                print(f"align {stage}: --config given twice ({config_path}, {given}); a stage reads one config "
                      "file: give one, and the other settings as section.key=value", file=sys.stderr)
                return 2
            config_path = given
            continue
        if arg.startswith("-"):
            print(f"align {stage}: {unknown_option(arg)}", file=sys.stderr)
            return 2
        else:
            overrides.append(arg)
        i += 1

    from align import StageError
    from align.artifacts import discard_unfinished
    from align.config import ConfigError, load_config
    from align.data import DataError
    from align.preflight import check_stage
    from align.tracking import fail_wandb

    # `kill` or a scheduler's stop (SIGTERM) tidies up as Ctrl-C does, instead of leaving the folder behind.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
    try:
        cfg = load_config(cls, config_path, overrides)
        artifacts.config_folder = Path(config_path).parent if config_path else None
        artifacts.config_file = Path(config_path) if config_path else None
        check_stage(stage, cfg)  # every input, before anything is imported, loaded or written
        # A service writes no stage folder; stopped with Ctrl-C it must not tidy up a run that another
        # process (a training stage) is writing beside it.
        with nullcontext() if spec.kind == "service" else discard_unfinished(cfg.run.dir, *_outputs(stage, cfg),
                                                                              command=stage):
            run_stage(stage, cfg)  # `align ppo algo=grpo` runs the grpo stage's recipe
    except (ConfigError, DataError) as err:
        fail_wandb(2)  # a stage's run (opened before the error) is closed as failed, not left to close as finished
        print(f"align {stage}: error: {err}{another_commands_config(config_path, stage, err)}", file=sys.stderr)
        return 2
    except StageError as err:
        fail_wandb(1)
        # "run `align sft run.dir=...` first" keeps the config family this command ran with, as a next: hint does
        # (pasted bare, it ran sft with its built-in defaults, not the quickstart's); not under align pipeline,
        # whose stages take their settings from the pipeline's config
        said = str(err) if stage == "pipeline" else artifacts.with_sibling_configs(str(err))
        print(f"align {stage}: {said}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: the unfinished folder is gone (discard_unfinished said so)
        code = 143 if isinstance(err, Terminated) else 130
        fail_wandb(code)
        print(f"align {stage}: {'terminated' if isinstance(err, Terminated) else 'interrupted'}", file=sys.stderr)
        return code
    except Exception as err:
        from align.labeling.store import StoreError  # the labelling store's own: a URL it cannot open

        fail_wandb(1)
        said = disk_error(err) or wandb_error(err)
        if said is None and not isinstance(err, StoreError):
            raise
        print(f"align {stage}: {said or err}", file=sys.stderr)
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


def another_commands_config(path: str | None, stage: str, err: Exception) -> str:
    """A hint when `path`, refused for an unknown top-level key, is another command's config: `align sft --config
    pipeline.yaml` said only "unknown key 'stages'", naming neither the file nor what it is for."""
    if not path or not re.match(r"unknown key '[^.']+';", str(err)):
        return ""
    try:
        import yaml

        keys = set(yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {})
    except Exception:  # noqa: BLE001 - a hint only: the error above stands as it is
        return ""
    from align import config as config_module

    fits = [spec.command for spec in STAGES.values() if spec.config and spec.name != stage and not spec.runs_as
            and keys <= {f.name for f in dataclasses.fields(getattr(config_module, spec.config))}]
    return f" ({path} is a config of {' or '.join(fits)}: give align {stage} its own)" if fits else ""


OPTIONS = ("--config", "--help")


def unknown_option(arg: str) -> str:
    """What `align <stage>` says of an option it does not take: the closest it does, and all it does."""
    close = difflib.get_close_matches(arg.split("=", 1)[0], OPTIONS, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown option {arg}{hint}; options: {', '.join(OPTIONS)}; settings are section.key=value"


_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def disk_error(err: BaseException) -> str | None:
    """A full disk or a refused read/write (a stage's weights, checkpoint or report), said in one line with its file,
    in place of a traceback through safetensors or the Trainer; None for any other error. The state left behind is
    as after Ctrl-C: the unfinished folder gone, its checkpoints kept."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _DISK:
            where = f"{seen.filename}: " if seen.filename else ""
            return f"{where}{seen.strerror or seen} (free space or fix the permissions, then run it again)"
        seen = seen.__cause__ or seen.__context__
    if "No space left on device" in str(err) or "Disk quota exceeded" in str(err):  # safetensors' own error
        return f"{str(err).strip()} (free space, then run it again)"
    return None


def wandb_error(err: BaseException) -> str | None:
    """W&B's own error (wandb.errors.Error: a run it could not start, a request its server refused), said in one
    line naming run.wandb, in place of its traceback (wandb.init's "user is not logged in" for a key the server
    refuses, where the preflight could not ask); None for any other error. Nothing imports wandb to ask."""
    errors = sys.modules.get("wandb.errors")
    seen = err
    while errors is not None and seen is not None:
        if isinstance(seen, errors.Error):
            return (f"W&B: {' '.join(str(seen).split()) or type(seen).__name__} (run.wandb=offline logs without the "
                    "server; upload later with `wandb sync`)")
        seen = seen.__cause__ or seen.__context__
    return None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the stage is, so that it unwinds as Ctrl-C does."""


def _terminated(signum, frame) -> None:
    raise Terminated


def _outputs(stage: str, cfg) -> list[str]:
    """Folders a stage may write outside its run directory (see discard_unfinished)."""
    if stage == "merge" and not cfg.output:  # beside its adapter, <run.dir>/sft by default: merge has no stage folder
        return [str(merge_paths(cfg)[1])]
    return [cfg.output] if getattr(cfg, "output", None) else []


if __name__ == "__main__":
    sys.exit(main())
