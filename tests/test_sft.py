"""`align sft` on a tiny model, through the CLI: loss falls, adapters train, artifacts load back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.cli import main as align
from align.tracking import read_jsonl

FAST = ["run.wandb=disabled", "train.lr=5e-3", "train.batch_size=8", "train.logging_steps=1",
        "train.warmup_ratio=0", "model.max_length=160", "data.eval_fraction=0.1"]


def run_sft(tiny_model, sft_data, run_dir, *extra) -> Path:
    rc = align(["sft", f"model.name={tiny_model}", f"data.path={sft_data}", f"run.dir={run_dir}", *FAST, *extra])
    assert rc == 0
    return Path(run_dir) / "sft"


def losses(folder: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(folder / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def qlora_run(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft-qlora")
    data = tmp / "train.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Question {i}: how do I sync?", "input": "",
                                          "output": "Thanks for reaching out! Open Settings and tap Sync now."})
                              for i in range(40)) + "\n")
    return run_sft(tiny_model, data, tmp / "run", "model.quantize=true", "train.max_steps=30",
                   "train.eval_steps=15"), data


def test_qlora_sft_loss_falls_and_every_adapter_trains(qlora_run):
    out, _ = qlora_run
    seen = losses(out)
    assert len(seen) >= 10
    assert seen[-1] < 0.7 * seen[0], f"loss did not fall: {seen}"
    weights = load_file(str(out / "adapter_model.safetensors"))
    lora_b = {k: v for k, v in weights.items() if "lora_B" in k}
    assert lora_b, "no LoRA weights saved"
    # peft initialises every lora_B at zero: a non-zero B means that adapter was trained.
    untouched = [k for k, v in lora_b.items() if v.abs().sum() == 0]
    assert not untouched, f"adapters never updated: {untouched}"
    # all-linear: attention and MLP projections of every layer.
    assert {k.split(".")[-3] for k in lora_b} >= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"}


def test_artifact_manifest_config_and_report(qlora_run):
    out, data = qlora_run
    manifest = json.loads((out / "align.json").read_text())
    assert manifest["stage"] == "sft"
    assert manifest["data"]["used"] == 40 and manifest["data"]["skipped"] == 0
    assert manifest["data"]["train"] + manifest["data"]["eval"] == 40
    assert manifest["metrics"]["eval_loss"] < 4.0
    assert "4-bit NF4" in manifest["device_plan"] and "float32 compute" in manifest["device_plan"]
    assert (out / "config.yaml").is_file() and "quantize: true" in (out / "config.yaml").read_text()
    assert any("eval_loss" in r for r in read_jsonl(out / "metrics.jsonl"))
    report = (out.parent / "report.html").read_text()
    assert "<img" in report and "id='sft'" in report


def test_adapter_loads_back_with_peft_and_generates(qlora_run):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = qlora_run
    model = AutoPeftModelForCausalLM.from_pretrained(str(out))
    assert isinstance(model, PeftModel)
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok.apply_chat_template([{"role": "user", "content": "Question 99: how do I sync?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    gen = model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    # The task has one answer; a trained adapter starts it.
    assert text.startswith("Thanks"), text
    base = AutoModelForCausalLM.from_pretrained(model.peft_config["default"].base_model_name_or_path)
    assert isinstance(PeftModel.from_pretrained(base, str(out)), PeftModel)


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_qlora_adapters_train_in_fp32_under_any_compute(compute, tiny_model, sft_data, tmp_path, monkeypatch):
    """As on a GPU (none of the CPU's own tweaks): TRL rounds a 4-bit model's adapter to bf16, the QLoRA paper's
    recipe under bf16 compute, where AdamW drops the updates under ~1/256 of a weight (a decaying schedule's
    tail); align's adapters train in fp32 under either compute, as its reward, DPO and PPO adapters do."""
    from align.recipes import sft

    monkeypatch.setattr(sft, "speed_up_cpu_training", lambda model: None)
    out = run_sft(tiny_model, sft_data, tmp_path, "model.quantize=true", f"model.compute_dtype={compute}",
                  "train.max_steps=1", "train.eval_steps=100")
    assert {t.dtype for t in load_file(str(out / "adapter_model.safetensors")).values()} == {torch.float32}


def test_lora_dora_rslora_switches(tiny_model, sft_data, tmp_path):
    out = run_sft(tiny_model, sft_data, tmp_path / "run", "model.quantize=false", "lora.use_dora=true",
                  "lora.use_rslora=true", "lora.r=4", "train.max_steps=3", "train.eval_steps=3")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["use_rslora"] is True and cfg["r"] == 4
    assert any("lora_magnitude_vector" in k for k in load_file(str(out / "adapter_model.safetensors")))
    assert "unquantized base + DoRA with rsLoRA scaling" in json.loads((out / "align.json").read_text())["device_plan"]


def test_a_wandb_error_that_escapes_a_stage_is_one_line(tiny_model, sft_data, tmp_path, wandb_server, monkeypatch,
                                                        capsys):
    """wandb.init's error for a key the server refuses, where the preflight could not ask (wandb_key_refusal: no
    clear answer): a traceback of wandb's (CommError: user is not logged in). Now one line naming run.wandb."""
    import wandb

    from align import tracking

    monkeypatch.setattr(tracking, "wandb_key_refusal", lambda: None)
    wandb.teardown()  # wandb reads its server (WANDB_BASE_URL) once a process: an earlier test's would be kept
    try:
        rc = align(["sft", f"model.name={tiny_model}", f"data.path={sft_data}", f"run.dir={tmp_path / 'run'}",
                    *FAST[1:], "run.wandb=online", "train.max_steps=1"])
    finally:
        wandb.teardown()  # nor this test's server kept for later ones
    err = capsys.readouterr().err
    assert rc == 1 and "align sft: W&B: user is not logged in (run.wandb=offline logs without the server" in err, err
    assert "Traceback" not in err and not (tmp_path / "run" / "sft" / "align.json").exists()

def test_resume_continues_the_step_count(tiny_model, sft_data, tmp_path):
    """A resumed run continues checkpoint-4: its step count, metrics, rate and its weights (not a fresh adapter)."""
    out = run_sft(tiny_model, sft_data, tmp_path / "run", "model.quantize=false", "train.max_steps=4",
                  "train.eval_steps=2", "train.scheduler=constant")
    assert (out / "checkpoints" / "checkpoint-4").is_dir()
    # as a run killed after checkpoint-4 leaves it: steps 5 and 6 logged, checkpoint-6 cut short as it was saved
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write("".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in (5, 6)))
    (out / "checkpoints" / "checkpoint-6").mkdir()
    (out / "checkpoints" / "checkpoint-6" / "adapter_model.safetensors").write_bytes(b"cut")
    out = run_sft(tiny_model, sft_data, tmp_path / "run", "model.quantize=false", "train.max_steps=6",
                  "train.eval_steps=2", "train.scheduler=constant", "train.resume_from_checkpoint=latest",
                  "train.lr=1e-4")
    # metrics.jsonl is appended on resume: steps 1-4 from the first run, 5-6 from the resumed
    # one (the killed run's 5 and 6 dropped), none trained or logged twice.
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6], steps
    (aside,) = (out / "checkpoints").glob("abandoned-*")  # resumed from checkpoint-4: the cut one set aside
    assert (aside / "checkpoint-6" / "adapter_model.safetensors").read_bytes() == b"cut"
    assert 9.0 not in [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    ends = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "train_runtime" in r]
    assert ends == [4, 6], f"expected a first run ending at 4 and a resumed one at 6, got {ends}"
    assert json.loads((out / "align.json").read_text())["metrics"]["global_step"] == 6
    # The resumed steps trained checkpoint-4's weights, not a fresh adapter: 2 Adam steps at 1e-4 move each weight
    # by about 2e-4, where checkpoint-4's lora_B are about 2e-2 from the fresh adapter's zeros (4 steps at 5e-3),
    # and step 5's loss continues the fall instead of starting again near step 1's. (checkpoint-6, not the final
    # adapter: load_best_model_at_end would hand back checkpoint-4 itself if the resumed steps were worse.)
    resumed_from = load_file(str(out / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors"))
    final = load_file(str(out / "checkpoints" / "checkpoint-6" / "adapter_model.safetensors"))
    assert final.keys() == resumed_from.keys()
    assert min(v.abs().max().item() for k, v in resumed_from.items() if "lora_B" in k) > 5e-3
    assert max((final[k] - resumed_from[k]).abs().max().item() for k in final) < 1e-3
    loss_at = {r["step"]: r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r}
    assert loss_at[5] < loss_at[4] < loss_at[1], loss_at
    # resumed with another train.lr: the new rate trains (the Trainer restored the checkpoint's)
    rates = {r["step"]: r["learning_rate"] for r in read_jsonl(out / "metrics.jsonl") if "learning_rate" in r}
    assert rates[5] == rates[6] == pytest.approx(1e-4) and rates[4] != pytest.approx(1e-4), rates
    # train_loss is the whole run's (steps 1-6), not only the two steps trained since the resume
    losses = {r["step"]: r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r}
    recorded = json.loads((out / "align.json").read_text())["metrics"]
    assert recorded["train_loss"] == pytest.approx(sum(losses.values()) / 6, rel=1e-3)  # logged every step here
    assert recorded["train_loss_since_resume"] == pytest.approx((losses[5] + losses[6]) / 2, rel=1e-3)
    # ... and where the logs do not reach the end of either part, the steps after a log count at its loss
    from types import SimpleNamespace

    from align.training import train_loss

    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [{"step": 1, "loss": 6.0},
                                                                             {"step": 3, "loss": 5.0}]))
    got = train_loss(SimpleNamespace(training_loss=2.0, global_step=7), out, str(out / "checkpoints/checkpoint-4"))
    assert got == {"train_loss": pytest.approx((6.0 + 2 * 5.0 + 1 * 5.0 + 3 * 2.0) / 7), "train_loss_since_resume": 2.0}


def test_a_resumed_run_logs_evaluates_and_saves_at_its_own_steps(tiny_model, sft_data, tmp_path):
    """The Trainer, resuming, takes the checkpoint's trainer_state.json, whose eval, save and logging steps it then
    steps by: a run made with eval_steps=2, resumed with train.eval_steps=50000, still evaluated every 2 steps
    while config.yaml recorded 50000. The resumed steps follow this run's train.eval_steps and logging_steps."""
    out = run_sft(tiny_model, sft_data, tmp_path / "run", "model.quantize=false", "train.max_steps=4",
                  "train.eval_steps=2")
    out = run_sft(tiny_model, sft_data, tmp_path / "run", "model.quantize=false", "train.max_steps=9",
                  "train.eval_steps=3", "train.logging_steps=2", "train.resume_from_checkpoint=latest")
    rows = read_jsonl(out / "metrics.jsonl")
    # every 3 steps and at the last (the checkpoint's 2 gave 6, 8, 9); a loss every 2 steps (was every step)
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4, 6, 9], rows
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 6, 8], rows
    assert (out / "checkpoints" / "checkpoint-6").is_dir() and not (out / "checkpoints" / "checkpoint-8").exists()

def test_latest_over_a_finished_run_on_other_data_trains_the_new_data(tiny_model, sft_data, tmp_path, capsys):
    """The pipeline's case: sft finished, its data edited, run again with resume_from_checkpoint=latest. The
    finished run's checkpoint-4 is set aside and 4 steps train on the new data (it resumed at step 4, trained
    nothing and kept the old adapter under a manifest naming the new data's hash)."""
    args = ["model.quantize=false", "train.max_steps=4", "train.eval_steps=2", "train.resume_from_checkpoint=latest"]
    out = run_sft(tiny_model, sft_data, tmp_path / "run", *args)
    old = load_file(str(out / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors"))
    sft_data.write_text(sft_data.read_text().replace("Open Settings", "Open the menu"))
    capsys.readouterr()
    out = run_sft(tiny_model, sft_data, tmp_path / "run", *args)
    said = capsys.readouterr()
    assert "checkpoints of a run on other inputs (data differ" in said.err
    # trained on its own data, the next step samples that data's prompts, not the shipped support data's default
    assert f"next: align sample run.dir={tmp_path / 'run'} prompts={sft_data}\n" in said.out
    ends = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "train_runtime" in r]
    assert ends == [4] and [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
    new = load_file(str(out / "adapter_model.safetensors"))
    assert any(not torch.equal(old[k], new[k]) for k in old)
    # Named by its path, a finished run's checkpoint is refused before anything loads: nothing is left to train
    # from it (the Trainer trained one step past train.max_steps).
    rc = align(["sft", f"model.name={tiny_model}", f"data.path={sft_data}", f"run.dir={tmp_path / 'run'}", *FAST,
                "train.max_steps=4", f"train.resume_from_checkpoint={out / 'checkpoints' / 'checkpoint-4'}"])
    assert rc == 2 and "a finished run's checkpoint (step 4, train.max_steps=4)" in capsys.readouterr().err


def test_a_rerun_of_a_finished_sft_is_no_longer_marked_finished_once_it_trains(tiny_model, sft_data, tmp_path,
                                                                              monkeypatch):
    """Run again over a finished sft, its old align.json (the mark of a finished run) is gone from the moment
    training starts, so a kill that tidies nothing up (SIGKILL) after the first step leaves no finished-looking
    artifact over this run's log. Stopped with Ctrl-C there, before it had rewritten anything of the artifact, the
    tidy-up gives the finished artifact back whole: its align.json and its log (it was left unusable, in silence)."""
    from align.report import write_report
    from align.training import MetricsJSONL

    out = run_sft(tiny_model, sft_data, tmp_path / "run", "model.quantize=false", "train.max_steps=2",
                  "train.eval_steps=2")
    manifest, log = (out / "align.json").read_text(), read_jsonl(out / "metrics.jsonl")
    marked = []

    def stopped(self, args, state, control, **kwargs):  # stopped after the first step
        marked.append(((out / "align.json").exists(), read_jsonl(out / "metrics.jsonl")))
        raise KeyboardInterrupt

    monkeypatch.setattr(MetricsJSONL, "on_step_end", stopped)
    rc = align(["sft", f"model.name={tiny_model}", f"data.path={sft_data}", f"run.dir={tmp_path / 'run'}", *FAST,
                "model.quantize=false", "train.max_steps=4", "train.eval_steps=2"])
    assert rc == 130 and marked == [(False, [])]  # as a SIGKILL would leave it: no manifest over this run's log
    assert (out / "align.json").read_text() == manifest and read_jsonl(out / "metrics.jsonl") == log and log
    assert "<section id='sft'>" in write_report(tmp_path / "run").read_text()


def test_a_run_stopped_after_its_last_step_finishes_with_latest_at_max_steps(tiny_model, sft_data, tmp_path,
                                                                             monkeypatch, caplog):
    """Stopped after its last step (Ctrl-C while it wrote its manifest), a run leaves checkpoint-<max_steps> and no
    align.json, and align says `latest` continues it. `latest` refused that checkpoint ("nothing is left to
    train"); before that, the Trainer resumed from it trained a step past train.max_steps (global_step 3 of 2).
    Now it trains nothing more, ends at exactly max_steps and writes the artifact from checkpoint-2's weights."""
    from align.recipes import sft

    args = ["model.quantize=false", "train.max_steps=2", "train.eval_steps=2", "train.resume_from_checkpoint=latest"]
    real = sft.write_manifest

    def stopped(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sft, "write_manifest", stopped)
    rc = align(["sft", f"model.name={tiny_model}", f"data.path={sft_data}", f"run.dir={tmp_path / 'run'}", *FAST,
                *args])
    out = tmp_path / "run" / "sft"
    assert rc == 130 and not (out / "align.json").exists()
    assert "train.resume_from_checkpoint=latest continues from them" in caplog.text
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]
    trained = load_file(str(out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors"))
    logged = read_jsonl(out / "metrics.jsonl")
    monkeypatch.setattr(sft, "write_manifest", real)
    out = run_sft(tiny_model, sft_data, tmp_path / "run", *args)
    manifest = json.loads((out / "align.json").read_text())
    assert manifest["metrics"]["global_step"] == 2
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]  # no step 3
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == [1, 2]
    losses = [r["loss"] for r in logged if "loss" in r]
    assert manifest["metrics"]["train_loss"] == pytest.approx(sum(losses) / 2, rel=1e-3)  # the whole run's
    final = load_file(str(out / "adapter_model.safetensors"))
    assert final.keys() == trained.keys() and all(torch.equal(final[k], trained[k]) for k in final)


def test_merge_gives_the_same_logits_as_base_plus_adapter(qlora_run, tmp_path):
    """A QLoRA adapter is folded into the dequantized NF4 weights it was trained against: the merged model gives
    the trained model's logits (the 4-bit base + the adapter), not those of the original weights + the adapter;
    base=original folds it into the original weights, and the manifest says which."""
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    from align.config import ModelConfig
    from align.modeling import device_plan, load_base_model

    out, _ = qlora_run
    for base in ("auto", "original"):
        assert align(["merge", f"adapter={out}", f"output={tmp_path / base}", f"base={base}", "run.wandb=disabled"]) == 0
    cfg = ModelConfig(name=json.loads((out / "align.json").read_text())["base_model"], quantize=True)
    trained = PeftModel.from_pretrained(load_base_model(cfg, device_plan(cfg)), str(out)).eval()
    original = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    for base, reference in (("auto", trained), ("original", original)):
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / base))
        with torch.no_grad():
            a, b = merged(ids).logits, reference(ids).logits
        assert torch.allclose(a, b, atol=1e-4), (base, (a - b).abs().max())
    assert [json.loads((tmp_path / b / "align.json").read_text())["merged_into"] for b in ("auto", "original")] == [
        "nf4", "original"]


def test_merge_dequantizes_the_4bit_base_on_the_host(qlora_run, tmp_path, monkeypatch):
    """On a GPU the 4-bit base loads there, and transformers' `dequantize` makes each layer's full-precision copy
    on the device of its 4-bit weights: the base is moved to the host before, or the GPU would hold it whole in
    the merge's dtype (Llama-3-8B in fp32 on the 24 GB card QLoRA trained it on: out of memory). No GPU here: the
    base's moves and its dequantization are recorded, in order, and the merge is still the one into NF4."""
    from align.recipes import merge

    out, _ = qlora_run
    calls, load = [], merge.load_base_model

    def recorded(*args, **kwargs):
        model = load(*args, **kwargs)
        to, dequantize = model.to, model.dequantize
        model.to = lambda *a, **k: calls.append(("to", a, k)) or to(*a, **k)
        model.dequantize = lambda *a, **k: calls.append(("dequantize",)) or dequantize(*a, **k)
        return model

    monkeypatch.setattr(merge, "load_base_model", recorded)
    assert align(["merge", f"adapter={out}", f"output={tmp_path / 'merged'}", "run.wandb=disabled"]) == 0
    assert calls[:2] == [("to", ("cpu",), {}), ("dequantize",)], calls
    assert json.loads((tmp_path / "merged" / "align.json").read_text())["merged_into"] == "nf4"


def test_the_merged_folder_stops_at_the_end_of_turn_sft_taught(tiny_model, tmp_path):
    """A base without a chat template whose EOS is <|endoftext|> but whose vocabulary has <|im_end|> (SmolLM2's and
    Qwen's base models): load_tokenizer makes <|im_end|> the EOS, and SFT teaches it. The merged folder's
    generation_config, which generate() stops at, ends there too (besides the base's own), with a pad id."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from align.artifacts import write_manifest
    from align.modeling import load_tokenizer

    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    raw = AutoTokenizer.from_pretrained(base)
    raw.chat_template, raw.eos_token = None, "<|endoftext|>"
    raw.save_pretrained(base)
    endoftext, im_end = raw.convert_tokens_to_ids("<|endoftext|>"), raw.convert_tokens_to_ids("<|im_end|>")
    GenerationConfig(bos_token_id=raw.bos_token_id, eos_token_id=endoftext).save_pretrained(base)
    tokenizer = load_tokenizer(str(base))
    assert tokenizer.eos_token_id == im_end  # what SFT trains each answer to end with

    adapter = tmp_path / "sft"
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(
        adapter)
    tokenizer.save_pretrained(adapter)
    write_manifest(adapter, stage="sft", config={}, base_model=str(base))
    assert align(["merge", f"adapter={adapter}", "run.wandb=disabled"]) == 0
    merged = GenerationConfig.from_pretrained(tmp_path / "sft-merged")
    assert merged.eos_token_id == [im_end, endoftext] and merged.pad_token_id == tokenizer.pad_token_id


def test_bad_data_line_is_a_clear_cli_error(tiny_model, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q"}\n')
    rc = align(["sft", f"model.name={tiny_model}", f"data.path={bad}", f"run.dir={tmp_path}", "run.wandb=disabled"])
    assert rc == 2
    assert f"{bad}:2: missing field 'output'" in capsys.readouterr().err


def test_a_later_example_the_chat_template_refuses_is_named_or_skipped(tiny_model, tmp_path, capsys):
    """A template that insists on alternating turns (Llama-2's, Mistral v0.1's, Gemma's) refusing an example past the
    first ones preflight renders: a Jinja traceback naming no file, and data.on_error=skip did not skip it. Now the
    record's file and line (exit 2), or it is left out and counted as skipped."""
    base = tmp_path / "alternating"
    shutil.copytree(tiny_model, base)
    strict = ("{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
              "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    (base / "chat_template.jinja").write_text(strict)
    rows = [{"messages": [{"role": "user", "content": f"Question {i}: how do I sync?"},
                          {"role": "assistant", "content": f"Answer {i}: tap Sync now."}]} for i in range(12)]
    rows[7]["messages"].insert(1, {"role": "user", "content": "Are you there?"})  # two user turns in a row
    data = tmp_path / "alt.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    rc = align(["sft", f"model.name={base}", f"data.path={data}", f"run.dir={tmp_path / 'raise'}", *FAST,
                "model.quantize=false", "train.max_steps=1"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{data}:8: the chat template of model.name={base} refuses this example's conversation" in err
    assert "Conversation roles must alternate" in err and "Traceback" not in err
    out = run_sft(base, data, tmp_path / "skip", "model.quantize=false", "train.max_steps=1", "data.on_error=skip")
    manifest = json.loads((out / "align.json").read_text())["data"]
    assert (manifest["used"], manifest["skipped"], manifest["train"] + manifest["eval"]) == (11, 1, 11)


@pytest.mark.parametrize("packing", ["false", "true"])
def test_examples_whose_prompt_fills_max_length_are_counted_as_dropped_not_trained(packing, tiny_model, tmp_path,
                                                                                  caplog, capsys):
    """TRL drops an example whose prompt alone reaches max_length (no answer token left): the stage said only
    "truncated" and align.json counted it as trained. Now it says dropped, and records what TRL trains on.
    Packed, TRL kept them as chunks of prompt alone, every label masked (all of them: loss 0, an untrained
    adapter, no error): now they are dropped before TRL packs, and every prompt too long is the same error."""
    log = " Here is my log: " + " ".join(f"line{j} error sync failed" for j in range(40))
    rows = [{"instruction": f"Question {i}: how do I sync my notes?" + (log if i < 6 else ""),
             "output": f"Answer {i}: Open Settings and tap Sync now."} for i in range(20)]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with caplog.at_level("WARNING"):
        out = run_sft(tiny_model, data, tmp_path / "run", "model.quantize=false", "train.max_steps=1",
                      "model.max_length=96", "data.eval_fraction=0", f"data.packing={packing}")
    manifest = json.loads((out / "align.json").read_text())["data"]
    assert (manifest["used"], manifest["train"], manifest["dropped_prompt_too_long"]) == (20, 14, 6)
    assert "6 of 20 examples are dropped: their prompt alone is model.max_length=96 tokens or more" in caplog.text
    assert "will be truncated" not in caplog.text  # the other answers fit
    rc = align(["sft", f"model.name={tiny_model}", f"data.path={data}", f"run.dir={tmp_path / 'all'}", *FAST,
                "model.max_length=8", "data.eval_fraction=0", f"data.packing={packing}"])
    assert rc == 1 and "every training example's prompt is model.max_length=8 tokens or longer" in capsys.readouterr().err


def test_a_datasetdicts_test_split_is_the_held_out_set(tiny_model, tmp_path, caplog):
    """A save_to_disk DatasetDict's test split is held out as given (it was ignored, and one cut from train);
    validation stands in without one; other splits are ignored with a warning."""
    from datasets import Dataset, DatasetDict

    def rows(name, n):
        return Dataset.from_list([{"instruction": f"{name} question {i}: how do I sync?", "output": "Open Settings."}
                                  for i in range(n)])

    folder = tmp_path / "dd"
    DatasetDict({"train": rows("train", 12), "test": rows("test", 5), "extra": rows("extra", 3)}).save_to_disk(folder)
    with caplog.at_level("WARNING"):
        out = run_sft(tiny_model, folder, tmp_path / "run", "model.quantize=false", "train.max_steps=1")
    data = json.loads((out / "align.json").read_text())["data"]
    assert (data["train"], data["eval"], data["eval_split"]) == (12, 5, "test")
    assert "ignoring splits ['extra'] (only train, and test as the held-out set, are used)" in caplog.text
    from align.data import load_sft_dataset

    DatasetDict({"train": rows("train", 12), "validation": rows("validation", 4)}).save_to_disk(tmp_path / "dv")
    train, report = load_sft_dataset(tmp_path / "dv")
    held, _ = load_sft_dataset(tmp_path / "dv", split=report.held_out)
    assert (len(train), report.held_out, len(held)) == (12, "validation", 4)
    assert all(p[0]["content"].startswith("validation") for p in held["prompt"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "ppo"])
def test_liger_without_cuda_is_a_clear_error_before_loading(stage, tiny_model, tmp_path, capsys):
    """train.liger=true on CPU names the key and why, for every training stage, and writes nothing."""
    args = [stage, f"model.name={tiny_model}", f"run.dir={tmp_path}", "run.wandb=disabled", "train.liger=true"]
    if stage in ("reward", "dpo"):
        (tmp_path / "prefs.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
        args.append(f"data.path={tmp_path / 'prefs.jsonl'}")
    elif stage == "ppo":
        args += ["scorer=length", "sft=none"]
    rc = align(args)
    err = capsys.readouterr().err
    assert rc != 0 and "train.liger" in err, err
    assert ("CUDA" in err) if stage != "ppo" else ("own PPO loop" in err), err
    assert not (tmp_path / stage / "align.json").exists()


def test_a_wandb_run_left_open_does_not_swallow_the_stages_own_run(tiny_model, qlora_run, tmp_path):
    """A W&B run opened before with other settings (wandb reads them once per process) does not take the stage's run."""
    import subprocess
    import sys

    import wandb

    leftover = wandb.init(project="elsewhere", name="leftover", dir=str(tmp_path), mode="offline")
    run_dir = tmp_path / "run"
    run_sft(tiny_model, qlora_run[1], run_dir, "run.wandb=offline", "train.max_steps=2", "train.eval_steps=100")
    assert wandb.run is None or wandb.run.id != leftover.id
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1  # the stage's own run, in its run directory
    info = json.loads(subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json",
                                      str(runs[0])], capture_output=True, text=True, check=True).stdout)
    assert info["name"] == "run/sft" and "train/loss" in info["summary"]


def test_the_adapter_names_a_relative_local_base_by_its_absolute_path(tiny_model, sft_data, tmp_path, monkeypatch):
    """model.name=tiny (a folder in the working directory) was recorded as typed in adapter_config.json, so
    AutoPeftModelForCausalLM run from another directory looked for "tiny" on the Hub and failed offline."""
    from peft import AutoPeftModelForCausalLM

    monkeypatch.chdir(Path(tiny_model).parent)
    out = run_sft(Path(tiny_model).name, sft_data, tmp_path / "run", "model.quantize=false", "train.max_steps=1")
    recorded = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(Path(tiny_model).absolute())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert AutoPeftModelForCausalLM.from_pretrained(str(out)).peft_config["default"].base_model_name_or_path == recorded


def test_data_edited_while_training_is_not_recorded_as_trained_on(tiny_model, sft_data, tmp_path, monkeypatch):
    """The manifest's data hash is the file's as the stage read it, before training: taken after, a file edited
    while it trained was recorded as trained on, and `align pipeline` kept the adapter of the old data."""
    import align.recipes.sft as sft
    from align.data import file_hash

    read = file_hash(sft_data)
    train_from = sft.train_from

    def edited_meanwhile(*a, **k):
        sft_data.write_text(sft_data.read_text().replace("Open Settings", "Open the menu"))
        return train_from(*a, **k)

    monkeypatch.setattr(sft, "train_from", edited_meanwhile)
    out = run_sft(tiny_model, sft_data, tmp_path / "run", "model.quantize=false", "train.max_steps=1",
                  "data.eval_fraction=0")
    manifest = json.loads((out / "align.json").read_text())
    assert manifest["data"]["sha256"] == read != file_hash(sft_data)
    assert json.loads((out / "checkpoints" / "trained_on.json").read_text())["data"] == read
