"""`align dpo` on a tiny model: the held-out margin rises, the reference is the SFT policy (not the raw
base), the output is a plain peft adapter, and the loss switch names what is allowed."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.cli import main as align
from align.config import DPOStageConfig, load_config
from align.tracking import read_jsonl

REPO = Path(__file__).resolve().parents[1]
TOPICS = ["Sync", "Export", "Backup", "Theme", "Share", "Tags", "Password", "Search", "Trash", "Widgets"]
POLITE = "Thanks for asking! Open Settings, then tap {t}."
RUDE = "Stop asking me. Find {t} in Settings yourself."
FAST = ["run.wandb=disabled", "train.logging_steps=1", "train.warmup_ratio=0", "model.max_length=128"]


def write_pairs(path: Path, n: int) -> Path:
    rows = [{"prompt": f"Ticket {i}: where is {TOPICS[i % 10]}?", "chosen": POLITE.format(t=TOPICS[i % 10]),
             "rejected": RUDE.format(t=TOPICS[i % 10])} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def sft_dir(tiny_model, tmp_path_factory) -> Path:
    """An SFT adapter trained to differ clearly from the base (so a base reference would show)."""
    tmp = tmp_path_factory.mktemp("dpo-sft")
    data = tmp / "sft.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Ticket {i}: where is {TOPICS[i % 10]}?", "input": "",
                                          "output": f"Sure. {TOPICS[i % 10]} is in Settings."}) for i in range(24)))
    run = tmp / "run"
    assert align(["sft", f"model.name={tiny_model}", f"data.path={data}", f"run.dir={run}", "train.max_steps=12",
                  "train.lr=5e-3", "train.warmup_ratio=0", "run.wandb=disabled", "model.quantize=false",
                  "data.eval_fraction=0", "model.max_length=128"]) == 0
    return run / "sft"


@pytest.fixture(scope="module")
def dpo_run(sft_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo")
    data = write_pairs(tmp / "prefs.jsonl", 40)
    assert align(["dpo", f"run.dir={tmp / 'run'}", f"sft={sft_dir}", f"data.path={data}", "model.quantize=true",
                  "train.max_steps=16", "train.lr=2e-3", "train.batch_size=8", "train.eval_steps=8",
                  "data.test_fraction=0.2", *FAST]) == 0
    return tmp / "run" / "dpo", data


def completion_logp(model, tokenizer, prompt: list[dict], completion: list[dict]) -> float:
    """log p(completion | prompt) under the chat template, computed without TRL."""
    head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
    start = len(head["input_ids"])
    ids = torch.tensor([full])
    with torch.no_grad():
        logps = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    return logps[start - 1:].gather(-1, ids[0, start:, None]).sum().item()


def heldout_margin(model, tokenizer, test) -> float:
    margins = [completion_logp(model, tokenizer, p, c) - completion_logp(model, tokenizer, p, r)
               for p, c, r in zip(test["prompt"], test["chosen"], test["rejected"], strict=True)]
    return sum(margins) / len(margins)


def test_dpo_raises_the_heldout_margin_and_saves_a_plain_adapter(dpo_run, sft_dir, tiny_model):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.preferences import load_preferences

    out, data = dpo_run
    metrics = json.loads((out / "align.json").read_text())["metrics"]
    assert metrics["heldout_reward_margin"] > 0 and metrics["heldout_accuracy"] >= 0.75, metrics
    assert metrics["heldout_pairs"] == 8 and len(metrics["heldout_accuracy_ci"]) == 2
    assert not any(k.startswith(("eval_rewards/", "eval_logps/")) for k in metrics)  # TRL's per-batch means: not here
    assert metrics["heldout_logp_margin_dpo"] > metrics["heldout_logp_margin_sft"]
    rows = read_jsonl(out / "metrics.jsonl")
    assert any("rewards/chosen" in r and "rewards/rejected" in r and "rewards/margins" in r for r in rows)

    # Only the policy adapter, as peft's default, in a plain folder on the SFT's base.
    assert not (out / "ref").exists() and (out / "adapter_model.safetensors").is_file()
    manifest = json.loads((out / "align.json").read_text())
    assert manifest["base_model"] == tiny_model and set(manifest["parents"]) == {"sft", "preferences"}
    policy = AutoPeftModelForCausalLM.from_pretrained(str(out))
    assert list(policy.peft_config) == ["default"]
    # Every LoRA matrix moved from its SFT value (QLoRA, with an evaluation before training).
    before, after = (load_file(str(d / "adapter_model.safetensors")) for d in (sft_dir, out))
    unchanged = [k for k in before if "lora_" in k and torch.equal(before[k], after[k])]
    assert not unchanged, f"adapters that never trained: {unchanged}"

    # Independently of TRL: the saved DPO adapter prefers the chosen answers more than SFT did.
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    test = load_preferences(data, test_fraction=0.2, seed=42)[0]["test"]
    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(sft_dir))
    assert heldout_margin(policy, tokenizer, test) > heldout_margin(sft, tokenizer, test) + 1.0


def test_reference_is_the_sft_policy_in_the_cli_run(dpo_run):
    """At step 0 the policy is the SFT adapter, so implicit rewards log(pi/ref) are 0 only if ref = SFT."""
    out, _ = dpo_run
    rows = read_jsonl(out / "metrics.jsonl")
    start = next(r for r in rows if r["step"] == 0 and "eval_rewards/chosen" in r)
    first = next(r for r in rows if r["step"] == 1 and "rewards/chosen" in r)  # before the first update
    for row, prefix in ((start, "eval_"), (first, "")):
        assert abs(row[f"{prefix}rewards/chosen"]) < 1e-4 and abs(row[f"{prefix}rewards/rejected"]) < 1e-4, row
    # The SFT's held-out margin in the manifest (the reference's, measured after training) is the policy's
    # at step 0, when the policy was the SFT adapter (8 held-out pairs: one batch, so TRL's mean is over pairs).
    metrics = json.loads((out / "align.json").read_text())["metrics"]
    measured = start["eval_logps/chosen"] - start["eval_logps/rejected"]
    assert metrics["heldout_logp_margin_sft"] == pytest.approx(measured, rel=1e-3, abs=1e-2)


def test_trainer_reference_logprobs_are_the_sft_adapters_not_the_base(sft_dir, tiny_model, tmp_path):
    """The trainer's own reference forward, on a batch, against SFT-on and adapters-off log-probs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from trl import DPOTrainer

    from align.modeling import device_plan, load_tokenizer
    from align.preferences import load_preferences
    from align.recipes.dpo import dpo_args, policy_with_reference

    cfg = load_config(DPOStageConfig, None, [f"sft={sft_dir}", "model.quantize=false", f"run.dir={tmp_path}", *FAST])
    model_cfg = replace(cfg.model, name=tiny_model)
    plan = device_plan(model_cfg)
    data, _ = load_preferences(write_pairs(tmp_path / "p.jsonl", 8), test_fraction=0.5)
    trainer = DPOTrainer(model=policy_with_reference(model_cfg, plan, sft_dir), args=dpo_args(cfg, tmp_path, plan, True),
                         train_dataset=data["train"], eval_dataset=data["test"], processing_class=load_tokenizer(str(sft_dir)))
    batch = next(iter(trainer.get_eval_dataloader()))
    ref = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))

    def logps(model) -> torch.Tensor:
        labels = batch["input_ids"][:, 1:]
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        per_token = out.log_softmax(-1).gather(-1, labels[..., None])[..., 0]
        return (per_token * batch["completion_mask"][:, 1:]).sum(-1)

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    base_logps = logps(base)
    sft_logps = logps(PeftModel.from_pretrained(base, str(sft_dir)))
    assert torch.allclose(ref, sft_logps, atol=1e-3), (ref, sft_logps)
    # The SFT adapter moves these log-probs by whole nats: a base reference could not pass the line above.
    assert (sft_logps - base_logps).abs().mean() > 1.0, (sft_logps, base_logps)


def test_heldout_figures_are_over_pairs_in_uneven_batches(sft_dir, tiny_model, tmp_path):
    """7 held-out pairs as eval batches of 3, 3 and 1, the policy adapter moved off the SFT's: TRL's evaluation
    records each pair's log-probs, the policy's and the reference's (as computed here without TRL), in the
    dataset's order; TRL's eval_rewards/* are the means of the batch means of those same pairs, the figures over
    pairs are not."""
    from align.modeling import device_plan, load_tokenizer
    from align.preferences import load_preferences
    from align.recipes.dpo import AlignDPOTrainer, dpo_args, policy_with_reference
    from align.training import heldout_preferences

    cfg = load_config(DPOStageConfig, None, [f"sft={sft_dir}", "model.quantize=false", f"run.dir={tmp_path}",
                                             "train.batch_size=3", *FAST])
    model_cfg = replace(cfg.model, name=tiny_model)
    plan = device_plan(model_cfg)
    rows = [{"prompt": f"Ticket {i}: where is {TOPICS[i]}?", "chosen": [POLITE, RUDE][i % 2].format(t=TOPICS[i]),
             "rejected": [RUDE, POLITE][i % 2].format(t=TOPICS[i])} for i in range(10)]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data, _ = load_preferences(tmp_path / "p.jsonl", test_fraction=0.7)
    test = data["test"]
    assert len(test) == 7
    tokenizer = load_tokenizer(str(sft_dir))
    trainer = AlignDPOTrainer(model=policy_with_reference(model_cfg, plan, sft_dir), args=dpo_args(cfg, tmp_path, plan, True),
                              train_dataset=data["train"], eval_dataset=test, processing_class=tokenizer)
    model = trainer.model
    torch.manual_seed(0)
    with torch.no_grad():  # the policy away from the reference, so that some pairs are right and some wrong
        for name, param in model.named_parameters():
            if "lora_B.default" in name:
                param.add_(0.05 * torch.randn_like(param))
    trl = trainer.evaluate()
    chosen, rejected, ref_chosen, ref_rejected = trainer.heldout.last

    model.eval()
    for adapter, (c, r) in (("default", (chosen, rejected)), ("ref", (ref_chosen, ref_rejected))):
        model.set_adapter(adapter)
        for i, row in enumerate(test):
            assert c[i] == pytest.approx(completion_logp(model, tokenizer, row["prompt"], row["chosen"]), abs=1e-3)
            assert r[i] == pytest.approx(completion_logp(model, tokenizer, row["prompt"], row["rejected"]), abs=1e-3)
    model.set_adapter("default")

    gaps = [0.1 * ((c - rc) - (r - rr)) for c, r, rc, rr in zip(chosen, rejected, ref_chosen, ref_rejected, strict=True)]
    right = [float(g > 0) for g in gaps]

    def batch_mean(values):
        return sum(sum(b) / len(b) for b in (values[:3], values[3:6], values[6:])) / 3

    assert trl["eval_rewards/accuracies"] == pytest.approx(batch_mean(right), abs=1e-6)
    assert trl["eval_rewards/margins"] == pytest.approx(batch_mean(gaps), abs=1e-4)
    figures = heldout_preferences(trainer, cfg.beta)
    assert 0 < sum(right) < 7 and batch_mean(right) != pytest.approx(sum(right) / 7), right
    assert figures["heldout_accuracy"] == pytest.approx(sum(right) / 7)
    assert figures["heldout_reward_margin"] == pytest.approx(sum(gaps) / 7)
    assert (figures["heldout_pairs"], figures["heldout_prompts"]) == (7, 7)


def _ranking_trainer(sft_dir, tiny_model, tmp_path, rankings: int, *overrides: str):
    """An AlignDPOTrainer batching by ranking over `rankings` K=3 rankings (3 pairs each) at batch_size 6, dropout
    off, its policy a little away from the reference, in training mode; and the loss-and-gradients of a batch."""
    from align.modeling import device_plan, load_tokenizer
    from align.preferences import load_preferences
    from align.recipes.dpo import AlignDPOTrainer, dpo_args, policy_with_reference

    answers = [POLITE, "Open Settings, then tap {t}.", RUDE]
    rows = [{"prompt": f"Ticket {i}: where is {TOPICS[i]}?", "chosen": answers[a].format(t=TOPICS[i]),
             "rejected": answers[b].format(t=TOPICS[i]), "task_id": f"task-{i}"}
            for i in range(rankings) for a, b in [(0, 1), (0, 2), (1, 2)]]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data, _ = load_preferences(tmp_path / "p.jsonl", test_fraction=0)
    cfg = load_config(DPOStageConfig, None, [f"sft={sft_dir}", "model.quantize=false", f"run.dir={tmp_path}",
                                             "train.batch_size=6", *overrides, *FAST])
    model_cfg = replace(cfg.model, name=tiny_model)
    plan = device_plan(model_cfg)
    trainer = AlignDPOTrainer(model=policy_with_reference(model_cfg, plan, sft_dir), args=dpo_args(cfg, tmp_path, plan, False),
                              train_dataset=data["train"], processing_class=load_tokenizer(str(sft_dir)),
                              group_by_ranking=True)
    model = trainer.model
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if ".default." in name:
            param.data += 0.02 * torch.randn_like(param)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.train()

    def loss_and_grads(compute, batch):
        model.zero_grad()
        loss = compute(model, dict(batch), False)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    return trainer, loss_and_grads


def test_each_distinct_response_runs_once_with_the_same_loss_and_gradients(sft_dir, tiny_model, tmp_path):
    # K=3 rankings (3 pairs, 6 rows, 3 distinct responses each) batched by ranking: the policy and the reference
    # run each distinct response once, and the loss and every gradient are what TRL's DPO gives on all rows.
    from trl import DPOTrainer

    trainer, loss_and_grads = _ranking_trainer(sft_dir, tiny_model, tmp_path, 4)
    batch = next(iter(trainer.get_train_dataloader()))
    assert len(batch["input_ids"]) == 12  # two whole rankings: 6 pairs

    ours, our_grads = loss_and_grads(trainer._compute_loss, batch)
    assert (trainer.rows_seen, trainer.rows_run) == (2 * 12, 2 * 6)  # policy + reference: 12 rows, 6 distinct each
    trls, trl_grads = loss_and_grads(lambda *a: DPOTrainer._compute_loss(trainer, *a), batch)
    assert ours == pytest.approx(trls, rel=1e-5) and abs(ours - 0.6931) > 1e-4  # not the untrained ln 2
    assert our_grads.keys() == trl_grads.keys() and len(our_grads) > 2
    for name, grad in our_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, trl_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_every_pair_weighs_the_same_whatever_the_size_of_its_batch(sft_dir, tiny_model, tmp_path):
    """Three K=3 rankings (3 pairs each) at batch_size 6: group_by_ranking packs them into a batch of 6 and one of 3.
    TRL's mean per batch would give a pair of the short batch twice the weight of one in the full batch; each pair's
    share of a step is 1 / (batch_size * grad_accum) wherever it lands, as in the reward stage. The loss the Trainer
    logs stays TRL's, the batch's mean."""
    from trl import DPOTrainer

    trainer, loss_and_grads = _ranking_trainer(sft_dir, tiny_model, tmp_path, 3, "train.grad_accum=2")
    model = trainer.model
    batches = {len(b["input_ids"]) // 2: b for b in trainer.get_train_dataloader()}
    assert sorted(batches) == [3, 6]

    means, mean_grads = {}, {}
    for pairs in (6, 3):
        ours, our_grads = loss_and_grads(trainer._compute_loss, batches[pairs])
        means[pairs], mean_grads[pairs] = loss_and_grads(lambda *a: DPOTrainer._compute_loss(trainer, *a), batches[pairs])
        assert ours == pytest.approx(means[pairs], rel=1e-5)  # logged: TRL's mean per pair
        assert our_grads.keys() == mean_grads[pairs].keys() and len(our_grads) > 2
        for name, grad in our_grads.items():  # the gradient: the batch's sum over the nominal 6 pairs
            assert grad.abs().sum() > 0, name
            torch.testing.assert_close(grad, mean_grads[pairs][name] * pairs / 6, rtol=1e-4, atol=1e-6, msg=name)
    # Through the Trainer's step, which divides by grad_accum (TRL's DPO loss is not scaled for it)
    trainer.current_gradient_accumulation_steps = 2
    model.zero_grad()
    logged = trainer.training_step(model, dict(batches[3])).item()
    assert logged == pytest.approx(means[3] / 2, rel=1e-5)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, mean_grads[3][name] * 3 / 12, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("overrides, message", [
    (["loss=simpo"], r"loss: 'simpo' is not allowed; allowed values: sigmoid, ipo, hinge, robust"),
    (["label_smoothing=0.1"], r"label_smoothing=0.1 has no effect with loss=sigmoid"),
    # cDPO users (TRL's old sigmoid + label_smoothing) are not sent to robust as if it were cDPO: it never stops
    # pushing a pair apart, where cDPO stops at beta * gap = logit(1 - label_smoothing)
    (["label_smoothing=0.1"], r"robust: robust DPO, unbiased under labels flipped with that probability; "
                              r"not cDPO's label smoothing"),
    (["loss=robust", "label_smoothing=0.6"], r"label_smoothing: must be in \[0, 0.5\), got 0.6"),
    (["loss=exo_pair"], r"exo_pair needs a small epsilon"),
    (["beta=0"], r"beta: must be > 0"),
])
def test_loss_switch_names_what_is_allowed(overrides, message, tmp_path, capsys):
    assert align(["dpo", f"run.dir={tmp_path}", *overrides, "run.wandb=disabled"]) == 2
    assert pytest.importorskip("re").search(message, capsys.readouterr().err)


def test_other_losses_run(sft_dir, tmp_path, monkeypatch):
    """loss and label_smoothing reach the trainer that trains (not only the manifest that records them)."""
    from align.recipes import dpo

    trained_with = {}
    compute_loss = dpo.AlignDPOTrainer.compute_loss

    def recording(self, *args, **kwargs):
        trained_with.update(loss_type=self.args.loss_type, label_smoothing=self.args.label_smoothing)
        return compute_loss(self, *args, **kwargs)

    monkeypatch.setattr(dpo.AlignDPOTrainer, "compute_loss", recording)
    data = write_pairs(tmp_path / "prefs.jsonl", 12)
    assert align(["dpo", f"run.dir={tmp_path / 'run'}", f"sft={sft_dir}", f"data.path={data}", "model.quantize=false",
                  "loss=robust", "label_smoothing=0.1", "train.max_steps=2", "train.batch_size=4",
                  "data.test_fraction=0", *FAST]) == 0
    manifest = json.loads((tmp_path / "run" / "dpo" / "align.json").read_text())
    assert manifest["config"]["loss"] == "robust" and manifest["metrics"]["global_step"] == 2
    assert trained_with == {"loss_type": ["robust"], "label_smoothing": 0.1}
    assert manifest["data"]["too_long"] == 0


def test_pairs_edited_while_training_are_not_recorded_as_trained_on(sft_dir, tmp_path, monkeypatch):
    """The manifest's data hash is the pairs' as the stage read them (taken after training, pairs edited meanwhile
    were recorded as trained on, and `align pipeline` kept the policy of the old pairs)."""
    from align.data import file_hash
    from align.recipes import dpo

    data = write_pairs(tmp_path / "prefs.jsonl", 12)
    read, train_from = file_hash(data), dpo.train_from

    def edited_meanwhile(*a, **k):
        write_pairs(data, 13)
        return train_from(*a, **k)

    monkeypatch.setattr(dpo, "train_from", edited_meanwhile)
    assert align(["dpo", f"run.dir={tmp_path / 'run'}", f"sft={sft_dir}", f"data.path={data}", "model.quantize=false",
                  "train.max_steps=1", "train.batch_size=4", "data.test_fraction=0", *FAST]) == 0
    manifest = json.loads((tmp_path / "run" / "dpo" / "align.json").read_text())
    assert manifest["data"]["sha256"] == read != file_hash(data)


def test_ties_are_left_out_not_trained_as_wins_for_the_first_answer(sft_dir, tmp_path, caplog, capsys):
    """`align export ties=margin0` keeps a tie with tie: true and its first answer as chosen: DPO trained that
    order as a preference. The ties are left out (the reward stage trains them as p_chosen 1/2) and counted."""
    rows = [json.loads(line) for line in write_pairs(tmp_path / "prefs.jsonl", 16).read_text().splitlines()]
    for row in rows[::4]:
        row.update(tie=True, margin=0.0)
    (tmp_path / "prefs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    args = ["dpo", f"sft={sft_dir}", "model.quantize=false", "train.max_steps=1", "train.batch_size=4", *FAST]
    with caplog.at_level("WARNING"):
        assert align([*args, f"run.dir={tmp_path / 'run'}", f"data.path={tmp_path / 'prefs.jsonl'}",
                      "data.test_fraction=0"]) == 0
    manifest = json.loads((tmp_path / "run" / "dpo" / "align.json").read_text())
    assert (manifest["data"]["train"], manifest["data"]["ties_dropped"]) == (12, 4)
    assert "left out 4 tie pairs (4 train): a tie prefers neither answer" in caplog.text
    (tmp_path / "ties.jsonl").write_text("\n".join(json.dumps({**r, "tie": True}) for r in rows) + "\n")
    assert align([*args, f"run.dir={tmp_path / 'all'}", f"data.path={tmp_path / 'ties.jsonl'}",
                  "data.test_fraction=0"]) == 1
    assert "all 16 training pairs are ties (tie: true" in capsys.readouterr().err


def test_pairs_the_posterior_barely_decided_are_said_not_silently_trained_as_sure(sft_dir, tmp_path, caplog):
    """combine=dawid_skene's p_chosen: align reward reads it as a soft label, DPO's loss cannot. A pair at p 0.50
    was trained as surely as one at 0.99 without a word; now the stage says how many and how to drop them, and
    the manifest records that p_chosen was not used."""
    rows = [json.loads(line) for line in write_pairs(tmp_path / "prefs.jsonl", 12).read_text().splitlines()]
    for i, row in enumerate(rows):
        p = 0.5025 if i % 3 == 0 else 0.97
        row.update(p_chosen=p, weight=2 * p - 1)
    (tmp_path / "prefs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with caplog.at_level("WARNING"):
        assert align(["dpo", f"sft={sft_dir}", "model.quantize=false", "train.max_steps=1", "train.batch_size=4",
                      f"run.dir={tmp_path / 'run'}", f"data.path={tmp_path / 'prefs.jsonl'}", "data.test_fraction=0",
                      *FAST]) == 0
    assert "4 of 12 training pairs have p_chosen under 0.75" in caplog.text and "min_posterior=0.75" in caplog.text
    manifest = json.loads((tmp_path / "run" / "dpo" / "align.json").read_text())
    assert manifest["data"]["posterior"] == {"p_chosen_used": False, "mean_p_chosen": 0.8142, "under_0.75": 4}


def test_a_rerun_stopped_before_it_trains_keeps_the_finished_artifact(sft_dir, tmp_path, monkeypatch):
    """The finished run's align.json goes only as training begins: a rerun stopped while its trainer was built
    (tokenizing, Ctrl-C) took it away and left the untouched adapter an unfinished folder."""
    from align.recipes import dpo

    data = write_pairs(tmp_path / "prefs.jsonl", 12)
    args = ["dpo", f"run.dir={tmp_path / 'run'}", f"sft={sft_dir}", f"data.path={data}", "model.quantize=false",
            "train.max_steps=2", "train.batch_size=4", "data.test_fraction=0", *FAST]
    assert align(args) == 0
    manifest = tmp_path / "run" / "dpo" / "align.json"
    before = manifest.read_text()

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dpo.AlignDPOTrainer, "__init__", stopped)
    assert align([*args, "train.lr=1e-3"]) == 130
    assert manifest.read_text() == before


def test_refuses_without_an_sft_adapter(tmp_path, capsys):
    assert align(["dpo", f"run.dir={tmp_path}", "run.wandb=disabled"]) == 1
    assert "no SFT adapter" in capsys.readouterr().err


def test_quickstart_yaml_loads():
    cfg = load_config(DPOStageConfig, REPO / "configs/quickstart/dpo.yaml")
    assert cfg.loss == "sigmoid" and cfg.model.quantize
    first = (REPO / "configs/quickstart/dpo.yaml").read_text().splitlines()[0]
    assert first.startswith("# align dpo --config configs/quickstart/dpo.yaml")


def test_qlora_backward_survives_an_evaluation(sft_dir, tiny_model):
    """An eval pass (eval_on_start) must not cut the gradients through the 4-bit base: bitsandbytes
    repacks weights for a CPU kernel without backward unless told not to (align.cpu.keep_4bit_backward,
    which load_base_model applies to every 4-bit model it loads for training)."""
    from align.config import ModelConfig
    from align.modeling import device_plan
    from align.recipes.dpo import policy_with_reference
    from align.reward_model import reward_base

    model_cfg = ModelConfig(name=tiny_model, quantize=True)
    plan = device_plan(model_cfg)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])

    def grads(model) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)  # the same LoRA dropout masks in both runs
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fresh = grads(policy_with_reference(model_cfg, plan, sft_dir))
    model = policy_with_reference(model_cfg, plan, sft_dir)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    after = grads(model)
    assert fresh.keys() == after.keys() and fresh
    wrong = [n for n in fresh if not torch.allclose(fresh[n], after[n], atol=1e-6)]
    assert not wrong, f"gradients changed by an evaluation pass: {wrong[:4]}"
    flags = [m.support_avx512bf16_for_cpu for m in reward_base(model_cfg, plan).modules()
             if hasattr(m, "support_avx512bf16_for_cpu")]
    assert flags and not any(flags)


def test_pairs_longer_than_max_length_are_counted(tiny_model, tmp_path):
    """TRL cuts each side at max_length on its own: a long chosen loses its end and EOS without a word.
    The stage counts such pairs (a warning, and data.too_long in the manifest)."""
    from align.modeling import load_tokenizer
    from align.recipes.dpo import count_too_long

    tokenizer = load_tokenizer(tiny_model)
    short = {"prompt": [{"role": "user", "content": "Where is Sync?"}],
             "chosen": [{"role": "assistant", "content": "Settings > Sync."}],
             "rejected": [{"role": "assistant", "content": "No idea."}]}
    long_chosen = {**short, "chosen": [{"role": "assistant", "content": "Open Settings, then Sync. " * 40}]}
    long_rejected = {**short, "rejected": [{"role": "assistant", "content": "I do not know. " * 40}]}
    long_prompt = {**short, "prompt": [{"role": "user", "content": "Here is my log: sync failed. " * 40}]}
    assert count_too_long([short, long_chosen, long_rejected, short, long_prompt], tokenizer, 128) == (3, 1)
    assert count_too_long([long_chosen], tokenizer, 4096) == (0, 0)


def test_pairs_whose_prompt_fills_max_length_are_counted_as_dropped_not_trained(sft_dir, tmp_path, caplog):
    """TRL drops a pair whose prompt alone reaches max_length: the stage said TRL "cuts" it, and align.json
    counted it as trained. Now it says dropped, and records the pairs TRL trains on."""
    rows = [json.loads(line) for line in write_pairs(tmp_path / "prefs.jsonl", 20).read_text().splitlines()]
    for row in rows[:6]:
        row["prompt"] += " Here is my log: " + " ".join(f"line{j} error sync failed" for j in range(40))
    (tmp_path / "prefs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with caplog.at_level("WARNING"):
        assert align(["dpo", f"run.dir={tmp_path / 'run'}", f"sft={sft_dir}", f"data.path={tmp_path / 'prefs.jsonl'}",
                      "model.quantize=false", "train.max_steps=1", "train.batch_size=4", "data.test_fraction=0",
                      *FAST]) == 0
    data = json.loads((tmp_path / "run" / "dpo" / "align.json").read_text())["data"]
    assert (data["train"], data["dropped_prompt_too_long"], data["too_long"]) == (14, 6, 0)
    assert "6 of 20 pairs are dropped (6 train, 0 held out): their prompt alone is model.max_length=128" in caplog.text
    assert "TRL cuts it there" not in caplog.text


def test_heldout_pairs_cut_at_max_length_are_warned_about_and_counted(sft_dir, tmp_path, caplog):
    """TRL cuts a held-out side at max_length too: two long answers that part only at their end were compared on
    the same text (margin 0, accuracy 0 %), and only the training pairs were counted: no warning, too_long 0."""
    from datasets import Dataset, DatasetDict

    pairs = [json.loads(line) for line in write_pairs(tmp_path / "prefs.jsonl", 10).read_text().splitlines()]
    steps = " Open Settings, then General, then the tab named Sync." * 20  # far beyond 128 tokens
    for row in pairs[8:]:  # held out: the same long answer, then a different last sentence
        row["chosen"], row["rejected"] = steps + " Thanks for asking!", steps + " Stop asking me."
    pairs[0]["chosen"] += steps  # and one training pair
    DatasetDict({"train": Dataset.from_list(pairs[:8]), "test": Dataset.from_list(pairs[8:])}).save_to_disk(
        tmp_path / "prefs")
    with caplog.at_level("WARNING"):
        assert align(["dpo", f"run.dir={tmp_path / 'run'}", f"sft={sft_dir}", f"data.path={tmp_path / 'prefs'}",
                      "model.quantize=false", "train.max_steps=1", "train.batch_size=4", "eval_on_start=false",
                      *FAST]) == 0
    assert ("3 of 10 pairs have a side longer than model.max_length=128 tokens (1 train, 2 held out): TRL cuts it "
            "there") in caplog.text
    data = json.loads((tmp_path / "run" / "dpo" / "align.json").read_text())["data"]
    assert (data["train"], data["test"], data["too_long"], data["dropped_prompt_too_long"]) == (8, 2, 3, 0)


TEXT_MARKERS = ("{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}[END]\n{% endfor %}"
                "{% if add_generation_prompt %}<<assistant>> {% endif %}")


@pytest.mark.parametrize("template", ["chatml", "text markers"])
def test_a_side_cut_at_max_new_tokens_is_trained_without_an_end_of_turn(sft_dir, tiny_model, tmp_path, template):
    """align sample marks a response cut at max_new_tokens (export: chosen_finished / rejected_finished false).
    The trainer's tokens for that side stop at its text: no end of turn the policy never sampled. Also with
    an end marker written as plain text, which BPE may merge with the text's last character."""
    from align.modeling import device_plan, load_tokenizer
    from align.preferences import load_preferences
    from align.recipes.dpo import AlignDPOTrainer, dpo_args, policy_with_reference

    rows = [json.loads(line) for line in write_pairs(tmp_path / "p.jsonl", 4).read_text().splitlines()]
    flags = [(True, True), (False, True), (True, False), (False, False)]
    for row, (chosen, rejected) in zip(rows, flags, strict=True):
        row.update(chosen_finished=chosen, rejected_finished=rejected)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(DPOStageConfig, None, [f"sft={sft_dir}", "model.quantize=false", f"run.dir={tmp_path}", *FAST])
    model_cfg = replace(cfg.model, name=tiny_model)
    plan = device_plan(model_cfg)
    data, _ = load_preferences(tmp_path / "p.jsonl", test_fraction=0)
    tokenizer = load_tokenizer(str(sft_dir))
    end = "<|im_end|>\n"
    if template == "text markers":
        tokenizer.chat_template, end = TEXT_MARKERS, "[END]\n"
    trainer = AlignDPOTrainer(model=policy_with_reference(model_cfg, plan, sft_dir),
                              args=dpo_args(cfg, tmp_path, plan, False), train_dataset=data["train"],
                              processing_class=tokenizer)
    by_prompt = {r["prompt"][0]["content"]: r for r in trainer.train_dataset}
    for row, finished in zip(rows, flags, strict=True):
        got = by_prompt[row["prompt"]]
        for side, done in zip(("chosen", "rejected"), finished, strict=True):
            # (lstrip: with the text template, BPE joins the space after "<<assistant>>" to the answer's first word)
            assert tokenizer.decode(got[f"{side}_ids"]).lstrip() == row[side] + (end if done else ""), (side, done)


@pytest.mark.smollm
def test_a_cut_side_loses_an_end_marker_that_bpe_merged_into_its_text():
    """With an end marker written as plain text, SmolLM2's BPE merges a final "." with its "<" ('.<'): the
    end of turn is not a suffix of the side's ids. The cut side still ends exactly at its text."""
    from datasets import Dataset
    from trl.data_utils import common_prefix_length

    from align.embedded import embedded_model_dir
    from align.modeling import load_tokenizer
    from align.recipes.dpo import drop_cut_ends

    embedded_model_dir()
    tokenizer = load_tokenizer("smollm2-135m")
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|stop|>\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    prompt = [{"role": "user", "content": "Where is Sync?"}]
    chosen = [{"role": "assistant", "content": "Open Settings, then tap Sync."}]
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(prompt + chosen, tokenize=True, return_dict=True)["input_ids"]
    n = common_prefix_length(prompt_ids, full)  # as TRL 1.16's DPO tokenization splits them
    marker = tokenizer("<|stop|>\n", add_special_tokens=False)["input_ids"]
    assert full[-len(marker):] != marker  # merged: a suffix cut would leave the marker in
    rows = Dataset.from_list([{"prompt": prompt, "chosen": chosen, "prompt_ids": full[:n], "chosen_ids": full[n:],
                               "chosen_finished": finished} for finished in (False, True)])
    cut, whole = drop_cut_ends(rows, tokenizer)
    assert tokenizer.decode(cut["chosen_ids"]) == "Open Settings, then tap Sync."
    assert whole["chosen_ids"] == full[n:]


def test_an_sft_trained_unquantized_put_on_a_4bit_base_is_warned_about(sft_dir, tmp_path, caplog):
    """`align sft model.quantize=false` then `align dpo` (model.quantize defaults to true) put the SFT adapter on a
    4-bit base without a word: the reference "= the SFT policy" was the SFT plus rounding it never trained with.
    Now it says so, naming the key; on the base it trained on, and the other way round, it says nothing."""
    data = write_pairs(tmp_path / "prefs.jsonl", 8)
    args = ["dpo", f"sft={sft_dir}", f"data.path={data}", "train.max_steps=1", "train.batch_size=4",
            "data.test_fraction=0", *FAST]
    for quantize, warned in (("true", True), ("false", False)):
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert align([*args, f"run.dir={tmp_path / quantize}", f"model.quantize={quantize}"]) == 0
        said = "was trained on an unquantized base and this stage puts it on a 4-bit one" in caplog.text
        assert said == warned, caplog.text
        assert ("pass model.quantize=false" in caplog.text) == warned


def test_unseen_quantization_is_only_the_lossy_direction(tmp_path):
    """A QLoRA adapter on the unquantized base (the quickstart's DPO, on purpose), or on a 4-bit base as it
    trained, or an adapter without a manifest that says how it trained: no warning."""
    from align.modeling import DevicePlan, unseen_quantization

    four_bit = DevicePlan("cpu", quantize=True, compute_dtype=torch.float32, gradient_checkpointing=False)
    full = replace(four_bit, quantize=False)
    for name, quantize, ran in (("fp32", False, full), ("qlora", True, four_bit)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "align.json").write_text(json.dumps(
            {"config": {"model": {"quantize": quantize}}, "device_plan": ran.describe()}))
    (tmp_path / "bare").mkdir()
    assert "model.quantize=false" in unseen_quantization(tmp_path / "fp32", four_bit)
    assert unseen_quantization(tmp_path / "fp32", full) is None
    assert unseen_quantization(tmp_path / "qlora", full) is None
    assert unseen_quantization(tmp_path / "qlora", four_bit) is None
    assert unseen_quantization(tmp_path / "bare", four_bit) is None


def test_a_run_moved_while_stopped_resumes_from_its_checkpoints(sft_dir, tmp_path, monkeypatch, caplog, capsys):
    """`mv run moved/run` (or cp -r, scp without times) is the same run: its SFT parent was identified by its path
    and its align.json's mtime, so train.resume_from_checkpoint=latest set the checkpoints aside as "a run on other
    inputs (sft differ)" and trained from scratch. An SFT made again is another parent: those are set aside."""
    import shutil

    from align.training import MetricsJSONL

    data = write_pairs(tmp_path / "prefs.jsonl", 12)
    run = tmp_path / "run"
    shutil.copytree(sft_dir, run / "sft")

    def args(run: Path) -> list[str]:
        return ["dpo", f"run.dir={run}", f"sft={run / 'sft'}", f"data.path={data}", "model.quantize=false",
                "train.max_steps=4", "train.eval_steps=2", "train.batch_size=4", "data.test_fraction=0", *FAST]

    step_end = MetricsJSONL.on_step_end

    def stopped(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise KeyboardInterrupt
        return step_end(self, args, state, control, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(MetricsJSONL, "on_step_end", stopped)
        assert align(args(run)) == 130
    assert (run / "dpo" / "checkpoints" / "checkpoint-2").is_dir()
    moved = tmp_path / "moved" / "run"
    moved.parent.mkdir()
    run.rename(moved)
    for path in moved.rglob("*"):  # as cp -r leaves them: every file stamped now
        os.utime(path)
    caplog.set_level("INFO", logger="align.artifacts")
    with monkeypatch.context() as m:
        m.setattr(MetricsJSONL, "on_step_end", stopped)
        assert align([*args(moved), "train.resume_from_checkpoint=latest"]) == 130
    assert f"resuming from {moved / 'dpo' / 'checkpoints' / 'checkpoint-2'}" in caplog.text
    assert "other inputs" not in caplog.text + capsys.readouterr().err
    assert not list((moved / "dpo" / "checkpoints").glob("abandoned-*"))
    # the SFT made again (its manifest's stamp): another parent, whose checkpoints do not go on
    sft = moved / "sft" / "align.json"
    sft.write_text(json.dumps({**json.loads(sft.read_text()), "created": "2999-01-01T00:00:00+0000"}))
    assert align([*args(moved), "train.resume_from_checkpoint=latest", "train.max_steps=2"]) == 0
    assert "a run on other inputs (sft differ" in capsys.readouterr().err
