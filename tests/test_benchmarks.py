"""The side-by-side benchmarks (benchmarks/sft.py, dpo.py) give both sides the same work: the same batches
and the same adapter precision, on the tiny model, without training (TRL's train() is replaced)."""

from __future__ import annotations

import importlib.util
import sys
from argparse import Namespace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch):
    """Loads benchmarks/NAME.py as a module, its folder on sys.path (the scripts import _common from it)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


def trl_trains(monkeypatch, trainer_class) -> dict:
    """What the TRL side's trainer holds when train() is called, instead of training."""
    from _common import trainable_dtype

    seen = {}

    def train(self, *args, **kwargs):
        seen.update(sampling=self.args.train_sampling_strategy, adapters=trainable_dtype(self.model))

    monkeypatch.setattr(trainer_class, "train", train)
    return seen


@pytest.mark.parametrize("group", [True, False])
def test_sfts_trl_side_samples_batches_as_ours(bench, tiny_model, tmp_path, monkeypatch, group):
    """Grouped on our side only, a short run compared ours' longest mega-batch with TRL's random draw."""
    from trl import SFTTrainer

    sft = bench("sft")
    seen = trl_trains(monkeypatch, SFTTrainer)
    args = Namespace(model=tiny_model, quantize=False, steps=2, batch=2, max_length=64, group_by_length=group)
    sft.run_trl(args, tmp_path / "out", sft.StepClock())
    assert seen["sampling"] == ("group_by_length" if group else "random")


def test_the_trl_sides_train_fp32_adapters_on_cpu_as_ours(bench, tiny_model, tmp_path, monkeypatch):
    """TRL casts a 4-bit model's LoRA weights to bf16; align casts them back on CPU, so the TRL side does too."""
    from trl import DPOTrainer, SFTTrainer

    sft, dpo = bench("sft"), bench("dpo")
    seen = trl_trains(monkeypatch, SFTTrainer)
    args = Namespace(model=tiny_model, quantize=True, steps=2, batch=2, max_length=64, group_by_length=False)
    sft.run_trl(args, tmp_path / "sft-out", sft.StepClock())
    assert seen["adapters"] == "float32"

    seen = trl_trains(monkeypatch, DPOTrainer)
    adapter = dpo.fresh_adapter(tiny_model, tmp_path / "adapter")
    pairs = dpo.write_pairs(tmp_path / "pairs.jsonl", "single")
    args = Namespace(quantize=True, steps=2, batch=2, max_length=64)
    dpo.run_trl(args, tmp_path / "dpo-out", pairs, adapter, dpo.StepClock())
    assert seen["adapters"] == "float32"


def test_the_step_clock_reads_each_sides_adapter_dtype(bench):
    import torch
    from _common import StepClock

    model = torch.nn.Linear(2, 2).to(torch.bfloat16)
    clock = StepClock()
    clock.mark(1, {"num_tokens": 10}, model)
    clock.mark(2, {"num_tokens": 30}, model)
    assert clock.figures()["adapter_dtype"] == "bfloat16"


@pytest.mark.parametrize("given", [["--size", "1.5b"], ["--model", "other-model"]])
def test_dpo_refuses_a_model_beside_an_adapter_before_building_a_stand_in(bench, monkeypatch, capsys, given):
    """Both sides train on the adapter's base: --size (or --model) with --sft would label the run with a model
    it did not train, after building a 1.5b stand-in for nothing."""
    import _common

    dpo = bench("dpo")
    monkeypatch.setattr(_common, "sized_model", lambda size: pytest.fail("built a stand-in"))
    monkeypatch.setattr(sys, "argv", ["dpo.py", *given, "--sft", "runs/q/sft"])
    with pytest.raises(SystemExit) as stop:
        dpo.main()
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"{given[0]} {given[1]} with --sft runs/q/sft" in err and f"drop {given[0]}" in err
