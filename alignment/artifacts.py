"""Run-directory layout and manifests (`align.json`): what made each artifact, from what.

    runs/<name>/
      sft/ sample/ labels.db preferences/ reward/ dpo/ ppo/ eval/    one folder per stage
      report.html report.md                                           the run's report

Each stage folder holds its artifact, the resolved `config.yaml`, `metrics.jsonl` and
`align.json`: stage, base model, parents (upstream artifact folders with their hashes),
data hash, git commit, time, and the stage's final figures. Later stages read base model,
chat template and max length from their parent's manifest instead of asking again. The manifest
is written last: a folder without one is unfinished, and `discard_unfinished` (around every
stage the CLI runs) removes such a folder when its stage fails, unless it holds checkpoints.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MANIFEST = "align.json"


def is_main_process() -> bool:
    """Rank 0 under `accelerate launch` (or torchrun); True for a plain single process.

    Artifacts, manifests, reports, W&B and the labelling store are written by rank 0 only.
    """
    return int(os.environ.get("RANK", "0")) == 0


def stage_dir(run_dir: str | Path, stage: str) -> Path:
    return Path(run_dir) / stage


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        commit = out.stdout.strip()
        if out.returncode == 0 and commit:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5,
                                   cwd=Path(__file__).resolve().parent).stdout.strip()
            return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def write_manifest(folder: str | Path, *, stage: str, config: dict[str, Any], base_model: str | None,
                   parents: dict[str, str | Path] | None = None, metrics: dict[str, Any] | None = None,
                   **extra: Any) -> Path:
    folder = Path(folder)
    path = folder / MANIFEST
    if not is_main_process():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {
        "stage": stage,
        "base_model": base_model,
        "parents": {k: _parent(v) for k, v in (parents or {}).items()},
        "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config,
        "metrics": metrics or {},
        **extra,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    tmp.replace(path)  # a manifest is the "stage finished" mark: never half-written
    return path


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {MANIFEST}: is it an artifact of a finished stage?")
    return json.loads(path.read_text())


def _parent(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    info: dict[str, Any] = {"path": str(path)}
    if (path / MANIFEST).is_file():
        m = read_manifest(path)
        info.update(stage=m.get("stage"), created=m.get("created"))
    return info


def print_done(stage: str, artifact: Path, next_command: str | None) -> None:
    if not is_main_process():
        return
    print(f"\n✔ {stage} finished: {artifact}")
    if next_command:
        print(f"  next: {next_command}")


# ---------------------------------------------------------------------------- after a failure


@contextmanager
def discard_unfinished(run_dir: str | Path, *outputs: str | Path) -> Iterator[None]:
    """On a failure inside, leave no folder that a later stage could take for a finished artifact.

    A stage writes align.json last, so a folder without one is not an artifact; but an empty or
    half-written one left by a run that failed (out of memory, a NaN loss, Ctrl-C) looks like one
    to a person, and a folder with adapter files in it passes for one. So, when the block raises:
    a stage folder it created (a child of run_dir, of run_dir/round-N, or one of `outputs`) that
    has no align.json is removed, unless it holds checkpoints, which are kept for
    train.resume_from_checkpoint=latest; a finished folder whose files it began to rewrite (and
    did not finish: its align.json unchanged) loses its align.json, which no longer describes what
    is there; run_dir itself goes if it is new and left empty. W&B's offline runs (run_dir/wandb)
    are kept: they show what the failed run did.
    """
    run_dir = Path(run_dir)
    before = {folder: _signature(folder) for folder in _stage_folders(run_dir, outputs)}
    existed = {p for p in (run_dir, *run_dir.glob("round-*")) if p.is_dir()}
    try:
        yield
    except BaseException:
        if is_main_process():
            _discard(run_dir, outputs, before, existed)
        raise


def _stage_folders(run_dir: Path, outputs: tuple) -> list[Path]:
    parents = [run_dir, *sorted(run_dir.glob("round-*"))] if run_dir.is_dir() else []
    found = [p for parent in parents for p in parent.iterdir()
             if p.is_dir() and p.name != "wandb" and not p.name.startswith("round-")]
    return found + [Path(p) for p in outputs if Path(p).is_dir()]


def _signature(folder: Path) -> dict[str, tuple[int, int]]:
    """(mtime, size) of each file of a finished artifact; its checkpoints and metrics log do not count."""
    if not (folder / MANIFEST).is_file():
        return {}
    out = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != "checkpoints"]
        for name in files:
            if name != "metrics.jsonl":
                stat = os.stat(os.path.join(root, name))
                out[os.path.relpath(os.path.join(root, name), folder)] = (stat.st_mtime_ns, stat.st_size)
    return out


def _discard(run_dir: Path, outputs: tuple, before: dict[Path, dict], existed: set[Path]) -> None:
    import logging
    import shutil

    log = logging.getLogger(__name__)
    for folder in _stage_folders(run_dir, outputs):
        if folder not in before:
            if (folder / MANIFEST).is_file():
                continue  # finished by this run (a pipeline stage before the one that failed)
            if (folder / "checkpoints").is_dir() and any((folder / "checkpoints").iterdir()):
                log.warning("kept %s: unfinished (no %s) but it holds checkpoints; train.resume_from_checkpoint="
                            "latest continues from them", folder, MANIFEST)
            else:
                shutil.rmtree(folder, ignore_errors=True)
                log.warning("removed %s: the failed run left it unfinished (no %s)", folder, MANIFEST)
            continue
        old = before[folder]
        now = _signature(folder)
        if old and now.get(MANIFEST) == old.get(MANIFEST) and now != old:
            (folder / MANIFEST).unlink()
            log.warning("%s: the failed run began to rewrite this artifact; its %s is removed, so no later stage "
                        "takes it as finished", folder, MANIFEST)
    for parent in sorted((p for p in (run_dir, *run_dir.glob("round-*")) if p.is_dir() and p not in existed),
                         key=lambda p: len(p.parts), reverse=True):
        if not any(parent.iterdir()):
            parent.rmdir()
