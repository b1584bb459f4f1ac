"""Every path that hands tensors to a model builds them on the model's device, not the CPU's.

Run on a CPU-only machine with a second device that has values (tests/other_device.py): the model
is moved there, the code under test runs unchanged, and each result must equal the same code's on
the CPU. An op that mixes the device with a CPU tensor fails as it does on a GPU, so
`align eval`'s KL (CPU token ids into a CUDA model, seen on an H200) fails here without its fix.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from other_device import DEVICE, OnDevice, other_device, unwrap

from align.config import GenerationConfig, PPOStageConfig, load_config
from align.generation import Policy, generate
from align.modeling import DevicePlan, load_tokenizer

PROMPTS = ["How do I sync?", "Where is export?", "Can I share a note?"]
CPU_PLAN = DevicePlan("cpu", quantize=False, compute_dtype=torch.float32, gradient_checkpointing=False)


def lora_adapter(base: str, folder: Path, seed: int, task_type: str = "CAUSAL_LM") -> Path:
    """A LoRA adapter with random (not zero) B matrices, so that two of them are two different policies."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    if task_type == "SEQ_CLS":
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
        model.config.pad_token_id = load_tokenizer(base).pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type=task_type, init_lora_weights=False,
                        modules_to_save=["score"] if task_type == "SEQ_CLS" else None)
    get_peft_model(model, config).save_pretrained(str(folder))
    load_tokenizer(base).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("device-adapters")
    reward = lora_adapter(tiny_model, root / "reward", 3, "SEQ_CLS")
    (reward / "align.json").write_text(json.dumps({"stage": "reward", "base_model": tiny_model,
                                                   "metrics": {"eval_accuracy": 1.0}}))
    return {"sft": lora_adapter(tiny_model, root / "sft", 1), "dpo": lora_adapter(tiny_model, root / "dpo", 2),
            "reward": reward}


def test_the_second_device_refuses_what_a_gpu_refuses_and_computes_what_the_cpu_does():
    torch.manual_seed(0)
    layer = torch.nn.Embedding(10, 4)
    ids = torch.tensor([[1, 2, 3]])
    expected = layer(ids)
    with other_device():
        layer.to(DEVICE)
        assert isinstance(layer.weight, OnDevice) and layer.weight.device == DEVICE
        with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
            layer(ids)
        out = layer(ids.to(DEVICE))
        assert out.device == DEVICE and torch.equal(out.cpu(), expected)
        out.sum().backward()
        assert layer.weight.grad.device == DEVICE and unwrap(layer.weight.grad).abs().sum() > 0
        assert (out * torch.tensor(2.0)).device == DEVICE  # a 0-dim CPU tensor is a scalar, as on CUDA
        assert out[0, torch.tensor([0, 2])].shape == (2, 4)  # CPU indices into a device tensor, as on CUDA
        assert out.sum().item() == pytest.approx(expected.sum().item())
        with pytest.raises(TypeError, match="numpy"):
            out.detach().numpy()


# ---------------------------------------------------------------------------- sampling, eval


def policies_on_one_base(tiny_model: str, adapters: dict[str, Path]):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(adapters["sft"]),
                                      adapter_name="sft")
    model.load_adapter(str(adapters["dpo"]), adapter_name="dpo")
    return model.eval()


def test_generate_on_the_device_gives_the_cpu_samples(tiny_model, adapters):
    model = policies_on_one_base(tiny_model, adapters)
    tokenizer = load_tokenizer(tiny_model)
    gen = GenerationConfig(max_new_tokens=8, temperature=0.9, top_p=0.95, batch_size=2)
    on_cpu = generate(Policy(model, tokenizer, "sft", tiny_model), PROMPTS, gen, k=2, desc=None)
    with other_device():
        model.to(DEVICE)
        on_device = generate(Policy(model, tokenizer, "sft", tiny_model), PROMPTS, gen, k=2, desc=None)
    assert on_device == on_cpu and len(on_cpu) == 3 and all(len(r) == 2 for r in on_cpu)


def test_eval_kl_on_the_device_gives_the_cpu_figures(tiny_model, adapters):
    """The H200's failure: eval's KL tokenized on the CPU and passed the ids to the CUDA model."""
    from align.recipes.evaluate import sampled_kl

    model = policies_on_one_base(tiny_model, adapters)
    tokenizer = load_tokenizer(tiny_model)
    on_cpu = sampled_kl(model, tokenizer, PROMPTS, "dpo", "sft", k=2, max_new_tokens=8, batch_size=2)
    with other_device():
        model.to(DEVICE)
        on_device = sampled_kl(model, tokenizer, PROMPTS, "dpo", "sft", k=2, max_new_tokens=8, batch_size=2)
    assert on_device == pytest.approx(on_cpu, abs=1e-5)
    assert all(k > 0 for k in on_cpu)  # two different random adapters: a KL above zero on each prompt


def test_a_folded_policy_decodes_as_its_adapter_and_leaves_the_base_as_it_found_it(tiny_model, adapters):
    """Eval decodes each policy folded into the fp32 base (generation.folded): the logits of the adapter
    unfolded, and after the block every weight is back, so the reference and the next policy run on the
    base they were trained on. A bf16 base, where unfolding would not give the weights back, is left alone."""
    from align.generation import folded

    model = policies_on_one_base(tiny_model, adapters)
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = {}
    for name in ("sft", "dpo"):
        model.set_adapter(name)
        expected[name] = model(input_ids=ids).logits
    assert not torch.allclose(expected["sft"], expected["dpo"], atol=1e-3)
    with torch.no_grad(), folded(model, "dpo"):
        moved = [n for n, p in model.named_parameters() if "base_layer" in n and not torch.equal(p, before[n])]
        assert moved  # folded into the base weights themselves, not run beside them
        assert torch.allclose(model(input_ids=ids).logits, expected["dpo"], atol=1e-5)
    assert all(torch.allclose(p, before[n], atol=1e-6) for n, p in model.named_parameters())
    model.set_adapter("sft")
    assert torch.allclose(model(input_ids=ids).logits, expected["sft"], atol=1e-5)

    model.to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with folded(model, "dpo"):
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
        assert model.active_adapter == "dpo"


def test_a_4bit_base_stored_as_float32_is_not_folded_into(tiny_model, adapters):
    """On CUDA with fp32 compute (a T4 or V100 under compute_dtype=auto) the packed NF4 weights are stored as
    float32 (modeling.bnb_config): folding a policy in would re-quantize the base every other adapter runs on."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from align.generation import folded

    quantized = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                   bnb_4bit_quant_storage=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=quantized, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapters["sft"]), adapter_name="sft")
    model.load_adapter(str(adapters["dpo"]), adapter_name="dpo")
    packed = [m.base_layer.weight for m in model.modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")]
    assert packed and all(w.dtype == torch.float32 for w in packed)  # what the dtype check alone took for fp32
    bits = [w.detach().view(torch.int32).clone() for w in packed]  # packed bytes: as floats some are NaN
    with folded(model, "dpo"):
        assert model.active_adapter == "dpo"
        assert not any(getattr(m, "merged", False) for m in model.modules() if hasattr(m, "lora_A"))
    assert all(torch.equal(w.detach().view(torch.int32), b) for w, b in zip(packed, bits, strict=True))


@pytest.mark.parametrize("dtype, merged", [("float32", True), ("bfloat16", False)])
def test_a_sampled_policy_is_folded_only_into_an_fp32_base(tiny_model, adapters, dtype, merged):
    """A GPU's bf16 base would round most of the adapter's update away if LoRA were folded into it: the adapter is
    kept beside it there, and folded only into fp32 (the CPU's), where sampling runs faster so."""
    from peft import PeftModel

    from align.config import ModelConfig
    from align.generation import load_policy
    from align.modeling import device_plan

    cfg = ModelConfig(quantize=False, compute_dtype=dtype)
    policy = load_policy(adapters["sft"], cfg, device_plan(cfg))
    assert isinstance(policy.model, PeftModel) is not merged
    assert policy.model.get_input_embeddings().weight.dtype == getattr(torch, dtype)


def test_eval_kl_over_chunks_of_answers_and_all_logits_gives_the_whole_batch_figures(tiny_model, adapters, monkeypatch):
    """sampled_kl reads the logits of KL_ROWS answers at a time, only those that predict an answer's tokens:
    9 answers (3 prompts x 3) in chunks of 2, a prompt's answers split across chunks, give each prompt's KL as
    one chunk of all 9 does, and so does a model whose forward computes every logit (no logits_to_keep)."""
    import align.recipes.evaluate as evaluate

    model = policies_on_one_base(tiny_model, adapters)
    tokenizer = load_tokenizer(tiny_model)
    monkeypatch.setattr(evaluate, "KL_ROWS", 64)
    whole = evaluate.sampled_kl(model, tokenizer, PROMPTS, "dpo", "sft", k=3, max_new_tokens=8, batch_size=3)
    monkeypatch.setattr(evaluate, "KL_ROWS", 2)
    chunked = evaluate.sampled_kl(model, tokenizer, PROMPTS, "dpo", "sft", k=3, max_new_tokens=8, batch_size=3)
    assert chunked == pytest.approx(whole, abs=1e-5) and len(set(whole)) == 3

    base = model.get_base_model()
    forward = base.forward

    def without_logits_to_keep(input_ids=None, attention_mask=None, position_ids=None, **kwargs):  # as remote code
        assert "logits_to_keep" not in kwargs
        return forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)

    monkeypatch.setattr(base, "forward", without_logits_to_keep)  # every logit computed, the same ones read
    alike = evaluate.sampled_kl(model, tokenizer, PROMPTS, "dpo", "sft", k=3, max_new_tokens=8, batch_size=3)
    assert alike == pytest.approx(whole, abs=1e-5)


def test_the_eval_kl_bar_moves_by_decoding_step_and_scored_chunk(tiny_model, adapters, monkeypatch):
    """Its bar counted batches: the quickstart's 48 prompts, one batch, sat at 0/1 for 71 s. A step per decoding
    step of a batch, then one per chunk of KL_ROWS answers scored: 3 prompts x 3 answers in chunks of 4 are 3."""
    from test_generation import Bar

    import align.recipes.evaluate as evaluate

    model = policies_on_one_base(tiny_model, adapters)
    monkeypatch.setattr(evaluate, "KL_ROWS", 4)
    monkeypatch.setattr(evaluate, "tqdm", Bar)
    Bar.made.clear()
    evaluate.sampled_kl(model, load_tokenizer(tiny_model), PROMPTS[:3], "dpo", "sft", k=3, max_new_tokens=5,
                        batch_size=3)
    (bar,) = Bar.made
    assert bar.total == 5 + 3 and bar.seen[-1] == 8 and len(bar.seen) >= 5  # moved during decoding, not at its end


def test_eval_kl_of_one_token_answers_is_the_first_token_kl(tiny_model, adapters):
    """With one-token answers the sequence KL is the KL of the first token's distributions, whatever is
    sampled: each prompt alone, unpadded, must give what the left-padded batch gave. The same adapter on
    both sides gives 0; response_mask counts a sampled EOS and nothing after it."""
    from align import evaluation as ev
    from align.generation import chat_prompt
    from align.recipes.evaluate import sampled_kl
    from align.rl import response_mask

    model = policies_on_one_base(tiny_model, adapters)
    tokenizer = load_tokenizer(tiny_model)
    prompts = ["Hi", "Where do I find the export button in the desktop app?", "Can I share a note?"]
    batched = sampled_kl(model, tokenizer, prompts, "dpo", "sft", k=3, max_new_tokens=1, batch_size=3)
    alone = []
    for prompt in prompts:
        ids = tokenizer(chat_prompt(tokenizer, prompt), return_tensors="pt", add_special_tokens=False)["input_ids"]
        logits = {}
        for name in ("dpo", "sft"):
            model.set_adapter(name)
            with torch.no_grad():
                logits[name] = model(input_ids=ids).logits[:, -1:]
        alone.append(ev.sequence_kl(logits["dpo"], logits["sft"], torch.ones(1, 1)).item())
    assert batched == pytest.approx(alone, rel=1e-4) and min(alone) > 0
    assert sampled_kl(model, tokenizer, prompts, "sft", "sft", max_new_tokens=4) == [0.0] * 3
    eos = tokenizer.eos_token_id
    new = torch.tensor([[5, 6, eos, eos, eos], [5, 6, 7, 8, 9], [eos, eos, eos, eos, eos]])
    assert response_mask(new, eos)[0].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_reward_scores_on_the_device_are_the_cpu_scores(adapters):
    from align.reward_model import load_reward_model, score

    model, tokenizer = load_reward_model(adapters["reward"], CPU_PLAN)
    responses = ["Open Settings and tap Sync.", "No.", "Yes, tap Share, then pick a person to share with."]
    on_cpu = score(model, tokenizer, PROMPTS, responses, batch_size=2)
    with other_device():
        model.to(DEVICE)
        on_device = score(model, tokenizer, PROMPTS, responses, batch_size=2)
    assert on_device == pytest.approx(on_cpu, abs=1e-5) and len(set(on_cpu)) == 3


def test_a_bf16_reward_model_scores_in_fp32_without_ties(adapters):
    """On a GPU the reward model runs in bf16: its score head computes in fp32, or distinct responses tie."""
    from align.reward_model import load_reward_model, score

    model, tokenizer = load_reward_model(adapters["reward"], replace(CPU_PLAN, compute_dtype=torch.bfloat16))
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    responses = [f"Open Settings and tap Sync {i} times." for i in range(24)]
    scores = score(model, tokenizer, [PROMPTS[0]] * len(responses), responses, batch_size=8)
    in_bf16 = [s for s in scores if torch.tensor(s).bfloat16().item() == s]
    assert len(set(scores)) == len(responses) and len(in_bf16) < 4  # fp32 values, not bf16 ones


# ---------------------------------------------------------------------------- PPO


def ppo_config(tiny_model: str, sft: Path, **rl) -> PPOStageConfig:
    return load_config(PPOStageConfig, None, [
        f"model.name={tiny_model}", f"sft={sft}", "model.quantize=false", "generation.max_new_tokens=8",
        "generation.temperature=0.7", "rl.rollout_prompts=3", "rl.minibatch_size=3", "rl.ppo_epochs=2",
        "run.wandb=disabled", *(f"rl.{k}={v}" for k, v in rl.items())])


def one_ppo_step(model, tokenizer, cfg, reward, device=None) -> dict[str, float]:
    """A rollout, its rewards and one PPO update, as train_ppo runs them."""
    from align import rl as R
    from align.recipes.ppo import ValueHead, ppo_step, rollout

    torch.manual_seed(0)
    head = ValueHead(model.config.hidden_size)
    if device is not None:
        model.to(device)
    head.to(next(model.parameters()).device)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    roll = rollout(model, tokenizer, PROMPTS, cfg, step=1)
    scores = torch.tensor(reward(PROMPTS, roll["texts"]), dtype=torch.float32, device=roll["mask"].device)
    kl_ctl = R.kl_controller("fixed", cfg.rl.kl_coef, 6.0, 10000)
    stats = ppo_step(model, head, optimizer, roll, scores, cfg, kl_ctl, step=1, has_ref=True)
    return {"texts": roll["texts"], "scores": unwrap(scores).tolist(), **stats}


def test_a_ppo_step_on_the_device_matches_the_cpu_step(tiny_model, adapters):
    from align.recipes.ppo import build_policy

    cfg = ppo_config(tiny_model, adapters["sft"])
    tokenizer = load_tokenizer(str(adapters["sft"]))

    def words(prompts, responses):
        return [len(r.split()) / 4 for r in responses]

    cpu_model = build_policy(cfg, CPU_PLAN, adapters["sft"])
    device_model = copy.deepcopy(cpu_model)
    on_cpu = one_ppo_step(cpu_model, tokenizer, cfg, words)
    with other_device():
        on_device = one_ppo_step(device_model, tokenizer, cfg, words, DEVICE)
        assert {p.device for p in device_model.parameters()} == {DEVICE}
        trained = {n: unwrap(p).detach().clone() for n, p in device_model.named_parameters() if p.requires_grad}
    assert on_device["texts"] == on_cpu["texts"]
    for key in ("kl", "entropy", "policy/loss", "value/loss", "value/mean"):
        assert on_device[key] == pytest.approx(on_cpu[key], abs=1e-4), key
    moved = {n: p for n, p in cpu_model.named_parameters() if p.requires_grad}
    assert trained.keys() == moved.keys()
    assert all(torch.allclose(trained[n], moved[n].detach(), atol=1e-5) for n in moved)


def test_reward_model_on_the_policy_base_scores_on_the_device(tiny_model, adapters):
    """rl.reward_on_policy_base: token ids and the score head follow the policy's device."""
    from align.recipes.ppo import build_policy
    from align.reward_model import shared_base_reward

    cfg = ppo_config(tiny_model, adapters["sft"], reward_on_policy_base="true")
    responses = ["Open Settings and tap Sync.", "No.", "Yes, tap Share."]
    cpu_model = build_policy(cfg, CPU_PLAN, adapters["sft"])
    device_model = copy.deepcopy(cpu_model)
    parts = adapters["reward"], adapters["sft"], tiny_model, cfg.model  # a reward model on the bare base
    on_cpu = shared_base_reward(cpu_model, *parts)(PROMPTS, responses)
    with other_device():
        device_model.to(DEVICE)
        on_device = shared_base_reward(device_model, *parts)(PROMPTS, responses)
        assert {p.device for p in device_model.parameters()} == {DEVICE}
        loaded = {n: unwrap(p).detach().clone() for n, p in device_model.named_parameters() if ".reward." in n}
    assert on_device == pytest.approx(on_cpu, abs=1e-5) and len(set(on_cpu)) == 3
    # The reward adapter's weights did arrive on the device (a meta-like device would skip the copy).
    expected = {n: p.detach() for n, p in cpu_model.named_parameters() if ".reward." in n}
    assert loaded.keys() == expected.keys() and expected
    assert all(torch.equal(loaded[n], expected[n]) for n in expected)
    assert any(expected[n].abs().sum() > 0 for n in expected if "lora_B" in n)


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_an_unquantized_base_under_sharding_is_left_on_the_host_for_the_trainer(tiny_model, monkeypatch, kind):
    """FSDP and ZeRO shard an unquantized model from the host; moved whole to every GPU first, a base that
    only fits sharded would not fit. align ppo's own loop (no Trainer) moves it to its process's GPU."""
    from align.config import ModelConfig
    from align.modeling import load_base_model

    moved, real = [], torch.nn.Module.to

    def to(self, *args, **kwargs):
        if args and str(args[0]).startswith("cuda"):  # this CPU build has no CUDA: record the move instead
            moved.append(str(args[0]))
            return self
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    monkeypatch.setenv(f"ACCELERATE_USE_{kind}", "true")
    monkeypatch.setenv("LOCAL_RANK", "1")
    plan = DevicePlan("cuda", quantize=False, compute_dtype=torch.float32, gradient_checkpointing=False)
    cfg = ModelConfig(name=tiny_model, quantize=False)
    load_base_model(cfg, plan)  # sft, reward, dpo, grpo: Trainers
    assert moved == []
    load_base_model(cfg, plan, trainer_places=False)  # ppo
    load_base_model(cfg, plan, training=False)  # a model that only scores (ppo's reward model)
    assert moved == ["cuda:1", "cuda:1"]


def test_each_process_takes_its_own_gpu_before_cuda_is_asked_anything(monkeypatch):
    """Under accelerate launch, LOCAL_RANK's GPU is set before the bf16 check: otherwise every process opens
    a CUDA context on GPU 0 as well."""
    from align.config import ModelConfig
    from align.modeling import device_plan

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **kw: calls.append(("bf16?",)) or True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    plan = device_plan(ModelConfig(quantize=False))
    assert calls == [("set_device", 3), ("bf16?",)] and plan.device == "cuda" and plan.bf16
    monkeypatch.delenv("LOCAL_RANK")
    calls.clear()
    device_plan(ModelConfig(quantize=False))  # launched alone: the current device, untouched
    assert calls == [("bf16?",)]


def test_one_process_that_sees_several_gpus_trains_on_one_at_the_batch_it_was_given(tmp_path):
    """transformers gives one process every GPU it sees (n_gpu = device_count()): the batch times that count, past
    what the device plan sized memory for, and an unquantized model in nn.DataParallel, whose replicas ran DPO's
    patched forward on cuda:0's module (a device error). A stage's TrainingArguments train on one GPU."""
    from functools import cached_property

    from transformers import TrainingArguments

    from align.config import RunConfig, TrainConfig
    from align.training import trl_args

    class SeesFour(TrainingArguments):  # as on a 4-GPU machine, one process, no launcher
        @cached_property
        def _setup_devices(self):
            self._n_gpu = 4
            return torch.device("cpu")

    plan = DevicePlan("cuda", quantize=False, compute_dtype=torch.float32, gradient_checkpointing=False)
    train = TrainConfig(batch_size=3)
    args = trl_args(SeesFour, train, plan, RunConfig(dir=str(tmp_path), wandb="disabled"), "sft", tmp_path,
                    has_eval=False)
    assert args.n_gpu == 1 and args.train_batch_size == 3
    assert SeesFour(output_dir=str(tmp_path), per_device_train_batch_size=3).train_batch_size == 12  # unguarded
