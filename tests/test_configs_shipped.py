"""Every YAML the project ships loads with the class its command uses, and starts with that command."""

from __future__ import annotations

from pathlib import Path

import pytest

from align.artifacts import STAGES
from align.config import load_config

REPO = Path(__file__).resolve().parents[1]
RECIPE_CONFIGS = sorted(p for p in REPO.joinpath("configs").rglob("*.yaml") if "accelerate" not in p.parts)


def test_there_are_recipe_configs():
    assert {p.stem for p in RECIPE_CONFIGS} >= {"sft", "sample", "export", "reward", "dpo", "eval", "pipeline"}


@pytest.mark.parametrize("path", RECIPE_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_loads_strictly_and_names_its_command(path):
    stage = path.stem
    assert stage in STAGES, f"{path}: name a config after its stage"
    first = path.read_text().splitlines()[0]
    assert first == f"# align {stage} --config {path.relative_to(REPO)}", f"{path}: first line must give the command"
    import align.config

    cfg = load_config(getattr(align.config, STAGES[stage].config), path)
    assert cfg.run.dir.startswith("runs/")
