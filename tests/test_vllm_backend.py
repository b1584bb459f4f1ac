"""generation.backend=vllm: refused clearly where it cannot run, and the calls it makes to vLLM.

vLLM needs a CUDA GPU, which CI does not have. Its refusals run for real here; what our code
hands vLLM (token ids, sampling settings, the adapter as a LoRARequest, one engine per base) is
checked against a stand-in `vllm` module that records the calls, since the engine itself cannot
start on this machine.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from align.cli import main as align
from align.config import GenerationConfig
from align.generation import Policy, chat_prompt

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


@no_cuda
@pytest.mark.parametrize("stage", ["sample", "eval", "ppo"])
def test_vllm_without_cuda_is_a_clear_error_before_loading(stage, tiny_model, tmp_path, capsys):
    args = [stage, f"run.dir={tmp_path}", "run.wandb=disabled", "generation.backend=vllm"]
    if stage == "sample":
        args += [f"policy={tiny_model}"]
    elif stage == "ppo":
        args += [f"model.name={tiny_model}", "scorer=length", "sft=none", "algo=grpo", "rl.num_generations=2"]
    rc = align(args)
    err = capsys.readouterr().err
    assert rc != 0 and "generation.backend=vllm" in err and "CUDA" in err, err
    assert not (tmp_path / stage / "align.json").exists()


def test_ppo_own_loop_refuses_vllm_and_names_the_algorithms_that_take_it(tiny_model, tmp_path, capsys):
    rc = align(["ppo", f"model.name={tiny_model}", f"run.dir={tmp_path}", "run.wandb=disabled", "scorer=length",
                "sft=none", "generation.backend=vllm"])
    err = capsys.readouterr().err
    assert rc != 0 and "algo=grpo" in err and "generation.backend=vllm" in err, err


class FakeLLM:
    """Records what align hands vLLM and answers with the prompt's length and the sample's index."""

    made: list[dict] = []

    def __init__(self, **kwargs):
        FakeLLM.made.append(kwargs)
        self.calls: list[tuple] = []
        self.shut_down = False

    def shutdown(self):
        self.shut_down = True

    def generate(self, requests, params, lora_request=None, use_tqdm=True):
        self.calls.append((requests, params, lora_request))
        out = types.SimpleNamespace
        return [out(outputs=[out(text=f" {len(r['prompt_token_ids'])}-{j} ", finish_reason=("stop", "length")[j % 2])
                             for j in range(p.n)])
                for r, p in zip(requests, params, strict=True)]


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.LLM = FakeLLM
    vllm.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = lambda name, lora_id, path: types.SimpleNamespace(name=name, id=lora_id, path=path)
    for name, module in {"vllm": vllm, "vllm.lora": lora, "vllm.lora.request": request}.items():
        monkeypatch.setitem(sys.modules, name, module)
    from align import generation

    monkeypatch.setattr(generation, "_engines", {})
    monkeypatch.setattr(generation, "_adapter_ids", {})
    FakeLLM.made = []
    return generation


def adapter(tiny_model: str, folder: Path, r: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=r, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return folder


def test_vllm_generate_hands_the_same_tokens_settings_and_adapter(fake_vllm, tiny_model, tmp_path):
    from align.modeling import load_tokenizer

    first, second = adapter(tiny_model, tmp_path / "sft", 4), adapter(tiny_model, tmp_path / "dpo", 16)
    gen = GenerationConfig(backend="vllm", max_new_tokens=12, temperature=0.7, top_p=0.9, seed=5)
    tokenizer = load_tokenizer(str(first))
    prompts = ["How do I sync?", "Where are my notes?", "Export to PDF?"]

    got = fake_vllm.generate(Policy(None, tokenizer, str(first), tiny_model), prompts, gen, k=3)
    ids = [tokenizer(chat_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    assert got == [[f"{len(i)}-{j}" for j in range(3)] for i in ids]  # in prompt order, k each, stripped
    answers = fake_vllm.generate_answers(Policy(None, tokenizer, str(first), tiny_model), prompts[:1], gen, k=3)
    assert [a.finished for a in answers[0]] == [True, False, True]  # "stop" ended, "length" was cut

    (made,) = FakeLLM.made
    assert made["model"] == tiny_model and made["enable_lora"] and made["max_lora_rank"] == 8  # r=4 → 8
    assert made["quantization"] is None and made["dtype"] == "auto"  # a Policy says nothing: the base as it is
    (engine,) = fake_vllm._engines.values()
    requests, params, lora = engine.calls[0]
    assert [r["prompt_token_ids"] for r in requests] == ids
    assert [(p.n, p.temperature, p.top_p, p.max_tokens, p.seed) for p in params] == [
        (3, 0.7, 0.9, 12, 5 + i) for i in range(3)]
    assert params[0].stop_token_ids == [tokenizer.eos_token_id]
    assert lora.path == lora.name == str(first.resolve()) and lora.id == 1  # named by path: round-1/sft is another

    # A second adapter on the same base: the same engine, its own LoRA id; a rank above the engine's is refused.
    fake_vllm.generate(Policy(None, tokenizer, str(first), tiny_model), prompts[:1], gen)
    assert len(FakeLLM.made) == 1 and engine.calls[2][2].id == 1
    from align import StageError

    with pytest.raises(StageError, match="rank 16"):
        fake_vllm.generate(Policy(None, tokenizer, str(second), tiny_model), prompts[:1], gen)


def test_the_next_stage_of_a_pipeline_gets_the_engines_gpu_memory_back(fake_vllm, tiny_model, tmp_path, monkeypatch):
    """An engine holds generation.vllm_gpu_memory_utilization of the GPU; the stages after sampling need it."""
    import torch

    from align.config import GenerationConfig
    from align.generation import Policy
    from align.gpu_training import new_stage_on_gpu
    from align.modeling import load_tokenizer

    folder = adapter(tiny_model, tmp_path / "sft", 8)
    policy = Policy(None, load_tokenizer(tiny_model), str(folder), tiny_model)
    fake_vllm.generate(policy, ["How do I sync?"], GenerationConfig(backend="vllm", max_new_tokens=4))
    (engine,) = fake_vllm._engines.values()
    for name in ("is_available", "empty_cache", "reset_peak_memory_stats"):  # as on a CUDA machine
        monkeypatch.setattr(torch.cuda, name, lambda: True)
    new_stage_on_gpu()
    assert engine.shut_down and not fake_vllm._engines and not fake_vllm._adapter_ids
    fake_vllm.generate(policy, ["How do I sync?"], GenerationConfig(backend="vllm", max_new_tokens=4))
    assert len(FakeLLM.made) == 2  # sampling again starts a fresh engine


def test_sample_with_vllm_loads_no_torch_model(fake_vllm, tiny_model, tmp_path, monkeypatch):
    """align sample's policy for vLLM is the tokenizer only: the GPU's memory is left to vLLM."""
    from align.config import ModelConfig
    from align.modeling import device_plan

    folder = adapter(tiny_model, tmp_path / "sft", 8)
    policy = fake_vllm.load_policy(folder, ModelConfig(quantize=False), device_plan(ModelConfig(quantize=False)),
                                   load_model=False)
    assert policy.model is None and policy.base_model == json.loads(
        (folder / "adapter_config.json").read_text())["base_model_name_or_path"]


def test_a_dora_adapter_is_refused_for_vllm_before_any_model_loads(tiny_model, sft_data, tmp_path, monkeypatch,
                                                                   capsys):
    """vLLM loads LoRA adapters only: its PEFTHelper refuses one with use_dora ("vLLM does not yet support DoRA."),
    after the engine and the base have loaded. sample, eval and serve refuse it first, naming the key; a pipeline
    whose SFT trains DoRA, before it trains. (The CUDA and package check passes, as on a GPU machine with vLLM.)"""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from align import generation

    monkeypatch.setattr(generation, "check_backend", lambda gen: None)
    lora = adapter(tiny_model, tmp_path / "lora", 8)
    dora = tmp_path / "dora"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                   LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM", use_dora=True)).save_pretrained(dora)
    for f in lora.glob("tokenizer*"):
        (dora / f.name).write_bytes(f.read_bytes())
    (prompts := tmp_path / "prompts.jsonl").write_text('{"prompt": "How do I sync?"}\n')
    common = [f"run.dir={tmp_path / 'run'}", "run.wandb=disabled", "generation.backend=vllm"]
    for args, key in (
            (["sample", f"policy={dora}", f"prompts={prompts}"], f"policy={dora}"),
            (["eval", f"policies={{a: {lora}, b: {dora}}}", "baseline=a", f"prompts={prompts}", "scorer=length"],
             f"policies.b={dora}"),
            (["serve", f"adapters={{a: {lora}, b: {dora}}}"], f"adapters.b={dora}")):
        assert align([*args, *common]) == 2, args
        err = capsys.readouterr().err
        assert f"{key}: a DoRA adapter" in err and "generation.backend=transformers" in err, err
    # LoRA for vLLM, and DoRA for transformers: let through
    from align.config import SampleStageConfig, ServeStageConfig, load_config
    from align.preflight import check_stage

    check_stage("sample", load_config(SampleStageConfig, None, [f"policy={lora}", f"prompts={prompts}", *common]))
    check_stage("serve", load_config(ServeStageConfig, None, [f"adapters={{b: {dora}}}", *common[:2]]))
    assert align(["pipeline", f"run.dir={tmp_path / 'p'}", "run.wandb=disabled", "stages=[sft, sample]",
                  f"sft.model.name={tiny_model}", f"sft.data.path={sft_data}", "sft.lora.use_dora=true",
                  f"sample.prompts={prompts}", "sample.generation.backend=vllm"]) == 2
    err = capsys.readouterr().err
    assert "sample.generation.backend=vllm with sft.lora.use_dora=true" in err and not (tmp_path / "p" / "sft").exists()


def test_vllm_loads_the_base_as_the_stage_does_4bit_and_in_its_dtype(fake_vllm, tiny_model, tmp_path, monkeypatch):
    """model.quantize and model.compute_dtype reach vLLM's engine, as `align serve` passes them (--quantization
    bitsandbytes, --dtype): sample drew from the unquantized base, not the 4-bit one its adapter trained on, and
    eval's answers came from it while its KL ran on the 4-bit transformers model."""
    from align.config import ModelConfig
    from align.modeling import device_plan

    folder = adapter(tiny_model, tmp_path / "sft", 8)
    gen = GenerationConfig(backend="vllm", max_new_tokens=4)
    for cfg, expected in ((ModelConfig(quantize=True, compute_dtype="bfloat16"), ("bitsandbytes", "bfloat16")),
                          (ModelConfig(quantize=False), (None, "auto"))):
        policy = fake_vllm.load_policy(folder, cfg, device_plan(cfg), load_model=False)  # align sample's
        fake_vllm.generate(policy, ["How do I sync?"], gen)
        assert (FakeLLM.made[-1]["quantization"], FakeLLM.made[-1]["dtype"]) == expected
    assert len(fake_vllm._engines) == 2  # one engine per way of loading the base

    # align eval: the policies answer through vLLM on the 4-bit base its KL model is loaded on
    monkeypatch.setattr(fake_vllm, "check_backend", lambda gen: None)  # as on a GPU machine with vLLM
    other = adapter(tiny_model, tmp_path / "dpo", 8)
    (prompts := tmp_path / "prompts.jsonl").write_text('{"prompt": "How do I sync?"}\n{"prompt": "Export?"}\n')
    FakeLLM.made = []
    fake_vllm._engines.clear()
    assert align(["eval", f"policies={{sft: {folder}, dpo: {other}}}", "baseline=sft", f"prompts={prompts}",
                  "scorer=length", f"run.dir={tmp_path / 'run'}", "run.wandb=disabled", "generation.backend=vllm",
                  "generation.max_new_tokens=4", "model.quantize=true", "kl_samples=0", "bootstrap=10"]) == 0
    assert [(m["quantization"], m["dtype"]) for m in FakeLLM.made] == [("bitsandbytes", "auto")]


def test_eval_builds_its_one_vllm_engine_for_the_largest_rank_among_its_policies(fake_vllm, tiny_model, tmp_path,
                                                                                  monkeypatch):
    """The engine is made at the first adapter sampled, for its rank: eval's policies of ranks 8 then 64 failed
    at the second ("sample them in separate runs", which eval cannot), the other order passed."""
    monkeypatch.setattr(fake_vllm, "check_backend", lambda gen: None)  # as on a GPU machine with vLLM
    small, large = adapter(tiny_model, tmp_path / "sft", 8), adapter(tiny_model, tmp_path / "dpo", 64)
    (prompts := tmp_path / "prompts.jsonl").write_text('{"prompt": "How do I sync?"}\n')
    assert align(["eval", f"policies={{sft: {small}, dpo: {large}}}", "baseline=sft", f"prompts={prompts}",
                  "scorer=length", f"run.dir={tmp_path / 'run'}", "run.wandb=disabled", "generation.backend=vllm",
                  "generation.max_new_tokens=4", "model.quantize=false", "kl_samples=0", "bootstrap=10"]) == 0
    (made,) = FakeLLM.made
    assert made["max_lora_rank"] == 64
    (engine,) = fake_vllm._engines.values()
    assert [call[2].path for call in engine.calls] == [str(small.resolve()), str(large.resolve())]
