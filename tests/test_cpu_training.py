"""What a CPU training step does beyond TRL's defaults: each part changes speed, never the maths."""

from __future__ import annotations

import json

import pytest
import torch

from align.config import SFTStageConfig, load_config
from align.cpu import CPUDropout, fused_head_on_labelled_positions, use_cpu_dropout
from align.modeling import device_plan, load_tokenizer


def test_cpu_dropout_keeps_one_minus_p_scaled_and_masks_the_gradient():
    torch.manual_seed(0)
    layer = CPUDropout(0.2).train()
    x = torch.ones(500, 400, requires_grad=True)
    y = layer(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.8) < 0.005  # 200k draws: the std of the mean is 0.0009
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.8))
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)
    assert torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], 1 / 0.8))
    # Different masks on different calls, the same mask for the same seed.
    torch.manual_seed(1)
    a = layer(torch.ones(64, 64))
    b = layer(torch.ones(64, 64))
    torch.manual_seed(1)
    assert not torch.equal(a, b) and torch.equal(a, layer(torch.ones(64, 64)))


def test_cpu_dropout_is_the_identity_in_eval_mode_and_at_p_zero():
    x = torch.randn(8, 16)
    assert torch.equal(CPUDropout(0.5).eval()(x), x)
    assert torch.equal(CPUDropout(0.0).train()(x), x)


def test_use_cpu_dropout_swaps_every_lora_dropout(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear", task_type="CAUSAL_LM"))
    lora_layers = [m for m in model.modules() if hasattr(m, "lora_dropout") and "default" in m.lora_dropout]
    assert use_cpu_dropout(model) == len(lora_layers) > 0
    assert all(type(m.lora_dropout["default"]) is CPUDropout and m.lora_dropout["default"].p == 0.1
               for m in lora_layers)
    assert use_cpu_dropout(model) == 0  # already swapped


def trl_use_triton():
    """TRL's own `_use_triton`, unwrapped if a stage earlier in this test process patched it."""
    from trl.trainer import utils

    current = utils._use_triton
    return current.__closure__[0].cell_contents if getattr(current, "labelled_only_on_cpu", False) else current


@pytest.fixture
def fused_model(tiny_model):
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    return model


def test_fused_head_on_labelled_positions_gives_the_same_values_from_fewer_rows(fused_model, monkeypatch):
    from trl.kernels import chunked_logprob
    from trl.trainer import utils

    torch.manual_seed(0)
    ids = torch.randint(3, fused_model.config.vocab_size, (3, 20))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # left padding
    labels = ids.clone()
    labels[:, :12] = -100  # a prompt: no loss there
    labels[mask == 0] = -100

    rows = []
    apply = chunked_logprob.ChunkedLogProbFunction.apply

    def counting(hidden, *args):
        rows.append(hidden.shape[0])
        return apply(hidden, *args)

    monkeypatch.setattr(utils, "_ChunkedLogProbFunction", type("F", (), {"apply": staticmethod(counting)}))

    def run():
        fused_model.zero_grad()
        out = fused_model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        out.loss.backward()
        grad = fused_model.model.layers[0].mlp.up_proj.weight.grad.clone()
        return out, grad

    monkeypatch.setattr(utils, "_use_triton", trl_use_triton())  # TRL's own (restored after the test)
    every, every_grad = run()
    fused_head_on_labelled_positions()
    labelled, labelled_grad = run()

    assert rows == [3 * 19, int((labels[:, 1:] != -100).sum())]  # every position, then only the labelled ones
    logits = fused_model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    reference = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None].clamp(min=0)).squeeze(-1)
    reference = reference.masked_fill(labels[:, 1:] == -100, 0)
    for out in (every, labelled):
        assert torch.allclose(out.log_probs, reference, atol=1e-5)
    assert torch.allclose(every.entropy, labelled.entropy, atol=1e-5)
    assert torch.equal(every.is_top1, labelled.is_top1)
    assert torch.allclose(every.loss, labelled.loss, atol=1e-6)
    assert torch.allclose(every_grad, labelled_grad, atol=1e-6)


def test_fused_head_patch_says_whether_it_applied(monkeypatch, caplog):
    """Applied once (logged), then left alone; when TRL's internals move, a warning and nothing patched."""
    import logging

    from trl.trainer import utils

    monkeypatch.setattr(utils, "_use_triton", trl_use_triton())  # TRL's own (restored after the test)
    with caplog.at_level(logging.INFO, logger="align.cpu"):
        assert fused_head_on_labelled_positions() and utils._use_triton(torch.device("cpu"))
        assert fused_head_on_labelled_positions()
    assert [r.getMessage() for r in caplog.records] == [
        "CPU: TRL's fused LM head patched to score labelled positions only"]

    caplog.clear()
    monkeypatch.setattr(utils, "_use_triton", trl_use_triton())
    monkeypatch.setattr(utils, "add_fused_lm_head", lambda model: model)  # a TRL whose head no longer asks it
    with caplog.at_level(logging.INFO, logger="align.cpu"):
        assert not fused_head_on_labelled_positions()
    assert not getattr(utils._use_triton, "labelled_only_on_cpu", False)
    assert "TRL's internals changed" in caplog.text and caplog.records[0].levelname == "WARNING"
    monkeypatch.delattr(utils, "_use_triton")
    assert not fused_head_on_labelled_positions()


def test_group_by_length_batches_examples_of_similar_length(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.trainer_pt_utils import LengthGroupedSampler
    from trl import SFTTrainer

    from align.data import load_sft_dataset
    from align.modeling import peft_lora_config
    from align.recipes.sft import sft_args

    data = tmp_path / "train.jsonl"
    # Lengths from 1 to 64 words, shuffled: random batches of 8 are mostly padding.
    rows = [{"instruction": "Say it.", "input": "", "output": " ".join(["sync"] * (1 + (i * 37) % 64))}
            for i in range(256)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dataset, _ = load_sft_dataset(data)
    tokenizer = load_tokenizer(tiny_model)

    def padding(group: bool) -> float:
        cfg = load_config(SFTStageConfig, None, [f"model.name={tiny_model}", "run.wandb=disabled",
                                                 f"data.group_by_length={str(group).lower()}"])

        trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model),
                             args=sft_args(cfg, device_plan(cfg.model), tmp_path, has_eval=False),
                             train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_lora_config(cfg.lora))
        assert isinstance(trainer._get_train_sampler(), LengthGroupedSampler) == group
        pad = total = 0
        for batch in trainer.get_train_dataloader():
            pad += int((batch["attention_mask"] == 0).sum())
            total += batch["attention_mask"].numel()
        return pad / total

    grouped, shuffled = padding(True), padding(False)
    assert grouped < shuffled / 3, (grouped, shuffled)


def test_sft_and_dpo_train_with_the_cpu_parts(tiny_model, sft_data, tmp_path, caplog):
    """The stages apply them: the log line names how many LoRA dropouts were swapped."""
    import logging

    from align.cli import main as align

    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("\n".join(json.dumps({"prompt": f"Ticket {i}: sync?", "chosen": "Thanks! Tap Sync.",
                                           "rejected": "No."}) for i in range(12)) + "\n")
    common = ["run.wandb=disabled", "train.max_steps=1", "train.batch_size=4", "model.max_length=96",
              f"run.dir={tmp_path}"]
    with caplog.at_level(logging.INFO, logger="align.cpu"):
        assert align(["sft", f"model.name={tiny_model}", f"data.path={sft_data}", "data.eval_fraction=0",
                      "lora.dropout=0.05", *common]) == 0
        assert align(["dpo", f"data.path={prefs}", "data.test_fraction=0", *common]) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("CPU training:")]
    # SFT: a fresh LoRA on 2 layers × 7 linear; DPO: the policy and its frozen "ref" copy, swapped alike
    # (same p: the reference forward behaves as TRL runs it, only the mask is drawn differently).
    assert len(lines) == 2 and all("0 LoRA dropouts" not in line for line in lines), lines
