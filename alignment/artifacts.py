"""Run-directory layout and manifests (`align.json`): what made each artifact, from what.

    runs/<name>/
      sft/ sample/ labels.db preferences/ reward/ dpo/ ppo/ eval/    one folder per stage
      report.html report.md                                           the run's report

Each stage folder holds its artifact, the resolved `config.yaml`, `metrics.jsonl` and
`align.json`: stage, base model, parents (upstream artifact folders with their hashes),
data hash, git commit, time, and the stage's final figures. Later stages read base model,
chat template and max length from their parent's manifest instead of asking again.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
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
