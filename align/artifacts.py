"""The run directory: one owner for its layout, the stage registry, and manifests (`align.json`).

    runs/<name>/                 run.dir: the only path a user gives
      sft/ sample/ preferences/ reward/ dpo/ ppo/ grpo/ rloo/ eval/    one folder per stage (STAGES)
      labels.db                  the labelling store (default; store= names any SQLAlchemy URL)
      report.html report.md      the run's report
      round-1/ round-2/ ...      `align pipeline rounds=N`: each later round's stage folders
      .align.lock                held by `align pipeline` while it runs (a stage holds its folder's: lock_file)

Each stage folder holds its artifact, the resolved `config.yaml`, `metrics.jsonl` and
`align.json`: stage, base model, parents (upstream artifact folders with their hashes),
data hash, align's version and git commit, time, and the stage's final figures. Later stages read base model,
chat template and max length from their parent's manifest instead of asking again, and the
system prompt the policy was trained with (`system_prompt`, recorded by sft and carried by every
stage after it; `system_prompt_of`). The manifest
is written last: a folder without one is unfinished, and `discard_unfinished` (around every
stage the CLI runs) removes such a folder when its stage fails, unless it holds checkpoints.

`STAGES` is the one list of stages: the CLI's commands, the pipeline's order, the report's
sections, W&B's artifact types and eval's policies all read it. A stage is a name, the recipe
that runs it, its config class, its folder, its upstream stages and its kind; a new stage (as
`align serve` was) is one entry here plus its recipe and config class.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from align import StageError, process_count, process_rank
from align.config import ConfigError

log = logging.getLogger(__name__)

# pyproject.toml's project name: the distribution of the package align (PyPI's `align` is another project).
DISTRIBUTION = "align-rlhf"
MANIFEST = "align.json"
# Held (flock) by the process writing a folder: a stage its own folder, the pipeline its run directory (lock_file).
LOCK = ".align.lock"
STORE_FILE = "labels.db"  # the default labelling store, in the run directory
# In a reward model's folder: the ensemble of heads whose disagreement is its uncertainty (align/active.py).
HEADS_FILE = "reward_heads.safetensors"
# In a training stage's checkpoints/: what its checkpoints were trained on (begin_training).
TRAINED_ON = "trained_on.json"
# A model folder's files that make it the model it is (model_fingerprint).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")

# policy: a peft adapter a policy runs with (eval compares these); reward: a reward model; data: a
# dataset or the store's contents; eval: figures about policies; service: a process that serves
# until stopped (the labelling app, the OpenAI-compatible endpoint); tool: runs other stages or works on an artifact (pipeline, merge).
Kind = Literal["policy", "reward", "data", "eval", "service", "tool"]


@dataclass(frozen=True)
class Stage:
    name: str
    kind: Kind
    help: str  # one line, for `align --help`
    recipe: str  # the module that runs it: main(cfg) -> Path, or main(argv) -> int without a config class
    config: str | None = None  # its config class in align.config; None: the recipe parses its own argv
    folder: str | None = None  # its folder in the run directory; None: it writes none there
    upstream: tuple[str, ...] = ()  # stages whose artifacts are its default inputs
    in_pipeline: bool = False  # one of `align pipeline`'s stages
    # Run by another stage's command instead of `align <name>`: (command, config key, value), e.g.
    # GRPO is `align ppo algo=grpo`: one config, reward and gate for the three RL algorithms.
    runs_as: tuple[str, str, str] | None = None

    @property
    def command(self) -> str:
        """How a user runs it: `align <name>`, or its runs_as (`align ppo algo=grpo`)."""
        if self.runs_as is None:
            return f"align {self.name}"
        command, key, value = self.runs_as
        return f"align {command} {key}={value}"


_POLICY_INPUTS = ("sft", "reward")
STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("sft", "policy", "instruction SFT with QLoRA (4-bit base + LoRA), LoRA or DoRA",
          "align.recipes.sft", "SFTStageConfig", "sft", in_pipeline=True),
    Stage("sample", "data", "sample K responses per prompt into the labelling store",
          "align.recipes.sample", "SampleStageConfig", "sample", ("sft",), in_pipeline=True),
    Stage("label", "service", "the labelling app (Gradio), accounts, simulated annotators",
          "align.labeling.cli", None, None, ("sample",), in_pipeline=True),
    Stage("export", "data", "rankings -> preference dataset (prompt/chosen/rejected)",
          "align.recipes.export", "ExportStageConfig", "preferences", ("label",), in_pipeline=True),
    Stage("reward", "reward", "train a reward model on the preferences (Bradley-Terry)",
          "align.recipes.reward", "RewardStageConfig", "reward", ("sft", "export"), in_pipeline=True),
    Stage("dpo", "policy", "align the policy directly on the preferences (DPO, IPO, ...)",
          "align.recipes.dpo", "DPOStageConfig", "dpo", ("sft", "export"), in_pipeline=True),
    Stage("ppo", "policy", "align the policy against the reward model (PPO; algo=grpo|rloo: GRPO/RLOO)",
          "align.recipes.ppo", "PPOStageConfig", "ppo", _POLICY_INPUTS, in_pipeline=True),
    Stage("grpo", "policy", "GRPO through TRL on the PPO stage's reward",
          "align.recipes.grpo", "PPOStageConfig", "grpo", _POLICY_INPUTS, runs_as=("ppo", "algo", "grpo")),
    Stage("rloo", "policy", "RLOO through TRL on the PPO stage's reward",
          "align.recipes.grpo", "PPOStageConfig", "rloo", _POLICY_INPUTS, runs_as=("ppo", "algo", "rloo")),
    Stage("eval", "eval", "win-rate, reward and KL of aligned policies against SFT",
          "align.recipes.evaluate", "EvalStageConfig", "eval", ("sft", "dpo", "ppo", "grpo", "rloo", "reward"),
          in_pipeline=True),
    Stage("serve", "service", "every policy adapter of a run behind one OpenAI-compatible endpoint",
          "align.recipes.serve", "ServeStageConfig", None, ("sft", "dpo", "ppo", "grpo", "rloo")),
    Stage("pipeline", "tool", "run every stage in one run directory, resumable",
          "align.recipes.pipeline", "PipelineConfig"),
    Stage("merge", "tool", "merge an adapter into its base for deployment (writes <adapter>-merged)",
          "align.recipes.merge", "MergeStageConfig", upstream=("sft",)),
]}


def commands() -> list[Stage]:
    """The stages run as `align <name>`, in order."""
    return [s for s in STAGES.values() if s.runs_as is None]


def pipeline_stages() -> list[str]:
    """`align pipeline`'s stages, in the order it runs them."""
    return [s.name for s in STAGES.values() if s.in_pipeline]


def stages_of_kind(kind: Kind) -> list[str]:
    return [s.name for s in STAGES.values() if s.kind == kind]


def routed(command: str, cfg: Any) -> Stage:
    """The stage `align <command>` runs with `cfg`: `align ppo algo=grpo` is the grpo stage."""
    for stage in STAGES.values():
        if stage.runs_as and stage.runs_as[0] == command and getattr(cfg, stage.runs_as[1], None) == stage.runs_as[2]:
            return stage
    return STAGES[command]


# When each running stage started, innermost last: its manifest records the seconds it took.
_started: list[float] = []
# The stages running in this process, outermost first (align pipeline, then the stage it runs): its locks say so.
_running: list[str] = []
# For each running stage, innermost last: {folder: its manifest's `created`} of the artifacts it may read, as they
# were when it started (parents_as_read): its manifest names the parents it read, not those made again meanwhile.
_read_at_start: list[dict[str, Any]] = []


def key_prefix(section: str) -> str:
    """How a hint names `section`'s keys: `ppo.reward_model=` under `align pipeline`, which takes each stage's
    keys in its section (a bare `reward_model=` there is an unknown key), else `reward_model=`."""
    return f"{section}." if _running[:1] == ["pipeline"] else ""


def run_stage(command: str, cfg: Any) -> Path:
    """Run the recipe of the stage `command` routes `cfg` to; returns the artifact it wrote.

    The only way one stage starts another (the pipeline, `align ppo algo=grpo`): recipes never
    import each other. It runs holding its lock (lock_file), or not at all.
    """
    stage = routed(command, cfg)
    with holding(lock_file(stage, cfg), f"{_running[0]}, at {stage.name}" if _running else stage.name):
        recipe = importlib.import_module(stage.recipe)
        if "torch.cuda" in sys.modules:  # a stage before this one in the process may have used the GPU
            from align.gpu_training import new_stage_on_gpu

            new_stage_on_gpu()
        forget_deepspeed_config()
        _started.append(time.time())  # a stack: the pipeline is a stage that runs stages
        _running.append(stage.name)
        try:
            with parents_as_read(cfg):
                out = recipe.main(cfg)
        finally:
            _started.pop()
            _running.pop()
            give_back_freed_memory()
    # Under accelerate launch rank 0 alone writes the artifact (adapter, manifest, report) after the others are
    # done: a rank going on at once (the pipeline's next stage) would find a folder without align.json yet.
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    return out


@contextmanager
def parents_as_read(cfg: Any) -> Iterator[None]:
    """While a stage runs on `cfg`: the finished artifacts it may read, as they are when it starts, are the parents
    its manifest records (_parent). Read when it writes its manifest, a parent made again while it ran (an SFT
    retrained beside a DPO on it) was recorded as the new one, and the report and align pipeline took the stage
    for one built on it. Those artifacts: each folder its config names (or the folder of a file it names: an
    export's pairs) and the stage folders of its run.dir (the parents it defaults to)."""
    from align.config import to_dict

    def strings(value: Any) -> Iterator[str]:
        if isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                yield from strings(v)
        elif isinstance(value, str) and value and "://" not in value:
            yield value

    try:
        named = list(strings(to_dict(cfg)))
    except TypeError:  # not a config dataclass
        named = []
    run_dir = getattr(getattr(cfg, "run", None), "dir", None)
    folders = _stage_folders(Path(run_dir), ()) if run_dir else []
    for value in named:
        try:
            path = Path(value).expanduser()
            folders += [path.parent] if path.is_file() else [path] if path.is_dir() else []
        except (OSError, ValueError):  # a string no path can be (too long, a NUL): not a folder
            continue
    seen: dict[str, Any] = {}
    for folder in folders:
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(manifest, dict):
            seen[os.path.abspath(folder)] = manifest.get("created")
    _read_at_start.append(seen)
    try:
        yield
    finally:
        _read_at_start.pop()


def give_back_freed_memory() -> None:
    """What a stage freed handed back to the system. glibc's malloc raises its mmap threshold to the size of the
    largest block freed (up to 32 MiB), so a training step's activations then come from its heaps, which it keeps
    when they are freed: after the quickstart's SFT (8.5 GiB peak) the process held ~6.5 GiB with no live tensor
    until the pipeline ended, while sample, reward, dpo and eval needed ~1-5 GiB of it (malloc_trim: 0.7 GiB).
    Nothing on another C library."""
    import gc

    gc.collect()
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # musl (Alpine) has no malloc_trim
            pass


def forget_deepspeed_config() -> None:
    """transformers' record of the DeepSpeed config a stage before this one trained under (its TrainingArguments
    set it; the next one sets it again) dropped. Kept alive by accelerate's shared state, it left
    is_deepspeed_zero3_enabled() True, and a model no trainer wraps (reward's merge of its SFT adapter on rank 0
    alone, GRPO's reward model) loaded under deepspeed.zero.Init in a later stage of `align pipeline`: a hang, or
    a crash."""
    deepspeed = sys.modules.get("transformers.integrations.deepspeed")  # not imported: nothing set it
    if deepspeed is not None and hasattr(deepspeed, "unset_hf_deepspeed_config"):
        deepspeed.unset_hf_deepspeed_config()


def lock_file(stage: Stage, cfg: Any) -> Path | None:
    """The file `stage` holds locked while it runs, so that two processes never write one folder: the pipeline
    its run directory's (a second pipeline there set aside the first one's live checkpoints and trained under
    it), a stage its own folder's (the same stage twice at once; different stages of a run, reward and dpo side
    by side, still can). None where nothing is rewritten in place: export moves its folder in whole, and a
    service or `align merge` writes no stage folder."""
    if stage.name == "pipeline":
        return Path(cfg.run.dir) / LOCK
    if stage.folder is None or stage.name == "export":
        return None
    return stage_dir(cfg.run.dir, stage.name) / LOCK


@contextmanager
def holding(path: Path | None, what: str) -> Iterator[None]:
    """The block run with an exclusive flock on `path` (made with its folder where missing), or a StageError
    at once naming the process that holds it (`align <what> (pid N)`, written into the file). Rank 0 only
    under `accelerate launch`: the other ranks are the same run. The file stays: removing a lock file another
    process may be opening would split the lock."""
    if path is None or not is_main_process():
        yield
        return
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise StageError(f"{path.parent} is in use by {holder} ({path}); wait for it to end, or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"align {what} (pid {os.getpid()})\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _held_elsewhere(folder: Path) -> bool:
    """Another process holds `folder`'s lock, or the export lock beside it (align.labeling.export's `.<name>.lock`): it is
    writing there (its own stage, an export moving its folder in), whatever this one did."""
    import fcntl

    for lock in (folder / LOCK, folder.parent / f".{folder.name}.lock"):
        if not lock.is_file():
            continue
        fd = os.open(lock, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
    return False


def stage_dir(run_dir: str | Path, stage: str) -> Path:
    """<run_dir>/<the stage's folder>: export writes preferences/, `ppo algo=grpo` writes grpo/."""
    folder = STAGES[stage].folder
    if folder is None:
        raise ValueError(f"stage {stage!r} has no folder in the run directory")
    return Path(run_dir) / folder


def merge_paths(cfg: Any) -> tuple[Path, Path]:
    """(the adapter `align merge` merges, the folder it writes): adapter= else <run.dir>/sft, output= else
    <adapter>-merged beside it. One place: the preflight, the recipe and the CLI's tidy-up of a failed merge
    must name the same folder."""
    adapter = Path(cfg.adapter) if cfg.adapter else stage_dir(cfg.run.dir, "sft")
    if adapter.name in ("", "..") or str(adapter) == ".":  # `adapter=.`, `..`: no name of its own, its folder's
        adapter = Path(os.path.abspath(adapter))
    return adapter, Path(cfg.output) if cfg.output else adapter.with_name(adapter.name + "-merged")


def store_url(store: str | None, run_dir: str | Path) -> str:
    """`store` when given (any SQLAlchemy URL), else the run directory's SQLite file (made on first use)."""
    from align.labeling.store import sqlite_url

    if store:
        return store
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return sqlite_url(Path(run_dir).resolve() / STORE_FILE)


def run_store(store: str | None, run_dir: str | Path, key: str = "store") -> str:
    """The labelling store of a stage that puts tasks beside the run's labels (eval human=true): `store` when given;
    else the one the run's sample (else its export) recorded in its align.json, in `run_dir` or, for a later
    round's folder, in its root, so that after `align sample store=postgresql://...` the tasks go where the
    annotators rank; else the root's labels.db (a round's folder has no store of its own). A recorded SQLite
    file no longer there is passed over (the run folder moved; its labels.db moved with it), and the run's own
    labels.db where the stage ran (_own_store) stands for this folder's: a copied or moved run's tasks went to
    the labels.db of where it was, another run's, and the board counted that run's verdicts. Nothing is made."""
    from align.labeling.store import sqlite_path, sqlite_url

    if store:
        return store
    root = round_root(run_dir)
    for folder in (Path(run_dir), *([root] if root else [])):
        for stage in ("sample", "export"):
            manifest = stage_dir(folder, stage) / MANIFEST
            try:
                m = json.loads(manifest.read_text()) if manifest.is_file() else {}
                url = m.get("store") if stage == "sample" else ((m.get("parents") or {}).get("store") or {}).get("path")
            except (OSError, ValueError, AttributeError):  # unreadable: the next one, or the default
                continue
            if not isinstance(url, str) or not url:
                continue
            if sqlite_path(url) is not None and m.get("cwd") and not Path(sqlite_path(url)).is_absolute():
                url = sqlite_url(Path(m["cwd"]) / sqlite_path(url))  # store=sqlite:///x.db: where that stage ran
            if sqlite_path(url) is not None and _own_store(Path(sqlite_path(url)), m):
                break  # the run's own labels.db where it ran: here, its copy's or its new place's
            if sqlite_path(url) is not None and not Path(sqlite_path(url)).is_file():
                continue
            if "***" in url:  # align.json keeps no password (config.redact): it cannot be opened from there
                raise ConfigError(f"{key}: the run's {stage} used the labelling store {url}, and its {MANIFEST} keeps "
                                  f"no password; pass {key}=<that URL> (the one given to align {stage})")
            return url
    return sqlite_url(Path(root or run_dir).resolve() / STORE_FILE)


def _own_store(path: Path, manifest: dict) -> bool:
    """Whether the SQLite store `path` a stage recorded is the labels.db of the run it ran in (its run.dir's, or
    that round's root's) rather than one the user named: the one a copy of the run, or the run moved, has beside it."""
    ran_in = ((manifest.get("config") or {}).get("run") or {}).get("dir")
    if not isinstance(ran_in, str) or not ran_in:
        return False
    folder = Path(manifest.get("cwd") or ".") / ran_in
    rounds = [folder.parent] if re.fullmatch(r"round-\d+", folder.name) else []  # a later round's: its root's
    return path.resolve() in {(f / STORE_FILE).resolve() for f in (folder, *rounds)}


def round_dir(root: str | Path, r: int) -> Path:
    """Round r's run directory: the run directory itself for round 0, else <root>/round-<r>/."""
    return Path(root) if r == 0 else Path(root) / round_batch(r)


def round_batch(r: int) -> str:
    """Round r's labelling batch in the store, named like its folder."""
    return f"round-{r}"


def round_root(run_dir: str | Path) -> Path | None:
    """The run directory whose later round `run_dir` is (round_dir's <root>/round-<r>), or None. A round-<r>
    folder is one only below a run directory, which holds round 0's stage folders or its store: `align sft
    run.dir=exps/round-1` is a run of its own, not round 1 of exps."""
    run_dir = Path(run_dir)
    if not re.fullmatch(r"round-\d+", run_dir.name):
        return None
    root = run_dir.parent
    if (root / STORE_FILE).is_file() or any((root / s.folder).is_dir() for s in STAGES.values() if s.folder):
        return root
    return None


def later_rounds(root: str | Path) -> list[Path]:
    """The round-<r>/ folders under `root`, in round order."""
    found = [p for p in Path(root).glob("round-*") if p.is_dir() and p.name.removeprefix("round-").isdigit()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("round-")))


def is_main_process() -> bool:
    """Rank 0 under `accelerate launch` (or torchrun); True for a plain single process.

    Artifacts, manifests, reports, W&B and the labelling store are written by rank 0 only.
    """
    return process_rank() == 0


def git_commit(package: Path | None = None) -> str | None:
    """The commit of align's own checkout this code runs from (`-dirty` with uncommitted changes), or None: align
    installed from a wheel, even into a .venv inside the user's own git repository, whose commit it recorded.
    `package`: the align package's folder (this one's by default)."""
    package = package or Path(__file__).resolve().parent
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, timeout=5,
                             cwd=package)
        if top.returncode != 0 or not _is_align_checkout(Path(top.stdout.strip()), package):
            return None
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=package)
        commit = out.stdout.strip()
        if out.returncode == 0 and commit:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5, cwd=package).stdout.strip()
            return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def _is_align_checkout(top: Path, package: Path) -> bool:
    """`top` (a git repository's top level) is align's own source tree, holding `package` as its align/: its
    pyproject.toml names the project align-rlhf."""
    import tomllib

    try:
        project = tomllib.loads((top / "pyproject.toml").read_text()).get("project") or {}
    except (OSError, ValueError):
        return False
    return project.get("name") == DISTRIBUTION and (top / "align").resolve() == package.resolve()


def align_version() -> str | None:
    """The installed align's version (its distribution's metadata), or None where it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return None


def write_manifest(folder: str | Path, *, stage: str, config: dict[str, Any], base_model: str | None,
                   parents: dict[str, str | Path] | None = None, metrics: dict[str, Any] | None = None,
                   **extra: Any) -> Path:
    folder = Path(folder)
    path = folder / MANIFEST
    if not is_main_process():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    local = bool(base_model) and Path(base_model).is_dir()
    manifest = {
        "stage": stage,
        # A local folder named relative to where the stage ran: the next stage, run from elsewhere, reads it here.
        "base_model": str(Path(base_model).resolve()) if local else base_model,
        # and what it held: a model saved over it is another base (align pipeline remakes the stage)
        **({"base_model_fingerprint": model_fingerprint(base_model)} if local else {}),
        "parents": {k: _parent(v) for k, v in (parents or {}).items()},
        "git_commit": git_commit(),
        "align_version": align_version(),  # the code that made it, also where no checkout says which commit
        "cwd": os.getcwd(),  # where the stage ran: a relative path in its config is relative to it (parent_path)
        **({"config_file": os.path.abspath(config_file)} if config_file else {}),  # the --config it ran with
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **({"seconds": round(time.time() - _started[-1], 1)} if _started else {}),  # started by run_stage
        "config": config,
        "metrics": metrics or {},
        **extra,
    }
    from align.tracking import wandb_record

    if (run := wandb_record(stage)) is not None:  # the stage's W&B run, opened before this: the report links it
        manifest["wandb"] = run
    manifest["files"] = artifact_files(folder)
    from align.config import redact

    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(redact(json.loads(json.dumps(manifest, default=str))), indent=2))  # no URL's password
    tmp.replace(path)  # a manifest is the "stage finished" mark: never half-written
    return path


# What a stage hands on (weights, datasets), recorded in its manifest with their sizes: a file of them gone or
# changed since makes the folder unfinished to `align pipeline` (its other files are logs and plots).
ARTIFACT_SUFFIXES = (".safetensors", ".bin", ".pt", ".arrow", ".parquet")


def artifact_files(folder: str | Path) -> dict[str, int]:
    """{path relative to `folder`: size} of its ARTIFACT_SUFFIXES files, less checkpoints and W&B's own."""
    folder = Path(folder)
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*"))
            if f.suffix in ARTIFACT_SUFFIXES and f.is_file()
            and not {"checkpoints", "wandb"} & set(f.relative_to(folder).parts[:-1])}


def missing_files(folder: str | Path, manifest: dict[str, Any]) -> list[str]:
    """The files `manifest` recorded (artifact_files) that `folder` no longer holds as they were."""
    folder = Path(folder)
    return [name for name, size in (manifest.get("files") or {}).items()
            if not (folder / name).is_file() or (folder / name).stat().st_size != size]


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {MANIFEST}: is it an artifact of a finished stage?")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, OSError) as err:
        raise StageError(f"{path} cannot be read ({err}): run the stage that made {folder} again") from None
    if not isinstance(manifest, dict):
        raise StageError(f"{path} is not a stage's manifest (a JSON object): run the stage that made {folder} again")
    return manifest


def system_prompt_of(folder: str | Path | None) -> str | None:
    """The system prompt the policy in `folder` was trained with (`sft.data.system_prompt`), or None.

    Its manifest's `system_prompt`; a policy's (or merge's) manifest written before stages recorded it is
    followed to the policy it came from (parent sft, policy or adapter) and, at an SFT manifest, read from
    its config. Another stage's older manifest (a reward model's) gives None: it was trained without one.
    None for a folder without a manifest (a base model, a Hub name) and for a policy trained without one.
    """
    for _ in range(8):  # a chain of parents is a few stages long; a cycle is not followed for ever
        if folder is None or not (Path(folder) / MANIFEST).is_file():
            return None
        manifest = read_manifest(folder)
        if "system_prompt" in manifest:
            return manifest["system_prompt"]
        if manifest.get("stage") == "sft":
            return ((manifest.get("config") or {}).get("data") or {}).get("system_prompt")
        if manifest.get("stage") not in (*stages_of_kind("policy"), "merge"):
            return None  # e.g. a reward model from before: it was trained without its SFT's system prompt
        parents = manifest.get("parents") or {}
        folder = next((parent_path(parents[k]["path"], folder, manifest) for k in ("sft", "policy", "adapter")
                       if k in parents), None)
    return None


def _parent(path: str | Path) -> dict[str, Any]:
    # Absolute: a report built from another directory reads it as the stage did (a store's URL stays as given)
    info: dict[str, Any] = {"path": os.path.abspath(path) if Path(path).exists() else str(path)}
    path = Path(info["path"])
    if (path / MANIFEST).is_file():
        m = read_manifest(path)
        info.update(stage=m.get("stage"), created=m.get("created"))
        read = _read_at_start[-1].get(str(path)) if _read_at_start else None
        if read and read != m.get("created"):  # made again while this stage ran: it read the one before
            log.warning("%s was made again (at %s) while this stage ran: recorded as the one it read, made at %s, so "
                        "the report and align pipeline take this stage as built on an earlier %s", path,
                        m.get("created"), read, m.get("stage") or "artifact")
            info["created"] = read
    return info


def parent_path(path: str | Path, folder: str | Path, manifest: dict[str, Any] | None = None) -> Path:
    """A parent's path as `folder`'s manifest records it, wherever it is read from. Manifests written before
    parents were recorded absolute hold them as the stage was given them (runs/quickstart/sft), relative to
    the directory it ran in: that directory where the manifest records it (`cwd`); else the place the run
    folder's own path says (runs/quickstart/sft beside /abs/runs/quickstart/eval: /abs/runs/quickstart/sft);
    else a folder of that name beside `folder` or above it (a run made from inside itself, run.dir=.); else
    as given, relative to this process's directory. An absolute parent that is no longer there (the run folder
    or the project moved since) is looked for the same way, as the part of it below the recorded `cwd` (else
    its longest tail that names a folder there now); else it is returned as recorded. A parent inside the run
    `folder` belongs to, where that run was copied or moved since (in_this_run), is its copy here, when there."""
    path = Path(path)
    if (here := in_this_run(path, folder, manifest)) != path and here.exists():
        return here
    if path.is_absolute():
        if path.exists():
            return path
        cwd = (manifest or {}).get("cwd")
        if cwd and path.is_relative_to(cwd):
            moved = _relative_parent(path.relative_to(cwd), folder)
            if moved.exists():
                return moved
        for i in range(1, len(path.parts) - 1):  # longest tail first: runs/q/sft before q/sft
            moved = _relative_parent(Path(*path.parts[i:]), folder)
            if moved.is_absolute() and moved.exists():
                return moved
        return path
    if (manifest or {}).get("cwd"):
        return Path(manifest["cwd"]) / path
    return _relative_parent(path, folder)


def in_this_run(path: str | Path, folder: str | Path, manifest: dict[str, Any] | None) -> Path:
    """`path`, recorded by the manifest of the stage folder `folder`, placed in the run `folder` is in now where it
    lies inside the run that stage ran in (its run.dir, or for a later round's stage that round's root) and the run
    was copied or moved since; else `path` as it is. A copy of a run read its stages' parents in the original, so a
    stage remade in the copy left every later one there "already done" (their parents' manifests, the original's,
    no newer), while the same change in place remade them."""
    path = Path(path)
    m = manifest or {}
    ran_in = (m.get("config") or {}).get("run", {}).get("dir") if isinstance(m.get("config"), dict) else None
    stage = STAGES.get(m.get("stage")) if isinstance(m.get("stage"), str) else None
    if not isinstance(ran_in, str) or not ran_in or stage is None or stage.folder != Path(folder).name:
        return path  # not a stage folder as its stage lays it out (merge's, export output=elsewhere)
    cwd = m.get("cwd")
    if not cwd and not (Path(ran_in).is_absolute() and path.is_absolute()):
        return path  # relative to a directory not recorded
    then = Path(os.path.normpath(Path(cwd or "/") / ran_in))
    now = Path(os.path.abspath(folder)).parent
    if re.fullmatch(r"round-\d+", then.name) and now.name == then.name:  # a later round's: its root's folders too
        then, now = then.parent, now.parent
    full = Path(os.path.normpath(Path(cwd or "/") / path))
    if then == now or not full.is_relative_to(then):
        return path
    return now / full.relative_to(then)


def recorded_path(path: str, folder: Path, manifest: dict[str, Any]) -> Path:
    """A file a stage's config names (data.path, prompts), read as that stage read it: relative to the directory
    it ran in (its manifest's `cwd`, parent_path), else, that copy gone (the project moved), placed by the run
    folder's own path as a moved parent is; not relative to where this process runs."""
    found = parent_path(path, folder, manifest)
    if found.exists() or Path(path).is_absolute() or not manifest.get("cwd"):
        return found
    moved = parent_path(path, folder, {k: v for k, v in manifest.items() if k != "cwd"})
    return moved if moved.exists() else found


def _relative_parent(path: Path, folder: str | Path) -> Path:
    """A relative parent path placed by `folder`'s own path (parent_path)."""
    above = Path(os.path.abspath(folder)).parents
    for base in above:  # the longest run of path's first parts that ends base's
        for k in range(min(len(base.parts) - 1, len(path.parts) - 1), 0, -1):
            if base.parts[-k:] == path.parts[:k]:
                return Path(*base.parts[:-k]) / path
    return next((base / path for base in above if (base / path).exists()), path)


# The folder of the --config this command was given (align.cli): the next stage's config is beside it.
config_folder: Path | None = None
# That file, recorded in the manifest (config_file): `align label`, run without one, hints the export's beside it.
config_file: Path | None = None
# Off while align pipeline runs the stages: it runs the next one itself, and a stage's hint (a label
# command with the shipped scorer, say) would point away from the pipeline's own settings.
next_hints = True
# Set by `align pipeline` while it runs its stages: a stage's messages name its keys as the pipeline takes them
# (sft.train.max_steps, ppo.train... for grpo/: stage_key)
in_pipeline = False


def shell(value: str | Path) -> str:
    """A path or URL as a shell word, for the commands printed to paste: quoted where it holds a space."""
    return shlex.quote(str(value))


def stage_command(stage: str, run_dir: str | Path, *, sft: str | Path | None = None,
                  data: str | Path | None = None) -> str:
    """`align <stage> run.dir=...` plus `sft=` and `data.path=` for an SFT adapter or preference data that is not
    the run's own (<run.dir>/sft, <run.dir>/preferences), where the next stage would look by default: after `align
    reward sft=<elsewhere>` the bare `align dpo run.dir=...` failed "no SFT adapter at <run.dir>/sft"."""
    command = f"align {stage} run.dir={shell(run_dir)}"
    if sft is not None and Path(sft).resolve() != stage_dir(run_dir, "sft").resolve():
        command += f" sft={shell(sft)}"
    if data is not None and Path(data).resolve() != stage_dir(run_dir, "export").resolve():
        command += f" data.path={shell(data)}"
    return command


def eval_command(run_dir: str | Path, stage: str, sft: str | Path | None, *, scorer: str | None = None,
                 reward_model: str | Path | None = None, base: str | None = None) -> str:
    """What to run after training `stage` from `sft` (None: a fresh LoRA on `base`) against `scorer` or
    `reward_model`. Eval finds the run's own policies by stage name and its reward/ as the judge; an SFT adapter
    or a judge from elsewhere only when told (`align dpo sft=<elsewhere>` then `align eval` said "the baseline
    'sft' is not among the policies ['dpo']"; `align ppo scorer=...` with no reward/ said "no judge for eval").
    With no SFT adapter eval has no baseline to compare with: what to do instead, not a command that fails."""
    run = shell(run_dir)
    judge = unjudged = ""
    if not stage_dir(run_dir, "reward").exists():  # eval's default judge is not there: the one training used
        judge = f" scorer={shell(scorer)}" if scorer else f" reward_model={shell(reward_model)}" if reward_model else ""
        if not judge:  # none known (`align dpo` on pairs from elsewhere): the bare command failed "no judge"
            judge = " scorer=<module:function>"
            unjudged = (f" (eval needs a judge and {shell(stage_dir(run_dir, 'reward'))} holds no reward model: "
                        "give a scorer such as support_style, reward_model=<folder>, or human=true for "
                        "annotators' A/B verdicts)")
    if sft is None:
        given = (f"align eval run.dir={run}{judge} policies=\"{{sft: <an SFT adapter on {base}>, "
                 f"{stage}: {shell(stage_dir(run_dir, stage))}}}\"")
        why = f"{stage} started from a fresh LoRA on {base}, and align eval needs an SFT adapter on that base to compare it with"
        if (stage_dir(run_dir, "sft") / "adapter_config.json").is_file():  # there, but not what it started from
            return f"{why}: give it one, {given}{unjudged}"
        return (f"{why}: train one (align sft run.dir={run} model.name={shell(str(base))}), then align eval "
                f"run.dir={run}{judge}; or give it one, {given}{unjudged}")
    command = f"align eval run.dir={run}{judge}"
    if Path(sft).resolve() == stage_dir(run_dir, "sft").resolve():
        return command + unjudged
    policies = f"policies={{sft: {json.dumps(str(sft))}, {stage}: {json.dumps(str(stage_dir(run_dir, stage)))}}}"
    return f"{command} {shell(policies)}{unjudged}"


def print_done(stage: str, artifact: Path, next_command: str | None) -> None:
    """Where the artifact is and what to run next; `align <stage> run.dir=...` with `--config` where the
    config this command ran from has a sibling for that stage (configs/quickstart/sft.yaml → sample.yaml)."""
    if not is_main_process():
        return
    print(f"\n✔ {stage} finished: {artifact}")
    if next_command and next_hints:
        print(f"  next: {with_sibling_configs(next_command)}")


def sibling_config(folder: str | Path, stage: str) -> str | None:
    """The manifest of `folder` names the --config its stage ran with: its sibling for `stage` (export.yaml),
    as a path to paste here (relative below this directory), or None where there is none."""
    try:
        ran_with = json.loads((Path(folder) / MANIFEST).read_text()).get("config_file")
    except (OSError, ValueError):
        return None
    sibling = Path(ran_with).parent / f"{stage}.yaml" if ran_with else None
    if sibling is None or not sibling.is_file():
        return None
    here = os.path.relpath(sibling)
    return str(sibling) if here.startswith("..") else here


def with_sibling_configs(command: str) -> str:
    if config_folder is None:
        return command

    def add(match: re.Match) -> str:
        sibling = config_folder / f"{match[1]}.yaml"
        return f"align {match[1]} --config {shell(sibling)} " if sibling.is_file() else match[0]

    return re.sub(r"align (\w+) (?=run\.dir=)", add, command)


def _step(path: Path) -> int | None:
    """N of a checkpoint folder's name (checkpoint-N, step-N); None for any other name."""
    step = path.name.rpartition("-")[2]
    return int(step) if path.is_dir() and not path.name.startswith("abandoned-") and step.isdigit() else None


def checkpoint_steps(folder: str | Path) -> list[int]:
    """The steps of the checkpoints a stage folder holds (<folder>/checkpoints), in order; [] for none."""
    return sorted(_step(p) or 0 for p in _checkpoints(Path(folder) / "checkpoints"))


def _checkpoints(folder: Path) -> list[Path]:
    """The checkpoint-N (step-N) folders in `folder`; none where it does not exist."""
    return [p for p in folder.iterdir() if _step(p) is not None] if folder.is_dir() else []


def _set_aside(paths: list[Path], folder: Path, said: str) -> Path | None:
    """`paths` (checkpoints) moved into `folder`/abandoned-<time>/, `said` on stderr (its {n} and {aside}
    filled in); where they went, or None."""
    if not paths or not is_main_process():
        return None
    aside = stamped = folder / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1, 100):  # a second set-aside within the second (a finished run's, then this run's) gets its own
        if not aside.exists():
            break
        aside = stamped.with_name(f"{stamped.name}-{n}")
    aside.mkdir()
    for path in sorted(paths):
        path.rename(aside / path.name)
    every = sorted(folder.glob("abandoned-*"))
    size = sum(f.stat().st_size for a in every for f in a.rglob("*") if f.is_file())
    print("align: " + said.format(n=len(paths), aside=aside) + f" ({len(every)} set-aside run(s) there, "
          f"{size / 2**20:.0f} MiB: `rm -r {folder}/abandoned-*` once you will not resume them)", file=sys.stderr)
    return aside


def set_aside_later_checkpoints(checkpoint: str | Path) -> Path | None:
    """Resuming from a checkpoint older than the newest (`train.resume_from_checkpoint=<folder>`): the
    later ones, of the run abandoned there, move to `checkpoints/abandoned-<time>/`. Left in place,
    `latest` would jump back into that run, and pruning by step (save_total_limit) would delete this
    run's new checkpoints before them. Returns where they went, or None."""
    checkpoint = Path(checkpoint)
    step = _step(checkpoint) if checkpoint.exists() else None
    if step is None:
        return None
    prefix = checkpoint.name.rpartition("-")[0]
    later = [p for p in checkpoint.parent.glob(f"{prefix}-*") if (_step(p) or 0) > step]
    return _set_aside(later, checkpoint.parent, f"resuming from {checkpoint.name}: the {{n}} later checkpoints (a run "
                                                "abandoned there) moved to {aside}")


def set_aside_checkpoints(folder: str | Path, whose: str = "an earlier run") -> Path | None:
    """A stage starting from scratch: the checkpoints an earlier run left in `folder` (`<stage>/checkpoints`)
    move to `abandoned-<time>/` in it, with the record of what they were trained on. Left in place, a later
    `train.resume_from_checkpoint=latest` (after this run is killed before its first checkpoint) would continue
    the earlier run, on its data and config, under this run's manifest. Returns where they went, or None."""
    folder = Path(folder)
    aside = _set_aside(_checkpoints(folder), folder,
                       f"starting from scratch: the {{n}} checkpoints of {whose} moved to {{aside}}")
    if aside and (folder / TRAINED_ON).is_file():  # what they were trained on goes with them
        (folder / TRAINED_ON).rename(aside / TRAINED_ON)
    return aside


def begin_training(out: str | Path, resume: str | None, *, max_steps: int = -1,
                   trained_on: dict[str, Any] | None = None) -> Path | None:
    """_begin_training, decided once: under several processes rank 0 reads the folder, changes it (its align.json
    removed, checkpoints set aside, trained_on.json written) and hands every rank its answer. Each rank reading
    the folder while rank 0 changed it could start elsewhere (one from scratch, one from a checkpoint being set
    aside): a FileNotFoundError, or ranks in different collectives until the timeout."""
    if process_count() == 1:
        return _begin_training(out, resume, max_steps=max_steps, trained_on=trained_on)
    import torch.distributed as dist

    if not dist.is_initialized():  # the stages call this once their trainer (or PPO's Ranks) opened it
        from accelerate import PartialState

        PartialState()
    answer: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            found = _begin_training(out, resume, max_steps=max_steps, trained_on=trained_on)
            answer = [("ok", str(found) if found else None)]
        except Exception as err:  # every rank stops with it, not rank 0 alone while the others wait
            answer = [(type(err).__name__, str(err))]
            dist.broadcast_object_list(answer, src=0)
            raise
    dist.broadcast_object_list(answer, src=0)
    kind, value = answer[0]
    if kind != "ok":
        raise (ConfigError if kind == "ConfigError" else StageError)(value)
    return Path(value) if value else None


def _begin_training(out: str | Path, resume: str | None, *, max_steps: int = -1,
                    trained_on: dict[str, Any] | None = None) -> Path | None:
    """A training stage about to train into `out`: the checkpoint `train.resume_from_checkpoint` (`resume`)
    continues from, or None for a fresh start; `trained_on` (the data's sha256, the model and adapter the run
    starts from: model_identity) is then recorded in <out>/checkpoints/trained_on.json.

    None: a fresh start, the earlier run's checkpoints set aside (set_aside_checkpoints). A checkpoint folder:
    that one, with a warning when its run was trained on other inputs (asked for by name), the later ones of
    its run set aside (set_aside_later_checkpoints). `latest` (or auto): the newest complete one (those cut
    short by a kill while being saved are set aside first), unless it cannot go on into this run; then every
    checkpoint is set aside and the run starts from scratch, saying why: one of a finished run (its align.json
    was there: rerun, the stage is asked to train again, unless to train longer, to a `max_steps` past the
    checkpoint's step), or of a run on other inputs (a pipeline rerun because the data or the SFT adapter
    changed would take it up at its last step, train nothing and keep the old weights under a manifest naming
    the new data). The newest checkpoint of an unfinished run past `max_steps` (a run killed on the way to more
    steps, rerun with fewer) is refused, as preflight refuses one named by its path: resumed, the run trained
    nothing and wrote the checkpoint's weights under a manifest giving `max_steps`. One at `max_steps` (a run
    killed after its last step, while it evaluated or saved) finishes the run: it trains nothing more and writes
    that step's weights (PPO's loop; the Trainer through align.training.train_from), when that run was to
    stop there too (its trainer_state.json max_steps): one saved on the way to more steps is refused.
    Settings (`trained_on["settings"]`, settings_of: the stage's config less its inputs) do not decide: resuming
    with a lower train.lr, or to train longer, is what resume is for. A resume whose settings differ from those
    its checkpoint's run recorded says which, before it goes on (a changed LoRA shape would not load).

    A finished artifact in `out` loses its align.json here, before the first file is rewritten (metrics.jsonl,
    checkpoints/): a rerun killed on the way, even by SIGKILL, leaves an unfinished folder, not the old manifest
    over this run's log and checkpoints. The run writes its own when it finishes.
    """
    folder = Path(out) / "checkpoints"
    keys = stage_key(Path(out), "", "pipeline" if in_pipeline else None)  # "sft." in a pipeline, else ""
    finished = (Path(out) / MANIFEST).is_file()  # not a run killed after its last checkpoint: that one goes on
    _refuse_another_shape(folder, resume, trained_on, finished, max_steps, keys)  # before anything is touched
    if finished and is_main_process():
        (Path(out) / MANIFEST).unlink()
        log.info("%s: training again, so its %s (the finished run's) is removed; this run writes its own when it "
                 "finishes", out, MANIFEST)
    if resume not in ("latest", "auto"):
        if resume:
            differ = _trained_otherwise(Path(resume).parent, trained_on)
            if differ:
                log.warning("%strain.resume_from_checkpoint=%s: its run was trained on other inputs than this one "
                            "(%s differ: see its %s); resuming from it as asked", keys, resume, ", ".join(differ),
                            TRAINED_ON)
            set_aside_later_checkpoints(resume)
        else:
            set_aside_checkpoints(folder)
        found = Path(resume) if resume else None
    else:
        saved = _checkpoints(folder)
        cut = [p for p in saved if not _complete(p)]
        _set_aside(cut, folder, "the {n} checkpoints cut short while being saved (no readable trainer_state.json, "
                                "which the Trainer writes last) moved to {aside}")
        found = max((p for p in saved if p not in cut), key=_step, default=None)
        differ = _trained_otherwise(folder, trained_on) if found else []
        if differ:
            set_aside_checkpoints(folder, f"a run on other inputs ({', '.join(differ)} differ: see its {TRAINED_ON})")
            found = None
        elif found and finished and not 0 < (_step(found) or 0) < max_steps:
            set_aside_checkpoints(folder, f"a finished run ({found.name}; to train it longer, raise {keys}train."
                                          "max_steps past its step)")
            found = None
        elif found and 0 < max_steps < _step(found):
            raise ConfigError(f"{keys}train.resume_from_checkpoint={resume}: its newest checkpoint, {found} (step "
                              f"{_step(found)}), is past {keys}train.max_steps={max_steps}: nothing is left to train "
                              f"from it; raise {keys}train.max_steps to its step or past it to train on from it, name "
                              f"a checkpoint folder at step {max_steps} or before, or leave {keys}train."
                              "resume_from_checkpoint unset to train again from scratch")
        elif found and 0 < max_steps == _step(found) and (planned := _planned_steps(found)) not in (None, max_steps):
            # A run of more steps killed on the way, rerun with fewer: its weights are at this step of another
            # schedule (learning rate, KL horizon), and finishing here would label them a run of max_steps
            raise ConfigError(f"{keys}train.resume_from_checkpoint={resume}: its newest checkpoint, {found}, is at "
                              f"{keys}train.max_steps={max_steps} but was saved on the way to {planned} "
                              f"steps: nothing is left to train from it at this max_steps; set {keys}train.max_steps="
                              f"{planned} to finish that run, name a checkpoint folder before step "
                              f"{max_steps}, or leave {keys}train.resume_from_checkpoint unset to train again from "
                              "scratch")
        log.info("resuming from %s", found or "scratch (no checkpoint to continue)")
    changed = _settings_changed(found.parent, trained_on) if found else []
    if changed:
        log.warning("resuming from %s with settings its run did not have: %s. The checkpoint's weights, optimizer "
                    "state and place in the schedule carry on under them (train.lr: from here on)", found,
                    "; ".join(changed))
    if trained_on is not None and is_main_process():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{TRAINED_ON}.tmp"
        tmp.write_text(json.dumps(trained_on, indent=2))
        tmp.replace(folder / TRAINED_ON)
    return found


# The LoRA settings that change the adapter's tensors (their shapes, DoRA's magnitudes): a checkpoint of one
# does not load into another. lora.alpha, dropout and use_rslora change none: a resume takes them as it goes on.
LORA_SHAPE = ("lora.r", "lora.target_modules", "lora.use_dora")


def _refuse_another_shape(folder: Path, resume: str | None, trained_on: dict[str, Any] | None, finished: bool,
                          max_steps: int, keys: str) -> None:
    """A ConfigError where the checkpoint a resume would load is of another LoRA shape than this run's: it failed
    as the Trainer loaded it, with torch's size-mismatch traceback, after the finished artifact had lost its
    align.json and its trained_on.json had been rewritten with the settings that could not load."""
    if not resume:
        return
    if resume in ("latest", "auto"):  # the checkpoint _begin_training would go on from, if any
        newest = max((p for p in _checkpoints(folder) if _complete(p)), key=_step, default=None)
        if newest is None or _trained_otherwise(folder, trained_on) or (
                finished and not 0 < (_step(newest) or 0) < max_steps):
            return  # nothing resumed: a fresh start of any shape
        where = folder
    else:
        where = Path(resume).parent
    shape = [c for c in _settings_changed(where, trained_on) if c.split(" ")[0] in LORA_SHAPE]
    if shape:
        raise ConfigError(f"{keys}train.resume_from_checkpoint={resume}: its checkpoints hold a LoRA of another "
                          f"shape ({'; '.join(shape)}), which does not load into this run's: resume with its "
                          f"settings, or leave {keys}train.resume_from_checkpoint unset to train again from scratch")


def _planned_steps(checkpoint: Path) -> int | None:
    """train.max_steps of the run that saved `checkpoint` (the Trainer's trainer_state.json max_steps, PPO's
    own); None where it is not recorded (PPO checkpoints of an align before it)."""
    try:
        planned = json.loads((checkpoint / "trainer_state.json").read_text()).get("max_steps")
    except (OSError, ValueError, AttributeError):
        return None
    return planned if isinstance(planned, int) and planned > 0 else None


def _complete(checkpoint: Path) -> bool:
    """A checkpoint saved to its end: its trainer_state.json, written last (by the Trainer, and by PPO before the
    folder is renamed into place), is there and reads back."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def _recorded(folder: Path) -> dict[str, Any] | None:
    """What the checkpoints in `folder` were trained on, as begin_training recorded it; None: no record
    (checkpoints of an align before it, or a folder of someone else's)."""
    try:
        recorded = json.loads((folder / TRAINED_ON).read_text())
    except OSError:
        return None
    except ValueError:
        return {}
    return recorded if isinstance(recorded, dict) else {}


def _trained_otherwise(folder: Path, trained_on: dict[str, Any] | None) -> list[str]:
    """The inputs (keys of `trained_on`, its settings aside) the checkpoints in `folder` were trained on
    otherwise; [] when the same, or unknown."""
    recorded = _recorded(folder)
    if trained_on is None or recorded is None:
        return []
    keys = (set(recorded) | set(trained_on)) - {"settings"}
    return [k for k in sorted(keys) if not _same_input(recorded.get(k), trained_on.get(k))]


# How an align before content identities (model_identity) recorded a local folder: its path @ model_fingerprint.
_PATH_IDENTITY = re.compile(r"(/.+)@([0-9a-f]{16})")


def _same_input(recorded: Any, ours: Any) -> bool:
    """An input as a checkpoint's record names it is the one this run starts from. A local folder recorded the old
    way (_PATH_IDENTITY, by where it was and its align.json's mtime) is the same where it is still there, as it
    was then, and is this run's: so a run recorded before checkpoints resume as they did (moved since, it is
    taken for another, as it was then)."""
    if recorded == ours:
        return True
    old = _PATH_IDENTITY.fullmatch(recorded) if isinstance(recorded, str) else None
    if old is None or not Path(old[1]).is_dir():
        return False
    try:
        return model_fingerprint(old[1]) == old[2] and model_identity(old[1]) == ours
    except OSError:
        return False


def _settings_changed(folder: Path, trained_on: dict[str, Any] | None) -> list[str]:
    """'key old -> new' for each setting of `trained_on["settings"]` the run of the checkpoints in `folder`
    recorded otherwise; [] when the same, or either has no record."""
    ours, theirs = (trained_on or {}).get("settings"), (_recorded(folder) or {}).get("settings")
    if not isinstance(ours, dict) or not isinstance(theirs, dict):
        return []
    return [f"{k} {theirs.get(k)!r} -> {ours.get(k)!r}" for k in sorted(set(ours) | set(theirs))
            if theirs.get(k) != ours.get(k)]


# Config keys a resume compares as settings: not the run's own (run.*: its folder, W&B), not the resume key
# and the length of training (training longer is what resume is for), not the inputs trained_on compares.
_NOT_SETTINGS = ("run.", "train.resume_from_checkpoint", "train.max_steps", "train.epochs", "model.name", "sft",
                 "reward_model", "scorer", "prompts", "data.path")


def settings_of(cfg: Any) -> dict[str, Any]:
    """A training stage's config as begin_training records its settings: flat ("train.lr"), its inputs and run
    keys left out (_NOT_SETTINGS), as JSON holds them."""
    from align.config import to_dict

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    settings = flat(json.loads(json.dumps(to_dict(cfg), default=str)))
    return {k: v for k, v in settings.items() if not any(k == s or (s.endswith(".") and k.startswith(s))
                                                         for s in _NOT_SETTINGS)}


def model_identity(name: str | Path | None) -> str | None:
    """A model or adapter as a checkpoint's record names it: as embedded.model_key spells it (a Hub id as it is,
    the embedded model by any of its names), a local folder by what it holds, not where it is (a run moved or
    copied is the same run: its checkpoints resume), content_fingerprint."""
    from align.embedded import model_key

    if not name:
        return None
    key = model_key(str(name))
    return content_fingerprint(key) if Path(key).is_dir() else key


CONTENT_SAMPLE = 1 << 20  # bytes read from each end of a weight file by content_fingerprint


def content_fingerprint(folder: str | Path) -> str:
    """A local model folder's identity by what it holds, wherever it is and whatever its files' mtimes (a move,
    cp -r, scp keep it; a model made or saved over again changes it), without reading all its weights. An align
    artifact ("artifact:"): its manifest's stage, `created` stamp (made again, another), wall time, recorded
    files with their sizes and metrics (two runs in one second differ in those). Another folder ("folder:"), or
    an artifact whose manifest cannot be read: its config.json's text, and the name, size and first and last
    CONTENT_SAMPLE bytes of each weight file (a model saved over it in the same shapes has other bytes at its
    ends)."""
    folder = Path(folder)
    try:
        m = json.loads((folder / MANIFEST).read_text())
        if isinstance(m, dict) and m.get("created"):
            made = [m.get("stage"), m["created"], m.get("seconds"), m.get("files"), m.get("metrics")]
            return "artifact:" + hashlib.sha256(json.dumps(made).encode()).hexdigest()[:16]
    except (OSError, ValueError):
        pass
    digest = hashlib.sha256()
    for p in sorted(p for p in folder.iterdir() if p.is_file() and (p.name == "config.json"
                                                                     or p.name.endswith(WEIGHT_SUFFIXES))):
        size = p.stat().st_size
        digest.update(f"{p.name}\0{size}\0".encode())
        with p.open("rb") as f:
            digest.update(f.read(CONTENT_SAMPLE))
            if size > CONTENT_SAMPLE:  # (the whole file when it is not twice that)
                f.seek(max(CONTENT_SAMPLE, size - CONTENT_SAMPLE))
                digest.update(f.read())
    return "folder:" + digest.hexdigest()[:16]


def model_fingerprint(folder: str | Path) -> str:
    """A local model folder's identity, cheaply (no weights read): its align.json's mtime where it has one (an
    align artifact, written last by the stage that made it: an SFT adapter, a merged model), else the names,
    sizes and mtimes of its config.json and weight files."""
    folder = Path(folder)
    files = [folder / MANIFEST] if (folder / MANIFEST).is_file() else sorted(
        p for p in folder.iterdir() if p.is_file() and (p.name == "config.json" or p.name.endswith(WEIGHT_SUFFIXES)))
    listing = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- after a failure


@contextmanager
def discard_unfinished(run_dir: str | Path, *outputs: str | Path, command: str | None = None) -> Iterator[None]:
    """On a failure inside, leave no folder that a later stage could take for a finished artifact.

    A stage writes align.json last, so a folder without one is not an artifact; but an empty or
    half-written one left by a run that failed (out of memory, a NaN loss, Ctrl-C) looks like one
    to a person, and a folder with adapter files in it passes for one. So, when the block raises:
    a stage folder it created (a STAGES folder in run_dir or run_dir/round-N, or one of `outputs`) that
    has no align.json is removed, unless it holds checkpoints, which are kept for
    train.resume_from_checkpoint=latest (said with the key as `align <command>` takes it); a finished
    folder whose files it began to rewrite (and did not finish: its align.json unchanged) loses its
    align.json, which no longer describes what is there; run_dir itself goes if it is new and left
    empty. A folder another process holds locked (lock_file: its stage, run beside this one; an export's
    lock beside its folder) is not touched, nor any folder but those (a user's own, W&B's offline runs,
    which show what the failed run did).
    """
    run_dir = Path(run_dir)
    before = {folder: _signature(folder) for folder in _stage_folders(run_dir, outputs)}
    # a finished artifact's manifest and log, to give it back if a rerun stopped before it changed anything else
    saved = {folder: _saved(folder) for folder, signature in before.items() if signature}
    existed = {p for p in (run_dir, *later_rounds(run_dir)) if p.is_dir()}
    try:
        yield
    except BaseException:
        if is_main_process() and _discard(run_dir, outputs, before, existed, command, saved):
            _rebuild_reports(run_dir)
        raise


SAVED_LOG_BYTES = 64 << 20  # a finished stage's metrics.jsonl kept in memory while it is run again, up to this


def _saved(folder: Path) -> tuple[bytes, bytes | None, frozenset[str]]:
    """(align.json, metrics.jsonl or None, its checkpoints' names) of a finished stage folder, as they are before
    it is run again."""
    log_file = folder / "metrics.jsonl"
    kept = log_file.read_bytes() if log_file.is_file() and log_file.stat().st_size <= SAVED_LOG_BYTES else None
    return (folder / MANIFEST).read_bytes(), kept, frozenset(p.name for p in _checkpoints(folder / "checkpoints"))


def _rebuild_reports(run_dir: Path) -> None:
    """The reports in run_dir and its rounds rebuilt after a failure changed which folders are finished: left as
    they were, they showed a stage (and eval's verdict on it) whose manifest is gone. Never at the cost of the
    failure's own message: a report that cannot be built says so in a line."""
    from align.report import write_report

    for folder in (run_dir, *later_rounds(run_dir)):
        if (folder / "report.html").is_file():
            try:
                write_report(folder)
            except Exception as err:  # noqa: BLE001 - the stage's own error is the one to see
                log.warning("%s not rebuilt after the failure (%s): python -m align.report %s rebuilds it",
                            folder / "report.html", err, shell(folder))


def _stage_folders(run_dir: Path, outputs: tuple) -> list[Path]:
    """The stage folders (STAGES' folders) in run_dir and its rounds, and `outputs`: never another folder there (a
    user's own notes, W&B's runs, an export's .preferences.partial-* of another process), which a failure removed
    when it had no align.json."""
    names = {s.folder for s in STAGES.values() if s.folder}
    parents = [run_dir, *later_rounds(run_dir)] if run_dir.is_dir() else []
    found = [parent / name for parent in parents for name in sorted(names) if (parent / name).is_dir()]
    return found + [Path(p) for p in outputs if Path(p).is_dir()]


def _signature(folder: Path, finished_only: bool = True) -> dict[str, tuple[int, int]]:
    """(mtime, size) of each file of a finished artifact (`finished_only`: {} for a folder without its align.json);
    its checkpoints, metrics log and lock do not count."""
    if finished_only and not (folder / MANIFEST).is_file():
        return {}
    out = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != "checkpoints"]
        for name in files:
            if name not in ("metrics.jsonl", LOCK):
                stat = os.stat(os.path.join(root, name))
                out[os.path.relpath(os.path.join(root, name), folder)] = (stat.st_mtime_ns, stat.st_size)
    return out


def _discard(run_dir: Path, outputs: tuple, before: dict[Path, dict], existed: set[Path],
             command: str | None, saved: dict[Path, tuple[bytes, bytes | None, frozenset[str]]] | None = None
             ) -> bool:
    """Tidies up after a failure; True when a folder a report shows changed: one kept unfinished (for its
    checkpoints) or a finished one that is finished no more."""
    import shutil

    changed = False
    for folder in _stage_folders(run_dir, outputs):
        if _held_elsewhere(folder):  # a stage another process runs beside this one (reward beside dpo): its own
            continue
        if folder not in before:
            if (folder / MANIFEST).is_file():
                continue  # finished by this run (a pipeline stage before the one that failed)
            if _checkpoints(folder / "checkpoints"):
                changed = True
                log.warning("kept %s: unfinished (no %s) but it holds checkpoints; %s continues from them",
                            folder, MANIFEST, resume_key(folder, command))
            elif not any(p.name != LOCK for p in folder.iterdir()):  # refused before any work: only its lock
                shutil.rmtree(folder, ignore_errors=True)
                log.debug("removed %s: made by the failed run, which wrote nothing in it", folder)
            else:
                shutil.rmtree(folder, ignore_errors=True)
                log.warning("removed %s: the failed run left it unfinished (no %s)", folder, MANIFEST)
            continue
        old = before[folder]
        now = _signature(folder)
        changed |= bool(old) and (now != old or not now)
        if old and now.get(MANIFEST) == old.get(MANIFEST) and now != old:
            (folder / MANIFEST).unlink()
            log.warning("%s: the failed run began to rewrite this artifact; its %s is removed, so no later stage "
                        "takes it as finished", folder, MANIFEST)
        elif old and not now:  # a finished stage's rerun, stopped
            unchanged = _signature(folder, finished_only=False) == {k: v for k, v in old.items() if k != MANIFEST}
            # Nothing of the artifact rewritten and no checkpoint saved (a resume to more steps stopped before its
            # first save, or a rerun before its first file): it is given back. Asked after "holds checkpoints", the
            # branch was never reached on a resume, which always has the finished run's: the artifact, its files
            # untouched, stayed unfinished for good. A checkpoint this run saved keeps the folder unfinished: its log
            # (metrics.jsonl, which a resume's train_loss reads) is this run's, not the finished one's.
            unsaved = folder in (saved or {}) and {p.name for p in _checkpoints(folder / "checkpoints")} <= saved[folder][2]
            if unchanged and unsaved:
                manifest, metrics, _ = saved[folder]
                if metrics is not None:
                    (folder / "metrics.jsonl").write_bytes(metrics)
                (folder / MANIFEST).write_bytes(manifest)
                log.warning("%s is as it was: this run stopped before it changed the finished artifact (its %s, "
                            "taken away as training started, is back)", folder, MANIFEST)
            elif _checkpoints(folder / "checkpoints"):
                log.warning("kept %s: unfinished (its %s went as this run started training) but it holds "
                            "checkpoints; %s continues from them", folder, MANIFEST, resume_key(folder, command))
            else:
                log.warning("%s is unfinished: this run stopped before its first checkpoint, after it had begun "
                            "to rewrite the finished artifact (its %s went as training started); its files are "
                            "the two runs' together: run the stage again", folder, MANIFEST)
    for parent in sorted((p for p in (run_dir, *later_rounds(run_dir)) if p.is_dir() and p not in existed),
                         key=lambda p: len(p.parts), reverse=True):
        if not any(p.name != LOCK for p in parent.iterdir()):  # the pipeline's lock file is not a thing it made
            (parent / LOCK).unlink(missing_ok=True)
            parent.rmdir()
    return changed


def resume_key(folder: Path, command: str | None) -> str:
    """The override that resumes `folder`'s stage from its checkpoints, as `align <command>` takes it."""
    return stage_key(folder, "train.resume_from_checkpoint=latest", command)


def stage_key(folder: Path, key: str, command: str | None) -> str:
    """`key` of the stage writing `folder`, as `align <command>` takes it: `align pipeline` takes a stage's keys
    under the stage's name (sft.train..., ppo.train... for grpo/)."""
    stage = next((s for s in STAGES.values() if s.folder == folder.name), None)
    if command == "pipeline" and stage is not None:
        return f"{stage.runs_as[0] if stage.runs_as else stage.name}.{key}"
    return key


def _holds_adapter(folder: Path) -> bool:
    return (Path(folder) / "adapter_config.json").is_file()


def resolve_policies(cfg: Any) -> dict[str, Path]:
    """Eval's policies, name -> folder: `policies=` as given, else each policy stage's folder in run.dir that holds
    an adapter; StageError where they are not adapters, fewer than two (without human=true), or lack the baseline.
    Here, not in the recipe, so that preflight refuses before the recipe's imports (seconds)."""
    if cfg.policies:
        found = {name: Path(p) for name, p in cfg.policies.items()}
    else:
        found = {s: stage_dir(cfg.run.dir, s) for s in stages_of_kind("policy")
                 if _holds_adapter(stage_dir(cfg.run.dir, s))}
    missing = [f"{n} ({p})" for n, p in found.items() if not _holds_adapter(p)]
    if missing:
        raise StageError(f"not adapter folders: {', '.join(missing)}")
    if not found:
        raise StageError(f"no policies in {cfg.run.dir}: none of its {', '.join(stages_of_kind('policy'))} folders "
                         "holds an adapter; train them first (`align sft`, then `align dpo` or `align ppo`), or pass "
                         "policies={name: folder, ...}")
    if cfg.baseline not in found:
        raise StageError(f"the baseline {cfg.baseline!r} is not among the policies {sorted(found)}; "
                         "set baseline=<name> or policies={name: folder, ...}")
    if len(found) < 2 and not cfg.human:
        raise StageError(f"only {sorted(found)} to evaluate: eval compares at least two policies "
                         "(train one with `align dpo` or `align ppo`, or pass policies={...})")
    return found
